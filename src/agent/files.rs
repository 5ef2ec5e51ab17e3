//! `put` and `get` channels: a file written or read by the file helper
//! ([`super::file_io`]), run as a command is run, with its bytes under the
//! same flow control as a command's input and output.
//!
//! The agent's part is the channel's: it feeds the helper's stdin from
//! `stdin` frames (returning credit as the helper reads), sends the
//! helper's stdout as `stdout` frames (only while the client has credit),
//! turns the helper's reply line into `file` or `error`, and ends the
//! channel with `exit`. A `close` (or a lost link) kills the helper, which
//! leaves no partial file.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use nix::sys::signal::Signal;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::channel::{Control, Done, READ_CHUNK, Source, Stdin, StdinQueue};
use super::file_io::{self, Identity, Reply};
use super::process::{self, ProcessIo, Spawned};
use super::sandbox::ExecPolicy;
use super::session::Sessions;
use crate::protocol::message::DEFAULT_WINDOW;
use crate::protocol::{ExecRequest, FileInfo, Frame, GetRequest, Message, PutRequest, WirePath};
use crate::vocab::{self, ErrorCode};

/// The longest reply line the helper may give: 64 KiB (a path of at most
/// 4 KiB, base64-encoded, and a few numbers).
const MAX_REPLY: usize = 64 * 1024;

/// What is kept of the helper's stderr, for the message of a failure: 4 KiB.
const MAX_STDERR: usize = 4 * 1024;

/// Hashes of files the agent wrote or read whole, by version: 4 096.
const HASH_CACHE: usize = 4096;

/// What a transfer channel needs from its connection.
pub(crate) struct Transfer {
    pub(crate) ch: u32,
    pub(crate) policy: Arc<ExecPolicy>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) control: super::controls::Controls,
    /// Cancelled by the client's `close` (or the link's loss): a helper
    /// still waiting for its start place then never starts.
    pub(crate) closed: tokio_util::sync::CancellationToken,
    pub(crate) input: super::inbox::Inbox,
    pub(crate) stdin_spent: Arc<AtomicUsize>,
    pub(crate) out: mpsc::Sender<Frame>,
    pub(crate) done: mpsc::UnboundedSender<Done>,
}

/// The SHA-256 of file versions the agent has seen whole, so that a later
/// `get` of the same version can name its hash before sending it (an
/// HTTP `ETag`). Bounded; the oldest entries go first.
#[derive(Default)]
struct HashCache {
    hashes: HashMap<Identity, String>,
    order: VecDeque<Identity>,
}

fn cache() -> &'static Mutex<HashCache> {
    static CACHE: OnceLock<Mutex<HashCache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn remember(identity: Identity, sha256: &str) {
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if cache.hashes.insert(identity, sha256.to_owned()).is_none() {
        cache.order.push_back(identity);
    }
    while cache.order.len() > HASH_CACHE {
        if let Some(old) = cache.order.pop_front() {
            cache.hashes.remove(&old);
        }
    }
}

fn recall(identity: &Identity) -> Option<String> {
    let cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    cache.hashes.get(identity).cloned()
}

impl Transfer {
    /// Ends a transfer whose request could not be read.
    pub(crate) async fn refuse(self, message: String) {
        self.finish(End::Failed(ErrorCode::BadRequest, message), Instant::now())
            .await;
    }

    /// Runs a `put` to its end.
    pub(crate) async fn put(mut self, req: PutRequest) {
        let started = Instant::now();
        let session = req.session.clone();
        let exit = match self.spawn("put", req, session.as_deref()).await {
            Ok(spawned) => self.run_put(spawned).await,
            Err(failure) => failure,
        };
        self.finish(exit, started).await;
    }

    /// Runs a `get` to its end.
    pub(crate) async fn get(mut self, req: GetRequest) {
        let started = Instant::now();
        // A `get` reads no input: what a client sends anyway is dropped
        // (and the connection's stdin credit check bounds it).
        self.input.close();
        let window = req.window.unwrap_or(DEFAULT_WINDOW);
        let session = req.session.clone();
        let exit = match self.spawn("get", req, session.as_deref()).await {
            Ok(spawned) => self.run_get(spawned, window).await,
            Err(failure) => failure,
        };
        self.finish(exit, started).await;
    }

