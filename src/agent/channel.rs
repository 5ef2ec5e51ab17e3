//! One channel: one command, its output under flow control, its exit.
//!
//! The task owns the process. It reads the process's output only while the
//! client has granted credit (`window`), so a client that stops reading
//! makes the process block on its own writes, exactly as a stalled terminal
//! would, and the agent holds at most one read buffer per stream in memory.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::process::{self, ProcessIo, Spawned};
use crate::protocol::message::DEFAULT_WINDOW;
use crate::protocol::{ExecRequest, Frame, Message, PtySize};
use crate::vocab::{self, ErrorCode, SignalNumber};

/// The most output read in one go from a terminal, and so the largest
/// output frame of a PTY channel, a session or a file: 64 KiB.
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// The most read in one go from a command's output pipe, and the size its
/// pipes are grown to where that costs the user no pipe quota
/// (`process::output_pipes_grow`): 256 KiB. A command flooding its output costs a
/// quarter of the frames, reads and wake-ups it did with the pipe's
/// default 64 KiB, and fills the pipe four times less often.
pub(super) const PIPE_CHUNK: usize = 256 * 1024;

pub(crate) use crate::protocol::message::STDIN_WINDOW;

/// How much consumed stdin the agent gathers before returning credit: 32 KiB.
pub(super) const STDIN_CREDIT_BATCH: usize = 32 * 1024;

/// How long output is still drained after the command's leader exits and its
/// group is killed. Only a process that escaped the group (a daemon that
/// called setsid) can hold the pipes open past this.
pub(super) const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What the connection forwards to a running channel.
#[derive(Debug)]
pub(crate) enum Control {
    Signal(Signal),
    Resize(PtySize),
    Window(u64),
    Close,
    /// Leave a session running (a plain command has none: ignored).
    Detach,
}

/// A `stdin` frame for a channel: its payload and whether input ends there.
#[derive(Debug)]
pub(crate) struct Stdin {
    pub(crate) data: Bytes,
    pub(crate) eof: bool,
}

/// Sent to the connection when a channel has finished: it forgets the
/// channel, then sends `exit`, so the id is free by the time the client
/// sees the `exit`.
pub(crate) struct Done {
    pub(crate) ch: u32,
    pub(crate) exit: Frame,
}

