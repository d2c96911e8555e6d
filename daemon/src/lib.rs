//! The instant-boot daemon: the whole stack, assembled and served.
//!
//! ```text
//!   QEMU ── vhost-user socket ──> BlockServer (virtio-blk, one worker per queue)
//!                                    │
//!                                 MeteredDevice (guest op counters)
//!                                    │
//!                                 MigratingDevice (with --target: copier, migrated bitmap)
//!                                    │
//!                                 Overlay (guest writes, --state DIR)
//!                                    │
//!                                 SnapshotLayer ── ChunkCache (--cache-size)
//!                                    │
//!                                 store::SnapshotReader (shared lock on the manifest)
//! ```
//!
//! With `--repair-from`, a second `SnapshotLayer` over another snapshot
//! of the same image (sharing the cache) backs the migration's repairs.
//!
//! [`Daemon::start`] opens everything, binds the vhost-user socket and the
//! control socket and starts the copier, so QEMU can connect the moment it
//! returns; nothing is read up front but the bitmaps, so start-up time does
//! not grow with the image. [`Daemon::run`] serves until
//! [`Daemon::stop_handle`] is stopped, then checkpoints the migration and
//! flushes every layer.
//!
//! A state dir whose migration is complete is served from the target
//! alone: the overlay is gone and the store is only opened to check that
//! the state belongs to the snapshot.
//!
//! # Faults: what is guaranteed
//!
//! **A damaged store** (a flipped bit, a truncated or missing pack):
//! - every chunk is re-hashed on every fetch from the store, so a damaged
//!   chunk is an error, never data: a guest read touching it completes
//!   with `VIRTIO_BLK_S_IOERR`, reads of every other range are unaffected,
//!   and the error is not cached (a repaired store serves it again);
//! - each failed fetch is logged at error level with the chunk id, the
//!   snapshot (`NAME@ID`), the chunk index and its byte offset, and counted
//!   in `status` (`chunk_read_errors`; the guest's failed requests in
//!   `guest_io_errors`);
//! - the copier marks the chunk failed, writes nothing for it and migrates
//!   every other chunk; the state ends `failed` naming the first one, and
//!   `chunks_failed` counts them. `recovery-cli verify` names the chunk,
//!   the snapshots using it and their byte ranges;
//! - a guest write that covers a damaged chunk's blocks whole replaces
//!   them (the overlay never reads below for whole blocks); a partial
//!   block write needs the old block and fails;
//! - `--repair-from SNAPSHOT` (another backup of the same image: same
//!   image size and chunk size, refused otherwise before anything is
//!   opened) lets the copier take exactly the chunks the served snapshot
//!   cannot deliver from that backup, with the guest's written blocks laid
//!   over them, logs each one (`warn`) and counts them in
//!   `chunks_repaired`; the migration then completes. The repaired data is
//!   older or newer than the booted snapshot, so this is never automatic.
//!
//! **A full disk** (ENOSPC, or any write error):
//! - under the overlay (state dir): a guest write needing new blocks fails
//!   with `VIRTIO_BLK_S_IOERR`; its blocks' bits are not set, so the range
//!   reads as before or as the failed write left it (virtio leaves a
//!   failed write's range undefined); reads, flushes of acknowledged
//!   writes and overwrites of blocks the overlay already holds keep
//!   working (on file systems that overwrite in place);
//! - under the target: the copier retries with backoff (status `error`:
//!   "Target write failed, retrying"), guest writes to migrated chunks
//!   that need new space fail with `VIRTIO_BLK_S_IOERR`, writes to chunks
//!   not migrated go to the overlay, every read works (copy-on-read falls
//!   back to the overlay);
//! - in both cases the daemon keeps running and recovers by itself once
//!   space is freed: the next write succeeds, the copier goes on and the
//!   migration completes. Only a failed *sync* (fdatasync of the target or
//!   a bitmap) is not retried: the state turns `failed` and the daemon
//!   must be restarted, which resumes from the last durable checkpoint.
//!
//! **Other users**: the vhost-user and control sockets are created 0600
//! (bound under a temporary name, chmod'ed, then renamed into place; the
//! control socket lives in the state dir by default), the state dir is 0700 (an existing one with
//! group or other bits is tightened, with a warning) and its files 0600:
//! another user can neither attach to the disk, nor control the
//! migration, nor read the guest's writes. Snapshot references are
//! validated by the store (names `[A-Za-z0-9._-]`, not starting with `.`;
//! ids by their exact format) before any path is built from them, so `..`,
//! `/` and absolute paths never leave the store's directories.

pub mod control_server;
pub mod operator_status;
pub mod progress_log;
pub mod state_dir;

// What the CLI needs to configure and stop a daemon, without reaching into
// the layers below.
pub use block::migrate::{MigratingDevice, MigrationOptions};
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
use block::store_source::StoreSource;
use block::target::Target;
use control::Control;
use store::{SnapshotInfo, SnapshotReader, Store};
use vhost_backend::socket::{BlockServer, Listening};

use crate::control_server::ControlServer;
use crate::operator_status::DaemonStatus;
use crate::progress_log::{spawn_progress_logger, ProgressLogger};
use crate::state_dir::{StateBinding, StateDir};

