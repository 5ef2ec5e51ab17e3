//! The console's WebSocket: browser messages in, agent channels out.
//!
//! One socket carries many commands, each an agent channel. Output goes to
//! the browser as binary frames; the browser acknowledges what it has
//! drawn, and only then does the server return that credit to the agent.
//! A tab that stops drawing therefore pauses its commands at the agent,
//! and the server holds at most [`BROWSER_WINDOW`] bytes per command.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};

use super::State as AppState;
use super::auth::{Principal, SessionHandle};
use super::bridge::{self, Update};
use super::messages::{ClientMessage, ServerMessage};
use super::ws_upgrade::{Socket, Upgrade};
use crate::link::{Controller, LinkError};
use crate::protocol::ExecRequest;
use crate::rest::Stream;
use crate::small_map::SmallMap;
use crate::vocab::{ErrorCode, Signal};

/// Output credit per command between the agent and the browser: 512 KiB,
/// twice the largest message, so that the agent reads on while the page
/// takes one in.
pub const BROWSER_WINDOW: u64 = 512 * 1024;
/// Credit the page has returned that is passed on to the agent once this
/// much has gathered: 32 KiB. The page acknowledges every write it has
/// drawn, so without it each keystroke's echo cost the agent a `window`
/// frame of its own (and a wake-up) beside the next keystroke. Holds back
/// less than a sixteenth of the window, so a command never waits on it,
/// and a watcher the agent dropped behind still has its credit brought to
/// half the window, which redraws it (src/agent/session.rs).
const CREDIT_BATCH: u64 = 32 * 1024;
/// Commands one socket may run at once.
pub(crate) const MAX_COMMANDS: usize = 16;
/// Messages queued for one browser: 64 (output messages are ≤ 256 KiB).
const OUTBOUND_QUEUE: usize = 64;
/// The most output one binary message carries: 256 KiB, half the window,
/// so that while the page takes one in, the agent can be reading the next.
pub(crate) const OUTPUT_MESSAGE: usize = (BROWSER_WINDOW / 2) as usize;

/// Where a console's messages to its page are queued for its writer task.
/// Each is boxed: a channel's first block holds 32 of its messages from
/// the start, over 1.5 KiB unboxed in every console, against one small
/// allocation per message sent.
#[derive(Clone)]
struct Outbox(mpsc::Sender<Box<WsMessage>>);

/// The page's writer is gone: the console is closing.
struct Gone;

impl Outbox {
    async fn send(&self, msg: WsMessage) -> Result<(), Gone> {
        self.0.send(Box::new(msg)).await.map_err(|_| Gone)
    }
}

/// The largest text message accepted from a browser: 1 MiB (a big paste).
const MAX_MESSAGE: usize = 1024 * 1024;

/// The WebSocket read buffer per session: 512 bytes, about ten
/// keystrokes' or acks' messages. Every idle console holds it, filled, for
/// its life (2 KiB of an idle shell's 13 in the server, measured with
/// heaptrack). Bigger messages still fit, up to [`MAX_MESSAGE`]: the
/// buffer grows for them (and keeps that size), and is read into 512 bytes
/// at a time: a page's largest stdin piece (16 Ki UTF-16 units, at most
/// 48 KiB) costs about a hundred reads, a message of the full 1 MiB 2,048.
const READ_BUFFER: usize = 512;

/// Output stream tags of binary frames.
const STDOUT: u8 = 1;
const STDERR: u8 = 2;

/// `GET /ws` (or HTTP/2's `CONNECT`): upgrades after checking the session
/// and the Origin.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    super::peer::ClientIp(client): super::peer::ClientIp,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    state.check_sessions(&headers).await;
    let Some((cookie, login)) = state
        .session_cookie(&headers)
        .and_then(|c| state.auth.session_handle(&c).map(|h| (c, h)))
    else {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    if !state.site.origin_allowed(&headers) {
        tracing::warn!(user = %login.principal.name, "WebSocket from a foreign origin refused");
        return (StatusCode::FORBIDDEN, "this origin may not open a console").into_response();
    }
    // A console reads small messages (keystrokes, acks): a small read
    // buffer keeps idle sessions cheap (tungstenite's default is 128 KiB).
    // The frame bound too: tungstenite checks a frame's declared length
    // at its header, but a message's only once all of it was read (a
    // 16 MiB frame would otherwise be buffered before its refusal).
    // Nothing is gathered in the write buffer: each frame is written as
    // it is made (a message's frames, FRAGMENT each, one after another).
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    ws.on_upgrade(config, move |socket| {
        session(socket, state, (cookie, login), client.to_string())
    })
}

struct Running {
    control: Controller,
    /// Its input: straight to the link, or queued for a writer task (a
    /// command that does not read must never stall the socket's loop).
    input: super::input::Input,
    /// Output sent to the browser and not yet acknowledged.
    unacked: Arc<AtomicU64>,
    /// Output the browser acknowledged that is not yet credited back to
    /// the agent (less than [`CREDIT_BATCH`]).
    owed: AtomicU64,
    task: tokio::task::JoinHandle<()>,
    /// Its recording, which also takes typed input (with
    /// `--record-input`) and the page's resizes.
    recording: Option<Arc<crate::recording::Recorder>>,
}

/// How long a closed console's queued input has to reach the agent: 2 s.
const INPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// An error message. With an `id`, `final` says whether that command is
/// over (it never started, or it is gone) or goes on (its `exit` follows).
fn error(id: Option<u32>, code: ErrorCode, message: &str) -> WsMessage {
    error_with(id, code, message, true)
}

