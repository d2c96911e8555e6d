//! Worker tests on a real `VringRwLock` over `MockSplitQueue` rings:
//! used ring contents, EVENT_IDX, out-of-order completion on the pool,
//! FLUSH against writes in flight, and stopping a queue that holds requests.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::device::{DeviceConfig, VhostUserBlk};
use crate::request::STATUS_UNSUPP;
use crate::wire::RequestHeader;
use block::mem_device::MemDevice;

const QUEUE_SIZE: u16 = 16;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Where the device's used ring lives. Not the mock's: `MockSplitQueue`
/// places its used ring too early for large queues (it overlaps the
/// available ring from entry 128 on), so the tests read this one instead.
const USED_RING: u64 = 0x8_0000;

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

fn guest_memory() -> GuestMem {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
}

/// A ready vring over `queue`'s descriptor table and available ring, with
/// its used ring at [`USED_RING`].
fn vring_for(
    atomic: &GuestMem,
    queue: &MockSplitQueue<'_, GuestMemoryMmap>,
    size: u16,
    event_idx: bool,
) -> Vring {
    let vring = Vring::new(atomic.clone(), size).unwrap();
    vring.set_queue_size(size);
    vring
        .set_queue_info(queue.desc_table_addr().0, queue.avail_addr().0, USED_RING)
        .unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

fn limits() -> Limits {
    Limits {
        capacity: 2048,
        seg_max: 8,
        max_request_bytes: 1 << 20,
        max_discard_sectors: 8,
        max_discard_seg: 1,
        max_write_zeroes_sectors: 8,
        max_write_zeroes_seg: 1,
    }
}

fn target(dev: Arc<dyn BlockDevice>) -> Arc<ServedDisk> {
    Arc::new(ServedDisk {
        dev,
        read_only: false,
        id: [0; ID_BYTES],
        limits: limits(),
    })
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.load(
        GuestAddress(USED_RING + 2),
        std::sync::atomic::Ordering::Acquire,
    )
    .unwrap()
}

/// The used ring's (id, len) entries so far (no wrap-around in these tests).
fn used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    (0..u64::from(used_idx(mem)))
        .map(|i| {
            let at = USED_RING + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect()
}

/// Waits until the used ring holds `n` entries.
fn wait_used(mem: &GuestMemoryMmap, n: u16) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + TIMEOUT;
    while used_idx(mem) < n {
        assert!(Instant::now() < deadline, "only {:?} completed", used(mem));
        thread::sleep(Duration::from_millis(1));
    }
    used(mem)
}

fn run_queue(event_idx: bool, pool: Option<&Pool>) {
    let atomic = guest_memory();
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

    let vring = vring_for(&atomic, &queue, QUEUE_SIZE, event_idx);
    let target = target(dev.clone());
    let mut worker = Worker::new(0);
    worker
        .process(&vring, &atomic, &target, pool, event_idx)
        .unwrap();

    // All four chains are returned with their used lengths; without a
    // pool, in order.
    let mut got = wait_used(mem, 4);
    worker.in_flight().wait_idle();
    if pool.is_some() {
        got.sort_unstable();
    }
    assert_eq!(got, [(0, 513), (3, 1), (6, 1), (8, 0)]);

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
    let avail_event_addr = USED_RING + 4 + 8 * u64::from(QUEUE_SIZE);
    let avail_event = mem.read_obj::<u16>(GuestAddress(avail_event_addr)).unwrap();
    if event_idx {
        assert_eq!(avail_event, 4);
    }

    // A second kick with nothing new is a no-op.
    worker
        .process(&vring, &atomic, &target, pool, event_idx)
        .unwrap();
    assert_eq!(used_idx(mem), 4);
    assert!(worker.in_flight().is_empty());
}

#[test]
fn worker_drains_the_queue_with_event_idx() {
    run_queue(true, None);
}

#[test]
fn worker_drains_the_queue_without_event_idx() {
    run_queue(false, None);
}

#[test]
fn pooled_worker_drains_the_queue_with_and_without_event_idx() {
    let pool = Pool::new("test-io", 3).unwrap();
    run_queue(true, Some(&pool));
    run_queue(false, Some(&pool));
}

#[test]
fn error_chain_lists_every_source() {
    let e = Error::Signal(io::Error::other("boom"));
    assert_eq!(error_chain(&e), "Signal the used queue: boom");
}

/// A device whose I/O at one byte offset blocks until the gate opens, and
/// which records which writes had returned when each flush ran.
struct Gated {
    inner: MemDevice,
    gated: u64,
    gate: Mutex<Gate>,
    changed: Condvar,
    /// Offsets of writes that have returned, in order.
    written: Mutex<Vec<u64>>,
    /// For each flush: the writes that had returned when it was called.
    flushes: Mutex<Vec<Vec<u64>>>,
}

/// The gate of a [`Gated`] device.
#[derive(Default)]
struct Gate {
    open: bool,
    /// Requests blocked at the gate right now.
    waiting: usize,
}

impl Gated {
    fn new(size: usize, gated: u64) -> Self {
        Gated {
            inner: MemDevice::new(size),
            gated,
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            written: Mutex::new(Vec::new()),
            flushes: Mutex::new(Vec::new()),
        }
    }

    fn pass(&self, offset: u64) {
        if offset == self.gated {
            let mut gate = self.gate.lock().unwrap();
            gate.waiting += 1;
            self.changed.notify_all();
            while !gate.open {
                gate = self.changed.wait(gate).unwrap();
            }
            gate.waiting -= 1;
        }
    }

    /// Waits until `n` requests are blocked at the closed gate: from then
    /// on they cannot complete before [`Gated::open_gate`].
    fn wait_blocked(&self, n: usize) {
        let gate = self.gate.lock().unwrap();
        let (gate, timeout) = self
            .changed
            .wait_timeout_while(gate, TIMEOUT, |g| g.waiting < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "{} of {n} requests reached the gate",
            gate.waiting
        );
    }

    fn open_gate(&self) {
        self.gate.lock().unwrap().open = true;
        self.changed.notify_all();
    }
}

/// Opens the gate when dropped, so a failing test unwinds (joining its
/// pool threads) instead of hanging on a request stuck at the gate.
struct OpenOnDrop(Arc<Gated>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open_gate();
    }
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pass(offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pass(offset);
        self.inner.write_at(buf, offset)?;
        self.written.lock().unwrap().push(offset);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let done = self.written.lock().unwrap().clone();
        self.flushes.lock().unwrap().push(done);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// A 512-byte IN or OUT request at table index `first` (3 descriptors),
/// with its header, data and status in slot `slot`'s own guest pages.
fn io_chain(
    mem: &GuestMemoryMmap,
    first: u16,
    slot: u64,
    request_type: u32,
    sector: u64,
) -> Vec<RawDescriptor> {
    let base = 0x10_0000 + slot * 0x1000;
    header(mem, base, request_type, sector);
    let data = (base + 0x100, 512, request_type == VIRTIO_BLK_T_IN);
    chain(first, &[(base, 16, false), data, (base + 0x800, 1, true)])
}

fn status_of(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(0x10_0000 + slot * 0x1000 + 0x800))
        .unwrap()
}

#[test]
fn a_slow_request_does_not_hold_up_the_next_one() {
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    let dev = Arc::new(Gated::new(1 << 20, 0));
    dev.inner.write_at(&[7; 4096], 0).unwrap();
    // Head 0 reads the gated sector 0; head 3 reads sector 8.
    queue
        .add_desc_chains(&io_chain(mem, 0, 0, VIRTIO_BLK_T_IN, 0), 0)
        .unwrap();
    queue
        .add_desc_chains(&io_chain(mem, 3, 1, VIRTIO_BLK_T_IN, 8), 3)
        .unwrap();
    let vring = vring_for(&atomic, &queue, QUEUE_SIZE, true);
    let pool = Pool::new("test-io", 2).unwrap();
    let _open = OpenOnDrop(dev.clone());
    let mut worker = Worker::new(0);
    worker
        .process(&vring, &atomic, &target(dev.clone()), Some(&pool), true)
        .unwrap();

    // The second request completes while the first is stuck at the
    // closed gate (so it cannot have completed: no waiting needed).
    assert_eq!(wait_used(mem, 1), [(3, 513)]);
    assert_eq!(status_of(mem, 1), STATUS_OK);
    dev.wait_blocked(1);
    assert_eq!(worker.in_flight().heads(), [0]);
    assert_eq!(used_idx(mem), 1);

    dev.open_gate();
    assert_eq!(wait_used(mem, 2), [(3, 513), (0, 513)]);
    assert_eq!(status_of(mem, 0), STATUS_OK);
    let mut read = [0u8; 512];
    mem.read_slice(&mut read, GuestAddress(0x10_0100)).unwrap();
    assert_eq!(read, [7; 512]);
    worker.in_flight().wait_idle();
}

#[test]
fn flush_covers_every_write_completed_before_it_without_waiting_for_others() {
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    // Writes to sector 8 block until the gate opens.
    let dev = Arc::new(Gated::new(1 << 20, 8 * 512));
    let vring = vring_for(&atomic, &queue, QUEUE_SIZE, true);
    let pool = Pool::new("test-io", 2).unwrap();
    let _open = OpenOnDrop(dev.clone());
    let target = target(dev.clone());
    let mut worker = Worker::new(0);

    // W1 completes first.
    queue
        .add_desc_chains(&io_chain(mem, 0, 0, VIRTIO_BLK_T_OUT, 0), 0)
        .unwrap();
    worker
        .process(&vring, &atomic, &target, Some(&pool), true)
        .unwrap();
    assert_eq!(wait_used(mem, 1), [(0, 1)]);

    // Then W2 (stuck) and a FLUSH, popped together.
    queue
        .add_desc_chains(&io_chain(mem, 3, 1, VIRTIO_BLK_T_OUT, 8), 3)
        .unwrap();
    let flush_base = 0x10_0000 + 2 * 0x1000;
    header(mem, flush_base, VIRTIO_BLK_T_FLUSH, 0);
    queue
        .add_desc_chains(
            &chain(6, &[(flush_base, 16, false), (flush_base + 0x800, 1, true)]),
            6,
        )
        .unwrap();
    worker
        .process(&vring, &atomic, &target, Some(&pool), true)
        .unwrap();

    // The FLUSH completes without waiting for W2, and it ran after W1
    // had returned: W1 is durable.
    assert_eq!(wait_used(mem, 2), [(0, 1), (6, 1)]);
    assert_eq!(status_of(mem, 2), STATUS_OK);
    assert_eq!(*dev.flushes.lock().unwrap(), [vec![0]]);
    assert_eq!(worker.in_flight().heads(), [3]);

    dev.open_gate();
    assert_eq!(wait_used(mem, 3), [(0, 1), (6, 1), (3, 1)]);
    assert_eq!(*dev.written.lock().unwrap(), [0, 8 * 512]);
}

#[test]
fn many_requests_complete_exactly_once_with_the_right_data() {
    const SIZE: u16 = 256;
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, SIZE);
    let image: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 251) as u8).collect();
    let dev = Arc::new(MemDevice::from_vec(image.clone()));
    let vring = vring_for(&atomic, &queue, SIZE, true);
    let pool = Pool::new("test-io", 4).unwrap();
    let target = target(dev.clone());
    let mut worker = Worker::new(0);

    // Rounds of 80 three-descriptor chains: even slots read sector 2*slot,
    // odd slots write their slot number to sector 1000 + slot.
    let mut total = 0u16;
    for round in 0..3u8 {
        for slot in 0..80u16 {
            let (kind, sector) = if slot % 2 == 0 {
                (VIRTIO_BLK_T_IN, u64::from(slot) * 2)
            } else {
                (VIRTIO_BLK_T_OUT, 1000 + u64::from(slot))
            };
            let descs = io_chain(mem, slot * 3, u64::from(slot), kind, sector);
            if kind == VIRTIO_BLK_T_OUT {
                let data = 0x10_0000 + u64::from(slot) * 0x1000 + 0x100;
                mem.write_slice(&[slot as u8 ^ round; 512], GuestAddress(data))
                    .unwrap();
            }
            queue.add_desc_chains(&descs, slot * 3).unwrap();
            // A kick every few requests, like a driver batching submissions.
            if slot % 7 == 6 {
                worker
                    .process(&vring, &atomic, &target, Some(&pool), true)
                    .unwrap();
            }
        }
        worker
            .process(&vring, &atomic, &target, Some(&pool), true)
            .unwrap();
        total += 80;
        let entries = wait_used(mem, total);
        worker.in_flight().wait_idle();
        let mut heads: Vec<u32> = entries[usize::from(total - 80)..]
            .iter()
            .map(|&(id, _)| id)
            .collect();
        heads.sort_unstable();
        assert_eq!(
            heads,
            (0..80).map(|s| s * 3).collect::<Vec<u32>>(),
            "round {round}"
        );
        for slot in 0..80u64 {
            assert_eq!(status_of(mem, slot), STATUS_OK);
            let data = 0x10_0000 + slot * 0x1000 + 0x100;
            if slot % 2 == 0 {
                let mut got = [0u8; 512];
                mem.read_slice(&mut got, GuestAddress(data)).unwrap();
                let at = slot as usize * 1024;
                assert_eq!(got, image[at..at + 512], "slot {slot}");
            } else {
                let at = (1000 + slot as usize) * 512;
                assert_eq!(dev.snapshot()[at..at + 512], [slot as u8 ^ round; 512]);
            }
        }
    }
}

