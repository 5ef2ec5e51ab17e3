//! Container deployment: the files under docker/ agree with the binary,
//! the binaries run configured only through the environment exactly as
//! docker/compose.yaml configures them, and SIGTERM behaves as a container
//! runtime needs. With a container engine, the image is built and run too.

mod common;
use common::Endpoint;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn compose() -> serde_norway::Value {
    serde_norway::from_str(&repo("docker/compose.yaml")).expect("compose.yaml parses")
}

/// A service's environment as a map.
fn service_env(compose: &serde_norway::Value, service: &str) -> BTreeMap<String, String> {
    let env = &compose["services"][service]["environment"];
    env.as_mapping()
        .unwrap_or_else(|| panic!("{service} has an environment mapping"))
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_norway::Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_owned(),
            };
            (k.as_str().unwrap().to_owned(), v)
        })
        .collect()
}

fn help(role: &str) -> String {
    let out = Command::new(common::BIN)
        .args([role, "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The instructions of a Dockerfile's last stage, by keyword.
fn final_stage(dockerfile: &str) -> Vec<(String, String)> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut stage = Vec::new();
    for line in joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (kw, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if kw.eq_ignore_ascii_case("FROM") {
            stage.clear();
        }
        stage.push((kw.to_ascii_uppercase(), rest.trim().to_owned()));
    }
    stage
}

#[test]
fn dockerfile_and_compose_match_the_binary() {
    let dockerfile = repo("docker/Dockerfile");
    let stage = final_stage(&dockerfile);
    let get = |kw: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(k, _)| k == kw)
            .map(|(_, v)| v.clone())
            .collect()
    };

    // Non-root, an init as PID 1, a health check, the HTTP port only.
    let user = get("USER").pop().expect("USER in the runtime stage");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as {user}"
    );
    let entrypoint: Vec<String> =
        serde_json::from_str(&get("ENTRYPOINT").pop().expect("ENTRYPOINT")).unwrap();
    assert!(entrypoint[0].ends_with("tini"), "{entrypoint:?}");
    let binary = entrypoint.last().unwrap();
    assert!(
        get("COPY").iter().any(|c| c.ends_with(binary.as_str())),
        "the entrypoint {binary} is copied into the image"
    );
    let cmd: Vec<String> = serde_json::from_str(&get("CMD").pop().expect("CMD")).unwrap();
    assert_eq!(cmd, ["serve"]);
    let healthcheck = get("HEALTHCHECK").pop().expect("HEALTHCHECK");
    assert!(
        healthcheck.contains("conch\", \"healthcheck\""),
        "{healthcheck}"
    );
    let env = get("ENV").join(" ");
    let listen = env
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("CONCH_LISTEN="))
        .expect("CONCH_LISTEN");
    assert_eq!(
        get("EXPOSE"),
        vec![port_of(listen).to_string()],
        "exposes the listen port only"
    );
    let ignore = repo(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/")
            && ignore.lines().any(|l| l.trim() == "node_modules/")
    );

    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let role = service["command"][0].as_str().unwrap();
        assert!(["serve", "agent"].contains(&role), "{name} runs {role}");
        // Every variable the compose file sets is one the binary reads.
        let help = help(role);
        for var in service_env(&compose, name).keys() {
            assert!(
                help.contains(&format!("env: {var}=")) || help.contains(&format!("env: {var}]")),
                "{name}: {var} is not a `conch {role}` setting"
            );
        }
        // Secrets come from Docker secrets, declared at the top level.
        for (var, value) in service_env(&compose, name) {
            if let Some(secret) = value.strip_prefix("/run/secrets/") {
                // Short syntax (a name) or long syntax (source, uid, mode).
                let listed: Vec<&str> = service["secrets"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter_map(|s| s.as_str().or_else(|| s["source"].as_str()))
                    .collect();
                // Readable by the container's user only, never by all.
                for s in service["secrets"].as_sequence().unwrap() {
                    assert_eq!(s["uid"].as_str(), Some("10001"), "{name}: secret owner");
                    // YAML 1.2 reads 0o400 as a number; a loader may keep the text.
                    let mode = s["mode"].as_u64().or_else(|| {
                        s["mode"]
                            .as_str()
                            .and_then(|m| u64::from_str_radix(m.trim_start_matches("0o"), 8).ok())
                    });
                    assert_eq!(mode, Some(0o400), "{name}: secret mode");
                }
                assert!(
                    listed.contains(&secret),
                    "{name}: {var} names secret {secret} it does not mount"
                );
                assert!(
                    !compose["secrets"][secret].is_null(),
                    "secret {secret} is declared"
                );
            }
            assert!(
                !var.contains("TOKEN") || value.starts_with("/run/secrets/"),
                "{var} must come from a secret"
            );
        }
    }
    let agent = service_env(&compose, "agent");
    let server = service_env(&compose, "server");
    assert!(
        compose["services"]["agent"]["ports"].is_null(),
        "the agent's port is never published"
    );
    let ports: Vec<&str> = compose["services"]["server"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(ports.len(), 1);
    assert!(
        ports[0].starts_with("127.0.0.1:"),
        "published on loopback only: {}",
        ports[0]
    );
    assert_eq!(
        port_of(ports[0]),
        port_of(&server["CONCH_LISTEN"]),
        "the published port is the one listened on"
    );
    assert_eq!(
        port_of(&server["CONCH_AGENT"]),
        port_of(&agent["CONCH_AGENT_LISTEN"])
    );
    assert_eq!(
        server["CONCH_AGENT"].split(':').next(),
        Some("agent"),
        "the server reaches the agent by service name"
    );
    assert_eq!(
        agent["CONCH_AGENT_KEY_FILE"],
        server["CONCH_AGENT_KEY_FILE"]
    );
    let health = compose["services"]["agent"]["healthcheck"]["test"]
        .as_sequence()
        .unwrap();
    assert_eq!(health[2].as_str(), Some("healthcheck"));
}