    /// Starts the helper and hands it its request (on its stdin, never on
    /// its command line), with the directory relative paths start from:
    /// `session`'s foreground job's, if one is named, else the user's home.
    async fn spawn<T: serde::Serialize>(
        &self,
        verb: &str,
        req: T,
        session: Option<&str>,
    ) -> Result<Spawned, End> {
        let cwd = match session {
            Some(id) => match self.sessions.cwd(id) {
                Some(dir) => Some(WirePath::from(dir.as_path())),
                None => {
                    return Err(End::Failed(
                        ErrorCode::NoSession,
                        format!("no session {id:?} on this agent"),
                    ));
                }
            },
            None => None,
        };
        let mut line = serde_json::to_vec(&file_io::Job { cwd, req })
            .map_err(|e| End::Failed(ErrorCode::BadRequest, e.to_string()))?;
        line.push(b'\n');
        let helper = self.policy.file_helper().to_string_lossy().into_owned();
        let exec = ExecRequest {
            argv: Some(vec![
                helper,
                file_io::HELPER_ARG.to_owned(),
                verb.to_owned(),
            ]),
            ..Default::default()
        };
        let mut spawned =
            process::spawn_admitted_unless(&exec, &self.policy, self.closed.cancelled())
                .await
                .map_err(|()| End::Closed)?
                .map_err(|e| {
                    End::Failed(
                        ErrorCode::FileError,
                        format!("cannot run the file helper: {}", e.message.trim()),
                    )
                })?;
        // Closed while it started: the helper never gets its job (a `put`
        // would make its file first).
        if self.closed.is_cancelled() {
            spawned.group.signal(Signal::SIGKILL);
            return Err(End::Closed);
        }
        if let ProcessIo::Pipes {
            stdin: Some(stdin), ..
        } = &mut spawned.io
        {
            use tokio::io::AsyncWriteExt;
            // The helper reads it first; a helper that died instead shows
            // in its reply (or its silence).
            let _ = stdin.write_all(&line).await;
        }
        Ok(spawned)
    }

