//! Starting a process without copying the agent.
//!
//! `fork` copies the page tables of the whole agent, and the agent grows
//! with its sessions (each keeps a terminal model): measured on a 2-core
//! machine, fork, exit and wait take 1.5 ms for a 10 MB process and 30 ms
//! for a 1 GB one, against 0.6 ms for a vfork-style spawn of `true` at
//! either size. A fork runs on the runtime worker that asked for it, so a
//! large agent starting many shells held up every other command's output
//! and the link's keep-alives (10,000 shells lost the link that way).
//!
//! Here the child shares the agent's memory until it execs (`CLONE_VM |
//! CLONE_VFORK`, as glibc's `posix_spawn` does), which costs the same at any
//! size, and the calling thread waits only until the exec. `posix_spawn`
//! itself cannot do what a command needs first (a cgroup, rlimits, a
//! controlling terminal, another user, a death signal).
//!
//! The price is discipline in the child. It runs on a stack of its own, in
//! memory the agent's other threads keep using, so it makes only system
//! calls on data built beforehand: no allocation, no lock, and no libc
//! wrapper that talks to other threads (glibc's `setuid` and its kin signal
//! every thread of the process, so the credentials change by raw system
//! calls; see [`super::sandbox::Prepared::drop_privileges`]).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// Where a command is looked for when its environment has no `PATH`
/// (as glibc's `execvp`).
const FALLBACK_PATH: &[u8] = b"/bin:/usr/bin";

/// The shell that runs a script without `#!`.
const SH: &std::ffi::CStr = c"/bin/sh";

/// The child's stack until it execs: it runs the agent's set-up code (the
/// cgroup, rlimits, credentials), whose frames are small.
const CHILD_STACK: usize = 128 * 1024;

/// `fd` registered with the runtime for `interest`.
pub(super) fn register(fd: OwnedFd, interest: tokio::io::Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an OwnedFd we exclusively own; it stays open for as
    // long as the AsyncFd that owns it exists.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// A command line and environment, as `std::process::Command` takes them.
pub(crate) struct Launch {
    program: OsString,
    argv: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: Option<OsString>,
    /// `cwd` is a home no one asked for: `/` when it cannot be entered.
    cwd_or_root: bool,
}

impl Launch {
    /// Runs `program` (looked up in the command's `PATH` unless it holds a
    /// `/`) with an empty environment and the agent's directory.
    pub(crate) fn new(program: impl Into<OsString>) -> Launch {
        let program = program.into();
        Launch {
            argv: vec![program.clone()],
            program,
            env: BTreeMap::new(),
            cwd: None,
            cwd_or_root: false,
        }
    }

    pub(crate) fn arg0(&mut self, arg0: impl Into<OsString>) -> &mut Launch {
        self.argv[0] = arg0.into();
        self
    }

    pub(crate) fn arg(&mut self, arg: impl Into<OsString>) -> &mut Launch {
        self.argv.push(arg.into());
        self
    }

    pub(crate) fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(
        &mut self,
        args: I,
    ) -> &mut Launch {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets a variable; a later value for the same name wins.
    pub(crate) fn env(
        &mut self,
        key: impl Into<OsString>,
        value: impl Into<OsString>,
    ) -> &mut Launch {
        self.env.insert(key.into(), value.into());
        self
    }

    pub(crate) fn current_dir(&mut self, dir: impl Into<OsString>) -> &mut Launch {
        self.cwd = Some(dir.into());
        self
    }

    /// As [`Launch::current_dir`], but `/` when `dir` cannot be entered
    /// (a user's home, which no one asked for by name).
    pub(crate) fn current_dir_or_root(&mut self, dir: impl Into<OsString>) -> &mut Launch {
        self.cwd = Some(dir.into());
        self.cwd_or_root = true;
        self
    }
}

/// What the child leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leader {
    /// A process group of its own (a command on pipes).
    Group,
    /// A session of its own, whose controlling terminal is its standard
    /// input (a command on a pseudo-terminal).
    Session,
}

/// Everything the child reads, built before the clone.
struct ChildPlan<'a> {
    /// The paths to try in turn, as `execvp` tries `PATH`.
    candidates: Vec<CString>,
    /// For each candidate: `/bin/sh CANDIDATE ARGS...`, run when the file
    /// is not an executable format (a script without `#!`), as `execvp`.
    as_scripts: Vec<Vec<*const c_char>>,
    /// The program was named by a path (a `/` in it): its errors are
    /// reported as they are, not as a search's.
    by_path: bool,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    cwd: Option<CString>,
    cwd_or_root: bool,
    stdio: [RawFd; 3],
    leader: Leader,
    /// Runs in the child just before exec; told whether the clone put the
    /// child into its v2 cgroup already.
    setup: &'a dyn Fn(bool) -> io::Result<()>,
    /// The child was cloned into its v2 cgroup (set before each clone).
    in_cgroup: AtomicBool,
    /// Set by the child, read once it has exec'd or exited: why it could
    /// not start the command (an errno), or 0.
    error: AtomicI32,
    /// Set by the child with `error`: the errno is its `chdir`'s.
    in_cd: AtomicBool,
}

