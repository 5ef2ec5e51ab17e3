// The audit page's part without the DOM: the addresses it asks, reading
// the server's answers, and the text shown for a record. The page itself
// is auditPage.ts.
//
// Records hold what users typed and what hosts answered: hostile text, as
// far as this page knows. It is only ever shown as text (textContent), and
// characters that would hide or disguise what it says (controls,
// direction overrides, zero-width ones) are shown as escapes, so that
// what the log reads is what ran.

import { formatBytes, query } from './files';
import { isRecordingId, sitePath } from './site';
import { formatDuration, visible } from './text';

export { visible };

/** The kinds of record (the server's `Kind::ALL`, in its order). */
export const AUDIT_KINDS: readonly string[] = [
  'login', 'login_failed', 'logout', 'token_create', 'token_revoke', 'command_start', 'command_end',
  'session_attach', 'session_detach', 'session_end', 'file_put', 'file_get', 'denied', 'user_change',
  'session_change',
];

/** What the search form asks; empty strings and nulls ask nothing. */
export interface Search {
  user: string;
  agent: string;
  /** A kind of record, or '' for any (the log only: recordings have no such filter). */
  kind: string;
  text: string;
  since_ms: number | null;
  until_ms: number | null;
}

export const NO_SEARCH: Search = { user: '', agent: '', kind: '', text: '', since_ms: null, until_ms: null };

export type Tab = 'log' | 'recordings';

/** Records asked for a page: the server's default. */
export const PAGE = 100;

function common(search: Search): [string, string | null][] {
  return [
    ['user', search.user.trim()],
    ['agent', search.agent.trim()],
    ['since_ms', search.since_ms === null ? null : String(search.since_ms)],
    ['until_ms', search.until_ms === null ? null : String(search.until_ms)],
    ['text', search.text],
  ];
}

/** A page of the log; `cursor`, the `next` of the page before, for older records. */
export function auditUrl(search: Search, cursor: string | null): string {
  return sitePath('/api/v1/audit?' + query([
    ...common(search),
    ['kind', search.kind],
    ['cursor', cursor],
    ['limit', String(PAGE)],
  ]));
}

/** A page of the recordings (the server refuses a `kind` here: none is sent). */
export function recordingsUrl(search: Search, cursor: string | null): string {
  return sitePath('/api/v1/recordings?' + query([
    ...common(search),
    ['cursor', cursor],
    ['limit', String(PAGE)],
  ]));
}

// ------------------------------------------------------------ the page's own address

/**
 * The search and the tab as the page's query string, so that a reload,
 * the back button or a link shows the same records.
 */
export function pageQuery(search: Search, tab: Tab): string {
  const q = query([
    ...common(search),
    ['kind', search.kind],
    ['tab', tab === 'log' ? null : tab],
  ]);
  return q ? '?' + q : '';
}

function msParam(p: URLSearchParams, key: string): number | null {
  const v = p.get(key);
  if (v === null || !/^\d{1,16}$/.test(v)) return null;
  return Number(v);
}

/** The search and tab a page's query string asks for; anything unknown is left out. */
export function searchOfQuery(qs: string): { search: Search; tab: Tab } {
  const p = new URLSearchParams(qs);
  const kind = p.get('kind') ?? '';
  return {
    search: {
      user: p.get('user') ?? '',
      agent: p.get('agent') ?? '',
      kind: AUDIT_KINDS.includes(kind) ? kind : '',
      text: p.get('text') ?? '',
      since_ms: msParam(p, 'since_ms'),
      until_ms: msParam(p, 'until_ms'),
    },
    tab: p.get('tab') === 'recordings' ? 'recordings' : 'log',
  };
}

// ------------------------------------------------------------ times