    async fn run_put(&mut self, spawned: Spawned) -> End {
        let Spawned {
            mut child,
            mut group,
            io,
        } = spawned;
        let ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } = io
        else {
            return End::Failed(ErrorCode::FileError, "the helper has no pipes".into());
        };
        let mut queue = StdinQueue::new(stdin.map(|s| Box::new(s) as super::channel::Writer), None);
        let mut reply = Bounded::new(MAX_REPLY);
        let mut errors = Bounded::new(MAX_STDERR);
        let (mut stdout, mut stderr) = (stdout, stderr);
        let mut status = None;
        let mut input_open = true;
        let mut control_open = true;
        loop {
            if status.is_some() && stdout.is_none() && stderr.is_none() {
                break;
            }
            tokio::select! {
                biased;
                msg = self.control.recv(), if control_open => {
                    control_open = msg.is_some();
                    if matches!(msg, None | Some(Control::Close)) {
                        group.signal(Signal::SIGKILL);
                        return End::Closed;
                    }
                }
                result = child.wait(), if status.is_none() => {
                    status = Some(result.ok());
                    group.kill_and_forget();
                }
                msg = self.input.recv(), if input_open => match msg {
                    Some(input) => {
                        let Stdin { data, eof } = input;
                        // Input after the end, or after the helper stopped
                        // reading (it refused): dropped, its credit returned.
                        let _ = queue.push(data, eof);
                    }
                    None => input_open = false,
                },
                _ = queue.write_some(), if queue.pending() => {}
                more = read_some(&mut stdout, &mut reply) => { let _ = more; }
                more = read_some(&mut stderr, &mut errors) => { let _ = more; }
            }
            super::channel::return_stdin_credit(self.ch, &self.out, &mut queue, &self.stdin_spent)
                .await;
        }
        let ok = status.flatten().is_some_and(|s| s.success());
        match parse_reply(&reply.data) {
            Some(Reply::Ok(done)) if ok => {
                if let Some(sha) = &done.info.sha256 {
                    remember(done.identity, sha);
                }
                self.send_info(&done.info).await;
                End::Ok
            }
            Some(Reply::Error { code, message }) => End::Failed(code, message),
            _ => End::Failed(ErrorCode::FileError, helper_failed(&errors.data)),
        }
    }

    async fn run_get(&mut self, spawned: Spawned, window: u64) -> End {
        let Spawned {
            mut child,
            mut group,
            io,
        } = spawned;
        let ProcessIo::Pipes { stdout, stderr, .. } = io else {
            return End::Failed(ErrorCode::FileError, "the helper has no pipes".into());
        };
        let mut stderr = stderr;
        let mut errors = Bounded::new(MAX_STDERR);
        let Some(mut stdout) = stdout else {
            return End::Failed(ErrorCode::FileError, "the helper has no stdout".into());
        };
        // The reply line first (and whatever data came with it). Credit
        // that comes meanwhile counts later.
        let mut head = Vec::new();
        let mut early_credit = 0u64;
        let newline = loop {
            if let Some(i) = head.iter().position(|&b| b == b'\n') {
                break Some(i);
            }
            if head.len() > MAX_REPLY {
                break None;
            }
            let mut buf = [0u8; 8192];
            tokio::select! {
                biased;
                msg = self.control.recv() => match msg {
                    Some(Control::Window(add)) => early_credit = early_credit.saturating_add(add),
                    None | Some(Control::Close) => {
                        group.signal(Signal::SIGKILL);
                        return End::Closed;
                    }
                    Some(_) => {}
                },
                n = stdout.read(&mut buf) => match n {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break None,
                },
            }
        };
        let Some(newline) = newline else {
            let status = child.wait().await.ok();
            group.kill_and_forget();
            drain(&mut stderr, &mut errors).await;
            let _ = status;
            return End::Failed(ErrorCode::FileError, helper_failed(&errors.data));
        };
        let done = match parse_reply(&head[..newline]) {
            Some(Reply::Ok(done)) => done,
            Some(Reply::Error { code, message }) => {
                let _ = child.wait().await;
                group.kill_and_forget();
                return End::Failed(code, message);
            }
            None => {
                group.kill_and_forget();
                return End::Failed(
                    ErrorCode::FileError,
                    "the helper's reply is not valid".into(),
                );
            }
        };
        let mut info = done.info;
        let whole = info.offset == 0 && info.length == info.size;
        info.sha256 = recall(&done.identity);
        self.send_info(&info).await;

        let mut flow = Outflow {
            credit: window.saturating_add(early_credit),
            sent: 0,
            hasher: whole.then(Sha256::new),
        };
        // What came with the reply line goes first, within the credit as
        // the rest does (it was sent whole, past a window smaller than it).
        let mut early = Bytes::copy_from_slice(&head[newline + 1..]);
        let mut source = Source::new(Some(stdout));
        let mut status = None;
        loop {
            if !early.is_empty() && flow.credit > 0 {
                let n = flow.credit.min(early.len() as u64) as usize;
                flow.send(self.ch, &self.out, early.split_to(n)).await;
                continue;
            }
            if status.is_some() && !source.open() && stderr.is_none() && early.is_empty() {
                break;
            }
            // No credit while early bytes wait (they went first above):
            // nothing is read past them.
            let limit = flow.credit.min(READ_CHUNK as u64) as usize;
            tokio::select! {
                biased;
                msg = self.control.recv() => match msg {
                    Some(Control::Window(add)) => flow.credit = flow.credit.saturating_add(add),
                    None | Some(Control::Close) => {
                        group.signal(Signal::SIGKILL);
                        return End::Closed;
                    }
                    Some(_) => {}
                },
                result = child.wait(), if status.is_none() => {
                    status = Some(result.ok());
                    group.kill_and_forget();
                }
                data = source.read(limit), if source.open() && limit > 0 => {
                    if let Some(data) = data {
                        flow.send(self.ch, &self.out, data).await;
                    }
                }
                more = read_some(&mut stderr, &mut errors) => { let _ = more; }
            }
        }
        let code = status.flatten().and_then(|s| s.code());
        if code == Some(0) && flow.sent == info.length {
            if let Some(hasher) = flow.hasher {
                let sha = hex::encode(hasher.finalize());
                // Only a file that did not change while it was read has
                // this hash (the helper says what it looked like after).
                let after = serde_json::from_slice::<Identity>(errors.data.trim_ascii()).ok();
                if after == Some(done.identity) {
                    remember(done.identity, &sha);
                    info.sha256 = Some(sha);
                    self.send_info(&info).await;
                }
            }
            return End::Ok;
        }
        let text = helper_failed(&errors.data);
        if code == Some(3) {
            End::Failed(ErrorCode::FileChanged, text)
        } else {
            End::Failed(ErrorCode::FileError, text)
        }
    }

    async fn send_info(&self, info: &FileInfo) {
        if let Ok(frame) = Frame::json(self.ch, Message::File, info) {
            let _ = self.out.send(frame).await;
        }
    }

    /// Sends how the transfer ended: `error` (if it failed) and `exit`.
    async fn finish(self, end: End, started: Instant) {
        let (code, signal) = match end {
            End::Ok => (Some(0), None),
            End::Failed(code, message) => {
                let _ = self
                    .out
                    .send(Frame::new(self.ch, Message::error(code, message)))
                    .await;
                (Some(1), None)
            }
            End::Closed => (None, Some(vocab::SignalNumber(libc::SIGKILL))),
        };
        let exit = Message::Exit(vocab::ExitStatus {
            code,
            signal,
            timed_out: false,
            duration_ms: started.elapsed().as_millis() as u64,
        });
        let _ = self.done.send(Done {
            ch: self.ch,
            exit: Frame::new(self.ch, exit),
        });
    }
}

