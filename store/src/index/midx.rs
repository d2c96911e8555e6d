//! The merged index (`index/merged-<generation>.midx`): every chunk of every
//! merged pack, sorted by id, looked up with a few `pread`s and never loaded
//! whole.
//!
//! Layout:
//! ```text
//! header  72 B  magic, version, fanout bits (16), generation, pack count,
//!               entry count, blake3(header with this field zeroed ‖ pack
//!               table ‖ fanout)
//! packs   16 B × pack count          pack ids; entries refer to them by number
//! fanout  8 B × 65536                 cumulative entry count per 16-bit id prefix
//! entries 48 B × entry count          id, pack number, stored_len, offset
//! trailer 32 B                        blake3 of the entries region
//! ```
//! Open reads the header, pack table and fanout (≈ 0.5 MiB + 16 B per pack):
//! bounded no matter how many chunks. A lookup reads two fanout bounds from
//! memory, binary-searches the bucket with single-entry `pread`s until at most
//! 64 entries remain, then reads those in one `pread`. With 10^8 entries a
//! bucket holds ~1500 entries: about 6 reads of page-cache-hot data.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::backend::{Backend, Object};
use crate::error::{Error, IoContext, Result};
use crate::format::{
    arr32_at, check_magic_version, u32_at, u64_at, FormatError, INDEX_FLAG_PATCH, MIDX_ENTRY_LEN,
    MIDX_FANOUT_BITS, MIDX_HEADER_LEN, MIDX_MAGIC, MIDX_VERSION, TRAILER_LEN,
};
use crate::id::{ChunkId, PackId};

const FANOUT: usize = 1 << MIDX_FANOUT_BITS;
const SCAN_WINDOW: u64 = 64;

/// One merged index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MidxEntry {
    pub id: ChunkId,
    /// Number of the pack in the pack table.
    pub pack: u32,
    pub stored_len: u32,
    pub offset: u64,
    /// The record is a patch ([`INDEX_FLAG_PATCH`] in `stored_len` on disk).
    pub patch: bool,
}

impl MidxEntry {
    fn decode(b: &[u8]) -> MidxEntry {
        MidxEntry {
            id: ChunkId(arr32_at(b, 0)),
            pack: u32_at(b, 32),
            stored_len: u32_at(b, 36) & !INDEX_FLAG_PATCH,
            offset: u64_at(b, 40),
            patch: u32_at(b, 36) & INDEX_FLAG_PATCH != 0,
        }
    }

