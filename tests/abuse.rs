//! The adversarial suite: what one hostile or careless caller tries against
//! the others, the server and its secrets, through the real binaries.
//! Each test failed on the code before the isolation work.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream as StdTcpStream};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::Endpoint;
use common::ws::{Ws, console, next_json, open_ws, run, send};
use common::{
    Server, alive, server_command, server_from, start_agent, start_server, users_file, wait_gone,
};
use conch::link::{AgentLink, Event};
use conch::protocol::{ExecRequest, PtySize};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The status of `GET /api/v1/agents` with `token`, optionally as the
/// proxy says `forwarded_for` (the cheapest authenticated request).
async fn agents_status(
    server: &Server,
    token: &str,
    forwarded_for: Option<&str>,
) -> reqwest::StatusCode {
    let mut req = client()
        .get(server.url("/api/v1/agents"))
        .bearer_auth(token);
    if let Some(from) = forwarded_for {
        req = req.header("x-forwarded-for", from);
    }
    req.send().await.unwrap().status()
}

/// A request to `path` naming `host` (and, for a token login, `origin`).
async fn as_host(
    server: &Server,
    path: &str,
    host: &str,
    login: Option<(&str, &str)>,
) -> reqwest::Response {
    let req = match login {
        None => client().get(server.url(path)),
        Some((origin, token)) => client()
            .post(server.url(path))
            .header("origin", origin)
            .form(&[("token", token)]),
    };
    req.header("host", host).send().await.unwrap()
}

async fn exec(server: &Server, token: &str, body: Value) -> reqwest::Response {
    client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Reads a PTY shell's output until `needle` appears (bounded by the
/// socket: the test fails if the shell dies first).
async fn read_until(ws: &mut Ws, id: u32, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        match ws.next().await.expect("socket open").expect("frame") {
            Message::Binary(b) => {
                assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]), id);
                seen.push_str(&String::from_utf8_lossy(&b[5..]));
                send(ws, json!({"type": "ack", "id": id, "bytes": b.len() - 5})).await;
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert!(
                    !matches!(v["type"].as_str(), Some("exit") | Some("error")),
                    "the shell ended: {v} after {seen:?}"
                );
            }
            _ => {}
        }
    }
    seen
}

// ------------------------------------------------------------ one request never breaks the link

#[tokio::test]
async fn an_oversized_request_fails_alone_and_big_command_lines_run() {
    let server = start_server(&["--max-body-bytes", "4194304"], &[]);
    // Someone else's shell, open in another browser.
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "pty": {"cols": 80, "rows": 24}}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "echo before-$((1+1))\n"}),
    )
    .await;
    read_until(&mut ws, 1, "before-2").await;

    // 70 000 characters in one argument: well within what the kernel takes.
    let line = format!("true #{}", "A".repeat(70_000));
    let resp = exec(&server, &server.token, json!({"command": line})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["exit_code"], 0);

    // 2 MB: more than the agent protocol carries. Refused alone, with 413.
    let resp = exec(
        &server,
        &server.token,
        json!({"command": format!("true #{}", "B".repeat(2_000_000))}),
    )
    .await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("at most"),
        "{body}"
    );

    // Over the console, a line over the kernel's 128 KiB per argument gets
    // E2BIG (126) for that command alone.
    let mut other = console(&server).await;
    let (_, err, exit) = run(&mut other, 2, &format!("true #{}", "C".repeat(200_000))).await;
    assert_eq!(exit["code"], 126, "{exit}");
    assert!(String::from_utf8_lossy(&err).contains("Argument list too long"));

    // The shell lived through all of it.
    send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "echo after-$((2+2))\n"}),
    )
    .await;
    read_until(&mut ws, 1, "after-4").await;
}

