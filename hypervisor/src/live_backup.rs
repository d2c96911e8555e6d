//! Live backup of a running QEMU VM's disk: a point in time through image
//! fleecing, reading only what changed since the last backup through a
//! dirty bitmap, over QEMU's own NBD server.
//!
//! # Sequence
//! ```text
//!  store writer lock ─ QMP connect ─ resolve drive ─ clear leftovers (by name prefix)
//!  decide full / incremental (+ reason) ─ fold stray bitmaps into the base
//!  write empty scratch.qcow2 ─ blockdev-add scratch (backing = disk,
//!         cache.no-flush: throwaway data, no fdatasync with the disk drained)
//!  [qga freeze] transaction {
//!      full:        blockdev-backup sync=none disk→scratch
//!      incremental: block-dirty-bitmap-add JOB (in memory),
//!                   block-dirty-bitmap-merge BASE→JOB,
//!                   blockdev-backup sync=bitmap bitmap=JOB bitmap-mode=never
//!                                   speed=1 disk→scratch
//!      block-dirty-bitmap-add NEW,
//!      block-dirty-bitmap-disable BASE } [qga thaw]
//!  nbd-server-start ─ block-export-add scratch (bitmaps: BASE)
//!  NBD (2 connections): block status (base:allocation,
//!         qemu:dirty-bitmap:BASE, one pipelined pass) → chunk plan
//!  store: read Data chunks and the dirty grains of Partial ones (each
//!         reader's requests in one write, many in flight), Zero never
//!         read, Unchanged chunks reuse the parent snapshot's chunk ids
//!  teardown (always): export, server, job, JOB bitmap, scratch node, file
//!  bitmaps: success → remove BASE (NEW tracks from this snapshot on)
//!           failure → enable BASE, merge NEW into BASE, remove NEW
//! ```
//! The guest is paused only for the transaction (`blackout_ms`).
//!
//! # What the guest pays
//! The job's copy-before-write keeps the point in time: the first guest
//! write to a cluster the backup still has to read copies the old cluster
//! into the scratch image. A full backup reads everything, so every
//! cluster needs it (`sync=none`). An incremental reads only the base
//! bitmap's dirty clusters: its job (`sync=bitmap` over `JOB`, a copy of
//! the base taken in the transaction, because NBD cannot export the
//! bitmap a job holds busy) copies before write only those, and at
//! 1 byte/s copies nothing on its own beyond its first run; once every
//! dirty cluster is copied the job ends and QEMU removes its filter. A
//! guest write anywhere else costs nothing.
//!
//! # Pacing the reads
//! QEMU serves the NBD reads in the main loop that also serves the guest's
//! I/O (without an iothread, the default). `Config::rate` paces the reads
//! (`block::migrate::RateLimiter`, as the migration copier): inside a TCG
//! guest here, a full backup at full speed raised the guest's write p99
//! 22–38×, at 50 MB/s about 2× (`docs/BENCHMARKS.md`, `live-backup-guest`).
//! With `Rate::Auto` a pacer thread sets the limiter from the guest's own
//! latency while the store reads ([`crate::pacing`]).
//!
//! # Bitmaps and "never a wrong incremental"
//! Each snapshot records in its `source` the bitmap that started at its
//! point in time (`…?bitmap=ir-<tag>-<name>-<token>`). An incremental
//! needs exactly that bitmap on the drive, and the same disk size;
//! otherwise the backup is full and says why (`reason`). A bitmap of ours
//! that matches no snapshot (its snapshot was forgotten, or a killed run
//! left it) is never trusted on its own: strays are merged *into* the base
//! (a superset of changes only costs reads) or removed after a full backup.
//! Bitmaps are `persistent` on qcow2 disks (they survive a QEMU restart)
//! and in memory otherwise. Granularity: the store's chunk size.
//!
//! # Failure, Ctrl-C and SIGKILL
//! On any error or interrupt, the fleece is torn down and the new bitmap is
//! merged back into the base, so the next backup still sees every change.
//! After a SIGKILL, the next run removes the leftovers by name prefix and
//! folds the stray bitmap into the base the same way.

pub mod fleece;
#[cfg(test)]
mod qemu_tests;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use block::migrate::RateLimiter;
use serde::Serialize;
use store::backup::changed::{ChangedBackup, ChangedOptions, ChunkState};
use store::{SnapshotInfo, Store};
use tracing::{info, info_span, warn};

