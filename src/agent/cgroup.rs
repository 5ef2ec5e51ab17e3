//! A control group per command, where the agent can make one.
//!
//! A process group or a session is something a process can leave
//! (`setsid`, `setpgid`): a daemon started by a command would survive the
//! command's timeout, close or disconnect. A cgroup cannot be left by an
//! unprivileged process, so every process a command starts stays in its
//! cgroup, and killing the cgroup kills them all. The same cgroup carries
//! the command's process and memory limits (`pids.max`, `memory.max`).
//!
//! Three layouts are found in practice, and each is used as it is:
//! - **pure cgroup v2** (`/sys/fs/cgroup/cgroup.controllers` exists): one
//!   directory per command under the agent's own cgroup. Limits need the
//!   `pids`/`memory` controllers delegated to the agent's cgroup (systemd
//!   `Delegate=yes`); without them the cgroup still tracks and kills, and the
//!   limits fall back to rlimits;
//! - **hybrid** (v1 controllers plus a v2 hierarchy at
//!   `/sys/fs/cgroup/unified`): the v2 hierarchy tracks and kills, the v1
//!   `pids` and `memory` hierarchies hold the limits;
//! - **none writable** (an unprivileged agent, a locked container): no
//!   cgroups; see [`super::sandbox`] for the fallback.
//!
//! Joining happens before the command's first instruction, so not even its
//! first fork escapes: the child is cloned straight into its v2 cgroup
//! (`CLONE_INTO_CGROUP`, see [`super::spawn`]) where the kernel allows, and
//! writes `0` into the v1 hierarchies' `tasks` (and, where the clone could
//! not, into the v2 `cgroup.procs`) between clone and exec.
//!
//! Why not `cgroup.procs` everywhere: moving a whole process takes the
//! kernel's global threadgroup lock for writing, which waits for an RCU
//! grace period unless another move happened within the last one. After
//! a pause of 50 ms or more every command paid it: 5 to 13 ms per
//! hierarchy on the 2-core test machine, so a command typed after a pause
//! took 8 to 16 ms where one right after another took 3. Moving only the
//! calling thread (`tasks`; the child has one thread) skips that lock on
//! recent kernels (measured on 6.18: 0.1 ms against 5 to 13 ms; older ones
//! may still take it), and cloning into the cgroup takes it only to read.
//!
//! Making a cgroup (a directory in each hierarchy, its limits written) is
//! kernel work a command would wait for before it starts: about a third of
//! the agent's own time for a short command on a hybrid layout. A few are
//! therefore made ahead, off the async workers, and a command takes a ready
//! one; each is still used by one command only and removed after it.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

/// Where the cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How many command cgroups are kept made ahead of need (empty, with their
/// limits written): enough for a burst of a few commands at once; a command
/// that finds none makes its own as before.
pub(crate) const SPARE_CGROUPS: usize = 4;

/// What a hierarchy directory is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A v2 hierarchy: membership and kill; limits too when `pids`/`memory`
    /// are among the controllers its children get.
    V2 { pids: bool, memory: bool },
    /// A v1 `pids` hierarchy: `pids.max`.
    V1Pids,
    /// A v1 `memory` hierarchy: `memory.limit_in_bytes`.
    V1Memory,
}

#[derive(Debug)]
struct Root {
    /// The directory under which each command gets a cgroup of its own.
    dir: PathBuf,
    role: Role,
}

/// The agent's cgroup layout, found once at start, and the command
/// cgroups made ahead in it.
#[derive(Debug)]
pub(crate) struct Cgroups {
    layout: Arc<Layout>,
}

#[derive(Debug)]
struct Layout {
    roots: Vec<Root>,
    /// The same for every command: the agent's flags.
    limits: CgroupLimits,
    spares: Mutex<Spares>,
    /// Signalled when a refill job ends.
    refill_done: Condvar,
}

#[derive(Debug, Default)]
struct Spares {
    /// At most [`SPARE_CGROUPS`], never joined by any process.
    ready: Vec<CommandCgroup>,
    /// A job making more is under way (at most one at a time).
    refilling: bool,
    /// The agent is stopping: nothing more is made, and what a job still
    /// makes is removed at once.
    closed: bool,
}

/// Limits written into each command's cgroup (0 = none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CgroupLimits {
    pub(crate) max_procs: u64,
    pub(crate) max_memory: u64,
}