#[test]
fn stopping_a_queue_waits_for_its_requests_in_flight() {
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    let dev = Arc::new(Gated::new(1 << 20, 0));
    let backend = Arc::new(
        VhostUserBlk::new(
            dev.clone(),
            &DeviceConfig {
                num_queues: 1,
                io_threads: 2,
                ..DeviceConfig::default()
            },
        )
        .unwrap(),
    );
    backend.update_memory(atomic.clone()).unwrap();
    backend.set_event_idx(true);
    let _open = OpenOnDrop(dev.clone());
    queue
        .add_desc_chains(&io_chain(mem, 0, 0, VIRTIO_BLK_T_IN, 0), 0)
        .unwrap();
    queue
        .add_desc_chains(&io_chain(mem, 3, 1, VIRTIO_BLK_T_IN, 8), 3)
        .unwrap();
    let vrings = [vring_for(&atomic, &queue, QUEUE_SIZE, true)];
    backend.process_queue(0, &vrings[0]);
    assert_eq!(wait_used(mem, 1), [(3, 513)]);
    dev.wait_blocked(1);
    assert_eq!(backend.in_flight(0), 1);

    // GET_VRING_BASE: the ring is no longer ready and the backend stops it.
    vrings[0].set_queue_ready(false);
    let stopper = {
        let backend = backend.clone();
        let vring = vrings[0].clone();
        thread::spawn(move || backend.stop_vring(0, &vring))
    };
    // It parks waiting for the held request, which cannot complete before
    // the gate opens: from then on "not returned" is a fact, not a guess.
    let deadline = Instant::now() + TIMEOUT;
    while backend.quiesce_waiters(0) == 0 {
        assert!(
            !stopper.is_finished(),
            "stop_vring returned with a request in flight"
        );
        assert!(Instant::now() < deadline, "stop_vring never waited");
        thread::yield_now();
    }
    // A late kick on the stopped queue takes nothing.
    queue
        .add_desc_chains(&io_chain(mem, 6, 2, VIRTIO_BLK_T_IN, 16), 6)
        .unwrap();
    backend.process_queue(0, &vrings[0]);
    assert_eq!(backend.in_flight(0), 1);

    dev.open_gate();
    stopper.join().unwrap().unwrap();
    // Everything taken is on the used ring by the time stop returns.
    assert_eq!(used(mem), [(3, 513), (0, 513)]);
    assert_eq!(backend.in_flight(0), 0);
    assert_eq!(vrings[0].queue_next_avail(), 2);
}

