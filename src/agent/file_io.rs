//! The file helper: the process that writes a file for `put` or reads one
//! for `get`.
//!
//! The agent runs it exactly as it runs a command (`conch __conch_file`,
//! as the command's user, in its cgroup, under its limits, from its
//! working directory), so that a transfer can do what that user could do
//! in a shell and nothing more: the agent's own rights never touch the
//! file. Its work is plain blocking I/O on its standard streams:
//!
//! - `put REQUEST`: the file's bytes on stdin; one [`Reply`] line on
//!   stdout at the end. The bytes go to an unnamed file (`O_TMPFILE`) in
//!   the target's directory, which is synced and linked into place only
//!   once every byte has arrived and matched the declared size and hash:
//!   a transfer cut short (the helper killed) leaves nothing behind.
//! - `get REQUEST`: one [`Reply`] line on stdout, then the bytes asked for.
//!
//! `REQUEST` is the [`PutRequest`] or [`GetRequest`] as JSON (paths that
//! are not UTF-8 travel as base64 inside it, see [`WirePath`]).

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::{FileInfo, GetRequest, PutRequest, WirePath};
use crate::vocab::ErrorCode;

/// The first argument that makes `conch` the file helper.
pub const HELPER_ARG: &str = "__conch_file";

/// The helper's one line of answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Ok(Done),
    Error { code: ErrorCode, message: String },
}

/// What the helper wrote or is about to send.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Done {
    pub(crate) info: FileInfo,
    /// Which version of which file this is, for the agent's hash cache.
    pub(crate) identity: Identity,
}

/// A file's version as the file system tells it: the same inode with the
/// same size and modification time is taken for the same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_s: i64,
    pub(crate) mtime_ns: i64,
}

/// A failure, with its stable code.
#[derive(Debug)]
struct Failure {
    code: ErrorCode,
    message: String,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// An I/O error while doing `what` to `path`, with the code that fits.
    fn io(what: &str, path: &Path, e: &io::Error) -> Failure {
        let code = match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => ErrorCode::NotFound,
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorCode::DiskFull,
            Some(libc::EEXIST) => ErrorCode::Exists,
            Some(libc::EISDIR) => ErrorCode::NotAFile,
            _ => ErrorCode::FileError,
        };
        Failure::new(code, format!("{what} {}: {e}", path.display()))
    }
}

/// Runs the helper with `args` (what follows [`HELPER_ARG`]).
pub fn main(args: &[OsString]) -> ExitCode {
    // A write past RLIMIT_FSIZE must fail with EFBIG (reported as
    // `disk_full`), not kill the helper without a word.
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let (Some(verb), Some(request), None) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("conch {HELPER_ARG}: expects `put REQUEST` or `get REQUEST`");
        return ExitCode::from(2);
    };
    let request = request.as_bytes();
    match verb.as_bytes() {
        b"put" => match serde_json::from_slice::<PutRequest>(request) {
            Ok(req) => {
                let reply = match put(&req, &mut io::stdin().lock()) {
                    Ok(done) => Reply::Ok(done),
                    Err(f) => Reply::Error {
                        code: f.code,
                        message: f.message,
                    },
                };
                let failed = matches!(reply, Reply::Error { .. });
                if say(&reply).is_err() || failed {
                    return ExitCode::FAILURE;
                }
                ExitCode::SUCCESS
            }
            Err(e) => bad_request(&e),
        },
        b"get" => match serde_json::from_slice::<GetRequest>(request) {
            Ok(req) => get(&req),
            Err(e) => bad_request(&e),
        },
        _ => {
            eprintln!("conch {HELPER_ARG}: expects `put` or `get`");
            ExitCode::from(2)
        }
    }
}

fn bad_request(e: &serde_json::Error) -> ExitCode {
    let _ = say(&Reply::Error {
        code: ErrorCode::BadRequest,
        message: format!("not a valid request: {e}"),
    });
    ExitCode::FAILURE
}

/// Writes the reply line on stdout.
fn say(reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut out = io::stdout().lock();
    out.write_all(&line)?;
    out.flush()
}

fn path_of(p: &WirePath) -> &Path {
    Path::new(p.as_os_str())
}

