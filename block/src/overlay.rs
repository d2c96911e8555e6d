//! The copy-on-write overlay: where guest writes go, over the snapshot.
//!
//! Two files in the state dir:
//! - `overlay.data`, a sparse file of the image size: block `b` of the
//!   overlay lives at offset `b * 4096`, as in the image;
//! - `overlay.bitmap`, a [`PersistentBitmap`] with one bit per 4 KiB block,
//!   set when the overlay holds the block. Its header binds it to the
//!   snapshot, so state made for another snapshot is refused on open.
//!
//! # Operations
//!
//! - **Read**: the range is split into runs of blocks with the same bit;
//!   present runs are read from the data file, the others from the layer
//!   below (the snapshot layer), each run in one call. A vectored read
//!   (guest memory) hands the present runs' guest buffers to `preadv` and
//!   the others' to the layer below's vectored read: no copy here.
//! - **Write** never touches the layer below. Whole blocks are written to
//!   the data file, then their bits set. A write covering part of a block
//!   that the overlay does not hold yet first reads the whole block from
//!   below, merges, and writes the whole block (read-modify-write).
//! - **Discard / write-zeroes** make the range read back as zeroes without
//!   copying data: whole blocks get a hole punched in the data file
//!   (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, or written zeroes where the file
//!   system cannot punch) and their bits set; partial blocks are a
//!   read-modify-write with zeroes.
//! - **Flush**: fdatasync the data file (fsync if a hole was punched since
//!   the last flush, as punching changes the extent map), then write the
//!   dirty bitmap pages and fdatasync the bitmap; see
//!   [`PersistentBitmap::sync_after`].
//!
//! # Concurrency
//!
//! All mutations of a block range hold the block's stripe in a
//! [`LockTable`] (4096 stripes), so two partial writes to one block cannot
//! both read the old block from below and lose one another's bytes, and a
//! read-modify-write cannot overwrite a concurrent whole-block write or
//! discard with stale data. Reads take no lock: a bit is set only after its
//! block's data is in the data file, so a reader that sees the bit reads
//! the new data, and one that does not reads the unchanged layer below.
//! Bits never go from 1 to 0 while the overlay is open.
//!
//! | operation        | may run concurrently with |
//! |------------------|---------------------------|
//! | read             | everything |
//! | write / zeroes   | reads; mutations of other stripes |
//! | flush            | everything (flushes coalesce) |
//!
//! # Crash consistency
//!
//! Claim: after a crash, the reopened overlay reads every block as the
//! guest last wrote it before its last completed flush, or as a later
//! (unflushed) write left it. Unflushed writes may or may not survive, as
//! the virtio contract allows. Argument:
//!
//! 1. A bit is set in memory only after the block's data (or hole) is in
//!    the data file, and reaches the bitmap file only through a sync whose
//!    snapshot was taken before the data fdatasync began. So a bit on disk
//!    always describes durable data, also when a bitmap page write is torn
//!    (the bitmap module proves this: bits only go 0→1).
//! 2. A flush that completed persisted every bit set before it was called,
//!    together with the data of every write completed before it.
//! 3. A block whose bit is 0 after the crash was not held by the overlay at
//!    the last completed flush, so the guest's flushed view of it is the
//!    layer below, which is immutable: reads go there, and whatever an
//!    unflushed write left in the data file is never read. Before that
//!    block is used again, a whole-block write, a read-modify-write of the
//!    whole block or a punched hole replaces the leftovers.
//! 4. A block whose bit is 1 is read from the data file, which holds its
//!    flushed content or a later write (fdatasync'ed data is only ever
//!    overwritten by newer guest writes).
//!
//! `state.json` and the bitmap header are written once, atomically, before
//! any guest write; a missing bitmap with an existing data file is a state
//! that never held a flushed write, and is recreated empty.

mod locks;

#[cfg(test)]
mod proptests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::VolatileSlice;

pub use locks::{LockTable, RangeGuard};

use crate::bitmap::{self, BitmapHeader, BitmapKind, PersistentBitmap};
use crate::device::{total_len, BlockDevice, ReadDest};
use crate::file::check_bounds;
use crate::file::{sync_parent_dir, units_touched, RawFile};
use crate::state::{LayerFile, LayerState};