/// A device that records which thread ran each read, with an adjustable delay.
struct Traced {
    inner: MemDevice,
    delay_us: std::sync::atomic::AtomicU64,
    readers: Mutex<Vec<thread::ThreadId>>,
}

impl BlockDevice for Traced {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.readers.lock().unwrap().push(thread::current().id());
        let delay = self.delay_us.load(std::sync::atomic::Ordering::SeqCst);
        thread::sleep(Duration::from_micros(delay));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn cheap_requests_run_on_the_worker_until_they_turn_slow() {
    const SIZE: u16 = 256;
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, SIZE);
    let dev = Arc::new(Traced {
        inner: MemDevice::new(1 << 20),
        delay_us: 0.into(),
        readers: Mutex::new(Vec::new()),
    });
    let vring = vring_for(&atomic, &queue, SIZE, true);
    let pool = Pool::new("test-io", 2).unwrap();
    let target = target(dev.clone());
    let mut worker = Worker::new(0);
    let me = thread::current().id();
    let mut total = 0u16;
    // Runs one batch of four 512-byte reads; returns the threads that ran them.
    let mut batch = |worker: &mut Worker| {
        dev.readers.lock().unwrap().clear();
        for slot in 0..4u16 {
            let descs = io_chain(mem, slot * 3, u64::from(slot), VIRTIO_BLK_T_IN, 0);
            queue.add_desc_chains(&descs, slot * 3).unwrap();
        }
        worker
            .process(&vring, &atomic, &target, Some(&pool), true)
            .unwrap();
        total += 4;
        wait_used(mem, total);
        worker.in_flight().wait_idle();
        dev.readers.lock().unwrap().clone()
    };

