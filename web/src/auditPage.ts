// conch — the audit page: the audit log and the session recordings, each
// a table filled a page at a time from the REST API (/api/v1/audit,
// /api/v1/recordings) and searched with one form. Admins see everyone's;
// anyone else their own (the server decides, whatever the page asks).
//
// Records are hostile text as far as this page knows: every cell is set
// with textContent (see auditView.ts for how hidden characters are shown),
// and the page runs under the console's strict CSP, with no inline script.

import {
  AUDIT_KINDS, auditUrl, detailText, localInputToMs, msToLocalInput, pageQuery, parseAuditPage,
  parseRecordingsPage, recordingLength, recordingOf, recordingsUrl, searchOfQuery, summarize, visible,
  type AuditRecord, type Page, type Recording, type Search, type Tab,
} from './auditView';
import { formatBytes, problemText } from './files';
import { isRecordingId, loginUrl, recordingUrl, replayUrl } from './site';

function byId<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`conch: the page has no #${id}`);
  return found as T;
}

/** A table's pages so far: where the next (older) one starts, and whether one is on its way. */
interface Listing {
  readonly tab: Tab;
  readonly body: HTMLTableSectionElement;
  readonly button: HTMLButtonElement;
  readonly panel: HTMLElement;
  /** Filled for the current search (even if empty). */
  loaded: boolean;
  next: string | null;
  count: number;
  /** The request on its way; a newer one aborts it. */
  loading: AbortController | null;
}

