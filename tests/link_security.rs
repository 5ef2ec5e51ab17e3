//! The agent link's encryption and integrity (protocol version 3): what a
//! machine on the path sees and can do. A relay in this process sits
//! between the client end (`AgentLink`) and a real `conch agent`: it
//! records, terminates TLS with its own certificates, or flips a byte.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::start_agent;
use conch::link::{AgentLink, Event, Security};
use conch::protocol::{ExecRequest, Frame, FrameCodec, Message};
use conch::transport::tls::{Acceptor, Connector};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        cmd: Some(cmd.into()),
        ..Default::default()
    }
}

/// What one direction of a relayed connection does to the bytes it moves.
#[derive(Clone)]
enum Tamper {
    /// Forward and keep a copy.
    Record(Arc<Mutex<Vec<u8>>>),
    /// Forward, but flip one bit of the byte at this offset.
    FlipAt(usize),
}

async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, tamper: Tamper) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut offset = 0usize;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match &tamper {
            Tamper::Record(copy) => copy.lock().unwrap().extend_from_slice(chunk),
            Tamper::FlipAt(at) => {
                if (offset..offset + n).contains(at) {
                    chunk[at - offset] ^= 0x01;
                }
            }
        }
        offset += n;
        if to.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A TCP relay to `agent` for every connection it accepts (at most
/// `connections`), each direction treated as given.
async fn relay(agent: SocketAddr, connections: usize, up: Tamper, down: Tamper) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..connections {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = TcpStream::connect(agent).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, up.clone()));
            tokio::spawn(pump(sr, cw, down.clone()));
        }
    });
    addr
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_recording_relay_sees_no_command_keystroke_or_output() {
    let agent = start_agent(&[]);
    let (up, down) = (Arc::default(), Arc::default());
    let addr = relay(
        agent.addr,
        1,
        Tamper::Record(Arc::clone(&up)),
        Tamper::Record(Arc::clone(&down)),
    )
    .await;
    let link = AgentLink::connect(addr, &agent.key).await.unwrap();
    // The command line, a typed password, and output that echoes it.
    let mut ch = link
        .exec(sh(
            "read secret; echo \"out-$secret-out\"; echo COMMAND-TEXT-MARK",
        ))
        .await
        .unwrap();
    ch.stdin(Bytes::from_static(b"typed-password-42\n"), true)
        .await
        .unwrap();
    let (out, _, exit) = ch.collect().await;
    assert!(matches!(exit, Event::Exit(_)), "{exit:?}");
    assert_eq!(out, b"out-typed-password-42-out\nCOMMAND-TEXT-MARK\n");

    let (up, down) = (up.lock().unwrap().clone(), down.lock().unwrap().clone());
    let key_text = std::fs::read_to_string(&agent.key_file).unwrap();
    assert!(
        up.len() > 100 && down.len() > 100,
        "the relay carried the link"
    );
    for (what, needle) in [
        ("the command line", &b"COMMAND-TEXT-MARK"[..]),
        ("the keystrokes", b"typed-password-42"),
        ("the key", key_text.trim().as_bytes()),
        ("the key's bytes", agent.key.as_bytes()),
    ] {
        assert!(!contains(&up, needle), "{what} went up in the clear");
    }
    for (what, needle) in [
        ("the output", &b"out-typed-password-42-out"[..]),
        ("the command's marker", b"COMMAND-TEXT-MARK"),
    ] {
        assert!(!contains(&down, needle), "{what} came down in the clear");
    }
    // Only `hello` is in the clear: version, nonce, and that TLS follows.
    assert!(contains(&down, br#""type":"hello""#));
    assert!(contains(&down, br#""tls":true"#));
}

/// A relay that terminates TLS on both sides with certificates of its own
/// and forwards the frames between: every byte it could want, in the clear.
async fn terminating_relay(agent: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let upstream = TcpStream::connect(agent).await.unwrap();
        let mut up_plain = Framed::new(upstream, FrameCodec::new());
        let mut down_plain = Framed::new(client, FrameCodec::new());
        // `hello` goes by in the clear: pass it on.
        let hello = up_plain.next().await.unwrap().unwrap();
        down_plain.send(hello).await.unwrap();
        let (client, upstream) = (down_plain.into_inner(), up_plain.into_inner());
        let (client_tls, _) = Acceptor::ephemeral().unwrap().accept(client).await.unwrap();
        let (agent_tls, _) = Connector::new().unwrap().connect(upstream).await.unwrap();
        let mut down = Framed::new(client_tls, FrameCodec::new());
        let mut up = Framed::new(agent_tls, FrameCodec::new());
        loop {
            tokio::select! {
                f = down.next() => match f {
                    Some(Ok(f)) => {
                        log.lock().unwrap().push(format!("up {}", f.msg.type_name()));
                        if up.send(f).await.is_err() { break }
                    }
                    _ => break,
                },
                f = up.next() => match f {
                    Some(Ok(f)) => {
                        log.lock().unwrap().push(format!("down {}", f.msg.type_name()));
                        if down.send(f).await.is_err() { break }
                    }
                    _ => break,
                },
            }
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_relay_that_terminates_tls_cannot_complete_the_handshake() {
    let agent = start_agent(&[]);
    let (addr, seen) = terminating_relay(agent.addr).await;
    let err = AgentLink::connect(addr, &agent.key)
        .await
        .err()
        .expect("the handshake must fail through a TLS-terminating relay");
    // The agent found the client's proof bound to another TLS session.
    assert!(err.to_string().contains("wrong key"), "{err}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|s| s == "down ready"),
        "the agent never said ready: {seen:?}"
    );
    assert!(!seen.iter().any(|s| s == "up exec"), "{seen:?}");
}

#[tokio::test]
async fn a_flipped_byte_drops_that_connection_and_only_that_one() {
    let agent = start_agent(&[]);
    let other = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    // Far enough in to be past the handshake, in the client's first
    // application records (its exec).
    let addr = relay(
        agent.addr,
        1,
        Tamper::FlipAt(4000),
        Tamper::Record(Arc::default()),
    )
    .await;
    let link = AgentLink::connect(addr, &agent.key).await.unwrap();
    // Enough bytes up to reach the flipped one: a large command line.
    let filler = "x".repeat(8000);
    let result = match link.exec(sh(&format!(": {filler}; echo ran"))).await {
        Ok(mut ch) => ch.collect().await.2,
        Err(e) => Event::Error {
            code: conch::vocab::ErrorCode::Protocol,
            message: e.to_string(),
        },
    };
    assert!(
        !matches!(result, Event::Exit(_)),
        "a tampered record must not run: {result:?}"
    );
    // The link is gone, the agent and its other connection are not.
    let (out, _, exit) = other
        .exec(sh("echo still-here"))
        .await
        .unwrap()
        .collect()
        .await;
    assert!(matches!(exit, Event::Exit(_)), "{exit:?}");
    assert_eq!(out, b"still-here\n");
}

#[tokio::test]
async fn plaintext_needs_the_flag_on_both_ends_and_says_so() {
    // A TLS agent, a client that wants plaintext.
    let agent = start_agent(&[]);
    let err = AgentLink::connect_with(agent.addr, &agent.key, Security::Plaintext)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("requires TLS"), "{err}");

    // A plaintext agent, a client that wants TLS.
    let plain = start_agent(&["--insecure-plaintext"]);
    let err = AgentLink::connect(plain.addr, &plain.key)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("--insecure-plaintext"), "{err}");

    // Both say so: it works, and the agent warned when it started.
    let link = AgentLink::connect_with(plain.addr, &plain.key, Security::Plaintext)
        .await
        .unwrap();
    let (out, _, _) = link.exec(sh("echo plain")).await.unwrap().collect().await;
    assert_eq!(out, b"plain\n");
}

#[tokio::test]
async fn an_older_agent_gets_a_clear_error_not_a_hang() {
    // An agent of protocol version 2: its hello, then nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(stream, FrameCodec::new());
        let hello = Message::Hello {
            version: 2,
            nonce: "ab".repeat(32),
            tls: false,
            name: None,
        };
        framed.send(Frame::new(0, hello)).await.unwrap();
        let _ = framed.next().await;
    });
    let key = conch::keyfile::Key::generate();
    let err = AgentLink::connect(addr, &key).await.err().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("version 2") && text.contains("upgrade the agent"),
        "{text}"
    );
}
