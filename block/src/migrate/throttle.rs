//! Copy-rate limiting and measurement.
//!
//! [`RateLimiter`] paces the copier: each chunk reserves its bytes on a
//! virtual clock that advances `bytes / rate` per reservation, and the
//! worker waits until its reservation's end before copying. Idle time
//! earns no credit (no bursts after a pause), and a rate change cancels
//! every pending reservation so it applies at once.
//!
//! [`RateWindow`] measures the migration rate over a sliding window of
//! `(time, bytes migrated)` samples.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest single sleep, so a rate change or a stop is noticed quickly.
const SLICE: Duration = Duration::from_millis(20);

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

    /// Waits until `bytes` may be copied. Returns early if `stop()` turns true.
    pub(super) fn acquire(&self, bytes: u64, stop: impl Fn() -> bool) {
        loop {
            let (until, generation) = {
                let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
                let rate = self.rate.load(Ordering::SeqCst);
                if rate == 0 || bytes == 0 {
                    return;
                }
                let start = (*next).max(Instant::now());
                *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
                (*next, self.generation.load(Ordering::SeqCst))
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
    fn limiter_paces_and_applies_rate_changes_at_once() {
        let limiter = RateLimiter::new(1 << 20);
        let start = Instant::now();
        // 4 reservations of 128 KiB at 1 MiB/s from 2 threads: >= 0.5 s.
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..2 {
                        limiter.acquire(128 << 10, || false);
                    }
                });
            }
        });
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(490), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        // A huge reservation at a crawl is cut short by lifting the limit.
        limiter.set_rate(1);
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| limiter.acquire(1 << 30, || false));
            std::thread::sleep(Duration::from_millis(100));
            limiter.set_rate(0);
        });
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(limiter.rate(), 0);
        // Stop ends a wait too.
        limiter.set_rate(1);
        let start = Instant::now();
        limiter.acquire(1 << 30, || start.elapsed() > Duration::from_millis(50));
        assert!(start.elapsed() < Duration::from_secs(2));
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
