//! Shared helpers for the integration tests: real `conch` processes on
//! ephemeral loopback ports, found through their structured logs.
#![allow(dead_code)]

pub mod in_process;
pub mod postgres;
pub mod ws;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use conch::keyfile::Key;

pub const BIN: &str = env!("CARGO_BIN_EXE_conch");

/// The binary the tests run: `CONCH_TEST_BIN` when set (to check that a
/// test fails against an older build), else this build's.
pub fn bin() -> String {
    std::env::var("CONCH_TEST_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// A running `conch` child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    /// Every stdout line, as it arrives.
    pub lines: mpsc::Receiver<String>,
    pub dir: tempfile::TempDir,
}

impl Drop for Proc {
    /// SIGTERM first, so that conch ends its commands as in production;
    /// SIGKILL only if it has not exited after a while. A SIGKILLed agent
    /// could not clean up, and its commands would outlive the test.
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Waits for a stdout line for which `pick` returns a value.
    pub fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(v) = pick(&line) {
                        return v;
                    }
                }
                Err(e) => panic!("no {what} from conch: {e}"),
            }
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

/// The TLS implementation of every client in the tests (reqwest's
/// included), as `conch` itself uses; every way of starting a server or an
/// agent installs it, before any client is built.
pub fn tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts `conch ARGS` with JSON logs on stdout, in a fresh temporary directory.
pub fn spawn_conch(args: &[&str], env: &[(&str, &str)], dir: tempfile::TempDir) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_with(cmd, dir)
}

/// Starts `cmd` (which runs conch somehow) with JSON logs, reading its stdout lines.
pub fn spawn_with(mut cmd: Command, dir: tempfile::TempDir) -> Proc {
    tls_provider();
    // Defaults that the caller's own environment settings override.
    for (key, value) in [("CONCH_LOG_FORMAT", "json"), ("CONCH_LOG", "info")] {
        if !cmd.get_envs().any(|(k, _)| k == key) {
            cmd.env(key, value);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("start conch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc {
        child,
        lines: rx,
        dir,
    }
}

/// The `addr` field of a JSON log line whose message is `message`.
pub fn logged_addr(line: &str, message: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != message {
        return None;
    }
    v.get("addr")?.as_str()?.parse().ok()
}

/// A running agent and what it takes to reach it.
pub struct Agent {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub key: Key,
    pub key_file: PathBuf,
}

/// Starts `conch agent` on an ephemeral loopback port with a fresh key.
pub fn start_agent(extra: &[&str]) -> Agent {
    start_agent_with(extra, &[])
}

pub fn start_agent_with(extra: &[&str], env: &[(&str, &str)]) -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("agent.key");
    let key = Key::generate();
    key.save_new(&key_file).expect("write key");
    launch_agent(dir, key_file, key, extra, env)
}

/// Starts `conch agent` with the key in `key_file` (which the caller made).
pub fn start_agent_keyed(key_file: &std::path::Path, extra: &[&str]) -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let allow_weak = extra.contains(&"--allow-weak-key");
    let key = Key::load_with(key_file, allow_weak).expect("the key");
    launch_agent(dir, key_file.to_owned(), key, extra, &[])
}

