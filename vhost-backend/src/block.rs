//! The block-layer seam.
//!
//! Everything below the virtio request layer (the snapshot reader, the
//! copy-on-write overlay, the migration target) implements [`BlockDevice`].
//! Nothing behind this trait knows anything about virtio: requests arrive
//! as byte offsets and lengths, already validated against [`BlockDevice::size`].

use std::cell::RefCell;
use std::io;

use vm_memory::VolatileSlice;

/// Largest piece the default vectored methods move through their scratch
/// buffer at once, so a thread never holds more than this however large
/// the request.
pub const SCRATCH_CHUNK: usize = 1 << 20;

thread_local! {
    /// Per-thread scratch of the default vectored methods: reused, so a
    /// request costs no allocation once the thread has warmed up.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A byte-addressed block device shared by all queue workers.
///
/// Callers guarantee `offset + len <= size()`; implementations still return
/// an error rather than panic if that is violated.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Fills `buf` with the device contents starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// The guest no longer needs `len` bytes at `offset`; they read back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// `len` bytes at `offset` read back as zeroes from now on.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Fills `bufs`, in order, with the device contents starting at
    /// `offset` (like [`BlockDevice::read_at`] on their concatenation).
    ///
    /// `bufs` are memory shared with another process (guest memory): it
    /// may change at any time, so implementations only write it, never
    /// read it back. Override this to copy straight into `bufs` (e.g. one
    /// `preadv`); the default reads through a per-thread scratch buffer
    /// and costs one extra copy.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        with_scratch(|scratch| {
            let mut at = offset;
            for buf in bufs {
                let mut done = 0;
                while done < buf.len() {
                    let n = (buf.len() - done).min(SCRATCH_CHUNK);
                    let piece = scratch_slice(scratch, n);
                    self.read_at(piece, at)?;
                    buf.offset(done).map_err(io::Error::other)?.copy_from(piece);
                    done += n;
                    at += n as u64;
                }
            }
            Ok(())
        })
    }

    /// Writes the concatenation of `bufs` at `offset` (like
    /// [`BlockDevice::write_at`]).
    ///
    /// `bufs` are shared memory that may change while this runs; an
    /// implementation that reads any byte twice (hashing, compressing,
    /// checking for zeroes) must first copy it. The default copies each
    /// piece into a per-thread scratch buffer and calls `write_at`, so the
    /// device always sees a stable private copy.
    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        with_scratch(|scratch| {
            let mut at = offset;
            for buf in bufs {
                let mut done = 0;
                while done < buf.len() {
                    let n = (buf.len() - done).min(SCRATCH_CHUNK);
                    let piece = scratch_slice(scratch, n);
                    buf.offset(done).map_err(io::Error::other)?.copy_to(piece);
                    self.write_at(piece, at)?;
                    done += n;
                    at += n as u64;
                }
            }
            Ok(())
        })
    }
}

/// Runs `f` with this thread's scratch buffer, or a fresh one if the
/// scratch is already in use further up the stack (a layer whose default
/// method calls another layer's).
fn with_scratch<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Vec::new()),
    })
}

fn scratch_slice(scratch: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if scratch.len() < n {
        scratch.resize(n, 0);
    }
    &mut scratch[..n]
}
