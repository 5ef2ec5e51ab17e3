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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::Framed;

use super::Stream;
use super::tls::{Acceptor, Connector};
use crate::keyfile::Key;
use crate::protocol::{Frame, FrameCodec, FrameError, Message, PROTOCOL_VERSION};
use crate::vocab::ErrorCode;

/// The framed connection of a handshake: its stream is swapped for the TLS
/// stream over it once `hello` has gone by in the clear.
pub type LinkFramed = Framed<Stream, FrameCodec>;

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

/// What a MAC binds besides the key and the two nonces: the TLS session
/// (its exporter value, empty without TLS), and what the sender says of
/// itself (its name and capabilities).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound<'a> {
    pub(crate) binding: &'a [u8],
    pub(crate) name: Option<&'a str>,
    pub(crate) capabilities: &'a [String],
}

/// `HMAC-SHA256(key, part...)`, each part preceded by its length (4 bytes,
/// big-endian), so that no two different lists of parts hash alike.
fn mac(key: &[u8], label: &str, first: &str, second: &str, bound: Bound<'_>) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    let mut part = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u32).to_be_bytes());
        mac.update(bytes);
    };
    part(label.as_bytes());
    part(first.as_bytes());
    part(second.as_bytes());
    part(bound.binding);
    part(bound.name.unwrap_or("").as_bytes());
    part(&(bound.capabilities.len() as u32).to_be_bytes());
    for capability in bound.capabilities {
        part(capability.as_bytes());
    }
    mac
}

const CLIENT_LABEL: &str = "conch/3 client";
const AGENT_LABEL: &str = "conch/3 agent";

/// The client's MAC over `agent_nonce`, `client_nonce` and what it binds, hex.
pub(crate) fn client_mac(
    key: &[u8],
    agent_nonce: &str,
    client_nonce: &str,
    bound: Bound<'_>,
) -> String {
    hex::encode(
        mac(key, CLIENT_LABEL, agent_nonce, client_nonce, bound)
            .finalize()
            .into_bytes(),
    )
}

/// The agent's MAC over `client_nonce`, `agent_nonce` and what it binds, hex.
pub(crate) fn agent_mac(
    key: &[u8],
    client_nonce: &str,
    agent_nonce: &str,
    bound: Bound<'_>,
) -> String {
    hex::encode(
        mac(key, AGENT_LABEL, client_nonce, agent_nonce, bound)
            .finalize()
            .into_bytes(),
    )
}

/// Checks a client's MAC in constant time.
pub(crate) fn verify_client_mac(
    key: &[u8],
    agent_nonce: &str,
    client_nonce: &str,
    bound: Bound<'_>,
    given: &str,
) -> bool {
    verify(
        mac(key, CLIENT_LABEL, agent_nonce, client_nonce, bound),
        given,
    )
}

