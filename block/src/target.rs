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
//!
//! # Exclusive use
//!
//! [`Target::open_with`] with [`TargetOpen::lock`] makes the target the
//! caller's until it is dropped:
//! - a file gets an exclusive open-file-description lock over its whole
//!   length (`F_OFD_SETLK`, write lock). Drop releases it explicitly (a
//!   child being spawned holds a copy of the descriptor until its exec),
//!   and the kernel drops it when the file is closed, however the process
//!   ends, so a stale lock never blocks a restart. QEMU takes the same
//!   kind of lock on the images it opens, so neither a second daemon nor
//!   a QEMU or `qemu-img` pointed at the target can use it while a
//!   migration writes it;
//! - a block device is opened `O_EXCL`: the kernel refuses it while another
//!   exclusive opener holds it or a file system on it is mounted.
//!
//! The OFD lock does not record who holds it (`/proc/locks` shows pid -1),
//! so [`Error::Locked`] names the holder by looking for the lock in the
//! other processes' `/proc/PID/fdinfo` (and, for a block device, for an
//! open descriptor of it in `/proc/PID/fd`).
//!
//! # Identity
//!
//! A path can come to name another file or disk between two runs (`rm` and
//! a new file, another disk under the same name after a reboot). The state
//! records a [`TargetIdentity`] when the migration starts and every later
//! start compares it with [`Target::check_identity`]:
//! - a file: the device and inode it lives on, its size, and a random id
//!   written into the file's extended attribute `user.instant-recovery.target-id`
//!   (where the file system takes user xattrs: inode numbers are reused, the
//!   random id is not);
//! - a block device: its major:minor, its size, and what the kernel says
//!   the disk is (its sysfs path, a loop device's backing file, the disk's
//!   WWID or serial when it has one). Nothing is written to the device: all
//!   of it is the guest's, and its contents change under the migration, so
//!   neither a header nor a hash of its contents could identify it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::ReadRun;
use crate::file::{check_bounds, sync_parent_dir, RawFile};

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
    /// The target does not exist and may not be created.
    #[error("Target {path} does not exist")]
    Missing {
        /// The target.
        path: PathBuf,
    },
    /// Another process uses the target.
    #[error("Target {path} is in use by {holder}")]
    Locked {
        /// The target.
        path: PathBuf,
        /// Who holds it, as far as `/proc` tells.
        holder: String,
    },
    /// The target is not the file or disk the state recorded.
    #[error("Target {path} is not the {kind} the migration started on: its {what} is {found}, the state records {recorded}")]
    IdentityMismatch {
        /// The target.
        path: PathBuf,
        /// "file" or "block device".
        kind: &'static str,
        /// What differs.
        what: &'static str,
        /// The recorded value.
        recorded: String,
        /// The value found now.
        found: String,
    },
    /// Writing the identity mark failed.
    #[error("Failed to record the identity of target {path}")]
    Mark {
        /// The target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What the target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A regular (raw image) file.
    File,
    /// A block device.
    BlockDevice,
}

/// An open migration target. See the module doc.
#[derive(Debug)]
pub struct Target {
    file: RawFile,
    path: PathBuf,
    kind: TargetKind,
    /// Size of the file or device (at least the image size).
    capacity: u64,
    image_size: u64,
    created: bool,
    /// A file under our OFD lock.
    locked: bool,
}

impl Drop for Target {
    /// Releases the OFD lock explicitly rather than by closing: a child
    /// another thread is spawning holds a copy of the descriptor until its
    /// exec, and the lock lives as long as any copy does.
    fn drop(&mut self) {
        if self.locked {
            if let Err(e) = set_ofd_lock(&self.file, libc::F_UNLCK) {
                tracing::warn!(target = %self.path.display(), "failed to unlock the target: {e}");
            }
        }
    }
}

/// How [`Target::open_with`] opens a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetOpen {
    /// Create a sparse file if nothing exists at the path.
    pub create: bool,
    /// Hold the target exclusively until it is dropped (see the module doc).
    pub lock: bool,
}

