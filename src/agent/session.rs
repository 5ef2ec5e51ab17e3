//! Shells that outlive their connection: sessions held by the agent.
//!
//! An `exec` with `session` starts a shell as usual, but its process, its
//! PTY and a terminal model (the `vt100` crate's parser: screen, cursor,
//! modes and a bounded scrollback) belong to a task of the agent, not to
//! the channel. Channels come and go as attachments: at most one writer
//! (its keystrokes reach the shell, its size is the terminal's) and any
//! number of read-only watchers. When the last one goes (a page reload, a
//! lost link, a restarted server), the shell keeps running for the linger
//! time, its output read into the model so that it never blocks; an
//! `attach` then gets a snapshot that redraws the terminal from a reset,
//! followed by live output from exactly where the snapshot ends.
//!
//! Flow control: the writer's credit paces the PTY, as for any channel
//! (a page that stops drawing pauses the shell). Watchers never slow the
//! shell: one that falls more than [`WATCH_LAG`] behind loses its queued
//! output and is sent a fresh snapshot once it has credit again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::channel::{self, Control, DRAIN_GRACE, Done, READ_CHUNK, Source, Stdin, StdinQueue};
use super::process;
use super::sandbox::ExecPolicy;
use super::terminal::Term;
use crate::protocol::{ExecRequest, Frame, Message, PtySize, SessionInfo};
use crate::small_map::SmallMap;
use crate::vocab::{self, ErrorCode};

/// A watcher's output queued beyond its credit before it is dropped and
/// the watcher resynchronised with a snapshot: 256 KiB.
const WATCH_LAG: usize = 256 * 1024;

/// The same in queued pieces, whatever their bytes: 4,096 (up to about
/// 300 KiB with the pieces' own memory). Output trickling a byte at a
/// time, with a resize between, would otherwise queue half a million
/// pieces within the byte bound.
const WATCH_PIECES: usize = 4096;

/// The largest terminal a session models: 300 columns by 150 rows. A
/// larger size asked for is clamped: the model's cells cost 32 bytes each,
/// for two screens and [`PARSER_ROWS`](super::history::PARSER_ROWS) lines
/// of scrollback, at most about 4.3 MB at this size (older lines are kept
/// as text).
pub(crate) const MAX_COLS: u16 = 300;
pub(crate) const MAX_ROWS: u16 = 150;

/// Commands queued for one session's task: 64.
const COMMAND_QUEUE: usize = 64;

/// What bounds the agent's sessions (its flags).
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long a session with nothing attached lives on (`--session-linger`);
    /// zero ends it when its last channel goes.
    pub linger: Duration,
    /// Lines of scrollback a session's model keeps (`--session-scrollback`).
    pub scrollback: usize,
    /// Sessions held at once (`--max-sessions`).
    pub max_sessions: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            linger: Duration::from_secs(30 * 60),
            scrollback: 5000,
            max_sessions: 128,
        }
    }
}

/// A channel joining a session: what it needs to send and receive.
pub(crate) struct Attach {
    pub(crate) ch: u32,
    pub(crate) watch: bool,
    /// The user watching only because the owner shared the session with
    /// them: taken off when the owner no longer does.
    pub(crate) watcher: Option<String>,
    pub(crate) size: Option<PtySize>,
    pub(crate) window: u64,
    pub(crate) control: super::controls::Controls,
    pub(crate) input: super::inbox::Inbox,
    pub(crate) stdin_spent: Arc<AtomicUsize>,
    pub(crate) out: mpsc::Sender<Frame>,
    pub(crate) done: mpsc::UnboundedSender<Done>,
}

impl Attach {
    /// Ends this channel before it joined anything, with `frame` as its last.
    fn refuse(self, frame: Message) {
        let _ = self.done.send(Done {
            ch: self.ch,
            exit: Frame::new(self.ch, frame),
        });
    }
}

enum Command {
    /// Boxed, as `Watchers`: a channel's first block holds 32 commands
    /// from the start, in every session (3 KiB with an attach unboxed,
    /// 800 bytes with the list unboxed, 544 now).
    Attach(Box<Attach>),
    End,
    /// Who may watch now: the watchers not among them are detached.
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer keeps every slot 8 bytes smaller"
    )]
    Watchers(Box<Vec<String>>),
}

struct Entry {
    commands: mpsc::Sender<Command>,
    info: Arc<Mutex<SessionInfo>>,
    /// The shell's process id, once it runs (0 before).
    leader: Arc<std::sync::atomic::AtomicU32>,
}

/// Takes a session out of the table when its task ends, however it ends.
struct Listed {
    sessions: Arc<Sessions>,
    id: String,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.sessions.table().remove(&self.id);
    }
}

