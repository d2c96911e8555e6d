//! The migration target: production storage the copier fills.
//!
//! A [`Target`] is either a raw image file or a block device:
//!
//! - a **missing file** is created sparse at the image size (mode 0600, the
//!   file and its directory entry fsynced before anything refers to it);
//!   only then is the target *known to be zero*, which lets the copier skip
//!   zero chunks entirely;
//! - an **existing file** or a **block device** must be at least the image
//!   size (a file is never grown or shrunk: a short one is refused, as it is
//!   probably the wrong path); its contents are unknown, so zero ranges are
//!   zeroed explicitly.
//!
//! # Zeroing without writing zeroes
//!
//! [`Target::zero`] makes a range read back as zeroes as cheaply as the
//! kernel allows:
//! - regular file: `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which frees the
//!   blocks; if the file system cannot punch, `fallocate(ZERO_RANGE)`;
//! - block device: `fallocate(ZERO_RANGE | KEEP_SIZE)`, which the kernel
//!   turns into the same zero-out as the `BLKZEROOUT` ioctl (write-zeroes or
//!   unmap on the device, no data transfer) and which needs no `unsafe`; the
//!   range is split so that only the unaligned head and tail (if any) are
//!   written as buffers of zeroes;
//! - anything else (old kernels, exotic file systems): zeroes are written in
//!   1 MiB pieces.
//!
//! # Durability
//!
//! [`Target::sync`] is `fdatasync`, or `fsync` if a hole was punched since
//! the last sync (punching changes the file's extent map, which
//! `fdatasync` is not required to persist on every file system).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::FallocateFlags;

use crate::device::ReadRun;
use crate::file::check_bounds;
use crate::file::sync_parent_dir;

/// Largest buffer of zeroes written when the kernel cannot zero a range.
const ZERO_BUF: usize = 1 << 20;

/// Alignment the block-device zero-out needs (the logical block size of
/// practically every device; an unaligned piece is written instead).
const DEVICE_ALIGN: u64 = 4096;

/// Errors opening a target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or creating the target failed.
    #[error("Failed to open target {path}")]
    Open {
        /// The target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The target is neither a regular file nor a block device.
    #[error("Target {path} is neither a regular file nor a block device")]
    NotFileOrDevice {
        /// The target.
        path: PathBuf,
    },
    /// The target is smaller than the image.
    #[error("Target {path} is {found} bytes, smaller than the {needed}-byte image")]
    TooSmall {
        /// The target.
        path: PathBuf,
        /// The image size.
        needed: u64,
        /// The target's size.
        found: u64,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What the target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A regular (raw image) file.
    File,
    /// A block device.
    BlockDevice,
}

/// An open migration target. See the module doc.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    kind: TargetKind,
    /// Size of the file or device (at least the image size).
    capacity: u64,
    image_size: u64,
    created: bool,
    punched: AtomicBool,
}

