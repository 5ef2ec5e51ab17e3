// Decoding what xterm's onData delivers in command mode: one key, an escape
// sequence, or a whole paste. Pure.

// One escape sequence starting at data[i]: CSI, SS3, OSC, or ESC + one char.
const ESCAPE = /\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)?/y;

/** The escape sequence that starts at `data[i]` (which is ESC). */
export function escapeAt(data: string, i: number): string {
  ESCAPE.lastIndex = i;
  const m = ESCAPE.exec(data);
  return m ? m[0] : data[i]!;
}

/** What the line editor does for a key. */
export type EditAction =
  | 'historyUp' | 'historyDown' | 'left' | 'right' | 'home' | 'end' | 'deleteForward';

/**
 * The editing action of an escape sequence (arrows, Home/End in their CSI,
 * SS3 and `~` forms, Delete), or null: function keys and terminal replies
 * are ignored.
 */
export function escapeAction(seq: string): EditAction | null {
  const csi = /^\x1b\[([0-9;]*)([A-Za-z~])$/.exec(seq);
  const ss3 = /^\x1bO([A-Za-z])$/.exec(seq);
  const final = csi ? csi[2] : ss3 ? ss3[1] : '';
  const param = csi ? csi[1]!.split(';')[0] : '';
  switch (final) {
    case 'A': return 'historyUp';
    case 'B': return 'historyDown';
    case 'C': return 'right';
    case 'D': return 'left';
    case 'H': return 'home';
    case 'F': return 'end';
    case '~':
      if (param === '1' || param === '7') return 'home';
      if (param === '4' || param === '8') return 'end';
      if (param === '3') return 'deleteForward';
      return null;
    default: return null;
  }
}

/** Bracketed-paste markers only matter to programs that asked for them. */
export function stripPasteMarkers(data: string): string {
  return data.replace(/\x1b\[20[01]~/g, '');
}
