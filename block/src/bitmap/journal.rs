//! The live journal of a [`PersistentBitmap`](super::PersistentBitmap):
//! a page-cache mirror of the *whole* bitmap as it is in memory (every set
//! bit, synced or not; a sync does not clear it), kept for a restart of the
//! daemon on the same boot of the machine. It holds more than the bits set
//! since the last sync, which is harmless: a bit that is also on disk
//! merges as a no-op.
//!
//! A persisted bit waits for a sync, which waits for a guest flush or a
//! checkpoint. That is what a power failure allows (a write the guest did
//! not flush may be lost), but not what a guest that keeps running may see
//! when only the daemon dies: its acknowledged writes must still be there
//! when QEMU reconnects to the next daemon. Their data is: `pwrite` put it
//! in the kernel's page cache, which outlives the process. Only the bits
//! that say where it is would be lost.
//!
//! So the journal starts as a copy of every word of the bitmap (after
//! merging an older journal), and every bit that goes from 0 to 1 is also
//! written, before the request that set it completes, to `<bitmap>.live`,
//! without fsync: one 8-byte `pwrite` of its whole word into the page
//! cache. The next daemon merges the
//! journal into the bitmap **only if the machine has not rebooted since**
//! (the journal records `/proc/sys/kernel/random/boot_id`): on the same
//! boot, the page cache still holds every byte the journal's bits
//! describe, because each bit was set only after its data was written. A
//! merged bit is persisted by the next sync, after its data is synced, as
//! every other bit. After a reboot the journal is ignored and the bitmap
//! on disk (consistent as of the last sync) is the truth.
//!
//! A failed sync invalidates the journal: after a failed fdatasync the
//! kernel may have dropped the data pages its bits describe.
//!
//! # Format (little endian)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic `IRLIVEBM` |
//! | 8      | 4    | version (1) |
//! | 16     | 8    | FNV-1a 64 of the bitmap's header (ties the journal to it) |
//! | 24     | 36   | boot id, as in `/proc/sys/kernel/random/boot_id` |
//! | 4088   | 8    | FNV-1a 64 of bytes 0..4088 |
//!
//! The words follow at offset 4096 exactly as in the bitmap file.
//! Concurrent writers of one word are serialised, so the last write of a
//! word always carries every bit set before it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{fnv1a, le_u32, le_u64, CHECKSUM_AT, HEADER_SIZE};

/// Magic number at offset 0.
const MAGIC: [u8; 8] = *b"IRLIVEBM";
/// Format version.
const VERSION: u32 = 1;
/// Where the boot id sits and how long it is.
const BOOT_ID_AT: usize = 24;
const BOOT_ID_LEN: usize = 36;

/// Where the kernel tells the boot id.
pub(super) const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's id of the running boot.
pub(super) type BootId = [u8; BOOT_ID_LEN];

/// This boot's id as read from `path` (the kernel's [`BOOT_ID_PATH`]
/// outside tests), or why there is none. Without it there is no journal:
/// nothing could tell a daemon restart from a reboot.
pub(super) fn boot_id(path: &Path) -> Result<BootId, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read the boot id from {}: {e}", path.display()))?;
    text.trim().as_bytes().try_into().map_err(|_| {
        format!(
            "{} does not hold a boot id ({} bytes, expected {BOOT_ID_LEN})",
            path.display(),
            text.trim().len()
        )
    })
}

/// The journal path of the bitmap at `bitmap`.
pub(super) fn path_for(bitmap: &Path) -> PathBuf {
    let mut name = bitmap.as_os_str().to_owned();
    name.push(".live");
    PathBuf::from(name)
}

fn encode_header(fingerprint: u64, boot: &[u8; BOOT_ID_LEN]) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    h[BOOT_ID_AT..BOOT_ID_AT + BOOT_ID_LEN].copy_from_slice(boot);
    let sum = fnv1a(&h[..CHECKSUM_AT]);
    h[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The words a previous daemon of this boot journaled for the bitmap
/// whose header hashes to `fingerprint`, or `None` if there is no such
/// journal (none, another boot, another bitmap, damaged).
pub(super) fn recover(
    bitmap: &Path,
    fingerprint: u64,
    nwords: usize,
    boot: &BootId,
) -> Option<Vec<u64>> {
    let path = path_for(bitmap);
    let file = File::open(&path).ok()?;
    let mut h = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut h, 0).ok()?;
    let valid = h[0..8] == MAGIC
        && le_u32(&h[8..12]) == VERSION
        && le_u64(&h[CHECKSUM_AT..]) == fnv1a(&h[..CHECKSUM_AT])
        && le_u64(&h[16..24]) == fingerprint;
    if !valid {
        tracing::warn!(path = %path.display(), "ignoring a live bitmap journal that does not belong to this bitmap");
        return None;
    }
    if h[BOOT_ID_AT..BOOT_ID_AT + BOOT_ID_LEN] != boot[..] {
        tracing::info!(path = %path.display(), "the machine rebooted since the journal was written: using the synced bitmap alone");
        return None;
    }
    let mut bytes = vec![0u8; nwords * 8];
    // A journal cut short by a full disk is a valid prefix: words past
    // its end read as zero.
    let len = file
        .metadata()
        .ok()?
        .len()
        .saturating_sub(HEADER_SIZE as u64);
    let have = (len as usize).min(bytes.len());
    file.read_exact_at(&mut bytes[..have], HEADER_SIZE as u64)
        .ok()?;
    Some(bytes.chunks_exact(8).map(le_u64).collect())
}

