//! The store's snapshot reader as a [`ChunkSource`].
//!
//! This is the one place where the block layers meet the store. Store
//! errors become `io::Error`s that keep the whole message chain (chunk id,
//! pack, snapshot), so a corrupt chunk reaches the guest as an I/O error
//! and the log says which chunk it was.
//!
//! [`StoreSource`] wraps a reader and counts the failed fetches, which the
//! daemon reports as `chunk_read_errors` in its status.
//!
//! **Key table.** Every guest read asks for the content key of the chunks
//! it touches; the manifest holds them on disk. [`StoreSource`] keeps them
//! in memory in pages of [`KEYS_PER_PAGE`] entries, each read from the
//! manifest once (one `pread`, 128 KiB) on first use, so a warm read costs
//! an array index instead of a syscall. Memory grows with the part of the
//! image the guest and the copier touch: at most 33 bytes per chunk (33 MiB
//! for a 64 GiB image at 64 KiB chunks).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use store::{ErrorKind, SnapshotReader};

use crate::error_chain;
use crate::source::ChunkSource;

/// Manifest entries per key-table page (4096 × 32 bytes on disk).
pub const KEYS_PER_PAGE: u64 = 4096;

type KeyPage = Box<[Option<[u8; 32]>]>;

/// A snapshot reader as a [`ChunkSource`] that counts failed chunk reads
/// and keeps the chunk keys it has looked up in memory.
pub struct StoreSource {
    reader: Arc<SnapshotReader>,
    read_errors: AtomicU64,
    pages: Box<[OnceLock<KeyPage>]>,
}

impl StoreSource {
    /// Serves `reader`.
    pub fn new(reader: Arc<SnapshotReader>) -> StoreSource {
        let pages = reader.chunk_count().div_ceil(KEYS_PER_PAGE) as usize;
        StoreSource {
            reader,
            read_errors: AtomicU64::new(0),
            pages: (0..pages).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The key of chunk `index` from the key table, reading its page from
    /// the manifest on first use. A failed page read is not remembered: the
    /// next lookup tries again.
    fn key(&self, index: u64) -> io::Result<Option<[u8; 32]>> {
        let page = (index / KEYS_PER_PAGE) as usize;
        let Some(slot) = self.pages.get(page) else {
            // Past the end: let the reader produce its range error.
            return ChunkSource::chunk_key(&*self.reader, index);
        };
        let at = (index % KEYS_PER_PAGE) as usize;
        let keys = match slot.get() {
            Some(keys) => keys,
            None => {
                let first = page as u64 * KEYS_PER_PAGE;
                let mut ids = Vec::new();
                self.reader
                    .chunk_ids(first, KEYS_PER_PAGE, &mut ids)
                    .map_err(|e| to_io(&self.reader, first, e))?;
                let loaded: KeyPage = ids.into_iter().map(|id| id.map(|id| id.0)).collect();
                // Another thread may have loaded it meanwhile: same content.
                slot.get_or_init(|| loaded)
            }
        };
        match keys.get(at) {
            Some(key) => Ok(*key),
            // Past the end of the last (short) page.
            None => ChunkSource::chunk_key(&*self.reader, index),
        }
    }

    /// The wrapped reader.
    pub fn reader(&self) -> &Arc<SnapshotReader> {
        &self.reader
    }

    /// Chunk lookups and reads that failed so far.
    pub fn read_errors(&self) -> u64 {
        self.read_errors.load(Ordering::Relaxed)
    }

    fn count<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl ChunkSource for StoreSource {
    fn image_size(&self) -> u64 {
        self.reader.image_size()
    }

    fn chunk_size(&self) -> u32 {
        self.reader.chunk_size()
    }

    fn chunk_key(&self, index: u64) -> io::Result<Option<[u8; 32]>> {
        self.count(self.key(index))
    }

    fn read_chunk(&self, index: u64, out: &mut Vec<u8>) -> io::Result<()> {
        self.count(ChunkSource::read_chunk(&*self.reader, index, out))
    }
}

impl ChunkSource for SnapshotReader {
    fn image_size(&self) -> u64 {
        SnapshotReader::image_size(self)
    }

    fn chunk_size(&self) -> u32 {
        SnapshotReader::chunk_size(self)
    }

    fn chunk_key(&self, index: u64) -> io::Result<Option<[u8; 32]>> {
        self.chunk_id(index)
            .map(|id| id.map(|id| id.0))
            .map_err(|e| to_io(self, index, e))
    }

    fn read_chunk(&self, index: u64, out: &mut Vec<u8>) -> io::Result<()> {
        SnapshotReader::read_chunk(self, index, out).map_err(|e| to_io(self, index, e))
    }
}

/// Converts a store error into an `io::Error` naming the snapshot and the
/// byte offset of the chunk, and logs it: a failed chunk read is always
/// worth an operator's attention.
fn to_io(reader: &SnapshotReader, index: u64, err: store::Error) -> io::Error {
    let offset = index.saturating_mul(u64::from(reader.chunk_size()));
    let kind = match err.kind() {
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    let message = format!(
        "Read chunk {index} (offset {offset}) of snapshot {}: {}",
        reader.info().reference(),
        error_chain(&err)
    );
    tracing::error!(
        snapshot = %reader.info().reference(),
        chunk_index = index,
        offset,
        chunk = ?err.chunk().map(|c| c.to_string()),
        "{message}"
    );
    io::Error::new(kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of `chunks` 4 KiB chunks: chunk i is filled with i % 7
    /// (so 0, 7, 14, ... are zero chunks and the rest dedup in sevens).
    fn backed_up(dir: &std::path::Path, chunks: u64) -> Arc<SnapshotReader> {
        let image = dir.join("disk.img");
        let data: Vec<u8> = (0..chunks)
            .flat_map(|i| std::iter::repeat_n((i % 7) as u8, 4096))
            .collect();
        std::fs::write(&image, &data).unwrap();
        let store = store::Store::init(&dir.join("store"), 4096).unwrap();
        store
            .backup("disk", &image, &store::BackupOptions::default())
            .unwrap();
        Arc::new(store.open_snapshot("disk").unwrap())
    }

    #[test]
    fn key_table_matches_the_manifest_across_pages() {
        let tmp = tempfile::tempdir().unwrap();
        let chunks = KEYS_PER_PAGE + 100;
        let reader = backed_up(tmp.path(), chunks);
        let source = StoreSource::new(reader.clone());
        for index in [0, 1, 6, 7, KEYS_PER_PAGE - 1, KEYS_PER_PAGE, chunks - 1] {
            let expected = reader.chunk_id(index).unwrap().map(|id| id.0);
            assert_eq!(source.chunk_key(index).unwrap(), expected, "chunk {index}");
            // The second lookup comes from the table and agrees.
            assert_eq!(source.chunk_key(index).unwrap(), expected, "chunk {index}");
        }
        assert_eq!(source.chunk_key(0).unwrap(), None);
        assert!(source.chunk_key(1).unwrap().is_some());
        assert!(source.chunk_key(chunks).is_err(), "past the end");
        assert_eq!(source.read_errors(), 1);
    }
}
