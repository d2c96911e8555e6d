//! [`FileSource`]: a raw image file or block device as a [`ChangedSource`].
//!
//! A regular file's holes are found with `SEEK_DATA`/`SEEK_HOLE` (as
//! `qemu-img` does) once, when the source is opened: a chunk that lies
//! wholly inside a hole is `Zero` and never read, everything else is `Data`.
//! A 64 GiB sparse image holding 8 MiB therefore reads 8 MiB. A block device
//! (or a filesystem without hole reporting) is one data extent. A file source
//! never says `Unchanged`: that is for sources that track changes since a
//! parent (a dirty bitmap, NBD block status), which implement the same trait.
//!
//! Data is read with `O_DIRECT` where the file system allows it (a second
//! descriptor; whole aligned 4 KiB blocks into the pipeline's aligned
//! buffers): the disk DMAs straight into the buffer, so the copy out of the
//! page cache (a fifth of a backup's CPU) is gone and the backup does not
//! evict the host's cache. Without the kernel's readahead the backup keeps
//! [`FileSource::readers`] reads in flight. A file system that refuses
//! `O_DIRECT` (tmpfs), an unaligned tail, or an `EINVAL` at the first read
//! falls back to ordinary buffered reads.
//!
//! The extent map is taken at open; like any backup of an image that is
//! being written, data written into a hole during the backup may or may not
//! be in the snapshot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::debug;

use super::changed::{ChangedSource, ChunkState};
use super::{open_source, READ_ALIGN};
use crate::error::{Error, Result};

/// An image file or block device, with the byte ranges that hold data.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
    chunk_size: u64,
    /// Sorted, disjoint `[start, end)` ranges that may hold data.
    data: Vec<(u64, u64)>,
    /// The same file opened `O_DIRECT`, while the file system takes it.
    direct: Option<File>,
    direct_ok: AtomicBool,
}

impl FileSource {
    /// Open `path` (see [`open_source`]) and map its data extents; chunk
    /// states are given in chunks of `chunk_size` bytes.
    pub fn open(path: &Path, chunk_size: u32) -> Result<FileSource> {
        let (file, size) = open_source(path)?;
        let is_file = file
            .metadata()
            .map_err(|e| Error::io_path("Failed to stat source", path, e))?
            .is_file();
        let data = if is_file {
            data_extents(&file, size)
                .map_err(|e| Error::io_path("Failed to map the data extents of", path, e))?
        } else {
            vec![(0, size)]
        };
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .map_err(|e| debug!(path = %path.display(), "no O_DIRECT reads: {e}"))
            .ok();
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size,
            chunk_size: chunk_size as u64,
            data,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
        })
    }

    /// Reads to keep in flight: several for `O_DIRECT` (no readahead),
    /// one through the page cache (the kernel reads ahead).
    pub fn readers(&self) -> usize {
        if self.direct_ok.load(Ordering::Relaxed) {
            3
        } else {
            1
        }
    }

    /// An `O_DIRECT` read of `buf` at `offset`, when the descriptor, the
    /// buffer, the offset and the length allow it. `None`: read buffered.
    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let d = self.direct.as_ref()?;
        let aligned = |x: u64| x.is_multiple_of(READ_ALIGN as u64);
        if !self.direct_ok.load(Ordering::Relaxed)
            || !aligned(offset)
            || !aligned(buf.len() as u64)
            || !aligned(buf.as_ptr() as u64)
            || offset + buf.len() as u64 > self.size
        {
            return None;
        }
        match d.read_exact_at(buf, offset) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                debug!(path = %self.path.display(), "O_DIRECT read refused, reading buffered");
                self.direct_ok.store(false, Ordering::Relaxed);
                None
            }
            r => Some(r),
        }
    }

    /// Image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes inside data extents (what a backup reads, before rounding to
    /// chunks).
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|(s, e)| e - s).sum()
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when `[start, end)` overlaps a data extent.
    fn has_data(&self, start: u64, end: u64) -> bool {
        let i = self.data.partition_point(|&(_, e)| e <= start);
        self.data.get(i).is_some_and(|&(s, _)| s < end)
    }
}

/// Data extents of a regular file via `SEEK_DATA`/`SEEK_HOLE`; the whole
/// file when the filesystem cannot tell.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match seek(file, SeekFrom::Data(at as i64)) {
            Ok(s) => s,
            // No data at or after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if at == 0 => {
                return Ok(vec![(0, size)])
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match seek(file, SeekFrom::Hole(start as i64)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            // A file that changed under us: treat the rest as data.
            out.push((start, size));
            break;
        }
        out.push((start, end));
        at = end;
    }
    Ok(out)
}