    // Fast reads: once the worker has seen a few, it runs them itself.
    let mut learnt = false;
    for _ in 0..10 {
        if batch(&mut worker).iter().all(|t| *t == me) {
            learnt = true;
            break;
        }
    }
    assert!(learnt, "fast reads kept going to the pool");
    assert!(batch(&mut worker).iter().all(|t| *t == me));

    // Slow reads: within a few batches they go back to the pool, and stay.
    dev.delay_us
        .store(2000, std::sync::atomic::Ordering::SeqCst);
    let mut moved = false;
    for _ in 0..8 {
        if batch(&mut worker).iter().all(|t| *t != me) {
            moved = true;
            break;
        }
    }
    assert!(moved, "slow reads stayed on the worker");
    let after = batch(&mut worker);
    assert!(after.iter().all(|t| *t != me), "{after:?}");
}

#[test]
fn the_run_time_average_shrugs_off_outliers_but_follows_a_shift() {
    let fast = 3_000;
    // One preempted request (5 ms) barely moves a 3 µs average.
    assert!(fold(fast, 5_000_000) < 4_000);
    // Steady 100 µs requests cross the inline limit within a dozen.
    let mut avg = fast;
    let steps = (1..=20)
        .find(|_| {
            avg = fold(avg, 100_000);
            avg >= INLINE_READS_BELOW.as_nanos() as u64
        })
        .unwrap();
    assert!(steps <= 12, "{steps}");
    // And fast requests bring it back down.
    let steps = (1..=40)
        .find(|_| {
            avg = fold(avg, 2_000);
            avg < INLINE_READS_BELOW.as_nanos() as u64
        })
        .unwrap();
    assert!(steps <= 20, "{steps}");
    // Extreme values do not overflow.
    assert_eq!(fold(u64::MAX, u64::MAX), u64::MAX);
}