use crate::nbd;
use crate::pacing::{self, Rate};
use crate::qga::Qga;
use crate::qmp::{self, Action, Qmp};
use fleece::{Drive, Fleece, Names};

/// Errors of a live backup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("QMP {what} failed")]
    Qmp {
        what: &'static str,
        #[source]
        source: qmp::Error,
    },
    #[error("Guest agent {what} failed")]
    Qga {
        what: &'static str,
        #[source]
        source: qmp::Error,
    },
    #[error("NBD {what} failed")]
    Nbd {
        what: &'static str,
        #[source]
        source: nbd::Error,
    },
    #[error("Store operation failed")]
    Store(#[from] store::Error),
    #[error("Unknown drive {drive:?}; the VM has: {known}")]
    UnknownDrive { drive: String, known: String },
    #[error("Scratch directory {dir} is unusable")]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Scratch directory {dir} has {free} bytes free; fleecing needs up to {need} \
         (the disk size) for blocks the guest overwrites during the backup"
    )]
    ScratchSpace { dir: PathBuf, free: u64, need: u64 },
    #[error("{0}")]
    Unsupported(String),
    #[error("Backup interrupted")]
    Interrupted,
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What to back up and how.
pub struct Config<'a> {
    pub name: String,
    pub qmp: PathBuf,
    pub drive: String,
    /// Read everything even when an incremental is possible.
    pub full: bool,
    /// Directory for the scratch image and the NBD socket.
    pub scratch: PathBuf,
    /// Guest agent socket: freeze filesystems around the start.
    pub qga: Option<PathBuf>,
    pub threads: Option<usize>,
    /// How the NBD reads are paced: a fixed limit (0: unlimited), or by
    /// the guest's latency ([`crate::pacing`]).
    pub rate: Rate,
    /// Set to stop the backup (Ctrl-C); changes stay tracked.
    pub abort: &'a AtomicBool,
    pub progress: Option<store::Progress<'a>>,
    /// Called with the disk size once it is known (for a progress bar).
    pub on_size: Option<store::Progress<'a>>,
}

/// What a live backup did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `NAME@ID`
    pub snapshot: String,
    /// `full` or `incremental`
    pub mode: &'static str,
    /// Why a full backup was taken.
    pub reason: Option<String>,
    pub image_size: u64,
    pub bytes_read: u64,
    pub dirty_bytes: u64,
    pub bytes_new: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Of the new chunks, those changed in part and stored as patches (the
    /// dirty 4 KiB grains over the parent's chunk).
    pub chunks_patch: u64,
    /// Chunks reused from the parent without reading.
    pub chunks_unchanged: u64,
    /// Guest paused for the start transaction.
    pub blackout_ms: f64,
    /// Guest filesystems frozen (with `--qga`).
    pub frozen_ms: Option<f64>,
    pub seconds: f64,
    pub parent: Option<String>,
    /// The dirty bitmap now tracking changes for the next backup.
    pub bitmap: String,
    /// Leftovers of an earlier killed run that were removed.
    pub leftovers_cleared: Vec<String>,
    /// What `--rate auto` did (absent with a fixed rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pacing: Option<pacing::Report>,
}

/// A short tag naming the store in QEMU object names.
pub fn store_tag(store: &Store) -> String {
    let p = std::fs::canonicalize(store.path()).unwrap_or_else(|_| store.path().to_path_buf());
    let h = blake3::hash(p.to_string_lossy().as_bytes());
    h.to_hex()[..8].to_owned()
}

/// The snapshot `source` string: where it came from and the bitmap that
/// started at its point in time.
pub fn source_string(qmp: &Path, node: &str, bitmap: &str) -> String {
    format!("qemu:{}#{node}?bitmap={bitmap}", qmp.display())
}

/// The bitmap recorded in a snapshot's `source`, if it was a live backup.
pub fn recorded_bitmap(source: &str) -> Option<&str> {
    source
        .strip_prefix("qemu:")?
        .rsplit_once("?bitmap=")
        .map(|(_, b)| b)
}

/// Full or incremental, decided before anything changes in QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Full { reason: String },
    Incremental { base: String, parent: String },
}

