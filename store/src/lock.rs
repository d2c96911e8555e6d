//! Local advisory locks (`flock`): the store's writer lock and the shared
//! locks readers hold on the manifests they serve.
//!
//! Locks are local-only; a remote backend will need a lock service.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Name of the writer lock file inside the store directory.
pub const LOCK_FILE: &str = "lock";

/// The exclusive writer lock (one backup, gc or index merge at a time),
/// released on drop. The holder's PID is written into the file so that a
/// second writer can say who holds it.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Take the writer lock of the store at `root` without waiting.
    pub fn acquire(root: &Path) -> Result<WriterLock> {
        let path = root.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io_path("Failed to open lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let who = match s.trim().parse::<u32>() {
                    Ok(pid) => format!("PID {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(Error::new(
                    ErrorKind::Locked,
                    format!("Store {} is locked by {who}", root.display()),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io_path("Failed to lock", &path, e)),
        }
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            writeln!(f, "{}", std::process::id())
        };
        write_pid(&mut file).map_err(|e| Error::io_path("Failed to write", &path, e))?;
        Ok(WriterLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_with_pid() {
        let dir = tempfile::tempdir().unwrap();
        let l = WriterLock::acquire(dir.path()).unwrap();
        let e = WriterLock::acquire(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(
            e.to_string()
                .contains(&format!("locked by PID {}", std::process::id())),
            "{e}"
        );
        drop(l);
        WriterLock::acquire(dir.path()).unwrap();
    }
}
