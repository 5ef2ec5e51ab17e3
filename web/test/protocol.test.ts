import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeOutput, decodeServerMessage, execMessageBytes, MAX_MESSAGE, STDIN_PIECE, stdinMessages,
} from '../src/protocol';
import { Flows, ACK_BATCH } from '../src/flow';
import { escapeAction, escapeAt, stripPasteMarkers } from '../src/keys';
import { clean, formatDuration, groupDigits, utf8Length, WholeCharacters, wellFormed } from '../src/text';
import { exitSummary } from '../src/commandMode';
import { History, historyKey, HISTORY_MAX, LEGACY_HISTORY_KEY } from '../src/history';
import { MemoryStore } from './fakes';

test('server messages: known types decoded, anything else ignored', () => {
  const hello = decodeServerMessage('{"type":"hello","user":"u","role":"admin","agents":[]}');
  assert.equal(hello?.type, 'hello');
  assert.equal(decodeServerMessage('{"type":"brand_new"}'), null);
  assert.equal(decodeServerMessage('not json'), null);
  assert.equal(decodeServerMessage('null'), null);
  assert.equal(decodeServerMessage('[1]'), null);
  const err = decodeServerMessage('{"type":"error","code":"bad_request","message":"m","id":3,"final":true}');
  assert.deepEqual(err, { type: 'error', code: 'bad_request', message: 'm', id: 3, final: true });
});

test('output frames: stream, big-endian id, bytes', () => {
  const buf = new Uint8Array([2, 0, 0, 1, 2, 104, 105]).buffer;
  const frame = decodeOutput(buf);
  assert.equal(frame?.stream, 2);
  assert.equal(frame?.id, 258);
  assert.deepEqual(Array.from(frame!.bytes), [104, 105]);
  assert.equal(decodeOutput(new Uint8Array([1, 0, 0, 0]).buffer), null);
  assert.equal(decodeOutput(new Uint8Array([1, 0, 0, 0, 1]).buffer)?.bytes.length, 0);
});

test('stdin goes in pieces that never split a surrogate pair; eof on the last', () => {
  const data = 'a'.repeat(STDIN_PIECE - 1) + '😀' + 'b'.repeat(10);
  const msgs = stdinMessages(7, data, true);
  assert.equal(msgs.length, 2);
  assert.equal(msgs[0]!.data.length, STDIN_PIECE - 1, 'the pair moves to the next piece');
  assert.equal(msgs.map((m) => m.data).join(''), data);
  assert.equal(msgs[0]!.eof, undefined);
  assert.equal(msgs[1]!.eof, true);
  assert.deepEqual(stdinMessages(7, '', true), [{ type: 'stdin', id: 7, data: '', eof: true }]);
  assert.deepEqual(stdinMessages(7, 'x\ud83d', false), [{ type: 'stdin', id: 7, data: 'x\ufffd' }]);
});

test('exec size is measured in UTF-8 bytes of the JSON', () => {
  const small = execMessageBytes('echo', 'local');
  assert.equal(small, JSON.stringify({ type: 'exec', id: 0xffffffff, cmd: 'echo', agent: 'local' }).length);
  assert.ok(execMessageBytes('x'.repeat(MAX_MESSAGE), '') > MAX_MESSAGE);
  assert.equal(utf8Length('aé漢😀'), 1 + 2 + 3 + 4);
  assert.equal(utf8Length('\ud83d'), 3);
  assert.equal(groupDigits(1048576), '1 048 576');
});

test('flow control acks in batches and when the terminal caught up', () => {
  const acks: Array<[number, number]> = [];
  const flows = new Flows((id, bytes) => acks.push([id, bytes]));
  const id = flows.open();
  assert.equal(flows.open(), id + 1, 'ids are never reused');
  const a = flows.writing(id, 100)!;
  const b = flows.writing(id, ACK_BATCH)!;
  a();
  assert.deepEqual(acks, [], 'one write still pending, under a batch');
  b();
  assert.deepEqual(acks, [[id, 100 + ACK_BATCH]]);
  const c = flows.writing(id, 10)!;
  flows.close(id);
  c();
  assert.equal(acks.length, 1, 'no ack for a closed command');
  assert.equal(flows.writing(id, 1), null);
});

test('whole characters: a half waits for the other, a lone half becomes U+FFFD', () => {
  const w = new WholeCharacters();
  assert.equal(w.take('a\ud83d'), 'a');
  assert.equal(w.take('\ude00'), '😀');
  assert.equal(w.take('\ud83d'), '');
  assert.equal(w.take('b'), '\ufffdb');
  assert.equal(wellFormed('\ude00x'), '\ufffdx');
});

test('keys: escape sequences and their editing actions', () => {
  assert.equal(escapeAt('\x1b[Ax', 0), '\x1b[A');
  assert.equal(escapeAt('\x1b[1;5Cx', 0), '\x1b[1;5C');
  assert.equal(escapeAt('\x1bOH', 0), '\x1bOH');
  assert.equal(escapeAt('\x1b]0;title\x07x', 0), '\x1b]0;title\x07');
  assert.equal(escapeAt('\x1b', 0), '\x1b');
  assert.equal(escapeAction('\x1b[A'), 'historyUp');
  assert.equal(escapeAction('\x1bOF'), 'end');
  assert.equal(escapeAction('\x1b[3~'), 'deleteForward');
  assert.equal(escapeAction('\x1b[7~'), 'home');
  assert.equal(escapeAction('\x1b[15~'), null);
  assert.equal(stripPasteMarkers('\x1b[200~ls\x1b[201~'), 'ls');
});

test('text from the server cannot inject control sequences', () => {
  assert.equal(clean('a\x1b[31mb\nc\r\nd'), 'a[31mb\r\nc\r\nd');
  assert.equal(clean(undefined), '');
  assert.equal(formatDuration(850), '850 ms');
  assert.equal(formatDuration(1500), '1.5 s');
  assert.equal(formatDuration(75000), '1 min 15 s');
  assert.equal(formatDuration(undefined), '');
});

test('exit summaries', () => {
  assert.equal(exitSummary({ code: 0, signal: null, timed_out: false, duration_ms: 12 }), '\x1b[32m[exit 0 · 12 ms]\x1b[0m');
  assert.match(exitSummary({ code: null, signal: 'INT', timed_out: false, duration_ms: 1 }), /\[signal INT · 1 ms\]/);
  assert.match(exitSummary({ code: null, signal: 'KILL', timed_out: true, duration_ms: 2000 }), /\[timed out · 2\.0 s\]/);
});

test('history: per user, capped, the shared legacy key removed, forgotten at logout', () => {
  const store = new MemoryStore();
  store.setItem(LEGACY_HISTORY_KEY, '["other user"]');
  store.setItem(historyKey('ann'), '["a", 5, "b"]');
  const h = new History(store, historyKey('ann'));
  assert.equal(store.getItem(LEGACY_HISTORY_KEY), null);
  assert.equal(h.length, 2);
  h.add('b');
  assert.equal(h.length, 2, 'the same line twice in a row is kept once');
  for (let i = 0; i < HISTORY_MAX + 10; i++) h.add('c' + i);
  assert.equal(h.length, HISTORY_MAX);
  assert.equal(JSON.parse(store.getItem(historyKey('ann'))!).length, HISTORY_MAX);
  h.forget();
  assert.equal(h.length, 0);
  assert.equal(store.getItem(historyKey('ann')), null);
  store.setItem(historyKey('bob'), '{not json');
  assert.equal(new History(store, historyKey('bob')).length, 0);
  assert.equal(new History(null, 'x').length, 0);
});
