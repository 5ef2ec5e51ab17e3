// Command mode: this page edits a line locally (prompt, history, cursor)
// and sends each finished line to the server as an `exec`; output streams
// back as binary frames and ends with an exit summary. What is typed while
// a command runs is its standard input.

import {
  back, BOLD_BLUE, BOLD_GREEN, CLEAR_SCREEN, ERASE_BELOW, ERASE_RIGHT, GREEN, GREY, RED,
  RESET, REVERSE_WRAP_ON, YELLOW,
} from './ansi';
import {
  broadcast, Grouper, hosts, printable, type BroadcastSink, type FanoutLine, type HostOutput,
} from './broadcast';
import type { Flows } from './flow';
import { escapeAction, escapeAt, stripPasteMarkers, type EditAction } from './keys';
import { LineEditor } from './lineEditor';
import type { History } from './history';
import {
  execMessageBytes, MAX_MESSAGE, STDERR, stdinMessages,
  type ClientMessage, type ExitStatus,
} from './protocol';
import type { Screen } from './screen';
import { cells, clean, formatDuration, graphemes, groupDigits, utf8Length, wellFormed, width } from './text';

/** What command mode needs from the rest of the page. */
export interface CommandHost {
  screen: Screen;
  flows: Flows;
  history: History;
  send(msg: ClientMessage): boolean;
  isReady(): boolean;
  /** The agent commands go to. */
  agent(): string;
  /** A selector when command lines go to every agent it matches (broadcast), else null. */
  target(): string | null;
  /** A command started (true) or ended (false): for the "running" indicator. */
  runningChanged(running: boolean): void;
}

/** The command being run, and the line of standard input being typed for it. */
class Job {
  started = false;
  /** Whether the terminal is in the red of stderr output. */
  inStderr = false;
  interrupts = 0;
  /** Graphemes of the input line not yet sent. */
  input: string[] = [];
  /** Input ended (Ctrl-D): nothing more is sent. */
  eof = false;

  constructor(readonly id: number) {}
}

/** "[exit 0 · 12 ms]" in the colour of the outcome. */
export function exitSummary(msg: Partial<ExitStatus>): string {
  let what = 'ended';
  let colour = GREY;
  if (msg.timed_out) {
    what = 'timed out';
    colour = YELLOW;
  } else if (msg.signal != null) {
    what = 'signal ' + clean(msg.signal);
    colour = YELLOW;
  } else if (typeof msg.code === 'number') {
    what = 'exit ' + msg.code;
    colour = msg.code === 0 ? GREEN : RED;
  }
  const d = formatDuration(msg.duration_ms);
  return colour + '[' + what + (d ? ' · ' + d : '') + ']' + RESET;
}

/** A host's block in a broadcast: its name, then its output (made printable, colours reset after). */
function hostBlock(name: string, output: HostOutput): string {
  let text = BOLD_GREEN + '── ' + clean(name) + RESET + '\r\n';
  let red = false;
  let body = '';
  for (const piece of output.pieces) {
    if (piece.stderr !== red) {
      body += piece.stderr ? RED : RESET;
      red = piece.stderr;
    }
    body += printable(piece.text).replace(/\n/g, '\r\n');
  }
  text += body + RESET;
  if (body && !body.endsWith('\n')) text += '\r\n';
  if (output.truncated) text += YELLOW + '[output cut at 64 KiB a stream]' + RESET + '\r\n';
  return text;
}

/** How a host's command ended: its exit summary, or why there is none. */
function hostEnd(last: FanoutLine): string {
  if (typeof last.error === 'string') {
    return RED + '[' + (last.status === 'unreachable' ? 'unreachable' : 'failed') + ': ' + clean(last.error) + ']' + RESET;
  }
  return exitSummary({
    code: last.exit_code ?? null,
    signal: last.signal ?? null,
    timed_out: !!last.timed_out,
    duration_ms: last.duration_ms ?? 0,
  });
}

function tooLongText(cmd: string): string {
  return RED + 'conch: this command line is ' + groupDigits(utf8Length(cmd)) +
    ' bytes; the console accepts at most ' + groupDigits(MAX_MESSAGE) +
    ' bytes per message — use the REST API or a file' + RESET;
}