/// Every session of this agent, shared by all its connections.
pub(crate) struct Sessions {
    table: Mutex<HashMap<String, Entry>>,
    limits: SessionLimits,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn clamp(size: PtySize) -> PtySize {
    PtySize {
        cols: size.cols.clamp(1, MAX_COLS),
        rows: size.rows.clamp(1, MAX_ROWS),
    }
}

impl Sessions {
    pub(crate) fn new(limits: SessionLimits) -> Arc<Sessions> {
        Arc::new(Sessions {
            table: Mutex::default(),
            limits,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the shell of `req` as a new session, `first` its writer;
    /// not if `closed` (the opening channel's close, or its link's loss)
    /// comes while it waits for a start place.
    pub(crate) fn open(
        self: &Arc<Self>,
        req: ExecRequest,
        policy: Arc<ExecPolicy>,
        first: Attach,
        closed: tokio_util::sync::CancellationToken,
    ) {
        let (Some(options), Some(size)) = (req.session.clone(), req.pty) else {
            first.refuse(Message::error(
                ErrorCode::BadExec,
                "a session needs \"pty\" (a terminal size)",
            ));
            return;
        };
        let size = clamp(size);
        let req = ExecRequest {
            pty: Some(size),
            ..req
        };
        let mut raw = [0u8; 16];
        rand::fill(&mut raw);
        let id = hex::encode(raw);
        // What is kept and listed is bounded, whatever the request held.
        let short = |text: &str| text.chars().take(200).collect::<String>();
        let command = match (&req.cmd, &req.argv) {
            (Some(cmd), _) => short(cmd),
            (None, Some(argv)) => short(&argv.join(" ")),
            (None, None) => String::new(),
        };
        let now = now_ms();
        let info = Arc::new(Mutex::new(SessionInfo {
            id: id.clone(),
            owner: short(&options.owner),
            title: options
                .title
                .as_deref()
                .map_or_else(|| command.clone(), short),
            command,
            started_ms: now,
            last_attached_ms: now,
            cols: size.cols,
            rows: size.rows,
            attached: false,
            watching: 0,
            watchers: Vec::new(),
            ends_at_ms: None,
        }));
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let leader = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // The limits are checked and the place taken under one lock, so
        // that two opens at once cannot both squeeze under them.
        {
            let mut table = self.table();
            let refusal = if table.len() >= self.limits.max_sessions {
                Some(format!(
                    "this agent holds its maximum of {} sessions",
                    self.limits.max_sessions
                ))
            } else if let Some(max) = options.max_per_owner {
                let owner = &options.owner;
                let held = table
                    .values()
                    .filter(|e| &e.info.lock().unwrap_or_else(|e| e.into_inner()).owner == owner)
                    .count();
                (held >= max as usize).then(|| {
                    format!(
                        "{owner} has {held} shell sessions on this agent, the most allowed; \
                         end one (the console's sessions panel) first"
                    )
                })
            } else {
                None
            };
            if let Some(msg) = refusal {
                drop(table);
                first.refuse(Message::error(ErrorCode::TooManySessions, msg));
                return;
            }
            table.insert(
                id.clone(),
                Entry {
                    commands,
                    info: info.clone(),
                    leader: leader.clone(),
                },
            );
        }
        let started = std::time::Instant::now();
        let task = Session {
            id: id.clone(),
            info,
            limits: self.limits,
            model: Model::new(size, self.limits.scrollback),
            viewers: SmallMap::default(),
            writer: None,
            next_key: 0,
            inputs: SelectAll::new(),
            started,
            writer_changed: false,
            unpaid: 0,
            kill_at: None,
            rehup_at: None,
            resync_at: None,
        };
        let start = Box::new(Start {
            req,
            policy,
            closed,
            first: Box::new(first),
            session: Box::new(task),
            commands: commands_rx,
            leader,
            listed: Listed {
                sessions: self.clone(),
                id,
            },
            shutdown: self.shutdown.clone(),
        });
        self.tasks.spawn(start.run());
    }

    /// Attaches `attach` to session `id`; an unknown id refuses it.
    pub(crate) fn attach(&self, id: &str, attach: Attach) {
        let commands = self.table().get(id).map(|e| e.commands.clone());
        let Some(commands) = commands else {
            attach.refuse(no_session(id));
            return;
        };
        // A full queue waits in a task of its own, never in the connection.
        if let Err(mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd)) =
            commands.try_send(Command::Attach(Box::new(attach)))
        {
            let id = id.to_owned();
            tokio::spawn(async move {
                if let Err(mpsc::error::SendError(Command::Attach(attach))) =
                    commands.send(cmd).await
                {
                    // It ended in the meantime.
                    attach.refuse(no_session(&id));
                }
            });
        }
    }

    /// Ends session `id` (its process group is killed); false if unknown.
    pub(crate) fn end(&self, id: &str) -> bool {
        let commands = self.table().get(id).map(|e| e.commands.clone());
        match commands {
            Some(c) => {
                tokio::spawn(async move {
                    let _ = c.send(Command::End).await;
                });
                true
            }
            None => false,
        }
    }

    /// Changes the title or the watchers of session `id`; false if unknown.
    pub(crate) fn update(
        &self,
        id: &str,
        title: Option<String>,
        watchers: Option<Vec<String>>,
    ) -> bool {
        let table = self.table();
        let Some(entry) = table.get(id) else {
            return false;
        };
        let mut info = entry.info.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(title) = title {
            info.title = title.chars().take(200).collect();
        }
        if let Some(watchers) = watchers {
            let watchers: Vec<String> = watchers
                .into_iter()
                .take(64)
                .map(|w| w.chars().take(64).collect())
                .collect();
            info.watchers = watchers.clone();
            // Those no longer allowed stop watching now, not at their next
            // attach.
            let commands = entry.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(Command::Watchers(Box::new(watchers))).await;
            });
        }
        true
    }

    /// Where a file sent "here" in session `id` goes: the working
    /// directory of its terminal's foreground job (a shell started in the
    /// shell, after its own `cd`), else of its shell; `None` if there is no
    /// such session or shell, or its directory was removed.
    pub(crate) fn cwd(&self, id: &str) -> Option<std::path::PathBuf> {
        let pid = self
            .table()
            .get(id)?
            .leader
            .load(std::sync::atomic::Ordering::Acquire);
        if pid == 0 {
            return None;
        }
        // Field 8 of /proc/PID/stat, after the command's parenthesis:
        // the terminal's foreground process group.
        let foreground = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(5))
                    .and_then(|f| f.parse::<i32>().ok())
            })
            .filter(|pgid| *pgid > 0);
        let from = |p: i64| -> Option<std::path::PathBuf> {
            let dir = std::fs::read_link(format!("/proc/{p}/cwd")).ok()?;
            // A removed directory reads "... (deleted)": none to go to.
            // Told from the link alone: this runs on an async worker, and
            // a directory that does not answer would hold it (the file
            // helper enters it, under the start timeout).
            use std::os::unix::ffi::OsStrExt;
            (!dir.as_os_str().as_bytes().ends_with(b" (deleted)")).then_some(dir)
        };
        foreground
            .and_then(|pgid| from(i64::from(pgid)))
            .or_else(|| from(i64::from(pid)))
    }

    /// Every session, oldest first.
    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self
            .table()
            .values()
            .map(|e| e.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        all.sort_by(|a, b| (a.started_ms, &a.id).cmp(&(b.started_ms, &b.id)));
        all
    }

    /// Ends every session and waits for their tasks (the agent is stopping).
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Ends the channels that came to attach to session `id` while its shell
/// was starting, when it never ran: each gets its `exit` (with the reason)
/// and its id back, where dropping them left them running for the
/// connection's life. Those that come later find the queue closed and are
/// refused by [`Sessions::attach`].
fn refuse_waiting(mut commands: mpsc::Receiver<Command>, id: &str) {
    commands.close();
    while let Ok(command) = commands.try_recv() {
        if let Command::Attach(attach) = command {
            attach.refuse(no_session(id));
        }
    }
}

fn no_session(id: &str) -> Message {
    let shown: String = id.chars().take(64).collect();
    Message::error(
        ErrorCode::NoSession,
        format!("no session {shown:?} on this agent (it ended, or never was)"),
    )
}

fn nonzero(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n.max(1)).unwrap_or(std::num::NonZeroU16::MIN)
}

/// One attached channel, as the session task sees it.
struct Viewer {
    ch: u32,
    watch: bool,
    credit: u64,
    window: u64,
    /// Output not yet sent (beyond the credit), in order. Its memory is
    /// given back once it is empty: an idle shell's viewer holds none.
    pending: VecDeque<Queued>,
    pending_len: usize,
    /// Of `pending_len`, the live output (not a redraw): what counts
    /// towards a watcher's lag.
    live_len: usize,
    /// A watcher that fell behind: its next output is a fresh snapshot.
    resync: bool,
    out: mpsc::Sender<Frame>,
    done: mpsc::UnboundedSender<Done>,
    stdin_spent: Arc<AtomicUsize>,
    /// Set for a watcher allowed only by the owner's list.
    watcher: Option<String>,
    /// A watcher's refused input whose credit is not yet returned, and
    /// whether it was told why.
    refused: usize,
    warned: bool,
}

