//! Files to and from an agent's host: the REST endpoints and `conch cp`
//! against a real server and its agent, and the agent's `put` into a
//! shell session's directory over the protocol.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{Endpoint, Server, start_agent, start_server};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;

/// Deterministic bytes that do not compress or repeat: chunk `i` of a
/// stream seeded with `seed`.
fn chunk(seed: u64, i: u64, len: usize) -> Bytes {
    let mut x = seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// `count` chunks of `len` bytes, and their SHA-256.
fn content(seed: u64, count: u64, len: usize) -> (Vec<Bytes>, String) {
    let chunks: Vec<Bytes> = (0..count).map(|i| chunk(seed, i, len)).collect();
    let mut h = Sha256::new();
    for c in &chunks {
        h.update(c);
    }
    (chunks, hex::encode(h.finalize()))
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The query string for `path` (any bytes).
fn at(path: &Path) -> String {
    let enc = percent_encoding::percent_encode(
        path.as_os_str().as_bytes(),
        percent_encoding::NON_ALPHANUMERIC,
    );
    format!("/api/v1/files?path={enc}")
}

async fn put(
    server: &Server,
    token: &str,
    query: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .put(server.url(query))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .expect("the server answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

async fn get(server: &Server, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .get(server.url(query))
        .bearer_auth(&server.token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("the server answers")
}

/// The peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// File helpers (`conch __conch_file`) that hold something under
/// `needle` open (the directory they write in, the file they read).
fn helpers_for(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains("__conch_file") || !common::alive(pid) {
            continue;
        }
        let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.to_string_lossy().contains(needle));
        if holds {
            found.push(pid);
        }
    }
    found
}

/// Waits (bounded) until `check` holds.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 10 s");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn a_gib_goes_up_and_down_byte_exact_while_the_server_stays_small() {
    let server = start_server(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("big.bin");
    // 1 GiB, generated as it is sent: the test holds none of it either.
    const CHUNKS: u64 = 4096;
    const LEN: usize = 256 * 1024;
    let mut h = Sha256::new();
    for i in 0..CHUNKS {
        h.update(chunk(7, i, LEN));
    }
    let want = hex::encode(h.finalize());
    let body = futures_util::stream::iter(0..CHUNKS)
        .map(|i| Ok::<Bytes, std::io::Error>(chunk(7, i, LEN)));
    let resp = reqwest::Client::new()
        .put(server.url(&at(&target)))
        .bearer_auth(&server.token)
        .header("content-length", CHUNKS * LEN as u64)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let written: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{written}");
    assert_eq!(written["sha256"], want.as_str());
    assert_eq!(written["size"], CHUNKS * LEN as u64);
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        CHUNKS * LEN as u64
    );

    let resp = get(&server, &at(&target), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(CHUNKS * LEN as u64));
    // The agent wrote it: it knows the hash before sending.
    assert_eq!(resp.headers()["etag"], format!("\"{want}\"").as_str());
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(c) = body.next().await {
        let c = c.unwrap();
        got += c.len() as u64;
        h.update(&c);
    }
    assert_eq!(got, CHUNKS * LEN as u64);
    assert_eq!(hex::encode(h.finalize()), want);

    let peak = peak_rss(server.proc.child.id());
    eprintln!(
        "server peak RSS after 1 GiB up and down: {} MiB",
        peak / MIB as u64
    );
    assert!(
        peak < 256 * MIB as u64,
        "the server's memory grew with the file: peak RSS {} MiB",
        peak / MIB as u64
    );
}

#[tokio::test]
async fn a_cut_transfer_leaves_no_file_and_no_process() {
    let server = start_server(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let needle = dir.path().to_str().unwrap().to_owned();
    let target = dir.path().join("cut.bin");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_of(rx));
    let url = server.url(&at(&target));
    let token = server.token.clone();
    let upload = tokio::spawn(async move {
        reqwest::Client::new()
            .put(url)
            .bearer_auth(token)
            .header("content-length", (64 * MIB).to_string())
            .body(body)
            .send()
            .await
    });
    for i in 0..8 {
        tx.send(Ok(chunk(1, i, MIB))).await.unwrap();
    }
    // The helper is writing: now the client goes away midway.
    until("the helper runs", || !helpers_for(&needle).is_empty()).await;
    // Its request is on its stdin, not its command line: other local
    // users see no path in `ps`.
    for pid in helpers_for(&needle) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("cut.bin"),
            "the request shows in ps: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
    }
    tx.send(Err(std::io::Error::other("cut"))).await.unwrap();
    drop(tx);
    let _ = upload.await.unwrap();
    until("the helper is gone", || helpers_for(&needle).is_empty()).await;
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "a cut upload left {left:?}");

    // A download dropped after its first bytes ends its helper too.
    let big = dir.path().join("source.bin");
    std::fs::write(&big, vec![7u8; 64 * MIB]).unwrap();
    let resp = get(&server, &at(&big), &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    until("the reader runs", || !helpers_for(&needle).is_empty()).await;
    drop(body);
    until("the reader is gone", || helpers_for(&needle).is_empty()).await;
}

/// A stream of what `rx` receives.
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

#[tokio::test]
async fn a_download_resumes_with_a_range_of_the_same_version() {
    let server = start_server(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("r.bin");
    let data = chunk(3, 0, MIB);
    let (status, written) = put(&server, &server.token, &at(&target), data.clone()).await;
    assert_eq!(status, 201, "{written}");
    let etag = format!("\"{}\"", sha(&data));

    let resp = get(&server, &at(&target), &[("range", "bytes=1000-")]).await;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-{}/{}", MIB - 1, MIB).as_str()
    );
    assert_eq!(resp.headers()["etag"], etag.as_str());
    assert_eq!(resp.bytes().await.unwrap(), data.slice(1000..));

    let resp = get(&server, &at(&target), &[("range", "bytes=-10")]).await;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap(), data.slice(MIB - 10..));

    let resp = get(&server, &at(&target), &[("range", "bytes=10-19")]).await;
    assert_eq!(resp.bytes().await.unwrap(), data.slice(10..20));

    // Resuming a copy of this version: the rest; of another: all of it.
    let resp = get(
        &server,
        &at(&target),
        &[("range", "bytes=500-"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(resp.status(), 206);
    let stale = format!("\"{}\"", "0".repeat(64));
    let resp = get(
        &server,
        &at(&target),
        &[("range", "bytes=500-"), ("if-range", &stale)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), data);

    let resp = get(&server, &at(&target), &[("range", "bytes=5000000-")]).await;
    assert_eq!(resp.status(), 416);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{MIB}").as_str()
    );
}

#[tokio::test]
async fn refusals_say_why_and_write_nothing() {
    let users_dir = tempfile::tempdir().unwrap();
    let users = common::users_file(users_dir.path());
    let server = start_server(&["--users-file", &users], &[]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f.txt");
    let token = server.token.clone();

    assert_eq!(put(&server, &token, &at(&target), "one").await.0, 201);
    let (status, problem) = put(&server, &token, &at(&target), "two").await;
    assert_eq!(status, 409);
    assert!(
        problem["detail"].as_str().unwrap().contains("exists"),
        "{problem}"
    );
    let replace = format!("{}&overwrite=true", at(&target));
    assert_eq!(put(&server, &token, &replace, "three").await.0, 200);
    assert_eq!(std::fs::read(&target).unwrap(), b"three");

    let missing = dir.path().join("no/such/dir/f");
    assert_eq!(put(&server, &token, &at(&missing), "x").await.0, 404);
    assert_eq!(get(&server, &at(&missing), &[]).await.status(), 404);
    assert_eq!(get(&server, &at(dir.path()), &[]).await.status(), 409);

    // A declared hash that the bytes do not have: nothing is written.
    let other = dir.path().join("g.txt");
    let resp = reqwest::Client::new()
        .put(server.url(&at(&other)))
        .bearer_auth(&token)
        .header(
            "repr-digest",
            "sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:",
        )
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("SHA-256"));
    assert!(!other.exists());

    let typo = format!("{}&overwite=true", at(&other));
    assert_eq!(put(&server, &token, &typo, "x").await.0, 400);

    // Viewers neither write nor read; a cookie without the page's Origin
    // writes nothing either.
    let vera = server
        .login(&[("username", "vera"), ("password", "viewer-pw")])
        .await
        .unwrap();
    let as_vera = |req: reqwest::RequestBuilder| {
        req.header("cookie", &vera)
            .header("origin", server.origin())
            .send()
    };
    let client = reqwest::Client::new();
    let resp = as_vera(client.put(server.url(&at(&other))).body("x"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = as_vera(client.get(server.url(&at(&target)))).await.unwrap();
    assert_eq!(resp.status(), 403);
    let olga = server
        .login(&[("username", "olga"), ("password", "operator-pw")])
        .await
        .unwrap();
    let resp = client
        .put(server.url(&at(&other)))
        .header("cookie", &olga)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "no Origin: no write by cookie");
    let resp = client
        .put(server.url(&at(&other)))
        .header("cookie", &olga)
        .header("origin", server.origin())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // Someone's session id is no way to anything.
    let in_session = format!("{}&session=0123", at(Path::new("rel.txt")));
    assert_eq!(put(&server, &token, &in_session, "x").await.0, 404);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[tokio::test]
async fn the_agents_user_is_refused_what_it_may_not_do() {
    if !is_root() {
        eprintln!("SKIPPED: --run-as needs root");
        return;
    }
    let server = start_server(&["--run-as", "nobody"], &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let target = dir.path().join("denied.txt");
    let (status, problem) = put(&server, &server.token, &at(&target), "x").await;
    assert_eq!(status, 403, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{problem}"
    );
    assert!(!target.exists());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert_eq!(get(&server, &at(&secret), &[]).await.status(), 403);
    // What nobody may write, it writes, as nobody.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mine = open.join("mine.txt");
    assert_eq!(put(&server, &server.token, &at(&mine), "ok").await.0, 201);
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&mine).unwrap());
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(owner, nobody.uid.as_raw());
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_reported_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let disk = SmallDisk {
        dir: tempfile::tempdir().unwrap(),
    };
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(disk.dir.path())
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mount a 1 MiB tmpfs");
    let server = start_server(&[], &[]);
    let target = disk.dir.path().join("too-big.bin");
    let (status, problem) = put(&server, &server.token, &at(&target), vec![1u8; 4 * MIB]).await;
    assert_eq!(status, 507, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{problem}"
    );
    let left: Vec<_> = std::fs::read_dir(disk.dir.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let stat = nix::sys::statvfs::statvfs(disk.dir.path()).unwrap();
    assert_eq!(stat.blocks_free(), stat.blocks(), "the space is given back");
}

#[tokio::test]
async fn paths_with_spaces_and_bytes_that_are_not_utf8_travel_whole() {
    let server = start_server(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"a b \xff\xfe.txt");
    let target = dir.path().join(name);
    let (status, written) = put(&server, &server.token, &at(&target), "odd").await;
    assert_eq!(status, 201, "{written}");
    assert_eq!(std::fs::read(&target).unwrap(), b"odd");
    let resp = get(&server, &at(&target), &[]).await;
    assert_eq!(resp.status(), 200);
    let disposition = resp.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.ends_with("filename*=UTF-8''a%20b%20%FF%FE.txt"),
        "{disposition}"
    );
    assert_eq!(resp.bytes().await.unwrap(), "odd");
}

#[tokio::test]
async fn two_users_upload_at_once_and_only_one_takes_a_name() {
    let server = start_server(&[], &[]);
    let ann = server.create_token("ann", "operator").await;
    let bob = server.create_token("bob", "operator").await;
    let dir = tempfile::tempdir().unwrap();
    let (a_chunks, a_sha) = content(11, 32, MIB);
    let (b_chunks, b_sha) = content(12, 32, MIB);
    let body = |chunks: Vec<Bytes>| {
        reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks.into_iter().map(Ok::<Bytes, std::io::Error>),
        ))
    };
    let a_own = at(&dir.path().join("ann.bin"));
    let b_own = at(&dir.path().join("bob.bin"));
    let shared = at(&dir.path().join("shared.bin"));
    let (a1, b1, a2, b2) = tokio::join!(
        put(&server, &ann, &a_own, body(a_chunks.clone())),
        put(&server, &bob, &b_own, body(b_chunks.clone())),
        put(&server, &ann, &shared, body(a_chunks)),
        put(&server, &bob, &shared, body(b_chunks)),
    );
    assert_eq!((a1.0, b1.0), (201, 201));
    assert_eq!(a1.1["sha256"], a_sha.as_str());
    assert_eq!(b1.1["sha256"], b_sha.as_str());
    assert_eq!(
        sha(&std::fs::read(dir.path().join("ann.bin")).unwrap()),
        a_sha
    );
    assert_eq!(
        sha(&std::fs::read(dir.path().join("bob.bin")).unwrap()),
        b_sha
    );
    let mut statuses = [a2.0, b2.0];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "exactly one takes the name");
    let winner = if a2.0 == 201 { &a_sha } else { &b_sha };
    assert_eq!(
        &sha(&std::fs::read(dir.path().join("shared.bin")).unwrap()),
        winner,
        "the name holds one whole upload, never a mix"
    );
}

