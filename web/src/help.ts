// The "?" button in the top bar and the help panel it opens over the
// terminal. Built with DOM calls, not HTML strings, so the page's CSP stays
// strict and nothing here can be read as markup. The page template stays as
// it was: the server embeds it at build time.

export const HELP: readonly string[] = [
  'Command mode: type a command line, Enter runs it with sh -c on the selected agent. ' +
    '↑/↓ or Ctrl-P/Ctrl-N walk the history; Ctrl-A/Ctrl-E, Ctrl-U/Ctrl-K (Ctrl-Y puts back), and Ctrl-L edit as in a shell.',
  'In command mode, what you type while a command runs goes to its standard input ' +
    '(Enter sends a line, Ctrl-D ends input); use shell mode for programs that need a terminal.',
  'Ctrl-C interrupts the command; a second Ctrl-C kills it.',
  'Shell mode: a login shell in a pseudo-terminal; every key goes to it.',
  'Files: "upload" puts files on the host, into the shell\'s current directory (or a path you type), ' +
    'each with a progress bar and a cancel button; files dropped on the terminal go there too. ' +
    '"download" asks for a path and saves that file among the browser\'s downloads.',
  'Copy with Ctrl+Shift+C (or Ctrl+C on a selection in command mode); paste with Ctrl+Shift+V or Ctrl+V.',
  'The history is kept in this browser for your user only and erased when you log out.',
  'Keyboard: while the terminal has the focus it takes every key, Tab included; ' +
    'Ctrl+Shift+F6 moves the focus to the top bar, and Tab from there leads back into the terminal. ' +
    'Esc closes this panel.',
  'On touch screens, a bar below the terminal has the keys an on-screen keyboard lacks ' +
    '(Esc, Ctrl, Alt, Tab, arrows, |, ~, /); Ctrl and Alt apply to the next key.',
];

/** The key that leaves the terminal for the top bar (see HELP). */
export function isLeaveTerminalKey(ev: KeyboardEvent): boolean {
  return ev.ctrlKey && ev.shiftKey && !ev.altKey && !ev.metaKey && ev.key === 'F6';
}

export interface HelpPanel {
  button: HTMLButtonElement;
  panel: HTMLElement;
  toggle(open: boolean): void;
}

/**
 * Adds the button after the top bar's spacer and the panel to the page.
 * `extra` nodes (settings) go below the list. Closing gives the focus back
 * via `closed`.
 */
export function buildHelp(topbar: HTMLElement, lines: readonly string[], extra: Node[],
  closed: () => void): HelpPanel {
  const button = document.createElement('button');
  button.type = 'button';
  button.id = 'help-toggle';
  button.textContent = '?';
  button.title = 'Help';
  button.setAttribute('aria-label', 'Help');
  button.setAttribute('aria-expanded', 'false');
  button.setAttribute('aria-controls', 'help');

  const panel = document.createElement('section');
  panel.id = 'help';
  panel.className = 'help-panel';
  panel.hidden = true;
  panel.setAttribute('aria-label', 'Help');
  const list = document.createElement('ul');
  for (const line of lines) {
    const item = document.createElement('li');
    item.textContent = line;
    list.appendChild(item);
  }
  panel.appendChild(list);
  for (const node of extra) panel.appendChild(node);

  const toggle = (open: boolean): void => {
    // Below the top bar, however many rows it wrapped into. (CSSOM, not a
    // style attribute: allowed by the CSP.)
    if (open) panel.style.top = Math.round(topbar.getBoundingClientRect().bottom + 6) + 'px';
    panel.hidden = !open;
    button.setAttribute('aria-expanded', String(open));
    if (!open) closed();
  };
  button.addEventListener('click', () => toggle(panel.hidden));
  panel.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') toggle(false);
  });
  const spacer = topbar.querySelector('.spacer');
  topbar.insertBefore(button, spacer ? spacer.nextSibling : null);
  document.body.appendChild(panel);
  return { button, panel, toggle };
}
