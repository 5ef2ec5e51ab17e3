//! Logging setup: `tracing` to stdout, as text or one JSON object per line.
//!
//! Logs never hold what users type or what their commands print: conch's
//! own events carry no payloads, and the crates below conch that would log
//! message contents at debug or trace level (the WebSocket and HTTP
//! libraries) are held at `info` whatever the filter asks for.

use tracing_subscriber::EnvFilter;

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Crates that log frames, headers or bodies below `info`.
const CONTENT_LOGGERS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
];

/// The filter: `CONCH_LOG`, else the standard `RUST_LOG` (e.g. `debug`,
/// `conch=trace`), else `info`, with the content loggers capped at `info`.
pub(crate) fn filter() -> EnvFilter {
    let spec = ["CONCH_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| "info".into());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("conch: ignoring the log filter {spec:?}: {e}");
        EnvFilter::new("info")
    });
    for target in CONTENT_LOGGERS {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
