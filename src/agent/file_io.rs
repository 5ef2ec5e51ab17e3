//! The file helper: the process that writes a file for `put` or reads one
//! for `get`.
//!
//! The agent runs it exactly as it runs a command (`conch __conch_file
//! put|get`, as the command's user, in its cgroup, under its limits), so
//! that a transfer can do what that user could do in a shell and nothing
//! more: the agent's own rights never touch the file. Its request comes as
//! the first line of its stdin (a [`Job`] as JSON: never on its command
//! line, where every local user could read it), and its work is plain
//! blocking I/O:
//!
//! - `put`: the file's bytes follow the request on stdin; one [`Reply`]
//!   line on stdout at the end. The target's directory is opened once and
//!   everything after is relative to it (no path is looked up twice, so a
//!   directory swapped for a link midway changes nothing). The bytes go to
//!   an unnamed file (`O_TMPFILE`) there, which is synced and linked into
//!   place only once every byte has arrived and matched the declared size
//!   and hash: a transfer cut short (the helper killed) leaves nothing.
//!   Symbolic links are never followed by hand: the kernel resolves the
//!   directory's path (with its own protections), and a link as the final
//!   name is refused.
//! - `get`: one [`Reply`] line on stdout, then the bytes asked for; on
//!   success, the file's [`Identity`] after the read on stderr, so that the
//!   agent remembers a hash only for a file that did not change meanwhile.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::{FileInfo, GetRequest, PutRequest, WirePath};
use crate::vocab::ErrorCode;

/// The first argument that makes `conch` the file helper.
pub const HELPER_ARG: &str = "__conch_file";

/// The longest request line the helper reads: 1 MiB (a request's JSON is
/// at most a frame's payload).
const MAX_REQUEST: u64 = 1024 * 1024;

/// What the agent asks of the helper: the client's request, and the
/// directory relative paths start from.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Job<T> {
    /// Relative paths start here (a session's shell's directory); `None`:
    /// the helper's own working directory (the user's home).
    pub(crate) cwd: Option<WirePath>,
    pub(crate) req: T,
}

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
/// same size, modification and change times is taken for the same content
/// (the change time moves with any write, even one that puts the
/// modification time back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_s: i64,
    pub(crate) mtime_ns: i64,
    pub(crate) ctime_s: i64,
    pub(crate) ctime_ns: i64,
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
            Some(libc::ENAMETOOLONG | libc::ELOOP) => ErrorCode::BadRequest,
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
    let (Some(verb), None) = (args.first(), args.get(1)) else {
        eprintln!("conch {HELPER_ARG}: expects `put` or `get`, and the request on stdin");
        return ExitCode::from(2);
    };
    let mut input = BufReader::with_capacity(256 * 1024, io::stdin().lock());
    let mut line = Vec::new();
    if let Err(e) = (&mut input).take(MAX_REQUEST).read_until(b'\n', &mut line) {
        return refuse(ErrorCode::BadRequest, format!("reading the request: {e}"));
    }
    match verb.as_bytes() {
        b"put" => match serde_json::from_slice::<Job<PutRequest>>(&line) {
            Ok(job) => {
                if let Err(f) = enter(job.cwd.as_ref()) {
                    return refuse(f.code, f.message);
                }
                match put(&job.req, &mut input).map(|done| say(&Reply::Ok(done))) {
                    Ok(Ok(())) => ExitCode::SUCCESS,
                    Ok(Err(_)) => ExitCode::FAILURE,
                    Err(f) => refuse(f.code, f.message),
                }
            }
            Err(e) => refuse(ErrorCode::BadRequest, format!("not a valid request: {e}")),
        },
        b"get" => match serde_json::from_slice::<Job<GetRequest>>(&line) {
            Ok(job) => match enter(job.cwd.as_ref()) {
                Ok(()) => get(&job.req),
                Err(f) => refuse(f.code, f.message),
            },
            Err(e) => refuse(ErrorCode::BadRequest, format!("not a valid request: {e}")),
        },
        _ => {
            eprintln!("conch {HELPER_ARG}: expects `put` or `get`");
            ExitCode::from(2)
        }
    }
}

/// Moves to the directory relative paths start from, as the user would.
fn enter(cwd: Option<&WirePath>) -> Result<(), Failure> {
    match cwd {
        Some(dir) => {
            std::env::set_current_dir(path_of(dir)).map_err(|e| Failure::io("cd", path_of(dir), &e))
        }
        None => Ok(()),
    }
}