/// What waits in a viewer's queue: output, or a resize in order with it
/// (40 bytes, where a [`Message`] is 160).
enum Queued {
    Stdout(Bytes),
    Snapshot(Bytes),
    Resize { cols: u16, rows: u16 },
}

impl Viewer {
    /// A viewer of channel `ch` with `window` bytes of credit, nothing
    /// queued, sending through `out` and ending through `done`.
    fn new(
        ch: u32,
        watch: bool,
        window: u64,
        (out, done): (mpsc::Sender<Frame>, mpsc::UnboundedSender<Done>),
        stdin_spent: Arc<AtomicUsize>,
    ) -> Viewer {
        Viewer {
            ch,
            watch,
            credit: window,
            window,
            pending: VecDeque::new(),
            pending_len: 0,
            live_len: 0,
            resync: false,
            out,
            done,
            stdin_spent,
            watcher: None,
            refused: 0,
            warned: false,
        }
    }

    fn queue(&mut self, data: Bytes) {
        if data.is_empty() || self.resync {
            return;
        }
        self.pending_len += data.len();
        self.live_len += data.len();
        self.pending.push_back(Queued::Stdout(data));
        self.lag_check();
    }

    /// A watcher too far behind, in bytes or in pieces, falls behind.
    fn lag_check(&mut self) {
        if self.watch && (self.live_len > WATCH_LAG || self.pending.len() > WATCH_PIECES) {
            self.lagged();
        }
    }

    /// Queues a `resize` in order with the output. One right behind
    /// another replaces it: resizes carry no bytes, so only this keeps a
    /// watcher that reads nothing from queueing every size a window
    /// dragged through (between two, output counts towards its lag).
    fn queue_resize(&mut self, size: PtySize) {
        if self.resync {
            return;
        }
        let resize = Queued::Resize {
            cols: size.cols,
            rows: size.rows,
        };
        match self.pending.back_mut() {
            Some(last @ Queued::Resize { .. }) => *last = resize,
            _ => {
                self.pending.push_back(resize);
                self.lag_check();
            }
        }
    }

    /// A watcher fell behind: what it has queued is dropped, and a redraw
    /// follows once it has credit again.
    fn lagged(&mut self) {
        self.pending = VecDeque::new();
        self.pending_len = 0;
        self.live_len = 0;
        self.resync = true;
    }

    /// A watcher that fell behind and has the credit for a redraw, which
    /// no `window` frame may come to trigger (it fell behind because its
    /// connection's queue was full, not for want of credit).
    fn redraw_due(&self) -> bool {
        self.resync && self.credit >= self.window / 2
    }

    /// Whether its connection's queue has drained to half: room for a
    /// redraw (a screen is a few frames) beside the other channels.
    fn room_for_redraw(&self) -> bool {
        self.out.capacity() * 2 >= self.out.max_capacity()
    }

    /// Whether [`Viewer::flush`] has anything to do.
    fn can_flush(&self) -> bool {
        self.credit > 0 && !self.pending.is_empty()
    }

    /// Sends what the credit allows; false when the connection is gone.
    async fn flush(&mut self) -> bool {
        while self.credit > 0 {
            // `live`: output, not a redraw.
            let (live, mut data) = match self.pending.pop_front() {
                None => break,
                Some(Queued::Stdout(data)) => (true, data),
                Some(Queued::Snapshot(data)) => (false, data),
                Some(Queued::Resize { cols, rows }) => {
                    // A control frame: no credit, no lag.
                    let frame = Frame::new(self.ch, Message::Resize { cols, rows });
                    match self.out.try_send(frame) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.lagged();
                            return true;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    }
                }
            };
            let n = data.len().min(self.credit.min(READ_CHUNK as u64) as usize);
            let rest = data.split_off(n);
            if !rest.is_empty() {
                self.pending.push_front(if live {
                    Queued::Stdout(rest)
                } else {
                    Queued::Snapshot(rest)
                });
            }
            self.pending_len -= n;
            if live {
                self.live_len = self.live_len.saturating_sub(n);
            }
            self.credit -= n as u64;
            let kind = if live {
                Message::Stdout
            } else {
                Message::Snapshot
            };
            let frame = Frame::with_payload(self.ch, kind, data);
            if !self.watch {
                // The writer's connection paces the shell, as for any command.
                if self.out.send(frame).await.is_err() {
                    return false;
                }
                continue;
            }
            // A watcher's connection never holds up the session: when its
            // queue is full, it falls behind and is redrawn later.
            match self.out.try_send(frame) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Never sent, so never credited back: the credit stays.
                    self.credit += n as u64;
                    self.lagged();
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        if self.pending.is_empty() {
            // Its memory back: an idle viewer holds none.
            self.pending = VecDeque::new();
        }
        true
    }

    /// Ends the channel with `msg` as its last frame.
    fn finish(self, msg: Message) {
        let _ = self.done.send(Done {
            ch: self.ch,
            exit: Frame::new(self.ch, msg),
        });
    }
}

/// What an attached channel sent, tagged with its viewer.
enum Input {
    Control(u64, Control),
    Stdin(u64, Stdin),
    /// The connection dropped the channel (it closed, or was lost).
    Gone(u64),
}

/// What a session's task starts from, in one allocation of its own.
///
/// Every idle shell holds its task, and a task is as large as its largest
/// state. An async block keeps room for all it captured for its whole
/// life, even what it has moved on: the session was kept twice that way
/// (captured, and again in its running loop) and the request it started
/// from stayed too. Taken apart in [`Start::run`], what is moved on needs
/// no room after.
struct Start {
    req: ExecRequest,
    policy: Arc<ExecPolicy>,
    closed: CancellationToken,
    first: Box<Attach>,
    session: Box<Session>,
    commands: mpsc::Receiver<Command>,
    leader: Arc<std::sync::atomic::AtomicU32>,
    listed: Listed,
    shutdown: CancellationToken,
}

impl Start {
    async fn run(self: Box<Self>) {
        let Start {
            req,
            policy,
            closed,
            first,
            session,
            commands,
            leader,
            listed,
            shutdown,
        } = unboxed(self);
        // Whatever happens to the task (a panic included), the session
        // leaves the table with `listed`, dropped last.
        let started = session.started;
        // Forking happens here, not in the connection that asked; boxed,
        // as its future is large and needed only until the shell runs.
        match Box::pin(spawn_shell(req, policy, closed)).await {
            // As for a command closed while it waits: never started, its
            // exit reads as killed.
            Err(()) => {
                first.refuse(channel::never_started(false, started));
                refuse_waiting(commands, &listed.id);
            }
            Ok(Ok(spawned)) => {
                if let Some(pid) = spawned.child.id() {
                    leader.store(pid, std::sync::atomic::Ordering::Release);
                }
                drop(leader);
                session.run(spawned, commands, first, shutdown).await;
            }
            Ok(Err(err)) => {
                // As for any command: the reason on stderr, then its exit.
                let payload = Bytes::from(err.message);
                let _ = first
                    .out
                    .send(Frame::with_payload(first.ch, Message::Stderr, payload))
                    .await;
                first.refuse(Message::Exit(vocab::ExitStatus {
                    code: Some(err.code),
                    signal: None,
                    timed_out: false,
                    duration_ms: started.elapsed().as_millis() as u64,
                }));
                refuse_waiting(commands, &listed.id);
            }
        }
        drop(listed);
    }
}

