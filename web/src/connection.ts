// The console's WebSocket: connecting, reconnecting with backoff, and the
// link's part of the status (connecting / ready / reconnecting / shutdown).
// What the messages mean is for the caller.

import { sitePath } from './site';
import {
  decodeOutput, decodeServerMessage,
  type ClientMessage, type HelloMessage, type OutputFrame, type ServerMessage,
} from './protocol';

export const BACKOFF_MIN_MS = 500;
export const BACKOFF_MAX_MS = 10000;

/** The link as the status shows it. */
export type LinkState = 'connecting' | 'ready' | 'reconnecting' | 'shutdown';

export interface ConnectionHandlers {
  /** `hello` arrived: the link is ready. `reconnected` after an earlier one. */
  hello(msg: HelloMessage, reconnected: boolean): void;
  /** Any other server message. */
  message(msg: Exclude<ServerMessage, HelloMessage>): void;
  output(frame: OutputFrame): void;
  /** The link state changed (the status needs drawing). */
  state(): void;
  /** A ready socket closed: whatever ran on its server side is gone. */
  lost(): void;
}

export class Connection {
  private ws: WebSocket | null = null;
  /** Socket open and `hello` received. */
  private ready = false;
  /** Distinguishes "connecting" from "reconnecting". */
  private everReady = false;
  private shuttingDown = false;
  private backoff = BACKOFF_MIN_MS;
  private reconnectTimer = 0;
  /** The page is logging out: a closed socket is expected, not a loss. */
  private leaving = false;

  constructor(private readonly handlers: ConnectionHandlers) {}

  get state(): LinkState {
    if (this.shuttingDown) return 'shutdown';
    if (!this.ready) return this.everReady ? 'reconnecting' : 'connecting';
    return 'ready';
  }

  isReady(): boolean {
    return this.ready && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Sends `msg` if the socket is open; false if it was dropped. */
  send(msg: ClientMessage): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  connect(): void {
    this.reconnectTimer = 0;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let ws: WebSocket;
    try {
      ws = new WebSocket(proto + '//' + location.host + sitePath('/ws'));
    } catch {
      this.scheduleReconnect();
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.handlers.state();

    // Events of a socket that has been replaced are ignored.
    ws.onmessage = (ev: MessageEvent<string | ArrayBuffer>) => {
      if (ws !== this.ws) return;
      if (typeof ev.data === 'string') {
        const msg = decodeServerMessage(ev.data);
        if (msg) this.dispatch(msg);
      } else {
        const frame = decodeOutput(ev.data);
        if (frame) this.handlers.output(frame);
      }
    };
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.ws = null;
      // "shutting down" was true while the socket lived; from now on the
      // page is reconnecting, to this server's successor if it comes back.
      this.shuttingDown = false;
      this.disconnected();
    };
    // 'error' is always followed by 'close', which does the work.
    ws.onerror = () => {};
  }

  private dispatch(msg: ServerMessage): void {
    if (msg.type === 'hello') {
      const reconnected = this.everReady;
      this.ready = true;
      this.everReady = true;
      this.shuttingDown = false;
      this.backoff = BACKOFF_MIN_MS;
      this.handlers.hello(msg, reconnected);
      return;
    }
    // The socket closes next; until then the status says why.
    if (msg.type === 'shutdown') this.shuttingDown = true;
    this.handlers.message(msg);
  }

  /**
   * The page is logging out: the server ends the session and closes the
   * socket, and that is no reason to ask whether the login expired, nor to
   * reconnect (both would only meet a 401 while the page navigates away).
   */
  leave(): void {
    this.leaving = true;
    window.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = 0;
  }

  private disconnected(): void {
    if (this.leaving) return;
    const wasReady = this.ready;
    this.ready = false;
    this.handlers.state();
    if (wasReady) this.handlers.lost();
    this.checkSession();
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.reconnectTimer) return;
    const delay = this.backoff;
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
    this.reconnectTimer = window.setTimeout(() => this.connect(), delay);
  }

  // A WebSocket refused with 401 looks like any other failure from script,
  // so ask the session endpoint: 401 there means the login expired.
  private checkSession(): void {
    fetch(sitePath('/api/v1/session'), { credentials: 'same-origin', cache: 'no-store' })
      .then((res) => {
        if (res.status === 401) location.href = sitePath('/login');
      })
      .catch(() => {
        // server unreachable: keep retrying the socket
      });
  }
}
