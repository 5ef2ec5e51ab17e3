//! The server's HTTP connections: accepting them under a cap, reading
//! their requests under a deadline, and ending them on shutdown.
//!
//! `axum::serve` has neither a header-read deadline nor a connection cap:
//! 400 silent sockets used up the server's file descriptors and `/healthz`
//! stopped answering. Here:
//! - a request's headers must arrive within `header_timeout`, and a kept-alive
//!   connection that sends nothing for that long is closed;
//! - at most `max_connections` sockets are open (WebSockets included: the
//!   count is held by the socket itself, so an upgraded connection keeps its
//!   place until it closes). When full, the oldest connection that has not
//!   yet sent a single complete request is closed to make room: idle
//!   strangers can never keep out someone who talks. When none can be
//!   closed, the new connection is.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

/// The bounds on HTTP connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Sockets open at once.
    pub max_connections: usize,
    /// Time to send a request's headers, and most idle time between requests.
    pub header_timeout: Duration,
}

/// One open connection, as the table sees it.
struct Slot {
    id: u64,
    /// Set once a complete request has arrived: never evicted after that.
    proven: Arc<AtomicBool>,
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    slots: Mutex<VecDeque<Slot>>,
    next: AtomicU64,
}

impl Table {
    /// Registers a connection, making room if the table is full; `None`
    /// when there is no room to make.
    fn admit(self: &Arc<Self>, max: usize) -> Option<(Guard, Arc<AtomicBool>, CancellationToken)> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() >= max {
            let victim = slots
                .iter()
                .position(|s| !s.proven.load(Ordering::Acquire))?;
            if let Some(s) = slots.remove(victim) {
                debug!("connection table full: closing the oldest connection without a request");
                s.evict.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let proven = Arc::new(AtomicBool::new(false));
        let evict = CancellationToken::new();
        slots.push_back(Slot {
            id,
            proven: proven.clone(),
            evict: evict.clone(),
        });
        Some((
            Guard {
                id,
                table: self.clone(),
            },
            proven,
            evict,
        ))
    }
}

/// A connection's place in the table, freed when the socket closes.
struct Guard {
    id: u64,
    table: Arc<Table>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut slots = self.table.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(|s| s.id == self.id) {
            slots.remove(i);
        }
    }
}

/// A TCP stream that holds its connection's place for as long as it lives,
/// through a WebSocket upgrade too.
struct Counted {
    stream: TcpStream,
    _guard: Guard,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises this process's open-file limit to its hard limit, and returns
/// the connection cap that fits under it: connections may use what is left
/// after a reserve for agent links, the store and the process's own files.
pub(crate) fn fit_connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const RESERVE: u64 = 256;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let limit = if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let room = limit.saturating_sub(RESERVE).max(16);
    let cap = wanted.min(usize::try_from(room).unwrap_or(usize::MAX));
    if cap < wanted {
        warn!(
            wanted,
            cap,
            open_files = limit,
            "the open-file limit allows fewer connections than configured"
        );
    }
    cap
}

/// Takes the base path off a request's path, so that the routes are the
/// same at any base: `/conch` and `/conch/` are `/`, `/conch/ws` is `/ws`.
/// A path outside the base gets one that no route has (a 404).
fn under_base<B>(req: &mut axum::http::Request<B>, base: &str) {
    if base.is_empty() {
        return;
    }
    let uri = req.uri();
    let path = uri.path();
    let inner = if path == base {
        "/"
    } else {
        match path.strip_prefix(base) {
            Some(rest) if rest.starts_with('/') => rest,
            _ => "/.outside-the-base-path",
        }
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{inner}?{q}"),
        None => inner.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    let rebuilt = path_and_query.parse().ok().and_then(|pq| {
        parts.path_and_query = Some(pq);
        axum::http::Uri::from_parts(parts).ok()
    });
    // Fails closed: a request that cannot be rewritten gets no route.
    *req.uri_mut() =
        rebuilt.unwrap_or_else(|| axum::http::Uri::from_static("/.outside-the-base-path"));
}

/// Serves `app` on `listener` until `shutdown` fires, then lets the
/// requests in flight finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    base_path: String,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let table = Arc::new(Table::default());
    let tracker = TaskTracker::new();
    loop {
        let Some((stream, peer)) = crate::transport::socket::accept(&listener, &shutdown).await
        else {
            break;
        };
        let Some((guard, proven, evict)) = table.admit(limits.max_connections) else {
            debug!(%peer, "connection refused: the server holds its maximum of connections");
            continue;
        };
        // Keystrokes and their echoes are tiny writes: without TCP_NODELAY,
        // Nagle's algorithm and delayed ACKs hold them back by ~40 ms.
        let _ = stream.set_nodelay(true);
        let counted = Counted {
            stream,
            _guard: guard,
        };
        let proven_here = proven.clone();
        let base = base_path.clone();
        let service = app
            .clone()
            .map_request(move |mut req: axum::http::Request<Incoming>| {
                proven.store(true, Ordering::Release);
                req.extensions_mut().insert(ConnectInfo(peer));
                under_base(&mut req, &base);
                req.map(Body::new)
            });
        let service = TowerToHyperService::new(service);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            // TLS first, within the same deadline as the first request's
            // headers: a client that stalls its handshake holds nothing long.
            let io: crate::transport::Stream = match tls {
                None => Box::new(counted),
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(counted));
                    tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(stream)) => Box::new(stream),
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "no TLS handshake within the header deadline; closing");
                                return;
                            }
                        },
                        _ = evict.cancelled() => return,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            let io = TokioIo::new(io);
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .enable_connect_protocol();
            let conn = builder.serve_connection_with_upgrades(io, service);
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            // The header deadline of HTTP/1 starts only once the protocol
            // is known, which takes the first bytes: a socket that sends
            // none is timed out here. Until its first request a connection
            // has nothing in flight, so it is simply dropped.
            let first_request = tokio::time::sleep(limits.header_timeout);
            let mut first_request = std::pin::pin!(first_request);
            let mut first_request_due = true;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut first_request, if first_request_due => {
                        // The guard was read when this wait began: a request
                        // may have come since, and then the deadline is over.
                        first_request_due = false;
                        if !proven_here.load(Ordering::Acquire) {
                            debug!(%peer, "no request within the header deadline; closing");
                            break;
                        }
                    }
                    _ = evict.cancelled(), if !stopping => {
                        if !proven_here.load(Ordering::Acquire) {
                            break;
                        }
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = shutdown.cancelled(), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}