fn error_with(id: Option<u32>, code: ErrorCode, message: &str, is_final: bool) -> WsMessage {
    ServerMessage::Error {
        code,
        message,
        id,
        is_final: id.map(|_| is_final),
    }
    .frame()
}

/// WebSocket close codes (RFC 6455 section 7.4.1).
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_GOING_AWAY: u16 = 1001;

fn close(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }))
}

/// The console's task. A plain fn returning a future, not an async fn:
/// an async fn keeps room for each argument beside the local it is moved
/// into, for its whole life (the socket alone is hundreds of bytes), and every
/// idle console holds this future. The socket is split before the future
/// exists; the rest is used where it was captured.
fn session(
    socket: Socket,
    state: AppState,
    (cookie, login): (String, SessionHandle),
    source: String,
) -> impl std::future::Future<Output = ()> + Send {
    let (mut sink, mut stream) = socket.split();
    async move {
        let _open = super::metrics::console_open();
        let principal = login.principal.clone();
        let (out, mut out_rx) = mpsc::channel::<Box<WsMessage>>(OUTBOUND_QUEUE);
        let out = Outbox(out);
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                let last = matches!(*msg, WsMessage::Close(_));
                if write(&mut sink, *msg).await.is_err() || last {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        // At most MAX_COMMANDS commands run and as many attaches are
        // checked at once (check_id): room for all their news.
        let (news_tx, mut news) = mpsc::channel::<News>(2 * MAX_COMMANDS);
        let mut console = Console {
            state: &state,
            principal: &principal,
            source: &source,
            out: &out,
            news: &news_tx,
            running: SmallMap::default(),
            attaching: Default::default(),
            listing: Arc::default(),
            list_again: Arc::default(),
        };
        let mut changes = state.agents.subscribe();
        let first = visible_agents(&state, &principal);
        // What the page was last told: a change it cannot see is not sent.
        let mut shown = summary_of(&first);
        // The statuses go with the message made of them: a local kept here
        // would hold them for the console's life.
        let hello = ServerMessage::Hello {
            user: &principal.name,
            role: principal.role,
            agents: first,
        }
        .frame();
        let _ = out.send(hello).await;
        let expires = tokio::time::Instant::from_std(login.expires);
        // The store is asked again now and then whether the login still
        // holds: a logout, a deleted user or a new password on another server
        // ends this console too (through `login.ended`). Asked in a task of
        // its own: a slow store must not hold up the console.
        // The first check is one period from now. An interval's "immediate"
        // first tick is not: the timer wheel rounds its deadline up to the
        // next millisecond, and awaiting it here held up the page's first
        // message, usually an `exec` (by 0.5 ms on average).
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + super::login_sessions::RECHECK,
            super::login_sessions::RECHECK,
        );
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // The login's expiry, one timer for the console's life (not one made
        // and dropped with every message).
        let expiry = tokio::time::sleep_until(expires);
        tokio::pin!(expiry);

        // The handlers' futures are boxed: a future is as large as its largest
        // await, and an idle console, which waits in this loop, would otherwise
        // carry the room of starting a command (6.6 against 2.3 KiB).
        loop {
            // In this order: what ends the console first, so that a message
            // queued behind a logout, an expiry or a shutdown is not acted on;
            // the page's messages last, so that a page sending without pause
            // cannot hold back a command's end, an attach's answer or the
            // login's recheck (each is ready only now and then).
            tokio::select! {
                biased;
                // A console must not outlive its session: logout, eviction and
                // expiry close it at once, whether or not the page is talking.
                _ = login.ended.cancelled() => {
                    end_session_socket(&out).await;
                    break;
                }
                _ = &mut expiry => {
                    end_session_socket(&out).await;
                    break;
                }
                _ = state.shutdown.cancelled() => {
                    let _ = out.send(ServerMessage::Shutdown { message: "the server is shutting down" }.frame()).await;
                    let _ = out.send(close(CLOSE_GOING_AWAY, "server shutting down")).await;
                    break;
                }
                Some(news) = news.recv() => match news {
                    News::Finished(id) => {
                        console.running.remove(&id);
                    }
                    News::Attached(id, result) => {
                        console.attaching.remove(&id);
                        let result = match *result {
                            Ok(checked) => Box::pin(console.open_attachment(id, checked)).await,
                            Err(r) => Err(r),
                        };
                        Box::pin(console.opened(id, result)).await;
                    }
                },
                Ok(()) = changes.changed() => {
                    let agents = visible_agents(&state, &principal);
                    let now = summary_of(&agents);
                    if now != shown {
                        shown = now;
                        let _ = out.send(ServerMessage::Agents { agents }.frame()).await;
                    }
                }
                _ = recheck.tick() => {
                    let (state, cookie) = (state.clone(), cookie.clone());
                    tokio::spawn(async move { state.check_cookie(&cookie).await });
                }
                msg = stream.next() => match msg {
                    Some(Ok(WsMessage::Text(t))) => match parse_client_message(&t) {
                        Ok(msg) => Box::pin(console.handle(msg)).await,
                        Err((id, e)) => {
                            // Name the command the message was about, so that a
                            // page waiting for it is never left without an answer.
                            let is_final = id.is_some_and(|id| !console.running.contains_key(&id));
                            let msg = format!("cannot understand that message: {e}");
                            let _ = out.send(error_with(id, ErrorCode::BadRequest, &msg, is_final)).await;
                        }
                    },
                    Some(Ok(WsMessage::Binary(_))) => {
                        let _ = out.send(error(None, ErrorCode::BadRequest, "binary messages are not accepted from the browser")).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if is_capacity_error(&e) {
                            let msg = format!("a message was larger than {MAX_MESSAGE} bytes; the console is closed");
                            let _ = out.send(error(None, ErrorCode::TooLarge, &msg)).await;
                            let _ = out.send(close(CLOSE_TOO_BIG, "message too big")).await;
                        }
                        break;
                    }
                    None => break,
                },
            }
        }
        // Closing the tab ends its commands: each task drops its channel,
        // which tells the agent to kill the process group (or, for a session's
        // shell, to detach). Input the page sent just before it went (the Enter
        // of a command line, then a reload) is passed on first, within a bound.
        let running: Vec<Running> = console.running.drain().map(|(_, r)| r).collect();
        let mut pumps = Vec::new();
        let mut inputs = Vec::new();
        for r in running {
            let Running { task, input, .. } = r;
            pumps.push(task);
            inputs.push(input.drain(INPUT_DRAIN));
        }
        futures_util::future::join_all(inputs).await;
        for task in pumps {
            task.abort();
        }
        drop(out);
        let _ = writer.await;
    }
}

