//! Starting a command: pipes or a pseudo-terminal, a process group of its
//! own, and clean signal state.
//!
//! Every command leads its own process group so that a signal, a timeout or a
//! closed channel reaches the whole tree, grandchildren included. The child
//! also starts with default signal dispositions and an empty signal mask:
//! an agent launched under `nohup` or from a script that ignores SIGINT would
//! otherwise pass that on, and Ctrl-C would silently do nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::task::{Context, Poll, ready};

use nix::pty::Winsize;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::ReadBuf;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use std::sync::Arc;

use super::cgroup::CommandCgroup;
use super::sandbox::{self, ExecPolicy, Prepared};
use super::spawn::{self, ChildProcess, Launch, Leader};
use crate::protocol::{ExecRequest, PtySize};

/// A running command and the ends of its standard streams.
pub(crate) struct Spawned {
    pub(crate) child: ChildProcess,
    pub(crate) group: ProcessGroup,
    pub(crate) io: ProcessIo,
}

/// The agent's end of a command's standard input pipe.
pub(crate) type PipeWriter = pipe::Sender;
/// The agent's end of a command's output pipe.
pub(crate) type PipeReader = pipe::Receiver;

pub(crate) enum ProcessIo {
    Pipes {
        stdin: Option<PipeWriter>,
        stdout: Option<PipeReader>,
        stderr: Option<PipeReader>,
    },
    Pty(Pty),
}

/// Why a command could not be started, with the exit code a shell would give.
#[derive(Debug)]
pub(crate) struct SpawnError {
    pub(crate) code: i32,
    pub(crate) message: String,
}

/// A process group that is killed (SIGKILL) when this value is dropped, so
/// that no error path, lost connection or panic can leave it running.
///
/// A PTY command leads a session of its own, and an interactive shell puts
/// each job in a process group of its own within it: for those, killing
/// means every process of the session.
#[derive(Debug)]
pub(crate) struct ProcessGroup {
    pgid: Option<Pid>,
    session: bool,
    /// The command's cgroup: every process it started, whatever group or
    /// session it moved to.
    cgroup: Option<Arc<CommandCgroup>>,
    /// Without a cgroup: the environment mark of its processes.
    mark: Option<String>,
    /// The cgroup holds every process of the command for sure: it runs as
    /// another user than the agent, who cannot move itself out of a cgroup
    /// the agent owns.
    contained: bool,
}

impl ProcessGroup {
    /// Sends `signal` to every process of the group (SIGKILL: of the
    /// session for a PTY command, and of the cgroup or mark).
    pub(crate) fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is already gone) is the expected race here.
            let _ = killpg(pgid, signal);
            // A cgroup that holds every process of the session spares reading
            // all of /proc (which, for every shell closed among thousands,
            // made closing them cost the square of their number). Without
            // `--run-as`, a command owns its cgroup and could leave it.
            if self.session && signal == Signal::SIGKILL && !self.contained {
                kill_soon(Doomed::Session(pgid.as_raw()));
            }
        }
        if signal == Signal::SIGKILL {
            self.kill_escaped();
        }
    }

    /// SIGKILLs processes that left the group and session: through the
    /// cgroup, or the mark.
    fn kill_escaped(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        } else if let Some(mark) = &self.mark {
            kill_soon(Doomed::Marked(mark.clone()));
        }
    }

    /// The group's id, until it is killed and forgotten.
    pub(crate) fn id(&self) -> Option<Pid> {
        self.pgid
    }

    /// Kills the group now and forgets it, so that a recycled process id is
    /// never signalled later. (The cgroup stays until the group is dropped:
    /// it cannot be recycled.)
    pub(crate) fn kill_and_forget(&mut self) {
        self.signal(Signal::SIGKILL);
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    /// Kills everything; the cgroup, once its last handle goes, removes itself.
    fn drop(&mut self) {
        // Killed and forgotten (the command exited; a group always starts
        // with its leader's id): its cgroup was killed then, and nothing
        // can join it since; the kill is not repeated on the way to
        // reporting the exit.
        if self.pgid.is_none() && self.cgroup.is_some() {
            return;
        }
        self.signal(Signal::SIGKILL);
    }
}

/// Runs a scan of `/proc` on the blocking pool: it reads a file per process
/// of the host, and must not hold up the async workers that serve every
/// other command (inline when there is no runtime).
fn off_the_workers(scan: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(scan);
        }
        Err(_) => scan(),
    }
}

/// The ids of the processes alive now, read from `/proc` (none if it
/// cannot be read).
pub(crate) fn process_ids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|dir| dir.flatten())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
}

/// Whether a process of group `pgid` is in session `sid` (through /proc).
fn group_in_session(pgid: Pid, sid: Pid) -> bool {
    process_ids().any(|pid| {
        proc_stat(pid).is_some_and(|s| s.pgrp == pgid.as_raw() && s.session == sid.as_raw())
    })
}

/// What `/proc/PID/stat` says of a process: its state, group and session.
pub(crate) struct ProcStat {
    pub(crate) state: char,
    pub(crate) pgrp: i32,
    pub(crate) session: i32,
}

pub(crate) fn proc_stat(pid: i32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, ppid, pgrp, session.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let pgrp = rest.next()?.parse().ok()?;
    let session = rest.next()?.parse().ok()?;
    Some(ProcStat {
        state,
        pgrp,
        session,
    })
}

