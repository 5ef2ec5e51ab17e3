// The terminal as the console writes to it: text it generates itself is
// tracked (does it leave the cursor at the start of a line?), output of
// commands goes through `raw`.

import type { FitAddon, Terminal } from './xterm';

export class Screen {
  /** Whether the terminal cursor is (probably) at column 0. */
  atLineStart = true;

  constructor(readonly term: Terminal, private readonly fitAddon: FitAddon) {}

  /**
   * Writes text we generate ourselves (never command output) and remembers
   * whether it left the cursor at the start of a line.
   */
  out(text: string, callback?: () => void): void {
    if (!text) return;
    this.atLineStart = text.endsWith('\n');
    this.term.write(text, callback);
  }

  /** Writes without tracking the cursor: colour changes, resets, output. */
  raw(data: string | Uint8Array, callback?: () => void): void {
    this.term.write(data, callback);
  }

  newlineIfNeeded(): string {
    return this.atLineStart ? '' : '\r\n';
  }

  /** A note on its own line (no line editor to preserve). */
  note(text: string): void {
    this.out(this.newlineIfNeeded() + text + '\r\n');
  }

    /**
   * A size the terminal keeps whatever its box (a watched session is drawn
   * at its writer's size), or null to follow the box.
   */
  private fixed: { cols: number; rows: number } | null = null;

  /** Keeps the terminal at `cols` × `rows` (null: follow the box again). */
  lock(size: { cols: number; rows: number } | null): void {
    this.fixed = size;
    this.fit();
  }

  fit(): void {
    if (this.fixed) {
      const { cols, rows } = this.fixed;
      if (this.term.cols !== cols || this.term.rows !== rows) this.term.resize(cols, rows);
      return;
    }
    try {
      this.fitAddon.fit();
    } catch {
      // The container can be hidden or zero-sized for a moment; the next
      // resize event fits again.
    }
  }

  focus(): void {
    this.term.focus();
  }
}
