// conch — browser console. Wiring: the tabs, the socket, and the two
// modes of each tab.
//
// One socket, any number of tabs; each tab is an xterm.js terminal bound to
// one host (the agent chosen while it is in front), in one of two modes:
//   - command mode (commandMode.ts): the page edits a line locally and runs
//     each finished line as an `exec`; output streams back as binary frames.
//   - shell mode (shellMode.ts): a login shell in a PTY on the agent.
// Command ids are unique over the socket, so every frame finds its tab.
//
// Loaded with `defer` after xterm.js and the fit addon. No inline script
// anywhere: the page runs under a strict Content-Security-Policy.

import { isRecordingId, sessionUrl } from './site';
import { Activity } from './activity';
import { Agents, filterSelector } from './agents';
import { FULL_RESET, GREY, RED, RESET, REVERSE_WRAP_ON, YELLOW } from './ansi';
import { CommandMode, exitSummary } from './commandMode';
import { Connection } from './connection';
import { ExtraKeys } from './extraKeys';
import { Files } from './files';
import { Flows } from './flow';
import { buildHelp, HELP, isLeaveTerminalKey } from './help';
import { History, historyKey } from './history';
import type { ClientMessage, ErrorMessage, ExitMessage, OutputFrame } from './protocol';
import { Screen } from './screen';
import { parseSelector } from './selector';
import { HeldSessions, SessionsPanel, tabStore, type Held } from './sessions';
import { ShellMode } from './shellMode';
import { screenReaderSetting, screenReaderWanted } from './settings';
import { computeStatus, renderStatus } from './status';
import { browserStore } from './storage';
import { clean, WholeCharacters } from './text';
import { TERMINAL_FONT, TERMINAL_THEME } from './theme';
import type { FitAddon, Terminal } from './xterm';
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
    tabs: byId<HTMLElement>('tabs'),
    tabNew: byId<HTMLButtonElement>('tab-new'),
    tabClose: byId<HTMLButtonElement>('tab-close'),
    agent: byId<HTMLSelectElement>('agent'),
    agentFilter: byId<HTMLInputElement>('agent-filter'),
    broadcast: byId<HTMLButtonElement>('broadcast'),
    modeCommand: byId<HTMLButtonElement>('mode-command'),
    modeShell: byId<HTMLButtonElement>('mode-shell'),
    status: byId<HTMLElement>('status'),
    logoutForm: document.querySelector<HTMLFormElement>('form.logout-form'),
  };
  const store = browserStore();

  // ---------------------------------------------------------------- tabs

  /** Tabs open at once in one page. */
  const MAX_TABS = 8;

  interface Tab {
    readonly key: number;
    readonly pane: HTMLDivElement;
    readonly term: Terminal;
    readonly fitAddon: FitAddon;
    readonly screen: Screen;
    readonly whole: WholeCharacters;
    readonly command: CommandMode;
    readonly shell: ShellMode;
    readonly button: HTMLButtonElement;
    mode: Mode;
    /** The host this tab's commands and shell go to. */
    agent: string;
    /** The command or shell of this tab whose output the server records, and the recording's id. */
    recording: { id: number; rec: string } | null;
  }

  const tabs: Tab[] = [];
  let active!: Tab;
  let nextKey = 1;
  /** The server's `hello` came: tabs can be bound to a host. */
  let greeted = false;
  /** The tab that sent the last `exec`: an error without an id is its. */
  let lastExec: Tab | null = null;

  function newTerminal(): Terminal {
    return new window.Terminal({
      convertEol: true, // command output uses bare '\n'; switched off in shell mode
      cursorBlink: true,
      scrollback: 5000,
      fontFamily: TERMINAL_FONT,
      fontSize: 14,
      // A setting in the help panel, remembered in this browser.
      screenReaderMode: screenReaderWanted(store),
      theme: TERMINAL_THEME,
    });
  }

  // ---------------------------------------------------------------- modules

  let role = document.body.dataset['role'] || 'viewer';
  let sessionsPanel: SessionsPanel | null = null;
  let files: Files | null = null;
  const activity = new Activity();
  el.status.after(activity.element);
  // The touch bar and the help panel act on the tab in front.
  const front = {
    get modes() { return active.term.modes; },
    focus: () => active.term.focus(),
    input: (data: string, wasUserInput?: boolean) => active.term.input(data, wasUserInput),
    options: {
      get screenReaderMode() { return active.term.options.screenReaderMode; },
      set screenReaderMode(on: boolean | undefined) {
        for (const t of tabs) t.term.options.screenReaderMode = on;
      },
    },
  } as unknown as Terminal;
  const extraKeys = new ExtraKeys(front);
  document.body.appendChild(extraKeys.element);

  const connection = new Connection({
    hello(msg, reconnected) {
      if (typeof msg.role === 'string' && msg.role) {
        role = msg.role;
        document.body.dataset['role'] = msg.role;
        applyRole();
      }
      agents.set(msg.agents);
      greeted = true;
      // A tab opened before the first hello is bound now.
      for (const t of tabs) if (!t.agent) t.agent = agents.name;
      // After a reload: the tabs' shells, attached again.
      if (!reconnected) restoreSessions();
      renderTabs();
      drawStatus();
            for (const t of tabs) {
        if (reconnected && t.mode === 'shell' && t.shell.resume()) continue;
        if (reconnected) note(t, GREY + '[reconnected]' + RESET);
        if (t.mode === 'command') t.command.linkReady();
      }
    },
    message(msg) {
      switch (msg.type) {
                case 'agents': {
          agents.set(msg.agents);
          // A shell whose agent was away (a server restart, before a
          // dial-in agent came back) attaches again once it is here.
          const up = (name: string): boolean => msg.agents.some((a) => a.name === name && a.connected);
          for (const t of tabs) if (t.mode === 'shell') t.shell.resume(up);
          break;
        }
        case 'started': {
          for (const t of tabs) {
            t.command.started(msg.id);
            t.shell.started(msg.id);
          }
          const tab = tabOf(msg.id);
          if (tab && isRecordingId(msg.recording)) tab.recording = { id: msg.id, rec: msg.recording };
          break;
        }
        case 'exit': onExit(msg); sessionsPanel?.refresh(); break;
        case 'attached':
          for (const t of tabs) t.shell.attached(msg.id, msg.agent, msg.session, msg.watch);
          sessionsPanel?.refresh();
          break;
        case 'detached': {
          const tab = tabOf(msg.id);
          if (tab && tab.shell.owns(msg.id)) {
            tab.shell.ended(GREY + 'detached (' + clean(msg.reason) + '): the shell keeps running — sessions lists it' + RESET);
          } else {
            flows.close(msg.id);
          }
          sessionsPanel?.refresh();
          break;
        }
                case 'sessions': sessionsPanel?.show(msg.sessions); break;
        case 'resized': {
          // A watched session is drawn at its writer's size.
          const tab = tabOf(msg.id);
          if (tab && tab.shell.owns(msg.id) && tab.shell.watching) {
            tab.screen.lock({ cols: msg.cols, rows: msg.rows });
          }
          break;
        }
        case 'error': onError(msg); break;
        case 'shutdown':
          drawStatus();
          for (const t of tabs) note(t, YELLOW + 'conch: ' + clean(msg.message || 'server shutting down') + RESET);
          break;
      }
      // A recording starts with `started` and ends with what ends its command.
      for (const t of tabs) drawRecording(t);
    },
    output: onOutput,
    state: drawStatus,
    lost() {
      for (const t of tabs) {
        t.command.connectionLost();
        if (t.shell.suspend()) {
          t.screen.note(YELLOW + 'conch: connection lost — the shell keeps running; it comes back with the connection' + RESET);
        } else if (t.shell.active) {
          t.shell.ended(RED + 'conch: connection lost — the shell is gone' + RESET);
        }
        drawRecording(t);
      }
      flows.clear();
    },
  });
  const send = (msg: ClientMessage): boolean => connection.send(msg);
  const flows = new Flows((id, bytes) => send({ type: 'ack', id, bytes }));

  // The picker shows (and changes) the host of the tab in front.
  const agents = new Agents(el.agent, store, (name, byUser, changed) => {
    if (!active) return;
    const tab = active;
    // Only the user moves a tab to another host; the picker following a
    // new list from the server never does.
    if (!byUser && tab.agent && name !== tab.agent) return;
    const moved = tab.agent !== name;
    tab.agent = name;
    drawStatus();
    renderTabs();
    if (!changed && !moved) return;
    if (tab.mode === 'shell' && tab.shell.active && byUser) {
      // A shell lives on one agent: start a fresh one on the new agent.
      setMode(tab, 'shell');
    } else if (tab.mode === 'command') {
      tab.command.agentChanged(name);
    }
  });
  // Broadcast: command lines go to every agent the filter matches (all of
  // them when the filter is empty, every name holding a plain piece of
  // text). A filter that is not a selector is still sent, so that the
  // server refuses it with its reason: a line meant for many hosts never
  // quietly runs on one.
  let broadcasting = false;
  const target = (): string | null => (broadcasting ? filterSelector(el.agentFilter.value) : null);

  const history = new History(store, historyKey(document.body.dataset['user'] || ''));
  // The sessions this page's tabs hold, kept across a reload of this tab.
  const heldSessions = new HeldSessions(tabStore(), document.body.dataset['user'] || '');
  /** Saved from the last page, attached again once the server says hello. */
  let restoring: Held[] = heldSessions.load();
  function saveHeld(): void {
    if (restoring.length > 0) return; // not yet restored: keep the old list
    const held: Held[] = [];
    for (const t of tabs) {
      const h = t.shell.session;
      if (h) held.push(h);
    }
    heldSessions.save(held);
    renderTabs();
  }

  const topbar = el.status.closest<HTMLElement>('.topbar');
  // Keyboard users leave the terminal (which takes Tab) with a documented key.
  const focusTopbar = (): void => {
    const first = topbar?.querySelector<HTMLElement>('select:not(:disabled), button:not(:disabled)');
    first?.focus();
  };

  function openTab(): Tab {
    const key = nextKey++;
    const pane = document.createElement('div');
    pane.className = 'tab-pane';
    pane.id = 'pane-' + key;
    pane.setAttribute('role', 'tabpanel');
    el.terminal.appendChild(pane);
    const term = newTerminal();
    // The screen-reader setting of the tab in front, not only the stored one.
    if (active) term.options.screenReaderMode = active.term.options.screenReaderMode;
    const fitAddon = new window.FitAddon.FitAddon();
    term.loadAddon(fitAddon);
    term.open(pane);
    const screen = new Screen(term, fitAddon);
    term.write(REVERSE_WRAP_ON);
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'tab';
    button.id = 'tab-' + key;
    button.setAttribute('role', 'tab');
    button.setAttribute('aria-controls', pane.id);
    pane.setAttribute('aria-labelledby', button.id);
    const tab: Tab = {
      key, pane, term, fitAddon, screen, button,
      whole: new WholeCharacters(),
      mode: 'command',
      agent: active ? active.agent : agents.name,
      recording: null,
      command: null as unknown as CommandMode,
      shell: null as unknown as ShellMode,
    };
    // This tab's sends: an exec marks it as the one an id-less error is for.
    const tabSend = (msg: ClientMessage): boolean => {
      if (msg.type === 'exec') lastExec = tab;
      return send(msg);
    };
    (tab as { command: CommandMode }).command = new CommandMode({
      screen, flows, history, target,
      send: tabSend,
      agent: () => tab.agent,
      isReady: () => connection.isReady(),
      runningChanged: () => {
        activity.set(tabs.some((t) => t.command.isRunning()));
        drawRecording(tab); // a command killed here ends without a message
      },
    });
    (tab as { shell: ShellMode }).shell = new ShellMode({
      screen, flows,
      send: tabSend,
      agent: () => tab.agent,
      ended: () => setMode(tab, 'command', false),
      held: saveHeld,
    });

    term.onData((raw) => {
      let data = tab.whole.take(raw);
      if (!data) return;
      data = extraKeys.take(data); // Ctrl or Alt armed on the touch bar
      if (tab.mode === 'shell') tab.shell.input(data);
      else tab.command.input(data);
    });
    term.onResize(({ cols, rows }) => tab.shell.resize(cols, rows));
    // Copy and paste: Ctrl+Shift+C / Ctrl+Shift+V always, and in command mode
    // also plain Ctrl+V, and Ctrl+C while text is selected.
    term.attachCustomKeyEventHandler((ev) => {
      if (isLeaveTerminalKey(ev)) {
        if (ev.type === 'keydown') focusTopbar();
        ev.preventDefault();
        return false;
      }
      if (!ev.ctrlKey || ev.altKey || ev.metaKey) return true;
      const k = (ev.key || '').toLowerCase();
      if (ev.shiftKey && k === 'c') {
        if (ev.type === 'keydown' && term.hasSelection() && navigator.clipboard) {
          navigator.clipboard.writeText(term.getSelection()).catch(() => {});
        }
        ev.preventDefault(); // Chrome would open the element inspector
        return false;
      }
      if (ev.shiftKey && k === 'v') return false; // browser pastes
      if (tab.mode === 'command' && !ev.shiftKey) {
        if (k === 'v') return false; // browser pastes
        if (k === 'c' && term.hasSelection()) return false; // browser copies
      }
      return true;
    });
    button.addEventListener('click', () => show(tab));
    button.addEventListener('keydown', (e) => {
      // Arrows move between tabs, as in any tab list.
      const at = tabs.indexOf(tab);
      const to = e.key === 'ArrowRight' ? at + 1 : e.key === 'ArrowLeft' ? at - 1 : -2;
      if (to === -2) return;
      e.preventDefault();
      const next = tabs[(to + tabs.length) % tabs.length]!;
      show(next, false);
      next.button.focus();
    });
    tabs.push(tab);
    el.tabs.appendChild(button);
    return tab;
  }

  /** Brings `tab` to the front: its pane shown, its host in the picker. */
  function show(tab: Tab, focusTerminal = true): void {
    active = tab;
    for (const t of tabs) t.pane.hidden = t !== tab;
    if (tab.agent) agents.showChoice(tab.agent);
    renderModeButtons();
    renderTabs();
    drawStatus();
    tab.screen.fit();
    if (focusTerminal) tab.term.focus();
  }

  /** Closes the tab in front (its command or shell ends), bringing a neighbour forward. */
  function closeTab(tab: Tab): void {
    if (tabs.length <= 1) return;
    tab.shell.stop();
    tab.command.leave();
    const at = tabs.indexOf(tab);
    tabs.splice(at, 1);
    tab.term.dispose();
    tab.pane.remove();
    tab.button.remove();
    show(tabs[Math.min(at, tabs.length - 1)]!);
  }

  /** Labels and states of the tab bar, updated in place (focus stays where it is). */
  function renderTabs(): void {
    for (const t of tabs) {
      t.button.textContent = (t.agent || '—') + ' · ' + t.mode + (t.shell.watching ? ' (watching)' : '');
      drawRecording(t);
      t.button.setAttribute('aria-selected', String(t === active));
      t.button.tabIndex = t === active ? 0 : -1;
      t.button.classList.toggle('is-active', t === active);
    }
    el.tabNew.disabled = !greeted || tabs.length >= MAX_TABS;
    el.tabClose.disabled = tabs.length <= 1;
    el.tabClose.title = 'Close this tab (on ' + (active?.agent || 'no agent') + ')';
    files?.refresh(); // the tab in front, its mode or its session may have changed
  }

  // ---------------------------------------------------------------- helpers

  /**
   * "● REC" on the tab of a command or shell whose output the server
   * records, for as long as it runs there: whoever types into it knows
   * that the screen is kept (and can be watched again on the audit page).
   */
  function drawRecording(t: Tab): void {
    const rec = t.recording;
    if (rec && !t.command.owns(rec.id) && !t.shell.owns(rec.id)) t.recording = null;
    let badge = t.button.querySelector<HTMLElement>('.recording-badge');
    if (!t.recording) {
      badge?.remove();
      return;
    }
    if (!badge) {
      badge = document.createElement('span');
      badge.className = 'recording-badge';
      badge.textContent = '● REC';
      t.button.appendChild(badge);
    }
    badge.title = "This session's output is being recorded (recording " + t.recording.rec + ')';
  }

  function drawStatus(): void {
    renderStatus(el.status, computeStatus(connection.state, agents.connected));
  }

  // A note on its own line; in command mode the half-typed line survives it.
  function note(tab: Tab, text: string): void {
    if (tab.mode === 'command') tab.command.note(text);
    else tab.screen.note(text);
  }

  function applyRole(): void {
    // Viewers cannot run anything; the server refuses it anyway, the
    // disabled button just says so up front.
    const viewer = role === 'viewer';
    el.modeShell.disabled = viewer;
    el.modeShell.title = viewer ? 'viewers cannot start a shell' : 'Interactive login shell in a pseudo-terminal';
    files?.applyRole();
  }

  function renderModeButtons(): void {
    const isShell = active.mode === 'shell';
    el.modeCommand.classList.toggle('is-active', !isShell);
    el.modeShell.classList.toggle('is-active', isShell);
    el.modeCommand.setAttribute('aria-pressed', String(!isShell));
    el.modeShell.setAttribute('aria-pressed', String(isShell));
  }

  function setMode(tab: Tab, next: Mode, clear = true, attachTo: Held | null = null): void {
    if (next === 'shell' && !connection.isReady()) {
      note(tab, RED + 'conch: not connected — cannot start a shell' + RESET);
      tab.term.focus();
      return;
    }
    // A shell lives on one agent: no broadcast there.
    if (next === 'shell' && broadcasting) {
      broadcasting = false;
      renderBroadcast();
    }
    // Whatever runs in the old mode is closed (a session only detached: it
    // keeps running): its output has no place in the new one.
    const kept = tab.shell.session && tab.shell.active ? tab.shell.session : null;
    tab.shell.stop();
    tab.command.leave();
        tab.whole.reset();
    tab.screen.lock(null); // a watch that ends gives the box back
    tab.mode = next;
    if (tab === active) renderModeButtons();
    renderTabs();

    const convertEol = next === 'command';
    if (clear) {
      // RIS: clears screen and scrollback and resets every mode the previous
      // user of the screen may have set. The option flips once the reset has
      // been parsed, so output queued before it is not affected.
      tab.screen.raw(FULL_RESET, () => { tab.term.options.convertEol = convertEol; });
      tab.screen.atLineStart = true;
    } else {
      tab.screen.raw('', () => { tab.term.options.convertEol = convertEol; });
    }

    if (kept && clear) {
      tab.screen.out(GREY + 'the shell on ' + clean(kept.agent) + ' keeps running, detached — sessions lists it' + RESET + '\r\n');
    }
    if (next === 'command') tab.command.enter();
    else if (attachTo) tab.shell.attach(attachTo);
    else tab.shell.start();
    if (tab === active) tab.term.focus();
  }

  /** Attaches the sessions the page held before a reload, a tab each. */
  function restoreSessions(): void {
    const held = restoring;
    restoring = [];
    held.forEach((h, i) => {
      if (role === 'viewer' && !h.watch) return;
      const tab = i === 0 ? active : tabs.length < MAX_TABS ? openTab() : null;
      if (!tab) return;
      tab.agent = h.agent;
      if (tab === active) agents.showChoice(h.agent);
      setMode(tab, 'shell', true, h);
    });
    saveHeld();
  }

  // ---------------------------------------------------------------- server messages

  /** The tab whose command or shell is `id`. */
  function tabOf(id: number): Tab | undefined {
    return tabs.find((t) => t.command.owns(id) || t.shell.owns(id));
  }

  function onOutput({ stream, id, bytes }: OutputFrame): void {
    if (!flows.has(id)) return; // closed or unknown id: nobody shows it
    const tab = tabOf(id);
    if (!tab) return;
    tab.command.streamOutput(id, stream);
    if (bytes.length === 0) return;
    tab.screen.atLineStart = bytes[bytes.length - 1] === 0x0a;
    // Bytes, not a decoded string: xterm decodes UTF-8 itself and keeps a
    // character split across two frames intact.
    const drawn = flows.writing(id, bytes.length);
    tab.screen.raw(bytes, drawn ?? undefined);
  }

  function onExit(msg: ExitMessage): void {
    const tab = tabOf(msg.id);
    if (tab && tab.command.owns(msg.id)) {
      tab.command.finish(msg.id, exitSummary(msg));
    } else if (tab && tab.shell.owns(msg.id)) {
      tab.shell.ended(GREY + 'shell ended ' + exitSummary(msg) + GREY + ' — back in command mode' + RESET);
    } else {
      flows.close(msg.id);
    }
  }

  function onError(msg: ErrorMessage): void {
    const text = RED + 'conch: ' + clean(msg.message || msg.code || 'error') + RESET;
    const id = msg.id;
    const tab = id != null ? tabOf(id) : undefined;
    // An id no tab has (its tab was closed, its command ended): nobody to tell.
    if (id != null && !tab && !flows.has(id)) return;
    // `final: false`: the command goes on (its exit still comes); only say so.
    if (msg.final === false) {
      note(tab ?? active, text);
      return;
    }
    if (tab && id != null && tab.command.owns(id)) {
      tab.command.dropTypeahead(); // the rest of a paste would likely fail the same way
      tab.command.finish(id, text);
      return;
    }
        if (tab && id != null && tab.shell.owns(id)) {
      // The session's agent is not connected (yet): its shell still runs
      // there; attach again when the agent is back, rather than forget it.
      if (msg.code === 'agent_unavailable' && tab.shell.suspend()) {
        tab.screen.note(YELLOW + 'conch: ' + clean(msg.message || 'agent not connected') +
          ' — the shell attaches again when its agent is back' + RESET);
        return;
      }
      tab.shell.ended(text);
      return;
    }
    if (id == null && msg.code === 'bad_request') {
      // The server could not read the message, nor an id in it; an exec
      // still waiting for `started` is the likely one, and no answer will
      // ever name it. Give it up rather than leave a tab without a prompt,
      // and close the id in case it did start after all.
      const t = lastExec;
      const command = t ? t.command.unstartedId() : null;
      const shell = t ? t.shell.unstartedId() : null;
      if (t && command !== null) {
        send({ type: 'close', id: command });
        t.command.dropTypeahead();
        t.command.finish(command, text);
        return;
      }
      if (t && shell !== null) {
        send({ type: 'close', id: shell });
        t.shell.ended(text);
        return;
      }
    }
    if (id != null) flows.close(id);
    note(active, text);
  }

  // ---------------------------------------------------------------- input and layout

  // Follow every size change of the terminal's box (window resize, top bar
  // wrapping), at most once per frame.
  let fitQueued = false;
  const queueFit = (): void => {
    if (fitQueued) return;
    fitQueued = true;
    requestAnimationFrame(() => {
      fitQueued = false;
      active.screen.fit();
    });
  };
  if (typeof ResizeObserver === 'function') new ResizeObserver(queueFit).observe(el.terminal);
  window.addEventListener('resize', queueFit);
  followVisualViewport(document.body, queueFit);

  el.tabClose.addEventListener('click', () => closeTab(active));
  el.tabNew.addEventListener('click', () => {
    if (!greeted || tabs.length >= MAX_TABS) return;
    const tab = openTab();
    show(tab);
    tab.screen.out(GREY + 'a new tab on ' + clean(tab.agent || 'no agent') + ': the picker chooses its host' + RESET + '\r\n');
    if (connection.isReady()) tab.command.linkReady();
  });
  el.modeCommand.addEventListener('click', () => {
    if (active.mode !== 'command') setMode(active, 'command');
    active.term.focus();
  });
  el.modeShell.addEventListener('click', () => {
    if (active.mode !== 'shell') setMode(active, 'shell');
    active.term.focus();
  });
  el.agent.addEventListener('change', () => {
    agents.choose(el.agent.value, true);
    active.term.focus();
  });
  el.agentFilter.addEventListener('input', () => {
    // Lines kept from a paste were meant for the hosts chosen when they
    // were pasted: a new choice drops them.
    for (const t of tabs) t.command.dropTypeahead();
    agents.setFilter(el.agentFilter.value);
    renderBroadcast();
  });
  el.agentFilter.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') active.term.focus();
  });
  el.broadcast.addEventListener('click', () => {
    for (const t of tabs) t.command.dropTypeahead();
    broadcasting = !broadcasting;
    if (broadcasting && active.mode !== 'command') setMode(active, 'command');
    renderBroadcast();
    active.term.focus();
  });

  function renderBroadcast(): void {
    el.broadcast.setAttribute('aria-pressed', String(broadcasting));
    el.broadcast.classList.toggle('is-active', broadcasting);
    const n = agents.matching().length;
    el.broadcast.title = !parseSelector(filterSelector(el.agentFilter.value))
      ? 'The filter is not a selector (web-*, role=web,env!=staging): the server will refuse it'
      : 'Run each command line on every agent the filter matches (' + n + ' now)';
    for (const t of tabs) {
      if (t.mode === 'command') t.command.agentChanged(t.agent);
    }
  }

  // Runs before the form is submitted (and the session ended): the next
  // person at this browser must not find these command lines under ↑.
  el.logoutForm?.addEventListener('submit', () => {
    for (const t of tabs) t.command.forgetHistory();
    connection.leave();
  });

  // A shell that would die with the page, or an upload still on its way:
  // ask before leaving. (A session keeps running, and the next page
  // attaches it again.)
  window.addEventListener('beforeunload', (ev) => {
    if (tabs.some((t) => t.shell.unkept) || files?.busy) {
      ev.preventDefault();
      ev.returnValue = '';
    }
  });

  // ---------------------------------------------------------------- start

  const first = openTab();
  show(first);
  if (topbar) buildHelp(topbar, HELP, [screenReaderSetting(front, store)], () => active.term.focus());
  sessionsPanel = topbar ? new SessionsPanel(topbar, {
    request: () => { send({ type: 'list_sessions' }); },
        attach(held) {
      if (!connection.isReady()) return;
      // The tab in front, unless something runs in it: then a new tab,
      // so that nothing running is closed to make room.
      const busy = active.command.isRunning() || active.shell.active || active.shell.waitingFor !== null;
      if (busy && tabs.length >= MAX_TABS) {
        note(active, RED + 'conch: close a tab (or end what runs here) to attach another shell' + RESET);
        return;
      }
      const tab = busy ? openTab() : active;
      if (busy) show(tab);
      tab.agent = held.agent;
      agents.showChoice(held.agent);
      setMode(tab, 'shell', true, held);
    },
            end(agent, session) {
      if (!window.confirm('End this shell on ' + agent + ', and everything it runs?')) return;
      fetch(sessionUrl(agent, session), { method: 'DELETE', credentials: 'same-origin' })
        .then((r) => {
          if (!r.ok) note(active, RED + 'conch: cannot end that session (' + r.status + ')' + RESET);
          sessionsPanel?.refresh();
        })
        .catch(() => note(active, RED + 'conch: cannot end that session: no answer' + RESET));
    },
            change(agent, session, change) {
      fetch(sessionUrl(agent, session), {
        method: 'PATCH',
        credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(change),
      })
        .then(async (r) => {
          if (!r.ok) {
            const problem = await r.json().catch(() => ({}));
            note(active, RED + 'conch: ' + clean(problem.detail || 'cannot change that session (' + r.status + ')') + RESET);
          }
          sessionsPanel?.refresh();
        })
        .catch(() => note(active, RED + 'conch: cannot change that session: no answer' + RESET));
    },
    closed: () => active.term.focus(),
    user: () => document.body.dataset['user'] || '',
    role: () => role,
  }) : null;
  // Uploads and downloads go to the host of the tab in front; while that
  // tab writes to a shell session, relative paths start in the shell's
  // current directory (a watcher's is not the page's to use).
  files = topbar ? new Files(topbar, el.terminal.parentElement ?? el.terminal, {
    target() {
      const held = active.mode === 'shell' ? active.shell.session : null;
      return held && !held.watch
        ? { agent: held.agent, session: held.session }
        : { agent: active.agent, session: null };
    },
    role: () => role,
    closed: () => active.term.focus(),
  }) : null;

  applyRole();
  drawStatus();
  first.screen.out(GREY + 'conch · command mode: type a command line, Enter runs it · ↑/↓ history · Ctrl-C interrupts' + RESET + '\r\n');
  first.screen.out(GREY + 'while a command runs, typing goes to its standard input (Enter sends a line, Ctrl-D ends it) · ? for help' + RESET + '\r\n');
  if (role === 'viewer') {
    first.screen.out(YELLOW + 'viewer: read-only access — commands will be refused' + RESET + '\r\n');
  }
  // The first prompt appears with the server's hello (it names the agent);
  // keys typed before that are kept as typeahead.
  connection.connect();
}

main();
