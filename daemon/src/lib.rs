//! The instant-boot daemon: the whole stack, assembled and served.
//!
//! # What this crate owns
//! Assembly and everything that belongs to one running daemon rather than
//! to a layer: opening the store and snapshot, the state directory
//! ([`state_dir`]), building the block stack and the vhost-user server,
//! the control socket server ([`control_server`]), the operator's status
//! ([`operator_status`]), the progress log ([`progress_log`]) and the tie
//! between the daemon and a QEMU it launches ([`qemu`]). It
//! depends on `store`, `block`, `vhost-backend` and `control`; the CLI
//! configures and stops it through the re-exports below, without reaching
//! into the layers.
//!
//! | module | owns |
//! |---|---|
//! | this crate root | [`Daemon`] (`start`, `run`, `stop_handle`), [`DaemonConfig`], [`Error`] |
//! | [`state_dir`] | `--state DIR`: its layout (the one home of it), the `flock`, `state.json` (atomic writes, binding to one snapshot); implements `block::state::LayerState` |
//! | [`control_server`] | the control socket server: the socket (0600, the daemon's user, from `block::socket::bind_private_socket`), the `control-accept` thread, one `control-conn` thread per client |
//! | [`operator_status`] | [`operator_status::DaemonStatus`], the daemon's `control::Control`: builds a `control::Status` from the parts, routes pause/resume/set-rate to the migration |
//! | [`qemu`] | the QEMU that `instant-boot --qemu` launches: spawned with `PR_SET_PDEATHSIG` = `SIGKILL` so it dies with the daemon, and recorded in the state dir (`qemu.json`) so a second guest is refused on the same overlay |
//! | [`protect`] | continuous protection: the `protect` thread writes a protection point into the store every interval through `block::protect::ProtectLayer`; `protect.json`; full reads after a reboot or without a parent |
//! | [`progress_log`] | the `progress-log` thread: a progress line every `--log-interval` while migrating, each state change once, whether the live journal runs (at start and on change) |
//! | [`service`] | `instant-boot --plan`: one process serving every disk of a group point, a disk stack per member without its own control socket, one shared copy-rate limit, one control socket with the service's totals and a report per disk |
//!
//! # Model
//! ```text
//!   QEMU ── vhost-user socket ──> BlockServer (virtio-blk; one vq{N} thread per queue + I/O pool)
//!                                    │
//!                                 MeteredDevice (guest op counters)
//!                                    │
//!                                 MigratingDevice (with --target: copier, migrated bitmap)
//!                                    │
//!                                 Overlay (guest writes, --state DIR)
//!                                    │
//!                                 SnapshotLayer ── ChunkCache (--cache-size)
//!                                    │
//!                                 StoreSource ── store::SnapshotReader (shared lock on the manifest)
//! ```
//!
//! With `--repair-from`, a second `SnapshotLayer` over another snapshot
//! of the same image (sharing the cache) backs the migration's repairs.
//! Without `--target` the overlay sits directly under the metered device.
//!
//! [`Daemon::start`] opens the store and snapshot, locks and checks the
//! state dir, opens the target and the layers, binds the vhost-user socket
//! and the control socket, starts the progress logger and then the
//! copier, so QEMU can connect the moment it returns; nothing is read up
//! front but the bitmaps, so start-up time does not grow with the image.
//! [`Daemon::run`] serves QEMU connections on the calling thread until
//! [`Daemon::stop_handle`] is stopped, then stops the copier with a final
//! checkpoint, flushes every layer, and stops the logger and the control
//! server.
//!
//! A state dir whose migration is complete is served from the target
//! alone: the overlay is gone and the store is only opened to check that
//! the state belongs to the snapshot. A state dir recorded with a target
//! refuses to start without `--target`.
//!
//! # Threads
//! The caller of [`Daemon::run`] accepts QEMU and runs its vhost-user
//! messages; `vq{N}` and `blk-io-{i}` serve each connection (crate
//! `vhost-backend`); `copier` and `copier-{i}` migrate (crate `block`);
//! this crate adds `control-accept`, `control-conn` (at most
//! `control::MAX_CLIENTS`) and `progress-log`. Every thread and what it
//! owns is in the table in `docs/ARCHITECTURE.md`, "Threads"; the lock
//! order is there too. Building a status reads atomics and takes only
//! leaf locks (each cache shard's, the migration's small mutexes), so a
//! `status` request never waits for guest or copier I/O.
//!
//! # Formats
//! The state dir's layout and `state.json` are documented in [`state_dir`];
//! the bitmaps it holds in `block::bitmap`. The store's formats are the
//! `store` crate's.
//!
//! # Faults
//! What the daemon guarantees when the store is damaged, a disk fills up,
//! the daemon is killed or the machine crashes, and against other users,
//! with the test that proves each, has one home: `docs/ARCHITECTURE.md`,
//! "Fault guarantees". The arguments behind them live with the layers
//! (`block::bitmap`, `block::overlay`, `block::migrate`,
//! `vhost_backend::inflight`).
//!
//! # Errors
//! [`Error`] names the step of start-up or shutdown that failed (open the
//! store, the snapshot, the state dir, a layer, the target, the migration,
//! the control socket, the vhost-user server; the final flush or
//! checkpoint), with the cause as its source. Start-up errors happen
//! before QEMU can connect.

