//! Unit tests of request parsing and execution, on chains built with
//! virtio-queue's `MockSplitQueue` in a real `GuestMemoryMmap`.

use std::io;

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::wire::{DiscardWriteZeroes, RequestHeader};
use block::device::{BlockDevice, SCRATCH_CHUNK};
use block::mem_device::{FileDevice, MemDevice};

const MEM_SIZE: usize = 16 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const SEGS: u64 = 0x80_0000;
const STATUS: u64 = 0xF0_0000;
const OUTSIDE: u64 = 0x2000_0000;
const DEV_SIZE: usize = 1 << 20;
const CAPACITY: u64 = (DEV_SIZE / 512) as u64;
const ID: &[u8; ID_BYTES] = b"disk-0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
const POISON: u8 = 0xee;

fn guest() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: CAPACITY,
        seg_max: 8,
        max_request_bytes: 4 << 20,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
    }
}

fn rd(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn wr(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let h = RequestHeader {
        request_type: request_type.into(),
        reserved: 0.into(),
        sector: sector.into(),
    };
    mem.write_obj(h, GuestAddress(addr)).unwrap();
    mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
}

fn segments(mem: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, num_sectors, flags)) in segs.iter().enumerate() {
        let s = DiscardWriteZeroes {
            sector: sector.into(),
            num_sectors: num_sectors.into(),
            flags: flags.into(),
        };
        mem.write_obj(s, GuestAddress(SEGS + 16 * i as u64))
            .unwrap();
    }
    16 * segs.len() as u32
}

fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> std::result::Result<Request, Rejected> {
    parse_with(mem, descs, &limits())
}

fn parse_with(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
) -> std::result::Result<Request, Rejected> {
    let queue = MockSplitQueue::new(mem, 256);
    let chain = queue.build_desc_chain(descs).unwrap();
    Request::parse(chain, limits)
}

fn pattern_device() -> (MemDevice, Vec<u8>) {
    let image: Vec<u8> = (0..DEV_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    (MemDevice::from_vec(image.clone()), image)
}

/// Runs `req` the way the worker does; returns (status byte, used length).
fn run(mem: &GuestMemoryMmap, req: &Request, dev: &dyn BlockDevice, read_only: bool) -> (u8, u32) {
    let ctx = ExecContext {
        dev,
        read_only,
        id: ID,
    };
    let used = match req.execute(&ctx, mem) {
        Ok(n) => req.complete(mem, STATUS_OK, n),
        Err(e) => req.complete(mem, e.status(), 0),
    };
    (mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), used)
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

/// Asserts `descs` is rejected with the expected error, and that the
/// status byte is written (with `status`) exactly when it should be.
fn assert_rejected(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    limits: &Limits,
    check: impl Fn(&ParseError) -> bool,
    status: Option<u8>,
) {
    let rejected = parse_with(mem, descs, limits).expect_err("malformed chain was accepted");
    assert!(
        check(&rejected.error),
        "unexpected error {:?}",
        rejected.error
    );
    let used = rejected.complete(mem);
    let byte = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
    match status {
        Some(s) => {
            assert_eq!(byte, s, "{:?}", rejected.error);
            assert_eq!(used, 1);
        }
        None => {
            assert_eq!(byte, POISON, "status written for {:?}", rejected.error);
            assert_eq!(used, 0);
        }
    }
}

// ---- good paths ----

#[test]
fn in_request_reads_device_into_guest_buffers() {
    let mem = guest();
    let (dev, image) = pattern_device();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    // Three data buffers whose sizes are not sector multiples individually.
    let descs = [
        rd(HDR, 16),
        wr(DATA, 1000),
        wr(DATA + 0x1_0000, 24),
        wr(DATA + 0x2_0000, 3072),
        wr(STATUS, 1),
    ];
    let req = parse(&mem, &descs).unwrap();
    assert_eq!(req.request_type(), RequestType::In);
    assert_eq!(req.data_len(), 4096);
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 4097));
    let expect = &image[1024..1024 + 4096];
    assert_eq!(guest_bytes(&mem, DATA, 1000), expect[..1000]);
    assert_eq!(guest_bytes(&mem, DATA + 0x1_0000, 24), expect[1000..1024]);
    assert_eq!(guest_bytes(&mem, DATA + 0x2_0000, 3072), expect[1024..]);
}