fn nul_free(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the command line or environment",
        )
    })
}

/// The paths `execvp` would try for `program` with this `PATH`.
fn candidates(program: &OsStr, path: Option<&OsStr>) -> io::Result<Vec<CString>> {
    let name = program.as_bytes();
    if name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if name.contains(&b'/') {
        return Ok(vec![nul_free(name)?]);
    }
    let path = path.map(OsStr::as_bytes).unwrap_or(FALLBACK_PATH);
    path.split(|&b| b == b':')
        .map(|dir| {
            // An empty entry is the current directory, as for execvp.
            let mut full = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.to_vec()
            };
            full.push(b'/');
            full.extend_from_slice(name);
            nul_free(&full)
        })
        .collect()
}

/// Starts `launch` with `stdio` as its descriptors 0, 1 and 2, leading
/// `leader`, after `setup` has run in the child (just before exec). With
/// `into_cgroup` (a v2 cgroup directory), the child starts in that cgroup
/// where the kernel can do so (`clone3` with `CLONE_INTO_CGROUP`, Linux
/// 5.7, x86_64 here), and `setup` is told whether it did.
///
/// `setup` runs in the child, in memory shared with the agent: it may only
/// make async-signal-safe calls that do not allocate, and report errors
/// that are OS errors (which do not allocate either).
///
/// A child that has not exec'd within `limit` is killed, and the start
/// fails (`TimedOut`): the thread that cloned it waits until then, and a
/// directory that does not answer (a hung network mount), or a process
/// of the command's user that stops the child after it has become that
/// user, would otherwise hold it for ever.
pub(crate) fn launch(
    launch: &Launch,
    stdio: [RawFd; 3],
    leader: Leader,
    into_cgroup: Option<&OwnedFd>,
    setup: &dyn Fn(bool) -> io::Result<()>,
    limit: Duration,
) -> io::Result<ChildProcess> {
    let argv: Vec<CString> = launch
        .argv
        .iter()
        .map(|a| nul_free(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let envp: Vec<CString> = launch
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone().into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            nul_free(&kv)
        })
        .collect::<io::Result<_>>()?;
    let candidates = candidates(
        &launch.program,
        launch.env.get(OsStr::new("PATH")).map(OsString::as_os_str),
    )?;
    let as_scripts = candidates
        .iter()
        .map(|path| {
            [SH.as_ptr(), path.as_ptr()]
                .into_iter()
                .chain(argv.iter().skip(1).map(|a| a.as_ptr()))
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        })
        .collect();
    let plan = ChildPlan {
        by_path: launch.program.as_bytes().contains(&b'/'),
        candidates,
        as_scripts,
        argv: argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        envp: envp
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        cwd: launch
            .cwd
            .as_ref()
            .map(|d| nul_free(d.as_bytes()))
            .transpose()?,
        cwd_or_root: launch.cwd_or_root,
        stdio,
        leader,
        setup,
        in_cgroup: AtomicBool::new(false),
        error: AtomicI32::new(0),
        in_cd: AtomicBool::new(false),
    };
    // Children are reaped by pid: an inherited SIGCHLD set to "ignore"
    // would have the kernel reap them first and lose their exit status.
    static SIGCHLD_DEFAULT: std::sync::Once = std::sync::Once::new();
    SIGCHLD_DEFAULT.call_once(|| {
        // SAFETY: reads and, if ignored, resets one signal's disposition.
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut current) == 0
                && current.sa_sigaction == libc::SIG_IGN
            {
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            }
        }
    });
    let stack = ChildStack::take()?;
    let watch = Watch::start(limit);
    let settid = watch.pid.as_ptr();
    // SAFETY: every signal is blocked around the clone so that no handler of
    // the agent's (tokio's, for one) runs in the child, which resets them
    // all before unblocking. The child only reads `plan` (alive until it
    // has exec'd or exited: CLONE_VFORK suspends this thread until then)
    // and runs on `stack`, which outlives it for the same reason.
    let pid = unsafe {
        // The raw system call: glibc's wrappers leave its own signals 32
        // and 33 unblocked.
        let all: u64 = !0;
        let mut old: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            &mut old as *mut u64,
            8usize,
        );
        let arg = &plan as *const ChildPlan as *mut c_void;
        let mut pid = into_cgroup.map_or(-1, |dir| {
            plan.in_cgroup.store(true, Ordering::Relaxed);
            let pid = clone_into_cgroup(&stack, dir, arg, settid);
            plan.in_cgroup.store(pid > 0, Ordering::Relaxed);
            pid
        });
        if pid <= 0 {
            pid = libc::clone(
                child_main,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
                arg,
                settid,
            );
        }
        let err = io::Error::last_os_error();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &old as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        if pid < 0 {
            watch.finish();
            return Err(err);
        }
        pid
    };
    // The child has exec'd or exited: no one runs on the stack any more.
    stack.give_back();
    if watch.finish() {
        // Killed by the watchdog (perhaps just after its exec, when it may
        // have started others: its process group goes too, if it made
        // one): it is dead or dying, and reaped here so that its pid is
        // not reused unseen.
        // SAFETY: a group with our unreaped child's id can only be its own.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: waits for our own child, which no one else reaps.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "did not start within {} ms (its directory did not answer, or it was \
                 stopped before its exec), and was killed",
                limit.as_millis()
            ),
        ));
    }
    let errno = plan.error.load(Ordering::Acquire);
    if errno != 0 {
        // The child has exited (or is about to): reap it.
        let mut status = 0;
        // SAFETY: waits for our own child, which no one else reaps.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let err = io::Error::from_raw_os_error(errno);
        if plan.in_cd.load(Ordering::Relaxed) {
            let dir = launch.cwd.clone().unwrap_or_default();
            return Err(io::Error::new(err.kind(), CdFailed { dir, err }));
        }
        return Err(err);
    }
    ChildProcess::new(pid)
}

