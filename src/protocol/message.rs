//! Typed frame headers.
//!
//! A header on the wire is one JSON object with `type`, `ch` and (when there
//! is a payload) `len`. [`Message`] is the `type` and its own fields; `ch` and
//! `len` belong to the frame and live in [`super::Frame`]. Unknown fields are
//! ignored so that a newer peer can add optional fields without breaking an
//! older one; unknown `type`s are refused, since their meaning cannot be
//! guessed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::vocab::{ErrorCode, ExitStatus, Signal};

/// Every message type this version of the protocol knows.
pub const KNOWN_TYPES: &[&str] = &[
    "hello",
    "auth",
    "ready",
    "error",
    "exec",
    "stdin",
    "signal",
    "resize",
    "window",
    "close",
    "stdout",
    "stderr",
    "exit",
    "ping",
    "pong",
    "session",
    "attach",
    "detach",
    "detached",
    "snapshot",
    "list_sessions",
    "session_list",
    "end_session",
    "update_session",
    "put",
    "get",
    "file",
];

/// One frame header's `type` and the fields that go with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Agent → client, first frame of a connection, in the clear: the
    /// protocol version, the agent's nonce, whether TLS follows, and the
    /// name the agent claims (always sent by an agent that dials in, so
    /// that the server knows which key to use; `ready` then proves it).
    Hello {
        version: u32,
        nonce: String,
        #[serde(default)]
        tls: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Client → agent, the answer to `hello` (inside TLS). `name` and
    /// `capabilities` say what the client is; the MAC covers them.
    Auth {
        version: u32,
        nonce: String,
        mac: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        capabilities: Vec<String>,
    },
    /// Agent → client: authenticated; `mac` proves the agent holds the key.
    /// `max_channels` tells the client how many channels it may run at
    /// once, so that it can share them out fairly among its users. `name`
    /// and `capabilities` say what the agent is; the MAC covers them.
    Ready {
        mac: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_channels: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        capabilities: Vec<String>,
    },
    /// Either way: something went wrong. `code` is stable, `message` is for people.
    Error { code: ErrorCode, message: String },
    /// Client → agent: start a command on a fresh channel. The payload is
    /// the [`ExecRequest`] as JSON: a command line and its environment can
    /// be as large as the kernel allows, far beyond what a header may hold.
    Exec,
    /// Client → agent: bytes for the process's standard input (the payload).
    Stdin {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        eof: bool,
    },
    /// Client → agent: deliver a signal to the channel's process group.
    Signal { signal: Signal },
    /// Client → agent: the terminal size changed (PTY channels only).
    Resize { cols: u16, rows: u16 },
    /// Client → agent: the client consumed `add` more bytes of output.
    Window { add: u64 },
    /// Client → agent: kill the channel's process group and drop its output.
    Close,
    /// Agent → client: output bytes (the payload).
    Stdout,
    /// Agent → client: error output bytes (the payload).
    Stderr,
    /// Agent → client: the channel's command ended; the last frame of a channel.
    Exit(ExitStatus),
    /// Liveness probe; answered by `pong` with the same `id`.
    Ping { id: u64 },
    /// The answer to `ping`, with what the agent's host looks like now.
    Pong {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        facts: Option<HostFacts>,
    },
    /// Agent → client, first on a channel that opened a session (`exec`
    /// with `session`) or attached to one: the session's id.
    Session { id: String },
    /// Client → agent: attach this fresh channel to a running session.
    /// `watch` attaches read-only; otherwise the channel becomes the
    /// session's one writer (a writer already there is detached) and its
    /// size becomes the terminal's.
    Attach {
        session: String,
        cols: u16,
        rows: u16,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        watch: bool,
        /// Initial output credit in bytes (default [`DEFAULT_WINDOW`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u64>,
        /// With `watch`: the user who watches only because the session is
        /// shared with them; detached when `update_session` no longer lists
        /// them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        watcher: Option<String>,
    },
    /// Client → agent: leave the session running and end this channel.
    Detach,
    /// Agent → client: the channel is no longer attached (the client
    /// detached, or another writer took over); the last frame of a channel
    /// whose session goes on.
    Detached { reason: String },
    /// Agent → client: bytes that redraw the session's terminal from a
    /// reset (scrollback, screen, cursor, modes), sent after `session` on
    /// an attach and before live output; counted against the window.
    Snapshot,
    /// Client → agent (channel 0): list the agent's sessions.
    ListSessions { id: u64 },
    /// Agent → client (channel 0): the answer to `list_sessions`; the
    /// payload is a JSON array of [`SessionInfo`].
    SessionList { id: u64 },
    /// Client → agent (channel 0): end a session (its process group is
    /// killed; attached channels get its `exit`).
    EndSession { session: String },
    /// Client → agent (channel 0): change a session's title or who may
    /// watch it.
    UpdateSession {
        session: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        watchers: Option<Vec<String>>,
    },
    /// Client → agent: write a file, on a fresh channel. The payload is
    /// the [`PutRequest`] as JSON; the file's bytes follow as `stdin`
    /// frames under the stdin credit, the last with `eof`. The agent
    /// answers `file` then `exit` (code 0), or `error` then `exit`.
    Put,
    /// Client → agent: read a file, on a fresh channel. The payload is the
    /// [`GetRequest`] as JSON. The agent answers `file`, the bytes as
    /// `stdout` frames under the output credit, a second `file` (with the
    /// hash, when the whole file was read) and `exit`; or `error` and `exit`.
    Get,
    /// Agent → client: what a `put` wrote or a `get` reads; the payload is
    /// a [`FileInfo`] as JSON.
    File,
}

