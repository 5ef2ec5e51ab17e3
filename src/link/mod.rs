//! The client end of the agent protocol: one authenticated connection to an
//! agent, multiplexing many channels.
//!
//! The web server holds one [`AgentLink`] per agent and opens a channel per
//! command; tests and benchmarks use it the same way. A reader task routes
//! each incoming frame to its channel's event queue. Those queues need no
//! bound of their own: the agent never has more than the channel's window of
//! output outstanding, and the holder of a [`Channel`] returns credit only
//! as it consumes events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::keyfile::Key;
use crate::protocol::message::STDIN_WINDOW;
use crate::protocol::{ExecRequest, Frame, FrameCodec, FrameError, Message, SessionInfo};
use crate::transport::handshake;
pub(crate) use crate::transport::handshake::AgentInfo;
use crate::transport::writer::write_queued;
use crate::vocab::{ErrorCode, ExitStatus, Signal};

/// Connecting and authenticating to an agent must finish within this.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Frames queued for the agent from all channels of a link: 256.
const OUTBOUND_QUEUE: usize = 256;

/// A link on which nothing arrives for this long is taken for dead (the
/// cable was pulled: no close ever comes). Pings keep an idle link talking.
pub const DEFAULT_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// What the link knows of its agent's health, kept up by pings.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub(crate) connected_since: std::time::SystemTime,
    pub(crate) last_seen: std::time::SystemTime,
    /// Of the last answered ping.
    pub(crate) rtt: Option<std::time::Duration>,
    /// From the last `pong`.
    pub(crate) facts: Option<crate::protocol::HostFacts>,
}

/// The link's liveness state, shared by its reader and pinger tasks.
struct Liveness {
    started: tokio::time::Instant,
    connected_since: std::time::SystemTime,
    /// Milliseconds after `started` that the last frame arrived: an atomic,
    /// since the reader stores it for every frame.
    last_frame_ms: std::sync::atomic::AtomicU64,
    /// The ping in flight (id, sent at), the last RTT and facts.
    probe: Mutex<Probe>,
    /// Told when the agent's facts first arrive.
    facts_known: tokio::sync::Notify,
}

#[derive(Default)]
struct Probe {
    in_flight: Option<(u64, tokio::time::Instant)>,
    rtt: Option<std::time::Duration>,
    facts: Option<crate::protocol::HostFacts>,
}

/// The link's stream, noting every read that brings bytes as a sign of
/// life: a large frame on a slow link arrives over many reads, and its
/// first bytes count, not only its last.
struct Heard<S> {
    inner: S,
    liveness: Arc<Liveness>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Heard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.liveness.heard();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Longest text kept of one host fact: an agent's words are shown, so
/// they are bounded.
const MAX_FACT_CHARS: usize = 256;

fn bounded(mut facts: crate::protocol::HostFacts) -> crate::protocol::HostFacts {
    for text in [
        &mut facts.hostname,
        &mut facts.os,
        &mut facts.kernel,
        &mut facts.arch,
        &mut facts.version,
    ] {
        if text.chars().count() > MAX_FACT_CHARS {
            *text = text.chars().take(MAX_FACT_CHARS).collect();
        }
    }
    facts
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            started: tokio::time::Instant::now(),
            connected_since: std::time::SystemTime::now(),
            last_frame_ms: std::sync::atomic::AtomicU64::new(0),
            probe: Mutex::default(),
            facts_known: tokio::sync::Notify::new(),
        }
    }

    fn heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_frame_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> std::time::Duration {
        let last = self.last_frame_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }

    fn pong(&self, id: u64, facts: Option<crate::protocol::HostFacts>) {
        let mut probe = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((sent_id, at)) = probe.in_flight
            && sent_id == id
        {
            probe.rtt = Some(at.elapsed());
            probe.in_flight = None;
        }
        if let Some(facts) = facts {
            if probe.facts.is_none() {
                self.facts_known.notify_one();
            }
            probe.facts = Some(bounded(facts));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to agent at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("agent handshake failed: {0}")]
    Handshake(#[from] handshake::OfferError),
    #[error("no answer from {addr} within {limit:?}")]
    Timeout {
        addr: String,
        limit: std::time::Duration,
    },
    #[error("the connection to the agent is closed")]
    Closed,
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    #[error(
        "the command's request is {size} bytes of JSON; the agent protocol carries at most {max}"
    )]
    TooLarge { size: u64, max: usize },
}

