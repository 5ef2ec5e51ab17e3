//! Session recordings: what a console command or shell printed, as an
//! asciicast v2 file (a JSON header line, then one `[time, code, data]`
//! line per event), compressed into the store.
//!
//! A [`Recorder`] belongs to one console command or shell attachment. It
//! turns output, resizes (and, with `--record-input`, typed input) into
//! asciicast lines in memory, and hands them to the writer task a chunk at
//! a time (every [`CHUNK_BYTES`] or [`FLUSH_EVERY`]): the command's output
//! never waits for the store. Each chunk is stored as its own gzip member,
//! so a server that dies loses at most the last couple of seconds, and a
//! recording can be read while it is still being made.
//!
//! Every bound has a flag: a recording stops at `--recording-max-bytes`
//! (with a marker saying so), the writer's queue holds [`QUEUE`] chunks,
//! recordings older than `--recording-retention` are removed, and so are
//! the oldest finished ones while all take more than
//! `--recording-max-total-bytes`. A chunk
//! that finds the queue full is lost, and the recording says so
//! (`incomplete`), as do the logs and `/readyz`: never a silent drop.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::now_ms;
use crate::store::{Store, StoreError};

/// Lines are handed to the writer once this many bytes are waiting.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;
/// ...or once the oldest waited this long.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Chunks waiting for the writer, for all recordings together (at most
/// `QUEUE × CHUNK_BYTES` plus one event of memory).
pub(crate) const QUEUE: usize = 256;
/// Writes per transaction.
const BATCH: usize = 64;
/// How long `/readyz` reports lost chunks after the last one.
const LOSS_REPORTED: Duration = Duration::from_secs(300);

/// The settings of recordings (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The most asciicast bytes one recording keeps (before compression).
    pub max_bytes: u64,
    /// Record what users type too (off by default: it holds passwords).
    pub record_input: bool,
    /// How long recordings are kept; `None`: for ever.
    pub retention: Option<Duration>,
    /// The most bytes (compressed) all recordings together may take in
    /// the store; the oldest finished ones go first.
    pub max_total: u64,
}

/// Stored bytes written between two checks of the total.
const CHECK_TOTAL_EVERY: u64 = 16 * 1024 * 1024;

/// The recordings of one server: a handle on the writer.
#[derive(Clone)]
pub struct Recordings {
    /// `None`: nothing is recorded (`--audit off`).
    queue: Option<mpsc::Sender<Write>>,
    settings: Arc<Settings>,
    health: Arc<Health>,
    pub store: Store,
}

impl std::fmt::Debug for Recordings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recordings").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Health {
    lost: AtomicU64,
    last_loss_ms: AtomicU64,
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// What a recording is of, as the index lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Meta {
    /// 32 hexadecimal digits.
    pub id: String,
    pub user: String,
    pub agent: String,
    /// `console` (REST commands are not recorded: their output goes to
    /// the caller whole).
    pub via: String,
    /// `command` (a command line) or `session` (a shell).
    pub kind: String,
    /// The shell session's id, once the agent says it.
    pub session: Option<String>,
    /// The command line, or `(login shell)`.
    pub command: String,
    pub started_ms: i64,
    /// `None` while the recording is still being made.
    pub ended_ms: Option<i64>,
    pub cols: u16,
    pub rows: u16,
    /// The asciicast file's size so far, before compression.
    pub bytes: i64,
    /// The size cap cut it.
    pub truncated: bool,
    /// Some of it was lost (the writer could not keep up, or the store
    /// failed).
    pub incomplete: bool,
}

/// What a recording is of, when it starts.
pub struct Start {
    pub user: String,
    pub agent: String,
    pub kind: &'static str,
    pub session: Option<String>,
    pub command: String,
    pub cols: u16,
    pub rows: u16,
    /// Its output goes through no terminal: each `\n` is recorded as
    /// `\r\n`, as a terminal's `onlcr` would have sent it, so that players
    /// draw lines, not a staircase.
    pub bare_lines: bool,
}

/// A write for the writer task, in order.
enum Write {
    Begin(Box<Meta>),
    Chunk {
        id: Arc<str>,
        n: i64,
        lines: Vec<u8>,
        bytes: i64,
    },
    Session {
        id: Arc<str>,
        session: String,
    },
    End {
        id: Arc<str>,
        ended_ms: i64,
        truncated: bool,
        incomplete: bool,
    },
}