/// Runs the command of `req` on channel `ch` until it ends.
pub(crate) async fn run(
    ch: u32,
    req: ExecRequest,
    policy: std::sync::Arc<super::sandbox::ExecPolicy>,
    (mut control, closed): (super::controls::Controls, CancellationToken),
    (mut input, stdin_spent): (
        super::inbox::Inbox,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ),
    out: mpsc::Sender<Frame>,
    done: mpsc::UnboundedSender<Done>,
) {
    let started = Instant::now();
    let window = req.window.unwrap_or(DEFAULT_WINDOW);
    let deadline = req
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    // A command may wait here for a start place (one fewer than the cores,
    // handed out in turn): closed or out of time meanwhile, it never
    // starts, where before it started and was killed at once (a queued
    // `rm` the user had already closed still ran for a moment). It ends as
    // if killed then: by SIGKILL. A start under way is not given up: its
    // process is ended by the close or the deadline like any other.
    let far = tokio::time::Instant::now() + Duration::from_secs(60 * 60 * 24 * 365);
    let give_up = async {
        tokio::select! {
            () = closed.cancelled() => false,
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => true,
        }
    };
    let admitted = process::spawn_admitted_unless(&req, &policy, give_up).await;
    let exit = match admitted {
        Err(timed_out) => never_started(timed_out, started),
        Ok(Ok(spawned)) => {
            let outcome = Supervisor::new(ch, window, out.clone())
                .supervise(spawned, &mut control, &mut input, &stdin_spent, deadline)
                .await;
            exit_message(outcome, started)
        }
        Ok(Err(err)) => {
            let payload = Bytes::from(err.message);
            let _ = out
                .send(Frame::with_payload(ch, Message::Stderr, payload))
                .await;
            Message::Exit(vocab::ExitStatus {
                code: Some(err.code),
                signal: None,
                timed_out: false,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
    };
    let _ = done.send(Done {
        ch,
        exit: Frame::new(ch, exit),
    });
}

struct Outcome {
    status: Option<ExitStatus>,
    timed_out: bool,
}

/// The `exit` of a command closed (or out of time) while it waited for its
/// start place: it never ran, and reads as killed the moment it started.
pub(super) fn never_started(timed_out: bool, started: Instant) -> Message {
    Message::Exit(vocab::ExitStatus {
        code: None,
        signal: Some(SignalNumber(Signal::SIGKILL as i32)),
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

fn exit_message(outcome: Outcome, started: Instant) -> Message {
    let (code, signal) = match outcome.status {
        Some(status) => (status.code(), status.signal().map(SignalNumber)),
        None => (None, None),
    };
    Message::Exit(vocab::ExitStatus {
        code,
        signal,
        timed_out: outcome.timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// A readable output stream of the process, or none once it has ended.
pub(super) struct Source<R> {
    reader: Option<R>,
    buf: BytesMut,
    /// The last read filled its buffer: the next waits with a buffer of
    /// its own rather than none.
    flooding: bool,
    /// What the last read gave: a flooding read waits with room for twice
    /// that (at least [`READ_CHUNK`], at most its limit), so that a frame,
    /// which keeps its buffer alive until it is written, holds little more
    /// than its own bytes.
    last: usize,
}

/// The buffer a read waits with after a read that did not fill its
/// buffer: 4 KiB (a terminal hands out at most about that much at once).
const IDLE_READ: usize = 4 * 1024;

/// What an idle read waits with, in the task itself: 64 bytes (a
/// keystroke's echo, a short prompt).
const IDLE_FIRST: usize = 64;

impl<R: AsyncRead + Unpin> Source<R> {
    pub(super) fn new(reader: Option<R>) -> Self {
        Source {
            reader,
            buf: BytesMut::new(),
            flooding: false,
            last: 0,
        }
    }

    /// Reads up to `limit` bytes; `None` once the stream is at its end.
    pub(super) async fn read(&mut self, limit: usize) -> Option<Bytes> {
        let reader = self.reader.as_mut()?;
        let result = if !self.flooding {
            // An idle stream (a shell at its prompt, a command that prints
            // now and then) waits with no buffer of its own: a few bytes in
            // the task, and a buffer once something came. Thousands of idle
            // shells held 4 KiB each here.
            let mut first = [0u8; IDLE_FIRST];
            let want = limit.min(IDLE_FIRST);
            let got = reader.read(&mut first[..want]).await;
            match got {
                // Less than asked for: that was all there is (a keystroke's
                // echo), one read and an allocation of its own size.
                Ok(n @ 1..) if n < want => return Some(Bytes::copy_from_slice(&first[..n])),
                Ok(n @ 1..) => {
                    self.buf = BytesMut::with_capacity(limit.min(IDLE_READ).max(n));
                    self.buf.extend_from_slice(&first[..n]);
                }
                _ => {}
            }
            got
        } else {
            self.buf.clear();
            // A stream that filled its last buffer waits with a full one
            // (no extra read per frame).
            self.buf
                .reserve(limit.min(self.last.saturating_mul(2).max(READ_CHUNK)));
            (&mut *reader)
                .take(limit as u64)
                .read_buf(&mut self.buf)
                .await
        };
        match result {
            Ok(n) if n > 0 => {}
            _ => {
                self.reader = None;
                self.buf = BytesMut::new();
                return None;
            }
        }
        // A terminal hands out at most a few KiB per read: gather what is
        // already there (without waiting) into one frame, so that a fast
        // command costs a few large frames rather than many small ones.
        while self.buf.len() < limit {
            let room = (limit - self.buf.len()) as u64;
            match (&mut *reader)
                .take(room)
                .read_buf(&mut self.buf)
                .now_or_never()
            {
                Some(Ok(n)) if n > 0 => {}
                // Nothing more right now, or end of file: the next read says.
                _ => break,
            }
        }
        let filled = if self.flooding { READ_CHUNK } else { IDLE_READ };
        self.flooding = self.buf.len() >= filled.min(limit);
        self.last = self.buf.len();
        if !self.flooding {
            // Idle next: nothing of this buffer is kept while waiting. The
            // short end of a flood is copied out, so that its frame does
            // not keep the flood's large buffer alive until it is written.
            let buf = std::mem::take(&mut self.buf);
            if buf.capacity() > 2 * buf.len().max(IDLE_READ) {
                Some(Bytes::copy_from_slice(&buf))
            } else {
                Some(buf.freeze())
            }
        } else {
            Some(self.buf.split().freeze())
        }
    }

    pub(super) fn open(&self) -> bool {
        self.reader.is_some()
    }
}

/// Standard input waiting to be written, bounded by [`STDIN_WINDOW`].
pub(super) struct StdinQueue<W> {
    pub(super) writer: Option<W>,
    /// For a terminal, end of input is the EOF character (^D), not a close.
    eof_byte: Option<u8>,
    queue: VecDeque<Bytes>,
    /// Small pieces of input gathered into one buffer, after everything
    /// in `queue`: see [`COPIED_INPUT`].
    tail: BytesMut,
    pub(super) queued: usize,
    eof: bool,
    /// Credit consumed (written, or dropped) and not yet returned.
    pub(super) owed: usize,
    /// EOF characters queued that nobody paid credit for (the client paid
    /// for the frame that asked for one, not for the byte): taken off what
    /// is owed as they are written or dropped, so the client's credit
    /// never grows past the window.
    unpaid: usize,
}

/// Input pieces this small (a keystroke, a line) are copied into the
/// queue's tail rather than queued as they came: 1 KiB. Each frame's
/// payload is a slice of the link's read buffer, which it keeps alive, and
/// a queue entry of its own: a command that does not read its input,
/// flooded with one-byte frames up to the credit, held about 64 bytes of
/// agent memory per byte queued (50 MB for one command).
pub(super) const COPIED_INPUT: usize = 1024;

/// The tail is queued as one piece once it holds this much: 16 KiB.
pub(super) const TAIL_PIECE: usize = 16 * 1024;

impl<W: AsyncWrite + Unpin> StdinQueue<W> {
    pub(super) fn new(writer: Option<W>, eof_byte: Option<u8>) -> Self {
        StdinQueue {
            writer,
            eof_byte,
            queue: VecDeque::new(),
            tail: BytesMut::new(),
            queued: 0,
            eof: false,
            owed: 0,
            unpaid: 0,
        }
    }

    /// Queues `data` after what waits: copied into the tail if small.
    fn enqueue(&mut self, data: Bytes) {
        if data.len() <= COPIED_INPUT {
            self.tail.extend_from_slice(&data);
            if self.tail.len() >= TAIL_PIECE {
                self.seal_tail();
            }
        } else {
            self.seal_tail();
            self.queue.push_back(data);
        }
    }

    /// The tail becomes the last queued piece; the next small input
    /// starts a new one (an idle queue keeps no buffer).
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.queue
                .push_back(std::mem::take(&mut self.tail).freeze());
        }
    }

    fn is_drained(&self) -> bool {
        self.queue.is_empty() && self.tail.is_empty()
    }

    /// Drops everything waiting (the command was closed, or its stdin):
    /// its credit is owed back.
    pub(super) fn discard(&mut self) {
        self.writer = None;
        self.queue.clear();
        self.tail = BytesMut::new();
        let dropped = std::mem::take(&mut self.queued);
        self.consumed(dropped);
    }

    /// `n` queued bytes were written or dropped: owed back, less the EOF
    /// characters among them (the first queued are written first, but
    /// only the sum matters).
    fn consumed(&mut self, n: usize) {
        self.owed += n;
        let free = self.unpaid.min(self.owed);
        self.owed -= free;
        self.unpaid -= free;
    }
    /// Forgets the credit owed and to come for what is queued (the
    /// writer of a shared shell changed: the new one never spent it), and
    /// says how many queued bytes that is: they will be counted as owed
    /// when written, for the caller to take off again.
    pub(super) fn forget_owed(&mut self) -> usize {
        self.owed = 0;
        self.unpaid = 0;
        self.queued
    }

    /// Credit to return now: a batch's worth. Typing thus costs no frame
    /// per keystroke, and no deadlock can come of the batching: a client
    /// waiting for credit has at least the window minus one batch in flight,
    /// which the process's reading turns into a full batch.
    pub(super) fn credit_due(&mut self) -> Option<u64> {
        if self.owed >= STDIN_CREDIT_BATCH {
            return Some(std::mem::take(&mut self.owed) as u64);
        }
        None
    }

    pub(super) fn push(&mut self, data: Bytes, eof: bool) -> Result<(), &'static str> {
        if data.is_empty() {
            // An empty frame costs one byte of credit; it is spent at once.
            self.owed += 1;
        }
        if self.writer.is_none() || self.eof {
            self.owed += data.len();
            return if data.is_empty() {
                Ok(())
            } else {
                Err("stdin_closed")
            };
        }
        self.queued += data.len();
        if !data.is_empty() {
            self.enqueue(data);
        }
        if let (true, Some(byte)) = (eof, self.eof_byte) {
            self.queued += 1;
            self.unpaid += 1;
            self.tail.extend_from_slice(&[byte]);
            return Ok(());
        }
        self.eof |= eof;
        if self.eof && self.is_drained() {
            self.writer = None;
        }
        Ok(())
    }

    pub(super) fn pending(&self) -> bool {
        self.writer.is_some() && !self.is_drained()
    }

    pub(super) async fn write_some(&mut self) {
        if self.queue.is_empty() {
            self.seal_tail();
        }
        let (Some(writer), Some(front)) = (self.writer.as_mut(), self.queue.front_mut()) else {
            return;
        };
        match writer.write(front).await {
            Ok(n) if n > 0 => {
                let _ = front.split_to(n);
                if front.is_empty() {
                    self.queue.pop_front();
                }
                self.queued -= n;
                self.consumed(n);
                if self.eof && self.is_drained() {
                    self.writer = None;
                }
            }
            // The process closed its stdin: drop what is left, as a pipe would.
            _ => self.discard(),
        }
    }
}

struct Supervisor {
    ch: u32,
    credit: u64,
    out: mpsc::Sender<Frame>,
    /// Set by `close`: output is discarded from then on.
    closed: bool,
}

impl Supervisor {
    fn new(ch: u32, window: u64, out: mpsc::Sender<Frame>) -> Self {
        Supervisor {
            ch,
            credit: window,
            out,
            closed: false,
        }
    }

    async fn emit(&mut self, kind: Message, data: Bytes) {
        if self.closed {
            return;
        }
        self.credit = self.credit.saturating_sub(data.len() as u64);
        let _ = self
            .out
            .send(Frame::with_payload(self.ch, kind, data))
            .await;
    }

    async fn error(&self, code: ErrorCode, message: &str) {
        let _ = self
            .out
            .send(Frame::new(self.ch, Message::error(code, message)))
            .await;
    }

    fn limit(&self, chunk: usize) -> usize {
        self.credit.min(chunk as u64) as usize
    }

    async fn supervise(
        mut self,
        spawned: Spawned,
        control: &mut super::controls::Controls,
        input: &mut super::inbox::Inbox,
        stdin_spent: &std::sync::atomic::AtomicUsize,
        deadline: Option<tokio::time::Instant>,
    ) -> Outcome {
        let Spawned {
            mut child,
            mut group,
            io,
        } = spawned;
        let chunk = match &io {
            ProcessIo::Pipes { stdout, stderr, .. } => {
                process::pipe_read_size(stdout.iter().chain(stderr))
            }
            ProcessIo::Pty(_) => READ_CHUNK,
        };
        let (stdin, stdout, stderr, pty) = split_io(io);
        let mut stdin = StdinQueue::new(stdin, pty.as_ref().map(|_| 0x04));
        let mut stdout = Source::new(stdout);
        let mut stderr = Source::new(stderr);
        let mut status: Option<ExitStatus> = None;
        let mut deadline_hit = false;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut control_open = true;
        let mut input_open = true;
        let far = tokio::time::Instant::now() + Duration::from_secs(60 * 60 * 24 * 365);

        loop {
            if status.is_some() && !stdout.open() && !stderr.open() {
                break;
            }
            let can_read = self.credit > 0 || self.closed;
            let limit = if self.closed {
                chunk
            } else {
                self.limit(chunk)
            };
            tokio::select! {
                biased;
                msg = control.recv(), if control_open => {
                    // `None`: the connection is gone, so nobody can send
                    // more; it counts as a close, and polling stops.
                    control_open = msg.is_some();
                    self.control(msg.unwrap_or(Control::Close), pty.as_deref(), &mut group, &mut stdin);
                }
                result = child.wait(), if status.is_none() => {
                    status = result.ok();
                    // Background jobs of the command die with it: no orphans.
                    group.kill_and_forget();
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                    if status.is_none() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && status.is_none() && !deadline_hit => {
                    deadline_hit = true;
                    // A command that has exited but is not reaped yet is
                    // not killed: it finished in time.
                    if let Ok(None) = child.try_wait() {
                        group.signal(Signal::SIGKILL);
                    }
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() && can_read => {
                    break;
                }
                data = stdout.read(limit), if stdout.open() && can_read => {
                    if let Some(data) = data {
                        self.emit(Message::Stdout, data).await;
                    }
                }
                data = stderr.read(limit), if stderr.open() && can_read => {
                    if let Some(data) = data {
                        self.emit(Message::Stderr, data).await;
                    }
                }
                msg = input.recv(), if input_open => match msg {
                    Some(input) => {
                        let Stdin { data, eof } = input;
                        if stdin.push(data, eof).is_err() {
                            self.error(ErrorCode::StdinClosed, "the process's stdin is closed").await;
                        }
                    }
                    None => input_open = false,
                },
                _ = stdin.write_some(), if stdin.pending() => {}
            }
            self.return_stdin_credit(&mut stdin, stdin_spent).await;
        }
        // Timed out only if the deadline's kill is what ended it: a command
        // that exited on its own in the same instant reports its own status.
        let timed_out = deadline_hit
            && status
                .as_ref()
                .is_none_or(|s| s.signal() == Some(Signal::SIGKILL as i32));
        Outcome { status, timed_out }
    }

    /// Acts on one control message.
    fn control(
        &mut self,
        msg: Control,
        pty: Option<&process::Pty>,
        group: &mut process::ProcessGroup,
        stdin: &mut StdinQueue<Writer>,
    ) {
        match msg {
            // In a terminal, a signal is for the foreground job (an
            // interactive shell runs it in a group of its own).
            Control::Signal(sig) => {
                if !pty.is_some_and(|p| p.signal_foreground(sig, group.id())) {
                    group.signal(sig);
                }
            }
            Control::Resize(size) => {
                if let Some(pty) = pty {
                    let _ = pty.resize(size);
                }
            }
            Control::Window(add) => self.credit = self.credit.saturating_add(add),
            Control::Detach => {}
            Control::Close => {
                self.closed = true;
                group.signal(Signal::SIGKILL);
                stdin.discard();
            }
        }
    }

    async fn return_stdin_credit(
        &self,
        stdin: &mut StdinQueue<Writer>,
        stdin_spent: &std::sync::atomic::AtomicUsize,
    ) {
        return_stdin_credit(self.ch, &self.out, stdin, stdin_spent).await;
    }
}

/// Gives the client of channel `ch` back the stdin credit of what the
/// process has read (or what was dropped), if a batch is due.
pub(super) async fn return_stdin_credit<W: AsyncWrite + Unpin>(
    ch: u32,
    out: &mpsc::Sender<Frame>,
    stdin: &mut StdinQueue<W>,
    stdin_spent: &std::sync::atomic::AtomicUsize,
) {
    let Some(add) = stdin.credit_due() else {
        return;
    };
    // Saturating only as a guard: what is returned is what was spent
    // (a terminal's ^D is not returned; see `StdinQueue::unpaid`).
    let _ = stdin_spent.fetch_update(
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
        |v| Some(v.saturating_sub(add as usize)),
    );
    let _ = out.send(Frame::new(ch, Message::Window { add })).await;
}

pub(super) type Writer = Box<dyn AsyncWrite + Unpin + Send>;
pub(super) type Reader = Box<dyn AsyncRead + Unpin + Send>;

/// The process's input and outputs as the supervisor polls them: pipes as
/// they are, or the one PTY master as both the writer and the reader.
pub(super) fn split_io(
    io: ProcessIo,
) -> (
    Option<Writer>,
    Option<Reader>,
    Option<process::PipeReader>,
    Option<std::sync::Arc<process::Pty>>,
) {
    match io {
        ProcessIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => (
            stdin.map(|s| Box::new(s) as Writer),
            stdout.map(|s| Box::new(s) as Reader),
            stderr,
            None,
        ),
        ProcessIo::Pty(pty) => {
            let pty = std::sync::Arc::new(pty);
            (
                Some(Box::new(SharedPty(pty.clone())) as Writer),
                Some(Box::new(SharedPty(pty.clone())) as Reader),
                None,
                Some(pty),
            )
        }
    }
}

/// Lets the one PTY master serve as both the reader and the writer.
struct SharedPty(std::sync::Arc<process::Pty>);

impl AsyncRead for SharedPty {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        process::Pty::poll_read_shared(&self.0, cx, buf)
    }
}

impl AsyncWrite for SharedPty {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        process::Pty::poll_write_shared(&self.0, cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(
        eof_byte: Option<u8>,
    ) -> (StdinQueue<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (writer, reader) = tokio::io::duplex(64);
        let q = StdinQueue::new(Some(writer), eof_byte);
        (q, reader)
    }

    #[tokio::test]
    async fn an_idle_stream_waits_without_a_buffer_and_a_flood_comes_whole() {
        let (mut writer, reader) = tokio::io::duplex(256 * 1024);
        let mut source = Source::new(Some(reader));
        writer.write_all(b"$ ").await.unwrap();
        assert_eq!(source.read(READ_CHUNK).await.as_deref(), Some(&b"$ "[..]));
        assert_eq!(source.buf.capacity(), 0, "an idle read keeps a buffer");
        // More than the first read takes at once, and more than a chunk:
        // nothing lost, nothing reordered, no frame over the limit.
        let flood: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&flood).await.unwrap();
        drop(writer);
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(piece) = source.read(READ_CHUNK).await {
            assert!(piece.len() <= READ_CHUNK);
            if frames == 0 {
                // From idle straight to full frames: a flood is not read
                // 64 bytes at a time.
                assert_eq!(piece.len(), READ_CHUNK);
            }
            frames += 1;
            got.extend_from_slice(&piece);
        }
        assert_eq!(got, flood);
        assert!(frames <= 5, "{frames} frames for 200 kB");
        assert_eq!(source.buf.capacity(), 0, "a closed stream keeps a buffer");
    }

    /// The short end of a flood read with large buffers is a frame of its
    /// own size: a frame keeps its buffer alive until it is written.
    #[tokio::test]
    async fn the_short_end_of_a_flood_does_not_keep_the_flood_buffer() {
        let (mut writer, reader) = tokio::io::duplex(PIPE_CHUNK);
        let mut source = Source::new(Some(reader));
        writer.write_all(&vec![7u8; PIPE_CHUNK]).await.unwrap();
        let mut got = 0;
        while got < PIPE_CHUNK {
            got += source.read(PIPE_CHUNK).await.unwrap().len();
        }
        writer.write_all(&vec![7u8; PIPE_CHUNK]).await.unwrap();
        let big = source.read(PIPE_CHUNK).await.unwrap();
        assert_eq!(big.len(), PIPE_CHUNK, "a flood is read in full pieces");
        drop(big);
        writer.write_all(b"end\n").await.unwrap();
        let tail = source.read(PIPE_CHUNK).await.unwrap();
        assert_eq!(&tail[..], b"end\n");
        let tail = tail.try_into_mut().expect("the tail's buffer is its own");
        assert!(
            tail.capacity() <= 2 * IDLE_READ,
            "a 4-byte frame holds a {} byte buffer",
            tail.capacity()
        );
    }

    #[tokio::test]
    async fn input_is_written_in_order_and_its_credit_comes_back_in_batches() {
        let (mut q, mut reader) = queue(None);
        q.push(Bytes::from_static(b"hello "), false).unwrap();
        q.push(Bytes::from_static(b"world"), true).unwrap();
        while q.pending() {
            q.write_some().await;
        }
        assert!(q.writer.is_none(), "end of input closes the pipe");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        // 11 bytes written: owed, but less than a batch.
        assert_eq!(q.credit_due(), None);
        assert_eq!(q.owed, 11);
        q.owed += STDIN_CREDIT_BATCH;
        assert_eq!(q.credit_due(), Some(11 + STDIN_CREDIT_BATCH as u64));
        assert_eq!(q.owed, 0);
    }

    /// Keystroke frames queued for a command that does not read them
    /// hold about their own bytes: not an entry and a share of the link's
    /// read buffer each (64 bytes of agent memory per byte of input).
    #[tokio::test]
    async fn small_input_nobody_reads_is_gathered_and_lets_the_link_buffer_go() {
        let (mut q, mut reader) = queue(Some(0x04));
        // Frames as the link decodes them: slices of one read buffer.
        let mut link_buffer = BytesMut::new();
        let n = 40_000;
        link_buffer.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        let link_buffer = link_buffer.freeze();
        for i in 0..n {
            q.push(link_buffer.slice(i..i + 1), false).unwrap();
        }
        // A paste among them stays as it came, in its place.
        let paste = Bytes::from(vec![b'P'; 4 * COPIED_INPUT]);
        q.push(paste.clone(), false).unwrap();
        q.push(Bytes::from_static(b"end"), true).unwrap();
        let pieces = q.queue.len() + usize::from(!q.tail.is_empty());
        assert!(
            pieces <= n / TAIL_PIECE + 4,
            "{n} one-byte frames are queued as {pieces} pieces"
        );
        assert!(
            link_buffer.is_unique(),
            "queued input still holds the link's read buffer"
        );
        assert_eq!(q.queued, n + paste.len() + 3 + 1);
        // Written whole and in order, the terminal's EOF character last.
        let written = async {
            while q.pending() {
                q.write_some().await;
            }
            q
        };
        let mut expected = link_buffer.to_vec();
        expected.extend_from_slice(&paste);
        expected.extend_from_slice(b"end\x04");
        let mut got = vec![0u8; expected.len()];
        let (q, read) = tokio::join!(written, reader.read_exact(&mut got));
        read.unwrap();
        assert_eq!(got, expected);
        // The EOF character was not paid for: not owed back.
        assert_eq!((q.queued, q.owed), (0, expected.len() - 1));
        assert!(
            q.is_drained() && q.tail.capacity() == 0,
            "an idle queue keeps a buffer"
        );
    }

    #[tokio::test]
    async fn a_terminal_gets_its_eof_character_and_stays_open() {
        let (mut q, mut reader) = queue(Some(0x04));
        q.push(Bytes::from_static(b"x"), true).unwrap();
        while q.pending() {
            q.write_some().await;
        }
        assert!(q.writer.is_some());
        let mut got = [0u8; 2];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x\x04");
    }

    /// The client paid for its frames (an empty one costs a byte), not for
    /// the EOF character a terminal is given: that byte is not credited
    /// back (before, each ^D gave the client a byte more than the window).
    #[tokio::test]
    async fn a_terminals_eof_character_is_not_credited_back() {
        let (mut q, mut reader) = queue(Some(0x04));
        q.push(Bytes::from_static(b"abc"), true).unwrap();
        q.push(Bytes::new(), true).unwrap();
        while q.pending() {
            q.write_some().await;
        }
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc\x04\x04");
        assert_eq!(q.owed, 3 + 1, "what the two frames cost");
        // Dropped, not written: the same.
        q.push(Bytes::from_static(b"de"), true).unwrap();
        q.discard();
        assert_eq!(q.owed, 3 + 1 + 2);
        assert_eq!(q.unpaid, 0);
    }

    /// A shared shell's writer changed with input and ^D still queued: the
    /// session takes off exactly what will come due for it, so the new
    /// writer gets back what it spent and no less (with the EOF byte
    /// discounted twice, it was short a byte per ^D, for good).
    #[tokio::test]
    async fn a_new_writer_is_owed_nothing_of_the_old_ones_input_and_no_less() {
        let (mut q, mut reader) = queue(Some(0x04));
        q.push(Bytes::from_static(b"ab"), true).unwrap();
        q.push(Bytes::new(), true).unwrap();
        let skip = q.forget_owed();
        // The new writer's key.
        q.push(Bytes::from_static(b"c"), false).unwrap();
        while q.pending() {
            q.write_some().await;
        }
        let mut got = [0u8; 5];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ab\x04\x04c");
        assert_eq!(q.owed - skip, 1, "the new writer's key, and only it");
    }

    #[tokio::test]
    async fn input_after_the_end_is_refused_but_its_credit_returned() {
        let (mut q, _reader) = queue(None);
        q.push(Bytes::new(), true).unwrap();
        assert!(q.writer.is_none());
        assert_eq!(
            q.push(Bytes::from_static(b"late"), false),
            Err("stdin_closed")
        );
        assert_eq!(q.owed, 1 + 4, "the empty frame's byte and the late input");
    }

    #[tokio::test]
    async fn a_process_that_closes_its_input_drops_what_is_queued() {
        let (mut q, reader) = queue(None);
        drop(reader);
        q.push(Bytes::from_static(b"lost"), false).unwrap();
        q.write_some().await;
        assert!(q.writer.is_none());
        assert_eq!((q.queued, q.owed), (0, 4));
    }

    /// A command closed (or out of time) while it waits for a start place
    /// never starts, and ends as killed; one not closed starts once a
    /// place is free. Before, the close was read only once it ran: it
    /// started, then was killed.
    #[tokio::test]
    async fn a_command_closed_while_it_waits_to_start_never_starts() {
        let _alone = process::HUNG_STARTS.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let policy = std::sync::Arc::new(super::super::sandbox::ExecPolicy::for_tests());
        let (out, mut frames) = mpsc::channel(64);
        let (done, mut ended) = mpsc::unbounded_channel();
        let start = |ch: u32, timeout_ms: Option<u64>| {
            let req = ExecRequest {
                cmd: Some(format!("/usr/bin/touch {}/ran-{ch}", dir.path().display())),
                timeout_ms,
                ..ExecRequest::default()
            };
            let (_control, control_rx) = super::super::controls::controls();
            let (_stdin, input) = super::super::inbox::inbox();
            let closed = CancellationToken::new();
            let spent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            tokio::spawn(run(
                ch,
                req,
                policy.clone(),
                (control_rx, closed.clone()),
                (input, spent),
                out.clone(),
                done.clone(),
            ));
            (closed, _control, _stdin)
        };
        let places = process::hold_start_places().await;
        let (closed, ..) = start(1, None);
        let _timed = start(2, Some(1));
        let _runs = start(3, None);
        closed.cancel();
        let exit = |d: Done| match d.exit.msg {
            Message::Exit(status) => (d.ch, status.code, status.signal, status.timed_out),
            other => panic!("{other:?}"),
        };
        let mut got = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(30), ended.recv())
                .await
                .expect("a waiting command's end")
                .unwrap();
            got.push(exit(d));
        }
        got.sort_by_key(|g| g.0);
        let killed = Some(SignalNumber(9));
        assert_eq!(got, [(1, None, killed, false), (2, None, killed, true)]);
        drop(places);
        let d = tokio::time::timeout(Duration::from_secs(30), ended.recv())
            .await
            .expect("the third command's end")
            .unwrap();
        let mut said = Vec::new();
        while let Ok(f) = frames.try_recv() {
            said.extend_from_slice(&f.payload);
        }
        assert_eq!(
            exit(d),
            (3, Some(0), None, false),
            "{}",
            String::from_utf8_lossy(&said)
        );
        assert!(dir.path().join("ran-3").exists());
        assert!(!dir.path().join("ran-1").exists(), "a closed command ran");
        assert!(
            !dir.path().join("ran-2").exists(),
            "a timed out command ran"
        );
        while frames.try_recv().is_ok() {}
    }
}
