// The look of conch's terminals, shared by the console and the replay
// page: a recording is played back in the colours it was watched in.

import type { ITerminalOptions } from '@xterm/xterm';

export const TERMINAL_FONT = 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace';

export const TERMINAL_THEME: NonNullable<ITerminalOptions['theme']> = {
  background: '#0e1116',
  foreground: '#d6dde6',
  cursor: '#5fb3f9',
  cursorAccent: '#0e1116',
  selectionBackground: '#2f4f6f',
  // The stock red and green are too dark on this background.
  red: '#ef6b6b',
  green: '#4fc27a',
  yellow: '#e5b54b',
  blue: '#5fb3f9',
  // The grey of hints and exit summaries: 5:1 on the background (WCAG
  // AA asks 4.5:1; checked by tests/e2e/accessibility.test.mjs).
  brightBlack: '#7a8594',
};
