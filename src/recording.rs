//! Session recordings: what a console command or shell printed, as an
//! asciicast v2 file (a JSON header line, then one `[time, code, data]`
//! line per event), compressed into the store.
//!
//! A [`Recorder`] belongs to one console command or shell attachment. It
//! turns output, resizes (and, with `--record-input`, typed input) into
//! asciicast lines in memory, which the command's pump hands to the
//! writer task a chunk at a time (every [`CHUNK_BYTES`] or
//! [`FLUSH_EVERY`]). Each chunk is stored as its own gzip member, so a
//! server that dies loses at most the last couple of seconds, and a
//! recording can be read while it is still being made.
//!
//! Nothing is dropped for want of room: a command printing faster than
//! the store writes waits for it (see [`Recorder`]). Every bound has a
//! flag or a constant: past `--recording-max-bytes` a recording keeps its
//! first half and its latest half, with a marker where output was cut out
//! (so that printing a lot first cannot hide what comes after); the
//! oldest finished recordings go, the heaviest user's first, while all
//! take more than `--recording-max-total-bytes`; recordings older than
//! `--recording-retention` are removed. A write the store refused marks
//! its recording `incomplete`, and `/readyz` reports the failing store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Row;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::audit::now_ms;
use crate::store::{Store, StoreError};

/// Lines are handed to the writer once this many bytes are waiting.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;
/// ...or once the oldest waited this long.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Bytes of events waiting past which typed input is not recorded.
const INPUT_PILE: usize = 4 * CHUNK_BYTES;
/// Text in one output event at most: longer output is several events.
const EVENT_TEXT: usize = 16 * 1024;
/// Bytes of chunks handed to the writer and not yet stored, all
/// recordings together: the memory recordings hold beyond what each is
/// making.
pub(crate) const IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;
/// Chunks of one recording handed to the writer and not yet stored.
pub(crate) const IN_FLIGHT_PER_RECORDING: usize = 4;
/// Writes waiting for the writer (their bytes bounded above).
const QUEUE: usize = 4096;
/// How long a recording's start waits for the writer before the command
/// runs unrecorded (a stuck store; counted and reported), and for room
/// for its header: the console waits meanwhile.
const BEGIN_WAIT: Duration = Duration::from_secs(2);
/// Writes per transaction.
const BATCH: usize = 64;
/// How long `/readyz` reports lost recordings after the last one.
const LOSS_REPORTED: Duration = Duration::from_secs(300);

/// The settings of recordings (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The most asciicast bytes one recording keeps (before compression):
    /// its first half and its latest half.
    pub max_bytes: u64,
    /// Record what users type too (off by default: it holds passwords).
    pub record_input: bool,
    /// How long recordings are kept; `None`: for ever.
    pub retention: Option<Duration>,
    /// The most bytes (compressed) all recordings together may take in
    /// the store; the oldest finished ones go first.
    pub max_total: u64,
    /// This server's name (`--server-name`): whose unfinished recordings
    /// a restart closes.
    pub server: String,
}

/// Stored bytes written between two checks of the total.
const CHECK_TOTAL_EVERY: u64 = 16 * 1024 * 1024;

/// The recordings of one server: a handle on the writer.
#[derive(Clone)]
pub struct Recordings {
    /// `None`: nothing is recorded (`--audit off`).
    queue: Option<mpsc::Sender<Write>>,
    /// One permit per byte of chunks in flight ([`IN_FLIGHT_BYTES`]).
    room: Arc<Semaphore>,
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

impl Health {
    /// The store refused a write: reported until one succeeds.
    fn failed(&self, e: &sqlx::Error) {
        self.failing.store(true, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }

    /// `n` writes were lost: counted, in the metrics, and reported for a
    /// while; returns how many were lost before, and when the last was.
    fn lose(&self, n: u64) -> (u64, u64) {
        crate::server::metrics::recording_writes_lost(n);
        let before = self.lost.fetch_add(n, Ordering::Relaxed);
        let last = self.last_loss_ms.swap(now_ms() as u64, Ordering::Relaxed);
        (before, last)
    }
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
    /// A recording's index entry, and the server making it.
    Begin(Box<Meta>, String),
    Chunk {
        id: Arc<str>,
        n: i64,
        /// Its events as the recorder keeps them (see [`push_raw`]): the
        /// writer makes them JSON lines.
        raw: Vec<u8>,
        /// The time of its first event, in microseconds from the start.
        first_at_us: i64,
        /// Chunks before it were skipped (past half the cap, the store
        /// busy), from this time on: a marker says so.
        gap_at_us: Option<i64>,
        /// Its room (this recording's, and all recordings'), given back
        /// once it is stored.
        _held: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    },
    Session {
        id: Arc<str>,
        session: String,
    },
    End {
        id: Arc<str>,
        ended_ms: i64,
    },
}

impl Write {
    fn id(&self) -> &str {
        match self {
            Write::Begin(m, _) => &m.id,
            Write::Chunk { id, .. } | Write::Session { id, .. } | Write::End { id, .. } => id,
        }
    }
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
            (settings.max_bytes, settings.max_total),
            shutdown,
        ));
        (
            Recordings {
                queue: Some(tx),
                room: Arc::new(Semaphore::new(IN_FLIGHT_BYTES)),
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
            room: Arc::new(Semaphore::new(0)),
            settings: Arc::new(Settings {
                max_bytes: 0,
                record_input: false,
                retention: None,
                max_total: 0,
                server: String::new(),
            }),
            health: Arc::default(),
            store,
        }
    }

    /// Whether typed input is recorded.
    pub fn records_input(&self) -> bool {
        self.settings.record_input
    }

    /// Begins a recording, its header already on its way to the store;
    /// `None` when recordings are off, or when the writer has had no room
    /// for [`BEGIN_WAIT`] (the store is stuck: counted, logged and
    /// reported by `/readyz`).
    pub async fn begin(&self, start: Start) -> Option<Arc<Recorder>> {
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
        let begin = Write::Begin(Box::new(meta), self.settings.server.clone());
        if tokio::time::timeout(BEGIN_WAIT, queue.send(begin))
            .await
            .map_or(true, |sent| sent.is_err())
        {
            self.lost("a recording could not begin");
            return None;
        }
        let mut state = State::new((start.cols, start.rows), self.settings.max_bytes / 2);
        state.bare_lines = start.bare_lines;
        push_raw(&mut state.lines, 0, HEADER, &header.to_string());
        state.oldest = Some(Instant::now());
        let recorder = Arc::new(Recorder {
            id,
            recordings: self.clone(),
            queue,
            own: Arc::new(Semaphore::new(IN_FLIGHT_PER_RECORDING)),
            state: Mutex::new(state),
            input_waiting: tokio::sync::Notify::new(),
        });
        // The header at once: a live recording is a valid file from the
        // start. A console waits for this: not for ever (the header then
        // goes with the next chunk).
        let _ = tokio::time::timeout(BEGIN_WAIT, recorder.send_lines(true)).await;
        Some(recorder)
    }

