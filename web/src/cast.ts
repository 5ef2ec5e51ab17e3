// Session recordings in the asciicast v2 format, read and played back
// without the DOM: the replay page (replay.ts) wires the Player to xterm.js,
// its buttons and the browser's timers; the unit tests to fakes.
//
// A recording is a header line (a JSON object: version, width, height,
// timestamp, title) and then one JSON array per line, [seconds, code,
// data]: "o" output, "r" a resize ("COLSxROWS"), "i" input, "m" a marker.
// The server writes it while the session runs, so a recording cut short
// (a crash, the size cap) may end with half a line: such lines are skipped
// and counted, never a reason to show nothing.

/** What the header line says. */
export interface CastHeader {
  /** The terminal's size when the recording began. */
  width: number;
  height: number;
  /** When it began, in seconds since the Unix epoch; null when not said. */
  timestamp: number | null;
  title: string;
}

/** One event the player acts on (input is not: the terminal echoed it). */
export type CastEvent =
  | { t: number; code: 'o'; text: string }
  | { t: number; code: 'r'; cols: number; rows: number }
  | { t: number; code: 'm'; label: string };

/** A marker: a point in the recording the recorder named. */
export type MarkerEvent = Extract<CastEvent, { code: 'm' }>;

export interface Cast {
  header: CastHeader;
  /** In time order; `t` in seconds from the start. */
  events: CastEvent[];
  /** Lines that could not be read, skipped. */
  skipped: number;
  /** Seconds from the start to the last event. */
  duration: number;
  /** The terminal was larger than MAX_COLS×MAX_ROWS at some point: it is shown at most that large. */
  clamped: boolean;
}

/** The file is no asciicast v2 recording at all (its header is not one). */
export class CastError extends Error {}

/**
 * The largest terminal a recording is shown at. xterm.js allocates every
 * cell of it, and the file is not trusted more than any other input; a
 * larger size (a PTY opened 5000 columns wide, on purpose or not) is shown
 * at this one rather than not at all.
 */
export const MAX_COLS = 1000;
export const MAX_ROWS = 500;

/** The size a header without a usable one is shown at. */
export const DEFAULT_COLS = 80;
export const DEFAULT_ROWS = 24;

/** A side of a terminal: a whole number from 1 up, or null. */
function side(v: unknown): number | null {
  return typeof v === 'number' && Number.isInteger(v) && v >= 1 ? v : null;
}

/** What a header says, and whether its size had to be cut down to the limits. */
function parseHeader(line: string): { header: CastHeader; clamped: boolean } {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    throw new CastError('not a recording: its first line is not JSON');
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) {
    throw new CastError('not a recording: its first line is no header');
  }
  const h = value as Record<string, unknown>;
  if (h['version'] !== 2) throw new CastError('not an asciicast version 2 recording');
  // A size that is no size (absent, zero, a fraction, a string) is the
  // usual terminal's; one too large is cut down to the limits. Neither is
  // a reason to show nothing.
  const cols = side(h['width']) ?? DEFAULT_COLS;
  const rows = side(h['height']) ?? DEFAULT_ROWS;
  const ts = h['timestamp'];
  return {
    header: {
      width: Math.min(cols, MAX_COLS),
      height: Math.min(rows, MAX_ROWS),
      timestamp: typeof ts === 'number' && Number.isFinite(ts) && ts >= 0 ? ts : null,
      title: typeof h['title'] === 'string' ? h['title'] : '',
    },
    clamped: cols > MAX_COLS || rows > MAX_ROWS,
  };
}

/**
 * One event line, or null when it is not one. Input ("i") and codes this
 * page does not know (the format allows more) are read but not kept:
 * `undefined`, unlike null, is no error.
 */
function parseEvent(line: string): CastEvent | null | undefined {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return null;
  }
  if (!Array.isArray(value) || value.length < 3) return null;
  const [t, code, data] = value as unknown[];
  if (typeof t !== 'number' || !Number.isFinite(t) || t < 0) return null;
  if (typeof code !== 'string' || typeof data !== 'string') return null;
  switch (code) {
    case 'o': return { t, code, text: data };
    case 'm': return { t, code, label: data };
    case 'r': {
      // As recorded here; parseCast cuts it down to the limits. No size
      // at all (0 columns) is no event.
      const m = /^(\d+)x(\d+)$/.exec(data);
      if (!m) return null;
      const cols = side(Number(m[1]));
      const rows = side(Number(m[2]));
      return cols === null || rows === null ? null : { t, code, cols, rows };
    }
    default: return undefined;
  }
}

/**
 * Reads a recording. Throws CastError when the header is not one; any
 * other line that cannot be read is skipped and counted. Sizes past the
 * limits are cut down to them. Times that go backwards (clocks do) are
 * taken as the time before them, so that the events stay in order and
 * seeking can search them.
 */