/// The child could not enter its working directory (the `io::Error`
/// [`launch`] returns carries this): the command's failure, reported as
/// `cd DIR: reason`, not as a missing program.
#[derive(Debug)]
pub(crate) struct CdFailed {
    dir: OsString,
    err: io::Error,
}

impl std::fmt::Display for CdFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The system's own text, without Rust's " (os error N)".
        let text = self.err.to_string();
        let reason = text
            .rsplit_once(" (os error")
            .map_or(text.as_str(), |(r, _)| r);
        let dir = std::path::Path::new(&self.dir).display();
        write!(f, "cd {dir}: {reason}")
    }
}

impl std::error::Error for CdFailed {}

/// `clone3` is missing (Linux before 5.3, or a seccomp filter that
/// refuses it, as container runtimes' default ones do) or knows no
/// `CLONE_INTO_CGROUP` (before 5.7): not tried again.
#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
static NO_CLONE3: AtomicBool = AtomicBool::new(false);

/// `clone_args` of `clone3(2)`, up to its `cgroup` field (`CLONE_ARGS_SIZE_VER2`).
#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Clones the child as `libc::clone` does (`CLONE_VM | CLONE_VFORK`, on
/// `stack`, running [`child_main`] with `arg`), straight into the v2
/// cgroup `dir`. Returns the child's pid, or -1 when the kernel could not
/// (the caller then clones the usual way and the child joins by itself).
///
/// glibc has no wrapper for `clone3` that runs a function on a new stack,
/// so the system call is made here: the child starts at the instruction
/// after it, on the new stack, and calls `child_main` (which never
/// returns; an exit follows all the same).
///
/// # Safety
/// As for `libc::clone` with these flags: every signal blocked, `arg`
/// alive and `stack` unused until the child has exec'd or exited.
#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
unsafe fn clone_into_cgroup(
    stack: &ChildStack,
    dir: &OwnedFd,
    arg: *mut c_void,
    settid: *mut c_int,
) -> c_int {
    use std::os::fd::AsRawFd;
    if NO_CLONE3.load(Ordering::Relaxed) {
        return -1;
    }
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID) as u64
            | CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: settid as u64,
        exit_signal: libc::SIGCHLD as u64,
        // The lowest address of the area; the child's stack pointer starts
        // at its end (16-byte aligned: the mapping is page-aligned).
        stack: stack.base as u64,
        stack_size: stack.len as u64,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: dir.as_raw_fd() as u64,
    };
    let entry: extern "C" fn(*mut c_void) -> c_int = child_main;
    let ret: i64;
    // SAFETY: the system call reads `args`; in the parent it returns like
    // any other (rcx and r11 clobbered). The child has the parent's
    // registers on its own stack: r12 and r13 (kept across system calls)
    // carry the argument and the function, called with the ABI's stack
    // alignment; it never returns to Rust code here.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, {exit}",
            "syscall",
            "ud2",
            "2:",
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // EPERM: older seccomp profiles of container runtimes (a cgroup the
    // agent may not enter gives EACCES or ENOENT, tried again next time).
    if [libc::ENOSYS, libc::E2BIG, libc::EINVAL, libc::EPERM].contains(&(-ret as c_int)) {
        NO_CLONE3.store(true, Ordering::Relaxed);
    }
    if ret > 0 { ret as c_int } else { -1 }
}

