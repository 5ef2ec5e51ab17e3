//! An agent that dials in (`conch agent --connect HOST:PORT --name NAME`):
//! for a host the server cannot reach (NAT, a firewall that allows only
//! outbound connections), the agent makes the TCP connection to the
//! server's agent listener and keeps it up, reconnecting with backoff and
//! jitter. Over it the usual protocol runs with the usual roles: the agent
//! says `hello` (with its name) and proves its key, the server opens
//! channels, the agent runs them.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{AgentConfig, connection};

/// First and longest wait between connection attempts; each wait is drawn
/// between half and all of the current step, so that a fleet that lost its
/// server does not come back in lockstep.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Connecting to the server must succeed within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps one connection to `server` up until `shutdown` fires, then waits
/// for its commands to end.
pub async fn run(config: AgentConfig, server: String, shutdown: CancellationToken) {
    let Some(name) = config.name.clone() else {
        warn!("an agent that dials in needs --name");
        return;
    };
    info!(%server, agent = %name, "dialing in");
    crate::systemd::ready(&format!("dialing in to {server} as {name}"), &shutdown);
    // Sessions outlive each connection: a reconnect finds them again.
    let sessions = super::session::Sessions::new(config.sessions);
    redial(&config, &sessions, &server, &name, &shutdown).await;
    sessions.shutdown().await;
}

/// Connects, serves, and reconnects with backoff until `shutdown`.
async fn redial(
    config: &AgentConfig,
    sessions: &Arc<super::session::Sessions>,
    server: &str,
    name: &str,
    shutdown: &CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        match once(config, sessions, server, name, shutdown).await {
            Ok(()) => info!(%server, "disconnected from the server"),
            Err(e) if failures == 0 => {
                warn!(%server, error = %e, "cannot reach the server; retrying with backoff")
            }
            Err(e) => debug!(%server, error = %e, "server still unreachable"),
        }
        if shutdown.is_cancelled() {
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = BACKOFF_MIN;
            failures = 0;
        } else {
            failures += 1;
        }
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: connect, authenticate, serve until it ends.
async fn once(
    config: &AgentConfig,
    sessions: &Arc<super::session::Sessions>,
    server: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let stream = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server)) => r
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??,
        _ = shutdown.cancelled() => return Ok(()),
    };
    // One server on this connection: its slot is this connection's own.
    let slots = Arc::new(Semaphore::new(1));
    let never = CancellationToken::new();
    let peer = stream
        .peer_addr()
        .map_or_else(|_| server.to_owned(), |a| a.to_string());
    crate::transport::socket::prepare_link(&stream);
    let Some((framed, peer, authed)) = connection::authenticate(
        Box::new(stream),
        peer,
        &config.key,
        Some(name),
        config.tls.as_ref(),
        config.handshake_timeout,
        config.limits,
        &slots,
        &never,
        shutdown,
    )
    .await
    else {
        return Err(std::io::Error::other("the handshake failed (see above)"));
    };
    connection::serve_authenticated(
        framed,
        config.limits,
        config.policy.clone(),
        sessions.clone(),
        shutdown.clone(),
        &peer,
        &authed,
    )
    .await;
    Ok(())
}