/// The compose environment, with container paths and addresses mapped to
/// this machine's (secrets to files in `dir`, ports to free loopback ports).
fn localise(
    env: BTreeMap<String, String>,
    dir: &Path,
    agent_port: u16,
    server_port: u16,
) -> Vec<(String, String)> {
    env.into_iter()
        .map(|(k, v)| {
            let v = if let Some(secret) = v.strip_prefix("/run/secrets/") {
                dir.join(secret).display().to_string()
            } else if v.starts_with("/var/lib/conch") {
                dir.join("data").display().to_string()
            } else if k == "CONCH_AGENT_LISTEN" {
                format!("127.0.0.1:{agent_port}")
            } else if k == "CONCH_AGENT" {
                format!("localhost:{agent_port}")
            } else if k == "CONCH_LISTEN" {
                format!("127.0.0.1:{server_port}")
            } else {
                v
            };
            (k, v)
        })
        .collect()
}

fn start_env_only(role: &str, env: &[(String, String)], dir: tempfile::TempDir) -> common::Proc {
    let mut cmd = Command::new(common::BIN);
    cmd.arg(role);
    // Only the environment: nothing inherited that conch reads.
    for (k, _) in std::env::vars() {
        if k.starts_with("CONCH_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::spawn_with(cmd, dir)
}

#[tokio::test]
async fn configured_only_through_the_environment_as_compose_does() {
    let compose = compose();
    let secrets = tempfile::tempdir().unwrap();
    let admin = "compose-admin-token-0123456789abcdef";
    std::fs::write(secrets.path().join("admin_token"), format!("{admin}\n")).unwrap();
    conch::keyfile::Key::generate()
        .save_new(&secrets.path().join("agent_key"))
        .unwrap();
    let (agent_port, server_port) = (common::free_port(), common::free_port());
    let agent_env = localise(
        service_env(&compose, "agent"),
        secrets.path(),
        agent_port,
        server_port,
    );
    let server_env = localise(
        service_env(&compose, "server"),
        secrets.path(),
        agent_port,
        server_port,
    );

    let mut agent = start_env_only("agent", &agent_env, tempfile::tempdir().unwrap());
    agent.wait_for("agent listening", |l| {
        common::logged_addr(l, "agent listening")
    });
    let mut server = start_env_only("serve", &server_env, tempfile::tempdir().unwrap());
    // JSON logs, as CONCH_LOG_FORMAT asks: every line up to the agent
    // connection is one object.
    server.wait_for("agent connection", |l| {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v.is_object(), "{l}");
        (v["message"] == "agent connected").then_some(())
    });

    let base = format!("http://127.0.0.1:{server_port}");
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v1/exec"))
        .bearer_auth(admin)
        .json(&json!({"command": "echo through-env"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["stdout"], "through-env\n");
    let agents: Value = common::get_json(format!("{base}/api/v1/agents"), admin).await;
    assert_eq!(agents["agents"][0]["name"], "agent");

    // The health checks the image and compose file use.
    let check = |args: &[&str], env: &[(String, String)]| {
        let mut cmd = Command::new(common::BIN);
        cmd.arg("healthcheck").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap().status.success()
    };
    assert!(check(&[], &server_env));
    assert!(check(&["--tcp", &format!("127.0.0.1:{agent_port}")], &[]));
    assert!(!check(
        &["--tcp", &format!("127.0.0.1:{}", common::free_port())],
        &[]
    ));
    // The probe is no error in the agent's log: a fresh authenticated
    // connection logs a line, and nothing before it was a warning.
    let key = conch::keyfile::Key::load(&secrets.path().join("agent_key")).unwrap();
    let _link = conch::link::AgentLink::connect(format!("127.0.0.1:{agent_port}"), &key)
        .await
        .unwrap();
    // (The server's own connection authenticated first.)
    let mut authenticated = 0;
    agent.wait_for("the new connection", |l| {
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(
            !matches!(v["level"].as_str(), Some("WARN" | "ERROR")),
            "{l}"
        );
        authenticated += usize::from(v["message"] == "client authenticated");
        (authenticated == 2).then_some(())
    });
}

#[tokio::test]
async fn sigterm_ends_running_commands_and_exits_zero() {
    let mut server = common::start_server(&[], &[]);
    let cookie = server.admin_cookie().await;
    // A console with a running command, and a REST command streaming.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", server.addr),
    )
    .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut()
        .insert("origin", server.origin().parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(
        json!({"type": "exec", "id": 1, "cmd": "echo $$; exec sleep 300"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let pid: i32 = loop {
        if let Message::Binary(b) = ws.next().await.unwrap().unwrap() {
            break String::from_utf8_lossy(&b[5..]).trim().parse().unwrap();
        }
    };
    let mut rest = reqwest::Client::new()
        .post(server.url("/api/v1/exec"))
        .bearer_auth(&server.token)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "echo $$; exec sleep 300"}))
        .send()
        .await
        .unwrap();
    let first = rest.chunk().await.unwrap().unwrap();
    let line: Value = serde_json::from_slice(&first).unwrap();
    let rest_pid: i32 = line["data"].as_str().unwrap().trim().parse().unwrap();
    assert!(common::alive(pid) && common::alive(rest_pid));

    server.proc.signal(libc::SIGTERM);
    // The console is told, then closed.
    let mut told = false;
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            told |= t.contains("\"shutdown\"");
        }
    }
    assert!(told, "the console was not told about the shutdown");
    // The streaming client gets a last line saying so.
    let mut tail = Vec::new();
    while let Ok(Some(chunk)) = rest.chunk().await {
        tail.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&tail).contains("shutting down"),
        "{}",
        String::from_utf8_lossy(&tail)
    );
    // Exit 0 within the 10 s a container runtime allows.
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(status) = server.proc.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
    .await
    .unwrap()
    .expect("exited within 10 s");
    assert!(status.success(), "{status:?}");
    assert!(
        common::wait_gone(pid).await && common::wait_gone(rest_pid).await,
        "a command outlived the server"
    );
}

