//! The handler driven message by message, as a frontend would, over guest
//! memory in a memfd shared with the test: a restarted daemon finds the
//! requests a dead one held in the in-flight region and completes them.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::DeviceConfig;
use crate::inflight::{InflightQueue, InflightRegion};
use crate::wire::RequestHeader;
use block::device::BlockDevice;
use block::mem_device::MemDevice;

const MEM_SIZE: usize = 1 << 20;
/// Where the frontend "maps" guest memory in its own address space.
const VMM_BASE: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const USED_RING: u64 = 0x8_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Guest {
    file: File,
    mem: GuestMemoryMmap,
}

fn guest() -> Guest {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(MEM_SIZE as u64).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    Guest { file, mem }
}

/// Puts a request at descriptor `first` (header, one 4 KiB data buffer,
/// status) with its buffers in slot `slot` of guest memory.
fn request(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    first: u16,
    slot: u64,
    kind: u32,
    sector: u64,
) {
    let base = 0x1_0000 + slot * 0x2000;
    let h = RequestHeader {
        request_type: kind.into(),
        reserved: 0.into(),
        sector: sector.into(),
    };
    mem.write_obj(h, GuestAddress(base)).unwrap();
    let data_flags = if kind == VIRTIO_BLK_T_IN {
        VRING_DESC_F_WRITE
    } else {
        0
    };
    let descs = [
        Descriptor::new(base, 16, VRING_DESC_F_NEXT as u16, first + 1),
        Descriptor::new(
            base + 0x1000,
            4096,
            (data_flags | VRING_DESC_F_NEXT) as u16,
            first + 2,
        ),
        Descriptor::new(base + 16, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        vq.desc_table()
            .store(first + i as u16, RawDescriptor::from(*d))
            .unwrap();
    }
}

fn make_available(vq: &MockSplitQueue<'_, GuestMemoryMmap>, heads: &[u16]) {
    let idx = vq.avail().idx().load();
    for (i, &head) in heads.iter().enumerate() {
        vq.avail()
            .ring()
            .ref_at(usize::from(idx) + i)
            .unwrap()
            .store(head);
    }
    vq.avail().idx().store(idx + heads.len() as u16);
}

/// The in-flight region in `file`, as a daemon maps it.
fn map_region(file: &File) -> InflightRegion {
    let size = inflight::region_bytes(1, QSIZE);
    InflightRegion::map(file.try_clone().unwrap(), 0, size, 1, QSIZE).unwrap()
}

/// What a (dead) daemon did to complete `head` as the first entry of an
/// empty used ring, with a 4 KiB read's used length: the full put protocol
/// of the in-flight region around the used element and index.
fn dead_daemon_puts(mem: &GuestMemoryMmap, dead: &InflightQueue, head: u16) {
    dead.pre_put(head);
    mem.write_obj(u32::from(head), GuestAddress(USED_RING + 4))
        .unwrap();
    mem.write_obj(4097u32, GuestAddress(USED_RING + 8)).unwrap();
    mem.store(1u16, GuestAddress(USED_RING + 2), Ordering::Release)
        .unwrap();
    dead.post_put(head, 1);
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.load(GuestAddress(USED_RING + 2), Ordering::Acquire)
        .unwrap()
}

fn wait_used(mem: &GuestMemoryMmap, n: u16) {
    let deadline = Instant::now() + TIMEOUT;
    while used_idx(mem) < n {
        assert!(
            Instant::now() < deadline,
            "used index stuck at {}",
            used_idx(mem)
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn status(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(0x1_0000 + slot * 0x2000 + 16))
        .unwrap()
}

/// The messages QEMU sends to (re)start a device with one queue.
fn connect(
    h: &mut BlkHandler,
    guest: &Guest,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    inflight: Option<(&File, u16)>,
    base: u32,
) -> (EventFd, EventFd) {
    h.set_owner().unwrap();
    let features = h.get_features().unwrap();
    h.set_features(features).unwrap();
    let protocol = h.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    h.set_protocol_features(protocol.bits()).unwrap();
    if let Some((file, qsize)) = inflight {
        let info = VhostUserInflight::new(inflight::region_bytes(1, qsize), 0, 1, qsize);
        h.set_inflight_fd(&info, file.try_clone().unwrap()).unwrap();
    }
    let region = VhostUserMemoryRegion {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        user_addr: VMM_BASE,
        mmap_offset: 0,
    };
    h.set_mem_table(&[region], vec![guest.file.try_clone().unwrap()], None)
        .unwrap();
    h.set_vring_num(0, u32::from(QSIZE)).unwrap();
    h.set_vring_addr(
        0,
        VhostUserVringAddrFlags::empty(),
        VMM_BASE + vq.desc_table_addr().0,
        VMM_BASE + USED_RING,
        VMM_BASE + vq.avail_addr().0,
        0,
    )
    .unwrap();
    h.set_vring_base(0, base).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    h.set_vring_call(0, Some(as_file(call.try_clone().unwrap())))
        .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    h.set_vring_kick(0, Some(as_file(kick.try_clone().unwrap())))
        .unwrap();
    h.set_vring_enable(0, true).unwrap();
    (kick, call)
}

/// An eventfd as the `File` a frontend message carries.
fn as_file(fd: EventFd) -> File {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` hands over sole ownership of an open fd.
    unsafe { File::from_raw_fd(fd.into_raw_fd()) }
}

fn handler(dev: Arc<MemDevice>) -> BlkHandler {
    let cfg = DeviceConfig {
        num_queues: 1,
        queue_size: QSIZE,
        seg_max: u32::from(QSIZE) - 2,
        ..DeviceConfig::default()
    };
    BlkHandler::new(Arc::new(VhostUserBlk::new(dev, &cfg).unwrap())).unwrap()
}

#[test]
fn a_restarted_daemon_completes_what_the_dead_one_held() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    // Three writes the guest made available; a daemon took all three and
    // finished the middle one (used index 1), then died.
    for (slot, first) in [(0u64, 0u16), (1, 3), (2, 6)] {
        request(&vq, &g.mem, first, slot, VIRTIO_BLK_T_OUT, slot * 8);
        g.mem
            .write_slice(
                &[slot as u8 + 1; 4096],
                GuestAddress(0x1_1000 + slot * 0x2000),
            )
            .unwrap();
    }
    make_available(&vq, &[0, 3, 6]);
    let file = InflightRegion::create(1, QSIZE).unwrap();
    let region = map_region(&file);
    let dead = region.queue(0).unwrap();
    dead.start(0, 0);
    for head in [0, 3, 6] {
        dead.fetch(head);
    }
    dead_daemon_puts(&g.mem, &dead, 3);
    drop(region);

    // The new daemon: QEMU restores the available index to the used index.
    let dev = Arc::new(MemDevice::new(1 << 20));
    let mut h = handler(dev.clone());
    let (kick, _call) = connect(&mut h, &g, &vq, Some((&file, QSIZE)), 1);
    wait_used(&g.mem, 3);
    for slot in [0u64, 2] {
        assert_eq!(status(&g.mem, slot), 0, "request in slot {slot} failed");
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, slot * 8 * 512).unwrap();
        assert!(
            back.iter().all(|&b| b == slot as u8 + 1),
            "slot {slot} data not written"
        );
    }
    // The middle request was not run again: its sector is untouched.
    let mut middle = vec![0u8; 4096];
    dev.read_at(&mut middle, 8 * 512).unwrap();
    assert!(middle.iter().all(|&b| b == 0));

    // The ring continues after the recovered requests.
    request(&vq, &g.mem, 9, 3, VIRTIO_BLK_T_IN, 0);
    make_available(&vq, &[9]);
    kick.write(1).unwrap();
    wait_used(&g.mem, 4);
    let mut read = vec![0u8; 4096];
    g.mem
        .read_slice(&mut read, GuestAddress(0x1_0000 + 3 * 0x2000 + 0x1000))
        .unwrap();
    assert!(
        read.iter().all(|&b| b == 1),
        "read after recovery returned the wrong data"
    );

    // Stopping the queue leaves nothing marked in flight.
    let state = h.get_vring_base(0).unwrap();
    assert_eq!({ state.num }, 4);
    let check = map_region(&file);
    let q = check.queue(0).unwrap();
    assert!((0..QSIZE).all(|head| !q.is_inflight(head)));
}

#[test]
fn a_completion_the_dead_daemon_never_signalled_is_signalled() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    request(&vq, &g.mem, 0, 0, VIRTIO_BLK_T_IN, 0);
    make_available(&vq, &[0]);
    let file = InflightRegion::create(1, QSIZE).unwrap();
    let region = map_region(&file);
    let dead = region.queue(0).unwrap();
    dead.start(0, 0);
    dead.fetch(0);
    // The dead daemon put head 0 on the used ring and died before the
    // signal; the guest (EVENT_IDX, used_event 0) waits for it, and the
    // guest made nothing else available, so it will not kick.
    dead_daemon_puts(&g.mem, &dead, 0);
    drop(region);

    let mut h = handler(Arc::new(MemDevice::new(1 << 20)));
    let (_kick, call) = connect(&mut h, &g, &vq, Some((&file, QSIZE)), 1);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match call.read() {
            Ok(n) if n > 0 => break,
            _ => {
                assert!(Instant::now() < deadline, "the guest was never signalled");
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
    assert_eq!(used_idx(&g.mem), 1, "nothing may be run again");
}

#[test]
fn without_an_inflight_region_the_device_still_works() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    let dev = Arc::new(MemDevice::new(1 << 20));
    let mut h = handler(dev.clone());
    let (kick, _call) = connect(&mut h, &g, &vq, None, 0);
    request(&vq, &g.mem, 0, 0, VIRTIO_BLK_T_OUT, 0);
    g.mem
        .write_slice(&[7u8; 4096], GuestAddress(0x1_1000))
        .unwrap();
    make_available(&vq, &[0]);
    kick.write(1).unwrap();
    wait_used(&g.mem, 1);
    assert_eq!(status(&g.mem, 0), 0);
    let mut back = vec![0u8; 4096];
    dev.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 7));
}

#[test]
fn inflight_regions_larger_than_the_device_are_refused() {
    let mut h = handler(Arc::new(MemDevice::new(1 << 20)));
    let too_many = VhostUserInflight::new(0, 0, 2, QSIZE);
    assert!(h.get_inflight_fd(&too_many).is_err());
    let too_long = VhostUserInflight::new(0, 0, 1, QSIZE * 2);
    assert!(h.get_inflight_fd(&too_long).is_err());
    let (info, file) = h
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE))
        .unwrap();
    assert_eq!(info.mmap_size, inflight::region_bytes(1, QSIZE));
    assert_eq!(file.metadata().unwrap().len(), info.mmap_size);
    // A region handed back smaller than it must be is refused.
    let short = VhostUserInflight::new(info.mmap_size - 1, 0, 1, QSIZE);
    assert!(h.set_inflight_fd(&short, file).is_err());
}

#[test]
fn vring_addresses_outside_guest_memory_are_refused() {
    let g = guest();
    let mut h = handler(Arc::new(MemDevice::new(1 << 20)));
    let region = VhostUserMemoryRegion {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        user_addr: VMM_BASE,
        mmap_offset: 0,
    };
    h.set_mem_table(&[region], vec![g.file.try_clone().unwrap()], None)
        .unwrap();
    let outside = VMM_BASE + MEM_SIZE as u64;
    assert!(h
        .set_vring_addr(
            0,
            VhostUserVringAddrFlags::empty(),
            outside,
            VMM_BASE,
            VMM_BASE,
            0
        )
        .is_err());
    assert!(h.set_vring_num(0, u32::from(QSIZE) * 2).is_err());
    assert!(h.set_vring_num(1, u32::from(QSIZE)).is_err());
}
