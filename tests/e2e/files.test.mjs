// File transfers from the console, through /api/v1/files: files chosen in
// the upload panel and files dropped on the terminal land in the shell's
// current directory, byte for byte; a second upload of the same name is
// refused with the server's reason unless "replace" is ticked; an upload
// can be cancelled; a download is saved by the browser; a viewer gets no
// upload button and the server refuses one anyway. Same harness as
// console.test.mjs; the files are checked with node's fs (the embedded
// agent runs as the user running the tests).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  CONCH_BIN, WAIT_MS, enterShell, useServerAndBrowser, openConsole, startServer, stopServer, explain, run, waitInPage,
} from './harness.mjs';

const shared = useServerAndBrowser();

/** Fresh directories for the files, removed after the last test. */
const dirs = [];
function freshDir() {
  const dir = realpathSync(mkdtempSync(path.join(os.tmpdir(), 'conch-e2e-files-')));
  dirs.push(dir);
  return dir;
}
after(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

/** Shell mode, its shell a session (the page keeps its id), in `dir`. */
async function shellIn(page, dir) {
  await enterShell(page);
  // Two lines: one long line could wrap, and `run` finds a command by
  // the row it ends.
  await page.keyboard.type(`mkdir -p '${dir}' && cd '${dir}'`);
  await page.keyboard.press('Enter');
  await run(page, 'pwd', [{ exact: dir }]);
}

/** Ends the shell (no session is left behind), back in command mode. */
async function exitShell(page) {
  await page.keyboard.type('exit');
  await page.keyboard.press('Enter');
  await page.locator('#mode-command[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });
}

/** The `index`th upload of the list (from 0), once it ended: its data attributes and its outcome. */
async function ended(page, index) {
  await waitInPage(page, (i) => {
    const row = document.querySelectorAll('#transfers .transfer')[i];
    return !!row && ['done', 'failed', 'cancelled'].includes(row.dataset.state);
  }, index, `waiting for upload #${index + 1} to end`);
  return page.evaluate((i) => {
    const row = document.querySelectorAll('#transfers .transfer')[i];
    return { ...row.dataset, result: row.querySelector('.transfer-result').textContent };
  }, index);
}

test('uploads land in the shell\'s current directory; an existing file is kept unless replaced; a drop uploads too; cancel stops one',
  { timeout: 180_000 }, async () => {
    const { context, page, problems } = await openConsole(shared.browser, shared.server);
    const dir = freshDir();
    try {
      await shellIn(page, dir);

      // The panel says "." (the shell's current directory) by itself.
      await page.click('#upload-toggle');
      await page.locator('#upload').waitFor({ state: 'visible', timeout: WAIT_MS });
      assert.equal(await page.locator('#upload-toggle').getAttribute('aria-expanded'), 'true');
      assert.equal(await page.inputValue('#upload-path'), '.');
      assert.equal(await page.locator('#upload-overwrite').isChecked(), false);

      // Text, a NUL, bytes that are no UTF-8, CRLF: written as they are.
      const first = Buffer.concat([Buffer.from('hello world\n'), Buffer.from([0, 1, 0xfe, 0xff]), Buffer.from('é\r\n')]);
      const target = path.join(dir, 'hello world.txt');
      await page.setInputFiles('#upload-input', { name: 'hello world.txt', mimeType: 'text/plain', buffer: first });
      let row = await ended(page, 0);
      assert.equal(row.state, 'done', row.result);
      assert.equal(row.status, '201');
      assert.equal(row.path, target);
      assert.equal(row.size, String(first.length));
      assert.equal(row.sha256, sha256(first));
      assert.match(row.result, new RegExp(sha256(first).slice(0, 12)));
      assert.deepEqual(readFileSync(target), first);

      // The same name again: refused with the server's reason, the file kept.
      await page.setInputFiles('#upload-input', { name: 'hello world.txt', mimeType: 'text/plain', buffer: Buffer.from('second') });
      row = await ended(page, 1);
      assert.equal(row.state, 'failed');
      assert.equal(row.status, '409');
      assert.ok(row.result.trim().length > 0, 'the reason is shown');
      assert.deepEqual(readFileSync(target), first);

      // Ticked "replace": the file is replaced.
      await page.check('#upload-overwrite');
      const third = randomBytes(256 * 1024);
      await page.setInputFiles('#upload-input', { name: 'hello world.txt', mimeType: 'application/octet-stream', buffer: third });
      row = await ended(page, 2);
      assert.equal(row.state, 'done', row.result);
      assert.equal(row.status, '200');
      assert.equal(row.sha256, sha256(third));
      assert.deepEqual(readFileSync(target), third);

      // Files dropped on the terminal, with the panel closed: the hint
      // shows while they are over it, and they go into the shell's current
      // directory, the panel opening (with its defaults) to show them.
      await page.click('#upload-toggle');
      await page.locator('#upload').waitFor({ state: 'hidden', timeout: WAIT_MS });
      const dropped = randomBytes(4096);
      const transfer = await page.evaluateHandle((bytes) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], 'dropped.bin'));
        dt.items.add(new File(['two\n'], 'dropped two.txt', { type: 'text/plain' }));
        return dt;
      }, [...dropped]);
      await page.dispatchEvent('#terminal', 'dragenter', { dataTransfer: transfer });
      await page.locator('#drop-hint').waitFor({ state: 'visible', timeout: WAIT_MS });
      assert.match(await page.locator('#drop-hint').textContent(), /current directory/);
      await page.dispatchEvent('#terminal', 'dragover', { dataTransfer: transfer });
      await page.dispatchEvent('#terminal', 'drop', { dataTransfer: transfer });
      await page.locator('#drop-hint').waitFor({ state: 'hidden', timeout: WAIT_MS });
      await page.locator('#upload').waitFor({ state: 'visible', timeout: WAIT_MS });
      assert.equal(await page.locator('#upload-overwrite').isChecked(), false);
      for (const i of [3, 4]) {
        row = await ended(page, i);
        assert.equal(row.state, 'done', row.result);
      }
      assert.deepEqual(readFileSync(path.join(dir, 'dropped.bin')), dropped);
      assert.equal(readFileSync(path.join(dir, 'dropped two.txt'), 'utf8'), 'two\n');

      // Cancel: the request is held (never answered), so the upload is
      // surely on its way when the button is pressed.
      let held = null;
      const files = (url) => url.pathname.endsWith('/api/v1/files');
      await page.route(files, (route) => { held = route; });
      await page.setInputFiles('#upload-input', { name: 'never.bin', buffer: randomBytes(1024) });
      const slow = page.locator('#transfers .transfer').nth(5);
      await page.locator('#transfers .transfer:nth-child(6)[data-state="sending"]').waitFor({ timeout: WAIT_MS });
      await slow.locator('.transfer-cancel').click();
      row = await ended(page, 5);
      assert.equal(row.state, 'cancelled');
      await held?.abort().catch(() => {});
      await page.unroute(files);
      assert.equal(existsSync(path.join(dir, 'never.bin')), false);

      // Escape closes the panel and gives the keyboard back to the terminal.
      await page.focus('#upload-path');
      await page.keyboard.press('Escape');
      await page.locator('#upload').waitFor({ state: 'hidden', timeout: WAIT_MS });
      assert.equal(await page.evaluate(() => !!document.activeElement?.closest('#terminal')), true);

      await exitShell(page);
      assert.deepEqual(problems, []);
    } catch (err) {
      throw await explain(page, err, 'uploads');
    } finally {
      await context.close();
    }
  });

