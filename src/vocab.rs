//! The words every wire shares: signals, error codes and how a command
//! ended. The agent protocol, the console protocol, the REST API and
//! `conch exec` all speak them through these types, so that a misspelling
//! cannot compile.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A signal a client may deliver to a command (Ctrl-C is `INT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(rename_all = "UPPERCASE")]
pub enum Signal {
    Int,
    Term,
    Kill,
    Hup,
    /// Any other name: refused with `bad_signal`, never a broken connection.
    #[serde(other)]
    #[cfg_attr(test, ts(skip))]
    Unknown,
}

impl Signal {
    /// The signal's number, or `None` for [`Signal::Unknown`].
    pub(crate) fn number(self) -> Option<i32> {
        match self {
            Signal::Int => Some(libc::SIGINT),
            Signal::Term => Some(libc::SIGTERM),
            Signal::Kill => Some(libc::SIGKILL),
            Signal::Hup => Some(libc::SIGHUP),
            Signal::Unknown => None,
        }
    }

    /// What a refusal of an unknown signal says.
    pub(crate) const EXPECTED: &'static str = "INT, TERM, KILL or HUP";
}

/// The signal that ended a process, by number; on the wire its name
/// without `SIG` (`"SEGV"`), or the number as text when it has no name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalNumber(pub i32);

impl SignalNumber {
    pub fn name(self) -> String {
        match nix::sys::signal::Signal::try_from(self.0) {
            Ok(sig) => sig.as_str().trim_start_matches("SIG").to_owned(),
            Err(_) => self.0.to_string(),
        }
    }

    /// Parses a name (`"INT"`, `"SIGINT"`) or a number.
    pub(crate) fn parse(name: &str) -> Option<SignalNumber> {
        if let Ok(n) = name.parse::<i32>() {
            return Some(SignalNumber(n));
        }
        let full = if name.starts_with("SIG") {
            name.to_owned()
        } else {
            format!("SIG{name}")
        };
        full.parse::<nix::sys::signal::Signal>()
            .ok()
            .map(|s| SignalNumber(s as i32))
    }
}

impl Serialize for SignalNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for SignalNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        SignalNumber::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown signal {name:?}")))
    }
}

/// How a command ended: the same four fields on every wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub struct ExitStatus {
    /// The exit code, when the process exited.
    pub code: Option<i32>,
    /// The signal that killed it, by name without `SIG` (`"SEGV"`), when
    /// one did.
    #[cfg_attr(test, ts(type = "string | null"))]
    pub signal: Option<SignalNumber>,
    /// Killed because its `timeout_ms` ran out (and only then).
    pub timed_out: bool,
    #[cfg_attr(test, ts(type = "number"))]
    pub duration_ms: u64,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub(crate) fn shell_status(&self) -> u8 {
        match (self.code, self.signal) {
            (Some(code), _) => (code & 0xff) as u8,
            (None, Some(sig)) => 128u8.saturating_add(u8::try_from(sig.0).unwrap_or(0)),
            (None, None) => 128,
        }
    }
}

/// Stable error codes, shared by the agent protocol and the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// A frame that breaks the format; the connection closes.
    Protocol,
    /// The handshake failed (wrong key, version, nonce, deadline).
    Auth,
    /// The agent serves its maximum of connections.
    Busy,
    BadChannel,
    ChannelInUse,
    TooManyChannels,
    BadExec,
    NotRunning,
    StdinClosed,
    StdinOverflow,
    BadSignal,
    Unexpected,
    /// Console: a message the server cannot use.
    BadRequest,
    SessionExpired,
    Forbidden,
    TooManyCommands,
    TooLarge,
    AgentUnavailable,
    AgentLost,
    /// No session has that id (it ended, or never was).
    NoSession,
    /// The agent holds its maximum of sessions.
    TooManySessions,
    /// Files: no such file or directory.
    NotFound,
    /// Files: the agent's user may not do that.
    PermissionDenied,
    /// Files: the target exists and `overwrite` was not given.
    Exists,
    /// Files: no space left (or the quota, or the file size limit, is spent).
    DiskFull,
    /// Files: the path is a directory or a special file.
    NotAFile,
    /// Files: the bytes sent are not the size declared.
    SizeMismatch,
    /// Files: the bytes sent do not have the SHA-256 declared.
    HashMismatch,
    /// Files: the range asked for starts past the end of the file.
    RangeNotSatisfiable,
    /// Files: the file changed (shrank) while it was read.
    FileChanged,
    /// Files: any other failure of the file system.
    FileError,
    /// A code this version does not know (from a newer peer).
    Other(String),
}

