//! The embedded agent: `conch agent` as a child process of `conch serve`.
//!
//! It is a process of its own, not threads of the server, so that a
//! command's parent is the agent: a command cannot read the server's memory
//! or environment (the admin token) through `/proc/$PPID`, and
//! `kill $PPID` stops the agent (which the server restarts), never the
//! server. The server binds the listener itself and hands it down as file
//! descriptor 3, so that it outlives the agent's restarts: a Unix-domain
//! socket in a directory only the server's user can enter, over which the
//! link runs without TLS (the kernel keeps it on this host; the key's
//! handshake still runs), or loopback TCP with TLS where no such socket can
//! be made. The fresh key goes down a pipe on standard input,
//! never through the command line or the environment. The child's
//! environment is cleared to a short list, and it dies with the server
//! (`PR_SET_PDEATHSIG`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::agents::AgentSpec;
use crate::keyfile::Key;
use crate::link::Security;

/// The file descriptor the listening socket has in the child.
pub(crate) const LISTEN_FD: i32 = 3;

/// Environment variables the agent process keeps from the server's: what
/// logging and locales need, nothing secret.
const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "CONCH_LOG",
    "CONCH_LOG_FORMAT",
    "RUST_LOG",
];

/// Waits between restarts of an agent that keeps dying.
const RESTART_MIN: Duration = Duration::from_millis(250);
const RESTART_MAX: Duration = Duration::from_secs(5);

/// Starts the agent and a task that restarts it if it dies; returns how to
/// reach it and that task (which ends, with the agent, on `shutdown`).
/// `agent_args` are extra `conch agent` flags (command isolation).
pub(crate) async fn start(
    agent_args: Vec<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<(AgentSpec, tokio::task::JoinHandle<()>)> {
    let (listener, addr, security, dir) = match local_listener() {
        Ok((listener, path, dir)) => (listener, path, Security::Local, Some(dir)),
        Err(e) => {
            warn!(error = %e, "cannot make the embedded agent's Unix socket; it listens on loopback TCP with TLS instead");
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?.to_string();
            (listener.into(), addr, Security::Tls, None)
        }
    };
    let key = Key::generate();
    let exe = std::env::current_exe()?;
    let first = spawn(&exe, &agent_args, &listener, &key).await?;
    info!(%addr, pid = first.id(), "embedded agent started");
    let spec = AgentSpec {
        name: "local".into(),
        addr: Some(addr),
        key: key.clone(),
        security,
        labels: Default::default(),
    };
    let task = tokio::spawn(async move {
        // The socket's directory is removed when the agent is no more.
        let _dir = dir;
        let mut child = Some(first);
        let mut backoff = RESTART_MIN;
        loop {
            if let Some(running) = child.as_mut() {
                let started = tokio::time::Instant::now();
                tokio::select! {
                    status = running.wait() => {
                        error!(status = ?status.ok(), "the embedded agent exited; restarting it");
                    }
                    _ = shutdown.cancelled() => {
                        stop(running).await;
                        return;
                    }
                }
                // A run that lasted resets the backoff: it was no crash loop.
                if started.elapsed() > RESTART_MAX * 4 {
                    backoff = RESTART_MIN;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(RESTART_MAX);
            // Keep trying: a replaced binary or a failed spawn may pass.
            child = match spawn(&exe, &agent_args, &listener, &key).await {
                Ok(c) => {
                    info!(pid = c.id(), "embedded agent restarted");
                    Some(c)
                }
                Err(e) => {
                    error!(error = %e, "cannot restart the embedded agent; retrying");
                    None
                }
            };
        }
    });
    Ok((spec, task))
}

/// A listening Unix-domain socket, `agent.sock` in a new directory of the
/// temporary directory that only this user can enter (mode 0700): no other
/// user can connect to it, and none can read the link. Returns the socket,
/// its path and the directory (removed when dropped).
fn local_listener() -> std::io::Result<(OwnedFd, String, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("conch-agent-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()?;
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let path = path
        .into_os_string()
        .into_string()
        .map_err(|_| std::io::Error::other("the temporary directory's path is not UTF-8"))?;
    Ok((listener.into(), path, dir))
}

/// SIGTERM, so that the agent kills its commands; SIGKILL if it lingers.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(6), child.wait())
        .await
        .is_err()
    {
        warn!("the embedded agent did not stop in time; killing it");
        let _ = child.kill().await;
    }
}

async fn spawn(
    exe: &std::path::Path,
    agent_args: &[String],
    listener: &OwnedFd,
    key: &Key,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("--listen-fd")
        .arg(LISTEN_FD.to_string())
        .arg("--key-file")
        .arg("-")
        .args(agent_args)
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy();
            KEPT_ENV.contains(&k.as_ref()) || k.starts_with("LC_")
        }))
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let fd = listener.as_raw_fd();
    // SAFETY: dup2, fcntl and prctl are async-signal-safe; `fd` stays open
    // in the parent for the duration of the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if fd == LISTEN_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the server dies, so does its agent (which then ends its
            // commands as on any SIGTERM).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no pipe to the embedded agent"))?;
    stdin.write_all(key.as_bytes()).await?;
    stdin.shutdown().await?;
    drop(stdin);
    Ok(child)
}
