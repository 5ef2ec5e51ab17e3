//! What a command starts with: its user, its environment, its limits and
//! its cgroup, decided once at the agent's start and applied to each
//! command between fork and exec.
//!
//! A command must never see the agent's (or the server's) own secrets, nor
//! be able to take the agent down with it:
//! - its environment is built from nothing: a short documented list taken
//!   from the agent's user (PATH, HOME, USER, LOGNAME, SHELL, LANG, LC_*,
//!   TZ), TERM for a terminal, then what the request sets;
//! - with `--run-as USER` (the agent running as root) it runs as that user,
//!   with that user's groups;
//! - it gets process, memory and open-file limits, enforced by its cgroup
//!   where the agent can make one ([`super::cgroup`]), else by rlimits;
//! - where no cgroup can be made, the agent marks the command's processes
//!   with an environment variable ([`MARK_VAR`]) and kills every process
//!   carrying the mark, so that one which left its process group and session
//!   is still found (unless it also cleared its environment).

use std::ffi::{CString, OsString};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

use super::cgroup::{CgroupLimits, Cgroups, CommandCgroup};

/// The environment variable that marks a command's processes when no
/// cgroup can hold them (fallback mode only).
pub(crate) const MARK_VAR: &str = "CONCH_COMMAND_MARK";

/// The next mark's number: one counter for the whole process, so that
/// two agents in one process (the in-process tests) never share a mark.
static NEXT_MARK: AtomicU64 = AtomicU64::new(1);

/// The PATH a command gets when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Limits on each command, from the agent's flags (0 = none).
#[derive(Debug, Clone, Copy)]
pub struct CommandLimits {
    /// Processes (and threads) of one command at once.
    pub max_procs: u64,
    /// Memory of one command in bytes (cgroup), or its address space
    /// (rlimit fallback, only when `memory_explicit`).
    pub max_memory: u64,
    /// Whether `max_memory` was given (not the default): only then is it
    /// applied as an address-space rlimit where no cgroup can hold it,
    /// since programs that reserve much address space (JVMs, sanitizers)
    /// would fail under a default one.
    pub memory_explicit: bool,
    /// Open files per process (the hard limit; the soft one starts at 1024).
    pub max_open_files: u64,
    /// How long a child may take from its clone to its exec before it is
    /// killed (see [`super::spawn::launch`]).
    pub start_timeout: std::time::Duration,
}

/// How commands are isolated from each other and from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupMode {
    /// Use cgroups where the agent can create them, else fall back.
    Auto,
    /// Never use cgroups (process groups, sessions, marks and rlimits only).
    Off,
}

/// The user commands run as.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<libc::gid_t>,
    pub(crate) home: PathBuf,
    pub(crate) shell: PathBuf,
    /// Whether the agent must switch to this user (it runs as someone else).
    switch: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no user named {0:?} on this host")]
    NoUser(String),
    #[error("--run-as {0} needs the agent to run as root (it runs as uid {1})")]
    NotRoot(String, u32),
    #[error("cannot look up user {0:?}: {1}")]
    Lookup(String, String),
}

impl RunAs {
    /// Resolves `name` (or, without one, the agent's own user).
    pub(crate) fn resolve(name: Option<&str>) -> Result<RunAs, SandboxError> {
        use nix::unistd::{User, geteuid, getgrouplist};
        let me = geteuid();
        let user = match name {
            Some(n) => User::from_name(n)
                .map_err(|e| SandboxError::Lookup(n.into(), e.to_string()))?
                .ok_or_else(|| SandboxError::NoUser(n.into()))?,
            None => User::from_uid(me)
                .map_err(|e| SandboxError::Lookup(me.to_string(), e.to_string()))?
                .ok_or_else(|| SandboxError::NoUser(format!("uid {me}")))?,
        };
        let switch = user.uid != me;
        if switch && !me.is_root() {
            return Err(SandboxError::NotRoot(user.name, me.as_raw()));
        }
        let groups = if switch {
            let cname = CString::new(user.name.clone())
                .map_err(|e| SandboxError::Lookup(user.name.clone(), e.to_string()))?;
            getgrouplist(&cname, user.gid)
                .map_err(|e| SandboxError::Lookup(user.name.clone(), e.to_string()))?
                .into_iter()
                .map(|g| g.as_raw())
                .collect()
        } else {
            Vec::new()
        };
        // The agent's own user keeps the shell its login chose ($SHELL);
        // another user gets the one of their password entry.
        let shell = match std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
            Some(shell) if !switch => PathBuf::from(shell),
            _ => user.shell,
        };
        Ok(RunAs {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
            shell,
            switch,
        })
    }
}