/// Whether process `pid` is busy with something other than waiting for
/// input (a shell saving its history rather than at its prompt), from
/// `/proc/PID/syscall`; false when that cannot be read.
pub(crate) fn busy_elsewhere(pid: i32) -> bool {
    #[cfg(target_arch = "x86_64")]
    const WAITS: &[i64] = &[
        libc::SYS_read,
        libc::SYS_pselect6,
        libc::SYS_ppoll,
        libc::SYS_poll,
        libc::SYS_select,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    const WAITS: &[i64] = &[libc::SYS_read, libc::SYS_pselect6, libc::SYS_ppoll];
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    match text.split_whitespace().next() {
        Some("running") => true,
        Some(nr) => nr.parse::<i64>().is_ok_and(|n| !WAITS.contains(&n)),
        None => false,
    }
}

/// What a scan of `/proc` kills: the processes of a session, or those
/// carrying a command's environment mark.
#[derive(Clone)]
enum Doomed {
    Session(i32),
    Marked(String),
}

/// A scan longer than this on one process is taken for stuck: reading a
/// process's `environ` waits for its memory map's lock, which its owner
/// can hold (a thread faulting on a file of a FUSE mount they serve,
/// another waiting to change the map).
#[cfg(not(test))]
const SCAN_STUCK: std::time::Duration = std::time::Duration::from_secs(5);
#[cfg(test)]
const SCAN_STUCK: std::time::Duration = std::time::Duration::from_millis(200);

/// Tests: a process whose reading blocks until the sender is dropped, as
/// a read of an `environ` its owner holds up.
#[cfg(test)]
static HOLD_SCAN_AT: std::sync::Mutex<Option<(i32, std::sync::mpsc::Receiver<()>)>> =
    std::sync::Mutex::new(None);
/// Tests: when the scan reached the process it holds at.
#[cfg(test)]
static HOLD_REACHED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What waits for the next scan of `/proc`, and the scan under way.
/// Bounded by the commands the agent holds (`doomed`, `in_scan`) and by
/// the processes that have held a scan up (`hung`).
struct KillQueue {
    doomed: Vec<Doomed>,
    /// The scan under way, if one is.
    scan: Option<std::sync::Arc<ScanProgress>>,
    /// What the scan under way took, given back to the next one if it
    /// is stuck.
    in_scan: Vec<Doomed>,
    /// Processes a stuck scan is reading: skipped by the scans after it,
    /// until that read returns.
    hung: std::collections::BTreeSet<i32>,
}

/// Where a scan is: the process it reads, and since when (ms since the
/// agent's clock began; 0 between reads).
#[derive(Default)]
struct ScanProgress {
    /// The process being read, and since when (0: between reads), set
    /// together so that a process is never taken for stuck on another's
    /// time.
    at: std::sync::Mutex<(i32, u64)>,
    /// The process this scan was taken for stuck on (0: none), which it
    /// takes out of [`KillQueue::hung`] when it ends.
    stuck_on: std::sync::atomic::AtomicI32,
}

/// Processes that may hold scans up at once: past this, later kills wait
/// behind the stuck scan rather than take another thread.
const MAX_HUNG: usize = 64;

impl KillQueue {
    /// Ends the scan under way (stuck, or dropped unfinished): what it
    /// took waits for the next one.
    fn end_scan(&mut self) {
        self.scan = None;
        let given_back = std::mem::take(&mut self.in_scan);
        self.doomed.extend(given_back);
    }
}

static TO_KILL: std::sync::Mutex<KillQueue> = std::sync::Mutex::new(KillQueue {
    doomed: Vec::new(),
    scan: None,
    in_scan: Vec::new(),
    hung: std::collections::BTreeSet::new(),
});

/// Milliseconds on a monotonic clock (from the first call).
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// SIGKILLs, soon and off the async workers, what `doomed` names. What is
/// doomed while a scan runs is all killed by the next one: a scan each
/// made closing thousands of shells cost the square of their number
/// (minutes of both cores, in which the agent's link went silent and was
/// taken for lost). A scan stuck on one process for [`SCAN_STUCK`] is
/// left to it: the next scan starts beside it, skipping that process.
fn kill_soon(doomed: Doomed) {
    let start = {
        let mut queue = TO_KILL.lock().unwrap_or_else(|e| e.into_inner());
        queue.doomed.push(doomed);
        let stuck = queue.scan.as_ref().and_then(|scan| {
            let (pid, since) = *scan.at.lock().unwrap_or_else(|e| e.into_inner());
            let stuck =
                since != 0 && clock_ms().saturating_sub(since) >= SCAN_STUCK.as_millis() as u64;
            if stuck {
                scan.stuck_on
                    .store(pid, std::sync::atomic::Ordering::Release);
            }
            stuck.then_some(pid)
        });
        if let Some(pid) = stuck.filter(|_| queue.hung.len() < MAX_HUNG) {
            tracing::warn!(
                pid,
                "a scan of /proc for a command's leftovers is stuck reading this process; \
                 the next scan skips it"
            );
            queue.hung.insert(pid);
            queue.end_scan();
        }
        match queue.scan {
            Some(_) => None,
            None => {
                let scan = std::sync::Arc::new(ScanProgress::default());
                queue.scan = Some(scan.clone());
                Some(Scanning(scan))
            }
        }
    };
    if let Some(scanning) = start {
        off_the_workers(move || kill_pending(scanning));
    }
}

/// The scan under way. Dropped without finishing (a panic, or a runtime
/// shutting down before it ran), it gives up its place, so that the next
/// kill starts a scan (of what is left too) rather than none ever again.
struct Scanning(std::sync::Arc<ScanProgress>);

impl Scanning {
    /// Whether this is still the scan under way (not replaced for stuck).
    fn current(&self, queue: &KillQueue) -> bool {
        queue
            .scan
            .as_ref()
            .is_some_and(|scan| std::sync::Arc::ptr_eq(scan, &self.0))
    }
}

impl Drop for Scanning {
    fn drop(&mut self) {
        let mut queue = TO_KILL.lock().unwrap_or_else(|e| e.into_inner());
        if self.current(&queue) {
            queue.end_scan();
        }
    }
}

/// Scans `/proc` until nothing waits: each scan kills what was doomed
/// when it began.
fn kill_pending(scanning: Scanning) {
    use std::sync::atomic::Ordering;
    loop {
        let mut sessions = std::collections::HashSet::new();
        let mut marks = Vec::new();
        let hung = {
            let mut queue = TO_KILL.lock().unwrap_or_else(|e| e.into_inner());
            if !scanning.current(&queue) {
                // Replaced while stuck: its work went to the next scan.
                let stuck_on = scanning.0.stuck_on.load(Ordering::Acquire);
                queue.hung.remove(&stuck_on);
                return;
            }
            queue.in_scan.clear();
            if queue.doomed.is_empty() {
                // Cleared under the lock: a scan started after this one
                // must keep its place (`scanning`, dropped after `queue`,
                // is then no longer the current one and leaves it alone).
                queue.scan = None;
                return;
            }
            let taken = std::mem::take(&mut queue.doomed);
            for doomed in &taken {
                match doomed {
                    Doomed::Session(sid) => {
                        sessions.insert(*sid);
                    }
                    Doomed::Marked(mark) => marks.push(mark.clone()),
                }
            }
            queue.in_scan = taken;
            queue.hung.clone()
        };
        // One pass over /proc for both: a shell without a cgroup is
        // doomed by its session and by its mark at once.
        let marks = sandbox::mark_entries(&marks);
        let progress = &scanning.0;
        for pid in process_ids().filter(|pid| !hung.contains(pid)) {
            let began = clock_ms();
            *progress.at.lock().unwrap_or_else(|e| e.into_inner()) = (pid, began);
            #[cfg(test)]
            {
                let mut hold = HOLD_SCAN_AT.lock().unwrap_or_else(|e| e.into_inner());
                if hold.as_ref().is_some_and(|(at, _)| *at == pid)
                    && let Some((_, held)) = hold.take()
                {
                    drop(hold);
                    HOLD_REACHED_MS.store(clock_ms(), Ordering::Release);
                    let _ = held.recv();
                }
            }
            let doomed = (!sessions.is_empty()
                && proc_stat(pid).is_some_and(|s| sessions.contains(&s.session)))
                || (!marks.is_empty() && sandbox::carries_mark(pid, &marks));
            progress.at.lock().unwrap_or_else(|e| e.into_inner()).1 = 0;
            if doomed {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if clock_ms().saturating_sub(began) >= SCAN_STUCK.as_millis() as u64 {
                let mut queue = TO_KILL.lock().unwrap_or_else(|e| e.into_inner());
                if !scanning.current(&queue) {
                    // Taken for stuck, and replaced: the read has returned,
                    // so the process is scanned again from now on, and
                    // this scan's work is the next one's.
                    queue
                        .hung
                        .remove(&progress.stuck_on.load(Ordering::Acquire));
                    return;
                }
            }
        }
    }
}

fn spawn_error(err: &io::Error, what: &str) -> SpawnError {
    if let Some(cd) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<spawn::CdFailed>())
    {
        return SpawnError {
            code: 126,
            message: format!("conch: {cd}\n"),
        };
    }
    match err.kind() {
        io::ErrorKind::NotFound => SpawnError {
            code: 127,
            message: format!("conch: {what}: command not found\n"),
        },
        _ => SpawnError {
            code: 126,
            message: format!("conch: {what}: {err}\n"),
        },
    }
}

/// Builds the command line: `sh -c CMD`, an argv, or (PTY only) a login shell.
fn command_for(req: &ExecRequest, policy: &ExecPolicy) -> Result<(Launch, String), SpawnError> {
    if let Some(argv) = &req.argv {
        let Some((program, args)) = argv.split_first() else {
            return Err(SpawnError {
                code: 127,
                message: "conch: empty argv\n".into(),
            });
        };
        let mut cmd = Launch::new(program);
        cmd.args(args);
        return Ok((cmd, program.clone()));
    }
    if let Some(line) = &req.cmd {
        let mut cmd = Launch::new("/bin/sh");
        cmd.arg("-c").arg(line);
        return Ok((cmd, "sh".into()));
    }
    let shell = policy.shell();
    let mut cmd = Launch::new(&shell);
    // A leading '-' in argv[0] is how login(1) asks a shell to be a login shell.
    let base = shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    cmd.arg0(format!("-{base}"));
    Ok((cmd, shell.display().to_string()))
}

/// [`spawn`], on a starter thread, once fewer than all the cores are
/// starting a process.
///
/// The clone waits, its thread blocked, until the child has called `exec`,
/// and on a loaded host the child waits that long for a core. On the async
/// workers, with every one blocked so, nothing read or wrote the link:
/// opening 10,000 shells at once kept the agent silent for over 11 s, and
/// the server took the link, and every command on it, for lost. So the
/// clone runs off the workers, and at most one less than the cores start
/// at once, so that the children do not crowd out the link's workers.
///
/// A start that takes longer than [`STALLED`] gives its place to the next:
/// it waits on something (a directory that does not answer, a child
/// stopped before its exec), not for a core, and one user's stuck start
/// must not hold back everyone's. The watchdog of [`spawn::launch`] ends
/// it at the command start limit.
///
/// Unless `give_up` ends first while the command waits for its place (or
/// has ended already): then it never starts, and `give_up`'s answer comes
/// back. Only the wait for a place is given up. Once a place is held the start
/// is handed to a starter and runs whoever waits for it, so its caller
/// takes its result and ends a process that should not run as it ends any
/// other: else the caller would report a command ended that was yet to
/// start, and a child that had already exited would read as killed.
pub(crate) async fn spawn_admitted_unless<G>(
    req: &ExecRequest,
    policy: &Arc<ExecPolicy>,
    give_up: impl Future<Output = G>,
) -> Result<Result<Spawned, SpawnError>, G> {
    let (req, policy) = (req.clone(), policy.clone());
    admitted_unless(move || spawn(&req, &policy), give_up)
        .await
        .map(|answer| answer.unwrap_or_else(Err))
}

/// How many commands start at once: one less than the cores (at least
/// one). The runtime has a worker a core (`Runtime::new`): one core is
/// left to them. Counted once (it reads cgroup files).
fn start_places() -> usize {
    static PLACES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PLACES.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.saturating_sub(1).max(1)
    })
}