/// Checks an agent's MAC in constant time.
pub(crate) fn verify_agent_mac(
    key: &[u8],
    client_nonce: &str,
    agent_nonce: &str,
    bound: Bound<'_>,
    given: &str,
) -> bool {
    verify(
        mac(key, AGENT_LABEL, client_nonce, agent_nonce, bound),
        given,
    )
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
    #[error("the server refused this agent: {0}")]
    Refused(String),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
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

/// Replaces the stream under `framed` with `wrap(stream)`. Nothing may
/// have been read ahead: what follows `hello` is the TLS handshake's.
async fn upgrade<F, Fut, E>(framed: &mut LinkFramed, wrap: F) -> Result<(), E>
where
    F: FnOnce(Stream) -> Fut,
    Fut: std::future::Future<Output = Result<Stream, E>>,
{
    let placeholder: Stream = Box::new(tokio::io::duplex(1).0);
    let plain = std::mem::replace(framed.get_mut(), placeholder);
    *framed.get_mut() = wrap(plain).await?;
    Ok(())
}

/// The agent's half: sends `hello` in the clear, then (unless the agent
/// runs with `--insecure-plaintext`) runs TLS over the connection, checks
/// the client's `auth`, takes a connection slot and proves the key in
/// `ready`. Both MACs bind the TLS session.
///
/// `name` is the agent's `--name`: claimed in `hello` and proved in
/// `ready`, whose MAC covers it.
pub(crate) async fn answer(
    framed: &mut LinkFramed,
    key: &Key,
    name: Option<&str>,
    tls: Option<&Acceptor>,
    slots: &Arc<Semaphore>,
    max_channels: usize,
    sessions: bool,
) -> Result<Authenticated, HandshakeError> {
    let agent_nonce = new_nonce();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        nonce: agent_nonce.clone(),
        tls: tls.is_some(),
        name: name.map(str::to_owned),
    };
    framed
        .send(Frame::new(0, hello))
        .await
        .map_err(|_| HandshakeError::Closed)?;
    let mut binding = Vec::new();
    if let Some(acceptor) = tls {
        if !framed.read_buffer().is_empty() {
            return Err(HandshakeError::Unexpected("data before TLS"));
        }
        upgrade(framed, |plain| async {
            let (stream, exported) = acceptor.accept(plain).await.map_err(|e| match e {
                // A port probe (a health check) reads `hello` and hangs up:
                // not worth a warning.
                super::tls::TlsError::Handshake(io)
                    if matches!(
                        io.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    HandshakeError::Closed
                }
                e => HandshakeError::Tls(e),
            })?;
            binding = exported.to_vec();
            Ok::<Stream, HandshakeError>(Box::new(stream))
        })
        .await?;
    }
    let frame = match framed.next().await {
        None => return Err(HandshakeError::Closed),
        Some(Err(FrameError::Io(_))) => return Err(HandshakeError::Closed),
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(frame)) => frame,
    };
    let (version, nonce, mac, client_name, capabilities) = match frame.msg {
        Message::Auth {
            version,
            nonce,
            mac,
            name,
            capabilities,
        } => (version, nonce, mac, name, capabilities),
        // A server this agent dialed into may refuse it (an unknown name).
        Message::Error { message, .. } => return Err(HandshakeError::Refused(peer_text(&message))),
        other => return Err(HandshakeError::Unexpected(other.type_name())),
    };
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(version));
    }
    if !is_valid_nonce(&nonce) {
        return Err(HandshakeError::Nonce);
    }
    // An empty name would MAC like an absent one: only absent is allowed.
    if client_name.as_deref() == Some("") {
        return Err(HandshakeError::Unexpected("an empty name"));
    }
    let theirs = Bound {
        binding: &binding,
        name: client_name.as_deref(),
        capabilities: &capabilities,
    };
    if !verify_client_mac(key.as_bytes(), &agent_nonce, &nonce, theirs, &mac) {
        return Err(HandshakeError::BadMac);
    }
    // Only an authenticated client may take a connection slot; when there
    // is none it is told so, never left waiting.
    let permit = slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| HandshakeError::Busy)?;
    let mut offered: Vec<String> = sessions.then(|| SESSIONS.to_owned()).into_iter().collect();
    offered.push(FILES.to_owned());
    let ours = Bound {
        binding: &binding,
        name,
        capabilities: &offered,
    };
    let ready = Message::Ready {
        mac: agent_mac(key.as_bytes(), &nonce, &agent_nonce, ours),
        max_channels: Some(u32::try_from(max_channels).unwrap_or(u32::MAX)),
        name: name.map(str::to_owned),
        capabilities: offered.clone(),
    };
    framed
        .send(Frame::new(0, ready))
        .await
        .map_err(|_| HandshakeError::Closed)?;
    Ok(Authenticated {
        _slot: permit,
        capabilities,
    })
}

/// What the agent's half yields: the connection's slot, and what the client
/// said it does (its MAC covered that).
pub(crate) struct Authenticated {
    /// Held for as long as the connection lasts.
    pub(crate) _slot: OwnedSemaphorePermit,
    pub(crate) capabilities: Vec<String>,
}

/// The capability of a client that pings at least every 10 s: an agent
/// may then take a silent connection for dead ([`crate::agent`]'s silence
/// limit); from a client without it, silence means nothing.
pub(crate) const PINGS: &str = "ping";

/// The capability of an agent that keeps sessions (`exec` with `session`,
/// `attach`, `detach`, `list_sessions`): a server offers persistent shells
/// only on agents that say it.
pub(crate) const SESSIONS: &str = "sessions";

/// The capability of an agent that answers `put` and `get`: a server sends
/// them only to agents that say it (an older one would leave them
/// unanswered).
pub(crate) const FILES: &str = "files";

/// What the agent told the client in its `ready`.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Channels the agent runs at once on this connection (its
    /// `--max-channels`); 1024 when an agent does not say.
    pub(crate) max_channels: usize,
    /// The agent's `--name`, proved by its MAC; `None` when it has none.
    pub(crate) name: Option<String>,
    /// It keeps sessions (the `sessions` capability).
    pub(crate) sessions: bool,
    /// It reads and writes files (the `files` capability).
    pub(crate) files: bool,
}

/// Text from a peer not yet authenticated, made safe to log: control
/// characters escaped (no forged log lines), at most 200 characters.
pub(crate) fn peer_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
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

