// Shell mode: an interactive login shell in a PTY on the agent. Every
// keystroke goes to it as `stdin`, untouched (the PTY does its own line
// discipline), and the terminal size follows the window.
//
// On an agent that keeps sessions the shell outlives the page: the server
// answers `attached` with the session's id, which the page keeps. Leaving
// shell mode, closing the tab, reloading or losing the connection then
// detaches (the shell keeps running for the agent's linger time) and the
// page can attach again; only an explicit "end" kills it.

import { REVERSE_WRAP_ON, SANE_MODES } from './ansi';
import type { Flows } from './flow';
import { stdinMessages, type ClientMessage } from './protocol';
import type { Screen } from './screen';
import type { Held } from './sessions';

export interface ShellHost {
  screen: Screen;
  flows: Flows;
  send(msg: ClientMessage): boolean;
  agent(): string;
  /** The shell is gone: back to command mode, keeping the screen. */
  ended(): void;
  /** The session this shell holds changed (to remember it across a reload). */
  held(): void;
}

interface Shell {
  id: number;
  started: boolean;
  /** Set once the server said `attached`: the shell outlives the page. */
  session: Held | null;
  watch: boolean;
}

export class ShellMode {
  private shell: Shell | null = null;
  /** A session to attach again once the connection is back. */
  private waiting: Held | null = null;

  constructor(private readonly host: ShellHost) {}

  /** Starts a login shell the size of the terminal on the selected agent. */
  start(): void {
    const { screen } = this.host;
    screen.fit();
    const id = this.host.flows.open();
    this.shell = { id, started: false, session: null, watch: false };
    this.host.send({
      type: 'exec', id, pty: { cols: screen.term.cols, rows: screen.term.rows }, agent: this.host.agent(),
    });
  }

  /** Attaches to a running session (to write, or with `watch` to look on). */
  attach(held: Held): void {
    const { screen } = this.host;
    screen.fit();
    this.waiting = null;
    const id = this.host.flows.open();
    this.shell = { id, started: false, session: held, watch: held.watch };
    this.host.send({
      type: 'attach', id, session: held.session, agent: held.agent,
      cols: screen.term.cols, rows: screen.term.rows, watch: held.watch,
    });
    this.host.held();
  }

  /**
   * Leaves the shell: a session is detached (it keeps running), a shell
   * that is no session is closed (the agent kills it).
   */
    stop(): void {
    const waited = this.waiting;
    this.waiting = null;
    if (!this.shell) {
      if (waited) this.host.held();
      return;
    }
    const { id, session } = this.shell;
    this.host.send(session ? { type: 'detach', id } : { type: 'close', id });
    this.host.flows.close(id);
    this.shell = null;
    this.waiting = null;
    if (session) this.host.held();
  }

  get active(): boolean {
    return this.shell !== null;
  }

  /** The session this tab holds (attached, or waiting to attach again). */
  get session(): Held | null {
    return this.shell?.session ?? this.waiting;
  }

  /** A shell runs that would die with the page (no session keeps it). */
  get unkept(): boolean {
    return this.shell !== null && this.shell.session === null;
  }

  get watching(): boolean {
    return this.shell?.watch ?? false;
  }

  owns(id: number): boolean {
    return this.shell !== null && this.shell.id === id;
  }

  started(id: number): void {
    if (this.shell && this.shell.id === id) this.shell.started = true;
  }

  /** The server said the shell is session `session` on `agent`. */
  attached(id: number, agent: string, session: string, watch: boolean): void {
    if (!this.shell || this.shell.id !== id) return;
    this.shell.session = { agent, session, watch };
    this.host.held();
  }

  /** The id of a shell still waiting for `started`, or null. */
  unstartedId(): number | null {
    return this.shell && !this.shell.started ? this.shell.id : null;
  }

  input(data: string): void {
    if (!this.shell || this.shell.watch) return;
    for (const msg of stdinMessages(this.shell.id, data, false)) this.host.send(msg);
  }

  resize(cols: number, rows: number): void {
    if (this.shell && !this.shell.watch) this.host.send({ type: 'resize', id: this.shell.id, cols, rows });
  }

  /**
   * The connection is gone. A session keeps running: remember it and
   * return true (`resume` attaches again); anything else is gone.
   */
  suspend(): boolean {
    const session = this.shell?.session;
    if (!this.shell || !session) return false;
    this.host.flows.close(this.shell.id);
    this.shell = null;
    this.waiting = session;
    return true;
  }

    /**
   * The connection (or the session's agent) is back: attach again to the
   * session this tab held, if it still waits for one.
   */
  resume(agentUp: (agent: string) => boolean = () => true): boolean {
    const held = this.waiting;
    if (!held || this.shell || !agentUp(held.agent)) return false;
    this.attach(held);
    return true;
  }

  /** The session this tab waits to attach again, if any. */
  get waitingFor(): Held | null {
    return this.waiting;
  }

  /**
   * The shell is gone (exited, refused, detached, connection lost): say
   * so, undo the modes it may have left on, and go back to command mode
   * without clearing, so its last words stay readable.
   */
  ended(text: string): void {
    if (this.shell) this.host.flows.close(this.shell.id);
    const held = this.shell?.session ?? this.waiting;
    this.shell = null;
    this.waiting = null;
    if (held) this.host.held();
    const { screen } = this.host;
    screen.out(SANE_MODES + REVERSE_WRAP_ON + screen.newlineIfNeeded() + text + '\r\n');
    this.host.ended();
  }
}
