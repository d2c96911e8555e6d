//! Reference [`BlockDevice`]s: [`MemDevice`] (a `Vec<u8>`) and
//! [`FileDevice`] (a raw image file).
//!
//! `MemDevice` is the model that tests compare every other layer against;
//! it also counts flushes so tests can check that FLUSH and shutdown reach
//! the device. `FileDevice` serves a raw file with `pread`/`pwrite`,
//! `fdatasync` and hole punching, for benchmarks and pass-through.
//!
//! Both override the vectored methods: `MemDevice` copies once between
//! its buffer and guest memory, `FileDevice` hands the guest buffers to
//! `preadv`/`pwritev`, so request data crosses user space zero times.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use vm_memory::VolatileSlice;

use crate::device::{total_len, BlockDevice};
use crate::file::{check_bounds, RawFile};
use crate::io::{preadv_all, pwritev_all};

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "device is read-only")
}

/// An in-memory block device.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    flushes: AtomicU64,
}

impl MemDevice {
    /// A zero-filled writable device of `size` bytes (rounded down to 512).
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0; size])
    }

    /// A writable device holding `image` (its length is rounded down to 512).
    pub fn from_vec(mut image: Vec<u8>) -> Self {
        image.truncate(image.len() / 512 * 512);
        MemDevice {
            data: RwLock::new(image),
            read_only: false,
            flushes: AtomicU64::new(0),
        }
    }

    /// Makes the device refuse writes.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times [`BlockDevice::flush`] has been called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn fill(&self, offset: u64, len: u64, byte: u8) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_bounds(offset, len, data.len() as u64)?;
        // Bounds checked above, so both fit in usize.
        let start = offset as usize;
        data[start..start + len as usize].fill(byte);
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_bounds(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_bounds(offset, buf.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_bounds(offset, total_len(bufs), data.len() as u64)?;
        // Bounds checked above, so every position fits in usize.
        let mut at = offset as usize;
        for buf in bufs {
            buf.copy_from(&data[at..at + buf.len()]);
            at += buf.len();
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_bounds(offset, total_len(bufs), data.len() as u64)?;
        let mut at = offset as usize;
        for buf in bufs {
            buf.copy_to(&mut data[at..at + buf.len()]);
            at += buf.len();
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill(offset, len, 0)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fill(offset, len, 0)
    }
}

/// A raw image file served as a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: RawFile,
    size: u64,
    read_only: bool,
}

impl FileDevice {
    /// Opens `path`; its size (rounded down to 512) is the device size.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len() / 512 * 512;
        Ok(FileDevice {
            file: RawFile::new(file),
            size,
            read_only,
        })
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_bounds(offset, len, self.size)?;
        self.file.zero_file_range(offset, len)
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_bounds(offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }

    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        check_bounds(offset, total_len(bufs), self.size)?;
        preadv_all(&self.file, bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_bounds(offset, total_len(bufs), self.size)?;
        pwritev_all(&self.file, bufs, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks every BlockDevice must pass.
    fn check_read_write(dev: &dyn BlockDevice) {
        let size = dev.size();
        assert!(size >= 8192);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&pattern, 512).unwrap();
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 512).unwrap();
        assert_eq!(back, pattern);

        dev.write_zeroes(1024, 1024).unwrap();
        dev.read_at(&mut back, 512).unwrap();
        assert_eq!(back[..512], pattern[..512]);
        assert!(back[512..1536].iter().all(|&b| b == 0));
        assert_eq!(back[1536..], pattern[1536..]);

        dev.discard(512, 4096).unwrap();
        dev.read_at(&mut back, 512).unwrap();
        assert!(back.iter().all(|&b| b == 0));

        // Out of bounds is an error, never a panic.
        assert!(dev.read_at(&mut back, size - 512).is_err());
        assert!(dev.write_at(&pattern, u64::MAX - 10).is_err());
        assert!(dev.discard(size, 1).is_err());
        dev.flush().unwrap();
    }

    #[test]
    fn mem_device_reads_back_writes() {
        let dev = MemDevice::new(64 * 1024);
        check_read_write(&dev);
        assert_eq!(dev.flush_count(), 1);
    }

    #[test]
    fn file_device_reads_back_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0xaau8; 64 * 1024]).unwrap();
        let dev = FileDevice::open(&path, false).unwrap();
        check_read_write(&dev);
    }

    #[test]
    fn read_only_devices_refuse_writes() {
        let dev = MemDevice::from_vec(vec![7; 4096]).into_read_only();
        assert!(dev.write_at(&[0; 512], 0).is_err());
        assert!(dev.discard(0, 512).is_err());
        assert!(dev.write_zeroes(0, 512).is_err());
        assert_eq!(dev.snapshot(), vec![7; 4096]);
    }

    #[test]
    fn sizes_round_down_to_sectors() {
        assert_eq!(MemDevice::from_vec(vec![1; 1000]).size(), 512);
    }
}
