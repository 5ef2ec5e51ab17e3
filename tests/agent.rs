//! The command agent over real TCP: a real `conch agent` process on an
//! ephemeral loopback port, driven through the protocol's client end.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{start_agent, wait_gone};
use conch::keyfile::Key;
use conch::link::{AgentLink, Event};
use conch::protocol::{ExecRequest, Frame, FrameCodec, Message, PtySize};
use conch::transport::handshake::{LinkFramed, offer};
use conch::transport::tls::Connector;
use conch::vocab::Signal;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        cmd: Some(cmd.into()),
        ..Default::default()
    }
}

async fn run(link: &AgentLink, req: ExecRequest) -> (Vec<u8>, Vec<u8>, Event) {
    link.exec(req).await.expect("exec").collect().await
}

fn exit_code(event: &Event) -> Option<i32> {
    match event {
        Event::Exit(status) => status.code,
        other => panic!("expected exit, got {other:?}"),
    }
}

#[tokio::test]
async fn echo_stderr_and_exit_codes() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();

    let (out, err, exit) = run(&link, sh("echo hello")).await;
    assert_eq!(out, b"hello\n");
    assert!(err.is_empty());
    assert_eq!(exit_code(&exit), Some(0));

    let (out, err, exit) = run(&link, sh("echo to-out; echo to-err >&2; exit 3")).await;
    assert_eq!(out, b"to-out\n");
    assert_eq!(err, b"to-err\n");
    assert_eq!(exit_code(&exit), Some(3));

    let req = ExecRequest {
        argv: Some(vec![
            "printf".into(),
            "%s|%s".into(),
            "a b".into(),
            "$HOME".into(),
        ]),
        ..Default::default()
    };
    let (out, _, exit) = run(&link, req).await;
    assert_eq!(out, b"a b|$HOME", "argv runs without a shell");
    assert_eq!(exit_code(&exit), Some(0));

    let req = ExecRequest {
        cmd: Some("echo $CONCH_TEST_VAR; pwd".into()),
        cwd: Some("/tmp".into()),
        env: Some([("CONCH_TEST_VAR".to_string(), "set".to_string())].into()),
        ..Default::default()
    };
    let (out, _, _) = run(&link, req).await;
    assert_eq!(out, b"set\n/tmp\n");
}

#[tokio::test]
async fn a_missing_program_exits_127_with_its_reason() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();

    let req = ExecRequest {
        argv: Some(vec!["/no/such/program".into()]),
        ..Default::default()
    };
    let (out, err, exit) = run(&link, req).await;
    assert!(out.is_empty());
    assert_eq!(exit_code(&exit), Some(127));
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains("/no/such/program") && err.contains("not found"),
        "{err}"
    );

    let (_, err, exit) = run(&link, sh("no-such-command-xyz")).await;
    assert_eq!(exit_code(&exit), Some(127));
    assert!(String::from_utf8_lossy(&err).contains("no-such-command-xyz"));

    let req = ExecRequest {
        cmd: Some("true".into()),
        cwd: Some("/no/such/dir".into()),
        ..Default::default()
    };
    let (_, err, exit) = run(&link, req).await;
    assert_eq!(exit_code(&exit), Some(126));
    assert_eq!(
        String::from_utf8_lossy(&err),
        "conch: cd /no/such/dir: No such file or directory\n"
    );
    // Entered by the child (so that a directory that does not answer is
    // under the start timeout): its failures still read as a cd's, not
    // as a missing command.
    let file = agent.proc.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let req = ExecRequest {
        cmd: Some("true".into()),
        cwd: Some(file.to_str().unwrap().into()),
        ..Default::default()
    };
    let (_, err, exit) = run(&link, req).await;
    assert_eq!(exit_code(&exit), Some(126));
    assert_eq!(
        String::from_utf8_lossy(&err),
        format!("conch: cd {}: Not a directory\n", file.display())
    );
    let req = ExecRequest {
        cmd: Some("true".into()),
        cwd: Some("/tmp\0/x".into()),
        ..Default::default()
    };
    let (_, err, exit) = run(&link, req).await;
    assert_eq!(exit_code(&exit), Some(126));
    assert!(
        String::from_utf8_lossy(&err).ends_with(": a NUL byte in the path\n"),
        "{}",
        String::from_utf8_lossy(&err)
    );
}

