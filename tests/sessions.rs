//! Shells that outlive their connection, at the agent: a real `conch
//! agent` process, driven through the protocol's client end.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{start_agent, wait_gone};
use conch::link::{AgentLink, Channel, Event};
use conch::protocol::{ExecRequest, PtySize, SessionOptions};
use conch::vocab::ErrorCode;

const SIZE: PtySize = PtySize { cols: 80, rows: 24 };

/// A login shell opened as a session owned by `owner`.
fn shell(owner: &str) -> ExecRequest {
    ExecRequest {
        pty: Some(SIZE),
        session: Some(SessionOptions {
            owner: owner.into(),
            title: None,
        }),
        ..Default::default()
    }
}

/// Reads output (returning its credit) until it contains `needle`; a
/// bounded wait, so that a broken agent fails the test instead of hanging.
async fn read_until(ch: &mut Channel, needle: &str) -> String {
    read_until_with(ch, needle, |text| text.contains(needle)).await
}

/// Reads output until `done` says so of all of it.
async fn read_until_with(ch: &mut Channel, needle: &str, done: impl Fn(&str) -> bool) -> String {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match ch.next().await {
                Some(Event::Stdout(b) | Event::Stderr(b) | Event::Snapshot(b)) => {
                    seen.extend_from_slice(&b);
                    let _ = ch.window(b.len() as u64).await;
                    if done(&String::from_utf8_lossy(&seen)) {
                        return;
                    }
                }
                Some(Event::Session(_)) => {}
                other => panic!(
                    "{other:?} before {needle:?}; output so far: {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(found.is_ok(), "no {needle:?} in {text:?}");
    text
}

/// The session id a fresh channel announces first.
async fn session_id(ch: &mut Channel) -> String {
    match ch.next().await {
        Some(Event::Session(id)) => id,
        other => panic!("expected the session's id, got {other:?}"),
    }
}

async fn type_line(ch: &Channel, line: &str) {
    ch.stdin(Bytes::from(format!("{line}\n")), false)
        .await
        .unwrap();
}

/// Types `echo @@<expr>@@` and returns the number the shell printed
/// between the markers (the echo of the typed line has `$`, not digits).
async fn shell_number(ch: &mut Channel, expr: &str) -> i32 {
    let find = |text: &str| -> Option<i32> {
        text.split("@@")
            .skip(1)
            .step_by(2)
            .find_map(|part| part.parse::<i32>().ok())
    };
    type_line(ch, &format!("echo @@{expr}@@")).await;
    let text = read_until_with(ch, "a number", |t| find(t).is_some()).await;
    find(&text).unwrap()
}

/// The shell's pid, asked of the shell.
async fn shell_pid(ch: &mut Channel) -> i32 {
    shell_number(ch, "$$").await
}

#[tokio::test]
async fn a_shell_outlives_its_link_and_comes_back_with_its_screen_and_state() {
    let agent = start_agent(&[]);
    let first = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut ch = first.exec(shell("alice")).await.unwrap();
    let id = session_id(&mut ch).await;
    type_line(&ch, "export X=forty-two; cd /tmp; echo marker-$X").await;
    read_until(&mut ch, "marker-forty-two").await;
    // The server goes away without a word: the link drops.
    first.shutdown();
    drop(ch);

    let second = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let listed = second.sessions().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let info = &listed[0];
    assert_eq!(
        (info.id.as_str(), info.owner.as_str()),
        (id.as_str(), "alice")
    );
    assert!(!info.attached);
    assert!(
        info.ends_at_ms.is_some(),
        "a detached session shows when it ends"
    );

    let mut back = second.attach(&id, SIZE, false, None).await.unwrap();
    assert_eq!(session_id(&mut back).await, id);
    // The redraw shows what was on the screen.
    read_until(&mut back, "marker-forty-two").await;
    // The shell kept its environment and directory.
    type_line(&back, "echo again-$X-$(pwd)").await;
    read_until(&mut back, "again-forty-two-/tmp").await;
    assert!(second.sessions().await.unwrap()[0].attached);
}

#[tokio::test]
async fn nothing_is_lost_or_repeated_between_detach_and_attach() {
    let agent = start_agent(&[]);
    let first = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut ch = first.exec(shell("alice")).await.unwrap();
    let id = session_id(&mut ch).await;
    type_line(&ch, "seq 1 1000000; echo seq-done").await;
    // Part of the output, then the link is cut mid-stream.
    read_until(&mut ch, "\n20000\r\n").await;
    first.shutdown();
    drop(ch);

    let second = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut back = second.attach(&id, SIZE, false, None).await.unwrap();
    assert_eq!(session_id(&mut back).await, id);
    // A terminal on the client's side draws the redraw, then the rest.
    let mut term = vt100::Parser::new(
        std::num::NonZeroU16::new(SIZE.rows).unwrap(),
        std::num::NonZeroU16::new(SIZE.cols).unwrap(),
        0,
    );
    let mut lines: Vec<String> = Vec::new();
    let mut snapshot_done = false;
    let mut tail = String::new();
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let data = match back.next().await {
                Some(Event::Snapshot(b)) => {
                    let _ = back.window(b.len() as u64).await;
                    assert!(!snapshot_done, "a redraw after live output");
                    term.process(&b);
                    continue;
                }
                Some(Event::Stdout(b)) => b,
                other => panic!("unexpected {other:?}"),
            };
            let _ = back.window(data.len() as u64).await;
            if !snapshot_done {
                // The redraw is complete: its screen, up to the cursor.
                let screen = term.screen();
                let (row, col) = screen.cursor_position();
                let rows: Vec<String> = screen.rows(0, SIZE.cols).collect();
                lines.extend(rows[..row as usize].iter().cloned());
                tail = rows[row as usize].chars().take(col as usize).collect();
                snapshot_done = true;
            }
            tail.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = tail.find("\r\n") {
                lines.push(tail[..end].to_owned());
                tail.drain(..end + 2);
            }
            if lines.iter().any(|l| l == "seq-done") {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "the output never ended");
    let numbers: Vec<u64> = lines.iter().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(numbers.last(), Some(&1_000_000));
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "a gap or a repeat at {pair:?}");
    }
    // The redraw and the live output met: more than a screen was seen.
    assert!(numbers.len() > SIZE.rows as usize, "{}", numbers.len());
}