function cell(row: HTMLTableRowElement, text: string, className = ''): HTMLTableCellElement {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function link(text: string, href: string, className: string, title: string): HTMLAnchorElement {
  const a = document.createElement('a');
  a.textContent = text;
  a.href = href;
  a.className = className;
  a.title = title;
  return a;
}

/** A local time for the table, the exact one (UTC) on hover. */
function timeCell(row: HTMLTableRowElement, ms: number): void {
  const td = cell(row, new Date(ms).toLocaleString(), 'audit-time');
  td.title = new Date(ms).toISOString();
}

function main(): void {
  const el = {
    form: byId<HTMLFormElement>('audit-form'),
    user: byId<HTMLInputElement>('audit-user'),
    agent: byId<HTMLInputElement>('audit-agent'),
    kind: byId<HTMLSelectElement>('audit-kind'),
    text: byId<HTMLInputElement>('audit-text'),
    from: byId<HTMLInputElement>('audit-from'),
    to: byId<HTMLInputElement>('audit-to'),
    clear: byId<HTMLButtonElement>('audit-clear'),
    error: byId<HTMLElement>('audit-error'),
    older: byId<HTMLButtonElement>('audit-older'),
    count: byId<HTMLElement>('audit-count'),
  };
  const me = document.body.dataset['user'] || '';
  // An admin reads everyone's records; anyone else only their own, which
  // the field says rather than offering a search the server ignores.
  const admin = document.body.dataset['role'] === 'admin';

  for (const kind of AUDIT_KINDS) {
    const option = document.createElement('option');
    option.value = kind;
    option.textContent = kind.replace(/_/g, ' ');
    el.kind.appendChild(option);
  }
  if (!admin) {
    el.user.value = me;
    el.user.disabled = true;
    el.user.title = 'You see your own records (admins see everyone\'s)';
  }

  const listing = (tab: Tab, body: string): Listing => ({
    tab,
    body: byId<HTMLTableSectionElement>(body),
    button: byId<HTMLButtonElement>('tab-' + tab),
    panel: byId<HTMLElement>('panel-' + tab),
    loaded: false,
    next: null,
    count: 0,
    loading: null,
  });
  const listings: Record<Tab, Listing> = {
    log: listing('log', 'audit-log'),
    recordings: listing('recordings', 'audit-recordings'),
  };

  const initial = searchOfQuery(location.search);
  let search: Search = initial.search;
  let front: Listing = listings[initial.tab];
  fillForm(search);

  function fillForm(s: Search): void {
    if (admin) el.user.value = s.user;
    el.agent.value = s.agent;
    el.kind.value = s.kind;
    el.text.value = s.text;
    el.from.value = s.since_ms === null ? '' : msToLocalInput(s.since_ms);
    el.to.value = s.until_ms === null ? '' : msToLocalInput(s.until_ms);
  }

  function readForm(): Search {
    return {
      user: admin ? el.user.value : '',
      agent: el.agent.value,
      kind: el.kind.value,
      text: el.text.value,
      since_ms: localInputToMs(el.from.value),
      until_ms: localInputToMs(el.to.value),
    };
  }

  function showError(text: string): void {
    el.error.textContent = text;
    el.error.hidden = text === '';
  }

  /** The count and the "older" button, for the table in front. */
  function drawMore(): void {
    const l = front;
    const noun = l.tab === 'log' ? 'record' : 'recording';
    el.count.textContent = !l.loaded ? (l.loading ? 'loading…' : '')
      : l.count + ' ' + noun + (l.count === 1 ? '' : 's') + (l.next ? ' (more are older)' : '');
    el.older.hidden = !l.loaded || l.next === null;
    el.older.disabled = l.loading !== null;
    el.older.title = l.tab === 'log' ? 'Add the next, older page of records' : 'Add the next, older page of recordings';
  }

  function showTab(tab: Tab, focus = false): void {
    front = listings[tab];
    for (const l of Object.values(listings)) {
      const on = l === front;
      l.button.setAttribute('aria-selected', String(on));
      l.button.tabIndex = on ? 0 : -1;
      l.button.classList.toggle('is-active', on);
      l.panel.hidden = !on;
    }
    if (focus) front.button.focus();
    // Recordings are of commands and shells: no kind to choose there.
    el.kind.disabled = tab === 'recordings';
    el.kind.title = tab === 'recordings' ? 'The log only: recordings are of commands and shells' : '';
    if (!front.loaded && !front.loading) void load(front, false);
    drawMore();
  }

  /** Fills `l` for the current search (`more`: adds the next, older page). */
  async function load(l: Listing, more: boolean): Promise<void> {
    l.loading?.abort();
    const ctl = new AbortController();
    l.loading = ctl;
    drawMore();
    const cursor = more ? l.next : null;
    const url = l.tab === 'log' ? auditUrl(search, cursor) : recordingsUrl(search, cursor);
    const done = (): void => {
      if (l.loading === ctl) l.loading = null;
      drawMore();
    };
    let res: Response;
    let body: string;
    try {
      res = await fetch(url, {
        credentials: 'same-origin', cache: 'no-store', signal: ctl.signal, headers: { Accept: 'application/json' },
      });
      body = await res.text();
    } catch {
      // Aborted by a newer search (which says what it finds), or no answer.
      if (l.loading === ctl) showError('no answer from the server');
      done();
      return;
    }
    if (l.loading !== ctl) return; // a newer search took over
    if (res.status === 401) {
      location.href = loginUrl('/audit' + location.search);
      return;
    }
    if (!res.ok) {
      showError(problemText(res.status, body));
      done();
      return;
    }
    if (!more) l.body.textContent = '';
    let added: number;
    if (l.tab === 'log') {
      const page = parseAuditPage(body);
      if (!page) return bad();
      for (const r of page.items) l.body.appendChild(logRow(r));
      added = finish(page);
    } else {
      const page = parseRecordingsPage(body);
      if (!page) return bad();
      for (const r of page.items) l.body.appendChild(recordingRow(r));
      added = finish(page);
    }
    if (!more && added === 0) {
      const row = l.body.insertRow();
      const td = cell(row, l.tab === 'log' ? 'No records match.' : 'No recordings match.', 'audit-empty');
      td.colSpan = l.tab === 'log' ? 7 : 8;
    }
    done();

    function finish<T>(page: Page<T>): number {
      l.next = page.next;
      l.loaded = true;
      l.count = (more ? l.count : 0) + page.items.length;
      return page.items.length;
    }
    function bad(): void {
      showError('the server\'s answer is not a page of ' + (l.tab === 'log' ? 'records' : 'recordings'));
      done();
    }
  }

  function logRow(r: AuditRecord): HTMLTableRowElement {
    const row = document.createElement('tr');
    row.dataset['seq'] = String(r.seq);
    row.dataset['kind'] = r.kind;
    timeCell(row, r.at_ms);
    const kind = document.createElement('span');
    kind.className = 'audit-kind' + (AUDIT_KINDS.includes(r.kind) ? ' kind-' + r.kind : '');
    kind.textContent = visible(r.kind);
    row.insertCell().appendChild(kind);
    cell(row, visible(r.user));
    cell(row, visible(r.agent));
    cell(row, visible(r.via));
    cell(row, visible(r.source), 'audit-mono');

    const details = row.insertCell();
    details.className = 'audit-details';
    const summary = document.createElement('span');
    summary.className = 'audit-summary';
    summary.textContent = summarize(r.detail);
    details.appendChild(summary);
    const rec = recordingOf(r.detail);
    if (rec) {
      const a = link('replay', replayUrl(rec), 'replay-link', 'Watch what this printed, as it was shown');
      a.dataset['recording'] = rec;
      details.appendChild(a);
    }
    // The whole record, a click away: what the summary leaves out, and
    // where the record sits in the hash chain.
    const more = document.createElement('details');
    const label = document.createElement('summary');
    label.textContent = 'all';
    const pre = document.createElement('pre');
    pre.textContent = detailText(r.detail) + '\n\nrecord ' + r.seq + ' · server ' + visible(r.server) + '\nhash ' + visible(r.hash);
    more.append(label, pre);
    details.appendChild(more);
    return row;
  }

  function recordingRow(r: Recording): HTMLTableRowElement {
    const row = document.createElement('tr');
    row.dataset['id'] = r.id;
    row.dataset['kind'] = r.kind;
    timeCell(row, r.started_ms);
    cell(row, visible(r.user));
    cell(row, visible(r.agent));
    const command = cell(row, visible(r.command), 'audit-mono audit-command');
    if (r.session) command.title = 'shell session ' + visible(r.session);
    const length = cell(row, recordingLength(r));
    if (r.ended_ms === null) {
      length.classList.add('is-live');
      length.title = 'Still being recorded: a replay shows it up to now';
    }
    cell(row, formatBytes(r.bytes));
    const flags = row.insertCell();
    const flag = (text: string, title: string): void => {
      const f = document.createElement('span');
      f.className = 'audit-flag';
      f.textContent = text;
      f.title = title;
      flags.appendChild(f);
    };
    if (r.truncated) flag('truncated', 'The recording reached its size cap: what came after is not in it');
    if (r.incomplete) flag('incomplete', 'Some of the output was lost while recording');
    const links = row.insertCell();
    links.className = 'audit-links';
    if (isRecordingId(r.id)) {
      links.append(
        link('replay', replayUrl(r.id), 'replay-link', 'Watch it, as it was shown'),
        link('download', recordingUrl(r.id, true), 'download-link', 'The asciicast v2 file (asciinema plays it too)'),
      );
    }
    return row;
  }

  /** A new search: both tables start again; the one in front is filled now, the other when shown. */
  function runSearch(): void {
    search = readForm();
    showError('');
    if (search.since_ms !== null && search.until_ms !== null && search.since_ms >= search.until_ms) {
      showError('"from" must be before "to"');
      return;
    }
    history.replaceState(null, '', location.pathname + pageQuery(search, front.tab));
    for (const l of Object.values(listings)) {
      l.loading?.abort();
      l.loading = null;
      l.loaded = false;
      l.next = null;
      l.count = 0;
      l.body.textContent = '';
    }
    void load(front, false);
    drawMore();
  }

  el.form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    runSearch();
  });
  el.clear.addEventListener('click', () => {
    fillForm({ ...search, user: '', agent: '', kind: '', text: '', since_ms: null, until_ms: null });
    runSearch();
  });
  el.older.addEventListener('click', () => {
    if (front.next !== null && !front.loading) void load(front, true);
  });
  for (const l of Object.values(listings)) {
    l.button.addEventListener('click', () => {
      showTab(l.tab);
      history.replaceState(null, '', location.pathname + pageQuery(search, l.tab));
    });
    // Arrows move between the tabs, as in any tab list.
    l.button.addEventListener('keydown', (ev) => {
      if (ev.key !== 'ArrowLeft' && ev.key !== 'ArrowRight') return;
      ev.preventDefault();
      const to: Tab = l.tab === 'log' ? 'recordings' : 'log';
      showTab(to, true);
      history.replaceState(null, '', location.pathname + pageQuery(search, to));
    });
  }

  showTab(front.tab);
}

main();
