// Generated from the Rust types of src/server/messages.rs (and those they
// use: src/vocab.rs, src/server/auth.rs, src/server/agents.rs,
// src/protocol/message.rs) by
// `CONCH_UPDATE_GENERATED=1 cargo test --lib typescript`. Do not edit.

/** Stable error codes, shared by the agent protocol and the console. */
export type ErrorCode =
  | 'protocol'
  | 'auth'
  | 'busy'
  | 'bad_channel'
  | 'channel_in_use'
  | 'too_many_channels'
  | 'bad_exec'
  | 'not_running'
  | 'stdin_closed'
  | 'stdin_overflow'
  | 'bad_signal'
  | 'unexpected'
  | 'bad_request'
  | 'session_expired'
  | 'forbidden'
  | 'too_many_commands'
  | 'too_large'
  | 'agent_unavailable'
  | 'agent_lost'
  | 'no_session'
  | 'too_many_sessions'
  | 'not_found'
  | 'permission_denied'
  | 'exists'
  | 'disk_full'
  | 'not_a_file'
  | 'size_mismatch'
  | 'hash_mismatch'
  | 'range_not_satisfiable'
  | 'file_changed'
  | 'file_error'
  | (string & Record<never, never>);

/**
 * A signal a client may deliver to a command (Ctrl-C is `INT`).
 */
export type Signal = "INT" | "TERM" | "KILL" | "HUP";

/**
 * What a user may do.
 */
export type Role = "viewer" | "operator" | "admin";

/**
 * A terminal size in character cells.
 */
export type PtySize = { cols: number, rows: number, };

/**
 * How a command ended: the same four fields on every wire.
 */
export type ExitStatus = { 
/**
 * The exit code, when the process exited.
 */
code: number | null, 
/**
 * The signal that killed it, by name without `SIG` (`"SEGV"`), when
 * one did.
 */
signal: string | null, 
/**
 * Killed because its `timeout_ms` ran out (and only then).
 */
timed_out: boolean, duration_ms: number, };

/**
 * What an agent tells about its host, in every `pong`: the server shows
 * it, and never trusts it for access decisions (labels do that, and come
 * from the server's own agents file).
 */
export type HostFacts = { hostname: string, 
/**
 * The distribution's name and version (`PRETTY_NAME` of os-release).
 */
os: string, 
/**
 * The kernel's release (`uname -r`).
 */
kernel: string, 
/**
 * The CPU architecture (`x86_64`, `aarch64`).
 */
arch: string, 
/**
 * The agent's conch version.
 */
version: string, 
/**
 * Seconds since the host booted.
 */
uptime_s: number, 
/**
 * Load averages over 1, 5 and 15 minutes.
 */
load: [number, number, number], };

/**
 * What the API and the page show about an agent.
 */
export type AgentStatus = { name: string, 
/**
 * `HOST:PORT` the server dials; absent for an agent that dials in.
 */
addr?: string, 
/**
 * Whether the agent connects to the server (`--agent-listen`).
 */
dials_in: boolean, connected: boolean, 
/**
 * The agent's labels, from the server's agents file.
 */
labels: { [key in string]: string }, 
/**
 * When the current connection came up (RFC 3339), while connected.
 */
connected_since?: string, 
/**
 * When the agent was last heard from (RFC 3339); absent if never.
 */
last_seen?: string, 
/**
 * Round-trip time of the last ping, in milliseconds.
 */
rtt_ms?: number, 
/**
 * What the agent last said about its host.
 */
facts?: HostFacts, };

/**
 * One session as the agent lists it.
 */
export type SessionInfo = { id: string, owner: string, title: string, 
/**
 * The command line, or empty for a login shell.
 */
command: string, 
/**
 * Milliseconds since the Unix epoch.
 */
started_ms: number, 
/**
 * When a client last attached (the opening counts).
 */
last_attached_ms: number, cols: number, rows: number, 
/**
 * A writer is attached.
 */
attached: boolean, 
/**
 * Read-only watchers attached.
 */
watching: number, 
/**
 * Users who may watch, besides the owner.
 */
watchers: Array<string>, 
/**
 * When detached: milliseconds since the Unix epoch at which the
 * agent ends it, unless someone attaches first.
 */
ends_at_ms?: number | null, };

/**
 * A session as the console and the REST API list it: where it runs, and
 * what its agent says of it.
 */
export type AgentSession = { agent: string, id: string, owner: string, title: string, 
/**
 * The command line, or empty for a login shell.
 */
command: string, 
/**
 * Milliseconds since the Unix epoch.
 */
started_ms: number, 
/**
 * When a client last attached (the opening counts).
 */
last_attached_ms: number, cols: number, rows: number, 
/**
 * A writer is attached.
 */
attached: boolean, 
/**
 * Read-only watchers attached.
 */
watching: number, 
/**
 * Users who may watch, besides the owner.
 */
watchers: Array<string>, 
/**
 * When detached: milliseconds since the Unix epoch at which the
 * agent ends it, unless someone attaches first.
 */
ends_at_ms?: number | null, };

/**
 * A message from the browser.
 */
export type ClientMessage = { "type": "exec", id: number, cmd?: string, pty?: PtySize, agent?: string, } | { "type": "stdin", id: number, 
/**
 * Keystrokes or a line of input, sent as UTF-8.
 */
data: string, 
/**
 * Ends the command's input after `data` (Ctrl-D in command mode).
 */
eof?: boolean, } | { "type": "signal", id: number, signal: Signal, } | { "type": "resize", id: number, cols: number, rows: number, } | { "type": "close", id: number, } | { "type": "ack", id: number, bytes: number, } | { "type": "attach", id: number, session: string, agent?: string, cols: number, rows: number, watch?: boolean, } | { "type": "detach", id: number, } | { "type": "list_sessions" };

/**
 * A text message to the browser.
 */
export type ServerMessage = { "type": "hello", user: string, role: Role, agents: Array<AgentStatus>, } | { "type": "agents", agents: Array<AgentStatus>, } | { "type": "started", id: number, recording?: string, } | { "type": "attached", id: number, agent: string, session: string, watch: boolean, } | { "type": "detached", id: number, reason: string, } | { "type": "resized", id: number, cols: number, rows: number, } | { "type": "sessions", sessions: Array<AgentSession>, } | { "type": "exit", id: number, 
/**
 * The exit code, when the process exited.
 */
code: number | null, 
/**
 * The signal that killed it, by name without `SIG` (`"SEGV"`), when
 * one did.
 */
signal: string | null, 
/**
 * Killed because its `timeout_ms` ran out (and only then).
 */
timed_out: boolean, duration_ms: number, } | { "type": "error", code: ErrorCode, message: string, id?: number, final?: boolean, } | { "type": "shutdown", message: string, };
