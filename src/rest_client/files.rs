//! `conch cp`: files to and from an agent's host through the REST API,
//! streamed both ways (never held whole), each checked against the
//! SHA-256 the server reports.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{ClientError, Server};

/// One side of a copy: a local file (`-`: standard input or output), or
/// `AGENT:PATH` on an agent's host (`:PATH`: the server's only agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Local(PathBuf),
    Stdio,
    Remote {
        agent: Option<String>,
        path: Vec<u8>,
    },
}

impl Place {
    /// Reads an argument as scp does: `NAME:PATH` is remote when `NAME` is
    /// empty or an agent name and the colon comes before any slash; a local
    /// path with a colon in it can be written `./a:b`.
    pub fn parse(arg: &OsStr) -> Place {
        let bytes = arg.as_bytes();
        if bytes == b"-" {
            return Place::Stdio;
        }
        if let Some(colon) = bytes.iter().position(|&b| b == b':') {
            let name = &bytes[..colon];
            let slash_first = bytes[..colon].contains(&b'/');
            if !slash_first
                && let Ok(name) = std::str::from_utf8(name)
                && (name.is_empty() || crate::vocab::valid_agent_name(name))
            {
                return Place::Remote {
                    agent: (!name.is_empty()).then(|| name.to_owned()),
                    path: bytes[colon + 1..].to_vec(),
                };
            }
        }
        Place::Local(PathBuf::from(arg))
    }
}

/// What `conch cp` was asked.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    pub server: Server,
    pub from: Place,
    pub to: Place,
    /// Refuse to replace an existing remote file (scp replaces it).
    pub no_clobber: bool,
    /// Permission bits for an uploaded file.
    pub mode: Option<u32>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// Why a copy failed, and so the exit status: 1 when the other side
/// refused (not found, permission, exists, disk full: as scp), 255 when
/// conch itself failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl CopyError {
    pub fn exit_status(&self) -> u8 {
        match self {
            CopyError::Refused(_) => 1,
            // What the host said of the file; anything else (credentials,
            // limits, an unavailable agent, a server error) is conch's.
            CopyError::Client(ClientError::Refused {
                status: 400 | 403 | 404 | 409 | 413 | 416 | 507,
                ..
            }) => 1,
            CopyError::Client(_) => super::EXIT_CONCH_FAILED,
        }
    }
}

const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

fn query(agent: Option<&str>, path: &[u8]) -> String {
    let mut q = format!("path={}", percent_encoding::percent_encode(path, ENCODE));
    if let Some(agent) = agent {
        q.push_str("&agent=");
        q.extend(percent_encoding::utf8_percent_encode(agent, ENCODE));
    }
    q
}

fn bar(progress: bool, total: Option<u64>, what: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}

/// Runs the copy; returns what to print (the remote path and hash).
pub async fn copy(config: CopyConfig) -> Result<String, CopyError> {
    match (&config.from, &config.to) {
        (Place::Remote { .. }, Place::Remote { .. }) => Err(CopyError::Refused(
            "both sides are remote; copy through a local file".into(),
        )),
        (Place::Remote { agent, path }, local) => {
            download(&config, agent.as_deref(), path, local).await
        }
        (local, Place::Remote { agent, path }) => {
            upload(&config, local, agent.as_deref(), path).await
        }
        _ => Err(CopyError::Refused(
            "neither side is remote (AGENT:PATH); use cp".into(),
        )),
    }
}

