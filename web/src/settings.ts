// Settings shown in the help panel and remembered in this browser. For now
// one: xterm's screen-reader mode, which keeps an accessible copy of the
// terminal's rows and announces new output (off by default: it costs time
// on large output).

import { loadPref, savePref, type KeyValueStore } from './storage';
import type { Terminal } from './xterm';

export const SCREEN_READER_KEY = 'conch.screenReader';

export function screenReaderWanted(store: KeyValueStore | null): boolean {
  return loadPref(store, SCREEN_READER_KEY) === 'on';
}

/** The checkbox that switches screen-reader mode, for the help panel. */
export function screenReaderSetting(term: Terminal, store: KeyValueStore | null): HTMLElement {
  const label = document.createElement('label');
  label.className = 'help-setting';
  const box = document.createElement('input');
  box.type = 'checkbox';
  box.id = 'screen-reader';
  box.checked = !!term.options.screenReaderMode;
  box.addEventListener('change', () => {
    term.options.screenReaderMode = box.checked;
    savePref(store, SCREEN_READER_KEY, box.checked ? 'on' : 'off');
  });
  label.append(box, ' Screen reader mode: the terminal\'s text is readable by assistive technology, and new output is announced');
  return label;
}