/// What an agent's `hello` said, read before the client picks its key.
#[derive(Debug)]
pub(crate) struct Hello {
    nonce: String,
    /// Whether the agent offers TLS (else it runs `--insecure-plaintext`).
    pub(crate) tls: bool,
    /// The name the agent claims; unproved until its `ready`.
    pub(crate) name: Option<String>,
}

/// The first step of the client's half: reads and checks `hello`.
pub(crate) async fn read_hello(framed: &mut LinkFramed) -> Result<Hello, OfferError> {
    let hello = framed.next().await.ok_or(OfferError::Closed)??;
    let Message::Hello {
        version,
        nonce,
        tls,
        name,
    } = hello.msg
    else {
        return Err(OfferError::Protocol(format!(
            "expected hello, got {}",
            hello.msg.type_name()
        )));
    };
    if version != PROTOCOL_VERSION {
        let hint = if version < PROTOCOL_VERSION {
            "an older conch: upgrade the agent"
        } else {
            "a newer conch: upgrade this server"
        };
        return Err(OfferError::Protocol(format!(
            "the agent speaks protocol version {version}, this server {PROTOCOL_VERSION} ({hint})"
        )));
    }
    if !is_valid_nonce(&nonce) {
        return Err(OfferError::Protocol("malformed agent nonce".into()));
    }
    if let Some(name) = &name
        && !crate::vocab::valid_agent_name(name)
    {
        return Err(OfferError::Protocol(format!(
            "the agent claims an invalid name {:?}",
            peer_text(name)
        )));
    }
    Ok(Hello { nonce, tls, name })
}

/// The client's half, on a fresh connection: reads `hello`, runs TLS over
/// the connection (`tls`; `None` only with `--insecure-plaintext`, and only
/// with an agent that runs so too), answers with `auth` and checks the
/// agent's proof in `ready`. Both MACs bind the TLS session.
pub async fn offer(
    framed: &mut LinkFramed,
    key: &Key,
    tls: Option<&Connector>,
) -> Result<AgentInfo, OfferError> {
    let hello = read_hello(framed).await?;
    finish_offer(framed, hello, key, tls).await
}

/// Runs TLS over the connection when the agent offered it and we want it
/// (the only combination that works besides plaintext on both ends); the
/// session's exporter value, empty without TLS.
async fn secure(
    framed: &mut LinkFramed,
    agent_tls: bool,
    tls: Option<&Connector>,
) -> Result<Vec<u8>, OfferError> {
    let mut binding = Vec::new();
    match (tls, agent_tls) {
        (Some(connector), true) => {
            if !framed.read_buffer().is_empty() {
                return Err(OfferError::Protocol(
                    "the agent sent data before TLS".into(),
                ));
            }
            upgrade(framed, |plain| async {
                let (stream, exported) = connector
                    .connect(plain)
                    .await
                    .map_err(|e| OfferError::Protocol(e.to_string()))?;
                binding = exported.to_vec();
                Ok::<Stream, OfferError>(Box::new(stream))
            })
            .await?;
        }
        (None, false) => {}
        (Some(_), false) => {
            return Err(OfferError::Protocol(
                "the agent runs without TLS (--insecure-plaintext); refusing a plaintext link \
                 (give --insecure-plaintext here too to accept it)"
                    .into(),
            ));
        }
        (None, true) => {
            return Err(OfferError::Protocol(
                "the agent requires TLS; drop --insecure-plaintext".into(),
            ));
        }
    }
    Ok(binding)
}

/// Turns away an agent that dialed in (an unknown name): inside TLS when
/// it offered TLS, so that it reads why rather than a broken handshake.
pub(crate) async fn refuse(
    framed: &mut LinkFramed,
    hello: Hello,
    connector: &Connector,
    why: &str,
) {
    let tls = hello.tls.then_some(connector);
    if secure(framed, hello.tls, tls).await.is_ok() {
        let _ = framed
            .send(Frame::new(0, Message::error(ErrorCode::Auth, why)))
            .await;
    }
}