/// A device with only the required methods, so requests take the
/// default (scratch-buffer) vectored paths.
struct Plain(MemDevice);

impl BlockDevice for Plain {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
}

/// The same image behind each way of moving data: a device copying
/// through the default scratch buffer, `MemDevice` (one copy), and
/// `FileDevice` (`preadv`/`pwritev` straight into guest memory).
fn every_device(image: &[u8], dir: &std::path::Path) -> Vec<(&'static str, Box<dyn BlockDevice>)> {
    let path = dir.join("image.raw");
    std::fs::write(&path, image).unwrap();
    vec![
        (
            "default",
            Box::new(Plain(MemDevice::from_vec(image.to_vec()))),
        ),
        ("mem", Box::new(MemDevice::from_vec(image.to_vec()))),
        ("file", Box::new(FileDevice::open(&path, false).unwrap())),
    ]
}

#[test]
fn large_requests_span_several_scratch_chunks_on_every_device() {
    let mem = guest();
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..4 << 20).map(|i: usize| (i % 253) as u8).collect();
    let limits = Limits {
        capacity: (4 << 20) / 512,
        ..limits()
    };
    for (name, dev) in every_device(&image, dir.path()) {
        // One huge buffer, then the same length split unevenly in three.
        let len = (SCRATCH_CHUNK * 2 + 512) as u32;
        mem.write_slice(&vec![POISON; len as usize], GuestAddress(DATA))
            .unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
        let req = parse_with(&mem, &[rd(HDR, 16), wr(DATA, len), wr(STATUS, 1)], &limits).unwrap();
        assert_eq!(
            run(&mem, &req, &*dev, false),
            (STATUS_OK, len + 1),
            "{name}"
        );
        assert!(
            guest_bytes(&mem, DATA, len as usize) == image[512..512 + len as usize],
            "{name}: IN mismatch"
        );

        let data: Vec<u8> = (0..len as usize).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        let (a, b) = (1000 * 512, SCRATCH_CHUNK as u32 + 7 * 512 + 100);
        let descs = [
            rd(HDR, 16),
            rd(DATA, a),
            rd(DATA + u64::from(a), b),
            rd(DATA + u64::from(a + b), len - a - b),
            wr(STATUS, 1),
        ];
        let req = parse_with(&mem, &descs, &limits).unwrap();
        assert_eq!(run(&mem, &req, &*dev, false), (STATUS_OK, 1), "{name}");
        let mut back = vec![0u8; len as usize];
        dev.read_at(&mut back, 3 * 512).unwrap();
        assert!(back == data, "{name}: OUT mismatch");
    }
}

#[test]
fn buffers_spanning_two_guest_regions_reach_every_device() {
    // Two adjacent regions: one guest buffer maps to two host slices.
    let half = MEM_SIZE / 2;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, image) = pattern_device();
    let across = half as u64 - 1536;
    for (name, dev) in every_device(&image, dir.path()) {
        mem.write_slice(&[POISON; 8192], GuestAddress(across))
            .unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
        let req = parse(&mem, &[rd(HDR, 16), wr(across, 4096), wr(STATUS, 1)]).unwrap();
        assert_eq!(run(&mem, &req, &*dev, false), (STATUS_OK, 4097), "{name}");
        assert_eq!(
            guest_bytes(&mem, across, 4096),
            image[2048..2048 + 4096],
            "{name}"
        );

        let data: Vec<u8> = (0..4096).map(|i| (i % 13) as u8).collect();
        mem.write_slice(&data, GuestAddress(across)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 16);
        let req = parse(&mem, &[rd(HDR, 16), rd(across, 4096), wr(STATUS, 1)]).unwrap();
        assert_eq!(run(&mem, &req, &*dev, false), (STATUS_OK, 1), "{name}");
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 16 * 512).unwrap();
        assert_eq!(back, data, "{name}");
    }
}