#[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64")))]
unsafe fn clone_into_cgroup(_: &ChildStack, _: &OwnedFd, _: *mut c_void, _: *mut c_int) -> c_int {
    -1
}

/// A child between its clone and its exec, killed by the watchdog thread
/// if it is still there at its deadline.
struct Watch {
    /// The child's pid, written by the kernel before the child first runs
    /// (`CLONE_PARENT_SETTID`); 0 until then.
    pid: AtomicI32,
    deadline: Instant,
    /// Set, under [`WATCHED`]'s lock, when the watchdog has killed it.
    killed: AtomicBool,
}

/// The children being watched, and when the watchdog next wakes (`None`:
/// it waits to be told of one).
struct Watched {
    children: Vec<Arc<Watch>>,
    wakes_at: Option<Instant>,
}

static WATCHED: Mutex<Watched> = Mutex::new(Watched {
    children: Vec::new(),
    wakes_at: None,
});
static WATCHED_SOONER: Condvar = Condvar::new();

impl Watch {
    /// Watches the next clone, which must end with [`Watch::finish`].
    fn start(limit: Duration) -> Arc<Watch> {
        static WATCHDOG: std::sync::Once = std::sync::Once::new();
        WATCHDOG.call_once(|| {
            // Without it, children are not killed on time; starts work on.
            if let Err(e) = std::thread::Builder::new()
                .name("conch-start-watchdog".into())
                .spawn(watchdog)
            {
                tracing::error!("cannot start the watchdog of starting commands: {e}");
            }
        });
        let watch = Arc::new(Watch {
            pid: AtomicI32::new(0),
            deadline: Instant::now() + limit,
            killed: AtomicBool::new(false),
        });
        let mut watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
        watched.children.push(watch.clone());
        // Told only when it would wake too late: starts one after another
        // cost the watchdog one wake-up a limit, not one each.
        if watched.wakes_at.is_none_or(|at| at > watch.deadline) {
            watched.wakes_at = Some(watch.deadline);
            WATCHED_SOONER.notify_one();
        }
        watch
    }