/// What a target is, recorded when a migration starts and compared on
/// every later start (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// A file or a block device.
    pub kind: TargetKind,
    /// File: the device it lives on (`st_dev`); block device: its own
    /// number (`st_rdev`). As `major:minor`.
    pub device: String,
    /// File: the inode; 0 for a block device.
    pub inode: u64,
    /// Size of the file or device in bytes.
    pub size: u64,
    /// A random id (hex) made when the migration started.
    pub id: String,
    /// Whether `id` was also written into the file's extended attribute
    /// (and must be found there).
    #[serde(default)]
    pub id_in_xattr: bool,
    /// Block device: what the kernel says the disk is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// The extended attribute holding a file target's random id.
const ID_XATTR: &str = "user.instant-recovery.target-id";

impl Target {
    /// Opens the target at `path` for an image of `image_size` bytes,
    /// creating a sparse file of that size if nothing exists there. Takes
    /// no lock (see [`Target::open_with`]).
    pub fn open(path: &Path, image_size: u64) -> Result<Target> {
        Self::open_with(
            path,
            image_size,
            TargetOpen {
                create: true,
                lock: false,
            },
        )
    }

    /// Opens the target at `path` for an image of `image_size` bytes as
    /// `how` says. A file created here and then refused (locked, too
    /// small) is removed again.
    pub fn open_with(path: &Path, image_size: u64, how: TargetOpen) -> Result<Target> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let existing = match std::fs::metadata(path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(open_err(e)),
        };
        let (mut file, created) = match existing {
            None if !how.create => {
                return Err(Error::Missing {
                    path: path.to_path_buf(),
                })
            }
            None => match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(file) => {
                    let made = (|| {
                        if how.lock {
                            lock_file(&file, path)?;
                        }
                        // Durable before any migrated bit can describe its contents.
                        file.set_len(image_size).map_err(open_err)?;
                        file.sync_all().map_err(open_err)?;
                        sync_parent_dir(path).map_err(open_err)
                    })();
                    if let Err(e) = made {
                        if !matches!(e, Error::Locked { .. }) {
                            let _ = std::fs::remove_file(path);
                        }
                        return Err(e);
                    }
                    tracing::info!(target = %path.display(), size = image_size, "created sparse target file");
                    (file, true)
                }
                // Someone else created it just now: theirs, not ours.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Self::open_with(
                        path,
                        image_size,
                        TargetOpen {
                            create: false,
                            ..how
                        },
                    )
                }
                Err(e) => return Err(open_err(e)),
            },
            Some(meta) => {
                let kind = meta.file_type();
                if !kind.is_file() && !kind.is_block_device() {
                    return Err(Error::NotFileOrDevice {
                        path: path.to_path_buf(),
                    });
                }
                let mut options = OpenOptions::new();
                options.read(true).write(true);
                if how.lock && meta.file_type().is_block_device() {
                    options.custom_flags(libc::O_EXCL);
                }
                let file = match options.open(path) {
                    Ok(file) => file,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        return Err(Error::Locked {
                            path: path.to_path_buf(),
                            holder: device_holder(path),
                        })
                    }
                    Err(e) => return Err(open_err(e)),
                };
                if how.lock && meta.file_type().is_file() {
                    lock_file(&file, path)?;
                }
                (file, false)
            }
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
            if created {
                let _ = std::fs::remove_file(path);
            }
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
            file: RawFile::new(file),
            path: path.to_path_buf(),
            kind,
            capacity,
            image_size,
            created,
            locked: how.lock && kind == TargetKind::File,
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
        self.file.zero_file_range(offset, len)
    }

    fn zero_device(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mid_start = offset.next_multiple_of(DEVICE_ALIGN);
        let mid_end = end / DEVICE_ALIGN * DEVICE_ALIGN;
        if mid_start >= mid_end {
            return self.file.write_zeroes(offset, len);
        }
        self.file.write_zeroes(offset, mid_start - offset)?;
        self.file.zero_range(mid_start, mid_end - mid_start)?;
        self.file.write_zeroes(mid_end, end - mid_end)
    }

    /// Makes every completed write and zeroing durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }

    /// Makes a new identity for this target: a fresh random id, written
    /// into a file's extended attribute where the file system allows, and
    /// what the target is now. Record it before the first chunk is written.
    pub fn mark(&self) -> Result<TargetIdentity> {
        let mark_err = |source| Error::Mark {
            path: self.path.clone(),
            source,
        };
        let mut raw = [0u8; 16];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(mark_err)?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut identity = self.current(id.clone()).map_err(mark_err)?;
        if self.kind == TargetKind::File {
            match rustix::fs::fsetxattr(
                &self.file,
                ID_XATTR,
                id.as_bytes(),
                rustix::fs::XattrFlags::empty(),
            ) {
                Ok(()) => {
                    self.file.sync_all().map_err(mark_err)?;
                    identity.id_in_xattr = true;
                }
                Err(e) => {
                    tracing::info!(target = %self.path.display(), error = %e, "file system takes no user xattr: the target is identified by device, inode and size");
                }
            }
        }
        Ok(identity)
    }

    /// Checks that this is the target `recorded` describes.
    pub fn check_identity(&self, recorded: &TargetIdentity) -> Result<()> {
        let now = self
            .current(recorded.id.clone())
            .map_err(|source| Error::Open {
                path: self.path.clone(),
                source,
            })?;
        let kind_name = |k: TargetKind| match k {
            TargetKind::File => "file",
            TargetKind::BlockDevice => "block device",
        };
        let mismatch = |what, was: String, found: String| Error::IdentityMismatch {
            path: self.path.clone(),
            kind: kind_name(recorded.kind),
            what,
            recorded: was,
            found,
        };
        if now.kind != recorded.kind {
            return Err(mismatch(
                "type",
                kind_name(recorded.kind).into(),
                kind_name(now.kind).into(),
            ));
        }
        if now.device != recorded.device {
            return Err(mismatch(
                "device",
                recorded.device.clone(),
                now.device.clone(),
            ));
        }
        if now.inode != recorded.inode {
            return Err(mismatch(
                "inode",
                recorded.inode.to_string(),
                now.inode.to_string(),
            ));
        }
        if now.size != recorded.size {
            return Err(mismatch(
                "size",
                recorded.size.to_string(),
                now.size.to_string(),
            ));
        }
        if now.disk != recorded.disk {
            return Err(mismatch(
                "disk",
                recorded.disk.clone().unwrap_or_default(),
                now.disk.clone().unwrap_or_default(),
            ));
        }
        if recorded.id_in_xattr {
            let found = self.xattr_id().unwrap_or_else(|| "none".into());
            if found != recorded.id {
                return Err(mismatch("random id", recorded.id.clone(), found));
            }
        }
        Ok(())
    }

    /// What the target is now, with `id` as its id.
    fn current(&self, id: String) -> io::Result<TargetIdentity> {
        let meta = self.file.metadata()?;
        let devno = |d: u64| format!("{}:{}", rustix::fs::major(d), rustix::fs::minor(d));
        Ok(match self.kind {
            TargetKind::File => TargetIdentity {
                kind: self.kind,
                device: devno(meta.dev()),
                inode: meta.ino(),
                size: meta.len(),
                id,
                id_in_xattr: false,
                disk: None,
            },
            TargetKind::BlockDevice => TargetIdentity {
                kind: self.kind,
                device: devno(meta.rdev()),
                inode: 0,
                size: self.capacity,
                id,
                id_in_xattr: false,
                disk: Some(disk_identity(&devno(meta.rdev()))),
            },
        })
    }

    /// The random id in the file's extended attribute, if any.
    fn xattr_id(&self) -> Option<String> {
        let mut buf = [0u8; 64];
        let n = rustix::fs::fgetxattr(&self.file, ID_XATTR, &mut buf).ok()?;
        String::from_utf8(buf[..n].to_vec()).ok()
    }
}