#[test]
fn out_request_writes_guest_buffers_to_device() {
    let mem = guest();
    let (dev, mut image) = pattern_device();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xa5; 1024], GuestAddress(DATA + 4096))
        .unwrap();
    let descs = [
        rd(HDR, 16),
        rd(DATA, 512),
        rd(DATA + 4096, 1024),
        wr(STATUS, 1),
    ];
    let req = parse(&mem, &descs).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 1));
    image[4096..4608].fill(0x5a);
    image[4608..5632].fill(0xa5);
    assert!(dev.snapshot() == image);
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let mem = guest();
    let (dev, mut image) = pattern_device();
    // OUT: header and data share the first descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0x33; 512], GuestAddress(HDR + 16))
        .unwrap();
    let req = parse(&mem, &[rd(HDR, 16 + 512), wr(STATUS, 1)]).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 1));
    image[512..1024].fill(0x33);
    assert!(dev.snapshot() == image);

    // IN: data and status share the last descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let req = parse(&mem, &[rd(HDR, 16), wr(STATUS - 512, 513)]).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 513));
    assert_eq!(guest_bytes(&mem, STATUS - 512, 512), vec![0x33; 512]);
}

#[test]
fn flush_reaches_the_device() {
    let mem = guest();
    let (dev, _) = pattern_device();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = parse(&mem, &[rd(HDR, 16), wr(STATUS, 1)]).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 1));
    assert_eq!(dev.flush_count(), 1);
}

#[test]
fn get_id_returns_the_nul_padded_serial() {
    let mem = guest();
    let (dev, _) = pattern_device();
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 32], GuestAddress(DATA)).unwrap();
    let req = parse(&mem, &[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 21));
    assert_eq!(guest_bytes(&mem, DATA, 20), ID[..]);
    // Nothing past the 20-byte buffer is touched.
    assert_eq!(guest_bytes(&mem, DATA + 20, 12), vec![0xff; 12]);
}

#[test]
fn discard_and_write_zeroes_zero_every_segment() {
    let mem = guest();
    let (dev, mut image) = pattern_device();
    let len = segments(&mem, &[(0, 1, 0), (100, 8, 0)]);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let req = parse(&mem, &[rd(HDR, 16), rd(SEGS, len), wr(STATUS, 1)]).unwrap();
    assert_eq!(req.ranges().len(), 2);
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 1));
    image[..512].fill(0);
    image[100 * 512..108 * 512].fill(0);
    assert!(dev.snapshot() == image);

    let len = segments(&mem, &[(2000, 48, SEGMENT_FLAG_UNMAP)]);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    // Segments split across two descriptors.
    let req = parse(
        &mem,
        &[
            rd(HDR, 16),
            rd(SEGS, 5),
            rd(SEGS + 5, len - 5),
            wr(STATUS, 1),
        ],
    )
    .unwrap();
    assert_eq!(
        req.ranges(),
        [BlockRange {
            offset: 2000 * 512,
            len: 48 * 512,
            unmap: true
        }]
    );
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 1));
    image[2000 * 512..2048 * 512].fill(0);
    assert!(dev.snapshot() == image);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = guest();
    let (dev, image) = pattern_device();
    for t in [2u32, 99, VIRTIO_BLK_T_GET_ID + 1, u32::MAX] {
        header(&mem, HDR, t, 0);
        let req = parse(&mem, &[rd(HDR, 16), wr(STATUS, 1)]).unwrap();
        assert_eq!(req.request_type(), RequestType::Unsupported(t));
        assert_eq!(run(&mem, &req, &dev, false), (STATUS_UNSUPP, 1));
    }
    assert!(dev.snapshot() == image);
}

