//! The framed protocol spoken between the web server and a command agent.
//!
//! Everything here is free of I/O: [`codec`] turns bytes into frames and back,
//! and [`message`] gives the headers their types; `transport` moves them
//! (and runs the authentication exchange). The agent and the server
//! both build on these pieces unchanged, so the two ends cannot drift apart.
//! `docs/protocol.md` is the normative description; keep it in step.

pub mod codec;
pub mod message;

pub use codec::{Frame, FrameCodec, FrameError, MAX_HEADER_LEN, MAX_PAYLOAD_LEN};
pub use message::{
    ExecRequest, FileInfo, GetRequest, HostFacts, Message, PtySize, PutRequest, SessionInfo,
    SessionOptions, WirePath,
};

/// The protocol version sent in `hello` and `auth`. Version 2 carries the
/// `exec` request in the payload instead of the header; version 3 runs
/// everything after `hello` inside TLS, with the handshake's MACs bound to
/// the TLS session.
pub const PROTOCOL_VERSION: u32 = 3;
