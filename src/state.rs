//! The state directory: what imdsd keeps across restarts. Today that is one file, the key that
//! signs IMDSv2 tokens, so that tokens issued before a restart stay valid after it (the Rust SDK
//! holds its token for up to six hours and does not ask again on a 401).
//!
//! Runs at startup only, so it uses blocking file I/O.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::imds::token::TokenKey;

const TOKEN_KEY_FILE: &str = "token.key";

/// Why the state directory or the key in it cannot be used; the message names the path and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

/// Where state is kept, if anywhere.
#[derive(Debug, Clone)]
pub enum StateDir {
    Dir(PathBuf),
    /// No usable directory: tokens do not survive a restart.
    Ephemeral,
}

impl StateDir {
    /// Opens `explicit` (creating it), or the first usable default location. An explicit directory
    /// that cannot be used is an error; when no default works, state is kept in memory only.
    pub fn open(
        explicit: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, StateError> {
        if let Some(dir) = explicit {
            return prepare(dir)
                .map(|()| StateDir::Dir(dir.to_path_buf()))
                .map_err(|e| {
                    StateError(format!("--state-dir {}: {e}; {}", dir.display(), fix(&e)))
                });
        }
        for dir in default_candidates(env) {
            if prepare(&dir).is_ok() {
                return Ok(StateDir::Dir(dir));
            }
        }
        Ok(StateDir::Ephemeral)
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            StateDir::Dir(p) => Some(p),
            StateDir::Ephemeral => None,
        }
    }

    /// The token key, created on first use.
    pub fn token_key(&self) -> Result<TokenKey, StateError> {
        let dir = match self {
            StateDir::Dir(dir) => dir,
            StateDir::Ephemeral => {
                return TokenKey::random()
                    .map_err(|e| StateError(format!("the system random generator failed: {e}")));
            }
        };
        let path = dir.join(TOKEN_KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    StateError(format!(
                        "{} is {} bytes, not a 32-byte key; delete it and a new key will be made \
                         (tokens issued before then stop working)",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                Ok(TokenKey::from_bytes(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = TokenKey::random()
                    .map_err(|e| StateError(format!("the system random generator failed: {e}")))?;
                write_private(&path, key.as_bytes()).map_err(|e| {
                    StateError(format!(
                        "cannot write the IMDSv2 token key {}: {e}; {}",
                        path.display(),
                        fix(&e)
                    ))
                })?;
                Ok(key)
            }
            Err(e) => Err(StateError(format!("cannot read {}: {e}", path.display()))),
        }
    }
}

/// systemd's `STATE_DIRECTORY`, then `/var/lib/imdsd`, then the user's XDG state directory.
fn default_candidates(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dirs) = env("STATE_DIRECTORY")
        && let Some(first) = dirs.split(':').find(|d| !d.is_empty())
    {
        out.push(PathBuf::from(first));
    }
    out.push(PathBuf::from("/var/lib/imdsd"));
    if let Some(xdg) = env("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        out.push(Path::new(&xdg).join("imdsd"));
    } else if let Some(home) = env("HOME").filter(|s| !s.is_empty()) {
        out.push(Path::new(&home).join(".local/state/imdsd"));
    }
    out
}

/// What the operator can do about `e`, met while preparing or writing in the state directory.
fn fix(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            "free space on the filesystem that holds it, or choose another directory with --state-dir"
        }
        ErrorKind::ReadOnlyFilesystem => {
            "make it writable (a read-only mount?), or choose another directory with --state-dir"
        }
        ErrorKind::PermissionDenied => {
            "give the user imdsd runs as write access to it, or choose another directory with \
             --state-dir"
        }
        _ => "create it with write access for this user or choose another directory",
    }
}

/// Creates `dir` (mode 0700) if needed and checks that files can be written in it.
fn prepare(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let probe = dir.join(".imdsd-write-test");
    fs::write(&probe, b"")?;
    fs::remove_file(&probe)
}

/// Writes a file readable only by its owner, atomically (temporary file, then rename), so a crash
/// never leaves half a key behind; a failed write (a full disk) removes the temporary file too.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_key_survives_reopening_and_is_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let a = StateDir::open(Some(&dir), &no_env)
            .expect("open")
            .token_key()
            .expect("key");
        let b = StateDir::open(Some(&dir), &no_env)
            .expect("open")
            .token_key()
            .expect("key");
        assert_eq!(a.as_bytes(), b.as_bytes());
        let mode = fs::metadata(dir.join(TOKEN_KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_key_names_the_file_and_the_fix() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join(TOKEN_KEY_FILE), b"short").expect("write");
        let err = StateDir::open(Some(tmp.path()), &no_env)
            .expect("open")
            .token_key()
            .expect_err("damaged");
        assert!(err.0.contains("token.key is 5 bytes"), "{err}");
        assert!(err.0.contains("delete it"), "{err}");
    }

    #[test]
    fn an_unusable_explicit_directory_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("plain-file");
        fs::write(&file, b"").expect("write");
        let err = StateDir::open(Some(&file), &no_env).expect_err("not a directory");
        assert!(err.0.contains("--state-dir"), "{err}");
    }

    #[test]
    fn systemd_state_directory_comes_first() {
        let env = |k: &str| (k == "STATE_DIRECTORY").then(|| "/run/x:/run/y".to_string());
        assert_eq!(default_candidates(&env)[0], PathBuf::from("/run/x"));
    }
}