async fn end_session_socket(out: &Outbox) {
    let _ = out
        .send(error(
            None,
            ErrorCode::SessionExpired,
            "the session has ended; log in again",
        ))
        .await;
    let _ = out.send(close(CLOSE_POLICY, "session ended")).await;
}

/// Whether a read failed because the browser's message was over the size
/// limit.
fn is_capacity_error(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}

/// The most of a message one WebSocket frame carries: 64 KiB. A larger
/// output message goes as several frames of one message (the page still
/// gets one message, and acknowledges it once). tungstenite copies each
/// frame into a write buffer that keeps the size of the largest frame for
/// the socket's life: with whole messages as frames, a console that once
/// printed a lot kept 256 KiB more (heaptrack, a server holding 20
/// consoles after 4 MB of output each: 285 KB of live heap a console).
const FRAGMENT: usize = 64 * 1024;

/// Writes one message to the page, a large one as several frames. (A text
/// message may be split inside a character: RFC 6455 checks the UTF-8 of
/// the whole message, not of each frame.)
async fn write<S>(sink: &mut S, msg: WsMessage) -> Result<(), tungstenite::Error>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    let (kind, data) = match msg {
        WsMessage::Binary(data) if data.len() > FRAGMENT => (Data::Binary, data),
        WsMessage::Text(text) if text.len() > FRAGMENT => (Data::Text, Bytes::from(text)),
        msg => return sink.send(msg).await,
    };
    let mut at = 0;
    while at < data.len() {
        let end = (at + FRAGMENT).min(data.len());
        let opcode = if at == 0 { kind } else { Data::Continue };
        let frame = Frame::message(data.slice(at..end), OpCode::Data(opcode), end == data.len());
        sink.feed(WsMessage::Frame(frame)).await?;
        at = end;
    }
    sink.flush().await
}

/// Parses a browser message. A browser's `JSON.stringify` writes a lone
/// UTF-16 surrogate (half an emoji) as an escape that JSON parsers refuse;
/// such escapes become U+FFFD first. When the message still cannot be
/// understood, its `id` (if any can be read) comes back with the error.
pub(crate) fn parse_client_message(text: &str) -> Result<ClientMessage, (Option<u32>, String)> {
    let text = replace_lone_surrogates(text);
    serde_json::from_str::<ClientMessage>(&text).map_err(|e| {
        let id = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_u64))
            .and_then(|id| u32::try_from(id).ok())
            .filter(|id| *id > 0);
        (id, e.to_string())
    })
}

/// Fuzzing: a browser message as the console reads it. Nothing may panic;
/// valid JSON means the same after the surrogate repair, and JSON whose
/// only fault was a lone surrogate is valid after it.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_client_message(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_client_message(text);
    if serde_json::from_str::<ClientMessage>(text).is_ok() {
        assert!(parsed.is_ok(), "the repair broke a valid message");
    }
    let repaired = replace_lone_surrogates(text);
    if let Ok(before) = serde_json::from_str::<Value>(text) {
        let after = serde_json::from_str::<Value>(&repaired);
        assert!(
            after.is_ok_and(|after| after == before),
            "the repair changed valid JSON"
        );
    }
    // Whatever else is wrong with it, the repaired text holds no lone
    // surrogate for the JSON parser to refuse.
    if let Err(e) = serde_json::from_str::<Value>(&repaired) {
        let why = e.to_string();
        assert!(
            !why.contains("surrogate") && !why.contains("invalid unicode code point"),
            "the repair left a lone surrogate: {why}"
        );
    }
    drop(parsed);
}

/// Replaces `\uD800`–`\uDFFF` escapes that are not part of a valid
/// surrogate pair with `\uFFFD`.
fn replace_lone_surrogates(text: &str) -> std::borrow::Cow<'_, str> {
    fn escape_at(b: &[u8], i: usize) -> Option<u16> {
        if b.get(i) == Some(&b'\\') && matches!(b.get(i + 1), Some(b'u')) {
            let hex = std::str::from_utf8(b.get(i + 2..i + 6)?).ok()?;
            return u16::from_str_radix(hex, 16).ok();
        }
        None
    }
    let b = text.as_bytes();
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut last = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(unit) = escape_at(b, i) {
                let high = (0xD800..0xDC00).contains(&unit);
                let low = (0xDC00..0xE000).contains(&unit);
                let paired =
                    high && escape_at(b, i + 6).is_some_and(|n| (0xDC00..0xE000).contains(&n));
                if paired {
                    i += 12;
                    continue;
                }
                if high || low {
                    out.push_str(&text[last..i]);
                    out.push_str("\\uFFFD");
                    i += 6;
                    last = i;
                    continue;
                }
                i += 6;
                continue;
            }
            // Any other escape: skip the backslash and the escaped byte.
            i += 2;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[last..]);
    std::borrow::Cow::Owned(out)
}

