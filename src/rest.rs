//! The REST API's vocabulary for commands: the answers of
//! `POST /api/v1/exec`, shared by the server (`server::api`) and the
//! client (`conch exec`), so that the two ends cannot drift apart.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::vocab::ExitStatus;

/// How output bytes are written in a JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Encoding {
    /// The text, decoded from the requested encoding.
    #[serde(rename = "utf-8")]
    Utf8,
    /// The raw bytes, base64 (standard alphabet, padded).
    Base64,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Its name on the wire and in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The buffered answer: the exit status and the output, whole or cut at
/// `max_output_bytes` (then the stream's `*_truncated` is true).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct ExecResult {
    #[serde(flatten)]
    pub(crate) exit: WireExit,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) encoding: Encoding,
    pub(crate) stdout_truncated: bool,
    pub(crate) stderr_truncated: bool,
}

// [`ExitStatus`] with the REST API's field name for the code.
/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct WireExit {
    /// The exit code, when the process exited.
    #[schema(required = true)]
    pub(crate) exit_code: Option<i32>,
    /// The signal that killed it, by name without `SIG` (`"KILL"`), or its
    /// number as text when it has no name.
    #[schema(value_type = Option<String>, required = true, example = "KILL")]
    pub(crate) signal: Option<crate::vocab::SignalNumber>,
    /// Killed because its `timeout_ms` ran out (and only then).
    pub(crate) timed_out: bool,
    pub(crate) duration_ms: u64,
}

impl From<ExitStatus> for WireExit {
    fn from(e: ExitStatus) -> WireExit {
        WireExit {
            exit_code: e.code,
            signal: e.signal,
            timed_out: e.timed_out,
            duration_ms: e.duration_ms,
        }
    }
}

impl From<WireExit> for ExitStatus {
    fn from(e: WireExit) -> ExitStatus {
        ExitStatus {
            code: e.exit_code,
            signal: e.signal,
            timed_out: e.timed_out,
            duration_ms: e.duration_ms,
        }
    }
}

/// One line of a streamed (NDJSON) answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum StreamLine {
    /// A chunk of output, as it came.
    Output {
        stream: Stream,
        data: String,
        /// Present (`base64`) only for a chunk that is not text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false)]
        encoding: Option<Encoding>,
    },
    /// `max_output_bytes` of this stream were sent; the rest is dropped
    /// (the command runs on). Sent once per stream.
    Truncated { truncated: Stream, limit: u64 },
    /// The last line when the command ended.
    Exit {
        #[serde(flatten)]
        exit: WireExit,
        stdout_truncated: bool,
        stderr_truncated: bool,
    },
    /// The last line when the command could not run to its end (the agent
    /// refused it or was lost, or the server is shutting down).
    Error { error: String },
}

/// How one host of a fanned-out command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HostStatus {
    /// The command exited 0.
    Ok,
    /// The command ran and exited non-zero, was killed or timed out, or
    /// the agent (or a limit) refused it.
    Failed,
    /// The agent was offline, or its link was lost while the command ran.
    Unreachable,
}

/// One host's part of a buffered fan-out answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct HostResult {
    pub(crate) agent: String,
    pub(crate) status: HostStatus,
    /// The command's result, when it ran to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) result: Option<ExecResult>,
    /// Why there is no result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) error: Option<String>,
}

/// Counts of a fan-out's hosts by how they did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct Summary {
    pub(crate) total: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) unreachable: u64,
}

impl Summary {
    pub(crate) fn count(&mut self, status: HostStatus) {
        self.total += 1;
        match status {
            HostStatus::Ok => self.ok += 1,
            HostStatus::Failed => self.failed += 1,
            HostStatus::Unreachable => self.unreachable += 1,
        }
    }
}

/// The buffered answer to a command with a `target`: one result per
/// matching host, in name order, and the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct FanoutResult {
    pub(crate) results: Vec<HostResult>,
    pub(crate) summary: Summary,
}

/// One line of a streamed fan-out: a host's line (as for one host, plus
/// its `agent`, and its `status` on its last line), or the final summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum FanoutLine {
    Summary {
        summary: Summary,
    },
    Host {
        agent: String,
        #[serde(flatten)]
        line: StreamLine,
        /// On the host's last line (its `exit` or `error`) only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(nullable = false)]
        status: Option<HostStatus>,
    },
}

impl HostStatus {
    /// `ok` for exit code 0, else `failed`.
    pub(crate) fn of(exit: &ExitStatus) -> HostStatus {
        if exit.code == Some(0) && !exit.timed_out {
            HostStatus::Ok
        } else {
            HostStatus::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lines_read_back_as_written() {
        let lines = [
            StreamLine::Output {
                stream: Stream::Stdout,
                data: "hi\n".into(),
                encoding: None,
            },
            StreamLine::Output {
                stream: Stream::Stderr,
                data: "/w==".into(),
                encoding: Some(Encoding::Base64),
            },
            StreamLine::Truncated {
                truncated: Stream::Stdout,
                limit: 10,
            },
            StreamLine::Exit {
                exit: WireExit {
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false,
                    duration_ms: 7,
                },
                stdout_truncated: true,
                stderr_truncated: false,
            },
            StreamLine::Error {
                error: "lost".into(),
            },
        ];
        for line in lines {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(
                serde_json::from_str::<StreamLine>(&text).unwrap(),
                line,
                "{text}"
            );
            let host = FanoutLine::Host {
                agent: "web-1".into(),
                line: line.clone(),
                status: Some(HostStatus::Failed),
            };
            let text = serde_json::to_string(&host).unwrap();
            assert_eq!(
                serde_json::from_str::<FanoutLine>(&text).unwrap(),
                host,
                "{text}"
            );
        }
        let summary = FanoutLine::Summary {
            summary: Summary {
                total: 3,
                ok: 1,
                failed: 1,
                unreachable: 1,
            },
        };
        let text = serde_json::to_string(&summary).unwrap();
        assert_eq!(serde_json::from_str::<FanoutLine>(&text).unwrap(), summary);
    }
}
