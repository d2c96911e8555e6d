//! The snapshot as the block layers see it: a read-only chunked image.
//!
//! [`ChunkSource`] is the seam between the block layers and the store. The
//! store's snapshot reader implements it; [`VecSource`] is an in-memory
//! implementation for tests and benches, with hooks to count reads, slow
//! them down and make chunks fail.
//!
//! [`check_read_write`] is the shared check run against every
//! [`BlockDevice`] layer with a `Vec<u8>` model of its contents.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::device::BlockDevice;

/// A read-only chunked image: the snapshot as seen by the block layers.
pub trait ChunkSource: Send + Sync {
    /// Size of the image in bytes.
    fn image_size(&self) -> u64;

    /// Size of every chunk but possibly the last: a power of two, 4 KiB..4 MiB.
    fn chunk_size(&self) -> u32;

    /// The content key of chunk `index`: `None` for a zero chunk (reading it
    /// costs no I/O). Identical keys mean identical content.
    fn chunk_key(&self, index: u64) -> io::Result<Option<[u8; 32]>>;

    /// Reads chunk `index` into `out` (cleared first): plaintext, verified,
    /// `min(chunk_size, image_size - index * chunk_size)` bytes long.
    fn read_chunk(&self, index: u64, out: &mut Vec<u8>) -> io::Result<()>;
}

/// Number of chunks of a source (the last one may be short).
pub fn chunk_count(source: &dyn ChunkSource) -> u64 {
    source.image_size().div_ceil(u64::from(source.chunk_size()))
}

/// Length of chunk `index` of an image of `image_size` bytes in chunks of
/// `chunk_size`, or 0 past the end.
pub fn chunk_len(image_size: u64, chunk_size: u32, index: u64) -> usize {
    let start = index.saturating_mul(u64::from(chunk_size));
    // Bounded by chunk_size, a u32.
    image_size.saturating_sub(start).min(u64::from(chunk_size)) as usize
}

/// An in-memory [`ChunkSource`] for tests and benches.
///
/// Chunks that are all zeroes have no key. Other keys are exact: chunks
/// with identical content share the key of their first occurrence, so the
/// cache deduplicates them like the store's content hashes do.
pub struct VecSource {
    data: Vec<u8>,
    chunk_size: u32,
    keys: Vec<Option<[u8; 32]>>,
    reads: AtomicU64,
    delay_ms: AtomicU64,
    failing: Mutex<HashSet<u64>>,
}

impl VecSource {
    /// Wraps `data` as an image of chunks of `chunk_size` bytes.
    ///
    /// # Panics
    /// If `chunk_size` is not a power of two of at least 512 bytes (a test
    /// setup error).
    pub fn new(data: Vec<u8>, chunk_size: u32) -> VecSource {
        assert!(
            chunk_size.is_power_of_two() && chunk_size >= 512,
            "chunk size must be a power of two >= 512"
        );
        let mut first: HashMap<&[u8], u64> = HashMap::new();
        let keys = data
            .chunks(chunk_size as usize)
            .enumerate()
            .map(|(i, chunk)| {
                if chunk.iter().all(|&b| b == 0) {
                    return None;
                }
                let owner = *first.entry(chunk).or_insert(i as u64);
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&owner.to_le_bytes());
                key[8..16].copy_from_slice(&(chunk.len() as u64).to_le_bytes());
                key[16] = 0x5c;
                Some(key)
            })
            .collect();
        VecSource {
            data,
            chunk_size,
            keys,
            reads: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            failing: Mutex::new(HashSet::new()),
        }
    }

    /// The image bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Number of [`ChunkSource::read_chunk`] calls so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Makes every chunk read sleep this long first.
    pub fn set_read_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes reads of chunk `index` fail (as a corrupt chunk would) or succeed again.
    pub fn set_failing(&self, index: u64, failing: bool) {
        let mut set = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing {
            set.insert(index);
        } else {
            set.remove(&index);
        }
    }
}

impl ChunkSource for VecSource {
    fn image_size(&self) -> u64 {
        self.data.len() as u64
    }

    fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    fn chunk_key(&self, index: u64) -> io::Result<Option<[u8; 32]>> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.keys.get(i).copied())
            .ok_or_else(|| io::Error::other(format!("chunk {index} is past the end of the image")))
    }

    fn read_chunk(&self, index: u64, out: &mut Vec<u8>) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if self
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&index)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {index} is corrupt"),
            ));
        }
        let len = chunk_len(self.image_size(), self.chunk_size, index);
        if len == 0 {
            return Err(io::Error::other(format!(
                "chunk {index} is past the end of the image"
            )));
        }
        let start = index as usize * self.chunk_size as usize;
        out.clear();
        out.extend_from_slice(&self.data[start..start + len]);
        Ok(())
    }
}

/// A small deterministic generator so the shared check needs no dev-dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn check_range(dev: &dyn BlockDevice, model: &[u8], offset: u64, len: usize, what: &str) {
    let mut buf = vec![0xa5u8; len];
    dev.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{what}: read of {len} bytes at {offset} failed: {e}"));
    let want = &model[offset as usize..offset as usize + len];
    if buf != want {
        let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{what}: read of {len} bytes at {offset} differs from the model at byte {} (got {:#04x}, want {:#04x})",
            offset + at as u64,
            buf[at],
            want[at]
        );
    }
}

