//! How bytes travel between the server and an agent, below the frames'
//! meaning: the sockets (options, keepalive, accepting), TLS and its
//! channel binding ([`tls`]), the queue that feeds a framed socket
//! ([`writer`]), and both halves of the authentication exchange
//! ([`handshake`]). The agent (`agent::connection`) and the client (`link`)
//! build on these pieces, so the two ends cannot drift apart.

pub mod handshake;
pub(crate) mod pending;
pub(crate) mod socket;
pub mod tls;
pub(crate) mod writer;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream of the agent link: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The agent link's stream, whichever it is.
pub type Stream = Box<dyn Io>;
