//! The per-queue worker: drains one virtqueue, runs each request, and
//! returns it on the used ring.
//!
//! Each queue has its own worker thread (see `BlockBackend::queues_per_thread`),
//! so a worker owns its bounce buffer and needs no locking beyond the
//! vring's own. With `VIRTIO_RING_F_EVENT_IDX` the worker disables guest
//! notifications, drains, and re-enables them, looping while re-enabling
//! reports that more requests arrived in between; it signals the guest
//! only when the used-event index asks for it.

use std::error::Error as StdError;
use std::io;

use tracing::{debug, trace, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::request::{ExecContext, Limits, Request, STATUS_OK};

/// Guest memory as the vhost-user daemon shares it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// A vring of [`GuestMem`].
pub type Vring = VringRwLock<GuestMem>;

/// Why a queue could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The available ring could not be read (e.g. a bogus index).
    #[error("Walk the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// A used element could not be added.
    #[error("Add used element for descriptor {head}")]
    AddUsed {
        /// Head descriptor index.
        head: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// Enabling, disabling or checking notifications failed.
    #[error("Update guest notification state")]
    Notification(#[source] virtio_queue::Error),
    /// Signalling the guest failed.
    #[error("Signal the used queue")]
    Signal(#[source] io::Error),
}

/// Result of worker operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Formats an error with its whole source chain.
pub(crate) fn error_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One queue's worker state.
#[derive(Debug, Default)]
pub struct Worker {
    bounce: Vec<u8>,
}

impl Worker {
    /// A worker with an empty bounce buffer (it grows on demand).
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a kick: processes every available request of `vring`.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        ctx: &ExecContext<'_>,
        limits: &Limits,
        event_idx: bool,
    ) -> Result<()> {
        if !event_idx {
            return self.drain(vring, mem, ctx, limits);
        }
        loop {
            vring.disable_notification().map_err(Error::Notification)?;
            self.drain(vring, mem, ctx, limits)?;
            // enable_notification() reports whether requests arrived between
            // the last drain and re-enabling; they would get no kick.
            if !vring.enable_notification().map_err(Error::Notification)? {
                return Ok(());
            }
        }
    }

    /// Processes requests until the available ring is empty.
    fn drain(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        ctx: &ExecContext<'_>,
        limits: &Limits,
    ) -> Result<()> {
        let guard = mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        loop {
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem)
                .map_err(Error::AvailRing)?
                .collect();
            if chains.is_empty() {
                return Ok(());
            }
            for chain in chains {
                let head = chain.head_index();
                let used_len = self.handle(chain, mem, ctx, limits);
                vring
                    .add_used(head, used_len)
                    .map_err(|source| Error::AddUsed { head, source })?;
            }
            if vring.needs_notification().map_err(Error::Notification)? {
                vring.signal_used_queue().map_err(Error::Signal)?;
            }
        }
    }

    /// Parses and runs one request; returns the used length.
    fn handle(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        ctx: &ExecContext<'_>,
        limits: &Limits,
    ) -> u32 {
        let request = match Request::parse(chain, limits) {
            Ok(request) => request,
            Err(rejected) => {
                // Guest-controlled: debug level so a misbehaving guest cannot
                // flood the host's logs.
                debug!(error = %error_chain(&rejected), "rejecting malformed request");
                return rejected.complete(mem);
            }
        };
        trace!(
            request_type = ?request.request_type(),
            sector = request.sector(),
            len = request.data_len(),
            "request"
        );
        match request.execute(ctx, mem, &mut self.bounce) {
            Ok(written) => request.complete(mem, STATUS_OK, written),
            Err(e) => {
                let status = e.status();
                if status == crate::request::STATUS_UNSUPP {
                    debug!(error = %error_chain(&e), "unsupported request");
                } else {
                    warn!(
                        error = %error_chain(&e),
                        request_type = ?request.request_type(),
                        sector = request.sector(),
                        "request failed"
                    );
                }
                request.complete(mem, status, 0)
            }
        }
    }
}
