// End-to-end tests of what a new user needs beyond the commands themselves:
// contrast (checked by axe-core), a way out of the terminal for keyboard
// users, xterm's screen-reader mode as a remembered setting, the "running"
// indicator of command mode, and the extra-keys bar of touch screens.
// Same harness as console.test.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AxeBuilder } from '@axe-core/playwright';
import {
  WAIT_MS, useServerAndBrowser, openConsole, waitInPage, waitForOutput, run,
} from './harness.mjs';

const shared = useServerAndBrowser();

// Contrast violations (WCAG AA: 4.5:1 for normal text) as readable lines.
async function contrastViolations(page) {
  const result = await new AxeBuilder({ page }).withRules(['color-contrast']).analyze();
  return result.violations.flatMap((v) => v.nodes.map((n) => `${n.target.join(' ')}: ${n.failureSummary}`));
}

test('text has a contrast of at least 4.5:1, hints and help included (axe-core)', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    // The grey hint lines at the top, a grey exit summary, a red one.
    await run(page, 'echo hi', [{ exact: 'hi' }, { includes: 'exit 0' }]);
    await run(page, 'false', [{ includes: 'exit 1' }]);
    assert.deepEqual(await contrastViolations(page), [], 'console');

    // The help panel and the "running" indicator.
    await page.click('#help-toggle');
    await page.locator('#help').waitFor();
    assert.deepEqual(await contrastViolations(page), [], 'console with the help open');
    await page.click('#help-toggle');
    await page.keyboard.type('sleep 30');
    await page.keyboard.press('Enter');
    await page.locator('#activity').waitFor({ timeout: WAIT_MS });
    assert.deepEqual(await contrastViolations(page), [], 'console while a command runs');
    await page.keyboard.press('Control+c');
    await page.keyboard.press('Control+c');
    assert.deepEqual(problems, []);

    // The login page.
    const login = await context.newPage();
    await login.goto(shared.server.origin + '/login');
    await login.locator('#login-submit').waitFor();
    assert.deepEqual(await contrastViolations(login), [], 'login page');
  } finally {
    await context.close();
  }
});

test('command mode says a command is running and how to stop it', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    const activity = page.locator('#activity');
    assert.equal(await activity.isVisible(), false);
    await page.keyboard.type('sleep 30');
    await page.keyboard.press('Enter');
    await activity.waitFor({ state: 'visible', timeout: WAIT_MS });
    assert.equal(await activity.textContent(), 'running… Ctrl-C to stop');
    assert.equal(await activity.getAttribute('role'), 'status');
    await page.keyboard.press('Control+c');
    await waitForOutput(page, 'sleep 30', [{ includes: '^C' }, { includes: 'INT' }]);
    await activity.waitFor({ state: 'hidden', timeout: WAIT_MS });
    // A quick command does not make it flash.
    await run(page, 'echo quick', [{ exact: 'quick' }, { includes: 'exit 0' }]);
    assert.equal(await activity.isVisible(), false);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('Ctrl+Shift+F6 leaves the terminal for the top bar, and the help says so', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    const inTerminal = () => !!document.activeElement && !!document.activeElement.closest('#terminal');
    assert.equal(await page.evaluate(inTerminal), true);
    await page.keyboard.press('Control+Shift+F6');
    assert.equal(await page.evaluate(() => !!document.activeElement && !!document.activeElement.closest('.topbar')), true,
      'the focus is in the top bar');
    // Tab from the top bar leads back into the terminal, and nothing of
    // the key reached the command line.
    let tabs = 0;
    while (!(await page.evaluate(inTerminal)) && tabs < 12) {
      await page.keyboard.press('Tab');
      tabs += 1;
    }
    assert.equal(await page.evaluate(inTerminal), true, `back in the terminal after ${tabs} Tab presses`);
    await run(page, 'echo still', [{ exact: 'still' }, { includes: 'exit 0' }]);

    await page.click('#help-toggle');
    assert.match(await page.locator('#help').textContent(), /Ctrl\+Shift\+F6 moves the focus to the top bar/);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('screen-reader mode is a setting in the help panel, remembered', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  try {
    const tree = page.locator('#terminal .xterm-accessibility');
    assert.equal(await tree.count(), 0, 'off by default');
    await page.click('#help-toggle');
    const box = page.locator('#screen-reader');
    assert.equal(await box.isChecked(), false);
    await box.check();
    await tree.waitFor({ state: 'attached', timeout: WAIT_MS });

    await page.reload();
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    await tree.waitFor({ state: 'attached', timeout: WAIT_MS });
    await run(page, 'echo readable', [{ exact: 'readable' }, { includes: 'exit 0' }]);
    await waitInPage(page, () => Array.from(document.querySelectorAll('#terminal .xterm-accessibility-tree > *'),
      (r) => r.textContent).some((t) => t.includes('readable')), null, 'waiting for the accessible rows');

    await page.click('#help-toggle');
    assert.equal(await box.isChecked(), true, 'remembered');
    await box.uncheck();
    await tree.waitFor({ state: 'detached', timeout: WAIT_MS });
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});

test('touch screens get a bar of extra keys; Ctrl and Alt apply to the next key', { timeout: 120_000 }, async () => {
  // A desktop page has no visible bar.
  const desktop = await openConsole(shared.browser, shared.server);
  try {
    assert.equal(await desktop.page.locator('.extra-keys').isVisible(), false);
  } finally {
    await desktop.context.close();
  }

  const { context, page, problems } = await openConsole(shared.browser, shared.server, {
    contextOptions: { viewport: { width: 412, height: 780 }, hasTouch: true, isMobile: true },
  });
  try {
    const bar = page.locator('.extra-keys');
    await bar.waitFor({ state: 'visible', timeout: WAIT_MS });
    const keys = await bar.locator('button').evaluateAll((bs) => bs.map((b) => b.textContent));
    assert.deepEqual(keys, ['Esc', 'Ctrl', 'Alt', 'Tab', '←', '↑', '↓', '→', '|', '~', '/']);

    // ← moves the cursor of the line editor; `|` is typed.
    await page.keyboard.type('echo ab');
    await bar.locator('[data-key="←"]').tap();
    await page.keyboard.type('X');
    await bar.locator('[data-key="|"]').tap();
    await page.keyboard.press('Enter');
    await waitForOutput(page, 'echo aX|b', [{ includes: 'not found' }]);

    // Ctrl, then c: an interrupt.
    await page.keyboard.type('sleep 30');
    await page.keyboard.press('Enter');
    await page.locator('#activity').waitFor({ timeout: WAIT_MS });
    const ctrl = bar.locator('[data-key="Ctrl"]');
    await ctrl.tap();
    assert.equal(await ctrl.getAttribute('aria-pressed'), 'true');
    await page.keyboard.type('c');
    assert.equal(await ctrl.getAttribute('aria-pressed'), 'false', 'Ctrl applies once');
    await waitForOutput(page, 'sleep 30', [{ includes: '^C' }, { includes: 'INT' }]);
    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