/// Decide the mode. `ours`: our bitmaps of this image on the drive;
/// `others`: bitmaps of other stores (`ir-` but not our prefix).
pub fn decide(
    full: bool,
    name: &str,
    newest: Option<&SnapshotInfo>,
    drive: &Drive,
    chunk_size: u32,
    ours: &[qmp::DirtyBitmap],
    others: &[String],
) -> Mode {
    let full_because = |reason: String| Mode::Full { reason };
    if full {
        return full_because("--full was given".into());
    }
    let Some(parent) = newest else {
        return full_because(format!("no earlier snapshot of {name}"));
    };
    let Some(want) = recorded_bitmap(&parent.source) else {
        return full_because(format!(
            "the previous snapshot {} was not taken from a running VM (no dirty bitmap)",
            parent.reference()
        ));
    };
    let Some(base) = ours.iter().find(|b| b.name == want) else {
        return full_because(if !ours.is_empty() {
            format!(
                "the drive's dirty bitmap {} was started for a snapshot that no longer exists \
                 (the newest is {}, which needs bitmap {want})",
                ours[0].name,
                parent.reference()
            )
        } else if !others.is_empty() {
            format!(
                "the drive's dirty bitmaps belong to another store or image ({}); \
                 bitmap {want} of {} is missing",
                others.join(", "),
                parent.reference()
            )
        } else {
            format!(
                "dirty bitmap {want} of {} is missing (QEMU restarted with a disk that keeps \
                 bitmaps only in memory, or it was removed)",
                parent.reference()
            )
        });
    };
    if base.inconsistent {
        return full_because(format!(
            "dirty bitmap {want} is inconsistent (QEMU did not shut down cleanly)"
        ));
    }
    if drive.size != parent.image_size {
        return full_because(format!(
            "the disk is {} bytes, the previous snapshot {} has {}",
            drive.size,
            parent.reference(),
            parent.image_size
        ));
    }
    if base.granularity > chunk_size || !chunk_size.is_multiple_of(base.granularity) {
        return full_because(format!(
            "dirty bitmap {want} has granularity {}, which does not divide the chunk size {chunk_size}",
            base.granularity
        ));
    }
    Mode::Incremental {
        base: want.to_owned(),
        parent: parent.id.clone(),
    }
}

fn qerr(what: &'static str) -> impl FnOnce(qmp::Error) -> Error {
    move |source| Error::Qmp { what, source }
}

/// Run one live backup of `cfg.drive` into `store` as image `cfg.name`.
pub fn run(store: &Store, cfg: &Config<'_>) -> Result<Report> {
    store::snapshot::validate_name(&cfg.name)?;
    let span = info_span!("live_backup", name = %cfg.name, drive = %cfg.drive);
    let _e = span.enter();
    let started = Instant::now();
    let names = Names::new(&store_tag(store));
    // The writer lock first: no other run of this store touches QEMU meanwhile,
    // so every object with our prefix is a leftover.
    let session = store.begin_changed_backup(&cfg.name)?;
    let mut q = Qmp::connect(&cfg.qmp).map_err(qerr("connect"))?;
    // Resolve first: an unknown drive is reported before anything changes.
    let drive = fleece::resolve_drive(&mut q, &cfg.drive)?;
    let leftovers = fleece::clear_leftovers(&mut q, &names, &cfg.scratch)?;
    let target = Target {
        name: cfg.name.clone(),
        qmp: cfg.qmp.clone(),
        drive: cfg.drive.clone(),
        full: cfg.full,
        scratch: cfg.scratch.clone(),
    };
    // Clearing leftovers removes only our own nodes, exports and jobs: the
    // drive and its bitmaps are as resolved.
    let mut member =
        Member::prepare_resolved(&mut q, store, session.newest(), names, &target, drive)?;
    if let Some(f) = cfg.on_size {
        f(member.drive.size);
    }
    let result = start_and_read(store, cfg, &session, &mut q, &mut member);
    let cleanup = member.teardown(&mut q);
    // Bitmaps: on success the new one tracks from this snapshot on; on
    // failure every change since the parent stays tracked.
    if let Err(e) = member.finish(&mut q, result.is_ok()) {
        warn!("could not update dirty bitmaps after the backup: {e}");
    }
    let (done, blackout, frozen) = result?;
    if !cleanup.is_empty() {
        warn!(
            ?cleanup,
            "cleanup left something behind; the next run removes it"
        );
    }
    Ok(member.report(done, blackout, frozen, started, leftovers))
}

