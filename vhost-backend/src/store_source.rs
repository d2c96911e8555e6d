//! The store's snapshot reader as a [`ChunkSource`].
//!
//! This is the one place where the block layers meet the store. Store
//! errors become `io::Error`s that keep the whole message chain (chunk id,
//! pack, snapshot), so a corrupt chunk reaches the guest as an I/O error
//! and the log says which chunk it was.

use std::io;

use store::{ErrorKind, SnapshotReader};

use crate::source::ChunkSource;

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

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