/// The next command cgroup's number: one counter for the whole process,
/// so that two agents in one process never share a cgroup.
static NEXT_CGROUP: AtomicU64 = AtomicU64::new(1);

impl Cgroups {
    /// Finds (and prepares) the cgroups this agent may use, for commands
    /// with these limits; `None` when it can use none, so that the caller
    /// falls back.
    pub(crate) fn detect(limits: CgroupLimits) -> Option<Cgroups> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let pid = std::process::id();
        let mut roots = Vec::new();
        let pure_v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
        for line in own.lines() {
            // "ID:CONTROLLERS:PATH"; v2 is "0::PATH".
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if id == "0" && controllers.is_empty() {
                let mount = if pure_v2 {
                    PathBuf::from(CGROUP_ROOT)
                } else {
                    Path::new(CGROUP_ROOT).join("unified")
                };
                if let Some(root) = prepare_v2(&mount.join(rel), pid) {
                    roots.push(root);
                }
            } else if !pure_v2 {
                let role = match controllers
                    .split(',')
                    .find(|c| *c == "pids" || *c == "memory")
                {
                    Some("pids") => Role::V1Pids,
                    Some("memory") => Role::V1Memory,
                    _ => continue,
                };
                let name = if role == Role::V1Pids {
                    "pids"
                } else {
                    "memory"
                };
                let parent = Path::new(CGROUP_ROOT).join(name).join(rel);
                remove_stale(&parent);
                let dir = parent.join(format!("conch-{pid}"));
                if std::fs::create_dir(&dir).is_ok() || dir.is_dir() {
                    roots.push(Root { dir, role });
                }
            }
        }
        // Without a v2 hierarchy there is no reliable kill: the v1 pids
        // hierarchy can list members, which is enough, so keep it.
        let tracks = roots
            .iter()
            .any(|r| matches!(r.role, Role::V2 { .. } | Role::V1Pids));
        if !tracks {
            for r in &roots {
                let _ = std::fs::remove_dir(&r.dir);
            }
            return None;
        }
        Some(Cgroups {
            layout: Arc::new(Layout {
                roots,
                limits,
                spares: Mutex::default(),
                refill_done: Condvar::new(),
            }),
        })
    }

    /// A one-line description for the agent's start-up log.
    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .layout
            .roots
            .iter()
            .map(|r| match r.role {
                Role::V2 { pids, memory } => format!(
                    "v2 at {} (kill{}{})",
                    r.dir.display(),
                    if pids { ", pids.max" } else { "" },
                    if memory { ", memory.max" } else { "" }
                ),
                Role::V1Pids => format!("v1 pids at {}", r.dir.display()),
                Role::V1Memory => format!("v1 memory at {}", r.dir.display()),
            })
            .collect();
        parts.join("; ")
    }

    /// Whether a process limit is enforced by the cgroups.
    pub(crate) fn limits_procs(&self) -> bool {
        self.layout
            .roots
            .iter()
            .any(|r| matches!(r.role, Role::V2 { pids: true, .. } | Role::V1Pids))
    }

    /// Whether a memory limit is enforced by the cgroups.
    pub(crate) fn limits_memory(&self) -> bool {
        self.layout
            .roots
            .iter()
            .any(|r| matches!(r.role, Role::V2 { memory: true, .. } | Role::V1Memory))
    }

    /// A fresh cgroup for one command, with its limits written: one made
    /// ahead when there is one, else made now. More are made after a
    /// command's cgroup is removed, on the same blocking thread, so that a
    /// command that is starting does not wait for them (both take the
    /// kernel's cgroup lock for a moment).
    pub(crate) fn create(&self) -> io::Result<CommandCgroup> {
        let spare = self.layout.lock().ready.pop();
        match spare {
            // A command of the agent's own user (no `--run-as`) could have
            // written a process into a spare: such a one is killed and
            // removed (its drop), never handed on.
            Some(made) if made.is_unused() => Ok(made),
            _ => self.layout.make(),
        }
    }

    /// How many cgroups wait made ahead, once no job is making more (for
    /// the tests).
    #[cfg(test)]
    fn settled_spares(&self) -> Option<usize> {
        let spares = self.layout.lock();
        (!spares.refilling).then_some(spares.ready.len())
    }
}

