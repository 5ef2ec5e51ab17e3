//! TCP keepalive on the agent link, from both ends.
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
pub fn enable(stream: &impl AsFd) {
    let fd = stream.as_fd();
    let _ = setsockopt(&fd, sockopt::KeepAlive, &true);
    let _ = setsockopt(&fd, sockopt::TcpKeepIdle, &IDLE_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepInterval, &INTERVAL_SECS);
    let _ = setsockopt(&fd, sockopt::TcpKeepCount, &PROBES);
}
