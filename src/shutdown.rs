//! The process's shutdown policy: SIGINT and SIGTERM start a graceful
//! shutdown, and a shutdown that takes longer than its grace ends anyway.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long a graceful shutdown may take before the process exits anyway:
/// a container runtime waits 10 s after SIGTERM before SIGKILL, so finish
/// within that even if a client does not let go.
pub const GRACE: Duration = Duration::from_secs(8);

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(cancel_on_signal(token.clone()));
    token
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    crate::systemd::stopping();
    token.cancel();
}

/// Runs `work` to its end, or until `grace` after `shutdown` fires,
/// whichever comes first (`None` then).
pub async fn within_grace<T>(
    work: impl Future<Output = T>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Option<T> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = work => Some(r),
        _ = deadline => {
            tracing::warn!("shutdown took too long; exiting anyway");
            None
        }
    }
}