/// Starts past [`STALLED`] that may have given their place away at once.
const MAX_STALLED: usize = 64;

/// How long a start holds its place among those starting at once.
const STALLED: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `start` on a starter thread, admitted as [`spawn_admitted_unless`] says.
///
/// The places are held by the start itself, not by its caller: a caller
/// that gives up (its task aborted, the runtime shutting down) leaves its
/// start running, and the start keeps its place until it ends. So at most
/// the places and the stalled starts are ever queued for or running on
/// the starters, whoever waits for them.
#[cfg(test)]
async fn admitted<T: Send + 'static>(
    start: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SpawnError> {
    match admitted_unless(start, std::future::pending::<std::convert::Infallible>()).await {
        Ok(answer) => answer,
        Err(never) => match never {},
    }
}

/// [`admitted`], unless `give_up` ends while it waits for a place.
async fn admitted_unless<T: Send + 'static, G>(
    start: impl FnOnce() -> T + Send + 'static,
    give_up: impl Future<Output = G>,
) -> Result<Result<T, SpawnError>, G> {
    // Never closed, so the permit always comes. A caller that has given
    // up already (a command closed in the same read as its `exec`) does
    // not start, even with a place free.
    let place = tokio::select! {
        biased;
        given_up = give_up => return Err(given_up),
        place = starting().acquire() => place.ok(),
    };
    let held = Arc::new(std::sync::Mutex::new(Held {
        place,
        stalled: None,
        ended: false,
    }));
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // The stall clock runs from the moment a starter takes the start up,
    // and apart from the caller, which may give up.
    tokio::spawn(stall_clock(held.clone(), began_rx, ended_rx));
    // The command's pipes and pidfd register with this runtime.
    let runtime = tokio::runtime::Handle::current();
    on_a_starter(Box::new(move |on_a_starter| {
        let _entered = runtime.enter();
        // Run inline (no starter thread could be made), the start blocks
        // an async worker and keeps its place: the next start would block
        // another.
        if on_a_starter {
            let _ = began_tx.send(());
        }
        // A start that panics frees its places all the same.
        let ends = Ends {
            held,
            ended: Some(ended_tx),
        };
        let answer = start();
        drop(ends);
        let _ = done_tx.send(answer);
    }));
    Ok(done_rx.await.map_err(|_| SpawnError {
        code: 126,
        message: "conch: the command's start failed (it panicked)\n".into(),
    }))
}

