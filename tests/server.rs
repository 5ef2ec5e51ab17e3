//! `conch serve` over real HTTP and WebSockets, with its real agent.

mod common;

use std::time::Duration;

use common::Endpoint;
use common::ws::{Ws, collect, console, next_json, open_ws, run, send};
use common::{start_agent, start_server, users_file, wait_gone};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn command_mode_streams_output_and_exit_codes() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    let (out, err, exit) = run(&mut ws, 1, "echo hello").await;
    assert_eq!(out, b"hello\n");
    assert!(err.is_empty());
    assert_eq!(exit["type"], "exit");
    assert_eq!(exit["code"], 0);
    assert!(exit["duration_ms"].is_u64());

    let (out, err, exit) = run(&mut ws, 2, "echo out; echo err >&2; exit 4").await;
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(exit["code"], 4);

    // Bytes end to end: invalid UTF-8 arrives untouched.
    let (out, _, _) = run(&mut ws, 3, r"printf '\377\376ok'").await;
    assert_eq!(out, b"\xff\xfeok");
}

/// A page may reuse a command's id as soon as it has its `exit`: the
/// console frees the id before telling the page, not after the command's
/// recording has ended.
#[tokio::test]
async fn an_id_is_free_again_as_soon_as_its_exit_arrives() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    for round in 0..300 {
        let (out, _, end) = run(&mut ws, 1, "echo again").await;
        assert_eq!(end["type"], "exit", "round {round}: {end}");
        assert_eq!(out, b"again\n");
    }
}

/// A page that never stops sending cannot keep its console past a
/// logout, nor start a command behind it: the console ends with
/// `session_expired` and nothing it sent after the logout starts.
#[tokio::test]
async fn a_flooding_page_is_still_ended_by_its_logout() {
    let server = start_server(&[], &[]);
    let cookie = server.admin_cookie().await;
    let ws = open_ws(&server, Some(&cookie), Some(&server.origin()))
        .await
        .expect("upgrade");
    let (mut sink, mut stream) = ws.split();
    // Bounded: at most 200,000 messages, each an `exec` that would start
    // a command were it taken after the logout.
    let flood = tokio::spawn(async move {
        for i in 0..200_000u32 {
            let exec = json!({"type": "exec", "id": 1 + i % 1000, "cmd": "true"});
            if sink
                .send(Message::Text(exec.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // The flood is under way: its first command started.
    loop {
        let msg = stream.next().await.expect("open").expect("frame");
        if let Message::Text(t) = msg
            && t.contains("\"started\"")
        {
            break;
        }
    }
    assert_eq!(server.logout(&cookie).await, 303);
    // Started after the logout's answer: at most what was already queued
    // for the page (64 messages) and the one being started.
    let mut late = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["code"] == "session_expired" {
                    return true;
                }
                late += usize::from(v["type"] == "started");
            }
        }
        false
    })
    .await;
    assert_eq!(ended, Ok(true), "the console outlived its logout");
    assert!(late <= 65, "{late} commands started after the logout");
    // Nothing after `session_expired`: the socket closes.
    while let Some(Ok(msg)) = stream.next().await {
        if let Message::Text(t) = msg {
            assert!(
                !t.contains("\"started\""),
                "a command started after the logout: {t}"
            );
        }
    }
    flood.abort();
}

#[tokio::test]
async fn a_pty_shell_session_and_ctrl_c() {
    let server = start_server(&[], &[("SHELL", "/bin/sh")]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 7, "pty": {"cols": 100, "rows": 30}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    send(
        &mut ws,
        json!({"type": "stdin", "id": 7, "data": "stty size; echo pty-$((40+2)); tty; exit 3\n"}),
    )
    .await;
    let (out, _, exit) = collect(&mut ws, 7).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("30 100") && out.contains("pty-42") && out.contains("/dev/pts/"),
        "{out}"
    );
    assert_eq!(exit["code"], 3);

    // `sh -c` catches SIGINT until it has exec'd its last command: send the
    // signal once `sleep` is known to run, or it waits out the sleep.
    send(
        &mut ws,
        json!({"type": "exec", "id": 8, "cmd": "echo $$; exec sleep 300"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let pid: i32 = match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => String::from_utf8_lossy(&b[5..]).trim().parse().unwrap(),
        other => panic!("{other:?}"),
    };
    common::wait_exec(pid, "sleep").await;
    send(&mut ws, json!({"type": "signal", "id": 8, "signal": "INT"})).await;
    let exit = next_json(&mut ws).await;
    assert_eq!(exit["type"], "exit");
    assert_eq!(exit["signal"], "INT");
}

/// `n` letters, a to z over and over: text to paste.
fn alphabet(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

/// The SHA-256 of `bytes` as `sha256sum` prints it.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A paste far larger than the socket's read buffer arrives whole, and
/// one past the message bound closes the console without being read.
#[tokio::test]
async fn a_large_paste_arrives_whole_and_a_huge_one_is_refused() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "sha256sum"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let paste = alphabet(500_000);
    send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": paste, "eof": true}),
    )
    .await;
    let (out, _, exit) = collect(&mut ws, 1).await;
    let want = sha256_hex(paste.as_bytes());
    assert!(String::from_utf8_lossy(&out).starts_with(&want), "{out:?}");
    assert_eq!(exit["code"], 0);

    // Past the bound the frame is refused at its header, unread: the
    // console ends, with `too_large` unless the connection's reset (the
    // rest of the frame was never read) overtakes it.
    let huge = json!({"type": "stdin", "id": 2, "data": "x".repeat(2 * 1024 * 1024)});
    let _ = ws.send(Message::Text(huge.to_string().into())).await;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "agents" {
                    continue;
                }
                assert_eq!(v["code"], "too_large", "{v}");
            }
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1009));
            }
            Some(Ok(other)) => panic!("{other:?}"),
            Some(Err(_)) | None => break,
        }
    }
    // The server goes on.
    let mut ws = console(&server).await;
    let (out, _, _) = run(&mut ws, 1, "echo still-here").await;
    assert_eq!(out, b"still-here\n");
}

