//! Copy-rate limiting and measurement.
//!
//! [`RateLimiter`] paces the background copier on one clock: a copy of
//! `n` bytes takes the slot `[start, start + n / rate)`, and the next slot
//! starts where it ends. A worker waits until a slot starts (now or
//! later) and takes it, so however small the rate (below one chunk per
//! second), chunks move one at a time, each a full `chunk / rate` after
//! the one before, and never one per worker at once. Idle time earns no
//! credit (no burst after a pause), and a rate change applies at once.
//! Copy-on-read is the guest's demand and is not paced. A live backup
//! (crate `hypervisor`, `backup --rate`) paces its NBD reads with the same
//! limiter.
//!
//! One limiter can pace several migrations: `instant-boot --plan` hands
//! every disk's copier the same `Arc<RateLimiter>`
//! ([`super::MigrationOptions::shared_limit`]), so all their workers take
//! slots from one clock and the service's copy rate, not each disk's,
//! stays under the limit; a rate change through any of them (or the
//! limiter itself) applies to all.
//!
//! Decisions take the time as an argument ([`RateLimiter::take`],
//! [`RateWindow::sample`]), so tests drive them with a synthetic clock;
//! only [`RateLimiter::acquire`] sleeps.
//!
//! [`RateWindow`] measures the migration rate over a sliding window of
//! `(time, bytes migrated)` samples.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest single sleep, so a rate change or a stop is noticed quickly.
const SLICE: Duration = Duration::from_millis(20);
/// Longest single reservation (a chunk at a rate of a few bytes per
/// second), so instants never overflow.
const LONGEST: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How long `bytes` take at `rate` bytes per second (`rate` > 0).
fn duration(bytes: u64, rate: u64) -> Duration {
    Duration::try_from_secs_f64(bytes as f64 / rate as f64)
        .unwrap_or(LONGEST)
        .min(LONGEST)
}

/// A token bucket without burst, changeable at run time, shareable
/// between migrations (see the module doc).
#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    /// Where the last slot taken ends: the next one starts there, or now.
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (0 = unlimited).
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate: AtomicU64::new(rate),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// The limit in bytes per second, 0 = unlimited.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::SeqCst)
    }

    /// Changes the limit, at once: the next slot starts now.
    pub fn set_rate(&self, rate: u64) {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        self.rate.store(rate, Ordering::SeqCst);
        *next = Instant::now();
    }

    /// Takes the slot for `bytes` if it starts no later than `now`;
    /// otherwise says when the next slot starts. Always succeeds without
    /// a limit.
    pub(super) fn take(&self, bytes: u64, now: Instant) -> std::result::Result<(), Instant> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 || bytes == 0 {
            return Ok(());
        }
        if *next > now {
            return Err(*next);
        }
        *next = (*next).max(now) + duration(bytes, rate);
        Ok(())
    }

    /// For the copier (and any other paced reader: a live backup's NBD
    /// reads): waits until a slot for `bytes` starts and takes it. Returns
    /// early if `stop()` turns true.
    pub fn acquire(&self, bytes: u64, stop: impl Fn() -> bool) {
        loop {
            let now = Instant::now();
            match self.take(bytes, now) {
                Ok(()) => return,
                Err(_) if stop() => return,
                // Sleeps in slices, so a rate change or a stop is seen.
                Err(start) => std::thread::sleep((start - now).min(SLICE)),
            }
        }
    }
}

/// The rate of a growing counter over a sliding window.
pub(super) struct RateWindow {
    span: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    /// A window of `span`.
    pub(super) fn new(span: Duration) -> RateWindow {
        RateWindow {
            span,
            samples: VecDeque::new(),
        }
    }

