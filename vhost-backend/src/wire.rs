//! virtio-blk structures exactly as they travel through guest memory.
//!
//! This is the only module of the crate with `unsafe` code:
//! - the [`ByteValued`] impls that let vm-memory copy these `#[repr(C)]`
//!   structs to and from guest memory (every struct's size is asserted at
//!   compile time against the virtio 1.2 specification, section 5.2);
//! - [`preadv_all`] and [`pwritev_all`], which hand guest buffers straight
//!   to the kernel, so file-backed devices move request data between the
//!   file and guest memory with no copy in user space.
//!
//! All multi-byte fields are little-endian on the wire ([`Le16`], [`Le32`],
//! [`Le64`]), so the structs are correct on any host.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::{ByteValued, Le16, Le32, Le64, VolatileSlice};

/// Bytes per virtio-blk sector; every sector number and count on the wire
/// is in these units, whatever `blk_size` says (virtio 1.2, 5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Length of the GET_ID device id string (virtio 1.2, 5.2.6).
pub const ID_BYTES: usize = 20;

/// The request header, the first device-readable bytes of every request:
/// `struct virtio_blk_req { le32 type; le32 reserved; le64 sector; ... }`
/// (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    /// Request type, `VIRTIO_BLK_T_*`.
    pub request_type: Le32,
    /// Reserved (the `ioprio` field of legacy devices); ignored.
    pub reserved: Le32,
    /// First sector of the request, in 512-byte units.
    pub sector: Le64,
}

// SAFETY: `RequestHeader` is `#[repr(C)]`, made only of plain integer
// wrappers (`Le32`, `Le32`, `Le64` at offsets 0, 4, 8) with no padding, so
// every byte pattern is a valid value and it has no interior references.
unsafe impl ByteValued for RequestHeader {}

/// One segment of a DISCARD or WRITE_ZEROES request:
/// `struct virtio_blk_discard_write_zeroes` (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardWriteZeroes {
    /// First sector of the range.
    pub sector: Le64,
    /// Number of sectors in the range.
    pub num_sectors: Le32,
    /// Bit 0 is `unmap`; the other bits are reserved.
    pub flags: Le32,
}

// SAFETY: `DiscardWriteZeroes` is `#[repr(C)]`, made only of plain integer
// wrappers (`Le64`, `Le32`, `Le32` at offsets 0, 8, 12) with no padding, so
// every byte pattern is a valid value and it has no interior references.
unsafe impl ByteValued for DiscardWriteZeroes {}

/// The `unmap` flag of a [`DiscardWriteZeroes`] segment.
pub const SEGMENT_FLAG_UNMAP: u32 = 1;

/// The device configuration space, `struct virtio_blk_config`, up to and
/// including `write_zeroes_may_unmap` (virtio 1.2, 5.2.4). Later fields
/// (secure erase, zoned) belong to features we do not offer and read as zero.
///
/// Packed because the specification's layout has a 60-byte size while
/// `capacity` would give the struct 8-byte alignment; every field is at its
/// natural offset anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct BlkConfig {
    /// Device size in 512-byte sectors.
    pub capacity: Le64,
    /// Maximum size of any single segment (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: Le32,
    /// Maximum number of data segments in a request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: Le32,
    /// Legacy CHS geometry: cylinders (`VIRTIO_BLK_F_GEOMETRY`).
    pub cylinders: Le16,
    /// Legacy CHS geometry: heads.
    pub heads: u8,
    /// Legacy CHS geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size in bytes (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: Le32,
    /// log2 of logical blocks per physical block (`VIRTIO_BLK_F_TOPOLOGY`).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: Le16,
    /// Optimal sustained I/O size, in logical blocks.
    pub opt_io_size: Le32,
    /// Writeback mode (`VIRTIO_BLK_F_CONFIG_WCE`).
    pub writeback: u8,
    /// Padding defined by the specification.
    pub unused0: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: Le16,
    /// Maximum sectors in one discard segment (`VIRTIO_BLK_F_DISCARD`).
    pub max_discard_sectors: Le32,
    /// Maximum discard segments in one request.
    pub max_discard_seg: Le32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: Le32,
    /// Maximum sectors in one write-zeroes segment (`VIRTIO_BLK_F_WRITE_ZEROES`).
    pub max_write_zeroes_sectors: Le32,
    /// Maximum write-zeroes segments in one request.
    pub max_write_zeroes_seg: Le32,
    /// Whether write-zeroes with `unmap` may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding defined by the specification.
    pub unused1: [u8; 3],
}

// SAFETY: `BlkConfig` is `#[repr(C, packed)]`, so it has no padding at all,
// and it is made only of integers, integer wrappers and byte arrays: every
// byte pattern is a valid value and it has no interior references.
unsafe impl ByteValued for BlkConfig {}

