// Shells that survive the page: a reload reattaches the tab's shell with
// its screen redrawn (read from xterm's rows in a real Chromium), and the
// sessions panel lists it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  enterShell, useServerAndBrowser, openConsole, readRows, run, waitForOutput, waitInPage, WAIT_MS,
} from './harness.mjs';

const shared = useServerAndBrowser();

async function reload(page) {
  await page.reload();
  await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
  await page.locator('#mode-shell[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });
}

test('a reload reattaches the shell: its output, its variables and its screen come back', { timeout: 180_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    await enterShell(page);
    await run(page, 'export X=kept-$((6*7))', []);
    // A command still running when the page goes.
    await page.keyboard.type('sleep 3; echo done-$((1+1))');
    await page.keyboard.press('Enter');
    await reload(page);
    await waitForOutput(page, 'sleep 3; echo done-$((1+1))', [{ exact: 'done-2' }]);
    await run(page, 'echo $X', [{ exact: 'kept-42' }]);

    // A full-screen program: the same screen after the reload.
    const file = `/tmp/conch-e2e-vi-${process.pid}-${Date.now()}.txt`;
    await run(page, `printf "alpha\\nbeta\\ngamma\\n" > ${file}`, []);
    // -n: no swap file, so that nothing is left behind.
    await page.keyboard.type(`vi -n ${file}`);
    await page.keyboard.press('Enter');
    await waitInPage(page, () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent);
      return rows[0].startsWith('alpha') && rows[2].startsWith('gamma');
    }, null, 'waiting for vi to show the file');
    // Cursor down and to the end of the line, then mark the spot.
    await page.keyboard.type('j$');
    await page.keyboard.type('aX');
    await page.keyboard.press('Escape');
    await waitInPage(page, () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent);
      const last = rows.filter((r) => r.trim() !== '').pop() || '';
      return rows[1].startsWith('betaX') && !last.includes('INSERT') && /2,5/.test(last);
    }, null, 'waiting for the edit, back in normal mode');
    const before = await page.evaluate(readRows);
    await reload(page);
    await waitInPage(page, (want) => {
      const rows = Array.from(
        document.querySelectorAll('#terminal .xterm-rows > div'),
        (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
      );
      return JSON.stringify(rows) === JSON.stringify(want);
    }, before, 'waiting for the same vi screen after the reload; before it was:\n' + before.join('\n'));
    // The editor still takes keys: quit without saving.
    await page.keyboard.type(':q!');
    await page.keyboard.press('Enter');
    // The shell's prompt back before typing on: vi, leaving, may flush
    // what was typed before it restored the terminal.
    await waitInPage(page, () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'),
        (r) => r.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''));
      const last = rows.filter((r) => r !== '').pop() || '';
      return !rows.some((r) => r.startsWith('betaX')) && /[#$]$/.test(last);
    }, null, 'waiting for the shell prompt after vi');
    await run(page, `rm ${file}; echo vi-gone`, [{ exact: 'vi-gone' }]);

    // top: after a reload and its next refresh, the same screen layout
    // (its figures change every second, its rows do not).
    await page.keyboard.type('top -d 1');
    await page.keyboard.press('Enter');
    const layout = () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'),
        (r) => r.textContent.replace(/\u00a0/g, ' '));
      const header = rows.findIndex((r) => /^\s*PID\s+USER/.test(r));
      return { header, top: rows[0].startsWith('top - '), count: rows.length };
    };
    await waitInPage(page, () => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'), (r) => r.textContent);
      return rows[0].startsWith('top - ') && rows.some((r) => /PID\s+USER/.test(r));
    }, null, 'waiting for top');
    const topBefore = await page.evaluate(layout);
    assert.ok(topBefore.header > 0, JSON.stringify(topBefore));
    await reload(page);
    await waitInPage(page, (want) => {
      const rows = Array.from(document.querySelectorAll('#terminal .xterm-rows > div'),
        (r) => r.textContent.replace(/\u00a0/g, ' '));
      const header = rows.findIndex((r) => /^\s*PID\s+USER/.test(r));
      return rows[0].startsWith('top - ') && header === want.header && rows.length === want.count;
    }, topBefore, 'waiting for top\'s screen after the reload: ' + JSON.stringify(topBefore));
    await page.keyboard.type('q');
    await run(page, 'echo top-gone', [{ exact: 'top-gone' }]);

    // The sessions panel lists it, attached.
    await page.click('#sessions-toggle');
    await page.locator('#sessions tbody tr').first().waitFor({ timeout: WAIT_MS });
    const state = await page.locator('#sessions tbody tr td').nth(4).textContent();
    assert.match(state, /^attached/);
    await page.click('#sessions-toggle');
    assert.equal(await page.locator('#sessions').isVisible(), false);

    // Command mode detaches (never kills): the shell is still there.
    await page.click('#mode-command');
    await waitInPage(page, () => Array.from(document.querySelectorAll('#terminal .xterm-rows > div'),
      (r) => r.textContent).some((t) => t.includes('keeps running, detached')), null, 'waiting for the detach note');
    await page.click('#sessions-toggle');
    await waitInPage(page, () => {
      const cell = document.querySelectorAll('#sessions tbody tr td')[4];
      return !!cell && cell.textContent.startsWith('detached');
    }, null, 'waiting for the session to show detached');
    // Attach from the panel: the same shell, with its variable.
    await page.locator('#sessions tbody tr button', { hasText: 'attach' }).first().click();
    await page.locator('#mode-shell[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });
    await run(page, 'echo again-$X', [{ exact: 'again-kept-42' }]);
    // Rename it from the panel.
    await page.click('#sessions-toggle');
    page.once('dialog', (dialog) => dialog.accept('deploy-shell'));
    await page.locator('#sessions tbody tr button', { hasText: 'rename' }).first().click();
    await waitInPage(page, () => {
      const cell = document.querySelectorAll('#sessions tbody tr td')[1];
      return !!cell && cell.textContent === 'deploy-shell';
    }, null, 'waiting for the new title in the panel');
    await page.click('#sessions-toggle');
    // End it from the panel: the tab goes back to command mode.
    await page.click('#sessions-toggle');
    page.once('dialog', (dialog) => dialog.accept());
    await page.locator('#sessions tbody tr button', { hasText: 'end' }).first().click();
    await page.locator('#mode-command[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });

    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
