// The agent picker: the agents the server knows, which one commands go to,
// and the <select> that shows them. The choice a user makes is remembered.

import { matches, parseSelector } from './selector';
import { loadPref, savePref, type KeyValueStore } from './storage';

export const AGENT_KEY = 'conch.agent';

export interface Agent {
  name: string;
  connected: boolean;
  /** The host's OS, as its agent reports it ('' when not known). */
  os: string;
  labels: Record<string, string>;
}

/**
 * The selector a filter stands for: a piece of a name (letters, digits,
 * `.`, `_`, `-` only) stands for every name holding it (`web` is `*web*`);
 * anything else is taken as a selector as typed. The picker and a
 * broadcast use the same one, so a broadcast runs on what the picker shows.
 */
export function filterSelector(filter: string): string {
  const text = filter.trim();
  if (!text) return '*';
  return /^[A-Za-z0-9._-]+$/.test(text) ? '*' + text + '*' : text;
}

/** Whether `a` passes the picker's filter (nothing passes a filter that is not a selector). */
export function passes(a: Agent, filter: string): boolean {
  const sel = parseSelector(filterSelector(filter));
  return sel !== null && matches(sel, a.name, a.labels);
}

function labelsOf(v: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (v && typeof v === 'object' && !Array.isArray(v)) {
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
      if (typeof x === 'string') out[k] = x;
    }
  }
  return out;
}

export class Agents {
  private list: Agent[] = [];
  private filter = '';
  private selected: string;

  /**
   * `changed(name, byUser, changed)` runs after every choice, also when the
   * selection stayed the same (the status may still need drawing).
   */
  constructor(
    private readonly select: HTMLSelectElement,
    private readonly store: KeyValueStore | null,
    private readonly changed: (name: string, byUser: boolean, changed: boolean) => void,
  ) {
    this.selected = loadPref(store, AGENT_KEY) || '';
  }

  /** The agent commands go to ('' when none is known). */
  get name(): string {
    return this.selected;
  }

  /** Whether the selected agent is listed as connected. */
  get connected(): boolean {
    const agent = this.list.find((a) => a.name === this.selected);
    return !!agent && agent.connected;
  }

  /** The agents the filter lets through. */
  matching(): Agent[] {
    return this.list.filter((a) => passes(a, this.filter));
  }

  /** The filter typed above the picker changed. */
  setFilter(text: string): void {
    this.filter = text;
    this.draw();
  }

  /** A new list from the server (`hello`, `agents`); anything malformed is dropped. */
  set(list: unknown): void {
    type Raw = { name: string; connected?: unknown; facts?: { os?: unknown }; labels?: unknown };
    this.list = (Array.isArray(list) ? list as unknown[] : [])
      .filter((a): a is Raw =>
        !!a && typeof a === 'object' && typeof (a as { name?: unknown }).name === 'string')
      .map((a) => ({
        name: a.name,
        connected: !!a.connected,
        os: a.facts && typeof a.facts.os === 'string' ? a.facts.os : '',
        labels: labelsOf(a.labels),
      }));
    this.draw();
  }

  private draw(): void {
    // The agent in use stays listed and chosen whatever the filter, and
    // even when the server no longer lists it: a filter narrows what can be
    // picked, and a new list never moves a tab to another host (a command
    // for a vanished agent is refused by the server, with its reason). With
    // none in use yet: the remembered one, then any connected agent, then
    // the first.
    const shown = this.matching();
    const current = this.list.find((a) => a.name === this.selected);
    const unmatched = !!current && !shown.includes(current);
    if (current && unmatched) shown.unshift(current);
    const names = shown.map((a) => a.name);
    const gone = this.selected !== '' && !current;
    let pick = this.selected;
    if (!gone && !names.includes(pick)) {
      const remembered = loadPref(this.store, AGENT_KEY);
      const connected = shown.find((a) => a.connected);
      pick = remembered !== null && names.includes(remembered) ? remembered
        : connected ? connected.name
          : names[0] || '';
    }

    // A fragment, not replaceChildren(...options): no argument spreading of
    // a list whose length the server decides.
    const options = document.createDocumentFragment();
    if (gone) {
      const opt = document.createElement('option');
      opt.value = this.selected;
      opt.textContent = 'gone · ' + this.selected + ' (no longer listed)';
      options.appendChild(opt);
    }
    for (const a of shown) {
      const opt = document.createElement('option');
      opt.value = a.name;
      // The state first, from the server; the OS last, in the agent's own
      // words (format and control characters removed), so that no OS text
      // can pass for a state.
      const os = a.os.replace(/[\p{Cc}\p{Cf}]/gu, '');
      opt.textContent = (a.connected ? 'online · ' : 'offline · ') + a.name + (a.connected && os ? ' · ' + os : '') +
        (a === current && unmatched ? ' (in use; not matched by the filter)' : '');
      opt.title = Object.entries(a.labels).map(([k, v]) => k + '=' + v).join(', ');
      options.appendChild(opt);
    }
    this.select.replaceChildren(options);
    this.select.disabled = shown.length === 0 && !gone;
    this.select.value = pick;
    this.choose(pick, false);
  }

  /** Shows `name` as the choice (another tab came to the front), without remembering it. */
  showChoice(name: string): void {
    this.selected = name;
    this.draw();
  }

  /** Selects `name`; a user's choice is remembered for the next visit. */
  choose(name: string, byUser: boolean): void {
    const changed = name !== this.selected;
    this.selected = name;
    if (byUser) savePref(this.store, AGENT_KEY, name);
    this.changed(name, byUser, changed);
  }
}
