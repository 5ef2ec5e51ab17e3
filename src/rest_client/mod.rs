//! The REST client behind `conch exec` (named apart from `link`, the
//! agent client): one command through the REST API, like `ssh host cmd`.
//!
//! Output is streamed (NDJSON) to this process's stdout and stderr as it
//! arrives, and the remote exit status becomes this process's: the exit
//! code itself, 128+N for a signal N, 124 for a timeout (as `timeout(1)`),
//! and 255 for conch's own failures (as ssh).
//!
//! On several hosts (`--on SELECTOR`, [`fanout`]) each line is prefixed
//! with its host's name, as pdsh does, and the status is 0 when every host
//! exited 0, 1 when some host failed, 2 when some host was unreachable.

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Value, json};

pub mod audit;
mod fanout;
pub mod files;
pub mod users;

use crate::rest::{Encoding, Stream, StreamLine};
use crate::vocab::ExitStatus;

/// Exit status for failures of conch itself: unreachable server, refused
/// credentials, a broken response.
pub const EXIT_CONCH_FAILED: u8 = 255;
/// Exit status for a command killed by its timeout.
pub(crate) const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when output was cut off at `--max-output-bytes` (whatever
/// the command's own status, which is printed on stderr).
pub(crate) const EXIT_TRUNCATED: u8 = 125;

/// Which server, with which credentials.
#[derive(Debug, Clone)]
pub struct Server {
    /// Its base URL.
    pub url: String,
    pub token: String,
    /// PEM certificates to trust for an `https://` server besides the
    /// system's (a self-signed server's own certificate, say).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Server {
    fn unreachable(&self, message: String) -> ClientError {
        ClientError::Unreachable {
            server: self.url.clone(),
            message,
        }
    }

    fn client(&self) -> Result<reqwest::Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("conch-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| self.unreachable(format!("cannot read {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| self.unreachable(format!("{}: {e}", path.display())))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder.build().map_err(|e| self.unreachable(e.to_string()))
    }

    /// Sends `request`; an answer that is not a success becomes the error
    /// the server's problem details describe.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(root_cause(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(ClientError::Refused {
                status: status.as_u16(),
                detail,
            });
        }
        Ok(response)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// `--on`: the hosts, and how to print their output.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// A selector of agents.
    pub target: String,
    pub concurrency: Option<u64>,
    /// Prefix each line with `host: `.
    pub prefix: bool,
    /// Print the server's NDJSON lines instead.
    pub json: bool,
}

/// What `conch exec` was asked to do.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub server: Server,
    /// Joined with spaces and run by the remote shell, as ssh does.
    pub command: Vec<String>,
    pub agent: Option<String>,
    /// Several hosts instead of one agent.
    pub fanout: Option<FanoutConfig>,
    pub timeout_ms: Option<u64>,
    pub cwd: Option<String>,
    pub encoding: Option<String>,
    /// Sent as the command's standard input.
    pub stdin: Option<String>,
    /// Output kept per stream; the rest is dropped (and said so). None: all.
    pub max_output_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {server}: {message}")]
    Unreachable { server: String, message: String },
    #[error("the server refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
    #[error("broken response from the server: {0}")]
    Broken(String),
}

