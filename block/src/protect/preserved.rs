//! Old contents of chunks the guest rewrote while a point was being copied
//! (copy-before-write), until the point reads them.
//!
//! Held in memory up to a byte budget; beyond it, in a sparse spill file
//! in the state dir (`protect.preserved`, image-sized, chunk `c` at byte
//! `c * chunk size`), truncated when the point ends. The spill file is
//! scratch: a restart deletes it (the point it served is abandoned, and
//! its chunks are in the changed bitmaps).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a preserved chunk is.
#[derive(Debug)]
enum Kept {
    Memory(Vec<u8>),
    /// In the spill file at the chunk's offset, this many bytes.
    Spilled(usize),
}

#[derive(Debug, Default)]
struct Inner {
    chunks: HashMap<u64, Kept>,
    memory: usize,
    spill: Option<File>,
}

/// The preserved chunks of the point being copied.
#[derive(Debug)]
pub(crate) struct Preserved {
    spill_path: PathBuf,
    budget: usize,
    chunk_size: u64,
    inner: Mutex<Inner>,
}

impl Preserved {
    /// Keeps up to `budget` bytes in memory, the rest in `spill_path`.
    pub(crate) fn new(spill_path: &Path, budget: usize, chunk_size: u64) -> Preserved {
        let _ = std::fs::remove_file(spill_path);
        Preserved {
            spill_path: spill_path.to_path_buf(),
            budget,
            chunk_size,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `data`, the old contents of chunk `chunk`.
    pub(crate) fn put(&self, chunk: u64, data: Vec<u8>) -> io::Result<()> {
        let mut g = self.lock();
        if g.memory + data.len() <= self.budget {
            g.memory += data.len();
            g.chunks.insert(chunk, Kept::Memory(data));
            return Ok(());
        }
        if g.spill.is_none() {
            g.spill = Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&self.spill_path)?,
            );
        }
        let file = g.spill.as_ref().expect("opened above");
        file.write_all_at(&data, chunk * self.chunk_size)?;
        g.chunks.insert(chunk, Kept::Spilled(data.len()));
        Ok(())
    }

    /// Takes chunk `chunk` into `out` (its whole length); `false` if it is
    /// not preserved.
    pub(crate) fn take(&self, chunk: u64, out: &mut [u8]) -> io::Result<bool> {
        let mut g = self.lock();
        match g.chunks.remove(&chunk) {
            None => Ok(false),
            Some(Kept::Memory(data)) => {
                g.memory -= data.len();
                let n = data.len().min(out.len());
                out[..n].copy_from_slice(&data[..n]);
                Ok(true)
            }
            Some(Kept::Spilled(len)) => {
                let file = g
                    .spill
                    .as_ref()
                    .ok_or_else(|| io::Error::other("spill file is gone"))?;
                let n = len.min(out.len());
                file.read_exact_at(&mut out[..n], chunk * self.chunk_size)?;
                Ok(true)
            }
        }
    }

    /// Bytes held (memory and spill file).
    pub(crate) fn bytes(&self) -> u64 {
        let g = self.lock();
        g.chunks
            .values()
            .map(|k| match k {
                Kept::Memory(d) => d.len() as u64,
                Kept::Spilled(n) => *n as u64,
            })
            .sum()
    }

    /// Drops everything (the point ended) and removes the spill file.
    pub(crate) fn clear(&self) {
        let mut g = self.lock();
        g.chunks.clear();
        g.memory = 0;
        if g.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_over_the_budget_spill_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("p");
        let p = Preserved::new(&spill, 8192, 4096);
        p.put(1, vec![1; 4096]).unwrap();
        p.put(7, vec![7; 4096]).unwrap();
        assert!(!spill.exists());
        p.put(9, vec![9; 2048]).unwrap();
        assert!(spill.exists());
        assert_eq!(p.bytes(), 4096 * 2 + 2048);
        let mut out = vec![0u8; 4096];
        assert!(p.take(9, &mut out).unwrap());
        assert_eq!(&out[..2048], &[9; 2048][..]);
        assert!(p.take(1, &mut out).unwrap());
        assert_eq!(out, vec![1; 4096]);
        assert!(!p.take(1, &mut out).unwrap());
        p.clear();
        assert!(!spill.exists());
        assert!(!p.take(7, &mut out).unwrap());
    }
}