/// Everything `instant-boot` needs to know.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The store directory.
    pub store: PathBuf,
    /// The snapshot reference (`NAME`, `NAME@ID` or `ID`).
    pub snapshot: String,
    /// The vhost-user socket to create.
    pub socket: PathBuf,
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
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the store failed.
    #[error("Failed to open store {0}")]
    OpenStore(PathBuf, #[source] store::Error),
    /// Opening the snapshot failed.
    #[error("Failed to open snapshot {0}")]
    OpenSnapshot(String, #[source] store::Error),
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
    /// Opening the state dir failed.
    #[error("Failed to open state dir {0}")]
    State(PathBuf, #[source] crate::state_dir::Error),
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
    /// Opening the migration target failed.
    #[error("Failed to open migration target {0}")]
    Target(PathBuf, #[source] block::target::Error),
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
    control: ControlServer,
    logger: ProgressLogger,
    // Held for the daemon's lifetime: the state dir's flock and the
    // snapshot's shared lock (gc keeps its chunks while we serve).
    _state: Arc<StateDir>,
    _reader: Arc<SnapshotReader>,
}

impl Daemon {
    /// Opens the store, the snapshot and the state dir, builds the layers
    /// and binds the socket.
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon> {
        if cfg.repair_from.is_some() && cfg.target.is_none() {
            return Err(Error::RepairWithoutTarget);
        }
        let store = Store::open(&cfg.store).map_err(|e| Error::OpenStore(cfg.store.clone(), e))?;
        let reader = store
            .open_snapshot(&cfg.snapshot)
            .map_err(|e| Error::OpenSnapshot(cfg.snapshot.clone(), e))?;
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
        let source = Arc::new(StoreSource::new(reader.clone()));

        let binding = StateBinding {
            snapshot_id: info.id.clone(),
            image_size: info.image_size,
            chunk_size: info.chunk_size,
        };
        let state = Arc::new(
            StateDir::open_or_create(&cfg.state, &binding)
                .map_err(|e| Error::State(cfg.state.clone(), e))?,
        );
        make_private(&cfg.state)?;
        let recorded_target = state.state().target;
        if let (Some(recorded), None) = (&recorded_target, &cfg.target) {
            return Err(Error::TargetMissing {
                state: cfg.state.clone(),
                target: recorded.display().to_string(),
            });
        }

        let cache = Arc::new(ChunkCache::new(cfg.cache_size));
        let reference = info.reference();
        let (inner, migration, overlay): (Arc<dyn BlockDevice>, _, _) = match &cfg.target {
            Some(path) => {
                let target = Target::open(path, info.image_size)
                    .map_err(|e| Error::Target(path.clone(), e))?;
                let migration = if MigratingDevice::is_complete_in(&*state) {
                    MigratingDevice::open_complete(state.clone(), target)
                } else {
                    let (snapshot, overlay) = Self::layers(&source, &cache, &state, cfg)?;
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
                let (_, overlay) = Self::layers(&source, &cache, &state, cfg)?;
                (overlay.clone(), None, Some(overlay))
            }
        };
        let metered = Arc::new(MeteredDevice::new(inner));
        let device: Arc<dyn BlockDevice> = metered.clone();

        let mut status = DaemonStatus::new(reference, metered)
            .with_cache(cache.clone())
            .with_store_source(source);
        if let Some(repair) = repair {
            status = status.with_store_source(repair);
        }
        if let Some(overlay) = overlay {
            status = status.with_overlay(overlay);
        }
        if let Some(migration) = &migration {
            status = status.with_migration(migration.clone());
        }
        let status = Arc::new(status);

        let mut device_cfg = cfg.device.clone();
        if device_cfg.serial.is_empty() {
            device_cfg.serial = info.id.clone();
        }
        let server = BlockServer::new(device.clone(), device_cfg)?;
        let listening = server.bind(&cfg.socket)?;
        let stop = StopHandle::new().map_err(|e| Error::Layer("stop handle", e))?;
        let control_path = cfg
            .control
            .clone()
            .unwrap_or_else(|| state.control_socket_path());
        let control =
            ControlServer::start(&control_path, status.clone()).map_err(Error::Control)?;
        let logger = spawn_progress_logger(status.clone(), cfg.log_interval)
            .map_err(|e| Error::Layer("progress logger", e))?;
        if let (Some(migration), Some(path)) = (&migration, &cfg.target) {
            migration
                .start()
                .map_err(|e| Error::Migration(path.clone(), e))?;
        }
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
            logger,
            _state: state,
            _reader: reader,
        })
    }

    /// The snapshot layer and the overlay over it.
    fn layers(
        source: &Arc<StoreSource>,
        cache: &Arc<ChunkCache>,
        state: &StateDir,
        cfg: &DaemonConfig,
    ) -> Result<(Arc<SnapshotLayer>, Arc<Overlay>)> {
        let source: Arc<dyn ChunkSource> = source.clone();
        let snapshot = Arc::new(
            SnapshotLayer::new(source, cache.clone()).map_err(|e| Error::Layer("snapshot", e))?,
        );
        let overlay = Overlay::open_in(state, snapshot.clone())
            .map_err(|e| Error::Overlay(cfg.state.clone(), e))?
            .with_read_only(cfg.device.read_only);
        Ok((snapshot, Arc::new(overlay)))
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

    /// The control socket.
    pub fn control_socket(&self) -> &Path {
        self.control.path()
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
        let checkpoint = match &self.migration {
            Some(m) => m.shutdown().map_err(Error::Checkpoint),
            None => Ok(()),
        };
        // serve() flushes on the way out; flush again in case it failed
        // before reaching that point, so the guest's writes are durable.
        let flushed = self.device.flush().map_err(Error::Flush);
        self.logger.stop();
        self.control.shutdown();
        served?;
        checkpoint?;
        flushed
    }
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
