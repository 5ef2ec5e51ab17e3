// The agent picker: the agents the server knows, which one commands go to,
// and the <select> that shows them. The choice a user makes is remembered.

import { loadPref, savePref, type KeyValueStore } from './storage';

export const AGENT_KEY = 'conch.agent';

export interface Agent {
  name: string;
  connected: boolean;
}

export class Agents {
  private list: Agent[] = [];
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

  /** A new list from the server (`hello`, `agents`); anything malformed is dropped. */
  set(list: unknown): void {
    this.list = (Array.isArray(list) ? list as unknown[] : [])
      .filter((a): a is { name: string; connected?: unknown } =>
        !!a && typeof a === 'object' && typeof (a as { name?: unknown }).name === 'string')
      .map((a) => ({ name: a.name, connected: !!a.connected }));

    // Keep the selection if the agent is still listed (even offline, so the
    // status can say so); otherwise prefer the remembered one, then any
    // connected agent, then the first.
    const names = this.list.map((a) => a.name);
    let pick = this.selected;
    if (!names.includes(pick)) {
      const remembered = loadPref(this.store, AGENT_KEY);
      const connected = this.list.find((a) => a.connected);
      pick = remembered !== null && names.includes(remembered) ? remembered
        : connected ? connected.name
          : names[0] || '';
    }

    // A fragment, not replaceChildren(...options): no argument spreading of
    // a list whose length the server decides.
    const options = document.createDocumentFragment();
    for (const a of this.list) {
      const opt = document.createElement('option');
      opt.value = a.name;
      opt.textContent = a.connected ? a.name : a.name + ' (offline)';
      options.appendChild(opt);
    }
    this.select.replaceChildren(options);
    this.select.disabled = this.list.length === 0;
    this.select.value = pick;
    this.choose(pick, false);
  }

  /** Selects `name`; a user's choice is remembered for the next visit. */
  choose(name: string, byUser: boolean): void {
    const changed = name !== this.selected;
    this.selected = name;
    if (byUser) savePref(this.store, AGENT_KEY, name);
    this.changed(name, byUser, changed);
  }
}