/// A refusal of one message: its error code, what it says, and whether
/// that command is over (`final`).
struct Refusal {
    code: ErrorCode,
    message: String,
    is_final: bool,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            is_final: true,
        }
    }
}

/// What a console's own tasks tell its loop, in one channel (each channel
/// costs a console half a KiB, and its first block more).
enum News {
    /// A command ended: its id is free again.
    Finished(u32),
    /// An attach was checked, outside the loop. Boxed: a channel's first
    /// block holds 32 messages from the start, 8 KiB of them unboxed in
    /// every console, used or not.
    Attached(u32, Box<Result<Attachable, Refusal>>),
}

/// One console socket's commands, and what they need to start and talk.
struct Console<'a> {
    state: &'a AppState,
    principal: &'a Principal,
    /// The page's address, for the audit log.
    source: &'a str,
    out: &'a Outbox,
    /// What the console's own tasks tell its loop.
    news: &'a mpsc::Sender<News>,
    /// At most [`MAX_COMMANDS`]; most consoles run one.
    running: SmallMap<u32, Running>,
    /// Attaches being checked outside the loop (their answers come as
    /// [`News::Attached`]).
    attaching: std::collections::HashSet<u32>,
    /// A `list_sessions` is on its way.
    listing: Arc<std::sync::atomic::AtomicBool>,
    /// Another `list_sessions` came while one was on its way.
    list_again: Arc<std::sync::atomic::AtomicBool>,
}

impl Console<'_> {
    async fn handle(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::Exec {
                id,
                cmd,
                pty,
                agent,
            } => {
                let started = self.start(id, cmd, pty, agent).await;
                self.opened(id, started).await;
            }
            ClientMessage::Stdin { id, data, eof } => self.stdin(id, data, eof).await,
            ClientMessage::Signal { id, signal } => {
                if signal == Signal::Unknown {
                    let msg = format!("signal must be {}", Signal::EXPECTED);
                    let is_final = !self.running.contains_key(&id);
                    let _ = self
                        .out
                        .send(error_with(Some(id), ErrorCode::BadRequest, &msg, is_final))
                        .await;
                } else if let Some(r) = self.running.get(&id) {
                    let _ = r.control.signal(signal).await;
                }
            }
            ClientMessage::Resize { id, cols, rows } => {
                if let Some(r) = self.running.get(&id) {
                    if let Some(rec) = &r.recording {
                        rec.resize(cols, rows);
                    }
                    let _ = r.control.resize(cols, rows).await;
                }
            }
            ClientMessage::Close { id } => {
                if let Some(r) = self.running.get(&id) {
                    let _ = r.control.close().await;
                }
            }
            ClientMessage::Ack { id, bytes } => {
                if let Some(r) = self.running.get(&id) {
                    r.ack(bytes).await;
                }
            }
            ClientMessage::Attach {
                id,
                session,
                agent,
                cols,
                rows,
                watch,
            } => {
                let size = crate::protocol::PtySize { cols, rows };
                self.attach(id, session, agent, size, watch).await;
            }
            ClientMessage::Detach { id } => {
                if let Some(r) = self.running.get(&id) {
                    let _ = r.control.detach().await;
                }
            }
            ClientMessage::ListSessions => {
                // One list at a time per console: asks while one is on its
                // way make one more, after it (never a queue of them).
                if self.listing.swap(true, Ordering::AcqRel) {
                    self.list_again.store(true, Ordering::Release);
                    return;
                }
                let again = self.list_again.clone();
                let listing = self.listing.clone();
                // Asking the agents can take a while: never in this loop.
                let state = self.state.clone();
                let principal = self.principal.clone();
                let out = self.out.clone();
                tokio::spawn(async move {
                    loop {
                        again.store(false, Ordering::Release);
                        let sessions = super::sessions::visible(&state, &principal).await;
                        let _ = out.send(ServerMessage::Sessions { sessions }.frame()).await;
                        if again.load(Ordering::Acquire) {
                            continue;
                        }
                        listing.store(false, Ordering::Release);
                        // An ask that came between the check and the store
                        // found `listing` still set: it is answered here.
                        if again.load(Ordering::Acquire) && !listing.swap(true, Ordering::AcqRel) {
                            continue;
                        }
                        break;
                    }
                });
            }
        }
    }

    /// Tells the page how an `exec` or `attach` of `id` went: `started`,
    /// or the refusal.
    async fn opened(&mut self, id: u32, result: Result<Running, Refusal>) {
        match result {
            Ok(running) => {
                let recording = running.recording.as_ref().map(|r| r.id().to_owned());
                self.running.insert(id, running);
                let started = ServerMessage::Started {
                    id,
                    recording: recording.as_deref(),
                };
                let _ = self.out.send(started.frame()).await;
            }
            Err(r) => {
                // Id 0 is never a command's: the error names none.
                let about = Some(id).filter(|id| *id != 0);
                let _ = self
                    .out
                    .send(error_with(about, r.code, &r.message, r.is_final))
                    .await;
            }
        }
    }

    /// Starts an `attach`: its checks and its channel are made in a task,
    /// whose answer the loop takes as [`News::Attached`].
    async fn attach(
        &mut self,
        id: u32,
        session: String,
        agent: Option<String>,
        size: crate::protocol::PtySize,
        watch: bool,
    ) {
        if let Err(r) = self.check_id(id) {
            self.opened(id, Err(r)).await;
            return;
        }
        // Asking the agent which sessions it has takes a round trip (up to
        // its timeout): never in the socket's loop, whose acks and Ctrl-C
        // must go on. The answer comes back as `News::Attached`.
        self.attaching.insert(id);
        let (state, principal) = (self.state.clone(), self.principal.clone());
        let done = self.news.clone();
        tokio::spawn(async move {
            let to = Opening {
                state: &state,
                principal: &principal,
            };
            let result = to.attach(&session, agent, size, watch).await;
            let _ = done.send(News::Attached(id, Box::new(result))).await;
        });
    }
}