/// Tests that fill or hold the start places, one at a time.
#[cfg(test)]
pub(crate) static HUNG_STARTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds every start place (tests: a command waiting for its start).
#[cfg(test)]
pub(crate) async fn hold_start_places() -> tokio::sync::SemaphorePermit<'static> {
    starting()
        .acquire_many(start_places() as u32)
        .await
        .expect("never closed")
}

/// The start places: [`start_places`] of them.
fn starting() -> &'static tokio::sync::Semaphore {
    static STARTING: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    STARTING.get_or_init(|| tokio::sync::Semaphore::new(start_places()))
}

/// Stalled starts each hold a starter thread, and the starters are
/// bounded: past this many, a stalled start keeps its place, and the next
/// wait (for at most the start timeout, or a child SIGKILL cannot end).
static STALLED_STARTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_STALLED);

/// What a start holds while it runs: its place, or once it has stalled,
/// one of the stalled slots instead.
struct Held {
    place: Option<tokio::sync::SemaphorePermit<'static>>,
    stalled: Option<tokio::sync::SemaphorePermit<'static>>,
    ended: bool,
}

/// Frees a start's places when the start ends, however it ends.
struct Ends {
    held: Arc<std::sync::Mutex<Held>>,
    ended: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Ends {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.ended = true;
        held.place = None;
        held.stalled = None;
        drop(held);
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

/// Gives a start's place to the next once it has run for [`STALLED`],
/// if a stalled slot is free.
async fn stall_clock(
    held: Arc<std::sync::Mutex<Held>>,
    began: tokio::sync::oneshot::Receiver<()>,
    ended: tokio::sync::oneshot::Receiver<()>,
) {
    if began.await.is_err() {
        return; // never taken up: its job, and its places, are gone
    }
    tokio::select! {
        _ = ended => {}
        () = tokio::time::sleep(STALLED) => {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            if !held.ended
                && let Ok(stalled) = STALLED_STARTS.try_acquire()
            {
                held.stalled = Some(stalled);
                held.place = None;
            }
        }
    }
}

/// A start for a starter thread.
/// Told whether it runs on a starter thread (else inline).
type StartJob = Box<dyn FnOnce(bool) + Send>;

/// Starts waiting for a starter thread, how many threads there are, and
/// how many of them wait for work.
struct Starters {
    jobs: std::collections::VecDeque<StartJob>,
    threads: usize,
    idle: usize,
}

static STARTERS: std::sync::Mutex<Starters> = std::sync::Mutex::new(Starters {
    jobs: std::collections::VecDeque::new(),
    threads: 0,
    idle: 0,
});
static STARTER_WORK: std::sync::Condvar = std::sync::Condvar::new();

/// Runs `job` on a starter thread: one of the agent's own, which never
/// end. A command's child asks for SIGKILL when its parent dies
/// (`PR_SET_PDEATHSIG`), and the kernel means the thread that cloned it:
/// cloned on one of tokio's blocking threads, which end after 10 s idle,
/// a command was killed 10 s after the agent went quiet (a 1 GiB upload's
/// file helper was, mid-transfer). At most as many threads as starts can
/// run at once (the places and the stalled starts); more wait in turn.
fn on_a_starter(job: StartJob) {
    let mut starters = STARTERS.lock().unwrap_or_else(|e| e.into_inner());
    starters.jobs.push_back(job);
    let most = start_places() + MAX_STALLED;
    if starters.idle < starters.jobs.len() && starters.threads < most {
        let spawned = std::thread::Builder::new()
            .name("conch-starter".into())
            .spawn(starter);
        match spawned {
            Ok(_) => starters.threads += 1,
            Err(e) if starters.threads == 0 => {
                // No thread at all: the start runs here rather than never.
                tracing::error!("cannot start a thread to start commands on: {e}");
                let job = starters.jobs.pop_back();
                drop(starters);
                if let Some(job) = job {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(false)));
                }
                return;
            }
            Err(e) => tracing::warn!("cannot start another thread to start commands on: {e}"),
        }
    }
    STARTER_WORK.notify_one();
}