/// The call eventfd's counter: signals since the last read (0 if none).
fn signals(call: &vmm_sys_util::eventfd::EventFd) -> u64 {
    call.read().unwrap_or(0)
}

#[test]
fn with_event_idx_a_waiting_driver_hears_of_a_completion_before_the_batch_ends() {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMemoryMmap = &guard;
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    // Head 0 reads sector 0; head 3 reads the gated sector 8. Without a
    // pool both run on the worker, in ring order, in one batch.
    let dev = Arc::new(Gated::new(1 << 20, 8 * 512));
    queue
        .add_desc_chains(&io_chain(mem, 0, 0, VIRTIO_BLK_T_IN, 0), 0)
        .unwrap();
    queue
        .add_desc_chains(&io_chain(mem, 3, 1, VIRTIO_BLK_T_IN, 8), 3)
        .unwrap();
    let vring = vring_for(&atomic, &queue, QUEUE_SIZE, true);
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: `into_raw_fd` hands over sole ownership of an open fd (a
    // duplicate of `call`'s).
    let file = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
    vring.set_call(Some(file));
    // used_event = 0: the driver waits for the first completion.
    let used_event = queue.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
    mem.write_obj(0u16, GuestAddress(used_event)).unwrap();
    let target = target(dev.clone());

    thread::scope(|s| {
        // Inside the scope: a failed assertion opens the gate before the
        // scope joins the worker.
        let _open = OpenOnDrop(dev.clone());
        let worker = s.spawn(|| {
            let mut worker = Worker::new(0);
            worker
                .process(&vring, &atomic, &target, None, true)
                .unwrap();
        });
        // The first request is done and the worker is stuck in the second,
        // so the batch has not ended: the signal came with the completion.
        assert_eq!(wait_used(mem, 1), [(0, 513)]);
        dev.wait_blocked(1);
        assert_eq!(signals(&call), 1, "no signal before the batch ended");
        // The driver reaped it and now waits for the next one.
        mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
        dev.open_gate();
        worker.join().unwrap();
    });
    assert_eq!(used(mem), [(0, 513), (3, 513)]);
    assert_eq!(signals(&call), 1, "the second completion went unsignalled");
}
