// Broadcast: command mode runs a line on every agent a selector matches,
// through the REST API's fan-out (`POST /api/v1/exec` with a `target`,
// streamed as NDJSON; the session cookie and this page's Origin
// authenticate it). Output is grouped by host: each host's output is held
// until that host ends, then printed under its name with its own exit
// code; a summary line closes the run. What a host keeps is bounded by the
// server (`max_output_bytes` per stream, asked for here).

import { sitePath } from './site';

/** Output the page asks the server to keep per stream and host: 64 KiB. */
export const HOST_OUTPUT = 64 * 1024;

/** One line of a streamed fan-out, as far as the page reads it. */
export interface FanoutLine {
  agent?: string;
  stream?: 'stdout' | 'stderr';
  data?: string;
  encoding?: 'base64';
  truncated?: 'stdout' | 'stderr';
  exit_code?: number | null;
  signal?: string | null;
  timed_out?: boolean;
  duration_ms?: number;
  error?: string;
  status?: 'ok' | 'failed' | 'unreachable';
  summary?: { total: number; ok: number; failed: number; unreachable: number };
}

/** A host's output so far, in arrival order. */
export interface HostOutput {
  pieces: { stderr: boolean; text: string }[];
  truncated: boolean;
}

/** Decodes one line's `data` to text (base64 bytes as UTF-8, invalid bytes replaced). */
export function lineText(line: FanoutLine): string {
  const data = typeof line.data === 'string' ? line.data : '';
  if (line.encoding !== 'base64') return data;
  try {
    const bin = atob(data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new TextDecoder('utf-8').decode(bytes);
  } catch {
    return '';
  }
}

/**
 * Splits NDJSON as it arrives: `push` takes a chunk of text and returns the
 * lines it completes, parsed (lines that are not JSON objects are skipped).
 */
export class NdjsonLines {
  private rest = '';

  push(chunk: string): FanoutLine[] {
    this.rest += chunk;
    const parts = this.rest.split('\n');
    this.rest = parts.pop() ?? '';
    const lines: FanoutLine[] = [];
    for (const part of parts) {
      if (!part.trim()) continue;
      try {
        const v: unknown = JSON.parse(part);
        if (v && typeof v === 'object' && !Array.isArray(v)) lines.push(v as FanoutLine);
      } catch {
        // not JSON: the server never sends it; nothing to show
      }
    }
    return lines;
  }
}

/** What a run tells its printer. */
export interface BroadcastSink {
  /** A host ended: its output, and its last line (exit or error). */
  host(name: string, output: HostOutput, last: FanoutLine): void;
  /** Every host ended. */
  summary(summary: NonNullable<FanoutLine['summary']>): void;
  /** The run failed as a whole (refused, network). */
  failed(message: string): void;
}

/**
 * A host's output made safe to print among other hosts' blocks: text, new
 * lines, tabs and colours (SGR) only. Cursor movement, erasing and every
 * other control would let one host rewrite another host's block (turn its
 * `[exit 1]` into `[exit 0]`), so they are dropped.
 */
export function printable(text: string): string {
  let out = '';
  let i = 0;
  while (i < text.length) {
    const ch = text[i]!;
    const code = ch.charCodeAt(0);
    if (ch === '\x1b' && text[i + 1] === '[') {
      // CSI: parameters and intermediates, then a final byte; kept only
      // when it sets colours (final `m`) and is of a sane length.
      let j = i + 2;
      while (j < text.length && j - i < 64 && /[0-9;:<=>?!"#$%&'()*+,\-./ ]/.test(text[j]!)) j++;
      const seq = text.slice(i, j + 1);
      if (text[j] === 'm' && /^\x1b\[[0-9;:]*m$/.test(seq)) out += seq;
      i = j + 1;
      continue;
    }
    if (ch === '\x1b' && text[i + 1] === ']') {
      // OSC (a title, a link): up to BEL or ST, dropped.
      let j = i + 2;
      while (j < text.length && text[j] !== '\x07' && !(text[j] === '\x1b' && text[j + 1] === '\\')) j++;
      i = text[j] === '\x1b' ? j + 2 : j + 1;
      continue;
    }
    if (ch === '\x1b') {
      i += 2; // any other escape: it and its one character go
      continue;
    }
    if (ch === '\n' || ch === '\t' || !(code < 0x20 || code === 0x7f || (code >= 0x80 && code < 0xa0))) {
      out += ch;
    }
    i += 1;
  }
  return out;
}

/** "1 host" or "N hosts". */
export function hosts(n: number): string {
  return n + (n === 1 ? ' host' : ' hosts');
}

/** Collects hosts' lines and hands each host to the sink when it ends. */
export class Grouper {
  private readonly hosts = new Map<string, HostOutput>();

  constructor(private readonly sink: BroadcastSink) {}

  /** Hosts that have begun and not ended, with their output so far. */
  pending(): [string, HostOutput][] {
    return Array.from(this.hosts.entries());
  }

  /** Returns true once the summary has come. */
  line(line: FanoutLine): boolean {
    if (line.summary) {
      this.sink.summary(line.summary);
      return true;
    }
    const name = typeof line.agent === 'string' ? line.agent : '?';
    let out = this.hosts.get(name);
    if (!out) {
      out = { pieces: [], truncated: false };
      this.hosts.set(name, out);
    }
    if (typeof line.stream === 'string') {
      out.pieces.push({ stderr: line.stream === 'stderr', text: lineText(line) });
    }
    if (line.truncated) out.truncated = true;
    if (line.status) {
      this.hosts.delete(name);
      this.sink.host(name, out, line);
    }
    return false;
  }
}

/**
 * Runs `cmd` on the agents `target` matches, feeding `grouper` (made on
 * `sink`); resolves when the run is over (or `signal` aborts it, which
 * makes the server kill every host's command).
 */
export async function broadcast(
  target: string,
  cmd: string,
  sink: BroadcastSink,
  grouper: Grouper,
  signal: AbortSignal,
): Promise<void> {
  let response: Response;
  try {
    response = await fetch(sitePath('/api/v1/exec'), {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/x-ndjson' },
      body: JSON.stringify({ command: cmd, target, max_output_bytes: HOST_OUTPUT }),
      credentials: 'same-origin',
      signal,
    });
  } catch (e) {
    if (!signal.aborted) sink.failed('cannot reach the server: ' + String(e));
    return;
  }
  if (!response.ok || !response.body) {
    let detail = response.statusText;
    try {
      const problem = await response.json() as { detail?: unknown };
      if (typeof problem.detail === 'string') detail = problem.detail;
    } catch {
      // not problem JSON
    }
    sink.failed(detail || ('HTTP ' + response.status));
    return;
  }
  const lines = new NdjsonLines();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const line of lines.push(value)) {
        if (grouper.line(line)) return;
      }
    }
    if (!signal.aborted) sink.failed('the answer ended before its summary');
  } catch (e) {
    if (!signal.aborted) sink.failed('the answer broke off: ' + String(e));
  }
}
