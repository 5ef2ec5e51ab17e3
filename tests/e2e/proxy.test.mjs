// conch behind nginx under a sub-path, as operators deploy it: nginx (from
// Debian's package) on a free loopback port with the shipped location block
// (deploy/nginx/conch-location.conf) forwarding /conch/ to conch, which
// runs with --public-url http://127.0.0.1:PORT/conch. A real Chromium logs
// in through the proxy, runs a command in both modes, and the REST API
// answers through it too.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, writeFileSync, rmSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  ROOT, startServer, stopServer, launchBrowser, run, waitInPage, WAIT_MS,
} from './harness.mjs';

const NGINX = process.env.NGINX || '/usr/sbin/nginx';

/** A free loopback port (bound, then released). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const shared = { nginx: null, dir: null, server: null, browser: null, base: null };

before(async () => {
  const [proxyPort, conchPort] = [await freePort(), await freePort()];
  shared.base = `http://127.0.0.1:${proxyPort}/conch`;
  shared.server = await startServer({
    listen: `127.0.0.1:${conchPort}`,
    args: ['--public-url', shared.base, '--trusted-proxy', '127.0.0.1'],
  });
  const dir = mkdtempSync(path.join(os.tmpdir(), 'conch-nginx-'));
  shared.dir = dir;
  const location = path.join(ROOT, 'deploy/nginx/conch-location.conf');
  writeFileSync(path.join(dir, 'nginx.conf'), `
daemon off;
master_process off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream conch { server 127.0.0.1:${conchPort}; }
  server {
    listen 127.0.0.1:${proxyPort};
    include ${location};
  }
}
`);
  execFileSync(NGINX, ['-t', '-q', '-p', dir, '-c', path.join(dir, 'nginx.conf')], { stdio: 'inherit' });
  shared.nginx = spawn(NGINX, ['-p', dir, '-c', path.join(dir, 'nginx.conf')], { stdio: 'inherit' });
  const killOnExit = () => shared.nginx.kill('SIGKILL');
  process.once('exit', killOnExit);
  // Ready once it answers (a bounded wait on an event: the port accepting).
  for (let i = 0; ; i++) {
    try {
      await fetch(`${shared.base}/healthz`);
      break;
    } catch (err) {
      if (i >= 200) throw new Error(`nginx never answered: ${err.message}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  shared.browser = await launchBrowser();
});

after(async () => {
  if (shared.browser) await shared.browser.close().catch(() => {});
  if (shared.nginx && shared.nginx.exitCode === null) {
    const exited = once(shared.nginx, 'exit');
    shared.nginx.kill('SIGTERM');
    await exited;
  }
  if (shared.server) await stopServer(shared.server.child);
  if (shared.dir) {
    const log = readFileSync(path.join(shared.dir, 'error.log'), 'utf8');
    rmSync(shared.dir, { recursive: true, force: true });
    if (/\[(emerg|alert|crit)\]/.test(log)) throw new Error('nginx logged:\n' + log);
  }
});

test('through nginx under /conch/: login, both modes, the REST API', { timeout: 180_000 }, async () => {
  const { base } = shared;
  assert.ok(shared.server.loginUrl.startsWith(`${base}/login?token=`), shared.server.loginUrl);
  // Outside the base path conch has nothing; nginx forwards only /conch/.
  assert.equal((await fetch(`${base}/no-such-page`)).status, 404);

  const context = await shared.browser.newContext({ viewport: { width: 1200, height: 720 } });
  const problems = [];
  try {
    const page = await context.newPage();
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error') problems.push(`console: ${msg.text()}`);
    });
    await page.goto(shared.server.loginUrl);
    await page.waitForURL((url) => url.pathname === '/conch/', { timeout: WAIT_MS });
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    // The cookie is the sub-path's only.
    const cookies = await context.cookies();
    assert.ok(cookies.length > 0 && cookies.every((c) => c.path === '/conch'), JSON.stringify(cookies));

    // Command mode, then shell mode, both over the proxied WebSocket.
    await run(page, 'echo via-$((40+2))', [{ exact: 'via-42' }, { includes: 'exit 0' }]);
    await page.click('#mode-shell');
    await page.locator('#mode-shell[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });
    await run(page, 'echo shell-via-proxy', [{ exact: 'shell-via-proxy' }]);

    // The REST API through the proxy, with the page's own cookie and Origin.
    const answer = await page.evaluate(async () => {
      const r = await fetch('/conch/api/v1/exec', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ command: 'echo rest-via-proxy' }),
      });
      return { status: r.status, body: await r.json() };
    });
    assert.equal(answer.status, 200, JSON.stringify(answer));
    assert.equal(answer.body.stdout, 'rest-via-proxy\n');
    // The API's description points clients at the base path.
    const doc = await (await fetch(`${base}/api/v1/openapi.json`)).json();
    assert.equal(doc.servers[0].url, '/conch');

    // Log out through the proxy: back on the login page under /conch.
    await page.click('#logout');
    await page.waitForURL((url) => url.pathname === '/conch/login', { timeout: WAIT_MS });
    await waitInPage(page, () => !!document.querySelector('form.login-form'), null, 'waiting for the login form');
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