#[test]
fn read_only_devices_refuse_every_write_type() {
    let mem = guest();
    let (dev, image) = pattern_device();
    let len = segments(&mem, &[(0, 8, 0)]);
    for (t, data) in [
        (VIRTIO_BLK_T_OUT, rd(DATA, 512)),
        (VIRTIO_BLK_T_DISCARD, rd(SEGS, len)),
        (VIRTIO_BLK_T_WRITE_ZEROES, rd(SEGS, len)),
    ] {
        header(&mem, HDR, t, 0);
        let req = parse(&mem, &[rd(HDR, 16), data, wr(STATUS, 1)]).unwrap();
        assert_eq!(run(&mem, &req, &dev, true), (STATUS_IOERR, 1));
    }
    assert!(dev.snapshot() == image);
    // Reads still work.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let req = parse(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]).unwrap();
    assert_eq!(run(&mem, &req, &dev, true), (STATUS_OK, 513));
}

struct Broken;

impl BlockDevice for Broken {
    fn size(&self) -> u64 {
        DEV_SIZE as u64
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::other("broken"))
    }
}

#[test]
fn device_errors_become_ioerr() {
    let mem = guest();
    let len = segments(&mem, &[(0, 8, 0)]);
    for (t, data) in [
        (VIRTIO_BLK_T_IN, Some(wr(DATA, 512))),
        (VIRTIO_BLK_T_OUT, Some(rd(DATA, 512))),
        (VIRTIO_BLK_T_FLUSH, None),
        (VIRTIO_BLK_T_DISCARD, Some(rd(SEGS, len))),
        (VIRTIO_BLK_T_WRITE_ZEROES, Some(rd(SEGS, len))),
    ] {
        header(&mem, HDR, t, 0);
        let mut descs = vec![rd(HDR, 16)];
        descs.extend(data);
        descs.push(wr(STATUS, 1));
        let req = parse(&mem, &descs).unwrap();
        assert_eq!(
            run(&mem, &req, &Broken, false),
            (STATUS_IOERR, 1),
            "type {t}"
        );
    }
}

#[test]
fn indirect_chains_are_followed() {
    let mem = guest();
    let (dev, image) = pattern_device();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    // The indirect table lives in guest memory; its entries link 0 -> 1 -> 2.
    let table = 0x50_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let entries = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(DATA, 2048, next | write, 2),
        SplitDescriptor::new(STATUS, 1, write, 0),
    ];
    for (i, e) in entries.into_iter().enumerate() {
        mem.write_obj(RawDescriptor::from(e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let head = RawDescriptor::from(SplitDescriptor::new(
        table,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue.build_multiple_desc_chains(&[head]).unwrap();
    let req = Request::parse(chain, &limits()).unwrap();
    assert_eq!(run(&mem, &req, &dev, false), (STATUS_OK, 2049));
    assert_eq!(guest_bytes(&mem, DATA, 2048), image[2048..4096]);
}

// ---- malformed chains ----

#[test]
fn chain_without_room_for_a_status_gets_no_status() {
    let mem = guest();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Header only.
    assert_rejected(
        &mem,
        &[rd(HDR, 16)],
        &limits(),
        |e| matches!(e, ParseError::MissingStatus),
        None,
    );
    // Last descriptor device-readable: no status descriptor.
    assert_rejected(
        &mem,
        &[rd(HDR, 16), rd(DATA, 512)],
        &limits(),
        |e| matches!(e, ParseError::StatusNotWritable),
        None,
    );
    // Status read-only.
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(DATA, 512), rd(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::StatusNotWritable),
        None,
    );
    // Status of length 0.
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 0)],
        &limits(),
        |e| matches!(e, ParseError::EmptyStatus),
        None,
    );
    // Status outside guest memory, and at an address that would overflow.
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(OUTSIDE, 1)],
        &limits(),
        |e| matches!(e, ParseError::StatusOutOfMemory(_)),
        None,
    );
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(u64::MAX, 2)],
        &limits(),
        |e| matches!(e, ParseError::StatusOutOfMemory(_)),
        None,
    );
}

