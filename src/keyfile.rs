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
pub(crate) const MIN_KEY_LEN: usize = 16;

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
    #[error(
        "the key in {path} is weak ({why}): whoever can answer on the agent's address could \
         test guesses of it offline; make one with `conch keygen`, or accept the risk with \
         --allow-weak-key"
    )]
    Weak { path: PathBuf, why: String },
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
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let trimmed = bytes.trim_ascii();
        (trimmed.len() >= MIN_KEY_LEN).then(|| Key(trimmed.to_vec()))
    }

    /// Reads a key file; `-` reads standard input to its end (how the
    /// server hands the embedded agent its key: never through argv or the
    /// environment).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        Key::load_with(path, false)
    }

    /// [`Key::load`]; a weak key (see [`weakness`]) is refused unless
    /// `allow_weak`, then only warned about.
    pub fn load_with(path: &Path, allow_weak: bool) -> Result<Key, KeyError> {
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
        if path != Path::new("-") {
            warn_if_exposed(path, "key file");
        }
        let key = Key::from_bytes(&bytes).ok_or_else(|| KeyError::TooShort {
            path: path.to_owned(),
            len: bytes.trim_ascii().len(),
        })?;
        if let Some(why) = weakness(&key.0) {
            if !allow_weak {
                return Err(KeyError::Weak {
                    path: path.to_owned(),
                    why,
                });
            }
            tracing::warn!(path = %path.display(), "the key is weak ({why}); make one with `conch keygen`");
        }
        Ok(key)
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

/// Warns when a file holding a secret can be read by others than its
/// owner (group or world permission bits).
pub fn warn_if_exposed(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "the {what} can be read by other users; make it readable by its owner only (chmod 600)"
            );
        }
    }
}

/// Why a secret is weak, if it is: too short, or too little entropy in
/// its bytes (estimated from their frequencies, as a guesser would start).
pub fn weakness(secret: &[u8]) -> Option<String> {
    if secret.len() < 32 {
        return Some(format!("{} bytes; 32 or more are wanted", secret.len()));
    }
    let mut counts = [0usize; 256];
    for b in secret {
        counts[*b as usize] += 1;
    }
    let n = secret.len() as f64;
    let per_byte: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = *c as f64 / n;
            -p * p.log2()
        })
        .sum();
    let bits = per_byte * n;
    (bits < 128.0).then(|| format!("about {bits:.0} bits of entropy; 128 or more are wanted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_strong_and_simple_ones_are_not() {
        assert_eq!(weakness(Key::generate().as_bytes()), None);
        assert!(weakness(b"passwordpassword").is_some());
        assert!(weakness(&[b'a'; 64]).is_some());
    }
}
