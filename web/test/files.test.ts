import { test } from 'node:test';
import assert from 'node:assert/strict';
import { baseName, downloadUrl, formatBytes, parseWritten, problemText, uploadUrl } from '../src/files';

test('an upload names the agent, the path, the shell session and the file, each encoded', () => {
  const shell = { agent: 'web-1', session: 's 1' };
  assert.equal(uploadUrl(shell, '.', 'hello world.txt', false),
    '/api/v1/files?agent=web-1&path=.&session=s%201&name=hello%20world.txt');
  // Characters a query gives a meaning to stay data.
  assert.equal(uploadUrl({ agent: 'a', session: null }, '/tmp/a+b&c=d#e', 'x?y%z', true),
    '/api/v1/files?agent=a&path=%2Ftmp%2Fa%2Bb%26c%3Dd%23e&name=x%3Fy%25z&overwrite=true');
  // No shell: relative to the home directory; an empty field is "." there.
  assert.equal(uploadUrl({ agent: 'a', session: null }, '  ', 'f', false), '/api/v1/files?agent=a&path=.&name=f');
  // No agent known: the server picks the only one the user may reach.
  assert.equal(uploadUrl({ agent: '', session: null }, 'd', 'é', false), '/api/v1/files?path=d&name=%C3%A9');
});

test('behind a base path, the addresses are under it', () => {
  const g = globalThis as { document?: unknown };
  g.document = { body: { dataset: { base: '/conch/' } } };
  try {
    assert.equal(uploadUrl({ agent: 'a', session: null }, '', 'f', false), '/conch/api/v1/files?agent=a&path=.&name=f');
    assert.equal(downloadUrl({ agent: 'a', session: null }, 'f'), '/conch/api/v1/files?agent=a&path=f');
  } finally {
    delete g.document;
  }
});

test('a download names the agent, the path and the shell session', () => {
  assert.equal(downloadUrl({ agent: 'db', session: 'abc' }, 'logs/app.log'),
    '/api/v1/files?agent=db&path=logs%2Fapp.log&session=abc');
  // A name may begin or end with spaces: sent as typed.
  assert.equal(downloadUrl({ agent: 'db', session: null }, ' a b '), '/api/v1/files?agent=db&path=%20a%20b%20');
  assert.equal(downloadUrl({ agent: 'db', session: null }, '  '), '/api/v1/files?agent=db&path=.');
  assert.equal(downloadUrl({ agent: 'db', session: null }, '/etc/hosts'), '/api/v1/files?agent=db&path=%2Fetc%2Fhosts');
});

test('a download is offered under the last part of its path', () => {
  assert.equal(baseName('/var/log/syslog'), 'syslog');
  assert.equal(baseName('notes.txt'), 'notes.txt');
  assert.equal(baseName('dir/'), '');
  assert.equal(baseName('..'), '');
});

test('a failed transfer says the server\'s detail, else its title, else what the status means', () => {
  const problem = (p: object) => JSON.stringify({ type: 'about:blank', status: 409, ...p });
  assert.equal(problemText(409, problem({ title: 'Conflict', detail: '/tmp/x exists' })), '/tmp/x exists');
  assert.equal(problemText(409, problem({ title: 'Conflict', detail: ' ' })), 'Conflict');
  assert.equal(problemText(403, problem({ detail: 'vera is a viewer\u001b[31m\nand may not' })), 'vera is a viewer [31m and may not',
    'control characters go');
  assert.equal(problemText(413, '<html>Request Entity Too Large</html>'), 'the file is larger than the server accepts');
  assert.equal(problemText(502, ''), 'failed (HTTP 502)');
  assert.equal(problemText(0, ''), 'no answer from the server');
  assert.equal(problemText(400, 'null'), 'the server refused the request');
  assert.equal(problemText(500, problem({ detail: 'x'.repeat(2000) })).length, 500);
});

test('the account of a written file is read, anything else is not one', () => {
  assert.deepEqual(parseWritten('{"agent":"a","path":"/tmp/f","size":3,"sha256":"ab"}'),
    { agent: 'a', path: '/tmp/f', size: 3, sha256: 'ab' });
  assert.equal(parseWritten('{"path":"/tmp/f","size":"3","sha256":"ab"}'), null);
  assert.equal(parseWritten('[]'), null);
  assert.equal(parseWritten('not json'), null);
});

test('sizes read at a glance', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1023), '1023 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(50 * 1024 * 1024), '50 MiB');
  assert.equal(formatBytes(3 * 1024 ** 3), '3.0 GiB');
  assert.equal(formatBytes(2 * 1024 ** 5), '2048 TiB');
});
