//! One server, many agents declared in an agents file (`--agents-file`):
//! real agent processes on loopback ports, each with its own key, some the
//! server dials and some that dial in (`--agent-listen`), reached by name
//! or by selector, listed with the labels the file gives them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Endpoint, Proc, Server, start_agent, start_server};
use futures_util::StreamExt;
use serde_json::{Value, json};

fn agents_file(dir: &std::path::Path, entries: &str) -> String {
    let path = dir.join("agents.toml");
    std::fs::write(&path, entries).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn commands_run_on_the_agent_they_name_with_its_own_key() {
    let (web, db) = (start_agent(&[]), start_agent(&[]));
    let dir = tempfile::tempdir().unwrap();
    let file = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"web-1\"\naddr = \"{}\"\nkey_file = \"{}\"\nlabels = {{ role = \"web\", env = \"prod\" }}\n\n\
             [[agents]]\nname = \"db-1\"\naddr = \"{}\"\nkey_file = \"{}\"\nlabels = {{ role = \"db\" }}\n",
            web.addr,
            web.key_file.display(),
            db.addr,
            db.key_file.display(),
        ),
    );
    let server = start_server(&["--agents-file", &file], &[]);
    server.wait_ready().await;
    let client = reqwest::Client::new();
    // Each command runs where it is sent: the agents' pids differ.
    let mut parents = Vec::new();
    for name in ["web-1", "db-1"] {
        let (_, body) = exec(&server, json!({"command": "echo $PPID", "agent": name})).await;
        assert_eq!(body["exit_code"], 0, "{body}");
        parents.push(body["stdout"].as_str().unwrap().trim().to_owned());
    }
    assert_eq!(parents[0], web.proc.child.id().to_string());
    assert_eq!(parents[1], db.proc.child.id().to_string());

    // With several agents, a command must say which.
    let resp = client
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // The list carries the file's labels.
    let agents = common::get_json(server.url("/api/v1/agents"), &server.token).await;
    let web_entry = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "web-1")
        .cloned()
        .unwrap();
    assert_eq!(web_entry["labels"], json!({"role": "web", "env": "prod"}));
    assert_eq!(web_entry["connected"], true);
}

#[tokio::test]
async fn a_wrong_agents_file_stops_the_server_with_the_reason() {
    let agent = start_agent(&[]);
    let dir = tempfile::tempdir().unwrap();
    let key = agent.key_file.display().to_string();
    for (entries, says) in [
        (
            format!(
                "[[agents]]\nname = \"a\"\naddr = \"{0}\"\nkey_file = \"{key}\"\n[[agents]]\nname = \"a\"\naddr = \"{0}\"\nkey_file = \"{key}\"\n",
                agent.addr
            ),
            "declared twice",
        ),
        (
            format!("[[agents]]\nname = \"a\"\naddr = 7\nkey_file = \"{key}\"\n"),
            "invalid type",
        ),
        (
            format!(
                "[[agents]]\nname = \"a b\"\naddr = \"{}\"\nkey_file = \"{key}\"\n",
                agent.addr
            ),
            "agent name",
        ),
        (
            format!(
                "[[agents]]\nname = \"a\"\naddr = \"{}\"\nkey_file = \"{key}\"\ncolour = \"red\"\n",
                agent.addr
            ),
            "unknown field",
        ),
    ] {
        let file = agents_file(dir.path(), &entries);
        let out = std::process::Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--agents-file", &file])
            .env("CONCH_ADMIN_TOKEN", common::ADMIN_TOKEN)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{entries}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{says}: {err}");
    }
}

/// A server with `file` and an agent listener; its address and the
/// listener's.
fn fleet_server(file: &str, extra: &[&str]) -> (Server, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    fleet_server_on(file, listen, extra)
}

fn fleet_server_on(file: &str, listen: SocketAddr, extra: &[&str]) -> (Server, SocketAddr) {
    let listen_text = listen.to_string();
    let mut args = vec!["--agents-file", file, "--agent-listen", &listen_text];
    args.extend_from_slice(extra);
    let server = common::start_server_unready(&args, &[]);
    (server, listen)
}

