//! Connections still in their handshake, bounded in number and per source:
//! shared by the agent's listener and the server's agent listener, where
//! anyone may connect and only the key tells friend from stranger.

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

/// Handshakes a single address may have in progress at once; beyond, its
/// own oldest is dropped. One busy source cannot push out the handshakes
/// of others.
pub(crate) const PENDING_PER_SOURCE: usize = 8;

/// The source a connection is counted under: its IPv4 address, or the /64
/// of its IPv6 address (one host commonly holds a whole /64, and could
/// otherwise take a fresh address for every connection).
fn source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            std::net::IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// Handshakes in progress, oldest first, each with its peer's source and
/// a token that drops it.
#[derive(Default)]
pub(crate) struct Pending {
    next_id: u64,
    queue: VecDeque<(u64, std::net::IpAddr, CancellationToken)>,
}

impl Pending {
    /// Takes a new handshake from `ip`, dropping one to make room: that
    /// source's oldest when it has its share (`per_source`), else, when
    /// the pool (`max`) is full, the oldest of the sources holding most
    /// (the oldest overall when they hold as many).
    pub(crate) fn admit(
        &mut self,
        ip: std::net::IpAddr,
        max: usize,
        per_source: usize,
    ) -> (u64, CancellationToken) {
        let ip = source(ip);
        let count = |q: &VecDeque<(u64, std::net::IpAddr, CancellationToken)>, ip| {
            q.iter().filter(|(_, i, _)| *i == ip).count()
        };
        let victim = if count(&self.queue, ip) >= per_source.max(1) {
            Some(ip)
        } else if self.queue.len() >= max.max(1) {
            let most = self
                .queue
                .iter()
                .map(|(_, i, _)| count(&self.queue, *i))
                .max()
                .unwrap_or(0);
            self.queue
                .iter()
                .map(|(_, i, _)| *i)
                .find(|i| count(&self.queue, *i) == most)
        } else {
            None
        };
        if let Some(victim) = victim
            && let Some(at) = self.queue.iter().position(|(_, i, _)| *i == victim)
            && let Some((_, _, token)) = self.queue.remove(at)
        {
            token.cancel();
        }
        self.next_id += 1;
        let token = CancellationToken::new();
        self.queue.push_back((self.next_id, ip, token.clone()));
        (self.next_id, token)
    }

    pub(crate) fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _, _)| *i != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_source_drops_its_own_handshakes_not_others() {
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut p = Pending::default();
        let (_, b_token) = p.admit(b, 4, 2);
        // A floods: past its share, its own oldest go.
        let tokens: Vec<_> = (0..10).map(|_| p.admit(a, 4, 2).1).collect();
        assert!(
            !b_token.is_cancelled(),
            "the other source's handshake stays"
        );
        assert_eq!(tokens.iter().filter(|t| !t.is_cancelled()).count(), 2);
        // A full pool drops from the source holding most, not the oldest.
        let mut p = Pending::default();
        let (_, b_token) = p.admit(b, 3, 3);
        let (_, a1) = p.admit(a, 3, 3);
        let _ = p.admit(a, 3, 3);
        let _ = p.admit(b, 3, 3);
        assert!(a1.is_cancelled() && !b_token.is_cancelled());
        // Sources that hold as many: the oldest goes, not the newest.
        let mut p = Pending::default();
        let first = p.admit("10.0.0.5".parse().unwrap(), 2, 8).1;
        let second = p.admit("10.0.0.6".parse().unwrap(), 2, 8).1;
        let _ = p.admit("10.0.0.7".parse().unwrap(), 2, 8);
        assert!(first.is_cancelled() && !second.is_cancelled());
        // One IPv6 /64 is one source.
        let mut p = Pending::default();
        let tokens: Vec<_> = (1..=4)
            .map(|n| p.admit(format!("2001:db8::{n}").parse().unwrap(), 64, 2).1)
            .collect();
        assert_eq!(tokens.iter().filter(|t| t.is_cancelled()).count(), 2);
        // Finished handshakes leave the pool.
        let mut p = Pending::default();
        let (id, _) = p.admit(a, 2, 2);
        p.remove(id);
        assert!(p.queue.is_empty());
    }
}
