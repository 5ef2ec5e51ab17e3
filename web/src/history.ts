// Command-line history, per user. Several people may share one browser, and
// a command line can hold a secret (`export PGPASSWORD=...`): the key names
// the user, and logging out removes it. The old key was shared by everyone
// and is removed on load.

import type { KeyValueStore } from './storage';

export const HISTORY_MAX = 500;
export const LEGACY_HISTORY_KEY = 'conch.history';

export function historyKey(user: string): string {
  return 'conch.history.v2:' + user;
}

export class History {
  private items: string[];

  constructor(private readonly store: KeyValueStore | null, private readonly key: string) {
    this.items = this.load();
  }

  get length(): number {
    return this.items.length;
  }

  at(index: number): string {
    return this.items[index] ?? '';
  }

  /** Appends `cmd` (not twice in a row) and saves. */
  add(cmd: string): void {
    if (this.items[this.items.length - 1] !== cmd) this.items.push(cmd);
    if (this.items.length > HISTORY_MAX) this.items.splice(0, this.items.length - HISTORY_MAX);
    try {
      this.store?.setItem(this.key, JSON.stringify(this.items));
    } catch {
      // quota or privacy mode: history stays in memory
    }
  }

  /** Logging out leaves nothing of this user's command lines in the browser. */
  forget(): void {
    this.items = [];
    try {
      this.store?.removeItem(this.key);
      this.store?.removeItem(LEGACY_HISTORY_KEY);
    } catch {
      // storage disabled: there was nothing stored
    }
  }

  private load(): string[] {
    try {
      if (!this.store) return [];
      // The shared history of earlier versions may hold another user's lines.
      this.store.removeItem(LEGACY_HISTORY_KEY);
      const h: unknown = JSON.parse(this.store.getItem(this.key) || '[]');
      return Array.isArray(h) ? h.filter((x): x is string => typeof x === 'string').slice(-HISTORY_MAX) : [];
    } catch {
      return []; // storage disabled or corrupt: memory only
    }
  }
}
