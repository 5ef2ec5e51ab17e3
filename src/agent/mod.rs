//! The command agent: a TCP server that runs commands for authenticated
//! clients and streams their output as frames.

pub(crate) mod cgroup;
pub(crate) mod channel;
pub(crate) mod connection;
pub(crate) mod process;
pub mod sandbox;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::keyfile::Key;
pub use connection::Limits;

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
}

/// Handshakes a single address may have in progress at once; beyond, its
/// own oldest is dropped. One busy source cannot push out the handshakes
/// of others.
const PENDING_PER_SOURCE: usize = 8;

/// Handshakes in progress, oldest first, each with its peer's address and
/// a token that drops it.
#[derive(Default)]
struct Pending {
    next_id: u64,
    queue: VecDeque<(u64, std::net::IpAddr, CancellationToken)>,
}

impl Pending {
    /// Takes a new handshake from `ip`, dropping one to make room: that
    /// source's oldest when it has its share (`per_source`), else, when
    /// the pool (`max`) is full, the oldest of the source holding most.
    fn admit(
        &mut self,
        ip: std::net::IpAddr,
        max: usize,
        per_source: usize,
    ) -> (u64, CancellationToken) {
        let count = |q: &VecDeque<(u64, std::net::IpAddr, CancellationToken)>, ip| {
            q.iter().filter(|(_, i, _)| *i == ip).count()
        };
        let victim = if count(&self.queue, ip) >= per_source.max(1) {
            Some(ip)
        } else if self.queue.len() >= max.max(1) {
            self.queue
                .iter()
                .map(|(_, i, _)| *i)
                .max_by_key(|i| count(&self.queue, *i))
        } else {
            None
        };
        if let Some(victim) = victim
            && let Some(at) = self.queue.iter().position(|(_, i, _)| *i == victim)
            && let Some((_, _, token)) = self.queue.remove(at)
        {
            token.cancel();
        }
        self.next_id += 1;
        let token = CancellationToken::new();
        self.queue.push_back((self.next_id, ip, token.clone()));
        (self.next_id, token)
    }

    fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _, _)| *i != id);
    }
}

/// Binds the configured address and serves until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    info!(addr = %listener.local_addr()?, "agent listening");
    serve(listener, config, shutdown).await;
    Ok(())
}

/// The listening socket a parent handed down as descriptor `fd` (the
/// embedded agent's `--listen-fd`), marked close-on-exec so that no command
/// inherits it.
///
/// # Safety
/// `fd` must be an open listening TCP socket that nothing else in this
/// process owns or closes.
pub unsafe fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: as the caller promises.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // Inherited without close-on-exec: set it, or every command would
    // inherit the agent's listening socket.
    nix::fcntl::fcntl(
        &std_listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| std::io::Error::other(format!("cannot mark fd {fd} close-on-exec: {e}")))?;
    std_listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(std_listener)?;
    tracing::info!(addr = %listener.local_addr()?, "agent listening");
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
pub async fn serve(listener: TcpListener, config: AgentConfig, shutdown: CancellationToken) {
    let authed = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let tracker = TaskTracker::new();
    loop {
        let Some((stream, peer)) = crate::transport::socket::accept(&listener, &shutdown).await
        else {
            break;
        };
        let (id, evict) = pending.lock().unwrap_or_else(|e| e.into_inner()).admit(
            peer.ip(),
            config.max_pending,
            PENDING_PER_SOURCE,
        );
        let key = config.key.clone();
        let limits = config.limits;
        let policy = config.policy.clone();
        let tls = config.tls.clone();
        let timeout = config.handshake_timeout;
        let shutdown = shutdown.clone();
        let authed = authed.clone();
        let pending = pending.clone();
        tracker.spawn(async move {
            let framed = connection::authenticate(
                stream,
                &key,
                tls.as_ref(),
                timeout,
                limits,
                &authed,
                &evict,
                &shutdown,
            )
            .await;
            pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            let Some((framed, peer, _permit)) = framed else {
                return;
            };
            connection::serve_authenticated(framed, limits, policy, shutdown, &peer).await;
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    info!("agent stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_source_drops_its_own_handshakes_not_others() {
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut p = Pending::default();
        let (_, b_token) = p.admit(b, 4, 2);
        // A floods: past its share, its own oldest go.
        let tokens: Vec<_> = (0..10).map(|_| p.admit(a, 4, 2).1).collect();
        assert!(
            !b_token.is_cancelled(),
            "the other source's handshake stays"
        );
        assert_eq!(tokens.iter().filter(|t| !t.is_cancelled()).count(), 2);
        // A full pool drops from the source holding most, not the oldest.
        let mut p = Pending::default();
        let (_, b_token) = p.admit(b, 3, 3);
        let (_, a1) = p.admit(a, 3, 3);
        let _ = p.admit(a, 3, 3);
        let _ = p.admit(b, 3, 3);
        assert!(a1.is_cancelled() && !b_token.is_cancelled());
        // Finished handshakes leave the pool.
        let mut p = Pending::default();
        let (id, _) = p.admit(a, 2, 2);
        p.remove(id);
        assert!(p.queue.is_empty());
    }
}
