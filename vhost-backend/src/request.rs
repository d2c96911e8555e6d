//! virtio-blk requests: parse → execute → status.
//!
//! [`Request::parse`] turns a descriptor chain that the (untrusted) guest
//! placed in a virtqueue into a fully validated [`Request`]: every buffer
//! lies inside guest memory and has the direction the request type needs,
//! every sector range lies inside the device, every size is within the
//! limits advertised in the config space. Each check cites the virtio 1.2
//! section that makes it a MUST. [`Request::execute`](Request::execute)
//! then runs the request against a [`BlockDevice`](block::device::BlockDevice)
//! and nothing it does can reach outside the buffers `parse` accepted.
//!
//! A request that fails to parse is [`Rejected`]: if its status byte could
//! be located it gets `VIRTIO_BLK_S_IOERR` (or `VIRTIO_BLK_S_UNSUPP`),
//! otherwise it is returned to the guest with a used length of 0.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions,
};

use crate::wire::{
    DiscardWriteZeroes, RequestHeader, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, SEGMENT_FLAG_UNMAP,
};

mod chain;
mod execute;
#[cfg(test)]
mod tests;

pub use chain::descriptors_at;
pub use execute::{ExecContext, ExecuteError};

/// Status byte: success.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status byte: the request failed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte: the request is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The type field of the request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into device-writable buffers.
    In,
    /// Write sectors from device-readable buffers.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate sector ranges.
    Discard,
    /// Zero sector ranges.
    WriteZeroes,
    /// Any other type; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// What the device accepts, as advertised in its config space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Device size in 512-byte sectors.
    pub capacity: u64,
    /// Maximum number of data descriptors in an IN or OUT request (`seg_max`).
    pub seg_max: u32,
    /// Maximum data bytes in one IN or OUT request.
    pub max_request_bytes: u32,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum segments in one discard request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

/// A validated byte range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The guest allows deallocation (WRITE_ZEROES only).
    pub unmap: bool,
}

/// One guest buffer, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Buffer {
    addr: GuestAddress,
    len: u32,
}

