// The connection status in the top bar: a coloured dot (CSS, from
// data-state) and a word.

import type { LinkState } from './connection';

export type Status = 'connecting' | 'connected' | 'agent-offline' | 'disconnected' | 'shutdown';

const STATUS_TEXT: Record<Status, string> = {
  'connecting': 'connecting…',
  'connected': 'connected',
  'agent-offline': 'agent offline',
  'disconnected': 'disconnected — reconnecting…',
  'shutdown': 'server shutting down',
};

export function computeStatus(link: LinkState, agentConnected: boolean): Status {
  switch (link) {
    case 'shutdown': return 'shutdown';
    case 'connecting': return 'connecting';
    case 'reconnecting': return 'disconnected';
    case 'ready': return agentConnected ? 'connected' : 'agent-offline';
  }
}

/** Draws `s`, touching the DOM only on a change (the element is a live region). */
export function renderStatus(el: HTMLElement, s: Status): void {
  if (el.dataset['state'] !== s) el.dataset['state'] = s;
  if (el.textContent !== STATUS_TEXT[s]) el.textContent = STATUS_TEXT[s];
}