    /// Records the counter's value `value` at `now`.
    pub(super) fn sample(&mut self, now: Instant, value: u64) {
        // Keep one sample older than the span, so the window covers it all.
        while self.samples.len() >= 2 && now.duration_since(self.samples[1].0) >= self.span {
            self.samples.pop_front();
        }
        // At most one sample per 10 ms: a sample that close to the one
        // before the newest replaces the newest. The oldest sample always
        // stays, so callers polling faster than that (a status watcher, a
        // metrics scraper and the progress log together) still measure a
        // rate instead of replacing the only sample forever.
        let n = self.samples.len();
        if n >= 2 && now.duration_since(self.samples[n - 2].0) < Duration::from_millis(10) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, value));
    }

    /// Units per second between the oldest and newest samples, 0 if
    /// there are fewer than two.
    pub(super) fn rate(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
                v1.saturating_sub(v0) as f64 / t1.duration_since(t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_acquire_ends_on_a_rate_change_or_a_stop() {
        // At a crawl the first slot starts now, the second in decades:
        // lifting the limit ends the wait (before or during it).
        let limiter = RateLimiter::new(1);
        limiter.acquire(1 << 30, || false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| limiter.acquire(1 << 30, || false));
            limiter.set_rate(0);
            waiter.join().unwrap();
        });
        assert_eq!(limiter.rate(), 0);
        // Stop ends a wait too.
        limiter.set_rate(1);
        limiter.acquire(1 << 30, || false);
        limiter.acquire(1 << 30, || true);
    }

    #[test]
    fn tiny_rates_move_one_chunk_at_a_time_on_a_synthetic_clock() {
        const CHUNK: u64 = 64 << 10;
        let slot = Duration::from_secs(CHUNK);
        // 1 byte per second: a 64 KiB chunk takes a 65536 s slot.
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        let take = |at: Instant| limiter.take(CHUNK, at);
        assert_eq!(take(t0), Ok(()));
        // Sixteen workers asking at once: none gets another chunk before
        // the slot ends.
        for _ in 0..16 {
            assert_eq!(take(t0), Err(t0 + slot));
        }
        assert_eq!(take(t0 + slot - Duration::from_secs(1)), Err(t0 + slot));
        assert_eq!(take(t0 + slot), Ok(()));
        assert_eq!(take(t0 + slot), Err(t0 + 2 * slot));
        // Idle time earns no credit: after a long pause, two chunks asked
        // at once are a slot apart again.
        let later = t0 + 100 * slot;
        assert_eq!(take(later), Ok(()));
        assert_eq!(take(later), Err(later + slot));
        // An absurd size at the smallest rate does not overflow.
        assert_eq!(limiter.take(u64::MAX, later + slot), Ok(()));
        // A rate change applies at once; unlimited never refuses.
        limiter.set_rate(0);
        assert_eq!(take(t0), Ok(()));
        assert_eq!(take(t0), Ok(()));
        let fast = RateLimiter::new(CHUNK);
        let now = Instant::now();
        assert_eq!(fast.take(CHUNK, now), Ok(()));
        assert_eq!(fast.take(CHUNK, now), Err(now + Duration::from_secs(1)));
    }

    #[test]
    fn migrations_sharing_a_limiter_take_slots_from_one_clock() {
        const CHUNK: u64 = 64 << 10;
        // Two disks' copiers, one limit of a chunk per second: together
        // they get one chunk per second, not one each.
        let shared = std::sync::Arc::new(RateLimiter::new(CHUNK));
        let (a, b) = (shared.clone(), shared.clone());
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(a.take(CHUNK, t0), Ok(()));
        assert_eq!(b.take(CHUNK, t0), Err(t0 + second));
        assert_eq!(b.take(CHUNK, t0 + second), Ok(()));
        assert_eq!(a.take(CHUNK, t0 + second), Err(t0 + 2 * second));
        // A rate change through one applies to the other.
        b.set_rate(0);
        assert_eq!(a.rate(), 0);
        assert_eq!(a.take(CHUNK, t0), Ok(()));
    }

    #[test]
    fn window_measures_recent_rate() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(5));
        assert_eq!(w.rate(), 0.0);
        for s in 0..=10u64 {
            w.sample(t0 + Duration::from_secs(s), s * 1000);
        }
        assert!((w.rate() - 1000.0).abs() < 1e-6, "{}", w.rate());
        // A stall: the window forgets the old progress within its span.
        for s in 11..=20u64 {
            w.sample(t0 + Duration::from_secs(s), 10_000);
        }
        assert_eq!(w.rate(), 0.0);
    }

    #[test]
    fn polling_faster_than_the_sample_spacing_still_measures() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(5));
        // A sample every 5 ms at 1000 units per second.
        for ms in 0..=400u64 {
            w.sample(t0 + Duration::from_millis(ms * 5), ms * 5);
        }
        assert!((w.rate() - 1000.0).abs() < 1.0, "{}", w.rate());
    }
}