async fn upload(
    config: &CopyConfig,
    from: &Place,
    agent: Option<&str>,
    path: &[u8],
) -> Result<String, CopyError> {
    let server = &config.server;
    let mut q = query(agent, path);
    if !config.no_clobber {
        q.push_str("&overwrite=true");
    }
    if let Some(mode) = config.mode {
        q.push_str(&format!("&mode={mode:o}"));
    }
    let local_err =
        |p: &Path, e: std::io::Error| CopyError::Refused(format!("{}: {e}", p.display()));
    let (reader, size): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = match from {
        Place::Local(p) => {
            let file = tokio::fs::File::open(p)
                .await
                .map_err(|e| local_err(p, e))?;
            let meta = file.metadata().await.map_err(|e| local_err(p, e))?;
            if !meta.is_file() {
                return Err(CopyError::Refused(format!(
                    "{} is not a regular file",
                    p.display()
                )));
            }
            // Into a remote directory, the file keeps its name.
            if let Some(name) = p.file_name() {
                q.push_str("&name=");
                q.extend(percent_encoding::percent_encode(name.as_bytes(), ENCODE));
            }
            (Box::new(file), Some(meta.len()))
        }
        _ => (Box::new(tokio::io::stdin()), None),
    };
    let bar = bar(config.progress, size, "upload");
    let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha256::new()));
    let tap = hasher.clone();
    let counter = bar.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).map(move |chunk| {
            if let Ok(bytes) = &chunk {
                tap.lock().unwrap_or_else(|e| e.into_inner()).update(bytes);
                counter.inc(bytes.len() as u64);
            }
            chunk
        });
    let client = server.client()?;
    let mut request = client
        .put(server.url(&format!("/api/v1/files?{q}")))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(size) = size {
        request = request.header(reqwest::header::CONTENT_LENGTH, size);
    }
    let response = server.send(request).await;
    bar.finish_and_clear();
    let answer: Value = response?
        .json()
        .await
        .map_err(|e| ClientError::Broken(e.to_string()))?;
    let ours = hex::encode(
        std::mem::take(&mut *hasher.lock().unwrap_or_else(|e| e.into_inner())).finalize(),
    );
    let theirs = answer["sha256"].as_str().unwrap_or_default();
    if theirs != ours {
        return Err(CopyError::Refused(format!(
            "the agent wrote bytes with SHA-256 {theirs}, but this side sent {ours}"
        )));
    }
    Ok(format!(
        "{} {} bytes sha256 {ours}",
        answer["path"].as_str().unwrap_or_default(),
        answer["size"]
    ))
}

async fn download(
    config: &CopyConfig,
    agent: Option<&str>,
    path: &[u8],
    to: &Place,
) -> Result<String, CopyError> {
    let server = &config.server;
    let client = server.client()?;
    let url = server.url(&format!("/api/v1/files?{}", query(agent, path)));
    let response = server.send(client.get(&url)).await?;
    let size = response.content_length();
    let etag = |r: &reqwest::Response| {
        r.headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_owned())
    };
    let mut expected = etag(&response);
    let mode = response
        .headers()
        .get("x-file-mode")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u32::from_str_radix(v, 8).ok());
    let bar = bar(config.progress, size, "download");
    let mut hasher = Sha256::new();
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    let mut partial = match to {
        Place::Local(dest) => Some(Partial::create(&local_target(dest, path)).await?),
        _ => None,
    };
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ClientError::Broken(super::root_cause(&e)))?;
        hasher.update(&chunk);
        received += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
        match partial.as_mut() {
            Some(p) => p.file.write_all(&chunk).await.map_err(|e| p.error(e))?,
            None => stdout
                .write_all(&chunk)
                .await
                .map_err(|e| CopyError::Refused(format!("standard output: {e}")))?,
        }
    }
    bar.finish_and_clear();
    let ours = hex::encode(hasher.finalize());
    if let Some(size) = size
        && size != received
    {
        return Err(CopyError::Client(ClientError::Broken(format!(
            "{received} of {size} bytes arrived"
        ))));
    }
    // The agent hashed the file while sending it all: asked again (one
    // byte), it names the hash, unless the file changed meanwhile.
    if expected.is_none() {
        let again = client
            .get(&url)
            .bearer_auth(&server.token)
            .header(reqwest::header::RANGE, "bytes=0-0")
            .send()
            .await;
        expected = again.ok().as_ref().and_then(etag);
    }
    match &expected {
        Some(theirs) if theirs != &ours => {
            return Err(CopyError::Refused(format!(
                "the bytes received have SHA-256 {ours}, the agent's file {theirs}; nothing was kept"
            )));
        }
        Some(_) => {}
        None => eprintln!(
            "conch: the file changed while it was copied: the copy is not checked against the agent's"
        ),
    }
    let written = match partial {
        Some(p) => {
            p.file.sync_all().await.map_err(|e| p.error(e))?;
            // The remote file's permissions, less this process's umask (as
            // scp gives a new file); private until then.
            let mode = mode.unwrap_or(0o666) & 0o777 & !local_umask();
            let perms = std::os::unix::fs::PermissionsExt::from_mode(mode);
            p.file
                .set_permissions(perms)
                .await
                .map_err(|e| p.error(e))?;
            let shown = p.dest.display().to_string();
            p.keep().await?;
            shown
        }
        None => {
            stdout
                .flush()
                .await
                .map_err(|e| CopyError::Refused(format!("standard output: {e}")))?;
            "standard output".to_owned()
        }
    };
    Ok(format!("{written} {received} bytes sha256 {ours}"))
}

