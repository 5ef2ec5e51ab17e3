import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  CastError, formatClock, indexAt, MAX_COLS, MAX_IDLE_S, MAX_ROWS, needsCrlf, parseCast, planSeek, Player, stepsOf,
  type Cast, type Clock, type PlayerScreen,
} from '../src/cast';

const HEADER = '{"version":2,"width":80,"height":24,"timestamp":1700000000,"title":"web-1: (login shell)","env":{"TERM":"xterm-256color"}}';

function castOf(...lines: string[]): string {
  return [HEADER, ...lines].join('\n') + '\n';
}

test('a recording is read: its header, its output, resizes and markers, in order', () => {
  const cast = parseCast(castOf(
    '[0.0, "o", "$ "]',
    '[0.5, "i", "l"]',
    '[1.25, "o", "ls\\r\\n"]',
    '[2, "r", "100x30"]',
    '[2.5, "m", "deploy"]',
    '[3.0, "o", "done\\r\\n"]',
  ));
  assert.deepEqual(cast.header, { width: 80, height: 24, timestamp: 1700000000, title: 'web-1: (login shell)' });
  assert.deepEqual(cast.events, [
    { t: 0, code: 'o', text: '$ ' },
    { t: 1.25, code: 'o', text: 'ls\r\n' },
    { t: 2, code: 'r', cols: 100, rows: 30 },
    { t: 2.5, code: 'm', label: 'deploy' },
    { t: 3, code: 'o', text: 'done\r\n' },
  ], 'input is read, not kept: the terminal echoed it');
  assert.equal(cast.skipped, 0);
  assert.equal(cast.duration, 3);
});

test('lines that cannot be read are skipped and counted; the rest plays', () => {
  const cast = parseCast(castOf(
    '[0.1, "o", "a"]',
    'not json',
    '{"an": "object"}',
    '[0.2, "o"]',
    '["0.3", "o", "b"]',
    '[-1, "o", "c"]',
    '[0.4, "o", 5]',
    '[0.5, "r", "wide"]',
    '[0.6, "r", "0x24"]',
    '[0.7, "r", "80x0"]',
    '[0.8, "x", "an extension: not kept, no error"]',
    '',
    '[0.9, "o", "d"]',
    '[1.0, "o", "half a li',
  ));
  assert.deepEqual(cast.events.map((e) => e.code === 'o' ? e.text : e.code), ['a', 'd']);
  assert.equal(cast.skipped, 10);
  assert.equal(cast.duration, 0.9);
});

test('times that go backwards are taken as the time before them; CRLF files are read', () => {
  const cast = parseCast([HEADER, '[2, "o", "a"]', '[1, "o", "b"]', '[3, "o", "c"]'].join('\r\n'));
  assert.deepEqual(cast.events.map((e) => e.t), [2, 2, 3]);
  assert.equal(cast.skipped, 0);
});

test('a file whose header is no asciicast v2 header is refused, with the reason', () => {
  assert.throws(() => parseCast(''), CastError);
  assert.throws(() => parseCast('\n\n'), /empty/);
  assert.throws(() => parseCast('<html>'), /not JSON/);
  assert.throws(() => parseCast('[0, "o", "x"]'), /no header/);
  assert.throws(() => parseCast('{"version":1,"width":80,"height":24}'), /version 2/);
  // The rest of the header is optional.
  const bare = parseCast('{"version":2,"width":80,"height":24}');
  assert.deepEqual(bare.header, { width: 80, height: 24, timestamp: null, title: '' });
  assert.deepEqual(bare.events, []);
  assert.equal(bare.duration, 0);
  assert.equal(bare.clamped, false);
});

