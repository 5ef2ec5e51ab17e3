// End-to-end test of the conch web console: a real server, a real Chromium.
//
//   CONCH_BIN   path to the conch binary (default target/debug/conch, relative to the repo root)
//   CHROMIUM    path to a Chromium binary (default /usr/bin/chromium)
//
// Run with `npm run test:e2e`. Every wait is on a condition in the page or an
// event from the server process; there are no fixed sleeps.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CONCH_BIN = path.resolve(ROOT, process.env.CONCH_BIN || 'target/debug/conch');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = path.join(ROOT, 'docs', 'screenshot.png');

const LOGIN_URL_RE = /http:\/\/127\.0\.0\.1:\d+\/login\?token=[0-9a-f]+/;
const STARTUP_TIMEOUT_MS = 60_000;
const WAIT_MS = 20_000;        // one command's round trip, generous for a loaded CI machine

let server = null;             // { child, loginUrl, origin }
let browser = null;
const serverLog = [];          // last lines of the server's output, shown when a wait fails

function remember(prefix, line) {
  serverLog.push(prefix + line);
  if (serverLog.length > 200) serverLog.shift();
}

// Start `conch serve` and resolve once it has printed its login URL.
function startServer() {
  const child = spawn(CONCH_BIN, ['serve', '--listen', '127.0.0.1:0'], {
    cwd: ROOT,
    env: { ...process.env, CONCH_LOG: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  // Last resort if the test process dies without running `after`.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  child.once('exit', () => process.removeListener('exit', killOnExit));

  // Both pipes are read to the end so the server never blocks on a full pipe.
  const stdout = createInterface({ input: child.stdout });
  createInterface({ input: child.stderr }).on('line', (line) => remember('[stderr] ', line));

  return new Promise((resolve, reject) => {
    let settled = false;
    const fail = (err) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(err);
    };
    const timer = setTimeout(() => {
      fail(new Error(`conch printed no login URL within ${STARTUP_TIMEOUT_MS / 1000} s\n${serverLog.join('\n')}`));
    }, STARTUP_TIMEOUT_MS);

    stdout.on('line', (line) => {
      remember('[stdout] ', line);
      const m = LOGIN_URL_RE.exec(line);
      if (m && !settled) {
        settled = true;
        clearTimeout(timer);
        resolve({ child, loginUrl: m[0], origin: new URL(m[0]).origin });
      }
    });
    child.once('error', (err) => fail(new Error(`cannot start ${CONCH_BIN}: ${err.message}`)));
    child.once('exit', (code, signal) => {
      fail(new Error(`conch exited before printing its URL (code ${code}, signal ${signal})\n${serverLog.join('\n')}`));
    });
  });
}

async function stopServer(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

// ---- page helpers (the functions passed to the page run inside Chromium)

// The visible terminal rows as text, trailing blanks trimmed. The DOM renderer
// puts one <div> per row into .xterm-rows.
function readRows() {
  return Array.from(
    document.querySelectorAll('#terminal .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
  );
}

// True when, after the last row that ends with `command`, the rows contain
// each expectation in order: {exact: 'line'} or {includes: 'text'}.
function outputArrived({ command, expect }) {
  const rows = Array.from(
    document.querySelectorAll('#terminal .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
  );
  let start = -1;
  for (let i = rows.length - 1; i >= 0; i--) {
    if (rows[i].endsWith(command)) {
      start = i;
      break;
    }
  }
  if (start < 0) return false;
  let i = start + 1;
  for (const want of expect) {
    while (i < rows.length && !(want.exact !== undefined ? rows[i] === want.exact : rows[i].includes(want.includes))) i++;
    if (i >= rows.length) return false;
    i++;
  }
  return true;
}

async function explain(page, err, what) {
  const rows = await page.evaluate(readRows).catch(() => []);
  const status = await page.locator('#status').getAttribute('data-state').catch(() => '?');
  err.message = `${what}: ${err.message}\n--- status: ${status}\n--- terminal ---\n${rows.join('\n')}` +
    `\n--- server output (tail) ---\n${serverLog.slice(-40).join('\n')}`;
  return err;
}

async function waitForOutput(page, command, expect) {
  try {
    await page.waitForFunction(outputArrived, { command, expect }, { timeout: WAIT_MS });
  } catch (err) {
    throw await explain(page, err, `waiting for the output of ${JSON.stringify(command)}`);
  }
}

async function run(page, command, expect) {
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
  await waitForOutput(page, command, expect);
}

// ---- lifecycle

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless=new',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  // Each step on its own, so a failure to close the browser still stops the server.
  if (browser) await browser.close().catch(() => {});
  if (server) await stopServer(server.child);
});

// ---- tests

test('a page request without a session lands on the login page', async () => {
  const context = await browser.newContext({ viewport: { width: 1200, height: 720 } });
  try {
    const page = await context.newPage();
    const response = await page.goto(server.origin + '/');
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
  const context = await browser.newContext({ viewport: { width: 1200, height: 720 } });
  const problems = [];
  try {
    const page = await context.newPage();
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error' && /Content[- ]Security[- ]Policy|Refused to/i.test(msg.text())) {
        problems.push(`CSP: ${msg.text()}`);
      }
    });

    // The token URL logs in and lands on the console.
    await page.goto(server.loginUrl);
    await page.waitForURL((url) => url.pathname === '/', { timeout: WAIT_MS });

    try {
      await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    } catch (err) {
      throw await explain(page, err, 'waiting for the connection');
    }
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