fn local_umask() -> u32 {
    // SAFETY: umask cannot fail; the old mask is put back at once.
    unsafe {
        let old = libc::umask(0o077);
        libc::umask(old);
        old as u32
    }
}

/// A local destination that is a directory takes the remote file's name.
fn local_target(dest: &Path, remote: &[u8]) -> PathBuf {
    if dest.is_dir() {
        let name = Path::new(OsStr::from_bytes(remote))
            .file_name()
            .map(OsStr::to_owned)
            .unwrap_or_else(|| OsString::from("download"));
        return dest.join(name);
    }
    dest.to_path_buf()
}

/// A download on its way: a hidden file beside the destination, renamed
/// into place once complete, removed if the download fails.
struct Partial {
    file: tokio::fs::File,
    temp: PathBuf,
    dest: PathBuf,
    kept: bool,
}

impl Partial {
    async fn create(dest: &Path) -> Result<Partial, CopyError> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut name = OsString::from(".");
        let base = dest
            .file_name()
            .unwrap_or(OsStr::new("download"))
            .as_bytes();
        // Within a file name's 255 bytes, whatever the destination's length.
        name.push(OsStr::from_bytes(&base[..base.len().min(200)]));
        let mut raw = [0u8; 6];
        rand::fill(&mut raw);
        name.push(format!(".conch-{}", hex::encode(raw)));
        let temp = dir.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .await
            .map_err(|e| CopyError::Refused(format!("{}: {e}", temp.display())))?;
        Ok(Partial {
            file,
            temp,
            dest: dest.to_path_buf(),
            kept: false,
        })
    }

    fn error(&self, e: std::io::Error) -> CopyError {
        CopyError::Refused(format!("{}: {e}", self.dest.display()))
    }

    async fn keep(mut self) -> Result<(), CopyError> {
        tokio::fs::rename(&self.temp, &self.dest)
            .await
            .map_err(|e| self.error(e))?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_read_as_scp_reads_them() {
        let p = |s: &str| Place::parse(OsStr::new(s));
        assert_eq!(
            p("web-1:/etc/hosts"),
            Place::Remote {
                agent: Some("web-1".into()),
                path: b"/etc/hosts".to_vec()
            }
        );
        assert_eq!(
            p(":notes.txt"),
            Place::Remote {
                agent: None,
                path: b"notes.txt".to_vec()
            }
        );
        assert_eq!(p("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(p("/tmp/a:b"), Place::Local("/tmp/a:b".into()));
        assert_eq!(p("not a host:x"), Place::Local("not a host:x".into()));
        assert_eq!(p("-"), Place::Stdio);
        assert_eq!(p("file"), Place::Local("file".into()));
    }

    #[test]
    fn paths_are_sent_as_bytes() {
        assert_eq!(
            query(Some("web"), b"/tmp/a b\xff"),
            "path=/tmp/a%20b%FF&agent=web"
        );
    }
}