/// A paste into a terminal whose program is not reading yet fills the
/// terminal's input and waits for room (the agent writes to a terminal
/// without waiting to be told there is room, and asks only once a write
/// finds none): it arrives whole once the program reads.
#[tokio::test]
async fn a_paste_into_a_terminal_that_is_not_reading_arrives_whole() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "pty": {"cols": 80, "rows": 24},
               "cmd": "stty raw -echo; echo ready; sleep 0.5; head -c 300000 | sha256sum"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let paste = alphabet(300_000);
    let want = sha256_hex(paste.as_bytes());
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        // Typed once the terminal is raw: every byte reaches the program.
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains("ready") {
            if let Message::Binary(b) = ws.next().await.expect("socket open").expect("frame") {
                out.extend_from_slice(&b[5..]);
                send(
                    &mut ws,
                    json!({"type": "ack", "id": 1, "bytes": b.len() - 5}),
                )
                .await;
            }
        }
        for piece in paste.as_bytes().chunks(16 * 1024) {
            let piece = std::str::from_utf8(piece).unwrap();
            send(&mut ws, json!({"type": "stdin", "id": 1, "data": piece})).await;
        }
        collect(&mut ws, 1).await
    })
    .await;
    let (out, _, exit) = result.expect("the paste's sum within 60 s");
    assert!(String::from_utf8_lossy(&out).contains(&want), "{out:?}");
    assert_eq!(exit["code"], 0, "{exit}");
}

/// A page that acknowledges its output in small pieces (the server holds
/// credit under 32 KiB back from the agent) never stalls its command:
/// 1.5 MB, several times the 512 KiB window, arrives whole.
#[tokio::test]
async fn output_acknowledged_in_small_pieces_keeps_flowing() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    let total = 1_500_000;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": format!("head -c {total} /dev/zero")}),
    )
    .await;
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        let mut got = 0;
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Binary(b) => {
                    got += b.len() - 5;
                    let mut left = b.len() - 5;
                    while left > 0 {
                        let piece = left.min(1000);
                        send(&mut ws, json!({"type": "ack", "id": 1, "bytes": piece})).await;
                        left -= piece;
                    }
                }
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "exit" {
                        return (got, v);
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    let (got, exit) = result.expect("the output within 60 s");
    assert_eq!(got, total);
    assert_eq!(exit["code"], 0, "{exit}");
}

