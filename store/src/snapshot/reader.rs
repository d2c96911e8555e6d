//! [`SnapshotReader`]: random access to a snapshot's image.
//!
//! Opening takes a shared `flock` on the manifest and then checks that the
//! manifest is still at its live path (not renamed away by `forget` in
//! between). gc never deletes a manifest, nor the chunks it names, while such
//! a lock is held, so everything a reader can reach stays readable for the
//! reader's lifetime.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::backend::Object;
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::repo::Store;
use crate::snapshot::manifest::{decode_entry, read_header, verify_trailer, Manifest, ENTRY_LEN};
use crate::snapshot::{Listed, SnapshotInfo};

/// Reads one snapshot. `Send + Sync`; holds the shared lock until dropped.
#[derive(Debug)]
pub struct SnapshotReader {
    store: Store,
    key: String,
    obj: Arc<dyn Object>,
    manifest: Manifest,
}

impl SnapshotReader {
    pub(crate) fn open(store: &Store, listed: &Listed) -> Result<SnapshotReader> {
        let key = listed.key();
        let reference = format!("{}@{}", listed.name, listed.id);
        let gone = || {
            Error::not_found(format!(
                "Snapshot {reference} not found (forgotten or deleted)"
            ))
            .with_snapshot(reference.clone())
        };
        let obj: Arc<dyn Object> = match store.backend().local_path(&key) {
            Some(path) => {
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone()),
                    Err(e) => {
                        return Err(Error::io_path("Failed to open snapshot manifest", &path, e))
                    }
                };
                file.lock_shared()
                    .map_err(|e| Error::io_path("Failed to lock snapshot manifest", &path, e))?;
                let open_meta = file
                    .metadata()
                    .map_err(|e| Error::io_path("Failed to stat snapshot manifest", &path, e))?;
                match fs::metadata(&path) {
                    Ok(m) if m.dev() == open_meta.dev() && m.ino() == open_meta.ino() => {}
                    _ => return Err(gone()),
                }
                Arc::new(file)
            }
            None => store
                .backend()
                .open(&key)
                .ctx(|| format!("Failed to open snapshot manifest {key}"))?,
        };
        let manifest = read_header(obj.as_ref(), &key)?;
        if manifest.info.id != listed.id || manifest.info.name != listed.name {
            return Err(Error::corrupt(format!(
                "Snapshot manifest {key} describes {}@{}",
                manifest.info.name, manifest.info.id
            )));
        }
        if manifest.info.chunk_size != store.chunk_size() {
            return Err(Error::corrupt(format!(
                "Snapshot manifest {key} has chunk size {}, the store {}",
                manifest.info.chunk_size,
                store.chunk_size()
            )));
        }
        Ok(SnapshotReader {
            store: store.clone(),
            key,
            obj,
            manifest,
        })
    }

    /// What this snapshot is.
    pub fn info(&self) -> &SnapshotInfo {
        &self.manifest.info
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.manifest.info.image_size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.manifest.info.chunk_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.manifest.info.chunk_count
    }

    /// The store this snapshot lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Backend key of the manifest.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Plaintext length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> Result<usize> {
        self.check_index(index)?;
        let cs = self.chunk_size() as u64;
        Ok((self.image_size() - index * cs).min(cs) as usize)
    }

    fn check_index(&self, index: u64) -> Result<()> {
        if index >= self.chunk_count() {
            return Err(Error::invalid(format!(
                "Chunk index {index} is beyond the {} chunks of snapshot {}",
                self.chunk_count(),
                self.manifest.info.reference()
            )));
        }
        Ok(())
    }

    /// The id of chunk `index`, `None` for a zero chunk. One `pread`.
    pub fn chunk_id(&self, index: u64) -> Result<Option<ChunkId>> {
        self.check_index(index)?;
        let mut e = [0u8; ENTRY_LEN];
        self.obj
            .read_at(
                &mut e,
                self.manifest.entries_offset + index * ENTRY_LEN as u64,
            )
            .ctx(|| format!("Failed to read snapshot manifest {}", self.key))?;
        Ok(decode_entry(&e))
    }

    /// The ids of chunks `first..first + n` (clamped to the image) into `out`.
    pub fn chunk_ids(&self, first: u64, n: u64, out: &mut Vec<Option<ChunkId>>) -> Result<()> {
        out.clear();
        if first >= self.chunk_count() {
            return Ok(());
        }
        let n = n.min(self.chunk_count() - first) as usize;
        let mut buf = vec![0u8; n * ENTRY_LEN];
        self.obj
            .read_at(
                &mut buf,
                self.manifest.entries_offset + first * ENTRY_LEN as u64,
            )
            .ctx(|| format!("Failed to read snapshot manifest {}", self.key))?;
        out.extend(buf.chunks_exact(ENTRY_LEN).map(decode_entry));
        Ok(())
    }

    /// The verified plaintext of chunk `index` into `out` (zeros for a zero
    /// chunk); `out.len()` becomes [`chunk_len`](Self::chunk_len).
    pub fn read_chunk(&self, index: u64, out: &mut Vec<u8>) -> Result<()> {
        let len = self.chunk_len(index)?;
        match self.chunk_id(index)? {
            None => {
                out.clear();
                out.resize(len, 0);
                Ok(())
            }
            Some(id) => self.read_chunk_id(index, &id, len, out),
        }
    }

    pub(crate) fn read_chunk_id(
        &self,
        index: u64,
        id: &ChunkId,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let offset = index * self.chunk_size() as u64;
        let snap = self.manifest.info.reference();
        let ctx =
            || format!("Failed to read chunk {index} (image offset {offset}) of snapshot {snap}");
        self.store
            .read_chunk(id, out)
            .map_err(|e| e.context(ctx()).with_snapshot(snap.clone()))?;
        if out.len() != len {
            return Err(Error::corrupt(format!(
                "Chunk {id} has {} bytes, snapshot {snap} expects {len} at chunk {index}",
                out.len()
            ))
            .with_chunk(*id)
            .with_snapshot(snap.clone()));
        }
        Ok(())
    }

    /// Fill `buf` with the image bytes at `offset` (uncached: each call reads
    /// and verifies the chunks it touches).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.image_size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Read of {} bytes at {offset} is beyond the image size {}",
                    buf.len(),
                    self.image_size()
                ))
            })?;
        let cs = self.chunk_size() as u64;
        let mut chunk = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - within as u64).min(end - pos)) as usize;
            let dst = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            match self.chunk_id(index)? {
                None => dst.fill(0),
                Some(id) => {
                    self.read_chunk_id(index, &id, self.chunk_len(index)?, &mut chunk)?;
                    dst.copy_from_slice(&chunk[within..within + n]);
                }
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Re-hash the whole manifest against its trailer checksum.
    pub fn verify_manifest(&self) -> Result<()> {
        verify_trailer(self.obj.as_ref(), &self.manifest, &self.key)
    }
}
