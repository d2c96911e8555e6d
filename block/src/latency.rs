//! Request latency histograms, recorded on the guest's path.
//!
//! [`LatencyRecorder`] counts durations into fixed buckets with relaxed
//! atomics: no lock, no allocation, one `partition_point` over
//! [`BOUNDS`] per request. The buckets follow the Renard R20 series (20
//! per decade, each 11–15 % wider than the one before) from 1 µs to
//! 100 s, so a quantile read from them is within 15 % of the true value,
//! and the decade points 1, 2 and 5 are bucket bounds (a Prometheus
//! histogram with `le` at 1-2-5 steps is exact).
//!
//! [`MeteredDevice`](crate::metered::MeteredDevice) keeps one per request
//! type; the daemon reports them in `status` and `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// R20 mantissas × 100.
const R20: [u64; 20] = [
    100, 112, 125, 140, 160, 180, 200, 224, 250, 280, 315, 355, 400, 450, 500, 560, 630, 710, 800,
    900,
];

/// Decades from 1 µs: 8 decades and the closing bound 100 s.
const DECADES: usize = 8;

/// Number of bounds; the last bucket (above the last bound) is one more.
pub const BUCKETS: usize = DECADES * R20.len() + 1;

/// Upper bounds of the buckets in nanoseconds, inclusive, ascending: 1 µs
/// (everything at or below it), 1.12 µs, ... 90 s, 100 s.
pub const BOUNDS: [u64; BUCKETS] = bounds();

const fn bounds() -> [u64; BUCKETS] {
    let mut out = [0u64; BUCKETS];
    let mut d = 0;
    let mut scale = 10; // mantissa 100 × 10 = 1000 ns
    while d < DECADES {
        let mut i = 0;
        while i < R20.len() {
            out[d * R20.len() + i] = R20[i] * scale;
            i += 1;
        }
        scale *= 10;
        d += 1;
    }
    out[BUCKETS - 1] = 100 * scale;
    out
}

/// A histogram of durations, safe to record from many threads.
pub struct LatencyRecorder {
    /// One count per bound, and one for everything above the last.
    counts: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// What a [`LatencyRecorder`] holds at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Sum of their durations in nanoseconds.
    pub sum_ns: u64,
    /// The non-empty buckets, ascending: (upper bound in nanoseconds,
    /// count); `u64::MAX` is the bucket above the last bound.
    pub buckets: Vec<(u64, u64)>,
}

impl LatencyRecorder {
    /// Counts one request that took `d`.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        // Wraps only after 584 years of summed latency.
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now (buckets are read one by one while requests may be
    /// recorded).
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let le = BOUNDS.get(i).copied().unwrap_or(u64::MAX);
                (le, c.load(Ordering::Relaxed))
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        LatencySnapshot {
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            buckets,
        }
    }
}

impl LatencySnapshot {
    /// Requests recorded: the sum of the buckets.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_ascend_and_hold_the_decade_points() {
        assert!(BOUNDS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BOUNDS[0], 1_000);
        assert_eq!(BOUNDS[BUCKETS - 1], 100_000_000_000);
        for p in [1u64, 2, 5] {
            for d in 0..DECADES as u32 {
                let ns = p * 1_000 * 10u64.pow(d);
                assert!(BOUNDS.contains(&ns), "{ns} ns is a bound");
            }
        }
        // Neighbouring bounds are at most 15 % apart.
        assert!(BOUNDS.windows(2).all(|w| w[1] * 100 <= w[0] * 115));
    }

    #[test]
    fn durations_land_in_the_bucket_whose_bound_covers_them() {
        let r = LatencyRecorder::default();
        for ns in [0, 999, 1_000] {
            r.record(Duration::from_nanos(ns));
        }
        r.record(Duration::from_nanos(1_001)); // (1 µs, 1.12 µs]
        r.record(Duration::from_micros(100)); // exactly a bound
        r.record(Duration::from_secs(1_000)); // above the last bound
        let s = r.snapshot();
        assert_eq!(s.count(), 6);
        assert_eq!(
            s.buckets,
            vec![(1_000, 3), (1_120, 1), (100_000, 1), (u64::MAX, 1)]
        );
        assert_eq!(s.sum_ns, 1_999 + 1_001 + 100_000 + 1_000_000_000_000);
    }

    #[test]
    fn recording_from_many_threads_loses_nothing() {
        let r = LatencyRecorder::default();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let r = &r;
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        r.record(Duration::from_nanos((t * 10_000 + i) * 37));
                    }
                });
            }
        });
        assert_eq!(r.snapshot().count(), 40_000);
    }
}
