// Test doubles shared by the unit tests.

import { History } from '../src/history';
import type { KeyValueStore } from '../src/storage';
import { graphemes, width } from '../src/text';

/** A Map-backed localStorage. */
export class MemoryStore implements KeyValueStore {
  readonly map = new Map<string, string>();
  getItem(key: string): string | null {
    return this.map.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    this.map.set(key, value);
  }
  removeItem(key: string): void {
    this.map.delete(key);
  }
}

export function historyOf(lines: string[]): History {
  const store = new MemoryStore();
  store.setItem('h', JSON.stringify(lines));
  return new History(store, 'h');
}

/**
 * Just enough of a terminal to check the line editor's output: one row
 * without wrapping, '\b' one cell left, ESC[J / ESC[K erase to the right,
 * anything else printed at the cursor in its cell width (a wide character
 * takes its cell and a blank continuation cell, a combining mark none, as in
 * xterm).
 */
export class Row {
  cellsOf: string[] = [];
  col = 0;

  write(data: string): void {
    let i = 0;
    while (i < data.length) {
      if (data[i] === '\b') {
        this.col = Math.max(0, this.col - 1);
        i += 1;
      } else if (data.startsWith('\x1b[J', i) || data.startsWith('\x1b[K', i)) {
        this.cellsOf.length = Math.min(this.cellsOf.length, this.col);
        i += 3;
      } else {
        let j = i;
        while (j < data.length && data[j] !== '\b' && data[j] !== '\x1b') j += 1;
        for (const g of graphemes(data.slice(i, j))) {
          if (/^\p{M}/u.test(g) && this.col > 0) {
            // A combining mark joins the character before it, taking no cell.
            this.cellsOf[this.col - 1] += g;
            continue;
          }
          const w = width(g);
          while (this.cellsOf.length < this.col) this.cellsOf.push(' ');
          this.cellsOf[this.col] = g;
          if (w === 2) this.cellsOf[this.col + 1] = '';
          this.col += w;
        }
        i = j;
      }
    }
  }

  /** The row's text (continuation cells of wide characters dropped). */
  get text(): string {
    return this.cellsOf.join('');
  }
}
