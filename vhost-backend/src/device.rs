//! The virtio-blk device of one frontend connection: features, config
//! space, queues.
//!
//! [`VhostUserBlk`] is what the vhost-user request handler
//! ([`crate::handler`]) drives for one frontend connection: it announces
//! the virtio-blk features and config space and hands each queue's kicks
//! to that queue's [`Worker`] (on the queue's `vq{N}` thread), which runs
//! requests itself or on the backend's I/O [`Pool`]. A fresh backend (and
//! with it a fresh pool) is built for every connection (see
//! [`crate::socket`]), so nothing negotiated with one frontend leaks into
//! the next.
//!
//! [`VhostUserBlk::stop_vring`] (GET_VRING_BASE),
//! [`VhostUserBlk::reset_device`] and [`VhostUserBlk::quiesce`] return only
//! once the queues they cover hold no request (see [`crate::worker`]);
//! dropping the backend finishes every queued job before joining the pool.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tracing::{debug, error, warn};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestMemoryAtomic, GuestMemoryMmap};

use crate::inflight::InflightQueue;
use crate::request::Limits;
use crate::wire::{BlkConfig, ID_BYTES, SECTOR_SHIFT};
use crate::worker::{GuestMem, HeldHeads, Pool, ServedDisk, Vring, Worker};
use block::device::BlockDevice;
use block::error_chain;

/// Most queues a device can have (one `vq{N}` thread each).
pub const MAX_QUEUES: usize = 16;

/// Most I/O pool threads a device may have.
pub const MAX_IO_THREADS: usize = 64;

/// Size of the vhost-user config space window (vhost-user spec, GET_CONFIG).
const CONFIG_SPACE_MAX: usize = 256;

/// Logical blocks per physical block, as a power of two: 512-byte logical
/// sectors on 4 KiB physical blocks, the granularity of the overlay.
const PHYSICAL_BLOCK_EXP: u8 = 3;

/// How the device presents itself to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Number of request queues, 1..=16; each gets one thread, `vq{N}`, which
    /// both waits for its kicks and is its worker.
    pub num_queues: usize,
    /// Largest virtqueue size the frontend may choose (a power of two).
    pub queue_size: u16,
    /// Offer `VIRTIO_BLK_F_RO` and refuse writes. Also forced when the
    /// device itself is read-only.
    pub read_only: bool,
    /// GET_ID string: printable ASCII, truncated to 20 bytes.
    pub serial: String,
    /// `seg_max`: most data descriptors in one request.
    pub seg_max: u32,
    /// Most data bytes in one IN/OUT request (a multiple of 512); larger
    /// requests get `VIRTIO_BLK_S_IOERR`.
    pub max_request_bytes: u32,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`.
    pub max_discard_seg: u32,
    /// `discard_sector_alignment`, in sectors.
    pub discard_sector_alignment: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`.
    pub max_write_zeroes_seg: u32,
    /// Threads executing requests beside the queue workers, shared by all
    /// queues; this bounds how many requests run at once. 0 runs every
    /// request on its queue's worker thread, one after another.
    pub io_threads: usize,
}

impl DeviceConfig {
    /// The default queue count: one per CPU, at most [`MAX_QUEUES`].
    pub fn default_num_queues() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_QUEUES)
    }

    /// The default I/O pool size: four threads per CPU, within 8..=32.
    /// Requests known to be cheap run on their queue's thread instead
    /// (see [`crate::worker`] for the exact rule), so idle threads cost
    /// nothing; the ones that reach the pool (large reads, cold chunks,
    /// flushes) block as often as they compute, and more of them in
    /// flight keep the store's disk busy.
    pub fn default_io_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_mul(4)
            .clamp(8, 32)
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            num_queues: Self::default_num_queues(),
            queue_size: 1024,
            read_only: false,
            serial: String::new(),
            // QEMU's value for its default 128-entry queues.
            seg_max: 126,
            max_request_bytes: 32 << 20,
            // 2 GiB per segment, in 4 KiB-aligned units.
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            io_threads: Self::default_io_threads(),
        }
    }
}

/// Why a device configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `num_queues` out of range.
    #[error("Queue count {0} is not within 1..=16")]
    NumQueues(usize),
    /// `queue_size` not a power of two.
    #[error("Queue size {0} is not a power of two of at least 4")]
    QueueSize(u16),
    /// `serial` is not printable ASCII.
    #[error("Serial {0:?} is not printable ASCII")]
    Serial(String),
    /// `seg_max` is 0 or needs more descriptors than a queue holds.
    #[error("seg_max {seg_max} does not fit queues of {queue_size} descriptors")]
    SegMax {
        /// The configured `seg_max`.
        seg_max: u32,
        /// The configured queue size.
        queue_size: u16,
    },
    /// `max_request_bytes` is 0 or not a multiple of 512.
    #[error("Request limit {0} is not a positive multiple of 512")]
    MaxRequest(u32),
    /// A discard or write-zeroes limit is 0.
    #[error("Discard and write-zeroes limits must be positive")]
    ZeroLimit,
    /// `io_threads` out of range.
    #[error("I/O thread count {0} is not within 0..=64")]
    IoThreads(usize),
}

