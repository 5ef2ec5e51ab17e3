//! The agents a server reaches, declared in a TOML file (`--agents-file`):
//! one `[[agents]]` table each, with its `name`, its own `key_file`,
//! `labels`, and `addr` (`HOST:PORT`) for an agent the server dials; an
//! agent without `addr` dials in (`conch agent --connect`). Labels come
//! from this file only, so an agent cannot grant itself labels that a
//! policy could trust. Relative key paths are taken from the file's own
//! directory. The file is reread when it changes and on SIGHUP; a version
//! that does not load is logged and the agents stay as they were.
//!
//! ```toml
//! [[agents]]
//! name = "web-1"
//! addr = "10.0.0.11:7070"
//! key_file = "keys/web-1.key"
//! labels = { role = "web", env = "prod" }
//!
//! [[agents]]            # behind NAT: it dials in
//! name = "edge-7"
//! key_file = "keys/edge-7.key"
//! labels = { role = "edge" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::agents::AgentSpec;
use crate::keyfile::{Key, KeyError};
use crate::link::Security;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentsFile {
    #[serde(default)]
    agents: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    addr: Option<String>,
    key_file: PathBuf,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Plain TCP to this agent (it must run with `--insecure-plaintext`).
    #[serde(default)]
    insecure_plaintext: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentsFileError {
    #[error("cannot read the agents file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agents file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Reads the file and every agent's key; the first problem stops it, with
/// the entry it is about.
pub fn load(path: &Path, allow_weak_keys: bool) -> Result<Vec<AgentSpec>, AgentsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |message: String| AgentsFileError::Invalid {
        path: path.to_owned(),
        message,
    };
    let file: AgentsFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.agents.is_empty() {
        return Err(invalid("it declares no [[agents]]".into()));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut specs = Vec::with_capacity(file.agents.len());
    for entry in file.agents {
        let name = entry.name;
        if !crate::vocab::valid_agent_name(&name) {
            return Err(invalid(format!(
                "agent name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("agent {name:?} is declared twice")));
        }
        let addr = entry.addr;
        let key_file = base.join(&entry.key_file);
        let key = Key::load_with(&key_file, allow_weak_keys)?;
        let security = if entry.insecure_plaintext {
            tracing::warn!(agent = %name, "insecure_plaintext: this agent's link is not encrypted");
            Security::Plaintext
        } else {
            Security::Tls
        };
        specs.push(AgentSpec {
            name,
            addr,
            key,
            security,
            labels: entry.labels,
        });
    }
    Ok(specs)
}

/// How often the file's modification time is looked at.
const POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The file's identity for change detection: modification time and size.
fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Rereads `path` into `registry` when it changes and on SIGHUP, until
/// `shutdown`. A file that does not load leaves the agents as they were.
pub(crate) async fn watch(
    path: PathBuf,
    allow_weak_keys: bool,
    registry: super::agents::Registry,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut last = stamp(&path);
    loop {
        let sighup = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = sighup => true,
            _ = tokio::time::sleep(POLL) => false,
            _ = shutdown.cancelled() => return,
        };
        let now = stamp(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        match load(&path, allow_weak_keys) {
            Ok(specs) => {
                let (added, changed, removed) = registry.reload(specs);
                tracing::info!(path = %path.display(), added, changed, removed, "agents file reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "the agents file was not reloaded; the agents stay as they were")
            }
        }
    }
}