/// How the link's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS 1.3, the handshake bound to the session (the default).
    Tls,
    /// Plain TCP: only with `--insecure-plaintext`, on both ends.
    Plaintext,
    /// A Unix-domain socket on this host, its address a path: the embedded
    /// agent's, in a directory only the server's user can enter, and bound
    /// by this very process (checked at each connect, so that no process
    /// can relay the link through a socket of its own at that path). The
    /// key's handshake runs as over TCP; TLS would guard nothing the kernel
    /// does not already keep to this host, and would cost the link a third
    /// of its throughput.
    Local,
}

/// The client's TLS set-up, made once.
pub(crate) fn default_connector() -> Result<crate::transport::tls::Connector, LinkError> {
    static CONNECTOR: std::sync::OnceLock<crate::transport::tls::Connector> =
        std::sync::OnceLock::new();
    if let Some(c) = CONNECTOR.get() {
        return Ok(c.clone());
    }
    let c = crate::transport::tls::Connector::new()
        .map_err(|e| LinkError::Handshake(handshake::OfferError::Protocol(e.to_string())))?;
    Ok(CONNECTOR.get_or_init(|| c).clone())
}

/// What a channel receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The command ended; no event follows.
    Exit(ExitStatus),
    /// An error about this channel (`code` is stable).
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The link to the agent was lost; no event follows.
    Lost,
    /// The channel is attached to this session (it opened it, or attached).
    Session(String),
    /// Part of the redraw that starts an attach (before any live output).
    Snapshot(Bytes),
    /// A watcher's terminal size: the session's writer resized it.
    Resize {
        cols: u16,
        rows: u16,
    },
    /// The channel left its session, which goes on; no event follows.
    Detached(String),
    /// What a `put` wrote or a `get` reads. Boxed, as the largest variant
    /// by far, which would make every event as large.
    File(Box<crate::protocol::FileInfo>),
}

impl Event {
    /// Whether nothing follows this event on its channel.
    pub(crate) fn is_final(&self) -> bool {
        match self {
            Event::Exit(_) | Event::Lost | Event::Detached(_) => true,
            Event::Error { code, .. } => code.is_refusal(),
            _ => false,
        }
    }
}

/// Where a channel's frames go: its events, and its stdin credit.
struct Route {
    /// Each event boxed: the queue's first block holds 32 from the start
    /// (1.5 KiB unboxed, 48 bytes an event, for every command).
    events: mpsc::UnboundedSender<Box<Event>>,
    stdin_credit: Arc<Semaphore>,
}

impl Route {
    /// The channel is over: wake anyone waiting for stdin credit.
    fn end(self) {
        self.stdin_credit.close();
    }
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// `list_sessions` requests waiting for their answer, by id.
type Listings = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Vec<SessionInfo>>>>>;

/// How long an agent has to answer `list_sessions`.
const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How old a session list may be when it is only shown: 500 ms. However
/// many pages and API callers ask, an agent answers at most one list at a
/// time, and for showing, about two a second.
const LIST_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(500);

/// The last session list, and when it was asked for.
type ListCache = Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, u64, Vec<SessionInfo>)>>>;

/// An authenticated connection to one agent.
#[derive(Clone)]
pub struct AgentLink {
    out: mpsc::Sender<Frame>,
    info: AgentInfo,
    liveness: Arc<Liveness>,
    routes: Routes,
    listings: Listings,
    list_cache: ListCache,
    /// Bumped by every change this link makes to the agent's sessions: a
    /// list from before it is not shown.
    list_generation: Arc<std::sync::atomic::AtomicU64>,
    next_ch: Arc<AtomicU32>,
    next_list: Arc<std::sync::atomic::AtomicU64>,
    closed: CancellationToken,
}

impl AgentLink {
    /// Connects to `addr` (`HOST:PORT`; a name is resolved on every call,
    /// so a container that moves is found again) over TLS and
    /// authenticates with `key`.
    pub async fn connect(
        addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
        key: &Key,
    ) -> Result<AgentLink, LinkError> {
        AgentLink::connect_with(addr, key, Security::Tls).await
    }

    /// [`AgentLink::connect`], choosing TLS or (`--insecure-plaintext`)
    /// plain TCP.
    pub async fn connect_with(
        addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
        key: &Key,
        security: Security,
    ) -> Result<AgentLink, LinkError> {
        AgentLink::dial(addr, key, security, None, DEFAULT_DEAD_AFTER).await
    }