/// Keystrokes go straight to the link when nothing waits before them,
/// and behind a paste still being written when something does: the
/// command reads everything in the order it was typed.
#[tokio::test]
async fn keystrokes_and_pastes_arrive_in_the_order_they_were_typed() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    // Reads slowly at first, so that the paste waits for its credit.
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "sleep 0.2; cat"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let paste = alphabet(300_000);
    let mut typed = String::new();
    for round in 0..3 {
        for k in 0..50 {
            let key = format!("<{round}.{k}>");
            typed.push_str(&key);
            send(&mut ws, json!({"type": "stdin", "id": 1, "data": key})).await;
        }
        typed.push_str(&paste);
        send(&mut ws, json!({"type": "stdin", "id": 1, "data": paste})).await;
    }
    send(
        &mut ws,
        json!({"type": "stdin", "id": 1, "data": "", "eof": true}),
    )
    .await;
    let (out, _, exit) = collect(&mut ws, 1).await;
    assert_eq!(exit["code"], 0, "{exit}");
    assert!(
        out == typed.as_bytes(),
        "{} bytes out of {}, first difference at {:?}",
        out.len(),
        typed.len(),
        out.iter().zip(typed.as_bytes()).position(|(a, b)| a != b)
    );
}

/// A console whose command never reads fills only its own input budget
/// (its keys wait behind its paste or are refused), and another
/// console's keys, over the same agent link, still arrive whole and in
/// order.
#[tokio::test]
async fn input_nobody_reads_never_holds_up_another_consoles_keys() {
    let server = start_server(&[], &[]);
    let mut stuck = console(&server).await;
    send(
        &mut stuck,
        json!({"type": "exec", "id": 1, "cmd": "sleep 60"}),
    )
    .await;
    assert_eq!(next_json(&mut stuck).await["type"], "started");
    let paste = "x".repeat(500_000);
    let mut refused = false;
    for _ in 0..16 {
        send(&mut stuck, json!({"type": "stdin", "id": 1, "data": paste})).await;
        send(&mut stuck, json!({"type": "stdin", "id": 1, "data": "k"})).await;
        // Input is answered only when refused; the list of sessions is
        // answered after everything sent before it was handled.
        send(&mut stuck, json!({"type": "list_sessions"})).await;
        loop {
            let v = next_json(&mut stuck).await;
            if v["type"] == "sessions" {
                break;
            }
            if v["code"] == "stdin_overflow" {
                refused = true;
            }
        }
        if refused {
            break;
        }
    }
    assert!(
        refused,
        "8 MB sent to a command that never reads, and none refused"
    );

    let mut other = console(&server).await;
    send(&mut other, json!({"type": "exec", "id": 1, "cmd": "cat"})).await;
    assert_eq!(next_json(&mut other).await["type"], "started");
    let mut typed = String::new();
    for k in 0..100 {
        let key = format!("<{k}>");
        typed.push_str(&key);
        send(&mut stuck, json!({"type": "stdin", "id": 1, "data": "k"})).await;
        send(&mut other, json!({"type": "stdin", "id": 1, "data": key})).await;
    }
    send(
        &mut other,
        json!({"type": "stdin", "id": 1, "data": "", "eof": true}),
    )
    .await;
    let (out, _, exit) = collect(&mut other, 1).await;
    assert_eq!(exit["code"], 0, "{exit}");
    assert_eq!(String::from_utf8_lossy(&out), typed);
}

