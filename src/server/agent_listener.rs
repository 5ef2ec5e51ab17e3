//! The server's agent listener (`--agent-listen`): where agents that dial
//! in connect. Each connection runs the client's half of the handshake
//! with the key of the name the agent claims in its `hello`; the agent's
//! `ready` must prove that name with that key, so one leaked key cannot
//! pose as another host. A proved agent's link replaces whatever link its
//! name had (a reconnecting agent after a network blip); a connection that
//! fails to prove itself replaces nothing.
//!
//! Anyone may connect here, as to an agent's own port: handshakes in
//! progress are bounded in number and per source (the oldest dropped), and
//! each has a deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::agents::Registry;
use crate::link::{AgentLink, Security};
use crate::protocol::FrameCodec;
use crate::transport::handshake::{self, OfferError};
use crate::transport::pending::{PENDING_PER_SOURCE, Pending};

/// Handshakes in progress at once; beyond, the oldest is dropped.
pub const MAX_PENDING: usize = 256;

/// An agent must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum DialInError {
    #[error(transparent)]
    Offer(#[from] OfferError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// Accepts agents on `listener` until `shutdown` fires.
pub(crate) async fn serve(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "agent listener ready for agents that dial in");
    }
    let pending = Arc::new(Mutex::new(Pending::default()));
    let tracker = TaskTracker::new();
    while let Some((stream, peer)) = crate::transport::socket::accept(&listener, &shutdown).await {
        let (id, evict) = pending.lock().unwrap_or_else(|e| e.into_inner()).admit(
            peer.ip(),
            MAX_PENDING,
            PENDING_PER_SOURCE,
        );
        let registry = registry.clone();
        let pending = pending.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let attempt = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, &registry)) => r,
                _ = evict.cancelled() => {
                    debug!(%peer, "dial-in handshake dropped: too many in progress");
                    return pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                }
                _ = shutdown.cancelled() => return,
            };
            pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            match attempt {
                Ok(Ok((name, claim, link))) => registry.attach(&name, claim, link, peer).await,
                Ok(Err(DialInError::Offer(OfferError::Closed))) => {
                    debug!(%peer, "connection closed before the handshake")
                }
                // Anyone can connect here and claim any name: what a
                // stranger causes is logged at debug, as on an agent's own
                // port. The agent that was refused logs it as a warning.
                Ok(Err(e)) => debug!(%peer, error = %e, "dial-in handshake failed"),
                Err(_) => debug!(%peer, "no handshake within {HANDSHAKE_TIMEOUT:?}; dropping"),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One agent's handshake: its claimed name picks the key it must prove. A
/// name that is not an agent that dials in goes through the same exchange
/// with a throwaway key, so that it fails exactly as a wrong key does: a
/// stranger learns nothing of which names exist.
async fn handshake(
    stream: TcpStream,
    registry: &Registry,
) -> Result<(String, super::agents::Claim, AgentLink), DialInError> {
    crate::transport::socket::prepare_link(&stream);
    let stream: crate::transport::Stream = Box::new(stream);
    let mut framed = Framed::new(stream, FrameCodec::handshake());
    let connector =
        crate::link::default_connector().map_err(|e| DialInError::Tls(e.to_string()))?;
    let hello = handshake::read_hello(&mut framed).await?;
    let Some(name) = hello.name.clone() else {
        let why = "an agent that dials in must give its name (--name)";
        handshake::refuse(&mut framed, hello, &connector, why).await;
        return Err(DialInError::Refused(why.into()));
    };
    // An unknown name, or a known one whose transport differs from what
    // the agent offers, fails at the MAC like a wrong key, at the same step.
    let offered = if hello.tls {
        Security::Tls
    } else {
        Security::Plaintext
    };
    let (claim, unknown) = match registry.dial_in_key(&name) {
        Ok(claim) if claim.security == offered => (claim, None),
        Ok(_) => (
            super::agents::Claim::throwaway(offered),
            Some("the agent's transport (TLS or plaintext) is not its entry's".to_owned()),
        ),
        Err(e) => (
            super::agents::Claim::throwaway(offered),
            Some(e.to_string()),
        ),
    };
    let tls = match claim.security {
        Security::Tls => Some(&connector),
        // An agent that dials in is never `Local` (that is the embedded
        // agent, which the server dials): the claim above already differs.
        Security::Plaintext | Security::Local => None,
    };
    let offered = handshake::finish_offer(&mut framed, hello, &claim.key, tls).await;
    if let Some(why) = unknown {
        return Err(DialInError::Refused(why));
    }
    let info = offered?;
    *framed.codec_mut() = FrameCodec::new();
    let link = AgentLink::dialed_in(framed, info, registry.options().dead_after);
    Ok((name, claim, link))
}