#[tokio::test]
async fn one_user_cannot_take_every_channel_of_an_agent() {
    // An agent that runs 8 channels; 3 are kept for users with nothing there.
    let agent = start_agent(&["--max-channels", "8"]);
    let key = agent.key_file.to_str().unwrap().to_owned();
    let addr = agent.addr.to_string();
    let server = start_server(
        &[
            "--agent",
            &addr,
            "--agent-key-file",
            &key,
            "--command-reserve",
            "3",
            "--max-commands-per-user",
            "100",
        ],
        &[],
    );
    let hog = server.create_token("hog", "operator").await;
    let other = server.create_token("other", "operator").await;
    // The hog streams long commands and keeps the answers open.
    let mut held = Vec::new();
    for _ in 0..5 {
        let resp = client()
            .post(server.url("/api/v1/exec"))
            .bearer_auth(&hog)
            .header("accept", "application/x-ndjson")
            .json(&json!({"command": "sleep 300"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        held.push(resp);
    }
    // The sixth would leave only the reserve: refused, with a reason.
    let resp = exec(&server, &hog, json!({"command": "sleep 300"})).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("kept for users"),
        "{body}"
    );
    // Another user still runs commands.
    let resp = exec(&server, &other, json!({"command": "echo mine"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["stdout"], "mine\n");
    drop(held);
}

#[tokio::test]
async fn commands_per_user_are_capped_console_and_api_together() {
    let server = start_server(&["--max-commands-per-user", "2"], &[]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "sleep 300"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let streaming = client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "sleep 300"}))
        .send()
        .await
        .unwrap();
    assert_eq!(streaming.status(), 200);
    // A third, from either side, is refused.
    send(
        &mut ws,
        json!({"type": "exec", "id": 2, "cmd": "echo three"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "too_many_commands", "{reply}");
    assert_eq!(reply["id"], 2);
    let resp = exec(&server, &server.token, json!({"command": "echo three"})).await;
    assert_eq!(resp.status(), 429);
    drop(streaming);
}

/// A page cannot run more than 16 commands in one console, and the
/// console's own bookkeeping (each command's end reaches its loop through
/// one bounded queue) never stalls however many come and go.
#[tokio::test]
async fn one_console_runs_at_most_sixteen_commands_and_keeps_answering() {
    let server = start_server(&["--max-commands-per-user", "100"], &[]);
    let mut ws = console(&server).await;
    for id in 1..=16 {
        send(
            &mut ws,
            json!({"type": "exec", "id": id, "cmd": "sleep 300"}),
        )
        .await;
        let reply = next_json(&mut ws).await;
        assert_eq!(
            (reply["type"].clone(), reply["id"].clone()),
            (json!("started"), json!(id))
        );
    }
    send(
        &mut ws,
        json!({"type": "exec", "id": 17, "cmd": "echo over"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "too_many_commands", "{reply}");
    // All end at once: every exit arrives, and their ids are free again.
    for round in 0..3 {
        for id in 1..=16 {
            send(&mut ws, json!({"type": "close", "id": id})).await;
        }
        let mut ended = std::collections::HashSet::new();
        while ended.len() < 16 {
            let msg = next_json(&mut ws).await;
            if msg["type"] == "exit" {
                ended.insert(msg["id"].as_u64().unwrap());
            }
        }
        if round < 2 {
            for id in 1..=16 {
                send(
                    &mut ws,
                    json!({"type": "exec", "id": id, "cmd": "sleep 300"}),
                )
                .await;
                let reply = next_json(&mut ws).await;
                assert_eq!(reply["type"], "started", "round {round}: {reply}");
            }
        }
    }
    let (out, _, exit) = run(&mut ws, 99, "echo still-here").await;
    assert_eq!(out, b"still-here\n", "{exit}");
    assert_eq!(exit["code"], 0, "{exit}");
}

#[tokio::test]
async fn strangers_holding_handshakes_never_keep_a_client_out() {
    let agent = start_agent(&["--max-connections", "16"]);
    // Idle connections that never say a word: 8 (a source's share of
    // pending handshakes) from each of five other loopback addresses.
    let mut idle: Vec<StdTcpStream> = Vec::new();
    for source in 2..7u8 {
        for _ in 0..8 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::from(([127, 0, 0, source], 0)))
                .unwrap();
            idle.push(
                socket
                    .connect(agent.addr)
                    .await
                    .unwrap()
                    .into_std()
                    .unwrap(),
            );
        }
    }
    let link = AgentLink::connect(agent.addr, &agent.key)
        .await
        .expect("an authenticated client gets in while 40 strangers wait");
    // ... and it got in without waiting for the strangers to be dropped.
    for s in &idle {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 256];
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // The agent's hello is all a stranger may have been sent.
            Ok(n) if n > 0 => {}
            other => panic!("an idle connection was closed already: {other:?}"),
        }
    }
    let mut ch = link
        .exec(ExecRequest {
            cmd: Some("echo in".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (out, _, _) = ch.collect().await;
    assert_eq!(out, b"in\n");

    // A flood beyond the pending cap, and beyond one source's share: the
    // oldest strangers make room.
    let flood: Vec<StdTcpStream> = (0..150)
        .map(|_| StdTcpStream::connect(agent.addr).unwrap())
        .collect();
    AgentLink::connect(agent.addr, &agent.key)
        .await
        .expect("a client gets in through a flood of strangers");
    drop((idle, flood));
}

// ------------------------------------------------------------ commands never see the server's secrets

#[tokio::test]
async fn commands_see_a_clean_environment_and_their_parent_is_the_agent() {
    let server = start_server(&[], &[("CONCH_ADMIN_TOKEN_EXTRA_SECRET", "hunter2-secret")]);
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "env; echo ppid=$PPID; tr '\\0' ' ' < /proc/$PPID/cmdline; echo"}),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    let out = body["stdout"].as_str().unwrap();
    assert!(!out.contains(&server.token), "the admin token leaked");
    assert!(!out.contains("hunter2-secret"), "a server variable leaked");
    for line in out.lines().take_while(|l| !l.starts_with("ppid=")) {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "PWD",
                "SHLVL", "_", "OLDPWD"
            ]
            .contains(&name)
                || name.starts_with("LC_"),
            "undocumented variable {name}"
        );
    }
    let ppid: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("ppid="))
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        ppid,
        server.proc.child.id(),
        "the command's parent is the server"
    );
    assert!(
        out.contains("conch agent"),
        "the parent is the agent: {out}"
    );

    // No descriptor of the agent's reaches a command (its listening socket
    // would let a command take over the link the server reconnects on).
    let body: Value = exec(
        &server,
        &server.token,
        json!({"command": "for f in /proc/$$/fd/*; do readlink $f; done"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let fds = body["stdout"].as_str().unwrap();
    assert!(
        !fds.contains("socket:"),
        "a socket reached the command: {fds}"
    );

    // Killing its parent stops the agent, which the server restarts; the
    // server itself is untouched.
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "kill -TERM $PPID"}),
    )
    .await;
    assert!(resp.status() == 200 || resp.status() == 503);
    assert_eq!(common::status(server.url("/healthz")).await, 200);
    let mut answered = None;
    for _ in 0..200 {
        let resp = exec(&server, &server.token, json!({"command": "echo back"})).await;
        if resp.status() == 200 {
            answered = Some(resp.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered.expect("the agent came back")["stdout"], "back\n");
}

#[tokio::test]
async fn run_as_drops_to_the_user_who_cannot_read_the_agent_or_server() {
    if !is_root() {
        eprintln!("SKIPPED: --run-as needs root");
        return;
    }
    let server = start_server(&["--run-as", "nobody"], &[]);
    let script = format!(
        "id -un; echo home=$HOME; pwd; cat /proc/$PPID/environ >/dev/null 2>&1 && echo agent-readable; \
         cat /proc/{}/environ >/dev/null 2>&1 && echo server-readable; \
         kill -TERM {} 2>/dev/null && echo server-killable; echo done",
        server.proc.child.id(),
        server.proc.child.id()
    );
    let body: Value = exec(&server, &server.token, json!({"command": script}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["stdout"], "nobody\nhome=/nonexistent\n/\ndone\n",
        "{body}"
    );
    // A directory the user may not enter stays shut: the agent's rights
    // do not open it for them.
    let body: Value = exec(
        &server,
        &server.token,
        json!({"command": "pwd; ls", "cwd": "/root"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["exit_code"], 126, "{body}");
    assert_eq!(body["stderr"], "conch: cd /root: Permission denied\n");
}

#[tokio::test]
async fn a_process_that_leaves_its_session_dies_with_its_command() {
    for cgroups in ["auto", "off"] {
        let agent = start_agent(&["--cgroups", cgroups]);
        let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
        let req = ExecRequest {
            cmd: Some("setsid -f sh -c 'echo daemon=$$; exec sleep 300' ; sleep 0.1".into()),
            ..Default::default()
        };
        let (out, _, exit) = link.exec(req).await.unwrap().collect().await;
        assert!(matches!(exit, Event::Exit(_)), "{exit:?}");
        let out = String::from_utf8(out).unwrap();
        let pid: i32 = out
            .trim()
            .strip_prefix("daemon=")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {out:?}"));
        assert!(
            wait_gone(pid).await,
            "with --cgroups {cgroups}, the daemon {pid} outlived its command"
        );
    }
}

/// Every command starts inside its own cgroup in each hierarchy the agent
/// uses (the v2 one by `CLONE_INTO_CGROUP`, v1 ones by their `tasks`
/// file), with pipes and in a terminal, as root or as another user.
#[tokio::test]
async fn every_command_starts_in_its_own_cgroup_in_every_hierarchy() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (cgroups)");
        return;
    }
    for extra in [vec![], vec!["--run-as", "nobody"]] {
        let agent = start_agent(&extra);
        let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for pty in [
            None,
            Some(PtySize {
                cols: 200,
                rows: 24,
            }),
        ] {
            let req = ExecRequest {
                cmd: Some("cat /proc/self/cgroup; sh -c 'cat /proc/self/cgroup'".into()),
                pty,
                ..Default::default()
            };
            let (out, _, exit) = link.exec(req).await.unwrap().collect().await;
            assert!(matches!(exit, Event::Exit(_)), "{exit:?}");
            let out = String::from_utf8(out).unwrap().replace('\r', "");
            // "ID:CONTROLLERS:PATH", for the command and for its child.
            let mut cmds = Vec::new();
            for line in out.lines() {
                let mut parts = line.splitn(3, ':');
                let (Some(_), Some(controllers), Some(path)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    panic!("not a cgroup line: {line:?} in {out}");
                };
                let ours = controllers.is_empty()
                    || controllers.split(',').any(|c| c == "pids" || c == "memory");
                if !ours {
                    continue;
                }
                let Some((_, cmd)) = path.rsplit_once("/cmd-") else {
                    panic!("{controllers:?} is not the command's own cgroup: {path} ({extra:?})");
                };
                cmds.push(cmd.to_owned());
            }
            assert!(cmds.len() >= 2, "no cgroup lines: {out}");
            assert!(
                cmds.iter().all(|c| *c == cmds[0]),
                "one command in several cgroups: {out}"
            );
            assert!(seen.insert(cmds[0].clone()), "two commands shared a cgroup");
        }
    }
}

#[tokio::test]
async fn a_fork_bomb_meets_its_limit_and_the_agent_lives_on() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (cgroups, or --run-as for the rlimit)");
        return;
    }
    // cgroup pids.max; and, without cgroups, RLIMIT_NPROC for a plain user.
    for extra in [
        vec!["--cmd-max-procs", "20"],
        vec![
            "--cmd-max-procs",
            "20",
            "--cgroups",
            "off",
            "--run-as",
            "nobody",
        ],
    ] {
        let agent = start_agent(&extra);
        let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
        // A bounded bomb: 100 forks at most, each a sleeper.
        let bomb = ExecRequest {
            cmd: Some(
                "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; echo spawned-all"
                    .into(),
            ),
            timeout_ms: Some(60_000),
            ..Default::default()
        };
        let mut bomb = link.exec(bomb).await.unwrap();
        let (out, err, exit) = bomb.collect().await;
        assert!(
            !String::from_utf8_lossy(&out).contains("spawned-all"),
            "{extra:?}"
        );
        assert!(
            String::from_utf8_lossy(&err)
                .to_lowercase()
                .contains("fork"),
            "{extra:?}: {}",
            String::from_utf8_lossy(&err)
        );
        assert!(matches!(exit, Event::Exit(_)));
        // The agent still runs someone else's command.
        let (out, _, _) = link
            .exec(ExecRequest {
                cmd: Some("echo still-here".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(out, b"still-here\n");
        assert!(alive(agent.proc.child.id() as i32));
    }
}

// ------------------------------------------------------------ no output is dropped without a word

#[tokio::test]
async fn streamed_output_is_whole_and_a_cap_is_announced() {
    let server = start_server(&[], &[]);
    let conch = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .arg("exec")
            .args(["--server", &server.url("")])
            .args(args)
            .env("CONCH_TOKEN", &server.token)
            .output()
            .unwrap()
    };
    let out = conch(&["--", "head -c 5000000 /dev/zero"]);
    assert_eq!(out.stdout.len(), 5_000_000);
    assert_eq!(out.status.code(), Some(0));
    let out = conch(&["--", "seq 1 1000000"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1_000_000);
    assert_eq!(text.lines().last(), Some("1000000"));

    // A cap the caller sets: one line on stderr, and a non-zero exit.
    let out = conch(&["--max-output-bytes", "1000", "--", "seq 1 100000"]);
    assert_eq!(out.stdout.len(), 1000);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cut off after 1000 bytes"), "{err}");
    // ... which the stream says in a line of its own.
    let text = client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "seq 1 100000", "max_output_bytes": 10}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["truncated"] == "stdout" && l["limit"] == 10),
        "{text}"
    );
    assert_eq!(lines.last().unwrap()["stdout_truncated"], true);
}

