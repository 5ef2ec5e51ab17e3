//! How bytes travel between the server and an agent, below the frames'
//! meaning: the sockets (options, keepalive, accepting), the queue that
//! feeds a framed socket ([`writer`]), and both halves of the
//! authentication exchange ([`handshake`]). The agent (`agent::connection`)
//! and the client (`link`) build on these pieces, so the two ends cannot
//! drift apart.

pub mod handshake;
pub(crate) mod socket;
pub(crate) mod writer;