    /// Stops watching, once the clone has returned; whether the watchdog
    /// killed the child first.
    fn finish(self: Arc<Watch>) -> bool {
        let mut watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
        watched.children.retain(|w| !Arc::ptr_eq(w, &self));
        self.killed.load(Ordering::Relaxed)
    }
}

/// Kills the children that are past their deadline, under the lock that
/// [`Watch::finish`] takes: a child is killed only while it is watched,
/// that is before [`launch`] has reaped it, so its pid cannot have been
/// reused (it may have exec'd just before: `launch` then fails all the
/// same).
fn watchdog() {
    let mut watched = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for watch in &watched.children {
            if watch.killed.load(Ordering::Relaxed) {
                continue;
            }
            let pid = watch.pid.load(Ordering::Acquire);
            if watch.deadline > now || pid <= 0 {
                // Not yet; or the kernel has not written its pid yet.
                let at = watch.deadline.max(now + Duration::from_millis(100));
                next = Some(next.map_or(at, |n| n.min(at)));
                continue;
            }
            // SAFETY: our own child, not reaped (its clone has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            watch.killed.store(true, Ordering::Relaxed);
        }
        watched.wakes_at = next;
        watched = match next {
            Some(at) => {
                WATCHED_SOONER
                    .wait_timeout(watched, at.saturating_duration_since(now))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => WATCHED_SOONER
                .wait(watched)
                .unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// The child's side: returns only to exit with what went wrong.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive while the parent is
    // suspended (until this child execs or exits).
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: this is the freshly cloned child, before exec.
    let errno = unsafe { child_steps(plan) };
    plan.error.store(errno.max(1), Ordering::Release);
    // SAFETY: _exit ends this process without running the agent's
    // destructors or atexit handlers, which belong to the parent.
    unsafe { libc::_exit(127) }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// # Safety
/// Only in the cloned child, before exec.
unsafe fn child_steps(plan: &ChildPlan) -> i32 {
    // SAFETY: each call is a plain system call on this process's own state
    // or on data `plan` holds.
    unsafe {
        reset_signals();
        // Descriptors below 3 would be overwritten by the dup2s: move them.
        let mut stdio = plan.stdio;
        for fd in &mut stdio {
            if *fd < 3 {
                let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3);
                if moved < 0 {
                    return errno();
                }
                *fd = moved;
            }
        }
        for (target, fd) in stdio.iter().enumerate() {
            if libc::dup2(*fd, target as c_int) < 0 {
                return errno();
            }
        }
        // Nothing else of the agent's goes to the command: not its link,
        // not another session's terminal, not a descriptor the agent
        // itself inherited without close-on-exec. (Marked, and exec closes
        // them: Linux 5.11; closed now on 5.9 and 5.10; before that, only
        // the close-on-exec flags the agent sets guard them.)
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Linux 5.9 and 5.10 know only closing.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        }
        match plan.leader {
            Leader::Group => {
                if libc::setpgid(0, 0) < 0 {
                    return errno();
                }
            }
            Leader::Session => {
                // A new session lets the terminal become its controlling
                // terminal, so ^C from the line discipline reaches the
                // foreground job.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return errno();
                }
            }
        }
        // The directory is entered here, not checked by the agent before
        // the clone: a directory that does not answer then holds only
        // this child, which the watchdog kills at the start limit.
        if let Some(dir) = &plan.cwd
            && libc::chdir(dir.as_ptr()) < 0
            && !(plan.cwd_or_root && libc::chdir(c"/".as_ptr()) == 0)
        {
            plan.in_cd.store(true, Ordering::Relaxed);
            return errno();
        }
        if let Err(e) = (plan.setup)(plan.in_cgroup.load(Ordering::Relaxed)) {
            return e.raw_os_error().unwrap_or(libc::EINVAL);
        }
        let mut denied = false;
        for (path, as_script) in plan.candidates.iter().zip(&plan.as_scripts) {
            libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            let mut failed = errno();
            if failed == libc::ENOEXEC {
                libc::execve(SH.as_ptr(), as_script.as_ptr(), plan.envp.as_ptr());
                failed = errno();
            }
            if plan.by_path {
                return failed;
            }
            match failed {
                // As execvp: a permission problem is reported if nothing
                // else is found; a missing file goes on to the next entry.
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                other => return other,
            }
        }
        if denied { libc::EACCES } else { libc::ENOENT }
    }
}