export class CommandMode {
  private readonly editor: LineEditor;
  /** A prompt is shown and the line editor takes keys. */
  private atPrompt = false;
  /** The agent named in the prompt on the screen. */
  private promptAgent = '';
  private running: Job | null = null;
  /** Rest of a multi-line paste (or keys typed early), run after the current command. */
  private typeahead = '';
  /** Stops the broadcast that is running (its job's id is -1). */
  private broadcastAbort: AbortController | null = null;
  /** The running broadcast's hosts still under way. */
  private broadcastGrouper: Grouper | null = null;

  constructor(private readonly host: CommandHost) {
    this.editor = new LineEditor(host.history);
  }

  private out(text: string): void {
    this.host.screen.out(text);
  }

  // ------------------------------------------------------------ entering and leaving

  /** The mode is (again) command mode: a fresh prompt. */
  enter(): void {
    this.host.screen.raw(REVERSE_WRAP_ON); // mode change only: cursor stays put
    this.showPrompt();
  }

  /**
   * Another mode takes over: a running command is closed (its output has
   * no place in the new mode), and keys kept for later are dropped.
   */
  leave(): void {
    this.broadcastAbort?.abort();
    this.broadcastAbort = null;
    this.broadcastGrouper = null;
    if (this.running && this.running.id < 0) {
      this.running = null;
      this.host.runningChanged(false);
    }
    if (this.running) {
      this.host.send({ type: 'close', id: this.running.id });
      this.host.flows.close(this.running.id);
      this.running = null;
      this.host.runningChanged(false);
    }
    this.typeahead = '';
    this.atPrompt = false;
  }

  /** The link is ready (first `hello` or a reconnection): show a prompt if none is up. */
  linkReady(): void {
    if (!this.atPrompt && !this.running) {
      this.showPrompt();
      this.drainTypeahead();
    }
  }

  /** Prints a note on its own line without losing a half-typed command line. */
  note(text: string): void {
    if (this.atPrompt) {
      this.out(this.editor.toEnd() + '\r\n' + text + '\r\n');
      this.redraw();
    } else {
      this.host.screen.note(text);
    }
  }

  /** The selected agent changed: show it in the prompt; the half-typed line is kept. */
  agentChanged(_name: string): void {
    if (this.atPrompt && this.promptAgent !== this.promptKey()) {
      this.out(this.editor.toEnd() + '\r\n');
      this.redraw();
    }
  }

  /** Logging out: no command line of this user stays under ↑. */
  forgetHistory(): void {
    this.editor.forgetHistory();
  }

  // ------------------------------------------------------------ prompt and line

  private promptString(): string {
    const target = this.host.target();
    if (target !== null) {
      return YELLOW + '[' + clean(target).replace(/\r\n/g, ' ') + ']' + RESET + ' ' + BOLD_BLUE + '$' + RESET + ' ';
    }
    const agent = clean(this.host.agent()).replace(/\r\n/g, ' ');
    return (agent ? BOLD_GREEN + agent + RESET + ' ' : '') + BOLD_BLUE + '$' + RESET + ' ';
  }

  private showPrompt(): void {
    this.editor.reset();
    this.promptAgent = this.promptKey();
    this.atPrompt = true;
    this.out(this.host.screen.newlineIfNeeded() + this.promptString());
  }

  /** What the prompt names: the agent, or the broadcast's selector. */
  private promptKey(): string {
    const target = this.host.target();
    return target !== null ? '[' + target + ']' : this.host.agent();
  }

  private redraw(): void {
    this.promptAgent = this.promptKey();
    this.out(this.editor.redraw(this.promptString()));
  }

  private edit(action: EditAction): void {
    const e = this.editor;
    switch (action) {
      case 'historyUp': this.out(e.historyUp()); break;
      case 'historyDown': this.out(e.historyDown()); break;
      case 'left': this.out(e.moveLeft()); break;
      case 'right': this.out(e.moveRight()); break;
      case 'home': this.out(e.home()); break;
      case 'end': this.out(e.end()); break;
      case 'deleteForward': this.out(e.deleteForward()); break;
    }
  }

  private clearScreen(): void {
    this.out(CLEAR_SCREEN);
    this.redraw();
  }

  private cancelLine(): void {
    this.out(this.editor.toEnd() + '^C\r\n');
    this.showPrompt();
  }

