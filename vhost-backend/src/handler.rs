//! The vhost-user request handler: the frontend's messages, applied to a
//! [`VhostUserBlk`].
//!
//! This implements the `vhost` crate's [`VhostUserBackendReqHandlerMut`]
//! directly instead of using `vhost-user-backend`'s handler, which answers
//! `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD` with "unsupported" and offers no
//! hook for them. Everything else follows the vhost-user specification
//! ("Ring states", "Memory access", "Inflight I/O tracking"); the ring
//! state itself is `vhost-user-backend`'s [`Vring`].
//!
//! ```text
//!  frontend socket ─▶ BackendReqHandler (vhost) ─▶ BlkHandler
//!                                                    │ memory table, vring setup,
//!                                                    │ in-flight region (crate::inflight)
//!                                                    ▼
//!  kick eventfd ─▶ vq{N} (one thread per queue) ─▶ VhostUserBlk::process_queue
//!                                                   (the queue's Worker, same thread)
//! ```
//!
//! **Queue life cycle.** A queue *starts* once it has a kick eventfd
//! (SET_VRING_KICK); with the in-flight region negotiated this is where a
//! restarted daemon recovers what the previous one held
//! ([`crate::inflight`]): the heads it had taken are resubmitted first and
//! the available ring continues after them. A queue is *polled* (its kick
//! fd in its thread's epoll set) only while started and enabled, and it
//! *stops* at GET_VRING_BASE, which returns only once the device holds no
//! request of that queue.
//!
//! **Threads.** The connection's thread (the one in
//! [`BlockServer::serve`](crate::socket::BlockServer::serve)) runs the
//! handler, serialised by the `Mutex` that `BackendReqHandler` wants. Each
//! queue has one thread of its own, `vq{N}`, spawned here for the
//! connection: it waits for kicks and runs the queue's
//! [`Worker`](crate::worker::Worker) itself (there is no separate kick
//! thread). They meet in [`VhostUserBlk`], whose per-queue worker lock
//! orders a kick's processing against GET_VRING_BASE. The handler takes
//! that lock (and the vring lock, briefly) only after its own `Mutex`,
//! never the other way round.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread;

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VhostUserError, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::VhostUserBlk;
use crate::inflight::{self, InflightRegion};
use crate::worker::{GuestMem, Vring};

type VhostUserResult<T> = std::result::Result<T, VhostUserError>;

/// Memory slots offered to frontends that add regions one by one.
const MAX_MEM_SLOTS: u64 = 509;

/// A frontend (QEMU) virtual address range and the guest physical
/// addresses it maps, for translating SET_VRING_ADDR.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// Handles one frontend connection's vhost-user messages.
pub struct BlkHandler {
    backend: Arc<VhostUserBlk>,
    vrings: Vec<Vring>,
    mem: GuestMem,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    inflight: Option<InflightRegion>,
    queues: Vec<QueueThread>,
}

impl std::fmt::Debug for BlkHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkHandler")
            .field("queues", &self.vrings.len())
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("inflight", &self.inflight.is_some())
            .finish()
    }
}

fn handler_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e))
}

impl BlkHandler {
    /// A handler for `backend`, with one (idle) thread per queue.
    pub fn new(backend: Arc<VhostUserBlk>) -> io::Result<Self> {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        backend.update_memory(mem.clone())?;
        let max = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
        let mut vrings = Vec::with_capacity(backend.num_queues());
        let mut queues = Vec::with_capacity(backend.num_queues());
        for queue in 0..backend.num_queues() {
            let vring = Vring::new(mem.clone(), max).map_err(io::Error::other)?;
            queues.push(QueueThread::spawn(queue, backend.clone(), vring.clone())?);
            vrings.push(vring);
        }
        Ok(BlkHandler {
            backend,
            vrings,
            mem,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
            queues,
        })
    }

    /// Stops and joins the queue threads: no kick is processed after this
    /// returns (requests already handed to the I/O pool still complete).
    pub fn stop_queues(&mut self) {
        for queue in &mut self.queues {
            queue.stop();
        }
    }