export function parseCast(text: string): Cast {
  const lines = text.split('\n');
  let i = 0;
  while (i < lines.length && lines[i]!.trim() === '') i += 1;
  if (i >= lines.length) throw new CastError('the recording is empty');
  const { header, clamped: headerClamped } = parseHeader(lines[i]!.trim());
  let clamped = headerClamped;
  const events: CastEvent[] = [];
  let skipped = 0;
  let last = 0;
  for (i += 1; i < lines.length; i += 1) {
    const line = lines[i]!.trim();
    if (line === '') continue;
    const event = parseEvent(line);
    if (event === null) {
      skipped += 1;
      continue;
    }
    if (event === undefined) continue;
    if (event.code === 'r' && (event.cols > MAX_COLS || event.rows > MAX_ROWS)) {
      event.cols = Math.min(event.cols, MAX_COLS);
      event.rows = Math.min(event.rows, MAX_ROWS);
      clamped = true;
    }
    if (event.t < last) event.t = last;
    last = event.t;
    events.push(event);
  }
  return { header, events, skipped, duration: last, clamped };
}

/**
 * Whether the output needs '\n' taken as "\r\n": a command that ran
 * without a terminal writes bare newlines (the console shows them with
 * xterm's convertEol), while anything through a PTY writes "\r\n" and may
 * use a bare '\n' to move the cursor down, which convertEol would break.
 * Output with a carriage return anywhere came through a PTY.
 */
export function needsCrlf(events: readonly CastEvent[]): boolean {
  let newline = false;
  for (const e of events) {
    if (e.code !== 'o') continue;
    if (e.text.includes('\r')) return false;
    if (e.text.includes('\n')) newline = true;
  }
  return newline;
}

// ------------------------------------------------------------ seeking