  private submitLine(): void {
    const cmd = this.editor.text;
    this.out(this.editor.toEnd() + '\r\n');
    this.atPrompt = false;
    if (cmd.trim() === '') {
      this.showPrompt();
      return;
    }
    if (execMessageBytes(cmd, this.host.agent()) > MAX_MESSAGE) {
      // The server would close the console on it. Normally refused when
      // typed or pasted (fitsOnLine); this is the last line of defence.
      this.typeahead = '';
      this.out(tooLongText(cmd) + '\r\n');
      this.showPrompt();
      return;
    }
    this.host.history.add(cmd);
    this.run(cmd);
  }

  // Whether the lines of `data` (keys or a paste) still make sendable
  // command lines once inserted; if not, say so and insert none of it, so
  // that no truncated line can run. Cheap for ordinary keys.
  private fitsOnLine(data: string): boolean {
    if (data.length < 1024 && this.editor.length < 1024) return true;
    const lines = data.split(/\r\n|\r|\n/);
    const current = this.editor.text;
    const agent = this.host.agent();
    for (let i = 0; i < lines.length; i++) {
      const cmd = i === 0 ? current + lines[0] : lines[i]!;
      if (execMessageBytes(cmd, agent) > MAX_MESSAGE) {
        this.typeahead = '';
        this.note(tooLongText(cmd));
        return false;
      }
    }
    return true;
  }

  // ------------------------------------------------------------ keyboard

  /** Keyboard input in command mode: one key, an escape sequence, or a whole paste. */
  input(data: string): void {
    data = stripPasteMarkers(data);
    if (!data) return;

    if (this.running) {
      // What is typed while a command runs is its standard input.
      this.stdinInput(data);
      return;
    }
    if (!this.atPrompt) {
      // Not connected yet / between prompts: keep the keys for the next prompt.
      this.typeahead += data;
      return;
    }
    if (!this.fitsOnLine(data)) return;

    let i = 0;
    let text = ''; // printable run, inserted in one go
    const flush = (): void => {
      if (text) this.out(this.editor.insert(text));
      text = '';
    };
    while (i < data.length) {
      if (!this.atPrompt) {
        // A line was submitted mid-chunk (a paste): the rest waits for the
        // next prompt, so each pasted line runs in turn.
        flush();
        this.typeahead = data.slice(i) + this.typeahead;
        return;
      }
      const ch = data[i]!;
      if (ch === '\x1b') {
        flush();
        const seq = escapeAt(data, i);
        i += seq.length;
        const action = escapeAction(seq);
        if (action) this.edit(action);
        continue;
      }
      const code = ch.charCodeAt(0);
      if (code >= 0x20 && code !== 0x7f) {
        text += ch;
        i += 1;
        continue;
      }
      flush();
      i += 1;
      const e = this.editor;
      switch (ch) {
        case '\r':
          if (data[i] === '\n') i += 1; // CRLF from a paste is one Enter
          this.submitLine();
          break;
        case '\n': this.submitLine(); break;
        case '\x7f':
        case '\b': this.out(e.backspace()); break;
        case '\x03': this.cancelLine(); break;
        case '\x01': this.out(e.home()); break; // Ctrl-A
        case '\x05': this.out(e.end()); break; // Ctrl-E
        case '\x02': this.out(e.moveLeft()); break; // Ctrl-B
        case '\x06': this.out(e.moveRight()); break; // Ctrl-F
        case '\x04': this.out(e.deleteForward()); break; // Ctrl-D
        case '\x15': this.out(e.killToStart()); break; // Ctrl-U
        case '\x0b': this.out(e.killToEnd()); break; // Ctrl-K
        case '\x19': this.out(e.yank()); break; // Ctrl-Y
        case '\x0c': this.clearScreen(); break; // Ctrl-L
        case '\x10': this.out(e.historyUp()); break; // Ctrl-P
        case '\x0e': this.out(e.historyDown()); break; // Ctrl-N
        // A tab would move the cursor to a tab stop and break the editor's
        // cursor arithmetic; a pasted tab becomes a space.
        case '\t': text += ' '; break;
        default: break; // other control keys: ignored
      }
    }
    flush();
  }

  private drainTypeahead(): void {
    const pending = this.typeahead;
    this.typeahead = '';
    if (pending) this.input(pending);
  }

  // ------------------------------------------------------------ standard input of a running command
  //
  // Without this, `cat`, `read x` or an `apt` question would wait forever on
  // a stdin nothing writes to. Like a terminal's cooked mode: the line is
  // echoed and edited here (Backspace, Ctrl-U), Enter sends it with its
  // newline, Ctrl-D sends what is typed and ends the input. Programs that
  // need a real terminal belong in shell mode.

