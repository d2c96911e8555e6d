//! A persistent bitmap whose bits only go from 0 to 1, synced in order
//! after the data it describes.
//!
//! Used for the overlay's allocation bitmap (one bit per 4 KiB block: "the
//! overlay holds this block") and for the copier's migrated bitmap (one bit
//! per chunk: "the target holds this chunk").
//!
//! # File format (version 1, little endian)
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0      | 8    | magic `IRBITMAP` |
//! | 8      | 4    | version (1) |
//! | 12     | 4    | header size (4096) |
//! | 16     | 4    | kind (1 = overlay blocks, 2 = migrated chunks, 3 = guest-written chunks) |
//! | 20     | 4    | granule: bytes of image per bit |
//! | 24     | 8    | image size in bytes |
//! | 32     | 8    | number of bits, `ceil(image size / granule)` |
//! | 40     | 2    | binding length (at most 256) |
//! | 42     | n    | binding: UTF-8, names the snapshot the bitmap belongs to |
//! | 4088   | 8    | FNV-1a 64 of bytes 0..4088 |
//!
//! The bits follow at offset 4096 as little-endian `u64` words, bit `i` in
//! word `i / 64` at position `i % 64`, padded with zeroes to whole 4 KiB
//! pages. The header is written once, when the file is created (temporary
//! file, fsync, rename, fsync of the directory), and never rewritten.
//!
//! # Ordering: bits are persisted only after their data
//!
//! A user sets a bit only after the data it describes has been written
//! (e.g. `pwrite` to the overlay data file has returned). Every set bit also
//! marks its 4 KiB bitmap page dirty. [`PersistentBitmap::sync_after`]`(f)`:
//! 1. takes a snapshot of every dirty page (clearing the dirty flags);
//! 2. calls `f`, which makes the described data durable (fdatasync of the
//!    data file or of the migration target);
//! 3. writes the snapshot pages in place and fdatasyncs the bitmap file.
//!
//! A bit in the snapshot was set before step 1, so its data was written
//! before step 1 and is durable after step 2: **a persisted bit never
//! describes data that is not durable.** A bit set after step 1 stays
//! dirty and waits for the next sync, even if it got into a page that step
//! 3 writes: the snapshot, not the live bitmap, is what reaches the disk.
//! Syncs are serialised (two overlapping syncs could otherwise let the
//! second return before the first has written a page whose dirty flag the
//! first had cleared), and a sync call returns at once if a whole sync that
//! took its snapshot after the call began has completed meanwhile, so
//! concurrent flushes from many queues coalesce.
//!
//! # Torn writes are safe
//!
//! The page written in step 3 holds a superset of the bits on disk before
//! it (bits only go 0→1 and every snapshot is taken from the live bitmap,
//! which contains everything persisted earlier). If a crash tears that
//! write at any granularity, each bit on disk is either its old value or its
//! new value; an old 1 describes data made durable by an earlier sync and a
//! new 1 describes data made durable by step 2. So any torn mix is a valid
//! bitmap; it merely lacks some bits of the sync that did not complete,
//! whose caller was never told the sync succeeded.
//!
//! # Surviving the daemon, not the machine: the live journal
//!
//! Bits also go to `<bitmap>.live` as they are set (page cache only), so a
//! daemon killed between syncs loses no acknowledged write as long as the
//! machine keeps running; see `journal`.
//!
//! # Failures
//!
//! An error in any step poisons the bitmap: every later sync fails. After
//! a failed fdatasync the kernel may have dropped dirty pages, so a later
//! fdatasync that succeeds proves nothing; the daemon must restart from
//! the state on disk, which is consistent by the argument above.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::file::sync_parent_dir;

mod journal;

/// The live journal path of the bitmap at `bitmap` (see `journal`).
pub fn journal_path(bitmap: &Path) -> PathBuf {
    journal::path_for(bitmap)
}