    fn lost(&self, what: &str) {
        let (before, last) = self.health.lose(1);
        // Once a minute in the log, not once a chunk.
        if before == 0 || (now_ms() as u64).saturating_sub(last) > 60_000 {
            tracing::error!(
                lost = before + 1,
                what,
                "recordings are losing output: the store is failing or stuck"
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

/// One recording being made. Output, input and resizes are added to it
/// at once (never waiting); the command's pump hands what piled up to the
/// writer ([`Recorder::settle`], [`Recorder::flush_if_due`]), and waits
/// there while this recording has [`IN_FLIGHT_PER_RECORDING`] chunks, or
/// all recordings [`IN_FLIGHT_BYTES`], not yet stored: a command printing
/// faster than the store writes is slowed to its pace, and nothing is
/// dropped. Another user's command waits its turn for room, never longer.
pub struct Recorder {
    id: Arc<str>,
    recordings: Recordings,
    queue: mpsc::Sender<Write>,
    own: Arc<Semaphore>,
    state: Mutex<State>,
    /// Typed input filled a chunk: the pump is woken to hand it over
    /// (input comes outside the pump, and a command printing nothing
    /// would otherwise leave it waiting until [`FLUSH_EVERY`], skipped
    /// past [`INPUT_PILE`] by a fast paste).
    input_waiting: tokio::sync::Notify,
}

struct State {
    started: Instant,
    /// Events not yet handed to the writer (see [`push_raw`]).
    lines: Vec<u8>,
    /// Bytes of asciicast (as the writer will make it) handed to the
    /// writer so far, and of the events waiting.
    sent: u64,
    waiting: u64,
    /// When the last chunk past half the cap was handed over.
    last_tail: Option<Instant>,
    /// Half the cap: past it, chunks the store has no room for are
    /// skipped rather than waited for.
    half: u64,
    /// Chunks were skipped since the last one sent, from this time on.
    gap_at_us: Option<i64>,
    /// Typed input is being skipped: its marker is among the events
    /// already (one per run of skipped input, in its place in time).
    skipping_input: bool,
    /// A chunk taken to be sent whose sending was cut short (its pump
    /// was aborted while it waited for room): sent first, next time.
    in_hand: Option<(Vec<u8>, i64, i64)>,
    /// The newest full chunk skipped past half the cap, kept until a newer
    /// one replaces it, a later chunk is sent or the recording ends: a
    /// flood whose last chunk came while the store was busy still ends
    /// the recording with its very end (before, that chunk was dropped,
    /// and the recording showed the marker, then only what followed it).
    newest_skipped: Option<(Vec<u8>, i64, i64)>,
    /// The index entry was told the recording ended.
    closed: bool,
    /// When the oldest of them was made.
    oldest: Option<Instant>,
    /// The time of the first of them, in microseconds from the start.
    first_at_us: i64,
    /// The start of a UTF-8 character whose end has not come yet.
    carry: Vec<u8>,
    size: (u16, u16),
    /// A size not yet recorded: resizes without output between them are
    /// one event (a page cannot fill a recording with resizes).
    pending_size: Option<(u16, u16)>,
    next_chunk: i64,
    ended: bool,
    bare_lines: bool,
}

impl Recorder {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether typed input is recorded (it comes outside the pump).
    pub fn records_input(&self) -> bool {
        self.recordings.records_input()
    }

    /// Output the page was sent (stdout and stderr alike, as a terminal
    /// shows them); [`Recorder::settle`] next.
    pub fn output(&self, data: &[u8]) {
        self.with(|s| {
            let data = s.kept_of(data);
            // Past half the cap, while chunks are being skipped anyway, a
            // full chunk waiting (outputs recorded together, before the
            // next settle) is skipped here at once, as `send_lines` would:
            // kept as the newest skipped. (Before, all that waited was
            // dropped: a flood's last output followed by a few bytes in
            // the same batch left the recording without the flood's end.)
            if s.sent >= s.half && s.lines.len() >= CHUNK_BYTES && s.skipping() {
                while let Some(chunk) = s.take_chunk(false) {
                    s.skip_chunk(chunk);
                }
            }
            // Output is nearly always whole UTF-8: then it is used as it
            // is, without a copy.
            let owned;
            let mut text: &str = match (s.carry.is_empty(), std::str::from_utf8(data)) {
                (true, Ok(text)) => text,
                (true, Err(e)) if e.error_len().is_none() => {
                    let (whole, cut) = data.split_at(e.valid_up_to());
                    s.carry.extend_from_slice(cut);
                    std::str::from_utf8(whole).unwrap_or_default()
                }
                _ => {
                    owned = s.text_of(data);
                    &owned
                }
            };
            let replaced;
            if s.bare_lines
                && let Some(crlf) = crlf_lines(text)
            {
                replaced = crlf;
                text = &replaced;
            }
            // A flood's outputs come 64–256 KiB at a time: room for a chunk and
            // the output after it at once, rather than doubling the buffer
            // (and copying it) output by output. Small outputs (a
            // keystroke's echo) keep small buffers.
            if text.len() >= EVENT_TEXT && s.lines.capacity() < 2 * CHUNK_BYTES {
                let more = 2 * CHUNK_BYTES - s.lines.len();
                s.lines.reserve_exact(more);
            }
            s.size_event();
            // Long output in events of at most EVENT_TEXT bytes, so that
            // chunks keep near their size.
            let mut rest = text;
            while !rest.is_empty() {
                let mut cut = rest.len().min(EVENT_TEXT);
                while !rest.is_char_boundary(cut) {
                    cut -= 1;
                }
                let (piece, after) = rest.split_at(cut);
                s.event(b'o', piece);
                rest = after;
            }
        });
    }

    /// What the user typed (only with `--record-input`).
    pub fn input(&self, data: &str) {
        if !self.recordings.records_input() {
            return;
        }
        let full = self.with_result(|s| {
            // Input comes while the pump may wait (for the store): past a
            // few chunks waiting, it is skipped, never piled up. Its
            // marker goes among the events, where the skipping began (a
            // gap marker goes before the next chunk sent, which holds
            // events older than this).
            if s.lines.len() >= INPUT_PILE {
                if !std::mem::replace(&mut s.skipping_input, true) {
                    s.event(b'm', INPUT_SKIP_MARKER);
                }
                return false;
            }
            s.skipping_input = false;
            s.size_event();
            s.event(b'i', data);
            s.lines.len() >= CHUNK_BYTES
        });
        if full == Some(true) {
            self.input_waiting.notify_one();
        }
    }

    /// Typed input filled a chunk: the pump should [`Recorder::settle`].
    pub async fn input_waiting(&self) {
        self.input_waiting.notified().await;
    }

    /// The terminal's new size, recorded before the next output.
    pub fn resize(&self, cols: u16, rows: u16) {
        self.with(|s| s.pending_size = Some((cols, rows)));
    }

    /// The shell session's id, once the agent says it.
    pub async fn session(&self, session: &str) {
        let write = Write::Session {
            id: self.id.clone(),
            session: session.to_owned(),
        };
        let _ = self.queue.send(write).await;
    }

    /// Hands full chunks to the writer (waiting for room).
    pub async fn settle(&self) {
        self.send_lines(false).await;
    }

    /// Hands what waited [`FLUSH_EVERY`] or longer to the writer.
    pub async fn flush_if_due(&self) {
        let due = self
            .state
            .lock()
            .is_ok_and(|s| s.oldest.is_some_and(|t| t.elapsed() >= FLUSH_EVERY));
        if due {
            self.send_lines(true).await;
        }
    }

    /// When the lines waiting should be flushed, if any wait.
    pub fn due(&self) -> Option<Instant> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.oldest.map(|t| t + FLUSH_EVERY))
    }

    /// Ends the recording: what waits is written, and the index says so.
    pub async fn end(&self) {
        let open = self.state.lock().is_ok_and(|mut s| {
            if !s.ended {
                s.finish();
            }
            !s.closed
        });
        if !open {
            return;
        }
        self.send_lines(true).await;
        // Reserved first: a pump cut short here loses nothing (its Drop
        // ends the recording instead).
        if let Ok(slot) = self.queue.reserve().await {
            slot.send(Write::End {
                id: self.id.clone(),
                ended_ms: now_ms(),
            });
            if let Ok(mut s) = self.state.lock() {
                s.closed = true;
            }
        }
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        let _ = self.with_result(f);
    }

    fn with_result<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        match self.state.lock() {
            Ok(mut s) if !s.ended => Some(f(&mut s)),
            _ => None,
        }
    }

    /// Sends the waiting events as chunks of about [`CHUNK_BYTES`]: all
    /// of them, or (`all` false) only while a full chunk waits. Until half
    /// the cap it waits for room; past it, a full chunk the store has no
    /// room for is skipped (the newest output is what the recording keeps
    /// of a flood, and the command never waits), and a marker says so.
    /// Cut short (its pump aborted), it loses nothing it took: the chunk
    /// goes back in hand, for the next call or the recorder's Drop.
    async fn send_lines(&self, all: bool) {
        loop {
            let taken = {
                let Ok(mut s) = self.state.lock() else { return };
                let tail = s.sent >= s.half;
                let chunk = match s.in_hand.take() {
                    Some(c) => Some(c),
                    // Older than what waits: first, once all is sent.
                    None if all && s.newest_skipped.is_some() => s.newest_skipped.take(),
                    None => s.take_chunk(all),
                };
                // A gap at the very end has a chunk of its own: its marker.
                let chunk = chunk.or_else(|| {
                    let at = s.gap_at_us.filter(|_| all)?;
                    let n = s.next_chunk;
                    s.next_chunk += 1;
                    Some((Vec::new(), n, at))
                });
                chunk.map(|c| (c, tail))
            };
            let Some((chunk, tail)) = taken else {
                return;
            };
            let cost = u32::try_from(chunk.0.len().clamp(1, IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
            let mut taken = InHand {
                state: &self.state,
                chunk: Some(chunk),
            };
            let held = if tail && !all {
                // At most one full chunk per TAIL_EVERY, and only with room.
                let recent = self.state.lock().is_ok_and(|s| s.skipping());
                let own = self.own.clone().try_acquire_owned();
                let room = self.recordings.room.clone().try_acquire_many_owned(cost);
                match (own, room, recent) {
                    (Ok(own), Ok(room), false) => {
                        if let Ok(mut s) = self.state.lock() {
                            s.last_tail = Some(Instant::now());
                            // This one is newer: the one kept goes.
                            s.drop_newest_skipped();
                        }
                        (own, room)
                    }
                    _ => {
                        if let (Some(chunk), Ok(mut s)) = (taken.chunk.take(), self.state.lock()) {
                            s.skip_chunk(chunk);
                        }
                        continue;
                    }
                }
            } else {
                // Room first for this recording, then among all of them
                // (in the order asked: fair between users).
                let Ok(own) = self.own.clone().acquire_owned().await else {
                    return;
                };
                let Ok(room) = self.recordings.room.clone().acquire_many_owned(cost).await else {
                    return;
                };
                (own, room)
            };
            let Ok(slot) = self.queue.reserve().await else {
                return;
            };
            let Some((raw, n, first_at_us)) = taken.chunk.take() else {
                return;
            };
            let gap_at_us = self.state.lock().ok().and_then(|mut s| s.gap_at_us.take());
            slot.send(Write::Chunk {
                id: self.id.clone(),
                n,
                raw,
                first_at_us,
                gap_at_us,
                _held: held,
            });
        }
    }
}

/// A chunk on its way to the writer: back in hand if the way is cut.
struct InHand<'a> {
    state: &'a Mutex<State>,
    chunk: Option<(Vec<u8>, i64, i64)>,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take()
            && let Ok(mut s) = self.state.lock()
        {
            s.in_hand = Some(chunk);
        }
    }
}

impl Drop for Recorder {
    /// A recording whose pump was cut short (its console closed while it
    /// waited) is ended all the same, by a task of its own.
    fn drop(&mut self) {
        let Ok(s) = self.state.get_mut() else { return };
        if s.closed {
            return;
        }
        if !s.ended {
            s.finish();
        }
        let mut pieces: Vec<_> = s.in_hand.take().into_iter().collect();
        pieces.extend(s.newest_skipped.take());
        while let Some(piece) = s.take_chunk(true) {
            pieces.push(piece);
        }
        let mut gap = s.gap_at_us.take();
        if let (true, Some(at)) = (pieces.is_empty(), gap) {
            pieces.push((Vec::new(), s.next_chunk, at));
        }
        let (id, queue) = (self.id.clone(), self.queue.clone());
        let (own, room) = (self.own.clone(), self.recordings.room.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for (raw, n, first_at_us) in pieces {
                    let cost =
                        u32::try_from(raw.len().clamp(1, IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
                    let (Ok(own), Ok(room)) = (
                        own.clone().acquire_owned().await,
                        room.clone().acquire_many_owned(cost).await,
                    ) else {
                        return;
                    };
                    let chunk = Write::Chunk {
                        id: id.clone(),
                        n,
                        raw,
                        first_at_us,
                        gap_at_us: gap.take(),
                        _held: (own, room),
                    };
                    if queue.send(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = queue
                    .send(Write::End {
                        id,
                        ended_ms: now_ms(),
                    })
                    .await;
            });
        }
    }
}

impl State {
    /// A recording just begun, of a terminal of `size`, its cap's half
    /// `half`.
    fn new(size: (u16, u16), half: u64) -> State {
        State {
            started: Instant::now(),
            lines: Vec::new(),
            sent: 0,
            waiting: 0,
            last_tail: None,
            half,
            gap_at_us: None,
            skipping_input: false,
            in_hand: None,
            newest_skipped: None,
            closed: false,
            oldest: None,
            first_at_us: 0,
            carry: Vec::new(),
            size,
            pending_size: None,
            next_chunk: 0,
            ended: false,
            bare_lines: false,
        }
    }

    /// What of `data` is recorded. Past half the cap, while a chunk was
    /// handed over less than [`TAIL_EVERY`] ago, `send_lines` skips every
    /// full chunk waiting and keeps only what is left after the last one:
    /// then, of output larger than a chunk, only its newest chunk (from the
    /// start of a character) is looked at and copied, and what waited
    /// before it is dropped and marked, as it would have been. (Before,
    /// all of it was checked and copied, then skipped a chunk at a time,
    /// each skip copying the rest.) A large output after a quiet spell is
    /// taken whole, as before.
    fn kept_of<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.sent < self.half || data.len() <= CHUNK_BYTES || !self.skipping() {
            return data;
        }
        let first = if self.lines.is_empty() {
            self.started.elapsed().as_micros() as i64
        } else {
            self.first_at_us
        };
        self.skip_waiting(first);
        self.carry.clear();
        let mut from = data.len() - CHUNK_BYTES;
        for _ in 0..3 {
            if data[from] & 0xC0 == 0x80 {
                from += 1;
            }
        }
        &data[from..]
    }

    /// A chunk was handed over less than [`TAIL_EVERY`] ago: past half the
    /// cap, full chunks waiting are skipped rather than sent.
    fn skipping(&self) -> bool {
        self.last_tail.is_some_and(|t| t.elapsed() < TAIL_EVERY)
    }

    /// Skips a full chunk past half the cap: it is kept as the newest
    /// skipped, and the one it replaces is dropped (and marked).
    fn skip_chunk(&mut self, chunk: (Vec<u8>, i64, i64)) {
        self.drop_newest_skipped();
        self.newest_skipped = Some(chunk);
    }

    /// Drops the newest skipped chunk, if one is kept (something newer is
    /// sent, or dropped), marking a gap from it.
    fn drop_newest_skipped(&mut self) {
        if let Some((_, _, first_at_us)) = self.newest_skipped.take() {
            self.gap_at_us.get_or_insert(first_at_us);
            // An input marker in it went with it: input skipped from now
            // on is marked again.
            self.skipping_input = false;
        }
    }

    /// Drops the events waiting, marking a gap from `at_us` (or from an
    /// earlier gap not yet marked).
    fn skip_waiting(&mut self, at_us: i64) {
        self.drop_newest_skipped();
        self.gap_at_us.get_or_insert(at_us);
        self.lines.clear();
        self.waiting = 0;
        self.oldest = None;
        self.skipping_input = false;
    }

    /// Adds one event: `[seconds, code, data]`, encoded by the writer.
    fn event(&mut self, code: u8, data: &str) {
        let at_us = self.started.elapsed().as_micros() as i64;
        if self.lines.is_empty() {
            self.first_at_us = at_us;
        }
        push_raw(&mut self.lines, at_us, code, data);
        // Counted only while it matters (before half the cap).
        if self.sent < self.half {
            self.waiting += encoded_len(data);
        }
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// The size the page asked for, as an event, if it changed.
    fn size_event(&mut self) {
        if let Some(size) = self.pending_size.take()
            && size != self.size
        {
            self.size = size;
            self.event(b'r', &format!("{}x{}", size.0, size.1));
        }
    }

    /// No more events: a cut character's start and a pending size are
    /// written out.
    fn finish(&mut self) {
        let rest = std::mem::take(&mut self.carry);
        if !rest.is_empty() {
            let text = String::from_utf8_lossy(&rest).into_owned();
            self.event(b'o', &text);
        }
        self.size_event();
        self.ended = true;
    }

    /// The next chunk to send: whole events, about [`CHUNK_BYTES`] (one
    /// event more than that at most), when a full one waits or `all`.
    fn take_chunk(&mut self, all: bool) -> Option<(Vec<u8>, i64, i64)> {
        if self.lines.is_empty() || (!all && self.lines.len() < CHUNK_BYTES) {
            return None;
        }
        // After the last event that ends within the chunk, or the first.
        let mut cut = 0;
        while cut < self.lines.len() {
            let next = cut + raw_len(&self.lines[cut..]);
            if cut > 0 && next > CHUNK_BYTES {
                break;
            }
            cut = next;
        }
        let rest = self.lines.split_off(cut.min(self.lines.len()));
        let chunk = std::mem::replace(&mut self.lines, rest);
        let first_at_us = self.first_at_us;
        if self.lines.is_empty() {
            self.oldest = None;
        } else {
            self.first_at_us = raw_at(&self.lines);
        }
        // What the chunk will take as asciicast, near enough (the rest's
        // share is counted again with it).
        let share = if self.lines.is_empty() {
            self.waiting
        } else {
            self.waiting * chunk.len() as u64 / (chunk.len() + self.lines.len()) as u64
        };
        self.waiting -= share;
        self.sent += share;
        let n = self.next_chunk;
        self.next_chunk += 1;
        Some((chunk, n, first_at_us))
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

/// `text` with every `\n` made `\r\n` (a recording of piped output is
/// played in a terminal), or `None` when it has none: found with the SIMD
/// search, as a flood's output is scanned whole.
fn crlf_lines(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut at = memchr::memchr(b'\n', bytes)?;
    let mut out = String::with_capacity(text.len() + text.len() / 16 + 1);
    let mut from = 0;
    loop {
        out.push_str(&text[from..at]);
        out.push_str("\r\n");
        from = at + 1;
        match memchr::memchr(b'\n', &bytes[from..]) {
            Some(next) => at = from + next,
            None => break,
        }
    }
    out.push_str(&text[from..]);
    Some(out)
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

/// About the size of `text` in an asciicast line: a control character is
/// six bytes there (`\u0000`), a quote or backslash two, the rest as is,
/// plus the time and the code.
fn encoded_len(text: &str) -> u64 {
    let escaped = text
        .bytes()
        .map(|b| match b {
            // \b \t \n \f \r
            0x08 | 0x09 | 0x0a | 0x0c | 0x0d | b'"' | b'\\' => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum::<u64>();
    text.len() as u64 + escaped + 24
}

/// Past half its cap, a recording hands over at most one full chunk per
/// this time while output floods (the rest is skipped, and marked).
pub(crate) const TAIL_EVERY: Duration = Duration::from_millis(100);

/// The header line's code in the recorder's events (written as it is).
const HEADER: u8 = b'h';
/// An event's fixed part: its time (8 bytes), code (1), text length (4).
const RAW_HEAD: usize = 13;

/// Appends an event as the recorder keeps it: its time in microseconds
/// (little-endian), its code, its text's length, the text. Making JSON of
/// it is left to the writer, off the command's path, and is never done
/// for a chunk that is skipped.
fn push_raw(buf: &mut Vec<u8>, at_us: i64, code: u8, text: &str) {
    buf.extend_from_slice(&at_us.to_le_bytes());
    buf.push(code);
    buf.extend_from_slice(&(text.len() as u32).to_le_bytes());
    buf.extend_from_slice(text.as_bytes());
}

/// The size of the first event in `raw`.
fn raw_len(raw: &[u8]) -> usize {
    let len = raw
        .get(9..13)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    RAW_HEAD + len
}

/// The time of the first event in `raw`.
fn raw_at(raw: &[u8]) -> i64 {
    raw.get(..8)
        .map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

/// The recorder's events as asciicast lines, and whether a marker is
/// among them (something was left out).
fn encode(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut marked = false;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 4);
    while raw.len() >= RAW_HEAD {
        let at_us = raw_at(raw);
        let code = raw[8];
        let end = raw_len(raw).min(raw.len());
        let text = std::str::from_utf8(&raw[RAW_HEAD..end]).unwrap_or_default();
        if code == HEADER {
            out.extend_from_slice(text.as_bytes());
        } else {
            marked |= code == b'm';
            let seconds = at_us as f64 / 1e6;
            let code = (code as char).to_string();
            let _ = serde_json::to_writer(&mut out, &(seconds, code, text));
        }
        out.push(b'\n');
        raw = &raw[end..];
    }
    (out, marked)
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Write>,
    health: Arc<Health>,
    (max_bytes, max_total): (u64, u64),
    shutdown: CancellationToken,
) {
    let mut w = Writer {
        store,
        health,
        planner: Some(Planner {
            half: (max_bytes / 2).max(1),
            rolls: HashMap::new(),
            unborn: HashSet::new(),
        }),
        damaged: HashSet::new(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    // What all recordings take: counted from the store at the start and
    // then by what this server writes, and counted again from the store
    // each time it passes the cap (other servers on the store write too)
    // or [`CHECK_TOTAL_EVERY`] has been written.
    let mut total: Option<u64> = None;
    let mut written = 0;
    let mut stuck = false;
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
        crate::store::gather(
            &mut rx,
            &mut batch,
            BATCH,
            LINGER,
            &shutdown,
            holds_a_full_chunk,
        )
        .await;
        let bytes = w.write(std::mem::take(&mut batch)).await;
        written += bytes;
        total = total.map(|t| t + bytes);
        // Over the cap and nothing more to remove (live recordings): asked
        // again only after CHECK_TOTAL_EVERY more, not after every batch.
        let over = total.is_none_or(|t| t > max_total) && !stuck;
        if over || written >= CHECK_TOTAL_EVERY {
            written = 0;
            match keep_within(&w.store, max_total).await {
                Ok(left) => {
                    stuck = left > max_total;
                    total = Some(left);
                }
                Err(e) => {
                    total = None;
                    tracing::warn!(error = %e, "cannot remove recordings over the total cap");
                }
            }
        }
        if shutdown.is_cancelled() && rx.is_empty() && rx.is_closed() {
            return;
        }
    }
}

/// How long the writer waits for more writes once one has come (a group
/// commit): 10 ms. A transaction costs several round trips to the store's
/// connection thread and a sync to disk; a short command's recording
/// (its start, its output, its end) comes within a few milliseconds, which
/// one transaction can take. The price: a server that crashes loses up to
/// 10 ms more of what it was recording.
const LINGER: Duration = Duration::from_millis(10);

/// Whether `batch`'s chunks hold half [`CHUNK_BYTES`] of events or more:
/// a flood's chunks are full ones (output events are at most
/// [`EVENT_TEXT`]; a chunk cut short before a large pasted input is
/// followed at once by that input's, larger one), and go without waiting
/// for more, as a recording has only [`IN_FLIGHT_PER_RECORDING`] in
/// flight, which a wait would hold up.
fn holds_a_full_chunk(batch: &[Write]) -> bool {
    let bytes: usize = batch
        .iter()
        .map(|w| match w {
            Write::Chunk { raw, .. } => raw.len(),
            _ => 0,
        })
        .sum();
    bytes >= CHUNK_BYTES / 2
}

/// What the writer knows of a recording being made: how much of its cap
/// its chunks take, to keep its first half and its latest half.
#[derive(Default)]
struct Roll {
    /// Bytes of its first chunks, kept whatever follows.
    head: u64,
    /// Output was cut out already: the marker is written.
    cut: bool,
    /// The marker's size.
    marker: u64,
    /// The chunks after the head, oldest first: (n, bytes, first event's
    /// time in microseconds).
    tail: VecDeque<(i64, u64, i64)>,
    tail_bytes: u64,
}

/// The marker written in place of the first chunk cut out.
const CUT_MARKER: &str = "output cut here: past --recording-max-bytes a recording keeps its first half and its latest half";

/// A planned write, its chunk not yet compressed.
enum Op {
    Begin(Box<Meta>, String),
    Insert {
        id: Arc<str>,
        n: i64,
        lines: Vec<u8>,
        /// The recording's size as kept, with this chunk.
        kept: u64,
        _held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    },
    /// Chunk `n` becomes the cut's marker.
    Mark {
        id: Arc<str>,
        n: i64,
        line: Vec<u8>,
    },
    /// Chunk `n` is cut out.
    Delete {
        id: Arc<str>,
        n: i64,
    },
    Session {
        id: Arc<str>,
        session: String,
    },
    End {
        id: Arc<str>,
        ended_ms: i64,
    },
    /// Its output was cut (its marker written in this batch).
    Truncated {
        id: Arc<str>,
    },
}

/// A planned write with its chunk compressed.
enum Ready {
    Chunk {
        id: Arc<str>,
        n: i64,
        data: Vec<u8>,
        bytes: u64,
        kept: Option<u64>,
        /// Its room, given back once it is stored (or given up).
        _held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    },
    Other(Op),
}

/// Ids the writer remembers (recordings whose start, or some write, the
/// store refused) at most; past it they are forgotten, with a warning.
const REMEMBERED: usize = 100_000;

struct Writer {
    store: Store,
    health: Arc<Health>,
    /// Lent to the blocking task that plans and compresses each batch.
    planner: Option<Planner>,
    /// Recordings a refused write left with a gap, marked `incomplete`
    /// once the store works again.
    damaged: HashSet<Arc<str>>,
}

/// What the writer knows to plan its writes.
struct Planner {
    /// Half the cap of one recording.
    half: u64,
    /// The recordings being made (begun and not ended) on this server.
    rolls: HashMap<Arc<str>, Roll>,
    /// Recordings whose start the store refused: their writes are skipped
    /// (they would have no index entry).
    unborn: HashSet<Arc<str>>,
}

/// The marker written where typed input began to be skipped.
const INPUT_SKIP_MARKER: &str = "input skipped here: typed faster than the store could keep it, input is not recorded until the store catches up";
/// The marker written where chunks were skipped.
const SKIP_MARKER: &str = "output skipped here: past half --recording-max-bytes, output the store could not keep up with is skipped";

impl Planner {
    /// Turns a batch of writes into the store's operations, cutting
    /// recordings past their cap.
    fn plan(&mut self, writes: Vec<Write>) -> Vec<Op> {
        let mut ops: Vec<Op> = Vec::with_capacity(writes.len());
        // Where each chunk of this batch is, to cut it before it is
        // compressed when a later one of the same batch pushes it out.
        let mut placed: HashMap<(Arc<str>, i64), usize> = HashMap::new();
        for write in writes {
            if self.unborn.contains(write.id()) {
                if let Write::End { id, .. } = &write {
                    self.unborn.remove(id);
                }
                continue;
            }
            match write {
                Write::Begin(meta, server) => {
                    self.rolls.insert(meta.id.as_str().into(), Roll::default());
                    ops.push(Op::Begin(meta, server));
                }
                Write::Session { id, session } => ops.push(Op::Session { id, session }),
                Write::End { id, ended_ms } => {
                    self.rolls.remove(&id);
                    ops.push(Op::End { id, ended_ms });
                }
                Write::Chunk {
                    id,
                    n,
                    raw,
                    first_at_us,
                    gap_at_us,
                    _held,
                } => {
                    let mut lines = Vec::new();
                    if let Some(at_us) = gap_at_us {
                        lines = marker_text(at_us, SKIP_MARKER);
                        ops.push(Op::Truncated { id: id.clone() });
                    }
                    let (events, marked) = encode(&raw);
                    lines.extend(events);
                    drop(raw);
                    if marked && gap_at_us.is_none() {
                        ops.push(Op::Truncated { id: id.clone() });
                    }
                    let roll = self.rolls.entry(id.clone()).or_default();
                    let len = lines.len() as u64;
                    let mut cuts = Vec::new();
                    // The header (chunk 0) is always kept.
                    if n == 0 || (!roll.cut && roll.tail.is_empty() && roll.head + len <= self.half)
                    {
                        roll.head += len;
                    } else {
                        roll.tail.push_back((n, len, first_at_us));
                        roll.tail_bytes += len;
                        while roll.tail_bytes > self.half && roll.tail.len() > 1 {
                            let Some((old, old_len, at_us)) = roll.tail.pop_front() else {
                                break;
                            };
                            roll.tail_bytes -= old_len;
                            let first = !std::mem::replace(&mut roll.cut, true);
                            if first {
                                roll.marker = marker_line(at_us).len() as u64;
                            }
                            cuts.push((old, at_us, first));
                        }
                    }
                    let kept = roll.head + roll.tail_bytes + roll.marker;
                    placed.insert((id.clone(), n), ops.len());
                    ops.push(Op::Insert {
                        id: id.clone(),
                        n,
                        lines,
                        kept,
                        _held: Some(_held),
                    });
                    for (old, at_us, first_cut) in cuts {
                        let line = marker_line(at_us);
                        let here = placed.get(&(id.clone(), old)).copied();
                        match (here, first_cut) {
                            // Cut before it was stored: never compressed.
                            (Some(i), true) => {
                                if let Op::Insert { lines, .. } = &mut ops[i] {
                                    *lines = line;
                                }
                                ops.push(Op::Truncated { id: id.clone() });
                            }
                            (Some(i), false) => {
                                if let Op::Insert { lines, .. } = &mut ops[i] {
                                    lines.clear();
                                }
                            }
                            (None, true) => ops.push(Op::Mark {
                                id: id.clone(),
                                n: old,
                                line,
                            }),
                            (None, false) => ops.push(Op::Delete {
                                id: id.clone(),
                                n: old,
                            }),
                        }
                    }
                }
            }
        }
        ops
    }
}

impl Writer {
    /// Plans, compresses and writes a batch, trying again while the store
    /// fails (a batch it refuses for what it holds: one recording at a
    /// time); returns the compressed bytes written.
    async fn write(&mut self, writes: Vec<Write>) -> u64 {
        let ids: Vec<(Arc<str>, bool)> = writes
            .iter()
            .map(|w| (Arc::<str>::from(w.id()), matches!(w, Write::Begin(..))))
            .collect();
        let Some(mut planner) = self.planner.take() else {
            return 0;
        };
        // Making JSON, planning the cuts and compressing take a while for
        // full chunks: off the runtime's threads.
        let done = tokio::task::spawn_blocking(move || {
            let ops = planner.plan(writes);
            (compress_all(ops), planner)
        })
        .await;
        let (ready, planner) = match done {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "the recordings' writer failed; recordings stop");
                return 0;
            }
        };
        self.planner = Some(planner);
        // On failure: the error, the recordings lost when a refused batch
        // was written one recording at a time (`None`: all of the batch's),
        // and the bytes the others stored.
        let result = match ready {
            Ok(ready) => match store_with_retries(&self.store, &ready, &self.health).await {
                Ok(()) => Ok(stored_bytes(&ready)),
                // Refused for what it holds: each recording on its own, and
                // only those refused again are lost.
                Err(e) if refused_for_its_data(&e) => {
                    let (lost, stored) = write_each(&self.store, &ready).await;
                    if lost.is_empty() {
                        Ok(stored)
                    } else {
                        Err((e, Some(lost), stored))
                    }
                }
                Err(e) => Err((e, None, 0)),
            },
            Err(e) => Err((e, None, 0)),
        };
        match result {
            Ok(bytes) => {
                self.health.failing.store(false, Ordering::Relaxed);
                if !self.damaged.is_empty() {
                    match mark_incomplete(&self.store, &self.damaged).await {
                        Ok(()) => self.damaged.clear(),
                        Err(e) => tracing::warn!(error = %e, "cannot mark recordings incomplete"),
                    }
                }
                bytes
            }
            Err((e, lost, stored)) => {
                let ids: Vec<(Arc<str>, bool)> = match lost {
                    Some(lost) => ids
                        .into_iter()
                        .filter(|(id, _)| lost.contains(id))
                        .collect(),
                    None => ids,
                };
                self.health.failed(&e);
                self.health.lose(ids.len() as u64);
                tracing::error!(error = %e, writes = ids.len(), "recordings could not be stored");
                let Some(planner) = self.planner.as_mut() else {
                    return stored;
                };
                if planner.unborn.len() + self.damaged.len() > REMEMBERED {
                    tracing::warn!("too many damaged recordings to remember; some stay unmarked");
                    planner.unborn.clear();
                    self.damaged.clear();
                }
                for (id, begin) in ids {
                    if begin {
                        planner.rolls.remove(&id);
                        planner.unborn.insert(id);
                    } else {
                        self.damaged.insert(id);
                    }
                }
                stored
            }
        }
    }
}

/// The cut's marker line at `at_us` from the start.
fn marker_line(at_us: i64) -> Vec<u8> {
    marker_text(at_us, CUT_MARKER)
}

/// A marker line saying `text` at `at_us` from the start.
fn marker_text(at_us: i64, text: &str) -> Vec<u8> {
    let seconds = at_us as f64 / 1e6;
    let mut line = serde_json::json!([seconds, "m", text])
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

async fn mark_incomplete(store: &Store, ids: &HashSet<Arc<str>>) -> Result<(), sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    for id in ids {
        sqlx::query("UPDATE recordings SET incomplete = 1 WHERE id = $1")
            .bind(&**id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// One gzip member of `lines` (members one after the other are one gzip
/// stream). Deflated at the fast level (a command's output waits for
/// it), or stored when small (see [`STORE_PLAIN_BYTES`]).
fn compress(lines: &[u8]) -> std::io::Result<Vec<u8>> {
    if lines.len() <= STORE_PLAIN_BYTES {
        return Ok(stored_member(lines));
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(lines.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(lines)?;
    gz.finish()
}

/// Chunks this small are stored in their gzip member without deflate.
///
/// A shell typed in once a second hands its recording a chunk of a few
/// hundred bytes every [`FLUSH_EVERY`], and setting up a deflate
/// compressor (its hash tables allocated and zeroed, over 100 KiB) cost
/// more than everything else the server did for that keystroke: with
/// 3,000 such shells, the recordings' writer took a fifth of the server's
/// CPU. Deflate would save little on so few bytes anyway.
const STORE_PLAIN_BYTES: usize = 2048;

/// A gzip member (RFC 1952) holding `data` in stored deflate blocks
/// (RFC 1951, 3.2.4): no compressor to set up, and any gzip reader takes
/// it.
fn stored_member(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = u16::MAX as usize;
    let blocks = data.len().div_ceil(BLOCK).max(1);
    let mut out = Vec::with_capacity(10 + 5 * blocks + data.len() + 8);
    // Magic, deflate, no flags, no time, no extra flags, unknown OS.
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    let mut pieces = data.chunks(BLOCK).peekable();
    if pieces.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(piece) = pieces.next() {
        // BFINAL on the last block, BTYPE 00 (stored), then LEN and NLEN.
        out.push(u8::from(pieces.peek().is_none()));
        let len = piece.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(piece);
    }
    let mut crc = flate2::Crc::new();
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Writes a batch, trying again (after 0.1 s, doubling) while the store
/// fails, [`ATTEMPTS`] times in all; the commands whose chunks wait are
/// slowed meanwhile (their room is held).
async fn store_with_retries(
    store: &Store,
    ready: &[Ready],
    health: &Health,
) -> Result<(), sqlx::Error> {
    let all: Vec<&Ready> = ready.iter().collect();
    let mut wait = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match write_batch(store, &all).await {
            Ok(()) => return Ok(()),
            // The same writes would be refused again.
            Err(e) if refused_for_its_data(&e) => return Err(e),
            Err(e) if attempt < ATTEMPTS => {
                health.failed(&e);
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

/// The compressed bytes of the chunks among `ready`.
fn stored_bytes<'a>(ready: impl IntoIterator<Item = &'a Ready>) -> u64 {
    ready
        .into_iter()
        .map(|r| match r {
            Ready::Chunk { data, .. } => data.len() as u64,
            Ready::Other(_) => 0,
        })
        .sum()
}

/// The recording a write is for.
fn recording_of(ready: &Ready) -> &str {
    match ready {
        Ready::Chunk { id, .. } => id,
        Ready::Other(op) => match op {
            Op::Begin(meta, _) => &meta.id,
            Op::Insert { id, .. }
            | Op::Mark { id, .. }
            | Op::Delete { id, .. }
            | Op::Session { id, .. }
            | Op::End { id, .. }
            | Op::Truncated { id } => id,
        },
    }
}

/// Whether the store refused a statement for what it held (a constraint,
/// a value it cannot take: PostgreSQL's SQLSTATE classes 22, 23 and 54,
/// SQLite's constraint, too-big and mismatch codes), not for its own state
/// (busy, full, read-only, gone), which waiting may mend. The same writes
/// would be refused again: no use retrying them, while writing each
/// recording on its own finds which it refuses.
fn refused_for_its_data(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if !matches!(db.kind(), sqlx::error::ErrorKind::Other) {
        return true;
    }
    let Some(code) = db.code() else {
        return false;
    };
    match code.parse::<i32>() {
        // SQLite's (extended) result code: its primary code is the low byte.
        Ok(n) => matches!(n & 0xff, 18..=20),
        // A PostgreSQL SQLSTATE.
        Err(_) => code.len() == 5 && ["22", "23", "54"].iter().any(|c| code.starts_with(c)),
    }
}

/// Writes a batch the store refused for what it holds one recording at a
/// time, each in its own transaction, once: what one recording holds that
/// the store will not take loses that recording's writes alone, not those
/// of every recording that happened to share its batch. Stops at the first
/// failure of another kind (the store itself failing: the rest are lost
/// as the batch would have been). Returns the recordings whose writes were
/// lost, and the bytes of chunks stored.
async fn write_each(store: &Store, ready: &[Ready]) -> (HashSet<Arc<str>>, u64) {
    let mut order: Vec<&str> = Vec::new();
    let mut of: HashMap<&str, Vec<&Ready>> = HashMap::new();
    for r in ready {
        let id = recording_of(r);
        of.entry(id)
            .or_insert_with(|| {
                order.push(id);
                Vec::new()
            })
            .push(r);
    }
    let mut lost = HashSet::new();
    let mut stored = 0;
    if order.len() < 2 {
        lost.extend(order.into_iter().map(Arc::from));
        return (lost, stored);
    }
    let mut failing = false;
    for id in order {
        if failing {
            lost.insert(Arc::from(id));
            continue;
        }
        match write_batch(store, &of[id]).await {
            Ok(()) => stored += stored_bytes(of[id].iter().copied()),
            Err(e) => {
                failing = !refused_for_its_data(&e);
                tracing::error!(error = %e, recording = id, "a recording's writes were refused by the store");
                lost.insert(Arc::from(id));
            }
        }
    }
    (lost, stored)
}

fn compress_all(ops: Vec<Op>) -> Result<Vec<Ready>, sqlx::Error> {
    ops.into_iter()
        .filter(|op| !matches!(op, Op::Insert { lines, .. } if lines.is_empty()))
        .map(|op| match op {
            Op::Insert {
                id,
                n,
                lines,
                kept,
                _held,
            } => {
                let data = compress(&lines).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                let bytes = lines.len() as u64;
                Ok(Ready::Chunk {
                    id,
                    n,
                    data,
                    bytes,
                    kept: Some(kept),
                    _held,
                })
            }
            Op::Mark { id, n, line } => {
                let data = compress(&line).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                Ok(Ready::Chunk {
                    id,
                    n,
                    data,
                    bytes: line.len() as u64,
                    kept: None,
                    _held: None,
                })
            }
            other => Ok(Ready::Other(other)),
        })
        .collect()
}

async fn write_batch(store: &Store, ready: &[&Ready]) -> Result<(), sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    // The recordings begun in this batch first, in as few statements as
    // rows allow, and those ended in it last: nothing else of a recording
    // comes before its start or after its end, and with those out of the
    // way the chunks between meet in runs. Short commands, one after the
    // other, each brought six statements of their own.
    let begins: Vec<(&Meta, &str)> = ready
        .iter()
        .filter_map(|r| match *r {
            Ready::Other(Op::Begin(m, server)) => Some((&**m, server.as_str())),
            _ => None,
        })
        .collect();
    for rows in begins.chunks(MAX_ROWS_A_STATEMENT) {
        write_begins(&mut tx, rows).await?;
    }
    let middle: Vec<&Ready> = ready
        .iter()
        .copied()
        .filter(|r| !matches!(r, Ready::Other(Op::Begin(..) | Op::End { .. })))
        .collect();
    let mut rest = &middle[..];
    while !rest.is_empty() {
        // A run of chunks goes in two statements in all, not two each:
        // shells typed in slowly each hand over a small chunk every couple
        // of seconds, and thousands of them made the store's thread the
        // server's busiest, mostly handing single statements to and fro.
        let run = plain_chunks(rest);
        if run >= 2 {
            write_chunks(&mut tx, &rest[..run]).await?;
            rest = &rest[run..];
            continue;
        }
        let r = rest[0];
        rest = &rest[1..];
        match r {
            Ready::Chunk {
                id,
                n,
                data,
                bytes,
                kept: Some(kept),
                ..
            } => {
                let stored = data.len() as i64;
                // A chunk whose recording is gone (removed meanwhile) is
                // not kept either.
                let inserted = sqlx::query(
                    "INSERT INTO recording_chunks (recording, n, bytes, size, data)
                     SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM recordings WHERE id = $1)",
                )
                .bind(&**id)
                .bind(*n)
                .bind(*bytes as i64)
                .bind(stored)
                .bind(data.as_slice())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 1 {
                    sqlx::query(
                        "UPDATE recordings SET bytes = $2, stored = stored + $3, chunks = $4,
                            updated_ms = $5 WHERE id = $1",
                    )
                    .bind(&**id)
                    .bind(*kept as i64)
                    .bind(stored)
                    .bind(n + 1)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                }
            }
            // The marker in place of a chunk cut out.
            Ready::Chunk {
                id,
                n,
                data,
                bytes,
                kept: None,
                ..
            } => {
                sqlx::query(
                    "UPDATE recordings SET truncated = 1, stored = stored + $3 -
                        COALESCE((SELECT size FROM recording_chunks WHERE recording = $1 AND n = $2), 0)
                     WHERE id = $1",
                )
                .bind(&**id)
                .bind(*n)
                .bind(data.len() as i64)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE recording_chunks SET data = $3, bytes = $4, size = $5
                     WHERE recording = $1 AND n = $2",
                )
                .bind(&**id)
                .bind(*n)
                .bind(data.as_slice())
                .bind(*bytes as i64)
                .bind(data.len() as i64)
                .execute(&mut *tx)
                .await?;
            }
            Ready::Other(Op::Delete { id, n }) => {
                sqlx::query(
                    "UPDATE recordings SET stored = stored -
                        COALESCE((SELECT size FROM recording_chunks WHERE recording = $1 AND n = $2), 0)
                     WHERE id = $1",
                )
                .bind(&**id)
                .bind(*n)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM recording_chunks WHERE recording = $1 AND n = $2")
                    .bind(&**id)
                    .bind(*n)
                    .execute(&mut *tx)
                    .await?;
            }
            Ready::Other(Op::Session { id, session }) => {
                sqlx::query("UPDATE recordings SET session = $2 WHERE id = $1")
                    .bind(&**id)
                    .bind(storable(session))
                    .execute(&mut *tx)
                    .await?;
            }
            Ready::Other(Op::Truncated { id }) => {
                sqlx::query("UPDATE recordings SET truncated = 1 WHERE id = $1")
                    .bind(&**id)
                    .execute(&mut *tx)
                    .await?;
            }
            Ready::Other(Op::Begin(..) | Op::End { .. } | Op::Insert { .. } | Op::Mark { .. }) => {}
        }
    }
    let ends: Vec<(&str, i64)> = ready
        .iter()
        .filter_map(|r| match *r {
            Ready::Other(Op::End { id, ended_ms }) => Some((&**id, *ended_ms)),
            _ => None,
        })
        .collect();
    for rows in ends.chunks(MAX_ROWS_A_STATEMENT) {
        write_ends(&mut tx, rows).await?;
    }
    tx.commit().await
}

/// `count` rows of `width` numbered placeholders: `($1, $2), ($3, $4)`.
fn placeholders(count: usize, width: usize) -> String {
    (0..count)
        .map(|i| {
            let params: Vec<String> = (1..=width).map(|k| format!("${}", i * width + k)).collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts the index entries of recordings begun.
async fn write_begins(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    begins: &[(&Meta, &str)],
) -> Result<(), sqlx::Error> {
    let insert = format!(
        "INSERT INTO recordings (id, user_name, agent, via, kind, session, command,
            server, started_ms, updated_ms, ended_ms, cols, rows_, bytes, stored,
            chunks, truncated, incomplete)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7,
            v.column8, v.column9, v.column9, NULL, v.column10, v.column11, 0, 0, 0, 0, 0
         FROM (VALUES {}) AS v",
        placeholders(begins.len(), 11)
    );
    // Only numbered placeholders are generated into the text. Kept
    // prepared only for one row, the usual case: each count is a statement
    // of its own, which would crowd the connection's statement cache.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(insert)).persistent(begins.len() == 1);
    for (m, server) in begins {
        query = query
            .bind(&m.id)
            .bind(storable(&m.user))
            .bind(storable(&m.agent))
            .bind(&m.via)
            .bind(&m.kind)
            .bind(m.session.as_deref().map(storable))
            .bind(storable(&m.command))
            .bind(*server)
            .bind(m.started_ms)
            .bind(i64::from(m.cols))
            .bind(i64::from(m.rows));
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// `text` as every store takes it: PostgreSQL refuses NUL in text, which
/// a command line typed into the console may hold (the agent refuses to
/// run it only later), and one refused row fails its whole batch, other
/// users' recordings with it. Each NUL becomes U+FFFD.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Marks recordings ended.
async fn write_ends(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ends: &[(&str, i64)],
) -> Result<(), sqlx::Error> {
    let update = format!(
        "UPDATE recordings SET ended_ms = v.column2, updated_ms = v.column2
         FROM (VALUES {}) AS v WHERE recordings.id = v.column1",
        placeholders(ends.len(), 2)
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(update)).persistent(ends.len() == 1);
    for (id, ended_ms) in ends {
        query = query.bind(*id).bind(*ended_ms);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// How many of `ready`'s first entries are chunks (not markers): one
/// statement can insert them, and another update their recordings (one
/// row each, for the last of its chunks).
fn plain_chunks(ready: &[&Ready]) -> usize {
    ready
        .iter()
        .take(MAX_ROWS_A_STATEMENT)
        .take_while(|r| matches!(r, Ready::Chunk { kept: Some(_), .. }))
        .count()
}

/// Rows one statement writes at most (11 parameters each at most, well
/// within SQLite's and PostgreSQL's limits).
const MAX_ROWS_A_STATEMENT: usize = 64;

/// Stores `chunks` (from [`plain_chunks`]) and updates their recordings,
/// as the one-chunk case in [`write_batch`] does each.
async fn write_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    chunks: &[&Ready],
) -> Result<(), sqlx::Error> {
    debug_assert_eq!(plain_chunks(chunks), chunks.len(), "a run of plain chunks");
    // A chunk whose recording is gone (removed meanwhile) is not kept.
    let insert = format!(
        "INSERT INTO recording_chunks (recording, n, bytes, size, data)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5 FROM (VALUES {}) AS v
         WHERE EXISTS (SELECT 1 FROM recordings r WHERE r.id = v.column1)",
        placeholders(chunks.len(), 5)
    );
    // Only numbered placeholders are generated into the text. Not kept
    // prepared: each run length is a statement of its own, and up to 63
    // of them would crowd the connection's statement cache.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(insert)).persistent(false);
    // Each recording's row as its last chunk in the run leaves it: (id,
    // size as kept, bytes stored, chunks).
    let mut rows: Vec<(&str, i64, i64, i64)> = Vec::new();
    for chunk in chunks {
        if let Ready::Chunk {
            id,
            n,
            data,
            bytes,
            kept: Some(kept),
            ..
        } = chunk
        {
            query = query
                .bind(&**id)
                .bind(*n)
                .bind(*bytes as i64)
                .bind(data.len() as i64)
                .bind(data.as_slice());
            let stored = data.len() as i64;
            match rows.iter_mut().find(|row| row.0 == &**id) {
                Some(row) => {
                    debug_assert!(n + 1 > row.3, "a recording's chunks in order");
                    *row = (row.0, *kept as i64, row.2 + stored, n + 1);
                }
                None => rows.push((id, *kept as i64, stored, n + 1)),
            }
        }
    }
    query.execute(&mut **tx).await?;
    // A recording that is gone has no row to update.
    let update = format!(
        "UPDATE recordings SET bytes = v.column2, stored = stored + v.column3,
            chunks = v.column4, updated_ms = v.column5
         FROM (VALUES {}) AS v WHERE recordings.id = v.column1",
        placeholders(rows.len(), 5)
    );
    let now = now_ms();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(update)).persistent(false);
    for (id, kept, stored, chunks) in rows {
        query = query
            .bind(id)
            .bind(kept)
            .bind(stored)
            .bind(chunks)
            .bind(now);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// A command's recording `id` as it begins (for the checks and tests).
fn sample_meta(id: &str) -> Meta {
    Meta {
        id: id.into(),
        user: "olga".into(),
        agent: "local".into(),
        via: "console".into(),
        kind: "command".into(),
        session: None,
        command: "true".into(),
        started_ms: 1,
        ended_ms: None,
        cols: 80,
        rows: 24,
        bytes: 0,
        truncated: false,
        incomplete: false,
    }
}

/// Writes a batch as the writer does when short commands come together:
/// each recording's start, its chunks (a second chunk for some) and for
/// some its end, one recording after the other, and a chunk of a
/// recording that is gone; then checks what each recording holds. The
/// starts and ends go in statements of their own and the chunks in runs
/// (cut at [`MAX_ROWS_A_STATEMENT`]). Run on both stores by the tests
/// (tests/audit.rs on PostgreSQL): the writer reaches these statements
/// only when writes happen to meet in one batch.
#[doc(hidden)]
pub async fn check_chunks_written_together(store: &Store) -> Result<(), String> {
    let recordings = MAX_ROWS_A_STATEMENT + 6;
    let id = |i: usize| format!("{i:032x}");
    let text = |i: usize, n: i64| format!("[0.1, \"o\", \"{i}-{n}\"]\n");
    let chunk = |i: usize, n: i64, kept: u64| {
        let line = text(i, n);
        Ready::Chunk {
            id: id(i).into(),
            n,
            data: compress(line.as_bytes()).expect("in memory"),
            bytes: line.len() as u64,
            kept: Some(kept),
            _held: None,
        }
    };
    let twice = |i: usize| i % 5 == 1;
    let ended = |i: usize| i.is_multiple_of(3).then_some(1_000 + i as i64);
    // A shell's start (its session known) beside commands' (none yet),
    // and a command line with a NUL, which PostgreSQL refuses as text.
    let session = |i: usize| (i % 4 == 2).then(|| format!("s-{i}"));
    let command = |i: usize| format!("echo {i}\0");
    let mut batch = Vec::new();
    for i in 0..recordings {
        let meta = Meta {
            kind: "session".into(),
            session: session(i),
            command: command(i),
            ..sample_meta(&id(i))
        };
        batch.push(Ready::Other(Op::Begin(Box::new(meta), "test".into())));
        let first = text(i, 0).len() as u64;
        batch.push(chunk(i, 0, first));
        if twice(i) {
            batch.push(chunk(i, 1, first + text(i, 1).len() as u64));
        }
        if let Some(ended_ms) = ended(i) {
            batch.push(Ready::Other(Op::End {
                id: id(i).into(),
                ended_ms,
            }));
        }
        if i == 10 {
            batch.push(chunk(usize::MAX, 0, 1)); // its recording is gone
        }
        if i == 5 {
            // Between two runs; a session id with a NUL too.
            batch.push(Ready::Other(Op::Session {
                id: id(3).into(),
                session: "s-3\0".into(),
            }));
        }
    }
    let runs = {
        let middle: Vec<&Ready> = batch
            .iter()
            .filter(|r| !matches!(r, Ready::Other(Op::Begin(..) | Op::End { .. })))
            .collect();
        let mut rest = &middle[..];
        let mut runs = Vec::new();
        while !rest.is_empty() {
            let run = plain_chunks(rest).max(1);
            runs.push(run);
            rest = &rest[run..];
        }
        runs
    };
    let chunks = recordings + (0..recordings).filter(|i| twice(*i)).count() + 1;
    // Recording 5's chunks and those before, the session's update, then
    // the rest, cut at the most one statement takes.
    let before_session = 6 + (0..6).filter(|i| twice(*i)).count();
    let expected = vec![
        before_session,
        1,
        MAX_ROWS_A_STATEMENT,
        chunks - before_session - MAX_ROWS_A_STATEMENT,
    ];
    if runs != expected {
        return Err(format!("runs {runs:?}, expected {expected:?}"));
    }
    let before = now_ms();
    write_batch(store, &batch.iter().collect::<Vec<_>>())
        .await
        .map_err(|e| e.to_string())?;
    for i in 0..recordings {
        let chunks: i64 = if twice(i) { 2 } else { 1 };
        let want: String = (0..chunks).map(|n| text(i, n)).collect();
        let got = read_from(store, &id(i), 0)
            .await
            .map_err(|e| e.to_string())?;
        let got = got.map(|(data, next)| (String::from_utf8_lossy(&data).into_owned(), next));
        if got != Some((want.clone(), chunks)) {
            return Err(format!("recording {i}: {got:?}, expected {want:?}"));
        }
        type Row = (i64, i64, i64, i64, Option<i64>, Option<String>, String);
        let (bytes, chunks_row, stored_row, updated_ms, ended_ms, got_session, got_command): Row =
            sqlx::query_as(
                "SELECT bytes, chunks, stored, updated_ms, ended_ms, session, command
                 FROM recordings WHERE id = $1",
            )
            .bind(id(i))
            .fetch_one(&store.pool)
            .await
            .map_err(|e| e.to_string())?;
        let want_session = match i {
            3 => Some("s-3\u{FFFD}".to_owned()),
            _ => session(i),
        };
        let want_command = command(i).replace('\0', "\u{FFFD}");
        if (&got_session, &got_command) != (&want_session, &want_command) {
            return Err(format!(
                "recording {i}: session and command {got_session:?} {got_command:?}, expected {want_session:?} {want_command:?}"
            ));
        }
        let row = (bytes, chunks_row, stored_row, updated_ms);
        if ended_ms != ended(i) || ended(i).is_some_and(|e| updated_ms != e) {
            return Err(format!(
                "recording {i}: ended_ms {ended_ms:?} and updated_ms {updated_ms}, expected {:?} for both",
                ended(i)
            ));
        }
        let stored: usize = (0..chunks)
            .map(|n| compress(text(i, n).as_bytes()).map_or(0, |c| c.len()))
            .sum();
        let want_row = (want.len() as i64, chunks, stored as i64);
        if (row.0, row.1, row.2) != want_row || (ended(i).is_none() && row.3 < before) {
            return Err(format!(
                "recording {i}: (bytes, chunks, stored, updated_ms) {row:?}, expected {want_row:?} and updated_ms >= {before}"
            ));
        }
    }
    let orphans: (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM recording_chunks WHERE recording = $1")
            .bind(id(usize::MAX))
            .fetch_one(&store.pool)
            .await
            .map_err(|e| e.to_string())?;
    if orphans.0 != 0 {
        return Err("a chunk of a recording that is gone was kept".into());
    }
    // A batch the store refuses (a recording begun twice) is written again
    // one recording at a time: only the refused one is lost.
    let again = MAX_ROWS_A_STATEMENT + 100;
    let batch = [
        Ready::Other(Op::Begin(Box::new(sample_meta(&id(0))), "test".into())),
        Ready::Other(Op::Begin(Box::new(sample_meta(&id(again))), "test".into())),
        chunk(again, 0, text(again, 0).len() as u64),
    ];
    let refused = write_batch(store, &batch.iter().collect::<Vec<_>>()).await;
    if !refused.as_ref().is_err_and(refused_for_its_data) {
        return Err(format!("a recording begun twice: {refused:?}"));
    }
    let (lost, _) = write_each(store, &batch).await;
    let got = read_from(store, &id(again), 0)
        .await
        .map_err(|e| e.to_string())?;
    if lost != HashSet::from([Arc::from(id(0))])
        || got.as_ref().is_none_or(|(_, chunks)| *chunks != 1)
    {
        return Err(format!(
            "written one by one: lost {lost:?}, the other holds {got:?}"
        ));
    }
    Ok(())
}

/// Removes one recording with its chunks.
async fn remove(store: &Store, id: &str) -> Result<(), sqlx::Error> {
    let mut tx = store.pool.begin().await?;
    sqlx::query("DELETE FROM recording_chunks WHERE recording = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM recordings WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Removes finished recordings while all of them together take more than
/// `max_total` bytes in the store: the oldest of the user whose
/// recordings take the most, each time (so that one user printing a lot
/// removes their own first, not everyone's). Live ones stay: each is
/// bounded by `--recording-max-bytes`. Returns what all take then.
pub async fn keep_within(store: &Store, max_total: u64) -> Result<u64, sqlx::Error> {
    let (total,): (i64,) =
        sqlx::query_as("SELECT CAST(COALESCE(SUM(stored), 0) AS BIGINT) FROM recordings")
            .fetch_one(&store.pool)
            .await?;
    let mut over = total.saturating_sub(i64::try_from(max_total).unwrap_or(i64::MAX));
    let mut removed = 0;
    while over > 0 {
        // The user whose recordings, live ones included, take the most:
        // only their finished ones go. A user whose live recordings alone
        // pass the cap removes nobody else's (each is bounded by its own
        // cap), and the rest waits until theirs finish.
        let heaviest: Option<(String,)> = sqlx::query_as(
            "SELECT user_name FROM recordings GROUP BY user_name
             ORDER BY SUM(stored) DESC, user_name LIMIT 1",
        )
        .fetch_optional(&store.pool)
        .await?;
        let Some((user,)) = heaviest else { break };
        let oldest: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, stored FROM recordings WHERE ended_ms IS NOT NULL AND user_name = $1
             ORDER BY started_ms, id LIMIT 20",
        )
        .bind(&user)
        .fetch_all(&store.pool)
        .await?;
        if oldest.is_empty() {
            break;
        }
        for (id, stored) in oldest {
            remove(store, &id).await?;
            tracing::warn!(
                recording = %id,
                %user,
                "recording removed: all recordings together reached --recording-max-total-bytes"
            );
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
            "recordings removed to stay within the total cap"
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

/// Removes the finished recordings that began before `cutoff_ms`, with
/// their chunks, one at a time (the store's other writers go on between
/// them), and chunks whose recording is gone.
pub async fn trim(store: &Store, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
    let mut gone = 0;
    loop {
        let old: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM recordings WHERE started_ms < $1 AND ended_ms IS NOT NULL LIMIT 100",
        )
        .bind(cutoff_ms)
        .fetch_all(&store.pool)
        .await?;
        if old.is_empty() {
            break;
        }
        for (id,) in old {
            remove(store, &id).await?;
            gone += 1;
        }
    }
    sqlx::query(
        "DELETE FROM recording_chunks WHERE NOT EXISTS
            (SELECT 1 FROM recordings WHERE recordings.id = recording_chunks.recording)",
    )
    .execute(&store.pool)
    .await?;
    if gone > 0 {
        tracing::info!(removed = gone, "old recordings removed (retention)");
    }
    Ok(gone)
}

/// Recordings this server left unfinished (it stopped without ending
/// them) are ended where their last chunk was written, and marked
/// incomplete: on SQLite all of them (its one server is this one), on a
/// shared PostgreSQL those of this `--server-name` only.
pub async fn close_abandoned(store: &Store, server: &str) -> Result<u64, sqlx::Error> {
    let sql = match store.backend {
        crate::store::Backend::Sqlite => {
            "UPDATE recordings SET ended_ms = updated_ms, incomplete = 1
             WHERE ended_ms IS NULL AND $1 = $1"
        }
        crate::store::Backend::Postgres => {
            "UPDATE recordings SET ended_ms = updated_ms, incomplete = 1
             WHERE ended_ms IS NULL AND server = $1"
        }
    };
    Ok(sqlx::query(sql)
        .bind(server)
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

    /// A store in a fresh data directory (removed with the directory).
    async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&crate::store::sqlite_url(Some(dir.path())))
            .await
            .unwrap();
        (dir, store)
    }

    fn chunk(id: &str, bytes: usize) -> Write {
        let room = Arc::new(Semaphore::new(2));
        Write::Chunk {
            id: id.into(),
            n: 0,
            raw: vec![b'x'; bytes],
            first_at_us: 0,
            gap_at_us: None,
            _held: (
                room.clone().try_acquire_owned().unwrap(),
                room.try_acquire_owned().unwrap(),
            ),
        }
    }

    /// A short command's recording (its output, then its end) waits for
    /// the group commit; a flood's full chunk goes at once, as its
    /// recording may have no more room in flight.
    #[test]
    fn only_a_batch_with_a_full_chunk_goes_without_waiting_for_more() {
        let end = || Write::End {
            id: "a".into(),
            ended_ms: 1,
        };
        assert!(!holds_a_full_chunk(&[chunk("a", 100), end()]));
        assert!(!holds_a_full_chunk(&[
            chunk("a", CHUNK_BYTES / 2 - 1),
            end()
        ]));
        assert!(holds_a_full_chunk(&[chunk("b", CHUNK_BYTES - EVENT_TEXT)]));
        assert!(holds_a_full_chunk(&[
            chunk("a", 100),
            chunk("b", CHUNK_BYTES / 2)
        ]));
    }

    /// A batch the store refuses (here: a recording begun twice, which
    /// its unique id forbids) is written again one recording at a time:
    /// only the refused recording's writes are lost, not those of the
    /// others that shared its batch.
    #[tokio::test]
    async fn a_refused_batch_loses_only_the_refused_recordings_writes() {
        let (_dir, store) = sqlite_store().await;
        let begin = |id: &str| Ready::Other(Op::Begin(Box::new(sample_meta(id)), "test".into()));
        let line = b"[0.1, \"o\", \"hi\"]\n";
        let chunk = |id: &str| Ready::Chunk {
            id: id.into(),
            n: 0,
            data: compress(line).unwrap(),
            bytes: line.len() as u64,
            kept: Some(line.len() as u64),
            _held: None,
        };
        let (x, y) = ("x".repeat(32), "y".repeat(32));
        write_batch(&store, &[&begin(&x)]).await.unwrap();
        let batch = vec![
            begin(&x),
            chunk(&x),
            begin(&y),
            chunk(&y),
            Ready::Other(Op::End {
                id: y.as_str().into(),
                ended_ms: 5,
            }),
        ];
        let refused = write_batch(&store, &batch.iter().collect::<Vec<_>>()).await;
        assert!(
            refused.as_ref().is_err_and(refused_for_its_data),
            "{refused:?}"
        );
        let (lost, stored) = write_each(&store, &batch).await;
        assert_eq!(lost, HashSet::from([Arc::<str>::from(x.as_str())]));
        assert_eq!(stored, compress(line).unwrap().len() as u64);
        let got = read_from(&store, &y, 0).await.unwrap();
        assert_eq!(
            got,
            Some((line.to_vec(), 1)),
            "the other recording is whole"
        );
        let ended: (Option<i64>,) = sqlx::query_as("SELECT ended_ms FROM recordings WHERE id = $1")
            .bind(&y)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(ended.0, Some(5));
    }

    /// The writer, given such a batch: after its retries, the recording
    /// begun twice is lost (never begun: its later writes are skipped),
    /// and the one that shared its batch is stored whole.
    #[tokio::test]
    async fn the_writer_loses_only_the_refused_recording_of_a_batch() {
        let (_dir, store) = sqlite_store().await;
        let room = Arc::new(Semaphore::new(8));
        let chunk = |id: &str| {
            let mut raw = Vec::new();
            push_raw(&mut raw, 100_000, b'o', "hi");
            Write::Chunk {
                id: id.into(),
                n: 0,
                raw,
                first_at_us: 100_000,
                gap_at_us: None,
                _held: (
                    room.clone().try_acquire_owned().unwrap(),
                    room.clone().try_acquire_owned().unwrap(),
                ),
            }
        };
        let (x, y) = ("x".repeat(32), "y".repeat(32));
        let mut w = Writer {
            store: store.clone(),
            health: Arc::new(Health::default()),
            planner: Some(Planner {
                half: 1 << 20,
                rolls: HashMap::new(),
                unborn: HashSet::new(),
            }),
            damaged: HashSet::new(),
        };
        w.write(vec![Write::Begin(Box::new(sample_meta(&x)), "test".into())])
            .await;
        w.write(vec![
            Write::Begin(Box::new(sample_meta(&x)), "test".into()),
            chunk(&x),
            Write::Begin(Box::new(sample_meta(&y)), "test".into()),
            chunk(&y),
            Write::End {
                id: y.as_str().into(),
                ended_ms: 5,
            },
        ])
        .await;
        let unborn = &w.planner.as_ref().unwrap().unborn;
        assert_eq!(unborn, &HashSet::from([Arc::<str>::from(x.as_str())]));
        let (data, chunks) = read_from(&store, &y, 0).await.unwrap().unwrap();
        assert_eq!(chunks, 1);
        assert!(
            String::from_utf8_lossy(&data).contains("\"hi\""),
            "the other recording is whole: {data:?}"
        );
    }

    #[tokio::test]
    async fn chunks_of_several_recordings_written_together_each_land_in_their_own() {
        let (_dir, store) = sqlite_store().await;
        check_chunks_written_together(&store).await.unwrap();
    }

    #[test]
    fn small_chunks_are_stored_members_any_gzip_reader_takes() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for data in [&b""[..], b"[0.5, \"o\", \"y\"]\n", &big[..]] {
            let member = stored_member(data);
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&member[..]), &mut back)
                .expect("a valid gzip member");
            assert_eq!(back, data);
        }
        // Members one after the other, stored and deflated, read as one.
        let mut stream = compress(b"small\n").unwrap();
        stream.extend(compress(&big).unwrap());
        let mut back = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&stream[..]),
            &mut back,
        )
        .unwrap();
        assert_eq!(&back[..6], b"small\n");
        assert_eq!(&back[6..], &big[..]);
    }

    proptest::proptest! {
        /// Piped output's newlines become a terminal's, and nothing else
        /// changes.
        #[test]
        fn newlines_become_crlf_and_nothing_else_changes(text in "(a|é|\n|\r| ){0,64}") {
            let want = text.replace('\n', "\r\n");
            match crlf_lines(&text) {
                Some(got) => proptest::prop_assert_eq!(got, want),
                None => proptest::prop_assert!(!text.contains('\n')),
            }
        }
    }

    #[test]
    fn a_character_cut_between_outputs_waits_for_its_end() {
        let mut s = State::new((80, 24), 1 << 20);
        let euro = "€".as_bytes();
        assert_eq!(s.text_of(&[b'a', euro[0]]), "a");
        assert_eq!(s.text_of(&euro[1..2]), "");
        assert_eq!(s.text_of(&[euro[2], b'b']), "€b");
        assert_eq!(s.text_of(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"😀".as_bytes()[..3]), 3);
    }

    /// A store in a temporary directory, its writer, and one recording
    /// begun in it with a cap of `max_bytes`.
    async fn one_recording(
        max_bytes: u64,
        record_input: bool,
    ) -> (
        tempfile::TempDir,
        Store,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        Arc<Recorder>,
    ) {
        let (dir, store) = sqlite_store().await;
        let shutdown = CancellationToken::new();
        let settings = Settings {
            max_bytes,
            record_input,
            retention: None,
            max_total: 1 << 40,
            server: "test".into(),
        };
        let (recordings, writer) = Recordings::start(store.clone(), settings, shutdown.clone());
        let start = Start {
            user: "olga".into(),
            agent: "local".into(),
            kind: "exec",
            session: None,
            command: "test".into(),
            cols: 80,
            rows: 24,
            bare_lines: false,
        };
        let recorder = recordings.begin(start).await.expect("begun");
        (dir, store, shutdown, writer, recorder)
    }

    #[tokio::test]
    async fn a_flood_ending_while_chunks_are_skipped_keeps_its_very_end() {
        let (_dir, store, shutdown, writer, recorder) =
            one_recording(64 * CHUNK_BYTES as u64, false).await;
        // Past half the cap, a chunk was just handed over: full chunks are
        // skipped now, as in a flood the store falls behind.
        if let Ok(mut s) = recorder.state.lock() {
            s.sent = s.half;
            s.last_tail = Some(Instant::now());
        }
        for _ in 0..3 {
            recorder.output(&[b'x'; CHUNK_BYTES]);
            recorder.settle().await;
        }
        // The end comes while the last full chunk was being skipped, and
        // in the same batch as more than a chunk of the flood (a pump
        // records the outputs it gathered, then settles).
        recorder.output(&[b'x'; 2 * CHUNK_BYTES]);
        recorder.output(b"\ntail-end\n");
        recorder.end().await;
        shutdown.cancel();
        writer.await.unwrap();
        let (cast, _) = read_from(&store, recorder.id(), 0)
            .await
            .unwrap()
            .expect("stored");
        let cast = String::from_utf8(cast).unwrap();
        let output: String = cast
            .lines()
            .skip(1)
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v[1] == "o").then(|| v[2].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        assert!(
            cast.contains("output skipped here"),
            "what was skipped is marked"
        );
        // Before, the last full chunk was dropped: only "\ntail-end\n"
        // followed the marker.
        assert!(
            output.ends_with(&format!("{}\ntail-end\n", "x".repeat(CHUNK_BYTES / 2))),
            "the flood's last output is missing: {:?}",
            &output[output.len().saturating_sub(40)..]
        );
    }

    /// Typed input the pump has not handed over piles up to
    /// [`INPUT_PILE`], then is skipped: one marker where the skipping
    /// began, in time order (before, the marker went before the next chunk
    /// sent, with a later time than the input in it), and the recording
    /// says `truncated`. A chunk of input wakes the pump.
    #[tokio::test]
    async fn input_skipped_while_the_pump_is_behind_is_marked_where_it_began() {
        let (_dir, store, shutdown, writer, recorder) = one_recording(1 << 30, true).await;
        let pieces = INPUT_PILE / 8000 + 8;
        for i in 0..pieces {
            recorder.input(&format!("<{i:03}>").repeat(1600));
        }
        tokio::time::timeout(Duration::from_secs(10), recorder.input_waiting())
            .await
            .expect("the pump is woken once a chunk of input waits");
        // Handed over, input is recorded again.
        recorder.settle().await;
        recorder.input("after");
        recorder.end().await;
        shutdown.cancel();
        writer.await.unwrap();
        let (cast, _) = read_from(&store, recorder.id(), 0)
            .await
            .unwrap()
            .expect("stored");
        let cast = String::from_utf8(cast).unwrap();
        let events: Vec<serde_json::Value> = cast
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let times: Vec<f64> = events.iter().map(|e| e[0].as_f64().unwrap()).collect();
        assert!(times.is_sorted(), "events out of time order: {times:?}");
        let codes: String = events.iter().map(|e| e[1].as_str().unwrap()).collect();
        let kept = codes.find('m').expect("a marker");
        assert_eq!(
            codes,
            format!("{}mi", "i".repeat(kept)),
            "input, one marker, the input after"
        );
        assert!(kept < pieces && kept * 8000 >= INPUT_PILE - 8000);
        for (i, e) in events[..kept].iter().enumerate() {
            assert!(e[2].as_str().unwrap().starts_with(&format!("<{i:03}>")));
        }
        assert!(
            events[kept][2]
                .as_str()
                .unwrap()
                .starts_with("input skipped here")
        );
        assert_eq!(events[kept + 1][2], "after");
        let row = sqlx::query("SELECT truncated FROM recordings WHERE id = $1")
            .bind(recorder.id())
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(sqlx::Row::try_get::<i64, _>(&row, "truncated").unwrap(), 1);
    }

    #[test]
    fn past_half_the_cap_a_flood_keeps_its_newest_chunk_and_marks_the_rest() {
        let flood = |pad: usize| {
            [
                "😀".repeat(CHUNK_BYTES / 4 + 1),
                "x".repeat(pad),
                "end".into(),
            ]
            .concat()
        };
        let mut s = State::new((80, 24), 1000);
        // Before half the cap, everything is kept.
        assert_eq!(s.kept_of(flood(0).as_bytes()).len(), flood(0).len());
        // Past it, but with no chunk handed over lately (a quiet spell),
        // too.
        s.sent = 1000;
        assert_eq!(s.kept_of(flood(0).as_bytes()).len(), flood(0).len());
        // While chunks are being skipped: the newest chunk, from the
        // start of a character, wherever the cut falls.
        for pad in 0..4 {
            s.last_tail = Some(Instant::now());
            s.gap_at_us = None;
            s.event(b'o', "older");
            let at = s.first_at_us;
            s.carry = vec![0xf0];
            let data = flood(pad);
            s.last_tail = Some(Instant::now());
            let kept = s.kept_of(data.as_bytes());
            let text = std::str::from_utf8(kept).expect("cut at a character");
            let end = format!("😀{}end", "x".repeat(pad));
            assert!(text.ends_with(&end), "the newest output is kept");
            assert!(kept.len() <= CHUNK_BYTES && kept.len() >= CHUNK_BYTES - 3);
            assert!(s.lines.is_empty(), "what waited is dropped");
            assert_eq!(s.gap_at_us, Some(at), "and marked from its time");
            assert!(s.carry.is_empty(), "a cut character's start goes too");
        }
        // Output of a chunk or less is kept whole.
        assert_eq!(s.kept_of(b"small").len(), 5);
    }

    #[test]
    fn chunks_are_whole_lines_and_resizes_without_output_are_one() {
        let mut s = State::new((80, 24), 1 << 20);
        for size in [(100, 30), (80, 24), (120, 40)] {
            s.pending_size = Some(size);
        }
        s.size_event();
        let text = "y".repeat(EVENT_TEXT);
        for _ in 0..(2 * CHUNK_BYTES / EVENT_TEXT + 1) {
            s.event(b'o', &text);
        }
        assert!(s.take_chunk(false).is_some());
        let mut all = Vec::new();
        let mut n = Vec::new();
        while let Some((chunk, i, _)) = s.take_chunk(true) {
            assert!(chunk.len() <= CHUNK_BYTES + EVENT_TEXT + RAW_HEAD);
            let (lines, _) = encode(&chunk);
            assert!(lines.ends_with(b"\n"));
            all.extend(lines);
            n.push(i);
        }
        assert_eq!(n, (1..=n.len() as i64).collect::<Vec<_>>());
        assert!(s.take_chunk(true).is_none());
        let lines: Vec<&[u8]> = all
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        for l in &lines {
            serde_json::from_slice::<serde_json::Value>(l).unwrap();
        }
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