impl Recordings {
    /// Starts the writer (and the retention task) on `store`; both end,
    /// after writing what is queued, when `shutdown` fires.
    pub fn start(
        store: Store,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> (Recordings, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let health = Arc::new(Health::default());
        if let Some(keep) = settings.retention {
            tokio::spawn(retention_loop(store.clone(), keep, shutdown.clone()));
        }
        let writer = tokio::spawn(write_loop(
            store.clone(),
            rx,
            health.clone(),
            settings.max_total,
            shutdown,
        ));
        (
            Recordings {
                queue: Some(tx),
                settings: Arc::new(settings),
                health,
                store,
            },
            writer,
        )
    }

    /// Records nothing.
    pub fn off(store: Store) -> Recordings {
        Recordings {
            queue: None,
            settings: Arc::new(Settings {
                max_bytes: 0,
                record_input: false,
                retention: None,
                max_total: 0,
            }),
            health: Arc::default(),
            store,
        }
    }

    /// Whether typed input is recorded.
    pub fn records_input(&self) -> bool {
        self.settings.record_input
    }

    /// Begins a recording; `None` when recordings are off or the writer's
    /// queue is full (counted and reported like a lost chunk).
    pub fn begin(&self, start: Start) -> Option<Arc<Recorder>> {
        let queue = self.queue.clone()?;
        let id: Arc<str> = hex::encode(rand::random::<[u8; 16]>()).into();
        let started_ms = now_ms();
        let meta = Meta {
            id: id.to_string(),
            user: start.user,
            agent: start.agent,
            via: "console".into(),
            kind: start.kind.into(),
            session: start.session,
            command: start.command,
            started_ms,
            ended_ms: None,
            cols: start.cols,
            rows: start.rows,
            bytes: 0,
            truncated: false,
            incomplete: false,
        };
        let title = match meta.kind.as_str() {
            "session" => format!("shell on {}, {}", meta.agent, meta.user),
            _ => meta.command.clone(),
        };
        let header = serde_json::json!({
            "version": 2,
            "width": meta.cols,
            "height": meta.rows,
            "timestamp": started_ms / 1000,
            "title": title,
            "env": {"TERM": "xterm-256color"},
        });
        if queue.try_send(Write::Begin(Box::new(meta))).is_err() {
            self.lost("a recording could not begin");
            return None;
        }
        let mut lines = header.to_string().into_bytes();
        lines.push(b'\n');
        let bytes = lines.len() as u64;
        let recorder = Arc::new(Recorder {
            id,
            recordings: self.clone(),
            queue,
            state: Mutex::new(State {
                started: Instant::now(),
                lines,
                oldest: Some(Instant::now()),
                carry: Vec::new(),
                size: (start.cols, start.rows),
                bytes,
                next_chunk: 0,
                truncated: false,
                incomplete: false,
                ended: false,
                bare_lines: start.bare_lines,
            }),
        });
        // The header at once: a live recording is a valid file from the
        // start.
        recorder.with(|s| recorder.flush(s));
        Some(recorder)
    }

    fn lost(&self, what: &str) {
        let h = &self.health;
        let before = h.lost.fetch_add(1, Ordering::Relaxed);
        let last = h.last_loss_ms.swap(now_ms() as u64, Ordering::Relaxed);
        // Once a minute in the log, not once a chunk.
        if before == 0 || (now_ms() as u64).saturating_sub(last) > 60_000 {
            tracing::error!(
                lost = before + 1,
                what,
                "recordings are losing output: the store cannot keep up or is failing"
            );
        }
    }

    /// The reason when recordings lose output or the store fails.
    pub fn problem(&self) -> Option<String> {
        let h = &self.health;
        if h.failing.load(Ordering::Relaxed) {
            let last = h
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default();
            return Some(format!("the recordings' store is failing: {last}"));
        }
        let lost = h.lost.load(Ordering::Relaxed);
        let since = (now_ms() as u64).saturating_sub(h.last_loss_ms.load(Ordering::Relaxed));
        (lost > 0 && since < LOSS_REPORTED.as_millis() as u64)
            .then(|| format!("{lost} pieces of recordings were lost"))
    }
}

/// One recording being made.
pub struct Recorder {
    id: Arc<str>,
    recordings: Recordings,
    queue: mpsc::Sender<Write>,
    state: Mutex<State>,
}

struct State {
    started: Instant,
    /// Lines not yet handed to the writer.
    lines: Vec<u8>,
    /// When the oldest of them was made.
    oldest: Option<Instant>,
    /// The start of a UTF-8 character whose end has not come yet.
    carry: Vec<u8>,
    size: (u16, u16),
    /// The file's size so far.
    bytes: u64,
    next_chunk: i64,
    truncated: bool,
    incomplete: bool,
    ended: bool,
    bare_lines: bool,
}

impl Recorder {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Output the page was sent (stdout and stderr alike, as a terminal
    /// shows them).
    pub fn output(&self, data: &[u8]) {
        self.with(|s| {
            // Past the cap nothing more is kept: no work for it either.
            if s.truncated {
                return;
            }
            let mut text = s.text_of(data);
            if s.bare_lines && text.contains('\n') {
                text = text.replace('\n', "\r\n");
            }
            if !text.is_empty() {
                self.event(s, "o", &text);
            }
        });
    }

    /// What the user typed (only with `--record-input`).
    pub fn input(&self, data: &str) {
        if self.recordings.records_input() {
            self.with(|s| self.event(s, "i", data));
        }
    }

    /// The terminal's new size (the same size twice is one event).
    pub fn resize(&self, cols: u16, rows: u16) {
        self.with(|s| {
            if s.size != (cols, rows) {
                s.size = (cols, rows);
                self.event(s, "r", &format!("{cols}x{rows}"));
            }
        });
    }

    /// The shell session's id, once the agent says it.
    pub fn session(&self, session: &str) {
        let write = Write::Session {
            id: self.id.clone(),
            session: session.to_owned(),
        };
        if self.queue.try_send(write).is_err() {
            self.recordings.lost("a recording's session id");
        }
    }

    /// Hands what waited [`FLUSH_EVERY`] or longer to the writer.
    pub fn flush_if_due(&self) {
        self.with(|s| {
            if s.oldest.is_some_and(|t| t.elapsed() >= FLUSH_EVERY) {
                self.flush(s);
            }
        });
    }

    /// When the lines waiting should be flushed, if any wait.
    pub fn due(&self) -> Option<Instant> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.oldest.map(|t| t + FLUSH_EVERY))
    }