/// `conch agent --connect` to `server` as `name`.
fn dial_in(server: SocketAddr, name: &str, key_file: &std::path::Path) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let server = server.to_string();
    common::spawn_conch(
        &[
            "agent",
            "--connect",
            &server,
            "--name",
            name,
            "--key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
        dir,
    )
}

/// A fresh key file in `dir`.
fn key_in(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.key"));
    conch::keyfile::Key::generate().save_new(&path).unwrap();
    path
}

/// The server's agents, by name.
async fn agents(server: &Server, selector: Option<&str>) -> Vec<Value> {
    let mut url = reqwest::Url::parse(&server.url("/api/v1/agents")).unwrap();
    if let Some(s) = selector {
        url.query_pairs_mut().append_pair("selector", s);
    }
    let list = common::get_json(url, &server.token).await;
    list["agents"].as_array().unwrap().clone()
}

/// Waits (bounded: 20 s) until the agent `name` is connected or not.
async fn wait_connected(server: &Server, name: &str, connected: bool) -> Value {
    for _ in 0..400 {
        let all = agents(server, None).await;
        if let Some(a) = all.iter().find(|a| a["name"] == name)
            && a["connected"] == connected
        {
            return a.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agent {name} never became connected={connected}");
}

async fn exec(server: &Server, body: Value) -> (u16, Value) {
    common::post_json(server.url("/api/v1/exec"), &server.token, &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_some_dialing_in_run_one_command_each_with_per_host_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = String::new();
    let mut dialed = Vec::new();
    let mut keys = Vec::new();
    for i in 0..20 {
        let name = format!("{}-{i:02}", if i % 2 == 0 { "web" } else { "db" });
        let role = if i % 2 == 0 { "web" } else { "db" };
        let env = if i % 4 < 2 { "prod" } else { "staging" };
        if i < 12 {
            let agent = start_agent(&["--name", &name]);
            entries.push_str(&format!(
                "[[agents]]\nname = \"{name}\"\naddr = \"{}\"\nkey_file = \"{}\"\nlabels = {{ role = \"{role}\", env = \"{env}\" }}\n",
                agent.addr,
                agent.key_file.display()
            ));
            dialed.push((name, agent.proc.child.id()));
            keys.push(agent);
        } else {
            let key = key_in(dir.path(), &name);
            entries.push_str(&format!(
                "[[agents]]\nname = \"{name}\"\nkey_file = \"{}\"\nlabels = {{ role = \"{role}\", env = \"{env}\" }}\n",
                key.display()
            ));
            dialed.push((name, 0));
        }
    }
    let file = agents_file(dir.path(), &entries);
    let (server, listen) = fleet_server(&file, &[]);
    let mut dialers = Vec::new();
    for (name, pid) in dialed.iter_mut().skip(12) {
        let proc = dial_in(listen, name, &dir.path().join(format!("{name}.key")));
        *pid = proc.child.id();
        dialers.push(proc);
    }
    server.wait_ready().await;

    // Every host runs it once, on its own agent: the parent of each
    // command is that host's agent process.
    let (status, body) = exec(&server, json!({"command": "echo $PPID", "target": "*"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["summary"],
        json!({"total": 20, "ok": 20, "failed": 0, "unreachable": 0})
    );
    let results = body["results"].as_array().unwrap();
    let mut expected: Vec<(String, String)> = dialed
        .iter()
        .map(|(n, pid)| (n.clone(), format!("{pid}\n")))
        .collect();
    expected.sort();
    let got: Vec<(String, String)> = results
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "ok", "{r}");
            (
                r["agent"].as_str().unwrap().to_owned(),
                r["result"]["stdout"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected, "one result per host, in name order");

    // Selectors: labels, globs, names, and their mix.
    for (selector, count) in [
        ("role=web", 10),
        ("role=web,env!=staging", 5),
        ("db-*", 10),
        ("web-00,db-13", 2),
        ("web-1*,env=staging", 3),
        ("env=prod", 10),
    ] {
        let (status, body) = exec(
            &server,
            json!({"command": "true", "target": selector, "concurrency": 3}),
        )
        .await;
        assert_eq!(status, 200, "{selector}: {body}");
        assert_eq!(body["summary"]["ok"], count, "{selector}: {body}");
        assert_eq!(
            agents(&server, Some(selector)).await.len(),
            count,
            "{selector}"
        );
    }

    // Each host's command gets the caller's input whole, and its end: a
    // command reading input it was not given ends at once, never holding
    // its host until the time limit.
    for (stdin, want) in [(Some("to every host\n"), "to every host\n"), (None, "")] {
        let mut body = json!({"command": "cat", "target": "role=web"});
        if let Some(stdin) = stdin {
            body["stdin"] = json!(stdin);
        }
        let (status, body) = exec(&server, body).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["summary"]["ok"], 10, "{body}");
        for r in body["results"].as_array().unwrap() {
            assert_eq!(r["result"]["stdout"], want, "{r}");
            assert_eq!(r["result"]["timed_out"], false, "{r}");
        }
    }
    let (status, body) = exec(&server, json!({"command": "true", "target": "nothing-*"})).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = exec(&server, json!({"command": "true", "target": "role==web"})).await;
    assert_eq!(status, 400, "{body}");

    // Each host's own exit code; the summary counts them.
    let (_, body) = exec(
        &server,
        json!({"command": "case $PPID in *[02468]) exit 0;; *) exit 3;; esac", "target": "web-0*"}),
    )
    .await;
    let summary = &body["summary"];
    assert_eq!(summary["total"], 5);
    assert_eq!(
        summary["ok"].as_u64().unwrap() + summary["failed"].as_u64().unwrap(),
        5
    );
    for r in body["results"].as_array().unwrap() {
        let code = r["result"]["exit_code"].as_i64().unwrap();
        assert_eq!(r["status"], if code == 0 { "ok" } else { "failed" }, "{r}");
    }

    // The list shows what each agent said of its host, and the round trip.
    for a in agents(&server, None).await {
        assert_eq!(a["connected"], true, "{a}");
        assert!(
            a["facts"]["kernel"].as_str().is_some_and(|k| !k.is_empty()),
            "{a}"
        );
        assert!(a["rtt_ms"].as_f64().is_some(), "{a}");
        assert_eq!(a["dials_in"], a.get("addr").is_none(), "{a}");
    }

    // The CLI: each line prefixed with its host, a summary, status 0.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &server.token).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["exec", "--server", &server.url(""), "--token-file"])
        .arg(&token_file)
        .args(["--on", "role=db,env=prod", "--", "printf 'a\\nb\\n'"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for host in ["db-01", "db-05", "db-09", "db-13", "db-17"] {
        assert!(
            stdout.contains(&format!("{host}: a\n{host}: b\n"))
                || (stdout.contains(&format!("{host}: a\n"))
                    && stdout.contains(&format!("{host}: b\n"))),
            "{stdout}"
        );
    }
    assert_eq!(stdout.lines().count(), 10, "{stdout}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("5 hosts: 5 ok, 0 failed, 0 unreachable"),
        "{stderr}"
    );
    // One host failing makes the status 1, and says which.
    let out = std::process::Command::new(common::BIN)
        .args(["exec", "--server", &server.url(""), "--token-file"])
        .arg(&token_file)
        .args([
            "--on",
            "web-00,web-02",
            "--no-prefix",
            "--",
            "test $PPID = ",
        ])
        .arg(dialed[0].1.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("web-02: exited with status 1") && stderr.contains("failed: web-02"),
        "{stderr}"
    );
    // The agents table.
    let out = std::process::Command::new(common::BIN)
        .args(["agents", "--server", &server.url(""), "--token-file"])
        .arg(&token_file)
        .arg("env=staging")
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(table.lines().count(), 11, "{table}");
    assert!(
        table.contains("web-02") && table.contains("online") && !table.contains("web-00 "),
        "{table}"
    );
    drop(dialers);
}

/// Streams a fan-out's NDJSON lines as they come.
async fn stream_lines(server: &Server, body: Value) -> impl futures_util::Stream<Item = Value> {
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes_stream();
    futures_util::stream::unfold(
        (bytes, Vec::<u8>::new()),
        |(mut bytes, mut buf)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    return Some((serde_json::from_slice(&line).unwrap(), (bytes, buf)));
                }
                let chunk = bytes.next().await?.ok()?;
                buf.extend_from_slice(&chunk);
            }
        },
    )
}

/// `n` agent processes named `{prefix}0`, `{prefix}1`... that the server
/// dials, and that server (with `extra` flags), ready: (agents, server,
/// the agents file's dir).
async fn dialed_fleet(
    n: usize,
    prefix: &str,
    extra: &[&str],
) -> (Vec<common::Agent>, Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<common::Agent> = (0..n).map(|_| start_agent(&[])).collect();
    let mut entries = String::new();
    for (i, a) in hosts.iter().enumerate() {
        entries.push_str(&format!(
            "[[agents]]\nname = \"{prefix}{i}\"\naddr = \"{}\"\nkey_file = \"{}\"\n",
            a.addr,
            a.key_file.display()
        ));
    }
    let file = agents_file(dir.path(), &entries);
    let mut args = vec!["--agents-file", file.as_str()];
    args.extend_from_slice(extra);
    let server = start_server(&args, &[]);
    server.wait_ready().await;
    (hosts, server, dir)
}

#[tokio::test]
async fn an_agent_killed_mid_command_is_unreachable_while_the_others_finish() {
    let (mut hosts, server, dir) = dialed_fleet(3, "h", &[]).await;
    // Each command waits for a gate file that the test makes.
    let gate = dir.path().join("gate");
    let cmd = format!(
        "echo started; while [ ! -e {0} ]; do sleep 0.02; done; echo done",
        gate.display()
    );
    let mut lines = Box::pin(stream_lines(&server, json!({"command": cmd, "target": "*"})).await);
    let mut started = std::collections::BTreeSet::new();
    while started.len() < 3 {
        let line = lines.next().await.expect("a line");
        if line["data"] == "started\n" {
            started.insert(line["agent"].as_str().unwrap().to_owned());
        }
    }
    // h1's agent dies without a word; the others are then let go.
    let victim = hosts.remove(1);
    unsafe { libc::kill(victim.proc.child.id() as i32, libc::SIGKILL) };
    let mut rest = Vec::new();
    let summary = loop {
        let line = lines.next().await.expect("a line");
        if line.get("summary").is_some() {
            break line["summary"].clone();
        }
        if line["agent"] == "h1" && line.get("status").is_some() {
            // h1 is reported: let the others finish.
            std::fs::write(&gate, "").unwrap();
        }
        rest.push(line);
    };
    assert_eq!(
        summary,
        json!({"total": 3, "ok": 2, "failed": 0, "unreachable": 1})
    );
    let last_of = |host: &str| {
        rest.iter()
            .rev()
            .find(|l| l["agent"] == host)
            .cloned()
            .unwrap()
    };
    let h1 = last_of("h1");
    assert_eq!(h1["status"], "unreachable", "{h1}");
    assert!(h1["error"].as_str().unwrap().contains("lost"), "{h1}");
    for host in ["h0", "h2"] {
        let last = last_of(host);
        assert_eq!(
            (last["exit_code"].clone(), last["status"].clone()),
            (json!(0), json!("ok")),
            "{last}"
        );
        assert!(
            rest.iter()
                .any(|l| l["agent"] == host && l["data"] == "done\n"),
            "{rest:?}"
        );
    }
    // Offline from now on: a new fan-out says so, never skips it.
    let (_, body) = exec(&server, json!({"command": "true", "target": "*"})).await;
    assert_eq!(body["summary"]["unreachable"], 1, "{body}");
    assert_eq!(body["results"][1]["agent"], "h1");
    assert_eq!(body["results"][1]["status"], "unreachable");
    drop(victim);
}

#[tokio::test]
async fn a_dial_in_agent_reconnects_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(dir.path(), "edge");
    let file = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"edge-1\"\nkey_file = \"{}\"\nlabels = {{ site = \"branch\" }}\n",
            key.display()
        ),
    );
    let (server, listen) = fleet_server(&file, &[]);
    let _agent = dial_in(listen, "edge-1", &key);
    server.wait_ready().await;
    let (_, body) = exec(&server, json!({"command": "echo hi", "agent": "edge-1"})).await;
    assert_eq!(body["stdout"], "hi\n", "{body}");
    drop(server);
    // The same listener address, a new server process.
    let (server, _) = fleet_server_on(&file, listen, &[]);
    server.wait_ready().await;
    let (_, body) = exec(
        &server,
        json!({"command": "echo again", "target": "site=branch"}),
    )
    .await;
    assert_eq!(body["results"][0]["result"]["stdout"], "again\n", "{body}");
}

