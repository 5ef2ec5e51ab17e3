//! The console protocol's vocabulary: what the browser sends
//! ([`ClientMessage`]) and what the server answers in text frames
//! ([`ServerMessage`]). Output travels in binary frames (see `ws`).
//! `docs/protocol.md` section 2 is the normative description.

use serde::{Deserialize, Serialize};

use super::agents::AgentStatus;
use super::auth::Role;
use crate::protocol::PtySize;
use crate::vocab::{ErrorCode, ExitStatus, Signal};

/// A message from the browser.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ClientMessage {
    /// Command mode: `cmd`, run with `sh -c`; shell mode: `pty` without
    /// `cmd` starts a login shell.
    Exec {
        id: u32,
        #[cfg_attr(test, ts(optional))]
        cmd: Option<String>,
        #[cfg_attr(test, ts(optional))]
        pty: Option<PtySize>,
        #[cfg_attr(test, ts(optional))]
        agent: Option<String>,
    },
    Stdin {
        id: u32,
        /// Keystrokes or a line of input, sent as UTF-8.
        data: String,
        /// Ends the command's input after `data` (Ctrl-D in command mode).
        #[serde(default)]
        #[cfg_attr(test, ts(as = "Option<bool>", optional))]
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
    /// Kill the command; its `exit` still follows.
    Close {
        id: u32,
    },
    /// The page has drawn `bytes` more bytes of that command's output.
    Ack {
        id: u32,
        #[cfg_attr(test, ts(type = "number"))]
        bytes: u64,
    },
    /// Run command `id` as an attachment to a running session: reattach
    /// (after a reload, from another device) or, with `watch`, look on
    /// read-only. `attached` answers, then a redraw of the screen, then
    /// live output.
    Attach {
        id: u32,
        session: String,
        #[cfg_attr(test, ts(optional))]
        agent: Option<String>,
        cols: u16,
        rows: u16,
        #[serde(default)]
        #[cfg_attr(test, ts(as = "Option<bool>", optional))]
        watch: bool,
    },
    /// Leave the session of command `id` running; `detached` answers.
    Detach {
        id: u32,
    },
    /// Ask for the sessions this user may attach to or watch.
    ListSessions,
}

/// A session as the console and the REST API list it: where it runs, and
/// what its agent says of it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub(crate) struct AgentSession {
    pub(crate) agent: String,
    #[serde(flatten)]
    #[cfg_attr(test, ts(flatten))]
    pub(crate) session: crate::protocol::SessionInfo,
}

