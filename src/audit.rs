//! The audit log: who ran what, where, when, and how it ended.
//!
//! Records are appended to the store ([`crate::store`]) by one writer task
//! per server, in batches, never on a command's path: [`Audit::record`]
//! only queues (bounded), and a full queue or a failing store is counted,
//! logged and reported by `/healthz`, never dropped without a word.
//!
//! Each record is chained to the one before: its `hash` is the SHA-256 of
//! the previous record's hash and its own fields, and the store's
//! `audit_head` holds the last one. An edited record breaks its own hash;
//! a removed one breaks the link to the next; removed records at the end
//! no longer match the head; and records removed from the start by
//! retention are accounted for by `audit_anchor`. [`verify`] walks the
//! chain. Several servers on one PostgreSQL append to one chain: the
//! head's row lock orders their batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Records queued for the writer: 65 536. Beyond, a record is counted as
/// dropped, logged, and `/healthz` says so.
pub const AUDIT_QUEUE: usize = 65_536;

/// How long one batch may take to be written before the store counts as
/// failing (a hung connection, a lock held): 10 s.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `/readyz` reports dropped records after the last one: 5 min.
const DROP_REPORTED: Duration = Duration::from_secs(300);

/// Records written in one transaction, at most: 512.
const BATCH: usize = 512;

/// How long the writer waits for more records once one has come (a group
/// commit): 10 ms. Each transaction costs the store several round trips
/// to its connection's thread and a sync to disk, about 0.35 ms of the
/// server's CPU on SQLite; a command makes two records (its start and its
/// end) about a millisecond apart, which one transaction can take. Not
/// while anyone waits for a record (a command's start without a
/// journal), nor while the server stops. The price: records not in the
/// journal (a command's end, a login) wait up to 10 ms longer in memory,
/// lost if the server crashes meanwhile.
const LINGER: Duration = Duration::from_millis(10);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Login,
    LoginFailed,
    Logout,
    TokenCreate,
    TokenRevoke,
    CommandStart,
    CommandEnd,
    SessionAttach,
    SessionDetach,
    SessionEnd,
    FilePut,
    FileGet,
    /// A request refused by policy.
    Denied,
    /// A user of the store added, deleted, or given a new password.
    UserChange,
    /// A shell session renamed, or shared with other watchers.
    SessionChange,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::LoginFailed => "login_failed",
            Kind::Logout => "logout",
            Kind::TokenCreate => "token_create",
            Kind::TokenRevoke => "token_revoke",
            Kind::CommandStart => "command_start",
            Kind::CommandEnd => "command_end",
            Kind::SessionAttach => "session_attach",
            Kind::SessionDetach => "session_detach",
            Kind::SessionEnd => "session_end",
            Kind::FilePut => "file_put",
            Kind::FileGet => "file_get",
            Kind::Denied => "denied",
            Kind::UserChange => "user_change",
            Kind::SessionChange => "session_change",
        }
    }

    pub const ALL: &'static [Kind] = &[
        Kind::Login,
        Kind::LoginFailed,
        Kind::Logout,
        Kind::TokenCreate,
        Kind::TokenRevoke,
        Kind::CommandStart,
        Kind::CommandEnd,
        Kind::SessionAttach,
        Kind::SessionDetach,
        Kind::SessionEnd,
        Kind::FilePut,
        Kind::FileGet,
        Kind::Denied,
        Kind::UserChange,
        Kind::SessionChange,
    ];
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Console,
    Rest,
    /// REST from `conch exec`, `conch cp` (their User-Agent says so).
    Cli,
    Login,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Console => "console",
            Via::Rest => "rest",
            Via::Cli => "cli",
            Via::Login => "login",
        }
    }
}

