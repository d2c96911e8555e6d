//! [`DiskCache`]: a size-bounded cache of remote object ranges on local
//! disk, the second level below the daemon's in-memory chunk cache.
//!
//! A remote store's chunk reads are exact ranged GETs of one record of a
//! pack (`packs/...`). Packs are immutable under their key, so the bytes of
//! `(key, offset, len)` never change: the cache keeps them in one file per
//! range, named by a hash of the triple, and serves later reads of the same
//! range (a second instant boot of the same snapshot, a chunk the memory
//! cache evicted) without a request. The bytes are the stored record,
//! compressed and, on an encrypted store, sealed: the cache holds nothing
//! the bucket does not.
//!
//! - **Crash safety.** An entry is written to a temp file and renamed into
//!   place; its file holds a magic, the blake3 hash of the payload and the
//!   payload. A torn, truncated or altered file fails the hash check, is
//!   removed and counts as a miss, so it is never served. (The store
//!   checks every record against its chunk id on top of that.)
//! - **Bound.** The bytes held are counted (a scan at open, then every
//!   insert); past the bound, the least recently used entries (by mtime,
//!   which a hit refreshes) are removed down to 80 % of it.
//! - **Sharing.** Several processes may share a cache directory (two
//!   daemons on the same store): renames are atomic and each process
//!   evicts from what it finds on disk.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tracing::{debug, warn};

/// First bytes of every entry.
const MAGIC: &[u8; 8] = b"RCCHUNK1";
/// Magic and payload hash.
const HEADER_LEN: usize = MAGIC.len() + 32;
/// A hit refreshes an entry's mtime at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Counters of a [`DiskCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    /// The size bound in bytes.
    pub capacity: u64,
    /// Bytes of entries held (payload and header).
    pub bytes: u64,
    /// Reads served from disk.
    pub hits: u64,
    /// Reads not found (or found damaged).
    pub misses: u64,
    /// Entries found damaged (torn, truncated, altered) and removed.
    pub damaged: u64,
}

/// Object ranges kept on local disk (see the module doc).
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    used: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    damaged: AtomicU64,
    counter: AtomicU64,
    evicting: Mutex<()>,
}

impl DiskCache {
    /// Open (creating) the cache in `dir`, holding at most `capacity`
    /// bytes. Leftover temp files of a crash are removed.
    pub fn open(dir: &Path, capacity: u64) -> io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            capacity,
            used: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            damaged: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            evicting: Mutex::new(()),
        };
        let entries = cache.scan(true)?;
        cache
            .used
            .store(entries.iter().map(|e| e.1).sum(), Ordering::Relaxed);
        Ok(cache)
    }

    /// The cache's counters.
    pub fn stats(&self) -> DiskCacheStats {
        DiskCacheStats {
            capacity: self.capacity,
            bytes: self.used.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            damaged: self.damaged.load(Ordering::Relaxed),
        }
    }

    fn entry_path(&self, key: &str, offset: u64, len: usize) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(key.as_bytes());
        h.update(&[0]);
        h.update(&offset.to_le_bytes());
        h.update(&(len as u64).to_le_bytes());
        let hex = h.finalize().to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..40])
    }

    /// Fill `buf` with the cached bytes of `key` at `offset`; false on a
    /// miss (a damaged entry is removed and is a miss).
    pub fn get(&self, key: &str, offset: u64, buf: &mut [u8]) -> bool {
        let path = self.entry_path(key, offset, buf.len());
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(_) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        let intact = data.len() == HEADER_LEN + buf.len()
            && data.starts_with(MAGIC)
            && blake3::hash(&data[HEADER_LEN..]).as_bytes()[..] == data[MAGIC.len()..HEADER_LEN];
        if !intact {
            warn!(entry = %path.display(), key, offset, "damaged disk cache entry removed");
            self.damaged.fetch_add(1, Ordering::Relaxed);
            self.misses.fetch_add(1, Ordering::Relaxed);
            if fs::remove_file(&path).is_ok() {
                sub(&self.used, data.len() as u64);
            }
            return false;
        }
        buf.copy_from_slice(&data[HEADER_LEN..]);
        self.hits.fetch_add(1, Ordering::Relaxed);
        // Least recently *used*: a hit makes the entry young again.
        if let Ok(f) = File::options().write(true).open(&path) {
            let now = SystemTime::now();
            let old = f.metadata().and_then(|m| m.modified()).ok();
            if old.is_none_or(|t| now.duration_since(t).unwrap_or_default() > TOUCH_EVERY) {
                let _ = f.set_modified(now);
            }
        }
        true
    }

    /// Keep `data`, the bytes of `key` at `offset`. Best effort: a full
    /// disk or any other failure only logs.
    pub fn put(&self, key: &str, offset: u64, data: &[u8]) {
        let entry = (HEADER_LEN + data.len()) as u64;
        if entry > self.capacity / 4 {
            return;
        }
        let path = self.entry_path(key, offset, data.len());
        if path.exists() {
            return;
        }
        match self.write_entry(&path, data) {
            Ok(()) => {
                let used = self.used.fetch_add(entry, Ordering::Relaxed) + entry;
                if used > self.capacity {
                    self.evict();
                }
            }
            Err(e) => debug!(key, offset, "disk cache write failed: {e}"),
        }
    }

    fn write_entry(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            "{}-{}.tmp",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(blake3::hash(data).as_bytes())?;
            f.write_all(data)?;
            // No fsync: a torn entry after a crash fails its hash check.
            fs::rename(&tmp, path)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    /// Entries on disk: path, size, mtime. With `clean`, temp files of
    /// processes that are gone are removed.
    fn scan(&self, clean: bool) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path())?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = name.strip_suffix(".tmp") {
                    let pid = rest.split('-').next().unwrap_or("");
                    let alive = Path::new("/proc").join(pid).exists();
                    if clean && !alive {
                        let _ = fs::remove_file(e.path());
                    }
                    continue;
                }
                if let Ok(m) = e.metadata() {
                    let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((e.path(), m.len(), t));
                }
            }
        }
        Ok(out)
    }

    /// Remove the least recently used entries down to 80 % of the bound.
    fn evict(&self) {
        // One evictor at a time; the others go on.
        let Ok(_guard) = self.evicting.try_lock() else {
            return;
        };
        let mut entries = match self.scan(false) {
            Ok(e) => e,
            Err(e) => return warn!(dir = %self.dir.display(), "disk cache scan failed: {e}"),
        };
        entries.sort_by_key(|e| e.2);
        let mut held: u64 = entries.iter().map(|e| e.1).sum();
        let goal = self.capacity / 10 * 8;
        let mut removed = 0usize;
        for (path, len, _) in entries {
            if held <= goal {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                held -= len;
                removed += 1;
            }
        }
        self.used.store(held, Ordering::Relaxed);
        debug!(removed, held, "disk cache evicted");
    }
}

fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_miss_and_damaged_entries_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let mut buf = vec![0u8; 100];
        assert!(!c.get("packs/a", 0, &mut buf));
        c.put("packs/a", 0, &[7u8; 100]);
        assert!(c.get("packs/a", 0, &mut buf));
        assert_eq!(buf, vec![7u8; 100]);
        // Another range of the same object is another entry.
        assert!(!c.get("packs/a", 100, &mut buf));
        assert!(!c.get("packs/a", 0, &mut buf[..50]));

        // Torn (truncated) and altered entries: removed, a miss.
        let path = c.entry_path("packs/a", 0, 100);
        let whole = fs::read(&path).unwrap();
        fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(!c.get("packs/a", 0, &mut buf));
        assert!(!path.exists());
        c.put("packs/a", 0, &[7u8; 100]);
        let mut altered = fs::read(&path).unwrap();
        *altered.last_mut().unwrap() ^= 1;
        fs::write(&path, &altered).unwrap();
        buf.fill(0);
        assert!(!c.get("packs/a", 0, &mut buf));
        assert_eq!(buf, vec![0u8; 100]);
        assert_eq!(c.stats().damaged, 2);

        // A new process finds what the last one kept.
        c.put("packs/a", 0, &[9u8; 100]);
        drop(c);
        let c = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(c.stats().bytes, (HEADER_LEN + 100) as u64);
        assert!(c.get("packs/a", 0, &mut buf));
        assert_eq!(buf, vec![9u8; 100]);
    }

    #[test]
    fn bounded_by_evicting_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let entry = (HEADER_LEN + 1000) as u64;
        let c = DiskCache::open(dir.path(), 10 * entry).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..10u64 {
            c.put("packs/b", i * 1000, &[i as u8; 1000]);
            let p = c.entry_path("packs/b", i * 1000, 1000);
            let t = old + Duration::from_secs(i);
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        // Entry 0 is used again: it is the youngest now.
        let mut buf = vec![0u8; 1000];
        assert!(c.get("packs/b", 0, &mut buf));
        c.put("packs/b", 10_000, &[10u8; 1000]);
        let s = c.stats();
        assert!(s.bytes <= 10 * entry / 10 * 8 + entry, "{s:?}");
        assert!(
            c.get("packs/b", 0, &mut buf),
            "the recently used entry went"
        );
        assert!(!c.get("packs/b", 1000, &mut buf), "the oldest entry stayed");
        assert!(c.get("packs/b", 10_000, &mut buf));
    }
}
