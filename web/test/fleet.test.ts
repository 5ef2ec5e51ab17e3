import { test } from 'node:test';
import assert from 'node:assert/strict';
import { matches, parseSelector, wildcard } from '../src/selector';
import { Grouper, NdjsonLines, hosts, lineText, printable, type FanoutLine, type HostOutput } from '../src/broadcast';

test('selectors read as the server reads them', () => {
  const web = { role: 'web', env: 'prod' };
  const staging = { role: 'web', env: 'staging' };
  const sel = (t: string) => parseSelector(t)!;
  assert.ok(matches(sel('web-*'), 'web-10', web));
  assert.ok(matches(sel('web-1,db-1'), 'db-1', {}));
  assert.ok(matches(sel('role=web,env!=staging'), 'a', web));
  assert.ok(!matches(sel('role=web,env!=staging'), 'a', staging));
  assert.ok(matches(sel('env!=x'), 'a', {}), '!= holds without the label');
  assert.ok(!matches(sel('env=*'), 'a', {}), '= needs the label');
  assert.ok(!matches(sel('web-*,env=prod'), 'web-1', staging));
  for (const bad of ['', ' ', 'a,,b', 'a,', 'web 1', '=web', 'role==web', 'a=b=c', 'db-[1]', '$(id)']) {
    assert.equal(parseSelector(bad), null, bad);
  }
  assert.ok(wildcard('*-1*', 'a-b-10') && !wildcard('*-1', 'web-10') && wildcard('d?', 'db'));
  assert.ok(!wildcard('a*a*a*b', 'a'.repeat(3000)), 'no blow-up');
});

test('a fan-out is split into lines across chunks and grouped by host', () => {
  const lines = new NdjsonLines();
  const got: FanoutLine[] = [];
  for (const chunk of ['{"agent":"a","stream":"stdout","da', 'ta":"hi\\n"}\n{"agent":"b","str', 'eam":"stderr","data":"/w==","encoding":"base64"}\nnot json\n']) {
    got.push(...lines.push(chunk));
  }
  assert.equal(got.length, 2);
  assert.equal(lineText(got[0]!), 'hi\n');
  assert.equal(lineText(got[1]!), '\ufffd', 'invalid bytes are replaced, not dropped silently');

  const ended: [string, HostOutput, FanoutLine][] = [];
  let summary: unknown = null;
  const grouper = new Grouper({
    host: (name, output, last) => ended.push([name, output, last]),
    summary: (s) => { summary = s; },
    failed: () => assert.fail('no failure'),
  });
  grouper.line({ agent: 'a', stream: 'stdout', data: 'one\n' });
  grouper.line({ agent: 'b', stream: 'stdout', data: 'x\n' });
  grouper.line({ agent: 'a', stream: 'stderr', data: 'two\n' });
  grouper.line({ agent: 'a', exit_code: 3, status: 'failed' });
  assert.equal(ended.length, 1);
  assert.deepEqual(ended[0]![1].pieces.map((p) => p.text), ['one\n', 'two\n']);
  grouper.line({ agent: 'b', error: 'lost', status: 'unreachable' });
  assert.equal(grouper.line({ summary: { total: 2, ok: 0, failed: 1, unreachable: 1 } }), true);
  assert.deepEqual(ended.map((e) => e[0]), ['a', 'b']);
  assert.deepEqual(summary, { total: 2, ok: 0, failed: 1, unreachable: 1 });
});

test("one host's output cannot rewrite another's block", () => {
  // Colours stay; cursor movement, erasing, titles and bare CRs go.
  assert.equal(printable('\x1b[31mred\x1b[0m ok\tx\n'), '\x1b[31mred\x1b[0m ok\tx\n');
  assert.equal(printable('a\x1b[2A\x1b[2Kb\rc\x1b]0;title\x07d\x9be\x1b]8;;http://x\x1b\\f\x1bMg'), 'abcdefg');
  const out = printable('x\x1b[1A\x1b[2K[exit 0]');
  assert.ok(!out.includes('\x1b[1A') && !out.includes('\x1b[2K'), JSON.stringify(out));
  assert.equal(hosts(1), '1 host');
  assert.equal(hosts(3), '3 hosts');
  const pending = new Grouper({ host: () => {}, summary: () => {}, failed: () => {} });
  pending.line({ agent: 'a', stream: 'stdout', data: 'partial' });
  assert.deepEqual(pending.pending().map(([n, o]) => [n, o.pieces.length]), [['a', 1]]);
});