/// The rest of the client's half, once the key is chosen (for an agent
/// that dials in, by the name in its `hello`). The agent's `ready` must
/// prove the name it claimed in `hello`, so that a name is bound to its key.
pub(crate) async fn finish_offer(
    framed: &mut LinkFramed,
    hello: Hello,
    key: &Key,
    tls: Option<&Connector>,
) -> Result<AgentInfo, OfferError> {
    let Hello {
        nonce: agent_nonce,
        tls: agent_tls,
        name: claimed,
    } = hello;
    let binding = secure(framed, agent_tls, tls).await?;
    let nonce = new_nonce();
    let capabilities = vec![PINGS.to_owned()];
    let ours = Bound {
        binding: &binding,
        name: None,
        capabilities: &capabilities,
    };
    let mac = client_mac(key.as_bytes(), &agent_nonce, &nonce, ours);
    framed
        .send(Frame::new(
            0,
            Message::Auth {
                version: PROTOCOL_VERSION,
                nonce: nonce.clone(),
                mac,
                name: None,
                capabilities,
            },
        ))
        .await?;
    let reply = framed.next().await.ok_or(OfferError::Closed)??;
    match reply.msg {
        Message::Ready {
            mac,
            max_channels,
            name,
            capabilities,
        } => {
            if name.as_deref() == Some("") {
                return Err(OfferError::Protocol("the agent sent an empty name".into()));
            }
            if claimed.is_some() && name != claimed {
                return Err(OfferError::Protocol(
                    "the agent's ready names another agent than its hello".into(),
                ));
            }
            let theirs = Bound {
                binding: &binding,
                name: name.as_deref(),
                capabilities: &capabilities,
            };
            if !verify_agent_mac(key.as_bytes(), &nonce, &agent_nonce, theirs, &mac) {
                return Err(OfferError::AgentMac);
            }
            Ok(AgentInfo {
                max_channels: max_channels.map_or(1024, |n| n as usize),
                name,
                sessions: capabilities.iter().any(|c| c == SESSIONS),
                files: capabilities.iter().any(|c| c == FILES),
            })
        }
        Message::Error {
            code: ErrorCode::Auth,
            message,
        } => Err(OfferError::Refused(peer_text(&message))),
        Message::Error { code, message } => Err(OfferError::Protocol(format!(
            "{}: {}",
            peer_text(code.as_str()),
            peer_text(&message)
        ))),
        other => Err(OfferError::Protocol(format!(
            "expected ready, got {}",
            other.type_name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Bound<'static> = Bound {
        binding: &[],
        name: None,
        capabilities: &[],
    };

    #[test]
    fn macs_verify_and_are_direction_bound() {
        let key = b"0123456789abcdef0123456789abcdef";
        let (a, c) = (new_nonce(), new_nonce());
        assert!(is_valid_nonce(&a) && a != c);
        let cm = client_mac(key, &a, &c, NONE);
        assert!(verify_client_mac(key, &a, &c, NONE, &cm));
        assert!(!verify_client_mac(
            b"another key of enough length",
            &a,
            &c,
            NONE,
            &cm
        ));
        assert!(!verify_agent_mac(key, &c, &a, NONE, &cm));
        assert!(verify_agent_mac(
            key,
            &c,
            &a,
            NONE,
            &agent_mac(key, &c, &a, NONE)
        ));
        assert!(!verify_client_mac(key, &a, &c, NONE, "zz"));
    }

    #[test]
    fn a_peers_text_cannot_forge_log_lines() {
        let forged = "no\n2026-01-01 INFO agent connected \x1b[2J";
        let logged = peer_text(forged);
        assert!(
            !logged.contains('\n') && !logged.contains('\x1b'),
            "{logged}"
        );
        assert!(logged.contains("\\n"), "{logged}");
        assert_eq!(peer_text(&"x".repeat(5000)).chars().count(), 201);
    }

    #[test]
    fn macs_bind_the_tls_session_and_what_the_sender_says() {
        let key = b"0123456789abcdef0123456789abcdef";
        let (a, c) = (new_nonce(), new_nonce());
        let caps = ["sessions".to_owned()];
        let bound = Bound {
            binding: &[7; 32],
            name: Some("web1"),
            capabilities: &caps,
        };
        let cm = client_mac(key, &a, &c, bound);
        assert!(verify_client_mac(key, &a, &c, bound, &cm));
        // Another TLS session (a relay's), another name, other capabilities.
        for other in [
            Bound {
                binding: &[8; 32],
                ..bound
            },
            Bound {
                binding: &[],
                ..bound
            },
            Bound {
                name: Some("web2"),
                ..bound
            },
            Bound {
                name: None,
                ..bound
            },
            Bound {
                capabilities: &[],
                ..bound
            },
        ] {
            assert!(!verify_client_mac(key, &a, &c, other, &cm), "{other:?}");
        }
        // Parts are length-prefixed: moving bytes between them changes the MAC.
        let shifted = ["".to_owned(), "sessions".to_owned()];
        assert!(!verify_client_mac(
            key,
            &a,
            &c,
            Bound {
                capabilities: &shifted,
                ..bound
            },
            &cm
        ));
    }
}