/// The single-VM start (qga freeze, one transaction, thaw) and the read.
fn start_and_read(
    store: &Store,
    cfg: &Config<'_>,
    session: &ChangedBackup<'_>,
    q: &mut Qmp,
    member: &mut Member,
) -> Result<(Done, Duration, Option<Duration>)> {
    let mut qga = match &cfg.qga {
        Some(p) => Some(Qga::connect(p).map_err(|source| Error::Qga {
            what: "connect",
            source,
        })?),
        None => None,
    };
    if cfg.rate == Rate::Auto {
        member.require_guest()?;
    }
    let actions = member.start_actions(store.chunk_size());
    let limit = RateLimiter::new(cfg.rate.initial());
    let frozen_at = Instant::now();
    if let Some(g) = qga.as_mut() {
        g.fsfreeze_freeze().map_err(|source| Error::Qga {
            what: "guest-fsfreeze-freeze",
            source,
        })?;
    }
    let t0 = Instant::now();
    let tx = q.transaction(&actions);
    let blackout = t0.elapsed();
    // Always thaw, whatever the transaction did.
    let thawed = qga.as_mut().map(|g| g.fsfreeze_thaw());
    let frozen = qga.as_ref().map(|_| frozen_at.elapsed());
    tx.map_err(qerr("transaction (start fleecing)"))?;
    member.started();
    if let Some(Err(source)) = thawed {
        return Err(Error::Qga {
            what: "guest-fsfreeze-thaw",
            source,
        });
    }
    info!(
        blackout_ms = blackout.as_secs_f64() * 1000.0,
        "point in time taken"
    );
    let done = member.read(
        q,
        store,
        session,
        &ReadOptions {
            progress: cfg.progress,
            threads: cfg.threads,
            abort: cfg.abort,
            limit: &limit,
            auto: cfg.rate == Rate::Auto,
        },
    )?;
    Ok((done, blackout, frozen))
}

/// Where one member of a live backup comes from.
#[derive(Debug, Clone)]
pub struct Target {
    /// Image name in the store.
    pub name: String,
    pub qmp: PathBuf,
    pub drive: String,
    pub full: bool,
    /// Directory for the scratch image and the NBD socket.
    pub scratch: PathBuf,
}

/// How [`Member::read`] reads.
pub struct ReadOptions<'a> {
    pub progress: Option<store::Progress<'a>>,
    pub threads: Option<usize>,
    pub abort: &'a AtomicBool,
    /// Paces the NBD reads (one limiter may pace several members).
    pub limit: &'a RateLimiter,
    /// Set `limit` by the guest's latency on this member's drive while it
    /// reads ([`crate::pacing`]; the drive must be attached to a device).
    pub auto: bool,
}

/// What a member's read produced: store stats, dirty bytes, chunks reused
/// from the parent.
pub type Done = (store::BackupStats, u64, u64);

/// One disk's live backup, split into phases so that several disks (of one
/// VM or of several) are started at one instant (a group point):
///
/// 1. [`Member::prepare`]: resolve the drive, decide full/incremental, fold
///    stray bitmaps, add the scratch node (the caller has cleared leftovers
///    once per VM with [`fleece::clear_leftovers`]);
/// 2. the caller runs [`Member::start_actions`] of every member of a VM in
///    one QMP `transaction`, inside its freeze or `stop` window, then calls
///    [`Member::started`] when it succeeded;
/// 3. [`Member::read`]: export over NBD and read into the store (one
///    member of a VM at a time: QEMU runs one NBD server);
/// 4. always [`Member::teardown`] (removes what QEMU holds for it), then
///    [`Member::finish`] with the outcome of the whole group: on failure
///    the new bitmap is merged back into the base, so the next run still
///    sees every change.
pub struct Member {
    pub name: String,
    pub drive: Drive,
    pub mode: Mode,
    names: Names,
    qmp: PathBuf,
    scratch: PathBuf,
    ours: Vec<qmp::DirtyBitmap>,
    new_bitmap: String,
    fleece: Fleece,
    added: bool,
    /// What `--rate auto` did during [`Member::read`].
    pacing: Option<pacing::Report>,
}

impl Member {
    /// Phase 1 (see [`Member`]). `newest`: the newest snapshot of
    /// `target.name` (from the store session). On error nothing is left in
    /// QEMU.
    pub fn prepare(
        q: &mut Qmp,
        store: &Store,
        newest: Option<&SnapshotInfo>,
        names: Names,
        target: &Target,
    ) -> Result<Member> {
        store::snapshot::validate_name(&target.name)?;
        let drive = fleece::resolve_drive(q, &target.drive)?;
        Self::prepare_resolved(q, store, newest, names, target, drive)
    }