/// A starter thread: runs starts, for ever.
fn starter() {
    let mut starters = STARTERS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match starters.jobs.pop_front() {
            Some(job) => {
                drop(starters);
                // A start that panics loses its answer (its caller is
                // told), not this thread, whose children would die with it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(true)));
                starters = STARTERS.lock().unwrap_or_else(|e| e.into_inner());
            }
            None => {
                starters.idle += 1;
                starters = STARTER_WORK
                    .wait(starters)
                    .unwrap_or_else(|e| e.into_inner());
                starters.idle -= 1;
            }
        }
    }
}

/// Starts the command `req` describes, as `policy` says commands start.
pub(crate) fn spawn(req: &ExecRequest, policy: &ExecPolicy) -> Result<Spawned, SpawnError> {
    if req.cmd.is_none() && req.argv.is_none() && req.pty.is_none() {
        return Err(SpawnError {
            code: 127,
            message: "conch: exec needs \"cmd\", \"argv\" or \"pty\"\n".into(),
        });
    }
    let (mut cmd, what) = command_for(req, policy)?;
    // The user's home unless another directory is asked for; `/` when
    // the home cannot be entered, as after an ssh login.
    let (cwd, or_root) = match &req.cwd {
        Some(dir) => (std::path::PathBuf::from(dir), false),
        None => (policy.home(), true),
    };
    if req.cwd.as_ref().is_some_and(|d| d.contains('\0')) {
        return Err(SpawnError {
            code: 126,
            message: format!("conch: cd {}: a NUL byte in the path\n", cwd.display()),
        });
    }
    let mut prepared = policy.prepare(req.pty.is_some()).map_err(|e| SpawnError {
        code: 126,
        message: format!("conch: cannot set up the command's cgroup: {e}\n"),
    })?;
    if prepared.switches_user() {
        // Entered by the child once it is the command's user: the agent's
        // own rights must not open, or reveal, what that user cannot see.
        prepared
            .enter_dir_as_user(&cwd, or_root)
            .map_err(|e| SpawnError {
                code: 126,
                message: format!("conch: cd {}: {e}\n", cwd.display()),
            })?;
    } else {
        // Entered by the child, so that a directory that does not answer
        // holds only that child, for at most the start timeout.
        if or_root {
            cmd.current_dir_or_root(&cwd);
        } else {
            cmd.current_dir(&cwd);
        }
    }
    // Nothing of the agent's own environment: only the documented list,
    // then the request's, then the fallback mark, which the request may
    // not change (it would free its processes, or doom someone else's).
    for (k, v) in &prepared.env {
        cmd.env(k, v);
    }
    if let Some(env) = &req.env {
        for (k, v) in env.iter().filter(|(k, _)| k.as_str() != sandbox::MARK_VAR) {
            cmd.env(k, v);
        }
    }
    if let Some(mark) = &prepared.mark {
        cmd.env(sandbox::MARK_VAR, mark);
    }
    match req.pty {
        Some(size) => spawn_pty(cmd, size, &what, prepared),
        None => spawn_pipes(cmd, &what, prepared),
    }
}

/// Asks the kernel to SIGKILL the command's leader if the agent dies
/// without cleaning up (SIGKILL, OOM killer): the one orphan the agent's
/// own shutdown path cannot prevent. Set last: a change of credentials
/// clears it.
fn die_with_agent() -> io::Result<()> {
    // SAFETY: prctl is async-signal-safe and affects only this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    Ok(())
}

