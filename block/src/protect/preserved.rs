//! Old contents of the parts of chunks the guest rewrote while a point was
//! being copied (copy-before-write), until the point reads those chunks.
//!
//! A chunk is preserved in *grains* ([`GRAIN`] bytes, the overlay's block
//! size), only the grains a guest write touches: a 4 KiB write into a
//! 64 KiB chunk copies 4 KiB, not the chunk. Each grain is preserved at
//! most once per point (the first write after the instant to touch it);
//! the point reads the chunk from the layer below and patches the
//! preserved grains over it ([`Preserved::take_into`]).
//!
//! A grain whose old contents are the immutable snapshot's is preserved
//! without a copy ([`Preserved::put_base`]): the point reads it from the
//! snapshot when it patches the chunk.
//!
//! Held in memory up to a byte budget; beyond it, in a sparse spill file
//! in the state dir (`protect.preserved`, image-sized, a grain at its
//! image offset), truncated when the point ends. The spill file is
//! scratch: a restart deletes it (the point it served is abandoned, and
//! its chunks are in the changed bitmaps).
//!
//! # Concurrency
//! Callers serialize the calls for one chunk (the capture's stripe of the
//! chunk). The mutex here guards only the map: spill-file reads and
//! writes run outside it, so a guest's copy-before-write never waits for
//! another chunk's disk I/O (nor for a point thread that was preempted
//! while holding it).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes per preserved grain (chunk sizes that are not a multiple of it
/// are preserved whole).
pub const GRAIN: u64 = 4096;

/// Where a preserved run of grains is.
#[derive(Debug)]
enum Kept {
    Memory(Vec<u8>),
    /// In the spill file at the run's image offset, this many bytes.
    Spilled(usize),
    /// In the snapshot under the disk, this many bytes.
    Base(usize),
}

/// The preserved runs of one chunk.
#[derive(Debug, Default)]
struct ChunkKept {
    /// Grain `g` is preserved (bit `g % 64` of word `g / 64`).
    grains: Vec<u64>,
    /// (first grain, its contents).
    runs: Vec<(u32, Kept)>,
}