/// The value in `boxed`, its memory freed now. (`*boxed` in an async fn
/// frees it only when the function ends: for a session's task, its life.)
#[expect(clippy::boxed_local, reason = "freeing the box is its purpose")]
fn unboxed<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Starts a session's shell; a future of its own, so that the request
/// and what the start holds are gone once it has started.
async fn spawn_shell(
    req: ExecRequest,
    policy: Arc<ExecPolicy>,
    closed: CancellationToken,
) -> Result<Result<Box<process::Spawned>, process::SpawnError>, ()> {
    process::spawn_admitted_unless(&req, &policy, closed.cancelled())
        .await
        .map(|started| started.map(Box::new))
}

struct Session {
    id: String,
    info: Arc<Mutex<SessionInfo>>,
    limits: SessionLimits,
    model: Model,
    /// Most sessions have one viewer.
    viewers: SmallMap<u64, Viewer>,
    writer: Option<u64>,
    next_key: u64,
    inputs: SelectAll<BoxStream<'static, Input>>,
    started: std::time::Instant,
    /// The writer left or changed: the credit of input still queued from
    /// the old one is not the new one's to get back.
    writer_changed: bool,
    /// Bytes of queued input whose credit is returned to nobody.
    unpaid: usize,
    /// The session was hung up: what is left of it is killed then.
    kill_at: Option<tokio::time::Instant>,
    /// The shell is hung up once more then, if it still runs.
    rehup_at: Option<tokio::time::Instant>,
    /// A watcher that fell behind with credit to spare (its connection's
    /// queue was full) is redrawn then: no credit may come back to do it.
    resync_at: Option<tokio::time::Instant>,
}

/// Which of a session's deadlines its timer is set for.
#[derive(Clone, Copy)]
enum Deadline {
    /// The shell has ended: what it printed last has had its time.
    Drain,
    /// Nobody attached within the linger time.
    Linger,
    /// The second hangup.
    Rehup,
    /// The end of the hangup's grace.
    Kill,
    /// A watcher that fell behind is redrawn.
    Resync,
}

/// How long after falling behind with credit to spare a watcher is
/// redrawn: 100 ms, time for its connection's full queue to drain. A
/// redraw waits for the queue to be half empty, looked at this often: one
/// into a queue still full would be dropped again.
const RESYNC_RETRY: Duration = Duration::from_millis(100);

/// How long a shell has after its hangup (SIGHUP, as when a terminal
/// window is closed) to save its history and end its jobs before whatever
/// is left of its session is killed: 2 s.
pub(crate) const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// When a shell still running after its hangup gets a second SIGHUP:
/// 250 ms. bash notes a SIGHUP that lands while readline draws its prompt,
/// before it waits for input, and acts on it only when its read returns
/// (a closed terminal's read does at once; a session's, only at the next
/// keystroke). The second one interrupts that read.
const HANGUP_REPEAT: Duration = Duration::from_millis(250);

impl Session {
    /// Ends the session as closing a terminal does: SIGHUP (and SIGCONT,
    /// should it be stopped) to the terminal's foreground job, and SIGHUP
    /// to the shell, which saves its history, hangs up its own jobs and exits;
    /// its exit then kills whatever is left, as any command's does. A
    /// shell that ignores the hangup, and everything of its session, is
    /// killed after [`HANGUP_GRACE`]. A second hangup changes nothing.
    fn hang_up(&mut self, pty: Option<&process::Pty>, group: &process::ProcessGroup) {
        if self.kill_at.is_some() {
            return;
        }
        // Each group once here: bash that gets a second SIGHUP while it
        // saves its history dies at once, without it (the repeat below
        // comes only while the shell waits for input).
        let job = pty
            .and_then(|p| p.foreground(group.id()))
            .filter(|&fg| Some(fg) != group.id());
        // The job may be stopped: it gets SIGCONT after its SIGHUP, as a
        // terminal's hangup gives it. The shell gets SIGCONT only when it
        // is stopped itself (it hangs up its own stopped jobs).
        if let Some(job) = job {
            let _ = nix::sys::signal::killpg(job, Signal::SIGHUP);
            let _ = nix::sys::signal::killpg(job, Signal::SIGCONT);
        }
        group.signal(Signal::SIGHUP);
        let shell = group.id().map(|p| p.as_raw());
        if shell
            .and_then(process::proc_stat)
            .is_some_and(|s| s.state == 'T')
        {
            group.signal(Signal::SIGCONT);
        }
        let now = tokio::time::Instant::now();
        self.rehup_at = Some(now + HANGUP_REPEAT);
        self.kill_at = Some(now + HANGUP_GRACE);
    }