/// What the kernel says the block device `major:minor` is: its sysfs path,
/// a loop device's backing file, the disk's WWID or serial.
fn disk_identity(devno: &str) -> String {
    let sys = PathBuf::from(format!("/sys/dev/block/{devno}"));
    let mut parts = vec![std::fs::canonicalize(&sys)
        .map(|p| p.display().to_string())
        .unwrap_or_default()];
    for file in ["loop/backing_file", "device/wwid", "device/serial", "wwid"] {
        if let Ok(text) = std::fs::read_to_string(sys.join(file)) {
            parts.push(format!("{file}={}", text.trim()));
        }
    }
    parts.join(" ")
}

/// Takes an exclusive OFD write lock over the whole file, or names who
/// holds it.
fn lock_file(file: &File, path: &Path) -> Result<()> {
    let Err(err) = set_ofd_lock(file, libc::F_WRLCK) else {
        return Ok(());
    };
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::Locked {
            path: path.to_path_buf(),
            holder: lock_holder(file),
        }),
        _ => Err(Error::Open {
            path: path.to_path_buf(),
            source: err,
        }),
    }
}

/// Sets (`F_WRLCK`) or releases (`F_UNLCK`) an OFD lock over the whole
/// file, without waiting.
fn set_ofd_lock(file: &File, kind: libc::c_int) -> io::Result<()> {
    let lock = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: `file` is an open descriptor for the duration of the call and
    // `lock` is a valid `struct flock` that F_OFD_SETLK only reads.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The processes holding a lock on `file` (found in `/proc/PID/fdinfo`,
/// which lists the locks each open file carries).
fn lock_holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another process".into();
    };
    let dev = meta.dev();
    let key = format!(
        "{:02x}:{:02x}:{} ",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        meta.ino()
    );
    let pids = scan_proc(|pid_dir| {
        std::fs::read_dir(pid_dir.join("fdinfo"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                    info.lines()
                        .any(|l| l.starts_with("lock:") && l.contains(&key))
                })
            })
    });
    describe_holders(pids)
}

