// The command-mode line editor: the line being typed, as graphemes, with a
// cursor, history and a kill buffer. Pure: every edit returns the terminal
// output that shows it, and the caller writes that; no DOM, no terminal.
//
// The cursor moves left with '\b' (which, with reverse wraparound on,
// crosses soft line wraps) and right by re-printing characters. Everything
// after the cursor is erased with ED ('\x1b[J'): the input line is always
// the last thing on the screen, so that is safe and also clears wrapped rows.

import { back, ERASE_BELOW } from './ansi';
import type { History } from './history';
import { cells, graphemes, width } from './text';

const COMBINING_MARK = /^\p{M}/u;

export class LineEditor {
  /** Grapheme clusters of the line being edited. */
  private line: string[] = [];
  /** Cursor index into `line`. */
  private pos = 0;
  /** Where ↑/↓ stand in the history; `history.length` is the line being typed. */
  private histIndex: number;
  /** The unfinished line while walking the history. */
  private draft: string | null = null;
  /** The text Ctrl-U / Ctrl-K removed last, for Ctrl-Y. */
  private killed = '';

  constructor(private readonly history: History) {
    this.histIndex = history.length;
  }

  /** The line as typed. */
  get text(): string {
    return this.line.join('');
  }

  /** Length of the line in graphemes. */
  get length(): number {
    return this.line.length;
  }

  /** Cursor position in graphemes. */
  get cursor(): number {
    return this.pos;
  }

  /** A fresh, empty line at a new prompt. */
  reset(): void {
    this.line = [];
    this.pos = 0;
    this.histIndex = this.history.length;
    this.draft = null;
  }

  /** Prompt and line printed anew, the cursor where it was. */
  redraw(prompt: string): string {
    return prompt + this.line.join('') + back(cells(this.line.slice(this.pos)));
  }

  /** Moves the cursor to the end of the line; returns what re-prints the tail. */
  toEnd(): string {
    const tail = this.line.slice(this.pos);
    this.pos = this.line.length;
    return tail.join('');
  }

  insert(text: string): string {
    let gs = graphemes(text);
    if (!gs.length) return '';
    let shown = '';
    // A combining mark typed on its own belongs to the character before it.
    if (this.pos > 0 && COMBINING_MARK.test(gs[0]!)) {
      this.line[this.pos - 1] += gs[0]!;
      shown = gs[0]!;
      gs = gs.slice(1);
      if (!gs.length) return shown + this.rewriteTail();
    }
    const tail = this.line.slice(this.pos);
    // concat, not splice(pos, 0, ...gs): spreading a paste of a million
    // characters into arguments overflows the call stack.
    this.line = this.line.slice(0, this.pos).concat(gs, tail);
    this.pos += gs.length;
    return shown + gs.join('') + tail.join('') + back(cells(tail));
  }

  backspace(): string {
    if (this.pos === 0) return '';
    const removed = this.line.splice(this.pos - 1, 1);
    this.pos -= 1;
    return back(cells(removed)) + this.rewriteTail();
  }

  deleteForward(): string {
    if (this.pos >= this.line.length) return '';
    this.line.splice(this.pos, 1);
    return this.rewriteTail();
  }

  moveLeft(): string {
    if (this.pos === 0) return '';
    this.pos -= 1;
    return back(width(this.line[this.pos]!));
  }

  moveRight(): string {
    if (this.pos >= this.line.length) return '';
    const g = this.line[this.pos]!;
    this.pos += 1;
    return g;
  }

  home(): string {
    const out = back(cells(this.line.slice(0, this.pos)));
    this.pos = 0;
    return out;
  }

  end(): string {
    return this.toEnd();
  }

  /** Ctrl-U: removes everything left of the cursor. */
  killToStart(): string {
    if (this.pos > 0) this.killed = this.line.slice(0, this.pos).join('');
    const before = this.line.splice(0, this.pos);
    this.pos = 0;
    return back(cells(before)) + this.rewriteTail();
  }

  /** Ctrl-K: removes everything from the cursor on. */
  killToEnd(): string {
    if (this.pos < this.line.length) this.killed = this.line.slice(this.pos).join('');
    this.line.length = this.pos;
    return ERASE_BELOW;
  }

  /** Ctrl-Y: inserts what was killed last. */
  yank(): string {
    return this.insert(this.killed);
  }

  historyUp(): string {
    if (this.histIndex === 0) return '';
    if (this.histIndex === this.history.length) this.draft = this.line.join('');
    this.histIndex -= 1;
    return this.replace(this.history.at(this.histIndex));
  }

  historyDown(): string {
    if (this.histIndex >= this.history.length) return '';
    this.histIndex += 1;
    return this.replace(this.histIndex === this.history.length ? (this.draft || '') : this.history.at(this.histIndex));
  }

  /** Logging out: the history is erased, and nothing of it stays reachable. */
  forgetHistory(): void {
    this.history.forget();
    this.histIndex = 0;
    this.draft = null;
  }

  /** Re-prints everything right of the cursor, erases leftovers, returns the cursor. */
  private rewriteTail(): string {
    const tail = this.line.slice(this.pos);
    return tail.join('') + ERASE_BELOW + back(cells(tail));
  }

  /** Replaces the whole line (history navigation); the cursor ends at its end. */
  private replace(text: string): string {
    const gs = graphemes(text);
    const out = back(cells(this.line.slice(0, this.pos))) + gs.join('') + ERASE_BELOW;
    this.line = gs;
    this.pos = gs.length;
    return out;
  }
}
