//! The console protocol's vocabulary: what the browser sends
//! ([`ClientMessage`]) and what the server answers in text frames
//! ([`ServerMessage`]). Output travels in binary frames (see `ws`).
//! `docs/protocol.md` section 2 is the normative description.

use serde::{Deserialize, Serialize};

use super::agents::AgentStatus;
use crate::protocol::PtySize;
use crate::vocab::{ErrorCode, ExitStatus, Signal};

/// A message from the browser.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Exec {
        id: u32,
        cmd: Option<String>,
        pty: Option<PtySize>,
        agent: Option<String>,
    },
    Stdin {
        id: u32,
        data: String,
        /// Ends the command's input after `data` (Ctrl-D in command mode).
        #[serde(default)]
        eof: bool,
    },
    Signal {
        id: u32,
        signal: Signal,
    },
    Resize {
        id: u32,
        cols: u16,
        rows: u16,
    },
    Close {
        id: u32,
    },
    Ack {
        id: u32,
        bytes: u64,
    },
}

/// A text message to the browser.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// The first message on every socket.
    Hello {
        user: &'a str,
        role: &'a str,
        agents: Vec<AgentStatus>,
    },
    /// An agent connected or disconnected.
    Agents { agents: Vec<AgentStatus> },
    /// The command is running.
    Started { id: u32 },
    /// The command ended.
    Exit {
        id: u32,
        #[serde(flatten)]
        status: ExitStatus,
    },
    /// Something went wrong. With an `id`, `final` says whether that
    /// command is over (no `exit` follows) or goes on.
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        #[serde(rename = "final", skip_serializing_if = "Option::is_none")]
        is_final: Option<bool>,
    },
    /// The server is stopping; the socket closes next.
    Shutdown { message: &'a str },
}

impl ServerMessage<'_> {
    /// The message as a WebSocket text frame.
    pub fn frame(&self) -> axum::extract::ws::Message {
        let text = serde_json::to_string(self).unwrap_or_else(|e| {
            // Serializing these types cannot fail; say so loudly if it does.
            tracing::error!(error = %e, "a console message could not be serialized");
            r#"{"type":"error","code":"internal","message":"internal error"}"#.to_owned()
        });
        axum::extract::ws::Message::Text(text.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_spelled_as_the_protocol_document_says() {
        let exit = ServerMessage::Exit {
            id: 3,
            status: ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 12,
            },
        };
        assert_eq!(
            serde_json::to_value(&exit).unwrap(),
            serde_json::json!({"type": "exit", "id": 3, "code": 0, "signal": null,
                "timed_out": false, "duration_ms": 12})
        );
        let err = ServerMessage::Error {
            code: ErrorCode::TooLarge,
            message: "m",
            id: Some(2),
            is_final: Some(true),
        };
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            serde_json::json!({"type": "error", "code": "too_large", "message": "m",
                "id": 2, "final": true})
        );
    }
}

/// The page's TypeScript mirror of this vocabulary (`web/src/protocol.ts`)
/// is written by hand; this checks that it names every message type, error
/// code and signal the Rust side speaks, so that the two cannot drift
/// apart unnoticed (`tsc` then checks the page against the mirror).
#[cfg(test)]
mod mirror {
    use crate::vocab::{ErrorCode, Signal};

    #[test]
    fn the_typescript_protocol_names_every_word() {
        let ts =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/web/src/protocol.ts"))
                .expect("web/src/protocol.ts");
        let quoted = |w: &str| ts.contains(&format!("'{w}'"));
        for t in [
            "hello", "agents", "started", "exit", "error", "shutdown", "exec", "stdin", "signal",
            "resize", "close", "ack",
        ] {
            assert!(ts.contains(&format!("type: '{t}'")), "message type {t}");
        }
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::SessionExpired,
            ErrorCode::Forbidden,
            ErrorCode::TooManyCommands,
            ErrorCode::TooLarge,
            ErrorCode::AgentUnavailable,
            ErrorCode::AgentLost,
            ErrorCode::StdinOverflow,
        ] {
            assert!(quoted(code.as_str()), "error code {code}");
        }
        for sig in [Signal::Int, Signal::Term, Signal::Kill, Signal::Hup] {
            let name = serde_json::to_string(&sig).unwrap();
            assert!(quoted(name.trim_matches('"')), "signal {name}");
        }
        for field in ["timed_out", "duration_ms", "final", "eof"] {
            assert!(ts.contains(field), "field {field}");
        }
    }
}