    /// Ends the recording: what waits is written, and the index says so.
    pub fn end(&self) {
        self.with(|s| {
            if std::mem::replace(&mut s.ended, true) {
                return;
            }
            let rest = std::mem::take(&mut s.carry);
            if !rest.is_empty() {
                let text = String::from_utf8_lossy(&rest).into_owned();
                self.event(s, "o", &text);
            }
            self.flush(s);
            let end = Write::End {
                id: self.id.clone(),
                ended_ms: now_ms(),
                truncated: s.truncated,
                incomplete: s.incomplete,
            };
            // The end must not be lost to a queue full for a moment: it
            // waits for room in a task of its own (never the command's).
            if let Err(mpsc::error::TrySendError::Full(end)) = self.queue.try_send(end)
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                let queue = self.queue.clone();
                rt.spawn(async move {
                    let _ = queue.send(end).await;
                });
            }
        });
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut s) = self.state.lock()
            && !s.ended
        {
            f(&mut s);
        }
    }

    fn event(&self, s: &mut State, code: &str, data: &str) {
        if s.truncated {
            return;
        }
        let at = s.started.elapsed().as_secs_f64();
        let line = serde_json::json!([(at * 1e6).round() / 1e6, code, data]).to_string();
        let max = self.recordings.settings.max_bytes;
        if s.bytes + line.len() as u64 + 1 > max {
            s.truncated = true;
            let note = format!(
                "the recording stops here: it reached its size cap of {max} bytes (--recording-max-bytes)"
            );
            let marker = serde_json::json!([(at * 1e6).round() / 1e6, "m", note]).to_string();
            s.push(&marker);
            self.flush(s);
            return;
        }
        s.push(&line);
        if s.lines.len() >= CHUNK_BYTES {
            self.flush(s);
        }
    }

    fn flush(&self, s: &mut State) {
        s.oldest = None;
        if s.lines.is_empty() {
            return;
        }
        let write = Write::Chunk {
            id: self.id.clone(),
            n: s.next_chunk,
            lines: std::mem::take(&mut s.lines),
            bytes: s.bytes as i64,
        };
        s.next_chunk += 1;
        if self.queue.try_send(write).is_err() {
            s.incomplete = true;
            self.recordings.lost("a recording's output");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.end();
    }
}