    /// Connects to the agent at `addr`; when `name` is given, an agent
    /// that proves another name is refused (it is not the host the server
    /// meant). A link silent for `dead_after` is taken for lost.
    pub(crate) async fn dial(
        addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
        key: &Key,
        security: Security,
        name: Option<&str>,
        dead_after: std::time::Duration,
    ) -> Result<AgentLink, LinkError> {
        // A host that drops packets would leave connect and the handshake
        // waiting for minutes: give both a deadline.
        let attempt = async {
            let connect_error = |source| LinkError::Connect {
                addr: addr.to_string(),
                source,
            };
            let stream: crate::transport::Stream = if security == Security::Local {
                let path = addr.to_string();
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_error)?;
                // Only the socket this process bound and handed down: the
                // listening end's credentials name the process that called
                // listen(). Another process of the same user could put its
                // own socket at the path and relay the link, reading it
                // (there is no TLS here to bind the handshake to).
                let made_here = stream
                    .peer_cred()
                    .is_ok_and(|c| c.pid() == Some(std::process::id() as i32));
                if !made_here {
                    return Err(connect_error(std::io::Error::other(
                        "the socket at this path is not the one this server made; refusing it",
                    )));
                }
                Box::new(stream)
            } else {
                let stream = TcpStream::connect(&addr).await.map_err(connect_error)?;
                crate::transport::socket::prepare_link(&stream);
                Box::new(stream)
            };
            // The handshake's small limits until the agent has proved the
            // key, as the agent applies to its unauthenticated peers.
            let mut framed = Framed::new(stream, FrameCodec::handshake());
            let connector = match security {
                Security::Tls => Some(default_connector()?),
                Security::Plaintext | Security::Local => None,
            };
            let info = handshake::offer(&mut framed, key, connector.as_ref()).await?;
            *framed.codec_mut() = FrameCodec::new();
            Ok::<_, LinkError>((framed, info))
        };
        let (framed, info) = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.to_string(),
                limit: CONNECT_TIMEOUT,
            })??;
        if let (Some(wanted), Some(proved)) = (name, info.name.as_deref())
            && wanted != proved
        {
            return Err(LinkError::Handshake(handshake::OfferError::Protocol(
                format!("the agent at {addr} is {proved:?}, not {wanted:?}"),
            )));
        }
        let who = name.map_or_else(|| addr.to_string(), str::to_owned);
        Ok(AgentLink::start(framed, info, dead_after, who))
    }

    /// A link over a connection an agent made to us (it dialed in), once
    /// its handshake is done.
    pub(crate) fn dialed_in(
        framed: handshake::LinkFramed,
        info: AgentInfo,
        dead_after: std::time::Duration,
    ) -> AgentLink {
        let who = info.name.clone().unwrap_or_default();
        AgentLink::start(framed, info, dead_after, who)
    }

    fn start(
        framed: handshake::LinkFramed,
        info: AgentInfo,
        dead_after: std::time::Duration,
        who: String,
    ) -> AgentLink {
        let liveness = Arc::new(Liveness::new());
        // What was read ahead during the handshake stays with the codec.
        let mut parts = framed.into_parts();
        let io: crate::transport::Stream = Box::new(Heard {
            inner: parts.io,
            liveness: liveness.clone(),
        });
        let framed = {
            let mut next = tokio_util::codec::FramedParts::new(io, parts.codec);
            next.read_buf = std::mem::take(&mut parts.read_buf);
            next.write_buf = std::mem::take(&mut parts.write_buf);
            Framed::from_parts(next)
        };
        let (mut sink, mut stream) = framed.split();
        let (out, mut out_rx) = mpsc::channel::<Frame>(OUTBOUND_QUEUE);
        let routes: Routes = Arc::default();
        let listings: Listings = Arc::default();
        let closed = CancellationToken::new();
        let link = AgentLink {
            out,
            info,
            liveness: liveness.clone(),
            routes: routes.clone(),
            listings: listings.clone(),
            list_cache: ListCache::default(),
            list_generation: Arc::default(),
            next_ch: Arc::new(AtomicU32::new(1)),
            next_list: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            closed: closed.clone(),
        };

        let writer_closed = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = write_queued(&mut out_rx, &mut sink) => {}
                _ = writer_closed.cancelled() => {}
            }
            writer_closed.cancel();
            crate::transport::writer::close(&mut sink).await;
        });

        tokio::spawn(ping(
            link.out.downgrade(),
            liveness.clone(),
            closed.clone(),
            dead_after,
            who,
        ));

        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = stream.next() => f,
                    _ = closed.cancelled() => None,
                };
                let Some(Ok(frame)) = frame else { break };
                match frame.msg {
                    Message::Pong { id, facts } => liveness.pong(id, facts),
                    Message::SessionList { id } => {
                        let waiting = listings.lock().ok().and_then(|mut l| l.remove(&id));
                        if let Some(tx) = waiting {
                            let list = serde_json::from_slice(&frame.payload).unwrap_or_default();
                            let _ = tx.send(list);
                        }
                    }
                    _ => route(&routes, frame),
                }
            }
            closed.cancel();
            // Everyone still waiting learns that the link is gone.
            let lost: Vec<_> = routes
                .lock()
                .map(|mut r| r.drain().collect())
                .unwrap_or_default();
            for (_, route) in lost {
                let _ = route.events.send(Box::new(Event::Lost));
                route.end();
            }
        });
        link
    }

    /// What the agent said about itself when the link came up.
    pub(crate) fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// Connected since, last heard from, round-trip time, host facts.
    pub(crate) fn health(&self) -> Health {
        let live = &self.liveness;
        let probe = live.probe.lock().unwrap_or_else(|e| e.into_inner());
        Health {
            connected_since: live.connected_since,
            last_seen: std::time::SystemTime::now()
                .checked_sub(live.silent_for())
                .unwrap_or(live.connected_since),
            rtt: probe.rtt,
            facts: probe.facts.clone(),
        }
    }

    /// Resolves once the agent's first `pong` has told its host's facts.
    pub(crate) async fn facts_known(&self) {
        self.liveness.facts_known.notified().await
    }

    /// Whether `other` is a handle of this same connection.
    pub(crate) fn same(&self, other: &AgentLink) -> bool {
        Arc::ptr_eq(&self.liveness, &other.liveness)
    }

    /// Whether the connection is still up.
    pub(crate) fn is_connected(&self) -> bool {
        !self.closed.is_cancelled()
    }

    /// Resolves when the connection is lost.
    pub(crate) async fn lost(&self) {
        self.closed.cancelled().await
    }

    /// Closes the connection; the agent then kills every command of it.
    pub fn shutdown(&self) {
        self.closed.cancel();
    }

    /// Whether the agent keeps sessions (says the `sessions` capability).
    pub(crate) fn has_sessions(&self) -> bool {
        self.info.sessions
    }

    /// Starts a command on a fresh channel. With `session` (and a `pty`),
    /// it opens a session: dropping the channel then detaches rather than
    /// kills it.
    pub async fn exec(&self, req: ExecRequest) -> Result<Channel, LinkError> {
        // Encoded here, before a channel exists: a request that cannot be
        // sent fails alone, and never reaches the writer every channel shares.
        let frame = Frame::exec(0, &req).map_err(|e| match e {
            FrameError::PayloadTooLarge(size) => LinkError::TooLarge {
                size,
                max: crate::protocol::MAX_PAYLOAD_LEN,
            },
            other => LinkError::Frame(other),
        })?;
        let channel = self.open(frame, req.session.is_some()).await;
        // After the frame is queued: a list asked later reflects it.
        if req.session.is_some() {
            self.sessions_changed();
        }
        channel
    }

    /// Writes a file on the agent: send its bytes with the channel's
    /// `stdin` (the last with `eof`); `File` then `Exit` follow, or `Error`
    /// and `Exit`. Dropping the channel before the end kills the writer,
    /// and no partial file is left.
    pub async fn put(&self, req: &crate::protocol::PutRequest) -> Result<Channel, LinkError> {
        let frame = Frame::json(0, Message::Put, req).map_err(frame_error)?;
        self.open(frame, false).await
    }

    /// Reads a file on the agent: `File`, its bytes as `Stdout` (return
    /// credit with `window`), `File` again with the hash when the whole
    /// file was read, and `Exit`; or `Error` and `Exit`.
    pub async fn get(&self, req: &crate::protocol::GetRequest) -> Result<Channel, LinkError> {
        let frame = Frame::json(0, Message::Get, req).map_err(frame_error)?;
        self.open(frame, false).await
    }

    /// Attaches a fresh channel to session `session` (read-only with
    /// `watch`). Dropping the channel detaches it.
    pub async fn attach(
        &self,
        session: &str,
        size: crate::protocol::PtySize,
        watch: bool,
        window: Option<u64>,
    ) -> Result<Channel, LinkError> {
        self.attach_as(session, size, watch, window, None).await
    }

    /// [`AgentLink::attach`]; `watcher` names a user who watches only
    /// because the owner shares the session (and stops when it no longer does).
    pub(crate) async fn attach_as(
        &self,
        session: &str,
        size: crate::protocol::PtySize,
        watch: bool,
        window: Option<u64>,
        watcher: Option<String>,
    ) -> Result<Channel, LinkError> {
        let msg = Message::Attach {
            session: session.to_owned(),
            cols: size.cols,
            rows: size.rows,
            watch,
            window,
            watcher,
        };
        let channel = self.open(Frame::new(0, msg), true).await;
        self.sessions_changed();
        channel
    }

    /// The agent's sessions, asked for now.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, LinkError> {
        self.sessions_since(tokio::time::Instant::now()).await
    }

    /// The agent's sessions, as of at most [`LIST_MAX_AGE`] ago (to show).
    pub(crate) async fn sessions_recent(&self) -> Result<Vec<SessionInfo>, LinkError> {
        let since = tokio::time::Instant::now()
            .checked_sub(LIST_MAX_AGE)
            .unwrap_or_else(tokio::time::Instant::now);
        self.sessions_since(since).await
    }

    /// Session `id`, if the agent has it (`None` too for an agent that keeps
    /// no sessions): from a recent list, or, when that does not know the id
    /// (the session may be newer than it), from one asked for now.
    pub(crate) async fn session(&self, id: &str) -> Result<Option<SessionInfo>, LinkError> {
        if !self.has_sessions() {
            return Ok(None);
        }
        let find = |list: Vec<SessionInfo>| list.into_iter().find(|s| s.id == id);
        if let Some(info) = find(self.sessions_recent().await?) {
            return Ok(Some(info));
        }
        Ok(find(self.sessions().await?))
    }

    /// A session list asked of the agent no earlier than `since`. One
    /// request at a time per link: callers that waited behind one that was
    /// asked late enough share its answer.
    async fn sessions_since(
        &self,
        since: tokio::time::Instant,
    ) -> Result<Vec<SessionInfo>, LinkError> {
        let mut cache = self.list_cache.lock().await;
        let generation = self.list_generation.load(Ordering::Acquire);
        if let Some((at, of, list)) = &*cache
            && *at >= since
            && *of == generation
        {
            return Ok(list.clone());
        }
        let asked = tokio::time::Instant::now();
        let list = self.ask_sessions().await?;
        *cache = Some((asked, generation, list.clone()));
        Ok(list)
    }

    /// A change to the agent's sessions is on its way: lists from before
    /// it are stale.
    fn sessions_changed(&self) {
        self.list_generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn ask_sessions(&self) -> Result<Vec<SessionInfo>, LinkError> {
        let id = self.next_list.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.listings
            .lock()
            .map_err(|_| LinkError::Closed)?
            .insert(id, tx);
        let asked = async {
            self.out
                .send(Frame::new(0, Message::ListSessions { id }))
                .await
                .map_err(|_| LinkError::Closed)?;
            tokio::select! {
                list = rx => list.map_err(|_| LinkError::Closed),
                _ = self.closed.cancelled() => Err(LinkError::Closed),
            }
        };
        let result = tokio::time::timeout(LIST_TIMEOUT, asked).await;
        if let Ok(mut l) = self.listings.lock() {
            l.remove(&id);
        }
        result.map_err(|_| LinkError::Timeout {
            addr: self.info.name.clone().unwrap_or_default(),
            limit: LIST_TIMEOUT,
        })?
    }

    /// Ends session `session` (its processes are killed).
    pub async fn end_session(&self, session: &str) -> Result<(), LinkError> {
        let msg = Message::EndSession {
            session: session.to_owned(),
        };
        let sent = self.out.send(Frame::new(0, msg)).await;
        self.sessions_changed();
        sent.map_err(|_| LinkError::Closed)
    }

    /// Changes a session's title or who may watch it.
    pub(crate) async fn update_session(
        &self,
        session: &str,
        title: Option<String>,
        watchers: Option<Vec<String>>,
    ) -> Result<(), LinkError> {
        let msg = Message::UpdateSession {
            session: session.to_owned(),
            title,
            watchers,
        };
        let sent = self.out.send(Frame::new(0, msg)).await;
        self.sessions_changed();
        sent.map_err(|_| LinkError::Closed)
    }

    /// Opens a channel with `frame` (its `ch` is chosen here).
    async fn open(&self, frame: Frame, detach_on_drop: bool) -> Result<Channel, LinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stdin_credit = Arc::new(Semaphore::new(STDIN_WINDOW));
        let ch = {
            let mut routes = self.routes.lock().map_err(|_| LinkError::Closed)?;
            if self.closed.is_cancelled() {
                return Err(LinkError::Closed);
            }
            let mut ch;
            loop {
                ch = self.next_ch.fetch_add(1, Ordering::Relaxed);
                if ch != 0 && !routes.contains_key(&ch) {
                    break;
                }
            }
            routes.insert(
                ch,
                Route {
                    events: tx,
                    stdin_credit: stdin_credit.clone(),
                },
            );
            ch
        };
        let channel = Channel {
            ch,
            stdin_credit,
            events: rx,
            out: self.out.clone(),
            routes: self.routes.clone(),
            ended: false,
            detach_on_drop,
        };
        self.out
            .send(Frame { ch, ..frame })
            .await
            .map_err(|_| LinkError::Closed)?;
        Ok(channel)
    }
}

