// End-to-end test of the conch web console: a real server, a real Chromium.
//
//   CONCH_BIN   path to the conch binary (default target/debug/conch, relative to the repo root)
//   CHROMIUM    path to a Chromium binary (default /usr/bin/chromium)
//
// Run with `npm run test:e2e`. Every wait is on a condition in the page or an
// event from the server process; there are no fixed sleeps. The harness
// (server, browser, terminal readers) is in harness.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import {
  ROOT, WAIT_MS, useServerAndBrowser, openConsole, explain, run,
} from './harness.mjs';

const SCREENSHOT = path.join(ROOT, 'docs', 'screenshot.png');

const shared = useServerAndBrowser();

// ---- tests

test('a page request without a session lands on the login page', async () => {
  const context = await shared.browser.newContext({ viewport: { width: 1200, height: 720 } });
  try {
    const page = await context.newPage();
    const response = await page.goto(shared.server.origin + '/');
    assert.equal(new URL(page.url()).pathname, '/login');
    assert.equal(response.status(), 200);
    await page.locator('#login-submit').waitFor();
    for (const id of ['#username', '#password', '#token']) {
      assert.equal(await page.locator(id).count(), 1, `${id} on the login page`);
    }
  } finally {
    await context.close();
  }
});

test('the console runs commands and a shell', { timeout: 180_000 }, async () => {
  // The token URL logs in and lands on the console, connected.
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    assert.equal(await page.locator('#status').textContent(), 'connected');
    assert.ok(await page.locator('#agent option').count() >= 1, 'the agent selector is filled');

    const focused = await page.evaluate(() => !!document.activeElement && !!document.activeElement.closest('#terminal'));
    assert.ok(focused, 'the terminal has the keyboard focus on load');

    // Command mode.
    assert.equal(await page.locator('#mode-command').getAttribute('aria-pressed'), 'true');
    await run(page, 'echo hello', [{ exact: 'hello' }, { includes: 'exit 0' }]);
    await run(page, "sh -c 'exit 3'", [{ includes: 'exit 3' }]);
    await run(page, 'echo oops >&2', [{ exact: 'oops' }, { includes: 'exit 0' }]);

    await mkdir(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT });

    // Shell mode: a PTY shell. Switching clears the terminal; wait until the
    // old rows are gone and the shell has printed something (its prompt).
    await page.click('#mode-shell');
    assert.equal(await page.locator('#mode-shell').getAttribute('aria-pressed'), 'true');
    try {
      await page.waitForFunction(
        () => {
          const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent);
          return !rows.some((r) => r.includes('echo oops')) && rows.some((r) => r.trim() !== '');
        },
        null,
        { timeout: WAIT_MS },
      );
    } catch (err) {
      throw await explain(page, err, 'waiting for the shell prompt');
    }
    await run(page, 'echo shell-$((40+2))', [{ exact: 'shell-42' }]);

    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