#[tokio::test]
async fn names_are_bound_to_keys_and_impostors_replace_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (key_in(dir.path(), "a"), key_in(dir.path(), "b"));
    let wrong = key_in(dir.path(), "wrong");
    let file = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"a\"\nkey_file = \"{}\"\n[[agents]]\nname = \"b\"\nkey_file = \"{}\"\n",
            key_a.display(),
            key_b.display()
        ),
    );
    let (server, listen) = fleet_server(&file, &[]);
    let _a = dial_in(listen, "a", &key_a);
    let first = wait_connected(&server, "a", true).await;

    // a's key claiming b, a wrong key, an undeclared name: all refused,
    // each told why in its own log.
    for (name, key, says) in [
        ("b", &key_a, "wrong key"),
        ("b", &wrong, "wrong key"),
        ("c", &key_a, "wrong key"),
        // The holder of a's key cannot take a's connection either.
        ("a", &wrong, "wrong key"),
    ] {
        let mut impostor = dial_in(listen, name, key);
        impostor.wait_for(says, |l| l.contains(says).then_some(()));
    }
    let b = agents(&server, None)
        .await
        .into_iter()
        .find(|x| x["name"] == "b")
        .unwrap();
    assert_eq!(b["connected"], false, "{b}");
    let a = wait_connected(&server, "a", true).await;
    assert_eq!(
        a["connected_since"], first["connected_since"],
        "the real a kept its link"
    );

    // The real b, with its own key, gets in.
    let _b = dial_in(listen, "b", &key_b);
    wait_connected(&server, "b", true).await;
    // A second, genuine a replaces the first.
    let _a2 = dial_in(listen, "a", &key_a);
    for _ in 0..400 {
        let a = wait_connected(&server, "a", true).await;
        if a["connected_since"] != first["connected_since"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A server that dials an agent checks the name the agent proves.
    let other = start_agent(&["--name", "not-web"]);
    let file2 = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"web\"\naddr = \"{}\"\nkey_file = \"{}\"\n",
            other.addr,
            other.key_file.display()
        ),
    );
    // Its log read from the first line: the check can fail before the
    // server says it listens.
    let mut s2 = common::spawn_with(
        common::server_command(&["--agents-file", &file2]),
        tempfile::tempdir().unwrap(),
    );
    s2.wait_for("the name check", |l| {
        l.contains("is \\\"not-web\\\", not \\\"web\\\"")
            .then_some(())
    });
}