#[test]
fn broken_chains_are_rejected() {
    let mem = guest();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let queue = MockSplitQueue::new(&mem, 16);
    // A loop: 0 -> 1 -> 0 -> ...
    let next = VRING_DESC_F_NEXT as u16;
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            next | VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    let chain = queue.build_multiple_desc_chains(&looped).unwrap();
    let rejected = Request::parse(chain, &limits()).unwrap_err();
    assert!(
        matches!(rejected.error, ParseError::BrokenChain(_)),
        "{:?}",
        rejected.error
    );
    assert_eq!(rejected.status, None);

    // A next index outside the table.
    let queue = MockSplitQueue::new(&mem, 16);
    let dangling = [RawDescriptor::from(SplitDescriptor::new(
        HDR, 16, next, 200,
    ))];
    let chain = queue.build_multiple_desc_chains(&dangling).unwrap();
    let rejected = Request::parse(chain, &limits()).unwrap_err();
    assert!(matches!(rejected.error, ParseError::BrokenChain(1)));

    // An indirect descriptor whose table length is not a multiple of 16.
    let queue = MockSplitQueue::new(&mem, 16);
    let indirect = [RawDescriptor::from(SplitDescriptor::new(
        DATA,
        17,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    let chain = queue.build_multiple_desc_chains(&indirect).unwrap();
    let rejected = Request::parse(chain, &limits()).unwrap_err();
    assert!(matches!(rejected.error, ParseError::EmptyChain));
}

#[test]
fn bad_headers_get_ioerr() {
    let mem = guest();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let ioerr = Some(STATUS_IOERR);
    assert_rejected(
        &mem,
        &[rd(HDR, 8), wr(DATA, 512), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::ShortHeader(8)),
        ioerr,
    );
    assert_rejected(
        &mem,
        &[wr(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::HeaderNotReadable),
        ioerr,
    );
    assert_rejected(
        &mem,
        &[rd(OUTSIDE, 16), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::ReadHeader { .. }),
        ioerr,
    );
    // Straddling the end of guest memory.
    assert_rejected(
        &mem,
        &[rd(MEM_SIZE as u64 - 8, 16), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::ReadHeader { .. }),
        ioerr,
    );
}

#[test]
fn data_with_the_wrong_direction_gets_ioerr() {
    let mem = guest();
    let ioerr = Some(STATUS_IOERR);
    let wrong = |e: &ParseError| matches!(e, ParseError::WrongDirection(_));
    for (t, data) in [
        (VIRTIO_BLK_T_IN, rd(DATA, 512)),
        (VIRTIO_BLK_T_OUT, wr(DATA, 512)),
        (VIRTIO_BLK_T_GET_ID, rd(DATA, 20)),
        (VIRTIO_BLK_T_DISCARD, wr(SEGS, 16)),
        (VIRTIO_BLK_T_WRITE_ZEROES, wr(SEGS, 16)),
    ] {
        header(&mem, HDR, t, 0);
        assert_rejected(
            &mem,
            &[rd(HDR, 16), data, wr(STATUS, 1)],
            &limits(),
            wrong,
            ioerr,
        );
    }
    // A readable descriptor after a writable one breaks the framing rule.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_rejected(
        &mem,
        &[
            rd(HDR, 16),
            wr(DATA, 512),
            rd(DATA + 512, 512),
            wr(STATUS, 1),
        ],
        &limits(),
        |e| matches!(e, ParseError::ReadableAfterWritable),
        ioerr,
    );
    // GET_ID with a buffer too short for the id.
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(DATA, 19), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::ShortIdBuffer(19)),
        ioerr,
    );
}

#[test]
fn sector_ranges_beyond_capacity_get_ioerr() {
    let mem = guest();
    let ioerr = Some(STATUS_IOERR);
    let out_of_range = |e: &ParseError| matches!(e, ParseError::OutOfRange { .. });
    for (sector, len) in [
        (CAPACITY - 1, 1024),
        (CAPACITY, 512),
        (u64::MAX, 512),
        (u64::MAX - 1, 1024),
        (u64::MAX >> 9, 512),
    ] {
        for (t, data) in [
            (VIRTIO_BLK_T_IN, wr(DATA, len)),
            (VIRTIO_BLK_T_OUT, rd(DATA, len)),
        ] {
            header(&mem, HDR, t, sector);
            assert_rejected(
                &mem,
                &[rd(HDR, 16), data, wr(STATUS, 1)],
                &limits(),
                out_of_range,
                ioerr,
            );
        }
    }
    // The very last sector is fine.
    header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY - 1);
    assert!(parse(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]).is_ok());
}