/// Result of configuration checks.
pub type Result<T> = std::result::Result<T, Error>;

/// A validated configuration plus everything derived from it.
#[derive(Clone, Debug)]
pub(crate) struct DeviceSpec {
    pub(crate) num_queues: usize,
    pub(crate) queue_size: u16,
    pub(crate) io_threads: usize,
    pub(crate) read_only: bool,
    pub(crate) id: [u8; ID_BYTES],
    pub(crate) limits: Limits,
    pub(crate) config: BlkConfig,
}

impl DeviceSpec {
    pub(crate) fn new(dev: &dyn BlockDevice, cfg: &DeviceConfig) -> Result<Self> {
        if !(1..=MAX_QUEUES).contains(&cfg.num_queues) {
            return Err(Error::NumQueues(cfg.num_queues));
        }
        if !cfg.queue_size.is_power_of_two() || cfg.queue_size < 4 {
            return Err(Error::QueueSize(cfg.queue_size));
        }
        if !cfg
            .serial
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(Error::Serial(cfg.serial.clone()));
        }
        // Header and status need two descriptors besides the data.
        if cfg.seg_max == 0 || cfg.seg_max > u32::from(cfg.queue_size) - 2 {
            return Err(Error::SegMax {
                seg_max: cfg.seg_max,
                queue_size: cfg.queue_size,
            });
        }
        if cfg.max_request_bytes == 0 || !cfg.max_request_bytes.is_multiple_of(512) {
            return Err(Error::MaxRequest(cfg.max_request_bytes));
        }
        if [
            cfg.max_discard_sectors,
            cfg.max_discard_seg,
            cfg.discard_sector_alignment,
            cfg.max_write_zeroes_sectors,
            cfg.max_write_zeroes_seg,
        ]
        .contains(&0)
        {
            return Err(Error::ZeroLimit);
        }
        if cfg.io_threads > MAX_IO_THREADS {
            return Err(Error::IoThreads(cfg.io_threads));
        }

        // virtio 1.2, 5.2.6: the id is NUL-padded, with no terminator at 20 bytes.
        let mut id = [0u8; ID_BYTES];
        let serial = cfg.serial.as_bytes();
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);

        let capacity = dev.size() >> SECTOR_SHIFT;
        let read_only = cfg.read_only || dev.read_only();
        let limits = Limits {
            capacity,
            seg_max: cfg.seg_max,
            max_request_bytes: cfg.max_request_bytes,
            max_discard_sectors: cfg.max_discard_sectors,
            max_discard_seg: cfg.max_discard_seg,
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg: cfg.max_write_zeroes_seg,
        };
        let config = BlkConfig {
            capacity: capacity.into(),
            seg_max: cfg.seg_max.into(),
            blk_size: 512.into(),
            physical_block_exp: PHYSICAL_BLOCK_EXP,
            min_io_size: (1u16 << PHYSICAL_BLOCK_EXP).into(),
            // u16 cast: MAX_QUEUES is 16.
            num_queues: (cfg.num_queues as u16).into(),
            max_discard_sectors: cfg.max_discard_sectors.into(),
            max_discard_seg: cfg.max_discard_seg.into(),
            discard_sector_alignment: cfg.discard_sector_alignment.into(),
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors.into(),
            max_write_zeroes_seg: cfg.max_write_zeroes_seg.into(),
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        Ok(DeviceSpec {
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            io_threads: cfg.io_threads,
            read_only,
            id,
            limits,
            config,
        })
    }

    /// The virtio feature bits the device offers.
    pub(crate) fn features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }
}

/// The virtio-blk device for one vhost-user connection.
pub struct VhostUserBlk {
    target: Arc<ServedDisk>,
    spec: DeviceSpec,
    event_idx: AtomicBool,
    mem: RwLock<GuestMem>,
    workers: Vec<Mutex<Worker>>,
    /// Each worker's in-flight set, readable without the worker's lock.
    in_flight: Vec<Arc<HeldHeads>>,
    pool: Option<Pool>,
}

impl VhostUserBlk {
    /// A backend serving `dev` as described by `cfg`.
    pub fn new(dev: Arc<dyn BlockDevice>, cfg: &DeviceConfig) -> Result<Self> {
        let spec = DeviceSpec::new(&*dev, cfg)?;
        Ok(Self::from_spec(dev, spec))
    }

