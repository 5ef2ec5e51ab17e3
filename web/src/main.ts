// conch — browser console. Wiring: the terminal, the socket, and the two
// modes sharing them.
//
// One xterm.js terminal, two modes:
//   - command mode (commandMode.ts): the page edits a line locally and runs
//     each finished line as an `exec`; output streams back as binary frames.
//   - shell mode (shellMode.ts): a login shell in a PTY on the agent.
//
// Loaded with `defer` after xterm.js and the fit addon. No inline script
// anywhere: the page runs under a strict Content-Security-Policy.

import { Activity } from './activity';
import { Agents } from './agents';
import { FULL_RESET, GREY, RED, RESET, REVERSE_WRAP_ON, YELLOW } from './ansi';
import { CommandMode, exitSummary } from './commandMode';
import { Connection } from './connection';
import { ExtraKeys } from './extraKeys';
import { Flows } from './flow';
import { buildHelp, HELP, isLeaveTerminalKey } from './help';
import { History, historyKey } from './history';
import type { ClientMessage, ErrorMessage, ExitMessage, OutputFrame } from './protocol';
import { Screen } from './screen';
import { parseSelector } from './selector';
import { ShellMode } from './shellMode';
import { screenReaderSetting, screenReaderWanted } from './settings';
import { computeStatus, renderStatus } from './status';
import { browserStore } from './storage';
import { clean, WholeCharacters } from './text';
import { followVisualViewport } from './viewport';

type Mode = 'command' | 'shell';

function byId<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`conch: the page has no #${id}`);
  return found as T;
}