/// Writes stdin to the file `req` names; see the module's description.
fn put(req: &PutRequest, input: &mut dyn Read) -> Result<Done, Failure> {
    let mut target = path_of(&req.path).to_path_buf();
    if target.as_os_str().is_empty() {
        return Err(Failure::new(ErrorCode::BadRequest, "the path is empty"));
    }
    if fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
        let Some(name) = &req.name else {
            return Err(Failure::new(
                ErrorCode::NotAFile,
                format!("{} is a directory; give a file name", target.display()),
            ));
        };
        let name = path_of(name);
        let mut parts = name.components();
        match (parts.next(), parts.next()) {
            (Some(Component::Normal(_)), None) => target.push(name),
            _ => {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!("{:?} is not a file name (one path component)", name),
                ));
            }
        }
    }
    // A symbolic link is written through, as `cp` would: what it names is
    // replaced, not the link.
    if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink())
        && let Ok(real) = fs::canonicalize(&target)
    {
        target = real;
    }
    let existing = match fs::metadata(&target) {
        Ok(meta) if !meta.is_file() => {
            return Err(Failure::new(
                ErrorCode::NotAFile,
                format!("{} exists and is not a regular file", target.display()),
            ));
        }
        Ok(_) if !req.overwrite => {
            return Err(Failure::new(
                ErrorCode::Exists,
                format!("{} exists (overwrite to replace it)", target.display()),
            ));
        }
        Ok(meta) => Some(meta),
        Err(_) => None,
    };
    let Some(name) = target.file_name().map(OsStr::to_owned) else {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!("{} does not end in a file name", target.display()),
        ));
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temp = Temp::create(&dir, &name).map_err(|e| Failure::io("create in", &dir, &e))?;

    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::new(ErrorCode::FileError, format!("input: {e}"))),
        };
        written += n as u64;
        if let Some(size) = req.size
            && written > size
        {
            return Err(Failure::new(
                ErrorCode::SizeMismatch,
                format!("more than the {size} bytes declared arrived; nothing was written"),
            ));
        }
        hasher.update(&buf[..n]);
        temp.file
            .write_all(&buf[..n])
            .map_err(|e| Failure::io("write", &target, &e))?;
    }
    if let Some(size) = req.size
        && written != size
    {
        return Err(Failure::new(
            ErrorCode::SizeMismatch,
            format!("{written} bytes arrived, not the {size} declared; nothing was written"),
        ));
    }
    let sha256 = hex::encode(hasher.finalize());
    if let Some(want) = &req.sha256
        && !want.eq_ignore_ascii_case(&sha256)
    {
        return Err(Failure::new(
            ErrorCode::HashMismatch,
            format!("the bytes have SHA-256 {sha256}, not {want}; nothing was written"),
        ));
    }
    let mode = match (req.mode, &existing) {
        (Some(mode), _) => mode & 0o7777,
        (None, Some(meta)) => meta.mode() & 0o7777,
        (None, None) => 0o666 & !umask(),
    };
    fchmod(&temp.file, mode).map_err(|e| Failure::io("chmod", &target, &e))?;
    if let Some(owner) = &req.owner {
        let (uid, gid) = owner_ids(owner)?;
        fchown(&temp.file, uid, gid).map_err(|e| Failure::io("chown", &target, &e))?;
    } else if let Some(meta) = &existing {
        // A replaced file keeps its owner where the helper may say so
        // (as root); otherwise it belongs to whoever wrote it, as with cp.
        let _ = fchown(&temp.file, Some(meta.uid()), Some(meta.gid()));
    }
    temp.file
        .sync_all()
        .map_err(|e| Failure::io("sync", &target, &e))?;
    temp.commit(&target, req.overwrite)?;
    // The new name is durable once its directory is.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    let meta = fs::metadata(&target).map_err(|e| Failure::io("stat", &target, &e))?;
    let absolute = fs::canonicalize(&target).unwrap_or(target);
    Ok(Done {
        info: FileInfo {
            path: WirePath::from(absolute.as_path()),
            size: written,
            offset: 0,
            length: written,
            mode,
            mtime_ms: mtime_ms(&meta),
            sha256: Some(sha256),
            created: existing.is_none(),
        },
        identity: identity(&meta),
    })
}