/// A path on the agent's host. Paths are bytes on Unix: one that is
/// UTF-8 travels as a JSON string, any other as `{"b64": "..."}` (its
/// bytes in standard base64), so that no file is out of reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WirePath(pub Vec<u8>);

impl WirePath {
    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(&self.0)
    }

    /// For people (logs, messages): lossy where the bytes are not UTF-8.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl From<&std::path::Path> for WirePath {
    fn from(p: &std::path::Path) -> Self {
        WirePath(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec())
    }
}

impl Serialize for WirePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut map = s.serialize_map(Some(1))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(&self.0);
                map.serialize_entry("b64", &b64)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Bytes { b64: String },
        }
        match Form::deserialize(d)? {
            Form::Text(text) => Ok(WirePath(text.into_bytes())),
            Form::Bytes { b64 } => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map(WirePath)
                    .map_err(|e| serde::de::Error::custom(format!("a path's b64: {e}")))
            }
        }
    }
}

/// The fields of a `put`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// Where to write: absolute, or relative to the home directory of the
    /// agent's user (to the shell's working directory with `session`).
    pub path: WirePath,
    /// When `path` is a directory, the file goes in it under this name
    /// (one path component).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<WirePath>,
    /// The size the client will send, when it knows: anything else is
    /// refused (`size_mismatch`) and nothing is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The SHA-256 (hex) the client expects: a mismatch is refused
    /// (`hash_mismatch`) and nothing is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Permission bits; default: those of the file replaced, or 0666 less
    /// the agent's umask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// `USER`, `USER:GROUP` or `:GROUP` (names or numbers); needs the
    /// rights `chown` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Replace an existing file; without it an existing one is `exists`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overwrite: bool,
    /// Resolve a relative `path` against the working directory of this
    /// session's shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// The fields of a `get`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    /// What to read; relative as for [`PutRequest::path`].
    pub path: WirePath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Read from this byte on (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Read at most this many bytes (default: to the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Read the last this many bytes instead (an HTTP `bytes=-N` range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<u64>,
    /// Initial output credit in bytes (default [`DEFAULT_WINDOW`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// A file as `put` wrote it or `get` reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The absolute path (symbolic links resolved).
    pub path: WirePath,
    /// The whole file's size.
    pub size: u64,
    /// `get`: the first byte sent, and how many are sent.
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub length: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// The whole file's SHA-256 (hex), when known: always after a `put`;
    /// for a `get`, in its last `file` once it read the whole file, or in
    /// its first when the agent hashed this very version of it before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `put`: no file was there before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
}

/// What makes an `exec` open a session: a shell (with a `pty`) that the
/// agent keeps when its channel goes, for a later `attach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOptions {
    /// Who the server opened it for; the agent keeps it, the server decides
    /// who may attach.
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Refuse (`too_many_sessions`) if `owner` already has this many
    /// sessions on the agent: the server's per-user share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_owner: Option<u32>,
}

/// One session as the agent lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct SessionInfo {
    pub id: String,
    pub owner: String,
    pub title: String,
    /// The command line, or empty for a login shell.
    pub command: String,
    /// Milliseconds since the Unix epoch.
    #[cfg_attr(test, ts(type = "number"))]
    pub started_ms: u64,
    /// When a client last attached (the opening counts).
    #[cfg_attr(test, ts(type = "number"))]
    pub last_attached_ms: u64,
    pub cols: u16,
    pub rows: u16,
    /// A writer is attached.
    pub attached: bool,
    /// Read-only watchers attached.
    pub watching: u32,
    /// Users who may watch, besides the owner.
    pub watchers: Vec<String>,
    /// When detached: milliseconds since the Unix epoch at which the
    /// agent ends it, unless someone attaches first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(type = "number | null", optional))]
    pub ends_at_ms: Option<u64>,
}