    /// [`Member::prepare`] of a drive already resolved (after the VM's
    /// leftovers were cleared).
    pub fn prepare_resolved(
        q: &mut Qmp,
        store: &Store,
        newest: Option<&SnapshotInfo>,
        names: Names,
        target: &Target,
        drive: Drive,
    ) -> Result<Member> {
        store::snapshot::validate_name(&target.name)?;
        // A killed run's job copy of the base (its job was cancelled with
        // the leftovers): nothing to keep.
        let job_prefix = names.job_bitmap_prefix();
        for b in drive
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with(&job_prefix))
        {
            q.bitmap_remove(&drive.node, &b.name)
                .map_err(qerr("block-dirty-bitmap-remove (a leftover job copy)"))?;
            info!(bitmap = %b.name, "removed a leftover job copy of a bitmap");
        }
        let bprefix = names.bitmap_prefix(&target.name);
        let ours: Vec<qmp::DirtyBitmap> = drive
            .bitmaps
            .iter()
            .filter(|b| fleece::is_our_bitmap(&b.name, &bprefix))
            .cloned()
            .collect();
        let others: Vec<String> = drive
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with("ir-") && !b.name.starts_with(&names.prefix))
            .map(|b| b.name.clone())
            .collect();
        let mut mode = decide(
            target.full,
            &target.name,
            newest,
            &drive,
            store.chunk_size(),
            &ours,
            &others,
        );
        // Never a wrong incremental: a parent that cannot be read (damaged
        // manifest) cannot lend its chunks.
        if let Mode::Incremental { parent, .. } = &mode {
            let reference = format!("{}@{parent}", target.name);
            let checked = store
                .open_snapshot(&reference)
                .and_then(|r| r.verify_manifest());
            if let Err(e) = checked {
                mode = Mode::Full {
                    reason: format!(
                        "the previous snapshot {reference} cannot be read ({})",
                        nbd::error_chain(&e)
                    ),
                };
            }
        }
        info!(name = %target.name, ?mode, "mode decided");
        if let Mode::Incremental { base, .. } = &mode {
            fold_strays(q, &drive, &ours, base)?;
        }
        std::fs::create_dir_all(&target.scratch).map_err(|source| Error::Scratch {
            dir: target.scratch.clone(),
            source,
        })?;
        let mut m = Member {
            name: target.name.clone(),
            new_bitmap: names.bitmap(&target.name),
            drive,
            mode,
            names,
            qmp: target.qmp.clone(),
            scratch: target.scratch.clone(),
            ours,
            fleece: Fleece::default(),
            added: false,
            pacing: None,
        };
        if let Err(e) = m.fleece.prepare(q, &m.names, &m.drive, &m.scratch) {
            m.teardown(q);
            return Err(e);
        }
        Ok(m)
    }

    /// Phase 2: the actions that start this member's point in time (run
    /// them in one transaction with the other members of its VM).
    pub fn start_actions(&self, chunk_size: u32) -> Vec<Action> {
        let drive = &self.drive;
        let mut actions = Vec::new();
        let backup = |sync: &str, bitmap: Option<String>| Action::BlockdevBackup {
            job_id: self.names.job(),
            device: drive.node.clone(),
            target: self.names.node(),
            sync: sync.into(),
            bitmap_mode: bitmap.as_ref().map(|_| "never".into()),
            // Copy nothing on its own beyond the first run the rate limit
            // lets through: only copy-before-write.
            speed: bitmap.as_ref().map(|_| 1),
            // A job that ends takes its copy-before-write filter with it:
            // if its own copy (that first run) failed, later guest writes
            // to clusters not copied yet would reach the disk under the
            // export. Stopped, it keeps the filter until the teardown
            // cancels it. (A job with `sync: none` copies nothing on its
            // own.)
            on_source_error: bitmap.as_ref().map(|_| "stop".into()),
            on_target_error: bitmap.as_ref().map(|_| "stop".into()),
            bitmap,
            auto_dismiss: true,
            filter_node_name: Some(self.names.filter()),
        };
        match &self.mode {
            // Only the base's dirty clusters are read, so only they need a
            // copy before the guest overwrites them: a guest write
            // elsewhere costs nothing (`sync: none` copied the first write
            // to every cluster). The job holds its bitmap busy, and NBD
            // cannot export a busy bitmap: the job gets a copy of the
            // base, taken in this transaction.
            Mode::Incremental { base, .. } => {
                let copy = self.names.job_bitmap();
                actions.push(Action::BlockDirtyBitmapAdd {
                    node: drive.node.clone(),
                    name: copy.clone(),
                    granularity: drive
                        .bitmaps
                        .iter()
                        .find(|b| &b.name == base)
                        .map_or(bitmap_granularity(chunk_size), |b| b.granularity),
                    persistent: false,
                });
                actions.push(Action::BlockDirtyBitmapMerge {
                    node: drive.node.clone(),
                    target: copy.clone(),
                    bitmaps: vec![base.clone()],
                });
                actions.push(backup("bitmap", Some(copy)));
            }
            Mode::Full { .. } => actions.push(backup("none", None)),
        }
        actions.push(Action::BlockDirtyBitmapAdd {
            node: drive.node.clone(),
            name: self.new_bitmap.clone(),
            granularity: bitmap_granularity(chunk_size),
            persistent: drive.drv == "qcow2",
        });
        if let Mode::Incremental { base, .. } = &self.mode {
            actions.push(Action::BlockDirtyBitmapDisable {
                node: drive.node.clone(),
                name: base.clone(),
            });
        }
        actions
    }

    /// Phase 2 done: the transaction holding [`Member::start_actions`]
    /// succeeded.
    pub fn started(&mut self) {
        self.fleece.job = Some(self.names.job());
        if matches!(self.mode, Mode::Incremental { .. }) {
            self.fleece.job_bitmap = Some((self.drive.node.clone(), self.names.job_bitmap()));
        }
        self.added = true;
    }

    /// Phase 3: export the point in time and read it into the store.
    pub fn read(
        &mut self,
        q: &mut Qmp,
        store: &Store,
        session: &ChangedBackup<'_>,
        opts: &ReadOptions<'_>,
    ) -> Result<Done> {
        if opts.abort.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let base = mode_base(&self.mode).cloned();
        let socket = self
            .fleece
            .export(q, &self.names, &self.scratch, base.as_slice())?;
        let dirty_ctx = base.as_ref().map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec!["base:allocation".to_owned()];
        contexts.extend(dirty_ctx.clone());
        let client = nbd::Client::connect_many(
            &socket,
            &nbd::Options {
                export: self.names.export(),
                meta_contexts: contexts,
            },
            NBD_CONNECTIONS,
        )
        .map_err(|source| Error::Nbd {
            what: "connect",
            source,
        })?;
        let plan = source::plan(&client, store.chunk_size() as u64, dirty_ctx.as_deref())?;
        info!(
            dirty_bytes = plan.dirty_bytes,
            data_chunks = plan.count(ChunkState::Data),
            partial_chunks = plan.count(ChunkState::Partial),
            "plan ready"
        );
        let src = source::NbdSource {
            client: &client,
            plan: &plan,
            abort: opts.abort,
            bytes_read: Default::default(),
            limit: opts.limit,
        };
        let copts = ChangedOptions {
            image_size: self.drive.size,
            source: source_string(&self.qmp, &self.drive.node, &self.new_bitmap),
            parent: match &self.mode {
                Mode::Incremental { parent, .. } => Some(parent.clone()),
                Mode::Full { .. } => None,
            },
            progress: opts.progress,
            threads: opts.threads,
            readers: 8,
        };
        let guest = self.drive.guest.clone().filter(|_| opts.auto);
        let result = match guest {
            None => session.run(&src, &copts),
            Some((device, qdev)) => {
                let mut probe = pacing::QmpProbe { q, device, qdev };
                let (r, report) = pacing::beside(
                    &mut probe,
                    opts.limit,
                    &src.bytes_read,
                    pacing::WINDOW,
                    || session.run(&src, &copts),
                );
                self.pacing = report;
                r
            }
        };
        let mut stats = match result {
            Err(_) if opts.abort.load(Ordering::Relaxed) => return Err(Error::Interrupted),
            r => r?,
        };
        // What crossed NBD (zero ranges and parent data were not read).
        stats.bytes_read = src.bytes_read.load(Ordering::Relaxed);
        Ok((stats, plan.dirty_bytes, plan.count(ChunkState::Unchanged)))
    }

    /// For `--rate auto`: the drive must be attached to a guest device,
    /// whose latency the pacing watches.
    pub fn require_guest(&self) -> Result<()> {
        match self.drive.guest {
            Some(_) => Ok(()),
            None => Err(Error::Unsupported(format!(
                "--rate auto paces by the guest's I/O latency, but drive {} is attached to no device",
                self.drive.node
            ))),
        }
    }

    /// Phase 4: remove the export, server, job, scratch node and file (in
    /// reverse order; returns what failed, never stops early).
    pub fn teardown(&mut self, q: &mut Qmp) -> Vec<String> {
        self.fleece.teardown(q)
    }

    /// Phase 4, after [`Member::teardown`]: `success` (of the whole group)
    /// removes the old bitmap, so the new one tracks from this snapshot on;
    /// otherwise the new bitmap is merged back into the base.
    pub fn finish(&mut self, q: &mut Qmp, success: bool) -> qmp::Result<()> {
        let node = &self.drive.node;
        let r = match (success, &self.mode) {
            (true, mode) => {
                let old: Vec<Action> = self
                    .ours
                    .iter()
                    .filter(|b| {
                        mode_base(mode) == Some(&b.name) || matches!(mode, Mode::Full { .. })
                    })
                    .map(|b| Action::BlockDirtyBitmapRemove {
                        node: node.clone(),
                        name: b.name.clone(),
                    })
                    .collect();
                if old.is_empty() {
                    Ok(())
                } else {
                    q.transaction(&old)
                }
            }
            (false, Mode::Incremental { base, .. }) if self.added => q.transaction(&[
                Action::BlockDirtyBitmapEnable {
                    node: node.clone(),
                    name: base.clone(),
                },
                Action::BlockDirtyBitmapMerge {
                    node: node.clone(),
                    target: base.clone(),
                    bitmaps: vec![self.new_bitmap.clone()],
                },
                Action::BlockDirtyBitmapRemove {
                    node: node.clone(),
                    name: self.new_bitmap.clone(),
                },
            ]),
            (false, _) if self.added => q.bitmap_remove(node, &self.new_bitmap),
            (false, _) => Ok(()),
        };
        self.added = false;
        r
    }

    /// The report of a member that was read.
    pub fn report(
        &self,
        done: Done,
        blackout: Duration,
        frozen: Option<Duration>,
        started: Instant,
        leftovers: Vec<String>,
    ) -> Report {
        let (stats, dirty_bytes, unchanged) = done;
        let (mode_name, reason) = match &self.mode {
            Mode::Full { reason } => ("full", Some(reason.clone())),
            Mode::Incremental { .. } => ("incremental", None),
        };
        Report {
            snapshot: format!("{}@{}", stats.name, stats.snapshot),
            mode: mode_name,
            reason,
            image_size: stats.image_size,
            bytes_read: stats.bytes_read,
            dirty_bytes,
            bytes_new: stats.bytes_new,
            chunks_total: stats.chunks_total,
            chunks_new: stats.chunks_new,
            chunks_patch: stats.chunks_patch,
            chunks_unchanged: unchanged,
            blackout_ms: blackout.as_secs_f64() * 1000.0,
            frozen_ms: frozen.map(|d| d.as_secs_f64() * 1000.0),
            seconds: started.elapsed().as_secs_f64(),
            parent: stats.parent,
            bitmap: self.new_bitmap.clone(),
            leftovers_cleared: leftovers,
            pacing: self.pacing.clone(),
        }
    }
}