fn frame_error(e: FrameError) -> LinkError {
    match e {
        FrameError::PayloadTooLarge(size) => LinkError::TooLarge {
            size,
            max: crate::protocol::MAX_PAYLOAD_LEN,
        },
        other => LinkError::Frame(other),
    }
}

/// Pings the agent every third of `dead_after` (at most every 10 s), the
/// first at once (for its facts and the round-trip time), and closes the
/// link when nothing has come back for `dead_after` less one interval: a
/// silent link is found within `dead_after`. A new ping goes out only once
/// the last one is answered, so the round trip shown is never a stale one.
///
/// It holds the queue weakly: when every handle of the link is gone, so is
/// the link, and the pinger does not keep it open.
async fn ping(
    out: mpsc::WeakSender<Frame>,
    liveness: Arc<Liveness>,
    closed: CancellationToken,
    dead_after: std::time::Duration,
    who: String,
) {
    let interval = (dead_after / 3)
        .min(std::time::Duration::from_secs(10))
        .max(std::time::Duration::from_millis(50));
    let silent_limit = dead_after.saturating_sub(interval).max(interval);
    let mut id = 0u64;
    loop {
        if liveness.silent_for() > silent_limit {
            tracing::warn!(
                agent = %who,
                "nothing from the agent for {:?}; taking the link for lost",
                liveness.silent_for()
            );
            closed.cancel();
            return;
        }
        let Some(queue) = out.upgrade() else { return };
        let idle = {
            let probe = liveness.probe.lock().unwrap_or_else(|e| e.into_inner());
            probe.in_flight.is_none()
        };
        if idle {
            id += 1;
            // Noted before it is sent, so that its pong cannot come first.
            let note = |v| {
                liveness
                    .probe
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_flight = v
            };
            note(Some((id, tokio::time::Instant::now())));
            // A full queue is traffic enough: skip this ping rather than wait.
            if queue.try_send(Frame::new(0, Message::Ping { id })).is_err() {
                note(None);
            }
        }
        drop(queue);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = closed.cancelled() => return,
        }
    }
}