pub mod control_server;
pub mod operator_status;
pub mod point_sched;
pub mod progress_log;
pub mod protect;
pub mod qemu;
pub mod service;
pub mod state_dir;

// What the CLI needs to configure and stop a daemon, without reaching into
// the layers below.
pub use block::migrate::{MigratingDevice, MigrationOptions};
pub use block::socket::SocketOwner;
pub use vhost_backend::device::{DeviceConfig, MAX_IO_THREADS};
pub use vhost_backend::socket::StopHandle;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use block::cache::ChunkCache;
use block::device::BlockDevice;
use block::metered::MeteredDevice;
use block::overlay::Overlay;
use block::snapshot::SnapshotLayer;
use block::source::ChunkSource;
use block::state::MigrationState;
use block::store_source::StoreSource;
use block::target::Target;
use control::Control;
use store::{HoldInfo, SnapshotInfo, SnapshotReader, Store};
use vhost_backend::socket::{BlockServer, Listening};

use crate::control_server::ControlServer;
use crate::operator_status::DaemonStatus;
use crate::progress_log::{spawn_progress_logger, ProgressLogger};
pub use crate::protect::ProtectConfig;
use crate::state_dir::{StateBinding, StateDir};
use block::protect::{DiskDevice, Protected};

/// Everything `instant-boot` needs to know.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The store directory.
    pub store: PathBuf,
    /// The snapshot reference (`NAME`, `NAME@ID` or `ID`).
    pub snapshot: String,
    /// The vhost-user socket to create.
    pub socket: PathBuf,
    /// Who owns the vhost-user socket (default: the daemon's user).
    pub socket_owner: Option<SocketOwner>,
    /// The state directory (overlay, bitmaps, state.json).
    pub state: PathBuf,
    /// Byte budget of the chunk cache.
    pub cache_size: u64,
    /// Device settings (queues, read-only, serial); `serial` empty means
    /// "use the snapshot id".
    pub device: DeviceConfig,
    /// The control socket; `None` means `control.sock` in the state dir.
    pub control: Option<PathBuf>,
    /// Migrate to this raw file or block device.
    pub target: Option<PathBuf>,
    /// Copier settings (with `target`).
    pub migration: MigrationOptions,
    /// With `target`: take chunks the served snapshot cannot deliver from
    /// this other snapshot of the same image (`NAME@ID`, `NAME` or `ID`).
    pub repair_from: Option<String>,
    /// How often progress is logged.
    pub log_interval: Duration,
    /// The caller starts a guest on the socket (`instant-boot --qemu`):
    /// refused while a QEMU started on this state earlier still runs.
    pub starts_guest: bool,
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the store failed (the store's error names it).
    #[error(transparent)]
    OpenStore(store::Error),
    /// Opening the snapshot failed (the store's error names it).
    #[error(transparent)]
    OpenSnapshot(store::Error),
    /// Opening the `--repair-from` snapshot failed.
    #[error("Failed to open repair snapshot {0}")]
    OpenRepair(String, #[source] store::Error),
    /// `--repair-from` names the served snapshot itself.
    #[error("Repair snapshot {0} is the snapshot being served; name another backup of the image")]
    RepairIsServed(String),
    /// The `--repair-from` snapshot is not of the same image.
    #[error("Cannot use --repair-from")]
    RepairSource(#[source] block::migrate::Error),
    /// `--repair-from` without a target.
    #[error("--repair-from needs --target: it repairs the migration")]
    RepairWithoutTarget,
    /// Tightening the state dir's permissions failed.
    #[error("Failed to make state dir {0} private (mode 0700)")]
    StateMode(PathBuf, #[source] io::Error),
    /// Opening the state dir failed (the error names the dir).
    #[error(transparent)]
    State(crate::state_dir::Error),
    /// Writing the state failed.
    #[error("Failed to record the migration target in state dir {0}")]
    RecordTarget(PathBuf, #[source] crate::state_dir::Error),
    /// A socket path cannot work.
    #[error("Cannot create the {what} at {path}: {why}")]
    SocketPath {
        /// "vhost-user socket" or "control socket".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// A QEMU started on this state's overlay still runs.
    #[error("A guest started on state dir {state} still runs (QEMU PID {pid}); stop it before starting another: two guests on one overlay destroy each other's writes")]
    GuestRunning {
        /// The state dir.
        state: PathBuf,
        /// The QEMU's PID.
        pid: u32,
    },
    /// The recorded target is gone.
    #[error("Target {target} does not exist, but state dir {state} records a migration to it; restore the target, or start over with a new --state (nothing was created)")]
    TargetGone {
        /// The target.
        target: PathBuf,
        /// The state dir.
        state: PathBuf,
    },
    /// Building a block layer failed.
    #[error("Failed to open the {0} layer")]
    Layer(&'static str, #[source] io::Error),
    /// Opening the overlay failed.
    #[error("Failed to open the overlay in {0}")]
    Overlay(PathBuf, #[source] block::overlay::Error),
    /// The state dir has a migration in progress but no `--target` was given.
    #[error("State dir {state} is migrating to {target}: pass --target {target}")]
    TargetMissing {
        /// The state dir.
        state: PathBuf,
        /// The recorded target.
        target: String,
    },
    /// Recording the state's hold on its snapshot failed.
    #[error("Failed to hold snapshot {0} in the store for this state dir")]
    Hold(String, #[source] store::Error),
    /// Opening, locking or identifying the migration target failed (the
    /// error names the target).
    #[error(transparent)]
    Target(block::target::Error),
    /// Starting continuous protection failed.
    #[error("Failed to start protection")]
    Protect(#[source] protect::Error),
    /// `serve --disk`: the disk cannot be opened.
    #[error("Failed to open disk {0}")]
    OpenDisk(PathBuf, #[source] store::Error),
    /// Opening or starting the migration failed.
    #[error("Failed to start the migration to {0}")]
    Migration(PathBuf, #[source] block::migrate::Error),
    /// The control socket could not be created.
    #[error("Failed to start the control socket")]
    Control(#[source] control::Error),
    /// Binding or serving the vhost-user socket failed.
    #[error("vhost-user server failed")]
    Serve(#[from] vhost_backend::socket::Error),
    /// The final flush failed: writes since the last guest flush may be lost.
    #[error("Failed to flush the device on shutdown")]
    Flush(#[source] io::Error),
    /// The final migration checkpoint failed: progress since the last
    /// checkpoint is redone on restart.
    #[error("Failed to checkpoint the migration on shutdown")]
    Checkpoint(#[source] io::Error),
}

/// A `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A started daemon: socket bound, not yet serving.
pub struct Daemon {
    info: SnapshotInfo,
    server: BlockServer,
    listening: Listening,
    stop: StopHandle,
    device: Arc<dyn BlockDevice>,
    cache: Arc<ChunkCache>,
    migration: Option<Arc<MigratingDevice>>,
    status: Arc<DaemonStatus>,
    /// The control socket and the progress logger; `None` for a disk of a
    /// service, whose [`service::Service`] has one for all its disks.
    control: Option<ControlServer>,
    control_path: PathBuf,
    logger: Option<ProgressLogger>,
    // Held for the daemon's lifetime: the state dir's flock and the
    // snapshot's shared lock (gc keeps its chunks while we serve).
    _state: Arc<StateDir>,
    _reader: Option<Arc<SnapshotReader>>,
    /// The state's hold on its snapshot, until the migration completes.
    hold: Option<SnapshotHold>,
    hold_release: Option<std::thread::JoinHandle<()>>,
    /// Continuous protection and its `protect` thread.
    protector: Option<protect::Protector>,
}

impl Daemon {
    /// Opens the store, the snapshot and the state dir, builds the layers
    /// and binds the socket.
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon> {
        Self::start_protected(cfg, None)
    }

    /// [`Daemon::start`], with continuous protection when `protect` is
    /// given (`instant-boot --protect`): points of the disk the guest sees
    /// are written into the store every interval ([`protect`]).
    pub fn start_protected(cfg: &DaemonConfig, protect: Option<&ProtectConfig>) -> Result<Daemon> {
        Self::open(cfg, protect, Role::Alone)
    }

    /// A disk of a [`service::Service`]: [`Daemon::start`] without a
    /// control socket and progress logger of its own (`cfg.control` and
    /// `cfg.log_interval` are not used).
    /// The service's `store` is shared by all its disks.
    /// With `protect`, the disk is protected but its `protect` thread is
    /// not started: the service takes the point writer
    /// ([`Daemon::take_point_writer`]) and cuts every disk at once.
    pub(crate) fn start_member(
        cfg: &DaemonConfig,
        store: Arc<Store>,
        protect: Option<&ProtectConfig>,
    ) -> Result<Daemon> {
        Self::open(cfg, protect, Role::Member(store))
    }

    /// A protected member's layer and point writer (once), for its
    /// service's aligned cuts.
    pub(crate) fn take_point_writer(
        &mut self,
    ) -> Option<(Arc<block::protect::ProtectLayer>, protect::MemberWriter)> {
        let p = self.protector.as_mut()?;
        let layer = p.layer().clone();
        p.take_writer().map(|w| (layer, w))
    }

    fn open(cfg: &DaemonConfig, protect: Option<&ProtectConfig>, role: Role) -> Result<Daemon> {
        if cfg.repair_from.is_some() && cfg.target.is_none() {
            return Err(Error::RepairWithoutTarget);
        }
        // What can be checked before anything is created, is.
        check_socket_path("vhost-user socket", &cfg.socket, true)?;
        match (&cfg.control, &role) {
            (_, Role::Member(_)) => {}
            (Some(control), Role::Alone) => check_socket_path("control socket", control, true)?,
            (None, Role::Alone) => check_socket_path(
                "control socket",
                &state_dir::control_socket_in(&cfg.state),
                false,
            )?,
        }
        // A complete migration needs only the target: the store may be
        // gone, the snapshot forgotten.
        let complete = cfg.target.as_ref().and_then(|_| {
            state_dir::peek(&cfg.state).filter(|s| s.migration == MigrationState::Complete)
        });
        if let Some(done) = complete {
            return Self::start_complete(cfg, &done, protect, role);
        }
        let store = match &role {
            Role::Member(store) => store.clone(),
            Role::Alone => Arc::new(open_store(&cfg.store).map_err(Error::OpenStore)?),
        };
        let reader = store
            .open_snapshot(&cfg.snapshot)
            .map_err(Error::OpenSnapshot)?;
        let info = reader.info().clone();
        let reader = Arc::new(reader);
        // Opened up front: a bad --repair-from fails before anything is served.
        let repair = match &cfg.repair_from {
            Some(r) => {
                let repair = store
                    .open_snapshot(r)
                    .map_err(|e| Error::OpenRepair(r.clone(), e))?;
                let r = repair.info();
                if r.id == info.id {
                    return Err(Error::RepairIsServed(r.reference()));
                }
                let checks = [
                    ("image size", r.image_size, info.image_size),
                    (
                        "chunk size",
                        u64::from(r.chunk_size),
                        u64::from(info.chunk_size),
                    ),
                ];
                if let Some((what, found, expected)) = checks.into_iter().find(|(_, a, b)| a != b) {
                    return Err(Error::RepairSource(block::migrate::Error::RepairGeometry {
                        reference: r.reference(),
                        what,
                        found,
                        expected,
                    }));
                }
                Some(Arc::new(StoreSource::new(Arc::new(repair))))
            }
            None => None,
        };
        let source = Some(Arc::new(StoreSource::new(reader.clone())));
        Self::assemble(
            cfg,
            info,
            Some(store),
            Some(reader),
            source,
            repair,
            protect,
            None,
            role,
        )
    }

    /// Serves the raw file or block device `disk` as it is (`recovery-cli
    /// serve --disk`; it was never backed up), with continuous
    /// protection: points named `protect.name` are written into the store
    /// every interval, the first a full read. `cfg.snapshot`, `cfg.target`
    /// and `cfg.repair_from` are not used.
    pub fn serve_disk(cfg: &DaemonConfig, disk: &Path, protect: &ProtectConfig) -> Result<Daemon> {
        check_socket_path("vhost-user socket", &cfg.socket, true)?;
        match &cfg.control {
            Some(control) => check_socket_path("control socket", control, true)?,
            None => check_socket_path(
                "control socket",
                &state_dir::control_socket_in(&cfg.state),
                false,
            )?,
        }
        let name = protect
            .name
            .clone()
            .ok_or(Error::Protect(protect::Error::NoName))?;
        let store = open_store(&cfg.store).map_err(Error::OpenStore)?;
        let (_, size) =
            store::backup::open_source(disk).map_err(|e| Error::OpenDisk(disk.to_path_buf(), e))?;
        let how = block::target::TargetOpen {
            create: false,
            lock: true,
        };
        let target = Target::open_with(disk, size, how).map_err(Error::Target)?;
        let chunk_size = store.chunk_size();
        let info = SnapshotInfo {
            id: String::new(),
            name,
            image_size: size,
            chunk_size,
            chunk_count: size.div_ceil(u64::from(chunk_size)),
            created: String::new(),
            source: disk.display().to_string(),
            parent: None,
        };
        let disk = Arc::new(DiskDevice::new(target));
        Self::assemble(
            cfg,
            info,
            Some(Arc::new(store)),
            None,
            None,
            None,
            Some(protect),
            Some(disk),
            Role::Alone,
        )
    }

    /// Starts on a state whose migration is complete: the target alone is
    /// served, the store is opened only to release the state's hold.
    fn start_complete(
        cfg: &DaemonConfig,
        done: &state_dir::StateFile,
        protect: Option<&ProtectConfig>,
        role: Role,
    ) -> Result<Daemon> {
        let name = done.snapshot_name.clone().unwrap_or_default();
        let id = &done.snapshot_id;
        let matches = cfg.snapshot == *id
            || cfg.snapshot == format!("{name}@{id}")
            || (!name.is_empty() && cfg.snapshot == name);
        if !matches {
            return Err(Error::State(state_dir::Error::SnapshotMismatch {
                dir: cfg.state.clone(),
                expected: cfg.snapshot.clone(),
                found: if name.is_empty() {
                    id.clone()
                } else {
                    format!("{name}@{id}")
                },
            }));
        }
        if cfg.repair_from.is_some() {
            tracing::info!("migration already complete: --repair-from is not needed");
        }
        let info = SnapshotInfo {
            id: id.clone(),
            name,
            image_size: done.image_size,
            chunk_size: done.chunk_size,
            chunk_count: done.image_size.div_ceil(u64::from(done.chunk_size)),
            created: String::new(),
            source: String::new(),
            parent: None,
        };
        let opened = match &role {
            Role::Member(store) => Ok(store.clone()),
            Role::Alone => open_store(&cfg.store).map(Arc::new),
        };
        let store = match opened {
            Ok(store) => Some(store),
            // Protection writes its points into the store.
            Err(e) if protect.is_some() => return Err(Error::OpenStore(e)),
            Err(e) => {
                tracing::info!(store = %cfg.store.display(), error = %e, "migration complete: serving the target without the store");
                None
            }
        };
        Self::assemble(cfg, info, store, None, None, None, protect, None, role)
    }

    /// Opens the state dir and the target, builds the layers and binds the
    /// sockets. `source` is `None` only for a complete migration.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: &DaemonConfig,
        info: SnapshotInfo,
        store: Option<Arc<Store>>,
        reader: Option<Arc<SnapshotReader>>,
        source: Option<Arc<StoreSource>>,
        repair: Option<Arc<StoreSource>>,
        protect: Option<&ProtectConfig>,
        disk: Option<Arc<DiskDevice>>,
        role: Role,
    ) -> Result<Daemon> {
        let binding = StateBinding {
            snapshot_id: match &disk {
                Some(_) => format!("disk:{}", info.name),
                None => info.id.clone(),
            },
            image_size: info.image_size,
            chunk_size: info.chunk_size,
        };
        let state = Arc::new(StateDir::open_or_create(&cfg.state, &binding).map_err(Error::State)?);
        // From here on, a failed start takes back what it created.
        let mut undo = UndoStart {
            state: Some(state.clone()),
            target: None,
            hold: None,
        };
        make_private(&cfg.state)?;
        if state.state().snapshot_name.is_none() && !info.name.is_empty() {
            state
                .update(|s| s.snapshot_name = Some(info.name.clone()))
                .map_err(Error::State)?;
        }
        // The state holds its snapshot until the migration completes.
        let hold = match &store {
            // A disk served as is is no snapshot: nothing to hold.
            _ if disk.is_some() => None,
            Some(store) if state.state().migration != MigrationState::Complete => {
                let hold = SnapshotHold {
                    store: store.clone(),
                    reference: info.reference(),
                    holder: state.holder().map_err(Error::State)?,
                };
                let description = format!(
                    "instant-boot state dir {}",
                    std::fs::canonicalize(&cfg.state)
                        .unwrap_or_else(|_| cfg.state.clone())
                        .display()
                );
                store
                    .add_hold(&hold.reference, &HoldInfo::new(&hold.holder, description))
                    .map_err(|e| Error::Hold(hold.reference.clone(), e))?;
                undo.hold = state.created().then(|| hold.clone());
                Some(hold)
            }
            // Complete: the target alone is served; a hold left by a crash
            // during completion goes now.
            Some(store) => {
                if let Some(holder) = state.state().holder {
                    SnapshotHold {
                        store: store.clone(),
                        reference: info.reference(),
                        holder,
                    }
                    .release();
                }
                None
            }
            None => None,
        };
        if let Some(guest) = state.live_guest() {
            if cfg.starts_guest {
                return Err(Error::GuestRunning {
                    state: cfg.state.clone(),
                    pid: guest.pid,
                });
            }
            tracing::warn!(
                pid = guest.pid,
                "a QEMU started on this state earlier still runs; it may reconnect to this daemon"
            );
        }
        let recorded_target = state.state().target;
        if let (Some(recorded), None) = (&recorded_target, &cfg.target) {
            return Err(Error::TargetMissing {
                state: cfg.state.clone(),
                target: recorded.display().to_string(),
            });
        }

        let cache = Arc::new(ChunkCache::new(cfg.cache_size));
        let reference = match &disk {
            Some(d) => d.target().path().display().to_string(),
            None => info.reference(),
        };
        let (inner, migration, overlay): (Arc<dyn BlockDevice>, _, _) = match &cfg.target {
            _ if disk.is_some() => (disk.clone().expect("checked"), None, None),
            Some(path) => {
                let target = open_target(&state, path, info.image_size, &cfg.state)?;
                if target.created() {
                    undo.target = Some(path.clone());
                }
                let migration = if MigratingDevice::is_complete_in(&*state) {
                    MigratingDevice::open_complete(state.clone(), target)
                } else {
                    let (snapshot, overlay) = Self::layers(source.as_ref(), &cache, &state, cfg)?;
                    MigratingDevice::open(
                        state.clone(),
                        overlay,
                        snapshot,
                        target,
                        cfg.migration.clone(),
                    )
                }
                .map_err(|e| Error::Migration(path.clone(), e))?;
                if let Some(repair) = &repair {
                    if migration.is_complete() {
                        tracing::info!("migration already complete: --repair-from is not needed");
                    } else {
                        let layer = SnapshotLayer::new(repair.clone(), cache.clone())
                            .map_err(|e| Error::Layer("repair snapshot", e))?;
                        migration
                            .set_repair_source(Arc::new(layer), repair.reader().info().reference())
                            .map_err(|e| Error::Migration(path.clone(), e))?;
                    }
                }
                (migration.clone(), Some(migration), None)
            }
            None => {
                let (snapshot, overlay) = Self::layers(source.as_ref(), &cache, &state, cfg)?;
                (overlay.clone(), None, Some((overlay, snapshot)))
            }
        };
        let protector = match protect {
            Some(protect) => {
                let store = store.clone().ok_or_else(|| {
                    Error::Layer("protection", io::Error::other("the store is not open"))
                })?;
                // The layers under protection: with the snapshot at the
                // bottom, it leaves grains the guest has not written there.
                let protected = match (&migration, &overlay) {
                    (Some(m), _) => Protected::Migrating(m.clone()),
                    (None, Some((overlay, snapshot))) => Protected::Overlay {
                        overlay: overlay.clone(),
                        snapshot: snapshot.clone(),
                    },
                    (None, None) => Protected::Device(inner.clone()),
                };
                let origin = protect::Origin {
                    snapshot: disk.is_none().then(|| (info.name.clone(), info.id.clone())),
                    fresh_state: state.created(),
                };
                Some(
                    protect::Protector::open(&cfg.state, protected, store, protect, &origin)
                        .map_err(Error::Protect)?,
                )
            }
            None => None,
        };
        let inner: Arc<dyn BlockDevice> = match &protector {
            Some(p) => p.layer().clone(),
            None => inner,
        };
        let metered = Arc::new(MeteredDevice::new(inner));
        let device: Arc<dyn BlockDevice> = metered.clone();

        let mut status = DaemonStatus::new(reference, metered).with_cache(cache.clone());
        if let Some(source) = source {
            status = status.with_store_source(source);
        }
        if let Some(repair) = repair {
            status = status.with_store_source(repair);
        }
        if let Some((overlay, _)) = overlay {
            status = status.with_overlay(overlay);
        }
        if let Some(migration) = &migration {
            status = status.with_migration(migration.clone());
        }
        if let Some(p) = &protector {
            status = status.with_protection(p.status().clone());
        }
        let status = Arc::new(status);

        let mut device_cfg = cfg.device.clone();
        if device_cfg.serial.is_empty() {
            device_cfg.serial = match &disk {
                Some(_) => info.name.chars().take(SERIAL_BYTES).collect(),
                None => default_serial(&info.id),
            };
        }
        let server = BlockServer::new(device.clone(), device_cfg)?;
        let listening = server.bind_owned(&cfg.socket, cfg.socket_owner.as_ref())?;
        let stop = StopHandle::new().map_err(|e| Error::Layer("stop handle", e))?;
        let (control, control_path, logger) = match &role {
            Role::Alone => {
                let path = cfg
                    .control
                    .clone()
                    .unwrap_or_else(|| state.control_socket_path());
                let control =
                    ControlServer::start(&path, status.clone()).map_err(Error::Control)?;
                let logger = spawn_progress_logger(status.clone(), cfg.log_interval)
                    .map_err(|e| Error::Layer("progress logger", e))?;
                (Some(control), path, Some(logger))
            }
            Role::Member(_) => (None, PathBuf::new(), None),
        };
        if let (Some(migration), Some(path)) = (&migration, &cfg.target) {
            migration
                .start()
                .map_err(|e| Error::Migration(path.clone(), e))?;
        }
        let hold_release = match (&hold, &migration) {
            (Some(hold), Some(migration)) => Some(
                hold.release_on_completion(migration.clone(), stop.clone())
                    .map_err(|e| Error::Layer("hold release", e))?,
            ),
            _ => None,
        };
        let mut protector = protector;
        // A service's disks are cut together by its `service-protect` thread.
        if let (Some(p), Role::Alone) = (&mut protector, &role) {
            p.spawn().map_err(Error::Protect)?;
        }
        undo.state = None;
        undo.target = None;
        undo.hold = None;
        Ok(Daemon {
            info,
            server,
            listening,
            stop,
            device,
            cache,
            migration,
            status,
            control,
            control_path,
            logger,
            _state: state,
            _reader: reader,
            hold,
            hold_release,
            protector,
        })
    }

    /// The snapshot layer and the overlay over it.
    fn layers(
        source: Option<&Arc<StoreSource>>,
        cache: &Arc<ChunkCache>,
        state: &StateDir,
        cfg: &DaemonConfig,
    ) -> Result<(Arc<SnapshotLayer>, Arc<Overlay>)> {
        let source: Arc<dyn ChunkSource> = source
            .ok_or_else(|| Error::Layer("snapshot", io::Error::other("the store is not open")))?
            .clone();
        let snapshot = Arc::new(
            SnapshotLayer::new(source, cache.clone()).map_err(|e| Error::Layer("snapshot", e))?,
        );
        let overlay = Overlay::open_in(state, snapshot.clone())
            .map_err(|e| Error::Overlay(cfg.state.clone(), e))?
            .with_read_only(cfg.device.read_only);
        Ok((snapshot, Arc::new(overlay)))
    }

    /// The state dir (to record a guest started on it).
    pub fn state_dir(&self) -> &Arc<StateDir> {
        &self._state
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> &SnapshotInfo {
        &self.info
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        self.listening.path()
    }

    /// The chunk cache (for statistics).
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The control socket (empty for a disk of a service).
    pub fn control_socket(&self) -> &Path {
        &self.control_path
    }

    /// The migration, when there is a target.
    pub fn migration(&self) -> Option<&Arc<MigratingDevice>> {
        self.migration.as_ref()
    }

    /// The daemon's status and controls (what the control socket serves).
    pub fn status(&self) -> Arc<dyn Control> {
        self.status.clone()
    }

    /// Whether the migration has finished (complete or failed); `true`
    /// without a target.
    pub fn migration_finished(&self, timeout: Duration) -> bool {
        match &self.migration {
            Some(m) => m.wait(timeout).is_finished(),
            None => true,
        }
    }

    /// A handle that stops [`Daemon::run`] from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves QEMU connections until stopped, then stops the copier with
    /// a final checkpoint and flushes every layer.
    pub fn run(self) -> Result<()> {
        let served = self.server.serve(self.listening, &self.stop);
        // A point being written is abandoned: its chunks stay changed.
        let mut protector = self.protector;
        if let Some(p) = &mut protector {
            p.stop();
        }
        let checkpoint = match &self.migration {
            Some(m) => m.shutdown().map_err(Error::Checkpoint),
            None => Ok(()),
        };
        // serve() flushes on the way out; flush again in case it failed
        // before reaching that point, so the guest's writes are durable.
        let flushed = self.device.flush().map_err(Error::Flush);
        if let Some(logger) = self.logger {
            logger.stop();
        }
        if let Some(control) = self.control {
            control.shutdown();
        }
        if let Some(t) = self.hold_release {
            let _ = t.join();
        }
        if let (Some(hold), Some(m)) = (&self.hold, &self.migration) {
            if m.is_complete() {
                hold.release();
            }
        }
        served?;
        checkpoint?;
        flushed
    }
}

/// Whether a daemon serves alone or as a disk of a service.
enum Role {
    /// Its own store, control socket and progress logger.
    Alone,
    /// A disk of a [`service::Service`], which has those for all disks
    /// (the store, opened once, is here).
    Member(Arc<Store>),
}

/// The serial a guest sees when none is given: the snapshot id's digits
/// (`YYYYMMDDTHHMMSS.ffffffZ` has exactly 20, the most a virtio-blk serial
/// holds), so two snapshots never share one. Of a longer run of digits the
/// last 20, which change fastest.
pub fn default_serial(snapshot_id: &str) -> String {
    let digits: String = snapshot_id.chars().filter(char::is_ascii_digit).collect();
    digits[digits.len().saturating_sub(SERIAL_BYTES)..].to_string()
}

/// Bytes of a virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_BYTES: usize = 20;

/// A state dir's hold on its snapshot in the store (`store::hold`).
#[derive(Clone)]
struct SnapshotHold {
    store: Arc<Store>,
    reference: String,
    holder: String,
}

impl SnapshotHold {
    /// Releases the hold; a failure is logged (`recovery-cli release-hold`
    /// removes a stale one).
    fn release(&self) {
        match self.store.remove_hold(&self.reference, &self.holder) {
            Ok(true) => {
                tracing::info!(snapshot = %self.reference, holder = %self.holder, "released the state's hold on its snapshot")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(snapshot = %self.reference, holder = %self.holder, error = %e, "failed to release the state's hold on its snapshot")
            }
        }
    }

    /// A `hold-release` thread: releases the hold once `migration` is
    /// complete (the target alone is then served), or ends when `stop` is
    /// stopped.
    fn release_on_completion(
        &self,
        migration: Arc<MigratingDevice>,
        stop: StopHandle,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let hold = self.clone();
        std::thread::Builder::new()
            .name("hold-release".into())
            .spawn(move || {
                while !stop.is_stopped() {
                    match migration.wait(Duration::from_millis(500)) {
                        block::migrate::MigrationPhase::Complete => {
                            hold.release();
                            return;
                        }
                        // Failed returns at once: until a resume, look again
                        // now and then.
                        block::migrate::MigrationPhase::Failed => {
                            std::thread::sleep(Duration::from_millis(500))
                        }
                        _ => {}
                    }
                }
            })
    }
}

/// What a failed [`Daemon::start`] takes back: the state it created, the
/// target file it created, the hold it added for a state it created.
struct UndoStart {
    state: Option<Arc<StateDir>>,
    target: Option<PathBuf>,
    hold: Option<SnapshotHold>,
}

impl Drop for UndoStart {
    fn drop(&mut self) {
        if let Some(target) = &self.target {
            match std::fs::remove_file(target) {
                Ok(()) => {
                    tracing::info!(target = %target.display(), "removed the target this failed start created")
                }
                Err(e) => {
                    tracing::warn!(target = %target.display(), error = %e, "failed to remove the target this failed start created")
                }
            }
        }
        if let Some(hold) = &self.hold {
            hold.release();
        }
        if let Some(state) = &self.state {
            state.remove_created();
        }
    }
}

/// Refuses a socket path that cannot be bound or connected to: 108 bytes
/// or more (`sun_path` holds 107 and a NUL), a missing directory
/// (`dir_must_exist`), something other than a socket already there.
pub(crate) fn check_socket_path(
    what: &'static str,
    path: &Path,
    dir_must_exist: bool,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let err = |why: String| Error::SocketPath {
        what,
        path: path.to_path_buf(),
        why,
    };
    let len = path.as_os_str().as_bytes().len();
    if len >= SUN_PATH_MAX {
        return Err(err(format!(
            "the path is {len} bytes, a Unix socket path must be shorter than {SUN_PATH_MAX}"
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if dir_must_exist && !dir.is_dir() {
        return Err(err(format!("directory {} does not exist", dir.display())));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(err(
            "something other than a socket is there (it is never replaced)".into(),
        )),
        _ => Ok(()),
    }
}

/// Size of `sockaddr_un.sun_path`, the terminating NUL included.
const SUN_PATH_MAX: usize = 108;

/// Opens and locks the target, creating it only for a migration that has
/// not started, and checks (or, on a first start, records) its identity.
fn open_target(state: &StateDir, path: &Path, image_size: u64, dir: &Path) -> Result<Target> {
    use block::target::TargetOpen;
    let recorded = state.state();
    let started = recorded.migration != MigrationState::NotStarted;
    let how = TargetOpen {
        create: !started,
        lock: true,
    };
    let target = Target::open_with(path, image_size, how).map_err(|e| match e {
        // The recorded target is there: this is another path.
        block::target::Error::Missing { path } => match &recorded.target {
            Some(r) if r.exists() => Error::Migration(
                path.clone(),
                block::migrate::Error::TargetMismatch {
                    recorded: r.clone(),
                    given: std::path::absolute(&path).unwrap_or(path),
                },
            ),
            _ => Error::TargetGone {
                target: path,
                state: dir.to_path_buf(),
            },
        },
        e => Error::Target(e),
    })?;
    let same_path = recorded
        .target
        .as_deref()
        .is_some_and(|r| std::fs::canonicalize(path).is_ok_and(|p| p == r));
    match &recorded.target_identity {
        // Another path: the migration refuses it, naming both.
        _ if started && !same_path => {}
        Some(identity) if started => target.check_identity(identity).map_err(Error::Target)?,
        // A first start (or a state from before identities were recorded).
        _ => {
            if started {
                tracing::warn!(target = %path.display(), "the state records no identity for its target (made by an older version): recording it now");
            }
            let identity = target.mark().map_err(Error::Target)?;
            state
                .update(|s| s.target_identity = Some(identity))
                .map_err(|e| Error::RecordTarget(dir.to_path_buf(), e))?;
        }
    }
    Ok(target)
}

/// Makes the state dir private (mode 0700): it holds the guest's data and
/// the control socket. A dir created by us already is; an existing one
/// with group or other bits is tightened, with a warning.
fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e| Error::StateMode(dir.to_path_buf(), e);
    let mode = std::fs::metadata(dir).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "state dir was accessible to other users; setting mode 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Open the store a daemon serves from: a directory or `s3://BUCKET/PREFIX`
/// (AWS_* variables, cache under RECOVERY_CACHE_DIR / XDG_CACHE_HOME).
pub(crate) fn open_store(location: &Path) -> store::Result<Store> {
    store::Store::open_location(&location.to_string_lossy(), &store::OpenOptions::default())
}