#[tokio::test]
async fn a_reader_that_stalls_gets_the_rest() {
    let server = start_server(&[], &[]);
    let resp = client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "seq 1 300000"}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut body = Vec::new();
    body.extend_from_slice(&stream.next().await.unwrap().unwrap());
    // The client stops reading for a while (this pause is the scenario).
    tokio::time::sleep(Duration::from_secs(8)).await;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    let mut text = String::new();
    let mut last = None;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        if let Some(d) = v["data"].as_str() {
            text.push_str(d);
        }
        last = Some(v);
    }
    let expected: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    assert!(text == expected, "lines lost or repeated");
    assert_eq!(last.unwrap()["exit_code"], 0);
}

#[tokio::test]
async fn buffered_answers_share_a_bounded_budget_and_stay_compact() {
    let server = start_server(&["--buffered-output-budget-mib", "16"], &[]);
    // One answer that could never fit: 413, with the way out.
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "true", "max_output_bytes": 4 * 1024 * 1024}),
    )
    .await;
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("x-ndjson"),
        "{body}"
    );

    // Two that fit one at a time: the second waits its turn (503).
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("gate");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let first = {
        let (url, token) = (server.url("/api/v1/exec"), server.token.clone());
        let cmd = format!("cat {}", fifo.display());
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"command": cmd, "max_output_bytes": 2 * 1024 * 1024}))
                .send()
                .await
                .unwrap()
        })
    };
    // Once the first command has the gate open, its budget is reserved.
    let gate = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo)),
    )
    .await
    .expect("the first command opened the gate")
    .unwrap()
    .unwrap();
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "true", "max_output_bytes": 2 * 1024 * 1024}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    (&gate).write_all(b"through\n").unwrap();
    drop(gate);
    let first: Value = first.await.unwrap().json().await.unwrap();
    assert_eq!(first["stdout"], "through\n");

    // 16 MiB of NUL bytes: base64 (22 MB), not 96 MB of \u0000 escapes.
    let server = start_server(&[], &[]);
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "head -c 16777216 /dev/zero", "max_output_bytes": 16 * 1024 * 1024}),
    )
    .await;
    let bytes = resp.bytes().await.unwrap();
    assert!(bytes.len() < 23_000_000, "{} bytes", bytes.len());
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["encoding"], "base64");
}

