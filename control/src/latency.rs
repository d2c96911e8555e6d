//! Latency histograms in a [`Status`](crate::status::Status): the time
//! each guest request spends in the daemon's block layers, by request
//! type, since the daemon started.
//!
//! A [`Latency`] carries its non-empty buckets (upper bound in
//! nanoseconds, count), so reports can be merged (a service's disks) and
//! any quantile read again, and the quantiles an operator reads first.

use serde::{Deserialize, Serialize};

/// The bound of the bucket above every other bucket.
pub const ABOVE_ALL: u64 = u64::MAX;

/// Latency histograms of the guest's requests, by type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestLatency {
    pub read: Latency,
    pub write: Latency,
    pub flush: Latency,
    /// Discard and write-zeroes requests.
    pub discard: Latency,
}

impl GuestLatency {
    /// Adds `other`'s requests to these (the histograms of two disks).
    pub fn merge(&mut self, other: &GuestLatency) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        self.flush.merge(&other.flush);
        self.discard.merge(&other.discard);
    }

    /// The request types with their label: `read`, `write`, `flush`,
    /// `discard`.
    pub fn by_op(&self) -> [(&'static str, &Latency); 4] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("flush", &self.flush),
            ("discard", &self.discard),
        ]
    }
}

/// One request type's histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Requests counted.
    pub count: u64,
    /// Their summed time in seconds.
    pub sum_seconds: f64,
    /// Quantiles in microseconds: the upper bound of the bucket that
    /// holds them (at most 15 % above the true value); absent without
    /// requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    /// The non-empty buckets, ascending: `[upper bound in ns, count]`;
    /// [`ABOVE_ALL`] is the bucket above the last bound.
    #[serde(default)]
    pub buckets: Vec<[u64; 2]>,
}

impl Latency {
    /// A histogram from its buckets (ascending bounds, as recorded).
    pub fn new(sum_ns: u64, buckets: Vec<[u64; 2]>) -> Latency {
        let mut l = Latency {
            sum_seconds: sum_ns as f64 / 1e9,
            buckets,
            ..Latency::default()
        };
        l.refresh();
        l
    }

    /// The upper bound, in nanoseconds, of the bucket holding quantile `q`
    /// (0 to 1) of the requests; `None` without requests. A quantile in
    /// the bucket above every bound is that bucket's lower bound.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let mut below = 0;
        for &[le, n] in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(if le == ABOVE_ALL { below } else { le });
            }
            below = le;
        }
        Some(below)
    }

    /// Requests that took at most `le_ns` (exact when `le_ns` is a bucket
    /// bound).
    pub fn count_at_most(&self, le_ns: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|b| b[0] <= le_ns)
            .map(|b| b[1])
            .sum()
    }

    /// Adds `other`'s requests to these.
    pub fn merge(&mut self, other: &Latency) {
        let mut all: Vec<[u64; 2]> = self.buckets.iter().chain(&other.buckets).copied().collect();
        all.sort_by_key(|b| b[0]);
        let mut merged: Vec<[u64; 2]> = Vec::with_capacity(all.len());
        for [le, n] in all {
            match merged.last_mut() {
                Some(last) if last[0] == le => last[1] += n,
                _ => merged.push([le, n]),
            }
        }
        self.buckets = merged;
        self.sum_seconds += other.sum_seconds;
        self.refresh();
    }

    fn refresh(&mut self) {
        self.count = self.buckets.iter().map(|b| b[1]).sum();
        let us = |q| self.quantile_ns(q).map(|ns| ns as f64 / 1e3);
        (self.p50_us, self.p99_us, self.p999_us) = (us(0.5), us(0.99), us(0.999));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(buckets: &[[u64; 2]]) -> Latency {
        Latency::new(1_000, buckets.to_vec())
    }

    #[test]
    fn quantiles_are_the_bound_of_the_bucket_that_holds_them() {
        // 98 requests up to 10 µs, one up to 100 µs, one above all.
        let l = hist(&[[10_000, 98], [100_000, 1], [ABOVE_ALL, 1]]);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50_us, Some(10.0));
        assert_eq!(l.p99_us, Some(100.0));
        assert_eq!(l.quantile_ns(1.0), Some(100_000));
        assert_eq!(l.quantile_ns(0.0), Some(10_000));
        assert_eq!(l.count_at_most(10_000), 98);
        assert_eq!(l.count_at_most(99_999), 98);
        assert_eq!(l.count_at_most(100_000), 99);
        assert_eq!(Latency::default().quantile_ns(0.5), None);
        assert_eq!(Latency::default().p99_us, None);
    }

    #[test]
    fn merging_adds_bucket_by_bucket() {
        let mut a = hist(&[[1_000, 2], [5_000, 1]]);
        let b = hist(&[[2_000, 4], [5_000, 3], [ABOVE_ALL, 1]]);
        a.merge(&b);
        assert_eq!(
            a.buckets,
            vec![[1_000, 2], [2_000, 4], [5_000, 4], [ABOVE_ALL, 1]]
        );
        assert_eq!(a.count, 11);
        assert!((a.sum_seconds - 2e-6).abs() < 1e-12);
        assert_eq!(a.p50_us, Some(2.0));
        let mut empty = Latency::default();
        empty.merge(&a);
        assert_eq!(empty, a);
    }

    #[test]
    fn a_report_survives_json() {
        let g = GuestLatency {
            write: hist(&[[1_120, 7], [ABOVE_ALL, 1]]),
            ..GuestLatency::default()
        };
        let back: GuestLatency = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
    }
}
