//! Walking a descriptor chain from its head index.
//!
//! Chains taken from the available ring come from virtio-queue's iterator.
//! A request resubmitted after a daemon restart (see [`crate::inflight`])
//! is known only by its head index, and virtio-queue cannot build a chain
//! from one, so [`descriptors_at`] walks the descriptor table itself, with
//! the same rules (virtio 1.2, 2.7.5 and 2.7.5.3):
//! - the walk ends after `queue_size` descriptors (a loop or an overlong
//!   chain then ends on a descriptor that still has NEXT set, which
//!   [`Request`](super::Request) parsing rejects);
//! - an indirect descriptor's table is a multiple of 16 bytes, at most
//!   65535 entries, and contains no indirect descriptor;
//! - the chain carries less than 2^32 bytes in all;
//! - a descriptor that cannot be read ends the walk.

use std::mem::size_of;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Size of a split-ring descriptor.
const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

/// The descriptors of the chain that starts at `head` in the descriptor
/// table at `desc_table` of a queue of `queue_size` entries, as the
/// available-ring iterator would yield them (indirect tables expanded).
/// An invalid chain yields the descriptors read before the fault.
pub fn descriptors_at<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut size = queue_size;
    let mut ttl = queue_size;
    let mut index = head;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && index < size {
        let Some(addr) = table.0.checked_add(u64::from(index) * DESC_SIZE) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(GuestAddress(addr)) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            let len = desc.len();
            if indirect || len % DESC_SIZE as u32 != 0 {
                break;
            }
            let Ok(entries) = u16::try_from(len / DESC_SIZE as u32) else {
                break;
            };
            table = desc.addr();
            size = entries;
            ttl = entries;
            index = 0;
            indirect = true;
            continue;
        }
        let Some(total) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = total;
        out.push(desc);
        if !desc.has_next() {
            break;
        }
        index = desc.next();
        ttl -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    const QSIZE: u16 = 16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Writes `descs` into the mock queue's table at 0.. and makes `head`
    /// available; returns what virtio-queue's own iterator yields and what
    /// `descriptors_at` yields.
    /// Descriptors as comparable tuples (`Descriptor` has no `PartialEq`).
    type Key = Vec<(u64, u32, u16, u16)>;

    fn key(descs: &[Descriptor]) -> Key {
        descs
            .iter()
            .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
            .collect()
    }

    fn both(mem: &GuestMemoryMmap, descs: &[Descriptor], head: u16) -> (Key, Key) {
        let vq = MockSplitQueue::new(mem, QSIZE);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(*d))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
        vq.avail().idx().store(u16::to_le(1));
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let theirs: Vec<Descriptor> = q.iter(mem).unwrap().next().unwrap().collect();
        let ours = descriptors_at(mem, GuestAddress(q.desc_table()), q.size(), head);
        (key(&theirs), key(&ours))
    }

    fn d(addr: u64, len: u32, flags: u32, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags as u16, next)
    }

    #[test]
    fn follows_next_links_from_any_head() {
        let mem = memory();
        let descs = [
            d(0x8000, 16, 0, 0),
            d(0x9000, 512, VRING_DESC_F_NEXT, 3),
            d(0xa000, 16, VRING_DESC_F_NEXT, 1),
            d(0xb000, 1, VRING_DESC_F_WRITE, 0),
        ];
        let (theirs, ours) = both(&mem, &descs, 2);
        assert_eq!(ours.len(), 3);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn loops_end_on_a_descriptor_that_still_has_next() {
        let mem = memory();
        let descs = [
            d(0x8000, 16, VRING_DESC_F_NEXT, 1),
            d(0x9000, 16, VRING_DESC_F_NEXT, 0),
        ];
        let (theirs, ours) = both(&mem, &descs, 0);
        assert_eq!(ours.len(), usize::from(QSIZE));
        assert_ne!(ours.last().unwrap().2 & VRING_DESC_F_NEXT as u16, 0);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn expands_an_indirect_table_once() {
        let mem = memory();
        let table = GuestAddress(0x4_0000);
        let entries = [
            d(0x8000, 16, VRING_DESC_F_NEXT, 1),
            d(0xb000, 1, VRING_DESC_F_WRITE, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(table.0 + i as u64 * 16))
                .unwrap();
        }
        let descs = [d(table.0, 32, VRING_DESC_F_INDIRECT, 0)];
        let (theirs, ours) = both(&mem, &descs, 0);
        assert_eq!(ours, key(&entries));
        assert_eq!(ours, theirs);

        // An indirect descriptor inside an indirect table ends the walk.
        mem.write_obj(d(table.0, 32, VRING_DESC_F_INDIRECT, 0), table)
            .unwrap();
        let (theirs, ours) = both(&mem, &descs, 0);
        assert!(ours.is_empty());
        assert_eq!(ours, theirs);
    }

    #[test]
    fn heads_past_the_queue_yield_nothing() {
        let mem = memory();
        assert!(descriptors_at(&mem, GuestAddress(0), QSIZE, QSIZE).is_empty());
        assert!(descriptors_at(&mem, GuestAddress(u64::MAX - 8), QSIZE, 1).is_empty());
    }

    proptest! {
        /// Whatever the table holds, the walk agrees with virtio-queue's.
        #[test]
        fn agrees_with_virtio_queue(
            raw in proptest::collection::vec(
                (0u64..0x2_0000, 0u32..0x2000, 0u32..8, 0u16..20), 1..=usize::from(QSIZE)),
            head in 0u16..QSIZE,
        ) {
            let mem = memory();
            let descs: Vec<Descriptor> = raw
                .iter()
                .map(|&(addr, len, flags, next)| d(addr, len, flags, next))
                .collect();
            let (theirs, ours) = both(&mem, &descs, head);
            prop_assert_eq!(ours, theirs);
        }
    }
}
