// End-to-end regression tests of the console's robustness: lone surrogates
// and answers without an id, huge pastes, server shutdown, standard input in
// command mode, per-user history. Same harness as console.test.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  WAIT_MS, useServerAndBrowser, startServer, stopServer, openConsole,
  waitInPage, waitForOutput, run, explain,
} from './harness.mjs';

const shared = useServerAndBrowser();

// Runs in the page before app.js: records every text frame the page sends
// and lets a test rewrite the next one that matches (`rewrite` returns the
// new frame, or null to leave a frame alone).
function instrumentSocket() {
  const send = WebSocket.prototype.send;
  window.__conch = { sent: [], rewrite: null };
  WebSocket.prototype.send = function (data) {
    const t = window.__conch;
    if (typeof data === 'string') {
      if (t.rewrite) {
        const changed = t.rewrite(data);
        if (changed !== null) {
          t.rewrite = null;
          data = changed;
        }
      }
      t.sent.push(data);
    }
    return send.call(this, data);
  };
}

// Input as an input method delivers it: an `input` event on xterm's textarea,
// so xterm's onData fires with exactly `data` (half an emoji, say).
function inputEvent(data) {
  const ta = document.querySelector('#terminal textarea');
  ta.dispatchEvent(new InputEvent('input', { data, inputType: 'insertText', bubbles: true }));
}

// A clipboard paste of `text` into the terminal.
function pasteEvent(text) {
  const dt = new DataTransfer();
  dt.setData('text/plain', text);
  const ta = document.querySelector('#terminal textarea');
  ta.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
}

