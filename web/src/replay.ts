// conch — the replay page: one session recording (asciicast v2, fetched
// from /api/v1/recordings/{id}) played back in an xterm.js terminal at its
// recorded size, with play/pause, speed, a seek slider and a download link.
// Reading the file and playing it are in cast.ts; this is the page's wiring.
//
// Loaded with `defer` after xterm.js; no inline script anywhere (the page
// runs under the console's strict Content-Security-Policy). The page's
// state is in body[data-replay] (loading, ready, playing, paused, ended,
// error), for the eye of the end-to-end tests; nothing else is global.

import { FULL_RESET } from './ansi';
import {
  CastError, formatClock, MAX_COLS, MAX_IDLE_S, MAX_ROWS, needsCrlf, parseCast, Player, SPEEDS,
  type Cast, type MarkerEvent, type PlayerScreen, type PlayState,
} from './cast';
import { problemText } from './files';
import { isRecordingId, loginUrl, recordingUrl } from './site';
import { formatDuration, visible } from './text';
import { TERMINAL_FONT, TERMINAL_THEME } from './theme';
import type { Terminal } from './xterm';

type PageState = 'loading' | 'ready' | PlayState | 'error';

function byId<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`conch: the page has no #${id}`);
  return found as T;
}

/** "marker at 12.3 s: output cut here" (the server's words, hidden characters shown, cut short). */
function markerText(m: MarkerEvent): string {
  const label = visible(m.label);
  return `marker at ${m.t.toFixed(1)} s: ` + (label.length > 300 ? label.slice(0, 299) + '…' : label);
}

