//! [`ProtectLayer`]: continuous protection. The layer sees every guest
//! write; it remembers which store chunks changed since the last
//! protection point, and hands the daemon's point writer an exact,
//! crash-consistent image of the disk at one instant without stalling the
//! guest while the point is copied.
//!
//! # Place in the stack
//! The guest-visible device, right under `MeteredDevice`: above the
//! `MigratingDevice` (or the overlay) while migrating, above the target
//! once complete, above a [`DiskDevice`] for `serve --disk`. Reads pass
//! straight through; writes, discards and write-zeroes are tracked. It is
//! opened on a [`Protected`], which also names the snapshot at the bottom
//! of the stack, if there is one (copy-before-write leaves grains there).
//!
//! # Changed chunks, persistent
//! Granularity is the store's chunk size. Two bitmap files in the state
//! dir ([`CHANGED_FILES`], format in `changed`) alternate roles: one is
//! *active* (chunks written since the last point started), the other holds
//! the chunks of the point being copied (*capturing*), or is empty. Before
//! a guest write's data goes down, each newly set bit's word is
//! `pwrite`n to the active file (a kill -9 loses no change); a guest flush
//! fdatasyncs both files (a power loss loses no flushed change; the
//! daemon also reads the whole disk after a reboot, see `daemon::protect`).
//! On open, the two files are merged (a point that was being copied when
//! the daemon died is abandoned: its chunks are changed again), so the
//! next point covers everything since the last complete one.
//!
//! # Written grains, in memory
//! Next to each file, a `GrainMap` (module `grains`) records which
//! 4 KiB grains ([`GRAIN`]) the guest wrote, set with the file's bit. A
//! captured chunk is read *in part* when at most half of its grains were
//! written since it was last read whole (by the points since then: what
//! the store's patch of the chunk holds, a third map updated when a point
//! finishes): the point reads only the grains written since the last
//! point ([`Point::changed_grains`], [`Point::read_ranges`]), and the
//! daemon stores a patch over the parent's chunk (`store::patch`, merged
//! with the parent's patch). The others are read whole
//! ([`Point::read_at`]): past half, the store would rebuild the chunk from
//! its base anyway. Scattered 4 KiB writes into 64 KiB chunks then cost a
//! point 4 KiB each, not 64 KiB read, hashed and compressed.
//! The maps are not persistent: on open, every grain of a chunk the files
//! mark counts as written, so a restart costs whole-chunk reads, never a
//! change. Whether a chunk is read in part is fixed when its point starts
//! (the capture's map no longer changes).
//!
//! # The point instant
//! Guest writes hold the read side of the `gate` from marking their
//! chunks until their data write returns. [`ProtectLayer::start_point`]
//! takes the write side: that waits for the writes in flight, then swaps
//! roles (the active file becomes capturing, the empty one active) and
//! reads the clock. No I/O happens under the write side. So the point
//! holds every write acknowledged before its instant, and none issued
//! after (those wait for the gate, and then go to the new active file):
//! the image is crash-consistent and the acknowledged sequence it holds
//! is a prefix.
//!
//! # Copy-before-write
//! While a point is copied, a guest write to a captured chunk that the
//! point has not read yet first preserves the old contents of the 4 KiB
//! grains it touches (not of the whole chunk), the ones not preserved yet
//! (of a chunk read in part, only the grains the point reads).
//! A grain the guest still sees as the snapshot's bytes (see below) is
//! preserved without a copy: the capture only records "in the snapshot".
//! Any other grain is copied from the layer below into `preserved`
//! (memory up to a budget, then the spill file [`SPILL_FILE`]). The
//! point's reader ([`Point::read_at`]) reads the chunk from the layer
//! below, patches the copied grains over it and then the recorded ones
//! from the snapshot. Both hold the chunk's stripe of the capture, the
//! writer across "is it still pending? which grains are not preserved?
//! classify, copy or record them", the reader across "patch, mark it
//! done". The reader reads the chunk before it takes the stripe, and the
//! snapshot's grains after it released it (the snapshot never changes),
//! so a guest write waits at most for the read of the grains it
//! overwrites, never for the point's read of a chunk.
//!
//! **Exactness.** Claim: the point reads every byte of a captured chunk as
//! it was at the instant. A guest write puts its data down only after the
//! grains it overwrites are preserved, under the gate, and only guest
//! writes change what the guest sees (the migration copier and
//! copy-on-read move bytes without changing them). So when the first
//! write after the instant to grain g preserves it, under the stripe, g
//! still holds the instant's bytes; no later write preserves g again. Then:
//! 1. a grain the point's reader finds unpreserved when it takes the
//!    stripe had no write since the instant put data down before then (a
//!    write to a pending chunk preserves first, under the stripe; once the
//!    reader marked the chunk done, under the stripe, writes no longer
//!    preserve). Its read of the chunk ended before it took the stripe, so
//!    it read the instant's bytes there (a grain written during the read
//!    is preserved by then, and patched);
//! 2. a copied grain holds the bytes read at its preservation: the
//!    instant's;
//! 3. a grain recorded as in the snapshot was seen as the snapshot's
//!    bytes at its preservation (by [`Protected`]'s rules: the overlay
//!    held none of its blocks; while migrating, also its chunk was not
//!    migrated, checked first, and the migration was not complete), so the
//!    instant's bytes were the snapshot's, which never change. Every grain
//!    of a run is classified before any of it is read, because a read of a
//!    migrating disk may migrate the chunk (copy-on-read). The snapshot
//!    layer is held by the protection layer itself, so a migration that
//!    completes mid-point (and drops its layers) does not take it away;
//!    after completion no grain is recorded as in the snapshot.
//!
//! A kill -9 loses the capture (preserved grains and records are memory or
//! scratch); the point is abandoned and its chunks re-merged on open, so
//! no point ever depends on them. `serve --disk` (a [`DiskDevice`]) and a
//! migration opened complete have no snapshot: every grain is copied.
//!
//! Why grains: the guest's writes are mostly 4 KiB and scattered, while a
//! chunk is 64 KiB. Copying whole chunks made every write that hit a
//! pending chunk (a fifth of them at 20 MB/s of random writes, points
//! every 5 s) read 64 KiB from the overlay and the store and keep 64 KiB,
//! mostly in the spill file: 64–256 µs per write instead of 4–16 µs, and a
//! spill file of hundreds of MiB per point. A grain costs one 4 KiB read.
//! Why the snapshot: a 4 KiB read of a grain the overlay does not hold
//! still fetches, decompresses and verifies its whole store chunk
//! (64–256 µs) inside the guest's write; recording it costs a bitmap
//! lookup.
//!
//! # Ending a point
//! [`Point::finish`] (after the daemon recorded the point) clears the
//! capturing file. [`Point::abandon`] (the store failed, the daemon
//! stops), or dropping the `Point`, merges the captured bits back into
//! the active file first, so nothing is lost. A failure to record a bit
//! (the state dir's disk fails) makes the next point a full read.
//!
//! # Locks (outermost first)
//! `gate` (read: a guest write; write: start/end of a point) → a capture
//! stripe (one chunk's copy) → the layer below's locks (a classification
//! reads the overlay's and the migration's bitmaps, lock-free, and the
//! migration's layers slot, a read lock). The word stripes of a changed
//! file and the `preserved` mutex are leaves. The point reader takes no
//! gate.