fn refuse(code: ErrorCode, message: String) -> ExitCode {
    let _ = say(&Reply::Error { code, message });
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

/// The directory a `put` writes in, opened once, and the name there.
struct Target {
    dir: OwnedFd,
    name: CString,
    /// For messages.
    shown: PathBuf,
}

/// Finds where `req` writes: `path` itself when it is a directory (with
/// `name`), else its parent and last component.
fn target(req: &PutRequest) -> Result<Target, Failure> {
    let raw = &req.path.0;
    if raw.is_empty() {
        return Err(Failure::new(ErrorCode::BadRequest, "the path is empty"));
    }
    let path = path_of(&req.path);
    match open_dir(path) {
        Ok(dir) => {
            let Some(name) = &req.name else {
                return Err(Failure::new(
                    ErrorCode::NotAFile,
                    format!("{} is a directory; give a file name", path.display()),
                ));
            };
            let name = path_of(name);
            let mut parts = name.components();
            let (Some(Component::Normal(_)), None) = (parts.next(), parts.next()) else {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!("{:?} is not a file name (one path component)", name),
                ));
            };
            Ok(Target {
                dir,
                name: c_name(name.as_os_str())?,
                shown: path.join(name),
            })
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            // `dir/` names a directory, which this is not.
            if raw.ends_with(b"/") {
                return Err(Failure::io("open directory", path, &e));
            }
            let last = raw.rsplit(|&b| b == b'/').next().unwrap_or_default();
            if last.is_empty() || last == b"." || last == b".." {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!("{} does not end in a file name", path.display()),
                ));
            }
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = open_dir(parent).map_err(|e| Failure::io("open directory", parent, &e))?;
            Ok(Target {
                dir,
                name: c_name(OsStr::from_bytes(last))?,
                shown: path.to_path_buf(),
            })
        }
        Err(e) => Err(Failure::io("open", path, &e)),
    }
}

/// Writes the rest of `input` to the file `req` names; see the module's
/// description.
fn put(req: &PutRequest, input: &mut dyn Read) -> Result<Done, Failure> {
    let Target { dir, name, shown } = target(req)?;
    let dir_fd = dir.as_raw_fd();
    let existing = match stat_at(dir_fd, &name, false) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
            return Err(Failure::new(
                ErrorCode::NotAFile,
                format!(
                    "{} is a symbolic link; give the path it points to",
                    shown.display()
                ),
            ));
        }
        Ok(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => {
            return Err(Failure::new(
                ErrorCode::NotAFile,
                format!("{} exists and is not a regular file", shown.display()),
            ));
        }
        Ok(_) if !req.overwrite => {
            return Err(Failure::new(
                ErrorCode::Exists,
                format!("{} exists (overwrite to replace it)", shown.display()),
            ));
        }
        Ok(st) => Some(st),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(Failure::io("stat", &shown, &e)),
    };
    let owner = match &req.owner {
        Some(owner) => Some(owner_ids(owner)?),
        None => None,
    };
    // SAFETY: `dir` outlives `temp`, which borrows its descriptor.
    let dir_ref = unsafe { BorrowedFd::borrow_raw(dir_fd) };
    let mut temp =
        Temp::create(dir_ref, &name).map_err(|e| Failure::io("create in", &shown, &e))?;

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
            .map_err(|e| Failure::io("write", &shown, &e))?;
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
    // The owner first: a change of owner clears the set-id bits, which
    // the mode then sets.
    match (owner, &existing) {
        (Some((uid, gid)), _) => std::os::unix::fs::fchown(&temp.file, uid, gid)
            .map_err(|e| Failure::io("chown", &shown, &e))?,
        // A replaced file keeps its owner where the helper may say so
        // (as root); otherwise it belongs to whoever wrote it, as with cp.
        (None, Some(st)) => {
            let _ = std::os::unix::fs::fchown(&temp.file, Some(st.st_uid), Some(st.st_gid));
        }
        (None, None) => {}
    }
    let mode = match (req.mode, &existing) {
        (Some(mode), _) => mode & 0o7777,
        (None, Some(st)) => st.st_mode & 0o7777,
        (None, None) => 0o666 & !umask(),
    };
    fchmod(&temp.file, mode).map_err(|e| Failure::io("chmod", &shown, &e))?;
    temp.file
        .sync_all()
        .map_err(|e| Failure::io("sync", &shown, &e))?;
    temp.commit(&name, req.overwrite)
        .map_err(|e| Failure::io("write", &shown, &e))?;
    // The new name is durable once its directory is.
    // SAFETY: fsync on a valid descriptor.
    unsafe {
        libc::fsync(dir_fd);
    }
    let meta = temp
        .file
        .metadata()
        .map_err(|e| Failure::io("stat", &shown, &e))?;
    let absolute = std::fs::read_link(format!("/proc/self/fd/{dir_fd}"))
        .map(|d| d.join(OsStr::from_bytes(name.as_bytes())))
        .unwrap_or(shown);
    Ok(Done {
        info: FileInfo {
            path: WirePath::from(absolute.as_path()),
            size: written,
            offset: 0,
            length: written,
            mode: std::os::unix::fs::MetadataExt::mode(&meta) & 0o7777,
            mtime_ms: mtime_ms(&meta),
            sha256: Some(sha256),
            created: existing.is_none(),
        },
        identity: identity(&meta),
    })
}

