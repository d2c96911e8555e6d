//! Fuzzes virtio-blk request parsing and execution with guest-controlled
//! descriptor chains.
//!
//! The input (layout in `instant_recovery_fuzz::request`) gives up to 16
//! descriptors, the device limits and a payload copied into a real
//! `GuestMemoryMmap` (two adjacent regions, a hole, a third region). The
//! chain is built with virtio-queue's `MockSplitQueue`, either linked in
//! order or written as given (loops, bad next indexes, indirect tables).
//! `Request::parse` runs on it, then `execute` against a `MemDevice`, then
//! the status is completed. Checked:
//! - nothing panics;
//! - no byte of guest memory changes outside the device-writable
//!   descriptors of the chain;
//! - the device changes only for a successful OUT / DISCARD / WRITE_ZEROES
//!   on a writable device, and then exactly as the request says;
//! - a successful IN fills the guest buffers with the device's data.

#![no_main]

use instant_recovery_fuzz::request::{
    decode, Desc, DEV_SIZE, FLAG_CAPACITY_LIE, FLAG_RAW_TABLE, FLAG_READ_ONLY, PAYLOAD_ADDR,
    QUEUE_SIZE, REGIONS,
};
use libfuzzer_sys::fuzz_target;
use block::mem_device::MemDevice;
use vhost_backend::request::{
    ExecContext, Limits, Request, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ID: &[u8; 20] = b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0";

thread_local! {
    static GUEST: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(
            &REGIONS.map(|(addr, len)| (GuestAddress(addr), len)),
        )
        .expect("map guest memory");
}

fn pattern() -> Vec<u8> {
    (0..DEV_SIZE).map(|i| (i * 7 % 251) as u8 | 1).collect()
}

fn read_all(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(addr, len)| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr))
                .expect("read region");
            v
        })
        .collect()
}

/// Reads `len` bytes at `addr` from a memory image taken by [`read_all`].
fn image_bytes(image: &[Vec<u8>], addr: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    let mut at = addr;
    let end = addr.checked_add(len)?;
    while at < end {
        let (i, &(base, size)) = REGIONS
            .iter()
            .enumerate()
            .find(|(_, &(base, size))| at >= base && at < base + size as u64)?;
        let off = (at - base) as usize;
        let n = ((end - at) as usize).min(size - off);
        out.extend_from_slice(&image[i][off..off + n]);
        at += n as u64;
    }
    Some(out)
}

/// The (addr, len) data buffers of a chain in one direction, the way the
/// spec frames them: data follows the 16-byte header in the first
/// descriptor and precedes the status byte in the last one.
fn data_buffers(descs: &[Descriptor], writable: bool) -> Vec<(u64, u64)> {
    let last = descs.len() - 1;
    let mut out = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() != writable {
            continue;
        }
        let (mut addr, mut len) = (d.addr().0, u64::from(d.len()));
        if i == 0 {
            addr = addr.wrapping_add(16);
            len = len.saturating_sub(16);
        }
        if i == last {
            len = len.saturating_sub(1);
        }
        if len > 0 {
            out.push((addr, len));
        }
    }
    out
}

fn overlapping(bufs: &[(u64, u64)]) -> bool {
    let mut sorted = bufs.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
}