mod base;
mod changed;
mod disk;
mod grains;
mod preserved;

pub use base::Protected;
pub use disk::DiskDevice;
/// Bytes per grain: copy-before-write and partial point reads work in
/// grains of this size.
pub use preserved::GRAIN;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use vm_memory::VolatileSlice;

use crate::device::BlockDevice;
use base::Base;
use changed::ChangedFile;
use grains::GrainMap;
use preserved::Preserved;

/// The two changed-chunks bitmaps, in the state dir.
pub const CHANGED_FILES: [&str; 2] = ["protect-0.bitmap", "protect-1.bitmap"];
/// Old chunk contents preserved for the point being copied, beyond the
/// memory budget (scratch, deleted when the point ends and on open).
pub const SPILL_FILE: &str = "protect.preserved";
/// Default memory budget of preserved chunks.
pub const DEFAULT_PRESERVE_BUDGET: usize = 64 << 20;

/// Stripes of a capture (by chunk index).
const CAPTURE_STRIPES: usize = 1024;

/// Errors opening the protection layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or creating a changed bitmap failed.
    #[error("Failed to open protection bitmap {path}")]
    OpenBitmap {
        /// The bitmap file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A changed bitmap belongs to another geometry or format.
    #[error("Protection bitmap {path} is not usable: {why}")]
    BadBitmap {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Merging the two bitmaps on open failed.
    #[error("Failed to merge protection bitmap {path}")]
    Merge {
        /// The bitmap merged into.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The chunk size cannot be used.
    #[error("Invalid protection chunk size {0}")]
    ChunkSize(u32),
    /// The layers handed in do not fit together.
    #[error("Invalid protected layers")]
    Layers(#[source] io::Error),
}

/// A `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How to open a [`ProtectLayer`].
#[derive(Debug, Clone)]
pub struct ProtectOptions {
    /// Bytes per tracked chunk: the store's chunk size.
    pub chunk_size: u32,
    /// The next point must read every chunk (no usable parent, a reboot).
    pub full: bool,
    /// Bytes of preserved chunks kept in memory before spilling to disk.
    pub preserve_budget: usize,
}

/// Which file is active, and the point being copied.
struct Gate {
    active: usize,
    capture: Option<Arc<Capture>>,
}

/// The grain maps of a layer (see [`ProtectLayer::grains_read`]).
struct Grains {
    written: [GrainMap; 2],
    /// Changed only when a point finishes: frozen while one is copied.
    patched: GrainMap,
}

/// The point being copied.
struct Capture {
    /// The file holding its chunks (frozen until the point ends).
    file: usize,
    /// Every chunk is captured.
    full: bool,
    /// The full-read request this point satisfies.
    full_seq: u64,
    /// Captured chunks not yet read or preserved.
    pending: Vec<AtomicU64>,
    stripes: Vec<Mutex<()>>,
    /// Why the point cannot be exact (a preserve failed).
    broken: Mutex<Option<String>>,
}

impl Capture {
    fn is_pending(&self, chunk: u64) -> bool {
        self.pending
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    fn clear_pending(&self, chunk: u64) {
        if let Some(w) = self.pending.get((chunk / 64) as usize) {
            w.fetch_and(!(1 << (chunk % 64)), Ordering::AcqRel);
        }
    }

    fn stripe(&self, chunk: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(chunk % CAPTURE_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The error of a read that found its chunk no longer pending: why
    /// the point broke, or `otherwise`.
    fn not_pending(&self, otherwise: impl FnOnce() -> String) -> io::Error {
        io::Error::other(self.broken().unwrap_or_else(otherwise))
    }

    fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_broken(&self, why: String) {
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(why);
    }
}

/// The protection layer (see the module doc).
pub struct ProtectLayer {
    lower: Arc<dyn BlockDevice>,
    /// The immutable snapshot under `lower`, if it has one.
    base: Option<Base>,
    dir: PathBuf,
    size: u64,
    chunk: u64,
    nchunks: u64,
    files: [ChangedFile; 2],
    /// The grains written, next to each file, and the grains written
    /// since each chunk was last read whole by a finished point (what the
    /// store's patch of the chunk holds); `None` when the chunk size is
    /// not whole grains (every captured chunk is then read whole).
    grains: Option<Grains>,
    gate: RwLock<Gate>,
    /// Full reads requested (open with `full`, a lost bit)...
    full_requested: AtomicU64,
    /// ...and the newest request a finished point satisfied.
    full_done: AtomicU64,
    preserved: Preserved,
    /// Bits that could not be recorded, bitmap syncs that failed.
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    resumed: bool,
}

impl std::fmt::Debug for ProtectLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectLayer")
            .field("dir", &self.dir)
            .field("chunk", &self.chunk)
            .finish()
    }
}

impl ProtectLayer {
    /// Protects `lower`, with the bitmaps in `dir` (created if missing;
    /// both merged into one if a point was being copied).
    pub fn open(
        lower: impl Into<Protected>,
        dir: &Path,
        opts: &ProtectOptions,
    ) -> Result<Arc<ProtectLayer>> {
        if opts.chunk_size == 0 {
            return Err(Error::ChunkSize(opts.chunk_size));
        }
        let (lower, base) = lower.into().split().map_err(Error::Layers)?;
        let size = lower.size();
        let chunk = u64::from(opts.chunk_size);
        let open = |name: &str| ChangedFile::open_or_create(&dir.join(name), opts.chunk_size, size);
        let (f0, e0) = open(CHANGED_FILES[0])?;
        let (f1, e1) = open(CHANGED_FILES[1])?;
        let merge_err = |source| Error::Merge {
            path: f0.path().to_path_buf(),
            source,
        };
        for i in 0..f1.word_count() {
            let w = f1.word(i);
            if w != 0 {
                f0.set_word_bits(i, w).map_err(merge_err)?;
            }
        }
        f0.sync().map_err(merge_err)?;
        f1.clear().map_err(merge_err)?;
        // What changed before this open is known by chunk only: every
        // grain of those chunks counts as written.
        let grains = chunk.is_multiple_of(GRAIN).then(|| {
            let written = [GrainMap::new(size), GrainMap::new(size)];
            let per_chunk = chunk / GRAIN;
            for i in 0..f0.word_count() {
                let mut w = f0.word(i);
                while w != 0 {
                    let c = i as u64 * 64 + u64::from(w.trailing_zeros());
                    written[0].set(c * per_chunk, per_chunk);
                    w &= w - 1;
                }
            }
            Grains {
                written,
                patched: GrainMap::new(size),
            }
        });
        let full = u64::from(opts.full);
        Ok(Arc::new(ProtectLayer {
            lower,
            base,
            dir: dir.to_path_buf(),
            size,
            chunk,
            nchunks: size.div_ceil(chunk),
            files: [f0, f1],
            grains,
            gate: RwLock::new(Gate {
                active: 0,
                capture: None,
            }),
            full_requested: AtomicU64::new(full),
            full_done: AtomicU64::new(0),
            preserved: Preserved::new(&dir.join(SPILL_FILE), opts.preserve_budget, chunk),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            resumed: e0 && e1,
        }))
    }

    /// Whether the bitmaps existed before this open (protection ran on
    /// this state before).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The protected device.
    pub fn lower(&self) -> &Arc<dyn BlockDevice> {
        &self.lower
    }

    /// Bytes per tracked chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Whether the next point must read every chunk.
    pub fn full_needed(&self) -> bool {
        self.full_requested.load(Ordering::Acquire) > self.full_done.load(Ordering::Acquire)
    }

    /// Bytes changed since the last complete point (the point being
    /// copied included): what a crash of the store would lose.
    pub fn pending_bytes(&self) -> u64 {
        if self.full_needed() {
            return self.size;
        }
        let chunks = self.files[0].count() + self.files[1].count();
        (chunks * self.chunk).min(self.size)
    }

    /// Bytes of old chunk contents preserved for the point being copied.
    pub fn preserved_bytes(&self) -> u64 {
        self.preserved.bytes()
    }

    /// Failures to record a changed chunk or sync a bitmap (each makes the
    /// next point a full read), and the last one's message.
    pub fn errors(&self) -> (u64, Option<String>) {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (self.errors.load(Ordering::Relaxed), last)
    }

    /// Makes the next point (one not started yet) read every chunk: its
    /// parent is gone, or what changed is not known.
    pub fn request_full(&self) {
        self.full_requested.fetch_add(1, Ordering::AcqRel);
    }

    /// A bit could not be recorded: fall back to a full read.
    fn degrade(&self, what: &str, e: &io::Error) {
        tracing::warn!(error = %e, "protection: failed to {what}; the next point reads the whole disk");
        self.full_requested.fetch_add(1, Ordering::AcqRel);
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(format!("failed to {what}: {e}"));
    }

    fn chunk_range(&self, chunk: u64) -> (u64, usize) {
        let off = chunk * self.chunk;
        (off, (self.size - off).min(self.chunk) as usize)
    }

    /// The grains of chunk `chunk`: (first grain of the image, count).
    fn chunk_grains(&self, chunk: u64) -> (u64, u64) {
        let (off, len) = self.chunk_range(chunk);
        (off / GRAIN, (len as u64).div_ceil(GRAIN))
    }

    /// The grains of captured chunk `chunk` that `capture` reads, when it
    /// reads only the written ones: one flag per grain of the chunk.
    /// `None` when it reads the whole chunk. A chunk is read in part when
    /// its grains are tracked and, with the grains its store patch already
    /// holds (written since the chunk was last read whole), at most half
    /// of them changed: past that, the store would rebuild the whole chunk
    /// from its base anyway, and reading it here is cheaper. Fixed for the
    /// capture's life (both maps are frozen), so copy-before-write and the
    /// point's reader agree.
    fn grains_read(&self, capture: &Capture, chunk: u64) -> Option<Vec<bool>> {
        let (map, first) = self.written_grains(capture, chunk)?;
        let (_, n) = self.chunk_grains(chunk);
        Some((first..first + n).map(|g| map.get(g)).collect())
    }

    /// When `capture` reads captured chunk `chunk` in part (see
    /// [`ProtectLayer::grains_read`]): the map of its written grains and
    /// the chunk's first grain in it. No allocation: a guest write to a
    /// pending chunk asks.
    fn written_grains(&self, capture: &Capture, chunk: u64) -> Option<(&GrainMap, u64)> {
        let grains = self.grains.as_ref().filter(|_| !capture.full)?;
        let map = &grains.written[capture.file];
        let (first, n) = self.chunk_grains(chunk);
        let ones = map.count(first, n);
        let patch = map.count_union(&grains.patched, first, n);
        (ones > 0 && patch * 2 <= n).then_some((map, first))
    }

    /// Runs `write` (a guest mutation of `len` bytes at `offset`) with the
    /// gate's read side held: preserves the captured chunks it touches,
    /// marks them changed, then writes.
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if len == 0 || self.lower.read_only() || self.nchunks == 0 {
            return write();
        }
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let first = offset / self.chunk;
        let last = ((offset + len - 1) / self.chunk).min(self.nchunks - 1);
        if let Some(capture) = &gate.capture {
            for c in first..=last {
                let start = c * self.chunk;
                let lo = offset.max(start) - start;
                let hi = (offset + len).min(start + self.chunk) - start;
                self.preserve(capture, c, lo, hi);
            }
        }
        if let Err(e) = self.files[gate.active].mark(first, last) {
            self.degrade("record a changed chunk", &e);
        }
        if let Some(g) = &self.grains {
            g.written[gate.active].set_bytes(offset, len);
        }
        let r = write();
        drop(gate);
        r
    }

    /// Copy-before-write for `capture` of bytes `lo..hi` of chunk `c` (a
    /// guest mutation is about to change them), if the chunk is still
    /// pending: the grains they touch that are not preserved yet.
    fn preserve(&self, capture: &Capture, c: u64, lo: u64, hi: u64) {
        if !capture.is_pending(c) {
            return;
        }
        let _stripe = capture.stripe(c);
        if !capture.is_pending(c) {
            return;
        }
        let (_, len) = self.chunk_range(c);
        let len = len as u64;
        let grain = self.preserved.grain();
        let hi = hi.min(len);
        if hi <= lo {
            return;
        }
        let (g0, g1) = ((lo / grain) as u32, ((hi - 1) / grain) as u32);
        // A point that reads only the written grains needs no other.
        let read = self.written_grains(capture, c);
        let needed = |g: u32| read.is_none_or(|(map, first)| map.get(first + u64::from(g)));
        for (first, count) in self.preserved.missing(c, g0, g1) {
            let mut g = first;
            while g < first + count {
                if !needed(g) {
                    g += 1;
                    continue;
                }
                let run = g;
                while g < first + count && needed(g) {
                    g += 1;
                }
                let start = u64::from(run) * grain;
                let end = (u64::from(g) * grain).min(len);
                if let Err(e) = self.preserve_run(c, run, start, end) {
                    tracing::warn!(chunk = c, error = %e, "protection: failed to preserve a chunk for the point being written; the point is abandoned");
                    capture.set_broken(format!("failed to preserve chunk {c}: {e}"));
                    return;
                }
            }
        }
    }

    /// Preserves bytes `start..end` of chunk `c`, whole grains from grain
    /// `first` on, none preserved yet: the grains the guest still sees as
    /// the snapshot's are left there, the others are copied. Every grain
    /// is classified before any is read: reading a migrating disk can
    /// migrate the chunk (copy-on-read), after which none of it would
    /// count as the snapshot's.
    fn preserve_run(&self, c: u64, first: u32, start: u64, end: u64) -> io::Result<()> {
        let (off, _) = self.chunk_range(c);
        let grain = self.preserved.grain();
        // Runs of grains on the same side: (start, end, in the snapshot).
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = start;
        while at < end {
            let stop = (at + grain).min(end);
            let kind = self
                .base
                .as_ref()
                .is_some_and(|b| b.shows_snapshot(off + at, stop - at));
            match runs.last_mut() {
                Some((_, e, k)) if *k == kind => *e = stop,
                _ => runs.push((at, stop, kind)),
            }
            at = stop;
        }
        for (a, e, in_base) in runs {
            let g = first + ((a - start) / grain) as u32;
            let n = (e - a) as usize;
            if in_base {
                self.preserved.put_base(c, g, n);
            } else {
                let mut old = vec![0u8; n];
                self.lower.read_at(&mut old, off + a)?;
                self.preserved.put(c, g, old)?;
            }
        }
        Ok(())
    }

    /// Starts a point: waits for the guest writes in flight, swaps the
    /// bitmaps and reads the clock, the point's instant. `None` with the
    /// instant when nothing changed since the last point (the store
    /// already holds the disk as it is at that instant). Only one point at
    /// a time: a second call while one is open returns an error.
    pub fn start_point(self: &Arc<Self>) -> io::Result<(SystemTime, Option<Point>)> {
        let (instant, mut points) = start_points(std::slice::from_ref(self))?;
        Ok((instant, points.pop().flatten()))
    }

    /// Starts this layer's capture at `instant` under its gate, held for
    /// writing by the caller.
    fn start_under_gate(self: &Arc<Self>, gate: &mut Gate, instant: SystemTime) -> Option<Point> {
        let full_seq = self.full_requested.load(Ordering::Acquire);
        let full = full_seq > self.full_done.load(Ordering::Acquire);
        let file = gate.active;
        if !full && self.files[file].count() == 0 {
            return None;
        }
        let words = self.nchunks.div_ceil(64) as usize;
        let pending = (0..words)
            .map(|i| {
                let w = if full {
                    let left = self.nchunks - i as u64 * 64;
                    if left >= 64 {
                        u64::MAX
                    } else {
                        (1u64 << left) - 1
                    }
                } else {
                    self.files[file].word(i)
                };
                AtomicU64::new(w)
            })
            .collect();
        let capture = Arc::new(Capture {
            file,
            full,
            full_seq,
            pending,
            stripes: (0..CAPTURE_STRIPES).map(|_| Mutex::new(())).collect(),
            broken: Mutex::new(None),
        });
        gate.active = 1 - file;
        gate.capture = Some(capture.clone());
        Some(Point {
            layer: self.clone(),
            capture,
            instant,
            ended: false,
        })
    }

    /// Ends the capture: no more copy-before-write. Returns the file that
    /// is active now.
    fn end_capture(&self) -> usize {
        let mut gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        gate.capture = None;
        let active = gate.active;
        drop(gate);
        self.preserved.clear();
        active
    }

    fn abandon_capture(&self, capture: &Capture) -> io::Result<()> {
        let active = self.end_capture();
        let (src, dst) = (&self.files[capture.file], &self.files[active]);
        if let Some(g) = &self.grains {
            g.written[active].merge_from(&g.written[capture.file]);
            g.written[capture.file].clear();
        }
        let merged = (|| {
            for i in 0..src.word_count() {
                let w = src.word(i);
                if w != 0 {
                    dst.set_word_bits(i, w)?;
                }
            }
            dst.sync()?;
            src.clear()
        })();
        if let Err(e) = &merged {
            // The captured chunks may be missing from the active file.
            self.degrade("merge an abandoned point's chunks", e);
        }
        merged
    }
}

/// Starts one point on each of `layers` at one instant: write-locks every
/// layer's gate in slice order (so no guest write on any of them is in
/// flight), reads the clock once, starts each capture and releases the
/// gates. A write acknowledged before the call on any layer is in that
/// layer's point; a write started after it is in none. `None` for a layer
/// that has not changed since its last point. Fails, starting nothing,
/// when a layer is listed twice or already has a point open.
pub fn start_points(layers: &[Arc<ProtectLayer>]) -> io::Result<(SystemTime, Vec<Option<Point>>)> {
    for (i, layer) in layers.iter().enumerate() {
        if layers[..i].iter().any(|l| Arc::ptr_eq(l, layer)) {
            return Err(io::Error::other(
                "a protection layer is listed twice in one cut",
            ));
        }
    }
    let mut gates: Vec<_> = layers
        .iter()
        .map(|l| l.gate.write().unwrap_or_else(PoisonError::into_inner))
        .collect();
    if gates.iter().any(|g| g.capture.is_some()) {
        return Err(io::Error::other(
            "a protection point is already being written",
        ));
    }
    let instant = SystemTime::now();
    let points = layers
        .iter()
        .zip(gates.iter_mut())
        .map(|(layer, gate)| layer.start_under_gate(gate, instant))
        .collect();
    drop(gates);
    Ok((instant, points))
}

/// A point being copied: the disk as it was at [`Point::instant`].
/// End it with [`Point::finish`] once it is recorded, or
/// [`Point::abandon`]; dropping it abandons it.
pub struct Point {
    layer: Arc<ProtectLayer>,
    capture: Arc<Capture>,
    instant: SystemTime,
    ended: bool,
}

impl std::fmt::Debug for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Point")
            .field("instant", &self.instant)
            .field("full", &self.capture.full)
            .finish()
    }
}

impl Point {
    /// The instant the point captures.
    pub fn instant(&self) -> SystemTime {
        self.instant
    }

    /// Whether every chunk is captured (a full read).
    pub fn full(&self) -> bool {
        self.capture.full
    }

    /// Number of captured chunks.
    pub fn chunks(&self) -> u64 {
        if self.capture.full {
            self.layer.nchunks
        } else {
            self.layer.files[self.capture.file].count()
        }
    }

    /// Whether chunk `chunk` changed since the last point (read it);
    /// otherwise it is as in the last point.
    pub fn is_captured(&self, chunk: u64) -> bool {
        chunk < self.layer.nchunks
            && (self.capture.full || self.layer.files[self.capture.file].get(chunk))
    }

    /// For a captured chunk the point reads in part: one flag per 4 KiB
    /// grain of the chunk, true for the grains written since the last
    /// point (the others are as in the last point). Read those with
    /// [`Point::read_ranges`]. `None` when the chunk is read whole with
    /// [`Point::read_at`]: the point is a full read, grains are not
    /// tracked (after a restart, or a chunk size that is not whole
    /// grains), or more than half of the chunk was written.
    pub fn changed_grains(&self, chunk: u64) -> Option<Vec<bool>> {
        if !self.is_captured(chunk) {
            return None;
        }
        self.layer.grains_read(&self.capture, chunk)
    }

    /// Fills `buf` with the `(offset, len)` ranges of the image back to
    /// back, as they were at the instant. The ranges are whole written
    /// grains of chunks read in part (see [`Point::changed_grains`]), in
    /// order; every grain a chunk needs is in one call (each chunk is read
    /// once per point). Called from several threads at once.
    pub fn read_ranges(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> io::Result<()> {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        if total != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "point read of {total} bytes of grains into {} bytes",
                    buf.len()
                ),
            ));
        }
        let chunk = self.layer.chunk;
        // Split at chunk boundaries: (chunk, offset in it, len, at in buf).
        let mut pieces: Vec<(u64, usize, usize, usize)> = Vec::with_capacity(ranges.len());
        let mut at = 0usize;
        for &(offset, len) in ranges {
            let mut pos = offset;
            let end = offset + len as u64;
            while pos < end {
                let c = pos / chunk;
                let stop = end.min((c + 1) * chunk);
                let n = (stop - pos) as usize;
                pieces.push((c, (pos - c * chunk) as usize, n, at));
                at += n;
                pos = stop;
            }
        }
        let mut scratch = Vec::new();
        for group in pieces.chunk_by(|a, b| a.0 == b.0) {
            self.read_chunk_grains(group[0].0, group, buf, &mut scratch)?;
        }
        Ok(())
    }

    /// Reads `pieces` (all of chunk `c`: offset in it, length, where in
    /// `buf`) as they were at the instant, through `scratch` (the chunk).
    fn read_chunk_grains(
        &self,
        c: u64,
        pieces: &[(u64, usize, usize, usize)],
        buf: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let layer = &self.layer;
        let cap = &self.capture;
        if let Some(why) = cap.broken() {
            return Err(io::Error::other(why));
        }
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let read = (c < layer.nchunks && self.is_captured(c))
            .then(|| layer.grains_read(cap, c))
            .flatten()
            .ok_or_else(|| invalid(format!("chunk {c} is not read in part by this point")))?;
        let (off, n) = layer.chunk_range(c);
        for &(_, at, len, _) in pieces {
            let end = at + len;
            let whole = (at as u64).is_multiple_of(GRAIN)
                && ((end as u64).is_multiple_of(GRAIN) || end == n);
            let written = || {
                (at as u64 / GRAIN..=(end as u64).saturating_sub(1) / GRAIN)
                    .all(|g| read.get(g as usize).copied().unwrap_or(false))
            };
            if len == 0 || end > n || !whole || !written() {
                return Err(invalid(format!(
                    "point read of {len} bytes at {at} of chunk {c} is not whole written grains"
                )));
            }
        }
        if !cap.is_pending(c) {
            return Err(cap.not_pending(|| format!("chunk {c} was read twice by this point")));
        }
        scratch.resize(n, 0);
        // As in `read_at`: read without the stripe, then patch.
        for &(_, at, len, _) in pieces {
            layer
                .lower
                .read_at(&mut scratch[at..at + len], off + at as u64)?;
        }
        self.patch_preserved(c, scratch, off)?;
        for &(_, at, len, to) in pieces {
            buf[to..to + len].copy_from_slice(&scratch[at..at + len]);
        }
        Ok(())
    }

    /// Fills `buf` with the captured chunks from `offset` on, as they were
    /// at the instant. `offset` is chunk-aligned and `buf` covers whole
    /// chunks (the last one of the disk may be short) that the point
    /// reads whole (see [`Point::changed_grains`]); each chunk is read
    /// once per point. Called from several threads at once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let layer = &self.layer;
        let cap = &self.capture;
        let mut at = 0usize;
        while at < buf.len() {
            if let Some(why) = cap.broken() {
                return Err(io::Error::other(why));
            }
            let pos = offset + at as u64;
            let c = pos / layer.chunk;
            if !pos.is_multiple_of(layer.chunk) || c >= layer.nchunks {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("point read at {pos} is not at a chunk of the disk"),
                ));
            }
            let (_, n) = layer.chunk_range(c);
            let piece = buf.get_mut(at..at + n).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("point read of chunk {c} is cut short"),
                )
            })?;
            if !cap.is_pending(c) {
                return Err(cap.not_pending(|| {
                    format!("chunk {c} is not captured by this point, or was read twice")
                }));
            }
            if layer.written_grains(cap, c).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("chunk {c} is read in part by this point, not whole"),
                ));
            }
            // Read without the stripe (a guest write to the chunk does not
            // wait for this read): a write meanwhile preserves the grains
            // it overwrites before its data goes down, and the patch below
            // puts them back.
            layer.lower.read_at(piece, pos)?;
            self.patch_preserved(c, piece, pos)?;
            at += n;
        }
        Ok(())
    }

    /// Ends the read of chunk `c` (at image offset `off`), just read from
    /// the layer below into `chunk` (from its start) without its stripe:
    /// under the stripe, patches the grains preserved since the instant
    /// over it and marks the chunk read; then fills the grains left in the
    /// snapshot (once the stripe is free: the snapshot never changes).
    fn patch_preserved(&self, c: u64, chunk: &mut [u8], off: u64) -> io::Result<()> {
        let (layer, cap) = (&self.layer, &self.capture);
        let stripe = cap.stripe(c);
        if !cap.is_pending(c) {
            return Err(cap.not_pending(|| format!("chunk {c} was read twice by this point")));
        }
        let mut in_base = Vec::new();
        let taken = layer.preserved.take_into(c, chunk, |part, at| {
            in_base.push((at as usize, part.len()));
            Ok(())
        });
        if let Err(e) = taken {
            // The preserved grains are gone: the chunk cannot be read as
            // it was any more.
            cap.set_broken(format!(
                "failed to read the preserved grains of chunk {c}: {e}"
            ));
            return Err(e);
        }
        cap.clear_pending(c);
        drop(stripe);
        for (at, len) in in_base {
            let read = match &layer.base {
                Some(base) => base.read_at(&mut chunk[at..at + len], off + at as u64),
                None => Err(io::Error::other("no snapshot under the disk")),
            };
            if let Err(e) = read {
                cap.set_broken(format!(
                    "failed to read the snapshot's grains of chunk {c}: {e}"
                ));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The point is recorded: its chunks are no longer changed. Clears the
    /// capturing bitmap (a failure leaves stale bits, harmless).
    pub fn finish(mut self) -> io::Result<()> {
        self.ended = true;
        let layer = &self.layer;
        layer.end_capture();
        if self.capture.full {
            layer
                .full_done
                .fetch_max(self.capture.full_seq, Ordering::AcqRel);
        }
        if let Some(g) = &layer.grains {
            // What the chunks' patches hold now: the grains just read in
            // part added, none for a chunk read whole.
            let cap = &self.capture;
            for c in (0..layer.nchunks).filter(|&c| self.is_captured(c)) {
                let (first, n) = layer.chunk_grains(c);
                if layer.written_grains(cap, c).is_some() {
                    g.patched.set_from(&g.written[cap.file], first, n);
                } else {
                    g.patched.clear_range(first, n);
                }
            }
            g.written[cap.file].clear();
        }
        layer.files[self.capture.file].clear()
    }

    /// The point is not recorded: its chunks go back to the changed ones.
    pub fn abandon(mut self) -> io::Result<()> {
        self.ended = true;
        self.layer.abandon_capture(&self.capture)
    }
}

impl Drop for Point {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.layer.abandon_capture(&self.capture);
        }
    }
}

impl BlockDevice for ProtectLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.lower.read_only()
    }

    fn read_is_cheap(&self, offset: u64, len: u64) -> bool {
        self.lower.read_is_cheap(offset, len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.lower.read_at(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.lower.read_vectored_at(bufs, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.guarded(offset, buf.len() as u64, || {
            self.lower.write_at(buf, offset)
        })
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let len = crate::device::total_len(bufs);
        self.guarded(offset, len, || self.lower.write_vectored_at(bufs, offset))
    }

    /// Flushes the layer below, then makes the changed bits durable (a
    /// failed bitmap sync is not the guest's error: the next point becomes
    /// a full read).
    fn flush(&self) -> io::Result<()> {
        self.lower.flush()?;
        for f in &self.files {
            if let Err(e) = f.sync() {
                self.degrade("sync a protection bitmap", &e);
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(offset, len, || self.lower.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded(offset, len, || self.lower.write_zeroes(offset, len))
    }
}

#[cfg(test)]
mod tests;