fn route(routes: &Routes, frame: Frame) {
    let event = match frame.msg {
        Message::Window { add } => {
            // The agent's process read some stdin: more may be sent.
            if let Ok(routes) = routes.lock()
                && let Some(route) = routes.get(&frame.ch)
            {
                let add = usize::try_from(add).unwrap_or(usize::MAX).min(STDIN_WINDOW);
                route.stdin_credit.add_permits(add);
            }
            return;
        }
        Message::Stdout => Event::Stdout(frame.payload),
        Message::Snapshot => Event::Snapshot(frame.payload),
        Message::Session { id } => Event::Session(id),
        Message::Resize { cols, rows } => Event::Resize { cols, rows },
        Message::Detached { reason } => Event::Detached(reason),
        Message::Stderr => Event::Stderr(frame.payload),
        Message::Exit(status) => Event::Exit(status),
        Message::Error { code, message } => Event::Error { code, message },
        Message::File => match frame.payload_json() {
            Ok(info) => Event::File(Box::new(info)),
            Err(e) => Event::Error {
                code: ErrorCode::Protocol,
                message: format!("the agent sent a file description that is not valid: {e}"),
            },
        },
        _ => return,
    };
    let Ok(mut routes) = routes.lock() else {
        return;
    };
    let last = event.is_final();
    if let Some(route) = routes.get(&frame.ch) {
        let _ = route.events.send(Box::new(event));
    }
    if last {
        // The agent frees the id with `exit`; so does the link.
        if let Some(route) = routes.remove(&frame.ch) {
            route.end();
        }
    }
}

