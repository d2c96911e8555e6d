//! Striped locks over a space of indices (overlay blocks, copier chunks).
//!
//! Index `i` maps to stripe `i % stripes`. A range is locked by taking its
//! stripes in ascending stripe order, and nobody holds two stripe guards of
//! one table except through [`LockTable::lock_range`], so two range locks
//! can never deadlock. Two indices sharing a stripe merely serialise.

use std::sync::{Mutex, MutexGuard};

/// A fixed set of mutexes, each guarding every index congruent to it.
pub struct LockTable {
    stripes: Box<[Mutex<()>]>,
}

/// Holds the stripes of a locked range until dropped.
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl LockTable {
    /// A table of `stripes` locks (rounded up to a power of two, at least 1).
    pub fn new(stripes: usize) -> LockTable {
        let n = stripes.max(1).next_power_of_two();
        LockTable {
            stripes: (0..n).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Number of stripes.
    pub fn stripes(&self) -> usize {
        self.stripes.len()
    }

    fn take(&self, stripe: usize) -> MutexGuard<'_, ()> {
        // A panic while holding a stripe leaves no broken invariant behind
        // the lock itself (it guards no data), so poisoning is ignored.
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the stripe of `index`.
    pub fn lock(&self, index: u64) -> RangeGuard<'_> {
        self.lock_range(index, index)
    }

    /// Locks every index in `first..=last` (empty if `last < first`).
    pub fn lock_range(&self, first: u64, last: u64) -> RangeGuard<'_> {
        let n = self.stripes.len() as u64;
        if last < first {
            return RangeGuard {
                _guards: Vec::new(),
            };
        }
        let mask = n - 1;
        let (s0, s1) = ((first & mask) as usize, (last & mask) as usize);
        let guards = if last - first + 1 >= n {
            (0..n as usize).map(|s| self.take(s)).collect()
        } else if s0 <= s1 {
            (s0..=s1).map(|s| self.take(s)).collect()
        } else {
            (0..=s1)
                .chain(s0..n as usize)
                .map(|s| self.take(s))
                .collect()
        };
        RangeGuard { _guards: guards }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn ranges_exclude_each_other_and_never_deadlock() {
        let table = LockTable::new(6);
        assert_eq!(table.stripes(), 8);
        let counter = AtomicU64::new(0);
        let inside = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (table, counter, inside) = (&table, &counter, &inside);
                s.spawn(move || {
                    for i in 0..2000u64 {
                        // Overlapping, wrapping and whole-table ranges.
                        let first = (i * 7 + t) % 13;
                        let last = first + (i % 11);
                        let _g = table.lock_range(first, last);
                        // Every range here contains index 12 or 13 or is
                        // wide, so they all share a stripe with each other
                        // only sometimes; check exclusion on index 12's stripe.
                        if first <= 12 && 12 <= last {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                            counter.fetch_add(1, Ordering::SeqCst);
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert!(counter.load(Ordering::SeqCst) > 0);
        let _empty = table.lock_range(5, 4);
        let _one = table.lock(3);
    }
}
