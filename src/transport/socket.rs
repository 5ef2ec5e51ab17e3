//! Socket habits both ends share: accepting under shutdown, the agent's
//! two kinds of listener, and TCP keepalive on the agent link.
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

/// Readies a TCP connection of the agent link, at either end: no Nagle
/// delay (keystrokes and acks are small frames), and keepalive. Failures
/// are ignored (the link still works, only without them).
pub(crate) fn prepare_link(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_fd();
    let _ = setsockopt(&fd, sockopt::KeepAlive, &true);
    let _ = setsockopt(&fd, sockopt::TcpKeepIdle, &IDLE_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepInterval, &INTERVAL_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepCount, &PROBES);
}

/// Where an agent takes connections.
pub enum Listener {
    /// TCP: the network, so TLS unless `--insecure-plaintext`.
    Tcp(tokio::net::TcpListener),
    /// A Unix-domain socket its parent made (the embedded agent's), in a
    /// directory only the parent's user can enter. The kernel keeps its
    /// bytes on this host and out of other users' reach, so the key's
    /// handshake runs over it without TLS.
    Unix(tokio::net::UnixListener),
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(l: tokio::net::TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl Listener {
    /// Where it listens, for the log.
    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// A connection just accepted.
pub(crate) struct Accepted {
    pub(crate) stream: super::Stream,
    /// Who it is from, for the log: the TCP peer, or the local process.
    pub(crate) peer: String,
    /// Whom the handshake slots are counted against: the peer's address;
    /// every local process is one source.
    pub(crate) source: std::net::IpAddr,
    /// It came over a Unix-domain socket (no TLS; see [`Listener::Unix`]).
    pub(crate) local: bool,
}

/// The send buffer asked for on a local (embedded) agent link: 1 MiB.
const LOCAL_SEND_BUFFER: usize = 1024 * 1024;

/// The next connection from `listener`, or `None` once `shutdown` fires.
/// A failed accept (out of file descriptors, say) is logged and retried
/// after a pause instead of spinning.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    retrying(|| listener.accept(), shutdown).await
}

/// [`accept`] for an agent's [`Listener`]: a TCP connection gets
/// `TCP_NODELAY` and keepalive, a local one is named by its process.
pub(crate) async fn accept_link(
    listener: &Listener,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Accepted> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = accept(l, shutdown).await?;
            prepare_link(&stream);
            Some(Accepted {
                stream: Box::new(stream),
                peer: peer.to_string(),
                source: peer.ip(),
                local: false,
            })
        }
        Listener::Unix(l) => {
            let (stream, _) = retrying(|| l.accept(), shutdown).await?;
            // Room for a whole output frame in flight (the kernel's default
            // is about 208 KiB, less than one frame of a grown pipe's read),
            // so that the agent's write does not wait for the server's
            // read of each frame's tail. The kernel keeps twice the lesser
            // of this and `net.core.wmem_max`; failing to set it costs
            // speed only.
            let _ = nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::SndBuf,
                &LOCAL_SEND_BUFFER,
            );
            let peer = stream.peer_cred().map_or_else(
                |_| "a local process".to_owned(),
                |c| match c.pid() {
                    Some(pid) => format!("local pid {pid} uid {}", c.uid()),
                    None => format!("local uid {}", c.uid()),
                },
            );
            Some(Accepted {
                stream: Box::new(stream),
                peer,
                source: std::net::Ipv6Addr::LOCALHOST.into(),
                local: true,
            })
        }
    }
}

/// `next()` until it succeeds, pausing 100 ms after each failure; `None`
/// once `shutdown` fires.
async fn retrying<T, F: std::future::Future<Output = std::io::Result<T>>>(
    mut next: impl FnMut() -> F,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<T> {
    loop {
        tokio::select! {
            r = next() => match r {
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