    fn encode(&self) -> [u8; MIDX_ENTRY_LEN] {
        let mut b = [0u8; MIDX_ENTRY_LEN];
        b[..32].copy_from_slice(&self.id.0);
        b[32..36].copy_from_slice(&self.pack.to_le_bytes());
        let flag = if self.patch { INDEX_FLAG_PATCH } else { 0 };
        b[36..40].copy_from_slice(&(self.stored_len | flag).to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b
    }
}

fn bucket(id: &ChunkId) -> usize {
    ((id.0[0] as usize) << 8) | id.0[1] as usize
}

/// The key of merged index generation `generation`.
pub fn midx_key(generation: u64) -> String {
    format!("index/merged-{generation:016}.midx")
}

/// Parses `merged-<generation>.midx`.
pub fn parse_midx_name(name: &str) -> Option<u64> {
    name.strip_prefix("merged-")?
        .strip_suffix(".midx")?
        .parse()
        .ok()
}

/// An open merged index.
#[derive(Debug)]
pub struct Midx {
    obj: Arc<dyn Object>,
    key: String,
    generation: u64,
    packs: Vec<PackId>,
    fanout: Vec<u64>,
    entries_offset: u64,
    entry_count: u64,
}

fn corrupt(key: &str, e: FormatError) -> Error {
    Error::corrupt(format!("Merged index {key} is damaged")).with_source(e)
}

impl Midx {
    /// Open and validate the header, pack table and fanout of `key`.
    pub fn open(backend: &dyn Backend, key: &str) -> Result<Midx> {
        let obj = backend
            .open(key)
            .ctx(|| format!("Failed to open merged index {key}"))?;
        let read = |buf: &mut [u8], off: u64| {
            obj.read_at(buf, off)
                .ctx(|| format!("Failed to read merged index {key}"))
        };
        let mut header = [0u8; MIDX_HEADER_LEN];
        read(&mut header, 0)?;
        check_magic_version(&header, &MIDX_MAGIC, MIDX_VERSION, "merged index")
            .map_err(|e| corrupt(key, e))?;
        let invalid = |detail: String| {
            corrupt(
                key,
                FormatError::Invalid {
                    what: "merged index",
                    detail,
                },
            )
        };
        if u32_at(&header, 12) != MIDX_FANOUT_BITS {
            return Err(invalid(format!("fanout bits {}", u32_at(&header, 12))));
        }
        let generation = u64_at(&header, 16);
        let pack_count = u64_at(&header, 24);
        let entry_count = u64_at(&header, 32);
        let stored_hash = arr32_at(&header, 40);
        if pack_count > u32::MAX as u64 || entry_count > u64::MAX / 64 {
            return Err(invalid(format!(
                "{pack_count} packs, {entry_count} entries"
            )));
        }
        let entries_offset = MIDX_HEADER_LEN as u64 + pack_count * 16 + FANOUT as u64 * 8;
        let expected_len =
            entries_offset + entry_count * MIDX_ENTRY_LEN as u64 + TRAILER_LEN as u64;
        let len = obj
            .len()
            .ctx(|| format!("Failed to read merged index {key}"))?;
        if len != expected_len {
            return Err(invalid(format!("length {len}, expected {expected_len}")));
        }
        let mut meta = vec![0u8; (entries_offset - MIDX_HEADER_LEN as u64) as usize];
        read(&mut meta, MIDX_HEADER_LEN as u64)?;
        let mut hasher = blake3::Hasher::new();
        header[40..72].fill(0);
        hasher.update(&header);
        hasher.update(&meta);
        if hasher.finalize().as_bytes() != &stored_hash {
            return Err(corrupt(
                key,
                FormatError::BadChecksum {
                    what: "merged index header",
                },
            ));
        }
        let packs: Vec<PackId> = meta[..pack_count as usize * 16]
            .chunks_exact(16)
            .map(|c| {
                let mut p = [0u8; 16];
                p.copy_from_slice(c);
                PackId(p)
            })
            .collect();
        let fanout: Vec<u64> = meta[pack_count as usize * 16..]
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect();
        if fanout.windows(2).any(|w| w[0] > w[1]) || fanout[FANOUT - 1] != entry_count {
            return Err(invalid("fanout table not monotonic".into()));
        }
        Ok(Midx {
            obj,
            key: key.to_string(),
            generation,
            packs,
            fanout,
            entries_offset,
            entry_count,
        })
    }

    /// Generation number.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Backend key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The pack table.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.entry_count
    }

    /// True when the index has no entries.
    pub fn is_empty(&self) -> bool {
        self.entry_count == 0
    }

    fn read_entries(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        self.obj
            .read_at(buf, self.entries_offset + first * MIDX_ENTRY_LEN as u64)
            .ctx(|| format!("Failed to read merged index {}", self.key))
    }

    /// Resolve a pack number to its id.
    pub fn pack(&self, n: u32) -> Result<PackId> {
        self.packs.get(n as usize).copied().ok_or_else(|| {
            Error::corrupt(format!(
                "Merged index {} refers to pack number {n} of {}",
                self.key,
                self.packs.len()
            ))
        })
    }