    pub(crate) fn from_spec(dev: Arc<dyn BlockDevice>, spec: DeviceSpec) -> Self {
        let workers: Vec<Worker> = (0..spec.num_queues).map(Worker::new).collect();
        let in_flight = workers.iter().map(|w| w.in_flight().clone()).collect();
        let pool = match spec.io_threads {
            0 => None,
            n => Pool::new("blk-io", n)
                .inspect_err(|e| {
                    warn!(error = %e, "cannot start the I/O pool; requests run on the queue workers");
                })
                .ok(),
        };
        let target = Arc::new(ServedDisk {
            dev,
            read_only: spec.read_only,
            id: spec.id,
            limits: spec.limits.clone(),
        });
        VhostUserBlk {
            target,
            spec,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            workers: workers.into_iter().map(Mutex::new).collect(),
            in_flight,
            pool,
        }
    }

    /// Requests of queue `queue` the device holds (popped, not yet used).
    pub fn in_flight(&self, queue: usize) -> usize {
        self.in_flight.get(queue).map_or(0, |f| f.len())
    }

    /// Threads waiting for queue `queue` to hold no request (a stop parked
    /// in [`VhostUserBlk::quiesce_queue`]).
    #[cfg(test)]
    pub(crate) fn quiesce_waiters(&self, queue: usize) -> usize {
        self.in_flight[queue].waiting()
    }

    /// Waits until queue `queue` holds no request: its worker has finished
    /// dispatching and every request it took is on the used ring.
    pub fn quiesce_queue(&self, queue: usize) {
        let (Some(worker), Some(in_flight)) = (self.workers.get(queue), self.in_flight.get(queue))
        else {
            return;
        };
        // The worker holds its lock while it pops and dispatches: taking it
        // waits for the batch under way. It is released before waiting for
        // the jobs, which never need it, so a late kick cannot block here.
        drop(worker.lock().unwrap_or_else(PoisonError::into_inner));
        in_flight.wait_idle();
    }

    /// Waits until no queue holds a request.
    pub fn quiesce(&self) {
        for queue in 0..self.workers.len() {
            self.quiesce_queue(queue);
        }
    }

    /// The config space bytes (`struct virtio_blk_config`).
    pub fn config_space(&self) -> &[u8] {
        self.spec.config.as_slice()
    }
}

/// What the vhost-user handler asks of the device.
impl VhostUserBlk {
    /// Number of request queues.
    pub fn num_queues(&self) -> usize {
        self.spec.num_queues
    }

    /// Largest queue size the frontend may choose.
    pub fn max_queue_size(&self) -> usize {
        usize::from(self.spec.queue_size)
    }