/// One running command on an agent. Dropping it before its exit closes it
/// (the agent kills its process group).
pub struct Channel {
    ch: u32,
    stdin_credit: Arc<Semaphore>,
    events: mpsc::UnboundedReceiver<Box<Event>>,
    out: mpsc::Sender<Frame>,
    routes: Routes,
    ended: bool,
    /// A session's channel: dropping it detaches, and the shell lives on.
    detach_on_drop: bool,
}

impl Channel {
    /// The next event; `None` after `Exit` or `Lost` has been returned.
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().await.map_or(Event::Lost, |e| *e);
        self.ended = event.is_final();
        Some(event)
    }

    /// The next event if one has already arrived, without waiting; `None`
    /// when none has (or after `Exit` or `Lost`).
    pub fn try_next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let event = match self.events.try_recv() {
            Ok(event) => *event,
            Err(mpsc::error::TryRecvError::Empty) => return None,
            Err(mpsc::error::TryRecvError::Disconnected) => Event::Lost,
        };
        self.ended = event.is_final();
        Some(event)
    }

    /// A handle for sending to this channel from another task while this
    /// one reads its events.
    pub fn controller(&self) -> Controller {
        Controller {
            ch: self.ch,
            out: self.out.clone(),
            stdin_credit: self.stdin_credit.clone(),
        }
    }

    pub async fn stdin(&self, data: Bytes, eof: bool) -> Result<(), LinkError> {
        self.controller().stdin(data, eof).await
    }

    pub async fn signal(&self, signal: Signal) -> Result<(), LinkError> {
        self.controller().signal(signal).await
    }

    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), LinkError> {
        self.controller().resize(cols, rows).await
    }

    pub async fn window(&self, add: u64) -> Result<(), LinkError> {
        self.controller().window(add).await
    }

    pub async fn close(&self) -> Result<(), LinkError> {
        self.controller().close().await
    }

    /// Leaves this channel's session running; `Detached` ends the channel.
    pub async fn detach(&self) -> Result<(), LinkError> {
        self.controller().detach().await
    }

    /// Reads every event to the end, returning credit as output is consumed:
    /// (stdout, stderr, the final event).
    pub async fn collect(&mut self) -> (Vec<u8>, Vec<u8>, Event) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event {
                Event::Stdout(b) | Event::Snapshot(b) => {
                    out.extend_from_slice(&b);
                    let _ = self.window(b.len() as u64).await;
                }
                Event::Stderr(b) => {
                    err.extend_from_slice(&b);
                    let _ = self.window(b.len() as u64).await;
                }
                // `next` has marked the channel ended if the error is final.
                Event::Error { .. } if !self.ended => {}
                last => return (out, err, last),
            }
        }
        (out, err, Event::Lost)
    }
}

