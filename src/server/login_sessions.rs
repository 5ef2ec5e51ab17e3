//! Login sessions in the store, so that a restart logs nobody out and
//! servers sharing one PostgreSQL accept each other's cookies.
//!
//! `Auth` keeps the live sessions in memory, as before; this module is
//! what it is kept in step with. A login is written (and committed) before
//! its cookie is handed out; a cookie a server does not know is looked up
//! in the store; and a known one is checked again at most every
//! [`RECHECK`], so that a logout on one server ends the session on the
//! others within that time. Only the SHA-256 of a cookie is stored.

use std::time::Duration;

use crate::audit::now_ms;

use super::auth::{Principal, Role};
use crate::store::Store;

/// How long a server trusts what it knows of a session before asking the
/// store again: 10 s.
pub(crate) const RECHECK: Duration = Duration::from_secs(10);

/// Stores a new session (`key`: the hex SHA-256 of its cookie), and
/// removes those `gone` (a user's oldest, beyond the cap) and any expired.
pub(crate) async fn save(
    store: &Store,
    key: &str,
    who: &Principal,
    ttl: Duration,
    gone: &[String],
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let expires = now.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
    let mut tx = store.pool.begin().await?;
    sqlx::query(
        "INSERT INTO login_sessions (key, user_name, role, agents, created_ms, expires_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(key.to_owned())
    .bind(who.name.clone())
    .bind(who.role.as_str())
    .bind(who.agents.clone())
    .bind(now)
    .bind(expires)
    .execute(&mut *tx)
    .await?;
    for old in gone {
        sqlx::query("DELETE FROM login_sessions WHERE key = $1")
            .bind(old.clone())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM login_sessions WHERE expires_ms < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The live session stored under `key`: who, and how long it has left.
pub(crate) async fn load(
    store: &Store,
    key: &str,
) -> Result<Option<(Principal, Duration)>, sqlx::Error> {
    let row: Option<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT user_name, role, agents, expires_ms FROM login_sessions WHERE key = $1",
    )
    .bind(key.to_owned())
    .fetch_optional(&store.pool)
    .await?;
    let now = now_ms();
    Ok(row.and_then(|(name, role, agents, expires)| {
        let role = Role::from_name(&role)?;
        (expires > now).then(|| {
            (
                Principal { name, role, agents },
                Duration::from_millis((expires - now) as u64),
            )
        })
    }))
}

/// Ends the session stored under `key` (a logout).
pub(crate) async fn delete(store: &Store, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_sessions WHERE key = $1")
        .bind(key.to_owned())
        .execute(&store.pool)
        .await
        .map(|_| ())
}
