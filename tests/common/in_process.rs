//! A server and its agent started inside the test process, as axum's and
//! mini-redis's tests do: both on listeners bound to port 0, configured
//! from the same flags a user writes (`conch::cli`), with no binary to
//! spawn and no log to read for the port. Tests of signals, the embedded
//! agent, logs or containers start real processes instead (`super`).
//!
//! With `CONCH_TEST_BIN` set (to show that a test fails against an older
//! build), the server is that binary's process instead.

use std::net::SocketAddr;

use clap::Parser;
use conch::cli::{Cli, Command};
use conch::keyfile::Key;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{ADMIN_TOKEN, Endpoint};

/// A server (and agent) running in this process until dropped, or a
/// process when `CONCH_TEST_BIN` asks for one.
pub struct InProcess {
    pub addr: SocketAddr,
    pub token: String,
    shutdown: CancellationToken,
    _process: Option<super::Server>,
    _dir: tempfile::TempDir,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Endpoint for InProcess {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn admin_token(&self) -> &str {
        &self.token
    }
}

fn parse(args: &[&str]) -> Command {
    Cli::try_parse_from(args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .command
}

/// Starts an agent and `conch serve FLAGS` connected to it, and waits until
/// the server reports the agent connected.
pub async fn start(flags: &[&str]) -> InProcess {
    super::tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    if std::env::var_os("CONCH_TEST_BIN").is_some() {
        let server = super::start_server(flags, &[]);
        return InProcess {
            addr: server.addr,
            token: server.token.clone(),
            shutdown: CancellationToken::new(),
            _process: Some(server),
            _dir: dir,
        };
    }
    let shutdown = CancellationToken::new();
    let key_file = dir.path().join("agent.key");
    Key::generate().save_new(&key_file).expect("write key");
    let key_path = key_file.to_str().expect("utf-8 path");

    // Commands of several in-process agents share this process: no
    // per-agent cgroups (they are named after the process).
    let Command::Agent(agent) =
        parse(&["conch", "agent", "--key-file", key_path, "--cgroups", "off"])
    else {
        unreachable!()
    };
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agent_listener.local_addr().unwrap().to_string();
    let config = agent.into_config().expect("agent configuration");
    tokio::spawn(conch::agent::serve(
        agent_listener,
        config,
        shutdown.clone(),
    ));

    let mut args = vec![
        "conch",
        "serve",
        "--agent",
        &agent_addr,
        "--agent-key-file",
        key_path,
        "--admin-token",
        ADMIN_TOKEN,
    ];
    args.extend_from_slice(flags);
    let Command::Serve(serve) = parse(&args) else {
        unreachable!()
    };
    let config = serve.into_config(false).expect("server configuration");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = conch::server::serve(listener, config, server_shutdown).await {
            panic!("the in-process server failed: {e:#}");
        }
    });
    let server = InProcess {
        addr,
        token: ADMIN_TOKEN.into(),
        shutdown,
        _process: None,
        _dir: dir,
    };
    server.wait_ready().await;
    server
}
