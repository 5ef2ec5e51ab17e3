// localStorage, where the browser allows it. Storage can be disabled
// (privacy modes, sandboxed frames) or full: every access is guarded, and
// the console then keeps its preferences in memory only.

/** The part of the Web Storage API this page uses (a Map-backed fake in tests). */
export interface KeyValueStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** The page's localStorage, or null where even touching it throws. */
export function browserStore(): KeyValueStore | null {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
}

export function loadPref(store: KeyValueStore | null, key: string): string | null {
  try {
    return store ? store.getItem(key) : null;
  } catch {
    return null;
  }
}

export function savePref(store: KeyValueStore | null, key: string, value: string): void {
  try {
    store?.setItem(key, value);
  } catch {
    // quota or privacy mode: the preference lasts for this page only
  }
}
