// The console with a fleet: two agents that dial in to a real server, the
// host picker (status and OS shown, filtered by a selector) and a command
// line broadcast to every agent the filter matches, its output grouped by
// host with each host's exit code and a summary. Same harness as
// console.test.mjs; the agents are real `conch agent --connect` processes.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  CONCH_BIN, startServer, stopServer, launchBrowser, openConsole, waitInPage, run,
} from './harness.mjs';

/** Types a command in the tab in front and waits for `expected` as a row after it, in that tab's pane only. */
async function runInFront(page, command, expected) {
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
  await waitInPage(page, ({ command, expected }) => {
    const rows = Array.from(document.querySelectorAll('#terminal .tab-pane:not([hidden]) .xterm-rows > div'),
      (r) => r.textContent.replace(/\u00a0/g, ' ').trimEnd());
    const at = rows.findLastIndex((r) => r.endsWith(command));
    return at >= 0 && rows.slice(at + 1).includes(expected);
  }, { command, expected }, `waiting for ${expected} in the tab in front`);
}

let server = null;
let browser = null;
const agents = [];
const dir = mkdtempSync(path.join(os.tmpdir(), 'conch-e2e-fleet-'));

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

before(async () => {
  const listen = `127.0.0.1:${await freePort()}`;
  let file = '';
  for (const [name, role] of [['web-1', 'web'], ['db-1', 'db']]) {
    const key = path.join(dir, `${name}.key`);
    const made = spawnSync(CONCH_BIN, ['keygen', key]);
    assert.equal(made.status, 0, String(made.stderr));
    file += `[[agents]]\nname = "${name}"\nkey_file = "${key}"\nlabels = { role = "${role}" }\n`;
  }
  writeFileSync(path.join(dir, 'agents.toml'), file);
  server = await startServer({ args: ['--agents-file', path.join(dir, 'agents.toml'), '--agent-listen', listen] });
  for (const name of ['web-1', 'db-1']) {
    const child = spawn(CONCH_BIN, ['agent', '--connect', listen, '--name', name, '--key-file', path.join(dir, `${name}.key`)], {
      stdio: 'ignore',
      env: { ...process.env, CONCH_LOG: 'warn' },
    });
    process.once('exit', () => child.kill('SIGKILL'));
    agents.push(child);
  }
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  for (const a of agents) await stopServer(a);
  if (server) await stopServer(server.child);
  rmSync(dir, { recursive: true, force: true });
});

