//! What the migration has moved and what it still has to move, in bytes
//! that really cost a copy.
//!
//! A zero chunk costs nothing: the target is known to hold zeroes, or is
//! zeroed with one fallocate. Counting it as progress made the bar jump
//! from 20 % to 99 % the moment the copier met a run of free space, and
//! made the copy rate read higher than the rate limit. So progress keeps
//! three sums apart:
//!
//! - **pending**: bytes of chunks not migrated yet that hold data, in the
//!   snapshot or in the guest's writes (a set of chunks, so a chunk counts
//!   once however often the guest writes it);
//! - **copied**: bytes of chunks written to the target as data;
//! - **skipped**: bytes of chunks migrated as zeroes.
//!
//! `copied + pending` is what the migration has to move in all
//! (`bytes_to_copy`); `copied + skipped` is what is on the target. A
//! chunk the guest writes data into before it migrates joins `pending`;
//! a pending chunk that turns out to be zero when copied (the guest
//! discarded it) leaves `pending` for `skipped`, so `bytes_to_copy`
//! shrinks. Chunks migrated by an earlier run of the daemon are counted
//! at open by what they hold then.

use std::sync::atomic::{AtomicU64, Ordering};

/// The three sums and the pending set; all lock-free.
pub(super) struct Progress {
    /// One bit per chunk: not migrated, holds data, counted in `pending`.
    pending_set: Box<[AtomicU64]>,
    pending: AtomicU64,
    copied: AtomicU64,
    skipped: AtomicU64,
}

/// A point-in-time view of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Sums {
    /// Bytes of data still to copy.
    pub(super) pending: u64,
    /// Bytes written to the target as data.
    pub(super) copied: u64,
    /// Bytes migrated as zeroes.
    pub(super) skipped: u64,
}

impl Sums {
    /// Everything the migration has to move, done or not.
    pub(super) fn to_copy(self) -> u64 {
        self.copied + self.pending
    }
}

impl Progress {
    /// Nothing counted yet, for an image of `chunks` chunks.
    pub(super) fn new(chunks: u64) -> Progress {
        Progress {
            pending_set: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pending: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Chunk `c` (`len` bytes, not migrated) holds data to copy. Counted
    /// once, however often it is called.
    pub(super) fn needs_copy(&self, c: u64, len: u64) {
        let bit = 1u64 << (c % 64);
        let Some(word) = self.pending_set.get((c / 64) as usize) else {
            return;
        };
        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.pending.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Chunk `c` (`len` bytes) is now on the target, written as data
    /// (`data`) or as zeroes.
    pub(super) fn migrated(&self, c: u64, len: u64, data: bool) {
        let bit = 1u64 << (c % 64);
        if let Some(word) = self.pending_set.get((c / 64) as usize) {
            if word.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                self.pending.fetch_sub(len, Ordering::Relaxed);
            }
        }
        let sum = if data { &self.copied } else { &self.skipped };
        sum.fetch_add(len, Ordering::Relaxed);
    }

    /// The sums now. Each is exact; read together they may be a chunk
    /// apart while a copy completes.
    pub(super) fn sums(&self) -> Sums {
        Sums {
            pending: self.pending.load(Ordering::Relaxed),
            copied: self.copied.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_move_from_pending_to_copied_or_skipped_once() {
        let p = Progress::new(130);
        p.needs_copy(0, 100);
        p.needs_copy(0, 100);
        p.needs_copy(129, 7);
        assert_eq!(
            p.sums(),
            Sums {
                pending: 107,
                copied: 0,
                skipped: 0
            }
        );
        p.migrated(0, 100, true);
        // Zero chunk 5 was never pending; pending chunk 129 turned zero.
        p.migrated(5, 100, false);
        p.migrated(129, 7, false);
        let s = p.sums();
        assert_eq!(
            s,
            Sums {
                pending: 0,
                copied: 100,
                skipped: 107
            }
        );
        assert_eq!(s.to_copy(), 100);
        // Out of range (never happens) is ignored, not a panic.
        p.needs_copy(1000, 1);
        assert_eq!(p.sums().pending, 0);
    }
}
