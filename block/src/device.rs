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
//! `preadv` into the slices, see `crate::io::preadv_all`).
//! [`SliceCursor`] (and [`sub_slices`], [`copy_to_slices`]) help such an
//! override serve a request range by range: the overlay hands the slices
//! of its present blocks to `preadv` and those of the others to the layer
//! below, the snapshot layer copies each cached chunk into them once and
//! writes zeroes for zero chunks.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use crate::io::preadv_all;

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

    /// Whether a read of `len` bytes at `offset` would be served from
    /// memory right now (cached chunks, zero chunks, memory devices),
    /// without waiting for a store fetch. A scheduling hint only: the
    /// vhost-user worker runs such reads on the queue's own thread instead
    /// of handing them to its I/O pool. It must be cheap (no I/O, no
    /// blocking lock) and may be wrong; `false`, the default, is always safe.
    fn read_is_cheap(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
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
        read_through_scratch(bufs, offset, |piece, at| self.read_at(piece, at))
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
        scratch_pieces(bufs, offset, |guest, piece, at| {
            guest.copy_to(piece);
            self.write_at(piece, at)
        })
    }
}

/// Fills `bufs` from `offset` with `read` (a byte-slice read such as
/// `read_at`) through this thread's scratch buffer, one piece of at most
/// [`SCRATCH_CHUNK`] at a time: the default vectored read, for sources
/// that cannot fill guest memory themselves. Costs one extra copy.
pub fn read_through_scratch(
    bufs: &[VolatileSlice<'_>],
    offset: u64,
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    scratch_pieces(bufs, offset, |guest, piece, at| {
        read(piece, at)?;
        guest.copy_from(piece);
        Ok(())
    })
}

/// Walks `bufs` (device bytes from `offset` on) in pieces of at most
/// [`SCRATCH_CHUNK`], handing `f` each piece of guest memory, this
/// thread's scratch buffer cut to its length, and its device offset.
fn scratch_pieces(
    bufs: &[VolatileSlice<'_>],
    offset: u64,
    mut f: impl FnMut(VolatileSlice<'_>, &mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    with_scratch(|scratch| {
        let mut at = offset;
        for buf in bufs {
            let mut done = 0;
            while done < buf.len() {
                let n = (buf.len() - done).min(SCRATCH_CHUNK);
                let guest = buf.subslice(done, n).map_err(io::Error::other)?;
                f(guest, scratch_slice(scratch, n), at)?;
                done += n;
                at += n as u64;
            }
        }
        Ok(())
    })
}

/// The destination of a whole read, handed out range by range: a byte
/// buffer ([`BlockDevice::read_at`]) or guest memory
/// ([`BlockDevice::read_vectored_at`]). A layer that serves a request from
/// several places writes its logic once over [`ReadRun`] and moves guest
/// data with as few copies as each place allows.
#[derive(Debug)]
pub enum ReadDest<'b, 'a> {
    /// A byte buffer and how much of it is handed out.
    Bytes {
        /// The buffer.
        buf: &'b mut [u8],
        /// Bytes handed out so far.
        at: usize,
    },
    /// Guest memory, and the slices of the range last handed out.
    Guest {
        /// Position in the guest buffers.
        cursor: SliceCursor<'b, 'a>,
        /// The pieces of the current range.
        run: Vec<VolatileSlice<'a>>,
    },
}

impl<'b, 'a> ReadDest<'b, 'a> {
    /// A byte buffer.
    pub fn bytes(buf: &'b mut [u8]) -> Self {
        ReadDest::Bytes { buf, at: 0 }
    }

    /// Guest memory.
    pub fn guest(bufs: &'b [VolatileSlice<'a>]) -> Self {
        ReadDest::Guest {
            cursor: SliceCursor::new(bufs),
            run: Vec::new(),
        }
    }

    /// The next `len` bytes of the destination.
    pub fn next_run(&mut self, len: usize) -> io::Result<ReadRun<'_, 'a>> {
        match self {
            ReadDest::Bytes { buf, at } => {
                let start = *at;
                let out = start
                    .checked_add(len)
                    .and_then(|end| buf.get_mut(start..end))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("range {start}+{len} is beyond the buffer"),
                        )
                    })?;
                *at += len;
                Ok(ReadRun::Bytes(out))
            }
            ReadDest::Guest { cursor, run } => {
                cursor.take(len, run)?;
                Ok(ReadRun::Guest(run))
            }
        }
    }
}