    fn info(&self) -> std::sync::MutexGuard<'_, SessionInfo> {
        self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's loop. Its arguments are boxed: an async fn keeps room
    /// for its arguments beside the locals they are moved into, for its
    /// whole life, and every idle shell holds this future.
    async fn run(
        mut self: Box<Self>,
        spawned: Box<process::Spawned>,
        mut commands: mpsc::Receiver<Command>,
        first: Box<Attach>,
        shutdown: CancellationToken,
    ) {
        let process::Spawned {
            mut child,
            mut group,
            io,
        } = unboxed(spawned);
        let (writer, reader, _, pty) = channel::split_io(io);
        let mut stdin = StdinQueue::new(writer, Some(0x04));
        let mut output = Source::new(reader);
        // Some once the leader has ended (with its status, if it could be read).
        let mut status: Option<Option<std::process::ExitStatus>> = None;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut linger_until: Option<tokio::time::Instant> = None;
        let mut lingered = false;
        let far = tokio::time::Instant::now() + Duration::from_secs(60 * 60 * 24 * 365);
        Box::pin(self.join(unboxed(first), pty.as_deref(), false)).await;

        loop {
            // What is queued goes first (the redraw of a new attachment
            // among it): reading waits for the writer's queue to empty.
            if std::mem::take(&mut self.writer_changed) {
                // Input the old writer sent still reaches the shell (a page
                // reloaded right after Enter), but its credit is nobody's
                // to get back: the new writer never spent it.
                self.unpaid = stdin.forget_owed();
            }
            self.return_stdin_credit(&mut stdin).await;
            // Boxed (its future is large), and only when a viewer has
            // output queued and the credit for it.
            if self.viewers.values().any(Viewer::can_flush) {
                Box::pin(self.flush()).await;
            }
            if self.resync_at.is_none() && self.viewers.values().any(Viewer::redraw_due) {
                self.resync_at = Some(tokio::time::Instant::now() + RESYNC_RETRY);
            }
            if status.is_some() && !output.open() {
                break;
            }
            // No writer (watchers do not keep a shell alive): start the
            // linger clock (once).
            if self.writer.is_none() && status.is_none() && !lingered {
                if linger_until.is_none() {
                    let until = tokio::time::Instant::now() + self.limits.linger;
                    linger_until = Some(until);
                    self.info().ends_at_ms = Some(now_ms() + self.limits.linger.as_millis() as u64);
                }
            } else if linger_until.take().is_some() {
                self.info().ends_at_ms = None;
            }
            let (can_read, limit) = match self.writer.and_then(|k| self.viewers.get(&k)) {
                Some(w) => (
                    w.pending.is_empty() && w.credit > 0,
                    w.credit.min(READ_CHUNK as u64) as usize,
                ),
                None => (true, READ_CHUNK),
            };
            // One timer for the five deadlines, the earliest first (a
            // timer is a hundred bytes of the task, held by every shell).
            let alive = status.is_none();
            let timer = [
                (Deadline::Drain, drain_until),
                (
                    Deadline::Linger,
                    linger_until.filter(|_| alive && !lingered),
                ),
                (Deadline::Rehup, self.rehup_at.filter(|_| alive)),
                (Deadline::Kill, self.kill_at.filter(|_| alive)),
                (Deadline::Resync, self.resync_at),
            ]
            .into_iter()
            .filter_map(|(which, at)| Some((at?, which)))
            .min_by_key(|(at, _)| *at);
            let (due, which) = timer.unwrap_or((far, Deadline::Drain));
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if status.is_none() => {
                    group.signal(Signal::SIGKILL);
                    status = Some(child.wait().await.ok());
                    drain_until = Some(tokio::time::Instant::now());
                }
                cmd = commands.recv() => match cmd {
                    // Attaching is rare and its future large: boxed, so
                    // that an idle shell's task does not keep room for it.
                    Some(Command::Attach(attach)) => {
                        if status.is_some() {
                            // It is ending: the exit follows for everyone.
                            Box::pin(self.join(*attach, None, true)).await;
                        } else {
                            Box::pin(self.join(*attach, pty.as_deref(), false)).await;
                        }
                    }
                    Some(Command::Watchers(allowed)) => self.revoke(&allowed),
                    Some(Command::End) | None => self.hang_up(pty.as_deref(), &group),
                },
                Some(input) = self.inputs.next(), if !self.inputs.is_empty() => {
                    Box::pin(self.input(input, pty.as_deref(), &mut group, &mut stdin)).await;
                }
                result = child.wait(), if status.is_none() => {
                    status = Some(result.ok());
                    group.kill_and_forget();
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = tokio::time::sleep_until(due), if timer.is_some() => {
                    match which {
                        Deadline::Drain => break,
                        Deadline::Linger => {
                            tracing::info!(session = %self.id, "nobody attached within the linger time; ending the session");
                            // Once: the leader's exit ends the loop.
                            lingered = true;
                            self.hang_up(pty.as_deref(), &group);
                        }
                        Deadline::Rehup => {
                            self.rehup_at = None;
                            // Only to a shell back at its read: one saving its
                            // history would die of it before finishing.
                            if !group.id().is_some_and(|p| process::busy_elsewhere(p.as_raw())) {
                                group.signal(Signal::SIGHUP);
                            }
                        }
                        Deadline::Kill => {
                            tracing::info!(session = %self.id, "the shell outlived its hangup; killing its session");
                            // Once (a second hangup changes nothing).
                            self.kill_at = Some(far);
                            group.signal(Signal::SIGKILL);
                        }
                        Deadline::Resync => {
                            self.resync_at = None;
                            // Only into a queue with room: a redraw into one
                            // still full would be dropped again, its cost
                            // spent for nothing (the top of the loop sets the
                            // next try).
                            let due: Vec<u64> = self
                                .viewers
                                .iter()
                                .filter(|(_, v)| v.redraw_due() && v.room_for_redraw())
                                .map(|(&key, _)| key)
                                .collect();
                            for key in due {
                                Box::pin(self.snapshot(key, false)).await;
                            }
                        }
                    }
                }
                data = output.read(limit), if output.open() && can_read => {
                    if let Some(data) = data {
                        for v in self.viewers.values_mut() {
                            v.queue(data.clone());
                        }
                        self.model.feed(data).await;
                    }
                }
                _ = stdin.write_some(), if stdin.pending() => {}
            }
        }
        Box::pin(self.flush()).await;
        // Gone from the table before the exit is sent: a list made after
        // the exit never shows it.
        commands.close();
        let exit = {
            let (code, signal) = match status.flatten() {
                Some(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal().map(vocab::SignalNumber))
                }
                None => (None, None),
            };
            Message::Exit(vocab::ExitStatus {
                code,
                signal,
                timed_out: false,
                duration_ms: self.started.elapsed().as_millis() as u64,
            })
        };
        for (_, v) in self.viewers.drain() {
            v.finish(exit.clone());
        }
        // Attaches that raced with the end get the same exit.
        while let Ok(cmd) = commands.try_recv() {
            if let Command::Attach(a) = cmd {
                a.refuse(exit.clone());
            }
        }
        drop(group);
    }

    /// Adds a channel: `session` frame, then a snapshot, then live output.
    async fn join(&mut self, attach: Attach, pty: Option<&process::Pty>, ending: bool) {
        let key = self.next_key;
        self.next_key += 1;
        let Attach {
            ch,
            watch,
            watcher,
            size,
            window,
            control,
            input,
            stdin_spent,
            out,
            done,
        } = attach;
        let viewer = Viewer::new(ch, watch, window, (out, done), stdin_spent);
        let viewer = Viewer {
            watcher: if watch { watcher } else { None },
            ..viewer
        };
        if viewer
            .out
            .send(Frame::new(
                ch,
                Message::Session {
                    id: self.id.clone(),
                },
            ))
            .await
            .is_err()
        {
            return;
        }
        if !watch && !ending {
            self.writer_changed = true;
            if let Some(old) = self.writer.replace(key)
                && let Some(old) = self.viewers.remove(&old)
            {
                old.finish(Message::Detached {
                    reason: "the session was attached as writer elsewhere".into(),
                });
            }
            if let (Some(size), Some(pty)) = (size, pty) {
                self.resize(clamp(size), pty).await;
            }
        }
        let controls = stream::unfold(control, move |mut rx| async move {
            rx.recv().await.map(|c| (Input::Control(key, c), rx))
        })
        .chain(stream::once(async move { Input::Gone(key) }));
        let stdins = stream::unfold(input, move |mut rx| async move {
            rx.recv().await.map(|s| (Input::Stdin(key, s), rx))
        });
        self.inputs.push(controls.boxed());
        self.inputs.push(stdins.boxed());
        self.viewers.insert(key, viewer);
        self.snapshot(key, true).await;
        self.info().last_attached_ms = now_ms();
        self.touch();
    }

    fn touch(&self) {
        let attached = self.writer.is_some();
        let watching = self.viewers.values().filter(|v| v.watch).count() as u32;
        let mut info = self.info();
        info.attached = attached;
        info.watching = watching;
    }

    async fn resize(&mut self, size: PtySize, pty: &process::Pty) {
        let _ = pty.resize(size);
        self.model.set_size(size).await;
        {
            let mut info = self.info();
            info.cols = size.cols;
            info.rows = size.rows;
        }
        // The writer's size wins: watchers are told, in order with the
        // output drawn at the old size before it.
        for v in self.viewers.values_mut().filter(|v| v.watch) {
            v.queue_resize(size);
        }
    }

    /// Queues for viewer `key` the bytes that redraw the terminal (with
    /// the scrollback, or the screen alone for a watcher catching up); a
    /// watcher is first told the terminal's size.
    async fn snapshot(&mut self, key: u64, scrollback: bool) {
        let (bytes, size) = self.model.redraw(scrollback).await;
        let bytes = Bytes::from(bytes);
        if let Some(v) = self.viewers.get_mut(&key) {
            v.resync = false;
            v.pending.clear();
            v.pending_len = 0;
            v.live_len = 0;
            if v.watch {
                v.queue_resize(size);
            }
            // Split so that no frame is larger than a read would make.
            let mut rest = bytes;
            while !rest.is_empty() {
                let part = rest.split_to(rest.len().min(READ_CHUNK));
                v.pending_len += part.len();
                v.pending.push_back(Queued::Snapshot(part));
            }
        }
    }

    async fn input(
        &mut self,
        input: Input,
        pty: Option<&process::Pty>,
        group: &mut process::ProcessGroup,
        stdin: &mut StdinQueue<channel::Writer>,
    ) {
        let is_writer = |key| self.writer == Some(key);
        match input {
            Input::Gone(key) => self.leave(key, None),
            Input::Stdin(key, Stdin { data, eof }) => {
                if is_writer(key) {
                    if stdin.push(data, eof).is_err()
                        && let Some(v) = self.viewers.get(&key)
                    {
                        let msg =
                            Message::error(ErrorCode::StdinClosed, "the shell's input is closed");
                        let _ = v.out.send(Frame::new(v.ch, msg)).await;
                    }
                } else if let Some(v) = self.viewers.get_mut(&key) {
                    // A watcher's input is refused (told once), its credit
                    // returned in batches; it never waits on the session.
                    let cost = data.len().max(1);
                    let _ = v
                        .stdin_spent
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                            Some(s.saturating_sub(cost))
                        });
                    v.refused += cost;
                    if !v.warned {
                        let msg = Message::error(
                            ErrorCode::Forbidden,
                            "a watcher cannot type into the session",
                        );
                        v.warned = v.out.try_send(Frame::new(v.ch, msg)).is_ok();
                    }
                    if v.refused >= channel::STDIN_CREDIT_BATCH {
                        let add = v.refused as u64;
                        if v.out
                            .try_send(Frame::new(v.ch, Message::Window { add }))
                            .is_ok()
                        {
                            v.refused = 0;
                        }
                    }
                }
            }
            Input::Control(key, control) => match control {
                Control::Window(add) => {
                    if let Some(v) = self.viewers.get_mut(&key) {
                        let before = v.credit;
                        v.credit = v.credit.saturating_add(add);
                        // A watcher that fell behind for want of credit
                        // redraws once this brings it to half its window.
                        // One that had it already waits for the timer and
                        // room in its queue: else each acknowledgement, of
                        // a byte if it likes, would cost a redraw.
                        if before < v.window / 2 && v.redraw_due() {
                            self.snapshot(key, false).await;
                        }
                    }
                }
                Control::Resize(size) if is_writer(key) => {
                    if let Some(pty) = pty {
                        self.resize(clamp(size), pty).await;
                    }
                }
                Control::Signal(sig) if is_writer(key) => {
                    if !pty.is_some_and(|p| p.signal_foreground(sig, group.id())) {
                        group.signal(sig);
                    }
                }
                // The writer's close ends the session, as closing a
                // terminal window does; a watcher's only detaches it.
                Control::Close if is_writer(key) => self.hang_up(pty, group),
                Control::Close | Control::Detach => self.leave(
                    key,
                    Some(Message::Detached {
                        reason: "detached".into(),
                    }),
                ),
                Control::Resize(_) | Control::Signal(_) => {}
            },
        }
    }

    /// Drops viewer `key`; its channel ends with `last` (when it is still
    /// there to hear it).
    fn leave(&mut self, key: u64, last: Option<Message>) {
        if self.writer == Some(key) {
            self.writer = None;
            self.writer_changed = true;
        }
        if let Some(v) = self.viewers.remove(&key) {
            v.finish(last.unwrap_or(Message::Detached {
                reason: "the connection closed".into(),
            }));
        }
        self.touch();
    }

    /// Detaches the watchers the owner no longer shares the session with.
    fn revoke(&mut self, allowed: &[String]) {
        if allowed.iter().any(|w| w == "*") {
            return;
        }
        let gone: Vec<u64> = self
            .viewers
            .iter()
            .filter(|(_, v)| v.watcher.as_ref().is_some_and(|w| !allowed.contains(w)))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.leave(
                key,
                Some(Message::Detached {
                    reason: "the owner no longer shares this session with you".into(),
                }),
            );
        }
    }

    async fn flush(&mut self) {
        let mut gone = Vec::new();
        for (key, v) in self.viewers.iter_mut() {
            if !v.flush().await {
                gone.push(*key);
            }
        }
        for key in gone {
            self.leave(key, None);
        }
    }

    async fn return_stdin_credit(&mut self, stdin: &mut StdinQueue<channel::Writer>) {
        let Some(due) = stdin.credit_due() else {
            return;
        };
        // What a former writer's input consumed is not returned.
        let skip = self.unpaid.min(due as usize);
        self.unpaid -= skip;
        let add = due - skip as u64;
        let Some(v) = self.writer.and_then(|k| self.viewers.get(&k)) else {
            return;
        };
        if add == 0 {
            return;
        }
        let _ = v
            .stdin_spent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(s.saturating_sub(add as usize))
            });
        let _ = v.out.send(Frame::new(v.ch, Message::Window { add })).await;
    }
}

