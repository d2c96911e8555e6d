//! The store's snapshot reader as a [`ChunkSource`].
//!
//! This is the one place where the block layers meet the store. Store
//! errors become `io::Error`s that keep the whole message chain (chunk id,
//! pack, snapshot), so a corrupt chunk reaches the guest as an I/O error
//! and the log says which chunk it was.
//!
//! [`StoreSource`] wraps a reader and counts the failed fetches, which the
//! daemon reports as `chunk_read_errors` in its status.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use store::{ErrorKind, SnapshotReader};

use crate::error_chain;
use crate::source::ChunkSource;

/// A snapshot reader as a [`ChunkSource`] that counts failed chunk reads.
pub struct StoreSource {
    reader: Arc<SnapshotReader>,
    read_errors: AtomicU64,
}

impl StoreSource {
    /// Serves `reader`.
    pub fn new(reader: Arc<SnapshotReader>) -> StoreSource {
        StoreSource {
            reader,
            read_errors: AtomicU64::new(0),
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
        self.count(ChunkSource::chunk_key(&*self.reader, index))
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
