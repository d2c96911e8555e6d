//! virtio-blk structures exactly as they travel through guest memory.
//!
//! The [`ByteValued`] impls here let vm-memory copy these `#[repr(C)]`
//! structs to and from guest memory (every struct's size is asserted at
//! compile time against the virtio 1.2 specification, section 5.2). The
//! vectored syscalls that move request data between files and guest
//! memory live with the block layers, in `block::io`.
//!
//! All multi-byte fields are little-endian on the wire ([`Le16`], [`Le32`],
//! [`Le64`]), so the structs are correct on any host.

use vm_memory::{ByteValued, Le16, Le32, Le64};

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
