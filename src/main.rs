//! The `conch` command line: parses flags and environment into a typed
//! configuration and hands it to the module that does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use conch::agent::{AgentConfig, Limits};
use conch::keyfile::Key;
use conch::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "conch", version, about = "A web-based remote command console")]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        env = "CONCH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the command agent: a TCP server that runs commands for authenticated clients.
    Agent(AgentArgs),
    /// Write a fresh random agent key (64 hex characters) to a new file with mode 0600.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        path: PathBuf,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Address to listen on. Loopback by default: exposing an agent is a decision.
    #[arg(long, env = "CONCH_AGENT_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// File holding the pre-shared key (at least 16 bytes; see `conch keygen`).
    #[arg(long, env = "CONCH_AGENT_KEY_FILE")]
    key_file: PathBuf,
    /// Client connections served at once.
    #[arg(long, env = "CONCH_AGENT_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Commands running at once on one connection.
    #[arg(long, env = "CONCH_AGENT_MAX_CHANNELS", default_value_t = 1024)]
    max_channels: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Keygen { path } => {
            Key::generate().save_new(&path)?;
            println!("wrote a new key to {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            let config = AgentConfig {
                listen: args.listen,
                key: Key::load(&args.key_file)?,
                max_connections: args.max_connections.max(1),
                limits: Limits {
                    max_channels: args.max_channels.max(1),
                },
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            conch::agent::run(config, shutdown)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}