impl ChangedSource for FileSource {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        let start = chunk * self.chunk_size;
        let end = (start + self.chunk_size).min(self.size);
        if self.has_data(start, end) {
            ChunkState::Data
        } else {
            ChunkState::Zero
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.read_direct(offset, buf) {
            Some(r) => r,
            None => self.file.read_exact_at(buf, offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_are_zero_chunks_and_data_is_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        // Data at 1 MiB (8 KiB) and at the very end (4 KiB).
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 4096)).unwrap();
        f.write_all(&[2u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let s = FileSource::open(&p, 65536).unwrap();
        assert_eq!(s.size(), 64 << 20);
        // Filesystems allocate in blocks; at most a few blocks around each write.
        assert!(
            s.data_bytes() >= 12288 && s.data_bytes() < 1 << 20,
            "{:?}",
            s.data
        );
        assert_eq!(s.chunk_state(0), ChunkState::Zero);
        assert_eq!(s.chunk_state(16), ChunkState::Data);
        assert_eq!(s.chunk_state(17), ChunkState::Zero);
        assert_eq!(s.chunk_state(1023), ChunkState::Data);
        let mut buf = [0u8; 4];
        s.read_at(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, [1; 4]);

        // A fully written file is one extent.
        let full = dir.path().join("full.img");
        std::fs::write(&full, vec![0u8; 1 << 20]).unwrap();
        let s = FileSource::open(&full, 4096).unwrap();
        assert_eq!(s.data, vec![(0, 1 << 20)]);
        // Aligned reads (O_DIRECT where the file system takes it) and
        // unaligned ones (buffered) return the same bytes.
        let img: Vec<u8> = (0..(1u32 << 20) + 1536).map(|i| (i % 251) as u8).collect();
        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, &img).unwrap();
        let s = FileSource::open(&odd, 65536).unwrap();
        let mut buf = vec![0u8; (256 << 10) + READ_ALIGN];
        let at = buf.as_ptr().align_offset(READ_ALIGN);
        for (off, len) in [
            (0usize, 256usize << 10),
            (4096, 8192),
            (100, 5000),
            (1 << 20, 1536),
        ] {
            let b = &mut buf[at..at + len];
            s.read_at(off as u64, b).unwrap();
            assert!(b[..] == img[off..off + len], "read of {len} at {off}");
        }
        assert!(s.readers() >= 1);
        // An empty file has none.
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(FileSource::open(&empty, 4096).unwrap().data.is_empty());
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;
    use crate::backup::tests::setup;
    use crate::{BackupOptions, RestoreOptions};
    use std::os::unix::fs::MetadataExt;

    /// A 64 GiB image holding 8 MiB: the backup reads about 8 MiB, and the
    /// restore is exact and keeps the holes.
    #[test]
    fn sparse_64g_image_reads_only_its_data_and_restores_sparse() {
        const SIZE: u64 = 64 << 30;
        let (dir, store) = setup(64 << 10);
        let src = dir.path().join("sparse.img");
        let f = File::create(&src).unwrap();
        f.set_len(SIZE).unwrap();
        // 8 MiB in 16 pieces of 512 KiB spread over the image, one
        // straddling a chunk boundary, one at the very end.
        let mut pieces = Vec::new();
        for i in 0..16u64 {
            let at = if i == 15 {
                SIZE - (512 << 10)
            } else {
                i * (4 << 30) + 12_288 * i
            };
            let data: Vec<u8> = (0..512 << 10)
                .map(|j: u64| (j.wrapping_mul(31) ^ i) as u8 | 1)
                .collect();
            f.write_all_at(&data, at).unwrap();
            pieces.push((at, data));
        }
        f.sync_all().unwrap();
        drop(f);

        let s = store
            .backup("big", &src, &BackupOptions::default())
            .unwrap();
        assert_eq!(s.image_size, SIZE);
        assert_eq!(s.chunks_total, SIZE / (64 << 10));
        // The pieces, rounded out to whole chunks (unaligned ones touch one
        // more chunk each), and nothing else.
        assert!(
            s.bytes_read >= 8 << 20 && s.bytes_read <= (8 << 20) + 30 * (64 << 10),
            "{s:?}"
        );
        assert!(s.chunks_zero >= s.chunks_total - 160, "{s:?}");

        let out = dir.path().join("out.img");
        let r = store
            .restore("big", &out, &RestoreOptions::default())
            .unwrap();
        assert_eq!(r.image_size, SIZE);
        let m = std::fs::metadata(&out).unwrap();
        assert_eq!(m.len(), SIZE);
        assert!(
            m.blocks() * 512 <= (8 << 20) + 30 * (64 << 10),
            "restore filled holes: {} bytes allocated",
            m.blocks() * 512
        );
        // Every data extent of the restored file lies in a chunk that holds a
        // piece, and every piece reads back exactly.
        let restored = File::open(&out).unwrap();
        let cs = 64 << 10;
        for (start, end) in data_extents(&restored, SIZE).unwrap() {
            assert!(
                pieces.iter().any(|(at, d)| {
                    let (lo, hi) = (at / cs * cs, (at + d.len() as u64).div_ceil(cs) * cs);
                    start >= lo && end <= hi
                }),
                "data at {start}..{end} outside every piece"
            );
        }
        for (at, data) in &pieces {
            let mut buf = vec![0u8; data.len()];
            restored.read_exact_at(&mut buf, *at).unwrap();
            assert!(buf == *data, "piece at {at} differs");
        }
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());
    }
}