/// What a command being opened outside the socket's loop needs.
struct Opening<'a> {
    state: &'a AppState,
    principal: &'a Principal,
}

impl Opening<'_> {
    /// Checks an `attach`: the principal must be allowed to write to (or
    /// watch) that session.
    async fn attach(
        &self,
        session: &str,
        agent: Option<String>,
        size: crate::protocol::PtySize,
        watch: bool,
    ) -> Result<Attachable, Refusal> {
        let agents = &self.state.agents;
        let unavailable =
            |e: &dyn std::fmt::Display| Refusal::new(ErrorCode::AgentUnavailable, e.to_string());
        let name = agents
            .resolve(agent.as_deref())
            .map_err(|e| unavailable(&e))?;
        super::policy::check(self.principal, super::policy::Action::See, &name, agents)
            .map_err(|e| unavailable(&e))?;
        let (_, link) = agents.link(Some(&name)).map_err(|e| unavailable(&e))?;
        let gone = || {
            Refusal::new(
                ErrorCode::NoSession,
                format!("no session {session:?} on agent {name:?} (it ended, or is not yours)"),
            )
        };
        let info = link
            .session(session)
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(gone)?;
        let action = if watch {
            super::policy::SessionAction::Watch
        } else {
            super::policy::SessionAction::Write
        };
        super::policy::session(self.principal, action, &name, &info, agents).map_err(|_| gone())?;
        // Watching only by the owner's leave: ends when the owner says so.
        let watcher = (watch
            && self.principal.name != info.owner
            && self.principal.role != super::auth::Role::Admin)
            .then(|| self.principal.name.clone());
        let ticket = self
            .state
            .quota
            .admit(&self.principal.name, &name, link.info().max_channels)
            .map_err(|e| Refusal::new(ErrorCode::TooManyCommands, e.to_string()))?;
        Ok(Attachable {
            link,
            name,
            session: session.to_owned(),
            size,
            watch,
            watcher,
            ticket,
        })
    }
}

/// An attach that passed its checks: the loop opens its channel, so that
/// the command is among the running (its acks found) before any output.
struct Attachable {
    link: crate::link::AgentLink,
    name: String,
    session: String,
    size: crate::protocol::PtySize,
    watch: bool,
    watcher: Option<String>,
    ticket: super::quota::Ticket,
}

