//! Socket habits both ends share: accepting under shutdown, and TCP
//! keepalive on the agent link.
//!
//! An agent host that dies (or a server that vanishes) sends no reset: the
//! other end would wait forever, reporting the link as up and keeping PTY
//! shells alive for nobody. Keepalive probes after 30 s of silence, every
//! 10 s, three times, so a dead peer is noticed within about a minute.

use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

const IDLE_SECS: u32 = 30;
const INTERVAL_SECS: u32 = 10;
const PROBES: u32 = 3;

/// Turns keepalive on for `stream`; failures are ignored (the link still
/// works, only without the probe).
pub(crate) fn enable_keepalive(stream: &impl AsFd) {
    let fd = stream.as_fd();
    let _ = setsockopt(&fd, sockopt::KeepAlive, &true);
    let _ = setsockopt(&fd, sockopt::TcpKeepIdle, &IDLE_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepInterval, &INTERVAL_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepCount, &PROBES);
}

/// The next connection from `listener`, or `None` once `shutdown` fires.
/// A failed accept (out of file descriptors, say) is logged and retried
/// after a pause instead of spinning.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}