/// Sends the file `req` names on stdout, after its reply line. Exit code
/// 0: every byte promised was sent (and the file's identity after is on
/// stderr); 1: refused (the reply says why); 3: the file shrank while it
/// was read.
fn get(req: &GetRequest) -> ExitCode {
    let path = path_of(&req.path);
    let opened = if path.as_os_str().is_empty() {
        Err(Failure::new(ErrorCode::BadRequest, "the path is empty"))
    } else {
        open_for_get(path, req)
    };
    let (mut file, done) = match opened {
        Ok(x) => x,
        Err(f) => return refuse(f.code, f.message),
    };
    let (offset, length) = (done.info.offset, done.info.length);
    let before = done.identity;
    if say(&Reply::Ok(done)).is_err() {
        return ExitCode::FAILURE;
    }
    if let Err(e) = file.seek(io::SeekFrom::Start(offset)) {
        eprintln!("seek {}: {e}", path.display());
        return ExitCode::from(2);
    }
    // std copies file to pipe in the kernel (sendfile/splice) where it can.
    let mut out = io::stdout().lock();
    let copied = io::copy(&mut (&mut file).take(length), &mut out);
    match copied {
        Ok(n) if n == length => {
            let after = file.metadata().map(|m| identity(&m)).unwrap_or(before);
            eprintln!("{}", serde_json::to_string(&after).unwrap_or_default());
            ExitCode::SUCCESS
        }
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
    // First without opening it for reading: opening a device can act on
    // it (a watchdog, a tape), and a FIFO would block.
    let c = c_name(path.as_os_str())?;
    // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Failure::io("open", path, &io::Error::last_os_error()));
    }
    // SAFETY: a descriptor this function just opened and owns.
    let handle = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(handle.as_raw_fd()).map_err(|e| Failure::io("stat", path, &e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        let what = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Failure::new(
            ErrorCode::NotAFile,
            format!("{} is {what}; only regular files are sent", path.display()),
        ));
    }
    // The very file just looked at, opened for reading.
    let file =
        File::open(format!("/proc/self/fd/{fd}")).map_err(|e| Failure::io("open", path, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io("stat", path, &e))?;
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
    let absolute =
        std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_else(|_| path.to_path_buf());
    let done = Done {
        info: FileInfo {
            path: WirePath::from(absolute.as_path()),
            size,
            offset,
            length,
            mode: std::os::unix::fs::MetadataExt::mode(&meta) & 0o7777,
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
struct Temp<'a> {
    file: File,
    dir: BorrowedFd<'a>,
    /// The named file's name, while it exists.
    named: Option<CString>,
}

impl<'a> Temp<'a> {
    fn create(dir: BorrowedFd<'a>, name: &CStr) -> io::Result<Temp<'a>> {
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c".".as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor just opened, owned by the File.
            let file = unsafe { File::from_raw_fd(fd) };
            return Ok(Temp {
                file,
                dir,
                named: None,
            });
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EISDIR)
        ) {
            return Err(e);
        }
        let hidden = hidden_name(name);
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                hidden.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened, owned by the File.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Temp {
            file,
            dir,
            named: Some(hidden),
        })
    }

    /// Puts the complete file at `name`: atomically, and without replacing
    /// a file that appeared meanwhile unless `overwrite`.
    fn commit(&mut self, name: &CStr, overwrite: bool) -> io::Result<()> {
        let dir = self.dir.as_raw_fd();
        match self.named.take() {
            None => {
                let fd = CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .map_err(io::Error::other)?;
                if !overwrite {
                    return check(unsafe {
                        // SAFETY: valid descriptors and NUL-terminated names.
                        libc::linkat(
                            libc::AT_FDCWD,
                            fd.as_ptr(),
                            dir,
                            name.as_ptr(),
                            libc::AT_SYMLINK_FOLLOW,
                        )
                    });
                }
                let staged = hidden_name(name);
                // SAFETY: as above.
                check(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        fd.as_ptr(),
                        dir,
                        staged.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
                // SAFETY: as above.
                let renamed =
                    check(unsafe { libc::renameat(dir, staged.as_ptr(), dir, name.as_ptr()) });
                if renamed.is_err() {
                    // SAFETY: as above.
                    unsafe { libc::unlinkat(dir, staged.as_ptr(), 0) };
                }
                renamed
            }
            Some(hidden) => {
                let result = if overwrite {
                    // SAFETY: as above.
                    check(unsafe { libc::renameat(dir, hidden.as_ptr(), dir, name.as_ptr()) })
                } else {
                    rename_noreplace(dir, &hidden, name)
                };
                if result.is_err() {
                    // SAFETY: as above.
                    unsafe { libc::unlinkat(dir, hidden.as_ptr(), 0) };
                }
                result
            }
        }
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if let Some(hidden) = self.named.take() {
            // SAFETY: a valid directory descriptor and name.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), hidden.as_ptr(), 0) };
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `.NAME.conch-RANDOM`, with NAME cut so that the whole stays within a
/// file name's 255 bytes.
fn hidden_name(name: &CStr) -> CString {
    let mut raw = [0u8; 8];
    rand::fill(&mut raw);
    let bytes = name.to_bytes();
    let mut out = b".".to_vec();
    out.extend_from_slice(&bytes[..bytes.len().min(200)]);
    out.extend_from_slice(format!(".conch-{}", hex::encode(raw)).as_bytes());
    CString::new(out).unwrap_or_else(|_| c".conch-partial".to_owned())
}

fn c_name(name: &OsStr) -> Result<CString, Failure> {
    CString::new(name.as_bytes())
        .map_err(|_| Failure::new(ErrorCode::BadRequest, "a path holds a NUL byte"))
}

/// Opens a directory (following links as any path lookup does), for
/// reading where the user may, else only as a place (`O_PATH`).
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    loop {
        // SAFETY: a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a descriptor just opened and owned here.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        // A directory one may write in but not list (`-wx`).
        if e.raw_os_error() == Some(libc::EACCES) && flags & libc::O_PATH == 0 {
            flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
            continue;
        }
        return Err(e);
    }
}

fn stat_at(dir: RawFd, name: &CStr, follow: bool) -> io::Result<libc::stat> {
    // SAFETY: zeroed memory is a valid `stat` for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: a valid descriptor, name and buffer.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: as for `stat_at`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and buffer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `renameat2(.., RENAME_NOREPLACE)`, or a link and an unlink where the
/// file system cannot do that.
fn rename_noreplace(dir: RawFd, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: a valid directory descriptor and names.
    let rc =
        unsafe { libc::renameat2(dir, from.as_ptr(), dir, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // SAFETY: as above.
    check(unsafe { libc::linkat(dir, from.as_ptr(), dir, to.as_ptr(), 0) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlinkat(dir, from.as_ptr(), 0) })
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
    check(unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) })
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

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000
}

fn identity(meta: &std::fs::Metadata) -> Identity {
    use std::os::unix::fs::MetadataExt;
    Identity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime_s: meta.mtime(),
        mtime_ns: meta.mtime_nsec(),
        ctime_s: meta.ctime(),
        ctime_ns: meta.ctime_nsec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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

    #[test]
    fn a_link_as_the_target_is_refused_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let through = PutRequest {
            overwrite: true,
            ..req(&link)
        };
        assert_eq!(
            put_bytes(&through, b"evil").unwrap_err().code,
            ErrorCode::NotAFile
        );
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(
            put_bytes(&req(&dangling), b"x").unwrap_err().code,
            ErrorCode::NotAFile
        );
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn the_mode_asked_for_is_the_mode_written_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("tool");
        let me = nix::unistd::getuid().as_raw();
        let setuid = PutRequest {
            mode: Some(0o4755),
            owner: Some(me.to_string()),
            ..req(&target)
        };
        let done = put_bytes(&setuid, b"#!/bin/sh\n").unwrap();
        let on_disk =
            std::os::unix::fs::MetadataExt::mode(&fs::metadata(&target).unwrap()) & 0o7777;
        assert_eq!((done.info.mode, on_disk), (0o4755, 0o4755));
    }

    #[test]
    fn a_trailing_slash_names_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("{}/newdir/", dir.path().display());
        let r = PutRequest {
            path: WirePath(missing.into_bytes()),
            ..Default::default()
        };
        assert_eq!(put_bytes(&r, b"x").unwrap_err().code, ErrorCode::NotFound);
        assert!(!dir.path().join("newdir").exists());
    }
}
