//! The authentication exchange's MACs and nonces.
//!
//! Both sides prove they hold the pre-shared key without sending it: each MAC
//! binds a direction label and both fresh nonces, so a recorded exchange
//! cannot be replayed on another connection, and the agent's answer cannot be
//! reflected back as a client's.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Nonce size in bytes; on the wire it is 64 hex characters.
pub const NONCE_LEN: usize = 32;

/// A fresh random nonce, hex-encoded.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_LEN];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// Whether `nonce` has the wire form of a nonce: 64 lowercase or uppercase hex digits.
pub fn is_valid_nonce(nonce: &str) -> bool {
    nonce.len() == NONCE_LEN * 2 && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

fn mac(key: &[u8], parts: &[&str]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part.as_bytes());
    }
    mac
}

/// The client's MAC: `HMAC-SHA256(key, "conch-client" + agent_nonce + client_nonce)`, hex.
pub fn client_mac(key: &[u8], agent_nonce: &str, client_nonce: &str) -> String {
    hex::encode(
        mac(key, &["conch-client", agent_nonce, client_nonce])
            .finalize()
            .into_bytes(),
    )
}

/// The agent's MAC: `HMAC-SHA256(key, "conch-agent" + client_nonce + agent_nonce)`, hex.
pub fn agent_mac(key: &[u8], client_nonce: &str, agent_nonce: &str) -> String {
    hex::encode(
        mac(key, &["conch-agent", client_nonce, agent_nonce])
            .finalize()
            .into_bytes(),
    )
}

/// Checks a client's MAC in constant time.
pub fn verify_client_mac(key: &[u8], agent_nonce: &str, client_nonce: &str, given: &str) -> bool {
    verify(
        mac(key, &["conch-client", agent_nonce, client_nonce]),
        given,
    )
}

/// Checks an agent's MAC in constant time.
pub fn verify_agent_mac(key: &[u8], client_nonce: &str, agent_nonce: &str, given: &str) -> bool {
    verify(mac(key, &["conch-agent", client_nonce, agent_nonce]), given)
}

fn verify(expected: HmacSha256, given: &str) -> bool {
    match hex::decode(given) {
        Ok(bytes) => expected.verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_verify_and_are_direction_bound() {
        let key = b"0123456789abcdef0123456789abcdef";
        let (a, c) = (new_nonce(), new_nonce());
        assert!(is_valid_nonce(&a) && a != c);
        let cm = client_mac(key, &a, &c);
        assert!(verify_client_mac(key, &a, &c, &cm));
        assert!(!verify_client_mac(
            b"another key of enough length",
            &a,
            &c,
            &cm
        ));
        assert!(!verify_agent_mac(key, &c, &a, &cm));
        assert!(verify_agent_mac(key, &c, &a, &agent_mac(key, &c, &a)));
        assert!(!verify_client_mac(key, &a, &c, "zz"));
    }
}