/// One range of a [`ReadDest`].
#[derive(Debug)]
pub enum ReadRun<'r, 'a> {
    /// Part of a byte buffer.
    Bytes(&'r mut [u8]),
    /// Guest memory: written, never read back.
    Guest(&'r [VolatileSlice<'a>]),
}

impl ReadRun<'_, '_> {
    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        match self {
            ReadRun::Bytes(buf) => buf.len(),
            ReadRun::Guest(bufs) => bufs.iter().map(|b| b.len()).sum(),
        }
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` (exactly [`ReadRun::len`] bytes) in.
    pub fn copy_from(&mut self, src: &[u8]) -> io::Result<()> {
        match self {
            ReadRun::Bytes(buf) if buf.len() == src.len() => {
                buf.copy_from_slice(src);
                Ok(())
            }
            ReadRun::Bytes(buf) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes do not fill a {}-byte buffer",
                    src.len(),
                    buf.len()
                ),
            )),
            ReadRun::Guest(bufs) => SliceCursor::new(bufs).copy_from(src),
        }
    }

    /// Fills the range with zeroes.
    pub fn fill_zeroes(&mut self) -> io::Result<()> {
        let len = self.len();
        match self {
            ReadRun::Bytes(buf) => {
                buf.fill(0);
                Ok(())
            }
            ReadRun::Guest(bufs) => SliceCursor::new(bufs).fill_zeroes(len),
        }
    }

    /// Fills the range from `dev` at `offset`, vectored for guest memory.
    pub fn read_device(&mut self, dev: &dyn BlockDevice, offset: u64) -> io::Result<()> {
        match self {
            ReadRun::Bytes(buf) => dev.read_at(buf, offset),
            ReadRun::Guest(bufs) => dev.read_vectored_at(bufs, offset),
        }
    }

    /// Fills the range from `file` at `offset`: `preadv` straight into
    /// guest memory. Reaching the end of the file first is an error.
    pub fn read_file(&mut self, file: &File, offset: u64) -> io::Result<()> {
        match self {
            ReadRun::Bytes(buf) => file.read_exact_at(buf, offset),
            ReadRun::Guest(bufs) => preadv_all(file, bufs, offset),
        }
    }
}

/// Total length of `bufs` in bytes.
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Largest zero-filled piece [`SliceCursor::fill_zeroes`] copies at once.
const ZERO_PIECE: usize = 64 << 10;

static ZEROES: [u8; ZERO_PIECE] = [0; ZERO_PIECE];

/// A position in the concatenation of guest buffers, for a layer that
/// serves a request front to back, range by range (some blocks from its
/// own file, some from the layer below, a zero chunk...). Each call
/// consumes the next bytes, so a request of many buffers is walked once
/// however many ranges it is split into.
///
/// Like every vectored path, the cursor only ever writes guest memory.
#[derive(Debug)]
pub struct SliceCursor<'s, 'a> {
    bufs: &'s [VolatileSlice<'a>],
    /// Index of the buffer holding the next byte.
    index: usize,
    /// Bytes of `bufs[index]` already consumed.
    within: usize,
    /// Bytes consumed in all.
    consumed: usize,
}

impl<'s, 'a> SliceCursor<'s, 'a> {
    /// A cursor at the first byte of `bufs`.
    pub fn new(bufs: &'s [VolatileSlice<'a>]) -> Self {
        SliceCursor {
            bufs,
            index: 0,
            within: 0,
            consumed: 0,
        }
    }

    /// Consumes the next `len` bytes, handing `f` the pieces of buffer
    /// holding them, in order. Running past the end is an error.
    fn advance(
        &mut self,
        len: usize,
        mut f: impl FnMut(VolatileSlice<'a>) -> io::Result<()>,
    ) -> io::Result<()> {
        let start = self.consumed;
        let mut want = len;
        while want > 0 {
            let Some(buf) = self.bufs.get(self.index) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {start}+{len} is beyond the buffers"),
                ));
            };
            let n = (buf.len() - self.within).min(want);
            if n > 0 {
                f(buf.subslice(self.within, n).map_err(io::Error::other)?)?;
            }
            self.within += n;
            self.consumed += n;
            want -= n;
            if self.within == buf.len() {
                self.index += 1;
                self.within = 0;
            }
        }
        Ok(())
    }

    /// Skips the next `len` bytes.
    pub fn skip(&mut self, len: usize) -> io::Result<()> {
        self.advance(len, |_| Ok(()))
    }

    /// Replaces the contents of `out` with the pieces of buffer holding the
    /// next `len` bytes (for a layer below to fill), reusing its allocation.
    pub fn take(&mut self, len: usize, out: &mut Vec<VolatileSlice<'a>>) -> io::Result<()> {
        out.clear();
        self.advance(len, |piece| {
            out.push(piece);
            Ok(())
        })
    }

    /// Copies `src` into the next `src.len()` bytes.
    pub fn copy_from(&mut self, src: &[u8]) -> io::Result<()> {
        let mut done = 0;
        self.advance(src.len(), |piece| {
            piece.copy_from(&src[done..done + piece.len()]);
            done += piece.len();
            Ok(())
        })
    }

    /// Writes zeroes to the next `len` bytes.
    pub fn fill_zeroes(&mut self, len: usize) -> io::Result<()> {
        self.advance(len, |piece| {
            let mut at = 0;
            while at < piece.len() {
                let n = (piece.len() - at).min(ZERO_PIECE);
                piece
                    .subslice(at, n)
                    .map_err(io::Error::other)?
                    .copy_from(&ZEROES[..n]);
                at += n;
            }
            Ok(())
        })
    }
}

/// The part of `bufs` holding bytes `start..start + len` of their
/// concatenation, for a layer that serves a request range by range (e.g.
/// some blocks from its own file, the rest from the layer below). A layer
/// walking a request front to back uses a [`SliceCursor`] instead.
pub fn sub_slices<'a>(
    bufs: &[VolatileSlice<'a>],
    start: usize,
    len: usize,
) -> io::Result<Vec<VolatileSlice<'a>>> {
    let mut cursor = SliceCursor::new(bufs);
    cursor.skip(start)?;
    let mut out = Vec::new();
    cursor.take(len, &mut out)?;
    Ok(out)
}

/// Copies `src` into the concatenation of `bufs` from byte `start` on: a
/// layer holding data in memory (a cache) fills guest buffers with one
/// copy this way.
pub fn copy_to_slices(bufs: &[VolatileSlice<'_>], start: usize, src: &[u8]) -> io::Result<()> {
    let mut cursor = SliceCursor::new(bufs);
    cursor.skip(start)?;
    cursor.copy_from(src)
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
pub(crate) mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    /// What guest memory not handed to a device holds.
    const CANARY: u8 = 0xe7;

    /// Buffer lengths cutting `len` bytes at `cuts` (each taken modulo
    /// `len + 1`, so any values do; repeated cuts make empty buffers).
    pub(crate) fn split_lens(len: usize, cuts: &[usize]) -> Vec<usize> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
        at.sort_unstable();
        let mut lens = Vec::with_capacity(at.len() + 1);
        let mut prev = 0;
        for c in at.into_iter().chain([len]) {
            lens.push(c - prev);
            prev = c;
        }
        lens
    }

    /// Reads `dev` at `offset` with `read_vectored_at` into guest buffers
    /// of `lens` bytes, placed apart at odd guest addresses, and returns
    /// their concatenation. Panics if the device wrote guest memory
    /// outside the buffers.
    pub(crate) fn read_vectored(
        dev: &dyn BlockDevice,
        offset: u64,
        lens: &[usize],
    ) -> io::Result<Vec<u8>> {
        // Buffer i starts 3 + 5 * (i % 4) bytes after the previous one's end.
        let gap = |i: usize| 3 + 5 * (i % 4) as u64;
        let total: u64 = lens.iter().map(|&l| l as u64).sum();
        let mem_len = total + lens.len() as u64 * 20 + 64;
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_len as usize)]).unwrap();
        mem.write_slice(&vec![CANARY; mem_len as usize], GuestAddress(0))
            .unwrap();
        let mut places = Vec::with_capacity(lens.len());
        let mut addr = 0;
        for (i, &len) in lens.iter().enumerate() {
            addr += gap(i);
            places.push((addr, len));
            addr += len as u64;
        }
        let bufs: Vec<VolatileSlice<'_>> = places
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len).unwrap())
            .collect();
        dev.read_vectored_at(&bufs, offset)?;
        let mut all = vec![0u8; mem_len as usize];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        let mut out = Vec::with_capacity(total as usize);
        let mut prev_end = 0;
        for &(addr, len) in &places {
            let (start, end) = (addr as usize, addr as usize + len);
            assert!(
                all[prev_end..start].iter().all(|&b| b == CANARY),
                "the device wrote guest memory before byte {start}"
            );
            out.extend_from_slice(&all[start..end]);
            prev_end = end;
        }
        assert!(
            all[prev_end..].iter().all(|&b| b == CANARY),
            "the device wrote guest memory past the last buffer"
        );
        Ok(out)
    }

    /// Checks that `read_vectored_at` over buffers of `lens` bytes returns
    /// what `read_at` does at `offset` (and fails where it fails).
    pub(crate) fn check_vectored_read(dev: &dyn BlockDevice, offset: u64, lens: &[usize]) {
        let total = lens.iter().sum();
        let mut want = vec![0u8; total];
        let plain = dev.read_at(&mut want, offset);
        match read_vectored(dev, offset, lens) {
            Ok(got) => {
                assert!(
                    plain.is_ok(),
                    "read_at failed but the vectored read did not"
                );
                assert!(
                    got == want,
                    "vectored read of {total} bytes at {offset} in buffers {lens:?} differs"
                );
            }
            Err(e) => assert!(plain.is_err(), "vectored read failed: {e}"),
        }
    }

    #[test]
    fn a_cursor_walks_the_buffers_once_in_order() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 18)]).unwrap();
        mem.write_slice(&vec![CANARY; 1 << 18], GuestAddress(0))
            .unwrap();
        // 10, 0, 70_000 and 30 bytes: a zero fill longer than its piece
        // size, an empty buffer, pieces across every boundary.
        let places = [(1u64, 10usize), (20, 0), (40, 70_000), (80_000, 30)];
        let bufs: Vec<VolatileSlice<'_>> = places
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len).unwrap())
            .collect();
        let mut cursor = SliceCursor::new(&bufs);
        cursor.copy_from(&[1; 4]).unwrap();
        let mut taken = Vec::new();
        cursor.take(8, &mut taken).unwrap();
        assert_eq!(taken.iter().map(|s| s.len()).collect::<Vec<_>>(), [6, 2]);
        taken[0].copy_from(&[2u8; 6]);
        taken[1].copy_from(&[3u8; 2]);
        cursor.fill_zeroes(70_000).unwrap();
        cursor.skip(3).unwrap();
        cursor.copy_from(&[4; 25]).unwrap();
        assert!(cursor.copy_from(&[5; 3]).is_err(), "ran past the buffers");
        let read = |addr, len| {
            let mut v = vec![0u8; len];
            mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        };
        let mut want = vec![1u8; 4];
        want.extend([2; 6]);
        assert_eq!(read(1, 10), want);
        assert_eq!(read(40, 2), [3, 3]);
        assert!(read(42, 69_998).iter().all(|&b| b == 0));
        assert_eq!(read(80_000, 5), [0, 0, CANARY, CANARY, CANARY]);
        assert_eq!(read(80_005, 25), [4; 25]);
        assert_eq!(read(11, 29), [CANARY; 29]);
        assert_eq!(read(70_040, 1), [CANARY]);
    }

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