impl ChunkKept {
    fn has(&self, g: u32) -> bool {
        self.grains
            .get(g as usize / 64)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    fn set(&mut self, first: u32, count: u32) {
        for g in first..first + count {
            let i = g as usize / 64;
            if self.grains.len() <= i {
                self.grains.resize(i + 1, 0);
            }
            self.grains[i] |= 1 << (g % 64);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    chunks: HashMap<u64, ChunkKept>,
    memory: usize,
    bytes: u64,
    spill: Option<Arc<File>>,
}

/// The preserved grains of the point being copied.
#[derive(Debug)]
pub(crate) struct Preserved {
    spill_path: PathBuf,
    budget: usize,
    chunk_size: u64,
    /// Bytes per grain: [`GRAIN`], or the chunk size.
    grain: u64,
    inner: Mutex<Inner>,
}

impl Preserved {
    /// Keeps up to `budget` bytes in memory, the rest in `spill_path`.
    pub(crate) fn new(spill_path: &Path, budget: usize, chunk_size: u64) -> Preserved {
        let _ = std::fs::remove_file(spill_path);
        let grain = if chunk_size.is_multiple_of(GRAIN) {
            GRAIN
        } else {
            chunk_size.max(1)
        };
        Preserved {
            spill_path: spill_path.to_path_buf(),
            budget,
            chunk_size,
            grain,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes per grain.
    pub(crate) fn grain(&self) -> u64 {
        self.grain
    }

    /// The runs of grains `first..=last` of chunk `chunk` not preserved
    /// yet, as (first grain, count).
    pub(crate) fn missing(&self, chunk: u64, first: u32, last: u32) -> Vec<(u32, u32)> {
        let g = self.lock();
        let kept = g.chunks.get(&chunk);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for i in first..=last {
            if kept.is_some_and(|k| k.has(i)) {
                continue;
            }
            match runs.last_mut() {
                Some((start, n)) if *start + *n == i => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }

    /// Keeps `data`, the old contents of chunk `chunk` from grain `first`
    /// on (whole grains, the last one of the disk may be short).
    pub(crate) fn put(&self, chunk: u64, first: u32, data: Vec<u8>) -> io::Result<()> {
        let len = data.len();
        let count = (len as u64).div_ceil(self.grain) as u32;
        let spill = {
            let mut g = self.lock();
            if g.memory + len <= self.budget {
                g.memory += len;
                g.bytes += len as u64;
                let kept = g.chunks.entry(chunk).or_default();
                kept.set(first, count);
                kept.runs.push((first, Kept::Memory(data)));
                return Ok(());
            }
            match &g.spill {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .mode(0o600)
                            .open(&self.spill_path)?,
                    );
                    g.spill = Some(f.clone());
                    f
                }
            }
        };
        spill.write_all_at(&data, self.offset(chunk, first))?;
        let mut g = self.lock();
        g.bytes += len as u64;
        let kept = g.chunks.entry(chunk).or_default();
        kept.set(first, count);
        kept.runs.push((first, Kept::Spilled(len)));
        Ok(())
    }

    /// Records that the old contents of chunk `chunk`'s `len` bytes from
    /// grain `first` on (whole grains, the last one of the disk may be
    /// short) are the snapshot's: nothing to copy.
    pub(crate) fn put_base(&self, chunk: u64, first: u32, len: usize) {
        let count = (len as u64).div_ceil(self.grain) as u32;
        let mut g = self.lock();
        let kept = g.chunks.entry(chunk).or_default();
        kept.set(first, count);
        kept.runs.push((first, Kept::Base(len)));
    }

    fn offset(&self, chunk: u64, grain: u32) -> u64 {
        chunk * self.chunk_size + u64::from(grain) * self.grain
    }

    /// Patches the preserved grains of chunk `chunk` over `out` (the
    /// chunk as read from the layer below, from its start) and forgets
    /// them; `false` if none were preserved. `from_base(piece, at)` fills
    /// the grains preserved with [`Preserved::put_base`], `at` bytes into
    /// the chunk, from the snapshot.
    pub(crate) fn take_into(
        &self,
        chunk: u64,
        out: &mut [u8],
        mut from_base: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<bool> {
        let (kept, spill) = {
            let mut g = self.lock();
            let Some(kept) = g.chunks.remove(&chunk) else {
                return Ok(false);
            };
            for (_, k) in &kept.runs {
                match k {
                    Kept::Memory(d) => {
                        g.memory -= d.len();
                        g.bytes -= d.len() as u64;
                    }
                    Kept::Spilled(n) => g.bytes -= *n as u64,
                    Kept::Base(_) => {}
                }
            }
            (kept, g.spill.clone())
        };
        for (first, k) in kept.runs {
            let at = (u64::from(first) * self.grain) as usize;
            let dst = out.get_mut(at..).unwrap_or_default();
            match k {
                Kept::Memory(data) => {
                    let n = data.len().min(dst.len());
                    dst[..n].copy_from_slice(&data[..n]);
                }
                Kept::Spilled(len) => {
                    let file = spill
                        .as_ref()
                        .ok_or_else(|| io::Error::other("spill file is gone"))?;
                    let n = len.min(dst.len());
                    file.read_exact_at(&mut dst[..n], self.offset(chunk, first))?;
                }
                Kept::Base(len) => {
                    let n = len.min(dst.len());
                    from_base(&mut dst[..n], at as u64)?;
                }
            }
        }
        Ok(true)
    }

    /// Bytes held (memory and spill file; not the grains left in the
    /// snapshot).
    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Drops everything (the point ended) and removes the spill file.
    pub(crate) fn clear(&self) {
        let mut g = self.lock();
        g.chunks.clear();
        g.memory = 0;
        g.bytes = 0;
        if g.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_base(_: &mut [u8], at: u64) -> io::Result<()> {
        panic!("no grain at {at} was left in the snapshot")
    }

    #[test]
    fn grains_over_the_budget_spill_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("p");
        let cs = 4 * GRAIN;
        let p = Preserved::new(&spill, 2 * GRAIN as usize, cs);
        assert_eq!(p.grain(), GRAIN);
        p.put(1, 0, vec![1; GRAIN as usize]).unwrap();
        p.put(7, 2, vec![7; GRAIN as usize]).unwrap();
        assert!(!spill.exists());
        // Over the budget: grains 1 and 2 of chunk 1, into the file.
        p.put(1, 1, vec![9; 2 * GRAIN as usize]).unwrap();
        assert!(spill.exists());
        assert_eq!(p.bytes(), 4 * GRAIN);
        assert_eq!(p.missing(1, 0, 3), [(3, 1)]);
        assert_eq!(p.missing(7, 0, 3), [(0, 2), (3, 1)]);
        assert_eq!(p.missing(2, 1, 2), [(1, 2)]);
        let mut out = vec![5u8; cs as usize];
        assert!(p.take_into(1, &mut out, no_base).unwrap());
        let g = GRAIN as usize;
        assert!(out[..g].iter().all(|&b| b == 1));
        assert!(out[g..3 * g].iter().all(|&b| b == 9));
        assert!(
            out[3 * g..].iter().all(|&b| b == 5),
            "not preserved: as read"
        );
        assert!(!p.take_into(1, &mut out, no_base).unwrap(), "taken once");
        assert_eq!(p.bytes(), GRAIN);
        p.clear();
        assert!(!spill.exists());
        assert_eq!(p.bytes(), 0);
        assert!(!p.take_into(7, &mut out, no_base).unwrap());
    }

    #[test]
    fn a_chunk_size_that_is_not_whole_grains_is_preserved_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = Preserved::new(&dir.path().join("p"), 1 << 20, 6000);
        assert_eq!(p.grain(), 6000);
        p.put(3, 0, vec![3; 6000]).unwrap();
        assert!(p.missing(3, 0, 0).is_empty());
        let mut out = vec![0u8; 6000];
        assert!(p.take_into(3, &mut out, no_base).unwrap());
        assert_eq!(out, vec![3; 6000]);
    }

    #[test]
    fn grains_left_in_the_snapshot_cost_no_bytes_and_are_read_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let g = GRAIN as usize;
        let p = Preserved::new(&dir.path().join("p"), 1 << 20, 4 * GRAIN);
        p.put_base(2, 1, 2 * g);
        p.put(2, 3, vec![3; g]).unwrap();
        assert_eq!(p.bytes(), GRAIN, "only the copied grain");
        assert!(p.missing(2, 1, 3).is_empty());
        assert_eq!(p.missing(2, 0, 3), [(0, 1)]);
        let mut out = vec![5u8; 4 * g];
        let mut asked = Vec::new();
        let taken = p.take_into(2, &mut out, |piece, at| {
            asked.push((at, piece.len()));
            piece.fill(9);
            Ok(())
        });
        assert!(taken.unwrap());
        assert_eq!(asked, [(GRAIN, 2 * g)]);
        assert!(out[..g].iter().all(|&b| b == 5), "not preserved: as read");
        assert!(out[g..3 * g].iter().all(|&b| b == 9), "from the snapshot");
        assert!(out[3 * g..].iter().all(|&b| b == 3), "the copy");
        assert_eq!(p.bytes(), 0);
    }
}
