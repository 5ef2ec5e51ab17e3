//! Running under systemd: the shipped unit files pass `systemd-analyze
//! verify`, and the agent speaks the notify protocol (ready, watchdog,
//! stopping) without letting its commands see systemd's socket.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use conch::link::AgentLink;
use conch::protocol::ExecRequest;

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin = common::bin();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut units = Vec::new();
    for unit in ["conch-agent.service", "conch-server.service"] {
        let text = std::fs::read_to_string(format!("{root}/deploy/systemd/{unit}")).unwrap();
        // verify checks that ExecStart's program exists: the one built here.
        let text = text.replace("/usr/bin/conch", &bin);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian's systemd package; tests/run-all.sh installs it)");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    // A setting it cannot parse is only a warning: none is allowed either.
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify said:\n{said}"
    );
}

#[tokio::test]
async fn the_agent_notifies_systemd_and_hides_its_socket_from_commands() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = |socket: &UnixDatagram| {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let agent = common::start_agent_with(
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = recv(&socket);
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=listening on 127.0.0.1:"), "{ready}");
    // The watchdog's keep-alive comes every half interval.
    let ping = recv(&socket);
    assert!(ping.contains("WATCHDOG=1"), "{ping}");

    // A command run by the agent does not get systemd's socket.
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let req = ExecRequest {
        cmd: Some("echo ${NOTIFY_SOCKET:-unset} ${WATCHDOG_USEC:-unset}".into()),
        ..Default::default()
    };
    let (out, _, _) = link.exec(req).await.unwrap().collect().await;
    assert_eq!(String::from_utf8_lossy(&out), "unset unset\n");

    // Stopping is told before the agent goes.
    agent.proc.signal(libc::SIGTERM);
    loop {
        let said = recv(&socket);
        if said.contains("STOPPING=1") {
            break;
        }
        assert!(said.contains("WATCHDOG=1"), "{said}");
    }
}