test('a size past the limits is cut down to them, in the header and in resizes; no size is 80×24', () => {
  // A PTY opened wider than the page shows, on purpose or not: the
  // recording still plays, at the largest size there is.
  const wide = parseCast([
    `{"version":2,"width":${MAX_COLS + 1},"height":${MAX_ROWS + 1}}`,
    '[0, "o", "a"]',
    '[1, "r", "5000x30"]',
    '[2, "r", "100x99999"]',
    '[3, "r", "99999999999999999999x24"]',
    `[4, "r", "${MAX_COLS}x${MAX_ROWS}"]`,
  ].join('\n'));
  assert.deepEqual(wide.header, { width: MAX_COLS, height: MAX_ROWS, timestamp: null, title: '' });
  assert.deepEqual(wide.events.slice(1), [
    { t: 1, code: 'r', cols: MAX_COLS, rows: 30 },
    { t: 2, code: 'r', cols: 100, rows: MAX_ROWS },
    { t: 3, code: 'r', cols: MAX_COLS, rows: 24 },
    { t: 4, code: 'r', cols: MAX_COLS, rows: MAX_ROWS },
  ]);
  assert.equal(wide.skipped, 0);
  assert.equal(wide.clamped, true, 'the page says so');
  assert.equal(parseCast(castOf('[1, "r", "5000x30"]')).clamped, true, 'a resize alone');
  assert.equal(parseCast(castOf(`[1, "r", "${MAX_COLS}x${MAX_ROWS}"]`)).clamped, false, 'the limits themselves');
  // A size that is no size is the usual terminal's, each side on its own.
  const size = (width: unknown, height: unknown) => {
    const h: Record<string, unknown> = { version: 2 };
    if (width !== undefined) h['width'] = width;
    if (height !== undefined) h['height'] = height;
    const { header, clamped } = parseCast(JSON.stringify(h));
    return [header.width, header.height, clamped];
  };
  assert.deepEqual(size(undefined, undefined), [80, 24, false]);
  assert.deepEqual(size(0, 24), [80, 24, false]);
  assert.deepEqual(size(-5, -1), [80, 24, false]);
  assert.deepEqual(size(80.5, 30), [80, 30, false]);
  assert.deepEqual(size('120', null), [80, 24, false]);
  assert.deepEqual(size(120, 100000), [120, MAX_ROWS, true]);
  assert.deepEqual(size(1e300, 0), [MAX_COLS, 24, true]);
});

test('output without a terminal gets its newlines converted; a PTY\'s does not', () => {
  const events = (...texts: string[]) => parseCast(castOf(...texts.map((t, i) => JSON.stringify([i, 'o', t])))).events;
  assert.equal(needsCrlf(events('a\n', 'b\n')), true);
  assert.equal(needsCrlf(events('a\r\n', 'b\n')), false);
  assert.equal(needsCrlf(events('no newline')), false);
  assert.equal(needsCrlf([]), false);
});

// ------------------------------------------------------------ seeking

const SEEKABLE = parseCast(castOf(
  '[0, "o", "a"]',
  '[1, "o", "b"]',
  '[1, "o", "c"]',
  '[2, "r", "100x30"]',
  '[3, "o", "d"]',
  '[4, "m", "mark"]',
  '[5, "o", "e"]',
));

test('the index at a time counts the events at or before it', () => {
  const ev = SEEKABLE.events;
  assert.equal(indexAt(ev, -1), 0);
  assert.equal(indexAt(ev, 0), 1);
  assert.equal(indexAt(ev, 0.99), 1);
  assert.equal(indexAt(ev, 1), 3, 'both events at 1 s');
  assert.equal(indexAt(ev, 4.5), 6);
  assert.equal(indexAt(ev, 5), 7);
  assert.equal(indexAt(ev, 99), 7);
  assert.equal(indexAt([], 3), 0);
});

test('steps join the output between resizes; markers write nothing', () => {
  const ev = SEEKABLE.events;
  assert.deepEqual(stepsOf(ev, 0, 7), [
    { write: 'abc' }, { resize: { cols: 100, rows: 30 } }, { write: 'de' },
  ]);
  assert.deepEqual(stepsOf(ev, 1, 3), [{ write: 'bc' }]);
  assert.deepEqual(stepsOf(ev, 5, 6), [], 'a marker alone');
  assert.deepEqual(stepsOf(ev, 3, 3), []);
  assert.deepEqual(stepsOf(ev, 6, 99), [{ write: 'e' }], 'never past the end');
});

test('seeking forward writes only the events in between', () => {
  const ev = SEEKABLE.events;
  assert.deepEqual(planSeek(ev, 0, 1.5), { reset: false, steps: [{ write: 'abc' }], at: 3 });
  assert.deepEqual(planSeek(ev, 3, 3), {
    reset: false, steps: [{ resize: { cols: 100, rows: 30 } }, { write: 'd' }], at: 5,
  });
  assert.deepEqual(planSeek(ev, 5, 99), { reset: false, steps: [{ write: 'e' }], at: 7 });
  // Within a pause: nothing to do, no reset.
  assert.deepEqual(planSeek(ev, 5, 3.5), { reset: false, steps: [], at: 5 });
});

