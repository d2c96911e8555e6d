//! Continuous protection: the `protect` thread writes a protection point
//! into the store every interval, through `block::protect::ProtectLayer`.
//!
//! # A point
//! Every interval (measured from the start of the previous point; a
//! point that takes longer is followed at once by the next):
//! 1. take the store's writer lock (`Store::begin_changed_backup`);
//! 2. `ProtectLayer::start_point`: the instant (writes in flight drained,
//!    bitmaps swapped); nothing changed since the last point means the
//!    store already holds the disk as it is now: no point is written, and
//!    the RPO counts from this instant;
//! 3. `ChangedBackup::run` with the point as a `ChangedSource`: captured
//!    chunks are `Data` (read through the point: the preserved copy of a
//!    chunk the guest rewrote meanwhile, else the disk), the rest
//!    `Unchanged` since the parent, the last complete point (or, for an
//!    `instant-boot` whose points carry the image's name, the booted
//!    snapshot). The snapshot's id and creation time are the instant
//!    (`ChangedBackup::set_created`), so `restore --at T` picks the newest
//!    point whose instant is at or before T;
//! 4. on success: record it in `protect.json` (atomically), then clear the
//!    capturing bitmap (`Point::finish`); on failure (the lock is held by
//!    another writer, the store is full or unreadable, the parent was
//!    forgotten): `Point::abandon` merges the captured chunks back into
//!    the changed ones, the state becomes `failed` with the reason (a
//!    held lock only delays: `behind` once the RPO passes twice the
//!    interval), and the next interval tries again. The guest never
//!    notices.
//!
//! # Full reads
//! A point reads every chunk (and has no parent) when there is no usable
//! parent: the first point of `serve --disk`, of another `--protect-name`,
//! of a state dir that served without protection before; a parent
//! forgotten meanwhile; and the first point after a reboot (machine boot
//! id changed since `protect.json` was written): a power loss may have
//! dropped changed bits of writes the guest never flushed.
//!
//! # `protect.json`
//! `{format_version, name, boot_id, parent, last_point: {id, instant_micros},
//! full_needed}`, in the state dir, written atomically. Written at start
//! (the boot id, whether a full read is due) and after every point, always
//! before the capturing bitmap is cleared: a crash between the store's
//! publish and this write leaves the old parent recorded and the point's
//! chunks still marked, so the next point, a delta on the old parent, is
//! complete.
//!
//! # Crash and stop
//! kill -9 during a point: the store publishes a manifest last, so no half
//! point is visible; on restart both bitmaps are merged (changed ∪
//! capturing) and the next point covers everything since the last
//! complete one. A stop (`Daemon::run` returning) makes the point's reads
//! fail, so the store abandons it, and merges its chunks back.
//!
//! # Status
//! [`ProtectStatus`] holds atomics and one leaf mutex (last point,
//! reason); building a status never waits for point I/O.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use block::device::BlockDevice;
use block::file::write_atomic;
use block::protect::{Point, ProtectLayer, ProtectOptions, DEFAULT_PRESERVE_BUDGET};
use control::{PointRef, Protection, ProtectionState};
use store::backup::changed::{ChangedOptions, ChangedSource, ChunkState};
use store::snapshot::{micros_from_id, rfc3339_micros};
use store::{ErrorKind, Store};

/// Version of `protect.json`. Do not modify; add a new version instead.
pub const PROTECT_FORMAT_VERSION: u32 = 1;
/// The protection record in the state dir.
pub const PROTECT_FILE: &str = "protect.json";
/// Shortest interval between points.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Default interval between points.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What to protect under which name, how often.
#[derive(Debug, Clone)]
pub struct ProtectConfig {
    /// Image name of the points; `None`: the served snapshot's name.
    pub name: Option<String>,
    /// Time between points (at least [`MIN_INTERVAL`]).
    pub interval: Duration,
}

