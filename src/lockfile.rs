//! Exclusive ownership of a file or directory vizor writes (the audit log, the
//! recording directory) for as long as one `vizor serve` runs: two processes on one
//! audit log would both continue its chain and break it (`seq 1 follows 1`).
//!
//! The lock is a `flock(2)` on a separate lock file, not on the log: the log is renamed
//! when it rotates, and the lock must stay with the name. The kernel drops it when the
//! process ends, however it ends, so a crash leaves nothing to clean up. The file holds
//! the owner's pid, for the message a second process gives.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A held lock; dropped, it is released.
#[derive(Debug)]
pub struct Lock {
    _file: Flock<File>,
    path: PathBuf,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it (its pid, when the lock file names one).
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "in use by pid {pid} (another vizor serve holds {})",
                path.display()
            ),
            LockError::Held { path, pid: None } => {
                write!(f, "in use by another process (it holds {})", path.display())
            }
            LockError::Io { path, error } => write!(f, "lock file {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for LockError {}

impl Lock {
    /// Takes the lock at `path` (created mode 0600 if missing) without waiting, and
    /// writes this process's pid into it.
    pub fn take(path: &Path) -> Result<Lock, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |error| LockError::Io {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // `vizor check` probes the lock for an instant (Lock::holder): a few tries
        // tell that from a process that holds it.
        let mut file = file;
        let mut attempt = 1;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => return Self::owned(f, path),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if attempt < 6 => {
                    attempt += 1;
                    file = f;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = f.take(32).read_to_string(&mut text);
                    return Err(LockError::Held {
                        path: path.to_owned(),
                        pid: text.trim().parse().ok(),
                    });
                }
                Err((_, e)) => return Err(io(e.into())),
            }
        }
    }

    /// A lock just taken: this process's pid goes into its file.
    fn owned(mut file: Flock<File>, path: &Path) -> Result<Lock, LockError> {
        let io = |error| LockError::Io {
            path: path.to_owned(),
            error,
        };
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .map_err(io)?;
        Ok(Lock {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who holds the lock at `path` now, without taking it for long and without
    /// creating the file (whose owner must stay the service's user): `None` when
    /// nobody does, `Some(pid)` (the pid it wrote, if readable) when a process does.
    pub fn holder(path: &Path) -> Result<Option<Option<u32>>, std::io::Error> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_released_on_drop) => Ok(None),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.take(32).read_to_string(&mut text);
                Ok(Some(text.trim().parse().ok()))
            }
            Err((_, e)) => Err(e.into()),
        }
    }
}

/// The lock file of the audit log at `log`: `.<name>.lock` beside it, hidden, so a
/// glob of the log's rotated files (`audit.jsonl.*`) does not take it.
pub fn of_log(log: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(log.file_name().unwrap_or(log.as_os_str()));
    name.push(".lock");
    log.with_file_name(name)
}

/// The lock file of the directory `dir`: `dir/.vizor.lock` (dotfiles are never served
/// or taken for recordings).
pub fn of_dir(dir: &Path) -> PathBuf {
    dir.join(".vizor.lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_refused_and_told_the_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = of_log(&dir.path().join("audit.jsonl"));
        assert_eq!(path, dir.path().join(".audit.jsonl.lock"));
        let first = Lock::take(&path).unwrap();
        // flock locks belong to the open file: a second open in the same process is a
        // second taker, as another process would be.
        match Lock::take(&path) {
            Err(e @ LockError::Held { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("in use by pid {}", std::process::id())),
                    "{text}"
                );
            }
            other => panic!("a held lock was taken again: {other:?}"),
        }
        drop(first);
        let again = Lock::take(&path).unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn holder_names_the_pid_of_a_held_lock_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".audit.jsonl.lock");
        assert_eq!(Lock::holder(&path).expect("probe"), None);
        assert!(!path.exists(), "probing created the lock file");
        let held = Lock::take(&path).expect("take");
        assert_eq!(
            Lock::holder(&path).expect("probe"),
            Some(Some(std::process::id()))
        );
        drop(held);
        assert_eq!(Lock::holder(&path).expect("probe"), None);
        // Probing leaves it free for the next taker.
        Lock::take(&path).expect("taken after a probe");
    }

    #[test]
    fn a_lock_file_that_cannot_be_made_is_an_error_naming_it() {
        let e = Lock::take(&of_log(Path::new("/nonexistent-vizor-dir/audit.jsonl"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent-vizor-dir/.audit.jsonl.lock"),
            "{e}"
        );
    }
}