/// A download's bytes on their way: the output credit left, how many went,
/// and their hash when the whole file is sent.
struct Outflow {
    credit: u64,
    sent: u64,
    hasher: Option<Sha256>,
}

impl Outflow {
    async fn send(&mut self, ch: u32, out: &mpsc::Sender<Frame>, data: Bytes) {
        self.sent += data.len() as u64;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&data);
        }
        self.credit = self.credit.saturating_sub(data.len() as u64);
        let _ = out
            .send(Frame::with_payload(ch, Message::Stdout, data))
            .await;
    }
}

/// How a transfer ended.
enum End {
    Ok,
    Failed(ErrorCode, String),
    /// Closed by the client (or its link): the helper was killed.
    Closed,
}

/// Bytes kept up to a bound; the rest is read and dropped.
struct Bounded {
    data: Vec<u8>,
    max: usize,
}

impl Bounded {
    fn new(max: usize) -> Bounded {
        Bounded {
            data: Vec::new(),
            max,
        }
    }
}

/// Reads once from `stream` into `into` (pending forever once the stream
/// has ended, so that a `select!` arm on it simply stops firing).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut Option<R>,
    into: &mut Bounded,
) -> bool {
    let Some(reader) = stream.as_mut() else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 4096];
    match reader.read(&mut buf).await {
        Ok(n) if n > 0 => {
            let room = into.max.saturating_sub(into.data.len());
            into.data.extend_from_slice(&buf[..n.min(room)]);
            true
        }
        _ => {
            *stream = None;
            false
        }
    }
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(stream: &mut Option<R>, into: &mut Bounded) {
    while stream.is_some() {
        read_some(stream, into).await;
    }
}

fn parse_reply(line: &[u8]) -> Option<Reply> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    serde_json::from_slice(line).ok()
}

fn helper_failed(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr).trim().to_owned();
    if text.is_empty() {
        "the file helper failed without saying why".into()
    } else {
        text
    }
}
