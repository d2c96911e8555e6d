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
//! # Points on demand
//! The `point` control request ([`ProtectStatus::point_now`]) asks for a
//! point now, out of the schedule (a service's group point: its guests
//! are held still around the request, see the `service` crate). The
//! request counts itself (`asked`) and wakes the thread; a point whose
//! attempt read `asked` before its instant covers every request counted
//! by then, and the request answers with that cut's number and instant as
//! soon as the cut is taken, before the point is copied. A demanded point
//! takes its cut first and then waits for the store's writer lock (another
//! daemon's point, a service backup), up to [`LOCK_WAIT`], so the cut is
//! not delayed by the lock; a scheduled one takes the lock first, as
//! before. `point-wait` ([`ProtectStatus::wait_point`]) answers once the
//! cut's point is complete (or failed). A cut on demand always gets a
//! point of its own, even when nothing changed (then a delta on the last
//! point with no entries): a group point's members belong to it alone, so
//! forgetting one group never takes another's member.
//! A request that arrives while a point is being copied waits for it.
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

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use block::device::BlockDevice;
use block::file::write_atomic;
use block::protect::{Point, ProtectLayer, ProtectOptions, Protected, DEFAULT_PRESERVE_BUDGET};
use control::{PointRef, PointTaken, Protection, ProtectionState};
use store::backup::changed::{ChangedBackup, ChangedOptions, ChangedSource, ChunkState};
use store::snapshot::{micros_from_id, rfc3339_micros};
use store::{ErrorKind, Store};

use crate::point_sched::Background;

/// Version of `protect.json`. Do not modify; add a new version instead.
pub const PROTECT_FORMAT_VERSION: u32 = 1;
/// The protection record in the state dir.
pub const PROTECT_FILE: &str = "protect.json";
/// Shortest interval between points.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Default interval between points.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a point on demand waits for the store's writer lock after
/// its cut (a service backup holds it while it reads its fleeced disks;
/// meanwhile the cut's chunks are preserved as the guest rewrites them).
pub const LOCK_WAIT: Duration = Duration::from_secs(3600);
/// Cuts on demand remembered for `point-wait`.
const CUTS_KEPT: usize = 64;

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
    /// The thread's wake-up, and the points asked for on demand.
    signal: Arc<Stop>,
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

    /// A point now (the `point` request): counts the request, wakes the
    /// thread and waits at most `timeout` for a cut taken after it.
    pub fn point_now(&self, timeout: Duration) -> std::result::Result<PointTaken, String> {
        let deadline = Instant::now() + timeout;
        let s = &self.signal;
        let mut d = s.demand();
        d.asked += 1;
        let mine = d.asked;
        s.cond.notify_all();
        loop {
            if let Some(cut) = d.cuts.iter().find(|c| c.covers >= mine) {
                return Ok(self.taken(cut));
            }
            d = s.wait(d, deadline, "the cut")?;
        }
    }

    /// Waits at most `timeout` for the point of `cut` to be complete (the
    /// `point-wait` request).
    pub fn wait_point(
        &self,
        cut: u64,
        timeout: Duration,
    ) -> std::result::Result<PointTaken, String> {
        let deadline = Instant::now() + timeout;
        let s = &self.signal;
        let mut d = s.demand();
        loop {
            let Some(c) = d.cuts.iter().find(|c| c.number == cut) else {
                return Err(format!("no point cut {cut} (unknown, or too old)"));
            };
            match &c.outcome {
                Some(Ok(_)) => return Ok(self.taken(c)),
                Some(Err(reason)) => return Err(format!("point cut {cut} failed: {reason}")),
                None => d = s.wait(d, deadline, "the point")?,
            }
        }
    }

    fn taken(&self, cut: &Cut) -> PointTaken {
        PointTaken {
            cut: cut.number,
            name: self.name.clone(),
            instant: rfc3339_micros(cut.instant_micros),
            instant_micros: cut.instant_micros,
            snapshot: match &cut.outcome {
                Some(Ok(id)) => Some(format!("{}@{id}", self.name)),
                _ => None,
            },
        }
    }
}