/// The session's terminal model. Output is gathered and parsed in pieces
/// of up to [`MODEL_WAITING`], off the session's task (on the blocking
/// pool, one piece at a time and in order), so that the next read and the
/// forwarding of this one need not wait for it; a redraw or a resize
/// first parses everything forwarded so far.
///
/// The parser comes only once the output outgrows [`LAZY_BYTES`]: a parser
/// holds two grids of cells from the start (about 120 KiB at 80 by 24),
/// ten times what ttyd spends on a whole idle shell, and most shells that
/// sit at a prompt have printed less than that. Until then the model is
/// the bytes and resizes themselves, and a redraw parses them afresh, which
/// gives exactly the parser's state.
struct Model {
    parser: Option<Arc<Mutex<Term>>>,
    /// What the parser would have been fed, while there is none.
    early: Early,
    scrollback: usize,
    /// The chunk being parsed, if any.
    busy: Option<tokio::task::JoinHandle<()>>,
    /// Output not parsed yet, parsed together once it outgrows
    /// [`MODEL_WAITING`] or a redraw or resize needs it: a flood reaches the
    /// parser in pieces large enough that it can leave out most of their
    /// lines (src/agent/terminal.rs).
    waiting: Vec<u8>,
}

/// A session's output and resizes before its parser exists.
struct Early {
    /// The size the terminal started at.
    size: PtySize,
    bytes: Vec<u8>,
    /// Each resize, and how much of `bytes` came before it.
    resizes: Vec<(usize, PtySize)>,
}