impl State {
    fn push(&mut self, line: &str) {
        self.lines.extend_from_slice(line.as_bytes());
        self.lines.push(b'\n');
        self.bytes += line.len() as u64 + 1;
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// `data` as text: a character cut between two outputs waits for its
    /// end; bytes that are no UTF-8 become U+FFFD, as a terminal shows
    /// them.
    fn text_of(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(data);
        let cut = incomplete_tail(&bytes);
        self.carry = bytes.split_off(bytes.len() - cut);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How many bytes at the end of `b` begin a UTF-8 character not yet
/// whole.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let need = match c {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Write>,
    health: Arc<Health>,
    max_total: u64,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // What all recordings take: counted from the store at the start and
    // then by what this server writes, and counted again from the store
    // each time it passes the cap (other servers on the store write too)
    // or [`CHECK_TOTAL_EVERY`] has been written.
    let mut total: Option<u64> = None;
    let mut written = 0;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shutdown.cancelled() => {
                // What is queued is written, then the writer ends.
                rx.close();
                rx.recv_many(&mut batch, QUEUE).await
            }
        };
        if n == 0 {
            return;
        }
        let writes = std::mem::take(&mut batch);
        let count = writes.len();
        let result = match compress_batch(writes).await {
            Ok(stored) => {
                let bytes = stored
                    .iter()
                    .map(|w| match w {
                        Stored::Chunk { data, .. } => data.len() as u64,
                        Stored::Other(_) => 0,
                    })
                    .sum::<u64>();
                written += bytes;
                total = total.map(|t| t + bytes);
                store_with_retries(&store, &stored, &health).await
            }
            Err(e) => Err(e),
        };
        if total.is_none_or(|t| t > max_total) || written >= CHECK_TOTAL_EVERY {
            written = 0;
            match keep_within(&store, max_total).await {
                Ok(left) => total = Some(left),
                Err(e) => {
                    total = None;
                    tracing::warn!(error = %e, "cannot remove recordings over the total cap");
                }
            }
        }
        match result {
            Ok(()) => health.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                health.failing.store(true, Ordering::Relaxed);
                if let Ok(mut last) = health.last_error.lock() {
                    *last = Some(e.to_string());
                }
                health.lost.fetch_add(count as u64, Ordering::Relaxed);
                health
                    .last_loss_ms
                    .store(now_ms() as u64, Ordering::Relaxed);
                tracing::error!(error = %e, writes = count, "recordings could not be stored");
            }
        }
        if shutdown.is_cancelled() && rx.is_empty() && rx.is_closed() {
            return;
        }
    }
}

/// One gzip member of `lines` (members one after the other are one gzip
/// stream).
fn compress(lines: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(lines.len() / 4),
        flate2::Compression::default(),
    );
    gz.write_all(lines)?;
    gz.finish()
}

