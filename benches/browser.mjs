// Output drawn in the browser: `seq 1 N` typed into a shell on conch's
// console page and on ttyd's page (both draw with xterm.js), in one headless
// Chromium, alternating, a fresh page and shell each round. Run by
// `cargo bench --bench conch` (full runs), which starts both servers:
//
//   node benches/browser.mjs CONCH_LOGIN_URL TTYD_URL [LINES] [ROUNDS]
//
// Prints one JSON line: the seconds from Enter to the last line drawn, per
// round and page, and the bytes the terminal received. Every wait is
// bounded (ROUND_LIMIT_MS); a page that does not finish is reported as such.

import { chromium } from 'playwright-core';

const [conchLogin, ttydUrl, linesArg, roundsArg] = process.argv.slice(2);
if (!conchLogin || !ttydUrl) {
  console.error('usage: node benches/browser.mjs CONCH_LOGIN_URL TTYD_URL [LINES] [ROUNDS]');
  process.exit(2);
}
const LINES = Number(linesArg || 2_000_000);
const ROUNDS = Number(roundsArg || 3);
const ROUND_LIMIT_MS = 180_000;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// What a terminal receives from `seq 1 N`: each number and "\r\n" (the
// terminal's output processing adds the carriage return).
function seqBytes(n) {
  let bytes = 0;
  for (let digits = 1, low = 1; low <= n; digits++, low *= 10) {
    const high = Math.min(n, low * 10 - 1);
    bytes += (high - low + 1) * (digits + 2);
  }
  return bytes;
}

// True when the terminal shows a row equal to `want` (or, with `prompt`, a
// row ending in a shell prompt). Runs in the page, self-contained (the page's
// CSP allows no evaluated strings): it reads xterm.js's buffer where the page
// exposes its terminal (ttyd's `window.term`), else the DOM renderer's rows
// (conch's page).
function shows({ want, prompt }) {
  let rows;
  const term = window.term;
  if (term && term.buffer) {
    const buf = term.buffer.active;
    rows = [];
    for (let i = 0; i < term.rows; i++) {
      const line = buf.getLine(buf.viewportY + i);
      rows.push(line ? line.translateToString(true) : '');
    }
  } else {
    rows = Array.from(
      document.querySelectorAll('.xterm-rows > div'),
      (row) => row.textContent.replace(/\u00a0/g, ' ').replace(/\s+$/, ''),
    );
  }
  return rows.some((row) => (prompt ? /[$#] ?$/.test(row) : row === want));
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless=new', '--no-sandbox', '--no-first-run', '--disable-background-networking'],
});

async function round(which) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 720 } });
  try {
    const page = await context.newPage();
    if (which === 'conch') {
      await page.goto(conchLogin);
      await page.waitForURL((url) => url.pathname === '/', { timeout: ROUND_LIMIT_MS });
      await page.locator('#status[data-state="connected"]').waitFor({ timeout: ROUND_LIMIT_MS });
      await page.click('#mode-shell');
    } else {
      await page.goto(ttydUrl);
    }
    await page.waitForFunction(shows, { prompt: true }, { timeout: ROUND_LIMIT_MS, polling: 100 });
    await page.keyboard.type(`seq 1 ${LINES}`);
    const start = performance.now();
    await page.keyboard.press('Enter');
    await page.waitForFunction(shows, { want: String(LINES) }, { timeout: ROUND_LIMIT_MS, polling: 'raf' });
    return (performance.now() - start) / 1000;
  } catch (err) {
    return { failed: String(err.message).split('\n')[0] };
  } finally {
    await context.close().catch(() => {});
  }
}

const result = { lines: LINES, bytes: seqBytes(LINES), conch: [], ttyd: [] };
try {
  for (let i = 0; i < ROUNDS; i++) {
    for (const which of i % 2 ? ['ttyd', 'conch'] : ['conch', 'ttyd']) {
      result[which].push(await round(which));
    }
  }
} finally {
  await browser.close().catch(() => {});
}
console.log(JSON.stringify(result));