test('seeking backwards resets and writes everything up to the target at once', () => {
  const ev = SEEKABLE.events;
  assert.deepEqual(planSeek(ev, 7, 3.2), {
    reset: true, steps: [{ write: 'abc' }, { resize: { cols: 100, rows: 30 } }, { write: 'd' }], at: 5,
  });
  assert.deepEqual(planSeek(ev, 7, 0.5), { reset: true, steps: [{ write: 'a' }], at: 1 });
  assert.deepEqual(planSeek(ev, 3, -1), { reset: true, steps: [], at: 0 }, 'before the first event: a blank screen');
});

// ------------------------------------------------------------ playing

/** Timers run only when the test moves the time on. */
class FakeClock implements Clock {
  t = 0;
  private timers = new Map<number, { at: number; fn: () => void }>();
  private next = 1;
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): number {
    const id = this.next++;
    this.timers.set(id, { at: this.t + ms, fn });
    return id;
  }
  clearTimeout(id: number): void {
    this.timers.delete(id);
  }
  get pending(): number {
    return this.timers.size;
  }
  /** Moves on by `ms`, firing each timer due on the way, in order. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      let first: [number, { at: number; fn: () => void }] | null = null;
      for (const entry of this.timers) if (!first || entry[1].at < first[1].at) first = entry;
      if (!first || first[1].at > end) break;
      this.timers.delete(first[0]);
      this.t = Math.max(this.t, first[1].at);
      first[1].fn();
    }
    this.t = end;
  }
}

/** Records what the player draws; `text` is the screen since the last reset. */
class FakeScreen implements PlayerScreen {
  log: string[] = [];
  text = '';
  reset(): void {
    this.log.push('reset');
    this.text = '';
  }
  write(text: string): void {
    this.log.push('write ' + text);
    this.text += text;
  }
  resize(cols: number, rows: number): void {
    this.log.push(`resize ${cols}x${rows}`);
  }
}

function setup(cast: Cast = SEEKABLE) {
  const clock = new FakeClock();
  const screen = new FakeScreen();
  const states: string[] = [];
  const player = new Player(cast, screen, clock, (s) => states.push(s));
  return { clock, screen, states, player };
}

test('playing writes each event when it is due, and ends', () => {
  const { clock, screen, states, player } = setup();
  assert.equal(player.state, 'paused');
  player.play();
  assert.equal(screen.text, '', 'nothing before the first timer');
  clock.advance(0);
  assert.equal(screen.text, 'a');
  clock.advance(999);
  assert.equal(screen.text, 'a');
  assert.ok(Math.abs(player.position - 0.999) < 1e-9);
  clock.advance(1);
  assert.equal(screen.text, 'abc', 'two events at one time: one write');
  assert.deepEqual(screen.log, ['write a', 'write bc']);
  clock.advance(1000);
  assert.deepEqual(screen.log.slice(-1), ['resize 100x30']);
  clock.advance(3000);
  assert.equal(screen.text, 'abcde');
  assert.equal(player.state, 'ended');
  assert.equal(player.position, 5);
  assert.deepEqual(states, ['playing', 'ended']);
  assert.equal(clock.pending, 0, 'no timer left');
});

test('a late timer writes everything due by then in one go', () => {
  const { clock, screen, player } = setup();
  player.play();
  clock.t = 3500; // the page was busy: the first timer fires this late
  clock.advance(0);
  assert.deepEqual(screen.log, ['write abc', 'resize 100x30', 'write d']);
  assert.ok(Math.abs(player.position - 3.5) < 1e-9);
});

test('pause holds the position; play goes on from it; speed scales the waits', () => {
  const { clock, screen, player } = setup();
  player.play();
  clock.advance(500);
  player.pause();
  assert.equal(player.state, 'paused');
  assert.equal(player.position, 0.5);
  clock.advance(10_000);
  assert.equal(screen.text, 'a', 'nothing while paused');
  assert.equal(player.position, 0.5);
  player.setSpeed(4);
  player.play();
  clock.advance(124);
  assert.equal(screen.text, 'a');
  clock.advance(1);
  assert.equal(screen.text, 'abc', '0.5 s of the recording in 125 ms at 4×');
  // A new speed while playing takes effect from the position.
  player.setSpeed(0.5);
  clock.advance(1999);
  assert.equal(screen.log.includes('resize 100x30'), false);
  clock.advance(1);
  assert.equal(screen.log.includes('resize 100x30'), true, '1 s of the recording in 2 s at 0.5×');
});