// Sizes fixed by the virtio specification; a mismatch is a layout bug.
const _: () = assert!(std::mem::size_of::<RequestHeader>() == 16);
const _: () = assert!(std::mem::size_of::<DiscardWriteZeroes>() == 16);
const _: () = assert!(std::mem::size_of::<BlkConfig>() == 60);

/// Most iovecs one `preadv`/`pwritev` accepts (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Fills `bufs`, in order, from `file` starting at `offset`, with as few
/// `preadv(2)` calls as the kernel allows. Reaching the end of the file
/// first is an `UnexpectedEof` error.
pub fn preadv_all(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    // The guards keep each slice's mapping pinned (a no-op for plain mmap)
    // until the last syscall has returned.
    let guards: Vec<PtrGuardMut> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
    let iov = guards
        .iter()
        .zip(bufs)
        .map(|(g, b)| iovec(g.as_ptr(), b.len()))
        .collect();
    vectored_io(iov, offset, |iov, off| {
        // SAFETY: `iov` is a live slice of `iov.len()` iovecs (at most
        // IOV_MAX). Each one points inside a `VolatileSlice`, whose
        // invariant is that the memory is mapped and valid for writes of
        // its length for the slice's lifetime, which outlasts this call;
        // `guards` pins the mappings. `vectored_io` only ever shrinks an
        // entry from the front. The kernel writes the bytes; no Rust
        // reference to that memory exists, so the guest changing it
        // concurrently breaks no aliasing rule.
        unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        }
    })
    .map_err(|e| match e {
        VectoredError::Os(e) => e,
        VectoredError::Short => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the file",
        ),
    })
}

/// Writes the concatenation of `bufs` to `file` at `offset` with as few
/// `pwritev(2)` calls as the kernel allows.
pub fn pwritev_all(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    let guards: Vec<PtrGuard> = bufs.iter().map(VolatileSlice::ptr_guard).collect();
    let iov = guards
        .iter()
        .zip(bufs)
        .map(|(g, b)| iovec(g.as_ptr().cast_mut(), b.len()))
        .collect();
    vectored_io(iov, offset, |iov, off| {
        // SAFETY: as in `preadv_all`, every iovec lies inside a live,
        // pinned `VolatileSlice` valid for reads of its length; the kernel
        // only reads the bytes, and no Rust reference to them exists.
        unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        }
    })
    .map_err(|e| match e {
        VectoredError::Os(e) => e,
        VectoredError::Short => io::Error::new(io::ErrorKind::WriteZero, "file accepted no bytes"),
    })
}

fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

enum VectoredError {
    Os(io::Error),
    /// The syscall moved no bytes with bytes left to move.
    Short,
}

/// Calls `op(iovecs, offset)` until every byte of `iov` has moved,
/// advancing past what each call reports.
fn vectored_io(
    mut iov: Vec<libc::iovec>,
    mut offset: u64,
    op: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> Result<(), VectoredError> {
    iov.retain(|v| v.iov_len > 0);
    let mut start = 0;
    while start < iov.len() {
        let end = iov.len().min(start + IOV_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| {
            VectoredError::Os(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is too large"),
            ))
        })?;
        let ret = op(&iov[start..end], off);
        let mut moved = match usize::try_from(ret) {
            Ok(0) => return Err(VectoredError::Short),
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VectoredError::Os(e));
            }
        };
        offset += moved as u64;
        while moved > 0 {
            // The kernel never reports more than it was offered.
            let Some(v) = iov.get_mut(start) else { break };
            if moved >= v.iov_len {
                moved -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(moved).cast();
                v.iov_len -= moved;
                moved = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_sit_at_their_spec_offsets() {
        let cfg = BlkConfig {
            capacity: 0x0102_0304_0506_0708.into(),
            seg_max: 126.into(),
            blk_size: 512.into(),
            physical_block_exp: 3,
            num_queues: 4.into(),
            max_discard_seg: 32.into(),
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        let bytes = cfg.as_slice();
        assert_eq!(bytes[0..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(bytes[12..16], 126u32.to_le_bytes());
        assert_eq!(bytes[20..24], 512u32.to_le_bytes());
        assert_eq!(bytes[24], 3);
        assert_eq!(bytes[34..36], 4u16.to_le_bytes());
        assert_eq!(bytes[40..44], 32u32.to_le_bytes());
        assert_eq!(bytes[56], 1);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let header = RequestHeader {
            request_type: 1.into(),
            reserved: 0.into(),
            sector: 77.into(),
        };
        let copy = RequestHeader::from_slice(header.as_slice()).copied();
        assert_eq!(copy, Some(header));
        assert_eq!(header.as_slice()[8..16], 77u64.to_le_bytes());
    }
}