impl Target {
    /// Opens the target at `path` for an image of `image_size` bytes,
    /// creating a sparse file of that size if nothing exists there.
    pub fn open(path: &Path, image_size: u64) -> Result<Target> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let (mut file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => {
                // Durable before any migrated bit can describe its contents.
                file.set_len(image_size).map_err(open_err)?;
                file.sync_all().map_err(open_err)?;
                sync_parent_dir(path).map_err(open_err)?;
                tracing::info!(target = %path.display(), size = image_size, "created sparse target file");
                (file, true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(open_err)?,
                false,
            ),
            Err(e) => return Err(open_err(e)),
        };
        let file_type = file.metadata().map_err(open_err)?.file_type();
        let (kind, capacity) = if file_type.is_file() {
            (TargetKind::File, file.metadata().map_err(open_err)?.len())
        } else if file_type.is_block_device() {
            let end = file.seek(SeekFrom::End(0)).map_err(open_err)?;
            (TargetKind::BlockDevice, end)
        } else {
            return Err(Error::NotFileOrDevice {
                path: path.to_path_buf(),
            });
        };
        if capacity < image_size {
            return Err(Error::TooSmall {
                path: path.to_path_buf(),
                needed: image_size,
                found: capacity,
            });
        }
        if !created {
            tracing::info!(target = %path.display(), ?kind, capacity, "opened existing target");
        }
        Ok(Target {
            file,
            path: path.to_path_buf(),
            kind,
            capacity,
            image_size,
            created,
            punched: AtomicBool::new(false),
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A regular file or a block device.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// Size of the file or device, at least the image size.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The image size this target was opened for; all accesses stay below it.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Whether [`Target::open`] created the file, so that it read as all
    /// zeroes when opened.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Fills `buf` from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(offset, buf.len() as u64, self.image_size)?;
        self.file.read_exact_at(buf, offset)
    }

    /// Fills `out` from `offset`: `preadv` straight into guest memory.
    pub fn read_run(&self, out: &mut ReadRun<'_, '_>, offset: u64) -> io::Result<()> {
        check_bounds(offset, out.len() as u64, self.image_size)?;
        out.read_file(&self.file, offset)
    }

    /// Writes `buf` at `offset` (not durable until [`Target::sync`]).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_bounds(offset, buf.len() as u64, self.image_size)?;
        self.file.write_all_at(buf, offset)
    }

    /// Makes `len` bytes at `offset` read back as zeroes, without writing
    /// buffers of zeroes where the kernel can avoid it.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        check_bounds(offset, len, self.image_size)?;
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            TargetKind::File => self.zero_file(offset, len),
            TargetKind::BlockDevice => self.zero_device(offset, len),
        }
    }

    fn zero_file(&self, offset: u64, len: u64) -> io::Result<()> {
        // Set before punching: the sync that follows must see it.
        self.punched.store(true, Ordering::SeqCst);
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, punch, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if !unsupported(e) => return Err(e.into()),
            Err(_) => {}
        }
        let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, zero_range, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if !unsupported(e) => Err(e.into()),
            Err(_) => self.write_zeroes(offset, len),
        }
    }

    fn zero_device(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mid_start = offset.next_multiple_of(DEVICE_ALIGN);
        let mid_end = end / DEVICE_ALIGN * DEVICE_ALIGN;
        if mid_start >= mid_end {
            return self.write_zeroes(offset, len);
        }
        self.write_zeroes(offset, mid_start - offset)?;
        let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, mid_start, mid_end - mid_start) {
            Ok(()) => {}
            Err(e) if unsupported(e) => self.write_zeroes(mid_start, mid_end - mid_start)?,
            Err(e) => return Err(e.into()),
        }
        self.write_zeroes(mid_end, end - mid_end)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (len as usize).min(ZERO_BUF)];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes every completed write and zeroing durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.punched.swap(false, Ordering::SeqCst) {
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
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_missing_file_is_created_sparse_and_known_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let t = Target::open(&path, 8 << 20).unwrap();
        assert!(t.created());
        assert_eq!(t.kind(), TargetKind::File);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "a fresh target is not sparse"
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        drop(t);
        // Opening it again finds it: contents now unknown.
        let t = Target::open(&path, 8 << 20).unwrap();
        assert!(!t.created());
    }

    #[test]
    fn a_short_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let err = Target::open(&path, 8192).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooSmall {
                    needed: 8192,
                    found: 4096,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 4096]);
        // A character device is neither a file nor a block device.
        let err = Target::open(Path::new("/dev/null"), 8192).unwrap_err();
        assert!(matches!(err, Error::NotFileOrDevice { .. }), "{err}");
        // A larger file is fine, and accesses stay within the image.
        std::fs::write(&path, vec![7u8; 16384]).unwrap();
        let t = Target::open(&path, 8192).unwrap();
        assert_eq!(t.capacity(), 16384);
        assert!(t.write_at(&[0; 512], 8192 - 256).is_err());
        assert!(t.zero(8192, 1).is_err());
    }

    #[test]
    fn zeroing_a_file_frees_blocks_and_reads_back_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let size = 4u64 << 20;
        std::fs::write(&path, vec![0xabu8; size as usize]).unwrap();
        let t = Target::open(&path, size).unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks() * 512;
        t.zero(1 << 20, 2 << 20).unwrap();
        // Unaligned pieces too.
        t.zero(100, 50).unwrap();
        t.zero(size - 4097, 4097).unwrap();
        t.sync().unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            after + (2 << 20) - (64 << 10) <= before,
            "zeroing did not free blocks: {before} -> {after}"
        );
        let mut all = vec![0u8; size as usize];
        t.read_at(&mut all, 0).unwrap();
        for (i, &b) in all.iter().enumerate() {
            let i = i as u64;
            let zero =
                (100..150).contains(&i) || ((1 << 20)..(3 << 20)).contains(&i) || i >= size - 4097;
            assert_eq!(b, if zero { 0 } else { 0xab }, "byte {i}");
        }
    }

    #[test]
    fn block_device_target_zeroes_with_zero_range() {
        // Needs root and a loop device; skips loudly otherwise.
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::write(&backing, vec![0x5au8; 4 << 20]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
            other => {
                eprintln!("SKIPPED block_device_target_zeroes_with_zero_range: cannot set up a loop device ({other:?})");
                return;
            }
        };
        let result = std::panic::catch_unwind(|| {
            let t = Target::open(Path::new(&dev), 3 << 20).unwrap();
            assert_eq!(t.kind(), TargetKind::BlockDevice);
            assert!(!t.created());
            assert_eq!(t.capacity(), 4 << 20);
            t.zero(512, (2 << 20) + 1024).unwrap();
            t.write_at(&[1u8; 512], 0).unwrap();
            t.sync().unwrap();
            let mut all = vec![0u8; 3 << 20];
            t.read_at(&mut all, 0).unwrap();
            assert!(all[..512].iter().all(|&b| b == 1));
            assert!(all[512..(2 << 20) + 1536].iter().all(|&b| b == 0));
            assert!(all[(2 << 20) + 1536..].iter().all(|&b| b == 0x5a));
            assert!(Target::open(Path::new(&dev), 5 << 20).is_err());
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