/// Starts `cmd` on `stdio` as `prepared` says (its cgroup, limits and
/// user), and the process group that kills it.
fn start(
    cmd: &Launch,
    stdio: [std::os::fd::RawFd; 3],
    leader: Leader,
    prepared: &Prepared,
    what: &str,
) -> Result<(ChildProcess, ProcessGroup), SpawnError> {
    let setup = |in_cgroup: bool| {
        // SAFETY: in the child before exec; these make only system calls
        // on data built before the clone.
        unsafe {
            prepared.enter(in_cgroup)?;
            prepared.drop_privileges()?;
        }
        die_with_agent()
    };
    // The clone puts the child into its v2 cgroup where it can; the
    // directory is open only until then.
    let into = prepared.cgroup.as_ref().and_then(|cg| cg.open_v2());
    let child = spawn::launch(
        cmd,
        stdio,
        leader,
        into.as_ref(),
        &setup,
        prepared.start_timeout,
    )
    .map_err(|e| spawn_error(&e, what))?;
    drop(into);
    let group = ProcessGroup {
        pgid: child.id().map(|id| Pid::from_raw(id as i32)),
        session: leader == Leader::Session,
        cgroup: prepared.cgroup.clone(),
        mark: prepared.mark.clone(),
        contained: prepared.cgroup.is_some() && prepared.switches_user(),
    };
    Ok((child, group))
}

/// Whether a command's output pipes are grown to
/// [`super::channel::PIPE_CHUNK`]: only when the kernel does not count them
/// against the user's pipe quota, that is with `CAP_SYS_RESOURCE` or
/// `CAP_SYS_ADMIN` outside any user namespace (root on the host, not in a
/// default container). Otherwise every pipe counts against the user's
/// `pipe-user-pages-soft`, past which each new pipe of that user (its
/// commands' own too) gets two pages. Looked up once.
fn output_pipes_grow() -> bool {
    // Capability numbers (linux/capability.h).
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_RESOURCE: u32 = 24;
    static GROW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GROW.get_or_init(|| {
        let exempt = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(caps.trim(), 16).ok()
            })
            .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN | 1 << CAP_SYS_RESOURCE) != 0);
        // The kernel checks these capabilities in the initial user
        // namespace, whose inode number is fixed (PROC_USER_INIT_INO); a
        // uid map alone cannot tell it from a namespace mapping every id.
        let initial_namespace = std::fs::read_link("/proc/self/ns/user")
            .is_ok_and(|ns| ns.as_os_str() == "user:[4026531837]");
        exempt && initial_namespace
    })
}

/// How much to read from a command's output pipes at once: their size
/// (at most [`super::channel::PIPE_CHUNK`]), whatever growing them gave.
pub(super) fn pipe_read_size<'a>(pipes: impl IntoIterator<Item = &'a PipeReader>) -> usize {
    use super::channel::{PIPE_CHUNK, READ_CHUNK};
    pipes
        .into_iter()
        .map(|p| {
            nix::fcntl::fcntl(p, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
                .map_or(READ_CHUNK, |n| usize::try_from(n).unwrap_or(READ_CHUNK))
        })
        .min()
        .unwrap_or(READ_CHUNK)
        .clamp(READ_CHUNK, PIPE_CHUNK)
}

fn spawn_pipes(cmd: Launch, what: &str, prepared: Prepared) -> Result<Spawned, SpawnError> {
    let io_err = |e: io::Error| SpawnError {
        code: 126,
        message: format!("conch: {what}: {e}\n"),
    };
    // Both ends close on exec; the child gets its own by dup2.
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io_err(e.into()));
    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let grow = output_pipes_grow();
    for output in [&stdout_read, &stderr_read].into_iter().filter(|_| grow) {
        // Only ever grown: where pages are large, the default may be more.
        let size = nix::fcntl::fcntl(output, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
        if usize::try_from(size).unwrap_or(0) < super::channel::PIPE_CHUNK {
            let _ = nix::fcntl::fcntl(
                output,
                nix::fcntl::FcntlArg::F_SETPIPE_SZ(super::channel::PIPE_CHUNK as i32),
            );
        }
    }
    let stdio = [
        stdin_read.as_raw_fd(),
        stdout_write.as_raw_fd(),
        stderr_write.as_raw_fd(),
    ];
    let started = start(&cmd, stdio, Leader::Group, &prepared, what);
    // The child's ends: only the child may hold them, or no EOF would come.
    drop((stdin_read, stdout_write, stderr_write));
    let (child, group) = started?;
    let io = ProcessIo::Pipes {
        stdin: Some(pipe::Sender::from_owned_fd(stdin_write).map_err(io_err)?),
        stdout: Some(pipe::Receiver::from_owned_fd(stdout_read).map_err(io_err)?),
        stderr: Some(pipe::Receiver::from_owned_fd(stderr_read).map_err(io_err)?),
    };
    Ok(Spawned { child, group, io })
}

fn winsize(size: PtySize) -> Winsize {
    Winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn spawn_pty(
    cmd: Launch,
    size: PtySize,
    what: &str,
    prepared: Prepared,
) -> Result<Spawned, SpawnError> {
    let io_err = |e: io::Error| SpawnError {
        code: 126,
        message: format!("conch: cannot open a pseudo-terminal: {e}\n"),
    };
    let (master, slave) = open_pty(size).map_err(io_err)?;
    if let Some((uid, gid)) = prepared.owner() {
        // The terminal belongs to the user who logs in on it, as login(1) does.
        nix::unistd::fchown(&slave, Some(uid.into()), Some(gid.into()))
            .map_err(|e| io_err(e.into()))?;
    }
    let fd = slave.as_raw_fd();
    let started = start(&cmd, [fd, fd, fd], Leader::Session, &prepared, what);
    // The parent's copy of the slave end is closed here, so the master sees
    // EOF (EIO) once every process of the session has exited.
    drop(slave);
    let (child, group) = started?;
    let master = Pty::new(master).map_err(io_err)?;
    Ok(Spawned {
        child,
        group,
        io: ProcessIo::Pty(master),
    })
}

/// A new pseudo-terminal's master and slave, of the given size.
///
/// Both close on exec: any other command started while this one runs must
/// not hold this terminal (`openpty(3)` would let it inherit both ends, and
/// write into another user's shell through them).
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: plain calls on descriptors this function owns.
    unsafe {
        let master = libc::posix_openpt(flags);
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The slave from the master itself (Linux 4.13): no path to race on.
        let slave = libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags);
        if slave < 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = OwnedFd::from_raw_fd(slave);
        let ws = winsize(size);
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((master, slave))
    }
}