/// A TCP relay to `upstream` that can be frozen: it then stops forwarding
/// in both directions but keeps every connection open, as a pulled cable
/// or a stalled middlebox does (no FIN, no RST ever arrives).
async fn freezable_relay(upstream: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (frozen, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(pipe(dr, uw, watch.clone()));
            tokio::spawn(pipe(ur, dw, watch.clone()));
        }
    });
    (addr, frozen)
}

async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *frozen.borrow() {
            // Frozen: hold both sockets, forward nothing, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_host_cut_off_without_a_close_is_marked_offline_and_its_commands_lost() {
    let agent = start_agent(&[]);
    let (relay, frozen) = freezable_relay(agent.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let file = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"far\"\naddr = \"{relay}\"\nkey_file = \"{}\"\n",
            agent.key_file.display()
        ),
    );
    // Not `start_server`: it blocks this thread, where the relay runs.
    let server = common::start_server_unready(
        &["--agents-file", &file, "--agent-dead-after-ms", "3000"],
        &[],
    );
    server.wait_ready().await;
    let mut lines = Box::pin(
        stream_lines(
            &server,
            json!({"command": "echo started; sleep 60", "target": "far"}),
        )
        .await,
    );
    let first = lines.next().await.unwrap();
    assert_eq!(first["data"], "started\n", "{first}");
    frozen.send(true).unwrap();
    // No close ever comes: only the server's own liveness check ends this
    // (the test's bound is far above the 3 s configured).
    let last = tokio::time::timeout(Duration::from_secs(30), lines.next())
        .await
        .expect("the silent agent was never declared lost")
        .unwrap();
    assert_eq!(last["status"], "unreachable", "{last}");
    assert!(last["error"].as_str().unwrap().contains("lost"), "{last}");
    let summary = lines.next().await.unwrap();
    assert_eq!(summary["summary"]["unreachable"], 1, "{summary}");
    let far = wait_connected(&server, "far", false).await;
    assert!(far["last_seen"].is_string(), "{far}");
}