#[test]
fn lengths_and_sizes_are_checked() {
    let mem = guest();
    let ioerr = Some(STATUS_IOERR);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(DATA, 1000), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::UnalignedLength(1000)),
        ioerr,
    );
    let small = Limits {
        max_request_bytes: 4096,
        seg_max: 2,
        ..limits()
    };
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(DATA, 8192), wr(STATUS, 1)],
        &small,
        |e| matches!(e, ParseError::TooLarge { len: 8192, .. }),
        ioerr,
    );
    assert_rejected(
        &mem,
        &[
            rd(HDR, 16),
            wr(DATA, 512),
            wr(DATA + 512, 512),
            wr(DATA + 1024, 512),
            wr(STATUS, 1),
        ],
        &small,
        |e| matches!(e, ParseError::TooManySegments { count: 3, max: 2 }),
        ioerr,
    );
}

#[test]
fn buffers_outside_guest_memory_get_ioerr() {
    let mem = guest();
    let ioerr = Some(STATUS_IOERR);
    let outside = |e: &ParseError| matches!(e, ParseError::DataOutOfMemory { .. });
    let (dev, image) = pattern_device();
    for data in [
        wr(OUTSIDE, 512),
        wr(MEM_SIZE as u64 - 512, 1024),
        wr(u64::MAX - 511, 512),
    ] {
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        assert_rejected(
            &mem,
            &[rd(HDR, 16), data, wr(STATUS, 1)],
            &limits(),
            outside,
            ioerr,
        );
    }
    for data in [rd(OUTSIDE, 512), rd(MEM_SIZE as u64 - 512, 1024)] {
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_rejected(
            &mem,
            &[rd(HDR, 16), data, wr(STATUS, 1)],
            &limits(),
            outside,
            ioerr,
        );
    }
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_rejected(
        &mem,
        &[rd(HDR, 16), rd(OUTSIDE, 16), wr(STATUS, 1)],
        &limits(),
        outside,
        ioerr,
    );
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    assert_rejected(
        &mem,
        &[rd(HDR, 16), wr(OUTSIDE, 20), wr(STATUS, 1)],
        &limits(),
        outside,
        ioerr,
    );
    assert!(dev.snapshot() == image);
}

/// Segments, the expected error, the expected status.
type SegmentCase = (
    &'static [(u64, u32, u32)],
    fn(&ParseError) -> bool,
    Option<u8>,
);