// ------------------------------------------------------------ results tell the truth

#[tokio::test]
async fn a_command_is_timed_out_only_if_the_kill_ended_it() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            let req = ExecRequest {
                argv: Some(vec!["true".into()]),
                timeout_ms: Some(1),
                ..Default::default()
            };
            link.exec(req).await.unwrap().collect().await.2
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            Event::Exit(status) => assert!(
                !(status.timed_out && status.code.is_some()),
                "{status:?} reported as timed out"
            ),
            other => panic!("{other:?}"),
        }
    }
}

// ------------------------------------------------------------ the server survives hostile clients

#[tokio::test]
async fn silent_and_slow_sockets_cannot_starve_the_server() {
    // As on a host whose open-file limit is 512.
    let mut cmd = server_command(&["--header-timeout-ms", "2000"]);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 512,
                rlim_max: 512,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let server = server_from(cmd, true);
    let mut silent: Vec<StdTcpStream> = Vec::new();
    for _ in 0..600 {
        match StdTcpStream::connect(server.addr) {
            Ok(s) => silent.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // Slowloris: headers that never end.
    for s in silent.iter_mut().take(50) {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .unwrap();
    }
    let resp = client()
        .get(server.url("/healthz"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("/healthz answers while 600 silent sockets are open");
    assert_eq!(resp.status(), 200);
    // A silent socket is closed by the header deadline, not kept forever
    // (the read's own timeout only guards against a hang).
    let last = silent.pop().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut b = [0u8; 64];
    let read = (&last).read(&mut b);
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the silent socket is still open: {read:?}"
    );
}

#[tokio::test]
async fn someone_elses_failures_never_lock_out_a_correct_password() {
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let server = start_server(&["--users-file", &users], &[]);
    let api_token = server.create_token("script", "operator").await;
    // Any web page can make a browser fetch these: enough to block token
    // logins from this address.
    let mut blocked = false;
    for _ in 0..40 {
        let s = common::status(server.url("/login?token=guess")).await;
        assert!(s == 401 || s == 429);
        blocked |= s == 429;
    }
    assert!(blocked, "token guesses in the login form were all answered");
    // Neither the API nor the password is locked out by them.
    assert_eq!(
        agents_status(&server, &api_token, None).await,
        200,
        "a script's token was locked out by a web page"
    );
    // (A correct login: token failures do not lock out a password. It
    // leaves olga's browser a trusted-device cookie.)
    let device = cookie_named(&server, "conch_device").await;

    // Guesses at olga's password from twelve addresses: the account's own
    // bucket stops them, whatever the addresses.
    let mut refused = 0;
    for i in 2..14u8 {
        let from = client_from(IpAddr::from([127, 0, 0, i]));
        let status = from
            .post(server.url("/login"))
            .form(&[("username", "olga"), ("password", "guess")])
            .send()
            .await
            .unwrap()
            .status();
        refused += usize::from(status == 429);
    }
    assert!(
        refused > 0,
        "twelve addresses guessed olga's password freely"
    );
    // olga's own browser, which has logged in before, still gets in.
    let resp = client()
        .post(server.url("/login"))
        .header("cookie", device)
        .form(&[("username", "olga"), ("password", "operator-pw")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        303,
        "the user's trusted browser is not locked out"
    );

    // Bearer guessing is throttled too.
    let mut limited = false;
    for i in 0..60 {
        limited |= agents_status(&server, &format!("guess-{i}"), None).await == 429;
    }
    assert!(limited, "60 bearer guesses in a row were all answered");
    // A token too strong to guess is still taken.
    assert_eq!(agents_status(&server, &api_token, None).await, 200);
}

fn client_from(addr: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(addr)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs olga in and returns the cookie named `name` ("name=value").
async fn cookie_named(server: &Server, name: &str) -> String {
    let resp = client()
        .post(server.url("/login"))
        .form(&[("username", "olga"), ("password", "operator-pw")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "olga logs in");
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_owned())
        .expect("cookie")
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let server = start_server(&["--trusted-proxy", "127.0.0.1"], &[]);
    let mut blocked = false;
    for _ in 0..40 {
        blocked |= agents_status(&server, "wrong", Some("198.51.100.1")).await == 429;
    }
    assert!(blocked, "the forwarded address was throttled");
    assert_eq!(
        agents_status(&server, "wrong", Some("198.51.100.2")).await,
        401,
        "another client is not"
    );
}

#[tokio::test]
async fn a_user_cannot_log_everyone_else_out() {
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let server = start_server(
        &["--users-file", &users, "--max-sessions-per-user", "3"],
        &[],
    );
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let mut vera = Vec::new();
    for _ in 0..6 {
        vera.push(
            server
                .login(&[("username", "vera"), ("password", "viewer-pw")])
                .await
                .unwrap(),
        );
    }
    let session = |cookie: String| {
        let url = server.url("/api/v1/session");
        async move {
            client()
                .get(url)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(
        session(olga).await,
        200,
        "another user's logins ended olga's session"
    );
    assert_eq!(session(vera[0].clone()).await, 401, "vera's oldest went");
    assert_eq!(session(vera[5].clone()).await, 200);
}

#[tokio::test]
async fn a_console_closes_when_its_session_ends() {
    let server = start_server(&[], &[]);
    let cookie = server.admin_cookie().await;
    let mut ws = open_ws(&server, Some(&cookie), Some(&server.origin()))
        .await
        .unwrap();
    next_json(&mut ws).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "i=0; while [ $i -lt 3000 ]; do echo tick; sleep 0.1; i=$((i+1)); done"}),
    )
    .await;
    assert_eq!(server.logout(&cookie).await, 303);
    // The page sends nothing more; the server ends the console itself.
    let mut code = None;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                let n = b.len() - 5;
                // The server may have closed the socket already: its Close
                // frame is still read below, so a failed ack is no failure.
                let ack = json!({"type": "ack", "id": 1, "bytes": n}).to_string();
                let _ = ws.send(Message::Text(ack.into())).await;
            }
            Ok(Message::Close(frame)) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(
        code,
        Some(1008),
        "the console was closed with a policy code"
    );
}

#[tokio::test]
async fn foreign_host_names_are_refused() {
    // DNS rebinding: a page on evil.example that resolves to 127.0.0.1.
    let server = start_server(&[], &[]);
    let port = server.addr.port();
    let evil = as_host(&server, "/login", &format!("evil.example:{port}"), None).await;
    assert_eq!(evil.status(), 421);
    let local = as_host(&server, "/login", &format!("localhost:{port}"), None).await;
    assert_eq!(local.status(), 200);

    // With a public URL, only its host; HTTPS makes cookies Secure.
    let server = start_server(&["--public-url", "https://conch.example.test/"], &[]);
    let resp = client().get(server.url("/login")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        421,
        "the listen address is not the public name"
    );
    let (host, token) = ("conch.example.test", server.token.as_str());
    let resp = as_host(
        &server,
        "/login",
        host,
        Some(("https://conch.example.test", token)),
    )
    .await;
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("__Host-conch_session="), "{cookie}");
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let resp = as_host(
        &server,
        "/login",
        host,
        Some(("http://conch.example.test", token)),
    )
    .await;
    assert_eq!(
        resp.status(),
        403,
        "an http:// origin is not the https:// site"
    );
}

#[tokio::test]
async fn a_lone_surrogate_or_a_broken_message_gets_an_answer_naming_the_command() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    // What JSON.stringify makes of half an emoji.
    common::ws::send_raw(
        &mut ws,
        r#"{"type":"exec","id":1,"cmd":"echo half-\ud83d-end"}"#,
    )
    .await;
    let started = next_json(&mut ws).await;
    assert_eq!(started["type"], "started", "{started}");
    let (out, _, _) = common::ws::collect(&mut ws, 1).await;
    assert_eq!(String::from_utf8(out).unwrap(), "half-\u{fffd}-end\n");
    // A message the server cannot use still names its command.
    common::ws::send_raw(&mut ws, r#"{"type":"exec","id":2,"cmd":17}"#).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["final"], true);
}

#[tokio::test]
async fn a_pty_shell_still_works_under_the_limits() {
    // The limits must not break an interactive login shell.
    let agent = start_agent(&["--cmd-max-procs", "64"]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut ch = link
        .exec(ExecRequest {
            pty: Some(PtySize { cols: 80, rows: 24 }),
            ..Default::default()
        })
        .await
        .unwrap();
    ch.stdin(
        bytes::Bytes::from_static(b"echo pty-$((3*3)); exit\n"),
        false,
    )
    .await
    .unwrap();
    let (out, _, exit) = ch.collect().await;
    assert!(String::from_utf8_lossy(&out).contains("pty-9"));
    assert!(matches!(
        exit,
        Event::Exit(conch::vocab::ExitStatus { code: Some(0), .. })
    ));
}

#[tokio::test]
async fn a_request_may_take_longer_than_the_header_deadline() {
    // The deadline is for a request's headers, not for its answer.
    let server = start_server(&["--header-timeout-ms", "500"], &[]);
    let resp = exec(
        &server,
        &server.token,
        json!({"command": "sleep 1.5; echo done"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["stdout"], "done\n");
    let text = client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "echo a; sleep 1.5; echo b"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("\"exit_code\":0"), "{text}");
}

#[tokio::test]
async fn half_a_character_at_the_end_of_a_stream_is_not_lost() {
    let server = start_server(&[], &[]);
    let out = std::process::Command::new(common::bin())
        .arg("exec")
        .args(["--server", &server.url("")])
        .args(["--", r"printf 'abc\342\202'"])
        .env("CONCH_TOKEN", &server.token)
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"abc\xe2\x82");
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn a_message_over_the_bound_in_fragments_is_refused_with_too_large() {
    // Two frames of 600 KiB, each under the 1 MiB bound, one message over
    // it: both are read whole, so the refusal is said every time (a single
    // frame over the bound is refused at its header, and the reset can
    // overtake the words).
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = start_server(&[], &[]);
    let mut ws = common::ws::console(&server).await;
    let piece = vec![b'x'; 600 * 1024];
    let first = Frame::message(piece.clone(), OpCode::Data(Data::Text), false);
    let rest = Frame::message(piece, OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(first)).await.unwrap();
    let _ = ws.send(Message::Frame(rest)).await;
    let (mut told, mut code) = (None, None);
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "error" {
                    told = Some(v["code"].clone());
                }
            }
            Message::Close(frame) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(told, Some(json!("too_large")));
    assert_eq!(code, Some(1009));
}
