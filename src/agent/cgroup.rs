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
//! Joining happens in the child between fork and exec (it writes `0` to each
//! `cgroup.procs`), so not even the first fork of a command escapes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where the cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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

/// The agent's cgroup layout, found once at start.
#[derive(Debug)]
pub(crate) struct Cgroups {
    roots: Vec<Root>,
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
    /// Finds (and prepares) the cgroups this agent may use; `None` when it
    /// can use none, so that the caller falls back.
    pub(crate) fn detect() -> Option<Cgroups> {
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
        Some(Cgroups { roots })
    }

    /// A one-line description for the agent's start-up log.
    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
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
        self.roots
            .iter()
            .any(|r| matches!(r.role, Role::V2 { pids: true, .. } | Role::V1Pids))
    }

    /// Whether a memory limit is enforced by the cgroups.
    pub(crate) fn limits_memory(&self) -> bool {
        self.roots
            .iter()
            .any(|r| matches!(r.role, Role::V2 { memory: true, .. } | Role::V1Memory))
    }

    /// Makes a fresh cgroup for one command, with its limits written.
    pub(crate) fn create(&self, limits: CgroupLimits) -> io::Result<CommandCgroup> {
        let n = NEXT_CGROUP.fetch_add(1, Ordering::Relaxed);
        let mut made = CommandCgroup {
            dirs: Vec::new(),
            join: Vec::new(),
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
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            made.join.push(procs);
        }
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
    /// The `cgroup.procs` files the child writes itself into, as C strings
    /// made before the fork (nothing may allocate between fork and exec).
    join: Vec<CString>,
}

impl CommandCgroup {
    /// Moves the calling process into this cgroup. Runs between fork and
    /// exec: only async-signal-safe system calls.
    ///
    /// # Safety
    /// Call only in the child [`super::spawn::launch`] starts, before exec.
    pub(crate) unsafe fn join_from_child(&self) -> io::Result<()> {
        for path in &self.join {
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
    /// on a blocking thread: it may wait a little.
    fn drop(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
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
    /// The agent's own directories go when it stops (its commands' are
    /// gone by then).
    fn drop(&mut self) {
        for r in &self.roots {
            let _ = std::fs::remove_dir(&r.dir);
        }
    }
}