/// Everything decided once about how commands start.
#[derive(Debug)]
pub struct ExecPolicy {
    pub(crate) run_as: RunAs,
    pub(crate) limits: CommandLimits,
    cgroups: Option<Cgroups>,
    /// The environment every command starts from.
    base_env: Vec<(OsString, OsString)>,
    /// The program run as the file helper (`put`, `get`): this binary.
    file_helper: PathBuf,
}

impl ExecPolicy {
    /// Tests: commands as this process's user, no cgroups, no limits but
    /// the open files a spawn needs (and no `PATH`: absolute programs).
    #[cfg(test)]
    pub(crate) fn for_tests() -> ExecPolicy {
        let limits = CommandLimits {
            max_procs: 0,
            max_memory: 0,
            memory_explicit: false,
            max_open_files: 1024,
            start_timeout: std::time::Duration::from_secs(30),
        };
        ExecPolicy::new(None, limits, CgroupMode::Off).expect("a policy without a user or cgroups")
    }

    /// Builds the policy and logs how commands will be isolated.
    pub fn new(
        run_as: Option<&str>,
        limits: CommandLimits,
        cgroups: CgroupMode,
    ) -> Result<ExecPolicy, SandboxError> {
        let run_as = RunAs::resolve(run_as)?;
        let cgroups = match cgroups {
            CgroupMode::Auto => Cgroups::detect(CgroupLimits {
                max_procs: limits.max_procs,
                max_memory: limits.max_memory,
            }),
            CgroupMode::Off => None,
        };
        let mut limits = limits;
        // Raising a hard limit takes CAP_SYS_RESOURCE, which even root may
        // lack (in a container): commands get at most the agent's own.
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .unwrap_or((1024, 1024));
        limits.max_open_files = limits.max_open_files.min(hard);
        match &cgroups {
            Some(c) => info!(
                cgroups = %c.describe(),
                procs_limit = if c.limits_procs() { "cgroup" } else { "rlimit (per user)" },
                memory_limit = if c.limits_memory() { "cgroup" } else { "rlimit (address space)" },
                "commands are isolated in cgroups: every process a command starts is killed with it"
            ),
            None => warn!(
                mark = MARK_VAR,
                "no cgroup can be made: commands are tracked by process group, session and an \
                 environment mark, with rlimits; a process that leaves its session and clears \
                 its environment can outlive its command"
            ),
        }
        if run_as.switch {
            info!(user = %run_as.name, uid = run_as.uid, "commands run as this user");
        } else if run_as.uid == 0 {
            warn!(
                "commands run as root: every operator controls this host, the agent and, \
                 on the same host, the server and its secrets; give --run-as USER"
            );
        }
        let base_env = base_env(&run_as);
        // Taken now: a binary replaced later (an upgrade) is found by name.
        let file_helper =
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        Ok(ExecPolicy {
            run_as,
            limits,
            cgroups,
            base_env,
            file_helper,
        })
    }

    /// The program that reads and writes files for `get` and `put`: a
    /// `conch` binary (another than this process's own in the tests, whose
    /// agents run inside a test program).
    pub fn set_file_helper(&mut self, program: PathBuf) {
        self.file_helper = program;
    }

    pub(crate) fn file_helper(&self) -> &std::path::Path {
        &self.file_helper
    }

