//! One server, several agents declared in an agents file (`--agents-file`):
//! real agent processes on loopback ports, each with its own key, reached
//! by name, listed with the labels the file gives them.

mod common;

use common::{Endpoint, start_agent, start_server};
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
        let body: Value = client
            .post(server.url("/api/v1/exec"))
            .bearer_auth(&server.token)
            .json(&json!({"command": "echo $PPID", "agent": name}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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
            format!("[[agents]]\nname = \"a\"\nkey_file = \"{key}\"\n"),
            "no addr",
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
