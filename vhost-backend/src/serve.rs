//! Socket lifecycle: bind, serve frontends one after another, stop.
//!
//! ```text
//! BlockServer::new(dev, cfg)        validate the configuration
//!   .bind(path) -> Listening        socket exists (mode 0600) and queues
//!                                   connections from this moment on
//!   .serve(listening, &stop)        accept → run → disconnect → flush,
//!                                   repeated until stop.stop()
//! ```
//!
//! Every connection gets a fresh [`BlockBackend`] and `VhostUserDaemon`,
//! so a reconnecting QEMU (guest reboot, QEMU restart) starts from a clean
//! device state, while the listening socket stays in place throughout.
//! A connection ends only once every request it started has completed
//! (and the device is flushed), so no late completion can land in the
//! rings of the next one.
//! [`StopHandle::stop`] may be called from any thread (e.g. a signal
//! handling thread): it wakes the accept wait, shuts the current connection
//! down, and `serve` returns after a final [`BlockDevice::flush`].
//!
//! The socket is created with mode 0600 without a window of looser
//! permissions: it is bound inside a fresh 0700 directory next to the
//! target, chmod-ed, and renamed into place (which also atomically replaces
//! a stale socket left by a crashed daemon).

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{debug, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{self, BlockBackend, DeviceConfig, DeviceSpec};
use crate::block::BlockDevice;
use crate::worker::error_chain;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device configuration is invalid.
    #[error("Validate device configuration")]
    Config(#[from] backend::Error),
    /// Something that is not a socket is in the way.
    #[error("Refuse to replace {0}: not a socket")]
    NotASocket(PathBuf),
    /// Another daemon is serving on the path.
    #[error("Socket {0} is in use by another daemon")]
    InUse(PathBuf),
    /// Creating the socket failed.
    #[error("Create socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating the stop event or epoll set failed.
    #[error("Set up event polling")]
    Poll(#[source] io::Error),
    /// Waiting for a connection failed.
    #[error("Wait for a connection")]
    Wait(#[source] io::Error),
    /// The vhost-user daemon could not be created or could not accept.
    #[error("Start vhost-user daemon: {0}")]
    Daemon(String),
    /// The final flush failed.
    #[error("Flush device on shutdown")]
    Flush(#[source] io::Error),
}

/// Result of serving.
pub type Result<T> = std::result::Result<T, Error>;

struct StopInner {
    stopped: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// Stops a running [`BlockServer::serve`] from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

impl StopHandle {
    /// A handle that has not been stopped.
    pub fn new() -> io::Result<Self> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stopped: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
                connection: Mutex::new(None),
            }),
        })
    }

    /// Asks `serve` to disconnect the frontend, flush and return. Idempotent.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept wait; can only fail if the counter would overflow.
        let _ = self.inner.wake.write(1);
        let connection = self
            .inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = connection.as_ref() {
            handle.shutdown();
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    fn set_connection(&self, handle: Option<ShutdownHandle>) {
        *self
            .inner
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = handle;
    }
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// A bound, listening vhost-user socket. Dropping it removes the socket
/// file (unless another daemon has replaced it since).
pub struct Listening {
    listener: Listener,
    path: PathBuf,
    inode: (u64, u64),
}

impl Listening {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Serves a [`BlockDevice`] as a vhost-user-blk device.
pub struct BlockServer {
    dev: Arc<dyn BlockDevice>,
    spec: DeviceSpec,
}

impl std::fmt::Debug for BlockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockServer")
            .field("size", &self.dev.size())
            .field("spec", &self.spec)
            .finish()
    }
}

impl BlockServer {
    /// Validates `cfg` against `dev`.
    pub fn new(dev: Arc<dyn BlockDevice>, cfg: DeviceConfig) -> Result<Self> {
        let spec = DeviceSpec::new(&*dev, &cfg)?;
        Ok(BlockServer { dev, spec })
    }

    /// Creates the socket at `path` with mode 0600, replacing a stale
    /// socket. From the moment this returns, frontends can connect (they
    /// wait in the listen backlog until [`BlockServer::serve`] runs).
    pub fn bind(&self, path: &Path) -> Result<Listening> {
        check_stale(path)?;
        let bind_err = |source| Error::Bind {
            path: path.to_owned(),
            source,
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp_dir = private_dir(parent).map_err(bind_err)?;
        let tmp_sock = tmp_dir.join("s");
        let bound = UnixListener::bind(&tmp_sock)
            .and_then(|l| {
                fs::set_permissions(&tmp_sock, Permissions::from_mode(0o600))?;
                fs::rename(&tmp_sock, path)?;
                Ok(l)
            })
            .map_err(bind_err);
        let _ = fs::remove_file(&tmp_sock);
        let _ = fs::remove_dir(&tmp_dir);
        let listener = bound?;
        let meta = fs::symlink_metadata(path).map_err(bind_err)?;
        info!(path = %path.display(), "vhost-user-blk socket listening");
        Ok(Listening {
            listener: Listener::from(listener),
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// Serves frontends on `listening`, one connection at a time, until
    /// `stop` is stopped; then flushes the device and returns.
    ///
    /// A frontend disconnecting (or misbehaving) ends only its connection;
    /// the next one is accepted on the same socket.
    pub fn serve(&self, mut listening: Listening, stop: &StopHandle) -> Result<()> {
        const LISTENER: u64 = 0;
        const STOP: u64 = 1;
        let epoll = Epoll::new().map_err(Error::Poll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listening.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(Error::Poll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.inner.wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(Error::Poll)?;

        let mut events = [EpollEvent::default(); 2];
        let result = loop {
            if stop.is_stopped() {
                break Ok(());
            }
            match epoll.wait(-1, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::Wait(e)),
            }
            if stop.is_stopped() {
                break Ok(());
            }
            if let Err(e) = self.serve_connection(&mut listening.listener, stop) {
                break Err(e);
            }
        };
        info!("vhost-user-blk server stopping; flushing device");
        let flushed = self.dev.flush().map_err(Error::Flush);
        result.and(flushed)
    }

    /// Binds `path` and serves it until `stop`: [`BlockServer::bind`] then
    /// [`BlockServer::serve`].
    pub fn bind_and_serve(&self, path: &Path, stop: &StopHandle) -> Result<()> {
        let listening = self.bind(path)?;
        self.serve(listening, stop)
    }

    /// Accepts one frontend and serves it until it disconnects.
    fn serve_connection(&self, listener: &mut Listener, stop: &StopHandle) -> Result<()> {
        let backend = Arc::new(BlockBackend::from_spec(self.dev.clone(), self.spec.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_owned(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        // The listener is readable, so this accepts without blocking.
        daemon
            .start(listener)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        info!("vhost-user frontend connected");
        stop.set_connection(daemon.shutdown_handle());
        if stop.is_stopped() {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        stop.set_connection(None);
        // Dropping the daemon stops and joins the queue worker threads, so
        // nothing new is dispatched; then let the requests the frontend
        // left in flight finish before the flush below and before the next
        // frontend can connect.
        drop(daemon);
        backend.quiesce();
        drop(backend);
        match ended {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("vhost-user frontend disconnected"),
            Err(e) => warn!(error = %e, "vhost-user connection failed"),
        }
        // Whatever the guest wrote is made durable between frontends.
        if let Err(e) = self.dev.flush() {
            warn!(error = %error_chain(&e), "flush after disconnect failed");
        }
        Ok(())
    }
}

/// Refuses to replace anything but a socket nobody listens on.
fn check_stale(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(Error::NotASocket(path.to_owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(Error::InUse(path.to_owned())),
            Err(_) => {
                debug!(path = %path.display(), "replacing stale socket");
                Ok(())
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates a fresh mode-0700 directory inside `parent`.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".vub{:x}.{n:x}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}