#[tokio::test]
async fn cp_copies_both_ways_with_scp_exit_codes() {
    let server = start_server(&[], &[]);
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, &server.token).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.txt");
    std::fs::write(&local, "from here\n").unwrap();
    let remote_dir = tempfile::tempdir().unwrap();
    let cp = |args: &[&std::ffi::OsStr], stdin: &[u8]| {
        let mut child = std::process::Command::new(common::bin())
            .arg("cp")
            .args(args)
            .env("CONCH_SERVER", server.url(""))
            .env("CONCH_TOKEN_FILE", &token_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let remote = |p: &Path| {
        let mut s = std::ffi::OsString::from(":");
        s.push(p.as_os_str());
        s
    };
    // Into a remote directory, the file keeps its name.
    let into_dir = remote(remote_dir.path());
    let (code, _, err) = cp(&[local.as_os_str(), &into_dir], b"");
    assert_eq!(code, Some(0), "{err}");
    let up = remote_dir.path().join("local.txt");
    assert_eq!(std::fs::read(&up).unwrap(), b"from here\n");
    // scp replaces; -n refuses (exit 1, the reason on stderr).
    let (code, _, _) = cp(&[local.as_os_str(), &remote(&up)], b"");
    assert_eq!(code, Some(0));
    let (code, _, err) = cp(&["-n".as_ref(), local.as_os_str(), &remote(&up)], b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("exists"), "{err}");
    // Down, into a local directory; to stdout; from stdin, odd name.
    let back = tempfile::tempdir().unwrap();
    let (code, _, err) = cp(&[&remote(&up), back.path().as_os_str()], b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(back.path().join("local.txt")).unwrap(),
        b"from here\n"
    );
    let (code, out, _) = cp(&[&remote(&up), "-".as_ref()], b"");
    assert_eq!((code, out.as_slice()), (Some(0), &b"from here\n"[..]));
    let odd = remote_dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"x \xff"));
    let (code, _, err) = cp(&["-".as_ref(), &remote(&odd)], b"piped");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read(&odd).unwrap(), b"piped");
    // A private file stays private.
    let secret = remote_dir.path().join("key");
    std::fs::write(&secret, "k").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, _, err) = cp(&[&remote(&secret), back.path().as_os_str()], b"");
    assert_eq!(code, Some(0), "{err}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(back.path().join("key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_file(back.path().join("key")).unwrap();
    // Refused: 1; conch itself failing (no server): 255.
    let (code, _, err) = cp(
        &[&remote(Path::new("/no/such/file")), back.path().as_os_str()],
        b"",
    );
    assert_eq!(code, Some(1), "{err}");
    let partial: Vec<_> = std::fs::read_dir(back.path()).unwrap().flatten().collect();
    assert_eq!(
        partial.len(),
        1,
        "a failed download leaves nothing: {partial:?}"
    );
    let (code, _, _) = {
        let mut c = std::process::Command::new(common::bin());
        c.args(["cp", "--quiet"])
            .arg(local.as_os_str())
            .arg(remote(&up))
            .env(
                "CONCH_SERVER",
                format!("http://127.0.0.1:{}", common::free_port()),
            )
            .env("CONCH_TOKEN_FILE", &token_file);
        let out = c.output().unwrap();
        (out.status.code(), out.stdout, out.stderr)
    };
    assert_eq!(code, Some(255));
}