/// Runs the command; returns the exit status to leave with.
pub async fn run(config: ExecConfig) -> Result<u8, ClientError> {
    let mut body = json!({"command": config.command.join(" ")});
    for (key, value) in [
        ("agent", config.agent.clone().map(Value::from)),
        ("timeout_ms", config.timeout_ms.map(Value::from)),
        ("cwd", config.cwd.clone().map(Value::from)),
        ("encoding", config.encoding.clone().map(Value::from)),
        ("stdin", config.stdin.clone().map(Value::from)),
        ("max_output_bytes", config.max_output_bytes.map(Value::from)),
        (
            "target",
            config
                .fanout
                .as_ref()
                .map(|f| Value::from(f.target.clone())),
        ),
        (
            "concurrency",
            config
                .fanout
                .as_ref()
                .and_then(|f| f.concurrency)
                .map(Value::from),
        ),
    ] {
        if let Some(v) = value {
            body[key] = v;
        }
    }
    let server = &config.server;
    let client = server.client()?;
    let response = server
        .send(
            client
                .post(server.url("/api/v1/exec"))
                .header("accept", "application/x-ndjson")
                .json(&body),
        )
        .await?;
    if let Some(fanout) = &config.fanout {
        return fanout::print(response, fanout).await;
    }
    let mut stream = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut truncated = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Broken(root_cause(&e)))?;
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let line: StreamLine =
                serde_json::from_slice(&line).map_err(|e| ClientError::Broken(e.to_string()))?;
            match line {
                StreamLine::Output {
                    stream,
                    data,
                    encoding,
                } => {
                    let bytes = output_bytes(data, encoding)?;
                    // A closed local pipe (`| head`) is not conch's failure.
                    let _ = match stream {
                        Stream::Stderr => stderr
                            .lock()
                            .write_all(&bytes)
                            .and_then(|_| stderr.lock().flush()),
                        Stream::Stdout => stdout
                            .lock()
                            .write_all(&bytes)
                            .and_then(|_| stdout.lock().flush()),
                    };
                }
                StreamLine::Truncated {
                    truncated: stream,
                    limit,
                } => {
                    truncated = true;
                    let name = stream.name();
                    eprintln!(
                        "conch: {name} was cut off after {limit} bytes (--max-output-bytes); the rest was discarded"
                    );
                }
                StreamLine::Error { error } => return Err(ClientError::Broken(error)),
                StreamLine::Exit { exit, .. } => {
                    let exit = ExitStatus::from(exit);
                    if exit.timed_out {
                        eprintln!("conch: the command timed out and was killed");
                        return Ok(EXIT_TIMED_OUT);
                    }
                    let status = exit.shell_status();
                    if truncated {
                        eprintln!(
                            "conch: the command exited with status {status}; its output was cut off"
                        );
                        return Ok(EXIT_TRUNCATED);
                    }
                    return Ok(status);
                }
            }
        }
    }
    Err(ClientError::Broken(
        "the stream ended before the command's exit".into(),
    ))
}

/// Decodes an output line's data.
fn output_bytes(data: String, encoding: Option<Encoding>) -> Result<Vec<u8>, ClientError> {
    if encoding == Some(Encoding::Base64) {
        base64::engine::general_purpose::STANDARD
            .decode(&data)
            .map_err(|e| ClientError::Broken(e.to_string()))
    } else {
        Ok(data.into_bytes())
    }
}

/// `conch agents`: prints the agents `selector` matches, as a table (or
/// the server's JSON).
pub async fn agents(
    server: &Server,
    selector: Option<&str>,
    json: bool,
) -> Result<(), ClientError> {
    let client = server.client()?;
    let mut url = url::Url::parse(&server.url("/api/v1/agents"))
        .map_err(|e| server.unreachable(format!("not a URL: {e}")))?;
    if let Some(selector) = selector {
        url.query_pairs_mut().append_pair("selector", selector);
    }
    let request = client.get(url);
    let text = server
        .send(request)
        .await?
        .text()
        .await
        .map_err(|e| ClientError::Broken(root_cause(&e)))?;
    if json {
        println!("{text}");
        return Ok(());
    }
    let list: Value =
        serde_json::from_str(&text).map_err(|e| ClientError::Broken(e.to_string()))?;
    print!("{}", agents_table(&list));
    Ok(())
}