#[tokio::test]
async fn without_a_session_nothing_is_served() {
    let server = start_server(&[], &[]);
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client.get(server.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/login");
    assert_eq!(common::status(server.url("/api/v1/session")).await, 401);
    assert_eq!(common::status(server.url("/api/v1/agents")).await, 401);
    assert_eq!(
        open_ws(&server, None, Some(&server.origin())).await.err(),
        Some(401)
    );
    let forged = "conch_session=0000000000000000000000000000000000000000000000000000000000000000";
    assert_eq!(
        open_ws(&server, Some(forged), Some(&server.origin()))
            .await
            .err(),
        Some(401)
    );
    // Health needs no login; it says nothing else.
    assert_eq!(common::status(server.url("/healthz")).await, 200);
}

#[tokio::test]
async fn a_foreign_origin_cannot_open_a_console() {
    let server = start_server(&["--allowed-origins", "https://console.example.test"], &[]);
    let cookie = server.admin_cookie().await;
    assert_eq!(
        open_ws(&server, Some(&cookie), Some("http://evil.example"))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(open_ws(&server, Some(&cookie), None).await.err(), Some(403));
    let lookalike = format!("http://{}.evil.example", server.addr.ip());
    assert_eq!(
        open_ws(&server, Some(&cookie), Some(&lookalike))
            .await
            .err(),
        Some(403)
    );
    assert!(
        open_ws(&server, Some(&cookie), Some(&server.origin()))
            .await
            .is_ok()
    );
    assert!(
        open_ws(&server, Some(&cookie), Some("https://console.example.test"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn users_roles_and_the_login_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let server = start_server(&["--users-file", &users], &[]);

    let operator = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let mut ws = open_ws(&server, Some(&operator), Some(&server.origin()))
        .await
        .unwrap();
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["role"], "operator");
    assert_eq!(run(&mut ws, 1, "echo op").await.0, b"op\n");

    let viewer = server
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    let mut ws = open_ws(&server, Some(&viewer), Some(&server.origin()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["role"], "viewer");
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "touch /tmp/conch-viewer-was-here"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "forbidden");
    assert!(!std::path::Path::new("/tmp/conch-viewer-was-here").exists());

    for _ in 0..conch::server::throttle::PASSWORD_FAILURES {
        let status = server
            .login(&[("username", "olga"), ("password", "wrong")])
            .await
            .unwrap_err();
        assert_eq!(status, 401);
    }
    // Now even the right password is refused for a while from this address.
    let status = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap_err();
    assert_eq!(status, 429);
}

#[tokio::test]
async fn security_headers_on_every_page() {
    let server = start_server(&[], &[]);
    let cookie = server.admin_cookie().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/", "/login", "/static/app.js", "/healthz", "/nope"] {
        let resp = client
            .get(server.url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        let h = resp.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
            "{path}: {csp}"
        );
        assert!(
            !csp.contains("unsafe-inline'; connect")
                || !csp.contains("script-src 'self' 'unsafe-inline'")
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert!(h.contains_key("referrer-policy"), "{path}");
    }
    let page = client
        .get(server.url("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"terminal\""));
    assert!(!page.contains("<script>"), "no inline scripts");
    let js = client
        .get(server.url("/static/vendor/xterm/xterm.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );
}

#[tokio::test]
async fn bad_messages_get_an_error_and_the_socket_carries_on() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "bad_request");
    send(&mut ws, json!({"type": "launch_missiles"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "bad_request");
    assert_eq!(run(&mut ws, 1, "echo fine").await.0, b"fine\n");
}

#[tokio::test]
async fn closing_the_tab_kills_its_commands() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "sleep 300 & echo $!; wait"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "started");
    let pid: i32 = match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => String::from_utf8_lossy(&b[5..]).trim().parse().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(common::alive(pid));
    drop(ws);
    assert!(
        wait_gone(pid).await,
        "closing the socket left {pid} running"
    );
}

#[tokio::test]
async fn a_stalled_tab_pauses_its_command() {
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    send(&mut ws, json!({"type": "exec", "id": 1, "cmd": "yes"})).await;
    let window = conch::server::ws::BROWSER_WINDOW as usize;
    let mut got = 0;
    // Read without acknowledging until the window is used up, then put a
    // marker behind whatever is queued: no more output may come first.
    while got < window {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
            got += b.len() - 5;
        }
    }
    ws.send(Message::Text("marker".into())).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => got += b.len() - 5,
            Message::Text(t) if t.contains("bad_request") => break,
            _ => {}
        }
    }
    assert_eq!(
        got, window,
        "the server sent more than the window without acks"
    );
    // Acknowledging resumes it.
    send(&mut ws, json!({"type": "ack", "id": 1, "bytes": got})).await;
    match ws.next().await.unwrap().unwrap() {
        Message::Binary(b) => assert!(b.len() > 5),
        other => panic!("{other:?}"),
    }
    send(&mut ws, json!({"type": "close", "id": 1})).await;
}

/// Reads command 1's output up to its exit, acknowledging it and checking
/// that it is all zero bytes on stdout: (its bytes, the largest message's,
/// the exit message).
async fn zeros_to_exit<T>(ws: &mut tokio_tungstenite::WebSocketStream<T>) -> (usize, usize, Value)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut got, mut largest) = (0, 0);
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => {
                assert_eq!(&b[..5], &[1, 0, 0, 0, 1]);
                assert!(b[5..].iter().all(|&x| x == 0));
                got += b.len() - 5;
                largest = largest.max(b.len() - 5);
                let ack = json!({"type": "ack", "id": 1, "bytes": b.len() - 5});
                ws.send(Message::Text(ack.to_string().into()))
                    .await
                    .unwrap();
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("exit") => return (got, largest, v),
                    Some("error") => panic!("{v}"),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Whether an agent started by these tests grows its commands' output pipes
/// to 256 KiB, and so reads a 256 KiB write in one go: with
/// `CAP_SYS_RESOURCE` or `CAP_SYS_ADMIN` outside a user namespace.
fn agent_grows_pipes() -> bool {
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    let caps = u64::from_str_radix(caps.trim(), 16).unwrap();
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
    caps & (1 << 21 | 1 << 24) != 0
        && map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]
}