/// Output a session may print before its model gets a parser: 4 KiB.
const LAZY_BYTES: usize = 4 * 1024;
/// Resizes a session may have before its model gets a parser: 32.
const LAZY_RESIZES: usize = 32;

/// Output smaller than this is parsed in place: handing it off would cost
/// more than parsing it (a keystroke's echo).
const PARSE_IN_PLACE: usize = 4 * 1024;

/// Output a session holds before its model parses it: 256 KiB. Beyond
/// it, and while the previous piece is still being parsed, the output waits
/// for the parser.
const MODEL_WAITING: usize = 256 * 1024;

impl Early {
    fn new(size: PtySize) -> Early {
        Early {
            size,
            bytes: Vec::new(),
            resizes: Vec::new(),
        }
    }

    /// A parser fed everything so far, in order.
    fn parse(&self, scrollback: usize) -> Term {
        let mut term = Term::new(nonzero(self.size.rows), nonzero(self.size.cols), scrollback);
        let mut at = 0;
        for &(upto, size) in &self.resizes {
            term.feed(&self.bytes[at..upto]);
            term.set_size(nonzero(size.rows), nonzero(size.cols));
            at = upto;
        }
        term.feed(&self.bytes[at..]);
        term
    }
}

impl Model {
    fn new(size: PtySize, scrollback: usize) -> Model {
        Model {
            parser: None,
            early: Early::new(size),
            scrollback,
            busy: None,
            waiting: Vec::new(),
        }
    }

    /// The parser, made now from the early output if there is none yet.
    fn parser(&mut self) -> &Arc<Mutex<Term>> {
        if self.parser.is_none() {
            let size = self.early.size;
            let early = std::mem::replace(&mut self.early, Early::new(size));
            self.parser = Some(Arc::new(Mutex::new(early.parse(self.scrollback))));
        }
        self.parser.as_ref().expect("made above")
    }

    fn lock(parser: &Mutex<Term>) -> std::sync::MutexGuard<'_, Term> {
        parser.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the piece being parsed, if any, is in the model.
    async fn finish_piece(&mut self) {
        if let Some(job) = self.busy.take() {
            let _ = job.await;
        }
    }

    /// Waits until every chunk fed so far is parsed.
    async fn settle(&mut self) {
        if !self.waiting.is_empty() {
            self.finish_piece().await;
            let waiting = Bytes::from(std::mem::take(&mut self.waiting));
            self.parse(waiting);
        }
        self.finish_piece().await;
    }

    async fn feed(&mut self, data: Bytes) {
        if self.parser.is_none()
            && self.waiting.is_empty()
            && self.early.bytes.len() + data.len() <= LAZY_BYTES
        {
            self.early.bytes.extend_from_slice(&data);
            return;
        }
        // Parsed only once enough has come (or a redraw or a resize needs
        // it): a flood then reaches the parser in pieces large enough to
        // leave out most of their lines, and a keystroke's echo costs a copy.
        if self.waiting.len() + data.len() <= MODEL_WAITING {
            self.waiting.extend_from_slice(&data);
            return;
        }
        self.finish_piece().await;
        let chunk = if self.waiting.is_empty() {
            data
        } else {
            self.waiting.extend_from_slice(&data);
            Bytes::from(std::mem::take(&mut self.waiting))
        };
        self.parse(chunk);
    }

    /// Parses `chunk` here if it is small, else on a blocking thread
    /// (the model's `busy` job).
    fn parse(&mut self, chunk: Bytes) {
        let parser = self.parser();
        if chunk.len() < PARSE_IN_PLACE {
            Self::lock(parser).feed(&chunk);
            return;
        }
        let parser = parser.clone();
        self.busy = Some(tokio::task::spawn_blocking(move || {
            Self::lock(&parser).feed(&chunk)
        }));
    }

    async fn set_size(&mut self, size: PtySize) {
        self.settle().await;
        if self.parser.is_none() && self.early.resizes.len() < LAZY_RESIZES {
            let upto = self.early.bytes.len();
            self.early.resizes.push((upto, size));
            return;
        }
        Self::lock(self.parser()).set_size(nonzero(size.rows), nonzero(size.cols));
    }

