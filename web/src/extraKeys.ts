// The extra-keys bar for touch devices: keys an on-screen keyboard lacks
// (Esc, Ctrl, Alt, Tab, arrows, `|`, `~`, `/`). CSS shows it only on coarse
// pointers. Ctrl and Alt are sticky: they modify the next key, from the bar
// or from the on-screen keyboard. The bar feeds keys through xterm's own
// input, so both modes see them exactly like typed keys.

import type { Terminal } from './xterm';

export interface Modifiers {
  ctrl: boolean;
  alt: boolean;
}

const ARROW = /^\x1b[[O]([ABCD])$/;

/** The control character Ctrl turns `c` into, or null (Ctrl has no effect). */
function ctrlChar(c: string): string | null {
  if (/^[a-z]$/i.test(c)) return String.fromCharCode(c.toUpperCase().charCodeAt(0) & 0x1f);
  switch (c) {
    case '@': case ' ': case '2': return '\x00';
    case '[': case '3': return '\x1b';
    case '\\': case '4': return '\x1c';
    case ']': case '5': return '\x1d';
    case '^': case '6': return '\x1e';
    case '_': case '/': case '7': return '\x1f';
    case '?': case '8': return '\x7f';
    default: return null;
  }
}

/** Whether `data` is one key (one character or an arrow), not a paste. */
export function isOneKey(data: string): boolean {
  return ARROW.test(data) || Array.from(data).length === 1;
}

/**
 * One key with the armed modifiers applied, as a terminal would send it:
 * Ctrl+letter a control character, Alt an ESC prefix, a modified arrow
 * its xterm form (`ESC [1;5A` for Ctrl+↑).
 */
export function withModifiers(data: string, mods: Modifiers): string {
  const arrow = ARROW.exec(data);
  if (arrow) {
    if (!mods.ctrl && !mods.alt) return data;
    return '\x1b[1;' + (1 + (mods.alt ? 2 : 0) + (mods.ctrl ? 4 : 0)) + arrow[1];
  }
  let out = data;
  if (mods.ctrl) out = ctrlChar(data) ?? data;
  if (mods.alt) out = '\x1b' + out;
  return out;
}

/** An arrow key as the terminal's cursor-key mode wants it. */
export function arrowKey(dir: 'A' | 'B' | 'C' | 'D', applicationMode: boolean): string {
  return (applicationMode ? '\x1bO' : '\x1b[') + dir;
}

interface KeySpec {
  label: string;
  name: string;
  /** What the key sends (for arrows, at the time it is pressed). */
  data?: () => string;
  modifier?: keyof Modifiers;
}

export class ExtraKeys {
  private readonly mods: Modifiers = { ctrl: false, alt: false };
  private readonly modButtons = new Map<keyof Modifiers, HTMLButtonElement>();
  readonly element: HTMLElement;

  constructor(private readonly term: Terminal) {
    const app = (): boolean => term.modes.applicationCursorKeysMode;
    const keys: KeySpec[] = [
      { label: 'Esc', name: 'Escape', data: () => '\x1b' },
      { label: 'Ctrl', name: 'Control, for the next key', modifier: 'ctrl' },
      { label: 'Alt', name: 'Alt, for the next key', modifier: 'alt' },
      { label: 'Tab', name: 'Tab', data: () => '\t' },
      { label: '←', name: 'Left', data: () => arrowKey('D', app()) },
      { label: '↑', name: 'Up', data: () => arrowKey('A', app()) },
      { label: '↓', name: 'Down', data: () => arrowKey('B', app()) },
      { label: '→', name: 'Right', data: () => arrowKey('C', app()) },
      { label: '|', name: 'Vertical bar', data: () => '|' },
      { label: '~', name: 'Tilde', data: () => '~' },
      { label: '/', name: 'Slash', data: () => '/' },
    ];
    const bar = document.createElement('div');
    bar.className = 'extra-keys';
    bar.setAttribute('role', 'toolbar');
    bar.setAttribute('aria-label', 'Extra keys');
    for (const key of keys) {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = key.label;
      button.setAttribute('aria-label', key.name);
      button.dataset['key'] = key.label;
      // The terminal keeps the focus, so the on-screen keyboard stays up.
      button.addEventListener('pointerdown', (ev) => ev.preventDefault());
      button.addEventListener('mousedown', (ev) => ev.preventDefault());
      if (key.modifier) {
        const mod = key.modifier;
        button.setAttribute('aria-pressed', 'false');
        this.modButtons.set(mod, button);
        button.addEventListener('click', () => {
          this.mods[mod] = !this.mods[mod];
          this.render();
          term.focus();
        });
      } else {
        const data = key.data!;
        button.addEventListener('click', () => {
          term.input(data(), true); // through onData, and so through `take`
          term.focus();
        });
      }
      bar.appendChild(button);
    }
    this.element = bar;
  }

  /** Input from any source: one key gets the armed modifiers, which then disarm. */
  take(data: string): string {
    if (!this.mods.ctrl && !this.mods.alt) return data;
    const out = isOneKey(data) ? withModifiers(data, this.mods) : data;
    this.mods.ctrl = false;
    this.mods.alt = false;
    this.render();
    return out;
  }

  private render(): void {
    for (const [mod, button] of this.modButtons) {
      button.setAttribute('aria-pressed', String(this.mods[mod]));
    }
  }
}