impl Console<'_> {
    /// Opens the channel of an attach that passed its checks.
    async fn open_attachment(&self, id: u32, a: Attachable) -> Result<Running, Refusal> {
        let channel = a
            .link
            .attach_as(&a.session, a.size, a.watch, Some(BROWSER_WINDOW), a.watcher)
            .await
            .map_err(|e| Refusal::new(ErrorCode::AgentUnavailable, e.to_string()))?;
        tracing::info!(user = %self.principal.name, id, session = %a.session, watch = a.watch, "session attached");
        // A watcher sees what the writer's own attachment records.
        let recording = if a.watch {
            None
        } else {
            self.state
                .recordings
                .begin(crate::recording::Start {
                    user: self.principal.name.clone(),
                    agent: a.name.clone(),
                    kind: "session",
                    session: Some(a.session.clone()),
                    command: "(login shell)".into(),
                    cols: a.size.cols,
                    rows: a.size.rows,
                    bare_lines: false,
                })
                .await
        };
        let mut detail = serde_json::json!({"session": a.session, "watch": a.watch});
        if let Some(r) = &recording {
            detail["recording"] = r.id().into();
        }
        let trail = crate::audit::CommandTrail::start_as(
            &self.state.audit,
            self.event(&a.name, detail),
            crate::audit::Kind::SessionAttach,
            crate::audit::Kind::SessionDetach,
        );
        Ok(Running::start(
            id,
            channel,
            (a.name, a.watch),
            (a.ticket, trail, recording),
            self.out.clone(),
            self.news.clone(),
        ))
    }

    /// An audit event of this console's user about `agent`.
    fn event(&self, agent: &str, detail: serde_json::Value) -> crate::audit::Event {
        crate::audit::Event {
            kind: crate::audit::Kind::CommandStart,
            user: self.principal.name.clone(),
            source: self.source.to_owned(),
            agent: agent.to_owned(),
            via: crate::audit::Via::Console,
            detail,
        }
    }

    /// A new command id must be free, and there must be room for it.
    fn check_id(&self, id: u32) -> Result<(), Refusal> {
        if id == 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "command ids start at 1",
            ));
        }
        if self.running.contains_key(&id) || self.attaching.contains(&id) {
            return Err(Refusal {
                is_final: false,
                ..Refusal::new(ErrorCode::BadRequest, "that command id is still running")
            });
        }
        if self.running.len() + self.attaching.len() >= MAX_COMMANDS {
            return Err(Refusal::new(
                ErrorCode::TooManyCommands,
                format!("at most {MAX_COMMANDS} commands may run at once in one console"),
            ));
        }
        Ok(())
    }

    /// Checks an `exec` and opens its channel; every check that fails
    /// refuses this command alone.
    async fn start(
        &self,
        id: u32,
        cmd: Option<String>,
        pty: Option<crate::protocol::PtySize>,
        agent: Option<String>,
    ) -> Result<Running, Refusal> {
        self.check_id(id)?;
        if cmd.is_none() && pty.is_none() {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "exec needs \"cmd\" or \"pty\"",
            ));
        }
        let (agent_name, link) =
            super::policy::link_to_run(self.principal, agent.as_deref(), &self.state.agents)
                .map_err(|e| {
                    if let super::policy::Refused::Denied(denied) = &e {
                        self.state.audit(
                    crate::audit::Kind::Denied,
                    &self.principal.name,
                    self.source,
                    agent.as_deref().unwrap_or_default(),
                    crate::audit::Via::Console,
                    serde_json::json!({"wanted": "command_start", "reason": denied.to_string()}),
                );
                    }
                    let code = match e {
                        super::policy::Refused::Denied(super::policy::Denied::Viewer(_)) => {
                            ErrorCode::Forbidden
                        }
                        _ => ErrorCode::AgentUnavailable,
                    };
                    Refusal::new(code, e.to_string())
                })?;
        let ticket = self
            .state
            .quota
            .admit(&self.principal.name, &agent_name, link.info().max_channels)
            .map_err(|e| Refusal::new(ErrorCode::TooManyCommands, e.to_string()))?;
        // A login shell on an agent that keeps sessions outlives the page.
        let session = (cmd.is_none() && pty.is_some() && link.has_sessions()).then(|| {
            crate::protocol::SessionOptions {
                owner: self.principal.name.clone(),
                title: None,
                max_per_owner: Some(self.state.quota.shells_per_user()),
            }
        });
        let (req_cmd, pty_on, kept) = (cmd.clone(), pty.is_some(), session.is_some());
        let req = ExecRequest {
            cmd,
            pty,
            window: Some(BROWSER_WINDOW),
            session,
            ..Default::default()
        };
        let mut detail = match &req_cmd {
            Some(cmd) => serde_json::json!({
                "command": cmd.chars().take(4096).collect::<String>(),
                "pty": pty_on,
            }),
            None => {
                serde_json::json!({"command": "(login shell)", "pty": true, "shell_session": kept})
            }
        };
        let size = pty.unwrap_or(crate::protocol::PtySize { cols: 80, rows: 24 });
        let recording = self
            .state
            .recordings
            .begin(crate::recording::Start {
                user: self.principal.name.clone(),
                agent: agent_name.clone(),
                kind: if req_cmd.is_some() {
                    "command"
                } else {
                    "session"
                },
                session: None,
                command: req_cmd
                    .as_deref()
                    .map_or("(login shell)".into(), |c| c.chars().take(4096).collect()),
                cols: size.cols,
                rows: size.rows,
                bare_lines: !pty_on,
            })
            .await;
        if let Some(r) = &recording {
            detail["recording"] = r.id().into();
        }
        let mut trail =
            crate::audit::CommandTrail::start(&self.state.audit, self.event(&agent_name, detail))
                .await;
        let channel = link.exec(req).await.map_err(|e| {
            trail.end(None, Some(&e.to_string()));
            let code = match e {
                LinkError::TooLarge { .. } => ErrorCode::TooLarge,
                _ => ErrorCode::AgentUnavailable,
            };
            Refusal::new(code, e.to_string())
        })?;
        tracing::info!(user = %self.principal.name, id, "command started");
        Ok(Running::start(
            id,
            channel,
            (agent_name, false),
            (ticket, trail, recording),
            self.out.clone(),
            self.news.clone(),
        ))
    }

    /// Sends or queues input for the command (`super::input`); input that
    /// does not fit is dropped and the page told so.
    async fn stdin(&self, id: u32, data: String, eof: bool) {
        super::metrics::input(data.len());
        let recorder = self
            .running
            .get(&id)
            .and_then(|r| r.recording.clone())
            .filter(|r| r.records_input());
        // Kept for the record only when there is one.
        let text = recorder.as_ref().map(|_| data.clone());
        let data = Bytes::from(data);
        let queued = self.running.get(&id).map(|r| r.input.push(data, eof));
        match (queued, recorder, text) {
            // Recorded only once it went to the command (or its queue):
            // input refused here was never the command's.
            (Some(true), Some(recorder), Some(text)) => recorder.input(&text),
            (Some(false), ..) => {
                let msg = "the command is not reading its input; that input was dropped";
                let _ = self
                    .out
                    .send(error_with(Some(id), ErrorCode::StdinOverflow, msg, false))
                    .await;
            }
            _ => {}
        }
    }
}

