// The console over HTTPS: `conch serve --tls-self-signed`, a real Chromium
// told to accept that one certificate's errors in this test's context only
// (Playwright's ignoreHTTPSErrors), the page, its login and its WebSocket
// (wss) all over TLS. Same harness as console.test.mjs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, stopServer, launchBrowser, openConsole, run,
} from './harness.mjs';

let server = null;
let browser = null;

before(async () => {
  server = await startServer({ args: ['--tls-self-signed'] });
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (server) await stopServer(server.child);
});

test('the console works over https and wss, with HSTS and secure cookies', { timeout: 120_000 }, async () => {
  assert.equal(new URL(server.loginUrl).protocol, 'https:', 'the login URL is https');
  const { context, page, problems } = await openConsole(browser, server, {
    contextOptions: { ignoreHTTPSErrors: true },
  });
  try {
    await run(page, 'echo over-wss', [{ exact: 'over-wss' }, { includes: 'exit 0' }]);
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name.startsWith('__Host-'));
    assert.ok(session, `a __Host- session cookie: ${JSON.stringify(cookies.map((c) => c.name))}`);
    assert.equal(session.secure, true);
    const response = await page.request.get(server.origin + '/healthz');
    assert.equal(response.headers()['strict-transport-security'], 'max-age=31536000');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
