//! The agents a server reaches, declared in a TOML file (`--agents-file`):
//! one `[[agents]]` table each, with its `name`, `addr` (`HOST:PORT`), its
//! own `key_file` and `labels`. Labels come from this file only, so an
//! agent cannot grant itself labels that a policy could trust. Relative
//! key paths are taken from the file's own directory.
//!
//! ```toml
//! [[agents]]
//! name = "web-1"
//! addr = "10.0.0.11:7070"
//! key_file = "keys/web-1.key"
//! labels = { role = "web", env = "prod" }
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

/// Whether `name` may name an agent: 1 to 64 letters, digits, `.`, `_`, `-`.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
        if !valid_name(&name) {
            return Err(invalid(format!(
                "agent name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("agent {name:?} is declared twice")));
        }
        let Some(addr) = entry.addr else {
            return Err(invalid(format!(
                "agent {name:?} has no addr: agents that dial in are not supported yet"
            )));
        };
        let key_file = base.join(&entry.key_file);
        let key = Key::load_with(&key_file, allow_weak_keys)?;
        let security = if entry.insecure_plaintext {
            tracing::warn!(agent = %name, %addr, "insecure_plaintext: this agent's link is not encrypted");
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
