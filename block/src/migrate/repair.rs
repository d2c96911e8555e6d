//! Finishing a migration from another snapshot: `--repair-from`.
//!
//! A chunk the served snapshot cannot deliver (a flipped bit, a truncated
//! pack, a missing pack) would leave the migration `failed` for good. With
//! a repair source set ([`MigratingDevice::set_repair_source`]), the
//! copier takes such a chunk from another snapshot of the same image (same
//! image size and chunk size, checked when the source is set):
//!
//! - only after the served snapshot failed to deliver it: every chunk that
//!   reads fine comes from the served snapshot, never from the repair one;
//! - blocks the guest wrote win: the repaired chunk is the repair
//!   snapshot's chunk with every overlay block (4 KiB) of the chunk laid
//!   over it. A block the guest wrote is whole in the overlay (a partial
//!   write to a block it does not hold reads the block from below first,
//!   which fails on a damaged chunk, so that write fails), so this is
//!   exactly "the guest's data where it wrote, the repair snapshot's data
//!   where the served snapshot's was lost". A chunk the guest overwrote
//!   completely never needs the store and is never repaired;
//! - under the chunk's lock, like any copy, so a guest write never races it;
//! - each repaired chunk is logged (`warn`, with its index, offset, the
//!   served snapshot's error and the repair snapshot) and counted in
//!   `chunks_repaired`; verify compares repaired chunks with the same merge.
//!
//! The repaired data is older or newer than the snapshot the guest booted
//! from, so using it is the operator's explicit decision (`--repair-from`),
//! never automatic: without a repair source such chunks stay `failed`,
//! guest reads of them fail with an I/O error, and the migration stops in
//! the `failed` state naming the first one.
//!
//! Guest reads of a damaged chunk keep failing until the copier has
//! repaired it; from then on the chunk is migrated and reads come from the
//! target. The repaired set lives in memory: after a restart the count
//! starts again from 0 (repaired chunks are migrated and stay so).

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};

use super::{lock, ChunkBuf, Copied, CopyError, Error, Layers, MigratingDevice, Result};
use crate::device::BlockDevice;
use crate::overlay::BLOCK_SIZE;
use crate::snapshot::SnapshotLayer;

/// The repair source and what was taken from it.
pub(super) struct Repair {
    layer: Arc<SnapshotLayer>,
    reference: String,
    repaired: Mutex<BTreeSet<u64>>,
}

impl Repair {
    /// Chunks repaired by this process.
    pub(super) fn count(&self) -> u64 {
        lock(&self.repaired).len() as u64
    }
}

impl MigratingDevice {
    /// Takes chunks the served snapshot cannot deliver from `layer`,
    /// another snapshot (`reference`, for logs) of the same image. See the
    /// module doc of `migrate::repair`. Fails if the image size or chunk
    /// size differ, or if a repair source is already set.
    pub fn set_repair_source(
        &self,
        layer: Arc<SnapshotLayer>,
        reference: impl Into<String>,
    ) -> Result<()> {
        let reference = reference.into();
        let checks = [
            ("image size", layer.size(), self.size),
            (
                "chunk size",
                u64::from(layer.chunk_size()),
                u64::from(self.chunk_size),
            ),
        ];
        if let Some((what, found, expected)) = checks.into_iter().find(|(_, a, b)| a != b) {
            return Err(Error::RepairGeometry {
                reference,
                what,
                found,
                expected,
            });
        }
        if let Some(existing) = self.repair.get() {
            return Err(Error::RepairAlreadySet(existing.reference.clone()));
        }
        let _ = self.repair.set(Repair {
            layer,
            reference: reference.clone(),
            repaired: Mutex::new(BTreeSet::new()),
        });
        tracing::warn!(
            repair_from = %reference,
            "chunks the served snapshot cannot deliver will be taken from {reference}"
        );
        Ok(())
    }

    /// The repair snapshot, if one is set.
    pub fn repair_source(&self) -> Option<&str> {
        self.repair.get().map(|r| r.reference.as_str())
    }

    /// Chunks repaired from the repair snapshot by this process.
    pub fn repaired_chunks(&self) -> Vec<u64> {
        self.repair
            .get()
            .map(|r| lock(&r.repaired).iter().copied().collect())
            .unwrap_or_default()
    }