/// Writes a batch, trying again (after 0.1 s, doubling) while the store
/// fails, [`ATTEMPTS`] times in all: the queue fills meanwhile, and what
/// finds it full is counted as lost, never silently.
async fn store_with_retries(
    store: &Store,
    stored: &[Stored],
    health: &Health,
) -> Result<(), sqlx::Error> {
    let mut wait = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match write_batch(store, stored).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < ATTEMPTS => {
                health.failing.store(true, Ordering::Relaxed);
                if let Ok(mut last) = health.last_error.lock() {
                    *last = Some(e.to_string());
                }
                tracing::warn!(error = %e, attempt, "recordings could not be stored; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Attempts at writing one batch.
const ATTEMPTS: u32 = 6;

async fn compress_batch(writes: Vec<Write>) -> Result<Vec<Stored>, sqlx::Error> {
    // Compressing takes a while for full chunks: off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        writes
            .into_iter()
            .map(|w| match w {
                Write::Chunk {
                    id,
                    n,
                    lines,
                    bytes,
                } => {
                    let data = compress(&lines).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                    Ok(Stored::Chunk { id, n, data, bytes })
                }
                other => Ok(Stored::Other(other)),
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
    })
    .await
    .map_err(|e| sqlx::Error::Protocol(format!("compressing a recording failed: {e}")))?
}

async fn write_batch(store: &Store, writes: &[Stored]) -> Result<(), sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    for w in writes {
        match w {
            Stored::Other(Write::Begin(m)) => {
                sqlx::query(
                    "INSERT INTO recordings (id, user_name, agent, via, kind, session, command,
                        started_ms, updated_ms, ended_ms, cols, rows_, bytes, stored, chunks,
                        truncated, incomplete)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, NULL, $9, $10, 0, 0, 0, 0, 0)",
                )
                .bind(&m.id)
                .bind(&m.user)
                .bind(&m.agent)
                .bind(&m.via)
                .bind(&m.kind)
                .bind(&m.session)
                .bind(&m.command)
                .bind(m.started_ms)
                .bind(i64::from(m.cols))
                .bind(i64::from(m.rows))
                .execute(&mut *tx)
                .await?;
            }
            Stored::Chunk { id, n, data, bytes } => {
                let stored = data.len() as i64;
                sqlx::query(
                    "INSERT INTO recording_chunks (recording, n, data) VALUES ($1, $2, $3)",
                )
                .bind(&**id)
                .bind(n)
                .bind(data)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE recordings SET bytes = $2, stored = stored + $3, chunks = $4,
                        updated_ms = $5 WHERE id = $1",
                )
                .bind(&**id)
                .bind(bytes)
                .bind(stored)
                .bind(n + 1)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
            Stored::Other(Write::Session { id, session }) => {
                sqlx::query("UPDATE recordings SET session = $2 WHERE id = $1")
                    .bind(&**id)
                    .bind(session)
                    .execute(&mut *tx)
                    .await?;
            }
            Stored::Other(Write::End {
                id,
                ended_ms,
                truncated,
                incomplete,
            }) => {
                sqlx::query(
                    "UPDATE recordings SET ended_ms = $2, updated_ms = $2, truncated = $3,
                        incomplete = $4 WHERE id = $1",
                )
                .bind(&**id)
                .bind(ended_ms)
                .bind(i64::from(*truncated))
                .bind(i64::from(*incomplete))
                .execute(&mut *tx)
                .await?;
            }
            Stored::Other(Write::Chunk { .. }) => {}
        }
    }
    tx.commit().await
}

/// A write with its chunk compressed.
enum Stored {
    Chunk {
        id: Arc<str>,
        n: i64,
        data: Vec<u8>,
        bytes: i64,
    },
    Other(Write),
}

/// Removes the oldest finished recordings while all of them together
/// take more than `max_total` bytes in the store (live ones stay: each is
/// bounded by `--recording-max-bytes`); returns what they take then.
pub async fn keep_within(store: &Store, max_total: u64) -> Result<u64, sqlx::Error> {
    let (total,): (i64,) =
        sqlx::query_as("SELECT CAST(COALESCE(SUM(stored), 0) AS BIGINT) FROM recordings")
            .fetch_one(&store.pool)
            .await?;
    let mut over = total.saturating_sub(i64::try_from(max_total).unwrap_or(i64::MAX));
    let mut removed = 0;
    while over > 0 {
        let oldest: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, stored FROM recordings WHERE ended_ms IS NOT NULL
             ORDER BY started_ms, id LIMIT 100",
        )
        .fetch_all(&store.pool)
        .await?;
        if oldest.is_empty() {
            break;
        }
        for (id, stored) in oldest {
            let mut tx = store.pool.begin().await?;
            sqlx::query("DELETE FROM recording_chunks WHERE recording = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM recordings WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            removed += 1;
            over -= stored;
            if over <= 0 {
                break;
            }
        }
    }
    if removed > 0 {
        tracing::warn!(
            removed,
            max_total,
            "old recordings removed: all recordings together reached --recording-max-total-bytes"
        );
    }
    let cap = i64::try_from(max_total).unwrap_or(i64::MAX);
    Ok(u64::try_from(cap.saturating_add(over)).unwrap_or(0))
}