    /// What one command starts with.
    pub(crate) fn prepare(&self, pty: bool) -> io::Result<Prepared> {
        let mut env = self.base_env.clone();
        if pty {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
        let cgroup = match &self.cgroups {
            Some(c) => Some(Arc::new(c.create()?)),
            None => None,
        };
        let mark = if cgroup.is_none() {
            let mark = format!(
                "{}.{}",
                std::process::id(),
                NEXT_MARK.fetch_add(1, Ordering::Relaxed)
            );
            Some(mark)
        } else {
            None
        };
        let procs_by_rlimit = !self.cgroups.as_ref().is_some_and(Cgroups::limits_procs);
        let memory_by_rlimit = !self.cgroups.as_ref().is_some_and(Cgroups::limits_memory);
        let mut rlimits = vec![(
            libc::RLIMIT_NOFILE,
            self.limits.max_open_files.min(1024),
            self.limits.max_open_files,
        )];
        if procs_by_rlimit && self.limits.max_procs > 0 {
            rlimits.push((
                libc::RLIMIT_NPROC,
                self.limits.max_procs,
                self.limits.max_procs,
            ));
        }
        if memory_by_rlimit && self.limits.memory_explicit && self.limits.max_memory > 0 {
            rlimits.push((
                libc::RLIMIT_AS,
                self.limits.max_memory,
                self.limits.max_memory,
            ));
        }
        Ok(Prepared {
            env,
            cgroup,
            mark,
            rlimits,
            dir: None,
            dir_or_root: false,
            start_timeout: self.limits.start_timeout,
            creds: self.run_as.switch.then(|| Creds {
                uid: self.run_as.uid,
                gid: self.run_as.gid,
                groups: self.run_as.groups.clone(),
            }),
        })
    }

    /// The directory commands start in by default: the user's home, as
    /// after an ssh login (`/` when the child cannot enter it). Not
    /// checked here: the child enters it, under the start timeout.
    pub(crate) fn home(&self) -> PathBuf {
        self.run_as.home.clone()
    }

    /// The user's login shell.
    pub(crate) fn shell(&self) -> PathBuf {
        if self.run_as.shell.as_os_str().is_empty() {
            PathBuf::from("/bin/sh")
        } else {
            self.run_as.shell.clone()
        }
    }
}

/// The documented starting environment (see the module's doc).
fn base_env(user: &RunAs) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        (
            "PATH".into(),
            std::env::var_os("PATH")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| DEFAULT_PATH.into()),
        ),
        ("HOME".into(), user.home.clone().into_os_string()),
        ("USER".into(), user.name.clone().into()),
        ("LOGNAME".into(), user.name.clone().into()),
        ("SHELL".into(), user.shell.clone().into_os_string()),
    ];
    for (key, value) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k == "LANG" || k == "LANGUAGE" || k == "TZ" || k.starts_with("LC_") {
            env.push((key, value));
        }
    }
    env
}

/// Credentials to switch to in the child.
#[derive(Debug, Clone)]
struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// One command's start-up state, made before the fork.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cgroup: Option<Arc<CommandCgroup>>,
    /// The fallback mark (see [`MARK_VAR`]).
    pub(crate) mark: Option<String>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    creds: Option<Creds>,
    /// With `creds`: the directory the child enters after switching user,
    /// and the start of the message it prints if it cannot.
    dir: Option<(CString, Vec<u8>)>,
    /// The directory is the user's home, asked for by no one: `/` when
    /// it cannot be entered, as after an ssh login.
    dir_or_root: bool,
    /// How long the child may take to reach its exec.
    pub(crate) start_timeout: std::time::Duration,
}

