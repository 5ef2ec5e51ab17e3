// The console protocol (browser <-> server), docs/protocol.md section 2.
// The message types are generated from the Rust ones (src/server/messages.rs
// and the types it uses) into ./generated/protocol.ts; a Rust test fails
// when that file is out of date, and tsc checks this page against it.
//
// Text frames carry one JSON object each, discriminated by `type`. Binary
// frames from the server are command output (see `decodeOutput`).

import type { ClientMessage, ServerMessage } from './generated/protocol';
import { isHighSurrogate, utf8Length, wellFormed } from './text';

export type {
  AgentSession, AgentStatus, ClientMessage, ErrorCode, ExitStatus, PtySize, Role, ServerMessage, Signal,
} from './generated/protocol';

// ------------------------------------------------------------ browser -> server

type ExecFields = Extract<ClientMessage, { type: 'exec' }>;
/**
 * What the page sends: command mode's `cmd` (with `sh -c`), or shell mode's
 * `pty` without `cmd` (a login shell). Narrower than the generated type,
 * which also admits neither (the server refuses that).
 */
export type ExecMessage =
  | (ExecFields & { cmd: string })
  | (ExecFields & { pty: NonNullable<ExecFields['pty']>; cmd?: undefined });
export type StdinMessage = Extract<ClientMessage, { type: 'stdin' }>;

// ------------------------------------------------------------ server -> browser

export type HelloMessage = Extract<ServerMessage, { type: 'hello' }>;
export type ExitMessage = Extract<ServerMessage, { type: 'exit' }>;
/**
 * With an `id`, `final: true` means that command is over (no `exit`
 * follows), `final: false` that it goes on and its `exit` still comes.
 */
export type ErrorMessage = Extract<ServerMessage, { type: 'error' }>;
export type ShutdownMessage = Extract<ServerMessage, { type: 'shutdown' }>;
export type AttachedMessage = Extract<ServerMessage, { type: 'attached' }>;
export type DetachedMessage = Extract<ServerMessage, { type: 'detached' }>;

const SERVER_TYPES: ReadonlySet<string> = new Set<ServerMessage['type']>(
  ['hello', 'agents', 'started', 'exit', 'error', 'shutdown', 'attached', 'detached', 'sessions', 'resized'],
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