test('the host picker shows and filters the fleet, and a line runs on every matching host', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(browser, server);
  try {
    // Both agents, online, each with the OS its agent reported.
    await waitInPage(page, () => {
      const options = Array.from(document.querySelectorAll('#agent option'), (o) => o.textContent);
      return options.length === 2 && options.every((t) => t.startsWith('online · ') && t.split(' · ').length === 3);
    }, null, 'waiting for both agents with their OS in the picker');

    // A selector narrows the picker.
    await page.selectOption('#agent', 'web-1');
    await page.locator('#agent-filter').fill('role=web');
    await waitInPage(page, () => {
      const options = Array.from(document.querySelectorAll('#agent option'), (o) => o.value);
      return options.length === 1 && options[0] === 'web-1';
    }, null, 'waiting for the filter to leave web-1 alone');

    // Broadcast to every agent: each host's block, its exit code, the summary.
    await page.locator('#agent-filter').fill('');
    await page.locator('#broadcast').click();
    assert.equal(await page.locator('#broadcast').getAttribute('aria-pressed'), 'true');
    await run(page, 'echo hi-$((40+2)); exit 3', [{ includes: '2 hosts: 0 ok, 2 failed, 0 unreachable' }]);
    const rows = await page.evaluate(() => Array.from(
      document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent.replace(/\u00a0/g, ' ').trimEnd()));
    for (const host of ['web-1', 'db-1']) {
      const at = rows.findIndex((r) => r === `── ${host}`);
      assert.ok(at >= 0, `a block for ${host}:\n${rows.join('\n')}`);
      assert.equal(rows[at + 1], 'hi-42', rows.join('\n'));
      assert.ok(rows[at + 2].includes('exit 3'), rows.join('\n'));
    }
    // The prompt names the target while broadcasting.
    assert.ok(rows.some((r) => r.startsWith('[*] $')), rows.join('\n'));

    // A selector in the filter is the target: only web-1 runs it.
    await page.locator('#agent-filter').fill('role=web');
    await page.locator('#terminal').click();
    await run(page, 'echo only-$((1+1))', [{ exact: '── web-1' }, { exact: 'only-2' }, { includes: '[1 host: 1 ok, 0 failed, 0 unreachable]' }]);
    // A plain piece of a name stands for every name holding it, in the
    // picker and in a broadcast alike.
    await page.locator('#agent-filter').fill('db');
    await page.locator('#terminal').click();
    await run(page, 'echo piece-$((1+1))', [{ exact: '── db-1' }, { exact: 'piece-2' }, { includes: '[1 host: 1 ok' }]);

    // A filter that is not a selector is refused by the server; nothing runs anywhere.
    await page.locator('#agent-filter').fill('web 1');
    await page.locator('#terminal').click();
    await run(page, 'echo never-$((1+1))', [{ includes: 'conch: "target"' }]);
    assert.equal(await page.locator('#agent option').count(), 1, 'a filter that is not a selector leaves only the agent in use');

    // Ctrl-C stops a broadcast on every host, and the rest of a paste does not run.
    await page.locator('#agent-filter').fill('');
    await page.locator('#terminal').click();
    // A clipboard paste of two lines, as robustness.test.mjs makes one.
    await page.evaluate((text) => {
      const ta = document.querySelector('#terminal textarea');
      const dt = new DataTransfer();
      dt.setData('text/plain', text);
      ta.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
    }, 'sleep 30\necho second-$((1+1))\n');
    await waitInPage(page, () => Array.from(document.querySelectorAll('#terminal .xterm-rows > div'),
      (r) => r.textContent.replace(/\u00a0/g, ' ')).some((t) => t.trimEnd().endsWith('$ sleep 30')), null, 'the first pasted line');
    await page.keyboard.press('Control+C');
    await run(page, 'echo third-$((1+2))', [{ includes: '[2 hosts: 2 ok' }]);
    const after = await page.evaluate(() => Array.from(
      document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent.replace(/\u00a0/g, ' ').trimEnd()));
    assert.ok(after.some((r) => r.includes('[stopped on every host]')), after.join('\n'));
    assert.ok(!after.some((r) => r === 'second-2'), `the rest of the paste ran:\n${after.join('\n')}`);

    // Tabs: each bound to its own host, side by side on one socket.
    await page.locator('#broadcast').click();
    assert.equal(await page.locator('#broadcast').getAttribute('aria-pressed'), 'false');
    await page.selectOption('#agent', 'web-1');
    await page.locator('#tab-new').click();
    await waitInPage(page, () => document.querySelectorAll('#tabs [role="tab"]').length === 2, null, 'a second tab');
    await page.selectOption('#agent', 'db-1');
    await page.locator('#terminal .tab-pane:not([hidden])').click();
    const [webPid, dbPid] = agents.map((a) => a.pid);
    await runInFront(page, 'echo one-$PPID', `one-${dbPid}`);
    const labels = await page.locator('#tabs [role="tab"]').allTextContents();
    assert.deepEqual(labels, ['web-1 · command', 'db-1 · command']);
    // Back to the first tab: its host comes back into the picker, and its
    // commands still go there, and their output to its own pane only.
    await page.locator('#tabs [role="tab"]').first().click();
    assert.equal(await page.locator('#agent').inputValue(), 'web-1');
    assert.equal(await page.locator('#tabs [role="tab"]').first().getAttribute('aria-selected'), 'true');
    await runInFront(page, 'echo two-$PPID', `two-${webPid}`);
    const hidden = await page.evaluate(() => Array.from(
      document.querySelectorAll('#terminal .tab-pane[hidden] .xterm-rows > div'), (r) => r.textContent));
    assert.ok(!hidden.some((r) => r.includes('two-')), `the other tab got this tab's output:\n${hidden.join('\n')}`);
    // Closing the tab in front brings the other forward; the last one stays.
    await page.locator('#tab-close').click();
    await waitInPage(page, () => document.querySelectorAll('#tabs [role="tab"]').length === 1, null, 'one tab left');
    assert.equal(await page.locator('#agent').inputValue(), 'db-1');
    assert.equal(await page.locator('#tab-close').isDisabled(), true);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
