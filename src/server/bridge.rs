//! What a command's channel events mean to the server's two edges, the
//! console's WebSocket (`ws`) and the REST API (`api`): one reading of the
//! agent's events, so that both answer the same way when a command writes,
//! ends, is refused, loses its agent or is cut off by a shutdown.
//!
//! Credit is the edge's business: the buffered REST answer returns it as it
//! stores the output, the streamed one as the client reads, the console as
//! the page acknowledges what it has drawn.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::metrics::Outcome;
use crate::link::{Channel, Event};
use crate::rest::Stream;
use crate::vocab::{ErrorCode, ExitStatus};

/// The next thing an edge has to pass on.
#[derive(Debug)]
pub(crate) enum Update {
    /// Output, never empty.
    Output(Stream, Bytes),
    /// An error about the command that does not end it (its input was
    /// closed, say).
    Notice { code: ErrorCode, message: String },
    /// The command ended; nothing follows.
    Exit(ExitStatus),
    /// The command could not run to its end; nothing follows.
    Failed(Failure),
    /// The channel is attached to this session (the console's shells).
    Session(String),
    /// The channel left its session, which goes on; nothing follows.
    Detached(String),
    /// A watcher's terminal is now this size (the writer's).
    Resized { cols: u16, rows: u16 },
}

/// Why a command ended without an exit status.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The agent refused it.
    Refused { code: ErrorCode, message: String },
    /// The link to the agent was lost.
    Lost,
    /// The server is shutting down (the command is killed as its channel
    /// is dropped).
    ShuttingDown,
}

impl Failure {
    /// The error code the console sends. (The console never asks with a
    /// shutdown token of its own, so it never sees `ShuttingDown`; the
    /// code is there for completeness.)
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Failure::Refused { code, .. } => code.clone(),
            Failure::Lost => ErrorCode::AgentLost,
            Failure::ShuttingDown => ErrorCode::AgentUnavailable,
        }
    }

    /// What it says, naming the agent.
    pub(crate) fn describe(&self, agent: &str) -> String {
        match self {
            Failure::Refused { code, message } => {
                format!("agent {agent:?} refused the command ({code}): {message}")
            }
            Failure::Lost => {
                format!("the connection to agent {agent:?} was lost; the command is gone")
            }
            Failure::ShuttingDown => "the server is shutting down; the command was killed".into(),
        }
    }
}

/// The next update of `channel`; an edge stops asking after an `Exit` or
/// a `Failed`. A shutdown comes first: it also takes the agent link down, and the
/// client should hear the cause, not the symptom.
pub(crate) async fn next(channel: &mut Channel, shutdown: &CancellationToken) -> Update {
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Update::Failed(Failure::ShuttingDown),
            e = channel.next() => e,
        };
        if let Some(update) = meaning(event) {
            return counted(update);
        }
    }
}

/// An update that has already arrived, if any, without waiting: an edge
/// passing output on can take what came meanwhile with it, in one message
/// instead of one per frame. `None` when nothing is waiting (or the channel
/// has ended).
pub(crate) fn ready(channel: &mut Channel) -> Option<Update> {
    loop {
        if let Some(update) = meaning(Some(channel.try_next()?)) {
            return Some(counted(update));
        }
    }
}

/// Every edge reads its commands through [`next`] and [`ready`]: the one
/// place to count them.
fn counted(update: Update) -> Update {
    match &update {
        Update::Output(_, bytes) => super::metrics::output(bytes.len()),
        Update::Exit(status) => super::metrics::finished(if status.timed_out {
            Outcome::timed_out
        } else if status.signal.is_some() {
            Outcome::signal
        } else if status.code == Some(0) {
            Outcome::exit_zero
        } else {
            Outcome::exit_nonzero
        }),
        Update::Failed(Failure::Refused { .. }) => super::metrics::finished(Outcome::refused),
        Update::Failed(Failure::Lost) => super::metrics::finished(Outcome::lost),
        Update::Failed(Failure::ShuttingDown) => super::metrics::finished(Outcome::shut_down),
        Update::Notice { .. }
        | Update::Session(_)
        | Update::Detached(_)
        | Update::Resized { .. } => {}
    }
    update
}

/// What an event means to an edge; `None` for one it passes over.
fn meaning(event: Option<Event>) -> Option<Update> {
    Some(match event {
        Some(Event::Stdout(b) | Event::Stderr(b) | Event::Snapshot(b)) if b.is_empty() => {
            return None;
        }
        // Only transfer channels (never bridged) describe files.
        Some(Event::File(_)) => return None,
        // The redraw is terminal output like any other to the edges.
        Some(Event::Stdout(b) | Event::Snapshot(b)) => Update::Output(Stream::Stdout, b),
        Some(Event::Stderr(b)) => Update::Output(Stream::Stderr, b),
        Some(Event::Exit(status)) => Update::Exit(status),
        Some(Event::Error { code, message }) if code.is_refusal() => {
            Update::Failed(Failure::Refused { code, message })
        }
        Some(Event::Error { code, message }) => Update::Notice { code, message },
        Some(Event::Lost) | None => Update::Failed(Failure::Lost),
        Some(Event::Session(id)) => Update::Session(id),
        Some(Event::Detached(reason)) => Update::Detached(reason),
        Some(Event::Resize { cols, rows }) => Update::Resized { cols, rows },
    })
}
