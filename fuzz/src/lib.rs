//! Shared pieces of the fuzz targets: the byte layouts of their inputs (used
//! by both the targets and the `seed` binary that writes the committed
//! corpora), an in-memory store [`Backend`], and "sealing" helpers.
//!
//! Every on-disk format of the store is protected by blake3 checksums, which
//! a byte-flipping fuzzer never gets right. So each store input starts with a
//! flags byte; the targets run the decoders on the input exactly as given and
//! then, for the checks the flags select, on a copy whose checksums were
//! recomputed ("sealed"), so the fuzzer reaches the decoding behind them.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use store::backend::{Backend, Object, TempObject};
use store::format::{
    IDX_ENTRY_LEN, IDX_HEADER_LEN, MANIFEST_HEADER_LEN, MIDX_ENTRY_LEN, MIDX_HEADER_LEN,
    MIDX_MAGIC, MIDX_VERSION, RECORD_HEADER_LEN, TRAILER_LEN,
};

/// Reads fields from the front of a fuzz input; missing bytes read as zero.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

// ---- request_parse ----

/// Layout of a `request_parse` input and of the guest it runs in.
pub mod request {
    /// Flag: write the descriptors into the table as given (their own NEXT
    /// flags and next indexes: loops, bad indexes, indirect tables) instead
    /// of linking them in order.
    pub const FLAG_RAW_TABLE: u8 = 1;
    /// Flag: the device is read-only.
    pub const FLAG_READ_ONLY: u8 = 2;
    /// Flag: advertise a capacity larger than the device really is.
    pub const FLAG_CAPACITY_LIE: u8 = 4;

    /// Queue size of the mock queue (its table and rings sit at address 0).
    pub const QUEUE_SIZE: u16 = 16;
    /// Where the input's payload is copied in guest memory.
    pub const PAYLOAD_ADDR: u64 = 0x1000;
    /// Guest memory: two adjacent regions (buffers may span them), a hole,
    /// and a third region.
    pub const REGIONS: [(u64, usize); 3] =
        [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x8000)];
    /// Size of the block device (128 sectors).
    pub const DEV_SIZE: usize = 64 << 10;
    /// Bytes of one raw split descriptor.
    pub const DESC_LEN: usize = 16;

    /// One descriptor as written to the table.
    #[derive(Clone, Copy, Debug)]
    pub struct Desc {
        pub addr: u64,
        pub len: u32,
        pub flags: u16,
        pub next: u16,
    }

    /// Size limits taken from the input.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct LimitBytes {
        pub seg_max: u8,
        pub max_discard_seg: u8,
        pub max_write_zeroes_seg: u8,
        pub max_request_kib: u8,
        pub max_discard_sectors: u16,
        pub max_write_zeroes_sectors: u16,
    }

    /// Encodes an input: flags, descriptor count, descriptors, limits,
    /// then the payload copied to [`PAYLOAD_ADDR`].
    pub fn encode(flags: u8, descs: &[Desc], limits: LimitBytes, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![flags, descs.len() as u8];
        for d in descs {
            b.extend_from_slice(&d.addr.to_le_bytes());
            b.extend_from_slice(&d.len.to_le_bytes());
            b.extend_from_slice(&d.flags.to_le_bytes());
            b.extend_from_slice(&d.next.to_le_bytes());
        }
        b.extend_from_slice(&[
            limits.seg_max,
            limits.max_discard_seg,
            limits.max_write_zeroes_seg,
            limits.max_request_kib,
        ]);
        b.extend_from_slice(&limits.max_discard_sectors.to_le_bytes());
        b.extend_from_slice(&limits.max_write_zeroes_sectors.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// A decoded input.
    #[derive(Debug)]
    pub struct Input<'a> {
        pub flags: u8,
        pub descs: Vec<Desc>,
        pub limits: LimitBytes,
        pub payload: &'a [u8],
    }

    /// Decodes an input (the inverse of [`encode`]; short inputs read zeros).
    pub fn decode(data: &[u8]) -> Input<'_> {
        let mut c = super::Cursor::new(data);
        let flags = c.u8();
        let n = usize::from(c.u8()) % (usize::from(QUEUE_SIZE) + 1);
        let descs = (0..n)
            .map(|_| Desc {
                addr: c.u64(),
                len: c.u32(),
                flags: c.u16(),
                next: c.u16(),
            })
            .collect();
        let limits = LimitBytes {
            seg_max: c.u8(),
            max_discard_seg: c.u8(),
            max_write_zeroes_seg: c.u8(),
            max_request_kib: c.u8(),
            max_discard_sectors: c.u16(),
            max_write_zeroes_sectors: c.u16(),
        };
        Input {
            flags,
            descs,
            limits,
            payload: c.rest(),
        }
    }
}