#[test]
fn bad_discard_and_write_zeroes_segments_are_refused() {
    let mem = guest();
    let ioerr = Some(STATUS_IOERR);
    let unsupp = Some(STATUS_UNSUPP);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        // Payload not a whole number of segments, or empty.
        for len in [0, 20] {
            let mut descs = vec![rd(HDR, 16)];
            if len > 0 {
                descs.push(rd(SEGS, len));
            }
            descs.push(wr(STATUS, 1));
            assert_rejected(
                &mem,
                &descs,
                &limits(),
                |e| matches!(e, ParseError::BadSegmentPayload(_)),
                ioerr,
            );
        }
        let cases: [SegmentCase; 5] = [
            (
                &[(0, 8, 2)],
                |e| matches!(e, ParseError::UnsupportedFlags(2)),
                unsupp,
            ),
            (
                &[(0, 8, 0); 5],
                |e| matches!(e, ParseError::TooManyRanges { count: 5, max: 4 }),
                ioerr,
            ),
            (
                &[(0, 1025, 0)],
                |e| matches!(e, ParseError::RangeTooLarge { sectors: 1025, .. }),
                ioerr,
            ),
            (
                &[(0, 8, 0), (CAPACITY - 4, 8, 0)],
                |e| matches!(e, ParseError::OutOfRange { .. }),
                ioerr,
            ),
            (
                &[(u64::MAX - 2, 8, 0)],
                |e| matches!(e, ParseError::OutOfRange { .. }),
                ioerr,
            ),
        ];
        for (segs, check, status) in cases {
            let len = segments(&mem, segs);
            header(&mem, HDR, t, 0);
            assert_rejected(
                &mem,
                &[rd(HDR, 16), rd(SEGS, len), wr(STATUS, 1)],
                &limits(),
                check,
                status,
            );
        }
    }
    // virtio 1.2, 5.2.6.2: unmap on a discard is VIRTIO_BLK_S_UNSUPP.
    let len = segments(&mem, &[(0, 8, SEGMENT_FLAG_UNMAP)]);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_rejected(
        &mem,
        &[rd(HDR, 16), rd(SEGS, len), wr(STATUS, 1)],
        &limits(),
        |e| matches!(e, ParseError::DiscardWithUnmap),
        unsupp,
    );
}

// ---- arbitrary chains ----

/// Guest address choices: well inside memory, at its end, and far outside.
fn arb_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..64).prop_map(|i| DATA + i * 4096),
        (0u64..4).prop_map(|i| MEM_SIZE as u64 - 512 * i),
        Just(OUTSIDE),
        Just(u64::MAX - 100),
    ]
}

fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
    (
        arb_addr(),
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(16),
            Just(20),
            Just(512),
            0u32..5000
        ],
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the guest puts in a chain, parse and execute never panic,
    /// and the only guest bytes that change are inside device-writable
    /// descriptors.
    #[test]
    fn arbitrary_chains_never_panic_or_write_outside_writable_buffers(
        request_type in prop_oneof![0u32..16, Just(u32::MAX)],
        sector in prop_oneof![0u64..CAPACITY + 4, Just(u64::MAX)],
        descs in proptest::collection::vec(arb_desc(), 1..6),
    ) {
        let mem = guest();
        header(&mem, HDR, request_type, sector);
        segments(&mem, &[(sector, 8, 0)]);
        let raw: Vec<RawDescriptor> = std::iter::once(rd(HDR, 16))
            .chain(descs.iter().map(|&(a, l, w)| if w { wr(a, l) } else { rd(a, l) }))
            .collect();
        let before = guest_bytes(&mem, 0, MEM_SIZE);
        let (dev, _) = pattern_device();
        let _ = match parse(&mem, &raw) {
            Ok(req) => run(&mem, &req, &dev, false).1,
            Err(rejected) => rejected.complete(&mem),
        };
        let after = guest_bytes(&mem, 0, MEM_SIZE);
        // Bytes the device may write: the writable descriptors (clipped to memory).
        let mut allowed = vec![false; MEM_SIZE];
        for &(a, l, w) in &descs {
            if w && a < MEM_SIZE as u64 {
                let end = (a.saturating_add(u64::from(l))).min(MEM_SIZE as u64);
                allowed[a as usize..end as usize].fill(true);
            }
        }
        // The mock queue's own rings live below HDR.
        for (i, (b, a)) in before.iter().zip(&after).enumerate().skip(HDR as usize) {
            prop_assert!(b == a || allowed[i], "byte {i:#x} changed outside writable buffers");
        }
    }
}