fn run(data: &[u8]) {
    let input = decode(data);
    GUEST.with(|mem| {
        for &(addr, len) in &REGIONS {
            mem.write_slice(&vec![0u8; len], GuestAddress(addr))
                .expect("clear region");
        }
        let room = (REGIONS[1].0 as usize + REGIONS[1].1) - PAYLOAD_ADDR as usize;
        let payload = &input.payload[..input.payload.len().min(room)];
        mem.write_slice(payload, GuestAddress(PAYLOAD_ADDR))
            .expect("write payload");

        let raw: Vec<RawDescriptor> = input
            .descs
            .iter()
            .map(
                |&Desc {
                     addr,
                     len,
                     flags,
                     next,
                 }| {
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                },
            )
            .collect();
        let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
        let build = || {
            if input.flags & FLAG_RAW_TABLE != 0 || raw.is_empty() {
                queue.build_multiple_desc_chains(&raw)
            } else {
                queue.build_desc_chain(&raw)
            }
        };
        // Built twice (same table, same head): one copy for the oracle.
        let (Ok(oracle), Ok(chain)) = (build(), build()) else {
            return;
        };
        let seen: Vec<Descriptor> = oracle.collect();
        let before = read_all(mem);

        let read_only = input.flags & FLAG_READ_ONLY != 0;
        let device_sectors = (DEV_SIZE / 512) as u64;
        let l = input.limits;
        let limits = Limits {
            capacity: if input.flags & FLAG_CAPACITY_LIE != 0 {
                device_sectors + 64
            } else {
                device_sectors
            },
            seg_max: u32::from(l.seg_max),
            max_request_bytes: u32::from(l.max_request_kib) << 10,
            max_discard_sectors: u32::from(l.max_discard_sectors),
            max_discard_seg: u32::from(l.max_discard_seg),
            max_write_zeroes_sectors: u32::from(l.max_write_zeroes_sectors),
            max_write_zeroes_seg: u32::from(l.max_write_zeroes_seg),
        };
        let original = pattern();
        let dev = MemDevice::from_vec(original.clone());
        let mut expect_dev = original.clone();

        match Request::parse(chain, &limits) {
            Err(rejected) => {
                let used = rejected.complete(mem);
                assert!(used <= 1);
                let status = rejected.error.status();
                assert!(status == STATUS_IOERR || status == STATUS_UNSUPP);
            }
            Ok(req) => {
                // Parse accepted it: the chain has a writable last descriptor.
                let last = seen.last().expect("accepted chain has descriptors");
                assert!(last.is_write_only() && last.len() > 0);
                let ctx = ExecContext {
                    dev: &dev,
                    read_only,
                    id: ID,
                };
                let result = req.execute(&ctx, mem);
                match &result {
                    Ok(n) => {
                        check_success(mem, &req, &seen, &before, &original, &mut expect_dev, *n)
                    }
                    Err(_) => {
                        // A failed write-type request may have changed the
                        // bytes it addressed, and nothing else.
                        let now = dev.snapshot();
                        for (start, len) in touched(&req) {
                            let end = (start + len).min(DEV_SIZE as u64) as usize;
                            let start = (start as usize).min(end);
                            expect_dev[start..end].copy_from_slice(&now[start..end]);
                        }
                    }
                }
                if read_only {
                    assert!(
                        !matches!(
                            (req.request_type(), &result),
                            (
                                RequestType::Out | RequestType::Discard | RequestType::WriteZeroes,
                                Ok(_)
                            )
                        ),
                        "write-type request succeeded on a read-only device"
                    );
                }
                let used = match result {
                    Ok(n) => req.complete(mem, STATUS_OK, n),
                    Err(e) => req.complete(mem, e.status(), 0),
                };
                let max_used = u32::try_from(req.data_len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                assert!(used <= max_used, "used length {used} > {max_used}");
            }
        }
        assert!(dev.snapshot() == expect_dev, "device changed unexpectedly");

        // No byte changed outside the device-writable descriptors.
        let after = read_all(mem);
        for (r, (&(base, _), (b, a))) in REGIONS.iter().zip(before.iter().zip(&after)).enumerate() {
            if b == a {
                continue;
            }
            for (i, (x, y)) in b.iter().zip(a).enumerate() {
                if x == y {
                    continue;
                }
                let addr = base + i as u64;
                let allowed = seen.iter().any(|d| {
                    d.is_write_only()
                        && addr >= d.addr().0
                        && addr - d.addr().0 < u64::from(d.len())
                });
                assert!(
                    allowed,
                    "guest byte {addr:#x} (region {r}) written outside writable descriptors"
                );
            }
        }
    });
}

/// Checks the effect of a request that executed successfully.
fn check_success(
    mem: &GuestMemoryMmap,
    req: &Request,
    seen: &[Descriptor],
    before: &[Vec<u8>],
    original: &[u8],
    expect_dev: &mut [u8],
    written: u32,
) {
    let offset = (req.sector() << 9) as usize;
    match req.request_type() {
        RequestType::In => {
            assert_eq!(u64::from(written), req.data_len());
            let bufs = data_buffers(seen, true);
            let total: u64 = bufs.iter().map(|b| b.1).sum();
            assert_eq!(total, req.data_len());
            if !overlapping(&bufs) {
                let now = read_all(mem);
                let mut got = Vec::new();
                for &(addr, len) in &bufs {
                    got.extend(image_bytes(&now, addr, len).expect("IN buffer in memory"));
                }
                assert!(
                    got[..] == original[offset..offset + got.len()],
                    "IN returned data that is not the device's"
                );
            }
        }
        RequestType::Out => {
            assert_eq!(written, 0);
            let bufs = data_buffers(seen, false);
            let mut data = Vec::new();
            for &(addr, len) in &bufs {
                data.extend(image_bytes(before, addr, len).expect("OUT buffer in memory"));
            }
            assert_eq!(data.len() as u64, req.data_len());
            expect_dev[offset..offset + data.len()].copy_from_slice(&data);
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            for r in req.ranges() {
                expect_dev[r.offset as usize..(r.offset + r.len) as usize].fill(0);
            }
        }
        RequestType::GetId => {
            assert_eq!(written, 20);
            assert!(req.data_len() >= 20);
        }
        RequestType::Flush => assert_eq!(written, 0),
        RequestType::Unsupported(t) => panic!("unsupported type {t} executed successfully"),
    }
}

/// The device byte ranges a write-type request addresses.
fn touched(req: &Request) -> Vec<(u64, u64)> {
    match req.request_type() {
        RequestType::Out => vec![(req.sector() << 9, req.data_len())],
        RequestType::Discard | RequestType::WriteZeroes => {
            req.ranges().iter().map(|r| (r.offset, r.len)).collect()
        }
        _ => Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| run(data));
