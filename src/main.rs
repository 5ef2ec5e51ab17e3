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
    limit_malloc_arenas();
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

/// As many malloc arenas as cores (at least two), not glibc's eight a
/// core. glibc gives a thread an arena of its own while there are fewer
/// than its limit, and memory freed in one arena serves only that arena's
/// threads: the server's and agent's threads (runtime workers, the
/// store's, blocking ones) each grew a heap of their own while start-up's
/// freed memory (the store's, about 3 MB) stayed unused in another. With
/// one arena a core the server held 22.4 instead of 26.8 MB with 120 idle
/// shells; each more shell costs what it did (its live heap). No change in
/// throughput or latency beyond the noise (benchmarks, alternated). An
/// operator's `MALLOC_ARENA_MAX` or `glibc.malloc.arena_max` tunable, which
/// glibc reads itself, still decides.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tuned {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
            let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
            // SAFETY: before any other thread exists; mallopt only sets a
            // limit for arenas made from now on.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        }
    }
}
