//! Named API tokens with a role, stored hashed in the server's store
//! (`crate::store`: SQLite in the data directory, or the PostgreSQL that
//! several servers share).
//!
//! A token is 32 random bytes (`conch_` + 64 hex characters); only its
//! SHA-256 is stored, which is enough for a secret of that entropy and lets
//! lookups stay constant-time. `conch token create` and the admin endpoint
//! both write the store. Each server keeps a copy, read again at most every
//! [`RECHECK`] when tokens are used (so a revocation on one server holds on
//! all within that time), and asks the store at once about a well-formed
//! token it does not know (a few times a second at most), so that a token
//! made elsewhere works at once. A `tokens.json` of an older conch is
//! imported at the first start, then kept as `tokens.json.imported`.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

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
    #[error("cannot use the token store: {0}")]
    Store(String),
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

/// How long a server uses its copy of the tokens before reading them
/// again: 10 s.
pub(crate) const RECHECK: Duration = Duration::from_secs(10);

/// How often, at most, an unknown token is looked up in the store: every
/// 50 ms (a flood of made-up tokens costs the store 20 lookups a second).
const LOOKUP_EVERY: Duration = Duration::from_millis(50);

/// The tokens, in the store, and this server's copy of them.
pub struct TokenStore {
    store: crate::store::Store,
    /// When the copy was read, and the copy.
    cache: Mutex<(Option<Instant>, Vec<TokenRecord>)>,
    /// When an unknown token was last looked up.
    looked_up: Mutex<Option<Instant>>,
}

fn db(e: sqlx::Error) -> TokenError {
    TokenError::Store(e.to_string())
}

type Row = (String, String, String, Option<String>, i64);

fn record_of((name, sha256, role, agents, created): Row) -> Option<TokenRecord> {
    Some(TokenRecord {
        name,
        role: Role::from_name(&role)?,
        sha256,
        created: u64::try_from(created).unwrap_or(0),
        agents,
    })
}

impl TokenStore {
    /// The tokens of `store`; a `tokens.json` in `data_dir` (from an older
    /// conch) is imported first, once.
    pub async fn open(
        store: crate::store::Store,
        data_dir: Option<&Path>,
    ) -> Result<TokenStore, TokenError> {
        let tokens = TokenStore {
            store,
            cache: Mutex::new((None, Vec::new())),
            looked_up: Mutex::new(None),
        };
        if let Some(dir) = data_dir {
            let old = dir.join("tokens.json");
            if old.exists() {
                crate::keyfile::warn_if_exposed(&old, "token file");
                let text = std::fs::read_to_string(&old)
                    .map_err(|e| TokenError::Store(format!("{}: {e}", old.display())))?;
                let records: Vec<TokenRecord> = serde_json::from_str(&text)
                    .map_err(|e| TokenError::Store(format!("{}: {e}", old.display())))?;
                let known: Vec<String> = tokens.list().await?.into_iter().map(|r| r.name).collect();
                for r in records.iter().filter(|r| !known.contains(&r.name)) {
                    tokens.insert(r).await?;
                }
                std::fs::rename(&old, dir.join("tokens.json.imported"))
                    .map_err(|e| TokenError::Store(format!("{}: {e}", old.display())))?;
                tracing::info!(
                    tokens = records.len(),
                    "API tokens imported from tokens.json into the store (the file is now tokens.json.imported)"
                );
            }
        }
        tokens.refresh().await?;
        Ok(tokens)
    }

    async fn insert(&self, r: &TokenRecord) -> Result<(), TokenError> {
        sqlx::query(
            "INSERT INTO api_tokens (name, sha256, role, agents, created) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(r.name.clone())
        .bind(r.sha256.clone())
        .bind(r.role.as_str())
        .bind(r.agents.clone())
        .bind(i64::try_from(r.created).unwrap_or(0))
        .execute(&self.store.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                TokenError::Exists(r.name.clone())
            }
            _ => db(e),
        })?;
        Ok(())
    }

    /// Reads every token into this server's copy.
    pub(crate) async fn refresh(&self) -> Result<(), TokenError> {
        let records = self.list().await?;
        if let Ok(mut cache) = self.cache.lock() {
            *cache = (Some(Instant::now()), records);
        }
        Ok(())
    }

    /// Reads the tokens again if the copy is older than [`RECHECK`]; a
    /// store that cannot answer leaves the copy as it is.
    pub(crate) async fn refresh_if_stale(&self) {
        let stale = self
            .cache
            .lock()
            .map(|c| c.0.is_none_or(|at| at.elapsed() >= RECHECK))
            .unwrap_or(false);
        if stale && let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "cannot read the API tokens from the store");
        }
    }

    /// The API token `token` stands for: from this server's copy (read
    /// again when older than [`RECHECK`]), or, for a well-formed token it
    /// does not know (made on another server, or by `conch token` a moment
    /// ago), from the store.
    pub(crate) async fn find(&self, token: &str) -> Option<Principal> {
        self.refresh_if_stale().await;
        let given = digest(token);
        if let Some(p) = self.known(&given) {
            return Some(p);
        }
        let well_formed = token
            .strip_prefix("conch_")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !well_formed {
            return None;
        }
        {
            let mut last = self.looked_up.lock().ok()?;
            if last.is_some_and(|at| at.elapsed() < LOOKUP_EVERY) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let row: Row = sqlx::query_as(
            "SELECT name, sha256, role, agents, created FROM api_tokens WHERE sha256 = $1",
        )
        .bind(given.clone())
        .fetch_optional(&self.store.pool)
        .await
        .ok()??;
        let record = record_of(row)?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.1.retain(|r| r.name != record.name);
            cache.1.push(record);
        }
        self.known(&given)
    }

    /// Creates a token; returns its secret value, shown this once only.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        agents: Option<&crate::selector::Selector>,
    ) -> Result<Secret, TokenError> {
        if !valid_name(name) {
            return Err(TokenError::BadName);
        }
        let token = Secret::new(format!("conch_{}", Secret::generate().expose()));
        let created = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.insert(&TokenRecord {
            name: name.into(),
            role,
            sha256: digest(token.expose()),
            created,
            agents: agents.map(ToString::to_string),
        })
        .await?;
        let _ = self.refresh().await;
        Ok(token)
    }

    pub async fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let gone = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
            .bind(name.to_owned())
            .execute(&self.store.pool)
            .await
            .map_err(db)?
            .rows_affected();
        if gone == 0 {
            return Err(TokenError::Missing(name.into()));
        }
        let _ = self.refresh().await;
        Ok(())
    }

    pub(crate) async fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT name, sha256, role, agents, created FROM api_tokens ORDER BY name",
        )
        .fetch_all(&self.store.pool)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().filter_map(record_of).collect())
    }

    /// `conch token list`: a line per token, its name and role (never its
    /// secret), tab-separated.
    pub async fn listing(&self) -> Result<String, TokenError> {
        Ok(self
            .list()
            .await?
            .iter()
            .map(|t| match &t.agents {
                Some(agents) => format!("{}\t{}\tagents={agents}\n", t.name, t.role.as_str()),
                None => format!("{}\t{}\n", t.name, t.role.as_str()),
            })
            .collect())
    }

    /// The principal of the token whose SHA-256 is `given`, in this
    /// server's copy.
    fn known(&self, given: &str) -> Option<Principal> {
        let cache = self.cache.lock().ok()?;
        // Compare against every record in constant time each.
        let mut found = None;
        for r in &cache.1 {
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
