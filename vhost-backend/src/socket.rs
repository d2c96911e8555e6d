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
//! Every connection gets a fresh [`VhostUserBlk`] and [`BlkHandler`], so a
//! reconnecting QEMU (guest reboot, QEMU restart, or this daemon restarted
//! under a running guest) starts from a clean device state, while the
//! listening socket stays in place throughout. What a previous daemon left
//! in flight comes back through the frontend's in-flight region
//! ([`crate::inflight`]).
//! A connection ends only once every request it started has completed
//! (and the device is flushed), so no late completion can land in the
//! rings of the next one.
//! [`StopHandle::stop`] may be called from any thread (e.g. a signal
//! handling thread): it wakes the accept wait, shuts the current connection
//! down, and `serve` returns after a final [`BlockDevice::flush`].
//!
//! The socket is created by [`block::socket::bind_private_socket`]: mode
//! 0600 (0660 when shared with a group), handed to its
//! [`SocketOwner`] and only then renamed into place, so it is never open
//! to anyone else; a stale socket left by a crashed daemon is replaced
//! atomically.

use std::io;
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{self, DeviceConfig, DeviceSpec, VhostUserBlk};
use crate::handler::BlkHandler;
use block::device::BlockDevice;
use block::error_chain;
use block::socket::{bind_private_socket, SocketFile, SocketOwner};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device configuration is invalid.
    #[error("Validate device configuration")]
    Config(#[from] device::Error),
    /// Creating the socket failed (something else in the way, another
    /// daemon serving there, the owner could not be set, ...).
    #[error(transparent)]
    Bind(#[from] block::socket::Error),
    /// Creating the stop event or epoll set failed.
    #[error("Set up event polling")]
    Poll(#[source] io::Error),
    /// Waiting for a connection failed.
    #[error("Wait for a connection")]
    Wait(#[source] io::Error),
    /// A connection could not be accepted or set up.
    #[error("Accept vhost-user connection")]
    Accept(#[source] io::Error),
    /// The final flush failed.
    #[error("Flush device on shutdown")]
    Flush(#[source] io::Error),
}

/// Result of serving.
pub type Result<T> = std::result::Result<T, Error>;

struct StopInner {
    stopped: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<UnixStream>>,
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
        if let Some(stream) = connection.as_ref() {
            // Ends the request loop: its next read fails.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    fn set_connection(&self, handle: Option<UnixStream>) {
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
    listener: UnixListener,
    file: SocketFile,
}

impl Listening {
    /// The socket path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening")
            .field("path", &self.path())
            .finish()
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
        self.bind_owned(path, None)
    }

    /// [`BlockServer::bind`], with the socket owned by `owner` (mode 0600,
    /// or 0660 when the owner names a group) before it appears at `path`:
    /// a hypervisor running as another user (libvirt's `libvirt-qemu`)
    /// can connect, nobody else can.
    pub fn bind_owned(&self, path: &Path, owner: Option<&SocketOwner>) -> Result<Listening> {
        let (listener, file) = bind_private_socket(path, owner)?;
        match owner {
            Some(owner) => info!(path = %path.display(), %owner, "vhost-user-blk socket listening"),
            None => info!(path = %path.display(), "vhost-user-blk socket listening"),
        }
        Ok(Listening { listener, file })
    }

    /// Serves frontends on `listening`, one connection at a time, until
    /// `stop` is stopped; then flushes the device and returns.
    ///
    /// A frontend disconnecting (or misbehaving) ends only its connection;
    /// the next one is accepted on the same socket.
    pub fn serve(&self, listening: Listening, stop: &StopHandle) -> Result<()> {
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
            match listening.listener.accept() {
                Ok((stream, _)) => self.serve_connection(stream, stop),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::Accept(e)),
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

    /// Serves one frontend until it disconnects (or `stop`).
    fn serve_connection(&self, stream: UnixStream, stop: &StopHandle) {
        info!("vhost-user frontend connected");
        let ended = self.run_connection(stream, stop);
        match ended {
            Ok(())
            | Err(VhostUserError::Disconnected)
            | Err(VhostUserError::PartialMessage)
            | Err(VhostUserError::SocketBroken(_)) => info!("vhost-user frontend disconnected"),
            Err(_) if stop.is_stopped() => info!("vhost-user connection closed"),
            Err(e) => warn!(error = %error_chain(&e), "vhost-user connection failed"),
        }
        // Whatever the guest wrote is made durable between frontends.
        if let Err(e) = self.dev.flush() {
            warn!(error = %error_chain(&e), "flush after disconnect failed");
        }
    }

    /// Handles the frontend's messages until the connection ends; returns
    /// once every request it started has completed.
    fn run_connection(
        &self,
        stream: UnixStream,
        stop: &StopHandle,
    ) -> std::result::Result<(), VhostUserError> {
        let backend = Arc::new(VhostUserBlk::from_spec(self.dev.clone(), self.spec.clone()));
        let handler = Arc::new(Mutex::new(
            BlkHandler::new(backend.clone()).map_err(VhostUserError::ReqHandlerError)?,
        ));
        let ended = (|| {
            stop.set_connection(Some(
                stream.try_clone().map_err(VhostUserError::SocketError)?,
            ));
            if stop.is_stopped() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            let mut requests = BackendReqHandler::from_stream(stream, handler.clone());
            loop {
                requests.handle_request()?;
            }
        })();
        stop.set_connection(None);
        // No kick is taken after this; then the requests the frontend left
        // in flight finish before the flush and before the next frontend.
        handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop_queues();
        backend.quiesce();
        ended
    }
}