/// One event, as the server reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub kind: Kind,
    pub user: String,
    /// The client's address.
    pub source: String,
    /// The agent concerned, or empty.
    pub agent: String,
    pub via: Via,
    /// The kind's own fields (command line, exit status, path, reason...).
    pub detail: serde_json::Value,
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// Its place in the chain, from 1.
    pub seq: i64,
    /// Milliseconds since the Unix epoch, by the writing server's clock.
    pub at_ms: i64,
    pub kind: String,
    pub user: String,
    pub source: String,
    pub agent: String,
    pub via: String,
    /// The server that wrote it (`--server-name`, else the host name).
    pub server: String,
    /// The kind's own fields.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// The previous record's hash (hex), and this one's.
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of a record: SHA-256 over the previous hash and the record's
/// fields as a JSON array (one fixed order, one encoding).
fn chain_hash(prev: &str, seq: i64, at_ms: i64, fields: [&str; 6], detail: &str) -> String {
    let body = serde_json::to_string(&(seq, at_ms, fields, detail)).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// How the writer is doing, for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct Health {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    /// When a record was last dropped (milliseconds since the epoch).
    pub last_drop_ms: AtomicU64,
    pub failing: AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// A record waiting for the writer: when it happened, what, and whom to
/// tell once it is committed.
type Queued = (i64, Event, Ack);

/// Who is told when a record is committed.
#[derive(Debug)]
enum Ack {
    Nobody,
    /// A command waiting for its start record.
    Waiter(tokio::sync::oneshot::Sender<()>),
    /// A record also in the journal, which may forget it once committed.
    Journal,
}

/// Start records written to a file in the data directory before the
/// command runs, and forgotten once the store has them: a `write` costs a
/// few microseconds where a committed transaction costs a few hundred, and
/// survives the server's crash all the same (not the machine's: the file
/// is not synced). A server that starts finds what a crash left there and
/// puts into the store what it lacks.
pub struct Journal {
    state: std::sync::Mutex<JournalState>,
}

struct JournalState {
    file: std::fs::File,
    /// Lines written and not yet committed to the store.
    pending: u64,
}

/// The journal's file in a data directory.
pub fn journal_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("audit.journal")
}

