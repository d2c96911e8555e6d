//! Copy-rate limiting and measurement.
//!
//! [`RateLimiter`] paces the copier: each chunk reserves its bytes on a
//! virtual clock that advances `bytes / rate` per reservation, and the
//! worker waits until its reservation's end before copying. Idle time
//! earns no credit (no bursts after a pause), and a rate change cancels
//! every pending reservation so it applies at once. However small the
//! rate (below one chunk per second), chunks move one at a time, each a
//! full `chunk / rate` after the one before. A copy-on-read takes a
//! reservation only if one could start now ([`RateLimiter::try_acquire`]),
//! so it never waits and never pushes the total past the limit.
//!
//! Time-dependent decisions take the time as an argument
//! ([`RateLimiter::reserve`], [`RateWindow::sample`]), so tests drive them
//! with a synthetic clock; only [`RateLimiter::acquire`] sleeps.
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

/// A token bucket without burst, changeable at run time.
pub(super) struct RateLimiter {
    rate: AtomicU64,
    generation: AtomicU64,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (0 = unlimited).
    pub(super) fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate: AtomicU64::new(rate),
            generation: AtomicU64::new(0),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// The limit in bytes per second, 0 = unlimited.
    pub(super) fn rate(&self) -> u64 {
        self.rate.load(Ordering::SeqCst)
    }

    /// Changes the limit; pending reservations are redone at the new rate.
    pub(super) fn set_rate(&self, rate: u64) {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        self.rate.store(rate, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        *next = Instant::now();
    }

    /// Reserves `bytes` at `now`: the instant the reservation ends, when
    /// the bytes may be copied, and the rate generation it belongs to.
    /// `None` when there is no limit.
    pub(super) fn reserve(&self, bytes: u64, now: Instant) -> Option<(Instant, u64)> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 || bytes == 0 {
            return None;
        }
        let start = (*next).max(now);
        *next = start + duration(bytes, rate);
        Some((*next, self.generation.load(Ordering::SeqCst)))
    }

    /// Reserves `bytes` if nothing else is reserved beyond `now`, i.e. if
    /// they may be copied at once; never waits.
    pub(super) fn try_reserve(&self, bytes: u64, now: Instant) -> bool {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 || bytes == 0 {
            return true;
        }
        if *next > now {
            return false;
        }
        *next = now + duration(bytes, rate);
        true
    }

    /// [`RateLimiter::try_reserve`] now.
    pub(super) fn try_acquire(&self, bytes: u64) -> bool {
        self.try_reserve(bytes, Instant::now())
    }

    /// Waits until `bytes` may be copied. Returns early if `stop()` turns true.
    pub(super) fn acquire(&self, bytes: u64, stop: impl Fn() -> bool) {
        loop {
            let Some((until, generation)) = self.reserve(bytes, Instant::now()) else {
                return;
            };
            loop {
                let now = Instant::now();
                if now >= until || stop() {
                    return;
                }
                if self.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                std::thread::sleep((until - now).min(SLICE));
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
        if let Some(&(at, _)) = self.samples.back() {
            if now.duration_since(at) < Duration::from_millis(10) {
                self.samples.pop_back();
            }
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
        // A huge reservation at a crawl is cut short by lifting the limit
        // (whether the lift comes before or during the wait).
        let limiter = RateLimiter::new(1);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| limiter.acquire(1 << 30, || false));
            limiter.set_rate(0);
            waiter.join().unwrap();
        });
        assert_eq!(limiter.rate(), 0);
        // Stop ends a wait too.
        limiter.set_rate(1);
        limiter.acquire(1 << 30, || true);
    }

    #[test]
    fn tiny_rates_space_single_chunks_on_a_synthetic_clock() {
        // 1 byte per second, 64 KiB chunks: each reservation ends a full
        // 65536 s after the one before, however many workers ask at once.
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        let ends: Vec<Instant> = (0..16)
            .map(|_| limiter.reserve(64 << 10, t0).unwrap().0)
            .collect();
        for (k, end) in ends.iter().enumerate() {
            assert_eq!(
                end.duration_since(t0),
                Duration::from_secs(65_536 * (k as u64 + 1)),
                "reservation {k}"
            );
        }
        // A copy-on-read cannot jump the queue...
        assert!(!limiter.try_reserve(64 << 10, t0 + Duration::from_secs(10)));
        // ...but takes a free slot once the queue has drained, and then
        // holds the next one back for its own duration.
        let drained = *ends.last().unwrap();
        assert!(limiter.try_reserve(64 << 10, drained));
        assert!(!limiter.try_reserve(64 << 10, drained + Duration::from_secs(65_535)));
        assert!(limiter.try_reserve(64 << 10, drained + Duration::from_secs(65_536)));
        // An absurd size at the smallest rate does not overflow.
        assert!(limiter.reserve(u64::MAX, drained).is_some());
        // Unlimited: no reservation, no refusal.
        let free = RateLimiter::new(0);
        assert_eq!(free.reserve(1 << 20, t0), None);
        assert!(free.try_reserve(1 << 20, t0));
        // Idle time earns no credit: after a long pause, back-to-back
        // reservations are spaced again from the pause's end.
        let limiter = RateLimiter::new(1 << 20);
        let later = t0 + Duration::from_secs(3600);
        let (a, _) = limiter.reserve(1 << 20, later).unwrap();
        let (b, _) = limiter.reserve(1 << 20, later).unwrap();
        assert_eq!(a.duration_since(later), Duration::from_secs(1));
        assert_eq!(b.duration_since(later), Duration::from_secs(2));
        // A rate change starts a new generation and drops the queue.
        let (_, generation) = limiter.reserve(1 << 20, later).unwrap();
        limiter.set_rate(2 << 20);
        let (c, new_generation) = limiter.reserve(1 << 20, Instant::now()).unwrap();
        assert_ne!(generation, new_generation);
        assert!(c < later);
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
}
