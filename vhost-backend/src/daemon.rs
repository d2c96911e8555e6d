//! The instant-boot daemon: the whole stack, assembled and served.
//!
//! ```text
//!   QEMU ── vhost-user socket ──> BlockServer (virtio-blk, one worker per queue)
//!                                    │
//!                                 MeteredDevice (guest op counters)
//!                                    │
//!                                 Overlay (guest writes, --state DIR)
//!                                    │
//!                                 SnapshotLayer ── ChunkCache (--cache-size)
//!                                    │
//!                                 store::SnapshotReader (shared lock on the manifest)
//! ```
//!
//! [`Daemon::start`] opens everything and binds the socket, so QEMU can
//! connect the moment it returns; nothing is read up front but the
//! overlay's bitmap, so start-up time does not grow with the image.
//! [`Daemon::run`] serves until [`Daemon::stop_handle`] is stopped, then
//! flushes every layer.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use store::{SnapshotInfo, SnapshotReader, Store};

use crate::backend::DeviceConfig;
use crate::block::BlockDevice;
use crate::cache::ChunkCache;
use crate::overlay::Overlay;
use crate::serve::{BlockServer, Listening, StopHandle};
use crate::snapshot_layer::SnapshotLayer;
use crate::source::ChunkSource;
use crate::state::{StateBinding, StateDir};

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
    /// Opening the state dir failed.
    #[error("Failed to open state dir {0}")]
    State(PathBuf, #[source] crate::state::Error),
    /// Building a block layer failed.
    #[error("Failed to open the {0} layer")]
    Layer(&'static str, #[source] io::Error),
    /// Opening the overlay failed.
    #[error("Failed to open the overlay in {0}")]
    Overlay(PathBuf, #[source] crate::overlay::Error),
    /// Binding or serving the vhost-user socket failed.
    #[error("vhost-user server failed")]
    Serve(#[from] crate::serve::Error),
    /// The final flush failed: writes since the last guest flush may be lost.
    #[error("Failed to flush the device on shutdown")]
    Flush(#[source] io::Error),
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
    // Held for the daemon's lifetime: the state dir's flock and the
    // snapshot's shared lock (gc keeps its chunks while we serve).
    _state: StateDir,
    _reader: Arc<SnapshotReader>,
}

impl Daemon {
    /// Opens the store, the snapshot and the state dir, builds the layers
    /// and binds the socket.
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon> {
        let store = Store::open(&cfg.store).map_err(|e| Error::OpenStore(cfg.store.clone(), e))?;
        let reader = store
            .open_snapshot(&cfg.snapshot)
            .map_err(|e| Error::OpenSnapshot(cfg.snapshot.clone(), e))?;
        let info = reader.info().clone();
        let reader = Arc::new(reader);

        let binding = StateBinding {
            snapshot_id: info.id.clone(),
            image_size: info.image_size,
            chunk_size: info.chunk_size,
        };
        let state = StateDir::open_or_create(&cfg.state, &binding)
            .map_err(|e| Error::State(cfg.state.clone(), e))?;

        let cache = Arc::new(ChunkCache::new(cfg.cache_size));
        let source: Arc<dyn ChunkSource> = reader.clone();
        let lower: Arc<dyn BlockDevice> = Arc::new(
            SnapshotLayer::new(source, cache.clone()).map_err(|e| Error::Layer("snapshot", e))?,
        );
        let overlay = Overlay::open_in(&state, lower)
            .map_err(|e| Error::Overlay(cfg.state.clone(), e))?
            .with_read_only(cfg.device.read_only);
        let device: Arc<dyn BlockDevice> = Arc::new(overlay);

        let mut device_cfg = cfg.device.clone();
        if device_cfg.serial.is_empty() {
            device_cfg.serial = info.id.clone();
        }
        let server = BlockServer::new(device.clone(), device_cfg)?;
        let listening = server.bind(&cfg.socket)?;
        let stop = StopHandle::new().map_err(|e| Error::Layer("stop handle", e))?;
        Ok(Daemon {
            info,
            server,
            listening,
            stop,
            device,
            cache,
            _state: state,
            _reader: reader,
        })
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

    /// A handle that stops [`Daemon::run`] from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves QEMU connections until stopped, then flushes every layer.
    pub fn run(self) -> Result<()> {
        let served = self.server.serve(self.listening, &self.stop);
        // serve() flushes on the way out; flush again in case it failed
        // before reaching that point, so the guest's writes are durable.
        let flushed = self.device.flush().map_err(Error::Flush);
        served?;
        flushed
    }
}
