//! The command agent: a TCP server that runs commands for authenticated
//! clients and streams their output as frames.

pub(crate) mod cgroup;
pub(crate) mod channel;
pub(crate) mod connection;
pub(crate) mod controls;
pub mod dial;
pub(crate) mod facts;
pub mod file_io;
pub(crate) mod files;
pub(crate) mod history;
pub(crate) mod inbox;
pub(crate) mod process;
pub mod sandbox;
pub(crate) mod session;
pub(crate) mod spawn;
pub(crate) mod terminal;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::transport::pending::{PENDING_PER_SOURCE, Pending};
pub use crate::transport::socket::Listener;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::keyfile::Key;
pub use connection::Limits;
pub use session::SessionLimits;

/// Everything `conch agent` needs, built from its flags and environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub key: Key,
    /// Authenticated connections served at once; beyond, a client that
    /// completes the handshake is told `busy` and closed.
    pub max_connections: usize,
    /// Connections still in their handshake at once; beyond, the oldest of
    /// them is dropped, so that idle or slow strangers can never keep an
    /// authenticated client out.
    pub max_pending: usize,
    /// A connection that has not authenticated by then is dropped.
    pub handshake_timeout: Duration,
    pub limits: Limits,
    /// How commands start: user, environment, limits, cgroups.
    pub policy: Arc<sandbox::ExecPolicy>,
    /// TLS for every connection (an ephemeral certificate); `None` only
    /// with `--insecure-plaintext`.
    pub tls: Option<crate::transport::tls::Acceptor>,
    /// The agent's name (`--name`): claimed in the handshake and proved
    /// with the key, so that a server can check it reached the right host.
    pub name: Option<String>,
    /// Linger, scrollback and count of the shells kept for reattaching.
    pub sessions: SessionLimits,
}

/// Binds the configured address and serves until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "agent listening");
    crate::systemd::ready(&format!("listening on {addr}"), &shutdown);
    serve(listener, config, shutdown).await;
    Ok(())
}

/// The listening socket a parent handed down as descriptor `fd` (the
/// embedded agent's `--listen-fd`), marked close-on-exec so that no command
/// inherits it. A Unix-domain socket is served without TLS (see
/// [`Listener::Unix`]); a TCP one as `--listen` would be.
///
/// # Safety
/// `fd` must be an open listening socket that nothing else in this process
/// owns or closes.
pub unsafe fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<Listener> {
    use nix::sys::socket::{
        AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
    };
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: as the caller promises.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Inherited without close-on-exec: set it, or every command would
    // inherit the agent's listening socket.
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| std::io::Error::other(format!("cannot mark fd {fd} close-on-exec: {e}")))?;
    let family = getsockname::<SockaddrStorage>(fd)
        .map_err(|e| std::io::Error::other(format!("fd {fd} is not a socket: {e}")))?
        .family();
    // A stream socket that listens, or every accept would fail (and be
    // retried) for ever.
    let stream = getsockopt(&owned, sockopt::SockType) == Ok(SockType::Stream);
    if !stream || getsockopt(&owned, sockopt::AcceptConn) != Ok(true) {
        return Err(std::io::Error::other(format!(
            "fd {fd} is not a listening stream socket"
        )));
    }
    let listener = match family {
        Some(AddressFamily::Unix) => {
            let l = std::os::unix::net::UnixListener::from(owned);
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?)
        }
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            let l = std::net::TcpListener::from(owned);
            l.set_nonblocking(true)?;
            Listener::Tcp(TcpListener::from_std(l)?)
        }
        other => {
            return Err(std::io::Error::other(format!(
                "fd {fd} is a {other:?} socket, neither TCP nor Unix-domain"
            )));
        }
    };
    tracing::info!(addr = %listener.describe(), "agent listening");
    Ok(listener)
}

/// Serves connections from `listener` until `shutdown` fires, then waits
/// for every connection (and so every command it started) to end.
///
/// Connections are counted in two pools: those still in the handshake
/// (bounded by `max_pending`, the oldest evicted when full, each with a
/// short deadline) and authenticated ones (bounded by `max_connections`).
/// Unauthenticated peers therefore cost a bounded amount and never hold a
/// slot an authenticated client needs.
pub async fn serve(
    listener: impl Into<Listener>,
    config: AgentConfig,
    shutdown: CancellationToken,
) {
    let listener = listener.into();
    let authed = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let tracker = TaskTracker::new();
    let sessions = session::Sessions::new(config.sessions);
    loop {
        let Some(conn) = crate::transport::socket::accept_link(&listener, &shutdown).await else {
            break;
        };
        let (id, evict) = pending.lock().unwrap_or_else(|e| e.into_inner()).admit(
            conn.source,
            config.max_pending,
            PENDING_PER_SOURCE,
        );
        let key = config.key.clone();
        let limits = config.limits;
        let policy = config.policy.clone();
        // A local socket needs no TLS (see `Listener::Unix`).
        let tls = if conn.local { None } else { config.tls.clone() };
        let name = config.name.clone();
        let timeout = config.handshake_timeout;
        let shutdown = shutdown.clone();
        let authed = authed.clone();
        let pending = pending.clone();
        let sessions = sessions.clone();
        tracker.spawn(async move {
            let framed = connection::authenticate(
                conn.stream,
                conn.peer,
                &key,
                name.as_deref(),
                tls.as_ref(),
                timeout,
                limits,
                &authed,
                &evict,
                &shutdown,
            )
            .await;
            pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            let Some((framed, peer, authed)) = framed else {
                return;
            };
            connection::serve_authenticated(
                framed, limits, policy, sessions, shutdown, &peer, &authed,
            )
            .await;
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    sessions.shutdown().await;
    info!("agent stopped");
}
