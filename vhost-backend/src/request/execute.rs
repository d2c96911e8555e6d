//! Running a validated [`Request`] against a [`BlockDevice`].
//!
//! Request data never passes through a buffer of ours: the guest buffers
//! of an IN or OUT request become [`VolatileSlice`]s handed to
//! [`BlockDevice::read_vectored_at`] / [`BlockDevice::write_vectored_at`]
//! in one call, so a device that can (a file: `preadv`) moves the data
//! with no copy in user space, and one that cannot copies once through its
//! per-thread scratch buffer.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use super::{Buffer, Request, RequestType, STATUS_IOERR, STATUS_UNSUPP};
use crate::wire::{ID_BYTES, SECTOR_SHIFT};
use block::device::BlockDevice;

/// What a request runs against.
#[derive(Clone, Copy)]
pub struct ExecContext<'a> {
    /// The device.
    pub dev: &'a dyn BlockDevice,
    /// Refuse OUT, DISCARD and WRITE_ZEROES (the device offers `VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// The GET_ID string, NUL-padded.
    pub id: &'a [u8; ID_BYTES],
}

/// Why a valid request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// A write-type request on a read-only device.
    #[error("Refuse {0:?} on a read-only device")]
    ReadOnly(RequestType),
    /// The device failed a read.
    #[error("Read {len} bytes at offset {offset}")]
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Device error.
        #[source]
        source: io::Error,
    },
    /// The device failed a write.
    #[error("Write {len} bytes at offset {offset}")]
    Write {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Device error.
        #[source]
        source: io::Error,
    },
    /// The device failed a flush.
    #[error("Flush device")]
    Flush(#[source] io::Error),
    /// The device failed a discard.
    #[error("Discard {len} bytes at offset {offset}")]
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Device error.
        #[source]
        source: io::Error,
    },
    /// The device failed a write-zeroes.
    #[error("Write zeroes to {len} bytes at offset {offset}")]
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Device error.
        #[source]
        source: io::Error,
    },
    /// Copying request data out of guest memory failed.
    #[error("Copy request data from guest memory")]
    ReadGuest(#[source] GuestMemoryError),
    /// Copying request data into guest memory failed.
    #[error("Copy request data to guest memory")]
    WriteGuest(#[source] GuestMemoryError),
    /// The request type is not supported.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
}

impl ExecuteError {
    /// Whether the device (not the request) failed.
    pub fn is_device_error(&self) -> bool {
        matches!(
            self,
            ExecuteError::Read { .. }
                | ExecuteError::Write { .. }
                | ExecuteError::Flush(_)
                | ExecuteError::Discard { .. }
                | ExecuteError::WriteZeroes { .. }
        )
    }

    /// The status byte this error earns.
    pub fn status(&self) -> u8 {
        match self {
            // virtio 1.2, 5.2.6.2: unknown request types get VIRTIO_BLK_S_UNSUPP.
            ExecuteError::Unsupported(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

impl Request {
    /// Runs the request; returns the number of bytes written into guest
    /// data buffers (for the used length).
    pub fn execute<M: GuestMemory<Bitmap = ()> + ?Sized>(
        &self,
        ctx: &ExecContext<'_>,
        mem: &M,
    ) -> Result<u32, ExecuteError> {
        let writes = matches!(
            self.request_type,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        // virtio 1.2, 5.2.6.2: "A device MUST set the status byte to
        // VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO
        // feature if offered, and MUST NOT write any data."
        if writes && ctx.read_only {
            return Err(ExecuteError::ReadOnly(self.request_type));
        }
        let offset = self.sector << SECTOR_SHIFT;
        match self.request_type {
            RequestType::In => {
                let bufs = guest_slices(&self.data, mem, Permissions::Write)
                    .map_err(ExecuteError::WriteGuest)?;
                ctx.dev
                    .read_vectored_at(&bufs, offset)
                    .map_err(|source| ExecuteError::Read {
                        offset,
                        len: self.data_len as usize,
                        source,
                    })?;
                // data_len <= max_request_bytes, a u32.
                Ok(u32::try_from(self.data_len).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                let bufs = guest_slices(&self.data, mem, Permissions::Read)
                    .map_err(ExecuteError::ReadGuest)?;
                ctx.dev
                    .write_vectored_at(&bufs, offset)
                    .map_err(|source| ExecuteError::Write {
                        offset,
                        len: self.data_len as usize,
                        source,
                    })?;
                Ok(0)
            }
            RequestType::Flush => ctx.dev.flush().map(|()| 0).map_err(ExecuteError::Flush),
            RequestType::GetId => {
                // virtio 1.2, 5.2.6: the id is a NUL-padded string of up to
                // 20 bytes; we always write all 20.
                Cursor::new(&self.data)
                    .scatter(mem, ctx.id)
                    .map_err(ExecuteError::WriteGuest)?;
                Ok(ID_BYTES as u32)
            }
            RequestType::Discard => {
                for r in self.ranges.iter().filter(|r| r.len > 0) {
                    ctx.dev
                        .discard(r.offset, r.len)
                        .map_err(|source| ExecuteError::Discard {
                            offset: r.offset,
                            len: r.len,
                            source,
                        })?;
                }
                Ok(0)
            }
            RequestType::WriteZeroes => {
                // Zeroes must read back whether or not `unmap` is set
                // (virtio 1.2, 5.2.6.2); the device decides how.
                for r in self.ranges.iter().filter(|r| r.len > 0) {
                    ctx.dev.write_zeroes(r.offset, r.len).map_err(|source| {
                        ExecuteError::WriteZeroes {
                            offset: r.offset,
                            len: r.len,
                            source,
                        }
                    })?;
                }
                Ok(0)
            }
            RequestType::Unsupported(t) => Err(ExecuteError::Unsupported(t)),
        }
    }
}

/// The guest buffers as host slices, in order. A buffer that spans two
/// guest memory regions becomes two slices.
fn guest_slices<'m, M: GuestMemory<Bitmap = ()> + ?Sized>(
    buffers: &[Buffer],
    mem: &'m M,
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m>>, GuestMemoryError> {
    let mut out = Vec::with_capacity(buffers.len());
    for b in buffers {
        for slice in mem.get_slices(b.addr, b.len as usize, access)? {
            out.push(slice?);
        }
    }
    Ok(out)
}

/// A position inside a list of guest buffers.
struct Cursor<'a> {
    buffers: &'a [Buffer],
    index: usize,
    pos: u32,
}

impl<'a> Cursor<'a> {
    fn new(buffers: &'a [Buffer]) -> Self {
        Cursor {
            buffers,
            index: 0,
            pos: 0,
        }
    }

    /// The next contiguous guest piece of at most `want` bytes.
    fn next_piece(&mut self, want: usize) -> Result<(GuestAddress, usize), GuestMemoryError> {
        let b = self
            .buffers
            .get(self.index)
            .ok_or(GuestMemoryError::PartialBuffer {
                expected: want,
                completed: 0,
            })?;
        let n = ((b.len - self.pos) as usize).min(want);
        let addr = b
            .addr
            .0
            .checked_add(u64::from(self.pos))
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        // n <= b.len - pos, so this stays within u32.
        self.pos += n as u32;
        if self.pos == b.len {
            self.index += 1;
            self.pos = 0;
        }
        Ok((GuestAddress(addr), n))
    }

    /// Copies `src` into the guest buffers from the cursor on.
    fn scatter<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        mut src: &[u8],
    ) -> Result<(), GuestMemoryError> {
        while !src.is_empty() {
            let (addr, n) = self.next_piece(src.len())?;
            mem.write_slice(&src[..n], addr)?;
            src = &src[n..];
        }
        Ok(())
    }
}