#[tokio::test]
async fn a_large_write_reaches_the_page_in_one_message() {
    // One write of 256 KiB into the command's pipe: the agent reads it in
    // one go (its pipes hold that much), and the page gets it in one
    // message rather than in four of 64 KiB. Only an agent that may grow
    // pipes past the user's quota (root on the host) grows them: as the
    // agent this test starts decides it.
    let grows = agent_grows_pipes();
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 1, "cmd": "dd if=/dev/zero bs=262144 count=1 status=none"}),
    )
    .await;
    let (got, largest, _) = tokio::time::timeout(Duration::from_secs(30), zeros_to_exit(&mut ws))
        .await
        .expect("the command ends");
    assert_eq!(got, 262_144);
    assert!(largest <= 262_144);
    // (An agent that keeps the kernel's 64 KiB pipes reads as the
    // scheduling has it.)
    if grows {
        assert_eq!(largest, 262_144, "the write came in pieces");
    }
}

#[tokio::test]
async fn gathered_output_keeps_each_stream_whole_and_in_order() {
    // Output the server gathers into fewer messages must keep each
    // stream's bytes in order, never mix the streams, and come before
    // the exit. Lines alternate between the streams, and a burst of
    // each runs past a message's size.
    let server = start_server(&[], &[]);
    let mut ws = console(&server).await;
    let cmd = "i=0; while [ $i -lt 3000 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done; \
               head -c 600000 /dev/zero | tr '\\0' o; head -c 600000 /dev/zero | tr '\\0' e >&2";
    let (out, err, exit) = run(&mut ws, 1, cmd).await;
    assert_eq!(exit["type"], "exit", "{exit}");
    let expect = |tag: char| {
        let mut v: Vec<u8> = (0..3000)
            .flat_map(|i| format!("{tag}{i}\n").into_bytes())
            .collect();
        v.extend(std::iter::repeat_n(tag as u8, 600_000));
        v
    };
    assert!(out == expect('o'), "stdout differs ({} bytes)", out.len());
    assert!(err == expect('e'), "stderr differs ({} bytes)", err.len());
}

#[tokio::test]
async fn a_lost_agent_is_reported_and_reconnected() {
    let mut agent = start_agent(&[]);
    let addr = agent.addr.to_string();
    let key_file = agent.key_file.to_str().unwrap().to_owned();
    let server = start_server(
        &[
            "--agent",
            &addr,
            "--agent-key-file",
            &key_file,
            "--agent-name",
            "box",
        ],
        &[],
    );
    let cookie = server.admin_cookie().await;
    let mut ws = open_ws(&server, Some(&cookie), Some(&server.origin()))
        .await
        .unwrap();
    wait_agent(&mut ws, true).await;
    assert_eq!(run(&mut ws, 1, "echo before").await.0, b"before\n");

    // The agent goes away: the console says so, and commands fail at once.
    let _ = agent.proc.child.kill();
    let _ = agent.proc.child.wait();
    wait_agent(&mut ws, false).await;
    send(
        &mut ws,
        json!({"type": "exec", "id": 2, "cmd": "echo lost", "agent": "box"}),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "agent_unavailable");
    assert!(reply["message"].as_str().unwrap().contains("box"));
    assert_eq!(common::status(server.url("/readyz")).await, 503);

    // It comes back on the same address: the server reconnects by itself.
    let dir = tempfile::tempdir().unwrap();
    let mut again = common::spawn_conch(
        &["agent", "--listen", &addr, "--key-file", &key_file],
        &[],
        dir,
    );
    again.wait_for("listening", |l| common::logged_addr(l, "agent listening"));
    wait_agent(&mut ws, true).await;
    assert_eq!(run(&mut ws, 3, "echo after").await.0, b"after\n");
    assert_eq!(common::status(server.url("/readyz")).await, 200);
}