  private stdinInput(data: string): void {
    const job = this.running!;
    if (job.id < 0) {
      // A broadcast has no standard input (each host's is closed): only
      // Ctrl-C means something, and it stops every host.
      if (data.includes('\x03')) this.interrupt(job);
      return;
    }
    let text = '';
    const flush = (): void => {
      if (text) this.stdinInsert(job, text);
      text = '';
    };
    let i = 0;
    while (i < data.length && this.running === job) {
      const ch = data[i]!;
      if (ch === '\x1b') {
        // Arrow and function keys mean nothing to a line of input.
        flush();
        i += escapeAt(data, i).length;
        continue;
      }
      const code = ch.charCodeAt(0);
      i += 1;
      if ((code >= 0x20 && code !== 0x7f) || ch === '\t') {
        text += ch;
        continue;
      }
      flush();
      switch (ch) {
        case '\r':
          if (data[i] === '\n') i += 1; // CRLF from a paste is one Enter
          this.stdinLine(job);
          break;
        case '\n': this.stdinLine(job); break;
        case '\x7f':
        case '\b': this.stdinBackspace(job); break;
        case '\x15': this.stdinKillLine(job); break; // Ctrl-U
        case '\x04': this.stdinEof(job); break; // Ctrl-D
        case '\x03': this.interrupt(job); break;
        default: break; // other control keys: ignored
      }
    }
    if (this.running === job) flush();
  }

  /** Echo in the terminal's colours, not in the red of the last stderr chunk. */
  private echo(job: Job, text: string): void {
    if (job.inStderr) {
      this.host.screen.raw(RESET);
      job.inStderr = false;
    }
    this.out(text);
  }

  private stdinInsert(job: Job, text: string): void {
    if (job.eof) return; // input already ended: nobody reads it
    const gs = graphemes(text);
    for (const g of gs) job.input.push(g);
    // A tab is sent as a tab but shown as one space, so Backspace can erase it.
    this.echo(job, gs.join('').replace(/\t/g, ' '));
  }

  private stdinBackspace(job: Job): void {
    const g = job.input.pop();
    if (g === undefined) return;
    this.echo(job, back(width(g)) + ERASE_RIGHT);
  }

  private stdinKillLine(job: Job): void {
    if (!job.input.length) return;
    const n = cells(job.input);
    job.input = [];
    this.echo(job, back(n) + ERASE_BELOW);
  }

  private stdinLine(job: Job): void {
    if (job.eof) return;
    const line = job.input.join('') + '\n';
    job.input = [];
    this.echo(job, '\r\n');
    this.sendStdin(job.id, line, false);
  }

  private stdinEof(job: Job): void {
    if (job.eof) return;
    const rest = job.input.join('');
    job.input = [];
    job.eof = true;
    this.sendStdin(job.id, rest, true);
  }

  private sendStdin(id: number, data: string, eof: boolean): void {
    for (const msg of stdinMessages(id, data, eof)) this.host.send(msg);
  }

  // ------------------------------------------------------------ running commands

  private run(cmd: string): void {
    const target = this.host.target();
    if (target !== null) {
      this.runBroadcast(target, cmd);
      return;
    }
    if (!this.host.isReady()) {
      this.out(RED + 'conch: not connected — the command was not run' + RESET + '\r\n');
      this.showPrompt();
      return;
    }
    const id = this.host.flows.open();
    this.running = new Job(id);
    this.host.send({ type: 'exec', id, cmd: wellFormed(cmd), agent: this.host.agent() });
    this.host.runningChanged(true);
  }

  /** Runs `cmd` on every agent `target` matches, printing each host's output as it ends. */
  private runBroadcast(target: string, cmd: string): void {
    const job = new Job(-1);
    job.started = true;
    this.running = job;
    this.host.runningChanged(true);
    const abort = new AbortController();
    this.broadcastAbort = abort;
    this.out(GREY + 'running on every agent matching ' + clean(target) + '…' + RESET + '\r\n');
    const live = (): boolean => this.running === job && !abort.signal.aborted;
    const sink: BroadcastSink = {
      host: (name: string, output: HostOutput, last: FanoutLine) => {
        if (!live()) return;
        this.out(hostBlock(name, output) + hostEnd(last) + '\r\n');
      },
      summary: (s) => {
        if (!live()) return;
        const colour = s.failed || s.unreachable ? (s.unreachable ? RED : YELLOW) : GREEN;
        this.finishBroadcast(job, colour + '[' + hosts(s.total) + ': ' + s.ok + ' ok, ' + s.failed + ' failed, ' +
          s.unreachable + ' unreachable]' + RESET);
      },
      failed: (message: string) => {
        if (!live()) return;
        // The rest of a paste would go the same way: dropped.
        this.typeahead = '';
        this.printUnfinished(grouper);
        this.finishBroadcast(job, RED + 'conch: ' + clean(message) + RESET);
      },
    };
    const grouper = new Grouper(sink);
    this.broadcastGrouper = grouper;
    void broadcast(target, wellFormed(cmd), sink, grouper, abort.signal);
  }