    /// Find `id`.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<MidxEntry>> {
        let b = bucket(id);
        let mut lo = if b == 0 { 0 } else { self.fanout[b - 1] };
        let mut hi = self.fanout[b];
        let mut one = [0u8; MIDX_ENTRY_LEN];
        while hi - lo > SCAN_WINDOW {
            let mid = lo + (hi - lo) / 2;
            self.read_entries(mid, &mut one)?;
            match arr32_at(&one, 0).cmp(&id.0) {
                std::cmp::Ordering::Equal => return Ok(Some(MidxEntry::decode(&one))),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        if hi == lo {
            return Ok(None);
        }
        let mut window = [0u8; SCAN_WINDOW as usize * MIDX_ENTRY_LEN];
        let window = &mut window[..(hi - lo) as usize * MIDX_ENTRY_LEN];
        self.read_entries(lo, window)?;
        let (mut a, mut z) = (0usize, (hi - lo) as usize);
        while a < z {
            let m = a + (z - a) / 2;
            let e = &window[m * MIDX_ENTRY_LEN..(m + 1) * MIDX_ENTRY_LEN];
            match e[..32].cmp(&id.0[..]) {
                std::cmp::Ordering::Equal => return Ok(Some(MidxEntry::decode(e))),
                std::cmp::Ordering::Less => a = m + 1,
                std::cmp::Ordering::Greater => z = m,
            }
        }
        Ok(None)
    }

    /// Iterate all entries in id order, reading in large blocks.
    pub fn iter(&self) -> MidxIter<'_> {
        MidxIter {
            midx: self,
            next: 0,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Re-hash the entries region and compare with the trailer.
    pub fn verify_checksum(&self) -> Result<()> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 4096 * MIDX_ENTRY_LEN];
        let mut at = 0u64;
        while at < self.entry_count {
            let n = (self.entry_count - at).min(4096);
            let b = &mut buf[..n as usize * MIDX_ENTRY_LEN];
            self.read_entries(at, b)?;
            hasher.update(b);
            at += n;
        }
        let mut trailer = [0u8; TRAILER_LEN];
        self.read_entries(self.entry_count, &mut trailer)?;
        if hasher.finalize().as_bytes() != &trailer {
            return Err(corrupt(
                &self.key,
                FormatError::BadChecksum {
                    what: "merged index entries",
                },
            ));
        }
        Ok(())
    }
}

/// Sequential iterator over a merged index.
pub struct MidxIter<'a> {
    midx: &'a Midx,
    next: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Iterator for MidxIter<'_> {
    type Item = Result<MidxEntry>;

    fn next(&mut self) -> Option<Result<MidxEntry>> {
        if self.pos >= self.buf.len() {
            if self.next >= self.midx.entry_count {
                return None;
            }
            let n = (self.midx.entry_count - self.next).min(4096);
            self.buf.resize(n as usize * MIDX_ENTRY_LEN, 0);
            if let Err(e) = self.midx.read_entries(self.next, &mut self.buf) {
                self.next = self.midx.entry_count;
                self.buf.clear();
                return Some(Err(e));
            }
            self.next += n;
            self.pos = 0;
        }
        let e = MidxEntry::decode(&self.buf[self.pos..self.pos + MIDX_ENTRY_LEN]);
        self.pos += MIDX_ENTRY_LEN;
        Some(Ok(e))
    }
}

/// Write merged index generation `generation` with pack table `packs` from
/// `entries`, which must be strictly sorted by id. Publishes it atomically.
pub fn write_midx(
    backend: &dyn Backend,
    generation: u64,
    packs: &[PackId],
    entries: impl Iterator<Item = Result<MidxEntry>>,
) -> Result<u64> {
    let key = midx_key(generation);
    let action = || format!("Failed to write merged index {key}");
    let tmp = backend.create_temp().ctx(action)?;
    let meta_len = packs.len() * 16 + FANOUT * 8;
    let entries_offset = (MIDX_HEADER_LEN + meta_len) as u64;
    let mut fanout = vec![0u64; FANOUT];
    let mut hasher = blake3::Hasher::new();
    let mut count = 0u64;
    {
        let file = tmp.file();
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&vec![0u8; entries_offset as usize])
            .ctx(action)?;
        let mut last: Option<ChunkId> = None;
        for e in entries {
            let e = e?;
            if last.is_some_and(|l| l >= e.id) {
                return Err(Error::new(
                    crate::ErrorKind::Corrupt,
                    format!("Merged index entries out of order at {}", e.id),
                ));
            }
            if e.pack as usize >= packs.len() {
                return Err(Error::corrupt(format!(
                    "Pack number {} out of range",
                    e.pack
                )));
            }
            last = Some(e.id);
            fanout[bucket(&e.id)] += 1;
            let b = e.encode();
            hasher.update(&b);
            w.write_all(&b).ctx(action)?;
            count += 1;
        }
        w.write_all(hasher.finalize().as_bytes()).ctx(action)?;
        w.flush().ctx(action)?;
    }
    for i in 1..FANOUT {
        fanout[i] += fanout[i - 1];
    }
    let mut meta = Vec::with_capacity(meta_len);
    for p in packs {
        meta.extend_from_slice(&p.0);
    }
    for f in &fanout {
        meta.extend_from_slice(&f.to_le_bytes());
    }
    let mut header = [0u8; MIDX_HEADER_LEN];
    header[..8].copy_from_slice(&MIDX_MAGIC);
    header[8..12].copy_from_slice(&MIDX_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&MIDX_FANOUT_BITS.to_le_bytes());
    header[16..24].copy_from_slice(&generation.to_le_bytes());
    header[24..32].copy_from_slice(&(packs.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&count.to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header);
    hasher.update(&meta);
    header[40..72].copy_from_slice(hasher.finalize().as_bytes());
    let file = tmp.file();
    file.write_all_at(&header, 0).ctx(action)?;
    file.write_all_at(&meta, MIDX_HEADER_LEN as u64)
        .ctx(action)?;
    backend.publish(tmp, &key).ctx(action)?;
    Ok(count)
}