/// Waits for an agent status message (or hello) saying connected == `up`.
async fn wait_agent(ws: &mut Ws, up: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("agent status in time");
        if let Some(Ok(Message::Text(t))) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if matches!(v["type"].as_str(), Some("agents" | "hello"))
                && v["agents"][0]["connected"] == up
            {
                return;
            }
        }
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let data = tempfile::tempdir().unwrap();
    let server = start_server(
        &[
            "--users-file",
            &users,
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        // Even a filter that asks for the WebSocket library's trace.
        &[("CONCH_LOG", "trace,tungstenite=trace,hyper=trace")],
    );
    let cookie = server.admin_cookie().await;
    let user_cookie = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let _ = server
        .login(&[("username", "olga"), ("password", "a-wrong-password")])
        .await;
    let client = reqwest::Client::new();
    let api_token = server.create_token("logged", "operator").await;
    let resp = client
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&api_token)
        .json(&json!({"command": "echo ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut ws = open_ws(&server, Some(&cookie), Some(&server.origin()))
        .await
        .unwrap();
    next_json(&mut ws).await;
    run(&mut ws, 1, "true").await;
    // What a user types and what a command prints never reach the log.
    let (out, _, _) = run(&mut ws, 2, "echo typed-marker-$((6*7))").await;
    assert_eq!(out, b"typed-marker-42\n");
    drop(ws);
    // Stop the server so that every line it logged has been read.
    server.proc.signal(libc::SIGTERM);
    let mut log = String::new();
    while let Ok(line) = server.proc.lines.recv_timeout(Duration::from_secs(30)) {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("login"), "the log was captured");
    let session = |c: &str| c.split_once('=').unwrap().1.to_owned();
    for secret in [
        server.token.clone(),
        api_token,
        session(&cookie),
        session(&user_cookie),
        "operator-pw".into(),
        "a-wrong-password".into(),
        "typed-marker".into(),
    ] {
        assert!(!log.contains(&secret), "a secret reached the log");
    }
}

/// The embedded agent is reached over a Unix-domain socket in a directory
/// only the server's user can enter (the link runs without TLS there: the
/// kernel keeps it on this host), and the directory goes with the server.
#[tokio::test]
async fn the_embedded_agent_listens_on_a_private_unix_socket() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let server = start_server(&[], &[]);
    let addr = embedded_agent_addr(&server).await;
    let sock = std::path::Path::new(&addr);
    assert!(
        std::fs::metadata(sock).unwrap().file_type().is_socket(),
        "the embedded agent's address is not a Unix socket: {addr}"
    );
    let dir = sock.parent().unwrap().to_owned();
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{dir:?}");
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    let mut ws = console(&server).await;
    let (out, _, exit) = run(&mut ws, 1, "echo over the socket").await;
    assert_eq!(out, b"over the socket\n");
    assert_eq!(exit["code"], 0);
    drop(ws);
    drop(server);
    assert!(!dir.exists(), "{dir:?} outlived the server");
}

/// A process of the server's user that puts a socket of its own at the
/// embedded agent's path (the agent's moved aside, still listening) cannot
/// relay the link: the server, reconnecting after the agent died, finds
/// the socket is not the one it made and answers nothing, not even the
/// real agent's `hello` the relay passes on.
#[tokio::test]
async fn a_socket_put_in_place_of_the_embedded_agents_gets_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = start_server(&[], &[]);
    let addr = embedded_agent_addr(&server).await;
    let sock = std::path::Path::new(&addr);
    std::fs::rename(sock, sock.with_file_name("moved.sock")).unwrap();
    let relay = tokio::net::UnixListener::bind(sock).unwrap();
    // The agent dies; the server restarts it and reconnects by the path.
    let children = std::fs::read_to_string(format!(
        "/proc/{0}/task/{0}/children",
        server.proc.child.id()
    ))
    .unwrap();
    let agent: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(60), relay.accept())
        .await
        .expect("the server reconnects")
        .unwrap();
    // The agent speaks first: the relay hands its `hello` to the server.
    let mut agent = tokio::net::UnixStream::connect(sock.with_file_name("moved.sock"))
        .await
        .unwrap();
    let mut hello = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), agent.read(&mut hello))
        .await
        .expect("the agent says hello")
        .unwrap();
    assert!(n > 0, "the agent said nothing");
    let _ = conn.write_all(&hello[..n]).await;
    let mut got = Vec::new();
    // A reset (the server hung up on unread bytes) reads as nothing.
    let _ = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut got))
        .await
        .expect("the server hangs up");
    assert!(
        got.is_empty(),
        "the server spoke to a socket it did not make: {} bytes",
        got.len()
    );
}