// ---- in-memory backend ----

/// An immutable in-memory object.
#[derive(Debug)]
pub struct MemObject(pub Arc<Vec<u8>>);

impl Object for MemObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short object")),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// A read-only [`Backend`] holding objects in memory (what the index
/// loader reads: `list`, `open`, `read`, `size`).
#[derive(Debug, Default)]
pub struct MemBackend {
    objects: BTreeMap<String, Arc<Vec<u8>>>,
}

impl MemBackend {
    /// Adds (or replaces) object `key`.
    pub fn insert(&mut self, key: String, data: Vec<u8>) {
        self.objects.insert(key, Arc::new(data));
    }
}

fn unsupported() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "read-only fuzz backend")
}

impl Backend for MemBackend {
    fn create_temp(&self) -> io::Result<TempObject> {
        Err(unsupported())
    }

    fn publish(&self, _tmp: TempObject, _key: &str) -> io::Result<()> {
        Err(unsupported())
    }

    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>> {
        match self.objects.get(key) {
            Some(o) => Ok(Arc::new(MemObject(o.clone()))),
            None => Err(io::Error::new(io::ErrorKind::NotFound, key.to_string())),
        }
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let prefix = format!("{dir}/");
        Ok(self
            .objects
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }

    fn delete(&self, _key: &str) -> io::Result<()> {
        Err(unsupported())
    }

    fn rename(&self, _from: &str, _to: &str) -> io::Result<()> {
        Err(unsupported())
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        self.open(key)?.len()
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }

    fn clean_temp(&self) -> io::Result<usize> {
        Ok(0)
    }
}

// ---- sealing ----

/// Recomputes a manifest's header hash (over the header with the hash
/// zeroed and the metadata its header claims, clamped to the input) and,
/// when the file is long enough, its trailer.
pub fn seal_manifest(b: &mut [u8]) {
    if b.len() < MANIFEST_HEADER_LEN {
        return;
    }
    let meta_len = u32::from_le_bytes([b[40], b[41], b[42], b[43]]) as usize;
    let meta_end = MANIFEST_HEADER_LEN.saturating_add(meta_len).min(b.len());
    b[48..80].fill(0);
    let mut h = blake3::Hasher::new();
    h.update(&b[..MANIFEST_HEADER_LEN]);
    h.update(&b[MANIFEST_HEADER_LEN..meta_end]);
    let hash = h.finalize();
    b[48..80].copy_from_slice(hash.as_bytes());
    seal_trailer(b, MANIFEST_HEADER_LEN);
}

/// Recomputes the trailer (blake3 of everything before it) of a file that
/// is at least `min` + 32 bytes long.
pub fn seal_trailer(b: &mut [u8], min: usize) {
    if b.len() < min + TRAILER_LEN {
        return;
    }
    let body = b.len() - TRAILER_LEN;
    let hash = blake3::hash(&b[..body]);
    b[body..].copy_from_slice(hash.as_bytes());
}

/// Seals a per-pack index file.
pub fn seal_idx(b: &mut [u8]) {
    seal_trailer(b, IDX_HEADER_LEN);
}

/// Walks the records of a pack and recomputes each header's check word, so
/// the decoder looks at the lengths, flags and data behind it.
pub fn seal_records(pack: &mut [u8]) {
    let mut at = store::format::PACK_HEADER_LEN;
    while at + RECORD_HEADER_LEN <= pack.len() {
        let check = blake3::hash(&pack[at..at + 44]);
        let word: [u8; 4] = check.as_bytes()[..4].try_into().unwrap_or([0; 4]);
        pack[at + 44..at + 48].copy_from_slice(&word);
        let stored =
            u32::from_le_bytes([pack[at + 36], pack[at + 37], pack[at + 38], pack[at + 39]])
                as usize;
        at = match (at + RECORD_HEADER_LEN).checked_add(stored) {
            Some(next) => next,
            None => break,
        };
    }
}

// ---- merged index ----

/// Number of fanout buckets of a merged index.
pub const MIDX_FANOUT: usize = 1 << store::format::MIDX_FANOUT_BITS;

/// A merged index described compactly: the real file is 512 KiB of fanout
/// alone, too big for a fuzz input, so inputs carry this and
/// [`Midx::to_file`] expands it.
#[derive(Debug, Clone, Default)]
pub struct Midx {
    /// Header fields as written (not necessarily consistent).
    pub generation: u64,
    pub fanout_bits: u32,
    /// Claimed entry count; `None` writes the real one.
    pub entry_count: Option<u64>,
    pub packs: Vec<[u8; 16]>,
    /// Raw 48-byte entries, in file order.
    pub entries: Vec<[u8; MIDX_ENTRY_LEN]>,
    /// Fanout overrides `(bucket, value)` applied after computing the real
    /// fanout from the entries.
    pub fanout_patches: Vec<(u16, u64)>,
    /// Recompute the header hash and the trailer.
    pub seal: bool,
}

impl Midx {
    /// Encodes the compact form (read back by [`Midx::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let mut flags = 0u8;
        if self.seal {
            flags |= 1;
        }
        if self.entry_count.is_some() {
            flags |= 2;
        }
        b.push(flags);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.fanout_bits.to_le_bytes());
        b.extend_from_slice(&self.entry_count.unwrap_or(0).to_le_bytes());
        b.push(self.packs.len() as u8);
        b.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        b.push(self.fanout_patches.len() as u8);
        for p in &self.packs {
            b.extend_from_slice(p);
        }
        for e in &self.entries {
            b.extend_from_slice(e);
        }
        for (bucket, value) in &self.fanout_patches {
            b.extend_from_slice(&bucket.to_le_bytes());
            b.extend_from_slice(&value.to_le_bytes());
        }
        b
    }

    /// Decodes the compact form from `c`.
    pub fn decode(c: &mut Cursor<'_>) -> Midx {
        let flags = c.u8();
        let generation = c.u64();
        let fanout_bits = c.u32();
        let claimed = c.u64();
        let packs = usize::from(c.u8());
        let entries = usize::from(c.u16() % 512);
        let patches = usize::from(c.u8() % 16);
        let mut m = Midx {
            generation,
            fanout_bits,
            entry_count: (flags & 2 != 0).then_some(claimed),
            seal: flags & 1 != 0,
            ..Midx::default()
        };
        for _ in 0..packs {
            let mut p = [0u8; 16];
            let b = c.bytes(16);
            p[..b.len()].copy_from_slice(b);
            m.packs.push(p);
        }
        for _ in 0..entries {
            let mut e = [0u8; MIDX_ENTRY_LEN];
            let b = c.bytes(MIDX_ENTRY_LEN);
            e[..b.len()].copy_from_slice(b);
            m.entries.push(e);
        }
        for _ in 0..patches {
            m.fanout_patches.push((c.u16(), c.u64()));
        }
        m
    }

    /// The fanout table's bytes: cumulative entry counts per 16-bit id
    /// prefix, then the patches. Built with a few bulk copies rather than a
    /// 65536-step loop, which under sanitizer-coverage instrumentation
    /// would cost more than the decoder under test.
    pub fn fanout_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; MIDX_FANOUT * 8];
        let mut buckets: Vec<usize> = self
            .entries
            .iter()
            .map(|e| (usize::from(e[0]) << 8) | usize::from(e[1]))
            .collect();
        buckets.sort_unstable();
        let mut count = 0u64;
        let mut i = 0;
        while i < buckets.len() {
            let bucket = buckets[i];
            while i < buckets.len() && buckets[i] == bucket {
                count += 1;
                i += 1;
            }
            let end = buckets.get(i).copied().unwrap_or(MIDX_FANOUT);
            fill_u64(&mut out[bucket * 8..end * 8], count);
        }
        for &(bucket, value) in &self.fanout_patches {
            let at = usize::from(bucket) * 8;
            out[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// The file bytes.
    pub fn to_file(&self) -> Vec<u8> {
        let count = self.entry_count.unwrap_or(self.entries.len() as u64);
        let mut b = Vec::with_capacity(
            MIDX_HEADER_LEN
                + self.packs.len() * 16
                + MIDX_FANOUT * 8
                + self.entries.len() * MIDX_ENTRY_LEN
                + TRAILER_LEN,
        );
        b.extend_from_slice(&MIDX_MAGIC);
        b.extend_from_slice(&MIDX_VERSION.to_le_bytes());
        b.extend_from_slice(&self.fanout_bits.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.packs.len() as u64).to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&[0u8; 32]);
        for p in &self.packs {
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&self.fanout_bytes());
        let entries_at = b.len();
        for e in &self.entries {
            b.extend_from_slice(e);
        }
        let trailer = blake3::hash(&b[entries_at..]);
        if self.seal {
            let mut h = blake3::Hasher::new();
            h.update(&b[..entries_at]);
            let hash = h.finalize();
            b[40..72].copy_from_slice(hash.as_bytes());
            b.extend_from_slice(trailer.as_bytes());
        } else {
            b.extend_from_slice(&[0u8; TRAILER_LEN]);
        }
        b
    }

    /// Whether this is a well-formed index: sealed, true count, no fanout
    /// patches, strictly sorted ids, every pack number in the table. Lookups
    /// in such an index must find every entry.
    pub fn is_consistent(&self) -> bool {
        self.seal
            && self.fanout_bits == store::format::MIDX_FANOUT_BITS
            && self.entry_count.is_none()
            && self.fanout_patches.is_empty()
            && self.entries.windows(2).all(|w| w[0][..32] < w[1][..32])
    }
}