/// Sends the file `req` names on stdout, after its reply line. Exit code
/// 0: every byte promised was sent; 1: refused (the reply says why); 3:
/// the file shrank while it was read.
fn get(req: &GetRequest) -> ExitCode {
    let path = path_of(&req.path);
    let opened = if path.as_os_str().is_empty() {
        Err(Failure::new(ErrorCode::BadRequest, "the path is empty"))
    } else {
        open_for_get(path, req)
    };
    let (mut file, done) = match opened {
        Ok(x) => x,
        Err(f) => {
            let _ = say(&Reply::Error {
                code: f.code,
                message: f.message,
            });
            return ExitCode::FAILURE;
        }
    };
    let (offset, length) = (done.info.offset, done.info.length);
    if say(&Reply::Ok(done)).is_err() {
        return ExitCode::FAILURE;
    }
    if let Err(e) = file.seek(io::SeekFrom::Start(offset)) {
        eprintln!("seek {}: {e}", path.display());
        return ExitCode::from(2);
    }
    // std copies file to pipe in the kernel (sendfile/splice) where it can.
    let mut out = io::stdout().lock();
    match io::copy(&mut file.take(length), &mut out) {
        Ok(n) if n == length => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!(
                "{} shrank while it was read: {n} of {length} bytes sent",
                path.display()
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("read {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

fn open_for_get(path: &Path, req: &GetRequest) -> Result<(File, Done), Failure> {
    // Non-blocking, so that opening a FIFO cannot hang the helper.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Failure::io("open", path, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io("stat", path, &e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Failure::new(
            ErrorCode::NotAFile,
            format!("{} is {what}; only regular files are sent", path.display()),
        ));
    }
    let size = meta.len();
    let (offset, length) = range(size, req.offset, req.length, req.suffix).ok_or_else(|| {
        Failure::new(
            ErrorCode::RangeNotSatisfiable,
            format!(
                "{} has {size} bytes; the range starts past its end",
                path.display()
            ),
        )
    })?;
    let absolute = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let done = Done {
        info: FileInfo {
            path: WirePath::from(absolute.as_path()),
            size,
            offset,
            length,
            mode: meta.mode() & 0o7777,
            mtime_ms: mtime_ms(&meta),
            sha256: None,
            created: false,
        },
        identity: identity(&meta),
    };
    Ok((file, done))
}

/// The bytes to send of a file of `size` bytes: (offset, length), or
/// `None` when the range starts past the end (an empty file's whole
/// content, or a range starting at its end, is no error when not asked
/// for explicitly).
pub(crate) fn range(
    size: u64,
    offset: Option<u64>,
    length: Option<u64>,
    suffix: Option<u64>,
) -> Option<(u64, u64)> {
    if let Some(last) = suffix {
        let length = last.min(size);
        return Some((size - length, length));
    }
    let start = offset.unwrap_or(0);
    if start > size || (offset.is_some() && start == size && size > 0) {
        return None;
    }
    let length = length.unwrap_or(u64::MAX).min(size - start);
    Some((start, length))
}

/// Where the bytes go until they are complete: an unnamed file in the
/// target's directory, or (on a file system without `O_TMPFILE`) a hidden
/// named one that is removed on failure.
struct Temp {
    file: File,
    /// The named file's path, while it exists.
    named: Option<PathBuf>,
    dir: PathBuf,
}

impl Temp {
    fn create(dir: &Path, name: &OsStr) -> io::Result<Temp> {
        let unnamed = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir);
        match unnamed {
            Ok(file) => Ok(Temp {
                file,
                named: None,
                dir: dir.to_path_buf(),
            }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                let path = hidden_name(dir, name);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                Ok(Temp {
                    file,
                    named: Some(path),
                    dir: dir.to_path_buf(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Puts the complete file at `target`: atomically, and without
    /// replacing a file that appeared meanwhile unless `overwrite`.
    fn commit(mut self, target: &Path, overwrite: bool) -> Result<(), Failure> {
        let fail = |e: io::Error| Failure::io("write", target, &e);
        match self.named.take() {
            None => {
                let fd = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
                if !overwrite {
                    return link_following(&fd, target).map_err(fail);
                }
                let name = target.file_name().unwrap_or(OsStr::new("file"));
                let staged = hidden_name(&self.dir, name);
                link_following(&fd, &staged).map_err(fail)?;
                fs::rename(&staged, target).map_err(|e| {
                    let _ = fs::remove_file(&staged);
                    fail(e)
                })
            }
            Some(path) => {
                let result = if overwrite {
                    fs::rename(&path, target)
                } else {
                    rename_noreplace(&path, target)
                };
                if result.is_err() {
                    let _ = fs::remove_file(&path);
                }
                result.map_err(fail)
            }
        }
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(path) = self.named.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// `.NAME.conch-RANDOM` in `dir`.
fn hidden_name(dir: &Path, name: &OsStr) -> PathBuf {
    let mut raw = [0u8; 8];
    rand::fill(&mut raw);
    let mut file = OsString::from(".");
    file.push(name);
    file.push(format!(".conch-{}", hex::encode(raw)));
    dir.join(file)
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `linkat(.., AT_SYMLINK_FOLLOW)`: gives an `O_TMPFILE` file (through its
/// `/proc/self/fd` link) a name; fails with EEXIST if the name is taken.
fn link_following(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid NUL-terminated paths.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `renameat2(.., RENAME_NOREPLACE)`, or a link and an unlink where the
/// file system cannot do that.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (cfrom, cto) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

fn umask() -> u32 {
    // SAFETY: umask cannot fail; the old mask is put back at once (the
    // helper is single-threaded).
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    }
}

fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    // SAFETY: a valid open descriptor.
    if unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn fchown(file: &File, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::fchown(file, uid, gid)
}

/// `USER`, `USER:GROUP` or `:GROUP`, by name or number.
fn owner_ids(owner: &str) -> Result<(Option<u32>, Option<u32>), Failure> {
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let bad = |what: &str| {
        Failure::new(
            ErrorCode::BadRequest,
            format!("no {what} {owner:?} on this host"),
        )
    };
    let uid = match user {
        "" => None,
        u => Some(match u.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::unistd::User::from_name(u)
                .ok()
                .flatten()
                .ok_or_else(|| bad("user"))?
                .uid
                .as_raw(),
        }),
    };
    let gid = match group {
        None | Some("") => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| bad("group"))?
                .gid
                .as_raw(),
        }),
    };
    Ok((uid, gid))
}

fn mtime_ms(meta: &fs::Metadata) -> i64 {
    meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000
}

fn identity(meta: &fs::Metadata) -> Identity {
    Identity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime_s: meta.mtime(),
        mtime_ns: meta.mtime_nsec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_bytes(req: &PutRequest, data: &[u8]) -> Result<Done, Failure> {
        put(req, &mut &data[..])
    }

    fn req(path: &Path) -> PutRequest {
        PutRequest {
            path: WirePath::from(path),
            ..Default::default()
        }
    }

    #[test]
    fn ranges_follow_http() {
        assert_eq!(range(10, None, None, None), Some((0, 10)));
        assert_eq!(range(0, None, None, None), Some((0, 0)));
        assert_eq!(range(10, Some(4), None, None), Some((4, 6)));
        assert_eq!(range(10, Some(4), Some(2), None), Some((4, 2)));
        assert_eq!(range(10, Some(10), None, None), None);
        assert_eq!(range(10, Some(11), None, None), None);
        assert_eq!(range(10, None, None, Some(3)), Some((7, 3)));
        assert_eq!(range(10, None, None, Some(30)), Some((0, 10)));
    }

    #[test]
    fn a_put_writes_atomically_and_refuses_what_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a file");
        let done = put_bytes(&req(&target), b"hello").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert!(done.info.created);
        assert_eq!(
            done.info.sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        let again = put_bytes(&req(&target), b"other").unwrap_err();
        assert_eq!(again.code, ErrorCode::Exists);
        let wrong_size = PutRequest {
            size: Some(3),
            overwrite: true,
            ..req(&target)
        };
        assert_eq!(
            put_bytes(&wrong_size, b"four").unwrap_err().code,
            ErrorCode::SizeMismatch
        );
        let wrong_hash = PutRequest {
            sha256: Some("00".repeat(32)),
            overwrite: true,
            ..req(&target)
        };
        assert_eq!(
            put_bytes(&wrong_hash, b"four").unwrap_err().code,
            ErrorCode::HashMismatch
        );
        assert_eq!(fs::read(&target).unwrap(), b"hello", "nothing replaced it");
        let replace = PutRequest {
            overwrite: true,
            ..req(&target)
        };
        assert!(!put_bytes(&replace, b"new").unwrap().info.created);
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }

    #[test]
    fn a_directory_takes_the_name_given() {
        let dir = tempfile::tempdir().unwrap();
        let named = PutRequest {
            name: Some(WirePath(b"x.txt".to_vec())),
            ..req(dir.path())
        };
        put_bytes(&named, b"1").unwrap();
        assert_eq!(fs::read(dir.path().join("x.txt")).unwrap(), b"1");
        assert_eq!(
            put_bytes(&req(dir.path()), b"1").unwrap_err().code,
            ErrorCode::NotAFile
        );
        let climbing = PutRequest {
            name: Some(WirePath(b"../x".to_vec())),
            ..req(dir.path())
        };
        assert_eq!(
            put_bytes(&climbing, b"1").unwrap_err().code,
            ErrorCode::BadRequest
        );
        let missing = req(&dir.path().join("no/such/dir/f"));
        assert_eq!(
            put_bytes(&missing, b"1").unwrap_err().code,
            ErrorCode::NotFound
        );
    }
}
