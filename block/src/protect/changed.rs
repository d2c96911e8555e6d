//! One changed-chunks bitmap file of the protection layer: a bit per
//! store chunk, "the guest wrote this chunk since the last complete point".
//!
//! # File format (version 1, little endian)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic `IRPROTCB` |
//! | 8      | 4    | version (1) |
//! | 12     | 4    | header size (4096) |
//! | 16     | 4    | granule: bytes of image per bit (the store's chunk size) |
//! | 20     | 4    | zero |
//! | 24     | 8    | image size in bytes |
//! | 32     | 8    | number of bits, `ceil(image size / granule)` |
//!
//! The bits follow at offset 4096 as little-endian `u64` words, bit `i` in
//! word `i / 64` at position `i % 64`. The file is created atomically
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! # Ordering: a bit reaches the file *before* its data is written
//!
//! Unlike `crate::bitmap` (bits after data), a changed bit must never be
//! missing for a write the guest may have seen acknowledged. [`ChangedFile::mark`]
//! `pwrite`s the word holding a newly set bit before it returns, and the
//! layer writes the guest's data only after that; a `pwrite` is in the page
//! cache, so it survives a kill -9 of the daemon. A guest flush calls
//! [`ChangedFile::sync`] (fdatasync), which makes the bits of every write
//! acknowledged before it survive a power loss too; bits of unflushed
//! writes may be lost then, which is why the daemon reads the whole disk
//! after a reboot. A bit is published in memory only after its `pwrite`
//! (under the word's stripe mutex), so a second writer that finds the bit
//! set knows it is in the file already. Extra bits are harmless (a point
//! reads a chunk that did not change); missing ones are not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Error, Result};
use crate::file::write_atomic;

// On-disk format constants: do not modify, add a new version instead.
/// Magic number at offset 0.
pub const MAGIC: [u8; 8] = *b"IRPROTCB";
/// The only format version written and read.
pub const VERSION: u32 = 1;
/// Size of the header; the bits start here.
pub const HEADER_SIZE: u64 = 4096;
const _: () = assert!(40 <= HEADER_SIZE);

/// Stripes of the word mutexes (a word's `pwrite` and its publication).
const STRIPES: usize = 64;

/// A changed-chunks bitmap, in memory and in its file.
#[derive(Debug)]
pub(crate) struct ChangedFile {
    path: PathBuf,
    file: File,
    words: Vec<AtomicU64>,
    nbits: u64,
    /// Bits set (kept with the words).
    ones: AtomicU64,
    /// A `pwrite` since the last fdatasync.
    dirty: AtomicBool,
    stripes: Vec<Mutex<()>>,
}

fn header(granule: u32, image_size: u64, nbits: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[16..20].copy_from_slice(&granule.to_le_bytes());
    h[24..32].copy_from_slice(&image_size.to_le_bytes());
    h[32..40].copy_from_slice(&nbits.to_le_bytes());
    h
}