/// A cut that covers points asked for on demand.
#[derive(Debug)]
struct Cut {
    number: u64,
    /// Covers the requests counted up to this.
    covers: u64,
    instant_micros: i64,
    /// The snapshot id holding the disk at the instant, or why not.
    outcome: Option<std::result::Result<String, String>>,
}

/// The points asked for on demand, under [`Stop`]'s lock.
#[derive(Debug, Default)]
struct Demand {
    /// Requests counted so far.
    asked: u64,
    /// Requests counted up to this are covered by a cut.
    covered: u64,
    /// Numbers the cuts.
    cuts_taken: u64,
    /// The newest cuts ([`CUTS_KEPT`]).
    cuts: VecDeque<Cut>,
}

/// Stop signal of the `protect` thread, and its points on demand (one
/// lock and condvar for both: every change wakes every waiter).
#[derive(Debug, Default)]
struct Stop {
    stopped: AtomicBool,
    lock: Mutex<Demand>,
    cond: Condvar,
}

impl Stop {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _g = self.demand();
        self.cond.notify_all();
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn demand(&self) -> std::sync::MutexGuard<'_, Demand> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request's wait for `what`: the guard back after a wake-up, or
    /// why it gave up (the daemon stops, the deadline passed).
    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, Demand>,
        deadline: Instant,
        what: &str,
    ) -> std::result::Result<std::sync::MutexGuard<'a, Demand>, String> {
        if self.is_stopped() {
            return Err(format!("the daemon stops before {what}"));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        Ok(self
            .cond
            .wait_timeout(g, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0)
    }

    /// Requests counted and not yet covered by a cut.
    fn pending(&self) -> bool {
        let d = self.demand();
        d.asked > d.covered
    }

    /// Waits until `deadline`, a stop or (with `on_demand`) a point asked
    /// for; true if stopped.
    fn wait_until(&self, deadline: Instant, on_demand: bool) -> bool {
        let mut g = self.demand();
        loop {
            if self.is_stopped() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || (on_demand && g.asked > g.covered) {
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
    /// `lower` says which layers the disk is made of: with the snapshot
    /// under it, copy-before-write leaves the grains the guest has not
    /// written yet in the snapshot (see `block::protect`).
    pub fn open(
        dir: &Path,
        lower: impl Into<Protected>,
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
        let layer = ProtectLayer::open(lower, dir, &opts).map_err(Error::Layer)?;
        // A record without its bitmaps (deleted, or from another layout)
        // proves nothing about what changed.
        if !layer.resumed() && record.last_point.is_some() && !record.full_needed {
            record.full_needed = true;
            layer.request_full();
        }
        store_record(&record_path, &record).map_err(|e| Error::Write(record_path.clone(), e))?;
        let covered = record.last_point.as_ref().map_or(0, |p| p.instant_micros);
        let stop = Arc::new(Stop::default());
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
            signal: stop.clone(),
        });
        tracing::info!(
            name = %status.name,
            interval = ?cfg.interval,
            parent = record.parent.as_deref().unwrap_or("-"),
            full = record.full_needed,
            "protection on"
        );
        Ok(Protector {
            writer: Some(PointWriter {
                layer: layer.clone(),
                status: status.clone(),
                store,
                record_path,
                record,
                image_size: layer.size(),
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

    /// The point writer, for a caller that takes the cuts itself (a
    /// service's `service-protect` thread, which cuts every disk at one
    /// instant); then [`Protector::spawn`] starts no thread. `None` once
    /// taken or spawned.
    pub(crate) fn take_writer(&mut self) -> Option<MemberWriter> {
        self.writer.take().map(MemberWriter)
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

/// A disk's point writer driven by its service's cuts
/// ([`Protector::take_writer`]).
pub(crate) struct MemberWriter(PointWriter);

impl MemberWriter {
    /// Writes the disk's point of a cut taken at `instant` (`None`:
    /// nothing changed since its last point; it still gets a point of its
    /// own, a delta with no entries, so no two group points share a
    /// member). The member snapshot's `NAME@ID`, or why it failed (the
    /// point is abandoned: its chunks stay changed for the next cut).
    pub(crate) fn write(
        &mut self,
        instant: SystemTime,
        point: Option<Point>,
    ) -> std::result::Result<String, String> {
        let w = &mut self.0;
        let result = w.write_point(None, Ok((instant, point)), true);
        match result {
            Ok(()) => w.status.leaf().problem = None,
            Err(f) => {
                w.status.leaf().problem = Some((f.reason.clone(), f.failure));
                return Err(f.reason);
            }
        }
        match &w.record.parent {
            Some(id) => Ok(format!("{}@{id}", w.status.name)),
            None => Err("nothing changed and there is no earlier point".into()),
        }
    }

    /// The image name of the disk's points.
    pub(crate) fn name(&self) -> &str {
        &self.0.status.name
    }

    /// Publishes a group point whose members this and its sibling writers
    /// wrote, under the store's writer lock (waited for like a point on
    /// demand waits for it).
    pub(crate) fn publish(
        &self,
        point: &mut store::group::GroupPoint,
    ) -> std::result::Result<(), String> {
        let w = &self.0;
        let session = lock_store(&w.store, &w.status.name, &w.stop).map_err(|f| f.reason)?;
        let published = w.store.publish_group(point);
        drop(session);
        published.map_err(|e| block::error_chain(&e))
    }
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
            if self.stop.wait_until(next, true) {
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
        // Asked for on demand: the cut first, then the lock (waited for).
        let demanded = self.stop.pending();
        let store = self.store.clone();
        let early = if demanded {
            None
        } else {
            Some(store.begin_changed_backup(&name)?)
        };
        // A forgotten parent cannot be a delta's base: read everything.
        if let Some(parent) = &self.record.parent {
            if !self.layer.full_needed() {
                if let Err(e) = self.store.resolve(&format!("{name}@{parent}")) {
                    tracing::warn!(parent = %parent, error = %e, "protection: the parent point is gone; this point reads the whole disk");
                    self.layer.request_full();
                }
            }
        }
        // Requests counted before the instant are covered by this cut.
        let asked = self.stop.demand().asked;
        let started = self.layer.start_point();
        let cut = self.record_cut(asked, started.as_ref().ok().map(|(i, _)| micros(*i)));
        let result = self.write_point(early, started, cut.is_some());
        if let Some(cut) = cut {
            let outcome = match &result {
                Ok(()) => self
                    .record
                    .parent
                    .clone()
                    .ok_or_else(|| "nothing changed and there is no earlier point".to_string()),
                Err(f) => Err(f.reason.clone()),
            };
            let mut d = self.stop.demand();
            if let Some(c) = d.cuts.iter_mut().find(|c| c.number == cut) {
                c.outcome = Some(outcome);
            }
            self.stop.cond.notify_all();
        }
        result
    }

    /// Records the cut at `instant` (µs; `None`: it failed) as covering
    /// the requests counted up to `asked`; its number if it covers any.
    fn record_cut(&self, asked: u64, instant: Option<i64>) -> Option<u64> {
        let mut d = self.stop.demand();
        if asked <= d.covered {
            return None;
        }
        d.covered = asked;
        d.cuts_taken += 1;
        let number = d.cuts_taken;
        d.cuts.push_back(Cut {
            number,
            covers: asked,
            instant_micros: instant.unwrap_or(0),
            outcome: instant
                .is_none()
                .then(|| Err("cannot start a point".to_string())),
        });
        if d.cuts.len() > CUTS_KEPT {
            d.cuts.pop_front();
        }
        self.stop.cond.notify_all();
        Some(number)
    }

    /// Writes the point started by `start_point` (`started`) under
    /// `session` (taken before the cut) or a lock taken now.
    fn write_point(
        &mut self,
        session: Option<ChangedBackup<'_>>,
        started: io::Result<(SystemTime, Option<Point>)>,
        own: bool,
    ) -> std::result::Result<(), Failed> {
        let name = self.status.name.clone();
        let (instant, point) = started.map_err(|e| Failed {
            reason: format!("cannot start a point: {e}"),
            failure: true,
        })?;
        // Nothing changed: the store holds the disk as it is now, unless a
        // cut on demand wants a point of its own (then a delta on the last
        // one with no entries, so no two group points share a member).
        if point.is_none() && !(own && self.record.parent.is_some()) {
            drop(session);
            self.status
                .covered_micros
                .fetch_max(micros(instant).max(0) as u64, Ordering::AcqRel);
            return Ok(());
        }
        let abandon = |point: Option<Point>| {
            if let Some(p) = point {
                let _ = p.abandon();
            }
        };
        let full = point.as_ref().is_some_and(Point::full);
        let store = self.store.clone();
        let mut session = match session {
            Some(s) => s,
            None => match lock_store(&store, &name, &self.stop) {
                Ok(s) => s,
                Err(f) => {
                    abandon(point);
                    return Err(f);
                }
            },
        };
        session.set_created(micros(instant));
        let parent = if full {
            None
        } else {
            self.record.parent.clone()
        };
        let opts = ChangedOptions {
            image_size: self.image_size,
            source: format!("protection point of {name}"),
            parent: parent.clone(),
            progress: None,
            threads: Some(point_threads()),
            readers: point_threads(),
        };
        // The copy runs idle-class (the cut above did not).
        let ran = Background::run(self.status.interval, || match &point {
            Some(point) => session.run(
                &PointSource {
                    point,
                    stop: &self.stop,
                    patches: parent.is_some(),
                },
                &opts,
            ),
            None => session.run(&NothingChanged, &opts),
        });
        let stats = match ran {
            Ok(stats) => stats,
            Err(e) => {
                drop(session);
                abandon(point);
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
        if full {
            record.full_needed = false;
        }
        if let Err(e) = store_record(&self.record_path, &record) {
            // The point is in the store, but not recorded: its chunks stay
            // changed and the next point is a delta on the old parent.
            abandon(point);
            return Err(Failed {
                reason: format!("failed to record point {}: {e}", stats.snapshot),
                failure: true,
            });
        }
        self.record = record;
        if let Err(e) = point.map_or(Ok(()), Point::finish) {
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

/// Waits up to [`LOCK_WAIT`] for the store's writer lock (a point on
/// demand, whose cut is taken), unless the daemon stops.
fn lock_store<'a>(
    store: &'a Store,
    name: &str,
    stop: &Stop,
) -> std::result::Result<ChangedBackup<'a>, Failed> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(20);
    loop {
        match store.begin_changed_backup(name) {
            Err(e) if e.kind() == ErrorKind::Locked && Instant::now() < deadline => {
                if stop.wait_until(Instant::now() + pause, false) {
                    return Err(e.into());
                }
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r.map_err(Failed::from),
        }
    }
}

/// The source of a point on demand when nothing changed since the last
/// one: every chunk as in its parent.
struct NothingChanged;

impl ChangedSource for NothingChanged {
    fn chunk_state(&self, _chunk: u64) -> ChunkState {
        ChunkState::Unchanged
    }

    fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("no chunk changed since the last point"))
    }
}

// A point's written grains are the store's patch grains.
const _: () = assert!(block::protect::GRAIN == store::patch::GRAIN as u64);

/// A point as the store's changed-blocks source: a chunk the guest wrote
/// in part since the last point is `Partial` (only its written grains are
/// read, and the store keeps a patch over the parent's chunk), one it
/// wrote mostly is `Data`.
struct PointSource<'a> {
    point: &'a Point,
    stop: &'a Stop,
    /// The point has a parent to patch.
    patches: bool,
}

impl PointSource<'_> {
    fn check_stop(&self) -> io::Result<()> {
        if self.stop.is_stopped() {
            return Err(io::Error::other("the daemon stops"));
        }
        Ok(())
    }
}

impl ChangedSource for PointSource<'_> {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        if !self.point.is_captured(chunk) {
            ChunkState::Unchanged
        } else if self.patches && self.point.changed_grains(chunk).is_some() {
            ChunkState::Partial
        } else {
            ChunkState::Data
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_stop()?;
        self.point.read_at(buf, offset)
    }

    fn dirty_grains(&self, chunk: u64) -> Vec<bool> {
        self.point.changed_grains(chunk).unwrap_or_default()
    }

    fn read_ranges(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> io::Result<()> {
        self.check_stop()?;
        self.point.read_ranges(ranges, buf)
    }
}

/// Worker (and reader) threads of a point: half the host's cores, at
/// least one. A point is background work: it leaves the guest's request
/// threads cores of their own instead of only a higher priority (on 2
/// cores, one thread: a point of scattered 4 KiB writes reads its grains
/// and writes its patches in well under the interval).
fn point_threads() -> usize {
    (std::thread::available_parallelism().map_or(2, |n| n.get()) / 2).clamp(1, 4)
}

/// Nice value of the `protect` thread and of the store's reader and worker
/// threads it starts (threads inherit it): a point is background work, and
/// on a loaded machine the guest's requests must win the CPU. While a
/// point copies, its threads are also idle-class (`crate::point_sched`).
pub const POINT_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`POINT_NICE`] (Linux nice
/// values are per thread); a failure only costs the guest some latency.
pub(crate) fn lower_priority() {
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
        open_every(dir, mem, store, name, origin, MIN_INTERVAL)
    }

    /// An hour between scheduled points: every point a test takes after
    /// the first attempt is asked for.
    fn open_on_demand(
        dir: &Path,
        mem: &Arc<MemDevice>,
        store: &Arc<Store>,
        origin: &Origin,
    ) -> Protector {
        open_every(dir, mem, store, None, origin, Duration::from_secs(3600))
    }

    fn open_every(
        dir: &Path,
        mem: &Arc<MemDevice>,
        store: &Arc<Store>,
        name: Option<&str>,
        origin: &Origin,
        interval: Duration,
    ) -> Protector {
        let cfg = ProtectConfig {
            name: name.map(str::to_string),
            interval,
        };
        Protector::open(
            dir,
            Protected::Device(mem.clone()),
            store.clone(),
            &cfg,
            origin,
        )
        .unwrap()
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

    /// 64 KiB chunks, a few 4 KiB grains written between points: each
    /// point reads only those grains and stores patches over its parent's
    /// chunks (merged while at most half a chunk is written, whole after),
    /// and every point restores exactly, the older ones too.
    #[test]
    fn scattered_writes_make_patch_points_that_restore_exactly() {
        const BIG: u32 = 64 << 10;
        const CHUNKS: usize = 16;
        let dir = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..CHUNKS * BIG as usize)
            .map(|i| (i / 4096 * 7 + i % 251) as u8)
            .collect();
        let store = Store::init(&dir.path().join("store"), BIG).unwrap();
        let src = dir.path().join("src.img");
        std::fs::write(&src, &image).unwrap();
        let booted = store
            .backup("vm", &src, &Default::default())
            .unwrap()
            .snapshot;
        let store = Arc::new(store);
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mem = Arc::new(MemDevice::from_vec(image));
        let origin = Origin {
            snapshot: Some(("vm".into(), booted)),
            fresh_state: true,
        };
        // Points on demand only (the timer's first point finds nothing).
        let mut p = open_on_demand(&state, &mem, &store, &origin);
        let layer = p.layer().clone();
        let status = p.status().clone();
        p.spawn().unwrap();
        let mut points: Vec<(String, Vec<u8>)> = Vec::new();
        // The grains each chunk's patch holds (written since it was last
        // read whole): past half a chunk, the point reads it whole.
        let mut patched = vec![std::collections::BTreeSet::new(); CHUNKS];
        let mut whole = 0;
        let mut x = 12345u64;
        for round in 0..12u64 {
            let before = status.protection();
            // Three grains (one of them in part), two always in chunk 3
            // so that it fills past half and is read whole.
            let mut written = vec![std::collections::BTreeSet::new(); CHUNKS];
            for k in 0..3u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let chunk = if k < 2 { 3 } else { x % CHUNKS as u64 };
                let g = (x >> 8) % 16;
                let off = chunk * u64::from(BIG) + g * 4096;
                let len = if k == 2 { 100 } else { 4096 };
                layer
                    .write_at(&vec![round as u8 + 1; len], off + 4096 - len as u64)
                    .unwrap();
                written[chunk as usize].insert(g);
            }
            let mut expect = 0;
            for (c, w) in written.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
                patched[c].extend(w.iter().copied());
                if patched[c].len() * 2 > 16 {
                    expect += u64::from(BIG);
                    patched[c].clear();
                    whole += 1;
                } else {
                    expect += w.len() as u64 * 4096;
                }
            }
            let cut = status.point_now(Duration::from_secs(60)).unwrap().cut;
            let last = status
                .wait_point(cut, Duration::from_secs(60))
                .unwrap()
                .snapshot
                .unwrap();
            let pr = status.protection();
            assert_eq!(
                pr.point_bytes_read - before.point_bytes_read,
                expect,
                "round {round}: only the written grains are read: {pr:?}"
            );
            assert_eq!(
                restore(&store, &last, dir.path()),
                mem.snapshot(),
                "round {round}"
            );
            points.push((last, mem.snapshot()));
        }
        assert!(whole > 0, "chunk 3 was never read whole");
        p.stop();
        for (point, image) in &points {
            assert!(restore(&store, point, dir.path()) == *image, "{point}");
        }
        let report = store.verify(None, &Default::default()).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
    }

    #[test]
    fn a_point_on_demand_holds_the_writes_before_its_cut_and_waits_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let image = vec![7u8; SIZE];
        let (store, booted) = store_with(dir.path(), &image);
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mem = Arc::new(MemDevice::from_vec(image.clone()));
        let origin = Origin {
            snapshot: Some(("vm".into(), booted.clone())),
            fresh_state: true,
        };
        let mut p = open_on_demand(&state, &mem, &store, &origin);
        let layer = p.layer().clone();
        let status = p.status().clone();
        p.spawn().unwrap();
        wait_for("the first scheduled attempt", || {
            status.protection().rpo_seconds.is_some()
        });
        let timeout = Duration::from_secs(60);
        // Nothing changed: a point of its own all the same, a delta on the
        // booted snapshot holding the same disk.
        let cut = status.point_now(timeout).unwrap();
        let done = status.wait_point(cut.cut, timeout).unwrap();
        assert_eq!(done.instant, cut.instant);
        let unchanged = done.snapshot.unwrap();
        assert_ne!(unchanged, format!("vm@{booted}"));
        let info = store.resolve(&unchanged).unwrap();
        assert_eq!(info.parent.as_deref(), Some(booted.as_str()));
        assert_eq!(restore(&store, &unchanged, dir.path()), image);

        layer.write_at(&[1; 4096], 3 * 4096).unwrap();
        let expected = mem.snapshot();
        // Another writer holds the store's lock: the cut is taken anyway,
        // and the point is written once the lock is free.
        let held = store.begin_changed_backup("other").unwrap();
        let cut = status.point_now(timeout).unwrap();
        assert!(cut.snapshot.is_none());
        assert!(cut.instant_micros > 0);
        layer.write_at(&[2; 4096], 5 * 4096).unwrap();
        let err = status
            .wait_point(cut.cut, Duration::from_millis(200))
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        drop(held);
        let done = status.wait_point(cut.cut, timeout).unwrap();
        let snapshot = done.snapshot.unwrap();
        assert_eq!(
            restore(&store, &snapshot, dir.path()),
            expected,
            "the point holds the disk at its cut, not the later write"
        );
        assert_eq!(
            store.resolve(&snapshot).unwrap().created,
            cut.instant,
            "the snapshot is stamped with the cut's instant"
        );
        assert!(status.wait_point(999, timeout).is_err());
        p.stop();
        let err = status.point_now(timeout).unwrap_err();
        assert!(err.contains("stops"), "{err}");
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
