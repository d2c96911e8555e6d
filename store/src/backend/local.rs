//! [`LocalBackend`]: a directory on a local filesystem.
//!
//! Publishing is write to `tmp/`, fsync the file, rename into place, fsync the
//! destination directory (and any directory it had to create). After
//! `publish` returns, the object survives a crash.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, Object, ObjectInfo, TempObject};

/// Directory of temporary files inside the store.
pub const TMP_DIR: &str = "tmp";

/// A store directory on a local filesystem.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalBackend {
    /// A backend rooted at `root` (which must exist).
    pub fn new(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Create `dir` and missing parents, fsyncing each new directory's parent.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

/// fsync a directory so renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for LocalBackend {
    fn create_temp(&self) -> io::Result<TempObject> {
        let dir = self.path(TMP_DIR);
        self.ensure_dir(&dir)?;
        TempObject::create_in(&dir, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    fn publish(&self, mut tmp: TempObject, key: &str) -> io::Result<()> {
        tmp.file().sync_all()?;
        let dest = self.path(key);
        let parent = dest
            .parent()
            .ok_or_else(|| io::Error::other("object key has no parent directory"))?;
        self.ensure_dir(parent)?;
        fs::rename(tmp.path(), &dest)?;
        tmp.mark_published();
        sync_dir(parent)
    }

    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>> {
        let file = File::open(self.path(key))?;
        Ok(Arc::new(file))
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let rd = match fs::read_dir(self.path(dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        match path.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        fs::rename(&from, &to)?;
        if let Some(p) = to.parent() {
            sync_dir(p)?;
        }
        match from.parent() {
            Some(p) if Some(p) != to.parent() => sync_dir(p),
            _ => Ok(()),
        }
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path(key))?.len())
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }

    fn display(&self) -> String {
        self.root.display().to_string()
    }

    fn stat(&self, key: &str) -> io::Result<ObjectInfo> {
        let m = fs::metadata(self.path(key))?;
        let modified_unix = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Ok(ObjectInfo {
            size: m.len(),
            modified_unix,
            etag: None,
        })
    }

    fn clean_temp(&self) -> io::Result<usize> {
        let mut n = 0;
        for name in self.list(TMP_DIR)? {
            match fs::remove_file(self.path(TMP_DIR).join(&name)) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_list_rename_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.put("a/b/c.bin", b"hello").unwrap();
        assert_eq!(b.read("a/b/c.bin").unwrap(), b"hello");
        assert_eq!(b.list("a/b").unwrap(), vec!["c.bin".to_string()]);
        assert!(b.list("nope").unwrap().is_empty());
        let obj = b.open("a/b/c.bin").unwrap();
        let mut two = [0u8; 2];
        obj.read_at(&mut two, 3).unwrap();
        assert_eq!(&two, b"lo");
        let mut past = [0u8; 4];
        assert_eq!(
            obj.read_at(&mut past, 3).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        b.rename("a/b/c.bin", "a/b/d.bin").unwrap();
        assert!(!b.exists("a/b/c.bin").unwrap());
        assert_eq!(b.size("a/b/d.bin").unwrap(), 5);
        b.delete("a/b/d.bin").unwrap();
        b.delete("a/b/d.bin").unwrap();
        assert!(b.list("a/b").unwrap().is_empty());
        // Nothing left behind in tmp/.
        assert!(b.list(TMP_DIR).unwrap().is_empty());
    }

    #[test]
    fn dropped_temp_is_removed_and_clean_temp_sweeps() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let t = b.create_temp().unwrap();
        let p = t.path().to_path_buf();
        assert!(p.exists());
        drop(t);
        assert!(!p.exists());
        fs::write(dir.path().join("tmp/leftover.tmp"), b"x").unwrap();
        assert_eq!(b.clean_temp().unwrap(), 1);
        assert!(b.list(TMP_DIR).unwrap().is_empty());
    }
}