/// Fills `dst` (a whole number of u64s) with little-endian `v`, doubling
/// the filled prefix with each copy.
fn fill_u64(dst: &mut [u8], v: u64) {
    if dst.len() < 8 {
        return;
    }
    dst[..8].copy_from_slice(&v.to_le_bytes());
    let mut done = 8;
    while done < dst.len() {
        let n = done.min(dst.len() - done);
        dst.copy_within(..n, done);
        done += n;
    }
}

/// Size of an idx file with `n` entries.
pub fn idx_len(n: usize) -> usize {
    IDX_HEADER_LEN + n * IDX_ENTRY_LEN + TRAILER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_bytes_match_a_prefix_sum() {
        let mut m = Midx::default();
        for (a, b) in [
            (0u8, 0u8),
            (0, 0),
            (0, 1),
            (7, 9),
            (255, 255),
            (255, 255),
            (128, 0),
        ] {
            let mut e = [0u8; MIDX_ENTRY_LEN];
            e[0] = a;
            e[1] = b;
            m.entries.push(e);
        }
        m.fanout_patches.push((3, 99));
        let mut naive = vec![0u64; MIDX_FANOUT];
        for e in &m.entries {
            naive[(usize::from(e[0]) << 8) | usize::from(e[1])] += 1;
        }
        for i in 1..MIDX_FANOUT {
            naive[i] += naive[i - 1];
        }
        naive[3] = 99;
        let bytes = m.fanout_bytes();
        let got: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, naive);
        assert!(Midx::default().fanout_bytes().iter().all(|&b| b == 0));
    }
}