/// How soon a write to a full terminal is tried again when no descriptor
/// could be had to wait for room: 50 ms.
const WRITE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// The master side of a pseudo-terminal, readable and writable without
/// blocking a runtime thread.
pub(crate) struct Pty {
    /// Registered for reading only. A terminal's master is woken for
    /// writing after every write to it and every read its program makes,
    /// so a registration for both woke the agent twice a keystroke for
    /// nothing, beside the keystroke's own echo.
    fd: AsyncFd<OwnedFd>,
    /// A registration for writing, of a duplicate of the master, made the
    /// first time a write finds the terminal's input full (a paste into a
    /// program that is not reading): only such a terminal pays those
    /// wake-ups, and the descriptor.
    writer: std::sync::OnceLock<AsyncFd<OwnedFd>>,
}

impl Pty {
    fn new(master: OwnedFd) -> io::Result<Pty> {
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let fd = spawn::register(master, tokio::io::Interest::READABLE)?;
        Ok(Pty {
            fd,
            writer: std::sync::OnceLock::new(),
        })
    }

    /// The terminal's foreground process group, if it is one of the
    /// command's: a group with a member in `session`, the session the
    /// command leads. The terminal keeps the number of a group that ended
    /// while it was in the foreground, and the number can be reused by
    /// anyone's process: such a group is not the command's and is never
    /// signalled. The leader is asked first; a pipeline whose leader
    /// ended before the rest is found through `/proc`.
    pub(crate) fn foreground(&self, session: Option<Pid>) -> Option<Pid> {
        let session = session?;
        let pgid = nix::unistd::tcgetpgrp(self.fd.get_ref()).ok()?;
        if pgid.as_raw() <= 0 {
            return None;
        }
        match nix::unistd::getsid(Some(pgid)) {
            Ok(sid) => (sid == session).then_some(pgid),
            Err(_) => group_in_session(pgid, session).then_some(pgid),
        }
    }

    /// Sends `signal` to the terminal's foreground job (of `session`), as
    /// the terminal's own ^C would; false when there is none to be found.
    pub(crate) fn signal_foreground(&self, signal: Signal, session: Option<Pid>) -> bool {
        self.foreground(session)
            .is_some_and(|pgid| killpg(pgid, signal).is_ok())
    }

