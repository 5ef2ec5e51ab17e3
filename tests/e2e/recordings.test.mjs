// Session recordings, end to end: a shell typed into in the console is
// recorded (its tab says so while it runs), listed on the audit page (the
// log's start record links to it too), played back on the replay page
// (play, speed, seeking back and forth), and downloadable as an asciicast
// v2 file. Same harness as console.test.mjs.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  WAIT_MS, enterShell, openConsole, run, useServerAndBrowser, waitInPage,
} from './harness.mjs';

const shared = useServerAndBrowser();

const COMMAND = 'echo rec-$((6*7))-done';

/** The replay terminal's rows, trailing blanks trimmed (xterm's DOM renderer: a <div> per row). */
function replayRows() {
  return Array.from(
    document.querySelectorAll('#replay-screen .xterm-rows > div'),
    (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
  );
}

/** Moves the replay's slider as a user letting go of it would: `'max'` for the end. */
function seekTo(value) {
  const seek = document.getElementById('replay-seek');
  seek.value = value === 'max' ? seek.max : value;
  seek.dispatchEvent(new Event('input', { bubbles: true }));
  seek.dispatchEvent(new Event('change', { bubbles: true }));
}

test('a shell is recorded, listed on the audit page, played back, sought and downloaded', { timeout: 180_000 }, async () => {
  const { context, page, problems } = await openConsole(shared.browser, shared.server);
  const origin = shared.server.origin;
  try {
    // ---- the console: the shell's tab says it is recorded, while it runs
    await enterShell(page);
    const badge = page.locator('#tabs .recording-badge');
    await badge.waitFor({ timeout: WAIT_MS });
    assert.equal((await badge.textContent()).trim(), '● REC');
    const title = await badge.getAttribute('title');
    const fromBadge = /recording ([0-9a-f]{32})/.exec(title);
    assert.ok(fromBadge, `the badge names its recording: ${title}`);
    const id = fromBadge[1];

    await run(page, COMMAND, [{ exact: 'rec-42-done' }]);
    await page.keyboard.type('exit');
    await page.keyboard.press('Enter');
    await page.locator('#mode-command[aria-pressed="true"]').waitFor({ timeout: WAIT_MS });
    await badge.waitFor({ state: 'detached', timeout: WAIT_MS });

    // ---- the audit page: the shell's start record links to its recording
    await page.goto(origin + '/audit');
    await page.locator('#audit-log tr[data-seq]').first().waitFor({ timeout: WAIT_MS });
    assert.equal(await page.locator(`#audit-log a.replay-link[data-recording="${id}"]`).count() >= 1, true,
      'a log record (the shell\'s command_start) links to the recording');

    // Recordings, newest first: the shell's, ended once the server has
    // written its end (asked again until then).
    await page.click('#tab-recordings');
    assert.equal(await page.locator('#tab-recordings').getAttribute('aria-selected'), 'true');
    const newest = async () => {
      await page.locator('#audit-recordings tr[data-id]').first().waitFor({ timeout: WAIT_MS });
      return page.evaluate(() => {
        const row = document.querySelector('#audit-recordings tr[data-kind="session"]');
        return row && { id: row.dataset.id, cells: Array.from(row.cells, (c) => c.textContent) };
      });
    };
    const deadline = Date.now() + WAIT_MS;
    let row = await newest();
    while (!row || row.cells[4] === 'live') {
      assert.ok(Date.now() < deadline, `the recording still shows as live: ${JSON.stringify(row)}`);
      // The server's writer batches: a moment, then ask again (a poll
      // with a deadline, not a sleep standing in for a condition).
      await page.waitForTimeout(250);
      await page.click('#audit-search');
      row = await newest();
    }
    assert.equal(row.id, id, 'the newest session recording is the shell\'s');
    assert.equal(row.cells[3], '(login shell)');
    const download = page.locator(`#audit-recordings tr[data-id="${id}"] a.download-link`);
    assert.equal(await download.getAttribute('href'), `/api/v1/recordings/${id}?download=1`);

    // ---- the replay page
    await page.locator(`#audit-recordings tr[data-id="${id}"] a.replay-link`).click();
    await page.waitForURL((url) => url.pathname === `/recordings/${id}`, { timeout: WAIT_MS });
    await page.locator('body[data-replay="ready"]').waitFor({ timeout: WAIT_MS });
    assert.notEqual((await page.locator('#replay-title').textContent()).trim(), '');
    assert.equal(await page.locator('#replay-error').isHidden(), true);
    assert.equal(await page.locator('#replay-download').getAttribute('href'), `/api/v1/recordings/${id}?download=1`);
    assert.match(await page.locator('#replay-time').textContent(), /^0:00 \/ \d+:\d\d$/);

    await page.click('#replay-play');
    await page.selectOption('#replay-speed', '8');
    await page.locator('body[data-replay="ended"]').waitFor({ timeout: WAIT_MS * 2 });
    // Whether the replay's screen has a row that is exactly `text` (or none, with `present` false).
    const shows = (text, present) => waitInPage(page, ({ text, present }) => {
      const rows = Array.from(
        document.querySelectorAll('#replay-screen .xterm-rows > div'),
        (r) => r.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
      );
      return rows.includes(text) === present;
    }, { text, present }, `waiting for the replay to ${present ? 'show' : 'no longer show'} ${text}`);
    await shows('rec-42-done', true);
    const time = await page.locator('#replay-time').textContent();
    const [at, total] = time.split(' / ');
    assert.equal(at, total, `the end: ${time}`);

    // Back to the start: the screen is reset (the output is not there yet);
    // to the end again: all of it is written at once.
    await page.evaluate(seekTo, '0');
    await page.locator('body[data-replay="paused"]').waitFor({ timeout: WAIT_MS });
    await shows('rec-42-done', false);
    await page.evaluate(seekTo, 'max');
    await page.locator('body[data-replay="ended"]').waitFor({ timeout: WAIT_MS });
    await shows('rec-42-done', true);
    const rows = await page.evaluate(replayRows);
    assert.ok(rows.some((r) => r.endsWith(COMMAND)), 'the command line as typed:\n' + rows.join('\n'));

    // ---- the download: asciicast v2, with the output in it
    const res = await page.request.get(`${origin}/api/v1/recordings/${id}?download=1`);
    assert.equal(res.status(), 200);
    assert.match(res.headers()['content-disposition'] || '', new RegExp(`attachment; filename="conch-${id}\\.cast"`));
    const lines = (await res.text()).split('\n').filter((l) => l.trim() !== '');
    const header = JSON.parse(lines[0]);
    assert.equal(header.version, 2);
    assert.ok(Number.isInteger(header.width) && Number.isInteger(header.height), JSON.stringify(header));
    const events = lines.slice(1).map((l) => JSON.parse(l));
    assert.ok(events.some((e) => Array.isArray(e) && e[1] === 'o'), 'output events');
    assert.ok(events.filter((e) => e[1] === 'o').map((e) => e[2]).join('').includes('rec-42-done'));

    // ---- someone else's recording, or none: "no such recording"
    await page.goto(`${origin}/recordings/${'0'.repeat(32)}`);
    await page.locator('body[data-replay="error"]').waitFor({ timeout: WAIT_MS });
    assert.equal(await page.locator('#replay-error').textContent(), 'no such recording');

    assert.deepEqual(problems, []);
  } finally {
    await context.close();
  }
});