/** A datetime-local field's value ("2025-03-01T14:30", the browser's time zone) in ms; null when empty or not one. */
export function localInputToMs(value: string): number | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?$/.exec(value.trim());
  if (!m) return null;
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map((x) => Number(x ?? 0)) as number[];
  const ms = Number(((m[7] ?? '') + '00').slice(0, 3)); // ".5" is 500 ms
  const date = new Date(y!, mo! - 1, d!, h!, mi!, s!, ms);
  const t = date.getTime();
  // Rolled over (a 31st of April): not a time the user meant.
  if (!Number.isFinite(t) || date.getMonth() !== mo! - 1 || date.getDate() !== d!) return null;
  return t < 0 ? null : t;
}

/** `ms` as a datetime-local field's value, in the browser's time zone, to the minute (or second when it has one). */
export function msToLocalInput(ms: number): string {
  const d = new Date(ms);
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  const base = `${p(d.getFullYear(), 4)}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
  return d.getSeconds() || d.getMilliseconds() ? base + ':' + p(d.getSeconds()) : base;
}

// ------------------------------------------------------------ the server's answers

export interface AuditRecord {
  seq: number;
  at_ms: number;
  kind: string;
  user: string;
  source: string;
  agent: string;
  via: string;
  server: string;
  detail: unknown;
  hash: string;
}

export interface Recording {
  id: string;
  user: string;
  agent: string;
  via: string;
  kind: string;
  session: string | null;
  command: string;
  started_ms: number;
  ended_ms: number | null;
  cols: number;
  rows: number;
  bytes: number;
  truncated: boolean;
  incomplete: boolean;
}

export interface Page<T> {
  items: T[];
  /** The cursor of the older page, or null at the oldest. */
  next: string | null;
}

const str = (v: unknown): string => (typeof v === 'string' ? v : '');
const num = (v: unknown): number => (typeof v === 'number' && Number.isFinite(v) ? v : 0);

/** `next` is a number for the log, a string for recordings: either way only handed back. */
function cursorOf(v: unknown): string | null {
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  return typeof v === 'string' && v !== '' ? v : null;
}

function pageOf<T>(body: string, key: string, item: (v: Record<string, unknown>) => T): Page<T> | null {
  let value: unknown;
  try {
    value = JSON.parse(body);
  } catch {
    return null;
  }
  if (!value || typeof value !== 'object') return null;
  const list = (value as Record<string, unknown>)[key];
  if (!Array.isArray(list)) return null;
  const items: T[] = [];
  for (const v of list) {
    if (v && typeof v === 'object' && !Array.isArray(v)) items.push(item(v as Record<string, unknown>));
  }
  return { items, next: cursorOf((value as Record<string, unknown>)['next']) };
}

/** `GET /api/v1/audit`'s answer, or null when it is not one. */
export function parseAuditPage(body: string): Page<AuditRecord> | null {
  return pageOf(body, 'records', (r) => ({
    seq: num(r['seq']),
    at_ms: num(r['at_ms']),
    kind: str(r['kind']),
    user: str(r['user']),
    source: str(r['source']),
    agent: str(r['agent']),
    via: str(r['via']),
    server: str(r['server']),
    detail: r['detail'] ?? null,
    hash: str(r['hash']),
  }));
}

/** `GET /api/v1/recordings`'s answer, or null when it is not one. */
export function parseRecordingsPage(body: string): Page<Recording> | null {
  return pageOf(body, 'recordings', (r) => ({
    id: str(r['id']),
    user: str(r['user']),
    agent: str(r['agent']),
    via: str(r['via']),
    kind: str(r['kind']),
    session: typeof r['session'] === 'string' ? r['session'] : null,
    command: str(r['command']),
    started_ms: num(r['started_ms']),
    ended_ms: typeof r['ended_ms'] === 'number' ? r['ended_ms'] : null,
    cols: num(r['cols']),
    rows: num(r['rows']),
    bytes: num(r['bytes']),
    truncated: r['truncated'] === true,
    incomplete: r['incomplete'] === true,
  }));
}

// ------------------------------------------------------------ what is shown

/** A line of the table shows this much of a summary; the whole record is a click away. */
export const SUMMARY_MAX = 300;

function cut(text: string, max: number): string {
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/** How a command ended, from an exit status: "exit 0", "signal KILL", "timed out". */
function exitText(exit: unknown): string | null {
  if (!exit || typeof exit !== 'object') return null;
  const e = exit as Record<string, unknown>;
  if (e['timed_out'] === true) return 'timed out';
  if (typeof e['signal'] === 'string') return 'signal ' + e['signal'];
  if (typeof e['code'] === 'number') return 'exit ' + e['code'];
  return null;
}

/** What a user_change record did, in a few words. */
function userChange(action: string, name: string, role: string | null): string {
  switch (action) {
    case 'add': return 'add ' + name + (role ? ` (${role})` : '');
    case 'password': return 'new password for ' + name;
    case 'delete': return 'delete ' + name;
    default: return action + ' ' + name;
  }
}

/**
 * One line about a record: what it was about (the command line, a path, a
 * session, a token), then how it went (exit status, failure, reason, size,
 * duration). Built from the keys the server writes, whatever the kind, so
 * that a new kind still reads; shown with `visible` and cut.
 */
export function summarize(detail: unknown): string {
  if (!detail || typeof detail !== 'object' || Array.isArray(detail)) return '';
  const d = detail as Record<string, unknown>;
  const s = (k: string): string | null => (typeof d[k] === 'string' && d[k] !== '' ? d[k] as string : null);
  const parts: string[] = [];
  // An argv reads as a command line: words quoted where a shell would need it.
  const argv = Array.isArray(d['argv'])
    ? (d['argv'] as unknown[]).map(String).map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(' ')
    : null;
  // A store user added, re-passworded or deleted (user_change): "add nina (operator)".
  const user = s('action') !== null && s('name') !== null ? userChange(s('action')!, s('name')!, s('role')) : null;
  const what = s('command') ?? argv ?? s('path') ?? user;
  if (what !== null) parts.push(what);
  if (user !== null && typeof d['agents'] === 'string') parts.push('agents ' + d['agents']);
  if (s('cwd')) parts.push('in ' + s('cwd'));
  if (s('session')) parts.push('session ' + s('session'));
  if (d['watch'] === true) parts.push('watching');
  if (s('token')) parts.push('token ' + s('token'));
  if (s('role') && user === null) parts.push('role ' + s('role'));
  if (s('wanted')) parts.push('wanted ' + s('wanted'));
  const exit = exitText(d['exit']);
  if (exit) parts.push(exit);
  for (const k of ['failure', 'error', 'message', 'reason']) {
    if (s(k)) parts.push(s(k)!);
  }
  if (typeof d['size'] === 'number') parts.push(formatBytes(d['size']));
  if (typeof d['duration_ms'] === 'number') parts.push(formatDuration(d['duration_ms']));
  return cut(visible(parts.join(' · ')), SUMMARY_MAX);
}

/** The whole of a record's details, for the eye: indented JSON, hidden characters shown. */
export function detailText(detail: unknown): string {
  // JSON escapes the C0 controls itself; DEL, the C1 controls and format
  // characters it leaves as they are (its own newlines stay).
  return JSON.stringify(detail, null, 2).replace(/[\x7f-\x9f\p{Cf}\p{Zl}\p{Zp}]/gu,
    (c) => '\\u' + c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0'));
}

/** The recording a record names (`detail.recording`), or null. */
export function recordingOf(detail: unknown): string | null {
  if (!detail || typeof detail !== 'object') return null;
  const rec = (detail as Record<string, unknown>)['recording'];
  return isRecordingId(rec) ? rec : null;
}

/** How long a recording ran, or "live" while it is being made. */
export function recordingLength(r: Recording): string {
  if (r.ended_ms === null) return 'live';
  return formatDuration(Math.max(0, r.ended_ms - r.started_ms)) || '0 ms';
}
