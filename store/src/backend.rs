//! The storage backend: every pack, index and manifest byte goes through the
//! [`Backend`] trait.
//!
//! The trait is deliberately small and object-store shaped: objects are
//! written whole and published atomically under a key, then only read, listed,
//! renamed or deleted. Nothing rewrites an object in place, so an S3-compatible
//! backend (through `object_store`) can implement it. Writers first fill a
//! local [`TempObject`] (which may be written out of order, e.g. manifest
//! entries by parallel workers) and then [`Backend::publish`] it.

mod local;

pub use local::{sync_dir, LocalBackend};

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