/// Default dispositions for every signal, then an empty mask.
///
/// The handlers go first: the mask was inherited full from the parent, and
/// a handler of the agent's must never run in memory shared with it.
///
/// # Safety
/// Only in the cloned child, before exec.
unsafe fn reset_signals() {
    /// The kernel's own `struct sigaction` (x86_64 and aarch64 lay it out
    /// alike); the raw system call also reaches signals 32 and 33, which
    /// glibc's wrappers refuse to touch but which can be inherited ignored.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction and rt_sigprocmask change only this process's
    // signal state.
    unsafe {
        for signo in 1..=64 {
            if signo != libc::SIGKILL && signo != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signo,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
}

/// A stack mapped for one child, with a guard page below it so that an
/// overflow kills the child rather than writing into the agent's memory.
struct ChildStack {
    base: *mut c_void,
    len: usize,
}

// SAFETY: the mapping belongs to this value alone; a child runs on it only
// while the thread that cloned it is suspended (CLONE_VFORK).
unsafe impl Send for ChildStack {}

/// How many stacks of children that have exec'd or exited are kept for the
/// next: a fresh one costs an mmap, an mprotect and an munmap (which makes
/// the other cores flush their TLBs), about a quarter of the agent's own
/// time in starting a command.
const SPARE_STACKS: usize = 4;

static SPARE_STACKS_KEPT: Mutex<Vec<ChildStack>> = Mutex::new(Vec::new());

impl ChildStack {
    /// A kept stack, else a fresh one.
    fn take() -> io::Result<ChildStack> {
        let kept = SPARE_STACKS_KEPT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match kept {
            Some(stack) => Ok(stack),
            None => ChildStack::new(),
        }
    }

    /// Keeps the stack for the next child (unmapped when enough are kept).
    /// Only once its child has exec'd or exited.
    fn give_back(self) {
        let mut kept = SPARE_STACKS_KEPT
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if kept.len() < SPARE_STACKS {
            kept.push(self);
        }
    }

    fn new() -> io::Result<ChildStack> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(4096);
        let len = CHILD_STACK + page;
        // SAFETY: a fresh private anonymous mapping, owned by this value.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = ChildStack { base, len };
            if libc::mprotect(base, page, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }

    /// The stack grows down from here (16-byte aligned: the mapping is).
    fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of the mapping.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the child that used it has
        // exec'd or exited.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A started command, waited on through a pidfd: readable once it exits.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    pid: libc::pid_t,
    exited: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
}

impl ChildProcess {
    fn new(pid: libc::pid_t) -> io::Result<ChildProcess> {
        // SAFETY: pidfd_open on our own unreaped child; the descriptor
        // returned is ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            abandon(pid);
            return Err(io::Error::new(
                err.kind(),
                format!("cannot watch the command (pidfd_open needs Linux 5.3): {err}"),
            ));
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let exited = register(fd, tokio::io::Interest::READABLE).inspect_err(|_| abandon(pid))?;
        Ok(ChildProcess {
            pid,
            exited: Some(exited),
            status: None,
        })
    }

    /// The process id while it has not been reaped.
    pub(crate) fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid as u32)
    }

    /// The exit status if the process has exited (reaping it), else None.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none()
            && let Some(status) = reap(self.pid)?
        {
            self.status = Some(status);
            self.exited = None;
        }
        Ok(self.status)
    }

    /// Waits for the process to exit and reaps it (cancel-safe). The pidfd's
    /// readiness is asked first: a supervisor polls this once per output
    /// frame, and that costs no system call while the command runs.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let Some(exited) = &self.exited else {
                return Err(io::Error::other("the command's pidfd is gone"));
            };
            let mut ready = exited.readable().await?;
            match reap(self.pid)? {
                Some(status) => {
                    drop(ready);
                    self.status = Some(status);
                    self.exited = None;
                }
                None => ready.clear_ready(),
            }
        }
    }
}

