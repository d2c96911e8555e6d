//! [`SnapshotReader`]: random access to a snapshot's image.
//!
//! Opening takes a shared `flock` on the manifest and then checks that the
//! manifest is still at its live path (not renamed away by `forget` in
//! between). gc never deletes a manifest, nor the chunks it names, while such
//! a lock is held, so everything a reader can reach stays readable for the
//! reader's lifetime.
//!
//! A delta manifest (see [`super::delta`]) is loaded whole at open, and its
//! base full manifest is opened (live or forgotten) the same way: a chunk is
//! one binary search in the delta, else one `pread` of the base.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::backend::Object;
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::repo::Store;
use crate::snapshot::delta::Delta;
use crate::snapshot::manifest::{decode_entry, read_header, verify_trailer, Manifest, ENTRY_LEN};
use crate::snapshot::{Listed, SnapshotInfo};

/// A local manifest under the reader's shared `flock`, unlocked explicitly
/// when the last user drops it: closing alone would leave the lock held
/// while a child another thread is spawning still has a copy of the
/// descriptor (until its exec), and gc would keep the manifest once more.
#[derive(Debug)]
struct LockedManifest(File);

impl Object for LockedManifest {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Object::read_at(&self.0, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Object::len(&self.0)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.0)
    }
}

impl Drop for LockedManifest {
    fn drop(&mut self) {
        if let Err(e) = self.0.unlock() {
            tracing::warn!("failed to unlock a snapshot manifest: {e}");
        }
    }
}

/// Reads one snapshot. `Send + Sync`; holds the shared lock until dropped.
#[derive(Debug)]
pub struct SnapshotReader {
    store: Store,
    key: String,
    obj: Arc<dyn Object>,
    manifest: Manifest,
    /// A delta manifest's entries and its base's reader.
    delta: Option<Box<(Delta, SnapshotReader)>>,
    /// On a remote store, the registration that keeps gc away.
    _reader: Option<crate::lock::ReaderLease>,
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
        let mut reader = None;
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
                // Encrypted store: the file holds a sealed manifest.
                store
                    .unseal(&key, Arc::new(LockedManifest(file)))
                    .ctx(|| format!("Failed to open snapshot manifest {key}"))?
            }
            None => {
                // Remote store: register before opening, as the shared
                // flock is taken before the path check above.
                reader = store.register_reader(&reference)?;
                store
                    .backend()
                    .open(&key)
                    .ctx(|| format!("Failed to open snapshot manifest {key}"))?
            }
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
        let delta = match manifest.base() {
            None => None,
            Some(base) => {
                let d = Delta::load(obj.as_ref(), &manifest, &key)?;
                let b = Self::open_base(store, &manifest.info, base)?;
                Some(Box::new((d, b)))
            }
        };
        Ok(SnapshotReader {
            store: store.clone(),
            key,
            obj,
            manifest,
            delta,
            _reader: reader,
        })
    }

    /// Open the base full manifest of the delta `info`, live or forgotten.
    fn open_base(store: &Store, info: &SnapshotInfo, base: &str) -> Result<SnapshotReader> {
        let broken = |why: &str| {
            Error::corrupt(format!(
                "Broken chain: snapshot {} is a delta on base snapshot {}@{base}, which {why}",
                info.reference(),
                info.name
            ))
            .with_snapshot(info.reference())
        };
        // forget renames live -> forgotten and unforget back: try both ways.
        let mut last = None;
        for forgotten in [false, true, false] {
            let l = Listed {
                name: info.name.clone(),
                id: base.to_owned(),
                forgotten,
            };
            match SnapshotReader::open(store, &l) {
                Ok(r) => {
                    if r.delta.is_some() {
                        return Err(broken("is itself a delta"));
                    }
                    if r.chunk_count() != info.chunk_count || r.image_size() != info.image_size {
                        return Err(broken("has another image size"));
                    }
                    return Ok(r);
                }
                Err(e) if e.kind() == crate::ErrorKind::NotFound => last = Some(e),
                Err(e) => {
                    return Err(broken("cannot be read").with_source(e));
                }
            }
        }
        Err(match last {
            Some(e) => broken("is missing").with_source(e),
            None => broken("is missing"),
        })
    }

    /// Id of the base full manifest when this snapshot is a delta.
    pub fn base(&self) -> Option<&str> {
        self.manifest.base()
    }

    /// The reader of the full manifest under this one: its base when this
    /// is a delta, else itself.
    pub fn base_reader(&self) -> &SnapshotReader {
        match &self.delta {
            Some(d) => &d.1,
            None => self,
        }
    }

    /// Raw 32-byte entries `first..` of a full manifest into `buf`.
    pub(crate) fn raw_entries(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(self.delta.is_none());
        self.obj
            .read_at(buf, self.manifest.entries_offset + first * ENTRY_LEN as u64)
            .ctx(|| format!("Failed to read snapshot manifest {}", self.key))
    }

    /// Number of entries of a delta manifest (`None`: a full manifest).
    pub fn delta_len(&self) -> Option<usize> {
        self.delta.as_ref().map(|d| d.0.len())
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
        if let Some(d) = &self.delta {
            return match d.0.lookup(index) {
                Some(e) => Ok(e),
                None => d.1.chunk_id(index),
            };
        }
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
        if let Some(d) = &self.delta {
            d.1.chunk_ids(first, n, out)?;
            d.0.overlay(first, out);
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
    /// A delta also re-checks its base.
    pub fn verify_manifest(&self) -> Result<()> {
        verify_trailer(self.obj.as_ref(), &self.manifest, &self.key)?;
        match &self.delta {
            Some(d) => d.1.verify_manifest().map_err(|e| {
                e.context(format!(
                    "Base snapshot {}@{} of delta {} is damaged",
                    self.manifest.info.name,
                    d.1.info().id,
                    self.manifest.info.reference()
                ))
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::backup::tests::{image, setup};
    use crate::gc::GcOptions;

    #[test]
    fn a_copy_of_the_manifest_descriptor_does_not_keep_it_from_gc() {
        let (dir, store) = setup(4096);
        let a = dir.path().join("a.img");
        std::fs::write(&a, image(14, 256 << 10)).unwrap();
        store.backup("a", &a, &Default::default()).unwrap();
        let reader = store.open_snapshot("a").unwrap();
        // What a child being spawned holds between its fork and its exec.
        let copy = reader.obj.file().unwrap().try_clone().unwrap();
        store.forget("a").unwrap();
        drop(reader);
        let s = store.gc(&GcOptions::default()).unwrap();
        drop(copy);
        assert_eq!((s.manifests_in_use, s.manifests_deleted), (0, 1), "{s:?}");
    }
}
