//! conch: a web-based remote command console.
//!
//! The crate is one binary with three roles: the command agent
//! ([`agent`]), the web server and the CLI client. They share the framed
//! protocol of [`protocol`].

pub mod agent;
pub mod audit;
pub mod cli;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
pub mod keyfile;
pub mod link;
pub mod protocol;
pub mod recording;
pub mod rest;
pub mod rest_client;
pub mod selector;
pub mod server;
pub mod shutdown;
pub(crate) mod small_map;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod transport;
pub mod vocab;