/// Overlay granularity: one bitmap bit per block of this many bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Number of stripes in the overlay's block lock table.
const LOCK_STRIPES: usize = 4096;

static ZEROES: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// Errors opening an overlay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or creating the data file failed.
    #[error("Failed to open overlay data file {path}")]
    OpenData {
        /// The data file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The data file has the wrong size.
    #[error("Overlay data file {path} is {found} bytes, expected {expected}")]
    DataSize {
        /// The data file.
        path: PathBuf,
        /// The image size.
        expected: u64,
        /// The file's size.
        found: u64,
    },
    /// The bitmap records blocks but the data file is gone.
    #[error("Overlay data file {path} is missing but its bitmap records {blocks} written blocks")]
    DataMissing {
        /// The data file.
        path: PathBuf,
        /// Set bits in the bitmap.
        blocks: u64,
    },
    /// Opening or creating the bitmap failed.
    #[error("Failed to open the overlay bitmap")]
    Bitmap(#[source] bitmap::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the device is read-only")
}

/// A copy-on-write [`BlockDevice`] over a lower layer. See the module doc.
pub struct Overlay {
    lower: Arc<dyn BlockDevice>,
    data: RawFile,
    data_path: PathBuf,
    bitmap: PersistentBitmap,
    size: u64,
    locks: LockTable,
    read_only: bool,
}

impl Overlay {
    /// Opens the overlay in `state` (its `overlay.data` and
    /// `overlay.bitmap`), bound to the state's snapshot, creating it empty
    /// if it does not exist yet.
    pub fn open_in(state: &dyn LayerState, lower: Arc<dyn BlockDevice>) -> Result<Overlay> {
        Self::open(
            &state.path(LayerFile::OverlayData),
            &state.path(LayerFile::OverlayBitmap),
            &state.binding_tag(),
            lower,
        )
    }

    /// Opens the overlay stored in `data_path` and `bitmap_path` over
    /// `lower`, creating it empty if the bitmap does not exist. `binding`
    /// names the snapshot (at most 256 bytes); an overlay made for another
    /// binding or image size is refused.
    pub fn open(
        data_path: &Path,
        bitmap_path: &Path,
        binding: &str,
        lower: Arc<dyn BlockDevice>,
    ) -> Result<Overlay> {
        let size = lower.size();
        let header = BitmapHeader {
            kind: BitmapKind::OverlayBlocks,
            granule: BLOCK_SIZE as u32,
            image_size: size,
            binding: binding.to_string(),
        };
        let open_err = |source| Error::OpenData {
            path: data_path.to_path_buf(),
            source,
        };
        let bitmap_exists = bitmap_path.try_exists().map_err(|source| {
            Error::Bitmap(bitmap::Error::Read {
                path: bitmap_path.to_path_buf(),
                source,
            })
        })?;
        let mut bitmap = None;
        if bitmap_exists {
            // Checks the binding before touching the data file.
            let bm = PersistentBitmap::open(bitmap_path, &header).map_err(Error::Bitmap)?;
            match OpenOptions::new().read(true).write(true).open(data_path) {
                Ok(data) => {
                    let found = data.metadata().map_err(open_err)?.len();
                    if found != size {
                        return Err(Error::DataSize {
                            path: data_path.to_path_buf(),
                            expected: size,
                            found,
                        });
                    }
                    tracing::info!(
                        data = %data_path.display(),
                        blocks = bm.count_ones(),
                        "opened overlay"
                    );
                    return Ok(Self::assemble(lower, data, data_path, bm, size));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && bm.count_ones() == 0 => {
                    bitmap = Some(bm);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::DataMissing {
                        path: data_path.to_path_buf(),
                        blocks: bm.count_ones(),
                    })
                }
                Err(e) => return Err(open_err(e)),
            }
        }
        // A fresh overlay: the data file first, then the bitmap that makes
        // it valid (a crash in between leaves a data file without bitmap,
        // which is recreated here next time).
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(data_path)
            .map_err(open_err)?;
        data.set_len(size).map_err(open_err)?;
        data.sync_all().map_err(open_err)?;
        sync_parent_dir(data_path).map_err(open_err)?;
        let bm = match bitmap {
            Some(bm) => bm,
            None => PersistentBitmap::create(bitmap_path, &header).map_err(Error::Bitmap)?,
        };
        tracing::info!(data = %data_path.display(), size, "created overlay");
        Ok(Self::assemble(lower, data, data_path, bm, size))
    }

    fn assemble(
        lower: Arc<dyn BlockDevice>,
        data: File,
        data_path: &Path,
        bitmap: PersistentBitmap,
        size: u64,
    ) -> Overlay {
        Overlay {
            lower,
            data: RawFile::new(data),
            data_path: data_path.to_path_buf(),
            bitmap,
            size,
            locks: LockTable::new(LOCK_STRIPES),
            read_only: false,
        }
    }

    /// Refuses (or allows again) writes, discards and write-zeroes; reads
    /// still see the overlay's blocks.
    pub fn with_read_only(mut self, read_only: bool) -> Overlay {
        self.read_only = read_only;
        self
    }

    /// The layer below.
    pub fn lower(&self) -> &Arc<dyn BlockDevice> {
        &self.lower
    }

    /// The allocation bitmap (one bit per [`BLOCK_SIZE`] block).
    pub fn bitmap(&self) -> &PersistentBitmap {
        &self.bitmap
    }

    /// The block lock table. Holding a block's stripe keeps every overlay
    /// mutation of that block out.
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// The data file's path.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Whether the overlay holds block `block`.
    pub fn is_present(&self, block: u64) -> bool {
        self.bitmap.get(block)
    }

    /// Whether the overlay holds any block touching `offset..offset + len`.
    pub fn any_present(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset.saturating_add(len) - 1) / BLOCK_SIZE;
        let (present, run) = self.bitmap.run(first, last + 1);
        present || (run > 0 && first + run <= last)
    }

    /// Bytes of the image the overlay holds (written, discarded or zeroed
    /// blocks), a multiple of [`BLOCK_SIZE`].
    pub fn allocated_bytes(&self) -> u64 {
        self.bitmap.count_ones() * BLOCK_SIZE
    }

    fn block_end(&self, block: u64) -> u64 {
        (block * BLOCK_SIZE + BLOCK_SIZE).min(self.size)
    }

    /// Reads `len` bytes at `offset` into `dest`: split into runs of
    /// blocks with the same bit, present runs from the data file, the
    /// others from the layer below.
    fn read_into(&self, mut dest: ReadDest<'_, '_>, offset: u64, len: u64) -> io::Result<()> {
        check_bounds(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let last_block = (end - 1) / BLOCK_SIZE;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (present, blocks) = self.bitmap.run(block, last_block + 1);
            let run_end = end.min((block + blocks.max(1)) * BLOCK_SIZE);
            // A run lies inside one request, whose length is a usize.
            let mut run = dest.next_run((run_end - pos) as usize)?;
            if present {
                run.read_file(&self.data, pos)?;
            } else {
                run.read_device(self.lower.as_ref(), pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `piece` at `pos` inside block `block` (the caller holds the
    /// block's stripe). If the overlay does not hold the block yet, the
    /// rest of it comes from below.
    fn write_partial(&self, block: u64, pos: u64, piece: &[u8]) -> io::Result<()> {
        if self.bitmap.get(block) {
            return self.data.write_all_at(piece, pos);
        }
        let start = block * BLOCK_SIZE;
        let mut buf = vec![0u8; (self.block_end(block) - start) as usize];
        self.lower.read_at(&mut buf, start)?;
        let at = (pos - start) as usize;
        buf[at..at + piece.len()].copy_from_slice(piece);
        self.data.write_all_at(&buf, start)?;
        self.bitmap.set(block);
        Ok(())
    }

    /// Makes `offset..offset + len` of the data file read as zeroes.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.data.zero_file_range(offset, len)
    }

    /// Applies a write (`Some(buf)`) or a zeroing (`None`) of `len` bytes at
    /// `offset`, holding the stripes of every block it touches.
    fn mutate(&self, buf: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_bounds(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let _guard = self
            .locks
            .lock_range(offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let block_start = block * BLOCK_SIZE;
            let block_end = self.block_end(block);
            if pos == block_start && end >= block_end {
                // A run of whole blocks.
                let run_end = if end == self.size {
                    end
                } else {
                    end / BLOCK_SIZE * BLOCK_SIZE
                };
                match buf {
                    Some(buf) => self.data.write_all_at(
                        &buf[(pos - offset) as usize..(run_end - offset) as usize],
                        pos,
                    )?,
                    None => self.punch(pos, run_end - pos)?,
                }
                self.bitmap.set_range(block..run_end.div_ceil(BLOCK_SIZE));
                pos = run_end;
            } else {
                let piece_end = end.min(block_end);
                let n = (piece_end - pos) as usize;
                match buf {
                    Some(buf) => {
                        let at = (pos - offset) as usize;
                        self.write_partial(block, pos, &buf[at..at + n])?
                    }
                    None => self.write_partial(block, pos, &ZEROES[..n])?,
                }
                pos = piece_end;
            }
        }
        Ok(())
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.read_into(ReadDest::bytes(buf), offset, len)
    }

    /// A range the overlay holds none of is as cheap as the layer below
    /// says; blocks it holds come from its data file, which may or may not
    /// be in the page cache, so those are not claimed cheap.
    fn read_is_cheap(&self, offset: u64, len: u64) -> bool {
        units_touched(offset, len, self.size, BLOCK_SIZE).is_some_and(|mut blocks| {
            !blocks.any(|block| self.bitmap.get(block)) && self.lower.read_is_cheap(offset, len)
        })
    }

    /// No copy here: present runs go from the data file to guest memory
    /// with `preadv`, the others to the layer below's vectored read.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.read_into(ReadDest::guest(bufs), offset, total_len(bufs))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(Some(buf), offset, buf.len() as u64)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.bitmap
            .sync_after(|| self.data.sync())
            .map_err(io::Error::from)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(None, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(None, offset, len)
    }
}

/// Frees the overlay's space and removes its files and the migration's
/// guest-written bitmap, once the migration is complete and the overlay is
/// no longer served. Failures are logged: the target is complete either
/// way.
pub fn remove_files(state: &dyn LayerState) {
    let data = state.path(LayerFile::OverlayData);
    let bitmap = state.path(LayerFile::OverlayBitmap);
    let written = state.path(LayerFile::GuestWrittenBitmap);
    let others = [
        bitmap::journal_path(&bitmap),
        bitmap,
        bitmap::journal_path(&written),
        written,
    ];
    let mut removed = false;
    if data.exists() {
        // Truncate first: frees the blocks even while a handle is open.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .and_then(|f| f.set_len(0))
        {
            tracing::warn!(path = %data.display(), error = %e, "cannot truncate the overlay data file");
        }
    }
    for path in std::iter::once(&data).chain(others.iter()) {
        match std::fs::remove_file(path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove overlay file")
            }
        }
    }
    if removed {
        if let Err(e) = state.sync_dir() {
            tracing::warn!(error = %e, "cannot sync the state dir");
        }
        tracing::info!(path = %data.display(), "overlay freed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ChunkCache;
    use crate::snapshot::SnapshotLayer;
    use crate::source::{check_read_write, VecSource};
    use crate::state::DirState;

    pub(super) fn image(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                // Leave some 8 KiB chunks zero.
                if (i / 8192) % 5 == 2 {
                    return 0;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub(super) fn lower(image: &[u8]) -> (Arc<VecSource>, Arc<dyn BlockDevice>) {
        let src = Arc::new(VecSource::new(image.to_vec(), 8192));
        let layer = SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(1 << 20))).unwrap();
        (src, Arc::new(layer))
    }

    fn open(dir: &Path, lower: Arc<dyn BlockDevice>) -> Overlay {
        Overlay::open(
            &dir.join("overlay.data"),
            &dir.join("overlay.bitmap"),
            "snap-1",
            lower,
        )
        .unwrap()
    }

    #[test]
    fn shared_check_and_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(8192 * 12 + 1536, 7);
        let (src, low) = lower(&img);
        let ov = open(dir.path(), low.clone());
        let mut model = img.clone();
        check_read_write(&ov, &mut model);
        // The store was never written, and what was written survives a reopen.
        assert_eq!(src.data(), &img[..]);
        drop(ov);
        let ov = open(dir.path(), low);
        let mut all = vec![0u8; model.len()];
        ov.read_at(&mut all, 0).unwrap();
        assert!(
            all == model,
            "reopened overlay differs from the flushed model"
        );
    }

    #[test]
    fn partial_write_reads_the_rest_from_below() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(8192 * 4, 3);
        let (_src, low) = lower(&img);
        let ov = open(dir.path(), low);
        ov.write_at(&[0xee; 100], 4096 + 1000).unwrap();
        assert!(ov.is_present(1) && !ov.is_present(0) && !ov.is_present(2));
        assert_eq!(ov.allocated_bytes(), 4096);
        assert!(ov.any_present(0, 4097) && !ov.any_present(0, 4096));
        assert!(ov.any_present(8191, 1) && !ov.any_present(8192, 8192));
        let mut block = vec![0u8; 4096];
        ov.read_at(&mut block, 4096).unwrap();
        let mut want = img[4096..8192].to_vec();
        want[1000..1100].fill(0xee);
        assert_eq!(block, want);
        // The data file holds the whole merged block.
        let mut raw = vec![0u8; 4096];
        File::open(dir.path().join("overlay.data"))
            .unwrap()
            .read_exact_at(&mut raw, 4096)
            .unwrap();
        assert_eq!(raw, want);
    }

    #[test]
    fn discard_punches_holes_and_copies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(1 << 20, 5);
        let (src, low) = lower(&img);
        let ov = open(dir.path(), low);
        let reads = src.reads();
        ov.discard(0, 1 << 20).unwrap();
        assert_eq!(
            src.reads(),
            reads,
            "a whole-block discard read the snapshot"
        );
        ov.write_zeroes(4096 * 3 + 512, 512).unwrap();
        let mut all = vec![1u8; 1 << 20];
        ov.read_at(&mut all, 0).unwrap();
        assert!(all.iter().all(|&b| b == 0));
        ov.flush().unwrap();
        let meta = std::fs::metadata(dir.path().join("overlay.data")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "discard allocated data blocks"
        );
        assert_eq!(meta.len(), 1 << 20);
    }

    #[test]
    fn concurrent_partial_writes_to_one_block_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(64 * 4096, 11);
        // No cache and slow chunk reads: every read-modify-write is slow,
        // so unsynchronised ones would overlap and lose bytes.
        let src = Arc::new(VecSource::new(img.clone(), 8192));
        src.set_read_delay(std::time::Duration::from_millis(2));
        let low = Arc::new(SnapshotLayer::new(src, Arc::new(ChunkCache::new(0))).unwrap());
        let ov = open(dir.path(), low);
        let barrier = std::sync::Barrier::new(16);
        // 16 threads each own 256 bytes of every block and write them all
        // at once, so every block's first write is a contended RMW.
        std::thread::scope(|s| {
            for t in 0..16u8 {
                let (ov, barrier) = (&ov, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for block in 0..64u64 {
                        ov.write_at(&[t + 1; 256], block * 4096 + u64::from(t) * 256)
                            .unwrap();
                    }
                });
            }
        });
        let mut all = vec![0u8; 64 * 4096];
        ov.read_at(&mut all, 0).unwrap();
        for (i, &b) in all.iter().enumerate() {
            assert_eq!(b, ((i % 4096) / 256) as u8 + 1, "byte {i} lost its write");
        }
    }

    #[test]
    fn read_only_overlay_serves_but_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(8192 * 4, 9);
        let (_src, low) = lower(&img);
        let ov = open(dir.path(), low.clone());
        ov.write_at(&[7; 4096], 0).unwrap();
        ov.flush().unwrap();
        drop(ov);
        let ov = open(dir.path(), low).with_read_only(true);
        let mut model = img.clone();
        model[..4096].fill(7);
        check_read_write(&ov, &mut model);
    }

    #[test]
    fn another_snapshots_state_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let img = image(8192 * 4, 1);
        let (_src, low) = lower(&img);
        let state = DirState::open(tmp.path(), "aaaa", img.len() as u64, 8192).unwrap();
        let ov = Overlay::open_in(&state, low.clone()).unwrap();
        ov.write_at(&[1; 512], 0).unwrap();
        ov.flush().unwrap();
        drop(ov);
        // Same files, another snapshot's binding: the bitmap header says no.
        let err = Overlay::open(
            &state.path(LayerFile::OverlayData),
            &state.path(LayerFile::OverlayBitmap),
            "bbbb",
            low.clone(),
        )
        .err()
        .unwrap();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("aaaa") && chain.contains("bbbb"), "{chain}");
        // A lower layer of another size is refused too.
        let (_s, small) = lower(&img[..8192]);
        assert!(Overlay::open_in(&state, small).is_err());
        // A truncated data file is refused, not silently served.
        std::fs::OpenOptions::new()
            .write(true)
            .open(state.path(LayerFile::OverlayData))
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(matches!(
            Overlay::open_in(&state, low.clone()),
            Err(Error::DataSize { .. })
        ));
        std::fs::remove_file(state.path(LayerFile::OverlayData)).unwrap();
        assert!(matches!(
            Overlay::open_in(&state, low),
            Err(Error::DataMissing { blocks: 1, .. })
        ));
    }

    #[test]
    fn vectored_reads_serve_overlay_snapshot_and_zero_runs() {
        use crate::device::tests::{check_vectored_read, read_vectored, split_lens};
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB chunks, one in five zero (see `image`), so zero runs come
        // from the snapshot too.
        let img = image(1 << 20, 13);
        let (_src, low) = lower(&img);
        let ov = open(dir.path(), low);
        let mut model = img.clone();
        // Present runs of 1..7 blocks, holes of 1..5, some partial writes
        // and a discarded stretch.
        let mut block = 1u64;
        while block < 200 {
            let n = 1 + block % 7;
            let at = (block * BLOCK_SIZE) as usize;
            let data: Vec<u8> = (0..n * BLOCK_SIZE)
                .map(|i| (i % 241) as u8 ^ 0x5a)
                .collect();
            ov.write_at(&data, at as u64).unwrap();
            model[at..at + data.len()].copy_from_slice(&data);
            block += n + 1 + block % 5;
        }
        ov.write_at(&[9; 300], 230 * BLOCK_SIZE + 100).unwrap();
        model[230 * 4096 + 100..230 * 4096 + 400].fill(9);
        ov.discard(240 * BLOCK_SIZE, 8 * BLOCK_SIZE).unwrap();
        model[240 * 4096..248 * 4096].fill(0);
        // A 1 MiB read in 256 pages, in one buffer, and cut at odd places.
        let pages = vec![4096; 256];
        assert!(read_vectored(&ov, 0, &pages).unwrap() == model);
        assert!(read_vectored(&ov, 0, &[1 << 20]).unwrap() == model);
        let lens = split_lens((1 << 20) - 1001, &[1, 4095, 4097, 70_000, 500_001, 900_000]);
        check_vectored_read(&ov, 1000, &lens);
        assert!(read_vectored(&ov, 1000, &lens).unwrap() == model[1000..(1 << 20) - 1]);
        // Out of range is an error, like read_at.
        assert!(read_vectored(&ov, (1 << 20) - 4096, &[4096, 1]).is_err());
    }

    #[test]
    fn out_of_range_requests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(8192, 1);
        let (_src, low) = lower(&img);
        let ov = open(dir.path(), low);
        assert!(ov.write_at(&[0; 512], 8192 - 511).is_err());
        assert!(ov.discard(u64::MAX - 1, 2).is_err());
        assert!(ov.write_zeroes(0, 8193).is_err());
        ov.write_at(&[], 8192).unwrap();
        assert_eq!(ov.allocated_bytes(), 0);
    }
}
