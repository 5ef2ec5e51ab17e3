//! Pre-shared agent keys on disk.
//!
//! A key is the file's contents with surrounding whitespace trimmed, taken as
//! bytes exactly as written, so a key typed by hand and one from
//! `conch keygen` work alike. It never leaves the process: only MACs made
//! with it cross the wire, and [`Key`]'s `Debug` hides it from logs.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key. Its `Debug` output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} bytes, redacted>)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} holds {len} bytes after trimming; at least {MIN_KEY_LEN} are needed (make one with `conch keygen {path}`)"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Key {
    /// A fresh random key of 32 bytes, as 64 hex characters.
    pub fn generate() -> Key {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        Key(hex::encode(bytes).into_bytes())
    }

    /// Wraps key bytes, checking the minimum length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let trimmed = bytes.trim_ascii();
        (trimmed.len() >= MIN_KEY_LEN).then(|| Key(trimmed.to_vec()))
    }

    /// Reads a key file; `-` reads standard input to its end (how the
    /// server hands the embedded agent its key: never through argv or the
    /// environment).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let read = if path == Path::new("-") {
            use std::io::Read;
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_end(&mut bytes)
                .map(|_| bytes)
        } else {
            std::fs::read(path)
        };
        let bytes = read.map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Key::from_bytes(&bytes).ok_or_else(|| KeyError::TooShort {
            path: path.to_owned(),
            len: bytes.trim_ascii().len(),
        })
    }

    /// Writes the key to a new file readable by its owner only (mode 0600).
    /// An existing file is not overwritten.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        file.write_all(&self.0).map_err(err)?;
        file.write_all(b"\n").map_err(err)?;
        Ok(())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}