fn launch_agent(
    dir: tempfile::TempDir,
    key_file: PathBuf,
    key: Key,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Agent {
    let key_path = key_file.to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["agent", "--listen", "127.0.0.1:0", "--key-file", &key_path];
    args.extend_from_slice(extra);
    let mut proc = spawn_conch(&args, env, dir);
    let addr = proc.wait_for("listening address", |l| logged_addr(l, "agent listening"));
    Agent {
        proc,
        addr,
        key,
        key_file,
    }
}

/// Whether a process with this pid still exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` is gone; returns whether it went.
pub async fn wait_gone(pid: i32) -> bool {
    for _ in 0..200 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A running `conch serve` and how to log in to it.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub token: String,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Starts `conch serve` on an ephemeral loopback port with a known admin
/// token, and waits until it has connected to its agent.
pub fn start_server(extra: &[&str], env: &[(&str, &str)]) -> Server {
    launch_server(extra, env, true)
}

/// Starts `conch serve` without waiting for its agent.
pub fn start_server_unready(extra: &[&str], env: &[(&str, &str)]) -> Server {
    launch_server(extra, env, false)
}

fn launch_server(extra: &[&str], env: &[(&str, &str)], wait_agent: bool) -> Server {
    let mut cmd = server_command(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    server_from(cmd, wait_agent)
}

/// The `conch serve` command line of [`start_server`], to adjust before
/// starting it with [`server_from`].
pub fn server_command(extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("CONCH_ADMIN_TOKEN", ADMIN_TOKEN);
    cmd
}

/// Starts a `conch serve` command and waits until it listens (and, with
/// `wait_agent`, has connected to its agent).
pub fn server_from(cmd: Command, wait_agent: bool) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut proc = spawn_with(cmd, dir);
    // The two lines may come in either order.
    let (mut addr, mut connected) = (None, !wait_agent);
    proc.wait_for("listening address and agent connection", |l| {
        addr = addr.or_else(|| logged_addr(l, "server listening"));
        connected |= l.contains("\"agent connected\"");
        (addr.is_some() && connected).then_some(())
    });
    Server {
        proc,
        addr: addr.expect("address"),
        token: ADMIN_TOKEN.into(),
    }
}

/// A running server, however it was started: its address, the admin
/// token, and what the tests do with them.
pub trait Endpoint {
    fn addr(&self) -> SocketAddr;
    fn admin_token(&self) -> &str;

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Logs in with a form post; returns the session cookie ("name=value").
    async fn login(&self, form: &[(&str, &str)]) -> Result<String, reqwest::StatusCode> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let resp = client
            .post(self.url("/login"))
            .form(form)
            .send()
            .await
            .unwrap();
        if resp.status() != reqwest::StatusCode::SEE_OTHER {
            return Err(resp.status());
        }
        let cookie = resp.headers()["set-cookie"].to_str().unwrap();
        Ok(cookie.split(';').next().unwrap().to_owned())
    }

    /// Logs the session of `cookie` out; returns the answer's status.
    async fn logout(&self, cookie: &str) -> reqwest::StatusCode {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(self.url("/logout"))
            .header("cookie", cookie)
            .header("origin", self.origin())
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn admin_cookie(&self) -> String {
        self.login(&[("token", self.admin_token())])
            .await
            .expect("admin login")
    }

    /// Waits (bounded: 10 s) until `/readyz` says every agent is connected.
    async fn wait_ready(&self) {
        for _ in 0..1000 {
            if status(self.url("/readyz")).await == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server's agents never all connected");
    }

    /// Creates an API token through the admin endpoint; returns its value.
    async fn create_token(&self, name: &str, role: &str) -> String {
        let created: serde_json::Value = reqwest::Client::new()
            .post(self.url("/api/v1/tokens"))
            .bearer_auth(self.admin_token())
            .json(&serde_json::json!({"name": name, "role": role}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        created["token"].as_str().expect("a token").to_owned()
    }
}

impl Endpoint for Server {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn admin_token(&self) -> &str {
        &self.token
    }
}

/// Waits (bounded) until process `pid` runs the program `comm`. A shell
/// run with -c catches SIGINT until it has exec'd its command, so a
/// test that sends INT must first know that the exec has happened.
pub async fn wait_exec(pid: i32, comm: &str) {
    for _ in 0..400 {
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("process {pid} never became {comm}");
}

/// The status of a GET (redirects are not followed).
pub async fn status(url: impl reqwest::IntoUrl) -> u16 {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    client.get(url).send().await.unwrap().status().as_u16()
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POSTs `body` as JSON with a bearer token: the status and the JSON answer.
pub async fn post_json(
    url: impl reqwest::IntoUrl,
    token: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The JSON body of a GET with a bearer token.
pub async fn get_json(url: impl reqwest::IntoUrl, token: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A users file with an operator (olga, `operator-pw`) and a viewer
/// (vera, `viewer-pw`); returns its path.
pub fn users_file(dir: &std::path::Path) -> String {
    let op = conch::server::auth::hash_password("operator-pw").unwrap();
    let view = conch::server::auth::hash_password("viewer-pw").unwrap();
    let path = dir.join("users.toml");
    std::fs::write(
        &path,
        format!(
            "[[users]]\nname = \"olga\"\npassword_hash = \"{op}\"\nrole = \"operator\"\n\n\
             [[users]]\nname = \"vera\"\npassword_hash = \"{view}\"\nrole = \"viewer\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}
