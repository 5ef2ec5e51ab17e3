//! The server's registry of named agents and their connections.
//!
//! An agent the server dials (its spec has an `addr`) has a supervisor task
//! that keeps one [`AgentLink`] up: it connects, waits for the link to drop,
//! and reconnects with exponential backoff. An agent that dials in (no
//! `addr`) gets its link from the agent listener ([`super::agent_listener`])
//! whenever it connects and proves its name. Handlers borrow the current
//! link; when there is none, they fail at once with a clear error instead
//! of waiting. The set of agents can change while the server runs (the
//! agents file is reread): [`Registry::reload`] starts, stops and updates
//! entries without touching the links of agents whose spec did not change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::keyfile::Key;
use crate::link::{AgentLink, Security};
use crate::protocol::HostFacts;
use crate::selector::Selector;

/// First and longest wait between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How one agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    pub name: String,
    /// `HOST:PORT` the server dials (host names are resolved at each
    /// attempt); `None` for an agent that dials in.
    pub addr: Option<String>,
    pub key: Key,
    /// TLS, or (`--insecure-plaintext`) plain TCP.
    pub security: Security,
    /// From the agents file only: an agent cannot give itself labels.
    pub labels: BTreeMap<String, String>,
}

/// What the API and the page show about an agent.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[cfg_attr(test, derive(ts_rs::TS))]
pub(crate) struct AgentStatus {
    pub(crate) name: String,
    /// `HOST:PORT` the server dials; absent for an agent that dials in.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(optional))]
    pub(crate) addr: Option<String>,
    /// Whether the agent connects to the server (`--agent-listen`).
    pub(crate) dials_in: bool,
    pub(crate) connected: bool,
    /// The agent's labels, from the server's agents file.
    pub(crate) labels: BTreeMap<String, String>,
    /// When the current connection came up (RFC 3339), while connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(optional))]
    pub(crate) connected_since: Option<String>,
    /// When the agent was last heard from (RFC 3339); absent if never.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(optional))]
    pub(crate) last_seen: Option<String>,
    /// Round-trip time of the last ping, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(optional))]
    pub(crate) rtt_ms: Option<f64>,
    /// What the agent last said about its host.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(test, ts(optional))]
    pub(crate) facts: Option<HostFacts>,
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

/// Why an agent that dialed in is not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error("no agent named {0:?} is declared in the agents file")]
    Unknown(String),
    #[error("agent {0:?} is one the server dials (it has an addr), not one that dials in")]
    DialedOut(String),
}

/// How agent links behave.
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    /// A link silent this long is lost (`--agent-dead-after`).
    pub dead_after: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            dead_after: crate::link::DEFAULT_DEAD_AFTER,
        }
    }
}

/// What an agent that dials in must prove, and the entry it was read from.
pub(crate) struct Claim {
    pub(crate) key: Key,
    pub(crate) security: Security,
    /// The entry's: a link is taken only while the same entry stands (a
    /// reload that changed the key or transport meanwhile refuses it).
    stop: CancellationToken,
}

impl Claim {
    /// A claim no agent can prove (for names that are not agents that
    /// dial in), so that they fail as a wrong key does.
    pub(crate) fn throwaway(security: Security) -> Claim {
        Claim {
            key: Key::generate(),
            security,
            stop: CancellationToken::new(),
        }
    }
}

struct Entry {
    spec: AgentSpec,
    /// Shared with the entry that replaces this one when only its labels
    /// change, so that a link being installed meanwhile lands in both.
    link: Arc<RwLock<Option<AgentLink>>>,
    /// When the last link went away (for `last_seen` while offline).
    seen: Arc<Mutex<Option<SystemTime>>>,
    /// Stops this entry's supervisor, or drops its dialed-in link, when it
    /// is removed or replaced.
    stop: CancellationToken,
}

impl Entry {
    fn current(&self) -> Option<AgentLink> {
        self.link
            .read()
            .ok()
            .and_then(|l| l.clone())
            .filter(AgentLink::is_connected)
    }
}

/// The agents this server knows, by name.
#[derive(Clone)]
pub(crate) struct Registry {
    entries: Arc<RwLock<BTreeMap<String, Arc<Entry>>>>,
    /// Bumped on every connect, disconnect and reload, so pages can refresh.
    changes: watch::Sender<u64>,
    options: LinkOptions,
    shutdown: CancellationToken,
}

fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Registry {
    /// Builds the registry and starts one supervisor per agent it dials.
    pub(crate) fn start(
        specs: Vec<AgentSpec>,
        options: LinkOptions,
        shutdown: CancellationToken,
    ) -> Registry {
        let (changes, _) = watch::channel(0);
        let registry = Registry {
            entries: Arc::default(),
            changes,
            options,
            shutdown,
        };
        registry.reload(specs);
        registry
    }

    /// Makes the registry hold exactly `specs`: new agents are started,
    /// removed ones stopped (their links closed, their commands ending
    /// with `agent_lost`), changed ones restarted; an agent whose spec did
    /// not change keeps its link. Returns the names added, changed, removed.
    pub(crate) fn reload(&self, specs: Vec<AgentSpec>) -> (usize, usize, usize) {
        let (mut added, mut changed, mut removed) = (0, 0, 0);
        let mut starts = Vec::new();
        {
            let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
            let wanted: BTreeMap<String, AgentSpec> =
                specs.into_iter().map(|s| (s.name.clone(), s)).collect();
            entries.retain(|name, entry| {
                let keep = wanted.contains_key(name);
                if !keep {
                    removed += 1;
                    entry.stop.cancel();
                }
                keep
            });
            for (name, spec) in wanted {
                if let Some(old) = entries.get(&name) {
                    if old.spec == spec {
                        continue;
                    }
                    // Labels alone changed: keep the link, change the spec.
                    let same_link = old.spec.addr == spec.addr
                        && old.spec.key == spec.key
                        && old.spec.security == spec.security;
                    changed += 1;
                    if same_link {
                        let entry = Arc::new(Entry {
                            spec,
                            link: old.link.clone(),
                            seen: old.seen.clone(),
                            stop: old.stop.clone(),
                        });
                        entries.insert(name, entry);
                        continue;
                    }
                    old.stop.cancel();
                } else {
                    added += 1;
                }
                let entry = Arc::new(Entry {
                    spec,
                    link: Arc::default(),
                    seen: Arc::default(),
                    stop: self.shutdown.child_token(),
                });
                if entry.spec.addr.is_some() {
                    starts.push(entry.clone());
                }
                entries.insert(name, entry);
            }
        }
        for entry in starts {
            tokio::spawn(self.clone().supervise(entry));
        }
        self.changes.send_modify(|n| *n += 1);
        (added, changed, removed)
    }

    async fn supervise(self, entry: Arc<Entry>) {
        let Some(addr) = entry.spec.addr.clone() else {
            return;
        };
        let name = entry.spec.name.clone();
        let stop = entry.stop.clone();
        let mut backoff = BACKOFF_MIN;
        let mut logged_failure = false;
        loop {
            let attempt = tokio::select! {
                r = AgentLink::dial(addr.as_str(), &entry.spec.key, entry.spec.security, Some(&name), self.options.dead_after) => r,
                _ = stop.cancelled() => return,
            };
            match attempt {
                Ok(link) => {
                    info!(agent = %name, %addr, "agent connected");
                    self.hold(&name, &stop, link).await;
                    if stop.is_cancelled() {
                        return;
                    }
                    warn!(agent = %name, "agent connection lost; reconnecting");
                    backoff = BACKOFF_MIN;
                    logged_failure = false;
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
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Installs `link` as the agent's (in whichever entry now holds the
    /// name under the same `stop`), and waits until it is lost or the entry
    /// is stopped; then clears it, unless a newer link replaced it.
    async fn hold(&self, name: &str, stop: &CancellationToken, link: AgentLink) {
        let slot = |registry: &Registry| {
            registry
                .entries
                .read()
                .ok()
                .and_then(|e| e.get(name).cloned())
                .filter(|e| e.stop == *stop)
        };
        let Some(entry) = slot(self) else {
            link.shutdown();
            return;
        };
        let old = entry
            .link
            .write()
            .ok()
            .and_then(|mut l| l.replace(link.clone()));
        if let Some(old) = old {
            old.shutdown();
        }
        self.changes.send_modify(|n| *n += 1);
        // Once more when the host's facts are known (its OS is shown).
        tokio::select! {
            _ = link.facts_known() => self.changes.send_modify(|n| *n += 1),
            _ = link.lost() => {}
            _ = stop.cancelled() => {}
        }
        tokio::select! {
            _ = link.lost() => {}
            _ = stop.cancelled() => link.shutdown(),
        }
        // The entry may have been swapped (labels changed) meanwhile.
        if let Some(entry) = slot(self) {
            if let Ok(mut l) = entry.link.write()
                && l.as_ref().is_some_and(|l| l.same(&link))
            {
                *l = None;
            }
            *entry.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// What the agent `name` must prove, for one that dials in.
    pub(crate) fn dial_in_key(&self, name: &str) -> Result<Claim, ClaimError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let entry = entries
            .get(name)
            .ok_or_else(|| ClaimError::Unknown(name.to_owned()))?;
        if entry.spec.addr.is_some() {
            return Err(ClaimError::DialedOut(name.to_owned()));
        }
        Ok(Claim {
            key: entry.spec.key.clone(),
            security: entry.spec.security,
            stop: entry.stop.clone(),
        })
    }

    /// Takes the link of an agent that dialed in (from `peer`) and proved
    /// `name` as `claim` asked: it replaces any link that name had, and is
    /// held until lost.
    pub(crate) async fn attach(
        &self,
        name: &str,
        claim: Claim,
        link: AgentLink,
        peer: std::net::SocketAddr,
    ) {
        let stop = claim.stop;
        {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            // The file may have changed during the handshake: the entry
            // that gave the key must still stand.
            if !entries.get(name).is_some_and(|e| e.stop == stop) {
                link.shutdown();
                return;
            }
        }
        let replacing = self.entry(name).and_then(|e| e.current()).is_some();
        info!(agent = %name, %peer, replacing, "agent dialed in");
        self.hold(name, &stop, link).await;
        if !stop.is_cancelled() {
            warn!(agent = %name, "dialed-in agent disconnected");
        }
    }

    /// The link options, for the agent listener.
    pub(crate) fn options(&self) -> LinkOptions {
        self.options
    }

    fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.read().ok()?.get(name).cloned()
    }

    /// The name of the agent `name` (or of the only agent when `name` is
    /// `None`), if there is such an agent.
    pub(crate) fn resolve(&self, name: Option<&str>) -> Result<String, AgentError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match name {
            Some(name) if entries.contains_key(name) => Ok(name.to_owned()),
            Some(name) => Err(AgentError::Unknown(name.into())),
            None if entries.len() == 1 => {
                entries.keys().next().cloned().ok_or(AgentError::Ambiguous)
            }
            None => Err(AgentError::Ambiguous),
        }
    }

    /// The link to the agent `name` (or the only agent when `name` is `None`).
    pub(crate) fn link(&self, name: Option<&str>) -> Result<(String, AgentLink), AgentError> {
        let entry = match name {
            Some(name) => self
                .entry(name)
                .ok_or_else(|| AgentError::Unknown(name.into()))?,
            None => {
                let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
                if entries.len() != 1 {
                    return Err(AgentError::Ambiguous);
                }
                entries
                    .values()
                    .next()
                    .cloned()
                    .ok_or(AgentError::Ambiguous)?
            }
        };
        let name = entry.spec.name.clone();
        match entry.current() {
            Some(link) => Ok((name, link)),
            None => Err(AgentError::Unavailable(name)),
        }
    }

    /// Every agent's name, in name order.
    pub(crate) fn names(&self) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.keys().cloned().collect()
    }

    /// The names of the agents `selector` matches, in name order.
    pub(crate) fn select(&self, selector: &Selector) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .values()
            .filter(|e| selector.matches(&e.spec.name, &e.spec.labels))
            .map(|e| e.spec.name.clone())
            .collect()
    }

    /// Whether the agent `name` exists and `selector` matches it.
    pub(crate) fn matches(&self, name: &str, selector: &Selector) -> bool {
        self.entry(name)
            .is_some_and(|e| selector.matches(&e.spec.name, &e.spec.labels))
    }

    /// Every agent and its state.
    pub(crate) fn statuses(&self) -> Vec<AgentStatus> {
        let entries: Vec<Arc<Entry>> = self
            .entries
            .read()
            .map(|e| e.values().cloned().collect())
            .unwrap_or_default();
        entries.iter().map(|e| status(e)).collect()
    }

    /// Whether every agent is connected (for `/readyz`).
    pub(crate) fn all_connected(&self) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.values().all(|e| e.current().is_some())
    }

    /// A receiver that changes whenever an agent connects or disconnects.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn status(e: &Entry) -> AgentStatus {
    let link = e.current();
    let health = link.as_ref().map(AgentLink::health);
    let last_seen = match &health {
        Some(h) => Some(h.last_seen),
        None => *e.seen.lock().unwrap_or_else(|e| e.into_inner()),
    };
    AgentStatus {
        name: e.spec.name.clone(),
        addr: e.spec.addr.clone(),
        dials_in: e.spec.addr.is_none(),
        connected: link.is_some(),
        labels: e.spec.labels.clone(),
        connected_since: health.as_ref().map(|h| rfc3339(h.connected_since)),
        last_seen: last_seen.map(rfc3339),
        rtt_ms: health
            .as_ref()
            .and_then(|h| h.rtt)
            .map(|d| (d.as_secs_f64() * 1e5).round() / 100.0),
        facts: health.and_then(|h| h.facts),
    }
}