/// Where no Unix socket can be made (here: a temporary directory whose
/// path is too long for one), the embedded agent listens on loopback TCP,
/// with TLS, and commands run as before.
#[tokio::test]
async fn without_a_unix_socket_the_embedded_agent_is_reached_over_tls() {
    let long = tempfile::tempdir().unwrap();
    let deep = long.path().join("d".repeat(120));
    std::fs::create_dir(&deep).unwrap();
    let server = start_server(&[], &[("TMPDIR", deep.to_str().unwrap())]);
    let addr = embedded_agent_addr(&server).await;
    assert!(
        addr.starts_with("127.0.0.1:"),
        "expected the loopback TCP fallback, got {addr}"
    );
    let mut ws = console(&server).await;
    let (out, _, exit) = run(&mut ws, 1, "echo over tls").await;
    assert_eq!(out, b"over tls\n");
    assert_eq!(exit["code"], 0);
}

/// Where the server reaches its embedded agent, as `GET /api/v1/agents`
/// says.
async fn embedded_agent_addr(server: &common::Server) -> String {
    let agents = common::get_json(server.url("/api/v1/agents"), &server.token).await;
    agents["agents"][0]["addr"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_console_opens_over_http2_and_a_large_output_arrives_whole() {
    // A browser on HTTPS may open the console as an HTTP/2 stream (RFC
    // 8441's extended CONNECT) instead of an HTTP/1.1 upgrade. Here over
    // cleartext HTTP/2, which the server takes as well. The output comes
    // in writes of 256 KiB: a message of that size goes to the page as
    // frames of at most 64 KiB (tungstenite keeps a buffer of the largest
    // frame it wrote for the socket's life), which the client here takes
    // and no larger, and the page must get every byte.
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    let server = start_server(&[], &[]);
    let cookie = server.admin_cookie().await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let open = |cookie: &str| {
        let mut req = hyper::Request::connect(format!("http://{}/ws", server.addr))
            .version(hyper::Version::HTTP_2)
            .header("sec-websocket-version", "13")
            .header("cookie", cookie)
            .header("origin", server.origin())
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        req
    };
    // Not logged in: refused as over HTTP/1.1.
    let refused = sender.send_request(open("conch_session=x")).await.unwrap();
    assert_eq!(refused.status(), 401);
    let resp = sender.send_request(open(&cookie)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let io = hyper::upgrade::on(resp).await.unwrap();
    let frames = WebSocketConfig::default().max_frame_size(Some(64 * 1024));
    let io = TokioIo::new(io);
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(frames)).await;
    let text = |m: Message| -> Value { serde_json::from_str(m.to_text().unwrap()).unwrap() };
    let hello = text(ws.next().await.unwrap().unwrap());
    assert_eq!(hello["type"], "hello");
    const LEN: usize = 4 * 262_144;
    let cmd = "dd if=/dev/zero bs=262144 count=4 status=none";
    let exec = json!({"type": "exec", "id": 1, "cmd": cmd}).to_string();
    ws.send(Message::Text(exec.into())).await.unwrap();
    let (got, largest, exit) =
        tokio::time::timeout(Duration::from_secs(60), zeros_to_exit(&mut ws))
            .await
            .expect("the command ends");
    assert_eq!(exit["code"], 0, "{exit}");
    assert_eq!(got, LEN);
    // (An agent that keeps the kernel's 64 KiB pipes reads as the
    // scheduling has it.)
    if agent_grows_pipes() {
        assert_eq!(largest, 262_144, "the writes came in pieces");
    }
}
