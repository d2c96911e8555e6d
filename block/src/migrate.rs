//! Background migration to production storage: [`MigratingDevice`].
//!
//! The device the guest sees while its disk moves from the store to a
//! [`Target`]. It sits on top of the copy-on-write [`Overlay`] (which sits
//! on the [`SnapshotLayer`]) and owns the target and a *migrated bitmap*
//! (`migrated.bitmap` in the state dir, one bit per store chunk: "the target
//! holds this chunk, and from now on the target is where it lives").
//!
//! ```text
//!  guest ──> MigratingDevice ──┬─ chunk migrated ──────> Target
//!                              └─ not migrated yet ────> Overlay ─> SnapshotLayer ─> store
//!            copier workers: Overlay/SnapshotLayer ─(chunk)─> Target, then set the bit
//! ```
//!
//! # Copying a chunk
//!
//! Under the chunk's lock: if its bit is still clear, read the chunk as the
//! guest sees it (the snapshot chunk, fetched without polluting the cache,
//! or the overlay's merge of snapshot and guest writes if the overlay
//! holds any of its blocks), write it to the target (a zero chunk is
//! skipped on a target known to be zero, otherwise zeroed with
//! fallocate/zero-out, never written as a buffer of zeroes), then set the
//! bit in memory. The bit reaches the disk later through
//! [`PersistentBitmap::sync_after`]`(target sync)`: at a copier checkpoint
//! (every 64 MiB or second) or at a guest flush.
//!
//! # Guest I/O
//!
//! | request | chunk migrated | chunk not migrated |
//! |---|---|---|
//! | read | target | copy-on-read: copy the chunk (as above; not paced by the rate limit: the guest waits for it), serve from the copy; if that fails (e.g. target full), serve from the overlay |
//! | write | target | overlay |
//! | discard, write-zeroes | zero the target range | overlay |
//! | flush | overlay flush, then target sync + migrated bitmap sync | same |
//!
//! Writes, discards and copies hold the locks of every chunk they touch
//! (a [`LockTable`]; always taken *before* the overlay's block stripes), so
//! the copier never copies a chunk while a guest write to it is under way
//! and a guest write never lands in the overlay after its chunk was copied.
//! Reads take no lock: a bit is set only after the chunk's data is on the
//! target, and bits never go back to 0.
//!
//! | operation | may run concurrently with |
//! |---|---|
//! | read of a migrated chunk | everything |
//! | read of a chunk not migrated | everything (copy-on-read takes the chunk lock) |
//! | write / discard / copy of chunk c | anything not holding chunk c's lock |
//! | flush, checkpoint | everything (bitmap syncs coalesce) |
//! | switch to passthrough | I/O holding the previous layers finishes on them; every chunk is migrated, so both paths lead to the target |
//!
//! # Crash consistency
//!
//! Claim: after a crash at any moment, the reopened device reads every
//! byte as of the guest's last completed flush, or as a later write left
//! it; and no chunk whose copy was not durable is trusted. Argument:
//!
//! 1. A migrated bit is set in memory only after the chunk's copy is on the
//!    target, and reaches the bitmap file only through `sync_after`, which
//!    syncs the target first. So a bit on disk describes a durable copy.
//! 2. The copy of chunk c reflects every guest write to c completed before
//!    it (they went to the overlay, which the copy reads under c's lock).
//!    After the bit is set, writes to c go to the target only.
//! 3. A flush syncs the overlay, then the target and every bit set before
//!    it. Take a write W to chunk c completed before a flush F. If c's bit
//!    was set before W, W went to the target and F's target sync made it
//!    durable, and the bit too. If not, W went to the overlay and F's
//!    overlay flush made it durable; after the crash, if c's bit is on disk
//!    the copy was made after W (bits are set after W or not at all before
//!    it), so it holds W; if not, c is read from the overlay, which holds W.
//! 4. A chunk whose bit is not on disk may hold anything on the target
//!    (a copy in progress, an unflushed guest write): it is never read
//!    from the target, and it is copied again in full before its bit is set.
//!    That is also why "the target is known to be zero" holds only for a
//!    target this process created, and only until a write to it fails.
//! 5. Completion syncs the target and the bitmap before `state.json` says
//!    `complete`, and frees the overlay only after that; a restart in
//!    between finds `complete` and removes the leftovers.
//!
//! # Verify
//!
//! With [`MigrationOptions::verify`], before completion every chunk is
//! read back from the target and compared with snapshot + overlay. A
//! guest write to a migrated chunk legitimately makes the two differ, so
//! the first such write to each chunk first records the chunk in
//! `guest-written.bitmap`, made durable *before* the write is issued (a
//! chunk the guest may have written is therefore always recorded), and
//! verify skips recorded chunks.
//!
//! # Failures
//!
//! - A chunk the store cannot read (corrupt or missing) is marked failed
//!   (logged with its index and offset) and the copier goes on; at the
//!   end the state is `failed` with the count. [`MigratingDevice::resume`]
//!   retries failed chunks (a chunk the guest has since overwritten whole
//!   no longer needs the store). Nothing is written to the target for a
//!   failed chunk and its bit stays clear, so the target never holds a
//!   guessed chunk; guest reads of it keep failing with an I/O error.
//!   With a repair source ([`MigratingDevice::set_repair_source`],
//!   `--repair-from`), such a chunk is taken from another snapshot of the
//!   same image instead, under the guest's own blocks; see the `repair`
//!   module for why that is only ever the operator's explicit choice.
//! - A target write error (ENOSPC, EIO) is retried with backoff and shown
//!   in the status; guest writes to migrated chunks fail with that error,
//!   reads keep working (copy-on-read falls back to the overlay), and
//!   everything resumes once the target accepts writes again.
//! - A failed sync poisons the bitmap (see [`crate::bitmap`]): the state
//!   turns `failed`, flushes fail, and the daemon must restart from disk.