impl ChangedFile {
    /// Opens the bitmap at `path`, creating it empty if it does not exist.
    /// Returns it and whether it existed.
    pub(crate) fn open_or_create(
        path: &Path,
        granule: u32,
        image_size: u64,
    ) -> Result<(ChangedFile, bool)> {
        let nbits = image_size.div_ceil(u64::from(granule.max(1)));
        let nwords = nbits.div_ceil(64);
        let want = header(granule, image_size, nbits);
        let open_err = |source| Error::OpenBitmap {
            path: path.to_path_buf(),
            source,
        };
        let existed = path.exists();
        if !existed {
            let mut bytes = want.clone();
            bytes.resize((HEADER_SIZE + nwords * 8) as usize, 0);
            write_atomic(path, &bytes).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let bytes = std::fs::read(path).map_err(open_err)?;
        if bytes.len() < HEADER_SIZE as usize || bytes[..40] != want[..40] {
            return Err(Error::BadBitmap {
                path: path.to_path_buf(),
                why: format!(
                    "its header does not describe {image_size} bytes in {granule}-byte chunks (format {VERSION})"
                ),
            });
        }
        let body = &bytes[HEADER_SIZE as usize..];
        let words: Vec<AtomicU64> = (0..nwords as usize)
            .map(|i| {
                let mut w = [0u8; 8];
                if let Some(b) = body.get(i * 8..i * 8 + 8) {
                    w.copy_from_slice(b);
                }
                AtomicU64::new(u64::from_le_bytes(w))
            })
            .collect();
        // Bits past the end are never trusted.
        if nbits % 64 != 0 {
            if let Some(last) = words.last() {
                last.fetch_and((1u64 << (nbits % 64)) - 1, Ordering::Relaxed);
            }
        }
        let ones = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        Ok((
            ChangedFile {
                path: path.to_path_buf(),
                file,
                words,
                nbits,
                ones: AtomicU64::new(ones),
                dirty: AtomicBool::new(false),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            },
            existed,
        ))
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bits set.
    pub(crate) fn count(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }

    /// Whether bit `bit` is set.
    pub(crate) fn get(&self, bit: u64) -> bool {
        self.words
            .get((bit / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }

    /// Word `i` (0 past the end).
    pub(crate) fn word(&self, i: usize) -> u64 {
        self.words.get(i).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Number of words.
    pub(crate) fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Sets the bits `first..=last` (clamped to the bitmap), writing every
    /// word that gains a bit to the file before returning.
    pub(crate) fn mark(&self, first: u64, last: u64) -> io::Result<()> {
        if self.nbits == 0 {
            return Ok(());
        }
        let last = last.min(self.nbits - 1);
        let mut bit = first;
        while bit <= last {
            let w = bit / 64;
            let end = last.min(w * 64 + 63);
            let lo = bit % 64;
            let hi = end % 64;
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.set_word_bits(w as usize, mask)?;
            bit = end + 1;
        }
        Ok(())
    }

    /// Sets `mask` in word `i`: `pwrite` first, then publish.
    pub(crate) fn set_word_bits(&self, i: usize, mask: u64) -> io::Result<()> {
        let Some(word) = self.words.get(i) else {
            return Ok(());
        };
        if word.load(Ordering::Acquire) & mask == mask {
            return Ok(());
        }
        let _stripe = self.stripes[i % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let old = word.load(Ordering::Acquire);
        let new = old | mask;
        if new == old {
            return Ok(());
        }
        self.dirty.store(true, Ordering::Release);
        self.file
            .write_all_at(&new.to_le_bytes(), HEADER_SIZE + i as u64 * 8)?;
        word.store(new, Ordering::Release);
        self.ones
            .fetch_add(u64::from((new & !old).count_ones()), Ordering::AcqRel);
        Ok(())
    }

    /// Makes every `pwrite` so far durable (fdatasync), if there was one.
    pub(crate) fn sync(&self) -> io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        self.file.sync_data().inspect_err(|_| {
            self.dirty.store(true, Ordering::Release);
        })
    }

    /// Clears every bit, in memory at once and then in the file (zeroes
    /// written over the bit area, fdatasync). Callers make sure nobody sets
    /// bits meanwhile. A failure leaves stale bits in the file: a restart
    /// then reads their chunks again, which is harmless.
    pub(crate) fn clear(&self) -> io::Result<()> {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
        self.ones.store(0, Ordering::Release);
        let zeroes = vec![0u8; (self.words.len() * 8).min(1 << 20)];
        let total = self.words.len() as u64 * 8;
        let mut at = 0;
        while at < total {
            let n = (total - at).min(zeroes.len() as u64);
            self.file
                .write_all_at(&zeroes[..n as usize], HEADER_SIZE + at)?;
            at += n;
        }
        self.dirty.store(false, Ordering::Release);
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_reach_the_file_when_marked_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bitmap");
        // 200 chunks and a short one.
        let size = 4096 * 200 + 512;
        let (f, existed) = ChangedFile::open_or_create(&path, 4096, size).unwrap();
        assert!(!existed);
        assert_eq!(f.nbits, 201);
        f.mark(3, 3).unwrap();
        f.mark(60, 130).unwrap();
        f.mark(200, 900).unwrap();
        assert_eq!(f.count(), 1 + 71 + 1);
        // No sync, no drop: the pwrites are what a kill -9 leaves.
        let (g, existed) = ChangedFile::open_or_create(&path, 4096, size).unwrap();
        assert!(existed);
        assert_eq!(g.count(), 73);
        assert!(g.get(3) && g.get(60) && g.get(130) && g.get(200));
        assert!(!g.get(2) && !g.get(59) && !g.get(131));
        g.clear().unwrap();
        let (h, _) = ChangedFile::open_or_create(&path, 4096, size).unwrap();
        assert_eq!(h.count(), 0);
        // Another geometry is refused.
        assert!(ChangedFile::open_or_create(&path, 8192, size).is_err());
        drop(f);
    }
}