const CODES: &[(ErrorCode, &str)] = &[
    (ErrorCode::Protocol, "protocol"),
    (ErrorCode::Auth, "auth"),
    (ErrorCode::Busy, "busy"),
    (ErrorCode::BadChannel, "bad_channel"),
    (ErrorCode::ChannelInUse, "channel_in_use"),
    (ErrorCode::TooManyChannels, "too_many_channels"),
    (ErrorCode::BadExec, "bad_exec"),
    (ErrorCode::NotRunning, "not_running"),
    (ErrorCode::StdinClosed, "stdin_closed"),
    (ErrorCode::StdinOverflow, "stdin_overflow"),
    (ErrorCode::BadSignal, "bad_signal"),
    (ErrorCode::Unexpected, "unexpected"),
    (ErrorCode::BadRequest, "bad_request"),
    (ErrorCode::SessionExpired, "session_expired"),
    (ErrorCode::Forbidden, "forbidden"),
    (ErrorCode::TooManyCommands, "too_many_commands"),
    (ErrorCode::TooLarge, "too_large"),
    (ErrorCode::AgentUnavailable, "agent_unavailable"),
    (ErrorCode::AgentLost, "agent_lost"),
    (ErrorCode::NoSession, "no_session"),
    (ErrorCode::TooManySessions, "too_many_sessions"),
    (ErrorCode::NotFound, "not_found"),
    (ErrorCode::PermissionDenied, "permission_denied"),
    (ErrorCode::Exists, "exists"),
    (ErrorCode::DiskFull, "disk_full"),
    (ErrorCode::NotAFile, "not_a_file"),
    (ErrorCode::SizeMismatch, "size_mismatch"),
    (ErrorCode::HashMismatch, "hash_mismatch"),
    (ErrorCode::RangeNotSatisfiable, "range_not_satisfiable"),
    (ErrorCode::FileChanged, "file_changed"),
    (ErrorCode::FileError, "file_error"),
];

impl ErrorCode {
    /// Every code this version knows, as spelled on the wire (for the
    /// page's generated types).
    #[cfg(test)]
    pub(crate) fn known() -> impl Iterator<Item = &'static str> {
        CODES.iter().map(|(_, name)| *name)
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => CODES
                .iter()
                .find(|(c, _)| c == known)
                .map_or("unknown", |(_, s)| s),
        }
    }

    /// Whether the agent refused an `exec` with it: the channel never
    /// started, and no `exit` follows.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            ErrorCode::BadChannel
                | ErrorCode::ChannelInUse
                | ErrorCode::TooManyChannels
                | ErrorCode::BadExec
                | ErrorCode::NoSession
                | ErrorCode::TooManySessions
        )
    }
}

impl From<&str> for ErrorCode {
    fn from(s: &str) -> ErrorCode {
        CODES
            .iter()
            .find(|(_, name)| *name == s)
            .map_or_else(|| ErrorCode::Other(s.to_owned()), |(c, _)| c.clone())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorCode::from(String::deserialize(d)?.as_str()))
    }
}

/// Whether `name` may name an agent: 1 to 64 letters, digits, `.`, `_`,
/// `-`. Names appear in logs, selectors and output prefixes, so nothing
/// else is allowed.
pub(crate) fn valid_agent_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_as_the_wire_spells_them() {
        assert_eq!(serde_json::to_string(&Signal::Int).unwrap(), "\"INT\"");
        assert_eq!(
            serde_json::from_str::<Signal>("\"USR1\"").unwrap(),
            Signal::Unknown
        );
        let segv = SignalNumber(libc::SIGSEGV);
        assert_eq!(serde_json::to_string(&segv).unwrap(), "\"SEGV\"");
        assert_eq!(SignalNumber::parse("KILL"), Some(SignalNumber(9)));
        for (code, name) in CODES {
            assert_eq!(serde_json::to_string(code).unwrap(), format!("\"{name}\""));
            assert_eq!(&ErrorCode::from(*name), code);
        }
        assert_eq!(
            ErrorCode::from("from_the_future"),
            ErrorCode::Other("from_the_future".into())
        );
        let exit = ExitStatus {
            code: None,
            signal: Some(SignalNumber(libc::SIGINT)),
            timed_out: false,
            duration_ms: 5,
        };
        assert_eq!(exit.shell_status(), 130);
    }
}