#[tokio::test]
async fn sixty_four_mib_arrive_byte_exact() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    // Random bytes, so that a lost, doubled or reordered chunk changes the hash.
    let path = agent.proc.dir.path().join("big.bin");
    let mut data = vec![0u8; 64 * 1024 * 1024];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, &data).unwrap();
    let req = ExecRequest {
        argv: Some(vec!["cat".into(), path.to_str().unwrap().into()]),
        window: Some(256 * 1024),
        ..Default::default()
    };
    let (out, _, exit) = run(&link, req).await;
    assert_eq!(exit_code(&exit), Some(0));
    assert_eq!(out.len(), data.len());
    assert_eq!(Sha256::digest(&out), Sha256::digest(&data));
}

#[tokio::test]
async fn binary_output_and_stdin_round_trip() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();

    let (out, _, _) = run(&link, sh(r"printf '\377\376\000\200abc'")).await;
    assert_eq!(out, b"\xff\xfe\x00\x80abc");

    // 3 MiB: several frames, and more than the channel's stdin buffer.
    let input: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut channel = link.exec(sh("cat")).await.unwrap();
    let control = channel.controller();
    let sent = Bytes::from(input.clone());
    let writer = tokio::spawn(async move { control.stdin(sent, true).await });
    let (out, _, exit) = channel.collect().await;
    writer.await.unwrap().unwrap();
    assert_eq!(exit_code(&exit), Some(0));
    assert_eq!(out.len(), input.len());
    assert!(out == input, "stdin came back altered");
}

