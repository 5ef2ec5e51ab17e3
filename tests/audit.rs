//! The audit log against real stores: SQLite in the data directory and a
//! real PostgreSQL (a throwaway cluster, or `CONCH_TEST_DATABASE_URL`),
//! written by real servers, read over REST and with `conch audit`, and its
//! chain checked with `conch audit verify`.

mod common;

use std::time::Duration;

use common::postgres::Postgres;
use common::{Endpoint, Server, server_command, server_from, start_agent};
use serde_json::{Value, json};

/// Where a server keeps its store.
enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(Postgres),
}

impl Store {
    fn flags(&self) -> Vec<String> {
        match self {
            Store::Sqlite(dir) => vec!["--data-dir".into(), dir.path().display().to_string()],
            Store::Postgres(pg) => vec!["--database-url".into(), pg.url.clone()],
        }
    }

    /// `conch audit verify`'s arguments for this store.
    fn verify_args(&self) -> Vec<String> {
        let mut v = vec!["audit".into(), "verify".into()];
        v.extend(self.flags());
        v
    }

    /// Runs SQL on the store, as someone with access to it would.
    fn sql(&self, statement: &str) {
        let out = match self {
            Store::Sqlite(dir) => std::process::Command::new("sqlite3")
                .arg(dir.path().join("conch.db"))
                .arg(statement)
                .output(),
            Store::Postgres(pg) => std::process::Command::new("psql")
                .arg(&pg.url)
                .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", statement])
                .output(),
        }
        .expect("run the database's client");
        assert!(
            out.status.success(),
            "{statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `conch serve`'s flags for `agent` (an agent outside the servers, so
/// that several servers, or a restarted one, reach the same).
fn agent_flags(agent: &common::Agent) -> Vec<String> {
    vec![
        "--agent".to_owned(),
        agent.addr.to_string(),
        "--agent-key-file".to_owned(),
        agent.key_file.display().to_string(),
    ]
}

/// A server on `store` with the users olga (operator) and vera (viewer);
/// the users file's directory lives as long as it.
struct Running {
    server: Server,
    _users: tempfile::TempDir,
}

impl std::ops::Deref for Running {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

fn server_on(store: &Store, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let users = common::users_file(dir.path());
    let mut cmd = server_command(&["--users-file", &users]);
    cmd.args(store.flags()).args(extra);
    Running {
        server: server_from(cmd, true),
        _users: dir,
    }
}

fn conch(args: &[String], env: &[(&str, String)]) -> (Option<i32>, String, String) {
    let mut c = std::process::Command::new(common::bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The audit records (newest first) once `done` holds of them; a bounded wait.
async fn records_until(
    server: &Server,
    query: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..200 {
        let page =
            common::get_json(server.url(&format!("/api/v1/audit?{query}")), &server.token).await;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        if done(&records) {
            return records;
        }
        last = records;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the audit log never showed what was expected ({query}): {:?}",
        kinds(&last)
    );
}

fn kinds(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn exec(server: &Server, token: &str, command: &str) -> Value {
    common::post_json(
        server.url("/api/v1/exec"),
        token,
        &json!({"command": command}),
    )
    .await
    .1
}

/// Every kind the server writes, then the log read back and its chain
/// broken three ways.
async fn suite(store: Store) {
    let server = server_on(&store, &[]);
    let admin = server.token.clone();
    // Logins: olga, a wrong password, vera; olga logs out.
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    assert!(
        server
            .login(&[("username", "olga"), ("password", "nope")])
            .await
            .is_err()
    );
    let vera = server
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    // Commands over REST (one with a request id), a refusal by policy.
    let done = exec(&server, &admin, "echo audited-$((6*7))").await;
    assert_eq!(done["stdout"], "audited-42\n");
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/exec"))
        .header("cookie", &vera)
        .header("origin", server.origin())
        .json(&json!({"command": "id"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Tokens, files, a console command.
    let ci = server.create_token("ci", "operator").await;
    let resp = reqwest::Client::new()
        .delete(server.url("/api/v1/tokens/ci"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    drop(ci);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("audited.txt");
    let put = reqwest::Client::new()
        .put(server.url(&format!("/api/v1/files?path={}", target.display())))
        .bearer_auth(&admin)
        .body("file body")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let got = reqwest::Client::new()
        .get(server.url(&format!("/api/v1/files?path={}", target.display())))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(got.text().await.unwrap(), "file body");
    let mut ws = common::ws::open_ws(&server, Some(&olga), Some(&server.origin()))
        .await
        .unwrap();
    let _hello = common::ws::next_json(&mut ws).await;
    let (out, _, exit) = common::ws::run(&mut ws, 1, "echo from-the-console").await;
    assert_eq!(String::from_utf8_lossy(&out), "from-the-console\n");
    assert_eq!(exit["code"], 0);
    assert_eq!(server.logout(&olga).await, 303);

    // A refused bearer token is a failed login too.
    let refused = reqwest::Client::new()
        .get(server.url("/api/v1/agents"))
        .bearer_auth("not-a-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let want = [
        "login",
        "login_failed",
        "command_start",
        "command_end",
        "denied",
        "token_create",
        "token_revoke",
        "file_put",
        "file_get",
        "logout",
    ];
    let all = records_until(&server, "limit=1000", |r| {
        let k = kinds(r);
        want.iter().all(|w| k.iter().any(|x| x == w))
            && r.iter().filter(|x| x["kind"] == "command_end").count() >= 2
    })
    .await;
    let find = |kind: &str, pick: &dyn Fn(&Value) -> bool| {
        all.iter()
            .find(|r| r["kind"] == kind && pick(r))
            .unwrap_or_else(|| panic!("no {kind} record that fits in {all:#?}"))
            .clone()
    };
    let start = find("command_start", &|r| {
        r["detail"]["command"] == "echo audited-$((6*7))"
    });
    assert_eq!(start["user"], "admin");
    assert_eq!(start["via"], "rest");
    assert_eq!(start["agent"], "local");
    assert_eq!(start["source"], "127.0.0.1");
    let end = find("command_end", &|r| {
        r["detail"]["command"] == "echo audited-$((6*7))"
    });
    assert_eq!(end["detail"]["exit"]["code"], 0);
    assert_eq!(end["detail"]["bytes_out"], 11);
    let console = find("command_start", &|r| r["via"] == "console");
    assert_eq!(console["user"], "olga");
    assert_eq!(console["detail"]["command"], "echo from-the-console");
    let failed = find("login_failed", &|r| r["via"] == "login");
    assert_eq!(failed["user"], "olga");
    let bearer = find("login_failed", &|r| r["via"] == "rest");
    assert_eq!(bearer["detail"]["reason"], "bearer token refused");
    assert_eq!(bearer["source"], "127.0.0.1");
    assert!(
        !bearer.to_string().contains("not-a-token"),
        "no token in the log"
    );
    assert!(
        !failed.to_string().contains("nope"),
        "a password never reaches the log"
    );
    let denied = find("denied", &|_| true);
    assert_eq!(denied["user"], "vera");
    let put = find("file_put", &|_| true);
    assert_eq!(put["detail"]["size"], 9);
    use sha2::Digest;
    let body_hash = hex::encode(sha2::Sha256::digest(b"file body"));
    assert_eq!(put["detail"]["sha256"], body_hash.as_str());
    // Chained: each links to the one before.
    for pair in all.windows(2) {
        assert_eq!(
            pair[0]["prev_hash"], pair[1]["hash"],
            "newest first, linked"
        );
    }

    // Filters and pages over REST; the same with `conch audit`.
    let only = records_until(&server, "kind=login&user=olga", |r| !r.is_empty()).await;
    assert!(
        only.iter()
            .all(|r| r["kind"] == "login" && r["user"] == "olga")
    );
    let texts = records_until(&server, "text=AUDITED-", |r| r.len() >= 2).await;
    assert!(
        texts
            .iter()
            .all(|r| r["detail"].to_string().contains("audited-"))
    );
    let first = common::get_json(server.url("/api/v1/audit?limit=2"), &admin).await;
    let cursor = first["next"].as_i64().expect("a next page");
    let second = common::get_json(
        server.url(&format!("/api/v1/audit?limit=2&cursor={cursor}")),
        &admin,
    )
    .await;
    assert!(second["records"][0]["seq"].as_i64().unwrap() < cursor);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &admin).unwrap();
    let env = [
        ("CONCH_SERVER", server.url("")),
        ("CONCH_TOKEN_FILE", token_file.display().to_string()),
    ];
    let (code, out, err) = conch(
        &[
            "audit".into(),
            "--kind".into(),
            "command_start".into(),
            "--json".into(),
        ],
        &env,
    );
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2 && lines.iter().all(|r| r["kind"] == "command_start"));
    let (code, table, _) = conch(&["audit".into(), "--user".into(), "vera".into()], &env);
    assert_eq!(code, Some(0));
    assert!(
        table.starts_with("TIME") && table.contains("denied"),
        "{table}"
    );
    // A viewer reads only its own records.
    let mine: Value = reqwest::Client::new()
        .get(server.url("/api/v1/audit?user=admin"))
        .header("cookie", &vera)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        mine["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["user"] == "vera")
    );

    // The chain: intact; an edited record; a removed one; the end cut off.
    drop(ws);
    drop(server);
    let (code, out, err) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("intact"), "{out}");
    store.sql("UPDATE audit SET detail = '{\"command\":\"ls\"}' WHERE seq = 3");
    let (code, out, _) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("record 3 was changed"), "{out}");
    store.sql("DELETE FROM audit WHERE seq = 3");
    let (code, out, _) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("record 3 is missing"), "{out}");
}

#[tokio::test]
async fn sqlite_records_every_kind_and_its_chain_shows_tampering() {
    suite(Store::Sqlite(tempfile::tempdir().unwrap())).await;
}

#[tokio::test]
async fn postgres_records_every_kind_and_its_chain_shows_tampering() {
    suite(Store::Postgres(Postgres::start())).await;
}

#[tokio::test]
async fn records_removed_from_the_end_are_found() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &[]);
    for i in 0..3 {
        exec(&server, &server.token, &format!("echo {i}")).await;
    }
    records_until(&server, "kind=command_end", |r| r.len() == 3).await;
    drop(server);
    store.sql("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)");
    let (code, out, _) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("removed from its end"), "{out}");
}

#[tokio::test]
async fn two_servers_on_one_postgres_write_one_chain() {
    let pg = Postgres::start();
    let store = Store::Postgres(pg);
    let agent = start_agent(&[]);
    let flags = agent_flags(&agent);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut one_flags = flags.clone();
    one_flags.extend(["--server-name", "one"]);
    let mut two_flags = flags.clone();
    two_flags.extend(["--server-name", "two"]);
    let one = server_on(&store, &one_flags);
    let two = server_on(&store, &two_flags);
    // Both at once, many times: one chain, in one order.
    let runs = (0..20).map(|i| {
        let (one, two) = (&one, &two);
        async move {
            exec(one, &one.token, &format!("echo one-{i}")).await;
            exec(two, &two.token, &format!("echo two-{i}")).await;
        }
    });
    futures_util::future::join_all(runs).await;
    let all = records_until(&one, "kind=command_end&limit=1000", |r| r.len() == 40).await;
    let servers: std::collections::HashSet<_> = all
        .iter()
        .map(|r| r["server"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(servers.len(), 2, "{servers:?}");
    let seen_by_two = records_until(&two, "kind=command_end&limit=1000", |r| r.len() == 40).await;
    assert_eq!(all, seen_by_two, "one log, the same from either server");
    drop((one, two));
    let (code, out, err) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test]
async fn a_killed_server_leaves_a_start_record_for_every_command_it_ran() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let agent = start_agent(&[]);
    let flags = agent_flags(&agent);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = server_on(&store, &flags);
    // 100 commands at once, each leaving a mark on the host as it starts.
    let marks = tempfile::tempdir().unwrap();
    let url = server.url("/api/v1/exec");
    let token = server.token.clone();
    let mut runs = Vec::new();
    for i in 0..100 {
        let (url, token) = (url.clone(), token.clone());
        let mark = marks.path().join(format!("m{i}"));
        runs.push(tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"command": format!("touch {}; sleep 30", mark.display())}))
                .send()
                .await;
        }));
    }
    // Once some have started, the server dies without a word.
    for _ in 0..400 {
        if std::fs::read_dir(marks.path()).unwrap().count() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let started = std::fs::read_dir(marks.path()).unwrap().count();
    assert!(started >= 20, "only {started} commands started");
    server.proc.signal(libc::SIGKILL);
    let mut server = server;
    let _ = server.server.proc.child.wait();
    for r in runs {
        let _ = r.await;
    }
    let marked: Vec<String> = std::fs::read_dir(marks.path())
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    // The store opens again, and holds a start for every command that ran.
    let again = server_on(&store, &flags);
    let starts = records_until(&again, "kind=command_start&limit=1000", |r| !r.is_empty()).await;
    for mark in &marked {
        assert!(
            starts.iter().any(|r| r["detail"]["command"]
                .as_str()
                .unwrap_or_default()
                .contains(mark.as_str())),
            "{mark} ran without a start record"
        );
    }
    drop(again);
    let (code, out, err) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test]
async fn fan_out_commands_and_fields_a_client_chose_are_recorded_safely() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &[]);
    // A command on a target: each host's start and end.
    let (status, body) = common::post_json(
        server.url("/api/v1/exec"),
        &server.token,
        &json!({"command": "echo fanned", "target": "local"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Fields a client chose, with a NUL and control characters in them:
    // stored (on any store), readable, never able to stop the writer.
    assert!(
        server
            .login(&[("username", "olga\u{0}\u{1b}[2J"), ("password", "x")])
            .await
            .is_err()
    );
    let vera = server
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    let mut ws = common::ws::open_ws(&server, Some(&vera), Some(&server.origin()))
        .await
        .unwrap();
    let _hello = common::ws::next_json(&mut ws).await;
    common::ws::send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "id", "agent": "lo\u{0}cal\u{1b}"}),
    )
    .await;
    let refused = common::ws::next_json(&mut ws).await;
    assert_eq!(refused["type"], "error", "{refused}");
    // A command line too long to keep whole is cut, and says so with the
    // whole one's length and hash: its tail cannot hide.
    let long = format!("true{}; echo hidden-tail", " ".repeat(5000));
    let done = exec(&server, &server.token, &long).await;
    assert_eq!(done["stdout"], "hidden-tail\n");
    // An admin token limited to some agents reads only its own records.
    let (status, made) = common::post_json(
        server.url("/api/v1/tokens"),
        &server.token,
        &json!({"name": "lim", "role": "admin", "agents": "nomatch"}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let limited = made["token"].as_str().unwrap().to_owned();
    let all = records_until(&server, "limit=100", |r| {
        let k = kinds(r);
        k.iter().filter(|k| *k == "command_end").count() == 2
            && k.iter().any(|k| k == "denied")
            && k.iter().any(|k| k == "login_failed")
    })
    .await;
    let start = all
        .iter()
        .find(|r| r["kind"] == "command_start" && r["detail"]["target"] == "local")
        .unwrap();
    assert_eq!(start["detail"]["target"], "local");
    // Its end repeats the command and says how the host fared.
    let end = all
        .iter()
        .find(|r| r["kind"] == "command_end" && r["detail"]["host_status"].is_string())
        .expect("the fanned host's end says how it fared");
    assert_eq!(end["detail"]["host_status"], "ok", "{end}");
    assert_eq!(end["detail"]["command"], "echo fanned", "{end}");
    let cut = all
        .iter()
        .find(|r| r["kind"] == "command_start" && r["detail"]["command_cut"].is_object())
        .expect("the long command's record");
    use sha2::Digest;
    assert_eq!(
        cut["detail"]["command_cut"]["sha256"],
        hex::encode(sha2::Sha256::digest(long.as_bytes())).as_str()
    );
    assert_eq!(cut["detail"]["command_cut"]["length"], long.len());
    let own = common::get_json(server.url("/api/v1/audit?user=admin"), &limited).await;
    assert!(
        own["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["user"] == "lim"),
        "{own}"
    );
    assert_eq!(start["detail"]["command"], "echo fanned");
    let failed = all.iter().find(|r| r["kind"] == "login_failed").unwrap();
    assert_eq!(
        failed["user"], "(unknown user)",
        "what was typed is not kept"
    );
    let denied = all.iter().find(|r| r["kind"] == "denied").unwrap();
    let agent = denied["agent"].as_str().unwrap();
    assert!(!agent.chars().any(char::is_control), "{agent:?}");
    drop(ws);
    drop(server);
    let (code, out, err) = conch(&store.verify_args(), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// `GET /api/v1/session` with `cookie`: the user's name, or the status.
async fn whoami(server: &Server, cookie: &str) -> Result<String, u16> {
    let resp = reqwest::Client::new()
        .get(server.url("/api/v1/session"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let v: Value = resp.json().await.unwrap();
    Ok(v["user"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_restart_logs_nobody_out() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let agent = start_agent(&[]);
    let flags = agent_flags(&agent);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = server_on(&store, &flags);
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    assert_eq!(whoami(&server, &olga).await, Ok("olga".into()));
    drop(server);
    let again = server_on(&store, &flags);
    assert_eq!(
        whoami(&again, &olga).await,
        Ok("olga".into()),
        "still logged in"
    );
    assert_eq!(whoami(&again, "conch_session=forged").await, Err(401));
    assert_eq!(again.logout(&olga).await, 303);
    assert_eq!(whoami(&again, &olga).await, Err(401));
    drop(again);
    let third = server_on(&store, &flags);
    assert_eq!(
        whoami(&third, &olga).await,
        Err(401),
        "a logout is for good"
    );
}

#[tokio::test]
async fn a_login_on_one_server_is_valid_on_another_sharing_its_postgres() {
    let store = Store::Postgres(Postgres::start());
    let agent = start_agent(&[]);
    let flags = agent_flags(&agent);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let one = server_on(&store, &flags);
    let two = server_on(&store, &flags);
    let olga = one
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    assert_eq!(whoami(&two, &olga).await, Ok("olga".into()));
    // A logout on the second ends it on the first too (within its recheck).
    assert_eq!(two.logout(&olga).await, 303);
    for _ in 0..300 {
        if whoami(&one, &olga).await == Err(401) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the first server still accepts a session ended on the second");
}

/// `GET /api/v1/agents` with `token`: the status.
async fn agents_status(server: &Server, token: &str) -> u16 {
    reqwest::Client::new()
        .get(server.url("/api/v1/agents"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_token_made_on_one_server_works_on_another_until_revoked() {
    let store = Store::Postgres(Postgres::start());
    let agent = start_agent(&[]);
    let flags = agent_flags(&agent);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let one = server_on(&store, &flags);
    let two = server_on(&store, &flags);
    let ci = one.create_token("ci", "operator").await;
    assert_eq!(
        agents_status(&two, &ci).await,
        200,
        "known on the second at once"
    );
    let done = exec(&two, &ci, "echo via-ci").await;
    assert_eq!(done["stdout"], "via-ci\n");
    let resp = reqwest::Client::new()
        .delete(two.url("/api/v1/tokens/ci"))
        .bearer_auth(&two.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(agents_status(&two, &ci).await, 401);
    for _ in 0..300 {
        if agents_status(&one, &ci).await == 401 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the first server still accepts a token revoked on the second");
}

#[tokio::test]
async fn tokens_of_an_older_conch_are_imported_once() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("conch_{}", "ab".repeat(32));
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    std::fs::write(
        dir.path().join("tokens.json"),
        json!([{"name": "old", "role": "operator", "sha256": sha, "created": 1}]).to_string(),
    )
    .unwrap();
    let store = Store::Sqlite(dir);
    let server = server_on(&store, &[]);
    assert_eq!(agents_status(&server, &token).await, 200);
    let Store::Sqlite(dir) = &store else {
        unreachable!()
    };
    assert!(!dir.path().join("tokens.json").exists());
    assert!(dir.path().join("tokens.json.imported").exists());
}

/// Output of console command `id` until it contains `needle` (acked as it
/// comes), or with `""` until it ends, and the text messages seen on the
/// way; a bounded wait.
async fn console_until(ws: &mut common::ws::Ws, id: u32, needle: &str) -> (String, Vec<Value>) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut seen, mut texts) = (Vec::new(), Vec::new());
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Binary(b) => {
                    let n = b.len() - 5;
                    common::ws::send(ws, json!({"type": "ack", "id": id, "bytes": n})).await;
                    seen.extend_from_slice(&b[5..]);
                    if !needle.is_empty() && String::from_utf8_lossy(&seen).contains(needle) {
                        return;
                    }
                }
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    let done = matches!(v["type"].as_str(), Some("exit" | "error"));
                    texts.push(v);
                    if done && needle.is_empty() {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    let done = wait.await.is_ok();
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(done, "no {needle:?} in {text:?}; messages: {texts:?}");
    (text, texts)
}

/// A recording's asciicast file, as `reader` gets it: (status, body).
async fn cast(server: &Server, reader: &str, id: &str) -> (u16, String) {
    let req =
        reqwest::Client::new().get(server.url(&format!("/api/v1/recordings/{id}?download=1")));
    let req = if reader.contains('=') {
        req.header("cookie", reader)
    } else {
        req.bearer_auth(reader)
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    if status == 200 {
        assert_eq!(resp.headers()["content-type"], "application/x-asciicast");
        let disposition = resp.headers()["content-disposition"].to_str().unwrap();
        assert_eq!(
            disposition,
            format!("attachment; filename=\"conch-{id}.cast\"")
        );
    }
    (status, resp.text().await.unwrap())
}

/// The header and events of an asciicast v2 file, checked line by line:
/// a header with version 2 and a size, then `[time, code, text]` events
/// in time order.
fn parse_cast(text: &str) -> (Value, Vec<(f64, String, String)>) {
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header")).unwrap();
    assert_eq!(header["version"], 2, "{header}");
    assert!(header["width"].as_u64().unwrap() > 0 && header["height"].as_u64().unwrap() > 0);
    let mut last = 0.0;
    let events: Vec<_> = lines
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            let t = v[0].as_f64().expect("a time");
            assert!(t >= last, "events in time order");
            last = t;
            let code = v[1].as_str().unwrap().to_owned();
            assert!(["o", "i", "r", "m"].contains(&code.as_str()), "{l}");
            (t, code, v[2].as_str().unwrap().to_owned())
        })
        .collect();
    (header, events)
}

fn output_of(events: &[(f64, String, String)]) -> String {
    events
        .iter()
        .filter(|e| e.1 == "o")
        .map(|e| e.2.as_str())
        .collect()
}

/// The recordings `reader` may list with `query`, once `done` holds of
/// them; a bounded wait.
async fn recordings_until(
    server: &Server,
    reader: &str,
    query: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut last = Value::Null;
    for _ in 0..200 {
        let req = reqwest::Client::new().get(server.url(&format!("/api/v1/recordings?{query}")));
        let req = if reader.contains('=') {
            req.header("cookie", reader)
        } else {
            req.bearer_auth(reader)
        };
        let page: Value = req.send().await.unwrap().json().await.unwrap();
        let list = page["recordings"].as_array().cloned().unwrap_or_default();
        if done(&list) {
            return list;
        }
        last = page;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the recordings never showed what was expected ({query}): {last}");
}

/// A shell typed into in the console, and a command past the size cap:
/// both recorded, listed under the audit log's rules, readable while
/// live, linked from the audit log, and asciicast v2 that asciinema reads.
async fn recordings_suite(store: Store) {
    let server = server_on(&store, &["--recording-max-bytes", "300000"]);
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let vera = server
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    let mut ws = common::ws::open_ws(&server, Some(&olga), Some(&server.origin()))
        .await
        .unwrap();
    assert_eq!(common::ws::next_json(&mut ws).await["type"], "hello");
    let shell = json!({"type": "exec", "id": 1, "pty": {"cols": 100, "rows": 30}});
    common::ws::send(&mut ws, shell).await;
    common::ws::send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "echo rec-$((6*7))-done\n"}),
    )
    .await;
    let (_, texts) = console_until(&mut ws, 1, "rec-42-done").await;
    let started = texts
        .iter()
        .find(|t| t["type"] == "started")
        .expect("started");
    let id = started["recording"]
        .as_str()
        .expect("a recording id")
        .to_owned();
    assert_eq!(id.len(), 32);

    // Live: listed without an end, and what was printed is readable
    // within the flush interval although the shell is quiet.
    let live = recordings_until(&server, &olga, "", |l| {
        l.iter()
            .any(|r| r["id"] == id.as_str() && r["ended_ms"].is_null())
    })
    .await;
    let entry = live.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(entry["user"], "olga");
    assert_eq!(entry["kind"], "session");
    assert_eq!(entry["cols"], 100);
    let mut so_far = String::new();
    for _ in 0..200 {
        so_far = cast(&server, &olga, &id).await.1;
        if output_of(&parse_cast(&so_far).1).contains("rec-42-done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        output_of(&parse_cast(&so_far).1).contains("rec-42-done"),
        "{so_far}"
    );

    // The page's resize is an `r` event; then the shell ends.
    common::ws::send(
        &mut ws,
        json!({"type": "resize", "id": 1, "cols": 120, "rows": 40}),
    )
    .await;
    common::ws::send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "stty size; exit\n"}),
    )
    .await;
    console_until(&mut ws, 1, "").await;
    // Past the cap: recorded up to it, with a marker saying why it stops.
    common::ws::send(
        &mut ws,
        json!({"type": "exec", "id": 2, "cmd": "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo tail-end"}),
    )
    .await;
    let (big, texts) = console_until(&mut ws, 2, "").await;
    assert!(
        big.contains("tail-end"),
        "the console still gets everything"
    );
    let big_id = texts
        .iter()
        .find(|t| t["type"] == "started")
        .and_then(|t| t["recording"].as_str())
        .expect("a recording")
        .to_owned();

    let ended = recordings_until(&server, &server.token, "user=olga", |l| {
        l.len() == 2 && l.iter().all(|r| !r["ended_ms"].is_null())
    })
    .await;
    assert_eq!(ended[0]["id"], big_id.as_str(), "newest first");
    assert_eq!(ended[0]["truncated"], true);
    assert_eq!(ended[1]["truncated"], false);
    assert_eq!(ended[1]["incomplete"], false);
    let (status, text) = cast(&server, &server.token, &id).await;
    assert_eq!(status, 200);
    let (header, events) = parse_cast(&text);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(100), Some(30))
    );
    let out = output_of(&events);
    assert!(
        out.contains("rec-42-done") && out.contains("40 120"),
        "{out}"
    );
    assert!(
        events.iter().any(|e| e.1 == "r" && e.2 == "120x40"),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e.1 != "i"),
        "typed input is not kept without --record-input"
    );
    // Past the cap: its first half and its latest half, the cut marked,
    // so that printing a lot first hides nothing that follows.
    let (_, capped) = cast(&server, &olga, &big_id).await;
    assert!(capped.len() < 500_000, "{}", capped.len());
    assert_eq!(ended[0]["bytes"].as_u64(), Some(capped.len() as u64));
    let (_, events) = parse_cast(&capped);
    // Where output was cut out (and, if the store fell behind the flood,
    // skipped): markers say so.
    let cut = events
        .iter()
        .position(|e| e.1 == "m")
        .expect("a marker where output was cut");
    assert!(
        events[cut].2.starts_with("output cut here")
            || events[cut].2.starts_with("output skipped here"),
        "{}",
        events[cut].2
    );
    let before = output_of(&events[..cut]);
    let after = output_of(&events[cut..]);
    assert!(
        before.starts_with("xxxx") && before.len() > 50_000,
        "{}",
        before.len()
    );
    // The flood's latest output is kept, to its very end.
    assert!(
        after.ends_with("xxx\r\ntail-end\r\n"),
        "{} bytes after the cut, ending {:?}; markers: {:?}",
        after.len(),
        &after[after.len().saturating_sub(40)..],
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.1 == "m")
            .map(|(i, e)| (i, e.2.clone()))
            .collect::<Vec<_>>()
    );

    // asciinema plays the file (in a terminal of its own, which it needs;
    // idle time cut to 0.1 s).
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let play = format!("asciinema play -i 0.1 {}", file.path().display());
    let played = std::process::Command::new("script")
        .args(["-qec", &play, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("asciinema (tests/run-all.sh installs it)");
    assert!(
        played.status.success(),
        "{}",
        String::from_utf8_lossy(&played.stderr)
    );
    assert!(String::from_utf8_lossy(&played.stdout).contains("rec-42-done"));

    // Filters; the audit log links to it.
    let found = recordings_until(&server, &server.token, "text=HEAD%20-C", |l| !l.is_empty()).await;
    assert!(found.iter().all(|r| r["id"] == big_id.as_str()));
    let first = common::get_json(server.url("/api/v1/recordings?limit=1"), &server.token).await;
    let next = first["next"].as_str().expect("a second page");
    let second = common::get_json(
        server.url(&format!("/api/v1/recordings?limit=1&cursor={next}")),
        &server.token,
    )
    .await;
    assert_eq!(second["recordings"][0]["id"], id.as_str());
    let starts = records_until(&server, "kind=command_start&user=olga", |r| r.len() >= 2).await;
    assert!(
        starts
            .iter()
            .any(|r| r["detail"]["recording"] == id.as_str())
    );

    // Someone else's recording is not found, and not listed.
    assert_eq!(cast(&server, &vera, &id).await.0, 404);
    let theirs = recordings_until(&server, &vera, "user=olga", |_| true).await;
    assert!(theirs.is_empty(), "{theirs:?}");
    assert_eq!(cast(&server, &server.token, &"0".repeat(32)).await.0, 404);
    assert_eq!(cast(&server, &server.token, "..%2F..%2Fetc").await.0, 404);

    // Output through no terminal is recorded as a terminal would show it.
    let (out, _, exit) = common::ws::run(&mut ws, 3, "echo one; echo two").await;
    assert_eq!(
        (out.as_slice(), exit["code"].as_i64()),
        (&b"one\ntwo\n"[..], Some(0))
    );
    let plain = recordings_until(&server, &olga, "text=echo%20one", |l| {
        l.len() == 1 && !l[0]["ended_ms"].is_null()
    })
    .await;
    let (_, text) = cast(&server, &olga, plain[0]["id"].as_str().unwrap()).await;
    assert_eq!(output_of(&parse_cast(&text).1), "one\r\ntwo\r\n");

    // Commands ending together have their chunks written together (one
    // statement for several recordings): each keeps its own output.
    for id in 10..15 {
        let cmd = format!("echo together-{id}");
        common::ws::send(&mut ws, json!({"type": "exec", "id": id, "cmd": cmd})).await;
    }
    let together = recordings_until(&server, &olga, "text=together", |l| {
        l.len() == 5 && l.iter().all(|r| !r["ended_ms"].is_null())
    })
    .await;
    for r in &together {
        let n = r["command"]
            .as_str()
            .unwrap()
            .trim_start_matches("echo together-");
        let (_, text) = cast(&server, &olga, r["id"].as_str().unwrap()).await;
        assert_eq!(output_of(&parse_cast(&text).1), format!("together-{n}\r\n"));
        assert_eq!(r["bytes"].as_i64(), Some(text.len() as i64), "{r}");
    }
}

#[tokio::test]
async fn sqlite_recordings_replay_as_asciicast() {
    recordings_suite(Store::Sqlite(tempfile::tempdir().unwrap())).await;
}

#[tokio::test]
async fn postgres_recordings_replay_as_asciicast() {
    recordings_suite(Store::Postgres(Postgres::start())).await;
}

#[tokio::test]
async fn postgres_takes_chunks_of_many_recordings_written_together() {
    // The writer's multi-row statements, on the store whose SQL differs
    // most from SQLite's (the unit test runs the same on SQLite).
    let pg = Postgres::start();
    let store = conch::store::Store::open(&pg.url).await.unwrap();
    conch::recording::check_chunks_written_together(&store)
        .await
        .unwrap();
}

/// `conch user ...` against `server` as its admin, with `stdin` given:
/// (exit code, stdout, stderr).
fn conch_user(server: &Server, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(common::bin())
        .arg("user")
        .args(args)
        .env("CONCH_SERVER", server.url(""))
        .env("CONCH_TOKEN", &server.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Users managed in the store with `conch user`: they log in (on every
/// server sharing the store), a new password or a deletion logs them out,
/// the users file's names are off limits, only full admins manage them,
/// and each change is in the audit log without its password.
async fn users_suite(store: Store, two_servers: bool) {
    let a = server_on(&store, &[]);
    let b = two_servers.then(|| server_on(&store, &[]));
    let other: &Server = b.as_deref().unwrap_or(&a);
    let ok = |r: (Option<i32>, String, String)| assert_eq!(r.0, Some(0), "{}{}", r.1, r.2);
    let refused = |r: (Option<i32>, String, String), why: &str| {
        assert_eq!(r.0, Some(1), "{}{}", r.1, r.2);
        assert!(r.2.contains(why), "{why:?} in {}", r.2);
    };
    ok(conch_user(
        &a,
        &["add", "nina", "--role", "operator"],
        "first-secret-1\n",
    ));
    let refusals: [(&[&str], &str, &str); 5] = [
        (
            &["add", "nina", "--role", "viewer"],
            "another-pw-2\n",
            "store",
        ),
        (
            &["add", "olga", "--role", "admin"],
            "another-pw-2\n",
            "users file",
        ),
        (
            &["add", "admin", "--role", "admin"],
            "another-pw-2\n",
            "admin token",
        ),
        (
            &["add", "tess", "--role", "viewer"],
            "short\n",
            "8 characters",
        ),
        (&["passwd", "olga"], "another-pw-2\n", "users file"),
    ];
    for (args, stdin, why) in refusals {
        refused(conch_user(&a, args, stdin), why);
    }
    // One name, one principal, whatever its case: a file user, a store
    // user, an API token.
    for (name, why) in [
        ("Admin", "admin token"),
        ("OLGA", "users file"),
        ("Nina", "store"),
    ] {
        refused(
            conch_user(&a, &["add", name, "--role", "admin"], "another-pw-2\n"),
            why,
        );
    }
    let _ci = a.create_token("ci-bot", "operator").await;
    refused(
        conch_user(&a, &["add", "CI-bot", "--role", "admin"], "another-pw-2\n"),
        "API token",
    );
    let named_like_nina = reqwest::Client::new()
        .post(a.url("/api/v1/tokens"))
        .bearer_auth(&a.token)
        .json(&json!({"name": "nina", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(named_like_nina.status(), 409);
    let (code, listed, _) = conch_user(other, &["list", "--json"], "");
    assert_eq!(code, Some(0));
    assert!(
        !listed.contains("argon2") && !listed.contains("first-secret"),
        "{listed}"
    );
    let users: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<(&str, &str)> = users
        .iter()
        .map(|u| (u["name"].as_str().unwrap(), u["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [("nina", "store"), ("olga", "file"), ("vera", "file")]
    );

    // nina logs in on both servers, and runs a command as herself.
    let on_a = nina(&a, "first-secret-1").await.expect("nina logs in");
    let on_other = nina(other, "first-secret-1")
        .await
        .expect("on the other server too");
    assert_eq!(whoami(&a, &on_a).await, Ok("nina".into()));
    let mut ws = common::ws::open_ws(other, Some(&on_other), Some(&other.origin()))
        .await
        .unwrap();
    assert_eq!(common::ws::next_json(&mut ws).await["role"], "operator");
    let (out, _, _) = common::ws::run(&mut ws, 1, "echo as-nina").await;
    assert_eq!(out, b"as-nina\n");

    // Only full admins manage users.
    let vera = a
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    let resp = reqwest::Client::new()
        .post(a.url("/api/v1/users"))
        .header("cookie", &vera)
        .header("origin", a.origin())
        .json(&json!({"name": "eve", "password": "eve-password", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // A new password ends her sessions: here at once, on the other
    // server within its recheck time.
    ok(conch_user(&a, &["passwd", "nina"], "second-secret-2\n"));
    assert_eq!(whoami(&a, &on_a).await, Err(401));
    let mut ended = false;
    for _ in 0..300 {
        if whoami(other, &on_other).await == Err(401) {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ended, "the other server ended her session");
    // Her open console there ends too, without a request of hers.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        use futures_util::StreamExt;
        while let Some(Ok(msg)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = msg
                && t.contains("session_expired")
            {
                return true;
            }
        }
        true
    })
    .await;
    assert_eq!(
        closed,
        Ok(true),
        "her console on the other server was closed"
    );
    assert!(nina(&a, "first-secret-1").await.is_err());
    let again = nina(other, "second-secret-2")
        .await
        .expect("the new password");
    ok(conch_user(&a, &["del", "nina"], ""));
    assert_eq!(whoami(&a, &again).await, Err(401));
    assert!(nina(&a, "second-secret-2").await.is_err(), "deleted");
    refused(conch_user(&a, &["del", "nina"], ""), "no user");

    let changes = records_until(&a, "kind=user_change", |r| r.len() == 3).await;
    let actions: Vec<&str> = changes
        .iter()
        .map(|r| r["detail"]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["delete", "password", "add"]);
    assert!(
        changes
            .iter()
            .all(|r| r["user"] == "admin" && r["detail"]["name"] == "nina")
    );
    let text = serde_json::to_string(&changes).unwrap();
    assert!(!text.contains("secret-"), "no password in the log: {text}");
}

async fn nina(s: &Server, password: &str) -> Result<String, reqwest::StatusCode> {
    s.login(&[("username", "nina"), ("password", password)])
        .await
}

#[tokio::test]
async fn sqlite_users_are_managed_in_the_store() {
    users_suite(Store::Sqlite(tempfile::tempdir().unwrap()), false).await;
}

#[tokio::test]
async fn postgres_users_are_shared_by_servers() {
    users_suite(Store::Postgres(Postgres::start()), true).await;
}

/// Runs `command` as console command `id`; returns its recording's id.
async fn recorded(ws: &mut common::ws::Ws, id: u32, command: &str) -> String {
    common::ws::send(ws, json!({"type": "exec", "id": id, "cmd": command})).await;
    let (_, texts) = console_until(ws, id, "").await;
    let started = texts.iter().find(|t| t["type"] == "started").unwrap();
    started["recording"].as_str().expect("recorded").to_owned()
}

/// Past `--recording-max-total-bytes`, finished recordings are removed,
/// the oldest of the user whose recordings take the most first: one user
/// printing a lot removes their own, not everyone's.
#[tokio::test]
async fn recordings_past_the_total_cap_go_heaviest_user_first() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &["--recording-max-total-bytes", "12000"]);
    let mut admin = common::ws::console(&server).await;
    let admins = recorded(&mut admin, 1, "echo the-admins-own").await;
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let mut ws = common::ws::open_ws(&server, Some(&olga), Some(&server.origin()))
        .await
        .unwrap();
    common::ws::next_json(&mut ws).await;
    let mut ids = Vec::new();
    for i in 1..=8u32 {
        // About 2 KiB that does not compress.
        ids.push(recorded(&mut ws, i, "head -c 1500 /dev/urandom | base64").await);
    }
    let (oldest, newest) = (ids[0].clone(), ids[7].clone());
    let left = recordings_until(&server, &server.token, "", |l| {
        let has = |id: &str| l.iter().any(|r| r["id"] == id);
        !has(&oldest) && has(&newest)
    })
    .await;
    assert!(
        left.iter().any(|r| r["id"] == admins.as_str()),
        "the light user's recording stays: {left:?}"
    );
}

/// A store that refuses writes for a while: `/readyz` says so, the
/// recordings it cut are marked incomplete, and recording goes on once it
/// works again.
#[tokio::test]
async fn a_failing_store_marks_recordings_incomplete_and_recovers() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &[]);
    let mut ws = common::ws::console(&server).await;
    let shell = json!({"type": "exec", "id": 1, "pty": {"cols": 80, "rows": 24}});
    common::ws::send(&mut ws, shell).await;
    let type_in = |line: &str| json!({"type": "stdin", "id": 1, "data": format!("{line}\n")});
    common::ws::send(&mut ws, type_in("echo before-$((1+1))")).await;
    let (_, texts) = console_until(&mut ws, 1, "before-2").await;
    let id = texts
        .iter()
        .find_map(|t| t["recording"].as_str())
        .unwrap()
        .to_owned();
    assert_eq!(common::status(server.url("/readyz")).await, 200);
    store.sql("ALTER TABLE recording_chunks RENAME TO recording_chunks_away");
    common::ws::send(&mut ws, type_in("echo during-$((2+2))")).await;
    console_until(&mut ws, 1, "during-4").await;
    let mut seen = 0;
    for _ in 0..300 {
        seen = common::status(server.url("/readyz")).await;
        if seen == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, 503, "/readyz reports the failing store");
    // Once the writer gave up on those writes (after its retries), the
    // store is mended.
    let mut lost = false;
    for _ in 0..300 {
        let metrics = reqwest::Client::new()
            .get(server.url("/metrics"))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        lost = metrics
            .lines()
            .any(|l| l.starts_with("conch_recording_writes_lost_total ") && !l.ends_with(" 0"));
        if lost {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(lost, "the metrics count the lost writes");
    store.sql("ALTER TABLE recording_chunks_away RENAME TO recording_chunks");
    common::ws::send(&mut ws, type_in("echo after-$((3+3)); exit")).await;
    console_until(&mut ws, 1, "").await;
    let done = recordings_until(&server, &server.token, "", |l| {
        l.iter()
            .any(|r| r["id"] == id.as_str() && !r["ended_ms"].is_null() && r["incomplete"] == true)
    })
    .await;
    assert!(done.iter().any(|r| r["id"] == id.as_str()));
    let (_, text) = cast(&server, &server.token, &id).await;
    let out = output_of(&parse_cast(&text).1);
    // What the store refused is gone (and said so); what came after the
    // repair is there.
    assert!(out.contains("after-6"), "{out}");
}

/// One user printing as fast as they can never costs another user their
/// recording: the writer's room is shared in turn, and nothing is lost.
#[tokio::test]
async fn a_flood_of_output_loses_no_one_elses_recording() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &[]);
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let mut flood = common::ws::open_ws(&server, Some(&olga), Some(&server.origin()))
        .await
        .unwrap();
    common::ws::next_json(&mut flood).await;
    common::ws::send(
        &mut flood,
        json!({"type": "exec", "id": 1, "cmd": "head -c 6000000 /dev/urandom | base64"}),
    )
    .await;
    // The flood is under way, read as fast as it comes, while the other
    // user's commands run.
    console_until(&mut flood, 1, "\n").await;
    let flooding = tokio::spawn(async move {
        console_until(&mut flood, 1, "").await;
    });
    let mut admin = common::ws::console(&server).await;
    let mut mine = Vec::new();
    for i in 1..=5u32 {
        mine.push(recorded(&mut admin, i, &format!("echo not-lost-{i}")).await);
    }
    assert_eq!(common::status(server.url("/readyz")).await, 200);
    flooding.await.unwrap();
    for (i, id) in mine.iter().enumerate() {
        let list = recordings_until(&server, &server.token, "user=admin", |l| {
            l.iter()
                .any(|r| r["id"] == id.as_str() && !r["ended_ms"].is_null())
        })
        .await;
        let entry = list.iter().find(|r| r["id"] == id.as_str()).unwrap();
        assert_eq!(entry["incomplete"], false);
        let (_, text) = cast(&server, &server.token, id).await;
        assert!(output_of(&parse_cast(&text).1).contains(&format!("not-lost-{}", i + 1)));
    }
    let theirs = recordings_until(&server, &olga, "", |l| {
        l.first().is_some_and(|r| !r["ended_ms"].is_null())
    })
    .await;
    assert_eq!(theirs[0]["incomplete"], false, "{:?}", theirs[0]);
    assert_eq!(common::status(server.url("/readyz")).await, 200);
}

/// With `--record-input`, what was typed is recorded (`i` events); a
/// console closed while its command runs still ends its recording; and a
/// small cap never cuts the header, however long the command line.
#[tokio::test]
async fn input_closed_consoles_and_small_caps_keep_recordings_whole() {
    let store = Store::Sqlite(tempfile::tempdir().unwrap());
    let server = server_on(&store, &["--record-input", "--recording-max-bytes", "4096"]);
    let mut ws = common::ws::console(&server).await;
    common::ws::send(&mut ws, json!({"type": "exec", "id": 1, "cmd": "cat"})).await;
    // A key on its own goes straight to the link; one with `eof` through
    // the command's input queue: both are recorded.
    common::ws::send(&mut ws, json!({"type": "stdin", "id": 1, "data": "a-key"})).await;
    common::ws::send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "typed-in-here\n", "eof": true}),
    )
    .await;
    let (_, texts) = console_until(&mut ws, 1, "").await;
    let typed = texts
        .iter()
        .find_map(|t| t["recording"].as_str())
        .unwrap()
        .to_owned();
    // A long command line, then the console goes while it runs.
    let long = format!("echo {}; sleep 30", "\u{1b}é".repeat(1500));
    common::ws::send(&mut ws, json!({"type": "exec", "id": 2, "cmd": long})).await;
    let (_, texts) = console_until(&mut ws, 2, "é").await;
    let cut_short = texts
        .iter()
        .find_map(|t| t["recording"].as_str())
        .unwrap()
        .to_owned();
    drop(ws);
    let list = recordings_until(&server, &server.token, "", |l| {
        l.len() == 2 && l.iter().all(|r| !r["ended_ms"].is_null())
    })
    .await;
    assert!(list.iter().any(|r| r["id"] == cut_short.as_str()));
    let (_, text) = cast(&server, &server.token, &typed).await;
    let (_, events) = parse_cast(&text);
    assert!(
        events
            .iter()
            .any(|e| e.1 == "i" && e.2 == "typed-in-here\n"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.1 == "i" && e.2 == "a-key"),
        "{events:?}"
    );
    let (_, text) = cast(&server, &server.token, &cut_short).await;
    let (header, _) = parse_cast(&text);
    assert!(header["title"].as_str().unwrap().starts_with("echo "));
}

/// The recording holds exactly the input the command was given, in time
/// order: input the console refused (the command was not reading it, and
/// the queue was full) is left out (it was recorded before it was
/// queued), and a fast paste into a command printing nothing is kept
/// whole (it waited for a flush, and past 256 KiB was skipped, its
/// marker placed before older input).
#[tokio::test]
async fn input_is_recorded_exactly_as_the_command_was_given_it() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    // The store in memory: a disk's slow commit on a loaded machine can
    // rightly get input skipped (and marked), which is not what this
    // checks (`input_skipped_while_the_pump_is_behind_is_marked_where_it_began`
    // in src/recording.rs does).
    let dir = tempfile::tempdir().unwrap();
    let users = common::users_file(dir.path());
    let server = Running {
        server: server_from(
            server_command(&["--users-file", &users, "--record-input"]),
            true,
        ),
        _users: dir,
    };
    let mut ws = common::ws::console(&server).await;
    common::ws::send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "sleep 1000"}),
    )
    .await;
    // 2 MiB in pieces of 8 KiB against the agent's 1 MiB of credit and
    // the console's queue of 64 messages: the last are refused, whatever
    // the pipe takes. Each piece says which it is, and a `list_sessions`
    // after it (answered after any refusal of it: messages are handled in
    // order) tells which pieces were refused.
    let pieces = 256;
    let (mut refused, mut recording, mut answered) = (Vec::new(), None, 0);
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..pieces {
            let data = format!("<{i:03}>").repeat(1640);
            common::ws::send(&mut ws, json!({"type": "stdin", "id": 1, "data": data})).await;
            common::ws::send(&mut ws, json!({"type": "list_sessions"})).await;
            while answered == i {
                let Message::Text(t) = ws.next().await.expect("socket open").expect("frame") else {
                    continue;
                };
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("started") => recording = v["recording"].as_str().map(str::to_owned),
                    Some("error") if v["code"] == "stdin_overflow" => refused.push(i),
                    Some("sessions") => answered += 1,
                    Some("error" | "exit") => panic!("{v}"),
                    _ => {}
                }
            }
        }
        common::ws::send(
            &mut ws,
            json!({"type": "signal", "id": 1, "signal": "KILL"}),
        )
        .await;
        loop {
            let Message::Text(t) = ws.next().await.expect("socket open").expect("frame") else {
                continue;
            };
            if serde_json::from_str::<Value>(&t).unwrap()["type"] == "exit" {
                return;
            }
        }
    });
    assert!(wait.await.is_ok(), "no answer or no exit after the kill");
    assert!(!refused.is_empty(), "no input was refused");
    let id = recording.expect("a recording id");
    recordings_until(&server, &server.token, "", |l| {
        l.iter()
            .any(|r| r["id"] == id.as_str() && !r["ended_ms"].is_null())
    })
    .await;
    let (_, text) = cast(&server, &server.token, &id).await;
    let (_, events) = parse_cast(&text);
    let recorded: std::collections::BTreeSet<usize> = events
        .iter()
        .filter(|e| e.1 == "i")
        .flat_map(|e| (0..pieces).filter(|i| e.2.contains(&format!("<{i:03}>"))))
        .collect();
    let wrongly: Vec<_> = refused.iter().filter(|i| recorded.contains(i)).collect();
    assert!(
        wrongly.is_empty(),
        "refused inputs {wrongly:?} are in the recording (refused: {refused:?})"
    );
    let given: std::collections::BTreeSet<usize> =
        (0..pieces).filter(|i| !refused.contains(i)).collect();
    let missing: Vec<_> = given.difference(&recorded).collect();
    let markers: Vec<_> = events.iter().filter(|e| e.1 == "m").collect();
    assert!(
        missing.is_empty(),
        "{} of {} inputs the command was given are not recorded, from {:?}; markers {markers:?}",
        missing.len(),
        given.len(),
        missing.first()
    );
}
