//! The `conch` binary: parses the command line and runs it (`conch::cli`).

use std::process::ExitCode;

use clap::Parser;
use conch::cli::Cli;
use conch::telemetry::{self, LogFormat};

fn main() -> ExitCode {
    // Before any thread exists: systemd's variables leave the environment.
    // SAFETY: the first statement of main: no other thread exists yet.
    unsafe { conch::systemd::init() };
    // The file helper the agent runs for `put` and `get`: before anything
    // else, since it is a command of its own, not the CLI.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == conch::agent::file_io::HELPER_ARG)
    {
        return conch::agent::file_io::main(&args[2..]);
    }
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
