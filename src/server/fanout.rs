//! One command on many hosts (`POST /api/v1/exec` with a `target`).
//!
//! Every host the selector matches gets the command, at most `concurrency`
//! at once (default: all). Each host is checked by the policy, admitted by
//! the quota and run on its own channel exactly as a single command is; a
//! host that is offline, or whose link is lost mid-command, is reported as
//! `unreachable`, never skipped. The buffered answer holds one result per
//! host in name order and a summary; the streamed one interleaves the
//! hosts' lines as they come, each naming its agent, then the summary.
//!
//! Bounds: the request holds one of the API's command slots, and each host
//! a share of its agent (the quota); hosts beyond the user's command limit
//! wait their turn, since `concurrency` is capped by it. Streamed lines
//! go through a queue of 64, and a host returns its agent's credit only as
//! its lines are queued, so a client that reads slowly slows the hosts,
//! never the server's memory.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::State as AppState;
use super::api::{Capture, Prepared, StreamDecoder, encode_streams};
use super::bridge::{self, Failure, Update};
use super::policy::{self, Refused};
use crate::link::LinkError;
use crate::rest::{
    ExecResult, FanoutLine, FanoutResult, HostResult, HostStatus, Stream, StreamLine, Summary,
};
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Output kept per stream and host in a buffered fan-out unless the
/// request says otherwise: 64 KiB (every host's is held at once).
pub(crate) const DEFAULT_MAX_OUTPUT_PER_HOST: usize = 64 * 1024;

/// Streamed lines queued for the client from all hosts: 64.
const LINE_QUEUE: usize = 64;

/// A validated fan-out request.
pub(super) struct Fanout {
    pub(super) state: AppState,
    pub(super) who: super::auth::Principal,
    pub(super) prepared: Prepared,
    /// The matching hosts, in name order.
    pub(super) hosts: Vec<String>,
    pub(super) concurrency: Option<usize>,
    /// The client's address and what the audit log keeps of the command.
    pub(super) source: String,
    pub(super) detail: serde_json::Value,
}

/// Where a host's output goes.
enum Sink {
    /// Kept, for the buffered answer.
    Buffer,
    /// Sent on as NDJSON lines.
    Stream(mpsc::Sender<Bytes>),
}

/// What a host's run came to.
struct Outcome {
    status: HostStatus,
    result: Option<ExecResult>,
    error: Option<String>,
}

