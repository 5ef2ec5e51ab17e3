//! The server's store: one SQL database behind one interface, SQLite in
//! the data directory by default (WAL mode, created at the first start),
//! or PostgreSQL (`--database-url postgres://...`) for several servers
//! that share what they know. It holds the audit log (`crate::audit`) and
//! the login sessions (`crate::server::login_sessions`), the API tokens
//! (`crate::server::tokens`) and the session recordings
//! (`crate::recording`).
//!
//! Both backends go through sqlx's `Any` driver with the same statements
//! (`$1` placeholders, which SQLite reads too), so that one set of tests
//! covers both. The schema is created and upgraded at start by the
//! migrations below, embedded in the binary; each runs once, in order,
//! recorded in `conch_schema`.

use std::path::Path;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database URL must start with sqlite: or postgres: (got {0:?})")]
    Scheme(String),
    #[error("cannot open the store: {0}")]
    Open(sqlx::Error),
    #[error("cannot upgrade the store's schema (migration {version}): {source}")]
    Migrate { version: i64, source: sqlx::Error },
    #[error("the store failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("the audit journal: {0}")]
    Journal(String),
}

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The schema, version by version, in SQL that both engines read alike
/// (`{blob}` is each engine's name for bytes); never edit a released step,
/// add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            at_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            user_name TEXT NOT NULL,
            source TEXT NOT NULL,
            agent TEXT NOT NULL,
            via TEXT NOT NULL,
            server TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX audit_at ON audit (at_ms);
        CREATE INDEX audit_user ON audit (user_name, seq);
        CREATE TABLE audit_head (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL);
        INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '');
        CREATE TABLE audit_anchor (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL, hash TEXT NOT NULL);
        INSERT INTO audit_anchor (id, seq, hash) VALUES (1, 0, '')",
    ),
    (
        2,
        "CREATE TABLE login_sessions (
            key TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            role TEXT NOT NULL,
            agents TEXT,
            created_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL
        );
        CREATE INDEX login_sessions_expiry ON login_sessions (expires_ms)",
    ),
    (
        3,
        "CREATE TABLE api_tokens (
            name TEXT PRIMARY KEY,
            sha256 TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            agents TEXT,
            created BIGINT NOT NULL
        )",
    ),
    (
        4,
        "CREATE TABLE recordings (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            agent TEXT NOT NULL,
            via TEXT NOT NULL,
            kind TEXT NOT NULL,
            session TEXT,
            command TEXT NOT NULL,
            server TEXT NOT NULL,
            started_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL,
            ended_ms BIGINT,
            cols BIGINT NOT NULL,
            rows_ BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            stored BIGINT NOT NULL,
            chunks BIGINT NOT NULL,
            truncated BIGINT NOT NULL,
            incomplete BIGINT NOT NULL
        );
        CREATE INDEX recordings_started ON recordings (started_ms, id);
        CREATE INDEX recordings_user ON recordings (user_name, started_ms);
        CREATE TABLE recording_chunks (
            recording TEXT NOT NULL,
            n BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            size BIGINT NOT NULL,
            data {blob} NOT NULL,
            PRIMARY KEY (recording, n)
        )",
    ),
    (
        5,
        "CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            role TEXT NOT NULL,
            agents TEXT,
            created_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL
        )",
    ),
];

/// An open store.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish()
    }
}

/// The URL of the embedded store in `data_dir`, or an in-memory one.
pub fn sqlite_url(data_dir: Option<&Path>) -> String {
    match data_dir {
        Some(dir) => format!("sqlite://{}?mode=rwc", dir.join("conch.db").display()),
        None => "sqlite::memory:".to_owned(),
    }
}

