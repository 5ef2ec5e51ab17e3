//! One client connection: the handshake, then frames dispatched to channels.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::channel::{self, Control, Done, STDIN_WINDOW};
use super::sandbox::ExecPolicy;
use super::session::{Attach, Sessions};
use crate::keyfile::Key;
use crate::protocol::message::DEFAULT_WINDOW;
use crate::protocol::{Frame, FrameCodec, FrameError, Message};
use crate::transport::handshake::{self, HandshakeError};
use crate::transport::writer::write_queued;
use crate::vocab::{ErrorCode, Signal};

/// Frames queued for the socket, shared by all channels of a connection:
/// 64 frames of at most 256 KiB of output each (and never more than the
/// channels' credit). When the client reads
/// slowly, channels wait here rather than buffer.
const OUTBOUND_QUEUE: usize = 64;

/// With nothing from the server for this long, a connection is taken for
/// dead: its commands are killed (as when it closes), and an agent that
/// dials in reconnects. The server pings at least every 10 s, so only a
/// link that is cut without a close (a pulled cable, a stalled relay) is
/// this quiet; TCP keepalive alone would take minutes, or never notice a
/// relay that still acknowledges.
pub(crate) const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Channels running at once before `exec` is refused with `too_many_channels`.
    pub max_channels: usize,
    /// Whether it keeps shell sessions (says the `sessions` capability).
    pub sessions: bool,
}

type AgentFramed = crate::transport::handshake::LinkFramed;

/// Runs the handshake on an accepted connection. `None` when it failed,
/// timed out, was evicted to make room for newer connections, or the agent
/// is shutting down; the reason is logged and (where useful) told to the peer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn authenticate(
    stream: crate::transport::Stream,
    peer: String,
    key: &Key,
    name: Option<&str>,
    tls: Option<&crate::transport::tls::Acceptor>,
    timeout: Duration,
    limits: Limits,
    slots: &Arc<Semaphore>,
    evicted: &CancellationToken,
    shutdown: &CancellationToken,
) -> Option<(AgentFramed, String, handshake::Authenticated)> {
    let mut framed = Framed::new(stream, FrameCodec::handshake());
    let authed = tokio::select! {
        r = tokio::time::timeout(timeout, handshake::answer(&mut framed, key, name, tls, slots, limits.max_channels, limits.sessions)) => r,
        _ = evicted.cancelled() => {
            debug!(%peer, "handshake dropped: too many connections are authenticating");
            return None;
        }
        _ = shutdown.cancelled() => return None,
    };
    match authed {
        Ok(Ok(authed)) => {
            info!(%peer, "client authenticated");
            // Authenticated: the protocol's full limits from here on.
            *framed.codec_mut() = FrameCodec::new();
            Some((framed, peer, authed))
        }
        Ok(Err(HandshakeError::Closed)) => {
            // A TCP health probe connects and hangs up: not worth a warning.
            debug!(%peer, "connection closed before the handshake");
            None
        }
        Ok(Err(err)) => {
            // What a stranger can cause (a TLS scanner, garbage, an old
            // client) is not worth a warning each: only a wrong key or
            // version, which a misconfigured server of ours also causes.
            if matches!(
                err,
                HandshakeError::BadMac | HandshakeError::Version(_) | HandshakeError::Refused(_)
            ) {
                warn!(%peer, error = %err, "handshake failed");
            } else {
                debug!(%peer, error = %err, "handshake failed");
            }
            let _ = framed.send(Frame::new(0, err.to_message())).await;
            None
        }
        Err(_) => {
            debug!(%peer, "no handshake within {timeout:?}; dropping");
            let _ = framed
                .send(Frame::new(
                    0,
                    Message::error(ErrorCode::Auth, "handshake timed out"),
                ))
                .await;
            None
        }
    }
}

/// Serves an authenticated connection until it closes or `shutdown` fires.
/// A client that said it pings (the `ping` capability) and then goes
/// silent for [`SILENCE_LIMIT`] is taken for dead: its commands are killed,
/// and an agent that dials in reconnects instead of waiting on a silent
/// link for minutes. A client that does not ping may stay silent.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_authenticated(
    framed: AgentFramed,
    limits: Limits,
    policy: Arc<ExecPolicy>,
    sessions: Arc<Sessions>,
    shutdown: CancellationToken,
    peer: &str,
    authed: &handshake::Authenticated,
) {
    let idle = authed
        .capabilities
        .iter()
        .any(|c| c == handshake::PINGS)
        .then_some(SILENCE_LIMIT);
    Connection::new(limits, policy, sessions)
        .run(framed, shutdown, idle)
        .await;
    info!(%peer, "client disconnected");
}