impl Drop for ChildProcess {
    /// A child dropped before it exited is reaped once it does, so that no
    /// zombie stays behind (killing it is the process group's business).
    fn drop(&mut self) {
        if self.status.is_some() || !matches!(self.try_wait(), Ok(None)) {
            return;
        }
        let pid = self.pid;
        let reap = move || {
            // SAFETY: our own child, reaped only here.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        };
        match (tokio::runtime::Handle::try_current(), self.exited.take()) {
            // Awaiting the pidfd holds no thread while the child lives on.
            (Ok(rt), Some(exited)) => {
                rt.spawn(async move {
                    if exited.readable().await.is_ok() {
                        reap();
                    }
                });
            }
            _ => {
                std::thread::spawn(reap);
            }
        }
    }
}

/// The exit status of our child `pid` if it has exited (reaping it).
fn reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut raw = 0;
    // SAFETY: our own child, reaped only through here (or by `abandon`).
    match unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) } {
        rc if rc < 0 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        _ => Ok(Some(ExitStatus::from_raw(raw))),
    }
}

/// Kills and reaps a child that cannot be watched: it must not run on
/// unseen (Linux before 5.3 has no pidfd).
fn abandon(pid: libc::pid_t) {
    // SAFETY: our own child, not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Runs `cat /proc/self/cgroup` asking for `into_cgroup`; returns what
    /// the child's set-up was told (whether it was cloned into it) and
    /// what the command printed.
    async fn run_in(into_cgroup: Option<&OwnedFd>) -> (bool, String) {
        let told = AtomicBool::new(false);
        // The child shares this memory until it execs (CLONE_VM), so what
        // it stores here is what the parent reads after.
        let setup = |in_cgroup: bool| {
            told.store(in_cgroup, Ordering::Relaxed);
            Ok(())
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut cmd = Launch::new("/bin/cat");
        cmd.arg("/proc/self/cgroup");
        let stdio = [null.as_raw_fd(), write.as_raw_fd(), write.as_raw_fd()];
        let mut child = launch(
            &cmd,
            stdio,
            Leader::Group,
            into_cgroup,
            &setup,
            Duration::from_secs(60),
        )
        .expect("started");
        drop(write);
        let status = child.wait().await.unwrap();
        assert!(status.success(), "{status:?}");
        let out = std::io::read_to_string(std::fs::File::from(read)).unwrap();
        (told.load(Ordering::Relaxed), out)
    }

    /// Runs `pwd` as `cmd` sets its directory; returns what it printed,
    /// or the error of its start.
    async fn pwd(cmd: &mut Launch) -> io::Result<String> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let stdio = [null.as_raw_fd(), write.as_raw_fd(), write.as_raw_fd()];
        let setup = |_: bool| Ok(());
        let started = launch(
            cmd,
            stdio,
            Leader::Group,
            None,
            &setup,
            Duration::from_secs(60),
        );
        drop(write);
        let mut child = started?;
        assert!(child.wait().await.unwrap().success());
        Ok(std::io::read_to_string(std::fs::File::from(read)).unwrap())
    }

    #[tokio::test]
    async fn the_child_enters_its_directory_and_a_missing_home_means_the_root() {
        let mut asked = Launch::new("/bin/pwd");
        asked.current_dir("/no/such/dir");
        let err = pwd(&mut asked).await.expect_err("no such directory");
        // A cd's failure, not a missing program's.
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let cd = err.get_ref().and_then(|e| e.downcast_ref::<CdFailed>());
        assert_eq!(
            cd.expect("told as a cd's failure").to_string(),
            "cd /no/such/dir: No such file or directory"
        );
        // A home no one asked for by name: `/` when it is missing, as
        // after an ssh login.
        let mut home = Launch::new("/bin/pwd");
        home.current_dir_or_root("/no/such/home");
        assert_eq!(pwd(&mut home).await.unwrap(), "/\n");
        let mut home = Launch::new("/bin/pwd");
        home.current_dir_or_root("/tmp");
        assert_eq!(pwd(&mut home).await.unwrap(), "/tmp\n");
    }

    #[tokio::test]
    async fn a_child_that_never_reaches_its_exec_is_killed_at_the_limit() {
        // The set-up blocks on a pipe no one writes, as a child does in a
        // directory that does not answer, or stopped by its user.
        let (never, held) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let never_fd = never.as_raw_fd();
        let setup = move |_: bool| {
            let mut byte = 0u8;
            // SAFETY: a read into a local, in the child before exec.
            unsafe { libc::read(never_fd, (&mut byte as *mut u8).cast(), 1) };
            Ok(())
        };
        let null = std::fs::File::open("/dev/null").unwrap();
        let stdio = [null.as_raw_fd(); 3];
        let cmd = Launch::new("/bin/true");
        // Off the test's thread: before the watchdog, this never returned.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = launch(
                &cmd,
                stdio,
                Leader::Group,
                None,
                &setup,
                Duration::from_millis(300),
            );
            let _ = tx.send(started.map(|c| c.pid));
        });
        let started = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the start still waits for a child that never execs");
        let err = started.expect_err("a child that never exec'd was taken for started");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("did not start within 300 ms"),
            "{err}"
        );
        drop((never, held, null));
    }

    #[tokio::test]
    async fn the_child_is_told_whether_the_clone_put_it_into_its_cgroup() {
        // A v2 cgroup (where the agent can make one): the child starts in
        // it, and is told so.
        let limits = crate::agent::cgroup::CgroupLimits {
            max_procs: 0,
            max_memory: 0,
        };
        let cgroups = crate::agent::cgroup::Cgroups::detect(limits);
        let made = cgroups.as_ref().map(|c| c.create().unwrap());
        match made.as_ref().and_then(|m| m.open_v2()) {
            Some(dir) => {
                let (told, out) = run_in(Some(&dir)).await;
                let v2 = out
                    .lines()
                    .find(|l| l.starts_with("0::"))
                    .unwrap_or_default();
                if told {
                    assert!(v2.contains("/cmd-"), "told so, but it is in {v2:?}");
                } else {
                    // A kernel or filter without clone3: the fallback.
                    eprintln!("clone3 with CLONE_INTO_CGROUP is not available here");
                    assert!(!v2.contains("/cmd-"), "joined without being told: {v2:?}");
                }
            }
            None => eprintln!("SKIPPED (half): no writable v2 cgroup here"),
        }
        // Not a cgroup: the clone into it fails, the usual clone runs, and
        // the child is told to join by itself.
        let root = std::fs::File::open("/").map(OwnedFd::from).unwrap();
        let (told, out) = run_in(Some(&root)).await;
        assert!(!told, "told it was cloned into a cgroup: {out}");
        let (told, _) = run_in(None).await;
        assert!(!told);
    }
}
