//! The per-queue worker: pops a virtqueue's requests, parses them, and has
//! them executed, completing each on the used ring as soon as it is done,
//! in whatever order that happens.
//!
//! ```text
//!  kick ─▶ Worker (the queue's thread)          I/O Pool (shared by queues)
//!          pop chains, parse, HeldHeads.begin ─▶ execute ─▶ complete
//!          └─ cheap requests: execute + complete right here
//! ```
//!
//! **Threads.** Each queue has exactly one thread, `vq{N}` (started per
//! connection by [`crate::handler`]): it waits for the queue's kicks *and*
//! is this worker, so "the kick thread" and "the worker" are the same
//! thread. Parsing always happens there. Execution moves to the shared
//! I/O [`Pool`] (`blk-io-{i}` threads) unless handing it over would cost
//! more than running it:
//! - a batch of exactly one request on a queue that held nothing runs on
//!   the worker, whatever its type and size (QD1 latency carries no
//!   thread hand-off);
//! - requests that fail to parse, GET_ID and unsupported types run on the
//!   worker;
//! - small reads the device can serve from memory right now (every chunk
//!   they touch is cached or a zero chunk: `BlockDevice::read_is_cheap`)
//!   run on the worker, untimed: a warm read never hops threads;
//! - reads and writes of at most [`SMALL_REQUEST`] bytes run on the worker
//!   while the queue's moving average of their run time (one for reads,
//!   one for writes, weight 1/8, fed by every small request wherever it
//!   ran) is below [`INLINE_READS_BELOW`] or [`INLINE_WRITES_BELOW`] (page
//!   cache or chunk cache hits). The averages start at twice their limits,
//!   so on a new connection small requests *do* go to the pool until a
//!   handful of fast ones have pulled the average under the limit. Once
//!   they turn slow (cold chunks) the average rises past the limit within
//!   about ten requests and they go back to the pool, while one preempted
//!   request barely moves it (a sample counts for at most twice the
//!   average);
//! - everything else (larger requests, FLUSH, DISCARD, WRITE_ZEROES) goes
//!   to the pool, so a slow request never holds up the ones behind it.
//!
//! The worker submits a batch's pool jobs before it runs the batch's cheap
//! requests. Without a pool (`io_threads` 0) every request runs on the
//! worker, in ring order.
//!
//! **Completion** ([`complete`], on a pool thread) takes the vring lock
//! once: `add_used` with the request's own head index and used length,
//! then, with `VIRTIO_RING_F_EVENT_IDX`, the used-event check, and the
//! signal if the driver asked for one. The worker puts what it ran itself
//! on the used ring as it goes. With EVENT_IDX it checks the used event
//! after the first one of a batch and after every [`SIGNAL_STRIDE`]th
//! after that, so a driver that waits for a completion hears of the first
//! one at once and refills the ring while the worker is still running the
//! rest of the batch (the two sides overlap instead of taking turns); a
//! check covers every completion since the last one, and the driver's
//! `used_event` makes it signal only if the driver waits. Without
//! EVENT_IDX every check would signal, so the worker signals once per
//! batch instead. The end of a batch always checks ([`notify`]), so no
//! completion goes unsignalled.
//! The worker itself handles EVENT_IDX on the available side as disable →
//! drain → re-enable, looping while re-enabling reports that requests
//! arrived in between.
//!
//! **Ordering.** Requests of one queue may complete out of order; virtio
//! promises nothing else (virtio 1.2, 2.7.14: used buffers need not be
//! returned in the order they were made available). FLUSH needs no
//! barrier either: "a write becomes stable once it is completed and ... a
//! VIRTIO_BLK_T_FLUSH request is sent after the write is completed and is
//! completed itself" (5.2.6.1). A write is completed only after
//! [`BlockDevice::write_vectored_at`] has returned, the guest sends the
//! FLUSH only after seeing that completion, and [`BlockDevice::flush`]
//! makes durable every write that returned before it was called. Writes
//! still in flight when the FLUSH arrives are not covered, as the spec
//! allows.
//!
//! **Restarts.** With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` the queue
//! has an [`InflightQueue`]: every head is marked there when it is taken
//! (before anything runs) and cleared when it is put on the used ring
//! (under the vring lock, around `add_used`), so a daemon that dies at any
//! instant leaves behind exactly the requests it held. The next daemon's
//! worker runs those first ([`Worker::start`]), read from the descriptor
//! table by head index, then continues with the available ring.
//!
//! **Stopping.** Every popped request is in [`HeldHeads`] (per descriptor
//! head) until it is on the used ring. `VhostUserBlk::stop_vring` and
//! `reset_device` wait for the worker to finish dispatching, then for the
//! queue's in-flight set to empty, so the frontend never reads a ring
//! state that a late completion would change, and the server waits for all
//! queues before it flushes and accepts the next frontend. A job holds its
//! own reference to the guest memory mapping, so a memory table swap never
//! unmaps a buffer under a running request.

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, trace, warn};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::inflight::InflightQueue;
use crate::request::{
    descriptors_at, ExecContext, Limits, Rejected, Request, RequestType, STATUS_IOERR, STATUS_OK,
};
use crate::wire::{ID_BYTES, SECTOR_SHIFT};
use block::device::BlockDevice;
use block::error_chain;