function screenIncludes(text) {
  const rows = Array.from(
    document.querySelectorAll('#terminal .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
  );
  return rows.join('\n').includes(text);
}

// Waits until the last row that is exactly `line` has a row containing
// `after` below it (the command's own long echo may fill many rows).
function rowThenRow({ line, after }) {
  const rows = Array.from(
    document.querySelectorAll('#terminal .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').trim(),
  );
  const at = rows.lastIndexOf(line);
  return at >= 0 && rows.slice(at + 1).some((r) => r.includes(after));
}

test('only whole characters are sent: an emoji runs, a lone half becomes U+FFFD', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server, { initScript: instrumentSocket });
  try {
    await run(page, 'echo 😀', [{ exact: '😀' }, { includes: 'exit 0' }]);

    // An emoji delivered in two halves is one character.
    await page.keyboard.type('echo split');
    await page.evaluate(inputEvent, '\ud83d');
    await page.evaluate(inputEvent, '\ude00');
    await page.keyboard.press('Enter');
    await waitForOutput(page, 'echo split😀', [{ exact: 'split😀' }, { includes: 'exit 0' }]);

    // A half that stays alone becomes U+FFFD instead of being sent.
    await page.keyboard.type('echo lone');
    await page.evaluate(inputEvent, '\ud83d');
    await page.keyboard.press('Enter');
    await waitInPage(page, rowThenRow, { line: 'lone\ufffd', after: 'exit 0' }, 'waiting for the output of echo lone');
    await run(page, 'echo ok', [{ exact: 'ok' }, { includes: 'exit 0' }]);

    // JSON.stringify writes a lone surrogate as a \uD8xx-\uDFxx escape (a
    // whole pair is written as the character itself).
    const sent = await page.evaluate(() => window.__conch.sent);
    const broken = sent.filter((f) => /\\u[dD][89a-fA-F][0-9a-fA-F]{2}/.test(f));
    assert.deepEqual(broken, [], 'frames with a lone surrogate');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('an error without a command id never wedges command mode', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server, { initScript: instrumentSocket });
  try {
    // The server cannot name the command in its answer (id 0 is not an
    // id): the exec waiting for `started` must still end, the prompt return.
    await page.evaluate(() => {
      window.__conch.rewrite = (f) => (f.includes('"type":"exec"') ? f.replace(/"id":\d+/, '"id":0') : null);
    });
    await run(page, 'echo lost', [{ includes: 'command ids start at 1' }]);
    await run(page, 'echo ok', [{ exact: 'ok' }, { includes: 'exit 0' }]);

    // A message the server cannot read but whose id it can: a final error
    // for that command.
    await page.evaluate(() => {
      window.__conch.rewrite = (f) => (f.includes('"type":"exec"') ? f.replace(/"agent":"[^"]*"/, '"agent":5') : null);
    });
    await run(page, 'echo unreadable', [{ includes: 'cannot understand that message' }]);
    await run(page, 'echo ok2', [{ exact: 'ok2' }, { includes: 'exit 0' }]);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('a command line too big for one message is refused with a word; big ones are sent whole', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server, { initScript: instrumentSocket });
  try {
    // 1 200 000 bytes: over the server's 1 MiB message limit.
    await page.evaluate(pasteEvent, 'echo ' + 'x'.repeat(1_200_000 - 5));
    await waitInPage(page, screenIncludes, 'this command line is 1 200 000 bytes',
      'waiting for the refusal of a 1.2 MB line');
    assert.deepEqual(problems, []);
    assert.equal(await page.evaluate(() => window.__conch.sent.some((f) => f.length > 1_000_000)), false,
      'nothing of the 1.2 MB line was sent');
    await run(page, 'echo ok', [{ exact: 'ok' }, { includes: 'exit 0' }]);

    // 60 000 characters: pasted, sent and run.
    await page.evaluate(pasteEvent, `printf %s ${'B'.repeat(60_000)} | wc -c`);
    await page.keyboard.press('Enter');
    await waitInPage(page, rowThenRow, { line: '60000', after: 'exit 0' }, 'waiting for wc -c to count 60000 bytes');

    // 200 000 characters: the editor takes them and the exec carries them
    // whole, and the console goes on (the kernel refuses one argument of
    // over 128 KiB, so the agent reports E2BIG as exit 126).
    const big = `printf %s ${'A'.repeat(200_000)} | wc -c`;
    await page.evaluate(pasteEvent, big);
    await page.keyboard.press('Enter');
    await waitInPage(page, (cmd) => window.__conch.sent.some((f) => {
      const m = JSON.parse(f);
      return m.type === 'exec' && m.cmd === cmd;
    }), big, 'waiting for the 200 KB exec');
    await waitInPage(page, () => Array.from(
      document.querySelectorAll('#terminal .xterm-rows > div'),
      (row) => row.textContent,
    ).some((r) => r.includes('Argument list too long')), null, 'waiting for the E2BIG report');
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    await run(page, 'echo after', [{ exact: 'after' }, { includes: 'exit 0' }]);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

// A command line as long as the kernel accepts (one argument of up to
// 128 KiB: `sh -c LINE`) runs, far beyond the agent protocol's header limit.
test('a 120 KB command line runs', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    await page.evaluate(pasteEvent, `printf %s ${'A'.repeat(120_000)} | wc -c`);
    await page.keyboard.press('Enter');
    await waitInPage(page, rowThenRow, { line: '120000', after: 'exit 0' }, 'waiting for wc -c to count 120000 bytes');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('after the server shuts down the page says it is reconnecting, and reconnects', { timeout: 120_000 }, async () => {
  // A server of its own: this one is stopped.
  const own = await startServer();
  let next = null;
  const { context, page } = await openConsole(shared.browser, own);
  try {
    await stopServer(own.child);
    await waitInPage(page, () => {
      const s = document.getElementById('status');
      return s.dataset.state === 'disconnected' && s.textContent === 'disconnected — reconnecting…';
    }, null, 'waiting for the reconnecting status after SIGTERM');

    // A server back on the same address: the page's next attempt reaches it.
    // Sessions live in the server's memory, so the new one sends the page
    // to its login form; that proves the page came back.
    next = await startServer({ listen: new URL(own.origin).host });
    try {
      await page.waitForURL((url) => url.pathname === '/login', { timeout: WAIT_MS });
    } catch (err) {
      throw await explain(page, err, 'waiting for the reconnection to the restarted server');
    }
  } finally {
    await context.close();
    if (next) await stopServer(next.child);
  }
});

test('what is typed while a command runs goes to its standard input', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server, { initScript: instrumentSocket });
  try {
    await page.keyboard.type('read x; echo got:$x');
    await page.keyboard.press('Enter');
    await page.keyboard.type('hello');
    await page.keyboard.press('Enter');
    await waitForOutput(page, 'read x; echo got:$x', [{ exact: 'hello' }, { exact: 'got:hello' }, { includes: 'exit 0' }]);

    // Backspace edits the line before it is sent.
    await page.keyboard.type('read y; echo got:$y');
    await page.keyboard.press('Enter');
    await page.keyboard.type('helXX');
    await page.keyboard.press('Backspace');
    await page.keyboard.press('Backspace');
    await page.keyboard.type('lo');
    await page.keyboard.press('Enter');
    await waitForOutput(page, 'read y; echo got:$y', [{ exact: 'hello' }, { exact: 'got:hello' }, { includes: 'exit 0' }]);

    // Ctrl-D ends the input.
    await page.keyboard.type('cat');
    await page.keyboard.press('Enter');
    await page.keyboard.type('abc');
    await page.keyboard.press('Enter');
    await page.keyboard.press('Control+d');
    await waitForOutput(page, 'cat', [{ exact: 'abc' }, { exact: 'abc' }, { includes: 'exit 0' }]);
    const eof = await page.evaluate(() => window.__conch.sent.map((f) => JSON.parse(f))
      .filter((m) => m.type === 'stdin' && m.eof === true));
    assert.equal(eof.length, 1, 'one stdin message with eof');
    assert.equal(eof[0].data, '');

    // Ctrl-C still interrupts, and the console goes on.
    await page.keyboard.type('sleep 30');
    await page.keyboard.press('Enter');
    await waitInPage(page, () => window.__conch.sent.some((f) => f.includes('"cmd":"sleep 30"')), null, 'waiting for the exec');
    await page.keyboard.press('Control+c');
    await waitForOutput(page, 'sleep 30', [{ includes: '^C' }, { includes: 'INT' }]);
    await run(page, 'echo after', [{ exact: 'after' }, { includes: 'exit 0' }]);

    // The page's help says so.
    const help = page.locator('#help');
    assert.equal(await help.isVisible(), false);
    await page.click('#help-toggle');
    assert.equal(await help.isVisible(), true);
    assert.match(await help.textContent(),
      /In command mode, what you type while a command runs goes to its standard input \(Enter sends a line, Ctrl-D ends input\); use shell mode for programs that need a terminal\./);
    await page.click('#help-toggle');
    assert.equal(await help.isVisible(), false);

    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('command history belongs to one user and is erased at logout', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    // Another user's history under the old shared key is removed on load.
    await page.evaluate(() => localStorage.setItem('conch.history', JSON.stringify(['export PGPASSWORD=other'])));
    await page.reload();
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    assert.equal(await page.evaluate(() => localStorage.getItem('conch.history')), null, 'the shared key is gone');

    await run(page, 'echo mine', [{ exact: 'mine' }, { includes: 'exit 0' }]);
    const { user, keys } = await page.evaluate(() => ({
      user: document.body.dataset.user,
      keys: Object.keys(localStorage).filter((k) => k.startsWith('conch.history')),
    }));
    assert.ok(user, 'the page names its user');
    assert.deepEqual(keys, [`conch.history.v2:${user}`]);
    assert.deepEqual(await page.evaluate((k) => JSON.parse(localStorage.getItem(k)), keys[0]), ['echo mine']);

    // ↑ shows this user's line, not the other one's.
    await page.keyboard.press('ArrowUp');
    await waitInPage(page, () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent.trim());
      const last = rows.filter((r) => r !== '').pop() || '';
      return last.endsWith('$ echo mine');
    }, null, 'waiting for ↑ to recall the command');
    assert.equal(await page.evaluate(screenIncludes, 'PGPASSWORD'), false);

    await page.click('#logout');
    await page.waitForURL((url) => url.pathname === '/login', { timeout: WAIT_MS });
    const left = await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('conch.history')));
    assert.deepEqual(left, [], 'history keys left after logout');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
