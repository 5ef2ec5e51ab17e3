// Shared harness of the end-to-end tests: a real `conch serve`, a real
// Chromium, and helpers that read the terminal. Not a test file itself
// (node --test only runs *.test.mjs and the like).
//
//   CONCH_BIN   path to the conch binary (default target/debug/conch, relative to the repo root)
//   CHROMIUM    path to a Chromium binary (default /usr/bin/chromium)
//
// Every wait is on a condition in the page or an event from the server
// process; there are no fixed sleeps.

import { before, after } from 'node:test';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CONCH_BIN = path.resolve(ROOT, process.env.CONCH_BIN || 'target/debug/conch');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// The login URL, under a base path when the server has one (/conch/login?token=...).
const LOGIN_URL_RE = /https?:\/\/127\.0\.0\.1:\d+(?:\/[\w.~-]+)*\/login\?token=[0-9a-f]+/;
// The log line of a server that prints no login URL (it has a users file).
const LISTENING_RE = /server listening addr=(127\.0\.0\.1:\d+)/;
const STARTUP_TIMEOUT_MS = 60_000;
export const WAIT_MS = 20_000; // one command's round trip, generous for a loaded CI machine

const serverLog = [];          // last lines of the servers' output, shown when a wait fails

function remember(prefix, line) {
  serverLog.push(prefix + line);
  if (serverLog.length > 200) serverLog.shift();
}

// Start `conch serve` and resolve once it has printed its login URL. A
// server with `users` (a users file: users log in with a password) prints
// none; it is ready once it logs the address it listens on, and
// `loginUrl` is null.
export function startServer({ listen = '127.0.0.1:0', args = [], users = false } = {}) {
  const child = spawn(CONCH_BIN, ['serve', '--listen', listen, ...args], {
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
      fail(new Error(`conch printed no ${users ? 'listening address' : 'login URL'} within ${STARTUP_TIMEOUT_MS / 1000} s\n${serverLog.join('\n')}`));
    }, STARTUP_TIMEOUT_MS);

    stdout.on('line', (line) => {
      remember('[stdout] ', line);
      const m = (users ? LISTENING_RE : LOGIN_URL_RE).exec(line);
      if (m && !settled) {
        settled = true;
        clearTimeout(timer);
        if (users) resolve({ child, loginUrl: null, origin: 'http://' + m[1] });
        else resolve({ child, loginUrl: m[0], origin: new URL(m[0]).origin });
      }
    });
    child.once('error', (err) => fail(new Error(`cannot start ${CONCH_BIN}: ${err.message}`)));
    child.once('exit', (code, signal) => {
      fail(new Error(`conch exited before printing its URL (code ${code}, signal ${signal})\n${serverLog.join('\n')}`));
    });
  });
}

export async function stopServer(child) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(timer);
}

export function launchBrowser() {
  return chromium.launch({
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
}

// ---- page helpers (the functions passed to the page run inside Chromium)

// The visible terminal rows as text, trailing blanks trimmed. The DOM renderer
// puts one <div> per row into .xterm-rows.
export function readRows() {
  return Array.from(
    document.querySelectorAll('#terminal .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
  );
}

// True when, after the last row that ends with `command`, the rows contain
// each expectation in order: {exact: 'line'} or {includes: 'text'}.
export function outputArrived({ command, expect }) {
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

export async function explain(page, err, what) {
  const rows = await page.evaluate(readRows).catch(() => []);
  const status = await page.locator('#status').getAttribute('data-state').catch(() => '?');
  err.message = `${what}: ${err.message}\n--- status: ${status}\n--- terminal ---\n${rows.join('\n')}` +
    `\n--- server output (tail) ---\n${serverLog.slice(-40).join('\n')}`;
  return err;
}

// Wait for `fn(arg)` to be true in the page; on timeout, say what was awaited
// and show the terminal.
export async function waitInPage(page, fn, arg, what) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT_MS });
  } catch (err) {
    throw await explain(page, err, what);
  }
}

export async function waitForOutput(page, command, expect) {
  await waitInPage(page, outputArrived, { command, expect }, `waiting for the output of ${JSON.stringify(command)}`);
}

export async function run(page, command, expect) {
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
  await waitForOutput(page, command, expect);
}

// A new browser context logged in with the admin token, its console
// connected. `problems` collects page errors and CSP violations.
// `contextOptions` adds to (or overrides) the context's options (a phone's
// touch screen, say).
export async function openConsole(browser, server, { initScript, contextOptions = {} } = {}) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 720 }, ...contextOptions });
  if (initScript) await context.addInitScript(initScript);
  const problems = [];
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content[- ]Security[- ]Policy|Refused to/i.test(msg.text())) {
      problems.push(`CSP: ${msg.text()}`);
    }
  });
  await page.goto(server.loginUrl);
  await page.waitForURL((url) => url.pathname === '/', { timeout: WAIT_MS });
  try {
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
  } catch (err) {
    throw await explain(page, err, 'waiting for the connection');
  }
  return { context, page, problems };
}

// One server and one browser for a test file: started before its first
// test, stopped after its last (the browser first, so that a failure to
// close it still stops the server).
export function useServerAndBrowser() {
  const shared = { server: null, browser: null };
  before(async () => {
    shared.server = await startServer();
    shared.browser = await launchBrowser();
  });
  after(async () => {
    if (shared.browser) await shared.browser.close().catch(() => {});
    if (shared.server) await stopServer(shared.server.child);
  });
  return shared;
}

// Shell mode; resolves once the shell is a session (the page keeps its id).
export async function enterShell(page) {
  await page.click('#mode-shell');
  await waitInPage(page, () => {
    const user = document.body.dataset.user;
    const held = JSON.parse(sessionStorage.getItem('conch.sessions.v1:' + user) || '[]');
    return held.length === 1;
  }, null, 'waiting for the shell to be a session');
}