#[tokio::test]
async fn a_session_nobody_attaches_ends_after_the_linger_time() {
    let agent = start_agent(&["--session-linger", "1s"]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut ch = link.exec(shell("alice")).await.unwrap();
    session_id(&mut ch).await;
    let pid = shell_pid(&mut ch).await;
    // A background job of the shell, in a process group of its own.
    type_line(&ch, "sleep 1000 &").await;
    let job = shell_number(&mut ch, "$!").await;
    assert!(common::alive(job));
    ch.detach().await.unwrap();
    match ch.next().await {
        Some(Event::Detached(_)) => {}
        other => panic!("expected detached, got {other:?}"),
    }
    assert!(wait_gone(pid).await, "the shell outlived the linger time");
    assert!(wait_gone(job).await, "its background job outlived it");
    assert!(
        listed_empty(&link).await,
        "the ended session is still listed"
    );
}

/// Waits (bounded) until the agent lists no session: the session's task
/// reads the terminal to its end before it leaves the list.
async fn listed_empty(link: &AgentLink) -> bool {
    for _ in 0..100 {
        if link.sessions().await.unwrap().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn watchers_see_the_screen_but_cannot_type_and_a_new_writer_takes_over() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut writer = link.exec(shell("alice")).await.unwrap();
    let id = session_id(&mut writer).await;
    type_line(&writer, "echo first-line").await;
    read_until(&mut writer, "first-line\r\n").await;

    let mut watcher = link.attach(&id, SIZE, true, None).await.unwrap();
    session_id(&mut watcher).await;
    read_until(&mut watcher, "first-line").await;
    type_line(&writer, "echo second-line").await;
    read_until(&mut watcher, "second-line").await;

    watcher
        .stdin(Bytes::from_static(b"echo sneaky\n"), false)
        .await
        .unwrap();
    loop {
        match watcher.next().await {
            Some(Event::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::Forbidden);
                break;
            }
            Some(Event::Stdout(b)) => {
                let _ = watcher.window(b.len() as u64).await;
            }
            other => panic!("expected the watcher's input refused, got {other:?}"),
        }
    }

    // Another writer (the owner's second device) takes the session over.
    let mut other = link.attach(&id, SIZE, false, None).await.unwrap();
    session_id(&mut other).await;
    loop {
        match writer.next().await {
            Some(Event::Detached(reason)) => {
                assert!(reason.contains("elsewhere"), "{reason}");
                break;
            }
            Some(Event::Stdout(b)) => {
                let _ = writer.window(b.len() as u64).await;
            }
            other => panic!("expected the old writer detached, got {other:?}"),
        }
    }
    type_line(&other, "echo from-the-other").await;
    read_until(&mut other, "from-the-other\r\n").await;
    // The watcher never typed: no "sneaky" output anywhere.
    let seen = read_until(&mut watcher, "from-the-other").await;
    assert!(!seen.contains("sneaky\r\n"), "{seen}");
}

#[tokio::test]
async fn unknown_sessions_are_refused_and_ending_one_kills_it() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut nothing = link
        .attach("no-such-session", SIZE, false, None)
        .await
        .unwrap();
    match nothing.next().await {
        Some(Event::Error { code, .. }) => assert_eq!(code, ErrorCode::NoSession),
        other => panic!("expected no_session, got {other:?}"),
    }
    assert_eq!(nothing.next().await, None, "the refusal ends the channel");

    let mut ch = link.exec(shell("alice")).await.unwrap();
    let id = session_id(&mut ch).await;
    let pid = shell_pid(&mut ch).await;
    link.end_session(&id).await.unwrap();
    loop {
        match ch.next().await {
            Some(Event::Exit(status)) => {
                assert_eq!(status.signal.map(|s| s.0), Some(libc::SIGKILL));
                break;
            }
            Some(Event::Stdout(_)) => {}
            other => panic!("expected its exit, got {other:?}"),
        }
    }
    assert!(wait_gone(pid).await);
    assert!(listed_empty(&link).await);
}

#[tokio::test]
async fn a_session_needs_a_terminal_and_the_agent_bounds_their_number() {
    let agent = start_agent(&["--max-sessions", "1"]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let no_pty = ExecRequest {
        pty: None,
        ..shell("alice")
    };
    match link.exec(no_pty).await.unwrap().next().await {
        Some(Event::Error { code, .. }) => assert_eq!(code, ErrorCode::BadExec),
        other => panic!("expected bad_exec, got {other:?}"),
    }
    let mut one = link.exec(shell("alice")).await.unwrap();
    session_id(&mut one).await;
    match link.exec(shell("bob")).await.unwrap().next().await {
        Some(Event::Error { code, .. }) => assert_eq!(code, ErrorCode::TooManySessions),
        other => panic!("expected too_many_sessions, got {other:?}"),
    }
}