    fn vring(&self, index: u32) -> VhostUserResult<&Vring> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa)
            .ok_or_else(|| handler_error(format!("address {va:#x} is in no memory region")))
    }

    fn replace_memory(&mut self, mem: GuestMemoryMmap) -> VhostUserResult<()> {
        // The vrings share this atomic: they see the new table on their
        // next access; requests in flight keep the old mapping alive.
        match self.mem.lock() {
            Ok(guard) => guard.replace(mem),
            Err(_) => return Err(handler_error("guest memory lock poisoned")),
        }
        self.backend
            .update_memory(self.mem.clone())
            .map_err(VhostUserError::ReqHandlerError)
    }

    /// Starts queue `index` once it has its kick eventfd (vhost-user spec,
    /// "Ring states"), recovering from the in-flight region first.
    fn maybe_start(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = &self.vrings[index];
        {
            let state = vring.get_ref();
            if state.get_queue().ready() || state.get_kick().is_none() {
                return Ok(());
            }
        }
        vring.set_queue_ready(true);
        let shared = self.inflight.as_ref().and_then(|r| r.queue(index));
        let mut resubmit = Vec::new();
        if let Some(shared) = &shared {
            let used = vring.queue_used_idx().map_err(handler_error)?;
            let recovered = shared.start(self.acked_features, used);
            if !recovered.resubmit.is_empty() {
                info!(
                    queue = index,
                    requests = recovered.resubmit.len(),
                    used_idx = used,
                    next_avail = recovered.next_avail,
                    "recovered requests a previous daemon held"
                );
                vring.set_queue_next_avail(recovered.next_avail);
                resubmit = recovered.resubmit;
            }
        }
        self.backend.start_queue(index, shared, resubmit);
        self.update_registration(index)?;
        // Look at the ring without waiting for a kick: a dead daemon may
        // have consumed the kick for requests it never took, and with
        // EVENT_IDX the guest does not kick again for them.
        self.queues[index].wake();
        Ok(())
    }

    /// Polls queue `index`'s kick fd exactly while it is started and
    /// enabled.
    fn update_registration(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = &self.vrings[index];
        let (active, kick) = {
            let state = vring.get_ref();
            (
                state.get_queue().ready() && state.is_enabled(),
                state.get_kick().as_ref().map(|k| k.as_raw_fd()),
            )
        };
        let queue = &mut self.queues[index];
        match (active, kick) {
            (true, Some(fd)) => queue.poll(fd).map_err(VhostUserError::ReqHandlerError),
            _ => {
                queue.unpoll();
                Ok(())
            }
        }
    }

    fn set_all_enabled(&mut self, enabled: bool) -> VhostUserResult<()> {
        for index in 0..self.vrings.len() {
            self.vrings[index].set_enabled(enabled);
            self.update_registration(index)?;
        }
        Ok(())
    }

    fn region_from(
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> VhostUserResult<(GuestRegionMmap, Mapping)> {
        let guest = GuestRegionMmap::new(
            region.mmap_region(file)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or_else(|| handler_error("memory region wraps around the address space"))?;
        let mapping = Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        };
        Ok((guest, mapping))
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.stop_queues();
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(VhostUserError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.set_all_enabled(false)?;
        self.acked_features = 0;
        self.backend.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled from the
        // start; with it they wait for SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.set_all_enabled(true)?;
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for vring in &self.vrings {
            vring.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<u64>>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let (guest, mapping) = Self::region_from(region, file)?;
            regions.push(guest);
            mappings.push(mapping);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(handler_error)?;
        self.replace_memory(mem)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let max = self.backend.max_queue_size();
        let vring = self.vring(index)?;
        if num == 0 || num as usize > max {
            warn!(queue = index, num, max, "refusing queue size");
            return Err(VhostUserError::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostUserResult<()> {
        let (desc, avail, used) = (
            self.vmm_va_to_gpa(descriptor)?,
            self.vmm_va_to_gpa(available)?,
            self.vmm_va_to_gpa(used)?,
        );
        let vring = self.vring(index)?;
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| VhostUserError::InvalidParam)?;
        // SET_VRING_BASE carries only the available index (split rings);
        // the used index is wherever the guest's used ring says.
        let next_used = vring.queue_used_idx().map_err(handler_error)?;
        vring.set_queue_next_used(next_used);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let base = u16::try_from(base).map_err(|_| VhostUserError::InvalidParam)?;
        self.vring(index)?.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // vhost-user spec: stop the ring on GET_VRING_BASE.
        vring.set_queue_ready(false);
        self.update_registration(index as usize)?;
        self.backend
            .stop_vring(index, &vring)
            .map_err(VhostUserError::ReqHandlerError)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        debug!(queue = index, next_avail, "queue stopped");
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        // The old fd leaves the epoll set before it is closed.
        self.queues[i].unpoll();
        self.vrings[i].set_kick(fd);
        self.maybe_start(i)?;
        self.update_registration(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_call(fd);
        self.maybe_start(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index as usize)?;
        if enable {
            // Requests to resubmit, and any the guest made available while
            // no daemon listened, wait for the ring to be enabled.
            self.queues[index as usize].wake();
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        request: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = (request.num_queues, request.queue_size);
        check_inflight_shape(&self.backend, num_queues, queue_size)?;
        let file = InflightRegion::create(num_queues, queue_size).map_err(handler_error)?;
        let size = inflight::region_bytes(num_queues, queue_size);
        debug!(num_queues, queue_size, size, "created in-flight region");
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, info: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let (num_queues, queue_size) = (info.num_queues, info.queue_size);
        check_inflight_shape(&self.backend, num_queues, queue_size)?;
        let region = InflightRegion::map(
            file,
            info.mmap_offset,
            info.mmap_size,
            num_queues,
            queue_size,
        )
        .map_err(handler_error)?;
        debug!(num_queues, queue_size, "in-flight region mapped");
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<u64>> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation("postcopy not supported"));
        }
        let (guest, mapping) = Self::region_from(region, fd)?;
        let mem = self
            .mem
            .memory()
            .insert_region(Arc::new(guest))
            .map_err(handler_error)?;
        self.replace_memory(mem)?;
        self.mappings.push(mapping);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(handler_error)?;
        self.replace_memory(mem)?;
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostUserResult<()> {
        Err(VhostUserError::InvalidOperation(
            "dirty logging not supported",
        ))
    }
}

/// The frontend may ask for an in-flight region covering at most the
/// device's queues at their largest size.
fn check_inflight_shape(
    backend: &VhostUserBlk,
    num_queues: u16,
    queue_size: u16,
) -> VhostUserResult<()> {
    let max_queue_size = u16::try_from(backend.max_queue_size()).unwrap_or(u16::MAX);
    if usize::from(num_queues) > backend.num_queues() || queue_size > max_queue_size {
        let e = inflight::Error::TooLarge {
            num_queues,
            queue_size,
            max_queues: backend.num_queues(),
            max_queue_size,
        };
        warn!(error = %e, "refusing in-flight region");
        return Err(handler_error(e));
    }
    Ok(())
}

/// Epoll tokens of a queue thread.
const EXIT: u64 = 0;
const KICK: u64 = 1;
const WAKE: u64 = 2;

/// The thread that waits for one queue's kicks.
struct QueueThread {
    epoll: Arc<Epoll>,
    exit: EventFd,
    wake: EventFd,
    /// The kick fd in the epoll set, if any.
    polled: Option<RawFd>,
    join: Option<thread::JoinHandle<()>>,
}

impl QueueThread {
    fn spawn(queue: usize, backend: Arc<VhostUserBlk>, vring: Vring) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        for (fd, token) in [(exit.as_raw_fd(), EXIT), (wake.as_raw_fd(), WAKE)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let (thread_epoll, thread_wake) = (epoll.clone(), wake.try_clone()?);
        let join = thread::Builder::new()
            .name(format!("vq{queue}"))
            .spawn(move || queue_loop(queue, &backend, &vring, &thread_epoll, &thread_wake))?;
        Ok(QueueThread {
            epoll,
            exit,
            wake,
            polled: None,
            join: Some(join),
        })
    }

    /// Polls `fd` as the queue's kick (replacing another kick fd).
    fn poll(&mut self, fd: RawFd) -> io::Result<()> {
        if self.polled == Some(fd) {
            return Ok(());
        }
        self.unpoll();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, KICK),
        )?;
        self.polled = Some(fd);
        Ok(())
    }

    /// Stops polling the kick fd.
    fn unpoll(&mut self) {
        if let Some(fd) = self.polled.take() {
            // Fails only if the fd was closed already, which removed it.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Makes the thread look at its queue without a kick.
    fn wake(&self) {
        // Fails only if the counter would overflow: a wake-up is pending.
        let _ = self.wake.write(1);
    }

    fn stop(&mut self) {
        self.unpoll();
        if let Some(join) = self.join.take() {
            let _ = self.exit.write(1);
            if join.join().is_err() {
                error!("queue thread panicked");
            }
        }
    }
}

fn queue_loop(queue: usize, backend: &VhostUserBlk, vring: &Vring, epoll: &Epoll, wake: &EventFd) {
    let mut events = [EpollEvent::default(); 3];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!(queue, error = %e, "waiting for queue events failed");
                return;
            }
        };
        let tokens: Vec<u64> = events[..n].iter().map(|e| e.data()).collect();
        if tokens.contains(&EXIT) {
            return;
        }
        for token in tokens {
            match token {
                KICK => {
                    if let Err(e) = vring.read_kick() {
                        warn!(queue, error = %e, "reading the kick eventfd failed");
                    }
                }
                WAKE => {
                    let _ = wake.read();
                }
                _ => continue,
            }
        }
        backend.process_queue(queue, vring);
    }
}

#[cfg(test)]
mod tests;
