//! What the agent tells the server about its host, read fresh for every
//! `pong` from `/proc` and os-release: a few small files, no process spawned.

use crate::protocol::HostFacts;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `PRETTY_NAME` of os-release, else `NAME`, else the kernel's name.
fn os_name() -> String {
    let text = read("/etc/os-release")
        .or_else(|| read("/usr/lib/os-release"))
        .unwrap_or_default();
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
    };
    field("PRETTY_NAME")
        .or_else(|| field("NAME"))
        .unwrap_or_else(|| std::env::consts::OS.to_owned())
}

/// The host's facts now; a fact that cannot be read is left empty or 0.
pub(crate) fn gather() -> HostFacts {
    let first_line = |path: &str| {
        read(path)
            .and_then(|t| t.lines().next().map(|l| l.trim().to_owned()))
            .unwrap_or_default()
    };
    let uptime_s = read("/proc/uptime")
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| s as u64);
    let mut load = [0.0; 3];
    if let Some(text) = read("/proc/loadavg") {
        for (slot, value) in load.iter_mut().zip(text.split_whitespace()) {
            *slot = value.parse().unwrap_or(0.0);
        }
    }
    HostFacts {
        hostname: first_line("/proc/sys/kernel/hostname"),
        os: os_name(),
        kernel: first_line("/proc/sys/kernel/osrelease"),
        arch: std::env::consts::ARCH.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s,
        load,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_describe_this_host() {
        let facts = super::gather();
        assert!(!facts.hostname.is_empty() && !facts.kernel.is_empty());
        assert_eq!(facts.arch, std::env::consts::ARCH);
        assert!(facts.uptime_s > 0 && facts.load.iter().all(|l| *l >= 0.0));
    }
}
