//! The shared in-flight region of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`.
//!
//! The frontend (QEMU) asks the backend for a region once
//! (`GET_INFLIGHT_FD`), keeps the file descriptor, and hands it back on
//! every (re)connection (`SET_INFLIGHT_FD`). The backend records in it
//! which descriptor heads it has taken from each available ring and not yet
//! put on the used ring. The memory belongs to a memfd the frontend holds,
//! so it outlives a daemon killed with SIGKILL: the next daemon reads it and
//! resubmits exactly the requests the dead one held, and the guest never
//! sees a request lost.
//!
//! # Layout (split virtqueues; vhost-user spec, "Inflight I/O tracking")
//!
//! One region per queue, each `align_up(16 + 16 × queue_size, 64)` bytes,
//! queues back to back from `mmap_offset`. All fields little-endian.
//!
//! ```text
//! queue region                       descriptor state (16 bytes, per head)
//!   0  u64 features                    0  u8  inflight   1 while the device holds it
//!   8  u16 version (1)                 1  u8  padding[5]
//!  10  u16 desc_num                    6  u16 next       (unused: one-at-a-time puts)
//!  12  u16 last_batch_head             8  u64 counter    fetch order, for resubmission
//!  14  u16 used_idx
//!  16  descriptor state[desc_num]
//! ```
//!
//! # Protocol, per request (all under the queue's vring lock for the puts)
//!
//! 1. **Fetch**: after popping `head` and before running it:
//!    `counter = next++`, then `inflight = 1`.
//! 2. **Put**: `last_batch_head = head`; add the used element and publish
//!    the used index; then `inflight = 0`; then `used_idx = <used index>`.
//!
//! # Recovery (a new daemon, at queue start)
//!
//! Let `u` be the used index in the guest's used ring. If the region's
//! `used_idx != u`, the old daemon died between publishing the used index
//! and clearing `inflight` of `last_batch_head`: that request completed, so
//! clear its flag. Every head still marked is in flight: resubmit those in
//! `counter` order, and continue the available ring at `u + in-flight`
//! (every request taken is either used or marked, and marks are made in
//! ring order).
//!
//! Stores are atomic (`Release`) and in this order, so another process
//! reading after this one died sees a prefix of them.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// The layout version this module writes.
pub const VERSION: u16 = 1;

/// Queue regions start on this alignment.
const QUEUE_ALIGN: usize = 64;
/// Size of a queue region's header.
const HEADER_BYTES: usize = 16;
/// Size of one descriptor's state.
const DESC_BYTES: usize = 16;

// Header field offsets.
const FEATURES: usize = 0;
const VERSION_AT: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;

