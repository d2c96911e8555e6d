//! Pack files (`packs/<2 hex>/<pack>.pack`): immutable concatenations of
//! self-describing chunk records.
//!
//! Layout: a 16-byte header (magic, version), then records, each a 48-byte
//! [`RecordHeader`] (chunk id, raw length,
//! stored length, flags, header check) followed by the stored data. Because
//! records describe themselves, an index can be rebuilt from the packs alone.
//!
//! [`PackWriter`] fills a reusable in-memory buffer up to the target size
//! (~32 MiB), then publishes the pack (temp file, fsync, rename, fsync dir)
//! and only then its per-pack index: an index never names a pack that is not
//! durable. On a local store the pack's whole 4 KiB blocks are written with
//! `O_DIRECT` from the (aligned) buffer and only the tail through the page
//! cache: the fsync writes the pack to disk anyway, and the copy into the
//! page cache was a tenth of a backup's CPU. The direct part goes in
//! pieces of `DIRECT_PIECE` (1 MiB), one system call each, so no single
//! call holds a CPU for long. A file system that refuses `O_DIRECT` gets
//! an ordinary write.
//!
//! A writer's buffer outlives it: up to [`SPARE_BUFFERS`] buffers are kept
//! for the next writers of the process, so repeated backups in one process
//! (the daemon's protection points, every few seconds) fill memory that is
//! already mapped instead of faulting in tens of MiB of fresh pages per
//! point (about 7 % of a point's CPU at 20 MB/s of random guest writes).
//! They hold at most `SPARE_BUFFERS` × (target + 4 MiB) of memory.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Mutex;

use tracing::debug;

use crate::backend::Backend;
use crate::error::{Error, IoContext, Result};
use crate::format::{
    check_pack_header, pack_header, u32_at, FormatError, RecordHeader, PACK_HEADER_LEN,
    RECORD_FLAG_PATCH, RECORD_HEADER_LEN,
};
use crate::id::{ChunkId, PackId};
use crate::index::idx::{self, IdxEntry};

/// Default target size of a pack.
pub const PACK_TARGET_SIZE: usize = 32 << 20;

/// Alignment (and granularity) of `O_DIRECT` pack writes.
const WRITE_ALIGN: usize = 4096;

/// Largest `O_DIRECT` write of a pack in one system call. The kernel pins
/// a write's pages and submits its bios without a preemption point on a
/// non-preemptible kernel (about a millisecond of CPU for a whole 32 MiB
/// pack here), and a thread woken onto that CPU meanwhile (a guest's
/// request thread, while a protection point is written) waits for all of
/// it. A piece is a few tens of microseconds.
const DIRECT_PIECE: usize = 1 << 20;

/// Buffers of dropped writers kept for the next ones (see the module doc).
pub const SPARE_BUFFERS: usize = 2;

/// Kept buffers, at most [`SPARE_BUFFERS`].
struct Spares(Mutex<Vec<Vec<u8>>>);

static SPARES: Spares = Spares(Mutex::new(Vec::new()));

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept buffer of at least `capacity` bytes (not more than twice
    /// that: a small pack does not pin a large buffer), emptied, or a new
    /// one.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut spare = self.lock();
        let fits = |b: &Vec<u8>| (capacity..=capacity.saturating_mul(2)).contains(&b.capacity());
        match spare.iter().position(fits) {
            Some(i) => {
                let mut b = spare.swap_remove(i);
                b.clear();
                b
            }
            None => Vec::with_capacity(capacity),
        }
    }

    /// Keeps `buf` for a later writer, if there is room.
    fn keep(&self, buf: Vec<u8>) {
        let mut spare = self.lock();
        if spare.len() < SPARE_BUFFERS && buf.capacity() > 0 {
            spare.push(buf);
        }
    }
}

/// Accumulates records and publishes packs with their index.
#[derive(Debug)]
pub struct PackWriter {
    /// `at` padding bytes, then the pack; `buf[at..]` is aligned to
    /// [`WRITE_ALIGN`] (when the allocator allows) for `O_DIRECT` writes.
    buf: Vec<u8>,
    at: usize,
    entries: Vec<IdxEntry>,
    target: usize,
}

/// A pack that has been published.
#[derive(Debug)]
pub struct PublishedPack {
    pub id: PackId,
    pub entries: Vec<IdxEntry>,
    /// Pack file size in bytes.
    pub size: u64,
}