    /// The virtio feature bits offered (with `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn features(&self) -> u64 {
        self.spec.features()
    }

    /// The frontend acked `features`.
    pub fn acked_features(&self, features: u64) {
        debug!(
            features = format_args!("{features:#x}"),
            "frontend acked features"
        );
    }

    /// The vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // blkio refuses a backend without REPLY_ACK, CONFIG and
        // CONFIGURE_MEM_SLOTS; MQ lets the frontend ask for the queue
        // count; INFLIGHT_SHMFD lets a restarted daemon resubmit what a
        // dead one held (see crate::inflight).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// A window of the config space (GET_CONFIG); empty means "error".
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Any window inside the vhost-user config space is answered; bytes
        // past `struct virtio_blk_config` (fields of features we do not
        // offer) read as zero. An empty reply tells the frontend "error".
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= CONFIG_SPACE_MAX => {}
            _ => return Vec::new(),
        }
        let config = self.config_space();
        let mut out = vec![0u8; size];
        if offset < config.len() {
            let n = (config.len() - offset).min(size);
            out[..n].copy_from_slice(&config[offset..offset + n]);
        }
        out
    }

    /// SET_CONFIG: always refused.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which we do not offer.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "config space is read-only ({} bytes at {offset})",
                buf.len()
            ),
        ))
    }

    /// RESET_DEVICE: the rings are disabled already; let what they handed
    /// us finish.
    pub fn reset_device(&self) {
        self.quiesce();
    }

    /// GET_VRING_BASE: the frontend is about to read the ring state of
    /// `queue_index`, which is no longer ready; returns once it holds
    /// nothing (requests left to resubmit are run first).
    pub fn stop_vring(&self, queue_index: u32, vring: &Vring) -> io::Result<()> {
        let queue = queue_index as usize;
        if let Some(worker) = self.workers.get(queue) {
            let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
            if worker.pending_resubmits() > 0 {
                let mem = self.memory();
                worker.resubmit_pending(vring, &mem, &self.target, self.pool.as_ref());
            }
        }
        self.quiesce_queue(queue);
        Ok(())
    }

    /// The guest memory table changed (the handler shares one
    /// [`GuestMem`] with the vrings; this keeps the workers' copy).
    pub fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn memory(&self) -> GuestMem {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queue `queue` starts (or restarts after a reconnection): `shared`
    /// is its part of the in-flight region, `resubmit` the heads a previous
    /// daemon held; they run on the next [`VhostUserBlk::process_queue`].
    pub fn start_queue(&self, queue: usize, shared: Option<InflightQueue>, resubmit: Vec<u16>) {
        if let Some(worker) = self.workers.get(queue) {
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .start(shared, resubmit);
        }
    }

    /// Handles a kick of queue `queue`: runs every available request (and
    /// first any left to resubmit). A stopped or disabled queue is left
    /// alone.
    pub fn process_queue(&self, queue: usize, vring: &Vring) {
        let Some(worker) = self.workers.get(queue) else {
            warn!(queue, "kick for a queue the device does not have");
            return;
        };
        let mem = self.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut worker = worker.lock().unwrap_or_else(PoisonError::into_inner);
        // A kick that raced with GET_VRING_BASE or a ring disable: the
        // queue is stopped and its requests must stay where they are.
        {
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return;
            }
        }
        // A broken queue must not end the queue's thread; report it and
        // wait for the next kick.
        let pool = self.pool.as_ref();
        if let Err(e) = worker.process(vring, &mem, &self.target, pool, event_idx) {
            error!(queue, error = %error_chain(&e), "queue processing failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::mem_device::MemDevice;

    fn backend(cfg: &DeviceConfig) -> VhostUserBlk {
        VhostUserBlk::new(Arc::new(MemDevice::new(1 << 20)), cfg).unwrap()
    }

    #[test]
    fn config_space_describes_the_device() {
        let cfg = DeviceConfig {
            num_queues: 3,
            ..DeviceConfig::default()
        };
        let b = backend(&cfg);
        let space = b.get_config(0, 60);
        assert_eq!(space.len(), 60);
        assert_eq!(space[0..8], 2048u64.to_le_bytes()); // 1 MiB / 512
        assert_eq!(space[12..16], 126u32.to_le_bytes());
        assert_eq!(space[20..24], 512u32.to_le_bytes());
        assert_eq!(space[34..36], 3u16.to_le_bytes());
        assert_eq!(space[56], 1);
    }

    #[test]
    fn get_config_honours_any_window_without_panicking() {
        let b = backend(&DeviceConfig::default());
        assert_eq!(b.get_config(8, 4).len(), 4);
        assert_eq!(b.get_config(0, 256).len(), 256);
        assert_eq!(b.get_config(60, 36), vec![0; 36]);
        assert!(b.get_config(0, 257).is_empty());
        assert!(b.get_config(255, 2).is_empty());
        assert!(b.get_config(u32::MAX, u32::MAX).is_empty());
        assert!(b.set_config(0, &[1]).is_err());
    }

    #[test]
    fn features_follow_read_only() {
        let rw = backend(&DeviceConfig::default());
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.features() & (1 << VIRTIO_F_VERSION_1), 0);
        let ro = backend(&DeviceConfig {
            read_only: true,
            ..DeviceConfig::default()
        });
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let dev = Arc::new(MemDevice::new(4096).into_read_only());
        let forced = VhostUserBlk::new(dev, &DeviceConfig::default()).unwrap();
        assert_ne!(forced.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn offers_inflight_tracking() {
        let b = backend(&DeviceConfig::default());
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert_eq!(b.num_queues(), DeviceConfig::default().num_queues);
    }

    #[test]
    fn bad_configs_are_refused() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4096));
        let bad = [
            DeviceConfig {
                num_queues: 0,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                num_queues: 17,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                queue_size: 100,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                serial: "bad\nserial".into(),
                ..DeviceConfig::default()
            },
            DeviceConfig {
                seg_max: 1023,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                max_request_bytes: 1000,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                max_discard_seg: 0,
                ..DeviceConfig::default()
            },
            DeviceConfig {
                io_threads: MAX_IO_THREADS + 1,
                ..DeviceConfig::default()
            },
        ];
        for cfg in bad {
            assert!(VhostUserBlk::new(dev.clone(), &cfg).is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn long_serials_are_truncated_to_twenty_bytes() {
        let dev = MemDevice::new(4096);
        let cfg = DeviceConfig {
            serial: "0123456789abcdefghijKLMN".into(),
            ..DeviceConfig::default()
        };
        let spec = DeviceSpec::new(&dev, &cfg).unwrap();
        assert_eq!(&spec.id, b"0123456789abcdefghij");
        let short = DeviceSpec::new(
            &dev,
            &DeviceConfig {
                serial: "snap-1".into(),
                ..DeviceConfig::default()
            },
        )
        .unwrap();
        assert_eq!(&short.id[..7], b"snap-1\0");
        assert!(short.id[6..].iter().all(|&b| b == 0));
    }
}