/// Removes the journal of the bitmap at `bitmap`, if any.
pub(super) fn remove(bitmap: &Path) {
    let path = path_for(bitmap);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove live bitmap journal")
        }
    }
}

/// An open journal.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    file: File,
    /// Serialises word writes (see the module doc).
    lock: Mutex<()>,
    /// Set once a write failed: the journal stops (what it holds stays a
    /// valid subset) and the daemon falls back to flush-time persistence.
    broken: AtomicBool,
    /// Why it broke.
    broken_reason: Mutex<Option<String>>,
}

impl Journal {
    /// Starts the journal of the bitmap at `bitmap` (header hash
    /// `fingerprint`) on boot `boot`, holding `words`, which must include
    /// every bit of an older journal. Fails (after a warning, with the
    /// reason) where the file cannot be written.
    pub(super) fn start(
        bitmap: &Path,
        fingerprint: u64,
        words: &[AtomicU64],
        boot: &BootId,
    ) -> Result<Journal, String> {
        let path = path_for(bitmap);
        let start = || -> io::Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            let len = (HEADER_SIZE + words.len() * 8) as u64;
            // Allocated now, so a journal write never meets a full disk.
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len)?;
            let bytes: Vec<u8> = words
                .iter()
                .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                .collect();
            // Words first, then the header: a superset of the old journal's
            // bits is in place before the new boot id vouches for them.
            file.write_all_at(&bytes, HEADER_SIZE as u64)?;
            file.write_all_at(&encode_header(fingerprint, boot), 0)?;
            file.set_len(len)?;
            Ok(file)
        };
        match start() {
            Ok(file) => Ok(Journal {
                path,
                file,
                lock: Mutex::new(()),
                broken: AtomicBool::new(false),
                broken_reason: Mutex::new(None),
            }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep a live bitmap journal: writes not yet flushed would not survive a daemon restart");
                Err(format!("cannot create {}: {e}", path.display()))
            }
        }
    }

    /// Why the journal stopped, or `None` while it runs.
    pub(super) fn broken(&self) -> Option<String> {
        if !self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let reason = self
            .broken_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(reason.unwrap_or_else(|| "stopped".to_string()))
    }

    /// Stops the journal for `reason` (the first reason is kept).
    fn stop(&self, reason: String) {
        self.broken_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Writes word `index` (now holding a newly set bit) to the journal.
    pub(super) fn record(&self, index: usize, word: &AtomicU64) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let value = word.load(Ordering::Acquire);
        let at = (HEADER_SIZE + index * 8) as u64;
        if let Err(e) = self.file.write_all_at(&value.to_le_bytes(), at) {
            self.stop(format!("a write to {} failed: {e}", self.path.display()));
            tracing::warn!(path = %self.path.display(), error = %e, "live bitmap journal write failed: writes not yet flushed would not survive a daemon restart");
        }
    }

    /// Makes the journal unusable for the next daemon (its bits may
    /// describe data the kernel dropped).
    pub(super) fn invalidate(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop("a sync of the bitmap failed, so its bits may describe lost data".to_string());
        if let Err(e) = self.file.write_all_at(&[0u8; 8], 0) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot invalidate live bitmap journal");
        }
    }
}

/// Rewrites the boot id of `bitmap`'s journal as if the machine had
/// rebooted since it was written.
#[cfg(test)]
pub(super) fn pretend_reboot(bitmap: &Path) {
    let path = path_for(bitmap);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut h, 0).unwrap();
    let fingerprint = le_u64(&h[16..24]);
    let other = *b"00000000-0000-0000-0000-000000000000";
    file.write_all_at(&encode_header(fingerprint, &other), 0)
        .unwrap();
}
