// Shell mode: an interactive login shell in a PTY on the agent. Every
// keystroke goes to it as `stdin`, untouched (the PTY does its own line
// discipline), and the terminal size follows the window.

import { REVERSE_WRAP_ON, SANE_MODES } from './ansi';
import type { Flows } from './flow';
import { stdinMessages, type ClientMessage } from './protocol';
import type { Screen } from './screen';

export interface ShellHost {
  screen: Screen;
  flows: Flows;
  send(msg: ClientMessage): boolean;
  agent(): string;
  /** The shell is gone: back to command mode, keeping the screen. */
  ended(): void;
}

export class ShellMode {
  private shell: { id: number; started: boolean } | null = null;

  constructor(private readonly host: ShellHost) {}

  /** Starts a login shell the size of the terminal on the selected agent. */
  start(): void {
    const { screen } = this.host;
    screen.fit();
    const id = this.host.flows.open();
    this.shell = { id, started: false };
    this.host.send({
      type: 'exec', id, pty: { cols: screen.term.cols, rows: screen.term.rows }, agent: this.host.agent(),
    });
  }

  /** Closes the shell, if one runs. */
  stop(): void {
    if (!this.shell) return;
    this.host.send({ type: 'close', id: this.shell.id });
    this.host.flows.close(this.shell.id);
    this.shell = null;
  }

  get active(): boolean {
    return this.shell !== null;
  }

  owns(id: number): boolean {
    return this.shell !== null && this.shell.id === id;
  }

  started(id: number): void {
    if (this.shell && this.shell.id === id) this.shell.started = true;
  }

  /** The id of a shell still waiting for `started`, or null. */
  unstartedId(): number | null {
    return this.shell && !this.shell.started ? this.shell.id : null;
  }

  input(data: string): void {
    if (!this.shell) return;
    for (const msg of stdinMessages(this.shell.id, data, false)) this.host.send(msg);
  }

  resize(cols: number, rows: number): void {
    if (this.shell) this.host.send({ type: 'resize', id: this.shell.id, cols, rows });
  }

  /**
   * The shell is gone (exited, refused, connection lost): say so, undo the
   * modes it may have left on, and go back to command mode without
   * clearing, so its last words stay readable.
   */
  ended(text: string): void {
    if (this.shell) this.host.flows.close(this.shell.id);
    this.shell = null;
    const { screen } = this.host;
    screen.out(SANE_MODES + REVERSE_WRAP_ON + screen.newlineIfNeeded() + text + '\r\n');
    this.host.ended();
  }
}