/// Reads the pid a command printed on its first stdout line.
async fn first_line_pid(channel: &mut conch::link::Channel) -> i32 {
    let mut buf = Vec::new();
    while !buf.contains(&b'\n') {
        match channel.next().await {
            Some(Event::Stdout(b)) => buf.extend_from_slice(&b),
            other => panic!("expected a pid on stdout, got {other:?}"),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    line.trim().parse().expect("a pid")
}

#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let req = ExecRequest {
        cmd: Some("sh -c 'sleep 300 & echo $!; wait' ; echo unreachable".into()),
        timeout_ms: Some(500),
        ..Default::default()
    };
    let mut channel = link.exec(req).await.unwrap();
    let grandchild = first_line_pid(&mut channel).await;
    assert!(common::alive(grandchild));
    let (_, _, exit) = channel.collect().await;
    match exit {
        Event::Exit(status) => {
            assert!(status.timed_out);
            assert_eq!(status.signal.map(|s| s.name()).as_deref(), Some("KILL"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        wait_gone(grandchild).await,
        "grandchild {grandchild} survived the timeout"
    );
}

#[tokio::test]
async fn signal_int_reaches_the_process_group() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    // `sh -c` catches SIGINT until it has exec'd its last command, so the
    // signal is sent once `sleep` is known to run.
    let mut channel = link.exec(sh("echo $$; exec sleep 300")).await.unwrap();
    let pid = first_line_pid(&mut channel).await;
    common::wait_exec(pid, "sleep").await;
    channel.signal(Signal::Int).await.unwrap();
    match channel.collect().await.2 {
        Event::Exit(status) => {
            assert_eq!(status.signal.map(|s| s.name()).as_deref(), Some("INT"));
            assert!(!status.timed_out);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn commands_start_with_clean_signal_state_even_under_an_ignoring_parent() {
    // The agent inherits SIGQUIT ignored and SIGINT ignored from its shell,
    // as under nohup or a careless script; its commands must not.
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate();
    let key_file = dir.path().join("k");
    key.save_new(&key_file).unwrap();
    let script = format!(
        "trap '' INT QUIT HUP; exec '{}' agent --listen 127.0.0.1:0 --key-file '{}'",
        common::BIN,
        key_file.display()
    );
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    let mut proc = common::spawn_with(cmd, dir);
    let addr = proc.wait_for("address", |l| common::logged_addr(l, "agent listening"));
    let link = AgentLink::connect(addr, &key).await.unwrap();
    let (out, _, _) = run(&link, sh("grep -E '^Sig(Ign|Blk)' /proc/self/status")).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
}

#[tokio::test]
async fn pty_session_has_a_terminal_that_resizes() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let req = ExecRequest {
        cmd: Some("tty; stty size; read line; stty size".into()),
        pty: Some(PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let mut channel = link.exec(req).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        match channel.next().await {
            Some(Event::Stdout(b)) => seen.extend_from_slice(&b),
            other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&seen)),
        }
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("/dev/pts/"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    channel.window(1 << 20).await.unwrap();
    channel.resize(100, 40).await.unwrap();
    channel
        .stdin(Bytes::from_static(b"go\n"), false)
        .await
        .unwrap();
    let (out, _, exit) = channel.collect().await;
    assert!(
        String::from_utf8_lossy(&out).contains("40 100"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(exit_code(&exit), Some(0));
}

#[tokio::test]
async fn a_pty_without_a_command_starts_a_login_shell() {
    let agent = start_agent_shell();
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let req = ExecRequest {
        pty: Some(PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let mut channel = link.exec(req).await.unwrap();
    channel
        .stdin(Bytes::from_static(b"echo shell-$((6*7)); exit 5\n"), false)
        .await
        .unwrap();
    let (out, _, exit) = channel.collect().await;
    assert!(
        String::from_utf8_lossy(&out).contains("shell-42"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(exit_code(&exit), Some(5));
}

/// A command holds its own three descriptors and nothing of the agent's:
/// not another session's terminal (through which it could type into that
/// shell), not the agent's link, pipes or files.
#[tokio::test]
async fn a_command_inherits_no_descriptor_but_its_own_three() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    // Another session's shell, on a terminal, alive while the command runs.
    let mut shell = link
        .exec(ExecRequest {
            cmd: Some("echo ready; cat".into()),
            pty: Some(PtySize { cols: 80, rows: 24 }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        match shell.next().await {
            Some(Event::Stdout(b)) => seen.extend_from_slice(&b),
            other => panic!("{other:?}"),
        }
    }
    for pty in [false, true] {
        let (out, err, exit) = run(
            &link,
            ExecRequest {
                // ls's own descriptors: 0, 1, 2 and the directory it reads (3).
                cmd: Some("ls /proc/self/fd; ls -l /proc/self/fd >&2".into()),
                pty: pty.then_some(PtySize {
                    cols: 200,
                    rows: 24,
                }),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(exit_code(&exit), Some(0));
        let out = String::from_utf8_lossy(&out).replace('\r', "");
        let fds: Vec<&str> = out.split_whitespace().collect();
        let err = String::from_utf8_lossy(&err);
        if pty {
            // On a terminal, stderr's listing comes on the same stream.
            assert!(fds.starts_with(&["0", "1", "2", "3"]), "{out}");
            assert!(!out.contains("ptmx") && !out.contains("pipe:"), "{out}");
        } else {
            assert_eq!(fds, ["0", "1", "2", "3"], "{err}");
        }
    }
}

/// A script without `#!` runs under /bin/sh, as execvp (and so ssh) runs
/// it, whether named by its path or found in PATH.
#[tokio::test]
async fn a_script_without_a_shebang_runs_under_sh() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("plain-script");
    std::fs::write(&script, "echo from-script \"$1\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let by_path = ExecRequest {
        argv: Some(vec![script.display().to_string(), "arg".into()]),
        ..Default::default()
    };
    let (out, err, exit) = run(&link, by_path).await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        "from-script arg\n",
        "{err:?}"
    );
    assert_eq!(exit_code(&exit), Some(0));
    let mut env = std::collections::BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        format!("/nonexistent:{}", dir.path().display()),
    );
    let by_search = ExecRequest {
        argv: Some(vec!["plain-script".into(), "found".into()]),
        env: Some(env),
        ..Default::default()
    };
    let (out, _, exit) = run(&link, by_search).await;
    assert_eq!(String::from_utf8_lossy(&out), "from-script found\n");
    assert_eq!(exit_code(&exit), Some(0));
    // A path through a file is not "not found": 126, as a shell says.
    let through_file = ExecRequest {
        argv: Some(vec![format!("{}/x", script.display())]),
        ..Default::default()
    };
    let (_, err, exit) = run(&link, through_file).await;
    assert_eq!(
        exit_code(&exit),
        Some(126),
        "{}",
        String::from_utf8_lossy(&err)
    );
}

fn start_agent_shell() -> common::Agent {
    common::start_agent_with(&[], &[("SHELL", "/bin/sh")])
}

#[tokio::test]
async fn a_hundred_channels_at_once_on_one_connection() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let link = link.clone();
        tasks.push(tokio::spawn(async move {
            let (out, _, exit) = run(&link, sh(&format!("echo channel-{i}; exit {}", i % 7))).await;
            (i, out, exit)
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        let (i, out, exit) = task.await.unwrap();
        assert_eq!(out, format!("channel-{i}\n").into_bytes());
        assert_eq!(exit_code(&exit), Some(i % 7));
        seen.insert(i);
    }
    assert_eq!(seen.len(), 100);
}

#[tokio::test]
async fn a_stalled_channel_does_not_stall_another() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let req = ExecRequest {
        argv: Some(vec!["yes".into()]),
        window: Some(64 * 1024),
        ..Default::default()
    };
    let mut stalled = link.exec(req).await.unwrap();
    // Read exactly the window's worth and return no credit.
    let mut got = 0;
    while got < 64 * 1024 {
        match stalled.next().await {
            Some(Event::Stdout(b)) => got += b.len(),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 64 * 1024, "the agent sent more than the window");
    for i in 0..20 {
        let (out, _, exit) = run(&link, sh(&format!("echo other-{i}"))).await;
        assert_eq!(out, format!("other-{i}\n").into_bytes());
        assert_eq!(exit_code(&exit), Some(0));
    }
    // Credit makes it flow again; then close ends it with an exit.
    stalled.window(1000).await.unwrap();
    match stalled.next().await {
        Some(Event::Stdout(b)) => assert!(b.len() <= 1000),
        other => panic!("{other:?}"),
    }
    stalled.close().await.unwrap();
    let mut end = None;
    while let Some(event) = stalled.next().await {
        end = Some(event);
    }
    assert!(matches!(end, Some(Event::Exit(_))), "{end:?}");
}

#[tokio::test]
async fn close_and_connection_loss_kill_the_process_group() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut channel = link.exec(sh("sleep 300 & echo $!; wait")).await.unwrap();
    let pid = first_line_pid(&mut channel).await;
    channel.close().await.unwrap();
    assert!(matches!(channel.collect().await.2, Event::Exit(_)));
    assert!(wait_gone(pid).await, "close left {pid} running");

    let mut channel = link.exec(sh("sleep 300 & echo $!; wait")).await.unwrap();
    let pid = first_line_pid(&mut channel).await;
    link.shutdown();
    assert!(wait_gone(pid).await, "a lost connection left {pid} running");
}

/// A raw framed connection, for what the link would never send.
async fn raw_connect(addr: std::net::SocketAddr) -> LinkFramed {
    let stream: conch::transport::Stream = Box::new(TcpStream::connect(addr).await.unwrap());
    Framed::new(stream, FrameCodec::new())
}

/// A raw connection that reads `hello` and answers with an `exec` in the
/// clear, as no client may.
async fn exec_before_auth(addr: std::net::SocketAddr) -> LinkFramed {
    let mut framed = raw_connect(addr).await;
    let _hello = framed.next().await.unwrap().unwrap();
    framed
        .send(Frame::exec(1, &sh("echo no")).unwrap())
        .await
        .unwrap();
    framed
}

/// The client's half of the handshake, over TLS, on a raw connection.
async fn authenticate(framed: &mut LinkFramed, key: &Key) {
    let tls = Connector::new().unwrap();
    offer(framed, key, Some(&tls)).await.unwrap();
}

async fn expect_error(framed: &mut LinkFramed, ch: u32, code: &str) {
    loop {
        match framed.next().await {
            Some(Ok(Frame {
                ch: got_ch,
                msg: Message::Error { code: got, .. },
                ..
            })) if got.as_str() == code => {
                assert_eq!(got_ch, ch);
                return;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected error {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_wrong_key_is_refused() {
    let agent = start_agent(&[]);
    let wrong = Key::generate();
    let err = AgentLink::connect(agent.addr, &wrong)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("refused"), "{err}");

    // Anything but TLS after hello ends the connection, unrun.
    let mut framed = exec_before_auth(agent.addr).await;
    assert!(
        !matches!(framed.next().await, Some(Ok(_))),
        "no frame answers a plaintext exec"
    );

    // Without TLS (both ends saying so), anything before auth is refused.
    let agent = start_agent(&["--insecure-plaintext"]);
    let mut framed = exec_before_auth(agent.addr).await;
    expect_error(&mut framed, 0, "protocol").await;
    assert!(framed.next().await.is_none(), "connection stays open");
}

#[tokio::test]
async fn garbage_and_oversized_headers_close_only_their_connection() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();

    // Garbage after the handshake.
    let mut framed = raw_connect(agent.addr).await;
    authenticate(&mut framed, &agent.key).await;
    framed
        .get_mut()
        .write_all(b"\x00\x00\x00\x05hello world garbage")
        .await
        .unwrap();
    expect_error(&mut framed, 0, "protocol").await;
    assert!(framed.next().await.is_none());

    // An oversized header length before auth: refused without waiting for
    // the bytes (the handshake's limits, seen here without TLS).
    let plain = start_agent(&["--insecure-plaintext"]);
    let mut stream = TcpStream::connect(plain.addr).await.unwrap();
    stream.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let mut codec_buf = BytesMut::from(&buf[..]);
    let mut codec = FrameCodec::new();
    let mut frames = Vec::new();
    while let Ok(Some(f)) = tokio_util::codec::Decoder::decode(&mut codec, &mut codec_buf) {
        frames.push(f.msg);
    }
    assert!(
        frames
            .iter()
            .any(|m| matches!(m, Message::Error { code, .. } if code.as_str() == "protocol")),
        "{frames:?}"
    );

    // An unknown type and a payload above 1 MiB, each on its own connection.
    for header in [
        r#"{"type":"launch","ch":0}"#,
        r#"{"type":"stdin","ch":1,"len":2000000}"#,
    ] {
        let mut framed = raw_connect(agent.addr).await;
        authenticate(&mut framed, &agent.key).await;
        let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        framed.get_mut().write_all(&bytes).await.unwrap();
        expect_error(&mut framed, 0, "protocol").await;
    }

    // The first connection never noticed.
    let (out, _, _) = run(&link, sh("echo still-here")).await;
    assert_eq!(out, b"still-here\n");
}

#[tokio::test]
async fn channel_misuse_gets_an_error_and_the_connection_stays() {
    let agent = start_agent(&["--max-channels", "2"]);
    let mut framed = raw_connect(agent.addr).await;
    authenticate(&mut framed, &agent.key).await;

    framed
        .send(Frame::with_payload(
            9,
            Message::Stdin { eof: false },
            Bytes::from_static(b"x"),
        ))
        .await
        .unwrap();
    expect_error(&mut framed, 9, "not_running").await;

    framed
        .send(Frame::exec(1, &sh("sleep 300")).unwrap())
        .await
        .unwrap();
    framed
        .send(Frame::exec(1, &sh("echo again")).unwrap())
        .await
        .unwrap();
    expect_error(&mut framed, 1, "channel_in_use").await;

    framed
        .send(Frame::exec(2, &sh("sleep 300")).unwrap())
        .await
        .unwrap();
    framed
        .send(Frame::exec(3, &sh("echo third")).unwrap())
        .await
        .unwrap();
    expect_error(&mut framed, 3, "too_many_channels").await;

    // Ignored, since they race with an exit by nature.
    framed
        .send(Frame::new(42, Message::Window { add: 10 }))
        .await
        .unwrap();
    framed.send(Frame::new(42, Message::Close)).await.unwrap();
    framed
        .send(Frame::new(0, Message::Ping { id: 7 }))
        .await
        .unwrap();
    loop {
        match framed.next().await.unwrap().unwrap().msg {
            Message::Pong { id, facts } => {
                assert_eq!(id, 7);
                let facts = facts.expect("a pong tells the host's facts");
                assert_eq!(facts.arch, std::env::consts::ARCH);
                assert!(!facts.hostname.is_empty() && !facts.kernel.is_empty());
                break;
            }
            Message::Error { code, .. } => panic!("unexpected error {code}"),
            _ => {}
        }
    }

    // Closing channel 1 frees its id for reuse once its exit is seen.
    framed.send(Frame::new(1, Message::Close)).await.unwrap();
    loop {
        let frame = framed.next().await.unwrap().unwrap();
        if frame.ch == 1 && matches!(frame.msg, Message::Exit(_)) {
            break;
        }
    }
    framed
        .send(Frame::exec(1, &sh("echo reused")).unwrap())
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let frame = framed.next().await.unwrap().unwrap();
        match frame.msg {
            Message::Stdout if frame.ch == 1 => out.extend_from_slice(&frame.payload),
            Message::Exit(status) if frame.ch == 1 => {
                assert_eq!(status.code, Some(0));
                break;
            }
            Message::Error { code, .. } => panic!("unexpected error {code}"),
            _ => {}
        }
    }
    assert_eq!(out, b"reused\n");
}

#[tokio::test]
async fn sigterm_ends_commands_and_exits_cleanly() {
    let mut agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut channel = link.exec(sh("sleep 300 & echo $!; wait")).await.unwrap();
    let pid = first_line_pid(&mut channel).await;
    agent.proc.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.proc.child.wait();
        (status, agent)
    })
    .await
    .unwrap()
    .0
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(wait_gone(pid).await, "{pid} outlived the agent");
}

#[test]
fn a_short_or_missing_key_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "  tooshort \n").unwrap();
    for path in [short.clone(), dir.path().join("missing.key")] {
        let out = std::process::Command::new(common::BIN)
            .args(["agent", "--listen", "127.0.0.1:0", "--key-file"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    let fresh = dir.path().join("fresh.key");
    let out = std::process::Command::new(common::BIN)
        .arg("keygen")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = std::fs::read_to_string(&fresh).unwrap();
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    let again = std::process::Command::new(common::BIN)
        .arg("keygen")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen must not overwrite a key");
}

#[tokio::test]
async fn a_process_that_ignores_stdin_does_not_stall_the_connection() {
    let agent = start_agent(&[]);
    let mut framed = raw_connect(agent.addr).await;
    authenticate(&mut framed, &agent.key).await;
    framed
        .send(Frame::exec(1, &sh("exec sleep 300")).unwrap())
        .await
        .unwrap();
    // More stdin than the channel's credit, to a process that never reads.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    // (The pipe itself takes up to 64 KiB: 40 frames are well beyond both.)
    for _ in 0..40 {
        framed
            .send(Frame::with_payload(
                1,
                Message::Stdin { eof: false },
                chunk.clone(),
            ))
            .await
            .unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        expect_error(&mut framed, 1, "stdin_overflow"),
    )
    .await
    .expect("stdin_overflow");
    // The same connection still runs other commands.
    framed
        .send(Frame::exec(2, &sh("echo unblocked")).unwrap())
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let frame = framed.next().await.unwrap().unwrap();
        match frame.msg {
            Message::Stdout if frame.ch == 2 => out.extend_from_slice(&frame.payload),
            Message::Exit(_) if frame.ch == 2 => break,
            _ => {}
        }
    }
    assert_eq!(out, b"unblocked\n");
    framed.send(Frame::new(1, Message::Close)).await.unwrap();
}

#[tokio::test]
async fn stdin_credit_comes_back_as_the_process_reads() {
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    // Four times the credit through `wc -c`: the link waits for window
    // frames between chunks, and every byte arrives.
    let mut channel = link.exec(sh("wc -c")).await.unwrap();
    let data = Bytes::from(vec![b'y'; 4 * conch::protocol::message::STDIN_WINDOW]);
    channel.stdin(data, true).await.unwrap();
    let (out, _, exit) = channel.collect().await;
    assert_eq!(exit_code(&exit), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        (4 * 1024 * 1024).to_string()
    );
}

/// A PTY shell on `link` with a background job in a process group of
/// its own (job control): the channel and the job's process id.
async fn shell_with_a_job(link: &AgentLink) -> (conch::link::Channel, i32) {
    let req = ExecRequest {
        pty: Some(PtySize { cols: 80, rows: 24 }),
        ..Default::default()
    };
    let mut channel = link.exec(req).await.unwrap();
    channel
        .stdin(
            Bytes::from_static(b"set -m; sleep 300 & echo bg=$!\n"),
            false,
        )
        .await
        .unwrap();
    let mut seen = String::new();
    let pid: i32 = loop {
        match channel.next().await {
            Some(Event::Stdout(b)) => {
                channel.window(b.len() as u64).await.unwrap();
                seen.push_str(&String::from_utf8_lossy(&b));
                if let Some(pid) = seen
                    .split("bg=")
                    .nth(2)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                {
                    break pid;
                }
            }
            other => panic!("{other:?} after {seen:?}"),
        }
    };
    assert!(common::alive(pid));
    (channel, pid)
}

#[tokio::test]
async fn an_interactive_shells_jobs_die_with_its_channel() {
    let agent = start_agent_shell();
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let (mut channel, pid) = shell_with_a_job(&link).await;
    channel.close().await.unwrap();
    let _ = channel.collect().await;
    assert!(
        wait_gone(pid).await,
        "the shell's background job {pid} survived"
    );
}

/// Without cgroups, a closed shell's jobs are found through `/proc` (its
/// session, its environment mark). Shells closed together share the
/// scans: every job of every one of them dies.
#[tokio::test]
async fn the_jobs_of_shells_closed_together_all_die_without_cgroups() {
    let agent = common::start_agent_with(&[], &[("SHELL", "/bin/sh"), ("CONCH_CGROUPS", "off")]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut shells = Vec::new();
    for _ in 0..12 {
        shells.push(shell_with_a_job(&link).await);
    }
    let jobs: Vec<i32> = shells.iter().map(|(_, pid)| *pid).collect();
    let closing: Vec<_> = shells
        .into_iter()
        .map(|(mut channel, _)| {
            tokio::spawn(async move {
                channel.close().await.unwrap();
                let _ = channel.collect().await;
            })
        })
        .collect();
    for c in closing {
        c.await.unwrap();
    }
    for pid in jobs {
        assert!(wait_gone(pid).await, "a closed shell's job {pid} survived");
    }
}

#[tokio::test]
async fn a_weak_key_is_refused_unless_the_risk_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let weak = dir.path().join("weak.key");
    std::fs::write(&weak, "passwordpassword").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&weak, std::fs::Permissions::from_mode(0o600)).unwrap();
    let weak_path = weak.to_str().unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["agent", "--listen", "127.0.0.1:0", "--key-file", weak_path])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is weak") && err.contains("conch keygen"),
        "{err}"
    );

    // Accepted on purpose: it starts, and serves that key.
    let agent = common::start_agent_keyed(&weak, &["--allow-weak-key"]);
    let key = Key::load_with(&weak, true).unwrap();
    let link = AgentLink::connect(agent.addr, &key).await.unwrap();
    let (out, _, _) = run(&link, sh("echo weak-but-allowed")).await;
    assert_eq!(out, b"weak-but-allowed\n");
}