/// Build a pack-table mapping for merging: returns the table and a map from
/// pack id to its new number.
pub fn pack_table(packs: impl IntoIterator<Item = PackId>) -> (Vec<PackId>, HashMap<PackId, u32>) {
    let mut table: Vec<PackId> = packs.into_iter().collect();
    table.sort_unstable();
    table.dedup();
    let map = table
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i as u32))
        .collect();
    (table, map)
}

/// Helper for tests and benches: an `io::Error` as an entry result.
pub fn io_entry(e: io::Error) -> Result<MidxEntry> {
    Err(Error::io("Failed to produce index entry", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn write_open_lookup_iterate() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let packs = vec![PackId([1; 16]), PackId([2; 16])];
        let mut entries: Vec<MidxEntry> = (0..20_000u32)
            .map(|i| MidxEntry {
                id: ChunkId::of(&i.to_le_bytes()),
                pack: i % 2,
                stored_len: i,
                patch: i % 3 == 0,
                offset: i as u64 * 3,
            })
            .collect();
        entries.sort_by_key(|a| a.id);
        let n = write_midx(&b, 7, &packs, entries.iter().copied().map(Ok)).unwrap();
        assert_eq!(n, 20_000);
        let m = Midx::open(&b, &midx_key(7)).unwrap();
        assert_eq!(m.generation(), 7);
        assert_eq!(m.packs(), &packs[..]);
        assert_eq!(m.len(), 20_000);
        for e in entries.iter().step_by(37) {
            assert_eq!(m.lookup(&e.id).unwrap(), Some(*e));
        }
        for i in 20_000..21_000u32 {
            assert_eq!(m.lookup(&ChunkId::of(&i.to_le_bytes())).unwrap(), None);
        }
        let all: Vec<MidxEntry> = m.iter().map(|e| e.unwrap()).collect();
        assert_eq!(all, entries);
        m.verify_checksum().unwrap();
    }

    #[test]
    fn big_bucket_lookup_uses_binary_search() {
        // All ids in one fanout bucket to exercise the pread binary search.
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let entries: Vec<MidxEntry> = (0..5000u32)
            .map(|i| {
                let mut id = [0xabu8; 32];
                id[2..6].copy_from_slice(&i.to_be_bytes());
                MidxEntry {
                    id: ChunkId(id),
                    pack: 0,
                    stored_len: 1,
                    offset: i as u64,
                    patch: false,
                }
            })
            .collect();
        write_midx(&b, 1, &[PackId([9; 16])], entries.iter().copied().map(Ok)).unwrap();
        let m = Midx::open(&b, &midx_key(1)).unwrap();
        for e in &entries {
            assert_eq!(m.lookup(&e.id).unwrap(), Some(*e));
        }
        let mut missing = entries[100].id;
        missing.0[31] = 0;
        assert_eq!(m.lookup(&missing).unwrap(), None);
    }

    #[test]
    fn damaged_header_and_unsorted_input_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let e = |i: u8| MidxEntry {
            id: ChunkId([i; 32]),
            pack: 0,
            stored_len: 1,
            offset: 0,
            patch: false,
        };
        let err =
            write_midx(&b, 1, &[PackId([0; 16])], [e(2), e(1)].into_iter().map(Ok)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        write_midx(&b, 2, &[PackId([0; 16])], [e(1), e(2)].into_iter().map(Ok)).unwrap();
        let path = dir.path().join(midx_key(2));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[MIDX_HEADER_LEN + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            Midx::open(&b, &midx_key(2)).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        assert_eq!(parse_midx_name("merged-0000000000000012.midx"), Some(12));
        assert_eq!(parse_midx_name("x.idx"), None);
    }
}
