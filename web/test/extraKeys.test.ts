import { test } from 'node:test';
import assert from 'node:assert/strict';
import { arrowKey, isOneKey, withModifiers } from '../src/extraKeys';
import { computeStatus } from '../src/status';

const CTRL = { ctrl: true, alt: false };
const ALT = { ctrl: false, alt: true };
const BOTH = { ctrl: true, alt: true };

test('Ctrl makes control characters, Alt an ESC prefix', () => {
  assert.equal(withModifiers('c', CTRL), '\x03');
  assert.equal(withModifiers('C', CTRL), '\x03');
  assert.equal(withModifiers('[', CTRL), '\x1b');
  assert.equal(withModifiers('/', CTRL), '\x1f');
  assert.equal(withModifiers('?', CTRL), '\x7f');
  assert.equal(withModifiers('é', CTRL), 'é', 'no control form: unchanged');
  assert.equal(withModifiers('b', ALT), '\x1bb');
  assert.equal(withModifiers('x', BOTH), '\x1b\x18');
});

test('modified arrows take the xterm form, in either cursor-key mode', () => {
  assert.equal(arrowKey('A', false), '\x1b[A');
  assert.equal(arrowKey('A', true), '\x1bOA');
  assert.equal(withModifiers('\x1bOD', CTRL), '\x1b[1;5D');
  assert.equal(withModifiers('\x1b[C', ALT), '\x1b[1;3C');
  assert.equal(withModifiers('\x1b[B', BOTH), '\x1b[1;7B');
  assert.equal(withModifiers('\x1b[B', { ctrl: false, alt: false }), '\x1b[B');
});

test('one key, not a paste', () => {
  assert.equal(isOneKey('a'), true);
  assert.equal(isOneKey('😀'), true);
  assert.equal(isOneKey('\x1b[A'), true);
  assert.equal(isOneKey('ls -l'), false);
});

test('the status word follows the link and the agent', () => {
  assert.equal(computeStatus('connecting', false), 'connecting');
  assert.equal(computeStatus('reconnecting', true), 'disconnected');
  assert.equal(computeStatus('shutdown', true), 'shutdown');
  assert.equal(computeStatus('ready', true), 'connected');
  assert.equal(computeStatus('ready', false), 'agent-offline');
});
