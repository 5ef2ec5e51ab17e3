import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AUDIT_KINDS, auditUrl, detailText, localInputToMs, msToLocalInput, NO_SEARCH, pageQuery, parseAuditPage,
  parseRecordingsPage, recordingLength, recordingOf, recordingsUrl, searchOfQuery, summarize, SUMMARY_MAX, visible,
  type Recording,
} from '../src/auditView';
import { isRecordingId, recordingUrl, replayUrl } from '../src/site';

const ID = '0123456789abcdef0123456789abcdef';

test('the log is asked with the search\'s fields, each encoded; empty ones are left out', () => {
  assert.equal(auditUrl(NO_SEARCH, null), '/api/v1/audit?limit=100');
  const search = {
    user: ' alice ', agent: 'web 1', kind: 'command_start', text: 'rm -rf /&x=%', since_ms: 1700000000000, until_ms: 0,
  };
  assert.equal(auditUrl(search, '4242'),
    '/api/v1/audit?user=alice&agent=web%201&since_ms=1700000000000&until_ms=0&text=rm%20-rf%20%2F%26x%3D%25' +
    '&kind=command_start&cursor=4242&limit=100');
  // Recordings take no kind (the server refuses fields it does not know).
  assert.equal(recordingsUrl(search, 'opaque/cursor'),
    '/api/v1/recordings?user=alice&agent=web%201&since_ms=1700000000000&until_ms=0&text=rm%20-rf%20%2F%26x%3D%25' +
    '&cursor=opaque%2Fcursor&limit=100');
});

test('recording addresses: the file, its download, its page; only well-formed ids', () => {
  assert.equal(recordingUrl(ID), '/api/v1/recordings/' + ID);
  assert.equal(recordingUrl(ID, true), '/api/v1/recordings/' + ID + '?download=1');
  assert.equal(replayUrl(ID), '/recordings/' + ID);
  assert.equal(isRecordingId(ID), true);
  assert.equal(isRecordingId(ID.toUpperCase()), true, 'as the server checks');
  assert.equal(isRecordingId(ID + '0'), false);
  assert.equal(isRecordingId('../../etc/passwd0123456789abcdef'), false);
  assert.equal(isRecordingId(42), false);
  const g = globalThis as { document?: unknown };
  g.document = { body: { dataset: { base: '/conch' } } };
  try {
    assert.equal(replayUrl(ID), '/conch/recordings/' + ID);
    assert.equal(auditUrl(NO_SEARCH, null), '/conch/api/v1/audit?limit=100');
  } finally {
    delete g.document;
  }
});

test('the page\'s own address keeps the search and the tab, and reads back the same', () => {
  const search = { user: 'bob', agent: '', kind: 'denied', text: 'a b', since_ms: 5, until_ms: null };
  const qs = pageQuery(search, 'recordings');
  assert.equal(qs, '?user=bob&since_ms=5&text=a%20b&kind=denied&tab=recordings');
  assert.deepEqual(searchOfQuery(qs), { search, tab: 'recordings' });
  assert.equal(pageQuery(NO_SEARCH, 'log'), '');
  assert.deepEqual(searchOfQuery(''), { search: NO_SEARCH, tab: 'log' });
  // Nonsense is dropped, not sent on.
  assert.deepEqual(searchOfQuery('?kind=nope&since_ms=-3&until_ms=1e9&tab=x').search, NO_SEARCH);
});

test('datetime-local values are the browser\'s local time, both ways', () => {
  const ms = new Date(2025, 2, 1, 14, 30).getTime();
  assert.equal(localInputToMs('2025-03-01T14:30'), ms);
  assert.equal(localInputToMs('2025-03-01T14:30:15'), ms + 15000);
  assert.equal(localInputToMs('2025-03-01T14:30:15.5'), ms + 15500);
  assert.equal(msToLocalInput(ms), '2025-03-01T14:30');
  assert.equal(msToLocalInput(ms + 15000), '2025-03-01T14:30:15');
  assert.equal(localInputToMs(msToLocalInput(ms)), ms);
  assert.equal(localInputToMs(''), null);
  assert.equal(localInputToMs('yesterday'), null);
  assert.equal(localInputToMs('2025-04-31T10:00'), null, 'no 31st of April');
});

test('pages of records are read leniently; anything else is no page', () => {
  const page = parseAuditPage(JSON.stringify({
    records: [
      { seq: 7, at_ms: 1, kind: 'command_start', user: 'u', source: '::1', agent: 'a', via: 'console', server: 's',
        detail: { command: 'ls', recording: ID }, prev_hash: 'p', hash: 'h' },
      { seq: 'x', kind: 5 },
      'not a record',
    ],
    next: 6,
  }));
  assert.ok(page);
  assert.equal(page.items.length, 2);
  assert.equal(page.next, '6', 'a number cursor is handed back as it was');
  assert.equal(page.items[0]!.user, 'u');
  assert.deepEqual(page.items[1], {
    seq: 0, at_ms: 0, kind: '', user: '', source: '', agent: '', via: '', server: '', detail: null, hash: '',
  });
  assert.equal(parseAuditPage('{"records":[],"next":null}')?.next, null);
  assert.equal(parseAuditPage('<html>'), null);
  assert.equal(parseAuditPage('{"recordings":[]}'), null);

  const recs = parseRecordingsPage(JSON.stringify({
    recordings: [{
      id: ID, user: 'u', agent: 'a', via: 'console', kind: 'session', session: 's1', command: '(login shell)',
      started_ms: 1000, ended_ms: null, cols: 80, rows: 24, bytes: 12, truncated: true, incomplete: false,
    }],
    next: 'abc',
  }));
  assert.equal(recs?.next, 'abc');
  assert.equal(recs?.items[0]?.ended_ms, null);
  assert.equal(recs?.items[0]?.truncated, true);
});