/// What an agent tells about its host, in every `pong`: the server shows
/// it, and never trusts it for access decisions (labels do that, and come
/// from the server's own agents file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct HostFacts {
    pub hostname: String,
    /// The distribution's name and version (`PRETTY_NAME` of os-release).
    pub os: String,
    /// The kernel's release (`uname -r`).
    pub kernel: String,
    /// The CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// The agent's conch version.
    pub version: String,
    /// Seconds since the host booted.
    pub uptime_s: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
}

/// The fields of an `exec` header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// A command line for `sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// A program and its arguments, run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Added to (and overriding) the agent's own environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Run under a pseudo-terminal of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Initial output credit in bytes (default [`DEFAULT_WINDOW`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Open a session: the shell outlives this channel (needs `pty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionOptions>,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Stdin credit of a channel: the client may have at most this many bytes
/// of `stdin` payload (an empty frame counts as one byte) sent and not yet
/// written to the process: 1 MiB. The agent returns credit with `window`
/// frames as the process reads, so the connection never has to wait for a
/// process that does not read, and a client that overruns the credit gets
/// `stdin_overflow` instead of unbounded buffering.
pub const STDIN_WINDOW: usize = 1024 * 1024;

/// Output credit a channel starts with when `exec` names none: 1 MiB.
pub const DEFAULT_WINDOW: u64 = 1024 * 1024;

impl Message {
    /// The `type` string of this message, as it appears on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Auth { .. } => "auth",
            Message::Ready { .. } => "ready",
            Message::Error { .. } => "error",
            Message::Exec => "exec",
            Message::Stdin { .. } => "stdin",
            Message::Signal { .. } => "signal",
            Message::Resize { .. } => "resize",
            Message::Window { .. } => "window",
            Message::Close => "close",
            Message::Stdout => "stdout",
            Message::Stderr => "stderr",
            Message::Exit(_) => "exit",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Session { .. } => "session",
            Message::Attach { .. } => "attach",
            Message::Detach => "detach",
            Message::Detached { .. } => "detached",
            Message::Snapshot => "snapshot",
            Message::ListSessions { .. } => "list_sessions",
            Message::SessionList { .. } => "session_list",
            Message::EndSession { .. } => "end_session",
            Message::UpdateSession { .. } => "update_session",
            Message::Put => "put",
            Message::Get => "get",
            Message::File => "file",
        }
    }

    /// Shorthand for an `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            code,
            message: message.into(),
        }
    }
}