test('a long pause in the recording plays as the longest idle time; positions stay true', () => {
  const cast = parseCast(castOf('[0, "o", "a"]', '[600, "o", "b"]', '[601, "o", "c"]'));
  const { clock, screen, player } = setup(cast);
  player.play();
  clock.advance(0);
  assert.equal(player.position, 600 - MAX_IDLE_S, 'all but the last 2 s of the pause skipped');
  clock.advance(MAX_IDLE_S * 1000 - 1);
  assert.equal(screen.text, 'a');
  // The pause's start is skipped at once: the position jumps to 2 s before its end.
  assert.ok(player.position > 599.99 && player.position < 600, 'the skipped part counts: ' + player.position);
  clock.advance(1);
  assert.equal(screen.text, 'ab');
  assert.equal(player.position, 600);
  clock.advance(1000);
  assert.equal(screen.text, 'abc');
  assert.equal(player.state, 'ended');
  assert.equal(player.duration, 601);
});

test('seeking: back resets and redraws, forward writes what is between, both while playing or not', () => {
  const { clock, screen, states, player } = setup();
  player.seek(3.5);
  assert.deepEqual(screen.log, ['write abc', 'resize 100x30', 'write d']);
  assert.equal(player.state, 'paused');
  assert.equal(player.position, 3.5);
  screen.log = [];
  player.seek(0.5);
  assert.deepEqual(screen.log, ['reset', 'write a']);
  assert.equal(screen.text, 'a');
  screen.log = [];
  player.seek(1);
  assert.deepEqual(screen.log, ['write bc'], 'forward: no reset');
  // Playing goes on from a seek.
  player.play();
  player.seek(2.5);
  assert.equal(player.state, 'playing');
  clock.advance(499);
  assert.equal(screen.text, 'abc');
  clock.advance(1);
  assert.equal(screen.text, 'abcd');
  // Seeking to the end ends; play starts again from the start.
  player.seek(99);
  assert.equal(player.state, 'ended');
  assert.equal(screen.text, 'abcde');
  assert.equal(player.position, 5);
  assert.equal(clock.pending, 0);
  screen.log = [];
  player.play();
  assert.deepEqual(screen.log, ['reset', 'write a'], 'from 0: the events at 0 at once');
  assert.equal(player.position, 0);
  assert.equal(player.state, 'playing');
  // Back from the end while paused: paused, not ended.
  player.seek(5);
  player.seek(2);
  assert.equal(player.state, 'paused');
  assert.deepEqual(states, ['playing', 'ended', 'playing', 'ended', 'paused']);
});

test('the marker shown is the last one playing or a seek passed', () => {
  const cast = parseCast(castOf(
    '[0, "o", "a"]',
    '[1, "m", "first"]',
    '[2, "o", "b"]',
    '[3, "m", "... output cut here ..."]',
    '[4, "o", "c"]',
  ));
  const { clock, player } = setup(cast);
  // Read afresh each time (an assertion would narrow the property's type).
  const label = (): string | null => player.marker?.label ?? null;
  assert.equal(label(), null, 'none before playing');
  player.play();
  clock.advance(999);
  assert.equal(label(), null);
  clock.advance(1);
  assert.deepEqual(player.marker, { t: 1, code: 'm', label: 'first' });
  clock.advance(3000);
  assert.equal(player.state, 'ended');
  assert.equal(label(), '... output cut here ...');
  // Seeks, back and forward: the last marker at or before the position.
  player.seek(2.5);
  assert.equal(label(), 'first');
  player.seek(0.5);
  assert.equal(label(), null, 'back before every marker: none');
  player.seek(3);
  assert.equal(label(), '... output cut here ...', 'a marker at the very position is passed');
  assert.equal(setup().player.marker, null, 'SEEKABLE\'s marker is not passed at the start');
  assert.equal(setup(parseCast(HEADER)).player.marker, null, 'no events');
});

test('an empty recording ends as soon as it plays', () => {
  const { clock, screen, player } = setup(parseCast(HEADER));
  player.play();
  clock.advance(0);
  assert.equal(player.state, 'ended');
  assert.deepEqual(screen.log, []);
  player.seek(Number.NaN);
  assert.equal(player.position, 0);
});

test('positions read like a player\'s', () => {
  assert.equal(formatClock(0), '0:00');
  assert.equal(formatClock(9.9), '0:09');
  assert.equal(formatClock(75.4), '1:15');
  assert.equal(formatClock(3725), '1:02:05');
  assert.equal(formatClock(-3), '0:00');
  assert.equal(formatClock(Number.NaN), '0:00');
});