/** How many events happen at or before `t`: the index of the first one after it. */
export function indexAt(events: readonly CastEvent[], t: number): number {
  let lo = 0;
  let hi = events.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (events[mid]!.t <= t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** What the screen is told: output (joined), or a new size. */
export type Step = { write: string } | { resize: { cols: number; rows: number } };

/**
 * The steps that play events `from` up to (not including) `to`: output
 * between two resizes joined into one write, since the terminal parses one
 * long string faster than many short ones.
 */
export function stepsOf(events: readonly CastEvent[], from: number, to: number): Step[] {
  const steps: Step[] = [];
  let text: string[] = [];
  const flush = (): void => {
    if (text.length > 0) steps.push({ write: text.join('') });
    text = [];
  };
  for (let i = from; i < to && i < events.length; i += 1) {
    const e = events[i]!;
    if (e.code === 'o') {
      text.push(e.text);
    } else if (e.code === 'r') {
      flush();
      steps.push({ resize: { cols: e.cols, rows: e.rows } });
    }
  }
  flush();
  return steps;
}

/** What a seek does: reset the screen first or not, the steps, and the next event after it. */
export interface SeekPlan {
  reset: boolean;
  steps: Step[];
  at: number;
}

/**
 * Going from "events before `at` are on the screen" to time `t`. Forward,
 * only the events in between are written. Backward, a terminal cannot undo
 * output: it is reset and everything up to `t` written at once.
 */
export function planSeek(events: readonly CastEvent[], at: number, t: number): SeekPlan {
  const target = indexAt(events, t);
  if (target >= at) return { reset: false, steps: stepsOf(events, at, target), at: target };
  return { reset: true, steps: stepsOf(events, 0, target), at: target };
}

// ------------------------------------------------------------ playing

/** Where the player draws. */
export interface PlayerScreen {
  /** Back to the start: cleared, at the recording's first size. */
  reset(): void;
  write(text: string): void;
  resize(cols: number, rows: number): void;
}

/** Time and timers: the browser's, or a test's. */
export interface Clock {
  /** Milliseconds, from any origin. */
  now(): number;
  setTimeout(fn: () => void, ms: number): number;
  clearTimeout(handle: number): void;
}

export type PlayState = 'paused' | 'playing' | 'ended';

/** The speeds offered, as multiples of the recorded pace. */
export const SPEEDS: readonly number[] = [0.5, 1, 2, 4, 8];

/**
 * Seconds of the recording a pause in it lasts at most when played: a
 * shell left alone for ten minutes is not watched for ten minutes. Only
 * playing skips; positions and seeking keep the recording's own times.
 */
export const MAX_IDLE_S = 2;

/**
 * Plays a recording on a screen. Playing writes what is due and sets one
 * timer for the next event, from the current position: a timer firing
 * late writes everything due by then in one go, and nothing is replayed
 * from the start except when seeking backwards.
 */
export class Player {
  private stateNow: PlayState = 'paused';
  /** The next event to write: those before it are on the screen. */
  private at = 0;
  /** The position (seconds) at `wall`; while paused, the position. */
  private pos = 0;
  /** The clock's time when `pos` was the position. */
  private wall = 0;
  private timer: number | null = null;
  private speedNow = 1;
  /** Where the markers are among the events, in order. */
  private readonly markers: number[] = [];

  constructor(
    private readonly cast: Cast,
    private readonly screen: PlayerScreen,
    private readonly clock: Clock,
    /** The state changed (not called for each event). */
    private readonly changed: (state: PlayState) => void = () => {},
  ) {
    cast.events.forEach((e, i) => {
      if (e.code === 'm') this.markers.push(i);
    });
  }

  /**
   * The last marker playing or a seek has passed: the latest among the
   * events on the screen, or null before the first. The server marks
   * where a recording reached its size cap, or where output was cut out.
   */
  get marker(): MarkerEvent | null {
    let lo = 0;
    let hi = this.markers.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.markers[mid]! < this.at) lo = mid + 1;
      else hi = mid;
    }
    const e = lo > 0 ? this.cast.events[this.markers[lo - 1]!] : undefined;
    return e && e.code === 'm' ? e : null;
  }

  get state(): PlayState {
    return this.stateNow;
  }

  get speed(): number {
    return this.speedNow;
  }

  get duration(): number {
    return this.cast.duration;
  }

  /** The position in seconds, never past the next event not yet written. */
  get position(): number {
    if (this.stateNow !== 'playing') return this.pos;
    const next = this.cast.events[this.at]?.t ?? this.cast.duration;
    const moved = this.pos + ((this.clock.now() - this.wall) / 1000) * this.speedNow;
    return Math.min(next, moved);
  }

  /** Plays from the position; after the end, from the start again. */
  play(): void {
    if (this.stateNow === 'playing') return;
    if (this.at >= this.cast.events.length) this.apply(planSeek(this.cast.events, this.at, 0), 0);
    this.stateNow = 'playing';
    this.wall = this.clock.now();
    this.changed(this.stateNow);
    this.schedule();
  }

  pause(): void {
    if (this.stateNow !== 'playing') return;
    this.pos = this.position;
    this.stop();
    this.stateNow = 'paused';
    this.changed(this.stateNow);
  }

  toggle(): void {
    if (this.stateNow === 'playing') this.pause();
    else this.play();
  }

  setSpeed(speed: number): void {
    if (!(speed > 0) || speed === this.speedNow) return;
    if (this.stateNow === 'playing') {
      this.pos = this.position;
      this.wall = this.clock.now();
      this.speedNow = speed;
      this.schedule();
    } else {
      this.speedNow = speed;
    }
  }

  /** Shows the screen as it was at `t` seconds; playing goes on from there. */
  seek(t: number): void {
    t = Math.min(Math.max(Number.isFinite(t) ? t : 0, 0), this.cast.duration);
    this.apply(planSeek(this.cast.events, this.at, t), t);
    const before = this.stateNow;
    if (this.at >= this.cast.events.length && t >= this.cast.duration) {
      this.stop();
      this.stateNow = 'ended';
    } else if (this.stateNow === 'playing') {
      this.wall = this.clock.now();
      this.schedule();
    } else {
      this.stateNow = 'paused';
    }
    if (this.stateNow !== before) this.changed(this.stateNow);
  }

  /** No more timers: the page goes. */
  dispose(): void {
    this.stop();
  }

  private apply(plan: SeekPlan, t: number): void {
    if (plan.reset) this.screen.reset();
    for (const step of plan.steps) {
      if ('write' in step) this.screen.write(step.write);
      else this.screen.resize(step.resize.cols, step.resize.rows);
    }
    this.at = plan.at;
    this.pos = t;
  }

  private stop(): void {
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
  }

  /** Sets the timer for the next event (or ends), from the position at `wall`. */
  private schedule(): void {
    this.stop();
    const next = this.cast.events[this.at];
    if (!next) {
      this.pos = this.cast.duration;
      this.stateNow = 'ended';
      this.changed(this.stateNow);
      return;
    }
    let wait = next.t - this.pos;
    if (wait > MAX_IDLE_S) {
      // The rest of a long pause is skipped: the position jumps.
      this.pos = next.t - MAX_IDLE_S;
      wait = MAX_IDLE_S;
    }
    this.timer = this.clock.setTimeout(() => this.tick(), Math.max(0, (wait / this.speedNow) * 1000));
  }

  /** The timer fired: writes every event due by now (at least the one it was set for). */
  private tick(): void {
    this.timer = null;
    const now = this.clock.now();
    const due = this.cast.events[this.at]?.t ?? this.cast.duration;
    const reached = Math.max(due, this.pos + ((now - this.wall) / 1000) * this.speedNow);
    this.apply(planSeek(this.cast.events, this.at, reached), reached);
    this.wall = now;
    this.schedule();
  }
}

/** 75.4 -> "1:15", 3725 -> "1:02:05": a position as players show it. */
export function formatClock(seconds: number): string {
  const s = Math.max(0, Math.floor(Number.isFinite(seconds) ? seconds : 0));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}