test('a download saves the file, named by a path relative to the shell\'s directory or absolute', { timeout: 120_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  const dir = freshDir();
  try {
    const data = randomBytes(300_000);
    writeFileSync(path.join(dir, 'data.bin'), data);
    const text = Buffer.from('a name with spaces\n');
    writeFileSync(path.join(dir, 'name with spaces.txt'), text);
    await shellIn(page, dir);

    await page.click('#download-toggle');
    await page.locator('#download').waitFor({ state: 'visible', timeout: WAIT_MS });
    await page.fill('#download-path', 'data.bin');
    let [download] = await Promise.all([
      page.waitForEvent('download', { timeout: WAIT_MS }),
      page.click('#download-start'),
    ]);
    assert.equal(await download.failure(), null);
    assert.equal(download.suggestedFilename(), 'data.bin');
    assert.match(download.url(), /[?&]session=/, 'a relative path names the shell');
    assert.deepEqual(readFileSync(await download.path()), data);

    // Enter in the field starts it too.
    await page.fill('#download-path', path.join(dir, 'name with spaces.txt'));
    [download] = await Promise.all([
      page.waitForEvent('download', { timeout: WAIT_MS }),
      page.press('#download-path', 'Enter'),
    ]);
    assert.equal(await download.failure(), null);
    assert.equal(download.suggestedFilename(), 'name with spaces.txt');
    assert.deepEqual(readFileSync(await download.path()), text);
    assert.match(await page.locator('#download-note').textContent(), /name with spaces\.txt/);

    await page.keyboard.press('Escape');
    await page.locator('#download').waitFor({ state: 'hidden', timeout: WAIT_MS });
    await exitShell(page);
    assert.deepEqual(problems, []);
  } catch (err) {
    throw await explain(page, err, 'downloads');
  } finally {
    await context.close();
  }
});