#[tokio::test]
async fn a_principal_limited_to_a_selector_reaches_no_other_agent() {
    let (prod, staging) = (start_agent(&[]), start_agent(&[]));
    let dir = tempfile::tempdir().unwrap();
    let file = agents_file(
        dir.path(),
        &format!(
            "[[agents]]\nname = \"prod-1\"\naddr = \"{}\"\nkey_file = \"{}\"\nlabels = {{ env = \"prod\" }}\n\
             [[agents]]\nname = \"staging-1\"\naddr = \"{}\"\nkey_file = \"{}\"\nlabels = {{ env = \"staging\" }}\n",
            prod.addr,
            prod.key_file.display(),
            staging.addr,
            staging.key_file.display()
        ),
    );
    let hash = conch::server::auth::hash_password("sam-pw").unwrap();
    let users = dir.path().join("users.toml");
    std::fs::write(
        &users,
        format!("[[users]]\nname = \"sam\"\npassword_hash = \"{hash}\"\nrole = \"operator\"\nagents = \"env=staging\"\n"),
    )
    .unwrap();
    let server = start_server(
        &[
            "--agents-file",
            &file,
            "--users-file",
            users.to_str().unwrap(),
        ],
        &[],
    );
    server.wait_ready().await;

    // A token limited by the admin who made it.
    let created: Value = reqwest::Client::new()
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&server.token)
        .json(&json!({"name": "ci", "role": "operator", "agents": "staging-*"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let run = |body: Value| {
        let (url, token) = (server.url("/api/v1/exec"), token.clone());
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = run(json!({"command": "echo ok", "agent": "staging-1"})).await;
    assert_eq!(
        (status, body["stdout"].clone()),
        (200, json!("ok\n")),
        "{body}"
    );
    // Out of reach looks exactly like absent, connected or not.
    let (status, body) = run(json!({"command": "echo no", "agent": "prod-1"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["detail"], "no agent named \"prod-1\"");
    let (status, body) = run(json!({"command": "echo x", "target": "*"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["summary"]["total"], 1, "{body}");
    assert_eq!(body["results"][0]["agent"], "staging-1");
    let (status, _) = run(json!({"command": "echo x", "target": "env=prod"})).await;
    assert_eq!(status, 404);
    let listed = common::get_json(server.url("/api/v1/agents"), &token).await;
    assert_eq!(listed["agents"].as_array().unwrap().len(), 1, "{listed}");
    // A limited admin cannot mint itself an unlimited token.
    let limited_admin = reqwest::Client::new()
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&server.token)
        .json(&json!({"name": "ops", "role": "admin", "agents": "staging-*"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&limited_admin)
        .json(&json!({"name": "wide", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // The user limited in the users file sees the same from the console's
    // session.
    let cookie = server
        .login(&[("username", "sam"), ("password", "sam-pw")])
        .await
        .unwrap();
    let listed: Value = reqwest::Client::new()
        .get(server.url("/api/v1/agents"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["staging-1"]);
    // Without a name, "the only agent" is the only one it can see.
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/exec"))
        .header("cookie", &cookie)
        .header("origin", server.origin())
        .json(&json!({"command": "echo mine"}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["stdout"], "mine\n", "{body}");
    let mut ws = common::ws::open_ws(&server, Some(&cookie), Some(&server.origin()))
        .await
        .unwrap();
    let hello = common::ws::next_json(&mut ws).await;
    assert_eq!(hello["agents"].as_array().unwrap().len(), 1, "{hello}");
    common::ws::send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "true", "agent": "prod-1"}),
    )
    .await;
    let refused = common::ws::next_json(&mut ws).await;
    assert!(refused.to_string().contains("no agent named"), "{refused}");
}

#[tokio::test]
async fn a_streamed_fan_out_ends_its_commands_when_the_client_goes() {
    let (_hosts, server, _dir) = dialed_fleet(2, "q", &[]).await;
    // One host at a time; each leaves a marker, prints its pid and then
    // keeps quiet.
    let marks = tempfile::tempdir().unwrap();
    let cmd = format!(
        "touch {}/started.$PPID; echo $$; exec sleep 60",
        marks.path().display()
    );
    let mut lines = Box::pin(
        stream_lines(
            &server,
            json!({"command": cmd, "target": "*", "concurrency": 1}),
        )
        .await,
    );
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next())
        .await
        .expect("the first host's line")
        .unwrap();
    let pid: i32 = first["data"].as_str().unwrap().trim().parse().unwrap();
    assert!(common::alive(pid));
    drop(lines);
    assert!(
        common::wait_gone(pid).await,
        "the quiet command outlived its client"
    );
    // The host that waited its turn never started.
    let started = std::fs::read_dir(marks.path()).unwrap().count();
    assert_eq!(started, 1, "a host started after its client had gone");
}

#[tokio::test]
async fn metrics_tell_agents_commands_and_sessions_to_an_admin_or_the_metrics_token() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_token = "metrics-0123456789abcdef0123";
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, metrics_token).unwrap();
    let (_hosts, server, _files) = dialed_fleet(
        2,
        "m",
        &["--metrics-token-file", token_file.to_str().unwrap()],
    )
    .await;
    let (_, body) = exec(&server, json!({"command": "exit 3", "target": "*"})).await;
    assert_eq!(body["summary"]["failed"], 2, "{body}");
    let scrape = |token: &str| {
        let (url, token) = (server.url("/metrics"), token.to_owned());
        async move {
            let resp = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    // A made-up method makes no label set of its own.
    let odd = reqwest::Client::new()
        .request(
            reqwest::Method::from_bytes(b"FOOBAR").unwrap(),
            server.url("/api/v1/exec"),
        )
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(odd.status(), 405);
    // The agents' RTT comes with their first pong: wait for it (bounded).
    let mut text = String::new();
    for _ in 0..200 {
        let (status, t) = scrape(metrics_token).await;
        assert_eq!(status, 200, "{t}");
        text = t;
        if text.contains("conch_agent_rtt_seconds{agent=\"m1\"}") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for needle in [
        "conch_agent_connected{agent=\"m0\"} 1",
        "conch_agent_connected{agent=\"m1\"} 1",
        "conch_agent_rtt_seconds{agent=\"m0\"}",
        "conch_commands_finished_total{outcome=\"exit_nonzero\"} 2",
        "conch_commands_running 0",
        "conch_api_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/exec\",status=\"200\"} 1",
        "# EOF",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    // An admin may read them; nobody else, and the metrics token opens
    // nothing but them.
    assert!(!text.contains("FOOBAR"), "{text}");
    assert_eq!(scrape(&server.token).await.0, 200);
    let operator = server.create_token("op", "operator").await;
    assert_eq!(scrape(&operator).await.0, 403);
    assert_eq!(common::status(server.url("/metrics")).await, 401);
    let resp = reqwest::Client::new()
        .get(server.url("/api/v1/agents"))
        .bearer_auth(metrics_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_fan_out_cannot_outgrow_the_output_budget_and_a_viewer_cannot_fan_out() {
    let (_hosts, server, dir) = dialed_fleet(2, "b", &["--buffered-output-budget-mib", "1"]).await;
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    // Two hosts' output at 200 000 bytes a stream needs 2 MB of buffer:
    // refused before any host runs anything.
    let (status, body) = exec(
        &server,
        json!({"command": touch, "target": "*", "max_output_bytes": 200_000}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    // The same within the budget runs on both.
    let (status, body) = exec(
        &server,
        json!({"command": "true", "target": "*", "max_output_bytes": 50_000}),
    )
    .await;
    assert_eq!(
        (status, body["summary"]["ok"].clone()),
        (200, json!(2)),
        "{body}"
    );
    // A viewer runs nothing anywhere.
    let viewer = server.create_token("v", "viewer").await;
    let (status, body) = common::post_json(
        server.url("/api/v1/exec"),
        &viewer,
        &json!({"command": touch, "target": "*"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!marker.exists(), "a refused fan-out ran a command");
}