impl Prepared {
    /// Joins the cgroup (its v2 hierarchy only if `in_cgroup` says the
    /// clone did not already) and sets the rlimits. Between clone and exec,
    /// before the credentials change (a cgroup is joined as the agent's
    /// user).
    ///
    /// # Safety
    /// Call only in the child [`super::spawn::launch`] starts, before exec.
    pub(crate) unsafe fn enter(&self, in_cgroup: bool) -> io::Result<()> {
        if let Some(cg) = &self.cgroup {
            // SAFETY: forwarded from this function's contract (the child
            // has one thread).
            unsafe { cg.join_from_child(in_cgroup)? };
        }
        for &(resource, soft, hard) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe; `lim` is valid.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Switches to the command's user, if it is not the agent's. Last step
    /// before exec.
    ///
    /// # Safety
    /// Call only in the child [`super::spawn::launch`] starts, before exec.
    pub(crate) unsafe fn drop_privileges(&self) -> io::Result<()> {
        let Some(c) = &self.creds else { return Ok(()) };
        // Raw system calls, not glibc's wrappers: those would signal every
        // thread of the agent, whose memory the child still shares (see
        // `spawn`), to change theirs too. In the child they change only
        // the child. The group list was built before the clone.
        // SAFETY: setgroups/setgid/setuid change only this process's ids.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setgid, c.gid) != 0
                || libc::syscall(libc::SYS_setuid, c.uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The child still shares the agent's memory, and a change of
            // user made it as dumpable as `fs.suid_dumpable` says: with 1,
            // the user could attach to it before exec and so write into the
            // agent. The agent is undumpable; this makes it so again.
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
            // Make sure there is no way back.
            if libc::syscall(libc::SYS_setuid, 0) == 0 && c.uid != 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            // The working directory, with the user's own rights; a failure
            // is the command's (exit 126 and a line on its stderr, as for
            // any cwd), not a failure to start it.
            if let Some((dir, prefix)) = &self.dir
                && libc::chdir(dir.as_ptr()) != 0
                && !(self.dir_or_root && libc::chdir(c"/".as_ptr()) == 0)
            {
                let reason: &[u8] = match *libc::__errno_location() {
                    libc::ENOENT => b"No such file or directory\n",
                    libc::EACCES => b"Permission denied\n",
                    libc::ENOTDIR => b"Not a directory\n",
                    libc::ELOOP => b"Too many levels of symbolic links\n",
                    libc::ENAMETOOLONG => b"File name too long\n",
                    libc::EIO => b"Input/output error\n",
                    libc::ESTALE => b"Stale file handle\n",
                    _ => b"cannot enter this directory\n",
                };
                libc::write(2, prefix.as_ptr().cast(), prefix.len());
                libc::write(2, reason.as_ptr().cast(), reason.len());
                libc::_exit(126);
            }
        }
        Ok(())
    }

    /// Whether the command runs as another user than the agent.
    pub(crate) fn switches_user(&self) -> bool {
        self.creds.is_some()
    }

    /// Has the child enter `dir` after switching user (see
    /// [`Prepared::drop_privileges`]).
    pub(crate) fn enter_dir_as_user(
        &mut self,
        dir: &std::path::Path,
        or_root: bool,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
        let mut prefix = b"conch: cd ".to_vec();
        prefix.extend_from_slice(dir.as_os_str().as_bytes());
        prefix.extend_from_slice(b": ");
        self.dir = Some((c, prefix));
        self.dir_or_root = or_root;
        Ok(())
    }

    /// The uid a PTY's slave should belong to (as login(1) does).
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.creds.as_ref().map(|c| (c.uid, c.gid))
    }
}

/// The environment entries (`MARK_VAR=mark`) that carry `marks`, for
/// [`carries_mark`].
pub(crate) fn mark_entries(marks: &[String]) -> std::collections::HashSet<Vec<u8>> {
    marks
        .iter()
        .map(|mark| format!("{MARK_VAR}={mark}").into_bytes())
        .collect()
}

/// Whether process `pid`, not this one, carries one of `entries` in its
/// environment (fallback tracking; reads `/proc/PID/environ`).
pub(crate) fn carries_mark(pid: i32, entries: &std::collections::HashSet<Vec<u8>>) -> bool {
    pid != std::process::id() as i32
        && std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|environ| environ.split(|b| *b == 0).any(|var| entries.contains(var)))
}

/// Makes this process undumpable: other processes of the same user (the
/// commands it runs, among them) can then neither read its memory or
/// environment through `/proc` nor attach a debugger to it.
pub fn make_undumpable() {
    // SAFETY: prctl(PR_SET_DUMPABLE) changes only this process's flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot make this process undumpable");
    }
}

/// Three quarters of the host's memory: the default memory limit of one
/// command, so that a runaway command meets its own cgroup's OOM killer
/// before the host's (which might pick the agent or the server).
pub fn default_memory_limit() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    total_kib * 1024 / 4 * 3
}