// On-disk format constants: do not modify, add a new version instead.
/// Magic number at offset 0.
pub const MAGIC: [u8; 8] = *b"IRBITMAP";
/// The only format version written and read.
pub const VERSION: u32 = 1;
/// Size of the header; the bits start here.
pub const HEADER_SIZE: usize = 4096;
/// The bit area is written in pages of this many bytes.
pub const PAGE_BYTES: usize = 4096;
/// Longest binding string.
pub const MAX_BINDING: usize = 256;
const CHECKSUM_AT: usize = HEADER_SIZE - 8;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;
const _: () = assert!(42 + MAX_BINDING <= CHECKSUM_AT);

/// What a bitmap's bits mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapKind {
    /// One bit per overlay block: the overlay holds the block.
    OverlayBlocks,
    /// One bit per chunk: the migration target holds the chunk.
    MigratedChunks,
    /// One bit per chunk: the guest wrote the chunk after it migrated.
    GuestWrittenChunks,
}

impl BitmapKind {
    fn code(self) -> u32 {
        match self {
            BitmapKind::OverlayBlocks => 1,
            BitmapKind::MigratedChunks => 2,
            BitmapKind::GuestWrittenChunks => 3,
        }
    }

    fn name(code: u32) -> String {
        match code {
            1 => "overlay blocks".into(),
            2 => "migrated chunks".into(),
            3 => "guest-written chunks".into(),
            n => format!("unknown kind {n}"),
        }
    }
}

/// The identity of a bitmap, stored in its header and checked on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapHeader {
    /// What the bits mean.
    pub kind: BitmapKind,
    /// Bytes of image per bit.
    pub granule: u32,
    /// Image size in bytes.
    pub image_size: u64,
    /// The snapshot the bitmap belongs to (at most 256 bytes).
    pub binding: String,
}

impl BitmapHeader {
    /// Number of bits: `ceil(image_size / granule)`.
    pub fn nbits(&self) -> u64 {
        self.image_size.div_ceil(u64::from(self.granule.max(1)))
    }

    fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        h[16..20].copy_from_slice(&self.kind.code().to_le_bytes());
        h[20..24].copy_from_slice(&self.granule.to_le_bytes());
        h[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.nbits().to_le_bytes());
        let b = self.binding.as_bytes();
        h[40..42].copy_from_slice(&(b.len() as u16).to_le_bytes());
        h[42..42 + b.len()].copy_from_slice(b);
        let sum = fnv1a(&h[..CHECKSUM_AT]);
        h[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        h
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Errors of the persistent bitmap.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the bitmap file failed.
    #[error("Failed to create bitmap {path}")]
    Create {
        /// The bitmap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening or reading the bitmap file failed.
    #[error("Failed to read bitmap {path}")]
    Read {
        /// The bitmap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a bitmap, or its header is damaged.
    #[error("Bitmap {path} is corrupt: {reason}")]
    Corrupt {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file has a format version this build does not know.
    #[error("Bitmap {path} has unsupported format version {version} (this build reads {VERSION})")]
    UnsupportedVersion {
        /// The bitmap file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The bitmap was made for something else.
    #[error("Bitmap {path} was made for {field} {found}, not {expected}")]
    Mismatch {
        /// The bitmap file.
        path: PathBuf,
        /// Which header field differs.
        field: &'static str,
        /// The value the caller expected.
        expected: String,
        /// The value in the file.
        found: String,
    },
    /// The binding string is too long for the header.
    #[error("Bitmap binding is {len} bytes long, at most {MAX_BINDING} fit")]
    BindingTooLong {
        /// Its length.
        len: usize,
    },
    /// Making the described data durable (the caller's step) failed.
    #[error("Failed to sync the data described by bitmap {path}")]
    SyncData {
        /// The bitmap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing or syncing the bitmap file failed.
    #[error("Failed to write bitmap {path}")]
    Write {
        /// The bitmap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An earlier sync failed; nothing more can be made durable.
    #[error(
        "Bitmap {path} is unusable after an earlier sync failure; restart from the state on disk"
    )]
    Poisoned {
        /// The bitmap file.
        path: PathBuf,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Create { source, .. }
            | Error::Read { source, .. }
            | Error::SyncData { source, .. }
            | Error::Write { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        // Keep the whole chain in the message: io::Error has no source chain here.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        io::Error::new(kind, msg)
    }
}

/// A persistent bitmap; see the module doc.
pub struct PersistentBitmap {
    path: PathBuf,
    file: File,
    header: BitmapHeader,
    nbits: u64,
    live: Box<[AtomicU64]>,
    dirty: Box<[AtomicBool]>,
    ones: AtomicU64,
    sync_lock: Mutex<()>,
    /// Syncs that have taken their snapshot (incremented under `sync_lock`).
    started: AtomicU64,
    /// The highest sync number that completed.
    done: AtomicU64,
    poisoned: AtomicBool,
    /// Mirror of every word of `live` in `<bitmap>.live` (page cache
    /// only), for a restart on the same boot, or why there is none.
    journal: std::result::Result<journal::Journal, String>,
}

/// Whether a bitmap's live journal runs (see `journal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalState {
    /// Every bit set is journaled: a restart of the daemon on the same
    /// boot loses none.
    Active,
    /// No journal, for the reason given: bits set since the last sync are
    /// lost if the daemon dies.
    Inactive(String),
}

impl PersistentBitmap {
    fn pages(nbits: u64) -> usize {
        (nbits.div_ceil(64) as usize).div_ceil(WORDS_PER_PAGE)
    }

    fn file_len(nbits: u64) -> u64 {
        (HEADER_SIZE + Self::pages(nbits) * PAGE_BYTES) as u64
    }

    fn check_header(header: &BitmapHeader) -> Result<()> {
        if header.binding.len() > MAX_BINDING {
            return Err(Error::BindingTooLong {
                len: header.binding.len(),
            });
        }
        Ok(())
    }

    /// Creates a bitmap with every bit clear at `path`, atomically: a
    /// temporary file is written and synced, then renamed over `path`, and
    /// the directory is synced. Replaces any file at `path`.
    pub fn create(path: &Path, header: &BitmapHeader) -> Result<PersistentBitmap> {
        Self::check_header(header)?;
        let create_err = |source| Error::Create {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let nbits = header.nbits();
        // A journal without its bitmap belongs to a bitmap that is gone.
        journal::remove(path);
        {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(create_err)?;
            f.write_all_at(&header.encode(), 0).map_err(create_err)?;
            f.set_len(Self::file_len(nbits)).map_err(create_err)?;
            f.sync_all().map_err(create_err)?;
        }
        std::fs::rename(&tmp, path).map_err(create_err)?;
        sync_parent_dir(path).map_err(create_err)?;
        Self::open(path, header)
    }

    /// Opens the bitmap at `path`, checking that its header matches `expected`.
    pub fn open(path: &Path, expected: &BitmapHeader) -> Result<PersistentBitmap> {
        Self::open_with_boot_id(path, expected, Path::new(journal::BOOT_ID_PATH))
    }

    /// [`PersistentBitmap::open`], reading the boot id from `boot_id_path`
    /// (tests make it unreadable).
    pub(crate) fn open_with_boot_id(
        path: &Path,
        expected: &BitmapHeader,
        boot_id_path: &Path,
    ) -> Result<PersistentBitmap> {
        Self::check_header(expected)?;
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        if len < HEADER_SIZE as u64 {
            return Err(corrupt(format!(
                "file is {len} bytes, shorter than its header"
            )));
        }
        let mut h = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut h, 0).map_err(read_err)?;
        if h[0..8] != MAGIC {
            return Err(corrupt("bad magic, not a bitmap file".into()));
        }
        let version = le_u32(&h[8..12]);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        if le_u64(&h[CHECKSUM_AT..]) != fnv1a(&h[..CHECKSUM_AT]) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if le_u32(&h[12..16]) as usize != HEADER_SIZE {
            return Err(corrupt(format!("header size {}", le_u32(&h[12..16]))));
        }
        let blen = u16::from_le_bytes([h[40], h[41]]) as usize;
        if blen > MAX_BINDING {
            return Err(corrupt(format!("binding length {blen}")));
        }
        let binding = String::from_utf8_lossy(&h[42..42 + blen]).into_owned();
        let mismatch = |field, expected: String, found: String| Error::Mismatch {
            path: path.to_path_buf(),
            field,
            expected,
            found,
        };
        let kind = le_u32(&h[16..20]);
        if kind != expected.kind.code() {
            return Err(mismatch(
                "kind",
                BitmapKind::name(expected.kind.code()),
                BitmapKind::name(kind),
            ));
        }
        if binding != expected.binding {
            return Err(mismatch("snapshot", expected.binding.clone(), binding));
        }
        let image_size = le_u64(&h[24..32]);
        if image_size != expected.image_size {
            return Err(mismatch(
                "image size",
                expected.image_size.to_string(),
                image_size.to_string(),
            ));
        }
        let granule = le_u32(&h[20..24]);
        if granule != expected.granule {
            return Err(mismatch(
                "granule",
                expected.granule.to_string(),
                granule.to_string(),
            ));
        }
        let nbits = expected.nbits();
        if le_u64(&h[32..40]) != nbits {
            return Err(corrupt(format!("bit count {}", le_u64(&h[32..40]))));
        }
        if len != Self::file_len(nbits) {
            return Err(corrupt(format!(
                "file is {len} bytes, expected {}",
                Self::file_len(nbits)
            )));
        }
        let mut bytes = vec![0u8; Self::pages(nbits) * PAGE_BYTES];
        file.read_exact_at(&mut bytes, HEADER_SIZE as u64)
            .map_err(read_err)?;
        let nwords = nbits.div_ceil(64) as usize;
        let fingerprint = fnv1a(&expected.encode());
        let boot = journal::boot_id(boot_id_path);
        if let Err(reason) = &boot {
            tracing::warn!(path = %path.display(), %reason, "no live bitmap journal: writes not yet flushed would not survive a daemon restart");
        }
        let journaled = boot
            .as_ref()
            .ok()
            .and_then(|b| journal::recover(path, fingerprint, nwords, b));
        let mut ones = 0u64;
        let mut recovered = 0u64;
        let mut dirty: Box<[AtomicBool]> = (0..Self::pages(nbits))
            .map(|_| AtomicBool::new(false))
            .collect();
        let live: Box<[AtomicU64]> = bytes
            .chunks_exact(8)
            .take(nwords)
            .enumerate()
            .map(|(i, w)| {
                let mut w = le_u64(w);
                let extra = journaled.as_ref().map_or(0, |j| j[i] & !w);
                if extra != 0 {
                    recovered += u64::from(extra.count_ones());
                    *dirty[i / WORDS_PER_PAGE].get_mut() = true;
                    w |= extra;
                }
                if i == nwords - 1 && !nbits.is_multiple_of(64) {
                    w &= (1u64 << (nbits % 64)) - 1;
                }
                ones += u64::from(w.count_ones());
                AtomicU64::new(w)
            })
            .collect();
        if recovered > 0 {
            tracing::info!(
                path = %path.display(),
                bits = recovered,
                "recovered bits a previous daemon set after its last sync"
            );
        }
        let journal = boot.and_then(|b| journal::Journal::start(path, fingerprint, &live, &b));
        Ok(PersistentBitmap {
            path: path.to_path_buf(),
            file,
            header: expected.clone(),
            nbits,
            live,
            dirty,
            ones: AtomicU64::new(ones),
            sync_lock: Mutex::new(()),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            journal,
        })
    }

    /// Opens the bitmap at `path` if it exists, or creates it; the flag
    /// says whether it was created.
    pub fn open_or_create(path: &Path, header: &BitmapHeader) -> Result<(PersistentBitmap, bool)> {
        match path.try_exists() {
            Ok(true) => Ok((Self::open(path, header)?, false)),
            Ok(false) => Ok((Self::create(path, header)?, true)),
            Err(source) => Err(Error::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Whether the live journal runs, and if not, why.
    pub fn journal_state(&self) -> JournalState {
        match &self.journal {
            Ok(journal) => match journal.broken() {
                None => JournalState::Active,
                Some(reason) => JournalState::Inactive(reason),
            },
            Err(reason) => JournalState::Inactive(reason.clone()),
        }
    }

    /// The bitmap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header it was opened with.
    pub fn header(&self) -> &BitmapHeader {
        &self.header
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// Whether the bitmap has no bits at all (an empty image).
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones.load(Ordering::Relaxed)
    }

    /// Whether every bit is set.
    pub fn all_set(&self) -> bool {
        self.count_ones() == self.nbits
    }

    /// Bit `bit` (false past the end).
    pub fn get(&self, bit: u64) -> bool {
        if bit >= self.nbits {
            return false;
        }
        self.live[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Sets the bits of `range` (clamped to the bitmap) and returns how many
    /// were newly set. Call it only after the data the bits describe has
    /// been written.
    pub fn set_range(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.nbits);
        let mut pos = range.start;
        let mut newly = 0;
        while pos < end {
            let word = (pos / 64) as usize;
            let lo = pos % 64;
            let hi = (end - word as u64 * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.live[word].fetch_or(mask, Ordering::AcqRel);
            let added = u64::from((mask & !old).count_ones());
            if added > 0 {
                newly += added;
                self.dirty[word / WORDS_PER_PAGE].store(true, Ordering::Release);
                if let Ok(journal) = &self.journal {
                    journal.record(word, &self.live[word]);
                }
            }
            pos = (word as u64 + 1) * 64;
        }
        self.ones.fetch_add(newly, Ordering::Relaxed);
        newly
    }

    /// Sets bit `bit`; returns whether it was newly set.
    pub fn set(&self, bit: u64) -> bool {
        self.set_range(bit..bit.saturating_add(1)) == 1
    }

    /// The value of bit `start` and the length of the run of equal bits
    /// from `start`, up to `end` (clamped to the bitmap). `(false, 0)` if
    /// the range is empty.
    pub fn run(&self, start: u64, end: u64) -> (bool, u64) {
        let end = end.min(self.nbits);
        if start >= end {
            return (false, 0);
        }
        let value = self.get(start);
        let mut pos = start;
        while pos < end {
            let w = self.live[(pos / 64) as usize].load(Ordering::Acquire);
            let differ = (if value { !w } else { w }) >> (pos % 64);
            if differ != 0 {
                pos += u64::from(differ.trailing_zeros());
                return (value, pos.min(end) - start);
            }
            pos = (pos / 64 + 1) * 64;
        }
        (value, end - start)
    }

    /// The first clear bit in `start..end`, if any.
    pub fn next_clear(&self, start: u64, end: u64) -> Option<u64> {
        let end = end.min(self.nbits);
        let (value, len) = self.run(start, end);
        match (len, value) {
            (0, _) => None,
            (_, false) => Some(start),
            (len, true) => (start + len < end).then_some(start + len),
        }
    }

    /// Makes every bit set before this call durable, after calling
    /// `make_data_durable` (see the module doc for the ordering).
    pub fn sync_after<F>(&self, make_data_durable: F) -> Result<()>
    where
        F: FnOnce() -> io::Result<()>,
    {
        // Pairs with the fence after `started` is bumped below: either a
        // sync that got a later number sees every bit our caller set, or
        // we see its number and do not count on it.
        std::sync::atomic::fence(Ordering::SeqCst);
        let want = self.started.load(Ordering::SeqCst) + 1;
        let _guard = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.done.load(Ordering::SeqCst) >= want {
            return Ok(());
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        std::sync::atomic::fence(Ordering::SeqCst);
        // 1. Snapshot the dirty pages.
        let mut pages: Vec<(usize, Vec<u8>)> = Vec::new();
        for (p, flag) in self.dirty.iter().enumerate() {
            if flag.swap(false, Ordering::AcqRel) {
                let mut buf = vec![0u8; PAGE_BYTES];
                let words = self
                    .live
                    .iter()
                    .skip(p * WORDS_PER_PAGE)
                    .take(WORDS_PER_PAGE);
                for (i, w) in words.enumerate() {
                    buf[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
                }
                pages.push((p, buf));
            }
        }
        let result = self.persist(&pages, make_data_durable);
        match result {
            Ok(()) => {
                self.done.store(number, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                for (p, _) in &pages {
                    self.dirty[*p].store(true, Ordering::Release);
                }
                self.poisoned.store(true, Ordering::SeqCst);
                if let Ok(journal) = &self.journal {
                    journal.invalidate();
                }
                tracing::error!(path = %self.path.display(), error = %e, "bitmap sync failed");
                Err(e)
            }
        }
    }

    fn persist<F>(&self, pages: &[(usize, Vec<u8>)], make_data_durable: F) -> Result<()>
    where
        F: FnOnce() -> io::Result<()>,
    {
        // 2. The data first.
        make_data_durable().map_err(|source| Error::SyncData {
            path: self.path.clone(),
            source,
        })?;
        if pages.is_empty() {
            return Ok(());
        }
        let write_err = |source| Error::Write {
            path: self.path.clone(),
            source,
        };
        // 3. Then the pages, contiguous ones in one write, then fdatasync.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j].0 == pages[j - 1].0 + 1 {
                j += 1;
            }
            let buf: Vec<u8> = pages[i..j]
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            let offset = (HEADER_SIZE + pages[i].0 * PAGE_BYTES) as u64;
            self.file.write_all_at(&buf, offset).map_err(write_err)?;
            i = j;
        }
        rustix::fs::fdatasync(&self.file).map_err(|e| write_err(e.into()))
    }

    /// Makes every bit set before this call durable (for bits whose data
    /// needs no sync, or was synced by the caller).
    pub fn sync(&self) -> Result<()> {
        self.sync_after(|| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(binding: &str, size: u64) -> BitmapHeader {
        BitmapHeader {
            kind: BitmapKind::OverlayBlocks,
            granule: 4096,
            image_size: size,
            binding: binding.into(),
        }
    }

    fn inactive_reason(bm: &PersistentBitmap) -> String {
        match bm.journal_state() {
            JournalState::Inactive(reason) => reason,
            JournalState::Active => panic!("the journal is active"),
        }
    }

    #[test]
    fn the_journal_state_says_whether_it_runs_and_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("snap-a", 4096 * 64);
        let bm = PersistentBitmap::create(&path, &h).unwrap();
        assert_eq!(bm.journal_state(), JournalState::Active);
        drop(bm);

        // The boot id cannot be read: no journal, and the reason says why.
        let missing = dir.path().join("no-boot-id");
        let bm = PersistentBitmap::open_with_boot_id(&path, &h, &missing).unwrap();
        let reason = inactive_reason(&bm);
        assert!(
            reason.starts_with("cannot read the boot id from") && reason.contains("no-boot-id"),
            "{reason}"
        );
        // Bits still work, they are just not journaled.
        assert!(bm.set(3));
        drop(bm);
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "not-a-boot-id\n").unwrap();
        let bm = PersistentBitmap::open_with_boot_id(&path, &h, &garbage).unwrap();
        assert!(
            inactive_reason(&bm).contains("does not hold a boot id"),
            "{}",
            inactive_reason(&bm)
        );
        drop(bm);

        // The journal file cannot be created.
        let live = journal_path(&path);
        let _ = std::fs::remove_file(&live);
        std::fs::create_dir(&live).unwrap();
        let bm = PersistentBitmap::open(&path, &h).unwrap();
        assert!(
            inactive_reason(&bm).starts_with("cannot create"),
            "{}",
            inactive_reason(&bm)
        );
        drop(bm);
        std::fs::remove_dir(&live).unwrap();

        // A failed sync stops a running journal.
        let bm = PersistentBitmap::open(&path, &h).unwrap();
        assert_eq!(bm.journal_state(), JournalState::Active);
        bm.set(7);
        assert!(bm
            .sync_after(|| Err(io::Error::other("injected EIO")))
            .is_err());
        assert!(
            inactive_reason(&bm).contains("sync of the bitmap failed"),
            "{}",
            inactive_reason(&bm)
        );
    }

    #[test]
    fn bits_persist_across_reopen_only_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("snap-a", 4096 * 100_000 + 512);
        let (bm, created) = PersistentBitmap::open_or_create(&path, &h).unwrap();
        assert!(created);
        assert_eq!(bm.len(), 100_001);
        assert!(bm.set(5));
        assert!(!bm.set(5));
        assert_eq!(bm.set_range(60..200), 140);
        assert_eq!(bm.set_range(99_990..200_000), 11);
        assert_eq!(bm.count_ones(), 152);
        bm.sync().unwrap();
        assert!(bm.set(70_000)); // never synced
        drop(bm);
        // The machine reboots: the page cache, and with it the live
        // journal's promise, is gone.
        journal::pretend_reboot(&path);
        let (bm, created) = PersistentBitmap::open_or_create(&path, &h).unwrap();
        assert!(!created);
        assert_eq!(bm.count_ones(), 152);
        assert!(bm.get(5) && bm.get(60) && bm.get(199) && bm.get(100_000));
        assert!(!bm.get(4) && !bm.get(59) && !bm.get(200) && !bm.get(70_000));
        assert!(!bm.get(100_001) && !bm.get(u64::MAX));
    }

    #[test]
    fn unsynced_bits_survive_a_daemon_restart_on_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("snap-a", 4096 * 10_000);
        let bm = PersistentBitmap::create(&path, &h).unwrap();
        bm.set(3);
        bm.sync().unwrap();
        bm.set_range(100..300);
        bm.set(9_999);
        // Killed: no sync, no destructor work beyond closing files.
        drop(bm);
        let bm = PersistentBitmap::open(&path, &h).unwrap();
        assert_eq!(bm.count_ones(), 202);
        assert!(bm.get(3) && bm.get(100) && bm.get(299) && bm.get(9_999));
        // Recovered bits are dirty: the next sync persists them (after the
        // data), so they no longer depend on the journal.
        bm.sync().unwrap();
        drop(bm);
        journal::pretend_reboot(&path);
        assert_eq!(PersistentBitmap::open(&path, &h).unwrap().count_ones(), 202);
    }

    #[test]
    fn a_journal_of_another_bitmap_or_a_new_bitmap_is_not_merged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let bm = PersistentBitmap::create(&path, &header("snap-a", 4096 * 64)).unwrap();
        bm.set(1);
        drop(bm);
        // Same file name, another snapshot: the journal is ignored.
        std::fs::remove_file(&path).unwrap();
        let other = header("snap-b", 4096 * 64);
        std::fs::copy(journal_path(&path), dir.path().join("saved")).unwrap();
        let bm = PersistentBitmap::create(&path, &other).unwrap();
        assert!(!journal_path(&path).exists() || !bm.get(1));
        drop(bm);
        std::fs::copy(dir.path().join("saved"), journal_path(&path)).unwrap();
        assert_eq!(
            PersistentBitmap::open(&path, &other).unwrap().count_ones(),
            0
        );
    }

    #[test]
    fn runs_and_next_clear() {
        let dir = tempfile::tempdir().unwrap();
        let bm = PersistentBitmap::create(&dir.path().join("b"), &header("s", 4096 * 300)).unwrap();
        bm.set_range(10..130);
        assert_eq!(bm.run(0, 300), (false, 10));
        assert_eq!(bm.run(10, 300), (true, 120));
        assert_eq!(bm.run(64, 100), (true, 36));
        assert_eq!(bm.run(130, 1000), (false, 170));
        assert_eq!(bm.run(299, 300), (false, 1));
        assert_eq!(bm.run(300, 400), (false, 0));
        assert_eq!(bm.next_clear(0, 300), Some(0));
        assert_eq!(bm.next_clear(10, 300), Some(130));
        assert_eq!(bm.next_clear(10, 130), None);
        bm.set_range(0..300);
        assert!(bm.all_set());
        assert_eq!(bm.next_clear(0, 300), None);
    }

    #[test]
    fn mismatched_or_damaged_headers_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        PersistentBitmap::create(&path, &header("snap-a", 1 << 20)).unwrap();
        let err = PersistentBitmap::open(&path, &header("snap-b", 1 << 20))
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("snap-a") && msg.contains("snap-b"), "{msg}");
        assert!(matches!(
            PersistentBitmap::open(&path, &header("snap-a", 2 << 20)),
            Err(Error::Mismatch {
                field: "image size",
                ..
            })
        ));
        let mut other_kind = header("snap-a", 1 << 20);
        other_kind.kind = BitmapKind::MigratedChunks;
        assert!(matches!(
            PersistentBitmap::open(&path, &other_kind),
            Err(Error::Mismatch { field: "kind", .. })
        ));
        // Flip a header byte: the checksum catches it.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 30).unwrap();
        assert!(matches!(
            PersistentBitmap::open(&path, &header("snap-a", 1 << 20)),
            Err(Error::Corrupt { .. })
        ));
        f.write_all_at(&9u32.to_le_bytes(), 8).unwrap();
        assert!(matches!(
            PersistentBitmap::open(&path, &header("snap-a", 1 << 20)),
            Err(Error::UnsupportedVersion { version: 9, .. })
        ));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            PersistentBitmap::open(&path, &header("snap-a", 1 << 20)),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            PersistentBitmap::create(&path, &header(&"x".repeat(300), 1 << 20)),
            Err(Error::BindingTooLong { len: 300 })
        ));
    }

    #[test]
    fn bits_set_during_the_data_sync_wait_for_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("s", 4096 * 64);
        let bm = PersistentBitmap::create(&path, &h).unwrap();
        bm.set(1);
        bm.sync_after(|| {
            // A write that lands while the data is being synced: its bit
            // is in the same page but must not be persisted by this sync.
            bm.set(2);
            Ok(())
        })
        .unwrap();
        // What the disk alone holds (after a reboot, without the journal).
        journal::pretend_reboot(&path);
        let reopened = PersistentBitmap::open(&path, &h).unwrap();
        assert!(reopened.get(1));
        assert!(
            !reopened.get(2),
            "a bit set after the snapshot reached the disk"
        );
        bm.sync().unwrap();
        let reopened = PersistentBitmap::open(&path, &h).unwrap();
        assert!(reopened.get(2));
    }

    #[test]
    fn a_failed_data_sync_persists_nothing_and_poisons() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("s", 4096 * 64);
        let bm = PersistentBitmap::create(&path, &h).unwrap();
        bm.set(3);
        let err = bm.sync_after(|| Err(io::Error::other("EIO"))).unwrap_err();
        assert!(matches!(err, Error::SyncData { .. }));
        assert!(!PersistentBitmap::open(&path, &h).unwrap().get(3));
        assert!(matches!(bm.sync(), Err(Error::Poisoned { .. })));
        let io: io::Error = bm.sync().unwrap_err().into();
        assert!(io.to_string().contains("restart"));
    }

    #[test]
    fn concurrent_sets_and_syncs_lose_no_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let h = header("s", 4096 * 40_000);
        let bm = PersistentBitmap::create(&path, &h).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let bm = &bm;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        bm.set(i * 4 + t);
                        if i % 1000 == 0 {
                            bm.sync().unwrap();
                        }
                    }
                    bm.sync().unwrap();
                });
            }
        });
        let reopened = PersistentBitmap::open(&path, &h).unwrap();
        assert!(reopened.all_set());
    }
}