    /// Chunk `c` repaired: the repair snapshot's chunk with the overlay's
    /// blocks over it (`None`: all zero). The caller holds the chunk lock.
    pub(super) fn repaired_data(&self, l: &Layers, c: u64) -> io::Result<Option<ChunkBuf>> {
        let Some(repair) = self.repair.get() else {
            return Err(io::Error::other("no repair snapshot is set"));
        };
        let start = self.chunk_start(c);
        let len = self.chunk_len(c);
        let end = start + len as u64;
        let base = repair.layer.chunk(c, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Repair from {} failed: {e}", repair.reference),
            )
        })?;
        if base.is_none() && !l.overlay.any_present(start, len as u64) {
            return Ok(None);
        }
        let mut buf = match base {
            Some(d) => d.to_vec(),
            None => vec![0u8; len],
        };
        let mut pos = start;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let block_end = ((block + 1) * BLOCK_SIZE).min(end);
            if l.overlay.is_present(block) {
                let at = (pos - start) as usize..(block_end - start) as usize;
                l.overlay.read_at(&mut buf[at], pos)?;
            }
            pos = block_end;
        }
        Ok(Some(ChunkBuf::Owned(buf)))
    }

    /// Copies chunk `c` from the repair snapshot (with the guest's blocks).
    pub(super) fn repair_chunk(
        &self,
        l: &Layers,
        c: u64,
    ) -> std::result::Result<Copied, CopyError> {
        let _guard = l.locks.lock(c);
        if l.migrated.get(c) {
            return Ok(Copied::Already);
        }
        let data = self.repaired_data(l, c).map_err(CopyError::Read)?;
        self.write_copy(l, c, data)
    }

    /// Records and logs that chunk `c` was repaired after `primary` failed.
    pub(super) fn note_repaired(&self, c: u64, primary: &io::Error) {
        let Some(repair) = self.repair.get() else {
            return;
        };
        lock(&repair.repaired).insert(c);
        tracing::warn!(
            chunk = c,
            offset = self.chunk_start(c),
            repair_from = %repair.reference,
            error = %primary,
            "chunk {c} at offset {} repaired from {}",
            self.chunk_start(c),
            repair.reference
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{assert_same, fast, image, wait_complete, Fixture, CS};
    use super::*;
    use crate::cache::ChunkCache;
    use crate::migrate::MigrationOptions;
    use crate::migrate::MigrationPhase;
    use crate::source::VecSource;

    const CSU: usize = CS as usize;

    fn layer(image: Vec<u8>) -> Arc<SnapshotLayer> {
        let src = Arc::new(VecSource::new(image, CS));
        Arc::new(SnapshotLayer::new(src, Arc::new(ChunkCache::new(1 << 20))).unwrap())
    }

    #[test]
    fn damaged_chunks_come_from_the_repair_snapshot_under_the_guests_blocks() {
        let fx = Fixture::new(image(24, 0, 7));
        // The other backup: chunks 6 and 9 changed since.
        let mut other = fx.image.clone();
        other[6 * CSU..7 * CSU].fill(0x66);
        other[9 * CSU..10 * CSU].fill(0x99);
        fx.src.set_failing(6, true);
        fx.src.set_failing(9, true);
        let dev = fx.open(MigrationOptions {
            verify: true,
            copy_on_read: false,
            ..fast()
        });
        // The guest wrote the second block of chunk 9 (a whole block: no
        // read below, so it succeeds although chunk 9 is damaged).
        let block = vec![0x42u8; 4096];
        dev.write_at(&block, 9 * u64::from(CS) + 4096).unwrap();
        let mut want = fx.image.clone();
        want[6 * CSU..7 * CSU].copy_from_slice(&other[6 * CSU..7 * CSU]);
        want[9 * CSU..10 * CSU].copy_from_slice(&other[9 * CSU..10 * CSU]);
        want[9 * CSU + 4096..9 * CSU + 8192].copy_from_slice(&block);
        // Before the repair the guest gets errors, never wrong data.
        let mut buf = vec![0u8; 4096];
        assert!(dev.read_at(&mut buf, 6 * u64::from(CS)).is_err());

        dev.set_repair_source(layer(other), "vm@other").unwrap();
        assert_eq!(dev.repair_source(), Some("vm@other"));
        dev.start().unwrap();
        wait_complete(&dev);
        let s = dev.status();
        assert_eq!((s.chunks_failed, s.chunks_repaired), (0, 2), "{s:?}");
        assert_eq!(dev.repaired_chunks(), vec![6, 9]);
        assert_same(&fx.target_bytes(), &want, "target");
        dev.read_at(&mut buf, 6 * u64::from(CS)).unwrap();
        assert_same(&buf, &want[6 * CSU..6 * CSU + 4096], "chunk 6 read");
    }

    #[test]
    fn a_chunk_damaged_in_both_snapshots_stays_failed() {
        let fx = Fixture::new(image(12, 0, 8));
        fx.src.set_failing(3, true);
        let other = Arc::new(VecSource::new(fx.image.clone(), CS));
        other.set_failing(3, true);
        let layer = SnapshotLayer::new(other, Arc::new(ChunkCache::new(1 << 20))).unwrap();
        let dev = fx.open(fast());
        dev.set_repair_source(Arc::new(layer), "vm@other").unwrap();
        dev.start().unwrap();
        assert_eq!(dev.wait(Duration::from_secs(30)), MigrationPhase::Failed);
        let s = dev.status();
        assert_eq!((s.chunks_failed, s.chunks_repaired), (1, 0), "{s:?}");
        let (c, reason) = dev.failed_chunks().remove(0);
        assert_eq!(c, 3);
        assert!(reason.contains("Repair from vm@other failed"), "{reason}");
        assert!(s.error.unwrap().contains("--repair-from"));
    }

    #[test]
    fn a_repair_snapshot_of_another_geometry_is_refused() {
        let fx = Fixture::new(image(8, 0, 9));
        let dev = fx.open(fast());
        let bigger = layer(vec![1u8; 9 * CSU]);
        let err = dev.set_repair_source(bigger, "vm@big").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("vm@big") && msg.contains("image size") && msg.contains("same image"),
            "{msg}"
        );
        let small_chunks = Arc::new(
            SnapshotLayer::new(
                Arc::new(VecSource::new(fx.image.clone(), CS / 2)),
                Arc::new(ChunkCache::new(1 << 20)),
            )
            .unwrap(),
        );
        let msg = dev
            .set_repair_source(small_chunks, "vm@small")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("chunk size"), "{msg}");
        dev.set_repair_source(layer(fx.image.clone()), "vm@ok")
            .unwrap();
        assert!(matches!(
            dev.set_repair_source(layer(fx.image.clone()), "vm@again"),
            Err(Error::RepairAlreadySet(_))
        ));
    }
}