/// A parsed, validated virtio-blk request.
#[derive(Debug)]
pub struct Request {
    request_type: RequestType,
    sector: u64,
    /// Data buffers in chain order (device-writable for IN and GET_ID,
    /// device-readable for OUT); empty for the other types.
    data: Vec<Buffer>,
    data_len: u64,
    /// Ranges of a DISCARD or WRITE_ZEROES request.
    ranges: Vec<BlockRange>,
    status: GuestAddress,
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The chain yielded no descriptor at all.
    #[error("Descriptor chain is empty")]
    EmptyChain,
    /// The chain ended on a descriptor that still has NEXT set: a loop, a
    /// next index outside the table, or an unreadable descriptor.
    #[error("Descriptor chain breaks after {0} descriptors")]
    BrokenChain(usize),
    /// Fewer than two descriptors: there is no room for a status byte.
    #[error("Request has no status descriptor")]
    MissingStatus,
    /// The last descriptor is device-readable.
    #[error("Status descriptor is not device-writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("Status descriptor is empty")]
    EmptyStatus,
    /// The status byte is not inside guest memory.
    #[error("Status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    /// The first descriptor is device-writable.
    #[error("Header descriptor is device-writable")]
    HeaderNotReadable,
    /// The first descriptor is shorter than the 16-byte header.
    #[error("Header descriptor has {0} bytes, fewer than 16")]
    ShortHeader(u32),
    /// The header could not be read from guest memory.
    #[error("Read request header at {addr:#x}")]
    ReadHeader {
        /// Guest address of the header.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("Device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A data buffer has the wrong direction for the request type.
    #[error("{0:?} request has a data buffer with the wrong direction")]
    WrongDirection(RequestType),
    /// A data buffer is not (entirely) inside guest memory.
    #[error("Data buffer {addr:#x}+{len} is outside guest memory")]
    DataOutOfMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// IN/OUT data length is not a multiple of 512.
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// More data descriptors than `seg_max`.
    #[error("Request has {count} data segments, more than seg_max {max}")]
    TooManySegments {
        /// Data descriptors in the request.
        count: usize,
        /// The advertised `seg_max`.
        max: u32,
    },
    /// More data bytes than the per-request limit.
    #[error("Request of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Data bytes in the request.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The sector range does not fit inside the device (or overflows).
    #[error("Sectors {sector}+{sectors} are beyond the capacity of {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
    /// GET_ID buffer is shorter than the 20-byte id.
    #[error("GET_ID buffer of {0} bytes is shorter than 20")]
    ShortIdBuffer(u64),
    /// DISCARD/WRITE_ZEROES payload is empty or not a whole number of segments.
    #[error("Segment payload of {0} bytes is not a positive multiple of 16")]
    BadSegmentPayload(u64),
    /// More DISCARD/WRITE_ZEROES segments than advertised.
    #[error("Request has {count} segments, more than the limit of {max}")]
    TooManyRanges {
        /// Segments in the request.
        count: u64,
        /// The advertised maximum.
        max: u32,
    },
    /// One segment covers more sectors than advertised.
    #[error("Segment of {sectors} sectors exceeds the limit of {max}")]
    RangeTooLarge {
        /// Sectors in the segment.
        sectors: u32,
        /// The advertised maximum.
        max: u32,
    },
    /// A segment sets flags the device does not know.
    #[error("Segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    /// A DISCARD segment sets the unmap flag.
    #[error("Discard segment sets the unmap flag")]
    DiscardWithUnmap,
    /// Segments could not be read from guest memory.
    #[error("Read discard/write-zeroes segments")]
    ReadSegments(#[source] GuestMemoryError),
}

impl ParseError {
    /// The status byte this error earns when the status descriptor is usable.
    pub fn status(&self) -> u8 {
        match self {
            // virtio 1.2, 5.2.6.2: "The device MUST set the status byte to
            // VIRTIO_BLK_S_UNSUPP for discard and write zeroes commands if any
            // unknown flag is set. Furthermore, the device MUST set the status
            // byte to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap
            // flag is set."
            ParseError::UnsupportedFlags(_) | ParseError::DiscardWithUnmap => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A chain that is not a valid request, and where (if anywhere) to report it.
#[derive(Debug, thiserror::Error)]
#[error("Reject malformed request")]
pub struct Rejected {
    /// What is wrong with the chain.
    #[source]
    pub error: ParseError,
    /// The status byte, when the chain has a usable one.
    pub status: Option<GuestAddress>,
}

impl Rejected {
    /// Writes the error status if possible; returns the used length for the
    /// used ring (1 if the status byte was written, else 0).
    pub fn complete<M: GuestMemory + ?Sized>(&self, mem: &M) -> u32 {
        match self.status {
            Some(addr) if mem.write_obj(self.error.status(), addr).is_ok() => 1,
            _ => 0,
        }
    }
}

fn reject(error: ParseError, status: Option<GuestAddress>) -> Rejected {
    Rejected { error, status }
}

impl Request {
    /// Parses and validates the request in `chain`, reading the header and
    /// any discard/write-zeroes segments from the chain's guest memory.
    pub fn parse<M>(mut chain: DescriptorChain<M>, limits: &Limits) -> Result<Request, Rejected>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let descs: Vec<Descriptor> = chain.by_ref().collect();
        Self::from_descriptors(&descs, chain.memory(), limits)
    }

    /// Parses and validates the request made of `descs` (a chain's
    /// descriptors in order, indirect tables expanded, e.g. from
    /// [`descriptors_at`]), reading its header and segments from `mem`.
    pub fn from_descriptors<M: GuestMemory + ?Sized>(
        descs: &[Descriptor],
        mem: &M,
        limits: &Limits,
    ) -> Result<Request, Rejected> {
        let status = locate_status(descs, mem).map_err(|e| reject(e, None))?;
        parse_body(descs, mem, limits, status).map_err(|e| reject(e, Some(status)))
    }

    /// The request type.
    pub fn request_type(&self) -> RequestType {
        self.request_type
    }

    /// The header's sector (meaningful for IN and OUT).
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Total bytes in the data buffers.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The validated ranges of a DISCARD or WRITE_ZEROES request.
    pub fn ranges(&self) -> &[BlockRange] {
        &self.ranges
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// Writes `status` and returns the used length for the used ring:
    /// the `written` data bytes plus the status byte, or 0 if the status
    /// byte could not be written.
    pub fn complete<M: GuestMemory + ?Sized>(&self, mem: &M, status: u8, written: u32) -> u32 {
        match mem.write_obj(status, self.status) {
            Ok(()) => written.saturating_add(1),
            Err(_) => 0,
        }
    }
}

/// Finds the status byte: the last byte of the last descriptor.
fn locate_status<M: GuestMemory + ?Sized>(
    descs: &[Descriptor],
    mem: &M,
) -> Result<GuestAddress, ParseError> {
    let last = descs.last().ok_or(ParseError::EmptyChain)?;
    // virtio 1.2, 2.7.5.2: a driver MUST NOT create a chain longer than the
    // queue size nor a loop; virtio-queue stops iterating there, and we see
    // it as a final descriptor that still claims a successor.
    if last.has_next() {
        return Err(ParseError::BrokenChain(descs.len()));
    }
    // virtio 1.2, 5.2.6: a request is a device-readable header followed by
    // the data and a device-writable status byte, so it needs at least two
    // descriptors (the header and the status cannot share one: one
    // descriptor has a single direction).
    if descs.len() < 2 {
        return Err(ParseError::MissingStatus);
    }
    // virtio 1.2, 5.2.6: `u8 status` is the last field and device-writable.
    if !last.is_write_only() {
        return Err(ParseError::StatusNotWritable);
    }
    if last.len() == 0 {
        return Err(ParseError::EmptyStatus);
    }
    let addr = last
        .addr()
        .checked_add(u64::from(last.len() - 1))
        .ok_or(ParseError::StatusOutOfMemory(last.addr().0))?;
    if !mem.check_range(addr, 1, Permissions::Write) {
        return Err(ParseError::StatusOutOfMemory(addr.0));
    }
    Ok(addr)
}

fn parse_body<M: GuestMemory + ?Sized>(
    descs: &[Descriptor],
    mem: &M,
    limits: &Limits,
    status: GuestAddress,
) -> Result<Request, ParseError> {
    let header_size = RequestHeader::default().as_slice().len() as u32;
    let head = descs[0];
    // virtio 1.2, 5.2.6: the header is device-readable. We require it in
    // the first descriptor (2.7.4 lets the device rely on nothing else, but
    // every known driver does so and splitting 16 bytes is never useful).
    if head.is_write_only() {
        return Err(ParseError::HeaderNotReadable);
    }
    if head.len() < header_size {
        return Err(ParseError::ShortHeader(head.len()));
    }
    let header: RequestHeader =
        mem.read_obj(head.addr())
            .map_err(|source| ParseError::ReadHeader {
                addr: head.addr().0,
                source,
            })?;
    let request_type = RequestType::from(header.request_type.to_native());
    let sector = header.sector.to_native();

    // virtio 1.2, 2.7.4.2: "The driver MUST place any device-writable
    // descriptor elements after any device-readable descriptor elements."
    let first_writable = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
        return Err(ParseError::ReadableAfterWritable);
    }

    // Data buffers: whatever follows the header in the first descriptor,
    // the middle descriptors, and whatever precedes the status byte in the
    // last one (virtio 1.2, 2.7.4: message framing is up to the driver).
    let last = descs[descs.len() - 1];
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    if head.len() > header_size {
        readable.push(Buffer {
            addr: GuestAddress(head.addr().0.wrapping_add(u64::from(header_size))),
            len: head.len() - header_size,
        });
    }
    for d in &descs[1..descs.len() - 1] {
        if d.len() == 0 {
            continue;
        }
        let buffer = Buffer {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(buffer);
        } else {
            readable.push(buffer);
        }
    }
    if last.len() > 1 {
        writable.push(Buffer {
            addr: last.addr(),
            len: last.len() - 1,
        });
    }

    let mut request = Request {
        request_type,
        sector,
        data: Vec::new(),
        data_len: 0,
        ranges: Vec::new(),
        status,
    };
    match request_type {
        RequestType::In | RequestType::Out => {
            // virtio 1.2, 5.2.6: IN data is device-writable, OUT data is
            // device-readable.
            let (data, wrong) = if request_type == RequestType::In {
                (writable, readable)
            } else {
                (readable, writable)
            };
            if !wrong.is_empty() {
                return Err(ParseError::WrongDirection(request_type));
            }
            check_io(&data, sector, limits)?;
            check_in_memory(&data, mem, request_type)?;
            request.data_len = total_len(&data);
            request.data = data;
        }
        RequestType::GetId => {
            // virtio 1.2, 5.2.6: GET_ID data is device-writable and (5.2.6.1)
            // "The length of data MUST be 20 bytes".
            if !readable.is_empty() {
                return Err(ParseError::WrongDirection(request_type));
            }
            let len = total_len(&writable);
            if len < ID_BYTES as u64 {
                return Err(ParseError::ShortIdBuffer(len));
            }
            check_in_memory(&writable, mem, request_type)?;
            request.data_len = len;
            request.data = writable;
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            // virtio 1.2, 5.2.6: the segments are device-readable data.
            if !writable.is_empty() {
                return Err(ParseError::WrongDirection(request_type));
            }
            check_in_memory(&readable, mem, request_type)?;
            request.ranges = parse_ranges(&readable, mem, request_type, limits)?;
        }
        // FLUSH carries no data (any the driver attached is ignored, never
        // touched); unknown types only need their status byte.
        RequestType::Flush | RequestType::Unsupported(_) => {}
    }
    Ok(request)
}

fn total_len(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// Size and range checks of an IN or OUT request.
fn check_io(data: &[Buffer], sector: u64, limits: &Limits) -> Result<(), ParseError> {
    // VIRTIO_BLK_F_SEG_MAX (virtio 1.2, 5.2.3): seg_max is the maximum number
    // of segments in a request; we refuse more rather than trust them.
    if data.len() > limits.seg_max as usize {
        return Err(ParseError::TooManySegments {
            count: data.len(),
            max: limits.seg_max,
        });
    }
    let len = total_len(data);
    if len > u64::from(limits.max_request_bytes) {
        return Err(ParseError::TooLarge {
            len,
            max: limits.max_request_bytes,
        });
    }
    // virtio 1.2, 5.2.6.1: "The length of data MUST be a multiple of 512
    // bytes for VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT requests."
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseError::UnalignedLength(len));
    }
    // virtio 1.2, 5.2.6.1: "A driver MUST NOT submit a request which would
    // cause a read or write beyond capacity."
    check_sectors(sector, len >> SECTOR_SHIFT, limits.capacity)
}

fn check_sectors(sector: u64, sectors: u64, capacity: u64) -> Result<(), ParseError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Every buffer lies entirely inside guest memory with the access the
/// request type needs (virtio 1.2, 2.7.5: buffers are guest-physical).
fn check_in_memory<M: GuestMemory + ?Sized>(
    buffers: &[Buffer],
    mem: &M,
    request_type: RequestType,
) -> Result<(), ParseError> {
    let access = match request_type {
        RequestType::In | RequestType::GetId => Permissions::Write,
        _ => Permissions::Read,
    };
    for b in buffers {
        let inside = b.addr.0.checked_add(u64::from(b.len)).is_some()
            && mem.check_range(b.addr, b.len as usize, access);
        if !inside {
            return Err(ParseError::DataOutOfMemory {
                addr: b.addr.0,
                len: b.len,
            });
        }
    }
    Ok(())
}

/// Reads and validates the `virtio_blk_discard_write_zeroes` segments.
fn parse_ranges<M: GuestMemory + ?Sized>(
    data: &[Buffer],
    mem: &M,
    request_type: RequestType,
    limits: &Limits,
) -> Result<Vec<BlockRange>, ParseError> {
    let segment_size = DiscardWriteZeroes::default().as_slice().len() as u64;
    let (max_seg, max_sectors) = if request_type == RequestType::Discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let len = total_len(data);
    if len == 0 || !len.is_multiple_of(segment_size) {
        return Err(ParseError::BadSegmentPayload(len));
    }
    let count = len / segment_size;
    // virtio 1.2, 5.2.6.1: the driver MUST NOT exceed max_discard_seg /
    // max_write_zeroes_seg segments; checked before reading anything so a
    // huge payload costs nothing.
    if count > u64::from(max_seg) {
        return Err(ParseError::TooManyRanges {
            count,
            max: max_seg,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    let mut filled = 0usize;
    for b in data {
        let end = filled + b.len as usize;
        mem.read_slice(&mut bytes[filled..end], b.addr)
            .map_err(ParseError::ReadSegments)?;
        filled = end;
    }

    let mut ranges = Vec::with_capacity(count as usize);
    for raw in bytes.chunks_exact(segment_size as usize) {
        let Some(segment) = DiscardWriteZeroes::from_slice(raw).copied() else {
            return Err(ParseError::BadSegmentPayload(len));
        };
        let flags = segment.flags.to_native();
        let sector = segment.sector.to_native();
        let sectors = segment.num_sectors.to_native();
        // virtio 1.2, 5.2.6.2: unknown flags and unmap on a discard earn
        // VIRTIO_BLK_S_UNSUPP (see ParseError::status).
        if flags & !SEGMENT_FLAG_UNMAP != 0 {
            return Err(ParseError::UnsupportedFlags(flags));
        }
        let unmap = flags & SEGMENT_FLAG_UNMAP != 0;
        if unmap && request_type == RequestType::Discard {
            return Err(ParseError::DiscardWithUnmap);
        }
        // virtio 1.2, 5.2.6.1: num_sectors MUST NOT exceed
        // max_discard_sectors / max_write_zeroes_sectors.
        if sectors > max_sectors {
            return Err(ParseError::RangeTooLarge {
                sectors,
                max: max_sectors,
            });
        }
        // virtio 1.2, 5.2.6.1: no access beyond capacity.
        check_sectors(sector, u64::from(sectors), limits.capacity)?;
        ranges.push(BlockRange {
            offset: sector << SECTOR_SHIFT,
            len: u64::from(sectors) << SECTOR_SHIFT,
            unmap,
        });
    }
    Ok(ranges)
}
