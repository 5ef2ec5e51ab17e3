//! Who is on the other end: the client's address, believing proxy headers
//! only from configured proxies.
//!
//! Behind a reverse proxy every request comes from the proxy's address, so
//! per-address throttling would throttle everybody at once. The address a
//! proxy puts in `X-Forwarded-For` (or `Forwarded: for=`) is believed only
//! when the request comes from an address in `--trusted-proxy`; the client is
//! then the rightmost address in the chain that is not itself a trusted
//! proxy. A client can append whatever it likes to the left of the chain,
//! so nothing to the left of the first untrusted hop is ever used.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use ipnet::IpNet;

use super::State;

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub(crate) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        // Only X-Forwarded-For: the proxies conch documents append the
        // client's address to it, whereas most pass a client's own
        // `Forwarded` header through untouched, which would let a client
        // choose its address. Hops run from the farthest (left) to the
        // nearest (right).
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for").iter() {
            let Ok(v) = value.to_str() else { continue };
            hops.extend(v.split(',').filter_map(|s| s.trim().parse::<IpAddr>().ok()));
        }
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            let hop = canonical(hop);
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address, as an extractor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub IpAddr);

impl FromRequestParts<State> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        Ok(ClientIp(state.site.proxies.client(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let proxies = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        let spoofed = headers(&[("x-forwarded-for", "1.1.1.1")]);
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(proxies.client(stranger, &spoofed), stranger);

        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        // The client wrote "1.1.1.1" itself; the proxy appended its peer.
        let chain = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.9.9.9")]);
        assert_eq!(
            proxies.client(proxy, &chain),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // A `Forwarded` header a client wrote itself is not believed.
        let fwd = headers(&[("forwarded", "for=198.51.100.99")]);
        assert_eq!(proxies.client(proxy, &fwd), proxy);
        assert_eq!(proxies.client(proxy, &HeaderMap::new()), proxy);
    }
}