fn line(agent: &str, line: StreamLine, status: Option<HostStatus>) -> Bytes {
    let line = FanoutLine::Host {
        agent: agent.to_owned(),
        line,
        status,
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl Fanout {
    /// Runs the command on every host and answers: buffered or streamed.
    /// `held` (the request's command slot and output reservation) lasts
    /// until the answer is complete.
    pub(super) async fn respond(
        self,
        streaming: bool,
        held: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    ) -> Response {
        tracing::info!(user = %self.who.name, hosts = self.hosts.len(), "api exec on a target");
        let per_user = self.state.quota.per_user();
        let width = self
            .concurrency
            .unwrap_or(usize::MAX)
            .min(per_user)
            .min(self.hosts.len())
            .max(1);
        let gate = Arc::new(Semaphore::new(width));
        let run = Arc::new(self);
        if streaming {
            let (tx, mut rx) = mpsc::channel::<Bytes>(LINE_QUEUE);
            tokio::spawn(async move {
                let _held = held;
                let mut tasks = tokio::task::JoinSet::new();
                for (i, host) in run.hosts.iter().enumerate() {
                    let (run, gate, tx) = (run.clone(), gate.clone(), tx.clone());
                    let host = host.clone();
                    tasks.spawn(async move {
                        let _turn = gate.acquire_owned().await;
                        (i, run.host(&host, Sink::Stream(tx)).await.status)
                    });
                }
                let mut summary = Summary::default();
                while let Some(done) = tasks.join_next().await {
                    summary.count(done.map_or(HostStatus::Failed, |(_, s)| s));
                }
                let mut bytes =
                    serde_json::to_vec(&FanoutLine::Summary { summary }).unwrap_or_default();
                bytes.push(b'\n');
                let _ = tx.send(Bytes::from(bytes)).await;
            });
            let body = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx).map(|b| b.map(Ok::<_, Infallible>))
            });
            let mut response = Body::from_stream(body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            return response;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, host) in run.hosts.iter().enumerate() {
            let (run, gate) = (run.clone(), gate.clone());
            let host = host.clone();
            tasks.spawn(async move {
                let _turn = gate.acquire_owned().await;
                (i, run.host(&host, Sink::Buffer).await)
            });
        }
        let mut results: Vec<Option<HostResult>> = vec![None; run.hosts.len()];
        let mut summary = Summary::default();
        while let Some(done) = tasks.join_next().await {
            let Ok((i, outcome)) = done else { continue };
            summary.count(outcome.status);
            results[i] = Some(HostResult {
                agent: run.hosts[i].clone(),
                status: outcome.status,
                result: outcome.result,
                error: outcome.error,
            });
        }
        // A host whose task died (it cannot, short of a bug) is still told.
        let results = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.unwrap_or_else(|| {
                    summary.count(HostStatus::Failed);
                    HostResult {
                        agent: run.hosts[i].clone(),
                        status: HostStatus::Failed,
                        result: None,
                        error: Some("internal error".into()),
                    }
                })
            })
            .collect();
        let body = FanoutResult { results, summary };
        super::api::json_holding(serde_json::to_vec(&body).unwrap_or_default(), held)
    }

    /// Runs the command on one host.
    async fn host(&self, host: &str, sink: Sink) -> Outcome {
        if let Sink::Stream(tx) = &sink
            && tx.is_closed()
        {
            // The client went away while this host waited its turn.
            return Outcome {
                status: HostStatus::Failed,
                result: None,
                error: Some("the client went away before this host's turn".into()),
            };
        }
        let outcome = match self.start(host).await {
            Ok((channel, ticket, mut trail)) => {
                let outcome = self.drive(host, channel, &sink).await;
                drop(ticket);
                trail.note("host_status", host_status(outcome.status));
                match &outcome.error {
                    Some(error) => trail.end(None, Some(error)),
                    None => trail.end(None, None),
                }
                outcome
            }
            Err(refused) => refused,
        };
        if let Sink::Stream(tx) = &sink
            && outcome.result.is_none()
        {
            let error = StreamLine::Error {
                error: outcome.error.clone().unwrap_or_default(),
            };
            let _ = tx.send(line(host, error, Some(outcome.status))).await;
        }
        outcome
    }

    /// The policy, the quota and the channel for `host`.
    async fn start(
        &self,
        host: &str,
    ) -> Result<
        (
            crate::link::Channel,
            super::quota::Ticket,
            crate::audit::CommandTrail,
        ),
        Outcome,
    > {
        let state = &self.state;
        let refuse = |status, error: String| {
            Err(Outcome {
                status,
                result: None,
                error: Some(error),
            })
        };
        let (agent, link) = match policy::link_to_run(&self.who, Some(host), &state.agents) {
            Ok(found) => found,
            Err(e @ Refused::Agent(_)) => return refuse(HostStatus::Unreachable, e.to_string()),
            Err(e) => {
                if let Ok(ip) = self.source.parse() {
                    super::api::audit_refusal(
                        state,
                        &self.who,
                        ip,
                        Some(host),
                        crate::audit::Kind::CommandStart,
                        &e,
                    );
                }
                return refuse(HostStatus::Failed, e.to_string());
            }
        };
        let ticket = match state
            .quota
            .admit(&self.who.name, &agent, link.info().max_channels)
        {
            Ok(t) => t,
            Err(e) => return refuse(HostStatus::Failed, e.to_string()),
        };
        // Recorded before the agent hears of it, as any command.
        let mut trail = crate::audit::CommandTrail::start(
            &state.audit,
            crate::audit::Event {
                kind: crate::audit::Kind::CommandStart,
                user: self.who.name.clone(),
                source: self.source.clone(),
                agent: agent.clone(),
                via: crate::audit::Via::Rest,
                detail: self.detail.clone(),
            },
        )
        .await;
        let channel = match link.exec(self.prepared.req.clone()).await {
            Ok(c) => c,
            Err(e) => {
                let status = match e {
                    LinkError::TooLarge { .. } => HostStatus::Failed,
                    _ => HostStatus::Unreachable,
                };
                trail.note("host_status", host_status(status));
                trail.end(None, Some(&e.to_string()));
                return refuse(status, format!("agent {agent:?}: {e}"));
            }
        };
        channel
            .controller()
            .stdin_to_end(self.prepared.stdin.clone());
        Ok((channel, ticket, trail))
    }

    /// Reads a host's command to its end into `sink`.
    async fn drive(&self, host: &str, mut channel: crate::link::Channel, sink: &Sink) -> Outcome {
        let p = &self.prepared;
        let cap = p.max_output.unwrap_or(DEFAULT_MAX_OUTPUT_PER_HOST);
        let (mut out, mut err) = (Capture::new(cap), Capture::new(cap));
        let mut dec_out = StreamDecoder::new(Stream::Stdout, p.encoding, p.max_output);
        let mut dec_err = StreamDecoder::new(Stream::Stderr, p.encoding, p.max_output);
        let gone = async {
            match sink {
                Sink::Stream(tx) => tx.closed().await,
                Sink::Buffer => std::future::pending().await,
            }
        };
        tokio::pin!(gone);
        loop {
            let update = tokio::select! {
                u = bridge::next(&mut channel, &self.state.shutdown) => u,
                // The client went away: dropping the channel kills the command.
                _ = &mut gone => {
                    return Outcome {
                        status: HostStatus::Failed,
                        result: None,
                        error: Some("the client went away".into()),
                    };
                }
            };
            match update {
                Update::Output(stream, bytes) => {
                    match sink {
                        Sink::Buffer => match stream {
                            Stream::Stdout => out.push(&bytes),
                            Stream::Stderr => err.push(&bytes),
                        },
                        Sink::Stream(tx) => {
                            let lines = match stream {
                                Stream::Stdout => dec_out.lines(&bytes),
                                Stream::Stderr => dec_err.lines(&bytes),
                            };
                            for l in lines {
                                // The client went away: dropping the
                                // channel kills the command.
                                if tx.send(line(host, l, None)).await.is_err() {
                                    return Outcome {
                                        status: HostStatus::Failed,
                                        result: None,
                                        error: Some("the client went away".into()),
                                    };
                                }
                            }
                        }
                    }
                    let _ = channel.window(bytes.len() as u64).await;
                }
                Update::Notice { .. } | Update::Session(_) | Update::Resized { .. } => {}
                // Fan-out opens no sessions: a detach cannot come.
                Update::Detached(_) => {
                    return Outcome {
                        status: HostStatus::Failed,
                        result: None,
                        error: Some("the command was detached".into()),
                    };
                }
                Update::Failed(failure) => {
                    let status = match failure {
                        Failure::Lost => HostStatus::Unreachable,
                        _ => HostStatus::Failed,
                    };
                    return Outcome {
                        status,
                        result: None,
                        error: Some(failure.describe(host)),
                    };
                }
                Update::Exit(exit) => {
                    let status = HostStatus::of(&exit);
                    if let Sink::Stream(tx) = sink {
                        let mut lines: Vec<StreamLine> = dec_out
                            .finish()
                            .into_iter()
                            .chain(dec_err.finish())
                            .collect();
                        lines.push(StreamLine::Exit {
                            exit: exit.into(),
                            stdout_truncated: dec_out.truncated,
                            stderr_truncated: dec_err.truncated,
                        });
                        let last = lines.len() - 1;
                        for (i, l) in lines.into_iter().enumerate() {
                            let _ = tx.send(line(host, l, (i == last).then_some(status))).await;
                        }
                    }
                    let (stdout, stderr, encoding) =
                        encode_streams(&out.data, &err.data, p.encoding);
                    return Outcome {
                        status,
                        result: Some(ExecResult {
                            exit: exit.into(),
                            stdout,
                            stderr,
                            encoding,
                            stdout_truncated: out.truncated,
                            stderr_truncated: err.truncated,
                        }),
                        error: None,
                    };
                }
            }
        }
    }
}

/// A host's outcome in the API's words (`ok`, `failed`, `unreachable`),
/// for its audit record.
fn host_status(status: HostStatus) -> serde_json::Value {
    serde_json::to_value(status).unwrap_or_default()
}
