//! Named API tokens with a role, stored hashed in the data directory.
//!
//! A token is 32 random bytes (`conch_` + 64 hex characters); only its
//! SHA-256 is stored, which is enough for a secret of that entropy and lets
//! lookups stay constant-time. `conch token create` and the admin endpoint
//! both write `tokens.json`; the server rereads it when it changes, so a
//! token made from the command line works without a restart.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::auth::{Principal, Role, Secret};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Hex SHA-256 of the token.
    pub(crate) sha256: String,
    /// Seconds since the Unix epoch.
    pub(crate) created: u64,
    /// A selector of the only agents the token may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) agents: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("a token named {0:?} exists already")]
    Exists(String),
    #[error("no token named {0:?}")]
    Missing(String),
    #[error("token names are 1-64 letters, digits, '-', '_' or '.'")]
    BadName,
    #[error("cannot use the token file {path}: {message}")]
    Store { path: String, message: String },
}

/// The token file and a cache of its contents.
pub struct TokenStore {
    path: Option<PathBuf>,
    /// Held across each read-modify-write, so that a concurrent create and
    /// revoke cannot undo each other. (`conch token` run by hand at the same
    /// moment as the admin endpoint is not covered: no file lock.)
    writing: Mutex<()>,
    cache: Mutex<(Option<SystemTime>, Vec<TokenRecord>)>,
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Creates `dir` (and its parents) readable by its owner only (0700); an
/// existing directory open to others is tightened, with a warning.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "the data directory was open to other users; making it 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl TokenStore {
    /// A store in `dir/tokens.json`, or only in memory without a directory.
    pub fn new(dir: Option<&Path>) -> TokenStore {
        if let Some(dir) = dir {
            crate::keyfile::warn_if_exposed(&dir.join("tokens.json"), "token file");
        }
        TokenStore {
            path: dir.map(|d| d.join("tokens.json")),
            writing: Mutex::new(()),
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn store_err(&self, message: impl ToString) -> TokenError {
        TokenError::Store {
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            message: message.to_string(),
        }
    }

    /// The records, reread from disk when the file changed.
    fn load(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        let Some(path) = &self.path else {
            return Ok(cache.1.clone());
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime.is_none() {
            *cache = (None, Vec::new());
        } else if mtime != cache.0 {
            let text = std::fs::read_to_string(path).map_err(|e| self.store_err(e))?;
            let records: Vec<TokenRecord> =
                serde_json::from_str(&text).map_err(|e| self.store_err(e))?;
            *cache = (mtime, records);
        }
        Ok(cache.1.clone())
    }

    fn save(&self, records: Vec<TokenRecord>) -> Result<(), TokenError> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        if let Some(path) = &self.path {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                create_private_dir(dir).map_err(|e| self.store_err(e))?;
            }
            // A fresh name, created exclusively and never through a
            // symbolic link: nobody can plant the file we write to.
            let mut suffix = [0u8; 8];
            rand::fill(&mut suffix);
            let tmp = path.with_extension(format!("json.{}.tmp", hex::encode(suffix)));
            let text = serde_json::to_vec_pretty(&records).map_err(|e| self.store_err(e))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| self.store_err(e))?;
            let written = file
                .write_all(&text)
                .and_then(|_| file.sync_all())
                .and_then(|_| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(self.store_err(e));
            }
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            *cache = (mtime, records);
        } else {
            cache.1 = records;
        }
        Ok(())
    }

    /// Creates a token; returns its secret value, shown this once only.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        agents: Option<&crate::selector::Selector>,
    ) -> Result<Secret, TokenError> {
        if !valid_name(name) {
            return Err(TokenError::BadName);
        }
        let _writing = self
            .writing
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        let mut records = self.load()?;
        if records.iter().any(|r| r.name == name) {
            return Err(TokenError::Exists(name.into()));
        }
        let token = Secret::new(format!("conch_{}", Secret::generate().expose()));
        let created = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        records.push(TokenRecord {
            name: name.into(),
            role,
            sha256: digest(token.expose()),
            created,
            agents: agents.map(ToString::to_string),
        });
        self.save(records)?;
        Ok(token)
    }

    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let _writing = self
            .writing
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        let mut records = self.load()?;
        let before = records.len();
        records.retain(|r| r.name != name);
        if records.len() == before {
            return Err(TokenError::Missing(name.into()));
        }
        self.save(records)
    }

    pub(crate) fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        self.load()
    }

    /// `conch token list`: a line per token, its name and role (never its
    /// secret), tab-separated.
    pub fn listing(&self) -> Result<String, TokenError> {
        Ok(self
            .list()?
            .iter()
            .map(|t| match &t.agents {
                Some(agents) => format!("{}\t{}\tagents={agents}\n", t.name, t.role.as_str()),
                None => format!("{}\t{}\n", t.name, t.role.as_str()),
            })
            .collect())
    }

    /// The principal a presented token stands for.
    pub(crate) fn authenticate(&self, token: &str) -> Option<Principal> {
        let given = digest(token);
        let records = self.load().ok()?;
        // Compare against every record in constant time each.
        let mut found = None;
        for r in &records {
            if super::auth::subtle_eq(r.sha256.as_bytes(), given.as_bytes()) {
                found = Some(Principal {
                    name: r.name.clone(),
                    role: r.role,
                    agents: r.agents.clone(),
                });
            }
        }
        found
    }
}