/// Removes recordings that began before `keep` ago, hourly.
async fn retention_loop(store: Store, keep: Duration, shutdown: CancellationToken) {
    loop {
        let cutoff = now_ms() - keep.as_millis() as i64;
        if let Err(e) = trim(&store, cutoff).await {
            tracing::warn!(error = %e, "cannot remove old recordings; trying again later");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Removes the recordings that began before `cutoff_ms`, with their
/// chunks.
pub async fn trim(store: &Store, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    sqlx::query(
        "DELETE FROM recording_chunks WHERE recording IN
            (SELECT id FROM recordings WHERE started_ms < $1)",
    )
    .bind(cutoff_ms)
    .execute(&mut *tx)
    .await?;
    let gone = sqlx::query("DELETE FROM recordings WHERE started_ms < $1")
        .bind(cutoff_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    if gone > 0 {
        tracing::info!(removed = gone, "old recordings removed (retention)");
    }
    Ok(gone)
}

/// Recordings a SQLite store's last server left unfinished (it stopped
/// without ending them) are ended where their last chunk was written, and
/// marked incomplete. Only for SQLite, whose one server is this one; on a
/// shared PostgreSQL another server's live recordings look the same.
pub async fn close_abandoned(store: &Store) -> Result<u64, sqlx::Error> {
    if store.backend != crate::store::Backend::Sqlite {
        return Ok(0);
    }
    Ok(sqlx::query(
        "UPDATE recordings SET ended_ms = updated_ms, incomplete = 1 WHERE ended_ms IS NULL",
    )
    .execute(&store.pool)
    .await?
    .rows_affected())
}

/// What to look for in the index.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub user: Option<String>,
    pub agent: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Text in the command line (case-insensitive).
    pub text: Option<String>,
    /// Recordings older than this one (the cursor of the page before).
    pub before: Option<Cursor>,
    pub limit: u32,
}

/// A place in the index, newest first: `started_ms` then `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub started_ms: i64,
    pub id: String,
}

impl Cursor {
    /// `"<started_ms>-<id>"`, as `next` gives it.
    pub fn parse(s: &str) -> Option<Cursor> {
        let (ms, id) = s.split_once('-')?;
        let ok = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        Some(Cursor {
            started_ms: ms.parse().ok().filter(|ms| *ms >= 0)?,
            id: ok.then(|| id.to_ascii_lowercase())?,
        })
    }

    fn text(&self) -> String {
        format!("{}-{}", self.started_ms, self.id)
    }
}

fn meta_of(row: &sqlx::any::AnyRow) -> Result<Meta, sqlx::Error> {
    let small = |v: i64| u16::try_from(v).unwrap_or(u16::MAX);
    Ok(Meta {
        id: row.try_get("id")?,
        user: row.try_get("user_name")?,
        agent: row.try_get("agent")?,
        via: row.try_get("via")?,
        kind: row.try_get("kind")?,
        session: row.try_get("session")?,
        command: row.try_get("command")?,
        started_ms: row.try_get("started_ms")?,
        ended_ms: row.try_get("ended_ms")?,
        cols: small(row.try_get("cols")?),
        rows: small(row.try_get("rows_")?),
        bytes: row.try_get("bytes")?,
        truncated: row.try_get::<i64, _>("truncated")? != 0,
        incomplete: row.try_get::<i64, _>("incomplete")? != 0,
    })
}

const COLUMNS: &str = "id, user_name, agent, via, kind, session, command, started_ms, ended_ms, \
                       cols, rows_, bytes, truncated, incomplete";

/// The newest recordings that match, newest first, and the cursor of the
/// next (older) page if there is one.
pub async fn list(store: &Store, f: &Filter) -> Result<(Vec<Meta>, Option<String>), StoreError> {
    enum Value {
        Int(i64),
        Text(String),
    }
    let mut conditions: Vec<(String, Vec<Value>)> = Vec::new();
    if let Some(u) = &f.user {
        conditions.push(("user_name = ?".into(), vec![Value::Text(u.clone())]));
    }
    if let Some(a) = &f.agent {
        conditions.push(("agent = ?".into(), vec![Value::Text(a.clone())]));
    }
    if let Some(t) = f.since_ms {
        conditions.push(("started_ms >= ?".into(), vec![Value::Int(t)]));
    }
    if let Some(t) = f.until_ms {
        conditions.push(("started_ms < ?".into(), vec![Value::Int(t)]));
    }
    if let Some(t) = &f.text {
        let escaped = t
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        conditions.push((
            "LOWER(command) LIKE ? ESCAPE '\\'".into(),
            vec![Value::Text(format!("%{escaped}%"))],
        ));
    }
    if let Some(c) = &f.before {
        conditions.push((
            "(started_ms < ? OR (started_ms = ? AND id < ?))".into(),
            vec![
                Value::Int(c.started_ms),
                Value::Int(c.started_ms),
                Value::Text(c.id.clone()),
            ],
        ));
    }
    // Numbered placeholders in the order of the values.
    let mut sql = format!("SELECT {COLUMNS} FROM recordings");
    let mut values = Vec::new();
    for (i, (condition, vs)) in conditions.into_iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        let mut parts = condition.split('?');
        sql.push_str(parts.next().unwrap_or_default());
        for (part, v) in parts.zip(vs) {
            values.push(v);
            sql.push_str(&format!("${}{part}", values.len()));
        }
    }
    let limit = f.limit.clamp(1, 1000);
    sql.push_str(&format!(
        " ORDER BY started_ms DESC, id DESC LIMIT {}",
        limit + 1
    ));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for v in values {
        query = match v {
            Value::Int(i) => query.bind(i),
            Value::Text(t) => query.bind(t),
        };
    }
    let rows = query.fetch_all(&store.pool).await?;
    let mut found = rows.iter().map(meta_of).collect::<Result<Vec<_>, _>>()?;
    let next = (found.len() > limit as usize).then(|| {
        found.truncate(limit as usize);
        found.last().map(|m| {
            Cursor {
                started_ms: m.started_ms,
                id: m.id.clone(),
            }
            .text()
        })
    });
    Ok((found, next.flatten()))
}

/// One recording's index entry.
pub async fn find(store: &Store, id: &str) -> Result<Option<Meta>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM recordings WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.as_ref().map(meta_of).transpose()?)
}