/// Fold strays (a killed run's new bitmap, an older base) into the base,
/// and make sure it records.
fn fold_strays(q: &mut Qmp, drive: &Drive, ours: &[qmp::DirtyBitmap], base: &str) -> Result<()> {
    let strays: Vec<String> = ours
        .iter()
        .filter(|b| b.name != base)
        .map(|b| b.name.clone())
        .collect();
    let recording = ours.iter().any(|b| b.name == base && b.recording);
    if strays.is_empty() && recording {
        return Ok(());
    }
    let mut actions = vec![Action::BlockDirtyBitmapEnable {
        node: drive.node.clone(),
        name: base.to_owned(),
    }];
    if !strays.is_empty() {
        actions.push(Action::BlockDirtyBitmapMerge {
            node: drive.node.clone(),
            target: base.to_owned(),
            bitmaps: strays.clone(),
        });
    }
    for s in &strays {
        actions.push(Action::BlockDirtyBitmapRemove {
            node: drive.node.clone(),
            name: s.clone(),
        });
    }
    q.transaction(&actions)
        .map_err(qerr("transaction (fold stray bitmaps)"))?;
    info!(?strays, "folded stray bitmaps into the base");
    Ok(())
}

/// Connections to the fleecing export: QEMU serves 16 requests at a time
/// per connection, each waiting for a thread of its pool, so a second
/// connection keeps more reads in flight (a 2 GiB incremental of 5000
/// scattered 4 KiB reads, 2-core host, medians over 8 interleaved rounds:
/// 0.128 s against 0.138 s with one, QEMU's CPU 89 ms against 103 ms;
/// 15-25 % faster under load; three were about as fast as two, four
/// slower).
const NBD_CONNECTIONS: usize = 2;