function main(): void {
  const el = {
    terminal: byId<HTMLDivElement>('terminal'),
    agent: byId<HTMLSelectElement>('agent'),
    agentFilter: byId<HTMLInputElement>('agent-filter'),
    broadcast: byId<HTMLButtonElement>('broadcast'),
    modeCommand: byId<HTMLButtonElement>('mode-command'),
    modeShell: byId<HTMLButtonElement>('mode-shell'),
    status: byId<HTMLElement>('status'),
    logoutForm: document.querySelector<HTMLFormElement>('form.logout-form'),
  };
  const store = browserStore();

  // ---------------------------------------------------------------- terminal

  const term = new window.Terminal({
    convertEol: true, // command output uses bare '\n'; switched off in shell mode
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    // A setting in the help panel, remembered in this browser.
    screenReaderMode: screenReaderWanted(store),
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
      // The grey of hints and exit summaries: 5:1 on the background (WCAG
      // AA asks 4.5:1; checked by tests/e2e/accessibility.test.mjs).
      brightBlack: '#7a8594',
    },
  });
  const fitAddon = new window.FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  term.open(el.terminal);
  const screen = new Screen(term, fitAddon);
  screen.fit();
  term.write(REVERSE_WRAP_ON);
  term.focus();

  // ---------------------------------------------------------------- modules

  let mode: Mode = 'command';
  let role = document.body.dataset['role'] || 'viewer';
  const whole = new WholeCharacters();
  const activity = new Activity();
  el.status.after(activity.element);
  const extraKeys = new ExtraKeys(term);
  document.body.appendChild(extraKeys.element);

  const connection = new Connection({
    hello(msg, reconnected) {
      if (typeof msg.role === 'string' && msg.role) {
        role = msg.role;
        document.body.dataset['role'] = msg.role;
        applyRole();
      }
      agents.set(msg.agents);
      drawStatus();
      if (reconnected) note(GREY + '[reconnected]' + RESET);
      if (mode === 'command') command.linkReady();
    },
    message(msg) {
      switch (msg.type) {
        case 'agents': agents.set(msg.agents); break;
        case 'started':
          command.started(msg.id);
          shell.started(msg.id);
          break;
        case 'exit': onExit(msg); break;
        case 'error': onError(msg); break;
        case 'shutdown':
          drawStatus();
          note(YELLOW + 'conch: ' + clean(msg.message || 'server shutting down') + RESET);
          break;
      }
    },
    output: onOutput,
    state: drawStatus,
    lost() {
      command.connectionLost();
      if (shell.active) shell.ended(RED + 'conch: connection lost — the shell is gone' + RESET);
      flows.clear();
    },
  });
  const send = (msg: ClientMessage): boolean => connection.send(msg);
  const flows = new Flows((id, bytes) => send({ type: 'ack', id, bytes }));

  const agents = new Agents(el.agent, store, (name, byUser, changed) => {
    drawStatus();
    if (!changed) return;
    if (mode === 'shell' && shell.active && byUser) {
      // A shell lives on one agent: start a fresh one on the new agent.
      setMode('shell');
    } else if (mode === 'command') {
      command.agentChanged(name);
    }
  });
  const agent = (): string => agents.name;
  // Broadcast: command lines go to every agent the filter matches (all of
  // them when the filter is empty). A filter that is not a selector is
  // still sent, so that the server refuses it with its reason: a line
  // meant for many hosts never quietly runs on one.
  let broadcasting = false;
  const target = (): string | null => {
    if (!broadcasting) return null;
    return el.agentFilter.value.trim() || '*';
  };

  const history = new History(store, historyKey(document.body.dataset['user'] || ''));
  const command = new CommandMode({
    screen, flows, history, send, agent, target,
    isReady: () => connection.isReady(),
    runningChanged: (running) => activity.set(running),
  });
  const shell = new ShellMode({
    screen, flows, send, agent,
    ended: () => setMode('command', false),
  });

  // ---------------------------------------------------------------- helpers

  function drawStatus(): void {
    renderStatus(el.status, computeStatus(connection.state, agents.connected));
  }

  // A note on its own line; in command mode the half-typed line survives it.
  function note(text: string): void {
    if (mode === 'command') command.note(text);
    else screen.note(text);
  }

  function applyRole(): void {
    // Viewers cannot run anything; the server refuses it anyway, the
    // disabled button just says so up front.
    const viewer = role === 'viewer';
    el.modeShell.disabled = viewer;
    el.modeShell.title = viewer ? 'viewers cannot start a shell' : 'Interactive login shell in a pseudo-terminal';
  }

  function renderModeButtons(): void {
    const isShell = mode === 'shell';
    el.modeCommand.classList.toggle('is-active', !isShell);
    el.modeShell.classList.toggle('is-active', isShell);
    el.modeCommand.setAttribute('aria-pressed', String(!isShell));
    el.modeShell.setAttribute('aria-pressed', String(isShell));
  }

  function setMode(next: Mode, clear = true): void {
    if (next === 'shell' && !connection.isReady()) {
      note(RED + 'conch: not connected — cannot start a shell' + RESET);
      term.focus();
      return;
    }
    // A shell lives on one agent: no broadcast there.
    if (next === 'shell' && broadcasting) {
      broadcasting = false;
      renderBroadcast();
    }
    // Whatever runs in the old mode is closed: its output has no place in
    // the new one.
    shell.stop();
    command.leave();
    whole.reset();
    mode = next;
    renderModeButtons();

    const convertEol = next === 'command';
    if (clear) {
      // RIS: clears screen and scrollback and resets every mode the previous
      // user of the screen may have set. The option flips once the reset has
      // been parsed, so output queued before it is not affected.
      screen.raw(FULL_RESET, () => { term.options.convertEol = convertEol; });
      screen.atLineStart = true;
    } else {
      screen.raw('', () => { term.options.convertEol = convertEol; });
    }

    if (next === 'command') command.enter();
    else shell.start();
    term.focus();
  }

  // ---------------------------------------------------------------- server messages

  function onOutput({ stream, id, bytes }: OutputFrame): void {
    if (!flows.has(id)) return; // closed or unknown id: nobody shows it
    command.streamOutput(id, stream);
    if (bytes.length === 0) return;
    screen.atLineStart = bytes[bytes.length - 1] === 0x0a;
    // Bytes, not a decoded string: xterm decodes UTF-8 itself and keeps a
    // character split across two frames intact.
    const drawn = flows.writing(id, bytes.length);
    screen.raw(bytes, drawn ?? undefined);
  }

  function onExit(msg: ExitMessage): void {
    if (command.owns(msg.id)) {
      command.finish(msg.id, exitSummary(msg));
    } else if (shell.owns(msg.id)) {
      shell.ended(GREY + 'shell ended ' + exitSummary(msg) + GREY + ' — back in command mode' + RESET);
    } else {
      flows.close(msg.id);
    }
  }

  function onError(msg: ErrorMessage): void {
    const text = RED + 'conch: ' + clean(msg.message || msg.code || 'error') + RESET;
    // `final: false`: the command goes on (its exit still comes); only say so.
    if (msg.final === false) {
      note(text);
      return;
    }
    const id = msg.id;
    const unstartedCommand = command.unstartedId();
    const unstartedShell = shell.unstartedId();
    if (id != null && command.owns(id)) {
      command.dropTypeahead(); // the rest of a paste would likely fail the same way
      command.finish(id, text);
    } else if (id != null && shell.owns(id)) {
      shell.ended(text);
    } else if (id == null && msg.code === 'bad_request' && unstartedCommand !== null) {
      // The server could not read the message, nor an id in it; the exec
      // still waiting for `started` is the likely one, and no answer will
      // ever name it. Give it up rather than leave the console without a
      // prompt, and close the id in case it did start after all.
      send({ type: 'close', id: unstartedCommand });
      command.dropTypeahead();
      command.finish(unstartedCommand, text);
    } else if (id == null && msg.code === 'bad_request' && unstartedShell !== null) {
      send({ type: 'close', id: unstartedShell });
      shell.ended(text);
    } else {
      if (id != null) flows.close(id);
      note(text);
    }
  }

  // ---------------------------------------------------------------- input and layout

  term.onData((raw) => {
    let data = whole.take(raw);
    if (!data) return;
    data = extraKeys.take(data); // Ctrl or Alt armed on the touch bar
    if (mode === 'shell') shell.input(data);
    else command.input(data);
  });

  term.onResize(({ cols, rows }) => shell.resize(cols, rows));

  // Follow every size change of the terminal's box (window resize, top bar
  // wrapping), at most once per frame.
  let fitQueued = false;
  const queueFit = (): void => {
    if (fitQueued) return;
    fitQueued = true;
    requestAnimationFrame(() => {
      fitQueued = false;
      screen.fit();
    });
  };
  if (typeof ResizeObserver === 'function') new ResizeObserver(queueFit).observe(el.terminal);
  window.addEventListener('resize', queueFit);
  followVisualViewport(document.body, queueFit);

  const topbar = el.status.closest<HTMLElement>('.topbar');
  // Keyboard users leave the terminal (which takes Tab) with a documented key.
  const focusTopbar = (): void => {
    const first = topbar?.querySelector<HTMLElement>('select:not(:disabled), button:not(:disabled)');
    first?.focus();
  };

  // Copy and paste: Ctrl+Shift+C / Ctrl+Shift+V always, and in command mode
  // also plain Ctrl+V, and Ctrl+C while text is selected.
  term.attachCustomKeyEventHandler((ev) => {
    if (isLeaveTerminalKey(ev)) {
      if (ev.type === 'keydown') focusTopbar();
      ev.preventDefault();
      return false;
    }
    if (!ev.ctrlKey || ev.altKey || ev.metaKey) return true;
    const key = (ev.key || '').toLowerCase();
    if (ev.shiftKey && key === 'c') {
      if (ev.type === 'keydown' && term.hasSelection() && navigator.clipboard) {
        navigator.clipboard.writeText(term.getSelection()).catch(() => {});
      }
      ev.preventDefault(); // Chrome would open the element inspector
      return false;
    }
    if (ev.shiftKey && key === 'v') return false; // browser pastes
    if (mode === 'command' && !ev.shiftKey) {
      if (key === 'v') return false; // browser pastes
      if (key === 'c' && term.hasSelection()) return false; // browser copies
    }
    return true;
  });

  el.modeCommand.addEventListener('click', () => {
    if (mode !== 'command') setMode('command');
    term.focus();
  });
  el.modeShell.addEventListener('click', () => {
    if (mode !== 'shell') setMode('shell');
    term.focus();
  });
  el.agent.addEventListener('change', () => {
    agents.choose(el.agent.value, true);
    term.focus();
  });
  el.agentFilter.addEventListener('input', () => {
    // Lines kept from a paste were meant for the hosts chosen when they
    // were pasted: a new choice drops them.
    command.dropTypeahead();
    agents.setFilter(el.agentFilter.value);
    renderBroadcast();
  });
  el.agentFilter.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') term.focus();
  });
  el.broadcast.addEventListener('click', () => {
    command.dropTypeahead();
    broadcasting = !broadcasting;
    if (broadcasting && mode !== 'command') setMode('command');
    renderBroadcast();
    term.focus();
  });

  function renderBroadcast(): void {
    el.broadcast.setAttribute('aria-pressed', String(broadcasting));
    el.broadcast.classList.toggle('is-active', broadcasting);
    const n = agents.matching().length;
    const text = el.agentFilter.value.trim();
    el.broadcast.title = text && !parseSelector(text)
      ? 'The filter is not a selector (web-*, role=web,env!=staging): the server will refuse it'
      : 'Run each command line on every agent the filter matches (' + n + ' now)';
    if (mode === 'command') command.agentChanged(agents.name);
  }

  // Runs before the form is submitted (and the session ended): the next
  // person at this browser must not find these command lines under ↑.
  el.logoutForm?.addEventListener('submit', () => command.forgetHistory());

  // ---------------------------------------------------------------- start

  if (topbar) buildHelp(topbar, HELP, [screenReaderSetting(term, store)], () => term.focus());

  applyRole();
  renderModeButtons();
  drawStatus();
  screen.out(GREY + 'conch · command mode: type a command line, Enter runs it · ↑/↓ history · Ctrl-C interrupts' + RESET + '\r\n');
  screen.out(GREY + 'while a command runs, typing goes to its standard input (Enter sends a line, Ctrl-D ends it) · ? for help' + RESET + '\r\n');
  if (role === 'viewer') {
    screen.out(YELLOW + 'viewer: read-only access — commands will be refused' + RESET + '\r\n');
  }
  // The first prompt appears with the server's hello (it names the agent);
  // keys typed before that are kept as typeahead.
  connection.connect();
}

main();
