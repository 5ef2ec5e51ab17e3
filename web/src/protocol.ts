// The console protocol (browser <-> server), docs/protocol.md section 2.
// These types mirror src/server/messages.rs (ClientMessage, ServerMessage)
// and src/vocab.rs (Signal, ErrorCode, ExitStatus); a change there must be
// made here too.
//
// Text frames carry one JSON object each, discriminated by `type`. Binary
// frames from the server are command output (see `decodeOutput`).

import { isHighSurrogate, utf8Length, wellFormed } from './text';

// ------------------------------------------------------------ shared words

/** Signals a client may deliver to a command (Ctrl-C is INT). */
export type Signal = 'INT' | 'TERM' | 'KILL' | 'HUP';

/** Roles, weakest first. The server names one in `hello`. */
export type Role = 'viewer' | 'operator' | 'admin';

/**
 * Stable error codes. The agent's own channel codes pass through too, and a
 * newer server may send codes this page does not know: any string is
 * accepted, the known ones are listed for the reader and the editor.
 */
export type ErrorCode =
  | 'bad_request' | 'session_expired' | 'forbidden' | 'too_many_commands'
  | 'too_large' | 'agent_unavailable' | 'agent_lost'
  | 'bad_channel' | 'channel_in_use' | 'too_many_channels' | 'bad_exec'
  | 'not_running' | 'stdin_closed' | 'stdin_overflow' | 'bad_signal' | 'unexpected'
  | (string & Record<never, never>);

export interface PtySize {
  cols: number;
  rows: number;
}

/** How a command ended: the same four fields on every wire. */
export interface ExitStatus {
  /** The exit code, when the process exited. */
  code: number | null;
  /** The signal that killed it, by name without SIG ("SEGV"), when one did. */
  signal: string | null;
  /** Killed because its time ran out (and only then). */
  timed_out: boolean;
  duration_ms: number;
}

export interface AgentStatus {
  name: string;
  addr: string;
  connected: boolean;
}

// ------------------------------------------------------------ browser -> server

/** Command mode: `cmd` with `sh -c`; shell mode: `pty` without `cmd` starts a login shell. */
export type ExecMessage =
  | { type: 'exec'; id: number; cmd: string; pty?: PtySize; agent?: string }
  | { type: 'exec'; id: number; pty: PtySize; cmd?: undefined; agent?: string };

export interface StdinMessage {
  type: 'stdin';
  id: number;
  /** Keystrokes or a line of input, sent as UTF-8. */
  data: string;
  /** Ends the command's input after `data` (Ctrl-D in command mode). */
  eof?: boolean;
}

export type ClientMessage =
  | ExecMessage
  | StdinMessage
  | { type: 'signal'; id: number; signal: Signal }
  | { type: 'resize'; id: number; cols: number; rows: number }
  /** Kill the command; its `exit` still follows. */
  | { type: 'close'; id: number }
  /** The page has drawn `bytes` more bytes of that command's output. */
  | { type: 'ack'; id: number; bytes: number };

// ------------------------------------------------------------ server -> browser

export type HelloMessage = { type: 'hello'; user: string; role: Role; agents: AgentStatus[] };
export type ExitMessage = { type: 'exit'; id: number } & ExitStatus;
/**
 * With an `id`, `final: true` means that command is over (no `exit`
 * follows), `final: false` that it goes on and its `exit` still comes.
 */
export type ErrorMessage = { type: 'error'; code: ErrorCode; message: string; id?: number; final?: boolean };
export type ShutdownMessage = { type: 'shutdown'; message: string };

export type ServerMessage =
  | HelloMessage
  | { type: 'agents'; agents: AgentStatus[] }
  | { type: 'started'; id: number }
  | ExitMessage
  | ErrorMessage
  | ShutdownMessage;

const SERVER_TYPES: ReadonlySet<string> = new Set<ServerMessage['type']>(
  ['hello', 'agents', 'started', 'exit', 'error', 'shutdown'],
);

/**
 * A text frame as a server message, or null for anything else: not JSON,
 * not an object, or a type this page does not know (a newer server; ignored).
 * Only the `type` is checked; handlers stay defensive about the fields.
 */
export function decodeServerMessage(text: string): ServerMessage | null {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (!value || typeof value !== 'object') return null;
  const type = (value as { type?: unknown }).type;
  return typeof type === 'string' && SERVER_TYPES.has(type) ? value as ServerMessage : null;
}

// ------------------------------------------------------------ output frames

/** Byte 0 of an output frame. */
export const STDOUT = 1;
export const STDERR = 2;

export interface OutputFrame {
  /** STDOUT or STDERR. */
  stream: number;
  id: number;
  /** The output exactly as the command wrote it (not necessarily UTF-8). */
  bytes: Uint8Array;
}

/**
 * A binary frame: byte 0 the stream, bytes 1-4 the id (unsigned 32-bit
 * big-endian, DataView's default), the rest the output. Null when too short.
 */
export function decodeOutput(buffer: ArrayBuffer): OutputFrame | null {
  if (buffer.byteLength < 5) return null;
  const view = new DataView(buffer);
  return { stream: view.getUint8(0), id: view.getUint32(1), bytes: new Uint8Array(buffer, 5) };
}

// ------------------------------------------------------------ sizes

/** The server closes the socket on a browser message over 1 MiB of JSON text. */
export const MAX_MESSAGE = 1024 * 1024;

/**
 * Size of the `exec` message that would carry `cmd` (with the largest id,
 * so the answer never depends on how many commands ran before).
 */
export function execMessageBytes(cmd: string, agent: string): number {
  const msg: ExecMessage = { type: 'exec', id: 0xffffffff, cmd, agent };
  return utf8Length(JSON.stringify(msg));
}

// A big paste goes in pieces of at most 16 Ki UTF-16 units (under 64 KiB
// of JSON), never splitting a surrogate pair: the server refuses messages
// over 1 MiB, and smaller messages keep the socket responsive.
export const STDIN_PIECE = 16 * 1024;

/**
 * The `stdin` messages that carry `data`. With `eof`, the last piece also
 * ends the command's input (an empty `data` still makes one message).
 */
export function stdinMessages(id: number, data: string, eof: boolean): StdinMessage[] {
  data = wellFormed(data);
  const out: StdinMessage[] = [];
  let i = 0;
  do {
    let end = Math.min(i + STDIN_PIECE, data.length);
    if (end < data.length && isHighSurrogate(data.charCodeAt(end - 1))) end -= 1;
    const msg: StdinMessage = { type: 'stdin', id, data: data.slice(i, end) };
    if (eof && end >= data.length) msg.eof = true;
    out.push(msg);
    i = end;
  } while (i < data.length);
  return out;
}
