// Terminal control sequences the console writes itself. Only colours are
// ever injected around command output; the rest serve the line editor and
// the switch between modes.

export const RESET = '\x1b[0m';
export const RED = '\x1b[31m';
export const GREEN = '\x1b[32m';
export const YELLOW = '\x1b[33m';
export const GREY = '\x1b[90m';
export const BOLD_GREEN = '\x1b[1;32m';
export const BOLD_BLUE = '\x1b[1;34m';

/** Erase from the cursor to the end of the screen (also clears wrapped rows). */
export const ERASE_BELOW = '\x1b[J';
/** Erase from the cursor to the end of the row. */
export const ERASE_RIGHT = '\x1b[K';
/** Cursor home + erase display: like Ctrl-L in a shell, scrollback is kept. */
export const CLEAR_SCREEN = '\x1b[H\x1b[2J';
/** RIS: clears screen and scrollback and resets every mode. */
export const FULL_RESET = '\x1bc';

// Reverse wraparound lets '\b' step back across a soft-wrapped line, so the
// line editor can move over input longer than the terminal width.
export const REVERSE_WRAP_ON = '\x1b[?45h';

// Undo terminal modes a full-screen program in the shell may have left on
// (alternate screen, application cursor keys, bracketed paste, mouse
// reporting, hidden cursor) without clearing what is on the screen.
// ?1047l, not ?1049l: the latter also restores a saved cursor position,
// which would put the next lines at the top of the screen.
export const SANE_MODES = '\x1b[?1047l\x1b[?1l\x1b[?2004l\x1b[?1000l\x1b[?1002l' +
  '\x1b[?1003l\x1b[?1006l\x1b[?25h' + RESET;

/** Moves the cursor `n` cells left ('\b' crosses soft wraps, see above). */
export function back(n: number): string {
  return '\b'.repeat(n);
}