  /** Hosts that had begun when a broadcast was cut off: what they printed, and that their end is unknown. */
  private printUnfinished(grouper: Grouper): void {
    for (const [name, output] of grouper.pending()) {
      this.out(hostBlock(name, output) + GREY + '[cut off: its command was stopped, its end is unknown]' + RESET + '\r\n');
    }
  }

  private finishBroadcast(job: Job, summary: string): void {
    if (this.running !== job) return;
    this.broadcastAbort = null;
    this.broadcastGrouper = null;
    this.running = null;
    this.host.runningChanged(false);
    this.out(this.host.screen.newlineIfNeeded() + summary + '\r\n');
    this.showPrompt();
    this.drainTypeahead();
  }

  // Ctrl-C while a command runs: the first sends SIGINT; if the command
  // ignores it, the next one kills it for good so the console never hangs.
  private interrupt(job: Job): void {
    if (job.id < 0) {
      // A broadcast: stop the request; the server kills every host's
      // command. Nothing kept from a paste runs after it.
      this.typeahead = '';
      this.broadcastAbort?.abort();
      this.out('^C\r\n');
      if (this.broadcastGrouper) this.printUnfinished(this.broadcastGrouper);
      this.finishBroadcast(job, GREY + '[stopped on every host]' + RESET);
      return;
    }
    job.interrupts += 1;
    this.typeahead = '';
    job.input = []; // like a terminal, ^C discards the unsent line
    if (job.interrupts === 1) {
      this.out((job.inStderr ? RESET : '') + '^C');
      job.inStderr = false;
      this.host.send({ type: 'signal', id: job.id, signal: 'INT' });
      return;
    }
    this.host.send({ type: 'close', id: job.id });
    this.finish(job.id, GREY + '[killed]' + RESET);
  }

  /** Whether a command (or a broadcast) is running. */
  isRunning(): boolean {
    return this.running !== null;
  }

  /** Whether `id` is the running command. */
  owns(id: number): boolean {
    return this.running !== null && this.running.id === id;
  }

  /** The server said the command runs. */
  started(id: number): void {
    if (this.running && this.running.id === id) this.running.started = true;
  }

  /** The id of a command still waiting for `started`, or null. */
  unstartedId(): number | null {
    return this.running && !this.running.started ? this.running.id : null;
  }

  /** The rest of a paste would likely fail the same way as this command did. */
  dropTypeahead(): void {
    this.typeahead = '';
  }

  /**
   * Output of `id` arrives on `stream`. Command mode shows stderr in red;
   * colour codes are only emitted when the stream changes, so the output
   * bytes themselves are untouched.
   */
  streamOutput(id: number, stream: number): void {
    const job = this.running;
    if (!job || job.id !== id) return;
    if (stream === STDERR && !job.inStderr) {
      this.host.screen.raw(RED);
      job.inStderr = true;
    } else if (stream !== STDERR && job.inStderr) {
      this.host.screen.raw(RESET);
      job.inStderr = false;
    }
  }

  /**
   * The command has ended (exit, error, kill or lost connection): print the
   * summary after any output still queued in the terminal, then a prompt.
   */
  finish(id: number, summary: string): void {
    const job = this.running;
    if (!job || job.id !== id) return;
    this.running = null;
    this.host.flows.close(id);
    this.host.runningChanged(false);
    this.out((job.inStderr ? RESET : '') + this.host.screen.newlineIfNeeded() + summary + '\r\n');
    this.showPrompt();
    this.drainTypeahead();
  }

  /** The socket closed: whatever ran on its server side is gone. */
  connectionLost(): void {
    if (this.running && this.running.id >= 0) {
      this.finish(this.running.id, RED + 'conch: connection lost — the command\'s fate is unknown' + RESET);
    }
  }
}