/// The agents of a `GET /api/v1/agents` answer as aligned columns.
fn agents_table(list: &Value) -> String {
    let mut rows = vec![
        [
            "NAME", "STATUS", "OS", "ARCH", "UPTIME", "LOAD", "RTT", "LABELS",
        ]
        .map(String::from),
    ];
    for agent in list["agents"].as_array().into_iter().flatten() {
        let facts = &agent["facts"];
        // An agent's facts are its own words: no control character of
        // theirs reaches this terminal.
        let text = |v: &Value| {
            v.as_str()
                .unwrap_or("-")
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect::<String>()
        };
        let status = if agent["connected"].as_bool() == Some(true) {
            "online"
        } else {
            "offline"
        };
        let uptime = facts["uptime_s"].as_u64().map_or("-".into(), |s| {
            if s >= 86400 {
                format!("{}d", s / 86400)
            } else {
                format!("{}h", s / 3600)
            }
        });
        let load = facts["load"][0]
            .as_f64()
            .map_or("-".into(), |l| format!("{l:.2}"));
        let rtt = agent["rtt_ms"]
            .as_f64()
            .map_or("-".into(), |r| format!("{r:.1}ms"));
        let labels = agent["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{}={}", text(&Value::from(k.as_str())), text(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        rows.push([
            text(&agent["name"]),
            status.into(),
            text(&facts["os"]),
            text(&facts["arch"]),
            uptime,
            load,
            rtt,
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// What `conch healthcheck` probes.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A server's `/healthz`, at its listen address (`0.0.0.0` means this
    /// host), over HTTPS when `https`.
    Server {
        listen: String,
        https: bool,
        /// The server's base path ("" or "/conch").
        base_path: String,
    },
    /// An agent's TCP port accepting connections.
    AgentPort(String),
}

/// Probes a server or an agent, for container health checks: `Ok` when
/// healthy, within 3 s.
pub async fn healthcheck(probe: Probe) -> anyhow::Result<()> {
    use anyhow::Context;
    let timeout = Duration::from_secs(3);
    match probe {
        Probe::AgentPort(addr) => {
            let addr = addr.replace("0.0.0.0", "127.0.0.1");
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
                .await
                .context("timed out")?
                .with_context(|| format!("agent at {addr} is not accepting connections"))?;
            Ok(())
        }
        Probe::Server {
            listen,
            https,
            base_path,
        } => {
            let scheme = if https { "https" } else { "http" };
            let url = format!(
                "{scheme}://{}{base_path}/healthz",
                listen.replace("0.0.0.0", "127.0.0.1")
            );
            // The probe asks this host's own server whether it is alive:
            // which certificate it shows is not the question.
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .danger_accept_invalid_certs(https)
                .build()?;
            let status = client
                .get(&url)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?
                .status();
            anyhow::ensure!(status.is_success(), "{url} answered {status}");
            Ok(())
        }
    }
}

/// Standard input sent with `conch exec --stdin`: at most 1 MiB.
pub(crate) const MAX_STDIN: usize = 1024 * 1024;

/// Reads this process's standard input to its end, for `--stdin`: UTF-8
/// text of at most [`MAX_STDIN`] bytes (the API takes stdin as a string).
pub fn read_stdin() -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let mut buf = String::new();
    std::io::stdin()
        .take(MAX_STDIN as u64 + 1)
        .read_to_string(&mut buf)
        .context("cannot read standard input (it must be UTF-8 text)")?;
    anyhow::ensure!(
        buf.len() <= MAX_STDIN,
        "standard input is larger than 1 MiB"
    );
    Ok(buf)
}

#[cfg(test)]
mod table_tests {
    #[test]
    fn the_agents_table_aligns_and_shows_no_control_characters() {
        let list = serde_json::json!({"agents": [
            {"name": "web-1", "connected": true, "labels": {"role": "web"}, "rtt_ms": 1.25,
             "facts": {"os": "Evil\u{1b}]0;pwned\u{7}OS", "arch": "x86_64", "uptime_s": 90000, "load": [0.5, 0.1, 0.0]}},
            {"name": "db-1", "connected": false, "labels": {}},
        ]});
        let table = super::agents_table(&list);
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "{table:?}"
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[1].starts_with("web-1 "),
            "{table}"
        );
        assert!(
            lines[1].contains("online") && lines[1].contains("1d") && lines[1].contains("1.2ms")
        );
        assert!(
            lines[2].starts_with("db-1") && lines[2].contains("offline"),
            "{table}"
        );
        assert_eq!(
            lines[1].find("online"),
            lines[2].find("offline"),
            "columns align"
        );
    }
}