    /// Sets the terminal size; the kernel sends SIGWINCH to the foreground job.
    pub(crate) fn resize(&self, size: PtySize) -> io::Result<()> {
        let ws = winsize(size);
        // SAFETY: TIOCSWINSZ reads one Winsize from the pointer we pass.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Pty {
    /// `AsyncRead::poll_read` for a shared reference: the master is both the
    /// process's input and its output.
    pub(crate) fn poll_read_shared(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Linux reports EIO on the master once the last slave fd is
                // closed: that is the terminal's end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// `AsyncWrite::poll_write` for a shared reference.
    pub(crate) fn poll_write_shared(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let write = || nix::unistd::write(self.fd.get_ref().as_fd(), buf).map_err(io::Error::from);
        loop {
            if let Some(writer) = self.writer.get() {
                let mut guard = ready!(writer.poll_write_ready(cx))?;
                if let Ok(result) = guard.try_io(|_| write()) {
                    return Poll::Ready(result);
                }
                continue;
            }
            match write() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
            // Registered now, the duplicate reports the room there is
            // already: room the program made since this write failed is
            // not missed.
            let dup = self.fd.get_ref().try_clone();
            match dup.and_then(|dup| spawn::register(dup, tokio::io::Interest::WRITABLE)) {
                Ok(writer) => {
                    let _ = self.writer.set(writer);
                }
                Err(e) => {
                    // Out of descriptors for now (the agent's limit): the
                    // input waits and the write is tried again shortly,
                    // rather than the terminal losing its input for good.
                    tracing::debug!(error = %e, "a terminal's input waits for a descriptor");
                    let waker = cx.waker().clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(WRITE_RETRY).await;
                        waker.wake();
                    });
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_stuck_on_one_process_does_not_hold_back_later_kills() {
        let sleeper = |own_session: bool| {
            let mut cmd = std::process::Command::new("sleep");
            if own_session {
                // In the child before its exec, so the session is its own
                // by the time `spawn` returns. `setsid(1)` called it after
                // its exec instead: a scan that read the process first saw
                // the test's session, spared it, and the test timed out
                // (CI, once).
                // SAFETY: setsid is async-signal-safe, and nothing else
                // runs in the forked child before its exec.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                        if libc::setsid() < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            cmd.arg("1000").spawn().unwrap()
        };
        // Its reading hangs (as a process whose owner holds its memory
        // map's lock would make it).
        let mut holder = sleeper(false);
        let (release, held) = std::sync::mpsc::channel::<()>();
        *HOLD_SCAN_AT.lock().unwrap() = Some((holder.id() as i32, held));
        // A scan starts, and sticks there.
        kill_soon(Doomed::Session(i32::MAX));
        // Held there for longer than a scan may take on one process.
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let reached = HOLD_REACHED_MS.load(std::sync::atomic::Ordering::Acquire);
            if reached != 0 && clock_ms() - reached >= SCAN_STUCK.as_millis() as u64 {
                break;
            }
            assert!(
                std::time::Instant::now() < give_up,
                "no scan reached the process"
            );
            tokio::task::yield_now().await;
        }
        // A shell's session closed now is killed all the same. Before, it
        // waited behind the stuck scan for as long as that lasted.
        let mut victim = sleeper(true);
        kill_soon(Doomed::Session(victim.id() as i32));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(victim.wait());
        });
        let status = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the session was not killed while a scan was stuck")
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        drop(release);
        holder.kill().unwrap();
        holder.wait().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_that_hangs_does_not_hold_back_the_others() {
        let _alone = HUNG_STARTS.lock().await;
        // More hung starts than places, as one user's commands in a
        // directory that does not answer.
        let places = start_places();
        let mut releases = Vec::new();
        let mut stuck = Vec::new();
        for _ in 0..places + 1 {
            let (release, hung) = std::sync::mpsc::channel::<()>();
            releases.push(release);
            stuck.push(tokio::spawn(admitted(move || {
                // Returns once its sender is dropped.
                let _ = hung.recv();
            })));
        }
        // Before, each held its place until it ended: these never ran.
        for _ in 0..4 {
            tokio::time::timeout(Duration::from_secs(60), admitted(|| ()))
                .await
                .expect("a start waited behind hung ones")
                .expect("ran");
        }
        drop(releases);
        for task in stuck {
            task.await
                .unwrap()
                .expect("the hung start ended when released");
        }
    }

    /// Only the wait for a place is given up: once the start is under
    /// way, its answer comes back whatever the caller would give up for
    /// (a command closed as its turn came reports what it did). The first
    /// `give_up` would end as soon as the start began, had it still been
    /// raced then, and the answer would be "given up".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_wait_for_a_place_is_given_up() {
        let _alone = HUNG_STARTS.lock().await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (began_tx, began_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let start = {
            let ran = ran.clone();
            move || {
                let _ = began_tx.send(());
                let _ = go_rx.recv();
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                "ran"
            }
        };
        // Gives up as soon as the start is under way, and lets it go on.
        let give_up = async move {
            let _ = began_rx.await;
            let _ = go_tx.send(());
            "given up"
        };
        let answer = admitted_unless(start, give_up).await;
        assert_eq!(answer.map(|a| a.ok()), Ok(Some("ran")));

        // Given up already, or while it waits for a place: never started.
        ran.store(false, std::sync::atomic::Ordering::SeqCst);
        let start = || {
            let ran = ran.clone();
            move || ran.store(true, std::sync::atomic::Ordering::SeqCst)
        };
        let answer = admitted_unless(start(), std::future::ready("given up")).await;
        assert!(matches!(answer, Err("given up")));
        let places = hold_start_places().await;
        let answer = admitted_unless(start(), std::future::ready("given up")).await;
        assert!(matches!(answer, Err("given up")));
        drop(places);
        // Nothing was left behind to start later.
        admitted(|| ()).await.unwrap();
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_its_place_to_its_start() {
        let _alone = HUNG_STARTS.lock().await;
        // As many hung starts as there are places and stalled slots, each
        // caller giving up once its start runs (a session closed, a task
        // aborted at shutdown).
        let most = start_places() + MAX_STALLED;
        let mut releases = Vec::new();
        let mut began = Vec::new();
        let mut callers = Vec::new();
        for _ in 0..most {
            let (release, hung) = std::sync::mpsc::channel::<()>();
            let (runs, running) = tokio::sync::oneshot::channel::<()>();
            releases.push(release);
            began.push(running);
            callers.push(tokio::spawn(admitted(move || {
                let _ = runs.send(());
                // Returns once its sender is dropped.
                let _ = hung.recv();
            })));
        }
        for running in began {
            tokio::time::timeout(Duration::from_secs(120), running)
                .await
                .expect("every hung start got a place in turn")
                .expect("ran");
        }
        for caller in &callers {
            caller.abort();
        }
        for caller in callers {
            let _ = caller.await;
        }
        // The starts still run, so they still hold every place: before,
        // the callers' places went with them, and as many more starts
        // could pile up on the starters as callers gave up.
        assert_eq!(starting().available_permits(), 0, "places freed early");
        assert_eq!(
            STALLED_STARTS.available_permits(),
            0,
            "stalled slots freed early"
        );
        // One start ending lets the next in.
        let next = tokio::spawn(admitted(|| "next"));
        drop(releases.pop());
        let answer = tokio::time::timeout(Duration::from_secs(60), next)
            .await
            .expect("the next start got the place a hung one left")
            .unwrap()
            .expect("ran");
        assert_eq!(answer, "next");
        drop(releases);
        // Every place back before the next such test.
        let back = async {
            while starting().available_permits() < start_places()
                || STALLED_STARTS.available_permits() < MAX_STALLED
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), back)
            .await
            .expect("the released starts gave their places back");
    }
}