impl Layout {
    fn lock(&self) -> MutexGuard<'_, Spares> {
        self.spares.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends a refill job (the agent's stop waits for that).
    fn refilled(&self, mut spares: MutexGuard<'_, Spares>) {
        spares.refilling = false;
        drop(spares);
        self.refill_done.notify_all();
    }

    /// Makes cgroups until [`SPARE_CGROUPS`] are ready, unless another
    /// thread is at it. A failure (the host's cgroup limit, say) stops it
    /// quietly: the next command makes its own and reports the error.
    fn refill(self: &Arc<Self>) {
        {
            let mut spares = self.lock();
            if spares.refilling || spares.closed {
                return;
            }
            spares.refilling = true;
        }
        loop {
            {
                let spares = self.lock();
                if spares.closed || spares.ready.len() >= SPARE_CGROUPS {
                    return self.refilled(spares);
                }
            }
            let made = match self.make() {
                Ok(made) => made,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot make a command cgroup ahead");
                    return self.refilled(self.lock());
                }
            };
            let mut spares = self.lock();
            if spares.closed {
                drop(spares);
                made.remove_unused();
                return self.refilled(self.lock());
            }
            spares.ready.push(made);
        }
    }

    /// Makes a fresh cgroup for one command, with its limits written.
    fn make(self: &Arc<Self>) -> io::Result<CommandCgroup> {
        let limits = self.limits;
        let n = NEXT_CGROUP.fetch_add(1, Ordering::Relaxed);
        let mut made = CommandCgroup {
            dirs: Vec::new(),
            join: Vec::new(),
            v2: None,
            // Set once it is whole: a half-made cgroup's removal must not
            // start making more (which could fail the same way, again).
            layout: Weak::new(),
        };
        for root in &self.roots {
            let dir = root.dir.join(format!("cmd-{n}"));
            std::fs::create_dir(&dir)?;
            made.dirs.push((dir.clone(), root.role));
            match root.role {
                Role::V2 { pids, memory } => {
                    if pids && limits.max_procs > 0 {
                        std::fs::write(dir.join("pids.max"), limits.max_procs.to_string())?;
                    }
                    if memory && limits.max_memory > 0 {
                        std::fs::write(dir.join("memory.max"), limits.max_memory.to_string())?;
                        // No swap to hide in: the limit is the limit.
                        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    }
                }
                Role::V1Pids if limits.max_procs > 0 => {
                    std::fs::write(dir.join("pids.max"), limits.max_procs.to_string())?;
                }
                Role::V1Memory if limits.max_memory > 0 => {
                    std::fs::write(
                        dir.join("memory.limit_in_bytes"),
                        limits.max_memory.to_string(),
                    )?;
                }
                _ => {}
            }
            let c_path = |p: PathBuf| {
                CString::new(p.into_os_string().into_vec())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            };
            match root.role {
                Role::V2 { .. } => {
                    made.v2 = Some((c_path(dir.clone())?, c_path(dir.join("cgroup.procs"))?))
                }
                Role::V1Pids | Role::V1Memory => made.join.push(c_path(dir.join("tasks"))?),
            }
        }
        made.layout = Arc::downgrade(self);
        Ok(made)
    }
}

