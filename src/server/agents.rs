//! The server's registry of named agents and their connections.
//!
//! Each agent has a supervisor task that keeps one [`AgentLink`] up: it
//! connects, waits for the link to drop, and reconnects with exponential
//! backoff. Handlers borrow the current link; when there is none, they fail
//! at once with a clear error instead of waiting. Today the registry holds
//! one agent (`local` or the configured one); more are a matter of
//! configuration, not of design.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::keyfile::Key;
use crate::link::AgentLink;

/// First and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How one agent is reached.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    /// `HOST:PORT`; host names are resolved at each connection attempt.
    pub addr: String,
    pub key: Key,
    /// TLS, or (`--insecure-plaintext`) plain TCP.
    pub security: crate::link::Security,
    /// From the agents file only: an agent cannot give itself labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What the API and the page show about an agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub(crate) struct AgentStatus {
    pub(crate) name: String,
    /// `HOST:PORT` the server dials.
    pub(crate) addr: String,
    pub(crate) connected: bool,
    /// The agent's labels, from the server's agents file.
    pub(crate) labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error("no agent named {0:?}")]
    Unknown(String),
    #[error("agent {0:?} is not connected; conch is retrying, try again shortly")]
    Unavailable(String),
    #[error("several agents are configured; name one")]
    Ambiguous,
}

struct Entry {
    spec: AgentSpec,
    link: RwLock<Option<AgentLink>>,
}

/// The agents this server knows, by name.
#[derive(Clone)]
pub(crate) struct Registry {
    entries: Arc<BTreeMap<String, Entry>>,
    /// Bumped on every connect and disconnect, so pages can refresh.
    changes: watch::Sender<u64>,
}

impl Registry {
    /// Builds the registry and starts one supervisor per agent.
    pub(crate) fn start(specs: Vec<AgentSpec>, shutdown: CancellationToken) -> Registry {
        let entries = specs
            .into_iter()
            .map(|spec| {
                let name = spec.name.clone();
                (
                    name,
                    Entry {
                        spec,
                        link: RwLock::new(None),
                    },
                )
            })
            .collect();
        let (changes, _) = watch::channel(0);
        let registry = Registry {
            entries: Arc::new(entries),
            changes,
        };
        for name in registry.entries.keys() {
            tokio::spawn(registry.clone().supervise(name.clone(), shutdown.clone()));
        }
        registry
    }

    async fn supervise(self, name: String, shutdown: CancellationToken) {
        let Some(entry) = self.entries.get(&name) else {
            return;
        };
        let mut backoff = BACKOFF_MIN;
        let mut logged_failure = false;
        loop {
            let attempt = tokio::select! {
                r = AgentLink::connect_with(entry.spec.addr.as_str(), &entry.spec.key, entry.spec.security) => r,
                _ = shutdown.cancelled() => return,
            };
            match attempt {
                Ok(link) => {
                    self.set(entry, Some(link.clone()));
                    info!(agent = %name, addr = %entry.spec.addr, "agent connected");
                    backoff = BACKOFF_MIN;
                    logged_failure = false;
                    tokio::select! {
                        _ = link.lost() => {}
                        _ = shutdown.cancelled() => {
                            link.shutdown();
                            self.set(entry, None);
                            return;
                        }
                    }
                    warn!(agent = %name, "agent connection lost; reconnecting");
                    self.set(entry, None);
                }
                Err(e) => {
                    // Log the first failure of a run at warn, the rest at debug,
                    // so that an agent that is down does not flood the log.
                    if logged_failure {
                        tracing::debug!(agent = %name, error = %e, "agent still unreachable");
                    } else {
                        warn!(agent = %name, error = %e, "agent unreachable; retrying with backoff");
                        logged_failure = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn set(&self, entry: &Entry, link: Option<AgentLink>) {
        if let Ok(mut slot) = entry.link.write() {
            *slot = link;
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// The link to the agent `name` (or the only agent when `name` is `None`).
    pub(crate) fn link(&self, name: Option<&str>) -> Result<(String, AgentLink), AgentError> {
        let entry = match name {
            Some(name) => self
                .entries
                .get(name)
                .ok_or_else(|| AgentError::Unknown(name.into()))?,
            None if self.entries.len() == 1 => {
                self.entries.values().next().ok_or(AgentError::Ambiguous)?
            }
            None => return Err(AgentError::Ambiguous),
        };
        let name = entry.spec.name.clone();
        let link = entry.link.read().ok().and_then(|l| l.clone());
        match link {
            Some(link) if link.is_connected() => Ok((name, link)),
            _ => Err(AgentError::Unavailable(name)),
        }
    }

    /// Every agent and whether it is connected.
    pub(crate) fn statuses(&self) -> Vec<AgentStatus> {
        self.entries
            .values()
            .map(|e| AgentStatus {
                name: e.spec.name.clone(),
                addr: e.spec.addr.clone(),
                labels: e.spec.labels.clone(),
                connected: e
                    .link
                    .read()
                    .ok()
                    .and_then(|l| l.as_ref().map(AgentLink::is_connected))
                    .unwrap_or(false),
            })
            .collect()
    }

    /// Whether every agent is connected (for `/readyz`).
    pub(crate) fn all_connected(&self) -> bool {
        self.statuses().iter().all(|s| s.connected)
    }

    /// A receiver that changes whenever an agent connects or disconnects.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