function main(): void {
  const el = {
    title: byId<HTMLElement>('replay-title'),
    meta: byId<HTMLElement>('replay-meta'),
    error: byId<HTMLElement>('replay-error'),
    note: byId<HTMLElement>('replay-note'),
    play: byId<HTMLButtonElement>('replay-play'),
    speed: byId<HTMLSelectElement>('replay-speed'),
    seek: byId<HTMLInputElement>('replay-seek'),
    time: byId<HTMLElement>('replay-time'),
    download: byId<HTMLAnchorElement>('replay-download'),
    screen: byId<HTMLElement>('replay-screen'),
  };
  const id = document.body.dataset['recording'] ?? '';

  const setState = (s: PageState): void => {
    document.body.dataset['replay'] = s;
  };

  function fail(text: string): void {
    el.error.textContent = text;
    el.error.hidden = false;
    for (const c of [el.play, el.speed, el.seek]) c.disabled = true;
    setState('error');
  }

  // The speeds come from cast.ts, so the page and the player agree; 1× first chosen.
  el.speed.textContent = '';
  for (const s of SPEEDS) {
    const option = document.createElement('option');
    option.value = String(s);
    option.textContent = s + '×';
    option.selected = s === 1;
    el.speed.appendChild(option);
  }
  el.speed.title = `Playing speed. Pauses longer than ${MAX_IDLE_S} s are shortened to ${MAX_IDLE_S} s; ` +
    'the slider keeps the recorded times.';

  if (!isRecordingId(id)) {
    fail('no such recording');
    return;
  }
  el.download.href = recordingUrl(id, true);
  setState('loading');

  fetch(recordingUrl(id), { credentials: 'same-origin', cache: 'no-store' })
    .then(async (res) => {
      if (res.status === 401) {
        location.href = loginUrl('/recordings/' + id);
        return;
      }
      if (res.status === 404) {
        fail('no such recording');
        return;
      }
      const body = await res.text();
      if (!res.ok) {
        fail('cannot load the recording: ' + problemText(res.status, body));
        return;
      }
      let cast: Cast;
      try {
        cast = parseCast(body);
      } catch (e) {
        fail(e instanceof CastError ? e.message : 'cannot read the recording');
        return;
      }
      start(cast);
    })
    .catch(() => fail('cannot load the recording: no answer from the server'));

  /** What the note says: lasting notes (lines skipped, ...), then the last marker passed. */
  const notes: string[] = [];
  let markerNote = '';
  function drawNote(): void {
    const lines = markerNote ? [...notes, markerNote] : notes;
    el.note.replaceChildren();
    lines.forEach((line, i) => {
      if (i > 0) el.note.appendChild(document.createElement('br'));
      el.note.appendChild(document.createTextNode(line));
    });
    el.note.hidden = lines.length === 0;
  }
  function addNote(text: string): void {
    if (!notes.includes(text)) notes.push(text);
    drawNote();
  }

  function start(cast: Cast): void {
    const { header } = cast;
    // The title is the user's command line, as typed: hostile text as far
    // as this page knows, shown with its hidden characters as escapes.
    const title = header.title ? visible(header.title) : 'recording ' + id;
    el.title.textContent = title;
    document.title = (title.length > 100 ? title.slice(0, 99) + '…' : title) + ' · conch';
    const meta: string[] = [];
    if (header.timestamp !== null) meta.push('started ' + new Date(header.timestamp * 1000).toLocaleString());
    meta.push(cast.duration > 0 ? formatDuration(cast.duration * 1000) : 'no time');
    meta.push(`${header.width}×${header.height}`);
    el.meta.textContent = meta.join(' · ');
    if (cast.skipped > 0) {
      addNote(cast.skipped === 1
        ? '1 line of this recording could not be read and was skipped.'
        : `${cast.skipped} lines of this recording could not be read and were skipped.`);
    }
    if (cast.clamped) {
      addNote(`The recorded terminal was larger than ${MAX_COLS}×${MAX_ROWS}: it is shown at most that size, ` +
        'so some lines may wrap or be drawn out of place.');
    }

    const term: Terminal = new window.Terminal({
      cols: header.width,
      rows: header.height,
      convertEol: needsCrlf(cast.events),
      disableStdin: true,
      cursorBlink: false,
      scrollback: 5000,
      fontFamily: TERMINAL_FONT,
      fontSize: 14,
      theme: TERMINAL_THEME,
    });
    term.open(el.screen);

    // Everything goes through xterm's write queue, resets and resizes too:
    // a resize made at once would apply before output still queued, and
    // that output would then be drawn at the wrong size.
    const sizeTo = (cols: number, rows: number): void => {
      if (term.cols !== cols || term.rows !== rows) term.resize(cols, rows);
    };
    const guarded = (data: string, then?: () => void): void => {
      try {
        term.write(data, then);
      } catch {
        // xterm refuses more than ~50 MB queued at once.
        addNote('The recording is too large to draw at once: part of it is not shown.');
      }
    };
    const screen: PlayerScreen = {
      reset: () => guarded(FULL_RESET, () => sizeTo(header.width, header.height)),
      write: (text) => guarded(text),
      resize: (cols, rows) => guarded('', () => sizeTo(cols, rows)),
    };
    const clock = {
      now: () => performance.now(),
      setTimeout: (fn: () => void, ms: number) => window.setTimeout(fn, ms),
      clearTimeout: (handle: number) => window.clearTimeout(handle),
    };
    const player = new Player(cast, screen, clock, (s) => {
      setState(s);
      draw();
    });

    // The slider reaches the very end, whatever the step (0.1 s).
    el.seek.max = String(Math.ceil(cast.duration * 10) / 10);
    el.seek.step = '0.1';
    el.seek.value = '0';
    for (const c of [el.play, el.speed, el.seek]) c.disabled = false;

    /** The slider is being dragged: its value is the user's until it is let go. */
    let scrubbing = false;
    let ticker = 0;

    function drawTime(at: number): void {
      el.time.textContent = formatClock(at) + ' / ' + formatClock(cast.duration);
    }

    /** The marker shown: the last one playing or a seek passed. */
    let shownMarker: MarkerEvent | null = null;

    function draw(): void {
      const marker = player.marker;
      if (marker !== shownMarker) {
        shownMarker = marker;
        markerNote = marker === null ? '' : markerText(marker);
        drawNote();
      }
      const playing = player.state === 'playing';
      el.play.textContent = playing ? 'Pause' : 'Play';
      el.play.setAttribute('aria-label', playing ? 'Pause' : player.state === 'ended' ? 'Play again from the start' : 'Play');
      const at = player.position;
      if (!scrubbing) el.seek.value = String(at);
      drawTime(scrubbing ? Number(el.seek.value) : at);
      // The position moves while playing: redrawn a few times a second.
      if (playing && !ticker) ticker = window.setInterval(draw, 200);
      if (!playing && ticker) {
        window.clearInterval(ticker);
        ticker = 0;
      }
    }

    el.play.addEventListener('click', () => player.toggle());
    el.speed.addEventListener('change', () => player.setSpeed(Number(el.speed.value)));
    // Dragging only moves the time shown; letting go seeks. A seek
    // backwards redraws everything up to its target, too much to do for
    // every step of a drag.
    el.seek.addEventListener('input', () => {
      scrubbing = true;
      drawTime(Number(el.seek.value));
    });
    el.seek.addEventListener('change', () => {
      scrubbing = false;
      player.seek(Number(el.seek.value));
      setState(player.state); // "ready" no more, even when the state did not change
      draw();
    });
    // Space plays and pauses, as in any player, unless the key is another
    // control's (a button's click, a list's opening) or the terminal has
    // the focus.
    document.addEventListener('keydown', (ev) => {
      if (ev.key !== ' ' || ev.ctrlKey || ev.altKey || ev.metaKey) return;
      const t = ev.target instanceof Element ? ev.target : null;
      if (t && (t.closest('#replay-screen') || t.closest('button, select, textarea, a, summary') ||
        (t instanceof HTMLInputElement && t.type !== 'range'))) return;
      ev.preventDefault();
      player.toggle();
    });

    setState('ready');
    draw();
  }
}

main();