/// Creates `own/conch-PID` in a v2 hierarchy and, when the controllers can
/// be had, enables `pids` and `memory` for the commands under it.
fn prepare_v2(own: &Path, pid: u32) -> Option<Root> {
    remove_stale(own);
    let dir = own.join(format!("conch-{pid}"));
    if std::fs::create_dir(&dir).is_err() && !dir.is_dir() {
        return None;
    }
    // Controllers are delegated to a child only if its parent lists them in
    // `cgroup.subtree_control`; a cgroup with processes of its own cannot do
    // that (the "no internal processes" rule), so this succeeds only where
    // the agent was given a delegated subtree (or runs in the root cgroup).
    let available = std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted = |c: &str| {
        available.split_whitespace().any(|a| a == c)
            || std::fs::write(own.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
    };
    let (pids, memory) = (wanted("pids"), wanted("memory"));
    let enable = |c: &str, on: bool| {
        on && std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
    };
    let role = Role::V2 {
        pids: enable("pids", pids),
        memory: enable("memory", memory),
    };
    Some(Root { dir, role })
}

/// One command's cgroups (one directory per hierarchy).
#[derive(Debug)]
pub(crate) struct CommandCgroup {
    dirs: Vec<(PathBuf, Role)>,
    /// The v1 `tasks` files the child writes itself into, as C strings
    /// made before the clone (nothing may allocate between clone and exec).
    join: Vec<CString>,
    /// The v2 cgroup: its directory (to clone into) and its `cgroup.procs`
    /// (to write into when the clone could not).
    v2: Option<(CString, CString)>,
    /// Where to make the next spare once this one is removed.
    layout: Weak<Layout>,
}

impl CommandCgroup {
    /// The v2 cgroup's directory, opened for the clone to put the child in
    /// (`None` without a v2 hierarchy, or if it cannot be opened: the child
    /// then writes itself in).
    pub(crate) fn open_v2(&self) -> Option<OwnedFd> {
        let (dir, _) = self.v2.as_ref()?;
        // SAFETY: open(2) of a NUL-terminated path; the descriptor returned
        // is owned by nothing else.
        let fd = unsafe {
            libc::open(
                dir.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: a fresh descriptor, when not negative.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Moves the calling process into this cgroup (into its v2 hierarchy
    /// too unless `in_v2` says the clone put it there). Runs between clone
    /// and exec: only async-signal-safe system calls.
    ///
    /// # Safety
    /// Call only in the child [`super::spawn::launch`] starts, before exec,
    /// while it has one thread.
    pub(crate) unsafe fn join_from_child(&self, in_v2: bool) -> io::Result<()> {
        let v2_procs = self.v2.as_ref().filter(|_| !in_v2).map(|(_, procs)| procs);
        for path in self.join.iter().chain(v2_procs) {
            // SAFETY: open/write/close are async-signal-safe; `path` is a
            // valid NUL-terminated string that outlives the call.
            // Raw system calls: glibc's wrappers are cancellation points,
            // which touch the state of the agent's thread the child shares.
            unsafe {
                let fd = libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1usize);
                libc::syscall(libc::SYS_close, fd);
                if written != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs every process in the cgroup: `cgroup.kill` where the kernel
    /// has it (5.14+), else each member listed in `cgroup.procs` until none
    /// is left (bounded: a fork bomb is bounded by `pids.max`).
    pub(crate) fn kill(&self) {
        kill_all(&self.dirs);
    }

    /// Whether no process is in it (a spare a process was written into is
    /// not).
    fn is_unused(&self) -> bool {
        self.dirs.iter().all(|(dir, _)| members(dir).is_empty())
    }

    /// Removes the directories of a cgroup no process ever joined, now,
    /// rather than on a blocking thread as a drop does (which a spare that
    /// a process was written into gets: its processes are killed first).
    fn remove_unused(mut self) {
        if !self.is_unused() {
            return;
        }
        for (dir, _) in std::mem::take(&mut self.dirs) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a spare cgroup");
            }
        }
    }
}

fn kill_all(dirs: &[(PathBuf, Role)]) {
    for (dir, role) in dirs {
        if matches!(role, Role::V2 { .. }) && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
    }
    for (dir, role) in dirs {
        if matches!(role, Role::V2 { .. } | Role::V1Pids) {
            for _ in 0..100 {
                let pids = members(dir);
                if pids.is_empty() {
                    return;
                }
                for pid in pids {
                    // SAFETY: kill(2) with a pid read from the cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            return;
        }
    }
}

impl Drop for CommandCgroup {
    /// Kills what is left and removes the directories once they are empty
    /// (killed processes leave their cgroup as they exit, a moment later),
    /// on a blocking thread: it may wait a little. Then, on that thread,
    /// cgroups are made ahead for the commands to come.
    fn drop(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
        let layout = std::mem::take(&mut self.layout);
        let work = move || {
            kill_all(&dirs);
            for _ in 0..250 {
                if dirs.iter().all(|(dir, _)| members(dir).is_empty()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for (dir, _) in &dirs {
                if let Err(e) = std::fs::remove_dir(dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a command's cgroup");
                }
            }
            if let Some(layout) = layout.upgrade() {
                layout.refill();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}

/// Removes the (empty) cgroups of agents that died without cleaning up:
/// `conch-PID` directories whose process is gone.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("conch-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten() {
                if child.path().is_dir() {
                    kill_all(&[(child.path(), Role::V1Pids)]);
                    let _ = std::fs::remove_dir(child.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for Cgroups {
    /// The agent's own directories go when it stops, with the cgroups made
    /// ahead (its commands' are gone by then), once a job making more has
    /// seen the stop (waited for up to 2 s; past that, what it still makes
    /// stays until the next agent's start removes it as stale).
    fn drop(&mut self) {
        let ready = {
            let mut spares = self.layout.lock();
            spares.closed = true;
            if spares.refilling {
                spares = self
                    .layout
                    .refill_done
                    .wait_timeout_while(spares, Duration::from_secs(2), |s| s.refilling)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::take(&mut spares.ready)
        };
        for made in ready {
            made.remove_unused();
        }
        for r in &self.layout.roots {
            let _ = std::fs::remove_dir(&r.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directories of one command cgroup.
    fn dirs(made: &CommandCgroup) -> Vec<PathBuf> {
        made.dirs.iter().map(|(dir, _)| dir.clone()).collect()
    }

    /// Waits (bounded) until `done` holds, checking every few milliseconds.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("not within 10 s: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cgroups_made_ahead_are_fresh_limited_and_removed_with_the_agent() {
        let limits = CgroupLimits {
            max_procs: 77,
            max_memory: 96 << 20,
        };
        let Some(cgroups) = Cgroups::detect(limits) else {
            eprintln!("SKIPPED: no writable cgroups here");
            return;
        };
        // None is made ahead before a command's cgroup is removed.
        let first = cgroups.create().expect("a command cgroup");
        let first_dirs = dirs(&first);
        assert_eq!(cgroups.settled_spares(), Some(0));
        drop(first);
        let settled = || cgroups.settled_spares() == Some(SPARE_CGROUPS);
        until("the spares are made", settled).await;
        assert!(first_dirs.iter().all(|dir| !dir.exists()));
        let spare_dirs: Vec<PathBuf> = {
            let spares = cgroups.layout.lock();
            spares.ready.iter().flat_map(dirs).collect()
        };
        // A process written into the spare next in line (as a command of
        // the agent's own user could): that spare is not handed on, and
        // the process is killed.
        let mut intruder = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let next_in_line = {
            let spares = cgroups.layout.lock();
            let spare = spares.ready.last().expect("a spare");
            // The hierarchy that tracks the command (v2 where there is one).
            let tracking = spare
                .dirs
                .iter()
                .find(|(_, role)| matches!(role, Role::V2 { .. }))
                .unwrap_or(&spare.dirs[0]);
            tracking.0.clone()
        };
        std::fs::write(next_in_line.join("cgroup.procs"), intruder.id().to_string())
            .expect("moved into the spare");
        // Taking more than are ready: each command still gets a cgroup of
        // its own, made ahead or made now, with the agent's limits.
        let mut taken = Vec::new();
        for _ in 0..SPARE_CGROUPS + 2 {
            taken.push(cgroups.create().expect("a command cgroup"));
        }
        let mut all: Vec<PathBuf> = taken.iter().flat_map(dirs).collect();
        assert!(
            !all.contains(&next_in_line),
            "a spare with a process in it was handed to a command"
        );
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "two commands were given one cgroup");
        for made in &taken {
            for (dir, role) in &made.dirs {
                assert!(members(dir).is_empty(), "{} is not fresh", dir.display());
                let pids = match role {
                    Role::V2 { pids: true, .. } | Role::V1Pids => dir.join("pids.max"),
                    _ => continue,
                };
                let max = std::fs::read_to_string(&pids).unwrap_or_default();
                assert_eq!(max.trim(), "77", "{}", pids.display());
            }
        }
        let mut intruder_gone = false;
        until("the intruder is killed", || {
            intruder_gone |= intruder.try_wait().ok().flatten().is_some();
            intruder_gone
        })
        .await;
        // Those commands used are removed after them, as before, and the
        // spares made again.
        drop(taken);
        until("the used cgroups are removed", || {
            spare_dirs.iter().all(|dir| !dir.exists())
        })
        .await;
        until("the spares are made again", settled).await;
        // The agent stops: the cgroups it made ahead go with it, now.
        let waiting: Vec<PathBuf> = {
            let spares = cgroups.layout.lock();
            spares.ready.iter().flat_map(dirs).collect()
        };
        assert!(!waiting.is_empty());
        drop(cgroups);
        for dir in &waiting {
            assert!(!dir.exists(), "{} is left behind", dir.display());
        }
    }
}