impl Default for ProtectConfig {
    fn default() -> Self {
        ProtectConfig {
            name: None,
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// Errors starting protection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interval is below [`MIN_INTERVAL`].
    #[error("The protection interval must be at least 1s, not {0:?}")]
    Interval(Duration),
    /// No name for the points.
    #[error("Protection needs an image name for its points (--protect-name)")]
    NoName,
    /// The name cannot be an image name.
    #[error("Invalid protection name")]
    Name(#[source] store::Error),
    /// Reading `protect.json` failed.
    #[error("Failed to read {0}")]
    Read(PathBuf, #[source] io::Error),
    /// Writing `protect.json` failed.
    #[error("Failed to write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// `protect.json` is not valid.
    #[error("Protection record {0} is corrupt or of an unknown version")]
    Parse(PathBuf),
    /// Opening the protection layer failed.
    #[error("Failed to open the protection layer")]
    Layer(#[source] block::protect::Error),
    /// Starting the `protect` thread failed.
    #[error("Failed to start the protect thread")]
    Thread(#[source] io::Error),
}

/// A `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A complete point, as `protect.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedPoint {
    /// Its snapshot id.
    pub id: String,
    /// Its instant, µs since the epoch.
    pub instant_micros: i64,
}

/// The contents of `protect.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectRecord {
    /// [`PROTECT_FORMAT_VERSION`].
    pub format_version: u32,
    /// Image name of the points.
    pub name: String,
    /// Machine boot id when this was written.
    pub boot_id: String,
    /// Snapshot id (of `name`) the next point is a delta on: the last
    /// complete point, or the booted snapshot.
    pub parent: Option<String>,
    /// The newest complete point.
    pub last_point: Option<RecordedPoint>,
    /// The next point must read every chunk.
    pub full_needed: bool,
}

/// The machine's boot id, "" if unknown (then every start reads all).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn load_record(path: &Path) -> Result<Option<ProtectRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let rec: ProtectRecord =
                serde_json::from_slice(&bytes).map_err(|_| Error::Parse(path.to_path_buf()))?;
            if rec.format_version != PROTECT_FORMAT_VERSION {
                return Err(Error::Parse(path.to_path_buf()));
            }
            Ok(Some(rec))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Read(path.to_path_buf(), e)),
    }
}

fn store_record(path: &Path, rec: &ProtectRecord) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn now_micros() -> i64 {
    micros(SystemTime::now())
}

/// The live numbers behind `status.protection`.
#[derive(Debug)]
pub struct ProtectStatus {
    name: String,
    interval: Duration,
    layer: Arc<ProtectLayer>,
    points_written: AtomicU64,
    bytes_read: AtomicU64,
    bytes_new: AtomicU64,
    /// Newest instant whose disk state is in the store, µs (0: none yet).
    covered_micros: AtomicU64,
    leaf: Mutex<Leaf>,
}

#[derive(Debug, Default)]
struct Leaf {
    last_point: Option<RecordedPoint>,
    /// The last attempt failed: (reason, whether it is a failure rather
    /// than a delay).
    problem: Option<(String, bool)>,
}

impl ProtectStatus {
    fn leaf(&self) -> std::sync::MutexGuard<'_, Leaf> {
        self.leaf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The report for `status.protection`.
    pub fn protection(&self) -> Protection {
        let leaf = self.leaf();
        let covered = self.covered_micros.load(Ordering::Acquire) as i64;
        let interval = self.interval.as_secs_f64();
        let rpo = (covered > 0).then(|| ((now_micros() - covered).max(0)) as f64 / 1e6);
        let (layer_errors, layer_error) = self.layer.errors();
        let mut reason = leaf.problem.as_ref().map(|(r, _)| r.clone());
        let state = match (&leaf.problem, rpo) {
            (Some((_, true)), _) => ProtectionState::Failed,
            (_, Some(rpo)) if rpo > 2.0 * interval => ProtectionState::Behind,
            (_, Some(_)) => ProtectionState::Ok,
            (_, None) => ProtectionState::Starting,
        };
        if reason.is_none() && layer_errors > 0 {
            reason = layer_error;
        }
        Protection {
            state,
            reason,
            name: self.name.clone(),
            interval_seconds: interval,
            last_point: leaf.last_point.as_ref().map(|p| PointRef {
                id: p.id.clone(),
                snapshot: format!("{}@{}", self.name, p.id),
                instant: rfc3339_micros(p.instant_micros),
            }),
            rpo_seconds: rpo,
            points_written: self.points_written.load(Ordering::Relaxed),
            point_bytes_read: self.bytes_read.load(Ordering::Relaxed),
            point_bytes_new: self.bytes_new.load(Ordering::Relaxed),
            pending_bytes: self.layer.pending_bytes(),
        }
    }
}

/// Stop signal of the `protect` thread.
#[derive(Debug, Default)]
struct Stop {
    stopped: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Stop {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.cond.notify_all();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Waits until `deadline` or a stop; true if stopped.
    fn wait_until(&self, deadline: Instant) -> bool {
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.is_stopped() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Protection of one daemon's disk: the layer, its status and the
/// `protect` thread (started by [`Protector::spawn`]).
pub struct Protector {
    /// The thread's state until [`Protector::spawn`] moves it there.
    writer: Option<PointWriter>,
    layer: Arc<ProtectLayer>,
    status: Arc<ProtectStatus>,
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where protection starts from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The served snapshot's image name and id (`None` for `serve --disk`).
    pub snapshot: Option<(String, String)>,
    /// The state dir was created by this start (the overlay is empty).
    pub fresh_state: bool,
}

impl Protector {
    /// Opens protection of `lower` with its files in `dir`: reads (or
    /// makes) `protect.json`, decides whether the next point is a full
    /// read, and opens the layer. The thread starts with [`Protector::spawn`].
    pub fn open(
        dir: &Path,
        lower: Arc<dyn BlockDevice>,
        store: Arc<Store>,
        cfg: &ProtectConfig,
        origin: &Origin,
    ) -> Result<Protector> {
        if cfg.interval < MIN_INTERVAL {
            return Err(Error::Interval(cfg.interval));
        }
        let name = match (&cfg.name, &origin.snapshot) {
            (Some(n), _) => n.clone(),
            (None, Some((n, _))) if !n.is_empty() => n.clone(),
            _ => return Err(Error::NoName),
        };
        store::snapshot::validate_name(&name).map_err(Error::Name)?;
        let record_path = dir.join(PROTECT_FILE);
        let boot = boot_id();
        let old = load_record(&record_path)?;
        // The booted snapshot is the first parent when the points carry
        // its name and the overlay holds nothing yet.
        let booted = origin
            .snapshot
            .as_ref()
            .filter(|(n, _)| *n == name && origin.fresh_state)
            .map(|(_, id)| id.clone());
        let mut record = match old {
            Some(r) if r.name == name => {
                let rebooted = boot.is_empty() || r.boot_id != boot;
                if rebooted && r.parent.is_some() {
                    tracing::info!("protection: the machine rebooted since the last run; the next point reads the whole disk");
                }
                ProtectRecord {
                    full_needed: r.full_needed || rebooted || r.parent.is_none(),
                    boot_id: boot,
                    ..r
                }
            }
            _ => ProtectRecord {
                format_version: PROTECT_FORMAT_VERSION,
                name: name.clone(),
                boot_id: boot,
                full_needed: booted.is_none(),
                parent: booted,
                last_point: None,
            },
        };
        let opts = ProtectOptions {
            chunk_size: store.chunk_size(),
            full: record.full_needed,
            preserve_budget: DEFAULT_PRESERVE_BUDGET,
        };
        let layer = ProtectLayer::open(lower.clone(), dir, &opts).map_err(Error::Layer)?;
        // A record without its bitmaps (deleted, or from another layout)
        // proves nothing about what changed.
        if !layer.resumed() && record.last_point.is_some() && !record.full_needed {
            record.full_needed = true;
            layer.request_full();
        }
        store_record(&record_path, &record).map_err(|e| Error::Write(record_path.clone(), e))?;
        let covered = record.last_point.as_ref().map_or(0, |p| p.instant_micros);
        let status = Arc::new(ProtectStatus {
            name,
            interval: cfg.interval,
            layer: layer.clone(),
            points_written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_new: AtomicU64::new(0),
            covered_micros: AtomicU64::new(covered.max(0) as u64),
            leaf: Mutex::new(Leaf {
                last_point: record.last_point.clone(),
                problem: None,
            }),
        });
        tracing::info!(
            name = %status.name,
            interval = ?cfg.interval,
            parent = record.parent.as_deref().unwrap_or("-"),
            full = record.full_needed,
            "protection on"
        );
        let stop = Arc::new(Stop::default());
        Ok(Protector {
            writer: Some(PointWriter {
                layer: layer.clone(),
                status: status.clone(),
                store,
                record_path,
                record,
                image_size: lower.size(),
                stop: stop.clone(),
            }),
            layer,
            status,
            stop,
            thread: None,
        })
    }

    /// The device to serve (the protection layer over the disk).
    pub fn layer(&self) -> &Arc<ProtectLayer> {
        &self.layer
    }

    /// The live status.
    pub fn status(&self) -> &Arc<ProtectStatus> {
        &self.status
    }

    /// Starts the `protect` thread.
    pub fn spawn(&mut self) -> Result<()> {
        let Some(mut writer) = self.writer.take() else {
            return Ok(());
        };
        let handle = std::thread::Builder::new()
            .name("protect".into())
            .spawn(move || {
                lower_priority();
                writer.run()
            })
            .map_err(Error::Thread)?;
        self.thread = Some(handle);
        Ok(())
    }

    /// Stops the thread: a point being written is abandoned (its chunks
    /// stay changed); waits for it.
    pub fn stop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Protector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `protect` thread's state.
struct PointWriter {
    layer: Arc<ProtectLayer>,
    status: Arc<ProtectStatus>,
    store: Arc<Store>,
    record_path: PathBuf,
    record: ProtectRecord,
    image_size: u64,
    stop: Arc<Stop>,
}

/// Why a point attempt did not produce a point.
struct Failed {
    reason: String,
    /// A failure (`failed`), not a delay (the lock held by another writer).
    failure: bool,
}

impl From<store::Error> for Failed {
    fn from(e: store::Error) -> Failed {
        Failed {
            failure: e.kind() != ErrorKind::Locked,
            reason: block::error_chain(&e),
        }
    }
}

impl PointWriter {
    fn run(&mut self) {
        let interval = self.status.interval;
        // The first point at once: it may be a full read, and until it
        // exists the RPO is unknown.
        let mut next = Instant::now();
        loop {
            if self.stop.wait_until(next) {
                return;
            }
            let started = Instant::now();
            match self.point() {
                Ok(()) => self.status.leaf().problem = None,
                Err(f) if self.stop.is_stopped() => {
                    tracing::info!(reason = %f.reason, "protection point abandoned: the daemon stops");
                    return;
                }
                Err(f) => {
                    tracing::warn!(reason = %f.reason, "protection point failed; its changes wait for the next");
                    self.status.leaf().problem = Some((f.reason, f.failure));
                }
            }
            next = (started + interval).max(Instant::now());
        }
    }

    /// One attempt.
    fn point(&mut self) -> std::result::Result<(), Failed> {
        let name = self.status.name.clone();
        let mut session = self.store.begin_changed_backup(&name)?;
        // A forgotten parent cannot be a delta's base: read everything.
        if let Some(parent) = &self.record.parent {
            if !self.layer.full_needed() {
                if let Err(e) = self.store.resolve(&format!("{name}@{parent}")) {
                    tracing::warn!(parent = %parent, error = %e, "protection: the parent point is gone; this point reads the whole disk");
                    self.layer.request_full();
                }
            }
        }
        let (instant, point) = self.layer.start_point().map_err(|e| Failed {
            reason: format!("cannot start a point: {e}"),
            failure: true,
        })?;
        let Some(point) = point else {
            drop(session);
            self.status
                .covered_micros
                .fetch_max(micros(instant).max(0) as u64, Ordering::AcqRel);
            return Ok(());
        };
        session.set_created(micros(instant));
        let parent = if point.full() {
            None
        } else {
            self.record.parent.clone()
        };
        let opts = ChangedOptions {
            image_size: self.image_size,
            source: format!("protection point of {name}"),
            parent: parent.clone(),
            progress: None,
            threads: Some(2),
            readers: 2,
        };
        let source = PointSource {
            point: &point,
            stop: &self.stop,
        };
        let stats = match session.run(&source, &opts) {
            Ok(stats) => stats,
            Err(e) => {
                drop(session);
                let _ = point.abandon();
                return Err(e.into());
            }
        };
        drop(session);
        let done = RecordedPoint {
            instant_micros: micros_from_id(&stats.snapshot).unwrap_or(micros(instant)),
            id: stats.snapshot.clone(),
        };
        let mut record = self.record.clone();
        record.parent = Some(stats.snapshot.clone());
        record.last_point = Some(done.clone());
        if point.full() {
            record.full_needed = false;
        }
        if let Err(e) = store_record(&self.record_path, &record) {
            // The point is in the store, but not recorded: its chunks stay
            // changed and the next point is a delta on the old parent.
            let _ = point.abandon();
            return Err(Failed {
                reason: format!("failed to record point {}: {e}", stats.snapshot),
                failure: true,
            });
        }
        self.record = record;
        if let Err(e) = point.finish() {
            tracing::warn!(error = %e, "protection: failed to clear the capturing bitmap (its chunks are read again after a restart)");
        }
        let s = &self.status;
        s.points_written.fetch_add(1, Ordering::Relaxed);
        s.bytes_read.fetch_add(stats.bytes_read, Ordering::Relaxed);
        s.bytes_new.fetch_add(stats.bytes_new, Ordering::Relaxed);
        s.covered_micros
            .fetch_max(done.instant_micros.max(0) as u64, Ordering::AcqRel);
        s.leaf().last_point = Some(done);
        tracing::debug!(
            snapshot = %stats.snapshot,
            bytes_read = stats.bytes_read,
            bytes_new = stats.bytes_new,
            seconds = stats.seconds,
            "protection point written"
        );
        Ok(())
    }
}

/// A point as the store's changed-blocks source.
struct PointSource<'a> {
    point: &'a Point,
    stop: &'a Stop,
}

impl ChangedSource for PointSource<'_> {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        if self.point.is_captured(chunk) {
            ChunkState::Data
        } else {
            ChunkState::Unchanged
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.stop.is_stopped() {
            return Err(io::Error::other("the daemon stops"));
        }
        self.point.read_at(buf, offset)
    }
}

/// Nice value of the `protect` thread and of the store's reader and worker
/// threads it starts (threads inherit it): a point is background work, and
/// on a loaded machine the guest's requests must win the CPU.
pub const POINT_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`POINT_NICE`] (Linux nice
/// values are per thread); a failure only costs the guest some latency.
fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), POINT_NICE) {
        tracing::warn!(error = %e, "protection: could not lower the point thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use block::mem_device::MemDevice;

    use super::*;

    const CHUNK: u32 = 4096;
    const SIZE: usize = 64 * 4096;

    /// A store with one backup of `image` named `vm`; its id.
    fn store_with(dir: &Path, image: &[u8]) -> (Arc<Store>, String) {
        let store = Store::init(&dir.join("store"), CHUNK).unwrap();
        let src = dir.join("src.img");
        std::fs::write(&src, image).unwrap();
        let stats = store.backup("vm", &src, &Default::default()).unwrap();
        (Arc::new(store), stats.snapshot)
    }

    fn restore(store: &Store, reference: &str, dir: &Path) -> Vec<u8> {
        let out = dir.join("out.img");
        let _ = std::fs::remove_file(&out);
        store.restore(reference, &out, &Default::default()).unwrap();
        std::fs::read(&out).unwrap()
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn open(
        dir: &Path,
        mem: &Arc<MemDevice>,
        store: &Arc<Store>,
        name: Option<&str>,
        origin: &Origin,
    ) -> Protector {
        let cfg = ProtectConfig {
            name: name.map(str::to_string),
            interval: MIN_INTERVAL,
        };
        Protector::open(dir, mem.clone(), store.clone(), &cfg, origin).unwrap()
    }

    #[test]
    fn points_are_deltas_on_the_booted_snapshot_and_hold_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8).collect();
        let (store, booted) = store_with(dir.path(), &image);
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mem = Arc::new(MemDevice::from_vec(image.clone()));
        let origin = Origin {
            snapshot: Some(("vm".into(), booted.clone())),
            fresh_state: true,
        };
        let mut p = open(&state, &mem, &store, None, &origin);
        assert_eq!(
            p.writer.as_ref().unwrap().record.parent.as_deref(),
            Some(booted.as_str())
        );
        assert!(!p.writer.as_ref().unwrap().record.full_needed);
        let layer = p.layer().clone();
        let status = p.status().clone();
        layer.write_at(&[0xab; 100], 5 * 4096 + 7).unwrap();
        layer.write_zeroes(9 * 4096, 4096).unwrap();
        p.spawn().unwrap();
        wait_for("the first point", || {
            status.protection().points_written >= 1
        });
        let pr = status.protection();
        assert_eq!(
            pr.point_bytes_read,
            2 * 4096,
            "only the two written chunks are read: {pr:?}"
        );
        assert_eq!(pr.state, ProtectionState::Ok, "{pr:?}");
        let last = pr.last_point.unwrap();
        assert_eq!(
            restore(&store, &last.snapshot, dir.path()),
            mem.snapshot(),
            "the point differs from the disk"
        );
        let info = store.resolve(&last.snapshot).unwrap();
        assert_eq!(info.parent.as_deref(), Some(booted.as_str()));
        assert_eq!(info.created, last.instant);
        // Nothing changes: no new point, the RPO stays fresh.
        wait_for("a fresh RPO", || {
            status.protection().rpo_seconds.is_some_and(|r| r < 1.0)
        });
        assert_eq!(status.protection().points_written, 1);
        // A second change: a delta on the first point.
        layer.write_at(&[1; 4096], 0).unwrap();
        wait_for("the second point", || {
            status.protection().points_written >= 2
        });
        let second = status.protection().last_point.unwrap();
        assert_eq!(
            store.resolve(&second.snapshot).unwrap().parent,
            Some(last.id.clone())
        );
        assert_eq!(
            restore(&store, &second.snapshot, dir.path()),
            mem.snapshot()
        );
        p.stop();
        let rec = load_record(&state.join(PROTECT_FILE)).unwrap().unwrap();
        assert_eq!(rec.parent, Some(second.id.clone()));

        // Restarted on the same boot: the record continues, no full read.
        let p = open(
            &state,
            &mem,
            &store,
            None,
            &Origin {
                fresh_state: false,
                ..origin
            },
        );
        assert!(!p.writer.as_ref().unwrap().record.full_needed);
        assert_eq!(p.writer.as_ref().unwrap().record.parent, Some(second.id));
    }

    #[test]
    fn a_full_read_when_there_is_no_usable_parent_or_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let image = vec![3u8; SIZE];
        let (store, booted) = store_with(dir.path(), &image);
        let mem = Arc::new(MemDevice::from_vec(image));
        let origin = Origin {
            snapshot: Some(("vm".into(), booted)),
            fresh_state: true,
        };
        // Another name: no parent of that name.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        assert!(
            open(&other, &mem, &store, Some("vm-cdp"), &origin)
                .writer
                .as_ref()
                .unwrap()
                .record
                .full_needed
        );
        // A state that served before without protection.
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let stale = Origin {
            fresh_state: false,
            ..origin.clone()
        };
        assert!(
            open(&old, &mem, &store, None, &stale)
                .writer
                .as_ref()
                .unwrap()
                .record
                .full_needed
        );
        // serve --disk: no snapshot at all; the first point reads it all.
        let disk = dir.path().join("disk");
        std::fs::create_dir(&disk).unwrap();
        let none = Origin {
            snapshot: None,
            fresh_state: true,
        };
        let mut p = open(&disk, &mem, &store, Some("prod"), &none);
        assert!(p.writer.as_ref().unwrap().record.full_needed);
        let status = p.status().clone();
        p.spawn().unwrap();
        wait_for("the full point", || status.protection().points_written >= 1);
        assert_eq!(status.protection().point_bytes_read, SIZE as u64);
        p.stop();
        assert!(
            !load_record(&disk.join(PROTECT_FILE))
                .unwrap()
                .unwrap()
                .full_needed
        );
        // A reboot since: full again.
        let path = disk.join(PROTECT_FILE);
        let mut rec = load_record(&path).unwrap().unwrap();
        rec.boot_id = "another-boot".into();
        store_record(&path, &rec).unwrap();
        let stale = Origin {
            fresh_state: false,
            ..none
        };
        assert!(
            open(&disk, &mem, &store, Some("prod"), &stale)
                .writer
                .as_ref()
                .unwrap()
                .record
                .full_needed
        );
    }
}