impl Journal {
    /// Opens (or makes) the journal at `path`, putting into `store` first
    /// the records a crash left in it that the store lacks.
    pub async fn open(
        path: &std::path::Path,
        store: &Store,
        server: &str,
    ) -> Result<Journal, StoreError> {
        use std::io::{BufRead, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| StoreError::Journal(format!("{}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let mut left: Vec<(i64, Event)> = Vec::new();
        for line in std::io::BufReader::new(&file).lines() {
            // A line cut by the crash is the one record that was not written.
            if let Ok((at_ms, ev)) = serde_json::from_str::<(i64, Event)>(&line.map_err(io)?) {
                left.push((at_ms, ev));
            }
        }
        let mut missing = Vec::new();
        for (at_ms, ev) in left {
            let found: Option<(i64,)> = sqlx::query_as(
                "SELECT seq FROM audit WHERE at_ms = $1 AND kind = $2 AND user_name = $3 AND detail = $4",
            )
            .bind(at_ms)
            .bind(ev.kind.as_str())
            .bind(ev.user.clone())
            .bind(ev.detail.to_string())
            .fetch_optional(&store.pool)
            .await?;
            if found.is_none() {
                missing.push((at_ms, ev, Ack::Nobody));
            }
        }
        if !missing.is_empty() {
            tracing::warn!(
                records = missing.len(),
                "the audit journal held start records the store lacked (the server stopped without writing them); written now"
            );
            append(store, server, &missing, &mut None).await?;
        }
        file.set_len(0).map_err(io)?;
        let mut file = file;
        file.flush().map_err(io)?;
        Ok(Journal {
            state: std::sync::Mutex::new(JournalState { file, pending: 0 }),
        })
    }

    fn append(&self, at_ms: i64, ev: &Event) -> std::io::Result<()> {
        use std::io::Write;
        let mut line = serde_json::to_vec(&(at_ms, ev)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut st = self
            .state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        st.file.write_all(&line)?;
        st.pending += 1;
        Ok(())
    }

    /// `n` journaled records are in the store; when none is left, the
    /// file is emptied.
    fn committed(&self, n: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.pending = st.pending.saturating_sub(n);
            if st.pending == 0 {
                let _ = st.file.set_len(0);
            }
        }
    }
}

/// How long a command waits for its start record to be committed, at
/// most: 2 s. Beyond (the store is slow or down) it runs anyway, and the
/// failure is reported as any other.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// The server's handle on its audit log.
#[derive(Clone)]
pub struct Audit {
    /// `None`: auditing is off (`--audit off`), nothing is recorded.
    queue: Option<mpsc::Sender<Queued>>,
    /// Start records go here first (with a data directory).
    journal: Option<Arc<Journal>>,
    pub health: Arc<Health>,
    pub store: Store,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, as records and the store count time.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Audit {
    /// Starts the writer (and the retention task) on `store`; both end,
    /// after writing what is queued, when `shutdown` fires.
    pub fn start(
        store: Store,
        server: String,
        retention: Option<Duration>,
        journal: Option<Journal>,
        shutdown: CancellationToken,
    ) -> (Audit, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(AUDIT_QUEUE);
        let health = Arc::new(Health::default());
        let journal = journal.map(Arc::new);
        let writer = tokio::spawn(write_loop(
            store.clone(),
            server,
            rx,
            health.clone(),
            journal.clone(),
            shutdown.clone(),
        ));
        if let Some(keep) = retention {
            tokio::spawn(retention_loop(store.clone(), keep, shutdown));
        }
        (
            Audit {
                queue: Some(queue),
                journal,
                health,
                store,
            },
            writer,
        )
    }

    /// An audit log that records nothing (`--audit off`: for measuring
    /// what auditing costs; a server that must answer for what was run
    /// keeps it on).
    pub fn off(store: Store) -> Audit {
        Audit {
            queue: None,
            journal: None,
            health: Arc::default(),
            store,
        }
    }

    /// Queues `event`; never waits. A full queue (the store is down or too
    /// slow) drops it, counted and logged.
    pub fn record(&self, event: Event) {
        self.enqueue(now_ms(), event, Ack::Nobody);
    }

    /// Queues `event` so that it survives this server's crash from now
    /// on: written to the journal (a file write), or without a journal
    /// waited for until committed (at most [`CONFIRM_WAIT`], and not at
    /// all while the store is failing). A command starts only after this.
    pub async fn record_committed(&self, event: Event) {
        if self.queue.is_none() {
            return;
        }
        let at_ms = now_ms();
        if let Some(journal) = &self.journal {
            match journal.append(at_ms, &event) {
                Ok(()) => {
                    self.enqueue(at_ms, event, Ack::Journal);
                    return;
                }
                Err(e) => tracing::error!(error = %e, "cannot write the audit journal"),
            }
        }
        if self.health.failing.load(Ordering::Relaxed) {
            self.enqueue(at_ms, event, Ack::Nobody);
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(at_ms, event, Ack::Waiter(tx));
        let _ = tokio::time::timeout(CONFIRM_WAIT, rx).await;
    }

    fn enqueue(&self, at_ms: i64, mut event: Event, ack: Ack) {
        let Some(queue) = &self.queue else { return };
        // Fields a client chose (a user name tried, an agent asked for)
        // are kept as text a reader and every store can take: no control
        // characters (PostgreSQL refuses NUL), at most 256 characters.
        for field in [&mut event.user, &mut event.source, &mut event.agent] {
            if field.len() > 256 || field.chars().any(char::is_control) {
                *field = field
                    .chars()
                    .take(256)
                    .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
                    .collect();
            }
        }
        if let Err(e) = queue.try_send((at_ms, event, ack)) {
            let n = self.health.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.health
                .last_drop_ms
                .store(now_ms() as u64, Ordering::Relaxed);
            let what = match &e {
                mpsc::error::TrySendError::Full((_, ev, _)) => ev.kind.as_str(),
                mpsc::error::TrySendError::Closed((_, ev, _)) => ev.kind.as_str(),
            };
            // Every first, then every 1000th: the log must not flood.
            if n == 1 || n.is_multiple_of(1000) {
                tracing::error!(
                    dropped = n,
                    kind = what,
                    "audit records are being dropped: the store cannot keep up or is failing"
                );
            }
        }
    }

    /// `Err` with the reason when records were dropped or the store fails.
    pub fn problem(&self) -> Option<String> {
        let dropped = self.health.dropped.load(Ordering::Relaxed);
        if self.health.failing.load(Ordering::Relaxed) {
            let last = self
                .health
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default();
            return Some(format!("the audit store is failing: {last}"));
        }
        // Reported for a while after the last drop, then no longer: the
        // log says how many, and a server that keeps up again is ready.
        let since =
            (now_ms() as u64).saturating_sub(self.health.last_drop_ms.load(Ordering::Relaxed));
        (dropped > 0 && since < DROP_REPORTED.as_millis() as u64)
            .then(|| format!("{dropped} audit records were dropped"))
    }
}

async fn write_loop(
    store: Store,
    server: String,
    mut rx: mpsc::Receiver<Queued>,
    health: Arc<Health>,
    journal: Option<Arc<Journal>>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut head: Head = None;
    loop {
        let first = tokio::select! {
            ev = rx.recv() => ev,
            _ = shutdown.cancelled() => {
                // Write what is queued, then stop.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { return };
        batch.push(first);
        crate::store::gather(&mut rx, &mut batch, BATCH, LINGER, &shutdown, someone_waits).await;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt =
                tokio::time::timeout(APPEND_TIMEOUT, append(&store, &server, &batch, &mut head))
                    .await
                    .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
            match attempt {
                Ok(()) => {
                    health
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if health.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("the audit store works again");
                    }
                    let mut journaled = 0;
                    for (_, _, ack) in batch.drain(..) {
                        match ack {
                            Ack::Waiter(w) => {
                                let _ = w.send(());
                            }
                            Ack::Journal => journaled += 1,
                            Ack::Nobody => {}
                        }
                    }
                    if let (Some(j), true) = (&journal, journaled > 0) {
                        j.committed(journaled);
                    }
                    break;
                }
                Err(e) => {
                    // What this writer knew of the head may be stale now.
                    head = None;
                    if !health.failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, "cannot write the audit log; retrying");
                    }
                    if let Ok(mut last) = health.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    if shutdown.is_cancelled() && backoff > Duration::from_secs(2) {
                        tracing::error!(
                            lost = batch.len(),
                            "the server stops with audit records it could not write"
                        );
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Whether a command waits for a record of `batch` (its start, without a
/// journal): then the batch goes without waiting for more.
fn someone_waits(batch: &[Queued]) -> bool {
    batch
        .iter()
        .any(|(_, _, ack)| matches!(ack, Ack::Waiter(_)))
}

/// The chain's last record as this writer last saw it: (seq, hash).
type Head = Option<(i64, String)>;

/// Appends `events` to the chain in one transaction: the head moves first,
/// on the condition that it is where this writer last saw it (a
/// compare-and-set: on PostgreSQL the row's lock orders several servers'
/// writers, and on SQLite the first write takes the database's lock), then
/// the records go in, all in one statement. When another writer moved the
/// head meanwhile, nothing is written, the head is read again, and the
/// batch is hashed anew: a few round trips a batch in the usual case.
async fn append(
    store: &Store,
    server: &str,
    events: &[Queued],
    head: &mut Head,
) -> Result<(), sqlx::Error> {
    for _ in 0..100 {
        let (old_seq, old_hash) = match head.clone() {
            Some(h) => h,
            None => {
                let h: (i64, String) =
                    sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                        .fetch_one(&store.pool)
                        .await?;
                *head = Some(h.clone());
                h
            }
        };
        let (mut seq, mut prev) = (old_seq, old_hash);
        let mut rows = Vec::with_capacity(events.len());
        for (at_ms, ev, _) in events {
            seq += 1;
            let detail = ev.detail.to_string();
            let fields = [
                ev.kind.as_str(),
                &ev.user,
                &ev.source,
                &ev.agent,
                ev.via.as_str(),
                server,
            ];
            let hash = chain_hash(&prev, seq, *at_ms, fields, &detail);
            rows.push((seq, *at_ms, ev, detail, prev.clone(), hash.clone()));
            prev = hash;
        }
        let mut tx = store.pool.begin().await?;
        let moved =
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1 AND seq = $3")
                .bind(seq)
                .bind(&prev)
                .bind(head.as_ref().map_or(0, |h| h.0))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if moved != 1 {
            // Another writer (another server) went first: read the head again.
            tx.rollback().await?;
            *head = None;
            continue;
        }
        let mut sql = String::from(
            "INSERT INTO audit (seq, at_ms, kind, user_name, source, agent, via, server, detail, prev_hash, hash) VALUES ",
        );
        for i in 0..rows.len() {
            let b = i * 11;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            sql.push_str(
                &(1..=11)
                    .map(|k| format!("${}", b + k))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            sql.push(')');
        }
        // Audited: only placeholders are in `sql`; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (seq, at_ms, ev, detail, prev_hash, hash) in &rows {
            q = q
                .bind(*seq)
                .bind(*at_ms)
                .bind(ev.kind.as_str())
                .bind(ev.user.clone())
                .bind(ev.source.clone())
                .bind(ev.agent.clone())
                .bind(ev.via.as_str())
                .bind(server.to_owned())
                .bind(detail.clone())
                .bind(prev_hash.clone())
                .bind(hash.clone());
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        *head = Some((seq, prev));
        return Ok(());
    }
    Err(sqlx::Error::Protocol(
        "the audit head kept moving: 100 attempts lost to other writers".into(),
    ))
}

/// Removes records older than `keep`, hourly, from the start of the chain
/// only, and moves the anchor past them so that the chain still verifies.
async fn retention_loop(store: Store, keep: Duration, shutdown: CancellationToken) {
    loop {
        let cutoff = now_ms() - keep.as_millis() as i64;
        if let Err(e) = trim(&store, cutoff).await {
            tracing::warn!(error = %e, "cannot remove old audit records; trying again later");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Removes the records up to the last one older than `cutoff_ms`.
pub async fn trim(store: &Store, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    let last: Option<(i64, String)> = sqlx::query_as(
        "SELECT seq, hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit WHERE at_ms < $1)",
    )
    .bind(cutoff_ms)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((seq, hash)) = last else {
        tx.rollback().await?;
        return Ok(0);
    };
    let gone = sqlx::query("DELETE FROM audit WHERE seq <= $1")
        .bind(seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("UPDATE audit_anchor SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(removed = gone, "old audit records removed (retention)");
    Ok(gone)
}

fn record_of(row: &sqlx::any::AnyRow) -> Result<Record, sqlx::Error> {
    let detail: String = row.try_get("detail")?;
    Ok(Record {
        seq: row.try_get("seq")?,
        at_ms: row.try_get("at_ms")?,
        kind: row.try_get("kind")?,
        user: row.try_get("user_name")?,
        source: row.try_get("source")?,
        agent: row.try_get("agent")?,
        via: row.try_get("via")?,
        server: row.try_get("server")?,
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// What to look for in the log.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub user: Option<String>,
    pub agent: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Text anywhere in the record's detail (case-insensitive).
    pub text: Option<String>,
    /// Records before this `seq` (the cursor of the page before).
    pub before: Option<i64>,
    pub limit: u32,
}

/// The newest records that match, newest first, and the cursor of the
/// next (older) page if there is one.
pub async fn query(store: &Store, f: &Filter) -> Result<(Vec<Record>, Option<i64>), StoreError> {
    let mut sql = String::from(
        "SELECT seq, at_ms, kind, user_name, source, agent, via, server, detail, prev_hash, hash \
         FROM audit WHERE 1 = 1",
    );
    // Each condition with its value, in one list: the placeholders and the
    // binds cannot drift apart.
    enum Value {
        Text(String),
        Number(i64),
    }
    let text = |v: &Option<String>| v.clone().map(Value::Text);
    let number = |v: Option<i64>| v.map(Value::Number);
    // The text as it is: its `%`, `_` and `\` match only themselves.
    let pattern = f.text.as_ref().map(|v| {
        let escaped = v
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        Value::Text(format!("%{escaped}%"))
    });
    let conditions = [
        ("user_name = ?", text(&f.user)),
        ("agent = ?", text(&f.agent)),
        ("kind = ?", text(&f.kind)),
        ("at_ms >= ?", number(f.since_ms)),
        ("at_ms < ?", number(f.until_ms)),
        ("LOWER(detail) LIKE ? ESCAPE '\\'", pattern),
        ("seq < ?", number(f.before)),
    ];
    let mut values = Vec::new();
    for (clause, value) in conditions {
        if let Some(value) = value {
            values.push(value);
            sql.push_str(" AND ");
            sql.push_str(&clause.replace('?', &format!("${}", values.len())));
        }
    }
    let limit = f.limit.clamp(1, 1000);
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", limit + 1));
    // Audited: only the fixed clauses above and a number are in `sql`;
    // every value the caller gave is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for value in values {
        q = match value {
            Value::Text(v) => q.bind(v),
            Value::Number(v) => q.bind(v),
        };
    }
    let rows = q.fetch_all(&store.pool).await?;
    let mut records = rows.iter().map(record_of).collect::<Result<Vec<_>, _>>()?;
    let more = records.len() > limit as usize;
    records.truncate(limit as usize);
    let cursor = more.then(|| records.last().map(|r| r.seq)).flatten();
    Ok((records, cursor))
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record links to the one before; the last is the head.
    Intact { records: u64, first: i64, last: i64 },
    /// The chain is broken at `seq`, for `reason`.
    Broken { seq: i64, reason: String },
}

/// Walks the whole chain, from the anchor to the head.
pub async fn verify(store: &Store) -> Result<Verdict, StoreError> {
    let (anchor_seq, anchor_hash): (i64, String) =
        sqlx::query_as("SELECT seq, hash FROM audit_anchor WHERE id = 1")
            .fetch_one(&store.pool)
            .await?;
    let (head_seq, head_hash): (i64, String) =
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&store.pool)
            .await?;
    let (mut expect_seq, mut prev) = (anchor_seq + 1, anchor_hash);
    let mut count = 0u64;
    loop {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, user_name, source, agent, via, server, detail, prev_hash, hash \
             FROM audit WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT 1000",
        )
        .bind(expect_seq)
        .bind(head_seq)
        .fetch_all(&store.pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let detail: String = row.try_get("detail")?;
            let r = record_of(row)?;
            if seq != expect_seq {
                return Ok(Verdict::Broken {
                    seq: expect_seq,
                    reason: format!("record {expect_seq} is missing (the next is {seq})"),
                });
            }
            if r.prev_hash != prev {
                return Ok(Verdict::Broken {
                    seq,
                    reason: format!("record {seq} does not link to the record before it"),
                });
            }
            let fields = [
                r.kind.as_str(),
                &r.user,
                &r.source,
                &r.agent,
                &r.via,
                &r.server,
            ];
            if chain_hash(&prev, seq, r.at_ms, fields, &detail) != r.hash {
                return Ok(Verdict::Broken {
                    seq,
                    reason: format!("record {seq} was changed after it was written"),
                });
            }
            prev = r.hash;
            expect_seq += 1;
            count += 1;
        }
    }
    let last = expect_seq - 1;
    if last != head_seq || prev != head_hash {
        return Ok(Verdict::Broken {
            seq: last + 1,
            reason: format!(
                "the log ends at record {last}, but {head_seq} were written: records were removed from its end"
            ),
        });
    }
    Ok(Verdict::Intact {
        records: count,
        first: anchor_seq + 1,
        last,
    })
}

/// One command's two records, `command_start` when made and
/// `command_end` (once: at its end, or when dropped unfinished) with its
/// status, duration and output bytes.
pub struct CommandTrail {
    audit: Audit,
    /// Who, from where, on which agent, how: the closing record's
    /// (its `detail` empty: see `repeated`).
    base: Event,
    /// What the closing record repeats of the opening one's detail
    /// (`session`, `request_id`, `command`) and what was noted since.
    /// Only these are kept: the whole detail, as a JSON map, cost every
    /// running command more than half a KiB for as long as it ran.
    repeated: Vec<(String, serde_json::Value)>,
    /// The kind of the closing record.
    end_kind: Kind,
    started: std::time::Instant,
    bytes_out: u64,
    ended: bool,
}

impl CommandTrail {
    /// Records the start of `command` (the command line or argv, and what
    /// else the edge knows: cwd, request id, terminal), committed before
    /// this returns (see [`Audit::record_committed`]): call it before the
    /// command is sent to its agent.
    pub async fn start(audit: &Audit, base: Event) -> CommandTrail {
        let (opening, trail) =
            CommandTrail::opened(audit, base, Kind::CommandStart, Kind::CommandEnd);
        audit.record_committed(opening).await;
        trail
    }

    /// The same for another pair of kinds (an attach to a session and its
    /// detach).
    pub fn start_as(audit: &Audit, base: Event, start: Kind, end: Kind) -> CommandTrail {
        let (opening, trail) = CommandTrail::opened(audit, base, start, end);
        audit.record(opening);
        trail
    }

    /// The opening record (`base` as `start`), and the trail that closes it.
    fn opened(audit: &Audit, mut base: Event, start: Kind, end: Kind) -> (Event, CommandTrail) {
        let detail = std::mem::take(&mut base.detail);
        let repeated = ["session", "request_id", "command"]
            .into_iter()
            .filter_map(|key| Some((key.to_owned(), detail.get(key)?.clone())))
            .collect();
        let opening = Event {
            kind: start,
            detail,
            ..base.clone()
        };
        let trail = CommandTrail {
            audit: audit.clone(),
            base,
            repeated,
            end_kind: end,
            started: std::time::Instant::now(),
            bytes_out: 0,
            ended: false,
        };
        (opening, trail)
    }

    /// Adds `key` to what the closing record repeats (a session's id,
    /// known once the agent says it; a fan-out host's outcome).
    pub fn note(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        let value = value.into();
        match self.repeated.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => self.repeated.push((key.to_owned(), value)),
        }
    }

    pub fn output(&mut self, n: usize) {
        self.bytes_out += n as u64;
    }

    /// The console left a shell session that goes on: recorded as
    /// `session_detach`, not as the shell's end.
    pub fn detached(&mut self, reason: &str) {
        self.end_kind = Kind::SessionDetach;
        self.end(None, Some(reason));
    }

    /// Records how it ended: its exit status, or why it failed.
    pub fn end(&mut self, status: Option<&crate::vocab::ExitStatus>, failure: Option<&str>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut detail = serde_json::json!({
            "duration_ms": self.started.elapsed().as_millis() as u64,
            "bytes_out": self.bytes_out,
        });
        if let Some(s) = status {
            detail["exit"] = serde_json::to_value(s).unwrap_or_default();
        }
        if let Some(f) = failure {
            detail["failure"] = serde_json::Value::String(f.to_owned());
        }
        for (key, value) in &self.repeated {
            detail[key.as_str()] = value.clone();
        }
        self.audit.record(Event {
            kind: self.end_kind,
            detail,
            ..self.base.clone()
        });
    }
}

impl Drop for CommandTrail {
    fn drop(&mut self) {
        self.end(None, Some("the client went away before the command ended"));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_audit_page_knows_every_kind() {
        let page = include_str!("../web/src/auditView.ts");
        for kind in Kind::ALL {
            assert!(
                page.contains(&format!("'{}'", kind.as_str())),
                "web/src/auditView.ts lacks {kind:?}"
            );
        }
    }

    use super::*;

    fn event(command: &str) -> Event {
        Event {
            kind: Kind::CommandStart,
            user: "olga".into(),
            source: "127.0.0.1".into(),
            agent: "web-1".into(),
            via: Via::Rest,
            detail: serde_json::json!({"command": command}),
        }
    }

    /// A command whose start must be committed before it runs (no
    /// journal) does not wait for the group commit.
    #[test]
    fn a_batch_a_command_waits_for_goes_without_waiting_for_more() {
        let (ack, _rx) = tokio::sync::oneshot::channel();
        let mut batch = vec![
            (1, event("make"), Ack::Journal),
            (2, event("test"), Ack::Nobody),
        ];
        assert!(!someone_waits(&batch));
        batch.push((3, event("ship"), Ack::Waiter(ack)));
        assert!(someone_waits(&batch));
    }

    #[tokio::test]
    async fn a_crash_leaves_start_records_in_the_journal_and_the_next_start_stores_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&crate::store::sqlite_url(Some(dir.path())))
            .await
            .unwrap();
        let path = journal_path(dir.path());
        // What a server killed between its journal write and its commit
        // leaves: two records, and a line the crash cut.
        let mut text = String::new();
        for (at, cmd) in [(1_000, "rm -rf /tmp/x"), (1_001, "id")] {
            text.push_str(&serde_json::to_string(&(at as i64, event(cmd))).unwrap());
            text.push('\n');
        }
        text.push_str("{\"cut");
        std::fs::write(&path, text).unwrap();
        let journal = Journal::open(&path, &store, "s1").await.unwrap();
        drop(journal);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            0,
            "emptied once stored"
        );
        let all = Filter {
            limit: 10,
            ..Default::default()
        };
        let (records, _) = query(&store, &all).await.unwrap();
        let commands: Vec<_> = records
            .iter()
            .map(|r| r.detail["command"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(commands, ["id", "rm -rf /tmp/x"]);
        // The same lines again (a crash after the commit, before the file
        // was emptied): nothing is stored twice.
        let line = serde_json::to_string(&(1_001_i64, event("id"))).unwrap();
        std::fs::write(&path, format!("{line}\n")).unwrap();
        Journal::open(&path, &store, "s1").await.unwrap();
        let (records, _) = query(&store, &all).await.unwrap();
        assert_eq!(records.len(), 2);
        assert!(matches!(
            verify(&store).await.unwrap(),
            Verdict::Intact { records: 2, .. }
        ));
    }

    #[tokio::test]
    async fn the_chain_detects_an_edit_a_removal_and_a_cut_end() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let events: Vec<Queued> = (0..5)
            .map(|i| (i as i64, event(&format!("c{i}")), Ack::Nobody))
            .collect();
        append(&store, "s", &events, &mut None).await.unwrap();
        assert_eq!(
            verify(&store).await.unwrap(),
            Verdict::Intact {
                records: 5,
                first: 1,
                last: 5
            }
        );
        // Retention removes a prefix; the anchor keeps the chain whole.
        assert_eq!(trim(&store, 2).await.unwrap(), 2);
        assert!(matches!(
            verify(&store).await.unwrap(),
            Verdict::Intact {
                records: 3,
                first: 3,
                last: 5
            }
        ));
        sqlx::query("UPDATE audit SET user_name = 'mallory' WHERE seq = 4")
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(matches!(
            verify(&store).await.unwrap(),
            Verdict::Broken { seq: 4, .. }
        ));
    }
}