    /// The redraw of everything fed so far, and the size it is drawn at.
    async fn redraw(&mut self, scrollback: bool) -> (Vec<u8>, PtySize) {
        self.settle().await;
        // Without a parser, one is made for this redraw only.
        let mut early;
        let mut guard;
        let term: &mut Term = match &self.parser {
            Some(parser) => {
                guard = Self::lock(parser);
                &mut guard
            }
            None => {
                early = self.early.parse(self.scrollback);
                &mut early
            }
        };
        let (rows, cols) = term.screen().size();
        let size = PtySize {
            cols: cols.get(),
            rows: rows.get(),
        };
        (term.redraw(scrollback), size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watcher with `credit`, and the frames sent to it.
    fn watcher(credit: u64) -> (Viewer, mpsc::Receiver<Frame>) {
        let (out, frames) = mpsc::channel(64);
        let (done, _) = mpsc::unbounded_channel();
        let viewer = Viewer::new(9, true, credit, (out, done), Arc::default());
        (viewer, frames)
    }

    #[tokio::test]
    async fn a_watcher_that_reads_nothing_queues_one_resize_between_outputs() {
        let (mut v, mut frames) = watcher(0);
        for cols in 1..=1000 {
            v.queue_resize(PtySize { cols, rows: 24 });
        }
        v.queue(Bytes::from_static(b"out"));
        v.queue_resize(PtySize { cols: 7, rows: 5 });
        v.queue_resize(PtySize { cols: 80, rows: 24 });
        assert_eq!(v.pending.len(), 3, "a window dragged queues its last size");
        assert_eq!(v.pending_len, 3);
        // Credit comes: all of it goes, in order, and the queue's memory
        // goes with it.
        v.credit = 100;
        assert!(v.flush().await);
        let mut sent = Vec::new();
        while let Ok(frame) = frames.try_recv() {
            sent.push((frame.msg, frame.payload));
        }
        assert_eq!(
            sent,
            [
                (
                    Message::Resize {
                        cols: 1000,
                        rows: 24
                    },
                    Bytes::new()
                ),
                (Message::Stdout, Bytes::from_static(b"out")),
                (Message::Resize { cols: 80, rows: 24 }, Bytes::new()),
            ]
        );
        assert_eq!((v.pending_len, v.live_len, v.credit), (0, 0, 97));
        assert_eq!(v.pending.capacity(), 0, "an empty queue holds no memory");
        // Output a byte at a time, a resize between: bounded in pieces,
        // not only in bytes; past the bound the watcher falls behind (a
        // redraw comes once it reads again).
        v.credit = 0;
        for i in 0..WATCH_PIECES {
            v.queue(Bytes::from_static(b"."));
            v.queue_resize(PtySize {
                cols: 80 + (i % 2) as u16,
                rows: 24,
            });
            assert!(v.pending.len() <= WATCH_PIECES);
        }
        assert!(v.resync, "too many pieces: it fell behind");
        assert!(v.pending.is_empty() && v.live_len < WATCH_LAG);
    }

    /// A watcher whose connection's queue is full falls behind, and what
    /// it could not send keeps its credit: it was never sent, so it never
    /// comes back. Spent, a redraw would wait for more than can return.
    #[tokio::test]
    async fn a_watcher_behind_a_full_connection_keeps_its_credit_and_is_redrawn_once_there_is_room()
    {
        let (mut v, mut frames) = watcher(1024 * 1024);
        // Another channel's frames fill the connection's queue.
        while v.out.try_send(Frame::new(1, Message::Stdout)).is_ok() {}
        v.queue(Bytes::from(vec![b'x'; 10_000]));
        assert!(v.flush().await);
        assert!(v.resync, "it fell behind");
        assert_eq!(v.credit, 1024 * 1024);
        assert!(v.redraw_due(), "it is redrawn without waiting for credit");
        assert!(!v.room_for_redraw(), "but not into a queue still full");
        assert!(
            frames.try_recv().is_ok_and(|f| f.ch == 1),
            "only the other channel's"
        );
        while frames.len() * 2 > v.out.max_capacity() {
            let _ = frames.try_recv();
        }
        assert!(v.room_for_redraw(), "half empty: it is redrawn");
    }

    fn parser(rows: u16, cols: u16) -> vt100::Parser {
        vt100::Parser::new(nonzero(rows), nonzero(cols), 100)
    }

    fn term(rows: u16, cols: u16) -> Term {
        Term::new(nonzero(rows), nonzero(cols), 100)
    }

    #[test]
    fn a_redraw_reproduces_screen_cursor_and_scrollback() {
        let mut p = term(5, 20);
        for i in 1..=12 {
            p.feed(format!("line {i}\r\n").as_bytes());
        }
        p.feed(b"\x1b[1;31mred\x1b[m tail\x1b[2;4H");
        let bytes = p.redraw(true);
        let mut q = parser(5, 20);
        q.process(&bytes);
        assert_eq!(q.screen().contents(), p.screen().contents());
        assert_eq!(q.screen().cursor_position(), p.screen().cursor_position());
        assert_eq!(
            q.screen().cell(4, 0).unwrap().fgcolor(),
            vt100::Color::Idx(1)
        );
        // The scrollback came along: line 1 is at its top.
        q.screen_mut().set_scrollback(usize::MAX);
        assert_eq!(q.screen().scrollback(), p.scrollback_len());
        assert!(q.screen().contents().starts_with("line 1\n"));
    }

    #[test]
    fn no_client_can_make_a_model_larger_than_the_clamp() {
        let huge = PtySize {
            cols: u16::MAX,
            rows: u16::MAX,
        };
        assert_eq!(
            clamp(huge),
            PtySize {
                cols: MAX_COLS,
                rows: MAX_ROWS
            }
        );
        assert_eq!(
            clamp(PtySize { cols: 0, rows: 0 }),
            PtySize { cols: 1, rows: 1 }
        );
    }

    #[test]
    fn a_full_screen_program_comes_back_on_the_alternate_screen() {
        let mut p = term(4, 10);
        p.feed(b"shell$ vi\r\n\x1b[?1049h\x1b[H\x1b[2Jedit me\x1b[3;2H\x1b[?1h");
        let mut q = parser(4, 10);
        q.process(&p.redraw(true));
        assert!(q.screen().alternate_screen());
        assert!(q.screen().application_cursor());
        assert_eq!(q.screen().contents(), p.screen().contents());
        assert_eq!(q.screen().cursor_position(), (2, 1));
    }

    /// The model before its parser draws exactly what the parser would,
    /// resizes included, and takes a parser once the output outgrows it.
    #[tokio::test]
    async fn a_model_without_a_parser_redraws_as_one_would() {
        let start = PtySize { cols: 20, rows: 5 };
        let mut lazy = Model::new(start, 100);
        let mut eager = term(5, 20);
        let step = |i: usize| -> (Bytes, Option<PtySize>) {
            let out = Bytes::from(format!("\x1b[1;3{}mline {i}\x1b[m\r\n", i % 8));
            let size = i.is_multiple_of(5).then_some(PtySize {
                cols: 10 + i as u16 % 30,
                rows: 3 + i as u16 % 7,
            });
            (out, size)
        };
        let mut fed = 0;
        for i in 0..2000 {
            let (out, size) = step(i);
            fed += out.len();
            lazy.feed(out.clone()).await;
            eager.feed(&out);
            if let Some(size) = size {
                lazy.set_size(size).await;
                eager.set_size(nonzero(size.rows), nonzero(size.cols));
            }
            if i.is_multiple_of(97) || i == 1999 {
                let (bytes, size) = lazy.redraw(true).await;
                assert_eq!(bytes, eager.redraw(true), "after {i} lines");
                let (rows, cols) = eager.screen().size();
                assert_eq!((size.rows, size.cols), (rows.get(), cols.get()));
            }
            // Without a parser while the output and resizes fit; past them,
            // with one or with output waiting for it.
            let small = fed <= LAZY_BYTES && (i / 5) < LAZY_RESIZES;
            let parsing = lazy.parser.is_some() || !lazy.waiting.is_empty();
            assert_eq!(parsing, !small, "after {i} lines, {fed} bytes");
        }
        assert!(
            lazy.early.bytes.capacity() == 0,
            "the early bytes are freed"
        );
    }
}
