//! `conch user`: the users a server keeps in its store, through its REST
//! API (admins): list, add, a new password, delete.

use serde_json::{Value, json};

use super::{ClientError, Server};

/// What `conch user` does.
pub enum UserAction {
    List {
        json: bool,
    },
    Add {
        name: String,
        role: String,
        agents: Option<String>,
    },
    Passwd {
        name: String,
    },
    Del {
        name: String,
    },
}

/// Does `action`; a password is read from standard input (without echo
/// on a terminal), never from the command line, where `ps` shows it.
pub async fn run(server: &Server, action: UserAction) -> Result<(), ClientError> {
    let client = server.client()?;
    let path = |name: &str| {
        let name = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
        server.url(&format!("/api/v1/users/{name}"))
    };
    match action {
        UserAction::List { json } => {
            let list: Value = server
                .send(client.get(server.url("/api/v1/users")))
                .await?
                .json()
                .await
                .map_err(|e| ClientError::Broken(e.to_string()))?;
            let users = list["users"].as_array().cloned().unwrap_or_default();
            if json {
                for u in &users {
                    println!("{u}");
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    let text = |k: &str| u[k].as_str().unwrap_or("-").to_owned();
                    vec![text("name"), text("role"), text("agents"), text("source")]
                })
                .collect();
            print!("{}", table(&["NAME", "ROLE", "AGENTS", "SOURCE"], &rows));
        }
        UserAction::Add { name, role, agents } => {
            let password = read_password(&format!("password for {name}: "))?;
            let mut body = json!({"name": name, "password": password, "role": role});
            if let Some(a) = agents {
                body["agents"] = a.into();
            }
            server
                .send(client.post(server.url("/api/v1/users")).json(&body))
                .await?;
            eprintln!("conch: user {name} added");
        }
        UserAction::Passwd { name } => {
            let password = read_password(&format!("new password for {name}: "))?;
            server
                .send(
                    client
                        .put(format!("{}/password", path(&name)))
                        .json(&json!({"password": password})),
                )
                .await?;
            eprintln!("conch: the password of {name} is changed; its sessions ended");
        }
        UserAction::Del { name } => {
            server.send(client.delete(path(&name))).await?;
            eprintln!("conch: user {name} deleted; its sessions ended");
        }
    }
    Ok(())
}

/// The first line of standard input; on a terminal, asked for with
/// `prompt` and not echoed.
fn read_password(prompt: &str) -> Result<String, ClientError> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let saved = if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        nix::sys::termios::tcgetattr(&stdin).ok().inspect(|t| {
            let mut quiet = t.clone();
            quiet
                .local_flags
                .remove(nix::sys::termios::LocalFlags::ECHO);
            let _ =
                nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &quiet);
        })
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
        eprintln!();
    }
    read.map_err(|e| ClientError::Broken(format!("cannot read the password: {e}")))?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(ClientError::Broken(
            "empty password (give it on standard input)".into(),
        ));
    }
    Ok(password)
}

/// Aligned columns; control characters (a hostile name's escapes) shown
/// as spaces.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(head.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
