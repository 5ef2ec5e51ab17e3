/*
 * conch — browser console.
 *
 * One xterm.js terminal, two modes:
 *   - command mode: this script edits a line locally (prompt, history, cursor)
 *     and sends each finished line to the server as an `exec`; output streams
 *     back as binary frames and ends with an exit summary.
 *   - shell mode: an interactive login shell in a PTY on the agent; every
 *     keystroke goes to it as `stdin`, the terminal size follows the window.
 *
 * Loaded with `defer` after xterm.js and the fit addon (UMD builds exposing
 * window.Terminal and window.FitAddon.FitAddon). No inline script anywhere:
 * the page runs under a strict Content-Security-Policy.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- constants

  // The server stops a command that has 256 KiB unacknowledged; acking every
  // 32 KiB (or whenever the terminal has caught up) keeps far below that
  // without sending an ack per frame.
  const ACK_BATCH = 32 * 1024;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  // History is per user: several people may share one browser, and a
  // command line can hold a secret (`export PGPASSWORD=...`). The key names
  // the user; logging out removes it. The old key was shared by everyone.
  const HISTORY_KEY = 'conch.history.v2:' + (document.body.dataset.user || '');
  const LEGACY_HISTORY_KEY = 'conch.history';
  const HISTORY_MAX = 500;
  // The server closes the socket on a browser message over 1 MiB of JSON
  // text, so a command line whose `exec` would be larger is never sent.
  const MAX_MESSAGE = 1024 * 1024;
  const AGENT_KEY = 'conch.agent';

  const STATUS_TEXT = {
    'connecting': 'connecting…',
    'connected': 'connected',
    'agent-offline': 'agent offline',
    'disconnected': 'disconnected — reconnecting…',
    'shutdown': 'server shutting down',
  };

  // SGR sequences. Only colours are ever injected around command output.
  const RESET = '\x1b[0m';
  const RED = '\x1b[31m';
  const GREEN = '\x1b[32m';
  const YELLOW = '\x1b[33m';
  const GREY = '\x1b[90m';
  const BOLD_GREEN = '\x1b[1;32m';
  const BOLD_BLUE = '\x1b[1;34m';

  // Reverse wraparound lets '\b' step back across a soft-wrapped line, so the
  // line editor can move over input longer than the terminal width.
  const REVERSE_WRAP_ON = '\x1b[?45h';
  // Undo terminal modes a full-screen program in the shell may have left on
  // (alternate screen, application cursor keys, bracketed paste, mouse
  // reporting, hidden cursor) without clearing what is on the screen.
  // ?1047l, not ?1049l: the latter also restores a saved cursor position,
  // which would put the next lines at the top of the screen.
  const SANE_MODES = '\x1b[?1047l\x1b[?1l\x1b[?2004l\x1b[?1000l\x1b[?1002l' +
    '\x1b[?1003l\x1b[?1006l\x1b[?25h' + RESET;

  // ---------------------------------------------------------------- DOM

  const el = {
    terminal: document.getElementById('terminal'),
    agent: document.getElementById('agent'),
    modeCommand: document.getElementById('mode-command'),
    modeShell: document.getElementById('mode-shell'),
    status: document.getElementById('status'),
    logoutForm: document.querySelector('form.logout-form'),
  };

  // ---------------------------------------------------------------- state

  const state = {
    role: document.body.dataset.role || 'viewer',
    ws: null,
    ready: false,          // socket open and `hello` received
    everReady: false,      // distinguishes "connecting" from "reconnecting"
    shuttingDown: false,
    backoff: BACKOFF_MIN_MS,
    reconnectTimer: 0,

    agents: [],            // [{name, connected}]
    agent: loadPref(AGENT_KEY) || '',

    mode: 'command',
    nextId: 1,
    flows: new Map(),      // id -> {consumed, pending}: bytes written but not yet acked

    // command mode
    atPrompt: false,
    promptAgent: '',       // agent name shown in the current prompt
    line: [],              // grapheme clusters of the line being edited
    pos: 0,                // cursor index into `line`
    running: null,         // {id, started, inStderr, interrupts, input, eof}
    typeahead: '',         // rest of a multi-line paste, run after the current command
    history: loadHistory(),
    histIndex: 0,
    draft: null,           // the unfinished line while walking history

    // shell mode
    shell: null,           // {id, started}

    highSurrogate: '',     // first half of a character whose second half is still to come

    atLineStart: true,     // whether the terminal cursor is (probably) at column 0
  };
  state.histIndex = state.history.length;

  // ---------------------------------------------------------------- terminal

  const term = new window.Terminal({
    convertEol: true,      // command output uses bare '\n'; switched off in shell mode
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    screenReaderMode: false,
    theme: {
      background: '#0e1116',
      foreground: '#d6dde6',
      cursor: '#5fb3f9',
      cursorAccent: '#0e1116',
      selectionBackground: '#2f4f6f',
      // The stock red and green are too dark on this background.
      red: '#ef6b6b',
      green: '#4fc27a',
      yellow: '#e5b54b',
      blue: '#5fb3f9',
      brightBlack: '#6b7685',
    },
  });
  const fitAddon = new window.FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  term.open(el.terminal);
  safeFit();
  term.write(REVERSE_WRAP_ON);
  term.focus();

  // ---------------------------------------------------------------- output helpers

  // Write text we generate ourselves (never command output) and remember
  // whether it left the cursor at the start of a line.
  function out(text, callback) {
    if (!text) return;
    state.atLineStart = text.endsWith('\n');
    term.write(text, callback);
  }

  // Text that came from the server (messages, agent names) must not be able
  // to inject terminal control sequences.
  function clean(text) {
    return String(text == null ? '' : text)
      .replace(/\r?\n/g, '\n')
      .replace(/[\x00-\x09\x0b-\x1f\x7f-\x9f]/g, '')
      .replace(/\n/g, '\r\n');
  }

  function newlineIfNeeded() {
    return state.atLineStart ? '' : '\r\n';
  }

  // Print a note on its own line without losing a half-typed command line.
  function note(text) {
    if (state.mode === 'command' && state.atPrompt) {
      out(toEndOfLine() + '\r\n' + text + '\r\n');
      redrawPromptAndLine();
    } else {
      out(newlineIfNeeded() + text + '\r\n');
    }
  }

  function safeFit() {
    try {
      fitAddon.fit();
    } catch (e) {
      // The container can be hidden or zero-sized for a moment; the next
      // resize event fits again.
    }
  }

  // ---------------------------------------------------------------- graphemes and cell widths

  const segmenter = (typeof Intl === 'object' && typeof Intl.Segmenter === 'function')
    ? new Intl.Segmenter(undefined, { granularity: 'grapheme' })
    : null;

  function graphemes(text) {
    return segmenter ? Array.from(segmenter.segment(text), (s) => s.segment) : Array.from(text);
  }

  // East Asian wide / fullwidth ranges and the common emoji blocks take two
  // terminal cells; the line editor needs the width to move the cursor back.
  const WIDE = /^(?:[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6]|[\u{1f300}-\u{1f64f}\u{1f900}-\u{1f9ff}\u{20000}-\u{3fffd}])/u;

  function width(g) {
    return WIDE.test(g) ? 2 : 1;
  }

  function cells(gs) {
    let n = 0;
    for (const g of gs) n += width(g);
    return n;
  }

  function back(n) {
    return '\b'.repeat(n);
  }

  // ---------------------------------------------------------------- whole characters and sizes

  // A lone UTF-16 surrogate (half of an emoji) cannot be encoded as UTF-8:
  // JSON.stringify writes it as an escape that strict parsers refuse, and the
  // command would never get an answer naming it. Every string sent has them
  // replaced with U+FFFD.
  const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

  function wellFormed(text) {
    return typeof text.toWellFormed === 'function' ? text.toWellFormed() : text.replace(LONE_SURROGATE, '\ufffd');
  }

  function isHighSurrogate(code) {
    return code >= 0xd800 && code <= 0xdbff;
  }

  // Input as whole characters. Some input methods deliver a character outside
  // the BMP as two events, one per surrogate; the first half waits for the
  // second, and a half that stays alone becomes U+FFFD.
  function wholeCharacters(data) {
    if (state.highSurrogate) {
      data = state.highSurrogate + data;
      state.highSurrogate = '';
    }
    if (data && isHighSurrogate(data.charCodeAt(data.length - 1))) {
      state.highSurrogate = data.slice(-1);
      data = data.slice(0, -1);
    }
    return wellFormed(data);
  }

  // Length of `text` in UTF-8, without building the bytes (it can be megabytes).
  function utf8Length(text) {
    let n = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c < 0x80) n += 1;
      else if (c < 0x800) n += 2;
      else if (isHighSurrogate(c) && i + 1 < text.length &&
        (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
        n += 4;
        i += 1;
      } else n += 3;
    }
    return n;
  }

  // 1048576 -> "1 048 576": big numbers the user has to compare at a glance.
  function groupDigits(n) {
    return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ' ');
  }

  // Size of the `exec` message that would carry `cmd` (the largest id, so
  // the answer never depends on how many commands ran before).
  function execMessageBytes(cmd) {
    return utf8Length(JSON.stringify({ type: 'exec', id: 0xffffffff, cmd, agent: state.agent }));
  }

  function tooLongText(cmd) {
    return RED + 'conch: this command line is ' + groupDigits(utf8Length(cmd)) +
      ' bytes; the console accepts at most ' + groupDigits(MAX_MESSAGE) +
      ' bytes per message — use the REST API or a file' + RESET;
  }

  // ---------------------------------------------------------------- command-mode line editor
  //
  // The cursor moves left with '\b' (which, with reverse wraparound on,
  // crosses soft line wraps) and right by re-printing characters. Everything
  // after the cursor is erased with ED ('\x1b[J'): the input line is always
  // the last thing on the screen, so that is safe and also clears wrapped rows.

  function promptString() {
    const agent = clean(state.agent).replace(/\r\n/g, ' ');
    return (agent ? BOLD_GREEN + agent + RESET + ' ' : '') + BOLD_BLUE + '$' + RESET + ' ';
  }

  function showPrompt() {
    state.line = [];
    state.pos = 0;
    state.histIndex = state.history.length;
    state.draft = null;
    state.promptAgent = state.agent;
    state.atPrompt = true;
    out(newlineIfNeeded() + promptString());
  }

  function redrawPromptAndLine() {
    state.promptAgent = state.agent;
    const tail = state.line.slice(state.pos);
    out(promptString() + state.line.join('') + back(cells(tail)));
  }

  function toEndOfLine() {
    const tail = state.line.slice(state.pos);
    state.pos = state.line.length;
    return tail.join('');
  }

  function insert(text) {
    let gs = graphemes(text);
    if (!gs.length) return;
    // A combining mark typed on its own belongs to the character before it.
    if (state.pos > 0 && /^\p{M}/u.test(gs[0])) {
      state.line[state.pos - 1] += gs[0];
      out(gs[0]);
      gs = gs.slice(1);
      if (!gs.length) {
        rewriteTail();
        return;
      }
    }
    const tail = state.line.slice(state.pos);
    // concat, not splice(pos, 0, ...gs): spreading a paste of a million
    // characters into arguments overflows the call stack.
    state.line = state.line.slice(0, state.pos).concat(gs, tail);
    state.pos += gs.length;
    out(gs.join('') + tail.join('') + back(cells(tail)));
  }

  // Re-print everything right of the cursor, erase leftovers, return the cursor.
  function rewriteTail() {
    const tail = state.line.slice(state.pos);
    out(tail.join('') + '\x1b[J' + back(cells(tail)));
  }

  function backspace() {
    if (state.pos === 0) return;
    const removed = state.line.splice(state.pos - 1, 1);
    state.pos -= 1;
    out(back(cells(removed)));
    rewriteTail();
  }

  function deleteForward() {
    if (state.pos >= state.line.length) return;
    state.line.splice(state.pos, 1);
    rewriteTail();
  }

  function moveLeft() {
    if (state.pos === 0) return;
    state.pos -= 1;
    out(back(width(state.line[state.pos])));
  }

  function moveRight() {
    if (state.pos >= state.line.length) return;
    out(state.line[state.pos]);
    state.pos += 1;
  }

  function moveHome() {
    out(back(cells(state.line.slice(0, state.pos))));
    state.pos = 0;
  }

  function moveEnd() {
    out(toEndOfLine());
  }

  function killToStart() {
    const before = state.line.slice(0, state.pos);
    state.line.splice(0, state.pos);
    state.pos = 0;
    out(back(cells(before)));
    rewriteTail();
  }

  function killToEnd() {
    state.line.length = state.pos;
    out('\x1b[J');
  }

  // Replace the whole line (history navigation); the cursor ends at its end.
  function replaceLine(text) {
    const gs = graphemes(text);
    out(back(cells(state.line.slice(0, state.pos))) + gs.join('') + '\x1b[J');
    state.line = gs;
    state.pos = gs.length;
  }

  function historyUp() {
    if (state.histIndex === 0) return;
    if (state.histIndex === state.history.length) state.draft = state.line.join('');
    state.histIndex -= 1;
    replaceLine(state.history[state.histIndex]);
  }

  function historyDown() {
    if (state.histIndex >= state.history.length) return;
    state.histIndex += 1;
    replaceLine(state.histIndex === state.history.length ? (state.draft || '') : state.history[state.histIndex]);
  }

  function clearScreen() {
    // Home + erase display; scrollback is kept, like Ctrl-L in a shell.
    out('\x1b[H\x1b[2J');
    redrawPromptAndLine();
  }

  function cancelLine() {
    out(toEndOfLine() + '^C\r\n');
    showPrompt();
  }

  function submitLine() {
    const cmd = state.line.join('');
    out(toEndOfLine() + '\r\n');
    state.atPrompt = false;
    if (cmd.trim() === '') {
      showPrompt();
      return;
    }
    if (execMessageBytes(cmd) > MAX_MESSAGE) {
      // The server would close the console on it. Normally refused when
      // typed or pasted (fitsOnLine); this is the last line of defence.
      state.typeahead = '';
      out(tooLongText(cmd) + '\r\n');
      showPrompt();
      return;
    }
    addHistory(cmd);
    runCommand(cmd);
  }

  // Whether the lines of `data` (keys or a paste) still make sendable
  // command lines once inserted; if not, say so and insert none of it, so
  // that no truncated line can run. Cheap for ordinary keys.
  function fitsOnLine(data) {
    if (data.length < 1024 && state.line.length < 1024) return true;
    const lines = data.split(/\r\n|\r|\n/);
    const current = state.line.join('');
    for (let i = 0; i < lines.length; i++) {
      const cmd = i === 0 ? current + lines[0] : lines[i];
      if (execMessageBytes(cmd) > MAX_MESSAGE) {
        state.typeahead = '';
        note(tooLongText(cmd));
        return false;
      }
    }
    return true;
  }

  // One escape sequence starting at data[i]: CSI, SS3, OSC, or ESC + one char.
  const ESCAPE = /\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)?/y;

  function handleEscape(seq) {
    const csi = /^\x1b\[([0-9;]*)([A-Za-z~])$/.exec(seq);
    const ss3 = /^\x1bO([A-Za-z])$/.exec(seq);
    const final = csi ? csi[2] : ss3 ? ss3[1] : '';
    const param = csi ? csi[1].split(';')[0] : '';
    if (final === 'A') historyUp();
    else if (final === 'B') historyDown();
    else if (final === 'C') moveRight();
    else if (final === 'D') moveLeft();
    else if (final === 'H') moveHome();
    else if (final === 'F') moveEnd();
    else if (final === '~') {
      if (param === '1' || param === '7') moveHome();
      else if (param === '4' || param === '8') moveEnd();
      else if (param === '3') deleteForward();
    }
    // Anything else (function keys, terminal replies) is ignored.
  }

  // Keyboard input in command mode. `data` is whatever xterm's onData
  // delivered: one key, an escape sequence, or a whole paste.
  function commandInput(data) {
    // Bracketed-paste markers only matter to programs that asked for them.
    data = data.replace(/\x1b\[20[01]~/g, '');
    if (!data) return;

    if (state.running) {
      // What is typed while a command runs is its standard input.
      commandStdin(data);
      return;
    }
    if (!state.atPrompt) {
      // Not connected yet / between prompts: keep the keys for the next prompt.
      state.typeahead += data;
      return;
    }
    if (!fitsOnLine(data)) return;

    let i = 0;
    let text = '';                       // printable run, inserted in one go
    const flush = () => {
      if (text) insert(text);
      text = '';
    };
    while (i < data.length) {
      if (!state.atPrompt) {
        // A line was submitted mid-chunk (a paste): the rest waits for the
        // next prompt, so each pasted line runs in turn.
        flush();
        state.typeahead = data.slice(i) + state.typeahead;
        return;
      }
      const ch = data[i];
      if (ch === '\x1b') {
        flush();
        ESCAPE.lastIndex = i;
        const m = ESCAPE.exec(data);
        const seq = m ? m[0] : ch;
        i += seq.length;
        handleEscape(seq);
        continue;
      }
      const code = ch.charCodeAt(0);
      if (code >= 0x20 && code !== 0x7f) {
        text += ch;
        i += 1;
        continue;
      }
      flush();
      i += 1;
      switch (ch) {
        case '\r':
          if (data[i] === '\n') i += 1;  // CRLF from a paste is one Enter
          submitLine();
          break;
        case '\n': submitLine(); break;
        case '\x7f':
        case '\b': backspace(); break;
        case '\x03': cancelLine(); break;
        case '\x01': moveHome(); break;      // Ctrl-A
        case '\x05': moveEnd(); break;       // Ctrl-E
        case '\x02': moveLeft(); break;      // Ctrl-B
        case '\x06': moveRight(); break;     // Ctrl-F
        case '\x04': deleteForward(); break; // Ctrl-D
        case '\x15': killToStart(); break;   // Ctrl-U
        case '\x0b': killToEnd(); break;     // Ctrl-K
        case '\x0c': clearScreen(); break;   // Ctrl-L
        case '\x10': historyUp(); break;     // Ctrl-P
        case '\x0e': historyDown(); break;   // Ctrl-N
        // A tab would move the cursor to a tab stop and break the editor's
        // cursor arithmetic; a pasted tab becomes a space.
        case '\t': text += ' '; break;
        default: break;                      // other control keys: ignored
      }
    }
    flush();
  }

  function drainTypeahead() {
    const pending = state.typeahead;
    state.typeahead = '';
    if (pending) commandInput(pending);
  }

  // ---------------------------------------------------------------- standard input of a running command
  //
  // Without this, `cat`, `read x` or an `apt` question would wait forever on
  // a stdin nothing writes to. Like a terminal's cooked mode: the line is
  // echoed and edited here (Backspace, Ctrl-U), Enter sends it with its
  // newline, Ctrl-D sends what is typed and ends the input. Programs that
  // need a real terminal belong in shell mode.

  function commandStdin(data) {
    const job = state.running;
    let text = '';
    const flush = () => {
      if (text) stdinInsert(job, text);
      text = '';
    };
    let i = 0;
    while (i < data.length && state.running === job) {
      const ch = data[i];
      if (ch === '\x1b') {
        // Arrow and function keys mean nothing to a line of input.
        flush();
        ESCAPE.lastIndex = i;
        const m = ESCAPE.exec(data);
        i += m ? m[0].length : 1;
        continue;
      }
      const code = ch.charCodeAt(0);
      i += 1;
      if ((code >= 0x20 && code !== 0x7f) || ch === '\t') {
        text += ch;
        continue;
      }
      flush();
      switch (ch) {
        case '\r':
          if (data[i] === '\n') i += 1;  // CRLF from a paste is one Enter
          stdinLine(job);
          break;
        case '\n': stdinLine(job); break;
        case '\x7f':
        case '\b': stdinBackspace(job); break;
        case '\x15': stdinKillLine(job); break;  // Ctrl-U
        case '\x04': stdinEof(job); break;       // Ctrl-D
        case '\x03': interrupt(); break;
        default: break;                          // other control keys: ignored
      }
    }
    if (state.running === job) flush();
  }

  // Echo in the terminal's colours, not in the red of the last stderr chunk.
  function echo(job, text) {
    if (job.inStderr) {
      term.write(RESET);
      job.inStderr = false;
    }
    out(text);
  }

  function stdinInsert(job, text) {
    if (job.eof) return;                 // input already ended: nobody reads it
    const gs = graphemes(text);
    for (const g of gs) job.input.push(g);
    // A tab is sent as a tab but shown as one space, so Backspace can erase it.
    echo(job, gs.join('').replace(/\t/g, ' '));
  }

  function stdinBackspace(job) {
    if (!job.input.length) return;
    const g = job.input.pop();
    echo(job, back(width(g)) + '\x1b[K');
  }

  function stdinKillLine(job) {
    if (!job.input.length) return;
    const n = cells(job.input);
    job.input = [];
    echo(job, back(n) + '\x1b[J');
  }

  function stdinLine(job) {
    if (job.eof) return;
    const line = job.input.join('') + '\n';
    job.input = [];
    echo(job, '\r\n');
    sendStdin(job.id, line, false);
  }

  function stdinEof(job) {
    if (job.eof) return;
    const rest = job.input.join('');
    job.input = [];
    job.eof = true;
    sendStdin(job.id, rest, true);
  }

  // ---------------------------------------------------------------- history

  function loadHistory() {
    try {
      // The shared history of earlier versions may hold another user's lines.
      localStorage.removeItem(LEGACY_HISTORY_KEY);
      const h = JSON.parse(localStorage.getItem(HISTORY_KEY) || '[]');
      return Array.isArray(h) ? h.filter((x) => typeof x === 'string').slice(-HISTORY_MAX) : [];
    } catch (e) {
      return [];                         // storage disabled or corrupt: memory only
    }
  }

  function addHistory(cmd) {
    if (state.history[state.history.length - 1] !== cmd) state.history.push(cmd);
    if (state.history.length > HISTORY_MAX) state.history.splice(0, state.history.length - HISTORY_MAX);
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(state.history));
    } catch (e) {
      // quota or privacy mode: history stays in memory
    }
  }

  // Logging out leaves nothing of this user's command lines in the browser.
  function forgetHistory() {
    state.history = [];
    state.histIndex = 0;
    state.draft = null;
    try {
      localStorage.removeItem(HISTORY_KEY);
      localStorage.removeItem(LEGACY_HISTORY_KEY);
    } catch (e) {
      // storage disabled: there was nothing stored
    }
  }

  function loadPref(key) {
    try {
      return localStorage.getItem(key);
    } catch (e) {
      return null;
    }
  }

  function savePref(key, value) {
    try {
      localStorage.setItem(key, value);
    } catch (e) {
      // ignore
    }
  }

  // ---------------------------------------------------------------- running commands

  function isReady() {
    return state.ready && state.ws && state.ws.readyState === WebSocket.OPEN;
  }

  function send(msg) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  function runCommand(cmd) {
    if (!isReady()) {
      out(RED + 'conch: not connected — the command was not run' + RESET + '\r\n');
      showPrompt();
      return;
    }
    const id = state.nextId++;
    state.running = { id, started: false, inStderr: false, interrupts: 0, input: [], eof: false };
    state.flows.set(id, { consumed: 0, pending: 0 });
    send({ type: 'exec', id, cmd: wellFormed(cmd), agent: state.agent });
  }

  // Ctrl-C while a command runs: the first sends SIGINT; if the command
  // ignores it, the next one kills it for good so the console never hangs.
  function interrupt() {
    const job = state.running;
    job.interrupts += 1;
    state.typeahead = '';
    job.input = [];                      // like a terminal, ^C discards the unsent line
    if (job.interrupts === 1) {
      out((job.inStderr ? RESET : '') + '^C');
      job.inStderr = false;
      send({ type: 'signal', id: job.id, signal: 'INT' });
      return;
    }
    send({ type: 'close', id: job.id });
    finishCommand(job.id, GREY + '[killed]' + RESET);
  }

  // The command has ended (exit, error, kill or lost connection): print the
  // summary after any output still queued in the terminal, then a prompt.
  function finishCommand(id, summary) {
    const job = state.running;
    if (!job || job.id !== id) return;
    state.running = null;
    state.flows.delete(id);
    out((job.inStderr ? RESET : '') + newlineIfNeeded() + summary + '\r\n');
    showPrompt();
    drainTypeahead();
  }

  function formatDuration(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return '';
    if (ms < 1000) return Math.round(ms) + ' ms';
    if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
    const min = Math.floor(ms / 60000);
    const sec = Math.round((ms % 60000) / 1000);
    return min + ' min ' + sec + ' s';
  }

  function exitSummary(msg) {
    let what = 'ended';
    let colour = GREY;
    if (msg.timed_out) {
      what = 'timed out';
      colour = YELLOW;
    } else if (msg.signal != null) {
      what = 'signal ' + clean(msg.signal);
      colour = YELLOW;
    } else if (typeof msg.code === 'number') {
      what = 'exit ' + msg.code;
      colour = msg.code === 0 ? GREEN : RED;
    }
    const d = formatDuration(msg.duration_ms);
    return colour + '[' + what + (d ? ' · ' + d : '') + ']' + RESET;
  }

  // ---------------------------------------------------------------- shell mode

  function startShell() {
    safeFit();
    const id = state.nextId++;
    state.shell = { id, started: false };
    state.flows.set(id, { consumed: 0, pending: 0 });
    send({ type: 'exec', id, pty: { cols: term.cols, rows: term.rows }, agent: state.agent });
  }

  function stopShell() {
    if (!state.shell) return;
    send({ type: 'close', id: state.shell.id });
    state.flows.delete(state.shell.id);
    state.shell = null;
  }

  // The shell is gone (exited, refused, connection lost): say so and go back
  // to command mode without clearing, so its last words stay readable.
  function shellEnded(text) {
    if (state.shell) state.flows.delete(state.shell.id);
    state.shell = null;
    out(SANE_MODES + REVERSE_WRAP_ON + newlineIfNeeded() + text + '\r\n');
    setMode('command', { clear: false });
  }

  // ---------------------------------------------------------------- modes

  function renderModeButtons() {
    const shell = state.mode === 'shell';
    el.modeCommand.classList.toggle('is-active', !shell);
    el.modeShell.classList.toggle('is-active', shell);
    el.modeCommand.setAttribute('aria-pressed', String(!shell));
    el.modeShell.setAttribute('aria-pressed', String(shell));
  }

  function setMode(mode, opts) {
    const clear = !opts || opts.clear !== false;
    if (mode === 'shell' && !isReady()) {
      note(RED + 'conch: not connected — cannot start a shell' + RESET);
      term.focus();
      return;
    }
    // Whatever runs in the old mode is closed: its output has no place in
    // the new one.
    stopShell();
    if (state.running) {
      send({ type: 'close', id: state.running.id });
      state.flows.delete(state.running.id);
      state.running = null;
    }
    state.typeahead = '';
    state.highSurrogate = '';
    state.atPrompt = false;
    state.mode = mode;
    renderModeButtons();

    const convertEol = mode === 'command';
    if (clear) {
      // RIS: clears screen and scrollback and resets every mode the previous
      // user of the screen may have set. The option flips once the reset has
      // been parsed, so output queued before it is not affected.
      term.write('\x1bc', () => { term.options.convertEol = convertEol; });
      state.atLineStart = true;
    } else {
      term.write('', () => { term.options.convertEol = convertEol; });
    }

    if (mode === 'command') {
      term.write(REVERSE_WRAP_ON);     // mode change only: cursor stays put
      showPrompt();
    } else {
      startShell();
    }
    term.focus();
  }

  // ---------------------------------------------------------------- agents and status

  function currentAgent() {
    return state.agents.find((a) => a.name === state.agent) || null;
  }

  function computeStatus() {
    if (state.shuttingDown) return 'shutdown';
    if (!state.ready) return state.everReady ? 'disconnected' : 'connecting';
    const agent = currentAgent();
    return agent && agent.connected ? 'connected' : 'agent-offline';
  }

  function renderStatus() {
    const s = computeStatus();
    if (el.status.dataset.state !== s) el.status.dataset.state = s;
    if (el.status.textContent !== STATUS_TEXT[s]) el.status.textContent = STATUS_TEXT[s];
  }

  function setAgents(list) {
    state.agents = (Array.isArray(list) ? list : [])
      .filter((a) => a && typeof a.name === 'string')
      .map((a) => ({ name: a.name, connected: !!a.connected }));

    // Keep the selection if the agent is still listed (even offline, so the
    // status can say so); otherwise prefer the remembered one, then any
    // connected agent, then the first.
    const names = state.agents.map((a) => a.name);
    let pick = state.agent;
    if (!names.includes(pick)) {
      const remembered = loadPref(AGENT_KEY);
      const connected = state.agents.find((a) => a.connected);
      pick = names.includes(remembered) ? remembered
        : connected ? connected.name
          : names[0] || '';
    }

    // A fragment, not replaceChildren(...options): no argument spreading of
    // a list whose length the server decides.
    const options = document.createDocumentFragment();
    for (const a of state.agents) {
      const opt = document.createElement('option');
      opt.value = a.name;
      opt.textContent = a.connected ? a.name : a.name + ' (offline)';
      options.appendChild(opt);
    }
    el.agent.replaceChildren(options);
    el.agent.disabled = state.agents.length === 0;
    el.agent.value = pick;
    changeAgent(pick, false);
  }

  function changeAgent(name, byUser) {
    const changed = name !== state.agent;
    state.agent = name;
    if (byUser) savePref(AGENT_KEY, name);
    renderStatus();
    if (!changed) return;
    if (state.mode === 'shell' && state.shell && byUser) {
      // A shell lives on one agent: start a fresh one on the new agent.
      setMode('shell');
    } else if (state.mode === 'command' && state.atPrompt && state.promptAgent !== name) {
      // Show the new agent in the prompt; the half-typed line is kept.
      out(toEndOfLine() + '\r\n');
      redrawPromptAndLine();
    }
  }

  // ---------------------------------------------------------------- server messages

  function onOutput(buffer) {
    if (buffer.byteLength < 5) return;
    const view = new DataView(buffer);
    const stream = view.getUint8(0);
    const id = view.getUint32(1);       // big-endian is DataView's default
    const flow = state.flows.get(id);
    if (!flow) return;                  // closed or unknown id: nobody shows it
    const bytes = new Uint8Array(buffer, 5);

    // Command mode shows stderr in red. Colour codes are only emitted when
    // the stream changes, so the output bytes themselves are untouched.
    const job = state.running && state.running.id === id ? state.running : null;
    if (job) {
      if (stream === 2 && !job.inStderr) {
        term.write(RED);
        job.inStderr = true;
      } else if (stream !== 2 && job.inStderr) {
        term.write(RESET);
        job.inStderr = false;
      }
    }
    if (bytes.length === 0) return;

    state.atLineStart = bytes[bytes.length - 1] === 0x0a;
    const n = bytes.length;
    flow.pending += 1;
    // Bytes, not a decoded string: xterm decodes UTF-8 itself and keeps a
    // character split across two frames intact.
    term.write(bytes, () => {
      flow.pending -= 1;
      flow.consumed += n;
      if (flow.consumed >= ACK_BATCH || flow.pending === 0) sendAck(id, flow);
    });
  }

  function sendAck(id, flow) {
    // A finished command needs no more acks (its flow record is gone).
    if (state.flows.get(id) !== flow || flow.consumed === 0) return;
    send({ type: 'ack', id, bytes: flow.consumed });
    flow.consumed = 0;
  }

  function onMessage(msg) {
    switch (msg.type) {
      case 'hello': onHello(msg); break;
      case 'agents': setAgents(msg.agents); break;
      case 'started':
        if (state.running && state.running.id === msg.id) state.running.started = true;
        if (state.shell && state.shell.id === msg.id) state.shell.started = true;
        break;
      case 'exit': onExit(msg); break;
      case 'error': onError(msg); break;
      case 'shutdown':
        state.shuttingDown = true;
        renderStatus();
        note(YELLOW + 'conch: ' + clean(msg.message || 'server shutting down') + RESET);
        break;
      default: break;                  // unknown types: newer server, ignore
    }
  }

  function onHello(msg) {
    const first = !state.everReady;
    state.ready = true;
    state.everReady = true;
    state.shuttingDown = false;
    state.backoff = BACKOFF_MIN_MS;
    if (typeof msg.role === 'string' && msg.role) {
      state.role = msg.role;
      document.body.dataset.role = msg.role;
      applyRole();
    }
    setAgents(msg.agents);
    renderStatus();
    if (!first) note(GREY + '[reconnected]' + RESET);
    if (state.mode === 'command' && !state.atPrompt && !state.running) {
      showPrompt();
      drainTypeahead();
    }
  }

  function onExit(msg) {
    if (state.running && state.running.id === msg.id) {
      finishCommand(msg.id, exitSummary(msg));
    } else if (state.shell && state.shell.id === msg.id) {
      shellEnded(GREY + 'shell ended ' + exitSummary(msg) + GREY + ' — back in command mode' + RESET);
    } else {
      state.flows.delete(msg.id);
    }
  }

  function onError(msg) {
    const text = RED + 'conch: ' + clean(msg.message || msg.code || 'error') + RESET;
    // `final: false`: the command goes on (its exit still comes); only say so.
    if (msg.final === false) {
      note(text);
      return;
    }
    if (msg.id != null && state.running && state.running.id === msg.id) {
      state.typeahead = '';            // the rest of a paste would likely fail the same way
      finishCommand(msg.id, text);
    } else if (msg.id != null && state.shell && state.shell.id === msg.id) {
      shellEnded(text);
    } else if (msg.id == null && msg.code === 'bad_request' && state.running && !state.running.started) {
      // The server could not read the message, nor an id in it; the exec
      // still waiting for `started` is the likely one, and no answer will
      // ever name it. Give it up rather than leave the console without a
      // prompt, and close the id in case it did start after all.
      const id = state.running.id;
      send({ type: 'close', id });
      state.typeahead = '';
      finishCommand(id, text);
    } else if (msg.id == null && msg.code === 'bad_request' && state.shell && !state.shell.started) {
      send({ type: 'close', id: state.shell.id });
      shellEnded(text);
    } else {
      if (msg.id != null) state.flows.delete(msg.id);
      note(text);
    }
  }

  // ---------------------------------------------------------------- connection

  function connect() {
    state.reconnectTimer = 0;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let ws;
    try {
      ws = new WebSocket(proto + '//' + location.host + '/ws');
    } catch (e) {
      scheduleReconnect();
      return;
    }
    ws.binaryType = 'arraybuffer';
    state.ws = ws;
    renderStatus();

    ws.onmessage = (ev) => {
      if (ws !== state.ws) return;
      if (typeof ev.data === 'string') {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (e) {
          return;
        }
        if (msg && typeof msg === 'object') onMessage(msg);
      } else {
        onOutput(ev.data);
      }
    };
    ws.onclose = () => {
      if (ws !== state.ws) return;
      state.ws = null;
      // "shutting down" was true while the socket lived; from now on the
      // page is reconnecting, to this server's successor if it comes back.
      state.shuttingDown = false;
      disconnected();
    };
    // 'error' is always followed by 'close', which does the work.
    ws.onerror = () => {};
  }

  function disconnected() {
    const wasReady = state.ready;
    state.ready = false;
    renderStatus();
    if (wasReady) {
      // Whatever ran on the server side of this socket is gone.
      if (state.running) {
        finishCommand(state.running.id, RED + 'conch: connection lost — the command\'s fate is unknown' + RESET);
      }
      if (state.shell) {
        shellEnded(RED + 'conch: connection lost — the shell is gone' + RESET);
      }
      state.flows.clear();
    }
    checkSession();
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (state.reconnectTimer) return;
    const delay = state.backoff;
    state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  // A WebSocket refused with 401 looks like any other failure from script,
  // so ask the session endpoint: 401 there means the login expired.
  function checkSession() {
    fetch('/api/v1/session', { credentials: 'same-origin', cache: 'no-store' })
      .then((res) => {
        if (res.status === 401) location.href = '/login';
      })
      .catch(() => {
        // server unreachable: keep retrying the socket
      });
  }

  // ---------------------------------------------------------------- wiring

  function applyRole() {
    // Viewers cannot run anything; the server refuses it anyway, the
    // disabled button just says so up front.
    const viewer = state.role === 'viewer';
    el.modeShell.disabled = viewer;
    el.modeShell.title = viewer ? 'viewers cannot start a shell' : 'Interactive login shell in a pseudo-terminal';
  }

  // A big paste goes in pieces of at most 16 Ki UTF-16 units (under 64 KiB
  // of JSON), never splitting a surrogate pair: the server refuses messages
  // over 1 MiB, and smaller messages keep the socket responsive.
  // With `eof`, the last piece also ends the command's input (an empty
  // `data` is fine).
  const STDIN_PIECE = 16 * 1024;
  function sendStdin(id, data, eof) {
    data = wellFormed(data);
    let i = 0;
    do {
      let end = Math.min(i + STDIN_PIECE, data.length);
      if (end < data.length && isHighSurrogate(data.charCodeAt(end - 1))) end -= 1;
      const msg = { type: 'stdin', id, data: data.slice(i, end) };
      if (eof && end >= data.length) msg.eof = true;
      send(msg);
      i = end;
    } while (i < data.length);
  }

  term.onData((raw) => {
    const data = wholeCharacters(raw);
    if (!data) return;
    if (state.mode === 'shell') {
      // Passed through untouched: the PTY does its own line discipline.
      if (state.shell) sendStdin(state.shell.id, data);
      return;
    }
    commandInput(data);
  });

  term.onResize(({ cols, rows }) => {
    if (state.shell) send({ type: 'resize', id: state.shell.id, cols, rows });
  });

  // Follow every size change of the terminal's box (window resize, top bar
  // wrapping), at most once per frame.
  let fitQueued = false;
  const queueFit = () => {
    if (fitQueued) return;
    fitQueued = true;
    requestAnimationFrame(() => {
      fitQueued = false;
      safeFit();
    });
  };
  if (typeof ResizeObserver === 'function') {
    new ResizeObserver(queueFit).observe(el.terminal);
  }
  window.addEventListener('resize', queueFit);

  // Copy and paste: Ctrl+Shift+C / Ctrl+Shift+V always, and in command mode
  // also plain Ctrl+V, and Ctrl+C while text is selected.
  term.attachCustomKeyEventHandler((ev) => {
    if (!ev.ctrlKey || ev.altKey || ev.metaKey) return true;
    const key = (ev.key || '').toLowerCase();
    if (ev.shiftKey && key === 'c') {
      if (ev.type === 'keydown' && term.hasSelection() && navigator.clipboard) {
        navigator.clipboard.writeText(term.getSelection()).catch(() => {});
      }
      ev.preventDefault();               // Chrome would open the element inspector
      return false;
    }
    if (ev.shiftKey && key === 'v') return false;            // browser pastes
    if (state.mode === 'command' && !ev.shiftKey) {
      if (key === 'v') return false;                         // browser pastes
      if (key === 'c' && term.hasSelection()) return false;  // browser copies
    }
    return true;
  });

  el.modeCommand.addEventListener('click', () => {
    if (state.mode !== 'command') setMode('command');
    term.focus();
  });
  el.modeShell.addEventListener('click', () => {
    if (state.mode !== 'shell') setMode('shell');
    term.focus();
  });
  el.agent.addEventListener('change', () => {
    changeAgent(el.agent.value, true);
    term.focus();
  });

  // Runs before the form is submitted (and the session ended): the next
  // person at this browser must not find these command lines under ↑.
  if (el.logoutForm) el.logoutForm.addEventListener('submit', forgetHistory);

  // ---------------------------------------------------------------- help

  const HELP = [
    'Command mode: type a command line, Enter runs it with sh -c on the selected agent. ' +
      '↑/↓ or Ctrl-P/Ctrl-N walk the history; Ctrl-A/Ctrl-E, Ctrl-U/Ctrl-K and Ctrl-L edit as in a shell.',
    'In command mode, what you type while a command runs goes to its standard input ' +
      '(Enter sends a line, Ctrl-D ends input); use shell mode for programs that need a terminal.',
    'Ctrl-C interrupts the command; a second Ctrl-C kills it.',
    'Shell mode: a login shell in a pseudo-terminal; every key goes to it.',
    'Copy with Ctrl+Shift+C (or Ctrl+C on a selection in command mode); paste with Ctrl+Shift+V or Ctrl+V.',
    'The history is kept in this browser for your user only and erased when you log out.',
  ];

  // Built with DOM calls, not HTML strings, so the page's CSP stays strict
  // and nothing here can be read as markup. The page template stays as it
  // was: the server embeds it at build time.
  function buildHelp() {
    const topbar = el.status && el.status.closest('.topbar');
    if (!topbar) return;
    const button = document.createElement('button');
    button.type = 'button';
    button.id = 'help-toggle';
    button.textContent = '?';
    button.title = 'Help';
    button.setAttribute('aria-label', 'Help');
    button.setAttribute('aria-expanded', 'false');
    button.setAttribute('aria-controls', 'help');

    const panel = document.createElement('section');
    panel.id = 'help';
    panel.className = 'help-panel';
    panel.hidden = true;
    panel.setAttribute('aria-label', 'Help');
    const list = document.createElement('ul');
    for (const line of HELP) {
      const item = document.createElement('li');
      item.textContent = line;
      list.appendChild(item);
    }
    panel.appendChild(list);

    const toggle = (open) => {
      // Below the top bar, however many rows it wrapped into. (CSSOM, not a
      // style attribute: allowed by the CSP.)
      if (open) panel.style.top = Math.round(topbar.getBoundingClientRect().bottom + 6) + 'px';
      panel.hidden = !open;
      button.setAttribute('aria-expanded', String(open));
      if (!open) term.focus();
    };
    button.addEventListener('click', () => toggle(panel.hidden));
    panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') toggle(false);
    });
    const spacer = topbar.querySelector('.spacer');
    topbar.insertBefore(button, spacer ? spacer.nextSibling : null);
    document.body.appendChild(panel);
  }

  // ---------------------------------------------------------------- start

  applyRole();
  buildHelp();
  renderModeButtons();
  renderStatus();
  out(GREY + 'conch · command mode: type a command line, Enter runs it · ↑/↓ history · Ctrl-C interrupts' + RESET + '\r\n');
  out(GREY + 'while a command runs, typing goes to its standard input (Enter sends a line, Ctrl-D ends it) · ? for help' + RESET + '\r\n');
  if (state.role === 'viewer') {
    out(YELLOW + 'viewer: read-only access — commands will be refused' + RESET + '\r\n');
  }
  // The first prompt appears with the server's hello (it names the agent);
  // keys typed before that are kept as typeahead.
  connect();
})();