mod held;
mod pool;
#[cfg(test)]
mod tests;

pub use held::HeldHeads;
pub use pool::{Job, Pool};

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

/// What every request of a device runs against; shared with the pool.
pub struct ServedDisk {
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// Refuse write-type requests (`VIRTIO_BLK_F_RO` is offered).
    pub read_only: bool,
    /// The GET_ID string, NUL-padded.
    pub id: [u8; ID_BYTES],
    /// What requests may ask for.
    pub limits: Limits,
}

impl ServedDisk {
    /// The execution context of one request.
    pub fn context(&self) -> ExecContext<'_> {
        ExecContext {
            dev: &*self.dev,
            read_only: self.read_only,
            id: &self.id,
        }
    }
}

impl std::fmt::Debug for ServedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDisk")
            .field("size", &self.dev.size())
            .field("read_only", &self.read_only)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Reads and writes up to this size count as small (see the module doc:
/// they may run on the queue's thread).
pub const SMALL_REQUEST: u64 = 64 << 10;

/// Small reads run on the worker itself while their recent average run
/// time is below this: handing them to the pool would cost more (a thread
/// wake-up, a context switch) than running them.
pub const INLINE_READS_BELOW: Duration = Duration::from_micros(10);

/// The same for small writes. Higher, because writes to one file
/// serialise on its inode lock in the kernel, so the pool buys them little
/// parallelism unless they really wait (dirty-page throttling).
pub const INLINE_WRITES_BELOW: Duration = Duration::from_micros(40);

/// With EVENT_IDX, the worker checks the used event after the first
/// request of a batch it completes and after every this many more (and at
/// the batch's end). Early enough that a waiting driver refills the ring
/// while the worker runs the rest of the batch; not after every request,
/// because on a busy host the woken driver often runs on the worker's own
/// CPU and preempts it, and a check per request then turns into a switch
/// per two requests.
pub const SIGNAL_STRIDE: usize = 16;

/// Weight of the newest run time in the moving average (1/8).
const AVERAGE_SHIFT: u32 = 3;

/// What a single sample may add to twice the average, in nanoseconds.
const SAMPLE_SLACK_NS: u64 = 2_000;

/// One queue's worker state.
#[derive(Debug)]
pub struct Worker {
    queue: usize,
    in_flight: Arc<HeldHeads>,
    run_times: Arc<RunTimes>,
    /// The queue's part of the shared in-flight region, if negotiated.
    shared: Option<InflightQueue>,
    /// Heads a previous daemon held, to run before the available ring.
    resubmit: Vec<u16>,
    /// Signal the guest once, unconditionally, on the first processing
    /// after a (re)start (see [`Worker::start`]).
    announce: bool,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated (as of the last
    /// [`Worker::process`]): check the used event within a batch.
    event_idx: bool,
    /// Requests of the current batch this thread has put on the used ring.
    finished: usize,
}

/// Moving averages of how long small reads and small writes take,
/// wherever they ran, in nanoseconds. They start above their limits, so
/// the first requests of a connection go to the pool until they are known.
#[derive(Debug)]
struct RunTimes {
    read_ns: AtomicU64,
    write_ns: AtomicU64,
}

impl RunTimes {
    fn new() -> Self {
        RunTimes {
            read_ns: AtomicU64::new(2 * INLINE_READS_BELOW.as_nanos() as u64),
            write_ns: AtomicU64::new(2 * INLINE_WRITES_BELOW.as_nanos() as u64),
        }
    }

    /// The average `request` belongs to and its inline limit, if it is a
    /// small read or write.
    fn class(&self, request: &Request) -> Option<(&AtomicU64, Duration)> {
        if request.data_len() > SMALL_REQUEST {
            return None;
        }
        match request.request_type() {
            RequestType::In => Some((&self.read_ns, INLINE_READS_BELOW)),
            RequestType::Out => Some((&self.write_ns, INLINE_WRITES_BELOW)),
            _ => None,
        }
    }

    /// Whether `request` costs less to run on the worker than to hand to
    /// the pool: GET_ID and refusals always; small reads and writes while
    /// they are recently fast.
    fn cheap(&self, request: &Request) -> bool {
        match request.request_type() {
            RequestType::GetId | RequestType::Unsupported(_) => true,
            _ => self.class(request).is_some_and(|(average, limit)| {
                average.load(Ordering::Relaxed) < limit.as_nanos() as u64
            }),
        }
    }

    /// Runs `run` and folds its run time into `request`'s average.
    fn timed(&self, request: &Request, run: impl FnOnce() -> u32) -> u32 {
        let Some((average, _)) = self.class(request) else {
            return run();
        };
        let start = Instant::now();
        let len = run();
        let took = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Racy read-modify-write: a lost update only delays the average.
        let old = average.load(Ordering::Relaxed);
        average.store(fold(old, took), Ordering::Relaxed);
        len
    }
}

impl Worker {
    /// The worker of queue `queue`.
    pub fn new(queue: usize) -> Self {
        Worker {
            queue,
            in_flight: Arc::new(HeldHeads::new()),
            run_times: Arc::new(RunTimes::new()),
            shared: None,
            resubmit: Vec::new(),
            announce: false,
            event_idx: false,
            finished: 0,
        }
    }

    /// Starts the queue on a (re)connection: `shared` is its part of the
    /// in-flight region (if the frontend provided one), `resubmit` the
    /// heads a previous daemon held, which run on the next
    /// [`Worker::process`] before anything from the available ring.
    pub fn start(&mut self, shared: Option<InflightQueue>, resubmit: Vec<u16>) {
        self.shared = shared;
        self.resubmit = resubmit;
        // A daemon killed between putting a request on the used ring and
        // signalling the guest leaves a completion the guest never heard
        // of; with EVENT_IDX no later completion would signal it either
        // (the used event index was already passed). One unconditional
        // signal after a (re)start covers it; a spurious one is harmless.
        self.announce = true;
    }

    /// Heads waiting to be resubmitted.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    /// The requests this queue's device holds.
    pub fn in_flight(&self) -> &Arc<HeldHeads> {
        &self.in_flight
    }

    /// Handles a kick: takes every available request of `vring` and has it
    /// executed, on `pool` when there is one. Returns once every request
    /// is completed or queued on the pool.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        target: &Arc<ServedDisk>,
        pool: Option<&Pool>,
        event_idx: bool,
    ) -> Result<()> {
        self.event_idx = event_idx;
        let result = if event_idx {
            self.drain_with_event_idx(vring, mem, target, pool)
        } else {
            self.drain(vring, mem, target, pool)
        };
        if std::mem::take(&mut self.announce) {
            vring.signal_used_queue().map_err(Error::Signal)?;
        }
        result
    }

    fn drain_with_event_idx(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        target: &Arc<ServedDisk>,
        pool: Option<&Pool>,
    ) -> Result<()> {
        loop {
            vring.disable_notification().map_err(Error::Notification)?;
            self.drain(vring, mem, target, pool)?;
            // enable_notification() reports whether requests arrived between
            // the last drain and re-enabling; they would get no kick.
            if !vring.enable_notification().map_err(Error::Notification)? {
                return Ok(());
            }
        }
    }

    /// Takes requests until the available ring is empty: first the heads
    /// to resubmit, then the available ring.
    fn drain(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        target: &Arc<ServedDisk>,
        pool: Option<&Pool>,
    ) -> Result<()> {
        self.resubmit_pending(vring, mem, target, pool);
        // Jobs keep this mapping alive however the memory table changes.
        let mem: Arc<GuestMemoryMmap> = mem.memory().into_inner();
        loop {
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                // A queue stopped under a pending kick: nothing to take.
                if !queue.ready() {
                    return Ok(());
                }
                queue.iter(&*mem).map_err(Error::AvailRing)?.collect()
            };
            if chains.is_empty() {
                return Ok(());
            }
            // Marked in ring order before any of them runs (see
            // crate::inflight for why the order matters).
            if let Some(shared) = &self.shared {
                for chain in &chains {
                    shared.fetch(chain.head_index());
                }
            }
            let batch: Vec<_> = chains
                .into_iter()
                .map(|chain| (chain.head_index(), Request::parse(chain, &target.limits)))
                .collect();
            self.dispatch(batch, vring, &mem, target, pool);
        }
    }

    /// Runs (or hands to the pool) the requests a previous daemon held, in
    /// the order it took them. They are marked in the shared region already.
    pub fn resubmit_pending(
        &mut self,
        vring: &Vring,
        mem: &GuestMem,
        target: &Arc<ServedDisk>,
        pool: Option<&Pool>,
    ) {
        if self.resubmit.is_empty() {
            return;
        }
        let heads = std::mem::take(&mut self.resubmit);
        let mem: Arc<GuestMemoryMmap> = mem.memory().into_inner();
        let (table, size) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (GuestAddress(queue.desc_table()), queue.size())
        };
        info!(
            queue = self.queue,
            count = heads.len(),
            "resubmitting the requests a previous daemon held"
        );
        let batch: Vec<_> = heads
            .into_iter()
            .map(|head| {
                let descs = descriptors_at(&*mem, table, size, head);
                (
                    head,
                    Request::from_descriptors(&descs, &*mem, &target.limits),
                )
            })
            .collect();
        self.dispatch(batch, vring, &mem, target, pool);
    }

    /// Runs or hands to the pool one batch of parsed requests, completing
    /// the rejected ones.
    fn dispatch(
        &mut self,
        batch: Vec<(u16, std::result::Result<Request, Rejected>)>,
        vring: &Vring,
        mem: &Arc<GuestMemoryMmap>,
        target: &Arc<ServedDisk>,
        pool: Option<&Pool>,
    ) {
        let size = batch.len();
        self.finished = 0;
        let mut inline = Vec::new();
        let mut jobs: Vec<Job> = Vec::new();
        for (head, parsed) in batch {
            let before = self.in_flight.begin(head);
            let request = match parsed {
                Ok(request) => request,
                Err(rejected) => {
                    // Guest-controlled: debug level so a misbehaving
                    // guest cannot flood the host's logs.
                    debug!(error = %error_chain(&rejected), "rejecting malformed request");
                    let len = rejected.complete(&**mem);
                    self.finish(vring, head, len);
                    continue;
                }
            };
            // Without a pool, or alone on an idle queue: right away, in
            // ring order. Cheap requests: here too, but after the slow
            // ones of the batch are on their way to the pool.
            if pool.is_none() || (size == 1 && before == 0) {
                let len = self
                    .run_times
                    .timed(&request, || execute(&request, target, mem));
                self.finish(vring, head, len);
                continue;
            }
            if served_from_memory(&request, target) {
                inline.push((head, request, false));
                continue;
            }
            if self.run_times.cheap(&request) {
                inline.push((head, request, true));
                continue;
            }
            let (vring, mem, target) = (vring.clone(), mem.clone(), target.clone());
            let (queue, in_flight) = (self.queue, self.in_flight.clone());
            let (run_times, shared) = (self.run_times.clone(), self.shared.clone());
            jobs.push(Box::new(move || {
                let len = run_times.timed(&request, || execute(&request, &target, &mem));
                complete(&vring, queue, shared.as_ref(), head, len);
                in_flight.end(head);
            }));
        }
        // The pool starts on the slow requests while this thread runs the
        // cheap ones.
        if let Some(pool) = pool {
            pool.submit(jobs);
        }
        for (head, request, timed) in inline {
            let len = if timed {
                self.run_times
                    .timed(&request, || execute(&request, target, mem))
            } else {
                execute(&request, target, mem)
            };
            self.finish(vring, head, len);
        }
        // Without EVENT_IDX, one signal for everything this thread
        // completed: the driver then reaps the batch at once. With it,
        // this checks the completions since `finish`'s last check.
        notify(vring, self.queue);
    }

    /// Puts a request completed on this thread on the used ring and, with
    /// EVENT_IDX, for the first of a batch and every [`SIGNAL_STRIDE`]th
    /// after it, signals the driver if it waits for any of them; the rest
    /// wait for the batch's end ([`notify`]).
    fn finish(&mut self, vring: &Vring, head: u16, len: u32) {
        self.finished += 1;
        let check = self.event_idx && self.finished % SIGNAL_STRIDE == 1;
        let result = {
            let mut state = vring.get_mut();
            put_used(&mut state, self.shared.as_ref(), head, len).and_then(|()| {
                if check {
                    signal_if_needed(&mut state)
                } else {
                    Ok(())
                }
            })
        };
        if let Err(e) = result {
            error!(queue = self.queue, error = %error_chain(&e), "completing a request failed");
        }
        self.in_flight.end(head);
    }
}