/// The largest stdin frame the server sends.
const STDIN_FRAME: usize = 64 * 1024;

/// Sends to a channel: input, signals, size, credit.
#[derive(Clone)]
pub struct Controller {
    ch: u32,
    out: mpsc::Sender<Frame>,
    stdin_credit: Arc<Semaphore>,
}

impl Controller {
    /// A controller of channel `ch` whose frames go to `out`, with
    /// `credit` bytes of stdin credit (tests of what sends through one).
    #[cfg(test)]
    pub(crate) fn for_tests(ch: u32, out: mpsc::Sender<Frame>, credit: usize) -> Controller {
        Controller {
            ch,
            out,
            stdin_credit: Arc::new(Semaphore::new(credit)),
        }
    }

    /// Returns `add` bytes of stdin credit, as the agent's `window` does
    /// (tests).
    #[cfg(test)]
    pub(crate) fn credit_for_tests(&self, add: usize) {
        self.stdin_credit.add_permits(add);
    }

    async fn send(&self, msg: Message, payload: Bytes) -> Result<(), LinkError> {
        self.out
            .send(Frame::with_payload(self.ch, msg, payload))
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Sends `data` (at most 64 KiB; empty only with `eof`) to the
    /// command's stdin at once, if the agent's credit covers it and the
    /// link's queue has room; else hands it back, nothing sent. For input
    /// typed a key at a time, and a REST command's whole input, which then
    /// need no task of their own to wait in (and an `exec`'s input goes in
    /// the same write as the `exec`, while the link's writer has not yet
    /// sent it).
    pub fn try_stdin(&self, data: Bytes, eof: bool) -> Result<(), Bytes> {
        if (data.is_empty() && !eof) || data.len() > STDIN_FRAME {
            return Err(data);
        }
        // An empty frame costs one byte of credit, as in `stdin`.
        let cost = u32::try_from(data.len().max(1)).unwrap_or(u32::MAX);
        let Ok(credit) = self.stdin_credit.try_acquire_many(cost) else {
            return Err(data);
        };
        let frame = Frame::with_payload(self.ch, Message::Stdin { eof }, data);
        match self.out.try_send(frame) {
            Ok(()) => {
                credit.forget();
                Ok(())
            }
            Err(e) => Err(e.into_inner().payload),
        }
    }

    /// Sends a command's whole input and its end without waiting here: at
    /// once when the agent's credit and the link's queue take it (then in
    /// the same write as the `exec` just queued), else from a task of its
    /// own, which waits for the credit.
    pub(crate) fn stdin_to_end(self, data: Bytes) {
        if let Err(data) = self.try_stdin(data, true) {
            tokio::spawn(async move {
                let _ = self.stdin(data, true).await;
            });
        }
    }

    /// Sends bytes to the command's stdin, in frames of at most 64 KiB,
    /// each once the agent has granted the credit for it: this waits while
    /// the process is not reading. Fails once the channel has ended.
    pub async fn stdin(&self, data: Bytes, eof: bool) -> Result<(), LinkError> {
        let mut rest = data;
        loop {
            let chunk = rest.split_to(rest.len().min(STDIN_FRAME));
            let last = rest.is_empty();
            // An empty frame costs one byte of credit.
            let cost = u32::try_from(chunk.len().max(1)).unwrap_or(u32::MAX);
            self.stdin_credit
                .acquire_many(cost)
                .await
                .map_err(|_| LinkError::Closed)?
                .forget();
            self.send(Message::Stdin { eof: eof && last }, chunk)
                .await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Delivers `INT`, `TERM`, `KILL` or `HUP` to the command's process group.
    pub(crate) async fn signal(&self, signal: Signal) -> Result<(), LinkError> {
        self.send(Message::Signal { signal }, Bytes::new()).await
    }

    pub(crate) async fn resize(&self, cols: u16, rows: u16) -> Result<(), LinkError> {
        self.send(Message::Resize { cols, rows }, Bytes::new())
            .await
    }

    /// Returns `add` bytes of output credit to the agent.
    pub(crate) async fn window(&self, add: u64) -> Result<(), LinkError> {
        self.send(Message::Window { add }, Bytes::new()).await
    }

    /// Kills the command; its `exit` still arrives.
    pub(crate) async fn close(&self) -> Result<(), LinkError> {
        self.send(Message::Close, Bytes::new()).await
    }

    /// Leaves the channel's session running; `detached` ends the channel.
    pub(crate) async fn detach(&self) -> Result<(), LinkError> {
        self.send(Message::Detach, Bytes::new()).await
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if !self.ended {
            if let Ok(mut routes) = self.routes.lock()
                && let Some(route) = routes.remove(&self.ch)
            {
                route.end();
            }
            // The close must not be lost, or the command runs on untracked:
            // if the queue is full, a task waits for room.
            let msg = if self.detach_on_drop {
                Message::Detach
            } else {
                Message::Close
            };
            let frame = Frame::new(self.ch, msg);
            if let Err(mpsc::error::TrySendError::Full(frame)) = self.out.try_send(frame) {
                let out = self.out.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = out.send(frame).await;
                    });
                }
            }
        }
    }
}
