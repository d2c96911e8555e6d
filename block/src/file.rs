//! Small file helpers every layer shares: durable atomic publication,
//! directory syncs and range checks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically and durably: temporary file
/// (`<path>.tmp`, mode 0600), fsync, rename, fsync of the directory. A
/// crash leaves either the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_parent_dir(path)
}

/// Fsyncs the directory holding `path`, making a rename or create durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The error for an access outside `0..size`.
pub fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("access of {len} bytes at offset {offset} is past the device end ({size} bytes)"),
    )
}

/// Checks that `offset..offset + len` lies within `size`, without overflow.
pub fn check_bounds(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(out_of_range(offset, len, size)),
    }
}

/// The indexes of the `unit`-sized pieces (blocks, chunks) that a read of
/// `len` bytes at `offset` touches; `None` for an empty range or one that
/// does not lie within `size`.
pub fn units_touched(
    offset: u64,
    len: u64,
    size: u64,
    unit: u64,
) -> Option<std::ops::RangeInclusive<u64>> {
    if len == 0 || unit == 0 || check_bounds(offset, len, size).is_err() {
        return None;
    }
    Some(offset / unit..=(offset + len - 1) / unit)
}

/// Largest buffer of zeroes written at once where the kernel cannot zero.
const ZERO_BUF: usize = 1 << 20;

/// A raw data file the layers write guest data into (the overlay's data
/// file, a migration target, the test file device): positional I/O through
/// [`File`] (it derefs to one), zeroing that frees or zeroes blocks in the
/// kernel where it can, and a sync that knows about punched holes.
///
/// **Why the sync differs after a punch.** `fdatasync` persists data and
/// the metadata needed to read it back, but a punched hole is an extent
/// change that `fdatasync` is not required to persist on every file
/// system; so the first sync after a punch is a full `fsync`. The flag is
/// set *before* punching and cleared by the sync that covers it, so a sync
/// racing a punch errs on the side of `fsync`.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    punched: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for RawFile {
    type Target = File;

    fn deref(&self) -> &File {
        &self.file
    }
}

impl std::os::fd::AsFd for RawFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl RawFile {
    /// Wraps an open file (or block device).
    pub fn new(file: File) -> RawFile {
        RawFile {
            file,
            punched: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes `len` bytes at `offset` of a regular file read back as zeroes:
    /// punches a hole (freeing the blocks), or where the file system cannot
    /// punch, zeroes the range in place (`ZERO_RANGE`), or else writes
    /// zeroes.
    pub fn zero_file_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        if len == 0 {
            return Ok(());
        }
        // Set before punching: the sync that follows must see it.
        self.punched
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, punch, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if !unsupported(e) => return Err(e.into()),
            Err(_) => {}
        }
        self.zero_range(offset, len)
    }

    /// Zeroes `len` bytes at `offset` in place (`fallocate(ZERO_RANGE)`,
    /// which a block device turns into a write-zeroes or unmap), falling
    /// back to writing zeroes where the kernel cannot.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if !unsupported(e) => Err(e.into()),
            Err(_) => self.write_zeroes(offset, len),
        }
    }

    /// Writes `len` zero bytes at `offset`, at most `ZERO_BUF` at a time.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (len as usize).min(ZERO_BUF)];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes every completed write and zeroing durable: `fdatasync`, or
    /// `fsync` if a hole was punched since the last sync.
    pub fn sync(&self) -> io::Result<()> {
        if self
            .punched
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.file.sync_all()
        } else {
            rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
        }
    }
}

/// Whether a fallocate error means "this mode is not available here".
fn unsupported(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::OPNOTSUPP
        || e == rustix::io::Errno::NOSYS
        || e == rustix::io::Errno::INVAL
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn zeroing_punches_holes_and_reads_back_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, vec![0xa5u8; 4 << 20]).unwrap();
        let raw = RawFile::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        );
        let before = raw.metadata().unwrap().blocks();
        raw.zero_file_range(1 << 20, 2 << 20).unwrap();
        raw.sync().unwrap();
        let mut buf = vec![1u8; 4 << 20];
        raw.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0xa5));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 0xa5));
        assert!(
            raw.metadata().unwrap().blocks() < before,
            "the hole freed blocks"
        );
        assert_eq!(raw.metadata().unwrap().len(), 4 << 20, "size kept");
        // Writing zeroes and zeroing in place read back the same way.
        raw.write_zeroes(0, 4096).unwrap();
        raw.zero_range(8192, 4096).unwrap();
        raw.read_exact_at(&mut buf[..12288], 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 0xa5));
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
    }
}
