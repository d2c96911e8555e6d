//! The per-queue worker: drains one virtqueue, runs each request, and
//! returns it on the used ring.
//!
//! Each queue has its own worker thread (see `BlockBackend::queues_per_thread`),
//! so a worker needs no locking beyond the vring's own. With `VIRTIO_RING_F_EVENT_IDX` the worker disables guest
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
pub struct Worker {}

impl Worker {
    /// A worker for one queue.
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
        match request.execute(ctx, mem) {
            Ok(written) => request.complete(mem, STATUS_OK, written),
            Err(e) => {
                if e.is_device_error() {
                    warn!(
                        error = %error_chain(&e),
                        request_type = ?request.request_type(),
                        sector = request.sector(),
                        "request failed"
                    );
                } else {
                    // Guest-triggered (unsupported type, write to a read-only
                    // device, memory hot-unplugged under us): not the host's
                    // problem, and not worth a flood of warnings.
                    debug!(error = %error_chain(&e), "request refused");
                }
                request.complete(mem, e.status(), 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::mem_device::MemDevice;
    use crate::request::STATUS_UNSUPP;
    use crate::wire::RequestHeader;

    const QUEUE_SIZE: u16 = 16;

    /// Descriptors of one chain, linked to each other from table index `first`.
    fn chain(first: u16, descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                let last = i + 1 == descs.len();
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        let h = RequestHeader {
            request_type: request_type.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        mem.write_obj(h, GuestAddress(addr)).unwrap();
    }

    fn run_queue(event_idx: bool) {
        let atomic = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
        );
        let guard = atomic.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);

        let image: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 249) as u8).collect();
        let dev = Arc::new(MemDevice::from_vec(image.clone()));

        // Request 0: read sector 3. Request 1: write sector 0.
        // Request 2: unknown type. Request 3: header only (no status).
        header(mem, 0x10_0000, VIRTIO_BLK_T_IN, 3);
        header(mem, 0x10_1000, VIRTIO_BLK_T_OUT, 0);
        header(mem, 0x10_2000, 77, 0);
        header(mem, 0x10_3000, VIRTIO_BLK_T_IN, 0);
        mem.write_slice(&[0x42; 512], GuestAddress(0x21_0000))
            .unwrap();
        let chains = [
            chain(
                0,
                &[
                    (0x10_0000, 16, false),
                    (0x20_0000, 512, true),
                    (0x30_0000, 1, true),
                ],
            ),
            chain(
                3,
                &[
                    (0x10_1000, 16, false),
                    (0x21_0000, 512, false),
                    (0x30_1000, 1, true),
                ],
            ),
            chain(6, &[(0x10_2000, 16, false), (0x30_2000, 1, true)]),
            chain(8, &[(0x10_3000, 16, false)]),
        ];
        let mut index = 0;
        for c in &chains {
            queue.add_desc_chains(c, index).unwrap();
            index += c.len() as u16;
        }

        let vring = Vring::new(atomic.clone(), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring
            .set_queue_info(
                queue.desc_table_addr().0,
                queue.avail_addr().0,
                queue.used_addr().0,
            )
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);

        let limits = Limits {
            capacity: 2048,
            seg_max: 8,
            max_request_bytes: 1 << 20,
            max_discard_sectors: 8,
            max_discard_seg: 1,
            max_write_zeroes_sectors: 8,
            max_write_zeroes_seg: 1,
        };
        let id = [0u8; crate::wire::ID_BYTES];
        let ctx = ExecContext {
            dev: &*dev,
            read_only: false,
            id: &id,
        };
        Worker::new()
            .process(&vring, &atomic, &ctx, &limits, event_idx)
            .unwrap();

        // All four chains are returned, in order, with their used lengths.
        assert_eq!(queue.used().idx().load(), 4);
        let used: Vec<(u32, u32)> = (0..4)
            .map(|i| {
                let e = queue.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        assert_eq!(used, [(0, 513), (3, 1), (6, 1), (8, 0)]);

        let status = |addr| mem.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(status(0x30_0000), STATUS_OK);
        assert_eq!(status(0x30_1000), STATUS_OK);
        assert_eq!(status(0x30_2000), STATUS_UNSUPP);
        let mut read = vec![0u8; 512];
        mem.read_slice(&mut read, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(read, image[1536..2048]);
        assert_eq!(dev.snapshot()[..512], [0x42; 512]);

        // With EVENT_IDX the worker re-enabled notifications by publishing
        // avail_event = next available index (virtio 1.2, 2.7.10).
        let avail_event_addr = queue.used_addr().0 + 4 + 8 * u64::from(QUEUE_SIZE);
        let avail_event = mem.read_obj::<u16>(GuestAddress(avail_event_addr)).unwrap();
        if event_idx {
            assert_eq!(avail_event, 4);
        }

        // A second kick with nothing new is a no-op.
        Worker::new()
            .process(&vring, &atomic, &ctx, &limits, event_idx)
            .unwrap();
        assert_eq!(queue.used().idx().load(), 4);
    }

    #[test]
    fn worker_drains_the_queue_with_event_idx() {
        run_queue(true);
    }

    #[test]
    fn worker_drains_the_queue_without_event_idx() {
        run_queue(false);
    }

    #[test]
    fn error_chain_lists_every_source() {
        let e = Error::Signal(io::Error::other("boom"));
        assert_eq!(error_chain(&e), "Signal the used queue: boom");
    }
}