// Descriptor state field offsets.
const INFLIGHT: usize = 0;
const COUNTER: usize = 8;

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The frontend asked for no queues, or queues of size zero.
    #[error("In-flight region for {num_queues} queues of {queue_size} descriptors is empty")]
    Empty {
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// The frontend asked for more queues or larger queues than the device has.
    #[error(
        "In-flight region for {num_queues} queues of {queue_size} descriptors exceeds the device ({max_queues} queues of at most {max_queue_size})"
    )]
    TooLarge {
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
        /// Queues the device has.
        max_queues: usize,
        /// Largest queue size the device offers.
        max_queue_size: u16,
    },
    /// The region handed back is smaller than its queues need.
    #[error("In-flight region of {got} bytes is too small: {need} bytes needed")]
    TooSmall {
        /// Bytes handed over.
        got: u64,
        /// Bytes the queues need.
        need: u64,
    },
    /// Creating the memfd failed.
    #[error("Create in-flight memfd")]
    Create(#[source] io::Error),
    /// Mapping the region failed.
    #[error("Map in-flight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Result of region operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Bytes one queue of `queue_size` descriptors needs.
pub fn queue_region_bytes(queue_size: u16) -> usize {
    let raw = HEADER_BYTES + DESC_BYTES * usize::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes `num_queues` queues of `queue_size` descriptors need.
pub fn region_bytes(num_queues: u16, queue_size: u16) -> u64 {
    (usize::from(num_queues) * queue_region_bytes(queue_size)) as u64
}

/// A mapped in-flight region, shared by its queues.
#[derive(Debug)]
pub struct InflightRegion {
    map: Arc<MmapRegion>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Creates the zeroed memfd of a region for `num_queues` queues of
    /// `queue_size` descriptors, to send to the frontend
    /// (`GET_INFLIGHT_FD`); the frontend hands it back to be mapped
    /// (`SET_INFLIGHT_FD`, [`InflightRegion::map`]).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<File> {
        if num_queues == 0 || queue_size == 0 {
            return Err(Error::Empty {
                num_queues,
                queue_size,
            });
        }
        let size = region_bytes(num_queues, queue_size);
        let fd = rustix::fs::memfd_create(
            "vhost-blk-inflight",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| Error::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(Error::Create)?;
        Ok(file)
    }

    /// Maps a region the frontend handed back (`SET_INFLIGHT_FD`).
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self> {
        if num_queues == 0 || queue_size == 0 {
            return Err(Error::Empty {
                num_queues,
                queue_size,
            });
        }
        let need = region_bytes(num_queues, queue_size);
        if size < need {
            return Err(Error::TooSmall { got: size, need });
        }
        // Only what the queues use is mapped, whatever the frontend claims.
        let map = MmapRegion::from_file(FileOffset::new(file, offset), need as usize)
            .map_err(Error::Map)?;
        Ok(InflightRegion {
            map: Arc::new(map),
            num_queues,
            queue_size,
        })
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue the region covers.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s part of the region, or `None` past the last queue.
    pub fn queue(&self, index: usize) -> Option<InflightQueue> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        Some(InflightQueue {
            map: self.map.clone(),
            offset: index * queue_region_bytes(self.queue_size),
            desc_num: self.queue_size,
            counter: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// What a queue held when its previous daemon stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to run again, in the order they were first taken.
    pub resubmit: Vec<u16>,
    /// Where the available ring continues: the guest's used index plus the
    /// number of heads to resubmit.
    pub next_avail: u16,
}

/// One queue's part of an [`InflightRegion`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InflightQueue {
    map: Arc<MmapRegion>,
    offset: usize,
    desc_num: u16,
    counter: Arc<AtomicU64>,
}

impl InflightQueue {
    fn slice(&self) -> VolatileSlice<'_> {
        // In range by construction: `map` covers every queue region.
        self.map
            .get_slice(self.offset, queue_region_bytes(self.desc_num))
            .expect("queue region inside the mapping")
    }

    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) {
        // In range by construction (offsets below HEADER + DESC × desc_num).
        self.slice()
            .store(value, at, Ordering::Release)
            .expect("in-flight field inside its queue region");
    }

    fn load<T: vm_memory::AtomicAccess>(&self, at: usize) -> T {
        self.slice()
            .load(at, Ordering::Acquire)
            .expect("in-flight field inside its queue region")
    }

    fn desc(&self, head: u16, field: usize) -> Option<usize> {
        (head < self.desc_num).then(|| HEADER_BYTES + DESC_BYTES * usize::from(head) + field)
    }

    /// Number of descriptor states in the queue's region.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// Layout version found in the region (0: never initialised).
    pub fn version(&self) -> u16 {
        self.load(VERSION_AT)
    }

    /// Whether `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc(head, INFLIGHT)
            .is_some_and(|at| self.load::<u8>(at) == 1)
    }

    /// Records that the device took `head` from the available ring. A head
    /// outside the region (the queue grew past what the frontend sized the
    /// region for) is not tracked; returns whether it was.
    pub fn fetch(&self, head: u16) -> bool {
        let (Some(counter_at), Some(flag_at)) =
            (self.desc(head, COUNTER), self.desc(head, INFLIGHT))
        else {
            return false;
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.store(counter_at, n);
        self.store(flag_at, 1u8);
        true
    }

    /// Before putting `head` on the used ring (vring lock held).
    pub fn pre_put(&self, head: u16) {
        if head < self.desc_num {
            self.store(LAST_BATCH_HEAD, head);
        }
    }

    /// After putting `head` on the used ring and publishing `used_idx`
    /// (vring lock still held).
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if let Some(at) = self.desc(head, INFLIGHT) {
            self.store(at, 0u8);
        }
        self.store(USED_IDX, used_idx);
    }

    /// Prepares the queue for a new device: a fresh region is stamped with
    /// the layout and `features`; a used one is recovered against the
    /// guest's used index `used_idx` (see the module docs). Returns what to
    /// resubmit.
    pub fn start(&self, features: u64, used_idx: u16) -> Recovered {
        if self.version() != VERSION {
            // Zeroed by the frontend (fresh region, or reset device): no
            // request can be in flight.
            for head in 0..self.desc_num {
                if let Some(at) = self.desc(head, INFLIGHT) {
                    self.store(at, 0u8);
                }
            }
            self.store(FEATURES, features);
            self.store(DESC_NUM, self.desc_num);
            self.store(USED_IDX, used_idx);
            self.store(VERSION_AT, VERSION);
            self.counter.store(0, Ordering::Relaxed);
            return Recovered {
                resubmit: Vec::new(),
                next_avail: used_idx,
            };
        }
        if self.load::<u16>(USED_IDX) != used_idx {
            // Died after publishing the used index of `last_batch_head` but
            // before clearing its flag: it completed.
            let last: u16 = self.load(LAST_BATCH_HEAD);
            if let Some(at) = self.desc(last, INFLIGHT) {
                self.store(at, 0u8);
            }
            self.store(USED_IDX, used_idx);
        }
        let mut held: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&head| self.is_inflight(head))
            .filter_map(|head| Some((self.load(self.desc(head, COUNTER)?), head)))
            .collect();
        held.sort_unstable();
        let next_counter = held.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next_counter, Ordering::Relaxed);
        self.store(FEATURES, features);
        Recovered {
            next_avail: used_idx.wrapping_add(held.len() as u16),
            resubmit: held.into_iter().map(|(_, head)| head).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn region(queues: u16, size: u16) -> (InflightRegion, File) {
        let file = InflightRegion::create(queues, size).unwrap();
        (remap(&file, queues, size), file)
    }

    /// A second mapping of the same memfd, as the next daemon gets it.
    fn remap(file: &File, queues: u16, size: u16) -> InflightRegion {
        let f = file.try_clone().unwrap();
        InflightRegion::map(f, 0, region_bytes(queues, size), queues, size).unwrap()
    }

    #[test]
    fn sizes_are_aligned_and_cover_every_descriptor() {
        assert_eq!(queue_region_bytes(1), 64);
        assert_eq!(queue_region_bytes(128), 16 + 16 * 128 + 48);
        assert_eq!(queue_region_bytes(256) % QUEUE_ALIGN, 0);
        assert_eq!(region_bytes(4, 256), 4 * queue_region_bytes(256) as u64);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 128),
            Err(Error::Empty { .. })
        ));
        let (_, file) = region(1, 128);
        let err = InflightRegion::map(file, 0, 100, 1, 128).unwrap_err();
        assert!(matches!(err, Error::TooSmall { got: 100, .. }), "{err}");
    }

    #[test]
    fn a_fresh_region_is_stamped_and_holds_nothing() {
        let (r, file) = region(2, 8);
        let q = r.queue(1).unwrap();
        assert_eq!(q.version(), 0);
        let rec = q.start(0x1234, 7);
        assert_eq!(rec.resubmit, Vec::<u16>::new());
        assert_eq!(rec.next_avail, 7);
        assert_eq!(q.version(), VERSION);
        // Layout as documented: version at 8, desc_num at 10, in queue 1's region.
        let mut buf = [0u8; 4];
        let base = queue_region_bytes(8) as u64;
        file.read_exact_at(&mut buf, base + 8).unwrap();
        assert_eq!(buf, [1, 0, 8, 0]);
        assert!(r.queue(2).is_none());
    }

    #[test]
    fn a_dead_daemons_requests_come_back_in_fetch_order() {
        let (r, file) = region(1, 16);
        let q = r.queue(0).unwrap();
        q.start(0, 0);
        for head in [9, 3, 12, 5] {
            assert!(q.fetch(head));
        }
        // 3 completes (used index 1), then the daemon dies.
        q.pre_put(3);
        q.post_put(3, 1);
        drop(r);

        let next = remap(&file, 1, 16).queue(0).unwrap();
        let rec = next.start(0, 1);
        assert_eq!(rec.resubmit, [9, 12, 5]);
        assert_eq!(rec.next_avail, 4);
        // New fetches come after the resubmitted ones.
        assert!(next.fetch(1));
        let again = remap(&file, 1, 16).queue(0).unwrap().start(0, 1);
        assert_eq!(again.resubmit, [9, 12, 5, 1]);
    }

    #[test]
    fn death_between_used_index_and_clearing_the_flag_is_repaired() {
        let (r, file) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.start(0, 10);
        q.fetch(2);
        q.fetch(6);
        // 6 is put: pre_put, the used element and index 11 are published,
        // then the daemon dies before post_put.
        q.pre_put(6);
        drop(r);
        let rec = remap(&file, 1, 8).queue(0).unwrap().start(0, 11);
        assert_eq!(rec.resubmit, [2]);
        assert_eq!(rec.next_avail, 12);
    }

    #[test]
    fn death_before_the_used_index_keeps_the_request() {
        let (r, file) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.start(0, 0);
        q.fetch(4);
        q.pre_put(4);
        // The used element may be written, but the index was not published.
        drop(r);
        let rec = remap(&file, 1, 8).queue(0).unwrap().start(0, 0);
        assert_eq!(rec.resubmit, [4]);
        assert_eq!(rec.next_avail, 1);
    }

    #[test]
    fn heads_outside_the_region_are_ignored() {
        let (r, _file) = region(1, 4);
        let q = r.queue(0).unwrap();
        q.start(0, 0);
        assert!(!q.fetch(4));
        q.pre_put(4);
        q.post_put(4, 1);
        assert!(!q.is_inflight(4));
        assert_eq!(q.start(0, 1).resubmit, Vec::<u16>::new());
    }

    #[test]
    fn a_zeroed_region_forgets_everything() {
        let (r, file) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.start(0, 0);
        q.fetch(1);
        // The frontend resets the device: it zeroes the region.
        file.write_all_at(&vec![0; region_bytes(1, 8) as usize], 0)
            .unwrap();
        let rec = q.start(0, 0);
        assert!(rec.resubmit.is_empty());
        assert!(!q.is_inflight(1));
    }
}