/// The processes with the block device at `path` open.
fn device_holder(path: &Path) -> String {
    let Ok(dev) = std::fs::canonicalize(path) else {
        return "another process".into();
    };
    let pids = scan_proc(|pid_dir| {
        std::fs::read_dir(pid_dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == dev))
    });
    if pids.is_empty() {
        return "the kernel (a mounted file system, a device-mapper or RAID member, or an exclusive opener)".into();
    }
    describe_holders(pids)
}

/// PIDs (other than ours, first) of processes for which `holds` is true.
fn scan_proc(holds: impl Fn(&Path) -> bool) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| holds(&Path::new("/proc").join(pid.to_string())))
        .collect();
    pids.sort_by_key(|&p| p == std::process::id());
    pids
}

fn describe_holders(pids: Vec<u32>) -> String {
    match pids.as_slice() {
        [] => "another process".into(),
        pids => {
            let names: Vec<String> = pids
                .iter()
                .map(|pid| {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim().to_string())
                        .unwrap_or_default();
                    format!("PID {pid} ({comm})")
                })
                .collect();
            names.join(", ")
        }
    }
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

    const LOCKED: TargetOpen = TargetOpen {
        create: true,
        lock: true,
    };

    #[test]
    fn a_locked_file_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let held = Target::open_with(&path, 8192, LOCKED).unwrap();
        // An OFD lock conflicts with another open description, even in the
        // same process.
        let err = Target::open_with(&path, 8192, LOCKED).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Locked { .. }), "{msg}");
        assert!(
            msg.contains(&format!("PID {}", std::process::id())),
            "{msg}"
        );
        // Unlocked opens are not refused (tests, readers).
        Target::open(&path, 8192).unwrap();
        // Free once dropped, even while another descriptor of the same open
        // file lives on (what a child being spawned holds until its exec).
        let copy = held.file.try_clone().unwrap();
        drop(held);
        let again = Target::open_with(&path, 8192, LOCKED);
        drop(copy);
        again.unwrap();
    }

    #[test]
    fn a_missing_target_is_not_created_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let how = TargetOpen {
            create: false,
            lock: true,
        };
        let err = Target::open_with(&path, 8192, how).unwrap_err();
        assert!(matches!(err, Error::Missing { .. }), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn identity_tells_a_recreated_file_from_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let t = Target::open_with(&path, 8192, LOCKED).unwrap();
        let id = t.mark().unwrap();
        assert_eq!(id.kind, TargetKind::File);
        assert_eq!(id.size, 8192);
        assert_eq!(id.id.len(), 32);
        assert!(id.id_in_xattr, "ext4 and tmpfs take user xattrs");
        t.check_identity(&id).unwrap();
        drop(t);
        // Renamed away and back: the same file.
        let moved = dir.path().join("moved.raw");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::rename(&moved, &path).unwrap();
        Target::open(&path, 8192)
            .unwrap()
            .check_identity(&id)
            .unwrap();
        // Removed and created again (possibly on the same inode number).
        std::fs::remove_file(&path).unwrap();
        let t = Target::open(&path, 8192).unwrap();
        let err = t.check_identity(&id).unwrap_err();
        assert!(matches!(err, Error::IdentityMismatch { .. }), "{err}");
        // A file of another size.
        drop(t);
        let t = Target::open(&path, 8192).unwrap();
        let mut grown = t.mark().unwrap();
        grown.size = 4096;
        let msg = t.check_identity(&grown).unwrap_err().to_string();
        assert!(
            msg.contains("size is 8192, the state records 4096"),
            "{msg}"
        );
    }

    #[test]
    fn a_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub");
        std::fs::create_dir(&path).unwrap();
        // A directory is neither a file nor a device, and is left alone.
        let err = Target::open_with(&path, 8192, LOCKED).unwrap_err();
        assert!(matches!(err, Error::NotFileOrDevice { .. }), "{err}");
        assert!(path.is_dir());
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
    fn a_block_device_is_held_exclusively_and_known_by_its_disk() {
        // Needs root and loop devices; skips loudly otherwise (and fails
        // with RECOVERY_REQUIRE_GUEST=1, as CI runs as root).
        let dir = tempfile::tempdir().unwrap();
        let attach = |name: &str| {
            let backing = dir.path().join(name);
            std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&backing)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    Some(String::from_utf8(o.stdout).unwrap().trim().to_string())
                }
                other => {
                    if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
                        panic!("cannot set up a loop device: {other:?}");
                    }
                    eprintln!("SKIPPED a_block_device_is_held_exclusively_and_known_by_its_disk: cannot set up a loop device ({other:?})");
                    None
                }
            }
        };
        let detach = |dev: &str| {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        };
        let Some(dev) = attach("a.img") else { return };
        let result = std::panic::catch_unwind(|| {
            let path = Path::new(&dev);
            let t = Target::open_with(path, 1 << 20, LOCKED).unwrap();
            assert_eq!(t.kind(), TargetKind::BlockDevice);
            let err = Target::open_with(path, 1 << 20, LOCKED).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Locked { .. }), "{msg}");
            assert!(
                msg.contains(&format!("PID {}", std::process::id())),
                "{msg}"
            );
            let id = t.mark().unwrap();
            assert!(!id.id_in_xattr);
            let disk = id.disk.clone().unwrap();
            assert!(disk.contains("a.img"), "{disk}");
            t.check_identity(&id).unwrap();
            id
        });
        detach(&dev);
        let id = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
        // Another file behind the same device node is another disk.
        let Some(other) = attach("b.img") else { return };
        let result = std::panic::catch_unwind(|| {
            let t = Target::open(Path::new(&other), 1 << 20).unwrap();
            let mut same_node = id.clone();
            same_node.device = t.mark().unwrap().device;
            let msg = t.check_identity(&same_node).unwrap_err().to_string();
            assert!(msg.contains("its disk is"), "{msg}");
        });
        detach(&other);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
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
