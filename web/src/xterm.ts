// xterm.js and its fit addon are loaded by the page as UMD builds (served
// by conch from the pinned npm packages, before this script, with `defer`),
// exposing window.Terminal and window.FitAddon.FitAddon. Only their types
// are imported here: the bundle never contains xterm.

import type { Terminal as XTerminal } from '@xterm/xterm';
import type { FitAddon as XFitAddon } from '@xterm/addon-fit';

export type Terminal = XTerminal;
export type FitAddon = XFitAddon;

declare global {
  interface Window {
    Terminal: typeof XTerminal;
    FitAddon: { FitAddon: typeof XFitAddon };
  }
}