impl Running {
    /// Starts the task of a command whose channel is open, which forwards
    /// its output (its input needs a task only while some waits: see
    /// `super::input`).
    fn start(
        id: u32,
        channel: crate::link::Channel,
        agent: (String, bool),
        held: (
            super::quota::Ticket,
            crate::audit::CommandTrail,
            Option<Arc<crate::recording::Recorder>>,
        ),
        out: Outbox,
        finished: mpsc::Sender<News>,
    ) -> Running {
        let recording = held.2.clone();
        let control = channel.controller();
        let input = super::input::Input::new(control.clone());
        let unacked = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(pump(
            id,
            channel,
            agent,
            held,
            out,
            unacked.clone(),
            finished,
        ));
        Running {
            control,
            input,
            unacked,
            owed: AtomicU64::new(0),
            task,
            recording,
        }
    }

    /// The page drew `bytes` more bytes: pass the credit on to the agent,
    /// in batches of [`CREDIT_BATCH`].
    async fn ack(&self, bytes: u64) {
        // Never return more credit than output was sent: a browser that
        // over-acknowledges must not unbound the server's buffers.
        let mut granted = 0;
        let _ = self
            .unacked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                granted = bytes.min(u);
                Some(u - granted)
            });
        if granted == 0 {
            return;
        }
        // Only the console's own loop acknowledges: no race between the two.
        let owed = self.owed.load(Ordering::Relaxed) + granted;
        if owed < CREDIT_BATCH {
            self.owed.store(owed, Ordering::Relaxed);
            return;
        }
        self.owed.store(0, Ordering::Relaxed);
        let _ = self.control.window(owed).await;
    }
}

/// Forwards one command's events to the browser until it ends. A plain fn
/// returning a future, as [`session`], so that the future holds each argument once:
/// an async fn's arguments take room beside the locals they are moved
/// into (here more than 300 bytes for every running command).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
fn pump(
    id: u32,
    mut channel: crate::link::Channel,
    (agent, watch): (String, bool),
    (ticket, mut trail, recording): (
        super::quota::Ticket,
        crate::audit::CommandTrail,
        Option<Arc<crate::recording::Recorder>>,
    ),
    out: Outbox,
    unacked: Arc<AtomicU64>,
    finished: mpsc::Sender<News>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // Held (its quota place) until the command's end: captured here.
        let _ticket = &ticket;
        let record = |data: &[u8]| {
            if let Some(r) = &recording {
                r.output(data);
            }
        };
        // The console's own shutdown is the session loop's: it tells the page
        // once and closes the socket.
        let no_shutdown = tokio_util::sync::CancellationToken::new();
        // Counted as a shell from its `session` event to its end.
        let mut _shell = None;
        // An update taken while gathering output that is not more of it: the
        // next one passed on.
        let mut held = None;
        loop {
            let update = match held.take() {
                Some(update) => update,
                None => {
                    // A quiet command's last output reaches the store within
                    // `recording::FLUSH_EVERY` all the same. (`bridge::next`
                    // only waits on a channel's receiver: dropping it loses
                    // nothing.) Typed input (`--record-input`) can arrive while
                    // this waits: then it wakes at least every FLUSH_EVERY to
                    // look, and at once when a chunk of it waits (a paste into
                    // a quiet command is handed over as it comes, not skipped).
                    let flush_at = recording.as_ref().and_then(|r| {
                        r.due().or_else(|| {
                            r.records_input()
                                .then(|| std::time::Instant::now() + crate::recording::FLUSH_EVERY)
                        })
                    });
                    tokio::select! {
                        u = bridge::next(&mut channel, &no_shutdown) => u,
                        _ = async {
                            match flush_at {
                                Some(at) => tokio::time::sleep_until(at.into()).await,
                                None => std::future::pending().await,
                            }
                        } => {
                            if let Some(r) = &recording {
                                r.flush_if_due().await;
                            }
                            continue;
                        }
                        _ = async {
                            match &recording {
                                Some(r) => r.input_waiting().await,
                                None => std::future::pending().await,
                            }
                        } => {
                            if let Some(r) = &recording {
                                r.settle().await;
                            }
                            continue;
                        }
                    }
                }
            };
            let (msg, last) = match update {
                Update::Output(stream, mut data) => {
                    // A frame larger than a message (an agent may send up to
                    // 1 MiB) goes as several.
                    if data.len() > OUTPUT_MESSAGE {
                        held = Some(Update::Output(stream, data.split_off(OUTPUT_MESSAGE)));
                    }
                    // Output that came while this pump was busy goes in the
                    // same message (one ack from the page, and up to 64 KiB a
                    // frame and a write) instead of one per agent frame, when
                    // the page or the server falls behind.
                    let mut more = Vec::new();
                    let mut len = data.len();
                    while len < OUTPUT_MESSAGE && held.is_none() {
                        match bridge::ready(&mut channel) {
                            Some(Update::Output(s, b))
                                if s == stream && len + b.len() <= OUTPUT_MESSAGE =>
                            {
                                len += b.len();
                                more.push(b);
                            }
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    trail.output(len);
                    record(&data);
                    more.iter().for_each(|b| record(b));
                    let code = match stream {
                        Stream::Stdout => STDOUT,
                        Stream::Stderr => STDERR,
                    };
                    (output(code, id, &data, &more, &unacked), false)
                }
                Update::Notice { code, message } => {
                    (error_with(Some(id), code, &message, false), false)
                }
                Update::Exit(status) => {
                    trail.end(Some(&status), None);
                    (ServerMessage::Exit { id, status }.frame(), true)
                }
                Update::Failed(failure) => {
                    let message = failure.describe(&agent);
                    trail.end(None, Some(&message));
                    (error(Some(id), failure.code(), &message), true)
                }
                Update::Session(session) => {
                    trail.note("session", session.as_str());
                    if let Some(r) = &recording {
                        r.session(&session).await;
                    }
                    _shell.get_or_insert_with(super::metrics::shell_attached);
                    let msg = ServerMessage::Attached {
                        id,
                        agent: &agent,
                        session: &session,
                        watch,
                    };
                    (msg.frame(), false)
                }
                Update::Resized { cols, rows } => {
                    if let Some(r) = &recording {
                        r.resize(cols, rows);
                    }
                    (ServerMessage::Resized { id, cols, rows }.frame(), false)
                }
                Update::Detached(reason) => {
                    let reason = crate::transport::handshake::peer_text(&reason);
                    trail.detached(&reason);
                    (
                        ServerMessage::Detached {
                            id,
                            reason: &reason,
                        }
                        .frame(),
                        true,
                    )
                }
            };
            if last {
                // The id is free before the page hears of the end (the loop
                // takes its news before the page's messages): a page reusing
                // it, or starting another, at once is not refused while the
                // recording ends.
                let _ = finished.send(News::Finished(id)).await;
                let _ = out.send(msg).await;
                break;
            }
            if out.send(msg).await.is_err() {
                let _ = finished.send(News::Finished(id)).await;
                break;
            }
            // Full chunks go to the store before more output is read: a
            // command printing faster than it writes waits for it.
            if let Some(r) = &recording {
                r.settle().await;
            }
        }
        if let Some(r) = &recording {
            r.end().await;
        }
    }
}

/// One binary message: the stream, the id, then `first` and `more` as they
/// came.
fn output(stream: u8, id: u32, first: &[u8], more: &[Bytes], unacked: &AtomicU64) -> WsMessage {
    let len = first.len() + more.iter().map(Bytes::len).sum::<usize>();
    unacked.fetch_add(len as u64, Ordering::AcqRel);
    let mut frame = BytesMut::with_capacity(5 + len);
    frame.put_u8(stream);
    frame.put_u32(id);
    frame.put_slice(first);
    for piece in more {
        frame.put_slice(piece);
    }
    WsMessage::Binary(frame.freeze())
}

/// What the page shows of an agent that can change: name, state, labels,
/// OS.
type Shown = (
    String,
    bool,
    std::collections::BTreeMap<String, String>,
    Option<String>,
);

fn summary_of(agents: &[super::agents::AgentStatus]) -> Vec<Shown> {
    agents
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                a.connected,
                a.labels.clone(),
                a.facts.as_ref().map(|f| f.os.clone()),
            )
        })
        .collect()
}