/// Chunks read per query while a recording is sent.
const READ_CHUNKS: i64 = 8;

/// The asciicast file of recording `id`, decompressed, from chunk
/// `from`: the next piece and where to go on, `None` at the end.
pub async fn read_from(
    store: &Store,
    id: &str,
    from: i64,
) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT n, data FROM recording_chunks WHERE recording = $1 AND n >= $2
         ORDER BY n LIMIT $3",
    )
    .bind(id)
    .bind(from)
    .bind(READ_CHUNKS)
    .fetch_all(&store.pool)
    .await?;
    let Some(last) = rows.last().map(|(n, _)| *n) else {
        return Ok(None);
    };
    let text = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (_, data) in rows {
            let mut gz = flate2::read::GzDecoder::new(&data[..]);
            std::io::copy(&mut gz, &mut out)?;
        }
        Ok::<_, std::io::Error>(out)
    })
    .await
    .map_err(|e| StoreError::Journal(format!("reading a recording failed: {e}")))?
    .map_err(|e| StoreError::Journal(format!("a recording's chunk is damaged: {e}")))?;
    Ok(Some((text, last + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_between_outputs_waits_for_its_end() {
        let mut s = State {
            started: Instant::now(),
            lines: Vec::new(),
            oldest: None,
            carry: Vec::new(),
            size: (80, 24),
            bytes: 0,
            next_chunk: 0,
            truncated: false,
            incomplete: false,
            ended: false,
            bare_lines: false,
        };
        let euro = "€".as_bytes();
        assert_eq!(s.text_of(&[b'a', euro[0]]), "a");
        assert_eq!(s.text_of(&euro[1..2]), "");
        assert_eq!(s.text_of(&[euro[2], b'b']), "€b");
        assert_eq!(s.text_of(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"😀".as_bytes()[..3]), 3);
    }

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let c = Cursor {
            started_ms: 12,
            id: "0123456789abcdef0123456789abcdef".into(),
        };
        assert_eq!(Cursor::parse(&c.text()), Some(c));
        assert_eq!(Cursor::parse("12-xyz"), None);
        assert_eq!(Cursor::parse("-1-0123456789abcdef0123456789abcdef"), None);
        assert_eq!(Cursor::parse("12"), None);
    }
}
