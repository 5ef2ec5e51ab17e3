//! The authentication exchange, both halves: the agent answers
//! ([`answer`]), the client offers ([`offer`]); and the MACs and nonces
//! they compute.
//!
//! Both sides prove they hold the pre-shared key without sending it: each MAC
//! binds a direction label and both fresh nonces, so a recorded exchange
//! cannot be replayed on another connection, and the agent's answer cannot be
//! reflected back as a client's. Both halves are generic over the stream, so
//! the same exchange runs over TCP or over an encrypted stream.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::Framed;

use crate::keyfile::Key;
use crate::protocol::{Frame, FrameCodec, FrameError, Message, PROTOCOL_VERSION};
use crate::vocab::ErrorCode;

type HmacSha256 = Hmac<Sha256>;

/// Nonce size in bytes; on the wire it is 64 hex characters.
pub(crate) const NONCE_LEN: usize = 32;

/// A fresh random nonce, hex-encoded.
pub(crate) fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_LEN];
    rand::fill(&mut bytes);
    hex::encode(bytes)
}

/// Whether `nonce` has the wire form of a nonce: 64 lowercase or uppercase hex digits.
pub(crate) fn is_valid_nonce(nonce: &str) -> bool {
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
pub(crate) fn client_mac(key: &[u8], agent_nonce: &str, client_nonce: &str) -> String {
    hex::encode(
        mac(key, &["conch-client", agent_nonce, client_nonce])
            .finalize()
            .into_bytes(),
    )
}

/// The agent's MAC: `HMAC-SHA256(key, "conch-agent" + client_nonce + agent_nonce)`, hex.
pub(crate) fn agent_mac(key: &[u8], client_nonce: &str, agent_nonce: &str) -> String {
    hex::encode(
        mac(key, &["conch-agent", client_nonce, agent_nonce])
            .finalize()
            .into_bytes(),
    )
}

/// Checks a client's MAC in constant time.
pub(crate) fn verify_client_mac(
    key: &[u8],
    agent_nonce: &str,
    client_nonce: &str,
    given: &str,
) -> bool {
    verify(
        mac(key, &["conch-client", agent_nonce, client_nonce]),
        given,
    )
}

/// Checks an agent's MAC in constant time.
pub(crate) fn verify_agent_mac(
    key: &[u8],
    client_nonce: &str,
    agent_nonce: &str,
    given: &str,
) -> bool {
    verify(mac(key, &["conch-agent", client_nonce, agent_nonce]), given)
}

fn verify(expected: HmacSha256, given: &str) -> bool {
    match hex::decode(given) {
        Ok(bytes) => expected.verify_slice(&bytes).is_ok(),
        Err(_) => false,
    }
}

/// Why the agent's half failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("expected an auth frame, got {0:?}")]
    Unexpected(&'static str),
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error("malformed client nonce")]
    Nonce,
    #[error("wrong key")]
    BadMac,
    #[error("the agent serves its maximum of connections")]
    Busy,
}

impl HandshakeError {
    /// What the agent tells the client before it hangs up.
    pub(crate) fn to_message(&self) -> Message {
        match self {
            HandshakeError::Frame(e) => Message::error(ErrorCode::Protocol, e.to_string()),
            HandshakeError::Unexpected(_) => Message::error(ErrorCode::Protocol, self.to_string()),
            HandshakeError::Busy => Message::error(ErrorCode::Busy, self.to_string()),
            _ => Message::error(ErrorCode::Auth, self.to_string()),
        }
    }
}

/// The agent's half: sends `hello`, checks the client's `auth`, takes a
/// connection slot and proves the key in `ready`.
pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    key: &Key,
    slots: &Arc<Semaphore>,
    max_channels: usize,
) -> Result<OwnedSemaphorePermit, HandshakeError> {
    let agent_nonce = new_nonce();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        nonce: agent_nonce.clone(),
    };
    framed
        .send(Frame::new(0, hello))
        .await
        .map_err(|_| HandshakeError::Closed)?;
    let frame = match framed.next().await {
        None => return Err(HandshakeError::Closed),
        Some(Err(FrameError::Io(_))) => return Err(HandshakeError::Closed),
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(frame)) => frame,
    };
    let Message::Auth {
        version,
        nonce,
        mac,
    } = frame.msg
    else {
        return Err(HandshakeError::Unexpected(frame.msg.type_name()));
    };
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    if !is_valid_nonce(&nonce) {
        return Err(HandshakeError::Nonce);
    }
    if !verify_client_mac(key.as_bytes(), &agent_nonce, &nonce, &mac) {
        return Err(HandshakeError::BadMac);
    }
    // Only an authenticated client may take a connection slot; when there
    // is none it is told so, never left waiting.
    let permit = slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| HandshakeError::Busy)?;
    let ready = Message::Ready {
        mac: agent_mac(key.as_bytes(), &nonce, &agent_nonce),
        max_channels: Some(u32::try_from(max_channels).unwrap_or(u32::MAX)),
    };
    framed
        .send(Frame::new(0, ready))
        .await
        .map_err(|_| HandshakeError::Closed)?;
    Ok(permit)
}

/// What the agent told the client in its `ready`.
#[derive(Debug, Clone, Copy)]
pub struct AgentInfo {
    /// Channels the agent runs at once on this connection (its
    /// `--max-channels`); 1024 when an agent does not say.
    pub(crate) max_channels: usize,
}

/// Why the client's half failed.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error("the connection closed during the handshake")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Protocol(String),
    #[error("the agent refused the key: {0}")]
    Refused(String),
    #[error("the agent's proof of the key is wrong: it does not hold the same key")]
    AgentMac,
}

/// The client's half, on a fresh connection: answers `hello` with `auth`
/// and checks the agent's proof in `ready`.
pub async fn offer<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec>,
    key: &Key,
) -> Result<AgentInfo, OfferError> {
    let hello = framed.next().await.ok_or(OfferError::Closed)??;
    let Message::Hello {
        version,
        nonce: agent_nonce,
    } = hello.msg
    else {
        return Err(OfferError::Protocol(format!(
            "expected hello, got {}",
            hello.msg.type_name()
        )));
    };
    if version != PROTOCOL_VERSION {
        return Err(OfferError::Protocol(format!(
            "agent speaks protocol version {version}"
        )));
    }
    if !is_valid_nonce(&agent_nonce) {
        return Err(OfferError::Protocol("malformed agent nonce".into()));
    }
    let nonce = new_nonce();
    let mac = client_mac(key.as_bytes(), &agent_nonce, &nonce);
    framed
        .send(Frame::new(
            0,
            Message::Auth {
                version: PROTOCOL_VERSION,
                nonce: nonce.clone(),
                mac,
            },
        ))
        .await?;
    let reply = framed.next().await.ok_or(OfferError::Closed)??;
    match reply.msg {
        Message::Ready { mac, max_channels }
            if verify_agent_mac(key.as_bytes(), &nonce, &agent_nonce, &mac) =>
        {
            Ok(AgentInfo {
                max_channels: max_channels.map_or(1024, |n| n as usize),
            })
        }
        Message::Ready { .. } => Err(OfferError::AgentMac),
        Message::Error {
            code: ErrorCode::Auth,
            message,
        } => Err(OfferError::Refused(message)),
        Message::Error { code, message } => Err(OfferError::Protocol(format!("{code}: {message}"))),
        other => Err(OfferError::Protocol(format!(
            "expected ready, got {}",
            other.type_name()
        ))),
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