/// The agents `who` may see, with their state.
pub(crate) fn visible_agents(
    state: &super::AppState,
    who: &super::auth::Principal,
) -> Vec<super::agents::AgentStatus> {
    let mut all = state.agents.statuses();
    all.retain(|a| super::policy::visible(who, &a.name, &state.agents));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// The frames of a server's unmasked writes: (fin, opcode, length).
    fn frames(mut raw: &[u8]) -> Vec<(bool, u8, usize)> {
        let mut out = Vec::new();
        while !raw.is_empty() {
            let (fin, opcode) = (raw[0] & 0x80 != 0, raw[0] & 0x0f);
            let (len, header) = match raw[1] & 0x7f {
                126 => (u16::from_be_bytes([raw[2], raw[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(raw[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            out.push((fin, opcode, len));
            raw = &raw[header + len..];
        }
        out
    }

    #[tokio::test]
    async fn a_large_message_goes_as_frames_of_at_most_64_kib() {
        let (ours, mut theirs) = tokio::io::duplex(4 * 1024 * 1024);
        let config = WebSocketConfig::default().write_buffer_size(0);
        let mut socket = WebSocketStream::from_raw_socket(ours, Role::Server, Some(config)).await;
        let big: Vec<u8> = (0..OUTPUT_MESSAGE + 5).map(|i| i as u8).collect();
        write(&mut socket, WsMessage::Binary(big.clone().into()))
            .await
            .unwrap();
        write(&mut socket, WsMessage::Binary(vec![1, 2, 3].into()))
            .await
            .unwrap();
        write(&mut socket, WsMessage::Text("{}".into()))
            .await
            .unwrap();
        // A long text message (a large fleet's agent list): its frames split
        // a two-byte character at 64 KiB, which the reader joins whole.
        let long = format!("a{}", "é".repeat(40_000));
        write(&mut socket, WsMessage::Text(long.clone().into()))
            .await
            .unwrap();
        drop(socket);
        let mut raw = Vec::new();
        theirs.read_to_end(&mut raw).await.unwrap();
        let got = frames(&raw);
        // Five frames of one binary message (256 KiB and the 5-byte header
        // is four full ones and 5 bytes), then the small ones whole.
        assert_eq!(
            got,
            vec![
                (false, 2, FRAGMENT),
                (false, 0, FRAGMENT),
                (false, 0, FRAGMENT),
                (false, 0, FRAGMENT),
                (true, 0, 5),
                (true, 2, 3),
                (true, 1, 2),
                (false, 1, FRAGMENT),
                (true, 0, long.len() - FRAGMENT),
            ]
        );
        // And a client reads one message, byte for byte.
        let raw = std::io::Cursor::new(raw);
        let client = WebSocketStream::from_raw_socket(raw, Role::Client, None).await;
        let messages: Vec<_> = client.take(4).map(Result::unwrap).collect().await;
        assert_eq!(messages[0], WsMessage::Binary(big.into()));
        assert_eq!(messages[1], WsMessage::Binary(vec![1, 2, 3].into()));
        assert_eq!(messages[3], WsMessage::Text(long.into()));
    }
}