mod copier;
mod progress;
#[cfg(test)]
mod proptests;
mod repair;
#[cfg(test)]
mod tests;
mod throttle;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::bitmap::{self, BitmapHeader, BitmapKind, JournalState, PersistentBitmap};
use crate::cache::ChunkData;
use crate::device::{total_len, BlockDevice, ReadDest, ReadRun};
use crate::file::check_bounds;
use crate::overlay::{LockTable, Overlay};
use crate::snapshot::SnapshotLayer;
use crate::source::chunk_len;
use crate::state::{LayerFile, LayerState, MigrationState};
use crate::target::Target;

use progress::Progress;
use repair::Repair;
pub use throttle::RateLimiter;
use throttle::RateWindow;

/// Stripes of the chunk lock table.
const CHUNK_LOCK_STRIPES: usize = 4096;

/// How long after a target write error copy-on-read is not attempted.
const TARGET_ERROR_HOLDOFF: Duration = Duration::from_secs(1);

/// Settings of a migration.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Copy rate limit in bytes per second; 0 means unlimited. Changeable
    /// at run time with [`MigratingDevice::set_rate`]. Paces the background
    /// copier; copy-on-read (the guest's demand) and zero chunks (which
    /// cost nothing) are not paced.
    pub copy_rate: u64,
    /// Chunks copied in parallel by the background copier.
    pub workers: usize,
    /// Whether a guest read of a chunk not yet migrated migrates it first.
    pub copy_on_read: bool,
    /// Compare the target with snapshot + overlay before completing.
    pub verify: bool,
    /// Checkpoint (sync target, persist bits) after this many copied bytes...
    pub checkpoint_bytes: u64,
    /// ...or after this long, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Guest I/O within this window makes the copier back off.
    pub yield_window: Duration,
    /// The longest a copier worker backs off before copying anyway, so a
    /// guest that never pauses does not stall the migration.
    pub max_yield: Duration,
    /// How often the copier logs its progress.
    pub log_interval: Duration,
    /// A limiter shared with other migrations (`instant-boot --plan`: one
    /// copy-rate limit for every disk of a service); when set,
    /// `copy_rate` is not used and [`MigratingDevice::set_rate`] changes
    /// the shared limit.
    pub shared_limit: Option<Arc<RateLimiter>>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            copy_rate: 0,
            workers: 16,
            copy_on_read: true,
            verify: false,
            checkpoint_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            yield_window: Duration::from_millis(5),
            max_yield: Duration::from_millis(50),
            log_interval: Duration::from_secs(10),
            shared_limit: None,
        }
    }
}