/// Whether `request` is a small read the device can serve from memory
/// right now ([`block::BlockDevice::read_is_cheap`]: cached or zero
/// chunks): it runs on the worker without a thread hand-off and without
/// timing, whatever the moving average says.
fn served_from_memory(request: &Request, target: &ServedDisk) -> bool {
    request.request_type() == RequestType::In
        && request.data_len() <= SMALL_REQUEST
        && target
            .dev
            .read_is_cheap(request.sector() << SECTOR_SHIFT, request.data_len())
}

/// The moving average `old` (ns) after a request that took `took` ns.
///
/// A sample counts for at most twice the average (plus a little): a
/// thread preempted mid-request on a busy host must not send the next few
/// dozen cheap requests to the pool, while a real change (cold chunks)
/// still lifts the average past its limit within ten or so.
fn fold(old: u64, took: u64) -> u64 {
    let sample = took.min(old.saturating_mul(2).saturating_add(SAMPLE_SLACK_NS));
    old - (old >> AVERAGE_SHIFT) + (sample >> AVERAGE_SHIFT)
}

/// Runs a parsed request and writes its status; returns the used length.
/// A panicking device earns the request an IOERR instead of a lost
/// completion.
fn execute(request: &Request, target: &ServedDisk, mem: &GuestMemoryMmap) -> u32 {
    trace!(
        request_type = ?request.request_type(),
        sector = request.sector(),
        len = request.data_len(),
        "request"
    );
    let ctx = target.context();
    let result = panic::catch_unwind(AssertUnwindSafe(|| request.execute(&ctx, mem)));
    match result {
        Ok(Ok(written)) => request.complete(mem, STATUS_OK, written),
        Ok(Err(e)) => {
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
        Err(_) => {
            error!(
                request_type = ?request.request_type(),
                sector = request.sector(),
                "device panicked while executing a request"
            );
            request.complete(mem, STATUS_IOERR, 0)
        }
    }
}

/// Signals the guest if completions since the last signal call for it
/// (EVENT_IDX) or always (without it).
pub fn notify(vring: &Vring, queue: usize) {
    let result = signal_if_needed(&mut vring.get_mut());
    if let Err(e) = result {
        error!(queue, error = %error_chain(&e), "signalling the guest failed");
    }
}

/// Signals the guest if it asked to be (EVENT_IDX) or always (without it);
/// the caller holds the vring lock.
fn signal_if_needed(state: &mut VringState<GuestMem>) -> Result<()> {
    if state.needs_notification().map_err(Error::Notification)? {
        state.signal_used_queue().map_err(Error::Signal)?;
    }
    Ok(())
}

/// Puts `head` on the used ring with `len` used bytes, keeping the shared
/// in-flight region in step (see [`crate::inflight`]): the caller holds
/// the vring lock, so puts of one queue never interleave.
fn put_used(
    state: &mut VringState<GuestMem>,
    shared: Option<&InflightQueue>,
    head: u16,
    len: u32,
) -> Result<()> {
    if let Some(shared) = shared {
        shared.pre_put(head);
    }
    state
        .add_used(head, len)
        .map_err(|source| Error::AddUsed { head, source })?;
    if let Some(shared) = shared {
        shared.post_put(head, state.get_queue().next_used());
    }
    Ok(())
}

/// Puts `head` on the used ring with `len` used bytes and signals the
/// guest if it asked to be (EVENT_IDX) or always (without it), all under
/// one vring lock. Failures are logged: the request is gone either way.
pub fn complete(vring: &Vring, queue: usize, shared: Option<&InflightQueue>, head: u16, len: u32) {
    let result = {
        let mut state = vring.get_mut();
        put_used(&mut state, shared, head, len).and_then(|()| signal_if_needed(&mut state))
    };
    if let Err(e) = result {
        error!(queue, error = %error_chain(&e), "completing a request failed");
    }
}
