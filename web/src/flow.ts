// Output flow control (docs/protocol.md, "Flow control"). The server gives
// each command a window of 512 KiB and stops it when that much output is
// unacknowledged; the page acknowledges what xterm has actually drawn.
// Acking every 32 KiB (or whenever the terminal has caught up) keeps far
// below the window without sending an ack per frame.
//
// This module also hands out command ids: every id names one flow, and one
// counter for commands and shells keeps them unique on the socket.

export const ACK_BATCH = 32 * 1024;

class Flow {
  /** Bytes drawn and not yet acknowledged. */
  consumed = 0;
  /** Writes handed to the terminal and not yet drawn. */
  pending = 0;
}

export class Flows {
  private nextId = 1;
  private readonly flows = new Map<number, Flow>();

  /** `ack` sends the acknowledgement of `bytes` drawn bytes of command `id`. */
  constructor(private readonly ack: (id: number, bytes: number) => void) {}

  /** A new command id, with its flow open. */
  open(): number {
    const id = this.nextId++;
    this.flows.set(id, new Flow());
    return id;
  }

  /** Whether output for `id` is still wanted (closed or unknown ids: nobody shows it). */
  has(id: number): boolean {
    return this.flows.has(id);
  }

  /** The command is over or abandoned: no more acks for it. */
  close(id: number): void {
    this.flows.delete(id);
  }

  /** The socket is gone, and with it every command. */
  clear(): void {
    this.flows.clear();
  }

  /**
   * `n` bytes of `id` are being written to the terminal; call the returned
   * function when the terminal has drawn them. Null if `id` is not open.
   */
  writing(id: number, n: number): (() => void) | null {
    const flow = this.flows.get(id);
    if (!flow) return null;
    flow.pending += 1;
    return () => {
      flow.pending -= 1;
      flow.consumed += n;
      if (flow.consumed >= ACK_BATCH || flow.pending === 0) this.sendAck(id, flow);
    };
  }

  private sendAck(id: number, flow: Flow): void {
    // A finished command needs no more acks (its flow record is gone).
    if (this.flows.get(id) !== flow || flow.consumed === 0) return;
    this.ack(id, flow.consumed);
    flow.consumed = 0;
  }
}
