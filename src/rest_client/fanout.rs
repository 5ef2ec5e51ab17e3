//! `conch exec --on SELECTOR`: the streamed lines of many hosts, printed
//! line by line with the host's name in front (as pdsh and pssh do), each
//! host's failure on stderr as it happens, and a summary at the end.

use std::collections::BTreeMap;
use std::io::Write;

use futures_util::StreamExt;

use super::{ClientError, FanoutConfig, output_bytes, root_cause};
use crate::rest::{FanoutLine, HostStatus, Stream, StreamLine, Summary};
use crate::vocab::ExitStatus;

/// Exit status when some host ran the command and it failed.
pub(crate) const EXIT_SOME_FAILED: u8 = 1;
/// Exit status when some host could not be reached.
pub(crate) const EXIT_SOME_UNREACHABLE: u8 = 2;

/// A partial line longer than this is printed without waiting for its end.
const MAX_PENDING_LINE: usize = 64 * 1024;

/// Output not yet printed: the end of a line still to come, per host and stream.
#[derive(Default)]
struct Lines {
    pending: BTreeMap<(String, bool), Vec<u8>>,
}

impl Lines {
    fn write(out: &mut impl Write, prefix: Option<&str>, line: &[u8]) {
        if let Some(host) = prefix {
            let _ = write!(out, "{host}: ");
        }
        let _ = out.write_all(line);
    }

    /// Prints the whole lines of `bytes` (after what was pending).
    fn push(&mut self, host: &str, stream: Stream, bytes: &[u8], prefix: bool) {
        let key = (host.to_owned(), stream == Stream::Stderr);
        let buf = self.pending.entry(key).or_default();
        buf.extend_from_slice(bytes);
        let prefix = prefix.then_some(host);
        let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
        let mut out: Box<dyn Write> = match stream {
            Stream::Stdout => Box::new(stdout.lock()),
            Stream::Stderr => Box::new(stderr.lock()),
        };
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            Lines::write(&mut out, prefix, &line);
        }
        if buf.len() > MAX_PENDING_LINE {
            let mut line = std::mem::take(buf);
            line.push(b'\n');
            Lines::write(&mut out, prefix, &line);
        }
        let _ = out.flush();
    }

    /// Prints what is left of `host`'s output, ended with a newline.
    fn finish(&mut self, host: &str, prefix: bool) {
        for stderr in [false, true] {
            if let Some(mut rest) = self.pending.remove(&(host.to_owned(), stderr))
                && !rest.is_empty()
            {
                rest.push(b'\n');
                let prefix = prefix.then_some(host);
                if stderr {
                    Lines::write(&mut std::io::stderr().lock(), prefix, &rest);
                } else {
                    Lines::write(&mut std::io::stdout().lock(), prefix, &rest);
                }
            }
        }
    }
}

/// How a host ended, in words.
fn describe(exit: &ExitStatus) -> String {
    if exit.timed_out {
        "timed out and was killed".into()
    } else if let Some(code) = exit.code {
        format!("exited with status {code}")
    } else if let Some(signal) = exit.signal {
        format!("was killed by signal {}", signal.0)
    } else {
        "ended".into()
    }
}

/// Prints the fan-out's lines; the exit status to leave with.
pub(super) async fn print(
    response: reqwest::Response,
    config: &FanoutConfig,
) -> Result<u8, ClientError> {
    let mut stream = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut lines = Lines::default();
    let mut failed: Vec<String> = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Broken(root_cause(&e)))?;
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=pos).collect();
            if config.json {
                let _ = std::io::stdout().lock().write_all(&raw);
            }
            let line: FanoutLine =
                serde_json::from_slice(&raw).map_err(|e| ClientError::Broken(e.to_string()))?;
            match line {
                FanoutLine::Summary { summary } => {
                    let _ = std::io::stdout().flush();
                    return Ok(finish(&summary, &failed, &unreachable));
                }
                FanoutLine::Host {
                    agent,
                    line,
                    status,
                } => {
                    if config.json {
                        continue;
                    }
                    match line {
                        StreamLine::Output {
                            stream,
                            data,
                            encoding,
                        } => {
                            let bytes = output_bytes(data, encoding)?;
                            lines.push(&agent, stream, &bytes, config.prefix);
                        }
                        StreamLine::Truncated { truncated, limit } => {
                            let name = truncated.name();
                            eprintln!("conch: {agent}: {name} was cut off after {limit} bytes");
                        }
                        StreamLine::Exit { exit, .. } => {
                            lines.finish(&agent, config.prefix);
                            let exit = ExitStatus::from(exit);
                            if status != Some(HostStatus::Ok) {
                                eprintln!("conch: {agent}: {}", describe(&exit));
                            }
                        }
                        StreamLine::Error { error } => {
                            lines.finish(&agent, config.prefix);
                            eprintln!("conch: {agent}: {error}");
                        }
                    }
                    match status {
                        Some(HostStatus::Failed) => failed.push(agent),
                        Some(HostStatus::Unreachable) => unreachable.push(agent),
                        _ => {}
                    }
                }
            }
        }
    }
    Err(ClientError::Broken(
        "the stream ended before the summary".into(),
    ))
}

/// Prints the summary on stderr; the exit status it means.
fn finish(summary: &Summary, failed: &[String], unreachable: &[String]) -> u8 {
    let hosts = if summary.total == 1 { "host" } else { "hosts" };
    let mut text = format!(
        "conch: {} {hosts}: {} ok, {} failed, {} unreachable",
        summary.total, summary.ok, summary.failed, summary.unreachable
    );
    if !failed.is_empty() {
        text.push_str(&format!("; failed: {}", failed.join(" ")));
    }
    if !unreachable.is_empty() {
        text.push_str(&format!("; unreachable: {}", unreachable.join(" ")));
    }
    eprintln!("{text}");
    if summary.unreachable > 0 {
        EXIT_SOME_UNREACHABLE
    } else if summary.failed > 0 {
        EXIT_SOME_FAILED
    } else {
        0
    }
}
