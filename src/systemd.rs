//! Telling systemd how the service is doing, for `Type=notify` units
//! (deploy/systemd/): ready once listening, stopping on shutdown, and the
//! watchdog's keep-alive while the runtime runs. Outside systemd (no
//! `NOTIFY_SOCKET`) every call does nothing.
//!
//! The variables are taken out of the environment once read, so that no
//! command the agent runs (nor the embedded agent) can notify for us.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Where to notify, and the watchdog's interval: read once, at start, and
/// removed from the environment.
struct Notifier {
    socket: Option<std::ffi::OsString>,
    watchdog: Option<std::time::Duration>,
}

static NOTIFIER: std::sync::OnceLock<Notifier> = std::sync::OnceLock::new();

/// Reads (and removes) systemd's variables.
///
/// # Safety
/// Must be called before any other thread exists (it changes the
/// environment): first thing in `main`.
pub unsafe fn init() {
    NOTIFIER.get_or_init(|| {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        // A zero interval would be a busy loop: no watchdog then.
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        // SAFETY: as the caller promises, no other thread exists yet.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        Notifier { socket, watchdog }
    });
}

fn send(state: &[NotifyState]) {
    let Some(Notifier {
        socket: Some(socket),
        ..
    }) = NOTIFIER.get()
    else {
        return;
    };
    // To the socket read at start (the environment no longer has it).
    if let Err(e) = notify_to(socket, state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Sends `state` to the datagram socket `path` (as `sd_notify(3)` does).
fn notify_to(path: &std::ffi::OsStr, state: &[NotifyState]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let mut msg = String::new();
    for s in state {
        msg.push_str(&s.to_string());
        msg.push('\n');
    }
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        socket.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        socket.send_to(msg.as_bytes(), path)?;
    }
    Ok(())
}

/// The service is up (listening): `READY=1`, with a status line, and the
/// watchdog's keep-alive starts (until `shutdown`).
pub(crate) fn ready(status: &str, shutdown: &CancellationToken) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    if let Some(Notifier {
        socket: Some(_),
        watchdog: Some(every),
    }) = NOTIFIER.get()
    {
        let every = *every / 2;
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                send(&[NotifyState::Watchdog]);
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
}

/// The service is stopping.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}
