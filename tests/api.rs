//! The REST API and `conch exec`, over real HTTP against the real server and agent.

mod common;

use base64::Engine;
// The server runs in this process, on the test's own runtime: two workers,
// so that a test blocked on `conch exec` leaves one to the server.
use common::in_process::{InProcess, start};
use common::{Endpoint, wait_gone};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// `POST /api/v1/exec` with a bearer token and a JSON body.
async fn post_exec(server: &impl Endpoint, token: &str, body: &Value) -> reqwest::Response {
    client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn exec(server: &InProcess, token: &str, body: Value) -> (StatusCode, Value) {
    let resp = post_exec(server, token, &body).await;
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

async fn problem(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_its_result() {
    let server = start(&[]).await;
    let (status, body) = exec(
        &server,
        &server.token,
        json!({"command": "echo hello; echo err >&2"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["stdout"], "hello\n");
    assert_eq!(body["stderr"], "err\n");
    assert_eq!(body["encoding"], "utf-8");
    assert_eq!(body["timed_out"], false);
    assert_eq!(body["stdout_truncated"], false);
    assert!(body["signal"].is_null());

    let (status, body) = exec(
        &server,
        &server.token,
        json!({"argv": ["sh", "-c", "exit 9"]}),
    )
    .await;
    assert_eq!(status, 200, "a failing command is still a 200");
    assert_eq!(body["exit_code"], 9);

    let body = json!({"command": "cat; echo \"$X\"; pwd", "stdin": "from stdin\n", "env": {"X": "ex"}, "cwd": "/"});
    let (_, body) = exec(&server, &server.token, body).await;
    assert_eq!(body["stdout"], "from stdin\nex\n/\n");
}

/// A caller's input reaches its command whole and then ends, however it
/// is sent: none (the end alone), within the agent's first credit (with
/// the `exec`), or past one frame (from a task that waits for credit). A
/// command reading input it was not given ends at once rather than holding
/// the caller's command slot until the time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_arrives_whole_and_ends_however_large() {
    let server = start(&[]).await;
    let (status, body) = exec(&server, &server.token, json!({"command": "cat"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "");
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["timed_out"], false);
    // Past one 64 KiB frame, under the 1 MiB body limit.
    let big: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = json!({"command": "cat | sha256sum | cut -c1-64", "stdin": big});
    let (status, body) = exec(&server, &server.token, body).await;
    assert_eq!(status, 200, "{body}");
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(big.as_bytes()));
    assert_eq!(body["stdout"], format!("{want}\n"));
    assert_eq!(body["timed_out"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_exact_truncated_base64_or_decoded() {
    let server = start(&[]).await;
    // Several MiB, byte-exact.
    let body = json!({"command": "seq 1 900000", "max_output_bytes": 8 * 1024 * 1024});
    let (_, body) = exec(&server, &server.token, body).await;
    let expected: String = (1..=900000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 5 * 1024 * 1024);
    assert!(
        body["stdout"].as_str().unwrap() == expected,
        "output differs: {} bytes, starts {:?}",
        body["stdout"].as_str().unwrap().len(),
        &body["stdout"].as_str().unwrap()[..80.min(body["stdout"].as_str().unwrap().len())]
    );
    assert_eq!(body["stdout_truncated"], false);

    let (_, body) = exec(
        &server,
        &server.token,
        json!({"command": "seq 1 100000", "max_output_bytes": 1000}),
    )
    .await;
    assert_eq!(body["stdout"].as_str().unwrap().len(), 1000);
    assert_eq!(body["stdout_truncated"], true);
    assert_eq!(body["exit_code"], 0);

    let (_, body) = exec(
        &server,
        &server.token,
        json!({"command": r"printf '\377\376\000x'"}),
    )
    .await;
    assert_eq!(body["encoding"], "base64");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["stdout"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, b"\xff\xfe\x00x");

    // "中文" in GBK.
    let (_, body) = exec(
        &server,
        &server.token,
        json!({"command": r"printf '\326\320\316\304'", "encoding": "gbk"}),
    )
    .await;
    assert_eq!(body["encoding"], "utf-8");
    assert_eq!(body["stdout"], "中文");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_kills_the_process_tree() {
    let server = start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let cmd = format!("sh -c 'sleep 300 & echo $! > {}; wait'", pidfile.display());
    let (_, body) = exec(
        &server,
        &server.token,
        json!({"command": cmd, "timeout_ms": 500}),
    )
    .await;
    assert_eq!(body["timed_out"], true, "{body}");
    assert!(body["exit_code"].is_null());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(wait_gone(pid).await, "the grandchild survived the timeout");
}

async fn ndjson(server: &InProcess, body: Value) -> reqwest::Response {
    let resp = client()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&body)
        .send()
        .await
        .unwrap();
    if resp.status() != 200 {
        panic!(
            "{}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    resp
}

/// Reads NDJSON lines from a streaming response until `stop` says so.
async fn read_lines(
    resp: &mut reqwest::Response,
    mut stop: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap();
            let done = stop(&v);
            lines.push(v);
            if done {
                return lines;
            }
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_keeps_order_and_a_disconnect_kills_the_command() {
    let server = start(&[]).await;
    let mut resp = ndjson(
        &server,
        json!({"command": "echo one; echo two >&2; echo three; exit 2"}),
    )
    .await;
    let lines = read_lines(&mut resp, |_| false).await;
    let last = lines.last().unwrap();
    assert_eq!(last["exit_code"], 2, "{lines:?}");
    let text = |stream: &str| -> String {
        lines
            .iter()
            .filter(|l| l["stream"] == stream)
            .map(|l| l["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text("stdout"), "one\nthree\n");
    assert_eq!(text("stderr"), "two\n");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.get("stream").is_some())
    );

    // Output arrives while the command still runs; hanging up kills it.
    let mut resp = ndjson(&server, json!({"command": "echo $$; exec sleep 300"})).await;
    let first = read_lines(&mut resp, |_| true).await;
    let pid: i32 = first[0]["data"].as_str().unwrap().trim().parse().unwrap();
    assert!(common::alive(pid));
    drop(resp);
    assert!(
        wait_gone(pid).await,
        "a disconnected client left its command running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_problem_details_with_the_right_status() {
    let server = start(&["--max-body-bytes", "2048", "--max-concurrent-execs", "1"]).await;
    let url = server.url("/api/v1/exec");
    let c = client();

    let resp = c
        .post(&url)
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("www-authenticate"));
    problem(resp, 401).await;
    let resp = post_exec(&server, "wrong-token", &json!({"command": "true"})).await;
    problem(resp, 401).await;

    let resp = c
        .post(&url)
        .bearer_auth(&server.token)
        .header("content-type", "application/json")
        .body("{\"command\": ")
        .send()
        .await
        .unwrap();
    problem(resp, 400).await;
    let resp = post_exec(&server, &server.token, &json!({"cwd": "/"})).await;
    problem(resp, 400).await;
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "x", "encoding": "klingon"}),
    )
    .await;
    problem(resp, 400).await;
    let resp = c
        .post(&url)
        .bearer_auth(&server.token)
        .body("echo hi")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    problem(resp, 415).await;
    let big = "x".repeat(4096);
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "stdin": big}),
    )
    .await;
    problem(resp, 413).await;

    // One slot: a second command while the first runs gets 429.
    let mut running = ndjson(&server, json!({"command": "echo up; exec sleep 300"})).await;
    read_lines(&mut running, |_| true).await;
    let resp = post_exec(&server, &server.token, &json!({"command": "true"})).await;
    assert!(resp.headers().contains_key("retry-after"));
    problem(resp, 429).await;
    drop(running);

    // Unknown API paths answer in kind.
    let resp = c
        .get(server.url("/api/v1/nope"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    problem(resp, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_a_503_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    conch::keyfile::Key::generate().save_new(&key).unwrap();
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = format!("127.0.0.1:{port}");
    let server = common::start_server_unready(
        &[
            "--agent",
            &agent,
            "--agent-key-file",
            key.to_str().unwrap(),
            "--agent-name",
            "faraway",
        ],
        &[],
    );
    let resp = post_exec(&server, &server.token, &json!({"command": "true"})).await;
    let body = problem(resp, 503).await;
    assert!(body["detail"].as_str().unwrap().contains("faraway"));
    assert_eq!(common::status(server.url("/readyz")).await, 503);
    assert_eq!(common::status(server.url("/healthz")).await, 200);
    let agents: Value = common::get_json(server.url("/api/v1/agents"), &server.token).await;
    assert_eq!(agents["agents"][0]["name"], "faraway");
    assert_eq!(agents["agents"][0]["connected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests() {
    let server = start(&[]).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = server.url("/api/v1/exec");
        let token = server.token.clone();
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"command": format!("echo req-{i}; exit {}", i % 5)}))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap();
            (i, status, body)
        }));
    }
    for task in tasks {
        let (i, status, body) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["stdout"], format!("req-{i}\n"));
        assert_eq!(body["exit_code"], i % 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_created_used_and_revoked() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let server = start(&["--data-dir", &data_dir]).await;
    let c = client();
    let ci = server.create_token("ci", "operator").await;
    let (status, body) = exec(&server, &ci, json!({"command": "echo via-ci"})).await;
    assert_eq!(
        (status, body["stdout"].as_str()),
        (StatusCode::OK, Some("via-ci\n"))
    );

    // Operators may not manage tokens; the list never shows secrets.
    let resp = c
        .get(server.url("/api/v1/tokens"))
        .bearer_auth(&ci)
        .send()
        .await
        .unwrap();
    problem(resp, 403).await;
    let list = c
        .get(server.url("/api/v1/tokens"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains("\"ci\"") && !list.contains(&ci));
    let stored = std::process::Command::new("sqlite3")
        .arg(data.path().join("conch.db"))
        .arg("SELECT name, sha256 FROM api_tokens")
        .output()
        .unwrap();
    let stored = String::from_utf8_lossy(&stored.stdout);
    assert!(stored.contains("ci|"), "{stored}");
    assert!(!stored.contains(&ci), "tokens are stored hashed");

    // A viewer token may look but not run.
    let out = std::process::Command::new(common::BIN)
        .args([
            "token",
            "create",
            "--data-dir",
            &data_dir,
            "--name",
            "looker",
            "--role",
            "viewer",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let looker = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let resp = post_exec(&server, &looker, &json!({"command": "true"})).await;
    problem(resp, 403).await;
    assert_eq!(
        c.get(server.url("/api/v1/agents"))
            .bearer_auth(&looker)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let resp = c
        .delete(server.url("/api/v1/tokens/ci"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = post_exec(&server, &ci, &json!({"command": "true"})).await;
    problem(resp, 401).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let server = start(&[]).await;
    let doc: Value = client()
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    // Every documented operation is routed (no 404/405 for its method).
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let url = server.url(&path.replace("{name}", "some-name"));
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = client().request(method.clone(), &url).send().await.unwrap();
            assert!(
                resp.status() != 404 && resp.status() != 405,
                "{method} {path} is documented but answers {}",
                resp.status()
            );
        }
    }
    // Every API route is documented.
    for route in [
        "/api/v1/exec",
        "/api/v1/agents",
        "/api/v1/session",
        "/api/v1/tokens",
        "/api/v1/tokens/{name}",
        "/api/v1/openapi.json",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} is not in the OpenAPI document"
        );
    }
}

fn conch_exec(server: &InProcess, token: Option<&str>, command: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["exec", "--server", &server.url("")])
        .env_remove("CONCH_TOKEN");
    if let Some(t) = token {
        cmd.env("CONCH_TOKEN", t);
    }
    cmd.arg("--").args(command).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conch_exec_passes_output_and_exit_codes_through() {
    let server = start(&[]).await;
    let out = conch_exec(
        &server,
        Some(&server.token),
        &["echo", "out;", "echo", "err", ">&2;", "exit", "7"],
    );
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let out = conch_exec(&server, Some(&server.token), &["kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15));

    let out = conch_exec(&server, Some(&server.token), &["true"]);
    assert_eq!(out.status.code(), Some(0));

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", server.token)).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args([
            "exec",
            "--server",
            &server.url(""),
            "--token-file",
            token_file.to_str().unwrap(),
            "--",
            "printf",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b"x"[..])
    );

    let out = conch_exec(&server, Some("not-the-token"), &["true"]);
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(common::BIN)
        .args([
            "exec",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            "x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_binary_chunks_are_base64() {
    let server = start(&[]).await;
    let mut resp = ndjson(&server, json!({"command": r"printf 'ok\377\376'"})).await;
    let lines = read_lines(&mut resp, |_| false).await;
    let bytes: Vec<u8> = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .flat_map(|l| {
            let data = l["data"].as_str().unwrap();
            if l["encoding"] == "base64" {
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap()
            } else {
                data.as_bytes().to_vec()
            }
        })
        .collect();
    assert_eq!(bytes, b"ok\xff\xfe");
    let _ = resp.bytes_stream().next().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429() {
    let server = start(&["--api-rate-per-minute", "3"]).await;
    for _ in 0..3 {
        let (status, _) = exec(&server, &server.token, json!({"command": "true"})).await;
        assert_eq!(status, 200);
    }
    let resp = post_exec(&server, &server.token, &json!({"command": "true"})).await;
    assert!(resp.headers().contains_key("retry-after"));
    problem(resp, 429).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_contract_holds_at_its_edges() {
    let server = start(&[]).await;
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "timeout_ms": 0}),
    )
    .await;
    problem(resp, 400).await;
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "agent": null}),
    )
    .await;
    problem(resp, 400).await;
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "max_output_bytes": 1e30}),
    )
    .await;
    let body = problem(resp, 400).await;
    assert!(
        !body["detail"].as_str().unwrap().contains("usize"),
        "{body}"
    );

    // What the description allows is taken, what it forbids refused
    // (found by Schemathesis): a blank command runs, an unknown agent is
    // not found, integers stop at 2^53 - 1, encodings go by name.
    let resp = post_exec(&server, &server.token, &json!({"command": " "})).await;
    assert_eq!(resp.status(), 200);
    let resp = post_exec(&server, &server.token, &json!({"command": ""})).await;
    problem(resp, 400).await;
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "agent": "nosuch"}),
    )
    .await;
    let body = problem(resp, 404).await;
    assert!(
        body["detail"].as_str().unwrap().contains("nosuch"),
        "{body}"
    );
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "timeout_ms": 9007199254740992u64}),
    )
    .await;
    let body = problem(resp, 400).await;
    assert!(body["detail"].as_str().unwrap().contains("2^53"), "{body}");
    let resp = post_exec(
        &server,
        &server.token,
        &json!({"command": "true", "timeout_ms": 9007199254740991u64, "encoding": "windows-1252"}),
    )
    .await;
    assert_eq!(resp.status(), 200);

    // A duplicate token name is a conflict; its creation is never cached.
    let created = client()
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&server.token)
        .json(&json!({"name": "twice", "role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["cache-control"], "no-store");
    let again = client()
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&server.token)
        .json(&json!({"name": "twice", "role": "viewer"}))
        .send()
        .await
        .unwrap();
    problem(again, 409).await;

    // Wrong methods and missing sessions answer in the API's format.
    let resp = client()
        .delete(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    problem(resp, 405).await;
    let resp = client()
        .get(server.url("/api/v1/session"))
        .send()
        .await
        .unwrap();
    problem(resp, 401).await;

    // Assets: compressed when asked, with a charset, and revalidated by
    // weak or listed tags too.
    let resp = client()
        .get(server.url("/static/vendor/xterm/xterm.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(
        resp.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let resp = client()
        .get(server.url("/static/vendor/xterm/xterm.js"))
        .header("if-none-match", format!("\"other\", W/{etag}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
}