impl Store {
    /// Opens a store that must exist already (to read or check it, never
    /// to make one by a mistyped path).
    pub async fn open_existing(url: &str) -> Result<Store, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .map(|p| p.split('?').next().unwrap_or(p))
            && !std::path::Path::new(path).exists()
        {
            return Err(StoreError::Journal(format!("no store at {path}")));
        }
        Store::open(url).await
    }

    /// Opens the store at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            let scheme = url.split(':').next().unwrap_or_default().to_owned();
            return Err(StoreError::Scheme(scheme));
        };
        let memory = url.contains(":memory:");
        let mut options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            // One connection holds an in-memory SQLite database: a second
            // would see another, empty one.
            .max_connections(match (backend, memory) {
                (Backend::Sqlite, true) => 1,
                (Backend::Sqlite, false) => 4,
                (Backend::Postgres, _) => 8,
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Writers wait for each other instead of failing;
                        // WAL lets readers go on while one writes.
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        if !memory {
                            sqlx::query("PRAGMA journal_mode = WAL")
                                .execute(&mut *conn)
                                .await?;
                            // Every commit reaches the disk: a record must
                            // survive the machine's crash too (a command can
                            // cause one). Batches spread the cost.
                            sqlx::query("PRAGMA synchronous = FULL")
                                .execute(&mut *conn)
                                .await?;
                        }
                    }
                    Ok(())
                })
            });
        if memory {
            // The one connection is the database: never let it go.
            options = options
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let pool = options.connect(url).await.map_err(StoreError::Open)?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the migrations not yet run, each in a transaction. Two servers
    /// starting at once on one PostgreSQL: the second waits for the
    /// first's lock, then finds the work done.
    async fn migrate(&self) -> Result<(), StoreError> {
        let fail = |version| move |source| StoreError::Migrate { version, source };
        // One connection for all of it: on PostgreSQL it holds a lock that
        // makes servers starting at once take turns (the first migrates,
        // the others find the work done).
        let mut conn = self.pool.acquire().await.map_err(fail(0))?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock(7336247)")
                .execute(&mut *conn)
                .await
                .map_err(fail(0))?;
        }
        let result = self.migrate_on(&mut conn).await;
        if self.backend == Backend::Postgres {
            let _ = sqlx::query("SELECT pg_advisory_unlock(7336247)")
                .execute(&mut *conn)
                .await;
        }
        result
    }

    async fn migrate_on(&self, conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
        use sqlx::Connection;
        let fail = |version| move |source| StoreError::Migrate { version, source };
        sqlx::query("CREATE TABLE IF NOT EXISTS conch_schema (version BIGINT PRIMARY KEY)")
            .execute(&mut *conn)
            .await
            .map_err(fail(0))?;
        for (version, script) in MIGRATIONS {
            let mut tx = conn.begin().await.map_err(fail(*version))?;
            let done: Option<(i64,)> =
                sqlx::query_as("SELECT version FROM conch_schema WHERE version = $1")
                    .bind(*version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(fail(*version))?;
            if done.is_some() {
                continue;
            }
            let blob = match self.backend {
                Backend::Sqlite => "BLOB",
                Backend::Postgres => "BYTEA",
            };
            let script = script.replace("{blob}", blob);
            for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await
                    .map_err(fail(*version))?;
            }
            sqlx::query("INSERT INTO conch_schema (version) VALUES ($1)")
                .bind(*version)
                .execute(&mut *tx)
                .await
                .map_err(fail(*version))?;
            tx.commit().await.map_err(fail(*version))?;
            tracing::info!(version, "store schema upgraded");
        }
        Ok(())
    }
}

/// Adds to `batch` what `rx` brings within `linger` of now, up to `max`
/// in all: a group commit, so that writes coming close together (a
/// command's start and end, a short command's recording) share one
/// transaction, which costs several round trips to the store's connection
/// and a sync to disk. Once `enough` holds of the batch (someone waits for
/// it, it carries a flood), or `stop` is cancelled, only what is queued
/// already is added.
pub(crate) async fn gather<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    linger: Duration,
    stop: &tokio_util::sync::CancellationToken,
    enough: impl Fn(&[T]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        if enough(batch) || stop.is_cancelled() {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => return,
                }
            }
            return;
        }
        let room = max - batch.len();
        tokio::select! {
            n = rx.recv_many(batch, room) => if n == 0 { return },
            _ = tokio::time::sleep_until(deadline) => return,
            _ = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    const LINGER: Duration = Duration::from_millis(10);

    /// A write a few milliseconds after the first goes in its batch: the
    /// writer waits `linger` for more.
    #[tokio::test(start_paused = true)]
    async fn writes_close_together_go_in_one_batch() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            let mut batch = vec![rx.recv().await.unwrap()];
            gather(
                &mut rx,
                &mut batch,
                8,
                LINGER,
                &CancellationToken::new(),
                |_| false,
            )
            .await;
            (batch, Instant::now() - start)
        });
        tx.send(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        tx.send(2).await.unwrap();
        assert_eq!(writer.await.unwrap(), (vec![1, 2], LINGER));
    }

    /// No wait once the batch is enough, full, or the writer stops: what
    /// is queued goes along, nothing more.
    #[tokio::test(start_paused = true)]
    async fn no_wait_once_enough_full_or_stopping() {
        for (max, enough, stopping) in [(8, true, false), (3, false, false), (8, false, true)] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            let stop = CancellationToken::new();
            if stopping {
                stop.cancel();
            }
            for i in 1..=4 {
                tx.send(i).await.unwrap();
            }
            let start = Instant::now();
            let mut batch = vec![rx.recv().await.unwrap()];
            gather(&mut rx, &mut batch, max, LINGER, &stop, |_| enough).await;
            assert_eq!(Instant::now(), start, "{max} {enough} {stopping}");
            assert_eq!(batch, (1..=max.min(4) as i32).collect::<Vec<_>>());
        }
    }
}