#[tokio::test]
async fn a_relative_path_lands_in_the_sessions_working_directory() {
    use conch::link::{AgentLink, Event};
    use conch::protocol::{ExecRequest, PtySize, PutRequest, SessionOptions, WirePath};
    let agent = start_agent(&[]);
    let link = AgentLink::connect(agent.addr, &agent.key).await.unwrap();
    let mut shell = link
        .exec(ExecRequest {
            pty: Some(PtySize { cols: 80, rows: 24 }),
            session: Some(SessionOptions {
                owner: "olga".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = match shell.next().await {
        Some(Event::Session(id)) => id,
        other => panic!("{other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let line = format!("cd '{}' && echo in-$((40+2))\n", dir.path().display());
    shell.stdin(Bytes::from(line), false).await.unwrap();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains("in-42") {
            match shell.next().await {
                Some(Event::Stdout(b)) => {
                    seen.push_str(&String::from_utf8_lossy(&b));
                    let _ = shell.window(b.len() as u64).await;
                }
                Some(_) => {}
                None => panic!("the shell ended"),
            }
        }
    })
    .await
    .expect("the shell changed directory");

    let mut put = link
        .put(&PutRequest {
            path: WirePath(b"here.txt".to_vec()),
            session: Some(id),
            ..Default::default()
        })
        .await
        .unwrap();
    put.stdin(Bytes::from_static(b"beside the shell"), true)
        .await
        .unwrap();
    let mut info = None;
    while let Some(event) = put.next().await {
        match event {
            Event::File(i) => info = Some(*i),
            Event::Exit(status) => {
                assert_eq!(status.code, Some(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let info = info.expect("the file's description");
    let expected = std::fs::canonicalize(dir.path()).unwrap().join("here.txt");
    assert_eq!(info.path, WirePath::from(expected.as_path()));
    assert_eq!(std::fs::read(&expected).unwrap(), b"beside the shell");
}

#[tokio::test]
async fn a_stalled_transfer_is_ended_and_frees_its_slot() {
    // One transfer at a time, and a second of silence is all one gets.
    let server = start_server(
        &["--transfer-idle-secs", "1", "--max-concurrent-execs", "1"],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let needle = dir.path().to_str().unwrap().to_owned();

    // An upload whose client stops sending midway.
    let target = dir.path().join("stalled.bin");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tx.send(Ok(chunk(5, 0, MIB))).await.unwrap();
    let resp = reqwest::Client::new()
        .put(server.url(&at(&target)))
        .bearer_auth(&server.token)
        .header("content-length", (8 * MIB).to_string())
        .body(reqwest::Body::wrap_stream(tokio_stream_of(rx)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 408);
    assert!(resp.text().await.unwrap().contains("nothing was written"));
    drop(tx);
    until("the writer is gone", || helpers_for(&needle).is_empty()).await;
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());

    // A download whose client stops reading: its helper goes, and the one
    // slot is free again while the connection is still open.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![1u8; 64 * MIB]).unwrap();
    let resp = get(&server, &at(&big), &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    until("the reader runs", || !helpers_for(&needle).is_empty()).await;
    until("the stalled reader is ended", || {
        helpers_for(&needle).is_empty()
    })
    .await;
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "ok").unwrap();
    let resp = get(&server, &at(&small), &[]).await;
    assert_eq!(resp.status(), 200, "the slot was freed");
    assert_eq!(resp.bytes().await.unwrap(), "ok");
    // The stalled body ends with an error, never as if complete.
    let mut failed = false;
    while let Some(c) = body.next().await {
        if c.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a cut download must not look complete");
}

#[tokio::test]
async fn devices_are_not_opened_and_cookies_from_sibling_sites_get_nothing() {
    let server = start_server(&[], &[]);
    let resp = get(&server, &at(Path::new("/dev/null")), &[]).await;
    assert_eq!(resp.status(), 409);
    assert!(resp.text().await.unwrap().contains("not a regular file"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("private.txt");
    std::fs::write(&file, "mine").unwrap();
    let cookie = server.admin_cookie().await;
    let by_cookie = |site: &'static str| {
        reqwest::Client::new()
            .get(server.url(&at(&file)))
            .header("cookie", &cookie)
            .header("sec-fetch-site", site)
            .send()
    };
    assert_eq!(by_cookie("same-site").await.unwrap().status(), 403);
    assert_eq!(by_cookie("cross-site").await.unwrap().status(), 403);
    let own = by_cookie("same-origin").await.unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(own.headers()["x-file-mode"], "0644");
    assert_eq!(by_cookie("none").await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_directory_swapped_for_a_link_midway_changes_where_nothing_goes() {
    let server = start_server(&[], &[]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("uploads");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let target = dir.join("f.bin");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_of(rx));
    let (url, token) = (server.url(&at(&target)), server.token.clone());
    let upload = tokio::spawn(async move {
        reqwest::Client::new()
            .put(url)
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    });
    tx.send(Ok(chunk(2, 0, MIB))).await.unwrap();
    let needle = dir.to_str().unwrap().to_owned();
    until("the helper runs", || !helpers_for(&needle).is_empty()).await;
    // Midway, the directory is moved away and a link to another takes its
    // name: the file must land in the directory that was opened.
    let moved = root.path().join("moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    tx.send(Ok(chunk(2, 1, MIB))).await.unwrap();
    drop(tx);
    assert_eq!(upload.await.unwrap(), 201);
    assert_eq!(
        std::fs::metadata(moved.join("f.bin")).unwrap().len(),
        2 * MIB as u64
    );
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "nothing went through the link"
    );
}
