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
        }
    }
}
