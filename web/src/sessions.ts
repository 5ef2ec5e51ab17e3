// Shell sessions seen from the page: which sessions this browser tab's
// terminal tabs hold (kept in sessionStorage, so that a reload reattaches
// them and another browser tab does not take them over), and the
// sessions panel (list, reattach, watch, end).
//
// The sessions themselves live in the agents; the server decides who may
// attach, watch or end one. The page only remembers ids and asks.

import type { AgentSession } from './generated/protocol';
import { loadPref, savePref, type KeyValueStore } from './storage';

/** A session a terminal tab is (or was, before a reload) attached to. */
export interface Held {
  agent: string;
  session: string;
  watch: boolean;
}

/** This browser tab's sessionStorage, or null where the browser refuses it. */
export function tabStore(): KeyValueStore | null {
  try {
    return window.sessionStorage;
  } catch {
    return null;
  }
}

/** The most sessions remembered (one per terminal tab). */
const MAX_HELD = 8;

/** The sessions of `user`'s terminal tabs, as saved before a reload. */
export class HeldSessions {
  private readonly key: string;

  constructor(private readonly store: KeyValueStore | null, user: string) {
    this.key = 'conch.sessions.v1:' + user;
  }

  load(): Held[] {
    let value: unknown;
    try {
      value = JSON.parse(loadPref(this.store, this.key) || '[]');
    } catch {
      return [];
    }
    if (!Array.isArray(value)) return [];
    const out: Held[] = [];
    for (const v of value.slice(0, MAX_HELD)) {
      if (v && typeof v.agent === 'string' && typeof v.session === 'string') {
        out.push({ agent: v.agent, session: v.session, watch: v.watch === true });
      }
    }
    return out;
  }

  save(held: Held[]): void {
    savePref(this.store, this.key, JSON.stringify(held.slice(0, MAX_HELD)));
  }
}

export interface SessionsPanelHost {
  /** Asks the server for the list (the answer comes to `show`). */
  request(): void;
  /** Attach `held` in the tab in front. */
  attach(held: Held): void;
    /** End a session (its processes are killed). */
  end(agent: string, session: string): void;
  /** Rename a session, or say who may watch it. */
  change(agent: string, session: string, change: { title?: string; watchers?: string[] }): void;
  /** The panel closed: give the keyboard back to the terminal. */
  closed(): void;
  /** Who the page is logged in as, and as what. */
  user(): string;
  role(): string;
}

function when(ms: number | null | undefined): string {
  if (!ms) return '';
  const d = new Date(ms);
  return d.toLocaleString();
}

/** How often an open panel asks for the list again: 2 s. */
const REFRESH_MS = 2000;

/** The sessions panel: a button in the top bar and a list below it. */
export class SessionsPanel {
  readonly button: HTMLButtonElement;
  readonly panel: HTMLElement;
  private readonly list: HTMLElement;

  constructor(private readonly topbar: HTMLElement, private readonly host: SessionsPanelHost) {
    this.button = document.createElement('button');
    this.button.type = 'button';
    this.button.id = 'sessions-toggle';
    this.button.className = 'mode';
    this.button.textContent = 'sessions';
    this.button.title = 'Shells that keep running: reattach, watch or end them';
    this.button.setAttribute('aria-expanded', 'false');
    this.button.setAttribute('aria-controls', 'sessions');

    this.panel = document.createElement('section');
    this.panel.id = 'sessions';
    this.panel.className = 'help-panel sessions-panel';
    this.panel.hidden = true;
    this.panel.setAttribute('aria-label', 'Sessions');
    const heading = document.createElement('h2');
    heading.textContent = 'Shell sessions';
    this.list = document.createElement('div');
    this.list.className = 'sessions-list';
    this.panel.append(heading, this.list);

    this.button.addEventListener('click', () => this.toggle(this.panel.hidden));
    this.panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') this.toggle(false);
    });
    const modes = topbar.querySelector('.modes');
    topbar.insertBefore(this.button, modes ? modes.nextSibling : null);
    document.body.appendChild(this.panel);
  }

    /** While open, the list is asked for again every few seconds. */
  private timer = 0;

  toggle(open: boolean): void {
    window.clearInterval(this.timer);
    this.timer = 0;
    if (open) {
      this.panel.style.top = Math.round(this.topbar.getBoundingClientRect().bottom + 6) + 'px';
      this.list.textContent = 'asking the agents…';
      this.host.request();
      this.timer = window.setInterval(() => this.host.request(), REFRESH_MS);
    }
    this.panel.hidden = !open;
    this.button.setAttribute('aria-expanded', String(open));
    if (!open) this.host.closed();
  }

  /** Refreshes the list if the panel is open. */
  refresh(): void {
    if (!this.panel.hidden) this.host.request();
  }

  /** The server's answer to `list_sessions`. */
  show(sessions: AgentSession[]): void {
    this.list.textContent = '';
    if (sessions.length === 0) {
      this.list.textContent = 'No shell sessions. A shell started in shell mode keeps running here when its page goes.';
      return;
    }
    const table = document.createElement('table');
    const head = table.createTHead().insertRow();
    for (const h of ['agent', 'title', 'owner', 'started', 'state', '']) {
      const th = document.createElement('th');
      th.textContent = h;
      head.appendChild(th);
    }
    const body = table.createTBody();
    const me = this.host.user();
    const admin = this.host.role() === 'admin';
    for (const s of sessions) {
      const row = body.insertRow();
      row.dataset['session'] = s.id;
      const state = s.attached
        ? 'attached'
        : 'detached' + (s.ends_at_ms ? ', ends ' + when(s.ends_at_ms) : '');
      const watching = s.watching > 0 ? ` · ${s.watching} watching` : '';
            const shared = s.watchers.length > 0 ? ' · shared with ' + s.watchers.join(', ') : '';
      const size = ` · ${s.cols}×${s.rows}`;
      for (const text of [s.agent, s.title || 'login shell', s.owner, when(s.started_ms), state + watching + shared + size]) {
        row.insertCell().textContent = text;
      }
      const actions = row.insertCell();
      const mine = s.owner === me;
      const add = (label: string, title: string, act: () => void): void => {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = label;
        b.title = title;
        b.addEventListener('click', act);
        actions.appendChild(b);
      };
      if ((mine || admin) && this.host.role() !== 'viewer') {
        add('attach', 'Continue this shell in the tab in front', () => {
          this.toggle(false);
          this.host.attach({ agent: s.agent, session: s.id, watch: false });
        });
      }
      if (!mine) {
        add('watch', 'Look on, read-only', () => {
          this.toggle(false);
          this.host.attach({ agent: s.agent, session: s.id, watch: true });
        });
      }
            if (mine || admin) {
        add('rename', 'Give this shell a title', () => {
          const title = window.prompt('Title of this shell', s.title);
          if (title !== null) this.host.change(s.agent, s.id, { title: title.slice(0, 200) });
        });
        add('share', 'Who may watch it, read-only (user names, or * for everyone)', () => {
          const now = (s.watchers || []).join(', ');
          const text = window.prompt('Users who may watch this shell (comma-separated; * for everyone; empty for nobody)', now);
          if (text === null) return;
          const watchers = text.split(',').map((w) => w.trim()).filter((w) => w !== '');
          this.host.change(s.agent, s.id, { watchers });
        });
      }
      if ((mine || admin) && this.host.role() !== 'viewer') {
        add('end', 'End this shell and everything it runs', () => this.host.end(s.agent, s.id));
      }
    }
    this.list.appendChild(table);
  }
}