impl PackWriter {
    /// A writer that publishes once a pack reaches `target` bytes.
    pub fn new(target: usize) -> PackWriter {
        let mut buf = SPARES.take(target + (4 << 20) + 2 * WRITE_ALIGN);
        // The capacity is never exceeded in normal use (records are at most
        // a few MiB past the target), so the buffer stays where it is.
        let at = buf.as_ptr().align_offset(WRITE_ALIGN).min(WRITE_ALIGN);
        buf.resize(at, 0);
        buf.extend_from_slice(&pack_header());
        PackWriter {
            buf,
            at,
            entries: Vec::new(),
            target,
        }
    }

    /// The pack's bytes so far.
    fn pack(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// Append one encoded record (header + data, as made by
    /// [`encode_record`](crate::chunk::encode_record)). The index entry is
    /// marked as a patch when the record's flags say so.
    pub fn add(&mut self, id: ChunkId, raw_len: u32, record: &[u8]) {
        let flags = u32_at(record, 40);
        self.entries.push(IdxEntry {
            id,
            offset: self.pack().len() as u64,
            stored_len: (record.len() - RECORD_HEADER_LEN) as u32,
            raw_len,
            patch: flags & RECORD_FLAG_PATCH != 0,
        });
        self.buf.extend_from_slice(record);
    }

    /// True once the pack reached its target size.
    pub fn is_full(&self) -> bool {
        self.pack().len() >= self.target
    }

    /// True when no record was added since the last publish.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Publish the pack, then its index; resets the writer. Returns `None`
    /// when there was nothing to publish.
    pub fn publish(&mut self, backend: &dyn Backend) -> Result<Option<PublishedPack>> {
        if self.entries.is_empty() {
            return Ok(None);
        }
        let id = PackId::random();
        let key = id.pack_key();
        put_pack(backend, &key, self.pack()).ctx(|| format!("Failed to write pack {key}"))?;
        let mut entries = std::mem::take(&mut self.entries);
        let idx_bytes = idx::encode(&id, &mut entries);
        let idx_key = id.idx_key();
        if let Err(e) = backend.put(&idx_key, &idx_bytes) {
            // Without its index the pack is unreachable: give the space back.
            let _ = backend.delete(&key);
            return Err(Error::io(
                format!("Failed to write pack index {idx_key}"),
                e,
            ));
        }
        let size = self.pack().len() as u64;
        debug!(pack = %id, size, chunks = entries.len(), "published pack");
        self.buf.truncate(self.at + PACK_HEADER_LEN);
        Ok(Some(PublishedPack { id, entries, size }))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        SPARES.keep(std::mem::take(&mut self.buf));
    }
}

/// Write a pack as object `key`: on a local store its aligned part with
/// `O_DIRECT` (see the module docs), else [`Backend::put`].
fn put_pack(backend: &dyn Backend, key: &str, pack: &[u8]) -> io::Result<()> {
    let aligned = pack.len() / WRITE_ALIGN * WRITE_ALIGN;
    if backend.is_remote() || aligned == 0 || !(pack.as_ptr() as usize).is_multiple_of(WRITE_ALIGN)
    {
        return backend.put(key, pack);
    }
    let mut tmp = backend.create_temp()?;
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(tmp.path())
        .and_then(|d| {
            for (k, piece) in pack[..aligned].chunks(DIRECT_PIECE).enumerate() {
                d.write_all_at(piece, (k * DIRECT_PIECE) as u64)?;
            }
            Ok(())
        });
    match direct {
        Ok(()) => tmp.file().write_all_at(&pack[aligned..], aligned as u64)?,
        Err(e) => {
            debug!(key, "O_DIRECT pack write refused ({e}), writing buffered");
            tmp.file().set_len(0)?;
            tmp.file_mut().write_all(pack)?;
        }
    }
    backend.publish(tmp, key)
}

/// One record found by [`scan`].
#[derive(Debug)]
pub struct ScannedRecord<'a> {
    pub offset: u64,
    pub header: RecordHeader,
    /// Header and data.
    pub record: &'a [u8],
}