/// The connection's side of a running channel.
struct ChannelHandle {
    /// Never waits: merged, not queued (see [`super::controls`]).
    control: super::controls::ControlSender,
    /// Never waits: bounded in bytes by the stdin credit, in pieces by
    /// gathering small input (see [`super::inbox`]).
    stdin: super::inbox::InboxSender,
    /// Stdin credit the client has spent and the channel not yet returned;
    /// the channel gives it back (and tells the client) as the process reads.
    stdin_spent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Cancelled by the client's `close` and when the connection lets go
    /// of the channel: a command still waiting for its start then never
    /// starts (its controls are read only once it runs).
    closed: CancellationToken,
}

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

struct Connection {
    limits: Limits,
    policy: Arc<ExecPolicy>,
    sessions: Arc<Sessions>,
    channels: HashMap<u32, ChannelHandle>,
}

/// The receiving ends of a new channel's queues, for whoever runs it.
type ChannelQueues = (
    super::controls::Controls,
    super::inbox::Inbox,
    Arc<std::sync::atomic::AtomicUsize>,
    CancellationToken,
);

impl Connection {
    fn new(limits: Limits, policy: Arc<ExecPolicy>, sessions: Arc<Sessions>) -> Self {
        Connection {
            limits,
            policy,
            sessions,
            channels: HashMap::new(),
        }
    }

    /// Checks that `ch` may start (an id of 1 or more, not running, room
    /// for one more channel) and registers it; the refusal otherwise.
    fn open_channel(&mut self, ch: u32) -> Result<ChannelQueues, Box<Message>> {
        if ch == 0 {
            return Err(Box::new(Message::error(
                ErrorCode::BadChannel,
                "exec needs a channel id of 1 or more",
            )));
        }
        if self.channels.contains_key(&ch) {
            return Err(Box::new(Message::error(
                ErrorCode::ChannelInUse,
                format!("channel {ch} is already running"),
            )));
        }
        if self.channels.len() >= self.limits.max_channels {
            let msg = format!(
                "at most {} channels may run at once",
                self.limits.max_channels
            );
            return Err(Box::new(Message::error(ErrorCode::TooManyChannels, msg)));
        }
        let (control, control_rx) = super::controls::controls();
        let (stdin, stdin_rx) = super::inbox::inbox();
        let stdin_spent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = CancellationToken::new();
        self.channels.insert(
            ch,
            ChannelHandle {
                control,
                stdin,
                stdin_spent: stdin_spent.clone(),
                closed: closed.clone(),
            },
        );
        Ok((control_rx, stdin_rx, stdin_spent, closed))
    }