/// Says why the container test did not run, past the test harness's output
/// capture (which takes only the print macros), so that it shows in CI.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED the_image_builds_and_the_stack_runs: no container engine here ({why})"
    );
}

/// Builds the image and runs the compose stack, where an engine is available.
#[tokio::test]
async fn the_image_builds_and_the_stack_runs() {
    let info = Command::new("docker").arg("info").output();
    match info {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr);
            skipped(&format!(
                "docker info: {}",
                why.lines().next().unwrap_or("failed")
            ));
            return;
        }
        Err(e) => {
            skipped(&format!("docker: {e}"));
            return;
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let secrets = Path::new(root).join("docker/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let admin = "image-admin-token-0123456789abcdef";
    std::fs::write(secrets.join("admin_token"), admin).unwrap();
    let key = secrets.join("agent.key");
    if !key.exists() {
        conch::keyfile::Key::generate().save_new(&key).unwrap();
    }
    for f in ["admin_token", "agent.key"] {
        // As the README says: owned by the containers' user, readable by it alone.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(secrets.join(f), std::fs::Permissions::from_mode(0o400)).unwrap();
        std::os::unix::fs::chown(secrets.join(f), Some(10001), Some(10001)).unwrap();
    }
    let compose = |args: &[&str]| {
        Command::new("docker")
            .args(["compose", "-f", "docker/compose.yaml"])
            .args(args)
            .current_dir(root)
            .status()
            .unwrap()
    };
    assert!(compose(&["up", "--build", "--detach", "--wait"]).success());
    let resp = reqwest::Client::new()
        .post("http://127.0.0.1:8080/api/v1/exec")
        .bearer_auth(admin)
        .json(&json!({"command": "id -u; echo in-container"}))
        .send()
        .await;
    let down = compose(&["down", "--volumes"]);
    let body: Value = resp.unwrap().json().await.unwrap();
    assert_eq!(body["stdout"], "10001\nin-container\n");
    assert!(down.success());
}