/// Walk the records of a whole pack held in memory. Stops with an error at
/// the first damaged header (later records cannot be located).
pub fn scan(pack: &[u8]) -> impl Iterator<Item = Result<ScannedRecord<'_>, FormatError>> + '_ {
    let mut at = PACK_HEADER_LEN;
    let mut failed = check_pack_header(pack).err();
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            at = pack.len();
            return Some(Err(e));
        }
        if at >= pack.len() {
            return None;
        }
        let header = match RecordHeader::decode(&pack[at..]) {
            Ok(h) => h,
            Err(e) => {
                at = pack.len();
                return Some(Err(e));
            }
        };
        let end = at + RECORD_HEADER_LEN + header.stored_len as usize;
        if end > pack.len() {
            at = pack.len();
            return Some(Err(FormatError::Invalid {
                what: "pack",
                detail: "truncated record".into(),
            }));
        }
        let rec = ScannedRecord {
            offset: at as u64,
            header,
            record: &pack[at..end],
        };
        at = end;
        Some(Ok(rec))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use crate::chunk::{decode_record, encode_record};

    #[test]
    fn buffers_are_kept_for_later_writers_within_bounds() {
        let spares = Spares(Mutex::new(Vec::new()));
        let a = spares.take(1 << 20);
        let (ptr, cap) = (a.as_ptr(), a.capacity());
        spares.keep(a);
        // Reused as it is for the same size, emptied.
        let mut b = spares.take(1 << 20);
        assert_eq!((b.as_ptr(), b.capacity(), b.len()), (ptr, cap, 0));
        b.extend_from_slice(&[1, 2, 3]);
        spares.keep(b);
        // Not for a writer that needs more, nor for one that needs less
        // than half of it: those get new buffers, and it stays kept.
        let (more, less) = (spares.take(2 << 20), spares.take(256 << 10));
        assert!(more.as_ptr() != ptr && less.as_ptr() != ptr);
        assert_eq!(spares.lock().len(), 1);
        assert!(spares.take(1 << 20).is_empty());
        // At most SPARE_BUFFERS kept.
        for _ in 0..SPARE_BUFFERS + 3 {
            spares.keep(Vec::with_capacity(4096));
        }
        assert_eq!(spares.lock().len(), SPARE_BUFFERS);
    }

    #[test]
    fn publish_then_scan_and_index_agree() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let mut w = PackWriter::new(1 << 20);
        assert!(w.publish(&b).unwrap().is_none());
        let mut rec = Vec::new();
        let mut ids = Vec::new();
        for i in 0..50u32 {
            let data = vec![i as u8; 4096 + i as usize];
            let id = ChunkId::of(&data);
            rec.clear();
            encode_record(&id, &data, &mut rec);
            w.add(id, data.len() as u32, &rec);
            ids.push((id, data));
        }
        let p = w.publish(&b).unwrap().unwrap();
        assert!(w.is_empty());
        let bytes = b.read(&p.id.pack_key()).unwrap();
        assert_eq!(bytes.len() as u64, p.size);
        let (pid, entries) = idx::decode(&b.read(&p.id.idx_key()).unwrap()).unwrap();
        assert_eq!(pid, p.id);
        assert_eq!(entries.len(), 50);
        let scanned: Vec<_> = scan(&bytes).map(|r| r.unwrap()).collect();
        assert_eq!(scanned.len(), 50);
        let mut out = Vec::new();
        for e in &entries {
            let s = scanned.iter().find(|s| s.offset == e.offset).unwrap();
            decode_record(s.record, &e.id, e.stored_len, &mut out).unwrap();
            let (_, data) = ids.iter().find(|(id, _)| *id == e.id).unwrap();
            assert_eq!(&out, data);
        }
        // A damaged header stops the scan with an error.
        let mut bad = bytes.clone();
        bad[PACK_HEADER_LEN + 40] ^= 0xff;
        assert!(scan(&bad).next().unwrap().is_err());
    }

    #[test]
    fn a_pack_of_several_direct_pieces_and_a_tail_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let mut w = PackWriter::new(4 << 20);
        let mut rec = Vec::new();
        // Incompressible records, so the pack spans several pieces and
        // ends in a partial block.
        let mut data = vec![0u8; 5000];
        for i in 0..600u32 {
            let mut h = blake3::Hasher::new();
            h.update(&i.to_le_bytes());
            h.finalize_xof().fill(&mut data);
            let id = ChunkId::of(&data);
            rec.clear();
            encode_record(&id, &data, &mut rec);
            w.add(id, data.len() as u32, &rec);
        }
        let want = w.pack().to_vec();
        assert!(want.len() > 2 * DIRECT_PIECE && !want.len().is_multiple_of(WRITE_ALIGN));
        let p = w.publish(&b).unwrap().unwrap();
        assert!(b.read(&p.id.pack_key()).unwrap() == want);
    }
}
