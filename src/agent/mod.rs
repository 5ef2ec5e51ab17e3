//! The command agent: a TCP server that runs commands for authenticated
//! clients and streams their output as frames.

pub mod channel;
pub mod connection;
pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::keyfile::Key;
pub use connection::Limits;

/// Everything `conch agent` needs, built from its flags and environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub key: Key,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    pub limits: Limits,
}

/// Binds the configured address and serves until `shutdown` fires.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    info!(addr = %listener.local_addr()?, "agent listening");
    serve(listener, config, shutdown).await;
    Ok(())
}

/// Serves connections from `listener` until `shutdown` fires, then waits
/// for every connection (and so every command it started) to end.
pub async fn serve(listener: TcpListener, config: AgentConfig, shutdown: CancellationToken) {
    // Each connection holds a permit: the cap keeps a flood of connections
    // from exhausting file descriptors or memory.
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let key = config.key.clone();
        let limits = config.limits;
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection::serve(stream, key, limits, shutdown).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    info!("agent stopped");
}