/// A text message to the browser.
#[derive(Debug, Serialize)]
#[cfg_attr(test, derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerMessage<'a> {
    /// The first message on every socket.
    Hello {
        user: &'a str,
        role: Role,
        agents: Vec<AgentStatus>,
    },
    /// An agent connected or disconnected.
    Agents { agents: Vec<AgentStatus> },
    /// The command is running. `recording`: the id of the recording of
    /// its output (`GET /api/v1/recordings/{id}`), when it is recorded.
    Started {
        id: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[cfg_attr(test, ts(optional))]
        recording: Option<&'a str>,
    },
    /// Command `id` is the shell of session `session` on `agent`: it
    /// outlives the page, which keeps the id to reattach. On an attach the
    /// output that follows starts with a redraw (the page resets first).
    Attached {
        id: u32,
        agent: &'a str,
        session: &'a str,
        watch: bool,
    },
    /// Command `id` left its session, which goes on; nothing follows for it.
    Detached { id: u32, reason: &'a str },
    /// Command `id` watches a session whose terminal is now this size (its
    /// writer's): the page draws it at that size.
    Resized { id: u32, cols: u16, rows: u16 },
    /// The answer to `list_sessions`.
    Sessions { sessions: Vec<AgentSession> },
    /// The command ended.
    Exit {
        id: u32,
        #[serde(flatten)]
        status: ExitStatus,
    },
    /// Something went wrong. With an `id`, `final` says whether that
    /// command is over (no `exit` follows) or goes on.
    Error {
        #[cfg_attr(test, ts(type = "ErrorCode"))]
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[cfg_attr(test, ts(optional))]
        id: Option<u32>,
        #[serde(rename = "final", skip_serializing_if = "Option::is_none")]
        #[cfg_attr(test, ts(optional))]
        is_final: Option<bool>,
    },
    /// The server is stopping; the socket closes next.
    Shutdown { message: &'a str },
}

impl ServerMessage<'_> {
    /// The message as a WebSocket text frame.
    pub(crate) fn frame(&self) -> tokio_tungstenite::tungstenite::Message {
        let text = serde_json::to_string(self).unwrap_or_else(|e| {
            // Serializing these types cannot fail; say so loudly if it does.
            tracing::error!(error = %e, "a console message could not be serialized");
            r#"{"type":"error","code":"internal","message":"internal error"}"#.to_owned()
        });
        tokio_tungstenite::tungstenite::Message::Text(text.into())
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

/// The page's protocol types (`web/src/generated/protocol.ts`) are
/// generated from these by ts-rs, so that the two ends cannot drift apart:
/// this test fails when the file is out of date, and
/// `CONCH_UPDATE_GENERATED=1 cargo test --lib typescript` rewrites it.
/// `tsc` then checks the page against them.
#[cfg(test)]
mod typescript {
    use ts_rs::{Config, TS};

    use super::AgentSession;
    use super::{ClientMessage, ServerMessage};
    use crate::protocol::{HostFacts, PtySize, SessionInfo};
    use crate::server::agents::AgentStatus;
    use crate::server::auth::Role;
    use crate::vocab::{ErrorCode, ExitStatus, Signal};

    const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web/src/generated/protocol.ts");

    fn declare<T: TS + ?Sized>(cfg: &Config, out: &mut String) {
        if let Some(docs) = T::docs() {
            out.push_str(&docs);
        }
        out.push_str("export ");
        out.push_str(&T::decl(cfg));
        out.push_str("\n\n");
    }

    fn generated() -> String {
        let cfg = Config::new().with_large_int("number".to_owned());
        let mut out = String::from(
            "// Generated from the Rust types of src/server/messages.rs (and those they\n\
             // use: src/vocab.rs, src/server/auth.rs, src/server/agents.rs,\n\
             // src/protocol/message.rs) by\n\
             // `CONCH_UPDATE_GENERATED=1 cargo test --lib typescript`. Do not edit.\n\n",
        );
        // ErrorCode has its own serde (unknown codes from a newer peer
        // still parse), so it is written from its table: any string is
        // accepted, the known ones listed for the reader and the editor.
        out.push_str("/** Stable error codes, shared by the agent protocol and the console. */\n");
        out.push_str("export type ErrorCode =\n");
        for code in ErrorCode::known() {
            out.push_str(&format!("  | '{code}'\n"));
        }
        out.push_str("  | (string & Record<never, never>);\n\n");
        declare::<Signal>(&cfg, &mut out);
        declare::<Role>(&cfg, &mut out);
        declare::<PtySize>(&cfg, &mut out);
        declare::<ExitStatus>(&cfg, &mut out);
        declare::<HostFacts>(&cfg, &mut out);
        declare::<AgentStatus>(&cfg, &mut out);
        declare::<SessionInfo>(&cfg, &mut out);
        declare::<AgentSession>(&cfg, &mut out);
        declare::<ClientMessage>(&cfg, &mut out);
        declare::<ServerMessage<'static>>(&cfg, &mut out);
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    }

    #[test]
    fn the_page_protocol_types_are_generated_from_these() {
        let want = generated();
        if std::env::var_os("CONCH_UPDATE_GENERATED").is_some() {
            std::fs::create_dir_all(std::path::Path::new(PATH).parent().unwrap()).unwrap();
            std::fs::write(PATH, &want).unwrap();
            return;
        }
        let have = std::fs::read_to_string(PATH).unwrap_or_default();
        assert!(
            have == want,
            "web/src/generated/protocol.ts is out of date: run \
             `CONCH_UPDATE_GENERATED=1 cargo test --lib typescript` and commit it"
        );
    }
}
