//! Which 4 KiB grains of the disk the guest wrote since the last point, in
//! memory, next to each changed-chunks file: a bit per [`GRAIN`] of the
//! image, bit `i` in word `i / 64` at position `i % 64`.
//!
//! It refines its file: a chunk's grains are exact only when they were
//! marked by the writes themselves. A chunk whose bit came from the file
//! on open (a point that a crashed daemon left behind, or changes from
//! before a restart) has every grain set, so the point reads it whole.
//! Losing this map (a kill -9) therefore costs reads, never a change.
//!
//! Only guest writes set bits (under the layer's gate, read side, before
//! the data goes down), and only the point's end clears them, when its
//! file is not active; a merge back (an abandoned point) ORs bits into the
//! active map while writers set others. So plain atomics suffice.

use std::sync::atomic::{AtomicU64, Ordering};

use super::preserved::GRAIN;

/// The grains written since the last point (see the module doc).
#[derive(Debug)]
pub(crate) struct GrainMap {
    words: Vec<AtomicU64>,
    ngrains: u64,
}

impl GrainMap {
    /// A map of an image of `size` bytes, nothing set.
    pub(crate) fn new(size: u64) -> GrainMap {
        let ngrains = size.div_ceil(GRAIN);
        GrainMap {
            words: (0..ngrains.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            ngrains,
        }
    }

    /// The words of grains `first..first + count` (clamped to the
    /// image), each with the mask of those grains in it.
    fn spans(&self, first: u64, count: u64) -> impl Iterator<Item = (&AtomicU64, u64)> + '_ {
        let end = (first + count).min(self.ngrains);
        let mut g = first;
        std::iter::from_fn(move || {
            if g >= end {
                return None;
            }
            let (w, bit) = ((g / 64) as usize, g % 64);
            let n = (64 - bit).min(end - g);
            g += n;
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            Some((&self.words[w], mask))
        })
    }

    /// Sets grains `first..first + count` (clamped to the image).
    pub(crate) fn set(&self, first: u64, count: u64) {
        for (w, mask) in self.spans(first, count) {
            w.fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Sets the grains of bytes `offset..offset + len` of the image.
    pub(crate) fn set_bytes(&self, offset: u64, len: u64) {
        if len > 0 {
            let first = offset / GRAIN;
            self.set(first, (offset + len - 1) / GRAIN + 1 - first);
        }
    }

    /// Whether grain `g` is set.
    pub(crate) fn get(&self, g: u64) -> bool {
        g < self.ngrains
            && self.words[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    /// Number of grains set in `first..first + count`.
    pub(crate) fn count(&self, first: u64, count: u64) -> u64 {
        self.spans(first, count)
            .map(|(w, mask)| u64::from((w.load(Ordering::Acquire) & mask).count_ones()))
            .sum()
    }

    /// Number of grains in `first..first + count` set in this map or in
    /// `other` (a map of the same image).
    pub(crate) fn count_union(&self, other: &GrainMap, first: u64, count: u64) -> u64 {
        self.spans(first, count)
            .zip(other.spans(first, count))
            .map(|((a, mask), (b, _))| {
                let word = a.load(Ordering::Acquire) | b.load(Ordering::Acquire);
                u64::from((word & mask).count_ones())
            })
            .sum()
    }

    /// Sets in this map the grains of `first..first + count` that `other`
    /// has set.
    pub(crate) fn set_from(&self, other: &GrainMap, first: u64, count: u64) {
        let end = (first + count).min(self.ngrains);
        for g in first..end {
            if other.get(g) {
                self.set(g, 1);
            }
        }
    }

    /// Clears grains `first..first + count`.
    pub(crate) fn clear_range(&self, first: u64, count: u64) {
        for (w, mask) in self.spans(first, count) {
            w.fetch_and(!mask, Ordering::AcqRel);
        }
    }

    /// ORs every bit of `other` into this map.
    pub(crate) fn merge_from(&self, other: &GrainMap) {
        for (dst, src) in self.words.iter().zip(&other.words) {
            let w = src.load(Ordering::Acquire);
            if w != 0 {
                dst.fetch_or(w, Ordering::AcqRel);
            }
        }
    }

    /// Clears every bit.
    pub(crate) fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_and_count_across_words() {
        let m = GrainMap::new(1000 * GRAIN + 1);
        assert_eq!(m.ngrains, 1001);
        m.set(60, 10);
        m.set_bytes(200 * GRAIN + 1, 2 * GRAIN);
        m.set(990, 100);
        assert_eq!(m.count(0, 1001), 10 + 3 + 11);
        assert_eq!(m.count(64, 64), 6);
        assert!(m.get(69) && !m.get(70) && m.get(59 + 1) && !m.get(59));
        assert!(m.get(200) && m.get(202) && !m.get(203));
        assert!(m.get(1000) && !m.get(1001));
        m.set(0, 128);
        assert_eq!(m.count(0, 128), 128);
        let other = GrainMap::new(1000 * GRAIN + 1);
        other.set(500, 1);
        m.merge_from(&other);
        assert!(m.get(500));
        let fresh = GrainMap::new(1000 * GRAIN + 1);
        fresh.set(126, 4);
        assert_eq!(m.count_union(&fresh, 120, 10), 8 + 2);
        fresh.set_from(&m, 0, 200);
        assert_eq!(fresh.count(0, 1001), 128 + 2);
        fresh.clear_range(1, 127);
        assert_eq!(fresh.count(0, 1001), 1 + 2);
        m.clear();
        assert_eq!(m.count(0, 1001), 0);
    }
}