test('hidden characters show as escapes: what the log reads is what ran', () => {
  assert.equal(visible('ls\n\trm'), 'ls\\n\\trm');
  assert.equal(visible('evil\u202egnp.exe'), 'evil\\u202Egnp.exe', 'a right-to-left override');
  assert.equal(visible('a\u200bb\u2028c\x1b[31m'), 'a\\u200Bb\\u2028c\\u001B[31m');
  assert.equal(visible('plain é 漢 😀'), 'plain é 漢 😀');
  assert.equal(detailText({ c: 'a\u202eb\nc' }), '{\n  "c": "a\\u202Eb\\nc"\n}');
  assert.equal(detailText({ c: 'a\x7fb\x9bc' }), '{\n  "c": "a\\u007Fb\\u009Bc"\n}', 'DEL and C1 controls, which JSON leaves');
});

test('a record reads as one line: what it was about, then how it went', () => {
  assert.equal(summarize({ command: 'make test', pty: false, cwd: '/src', recording: ID }), 'make test · in /src');
  assert.equal(summarize({
    command: 'sleep 9', duration_ms: 1500, bytes_out: 0,
    exit: { code: null, signal: 'KILL', timed_out: false, duration_ms: 1500 },
  }), 'sleep 9 · signal KILL · 1.5 s');
  assert.equal(summarize({ command: 'false', exit: { code: 1, signal: null, timed_out: false, duration_ms: 3 } }), 'false · exit 1');
  assert.equal(summarize({ argv: ['ls', '-l', 'my file'] }), 'ls -l "my file"');
  assert.equal(summarize({ path: '/etc/hosts', size: 2048, sha256: 'ab' }), '/etc/hosts · 2.0 KiB');
  assert.equal(summarize({ path: '/x', error: 'exists', message: '/x exists' }), '/x · exists · /x exists');
  assert.equal(summarize({ session: 's1', watch: true }), 'session s1 · watching');
  assert.equal(summarize({ wanted: 'command_start', reason: 'viewers may not' }), 'wanted command_start · viewers may not');
  assert.equal(summarize({ role: 'admin' }), 'role admin');
  // user_change: a store user added, re-passworded or deleted.
  assert.equal(summarize({ action: 'add', name: 'nina', role: 'operator', agents: null }), 'add nina (operator)');
  assert.equal(summarize({ action: 'add', name: 'nina', role: 'viewer', agents: 'web-*' }), 'add nina (viewer) · agents web-*');
  assert.equal(summarize({ action: 'password', name: 'nina' }), 'new password for nina');
  assert.equal(summarize({ action: 'delete', name: 'nina' }), 'delete nina');
  assert.equal(summarize({ action: 'rename', name: 'nina' }), 'rename nina', 'an action this page does not know still reads');
  assert.equal(summarize({ action: 'add', name: 'ni\u202ena', role: 'admin' }), 'add ni\\u202Ena (admin)');
  assert.equal(summarize({ token: 'ci', role: 'operator', agents: 'web-*' }), 'token ci · role operator', 'a token is no user');
  assert.equal(summarize({ reason: 'wrong user name, password or token' }), 'wrong user name, password or token');
  assert.equal(summarize({}), '');
  assert.equal(summarize(null), '');
  assert.equal(summarize(['not', 'an', 'object']), '');
  assert.equal(summarize({ command: 'x\ny' }), 'x\\ny');
  const long = summarize({ command: 'y'.repeat(5000) });
  assert.equal(long.length, SUMMARY_MAX);
  assert.ok(long.endsWith('…'));
});

test('a record\'s recording, and how long a recording ran', () => {
  assert.equal(recordingOf({ recording: ID }), ID);
  assert.equal(recordingOf({ recording: 'javascript:alert(1)' }), null);
  assert.equal(recordingOf({}), null);
  assert.equal(recordingOf(null), null);
  const r = { started_ms: 1000, ended_ms: 76000 } as Recording;
  assert.equal(recordingLength(r), '1 min 15 s');
  assert.equal(recordingLength({ ...r, ended_ms: null }), 'live');
  assert.equal(recordingLength({ ...r, ended_ms: 1000 }), '0 ms');
});

test('the kinds are the server\'s (its Kind::ALL), in its order', () => {
  assert.deepEqual(AUDIT_KINDS, [
    'login', 'login_failed', 'logout', 'token_create', 'token_revoke', 'command_start', 'command_end',
    'session_attach', 'session_detach', 'session_end', 'file_put', 'file_get', 'denied', 'user_change', 'session_change',
  ]);
});
