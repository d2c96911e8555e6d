//! Running a validated [`Request`] against a [`BlockDevice`].
//!
//! Data moves between guest memory and the device through the worker's
//! bounce buffer, at most [`BOUNCE_CHUNK`] bytes at a time, so a worker
//! never holds more than that however large the request.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::{Buffer, Request, RequestType, STATUS_IOERR, STATUS_UNSUPP};
use crate::block::BlockDevice;
use crate::wire::{ID_BYTES, SECTOR_SHIFT};

/// Largest amount of data moved through the bounce buffer in one step.
pub const BOUNCE_CHUNK: usize = 1 << 20;

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
    ///
    /// `bounce` is the worker's reusable buffer; it grows up to
    /// [`BOUNCE_CHUNK`] bytes.
    pub fn execute<M: GuestMemory + ?Sized>(
        &self,
        ctx: &ExecContext<'_>,
        mem: &M,
        bounce: &mut Vec<u8>,
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
            RequestType::In => self.read(ctx.dev, mem, bounce, offset),
            RequestType::Out => self.write(ctx.dev, mem, bounce, offset).map(|()| 0),
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

    fn read<M: GuestMemory + ?Sized>(
        &self,
        dev: &dyn BlockDevice,
        mem: &M,
        bounce: &mut Vec<u8>,
        offset: u64,
    ) -> Result<u32, ExecuteError> {
        let mut cursor = Cursor::new(&self.data);
        let mut done = 0u64;
        while done < self.data_len {
            let n = chunk_len(self.data_len - done);
            let buf = bounce_slice(bounce, n);
            let at = offset + done;
            dev.read_at(buf, at).map_err(|source| ExecuteError::Read {
                offset: at,
                len: n,
                source,
            })?;
            cursor.scatter(mem, buf).map_err(ExecuteError::WriteGuest)?;
            done += n as u64;
        }
        // data_len <= max_request_bytes, a u32.
        Ok(u32::try_from(done).unwrap_or(u32::MAX))
    }

    fn write<M: GuestMemory + ?Sized>(
        &self,
        dev: &dyn BlockDevice,
        mem: &M,
        bounce: &mut Vec<u8>,
        offset: u64,
    ) -> Result<(), ExecuteError> {
        let mut cursor = Cursor::new(&self.data);
        let mut done = 0u64;
        while done < self.data_len {
            let n = chunk_len(self.data_len - done);
            let buf = bounce_slice(bounce, n);
            cursor.gather(mem, buf).map_err(ExecuteError::ReadGuest)?;
            let at = offset + done;
            dev.write_at(buf, at)
                .map_err(|source| ExecuteError::Write {
                    offset: at,
                    len: n,
                    source,
                })?;
            done += n as u64;
        }
        Ok(())
    }
}

fn chunk_len(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(BOUNCE_CHUNK, |r| r.min(BOUNCE_CHUNK))
}

fn bounce_slice(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
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

    /// Fills `dst` from the guest buffers from the cursor on.
    fn gather<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        mut dst: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        while !dst.is_empty() {
            let (addr, n) = self.next_piece(dst.len())?;
            let (head, rest) = dst.split_at_mut(n);
            mem.read_slice(head, addr)?;
            dst = rest;
        }
        Ok(())
    }
}
