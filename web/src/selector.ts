// Agent selectors, as the server reads them (src/selector.rs): a comma-
// separated list of terms; names and `*`/`?` wildcards are alternatives,
// `key=value` / `key!=value` label tests must all hold. The page uses it
// to filter the agent picker, and sends the same text as a fan-out's
// `target`, which the server parses again (it decides, not this).

const NAME = /^[A-Za-z0-9._*?-]+$/;
const LABEL = /^([A-Za-z0-9._/-]+)(!?)=([A-Za-z0-9._/:*?-]*)$/;

export interface Selector {
  names: string[];
  labels: { key: string; value: string; equal: boolean }[];
}

/** Parses `text`; null when it is not a selector the server would take. */
export function parseSelector(text: string): Selector | null {
  if (text.length > 1024) return null;
  const terms = text.split(',').map((t) => t.trim());
  if (terms.length > 64 || terms.some((t) => t === '')) return null;
  const sel: Selector = { names: [], labels: [] };
  for (const term of terms) {
    const label = LABEL.exec(term);
    if (label) {
      sel.labels.push({ key: label[1]!, value: label[3]!, equal: label[2] === '' });
    } else if (NAME.test(term)) {
      sel.names.push(term);
    } else {
      return null;
    }
  }
  return sel;
}

/** Whether `text` matches `pattern`, where `*` is any run and `?` any one character. */
export function wildcard(pattern: string, text: string): boolean {
  const p = Array.from(pattern);
  const t = Array.from(text);
  let pi = 0;
  let ti = 0;
  let star = -1;
  let mark = 0;
  while (ti < t.length) {
    if (pi < p.length && p[pi] === '*') {
      star = pi++;
      mark = ti;
    } else if (pi < p.length && (p[pi] === '?' || p[pi] === t[ti])) {
      pi++;
      ti++;
    } else if (star >= 0) {
      pi = star + 1;
      ti = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === '*') pi++;
  return pi === p.length;
}

/** Whether the agent `name` with `labels` is selected. */
export function matches(sel: Selector, name: string, labels: Record<string, string>): boolean {
  const named = sel.names.length === 0 || sel.names.some((n) => wildcard(n, name));
  return named && sel.labels.every((l) => {
    const value = Object.prototype.hasOwnProperty.call(labels, l.key) ? labels[l.key] : undefined;
    const hit = value !== undefined && wildcard(l.value, value);
    return hit === l.equal;
  });
}
