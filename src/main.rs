//! The `conch` binary: parses the command line and runs it (`conch::cli`).

use std::process::ExitCode;

use clap::Parser;
use conch::cli::Cli;
use conch::telemetry::{self, LogFormat};

fn main() -> ExitCode {
    // Before any thread exists: systemd's variables leave the environment.
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { conch::systemd::init() };
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("conch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_logs = cli.log_format == LogFormat::Json;
    match runtime.block_on(conch::cli::run(cli.command, json_logs)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
