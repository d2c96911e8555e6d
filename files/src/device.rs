//! Random access to an image: the [`ReadAt`] seam, the snapshot reader with
//! its small bounded chunk cache ([`SnapshotDevice`]), and a window onto a
//! partition ([`Slice`]).
//!
//! Only the chunks a read touches are fetched from the store; zero chunks are
//! never fetched at all. Every fetch is counted ([`FetchStats`]) so that a
//! caller can report how much of the store a file cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use store::SnapshotReader;
use tracing::trace;

use crate::error::{Error, Result};

/// Byte-addressed read access to an image or a part of one.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset`; reads past the end fail.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Checks that `len` bytes at `offset` lie within `size`.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::BeyondEnd { offset, len, size }),
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let at = offset as usize;
        buf.copy_from_slice(&self[at..at + buf.len()]);
        Ok(())
    }
}

/// How much was fetched from the store.
#[derive(Debug, Default)]
pub struct FetchStats {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

impl FetchStats {
    /// Chunks read from the store (cache misses on non-zero chunks).
    pub fn chunks(&self) -> u64 {
        self.chunks.load(Ordering::Relaxed)
    }

    /// Plaintext bytes of those chunks.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Default cache budget: enough for a file system's hot metadata and a few
/// read-ahead chunks, small enough to not matter next to a VM.
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;

struct Cached {
    index: u64,
    data: Arc<Vec<u8>>,
    used: u64,
}

/// Least-recently-used chunks, a linear scan over at most a few hundred.
struct Lru {
    entries: Vec<Cached>,
    capacity: usize,
    tick: u64,
}

impl Lru {
    fn get(&mut self, index: u64) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.iter_mut().find(|e| e.index == index).map(|e| {
            e.used = tick;
            e.data.clone()
        })
    }

    fn put(&mut self, index: u64, data: Arc<Vec<u8>>) {
        self.tick += 1;
        if self.entries.iter().any(|e| e.index == index) {
            return;
        }
        let entry = Cached {
            index,
            data,
            used: self.tick,
        };
        if self.entries.len() < self.capacity {
            self.entries.push(entry);
        } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|e| e.used) {
            *oldest = entry;
        }
    }
}

/// A snapshot's image through a bounded LRU of verified chunks. Holds the
/// snapshot's shared lock (inside [`SnapshotReader`]) for its lifetime, so gc
/// cannot delete a chunk it may still read.
pub struct SnapshotDevice {
    reader: SnapshotReader,
    cache: Mutex<Lru>,
    stats: FetchStats,
}

impl std::fmt::Debug for SnapshotDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotDevice")
            .field("snapshot", &self.reader.info().reference())
            .finish_non_exhaustive()
    }
}

impl SnapshotDevice {
    /// Wrap `reader` with a cache of about `cache_bytes` (at least 4 chunks).
    pub fn new(reader: SnapshotReader, cache_bytes: usize) -> SnapshotDevice {
        let capacity = (cache_bytes / reader.chunk_size() as usize).clamp(4, 4096);
        SnapshotDevice {
            reader,
            cache: Mutex::new(Lru {
                entries: Vec::with_capacity(capacity),
                capacity,
                tick: 0,
            }),
            stats: FetchStats::default(),
        }
    }

    /// The snapshot being read.
    pub fn reader(&self) -> &SnapshotReader {
        &self.reader
    }

    /// What was fetched from the store so far.
    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    fn chunk(&self, index: u64) -> Result<Option<Arc<Vec<u8>>>> {
        let offset = index * self.reader.chunk_size() as u64;
        let wrap = |source| Error::ReadImage {
            offset,
            len: self.reader.chunk_size() as usize,
            source,
        };
        if let Some(hit) = self.lock().get(index) {
            return Ok(Some(hit));
        }
        let Some(id) = self.reader.chunk_id(index).map_err(wrap)? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        self.reader.read_chunk(index, &mut data).map_err(wrap)?;
        trace!(index, chunk = %id.short(), "fetched chunk");
        self.stats.chunks.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let data = Arc::new(data);
        self.lock().put(index, data.clone());
        Ok(Some(data))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock leaves a consistent LRU.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ReadAt for SnapshotDevice {
    fn size(&self) -> u64 {
        self.reader.image_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let cs = self.reader.chunk_size() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.chunk(pos / cs)? {
                None => dst.fill(0),
                Some(c) => dst.copy_from_slice(&c[within..within + n]),
            }
            done += n;
        }
        Ok(())
    }
}

/// `len` bytes of `dev` starting at `start` (a partition).
#[derive(Clone)]
pub struct Slice {
    dev: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Slice {
    /// The window `start..start + len`, clamped to the device.
    pub fn new(dev: Arc<dyn ReadAt>, start: u64, len: u64) -> Slice {
        let size = dev.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Slice { dev, start, len }
    }

    /// Offset of the window on the device.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.len)?;
        self.dev.read_at(buf, self.start + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_inside_its_window_only() {
        let dev: Arc<dyn ReadAt> = Arc::new((0u8..=255).collect::<Vec<u8>>());
        let s = Slice::new(dev, 16, 32);
        let mut b = [0u8; 4];
        s.read_at(&mut b, 28).unwrap();
        assert_eq!(b, [44, 45, 46, 47]);
        assert!(matches!(
            s.read_at(&mut b, 29),
            Err(Error::BeyondEnd { .. })
        ));
        assert!(s.read_at(&mut b, u64::MAX).is_err());
        let clamped = Slice::new(Arc::new(vec![0u8; 10]), 8, 100);
        assert_eq!(clamped.size(), 2);
    }

    #[test]
    fn lru_keeps_recent_and_evicts_oldest() {
        let mut l = Lru {
            entries: Vec::new(),
            capacity: 2,
            tick: 0,
        };
        l.put(1, Arc::new(vec![1]));
        l.put(2, Arc::new(vec![2]));
        assert!(l.get(1).is_some());
        l.put(3, Arc::new(vec![3]));
        assert!(l.get(2).is_none());
        assert!(l.get(1).is_some() && l.get(3).is_some());
    }
}