/// Errors opening a migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layers handed in do not describe the same image.
    #[error("Migration layers disagree: {0}")]
    Layers(String),
    /// The overlay is read-only, so guest writes could not go anywhere.
    #[error("Cannot migrate with a read-only overlay")]
    ReadOnlyOverlay,
    /// The state dir migrates to another target.
    #[error("State dir migrates to {recorded}, not {given}; pass the same --target or use another --state")]
    TargetMismatch {
        /// The target recorded in `state.json`.
        recorded: PathBuf,
        /// The target given now.
        given: PathBuf,
    },
    /// The target was created now, but chunks are recorded as migrated to it.
    #[error("Target {path} did not exist, but the state records {chunks} chunks migrated to it; restore the target or start over with a new --state")]
    TargetRecreated {
        /// The target.
        path: PathBuf,
        /// Chunks recorded as migrated.
        chunks: u64,
    },
    /// The migration is not complete, so the store and overlay are needed.
    #[error("Migration to {target} is not complete")]
    NotComplete {
        /// The target.
        target: PathBuf,
    },
    /// Resolving the target path failed.
    #[error("Failed to resolve target path {path}")]
    ResolveTarget {
        /// The target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing `state.json` failed.
    #[error("Failed to record the migration in the state dir")]
    State(#[source] io::Error),
    /// Opening a bitmap failed.
    #[error("Failed to open the migration bitmaps")]
    Bitmap(#[source] bitmap::Error),
    /// Starting the copier thread failed.
    #[error("Failed to start the copier")]
    Spawn(#[source] io::Error),
    /// The repair snapshot is not a snapshot of the same image.
    #[error("Repair snapshot {reference} has {what} {found}, the served snapshot has {expected}: --repair-from needs another snapshot of the same image")]
    RepairGeometry {
        /// The repair snapshot.
        reference: String,
        /// `image size` or `chunk size`.
        what: &'static str,
        /// Its value in the repair snapshot.
        found: u64,
        /// Its value in the served snapshot.
        expected: u64,
    },
    /// A repair source was set twice.
    #[error("A repair snapshot is already set ({0})")]
    RepairAlreadySet(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What the running copier is doing (see [`crate::state`] for how this
/// relates to the persistent record and the operator's view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationPhase {
    /// The copier is moving chunks (or will, once the guest is idle).
    Migrating,
    /// The operator paused the copier; guest I/O goes on.
    Paused,
    /// Every chunk is on the target; all I/O passes straight to it.
    Complete,
    /// The copier stopped on an error it cannot get past (see the reason).
    Failed,
}

impl MigrationPhase {
    /// Complete or failed: the copier will not move on by itself.
    pub fn is_finished(self) -> bool {
        matches!(self, MigrationPhase::Complete | MigrationPhase::Failed)
    }
}

/// A point-in-time report of the migration, which the daemon turns into
/// the operator's status.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStatus {
    /// What the copier is doing.
    pub phase: MigrationPhase,
    /// Why the state is `failed`, or a target error being retried.
    pub error: Option<String>,
    /// The target path.
    pub target: String,
    /// Image size.
    pub bytes_total: u64,
    /// Bytes of the image on the target (`bytes_copied + bytes_skipped`,
    /// but for a migration completed before this process started).
    pub bytes_migrated: u64,
    /// Bytes of data the migration has to move, done or not (zero chunks
    /// excluded; see the `progress` module).
    pub bytes_to_copy: u64,
    /// Bytes written to the target as data.
    pub bytes_copied: u64,
    /// Bytes migrated as zeroes, without a copy.
    pub bytes_skipped: u64,
    /// Bytes migrated by copy-on-read since this process started.
    pub bytes_copied_on_read: u64,
    /// Chunks in the image.
    pub chunks_total: u64,
    /// Chunks on the target.
    pub chunks_migrated: u64,
    /// Chunks the store could not deliver.
    pub chunks_failed: u64,
    /// Chunks taken from the repair snapshot (see [`MigratingDevice::set_repair_source`]).
    pub chunks_repaired: u64,
    /// Data written to the target over the last few seconds, bytes per
    /// second (copied bytes only; never above `rate_limit` when set).
    pub copy_rate: f64,
    /// Configured rate limit, 0 = unlimited.
    pub rate_limit: u64,
    /// Seconds until the data left to copy is on the target, at the
    /// current rate.
    pub eta_seconds: Option<f64>,
    /// Bytes held in the overlay (0 once it is freed).
    pub overlay_bytes: u64,
    /// Bytes of guest writes that went to the overlay (their chunk not
    /// migrated yet), since this process started.
    pub overlay_write_bytes: u64,
    /// Whether the live journals of the overlay and migration bitmaps run.
    pub journal: JournalState,
}

/// The layers a migration in progress reads from; dropped on completion.
struct Layers {
    overlay: Arc<Overlay>,
    snapshot: Arc<SnapshotLayer>,
    migrated: PersistentBitmap,
    guest_written: PersistentBitmap,
    locks: LockTable,
}

/// Where the migration is.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Migrating,
    Failed(String),
    Complete,
}

/// Run-time controls, guarded by one mutex with one condvar.
struct Ctl {
    phase: Phase,
    paused: bool,
    stop: bool,
    retry: bool,
}

/// A chunk read for copying.
enum ChunkBuf {
    Shared(ChunkData),
    Owned(Vec<u8>),
}

impl ChunkBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            ChunkBuf::Shared(b) => b,
            ChunkBuf::Owned(b) => b,
        }
    }
}

/// The outcome of a chunk copy.
enum Copied {
    /// Somebody migrated it first.
    Already,
    /// Copied; `None` for an all-zero chunk.
    Now(Option<ChunkBuf>),
}

/// Why a chunk copy failed.
enum CopyError {
    /// Reading the chunk (store or overlay) failed: the chunk is bad.
    Read(io::Error),
    /// Writing the target failed: retry later.
    Write(io::Error),
}

/// Marks guest activity for the duration of a request.
struct GuestIo<'a>(&'a MigratingDevice);