    async fn run(
        mut self,
        framed: AgentFramed,
        shutdown: CancellationToken,
        idle: Option<Duration>,
    ) {
        // A frame only notes when it came; the timer is looked at (and moved
        // on) only when it fires, not re-armed for every frame.
        let limit = idle.unwrap_or(Duration::MAX);
        let mut last_frame = tokio::time::Instant::now();
        let silence = tokio::time::sleep(idle.unwrap_or_default());
        tokio::pin!(silence);
        let (mut sink, mut stream) = framed.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(OUTBOUND_QUEUE);
        // Unbounded, yet bounded in fact: each channel sends exactly one Done,
        // and at most `max_channels` exist.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let writer = tokio::spawn(async move {
            if let Err(e) = write_queued(&mut out_rx, &mut sink).await {
                debug!(error = %e, "write failed");
            }
            crate::transport::writer::close(&mut sink).await;
        });

        loop {
            tokio::select! {
                frame = stream.next() => match frame {
                    None => break,
                    Some(Ok(frame)) => {
                        self.dispatch(frame, &out_tx, &done_tx).await;
                        // Counted from the end of the dispatch: one held up
                        // by a full queue (an overloaded agent) is not the
                        // server's silence, and frames that came meanwhile
                        // wait in the stream.
                        last_frame = tokio::time::Instant::now();
                    }
                    Some(Err(FrameError::Io(e))) => {
                        debug!(error = %e, "read failed");
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "protocol error; closing the connection");
                        let _ = out_tx.send(Frame::new(0, Message::error(ErrorCode::Protocol, e.to_string()))).await;
                        break;
                    }
                },
                Some(done) = done_rx.recv() => {
                    self.channels.remove(&done.ch);
                    let _ = out_tx.send(done.exit).await;
                    // As above: time spent waiting here is the agent's.
                    last_frame = tokio::time::Instant::now();
                }
                _ = &mut silence, if idle.is_some() => {
                    if last_frame.elapsed() < limit {
                        silence.as_mut().reset(last_frame + limit);
                        continue;
                    }
                    warn!("nothing from the server for {limit:?}; taking the link for dead");
                    break;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        // Dropping the control senders closes every channel: each kills its
        // process group. Give the writer a moment to deliver what is queued
        // (a protocol error, the last exits), then wait for every channel to
        // report, so that no process outlives its connection.
        self.channels.clear();
        drop(out_tx);
        let mut writer = writer;
        if tokio::time::timeout(Duration::from_secs(2), &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        drop(done_tx);
        while done_rx.recv().await.is_some() {}
    }

    async fn dispatch(
        &mut self,
        frame: Frame,
        out: &mpsc::Sender<Frame>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let ch = frame.ch;
        let reply = |msg: Message| out.send(Frame::new(ch, msg));
        match frame.msg {
            Message::Ping { id } => {
                let facts = Some(super::facts::gather());
                let _ = reply(Message::Pong { id, facts }).await;
            }
            Message::Exec => {
                let req = match frame.exec_request() {
                    Ok(req) => req,
                    Err(e) => {
                        let msg = format!("the exec payload is not a valid request: {e}");
                        let _ = reply(Message::error(ErrorCode::BadExec, msg)).await;
                        return;
                    }
                };
                let (control_rx, stdin_rx, stdin_spent, closed) = match self.open_channel(ch) {
                    Ok(queues) => queues,
                    Err(refusal) => {
                        let _ = reply(*refusal).await;
                        return;
                    }
                };
                if req.session.is_some() {
                    let attach = Attach {
                        ch,
                        watch: false,
                        watcher: None,
                        size: req.pty,
                        window: req.window.unwrap_or(DEFAULT_WINDOW),
                        control: control_rx,
                        input: stdin_rx,
                        stdin_spent,
                        out: out.clone(),
                        done: done.clone(),
                    };
                    self.sessions.open(req, self.policy.clone(), attach, closed);
                    return;
                }
                tokio::spawn(channel::run(
                    ch,
                    req,
                    self.policy.clone(),
                    (control_rx, closed),
                    (stdin_rx, stdin_spent),
                    out.clone(),
                    done.clone(),
                ));
            }
            Message::Attach {
                session,
                cols,
                rows,
                watch,
                window,
                watcher,
            } => {
                let (control_rx, stdin_rx, stdin_spent, _) = match self.open_channel(ch) {
                    Ok(queues) => queues,
                    Err(refusal) => {
                        let _ = reply(*refusal).await;
                        return;
                    }
                };
                let attach = Attach {
                    ch,
                    watch,
                    watcher,
                    size: Some(crate::protocol::PtySize { cols, rows }),
                    window: window.unwrap_or(DEFAULT_WINDOW),
                    control: control_rx,
                    input: stdin_rx,
                    stdin_spent,
                    out: out.clone(),
                    done: done.clone(),
                };
                self.sessions.attach(&session, attach);
            }
            Message::Put | Message::Get => {
                let (control, input, stdin_spent, closed) = match self.open_channel(ch) {
                    Ok(queues) => queues,
                    Err(refusal) => {
                        let _ = reply(*refusal).await;
                        return;
                    }
                };
                let transfer = super::files::Transfer {
                    ch,
                    policy: self.policy.clone(),
                    sessions: self.sessions.clone(),
                    control,
                    closed,
                    input,
                    stdin_spent,
                    out: out.clone(),
                    done: done.clone(),
                };
                let bad = |e: serde_json::Error| {
                    format!(
                        "the {} payload is not a valid request: {e}",
                        frame.msg.type_name()
                    )
                };
                // A bad request still ends its channel with `exit`, through
                // the transfer, so that the id is freed in one place.
                match &frame.msg {
                    Message::Put => match frame.payload_json() {
                        Ok(req) => {
                            tokio::spawn(transfer.put(req));
                        }
                        Err(e) => {
                            tokio::spawn(transfer.refuse(bad(e)));
                        }
                    },
                    _ => match frame.payload_json() {
                        Ok(req) => {
                            tokio::spawn(transfer.get(req));
                        }
                        Err(e) => {
                            tokio::spawn(transfer.refuse(bad(e)));
                        }
                    },
                }
            }
            Message::Detach => self.forward(ch, Control::Detach),
            Message::ListSessions { id } => {
                let mut list = self.sessions.list();
                // The answer must fit one payload: the oldest sessions first.
                let payload = loop {
                    match serde_json::to_vec(&list) {
                        Ok(p) if p.len() <= crate::protocol::MAX_PAYLOAD_LEN => break p,
                        Ok(_) => list.truncate(list.len() / 2),
                        Err(_) => break b"[]".to_vec(),
                    }
                };
                let frame = Frame::with_payload(0, Message::SessionList { id }, payload.into());
                let _ = out.send(frame).await;
            }
            Message::EndSession { session } => {
                self.sessions.end(&session);
            }
            Message::UpdateSession {
                session,
                title,
                watchers,
            } => {
                self.sessions.update(&session, title, watchers);
            }
            Message::Stdin { eof } => match self.channels.get(&ch) {
                // Never waits: the client's credit bounds what is queued.
                Some(handle) => {
                    use std::sync::atomic::Ordering;
                    let cost = frame.payload.len().max(1);
                    let spent = handle.stdin_spent.fetch_add(cost, Ordering::AcqRel) + cost;
                    if spent > STDIN_WINDOW {
                        handle.stdin_spent.fetch_sub(cost, Ordering::AcqRel);
                        let msg = format!(
                            "stdin beyond the channel's credit of {STDIN_WINDOW} bytes was refused; wait for window frames"
                        );
                        let _ = reply(Message::error(ErrorCode::StdinOverflow, msg)).await;
                    } else {
                        handle.stdin.send(frame.payload, eof);
                    }
                }
                None => {
                    let _ = reply(Message::error(
                        ErrorCode::NotRunning,
                        format!("channel {ch} is not running"),
                    ))
                    .await;
                }
            },
            Message::Signal { signal } => {
                match signal
                    .number()
                    .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
                {
                    Some(sig) => self.forward(ch, Control::Signal(sig)),
                    None => {
                        let msg = format!("unknown signal; expected {}", Signal::EXPECTED);
                        let _ = reply(Message::error(ErrorCode::BadSignal, msg)).await;
                    }
                }
            }
            Message::Resize { cols, rows } => {
                self.forward(ch, Control::Resize(crate::protocol::PtySize { cols, rows }))
            }
            Message::Window { add } => self.forward(ch, Control::Window(add)),
            Message::Close => {
                if let Some(handle) = self.channels.get(&ch) {
                    handle.closed.cancel();
                }
                self.forward(ch, Control::Close);
            }
            other => {
                let msg = format!("a client may not send {:?} frames here", other.type_name());
                let _ = reply(Message::error(ErrorCode::Unexpected, msg)).await;
            }
        }
    }

    /// Forwards to a running channel, never waiting; a channel that is not
    /// running ignores it, since these race with the channel's exit by nature.
    fn forward(&self, ch: u32, control: Control) {
        if let Some(handle) = self.channels.get(&ch) {
            handle.control.send(control);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::{ExecRequest, PtySize};
    use crate::vocab::SignalNumber;

    /// Long enough for anything here; only a hang reaches it.
    const HANG: Duration = Duration::from_secs(30);

    fn policy_with(file_helper: Option<std::path::PathBuf>) -> Arc<ExecPolicy> {
        let mut policy = ExecPolicy::for_tests();
        if let Some(helper) = file_helper {
            policy.set_file_helper(helper);
        }
        Arc::new(policy)
    }

    /// A connection fed frame by frame, as its reader feeds it, with what
    /// it sends back and the ends of its channels collected.
    struct Driven {
        conn: Connection,
        out: mpsc::Sender<Frame>,
        frames: mpsc::Receiver<Frame>,
        done: mpsc::UnboundedSender<Done>,
        ended: mpsc::UnboundedReceiver<Done>,
    }

    impl Driven {
        fn new(file_helper: Option<std::path::PathBuf>) -> Driven {
            let limits = Limits {
                max_channels: 16,
                sessions: false,
            };
            let sessions = Sessions::new(super::super::session::SessionLimits::default());
            let (out, frames) = mpsc::channel(OUTBOUND_QUEUE);
            let (done, ended) = mpsc::unbounded_channel();
            Driven {
                conn: Connection::new(limits, policy_with(file_helper), sessions),
                out,
                frames,
                done,
                ended,
            }
        }

        async fn send(&mut self, ch: u32, msg: Message) {
            self.send_with(ch, msg, bytes::Bytes::new()).await;
        }

        async fn send_with(&mut self, ch: u32, msg: Message, payload: bytes::Bytes) {
            let frame = Frame::with_payload(ch, msg, payload);
            self.conn.dispatch(frame, &self.out, &self.done).await;
        }

        async fn send_json(&mut self, ch: u32, msg: Message, payload: impl serde::Serialize) {
            let payload = serde_json::to_vec(&payload).unwrap();
            self.send_with(ch, msg, payload.into()).await;
        }

        /// The next channel to end.
        async fn ended(&mut self, what: &str) -> Done {
            tokio::time::timeout(HANG, self.ended.recv())
                .await
                .unwrap_or_else(|_| panic!("no end: {what}"))
                .unwrap()
        }

        /// The output sent so far.
        fn output(&mut self) -> Vec<u8> {
            let mut data = Vec::new();
            while let Ok(f) = self.frames.try_recv() {
                if matches!(f.msg, Message::Stdout) {
                    data.extend_from_slice(&f.payload);
                }
            }
            data
        }
    }

    fn killed(end: &Done) {
        match end.exit.msg {
            Message::Exit(ref s) => assert_eq!(s.signal, Some(SignalNumber(9)), "{s:?}"),
            ref other => panic!("{other:?}"),
        }
    }

    fn exited_0(end: &Done) {
        match end.exit.msg {
            Message::Exit(ref s) => assert_eq!(s.code, Some(0), "{s:?}"),
            ref other => panic!("{other:?}"),
        }
    }

    /// An executable shell script `helper` in `dir` running `body`.
    fn script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let helper = dir.join("helper");
        std::fs::write(&helper, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        helper
    }

    /// A helper that answers a `get` of the five bytes `hello`.
    fn fake_get_helper(dir: &std::path::Path) -> std::path::PathBuf {
        use super::super::file_io::{Done as Answer, Identity, Reply};
        let reply = Reply::Ok(Answer {
            info: crate::protocol::message::FileInfo {
                path: crate::protocol::message::WirePath(b"/f".to_vec()),
                size: 5,
                offset: 0,
                length: 5,
                mode: 0o644,
                mtime_ms: 0,
                sha256: None,
                created: false,
            },
            identity: Identity {
                dev: 1,
                ino: 1,
                size: 5,
                mtime_s: 0,
                mtime_ns: 0,
                ctime_s: 0,
                ctime_ns: 0,
            },
        });
        let reply = serde_json::to_string(&reply).unwrap();
        script(dir, &format!("read job\nprintf '%s\\nhello' '{reply}'"))
    }

    /// A `get` of `hello` with `window` bytes of credit, under way.
    async fn get_hello(window: u64) -> (tempfile::TempDir, Driven) {
        let dir = tempfile::tempdir().unwrap();
        let mut link = Driven::new(Some(fake_get_helper(dir.path())));
        let get = serde_json::json!({ "path": "/f", "window": window });
        link.send_json(1, Message::Get, get).await;
        (dir, link)
    }

    /// Credit a client returns before the helper has answered counts: a
    /// `get` with no window of its own then sends what the credit allows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credit_sent_before_a_gets_answer_is_kept() {
        let (_dir, mut link) = get_hello(0).await;
        link.send(1, Message::Window { add: 1 << 20 }).await;
        let end = link.ended("the get's: its credit was lost").await;
        exited_0(&end);
        assert_eq!(link.output(), b"hello");
    }

    /// What the helper sent with its answer goes out within the credit, as
    /// the rest does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gets_first_bytes_keep_to_the_window() {
        let (_dir, mut link) = get_hello(2).await;
        let first = loop {
            let f = tokio::time::timeout(HANG, link.frames.recv())
                .await
                .expect("the get's first data")
                .unwrap();
            if matches!(f.msg, Message::Stdout) {
                break f.payload;
            }
        };
        assert_eq!(&first[..], b"he", "past the window of 2");
        link.send(1, Message::Window { add: 1 << 20 }).await;
        let end = link.ended("the get's").await;
        exited_0(&end);
        assert_eq!(link.output(), b"llo");
    }

    /// As a command: a shell session closed while it waits for a start
    /// place never starts, and is not left listed; a channel that attached
    /// to it meanwhile gets its end too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_closed_while_it_waits_to_start_never_starts() {
        let _alone = super::super::process::HUNG_STARTS.lock().await;
        let mut link = Driven::new(None);
        let places = super::super::process::hold_start_places().await;
        let req = ExecRequest {
            argv: Some(vec!["/bin/sh".into()]),
            pty: Some(PtySize { cols: 80, rows: 24 }),
            session: Some(crate::protocol::SessionOptions {
                owner: "alice".into(),
                title: None,
                max_per_owner: None,
            }),
            ..ExecRequest::default()
        };
        link.send_json(1, Message::Exec, req).await;
        // Listed while it waits: another tab attaches meanwhile.
        let session = link.conn.sessions.list()[0].id.clone();
        let attach = Message::Attach {
            session,
            cols: 80,
            rows: 24,
            watch: false,
            window: None,
            watcher: None,
        };
        link.send(2, attach).await;
        link.send(1, Message::Close).await;
        let mut ends = [
            link.ended("the closed session's, while it waits").await,
            link.ended("the attach's to the closed session").await,
        ];
        drop(places);
        ends.sort_by_key(|e| e.ch);
        killed(&ends[0]);
        assert!(
            matches!(
                ends[1].exit.msg,
                Message::Error {
                    code: ErrorCode::NoSession,
                    ..
                }
            ),
            "{:?}",
            ends[1].exit.msg
        );
        // Its entry goes with its task.
        let gone = async {
            while !link.conn.sessions.list().is_empty() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(HANG, gone)
            .await
            .expect("the session still listed");
    }

    /// As a command: a `put` or `get` closed while its helper waits for a
    /// start place ends without starting it (a `put` would create its file).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_closed_while_it_waits_to_start_never_starts_its_helper() {
        let _alone = super::super::process::HUNG_STARTS.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let ran = dir.path().join("helper-ran");
        let helper = script(dir.path(), &format!("/usr/bin/touch {}", ran.display()));
        let mut link = Driven::new(Some(helper));
        let places = super::super::process::hold_start_places().await;
        let target = dir.path().join("uploaded");
        let put = serde_json::json!({ "path": target.to_str().unwrap() });
        link.send_json(1, Message::Put, put).await;
        link.send(1, Message::Close).await;
        killed(&link.ended("the closed transfer's, while it waits").await);
        drop(places);
        // Starts go on, and the helper's was not left behind to run later.
        let req = ExecRequest {
            argv: Some(vec!["/usr/bin/true".into()]),
            ..ExecRequest::default()
        };
        link.send_json(2, Message::Exec, req).await;
        assert_eq!(link.ended("the next command's").await.ch, 2);
        assert!(!ran.exists(), "the closed transfer's helper ran");
        assert!(!target.exists());
    }

    /// The link is shared by every user of a server. A channel that does
    /// not read its controls (here: waiting for a start place) must not
    /// make the connection's one reader wait, whatever its user sends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn controls_for_a_channel_that_is_not_reading_never_hold_up_the_link() {
        let _alone = super::super::process::HUNG_STARTS.lock().await;
        let mut link = Driven::new(None);
        let places = super::super::process::hold_start_places().await;
        let req = ExecRequest {
            cmd: Some("read line; /usr/bin/stty size".into()),
            pty: Some(PtySize { cols: 80, rows: 24 }),
            ..ExecRequest::default()
        };
        link.send_json(1, Message::Exec, req).await;
        // A window dragged about: a thousand sizes, credit with each.
        let flood = async {
            for i in 0..1000u16 {
                let (cols, rows) = (20 + i % 200, 10 + i % 50);
                link.send(1, Message::Resize { cols, rows }).await;
                link.send(1, Message::Window { add: 1 }).await;
            }
            // Another user's frame is answered meanwhile.
            link.send(0, Message::Ping { id: 7 }).await;
        };
        tokio::time::timeout(HANG, flood)
            .await
            .expect("the reader waited on a channel that does not read its controls");
        let pong = link.frames.recv().await.unwrap();
        assert!(matches!(pong.msg, Message::Pong { id: 7, .. }), "{pong:?}");

        // Once it runs, the command sees the last size asked for.
        drop(places);
        link.send_with(1, Message::Stdin { eof: false }, "go\n".into())
            .await;
        let end = link.ended("the command's").await;
        let said = String::from_utf8_lossy(&link.output()).into_owned();
        assert!(
            matches!(end.exit.msg, Message::Exit(ref s) if s.code == Some(0)),
            "{:?}: {said}",
            end.exit.msg
        );
        assert!(said.contains("59 219"), "{said:?}");
    }
}