test('a viewer has no upload button, a drop does nothing, and the server refuses an upload', { timeout: 120_000 }, async () => {
  const dir = freshDir();
  const hash = execFileSync(CONCH_BIN, ['passwd'], { input: 'viewer-pw\n' }).toString().trim();
  const users = path.join(dir, 'users.toml');
  writeFileSync(users, `[[users]]\nname = "vera"\npassword_hash = "${hash}"\nrole = "viewer"\n`);
  const server = await startServer({ users: true, args: ['--users-file', users] });
  const context = await shared.browser.newContext({ viewport: { width: 1200, height: 720 } });
  try {
    const page = await context.newPage();
    await page.goto(server.origin + '/login');
    await page.fill('#username', 'vera');
    await page.fill('#password', 'viewer-pw');
    await page.click('#login-submit');
    await page.waitForURL((url) => url.pathname === '/', { timeout: WAIT_MS });
    await page.locator('#status[data-state="connected"]').waitFor({ timeout: WAIT_MS });
    assert.equal(await page.locator('body').getAttribute('data-role'), 'viewer');

    assert.equal(await page.locator('#upload-toggle').isVisible(), false);
    assert.equal(await page.locator('#download-toggle').isVisible(), false);

    const transfer = await page.evaluateHandle(() => {
      const dt = new DataTransfer();
      dt.items.add(new File(['x'], 'viewer.txt'));
      return dt;
    });
    await page.dispatchEvent('#terminal', 'dragenter', { dataTransfer: transfer });
    await page.locator('#drop-hint').waitFor({ state: 'visible', timeout: WAIT_MS });
    assert.match(await page.locator('#drop-hint').textContent(), /[Vv]iewers cannot upload/);
    await page.dispatchEvent('#terminal', 'drop', { dataTransfer: transfer });
    await page.locator('#drop-hint').waitFor({ state: 'hidden', timeout: WAIT_MS });
    assert.equal(await page.locator('#transfers .transfer').count(), 0);

    // Asked all the same (the page's own request: its cookie, its Origin).
    const answer = await page.evaluate(async (where) => {
      const r = await fetch('/api/v1/files?path=' + encodeURIComponent(where) + '&name=viewer.txt', {
        method: 'PUT',
        headers: { 'Content-Type': 'application/octet-stream' },
        body: 'x',
      });
      return { status: r.status, type: r.headers.get('content-type'), body: await r.text() };
    }, dir);
    assert.equal(answer.status, 403, answer.body);
    assert.match(answer.type, /application\/problem\+json/);
    assert.ok(JSON.parse(answer.body).detail, answer.body);
    assert.equal(existsSync(path.join(dir, 'viewer.txt')), false);
  } finally {
    await context.close();
    await stopServer(server.child);
  }
});