impl Drop for GuestIo<'_> {
    fn drop(&mut self) {
        self.0.touch_guest();
        self.0.guest_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A [`BlockDevice`] migrating itself to a [`Target`]. See the module doc.
pub struct MigratingDevice {
    size: u64,
    chunk_size: u32,
    chunks: u64,
    target: Target,
    state: Arc<dyn LayerState>,
    opts: MigrationOptions,
    /// `None` once complete: all I/O passes to the target.
    layers: RwLock<Option<Arc<Layers>>>,
    ctl: Mutex<Ctl>,
    ctl_changed: Condvar,
    failed: Mutex<BTreeMap<u64, String>>,
    target_error: Mutex<Option<(Instant, String)>>,
    known_zero: AtomicBool,
    cursor: Mutex<u64>,
    limiter: Arc<RateLimiter>,
    window: Mutex<RateWindow>,
    bytes_copied_on_read: AtomicU64,
    progress: Progress,
    /// Data bytes the background copier wrote to the target (the rate
    /// limit's business), since this process started.
    copier_copied: AtomicU64,
    overlay_write_bytes: AtomicU64,
    /// Copier workers between deciding to copy and finishing the chunk.
    copier_busy: AtomicU64,
    /// Turns copier workers spent waiting out a pause.
    paused_turns: AtomicU64,
    since_checkpoint: AtomicU64,
    guest_written_unreliable: AtomicBool,
    epoch: Instant,
    guest_in_flight: AtomicU64,
    last_guest_io_ns: AtomicU64,
    copier: Mutex<Option<JoinHandle<()>>>,
    repair: OnceLock<Repair>,
}

impl MigratingDevice {
    /// Opens (or resumes) the migration recorded in `state` to `target`,
    /// over `overlay`, whose lower layer must be `snapshot`. If `state`
    /// says the migration is complete, returns a passthrough device (as
    /// [`MigratingDevice::open_complete`]) and the layers are not used.
    /// The copier does not run until [`MigratingDevice::start`].
    pub fn open(
        state: Arc<dyn LayerState>,
        overlay: Arc<Overlay>,
        snapshot: Arc<SnapshotLayer>,
        target: Target,
        opts: MigrationOptions,
    ) -> Result<Arc<MigratingDevice>> {
        if state.migration().0 == MigrationState::Complete {
            return Self::open_complete(state, target);
        }
        let size = snapshot.size();
        let chunk_size = snapshot.chunk_size();
        let (recorded_size, recorded_chunk) = state.geometry();
        let (recorded_state, recorded_target) = state.migration();
        let mismatch = [
            ("overlay size", overlay.size(), size),
            ("target image size", target.image_size(), size),
            ("state image size", recorded_size, size),
            (
                "state chunk size",
                u64::from(recorded_chunk),
                u64::from(chunk_size),
            ),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b);
        if let Some((what, found, expected)) = mismatch {
            return Err(Error::Layers(format!(
                "{what} is {found}, the snapshot has {expected}"
            )));
        }
        if overlay.read_only() {
            return Err(Error::ReadOnlyOverlay);
        }
        let canonical = check_target(&*state, &target)?;
        if recorded_target.is_none() || recorded_state != MigrationState::InProgress {
            state
                .set_migration(MigrationState::InProgress, Some(canonical.clone()))
                .map_err(Error::State)?;
        }
        let binding = state.binding_tag();
        let header = |kind| BitmapHeader {
            kind,
            granule: chunk_size,
            image_size: size,
            binding: binding.clone(),
        };
        let (migrated, _) = PersistentBitmap::open_or_create(
            &state.path(LayerFile::MigratedBitmap),
            &header(BitmapKind::MigratedChunks),
        )
        .map_err(Error::Bitmap)?;
        if target.created() && migrated.count_ones() > 0 {
            return Err(Error::TargetRecreated {
                path: target.path().to_path_buf(),
                chunks: migrated.count_ones(),
            });
        }
        let (guest_written, _) = PersistentBitmap::open_or_create(
            &state.path(LayerFile::GuestWrittenBitmap),
            &header(BitmapKind::GuestWrittenChunks),
        )
        .map_err(Error::Bitmap)?;
        let chunks = migrated.len();
        let progress = count_progress(&overlay, &snapshot, &migrated, size, chunk_size);
        let sums = progress.sums();
        tracing::info!(
            target = %target.path().display(),
            chunks,
            migrated = migrated.count_ones(),
            chunk_size,
            bytes_to_copy = sums.to_copy(),
            bytes_copied = sums.copied,
            bytes_skipped = sums.skipped,
            "migration opened"
        );
        let known_zero = target.created();
        let layers = Layers {
            overlay,
            snapshot,
            migrated,
            guest_written,
            locks: LockTable::new(CHUNK_LOCK_STRIPES),
        };
        Ok(Arc::new(Self::assemble(
            state,
            target,
            size,
            chunk_size,
            Some(layers),
            Phase::Migrating,
            known_zero,
            opts,
            progress,
        )))
    }

    /// Opens a completed migration: every request goes to `target`; the
    /// store and overlay are not needed. Removes overlay files left by a
    /// crash during completion.
    pub fn open_complete(
        state: Arc<dyn LayerState>,
        target: Target,
    ) -> Result<Arc<MigratingDevice>> {
        let (recorded_state, _) = state.migration();
        let (image_size, chunk_size) = state.geometry();
        if recorded_state != MigrationState::Complete {
            return Err(Error::NotComplete {
                target: target.path().to_path_buf(),
            });
        }
        if target.image_size() != image_size {
            return Err(Error::Layers(format!(
                "target image size is {}, the state has {image_size}",
                target.image_size(),
            )));
        }
        check_target(&*state, &target)?;
        crate::overlay::remove_files(&*state);
        tracing::info!(target = %target.path().display(), "migration complete: serving the target alone");
        let size = image_size;
        Ok(Arc::new(Self::assemble(
            state,
            target,
            size,
            chunk_size,
            None,
            Phase::Complete,
            false,
            MigrationOptions::default(),
            Progress::new(0),
        )))
    }

    /// Whether the migration recorded in `state` is complete, so
    /// [`MigratingDevice::open_complete`] applies and the store, snapshot
    /// and overlay need not be opened.
    pub fn is_complete_in(state: &dyn LayerState) -> bool {
        state.migration().0 == MigrationState::Complete
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        state: Arc<dyn LayerState>,
        target: Target,
        size: u64,
        chunk_size: u32,
        layers: Option<Layers>,
        phase: Phase,
        known_zero: bool,
        opts: MigrationOptions,
        progress: Progress,
    ) -> MigratingDevice {
        MigratingDevice {
            size,
            chunk_size,
            chunks: size.div_ceil(u64::from(chunk_size)),
            target,
            state,
            limiter: opts
                .shared_limit
                .clone()
                .unwrap_or_else(|| Arc::new(RateLimiter::new(opts.copy_rate))),
            opts,
            layers: RwLock::new(layers.map(Arc::new)),
            ctl: Mutex::new(Ctl {
                phase,
                paused: false,
                stop: false,
                retry: false,
            }),
            ctl_changed: Condvar::new(),
            failed: Mutex::new(BTreeMap::new()),
            target_error: Mutex::new(None),
            known_zero: AtomicBool::new(known_zero),
            cursor: Mutex::new(0),
            window: Mutex::new(RateWindow::new(Duration::from_secs(5))),
            bytes_copied_on_read: AtomicU64::new(0),
            progress,
            copier_copied: AtomicU64::new(0),
            overlay_write_bytes: AtomicU64::new(0),
            copier_busy: AtomicU64::new(0),
            paused_turns: AtomicU64::new(0),
            since_checkpoint: AtomicU64::new(0),
            guest_written_unreliable: AtomicBool::new(false),
            epoch: Instant::now(),
            guest_in_flight: AtomicU64::new(0),
            last_guest_io_ns: AtomicU64::new(0),
            copier: Mutex::new(None),
            repair: OnceLock::new(),
        }
    }

    /// Starts the background copier (once; later calls do nothing). Does
    /// nothing on a completed migration.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        let mut slot = lock(&self.copier);
        if slot.is_some() || self.layers().is_none() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("copier".into())
            .spawn(move || copier::run(weak))
            .map_err(Error::Spawn)?;
        *slot = Some(handle);
        Ok(())
    }

    /// Stops the copier after its in-flight chunks and makes the progress
    /// durable (a final checkpoint). Guest I/O keeps working.
    pub fn shutdown(&self) -> io::Result<()> {
        self.halt();
        match self.layers() {
            Some(l) => self.checkpoint(&l),
            None => self.target.sync(),
        }
    }

    /// Stops the copier threads without syncing anything, as a crash would
    /// (tests), and waits for them.
    pub(crate) fn halt(&self) {
        self.update_ctl(|c| c.stop = true);
        let handle = lock(&self.copier).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Stops the copier after its in-flight chunks; guest I/O goes on.
    pub fn pause(&self) {
        self.update_ctl(|c| c.paused = true);
        tracing::info!("migration paused");
    }

    /// Restarts a paused copier, and retries chunks that failed.
    pub fn resume(&self) {
        self.update_ctl(|c| {
            c.paused = false;
            c.retry = true;
            // A failure that stopped the copier (a failed sync) needs a restart.
            if !c.stop && matches!(c.phase, Phase::Failed(_)) {
                c.phase = Phase::Migrating;
            }
        });
        tracing::info!("migration resumed");
    }

    /// Sets the copy rate limit in bytes per second; 0 = unlimited.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.limiter.set_rate(bytes_per_second);
        tracing::info!(bytes_per_second, "copy rate limit set");
    }

    /// Waits until the migration is complete or failed, or `timeout`
    /// passes; returns the state then.
    pub fn wait(&self, timeout: Duration) -> MigrationPhase {
        let deadline = Instant::now() + timeout;
        let mut ctl = lock(&self.ctl);
        loop {
            match ctl.phase {
                Phase::Complete => return MigrationPhase::Complete,
                Phase::Failed(_) => return MigrationPhase::Failed,
                Phase::Migrating => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return if ctl.paused {
                    MigrationPhase::Paused
                } else {
                    MigrationPhase::Migrating
                };
            }
            ctl = self
                .ctl_changed
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The chunk (migration granule) size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Whether every chunk is on the target and I/O passes straight to it.
    pub fn is_complete(&self) -> bool {
        self.layers().is_none()
    }

    /// The snapshot layer under the overlay; `None` once complete.
    pub fn snapshot(&self) -> Option<Arc<SnapshotLayer>> {
        self.layers().map(|l| l.snapshot.clone())
    }

    /// Whether the guest sees `offset..offset + len` as the snapshot's
    /// bytes: the migration is not complete, no chunk of the range is
    /// migrated, and the overlay holds none of its blocks, checked in that
    /// order. Once true it stays true until a guest write to the range:
    /// bits never clear, a guest write lands in the overlay while its
    /// chunk is not migrated (so a clear migrated bit means every write to
    /// the chunk went to the overlay), and the copier moves the bytes to
    /// the target unchanged. (A chunk the store cannot deliver reads as an
    /// error, and as the snapshot's bytes once repaired.)
    pub fn shows_snapshot(&self, offset: u64, len: u64) -> bool {
        let Some(l) = self.layers() else {
            return false;
        };
        if len == 0 || offset.saturating_add(len) > self.size {
            return false;
        }
        let cs = u64::from(self.chunk_size);
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        let (migrated, run) = l.migrated.run(first, last + 1);
        !migrated && first + run > last && !l.overlay.any_present(offset, len)
    }

    /// Chunks the store could not deliver, with the reason.
    pub fn failed_chunks(&self) -> Vec<(u64, String)> {
        lock(&self.failed)
            .iter()
            .map(|(c, r)| (*c, r.clone()))
            .collect()
    }

    /// A fresh status report of the migration.
    pub fn status(&self) -> MigrationStatus {
        let layers = self.layers();
        let sums = self.progress.sums();
        let (chunks_migrated, bytes_migrated, overlay_bytes) = match &layers {
            None => (self.chunks, self.size, 0),
            Some(l) => (
                l.migrated.count_ones(),
                self.migrated_bytes(l),
                l.overlay.allocated_bytes(),
            ),
        };
        let rate_limit = self.limiter.rate();
        let copy_rate = {
            let mut w = lock(&self.window);
            w.sample(Instant::now(), self.copier_copied.load(Ordering::Relaxed));
            w.rate()
        };
        // The copier's data bytes only (not zero chunks, not copy-on-read).
        // The limiter holds its long-run rate to the limit; a window that
        // happens to hold one chunk more than its share (or a limit just
        // lowered) must not show a rate above it.
        let copy_rate = if rate_limit > 0 {
            copy_rate.min(rate_limit as f64)
        } else {
            copy_rate
        };
        let ctl = lock(&self.ctl);
        let (phase, mut error) = match (&ctl.phase, ctl.paused) {
            (Phase::Complete, _) => (MigrationPhase::Complete, None),
            (Phase::Failed(reason), _) => (MigrationPhase::Failed, Some(reason.clone())),
            (Phase::Migrating, true) => (MigrationPhase::Paused, None),
            (Phase::Migrating, false) => (MigrationPhase::Migrating, None),
        };
        drop(ctl);
        if error.is_none() && phase != MigrationPhase::Complete {
            error = lock(&self.target_error)
                .as_ref()
                .map(|(_, e)| format!("Target write failed, retrying: {e}"));
        }
        let eta_seconds = match phase {
            MigrationPhase::Complete => Some(0.0),
            MigrationPhase::Failed | MigrationPhase::Paused => None,
            // Only zero chunks left: they cost nothing.
            _ if sums.pending == 0 => Some(0.0),
            _ if copy_rate > 0.0 => Some(sums.pending as f64 / copy_rate),
            _ => None,
        };
        let journal = match &layers {
            None => JournalState::Inactive(
                "not needed: the migration is complete and writes go straight to the target"
                    .to_string(),
            ),
            Some(l) => [
                ("overlay", l.overlay.bitmap()),
                ("migrated", &l.migrated),
                ("guest-written", &l.guest_written),
            ]
            .into_iter()
            .find_map(|(name, bitmap)| match bitmap.journal_state() {
                JournalState::Active => None,
                JournalState::Inactive(reason) => {
                    Some(JournalState::Inactive(format!("{name} bitmap: {reason}")))
                }
            })
            .unwrap_or(JournalState::Active),
        };
        MigrationStatus {
            phase,
            error,
            target: self.target.path().display().to_string(),
            bytes_total: self.size,
            bytes_migrated,
            bytes_to_copy: sums.to_copy(),
            bytes_copied: sums.copied,
            bytes_skipped: sums.skipped,
            bytes_copied_on_read: self.bytes_copied_on_read.load(Ordering::Relaxed),
            chunks_total: self.chunks,
            chunks_migrated,
            chunks_failed: lock(&self.failed).len() as u64,
            chunks_repaired: self.repair.get().map_or(0, Repair::count),
            copy_rate,
            rate_limit,
            eta_seconds,
            overlay_bytes,
            overlay_write_bytes: self.overlay_write_bytes.load(Ordering::Relaxed),
            journal,
        }
    }

    fn layers(&self) -> Option<Arc<Layers>> {
        self.layers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update_ctl(&self, f: impl FnOnce(&mut Ctl)) {
        f(&mut lock(&self.ctl));
        self.ctl_changed.notify_all();
    }

    fn set_phase(&self, phase: Phase) {
        self.update_ctl(|c| c.phase = phase);
    }

    fn migrated_bytes(&self, l: &Layers) -> u64 {
        let full = l.migrated.count_ones() * u64::from(self.chunk_size);
        // The last chunk may be short.
        let last = self.chunks.saturating_sub(1);
        if self.chunks > 0 && l.migrated.get(last) {
            full - (u64::from(self.chunk_size) - self.chunk_len(last) as u64)
        } else {
            full
        }
    }

    fn chunk_len(&self, chunk: u64) -> usize {
        chunk_len(self.size, self.chunk_size, chunk)
    }

    fn chunk_start(&self, chunk: u64) -> u64 {
        chunk * u64::from(self.chunk_size)
    }

    fn touch_guest(&self) {
        let ns = self.epoch.elapsed().as_nanos() as u64;
        self.last_guest_io_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn guest_io(&self) -> GuestIo<'_> {
        self.guest_in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch_guest();
        GuestIo(self)
    }

    /// Whether the guest has I/O in flight or did some within the yield window.
    fn guest_busy(&self) -> bool {
        if self.guest_in_flight.load(Ordering::SeqCst) > 0 {
            return true;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.last_guest_io_ns.load(Ordering::Relaxed);
        last > 0 && now.saturating_sub(last) < self.opts.yield_window.as_nanos() as u64
    }

    fn target_failing_recently(&self) -> bool {
        lock(&self.target_error)
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < TARGET_ERROR_HOLDOFF)
    }

    fn note_target_error(&self, chunk: u64, e: &io::Error) {
        let mut slot = lock(&self.target_error);
        if slot.is_none() {
            tracing::error!(chunk, offset = self.chunk_start(chunk), error = %e, "target write failed; retrying");
        }
        *slot = Some((Instant::now(), e.to_string()));
    }

    fn clear_target_error(&self) {
        if lock(&self.target_error).take().is_some() {
            tracing::info!("target writes work again");
        }
    }

    /// Copies chunk `c` to the target (see the module doc). `prefetched`
    /// is the snapshot chunk read before taking the lock, if the overlay
    /// held none of its blocks then.
    fn copy_chunk(
        &self,
        l: &Layers,
        c: u64,
        prefetched: Option<Option<ChunkData>>,
    ) -> std::result::Result<Copied, CopyError> {
        let start = self.chunk_start(c);
        let len = self.chunk_len(c);
        let _guard = l.locks.lock(c);
        if l.migrated.get(c) {
            return Ok(Copied::Already);
        }
        // Overlay bits never clear, so a prefetch made while the overlay
        // held none of the chunk is still valid if it holds none now.
        let data = if l.overlay.any_present(start, len as u64) {
            let mut buf = vec![0u8; len];
            l.overlay
                .read_at(&mut buf, start)
                .map_err(CopyError::Read)?;
            Some(ChunkBuf::Owned(buf))
        } else {
            let chunk = match prefetched {
                Some(p) => p,
                None => l.snapshot.chunk(c, true).map_err(CopyError::Read)?,
            };
            chunk.map(ChunkBuf::Shared)
        };
        self.write_copy(l, c, data)
    }

    /// Writes `data` (`None`: zeroes) as the copy of chunk `c` and sets its
    /// migrated bit. The caller holds the chunk's lock and saw its bit clear.
    fn write_copy(
        &self,
        l: &Layers,
        c: u64,
        data: Option<ChunkBuf>,
    ) -> std::result::Result<Copied, CopyError> {
        let start = self.chunk_start(c);
        let len = self.chunk_len(c);
        let data = data.filter(|d| !is_zero(d.bytes()));
        let written = match &data {
            Some(d) => self.target.write_at(d.bytes(), start),
            None if self.known_zero.load(Ordering::SeqCst) => Ok(()),
            None => self.target.zero(start, len as u64),
        };
        if let Err(e) = written {
            // The chunk may now hold part of a copy.
            self.known_zero.store(false, Ordering::SeqCst);
            return Err(CopyError::Write(e));
        }
        if l.migrated.set(c) {
            self.progress.migrated(c, len as u64, data.is_some());
        }
        self.since_checkpoint
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(Copied::Now(data))
    }

    /// Makes every copy and guest write so far durable: target sync, then
    /// the migrated bits.
    fn checkpoint(&self, l: &Layers) -> io::Result<()> {
        self.since_checkpoint.store(0, Ordering::Relaxed);
        l.migrated
            .sync_after(|| self.target.sync())
            .map_err(io::Error::from)
    }

    /// Records that the guest writes migrated chunks `first..=last`, durably
    /// before the write (for verify). Never fails the write.
    fn note_guest_written(&self, l: &Layers, first: u64, last: u64) {
        let mut fresh = false;
        for c in first..=last {
            if l.migrated.get(c) && !l.guest_written.get(c) {
                fresh |= l.guest_written.set(c);
            }
        }
        if fresh {
            if let Err(e) = l.guest_written.sync_after(|| Ok(())) {
                if !self.guest_written_unreliable.swap(true, Ordering::SeqCst) {
                    tracing::warn!(error = %e, "cannot record guest-written chunks; verify will be skipped");
                }
            }
        }
    }

    /// A write (`Some`) or zeroing (`None`, `discard` telling which) of
    /// `len` bytes at `offset`.
    fn mutate(&self, buf: Option<&[u8]>, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        check_bounds(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let Some(l) = self.layers() else {
            return match buf {
                Some(b) => self.target.write_at(b, offset),
                None => self.target.zero(offset, len),
            };
        };
        let cs = u64::from(self.chunk_size);
        let end = offset + len;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let _guard = l.locks.lock_range(first, last);
        self.note_guest_written(&l, first, last);
        let mut to_overlay = 0;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let (migrated, run) = l.migrated.run(c, last + 1);
            let run_end = end.min((c + run.max(1)) * cs);
            let piece = buf.map(|b| &b[(pos - offset) as usize..(run_end - offset) as usize]);
            match (migrated, piece) {
                (true, Some(p)) => self.target.write_at(p, pos)?,
                (true, None) => self.target.zero(pos, run_end - pos)?,
                (false, Some(p)) => {
                    l.overlay.write_at(p, pos)?;
                    // The chunk now holds guest data that has to move.
                    for c in pos / cs..=(run_end - 1) / cs {
                        self.progress.needs_copy(c, self.chunk_len(c) as u64);
                    }
                }
                (false, None) if discard => l.overlay.discard(pos, run_end - pos)?,
                (false, None) => l.overlay.write_zeroes(pos, run_end - pos)?,
            }
            if !migrated && piece.is_some() {
                to_overlay += run_end - pos;
            }
            pos = run_end;
        }
        if to_overlay > 0 {
            self.overlay_write_bytes
                .fetch_add(to_overlay, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Serves `out` (at `pos`, inside chunk `c`, which is not migrated).
    fn read_unmigrated(
        &self,
        l: &Layers,
        c: u64,
        out: &mut ReadRun<'_, '_>,
        pos: u64,
    ) -> io::Result<()> {
        // Copy-on-read is the guest's demand, not paced by the rate limit
        // (it is counted apart, in `bytes_copied_on_read`, not in the
        // copier's `copy_rate`).
        let copy =
            self.opts.copy_on_read && !lock(&self.ctl).paused && !self.target_failing_recently();
        if copy {
            match self.copy_chunk(l, c, None) {
                Ok(Copied::Now(data)) => {
                    let len = self.chunk_len(c) as u64;
                    self.bytes_copied_on_read.fetch_add(len, Ordering::Relaxed);
                    let at = (pos - self.chunk_start(c)) as usize;
                    return match data {
                        Some(d) => out.copy_from(&d.bytes()[at..at + out.len()]),
                        None => out.fill_zeroes(),
                    };
                }
                Ok(Copied::Already) => return self.read_target(out, pos),
                Err(CopyError::Write(e)) => self.note_target_error(c, &e),
                // The overlay read below reports it to the guest.
                Err(CopyError::Read(_)) => {}
            }
        }
        out.read_device(l.overlay.as_ref(), pos)
    }

    /// Whether copying chunk `c` costs no store or target I/O: a zero
    /// chunk the overlay does not touch.
    fn costs_nothing(&self, l: &Layers, c: u64) -> bool {
        !l.overlay
            .any_present(self.chunk_start(c), self.chunk_len(c) as u64)
            && matches!(l.snapshot.source().chunk_key(c), Ok(None))
    }

    /// Serves `out` at `pos` from the target.
    fn read_target(&self, out: &mut ReadRun<'_, '_>, pos: u64) -> io::Result<()> {
        self.target.read_run(out, pos)
    }

    /// Serves a guest read of `len` bytes at `offset` into `dest`: migrated
    /// runs of chunks from the target, the others chunk by chunk with
    /// copy-on-read.
    fn read_into(&self, mut dest: ReadDest<'_, '_>, offset: u64, len: u64) -> io::Result<()> {
        let _io = self.guest_io();
        check_bounds(offset, len, self.size)?;
        let Some(l) = self.layers() else {
            // A request's length is a usize.
            return self.read_target(&mut dest.next_run(len as usize)?, offset);
        };
        let cs = u64::from(self.chunk_size);
        let end = offset + len;
        let last = end.saturating_sub(1) / cs;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let (migrated, run) = l.migrated.run(c, last + 1);
            let run_end = if migrated {
                end.min((c + run) * cs)
            } else {
                end.min((c + 1) * cs)
            };
            let mut out = dest.next_run((run_end - pos) as usize)?;
            if migrated {
                self.read_target(&mut out, pos)?;
            } else {
                self.read_unmigrated(&l, c, &mut out, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }
}

impl BlockDevice for MigratingDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.read_into(ReadDest::bytes(buf), offset, len)
    }

    /// Migrated chunks go from the target to guest memory with `preadv`
    /// (no copy, [`Target::read_run`]); chunks not migrated yet reach it
    /// with one copy (from the chunk just copied) or through the overlay's
    /// vectored read.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.read_into(ReadDest::guest(bufs), offset, total_len(bufs))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _io = self.guest_io();
        self.mutate(Some(buf), offset, buf.len() as u64, false)
    }

    fn flush(&self) -> io::Result<()> {
        let _io = self.guest_io();
        match self.layers() {
            None => self.target.sync(),
            Some(l) => {
                l.overlay.flush()?;
                l.migrated
                    .sync_after(|| self.target.sync())
                    .map_err(io::Error::from)
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _io = self.guest_io();
        self.mutate(None, offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let _io = self.guest_io();
        self.mutate(None, offset, len, false)
    }
}

/// Locks `m`, ignoring poisoning (no guarded invariant spans a panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_zero(buf: &[u8]) -> bool {
    // OR-folding a block vectorises; `all` with its early exit does not.
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Counts what the migration has to move (see the `progress` module):
/// chunks not migrated that hold data in the snapshot or the overlay are
/// pending; migrated ones count as copied or skipped by what they hold.
/// One manifest lookup per chunk (a chunk the manifest cannot tell about
/// counts as data).
fn count_progress(
    overlay: &Overlay,
    snapshot: &SnapshotLayer,
    migrated: &PersistentBitmap,
    size: u64,
    chunk_size: u32,
) -> Progress {
    let chunks = migrated.len();
    let progress = Progress::new(chunks);
    for c in 0..chunks {
        let start = c * u64::from(chunk_size);
        let len = chunk_len(size, chunk_size, c) as u64;
        let data =
            overlay.any_present(start, len) || !matches!(snapshot.source().chunk_key(c), Ok(None));
        if migrated.get(c) {
            progress.migrated(c, len, data);
        } else if data {
            progress.needs_copy(c, len);
        }
    }
    progress
}

/// Checks the target against the one recorded in `state`; returns its
/// canonical path.
fn check_target(state: &dyn LayerState, target: &Target) -> Result<PathBuf> {
    let canonical =
        std::fs::canonicalize(target.path()).map_err(|source| Error::ResolveTarget {
            path: target.path().to_path_buf(),
            source,
        })?;
    match state.migration().1 {
        Some(recorded) if recorded != canonical => Err(Error::TargetMismatch {
            recorded,
            given: canonical,
        }),
        _ => Ok(canonical),
    }
}
