//! The block-layer seam.
//!
//! Everything below the virtio request layer (the snapshot reader, the
//! copy-on-write overlay, the migration target) implements [`BlockDevice`].
//! Nothing behind this trait knows anything about virtio: requests arrive
//! as byte offsets and lengths, already validated against [`BlockDevice::size`].
//!
//! Request data reaches a device as guest memory: [`VolatileSlice`]s
//! handed to [`BlockDevice::read_vectored_at`] and
//! [`BlockDevice::write_vectored_at`]. The defaults go through a scratch
//! buffer and the byte-slice methods, so a layer works with only those;
//! a layer that overrides them moves the data with one copy (or none:
//! `preadv` into the slices, see `crate::wire::preadv_all`).
//! [`sub_slices`] and [`copy_to_slices`] help such an override serve a
//! request range by range.

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

/// The part of `bufs` holding bytes `start..start + len` of their
/// concatenation, for a layer that serves a request range by range (e.g.
/// some blocks from its own file, the rest from the layer below).
pub fn sub_slices<'a>(
    bufs: &[VolatileSlice<'a>],
    start: usize,
    len: usize,
) -> io::Result<Vec<VolatileSlice<'a>>> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (start, len);
    for buf in bufs {
        if want == 0 {
            break;
        }
        if skip >= buf.len() {
            skip -= buf.len();
            continue;
        }
        let n = (buf.len() - skip).min(want);
        out.push(buf.subslice(skip, n).map_err(io::Error::other)?);
        want -= n;
        skip = 0;
    }
    if want > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {start}+{len} is beyond the buffers"),
        ));
    }
    Ok(out)
}

/// Copies `src` into the concatenation of `bufs` from byte `start` on: a
/// layer holding data in memory (a cache) fills guest buffers with one
/// copy this way.
pub fn copy_to_slices(bufs: &[VolatileSlice<'_>], start: usize, src: &[u8]) -> io::Result<()> {
    let mut done = 0;
    for piece in sub_slices(bufs, start, src.len())? {
        piece.copy_from(&src[done..done + piece.len()]);
        done += piece.len();
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    #[test]
    fn sub_slices_and_copies_follow_the_concatenation() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        // Three buffers of 100, 50 and 200 bytes, not adjacent.
        let bufs: Vec<VolatileSlice<'_>> = [(0u64, 100usize), (1000, 50), (5000, 200)]
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len).unwrap())
            .collect();
        let lens = |v: &[VolatileSlice<'_>]| v.iter().map(|s| s.len()).collect::<Vec<_>>();
        assert_eq!(lens(&sub_slices(&bufs, 0, 350).unwrap()), [100, 50, 200]);
        assert_eq!(lens(&sub_slices(&bufs, 90, 70).unwrap()), [10, 50, 10]);
        assert_eq!(lens(&sub_slices(&bufs, 150, 200).unwrap()), [200]);
        assert!(sub_slices(&bufs, 150, 0).unwrap().is_empty());
        assert!(sub_slices(&bufs, 300, 51).is_err());
        assert!(sub_slices(&bufs, usize::MAX, 1).is_err());

        let src: Vec<u8> = (1..=70).collect();
        copy_to_slices(&bufs, 90, &src).unwrap();
        let read = |addr, len| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        };
        assert_eq!(read(90, 10), src[..10]);
        assert_eq!(read(1000, 50), src[10..60]);
        assert_eq!(read(5000, 10), src[60..]);
        assert_eq!(read(5010, 1), [0]);
        assert!(copy_to_slices(&bufs, 340, &src[..11]).is_err());
    }
}