/// Granularity of new bitmaps: a sixteenth of the chunk size (at least
/// 4 KiB), so a small write costs a small read; the rest of its chunk
/// comes from the parent snapshot.
pub fn bitmap_granularity(chunk_size: u32) -> u32 {
    (chunk_size / 16).max(4096).min(chunk_size)
}

fn mode_base(mode: &Mode) -> Option<&String> {
    match mode {
        Mode::Incremental { base, .. } => Some(base),
        Mode::Full { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(source: &str, size: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: "20261206T120000.000000Z".into(),
            name: "vm".into(),
            image_size: size,
            chunk_size: 65536,
            chunk_count: 0,
            created: String::new(),
            source: source.into(),
            parent: None,
        }
    }

    fn bitmap(name: &str) -> qmp::DirtyBitmap {
        qmp::DirtyBitmap {
            name: name.into(),
            count: 0,
            granularity: 65536,
            recording: true,
            persistent: true,
            busy: false,
            inconsistent: false,
        }
    }

    #[test]
    fn mode_falls_back_to_full_with_a_reason() {
        let drive = Drive {
            node: "disk0".into(),
            drv: "qcow2".into(),
            size: 1 << 30,
            bitmaps: Vec::new(),
            guest: None,
        };
        let src = source_string(Path::new("/run/q.sock"), "disk0", "ir-abc-vm-01");
        assert_eq!(recorded_bitmap(&src), Some("ir-abc-vm-01"));
        assert_eq!(recorded_bitmap("/images/vm.img"), None);
        let parent = info(&src, 1 << 30);
        let base = [bitmap("ir-abc-vm-01")];
        let mode =
            |full: bool, p: Option<&SnapshotInfo>, ours: &[qmp::DirtyBitmap], others: &[String]| {
                decide(full, "vm", p, &drive, 65536, ours, others)
            };
        let why = |p: &SnapshotInfo, ours: &[qmp::DirtyBitmap], others: &[String]| match mode(
            false,
            Some(p),
            ours,
            others,
        ) {
            Mode::Full { reason } => reason,
            m => panic!("{m:?}"),
        };
        assert_eq!(
            mode(false, Some(&parent), &base, &[]),
            Mode::Incremental {
                base: "ir-abc-vm-01".into(),
                parent: parent.id.clone()
            }
        );
        assert!(
            matches!(mode(true, Some(&parent), &base, &[]), Mode::Full { reason } if reason.contains("--full"))
        );
        assert!(
            matches!(mode(false, None, &base, &[]), Mode::Full { reason } if reason.contains("no earlier snapshot"))
        );
        let file = info("/images/vm.img", 1 << 30);
        assert!(why(&file, &base, &[]).contains("not taken from a running VM"));
        assert!(why(&parent, &[], &[]).contains("is missing"));
        assert!(why(&parent, &[bitmap("ir-abc-vm-00")], &[]).contains("no longer exists"));
        assert!(why(&parent, &[], &["ir-fff-vm-01".to_owned()]).contains("another store"));
        assert!(why(&info(&src, 2 << 30), &base, &[]).contains("previous snapshot"));
        let mut coarse = bitmap("ir-abc-vm-01");
        coarse.granularity = 1 << 20;
        assert!(why(&parent, &[coarse], &[]).contains("granularity"));
        let mut broken = bitmap("ir-abc-vm-01");
        broken.inconsistent = true;
        assert!(why(&parent, &[broken], &[]).contains("inconsistent"));
        assert_eq!(bitmap_granularity(65536), 4096);
        assert_eq!(bitmap_granularity(4096), 4096);
        assert_eq!(bitmap_granularity(4 << 20), 256 << 10);
    }
}