/// The shared check of a [`BlockDevice`] layer against `model`, its
/// expected contents (updated in place by the writes the check makes).
///
/// Reads the whole device, its start and end, odd 512-byte ranges and
/// ranges across 4 KiB and larger power-of-two boundaries; checks that a
/// read past the end fails. On a writable device it also writes aligned,
/// unaligned, partial-block and cross-block ranges, write-zeroes, discards
/// and flushes, and reads everything back. On a read-only device it checks
/// that every mutation is refused and changes nothing.
///
/// # Panics
/// On the first difference from the model, or an unexpected error.
pub fn check_read_write(dev: &dyn BlockDevice, model: &mut [u8]) {
    let size = dev.size();
    assert_eq!(
        size,
        model.len() as u64,
        "device size differs from the model"
    );
    assert!(size >= 4096, "the check needs a device of at least 4 KiB");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ size);

    check_range(dev, model, 0, size as usize, "whole device");
    check_range(dev, model, 0, 512, "first sector");
    check_range(dev, model, size - 512, 512, "last sector");
    check_range(dev, model, size - 1, 1, "last byte");
    let mut boundary = 4096u64;
    while boundary < size {
        let from = boundary.saturating_sub(1536);
        let len = (3072).min(size - from) as usize;
        check_range(dev, model, from, len, "across a boundary");
        boundary *= 2;
    }
    for _ in 0..32 {
        let sector = rng.below(size / 512);
        let sectors = 1 + rng.below(((size / 512) - sector).min(67));
        check_range(
            dev,
            model,
            sector * 512,
            (sectors * 512) as usize,
            "odd sector range",
        );
    }
    let mut past = vec![0u8; 1024];
    assert!(
        dev.read_at(&mut past, size - 512).is_err(),
        "a read past the end must fail"
    );

    if dev.read_only() {
        let before = model.to_vec();
        assert!(
            dev.write_at(&[1u8; 512], 0).is_err(),
            "read-only write must fail"
        );
        assert!(dev.discard(0, 4096).is_err(), "read-only discard must fail");
        assert!(
            dev.write_zeroes(0, 4096).is_err(),
            "read-only write-zeroes must fail"
        );
        check_range(
            dev,
            &before,
            0,
            size as usize,
            "read-only after refused writes",
        );
        return;
    }

    // Mutations: (offset, len) pairs chosen to hit every alignment case.
    let cases: Vec<(u64, u64)> = vec![
        (0, 4096),
        (4096 + 512, 512),
        (4096 * 2 + 100, 1),
        (4096 * 3 - 7, 14),
        (size - 4096, 4096),
        (size - 1, 1),
        (size / 2 - 3000, 9000.min(size / 2)),
        (0, size.min(3 * 4096 + 512)),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let len = len.min(size - off);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        dev.write_at(&data, off)
            .unwrap_or_else(|e| panic!("write {i} of {len} at {off} failed: {e}"));
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        check_range(
            dev,
            model,
            off.saturating_sub(4096),
            (len + 8192).min(size - off.saturating_sub(4096)) as usize,
            "after write",
        );
    }
    dev.flush().expect("flush failed");
    for _ in 0..24 {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(20_000));
        match rng.below(3) {
            0 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                dev.write_at(&data, off).expect("random write failed");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            1 => {
                dev.write_zeroes(off, len).expect("write-zeroes failed");
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                dev.discard(off, len).expect("discard failed");
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
        check_range(dev, model, off, len as usize, "after mutation");
    }
    dev.flush().expect("flush failed");
    check_range(dev, model, 0, size as usize, "whole device after mutations");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_exact_and_zero_chunks_have_none() {
        let mut data = vec![0u8; 4096 * 5 + 512];
        data[4096..8192].fill(7);
        data[3 * 4096..4 * 4096].fill(7);
        data[4 * 4096] = 1;
        data[5 * 4096] = 9;
        let src = VecSource::new(data, 4096);
        assert_eq!(chunk_count(&src), 6);
        assert_eq!(src.chunk_key(0).unwrap(), None);
        assert_eq!(src.chunk_key(2).unwrap(), None);
        let k1 = src.chunk_key(1).unwrap().unwrap();
        assert_eq!(src.chunk_key(3).unwrap(), Some(k1));
        assert_ne!(src.chunk_key(4).unwrap(), Some(k1));
        assert!(src.chunk_key(6).is_err());
        let mut out = Vec::new();
        src.read_chunk(5, &mut out).unwrap();
        assert_eq!(out.len(), 512);
        assert_eq!(out[0], 9);
        assert!(src.read_chunk(6, &mut out).is_err());
        src.set_failing(4, true);
        assert_eq!(
            src.read_chunk(4, &mut out).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        src.set_failing(4, false);
        src.read_chunk(4, &mut out).unwrap();
        assert_eq!(src.reads(), 4);
    }

    #[test]
    fn chunk_len_handles_the_tail_and_past_the_end() {
        assert_eq!(chunk_len(10_000, 4096, 0), 4096);
        assert_eq!(chunk_len(10_000, 4096, 2), 10_000 - 8192);
        assert_eq!(chunk_len(10_000, 4096, 3), 0);
        assert_eq!(chunk_len(10_000, 4096, u64::MAX), 0);
    }
}
