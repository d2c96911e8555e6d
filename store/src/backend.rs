//! The storage backend: every pack, index and manifest byte goes through the
//! [`Backend`] trait.
//!
//! The trait is deliberately small and object-store shaped: objects are
//! written whole and published atomically under a key, then only read, listed,
//! renamed or deleted. Nothing rewrites an object in place, so an S3-compatible
//! backend (through `object_store`) can implement it. Writers first fill a
//! local [`TempObject`] (which may be written out of order, e.g. manifest
//! entries by parallel workers) and then [`Backend::publish`] it.

pub mod disk_cache;
mod local;
pub mod s3;

pub use disk_cache::{DiskCache, DiskCacheStats};
pub use local::{sync_dir, LocalBackend};
pub use s3::{RemoteStats, S3Backend, S3Options};

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A readable, immutable stored object.
pub trait Object: Send + Sync + fmt::Debug {
    /// Fill `buf` from `offset`; a short object is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The object's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the object is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The local file behind the object, if any (used for advisory locks,
    /// which are local-only).
    fn file(&self) -> Option<&File> {
        None
    }
}

impl Object for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

/// What a backend knows about one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Length in bytes.
    pub size: u64,
    /// Last modification, seconds since the epoch, by the *storage's* clock
    /// (0 when unknown, e.g. straight after a PUT).
    pub modified_unix: i64,
    /// Entity tag (remote backends), for conditional replacement.
    pub etag: Option<String>,
}

/// The storage behind a store. Keys are `/`-separated relative paths.
pub trait Backend: Send + Sync + fmt::Debug {
    /// A new local temporary file to fill and later [`publish`](Backend::publish).
    fn create_temp(&self) -> io::Result<TempObject>;
    /// Make `tmp` durable and visible under `key` atomically (replacing any
    /// object of that name). Readers see either nothing or the whole object.
    fn publish(&self, tmp: TempObject, key: &str) -> io::Result<()>;
    /// Open an object for reading.
    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>>;
    /// Names (not keys) of the entries directly under `dir`; empty when the
    /// directory does not exist.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Delete an object durably; deleting a missing object succeeds.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Rename an object atomically and durably.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Size of an object.
    fn size(&self, key: &str) -> io::Result<u64>;
    /// The local path of `key`, if the backend is a local directory.
    fn local_path(&self, key: &str) -> Option<PathBuf>;
    /// Remove leftover temporary files (called by the writer under the lock).
    fn clean_temp(&self) -> io::Result<usize>;

    /// Size, modification time and etag of an object.
    fn stat(&self, key: &str) -> io::Result<ObjectInfo> {
        Ok(ObjectInfo {
            size: self.size(key)?,
            modified_unix: 0,
            etag: None,
        })
    }

    /// Create `key` holding `data` only if no object of that name exists
    /// (S3: `If-None-Match: *`); `AlreadyExists` otherwise. Remote backends
    /// only: local stores lock with `flock`.
    fn create_new(&self, key: &str, _data: &[u8]) -> io::Result<ObjectInfo> {
        Err(unsupported("conditional create", key))
    }

    /// Replace `key` with `data` only if its etag is still `etag`
    /// (S3: `If-Match`); `ResourceBusy` when it changed, `NotFound` when gone.
    fn replace_if(&self, key: &str, _data: &[u8], _etag: &str) -> io::Result<ObjectInfo> {
        Err(unsupported("conditional replace", key))
    }

    /// True for object storage (no `flock`, no local paths).
    fn is_remote(&self) -> bool {
        false
    }

    /// Fill `buf` with the bytes of `key` at `offset`, read once: no
    /// readahead, nothing kept in a cache (restore and copy read every
    /// chunk once, in large pack spans).
    fn read_range_once(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.open(key)?.read_at(buf, offset)
    }

    /// A remote backend's request counters (retry time, errors, retries,
    /// the last error); `None` for a local one.
    fn remote_stats(&self) -> Option<RemoteStats> {
        None
    }

    /// Where the store lives, for messages (`/path` or `s3://bucket/prefix`).
    fn display(&self) -> String {
        match self.local_path("") {
            Some(p) => p.display().to_string(),
            None => "(remote store)".to_string(),
        }
    }

    /// Write `data` as object `key` atomically.
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let mut tmp = self.create_temp()?;
        tmp.file_mut().write_all(data)?;
        self.publish(tmp, key)
    }

    /// Read a whole object.
    fn read(&self, key: &str) -> io::Result<Vec<u8>> {
        let obj = self.open(key)?;
        let len = usize::try_from(obj.len()?).map_err(io::Error::other)?;
        let mut buf = vec![0u8; len];
        obj.read_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Whether `key` exists.
    fn exists(&self, key: &str) -> io::Result<bool> {
        match self.size(key) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn unsupported(what: &str, key: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("This backend has no {what} (object {key})"),
    )
}

/// A local temporary file that becomes an object when published; dropped
/// unpublished, it is removed.
#[derive(Debug)]
pub struct TempObject {
    file: File,
    path: PathBuf,
    published: bool,
}

impl TempObject {
    pub(crate) fn new(file: File, path: PathBuf) -> TempObject {
        TempObject {
            file,
            path,
            published: false,
        }
    }

    /// A new temp file in `dir`, named `<pid>-<n>-<random>.tmp` so that
    /// leftovers name the process that made them.
    pub(crate) fn create_in(dir: &Path, n: u64) -> io::Result<TempObject> {
        let name = format!(
            "{}-{n}-{}.tmp",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempObject::new(file, path))
    }

    /// The file to fill.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file to fill, mutably (for `Write`).
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// Where the temporary file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn mark_published(&mut self) {
        self.published = true;
    }
}

impl Drop for TempObject {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
