//! `backup --rate auto`: pace a live backup's NBD reads by the guest's own
//! I/O latency.
//!
//! QEMU serves the backup's reads in the main loop that also serves the
//! guest's disk (without an iothread, the default), so reading as fast as
//! possible makes the guest's requests wait: inside a TCG guest here, a
//! full backup at full speed raised the guest's write p99 22–38×, at
//! 50 MB/s about 2× (`docs/BENCHMARKS.md`, `live-backup-guest`). Which
//! rate is gentle enough depends on the host, its storage and the guest's
//! load; an operator cannot know it in advance. So, as storage-latency
//! control in commercial backup products does, the backup watches the
//! latency the guest sees on the disk being backed up, and slows down
//! when it rises.
//!
//! # The signal
//! The hypervisor's own accounting of the guest's disk: cumulative
//! operations and total time of reads and writes ([`IoTotals`]: QMP
//! `query-blockstats` of the guest device, or `virsh domblkstat`). The
//! backup's own reads go through another block backend (the NBD export)
//! and are not counted. Each window ([`WINDOW`]) gives the guest's
//! average read and write latency in that window.
//!
//! # The baseline: the guest without our reads
//! A backup costs the guest more than its reads: during a full backup
//! every first write to a cluster is copied before write, whatever the
//! read rate. Judged against its usual latency, such a guest looks hurt
//! at any rate, and an early version of this controller slowed a full
//! backup down to [`FLOOR`] for no gain (inside a TCG guest: 59 s for
//! 1 GiB, p99 still 2.1x). So the baseline is measured during the backup:
//! a busy guest gets a pause window (the limiter at [`PAUSED`]) after
//! every [`PAUSE_EVERY`] windows, and the guest's average latency in it
//! becomes the baseline of each kind with enough operations. Before the
//! first pause, the disk's lifetime averages serve (the first window the
//! guest is busy in is followed by a pause). A kind of operation with
//! fewer than [`MIN_BASELINE_OPS`] in the disk's lifetime has no baseline
//! until a pause measures one.
//!
//! # The control law ([`Controller`])
//! Multiplicative increase, multiplicative decrease, as TCP does:
//! - a window is judged once a kind with a baseline had at least
//!   [`MIN_OPS`] operations in it, or after [`LONGEST_WINDOW`] (an idle
//!   guest is not hurt); a kind with fewer operations is not judged;
//! - if the guest's average latency of a kind exceeds [`SLOWER_ABOVE`]
//!   times its baseline, the rate becomes half of what the backup read in
//!   that window (not of the nominal limit, which may be far above what
//!   was read), never below [`FLOOR`], so the backup always ends;
//! - otherwise it grows by half, up to [`CEILING`], where the limit is
//!   lifted altogether.
//!
//! The backup starts at [`START_RATE`]. An idle guest, or a host where
//! the backup does not hurt the guest (an iothread, fast storage), lifts
//! the limit within a few windows; a guest that suffers gets about the
//! rate its latency allows. Inside a TCG guest here (500 random 4 KiB
//! writes a second), a full backup of a 1 GiB disk found about 55 MB/s on
//! its own (19.4 s; a hand-picked `--rate 50M` took 20.3–20.6 s), against
//! 2.8 s unlimited; the guest's write p99 during it was 2.6x its idle p99
//! (2.2–2.3x with 50M, 22–38x unlimited); over two 3-round runs of both,
//! auto and 50M were within the noise of each other (2.05x and 4.60x
//! against 3.40x and 2.65x). An average is what the hypervisor
//! counts, so the controller bounds the guest's average latency, not its
//! tail. Incrementals are mostly over before the first window ends: they
//! run at [`START_RATE`].
//!
//! # Where it applies
//! `backup --qmp`, `backup --domain`, and `backup --plan` / `protect
//! --plan`, where each VM gets a limiter and a controller of its own
//! (`service::backup`): one guest's latency says nothing about another's.
//! The drive must be attached to a guest device (checked before the start
//! transaction: a clear error otherwise).
//!
//! # Threads
//! [`run`] runs on its own thread beside the store's readers, for as long
//! as they read; it owns the QMP session meanwhile (the backup's thread
//! does not use it while reading). A probe that fails ends the pacing and
//! keeps the last rate: the backup goes on. The pacer never leaves the
//! limiter paused, whichever way it ends (a plan's next disk of the same
//! VM reads through the same limiter).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::migrate::RateLimiter;
use serde::Serialize;
use tracing::{debug, warn};

use crate::qmp::Qmp;

/// How a live backup paces its reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// At most this many bytes per second (0: unlimited).
    Fixed(u64),
    /// By the guest's latency (this module).
    Auto,
}

impl Rate {
    /// The limiter's starting rate.
    pub fn initial(self) -> u64 {
        match self {
            Rate::Fixed(r) => r,
            Rate::Auto => START_RATE,
        }
    }
}

/// The rate an auto-paced backup starts at.
pub const START_RATE: u64 = 64 << 20;
/// The lowest rate it slows down to.
pub const FLOOR: u64 = 8 << 20;
/// Above this rate the limit is lifted.
pub const CEILING: u64 = 4 << 30;
/// Slow down when the guest's average latency in a window exceeds its
/// baseline by this factor.
pub const SLOWER_ABOVE: f64 = 1.25;
/// Operations of a kind a window needs before it is judged.
pub const MIN_OPS: u64 = 8;
/// Operations of a kind in the disk's lifetime for a baseline.
pub const MIN_BASELINE_OPS: u64 = 64;
/// A busy guest gets a pause window after this many windows.
pub const PAUSE_EVERY: u32 = 5;
/// The limiter's rate during a pause (bytes per second; at most one
/// request passes).
pub const PAUSED: u64 = 1;
/// How often the guest's counters are read.
pub const WINDOW: Duration = Duration::from_millis(200);
/// A window is judged after this long even with few operations.
pub const LONGEST_WINDOW: Duration = Duration::from_secs(1);

/// Cumulative I/O counters of the guest's disk, as the hypervisor keeps
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTotals {
    pub read_ops: u64,
    pub read_ns: u64,
    pub write_ops: u64,
    pub write_ns: u64,
}

impl IoTotals {
    fn since(&self, earlier: &IoTotals) -> IoTotals {
        IoTotals {
            read_ops: self.read_ops.saturating_sub(earlier.read_ops),
            read_ns: self.read_ns.saturating_sub(earlier.read_ns),
            write_ops: self.write_ops.saturating_sub(earlier.write_ops),
            write_ns: self.write_ns.saturating_sub(earlier.write_ns),
        }
    }

    /// Average (read, write) latency in ns, where there were operations.
    fn averages(&self, min_ops: u64) -> [Option<f64>; 2] {
        let avg = |ops: u64, ns: u64| (ops >= min_ops.max(1)).then(|| ns as f64 / ops as f64);
        [
            avg(self.read_ops, self.read_ns),
            avg(self.write_ops, self.write_ns),
        ]
    }
}

/// Reads the guest disk's counters.
pub trait LatencyProbe {
    /// The counters now; an error ends the pacing (the rate stays).
    fn totals(&mut self) -> Result<IoTotals, String>;
}

/// The counters of a QEMU guest device, through QMP `query-blockstats`.
pub struct QmpProbe<'a> {
    pub q: &'a mut Qmp,
    /// The device's drive id (empty with `-blockdev`) and path, as
    /// `query-block` gives them.
    pub device: String,
    pub qdev: Option<String>,
}

impl LatencyProbe for QmpProbe<'_> {
    fn totals(&mut self) -> Result<IoTotals, String> {
        let all = self
            .q
            .query_blockstats()
            .map_err(|e| format!("query-blockstats: {e}"))?;
        let hit = all.iter().find(|e| {
            (self.qdev.is_some() && e.qdev == self.qdev)
                || (!self.device.is_empty() && e.device == self.device)
        });
        let s = hit
            .ok_or_else(|| {
                format!(
                    "query-blockstats has no device {}",
                    self.qdev.as_deref().unwrap_or(&self.device)
                )
            })?
            .stats;
        Ok(IoTotals {
            read_ops: s.rd_operations,
            read_ns: s.rd_total_time_ns,
            write_ops: s.wr_operations,
            write_ns: s.wr_total_time_ns,
        })
    }
}

/// What the controller decided about a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Not enough operations yet: keep the window open.
    Wait,
    /// The new rate (0: unlimited).
    Rate(u64),
}

/// The control law (see the module doc), on counters and times given to
/// it, so tests drive it without a guest.
#[derive(Debug)]
pub struct Controller {
    /// (read, write) averages, ns: the disk's lifetime ones at the start,
    /// then each kind's from the last pause window that measured it.
    baseline: [Option<f64>; 2],
    /// Counters and bytes read where the open window started.
    start: (IoTotals, u64, Instant),
    /// The nominal rate (CEILING and above: unlimited).
    rate: u64,
    /// The next window is a pause.
    pausing: bool,
    /// Windows judged since the last pause.
    since_pause: u32,
    report: Report,
}

impl Controller {
    /// Starts from the disk's counters when the backup starts.
    pub fn new(at_start: IoTotals, now: Instant) -> Controller {
        let baseline = at_start.averages(MIN_BASELINE_OPS);
        Controller {
            baseline,
            start: (at_start, 0, now),
            rate: START_RATE,
            // The first window the guest is busy in is followed by a pause.
            pausing: false,
            since_pause: PAUSE_EVERY - 1,
            report: Report {
                baseline_read_us: baseline[0].map(|b| b / 1000.0),
                baseline_write_us: baseline[1].map(|b| b / 1000.0),
                windows: 0,
                slowed: 0,
                paused: 0,
                lowest_rate: START_RATE,
                final_rate: START_RATE,
                error: None,
            },
        }
    }

    /// Judges the window that ends `now`, with the guest's counters `t` and
    /// `read` bytes read by the backup so far.
    pub fn judge(&mut self, t: IoTotals, read: u64, now: Instant) -> Verdict {
        let (t0, read0, since) = self.start;
        let span = now.saturating_duration_since(since);
        let window = t.since(&t0);
        let avg = window.averages(MIN_OPS);
        if self.pausing {
            // The guest's latency without our reads, with everything else
            // the backup costs it (copy-before-write): the baseline.
            for (b, a) in self.baseline.iter_mut().zip(avg) {
                if a.is_some() {
                    *b = a;
                }
            }
            self.pausing = false;
            self.since_pause = 0;
            self.report.paused += 1;
            self.start = (t, read, now);
            debug!(baseline = ?self.baseline, "pacing: paused window");
            return Verdict::Rate(self.limit());
        }
        let ops = [window.read_ops, window.write_ops];
        let judged = |k: usize| self.baseline[k].is_some();
        let enough = (0..2).any(|k| judged(k) && ops[k] >= MIN_OPS);
        if !enough && span < LONGEST_WINDOW {
            return Verdict::Wait;
        }
        let hurt = (0..2).any(|k| match (avg[k], self.baseline[k]) {
            (Some(a), Some(b)) => a > SLOWER_ABOVE * b,
            _ => false,
        });
        let nanos = span.as_nanos().max(1_000_000);
        let delivered = (u128::from(read.saturating_sub(read0)) * 1_000_000_000 / nanos)
            .try_into()
            .unwrap_or(u64::MAX);
        self.rate = if hurt {
            self.report.slowed += 1;
            (self.rate.min(delivered) / 2).max(FLOOR)
        } else {
            self.rate.saturating_add(self.rate / 2).min(CEILING)
        };
        self.report.windows += 1;
        self.report.lowest_rate = self.report.lowest_rate.min(self.rate);
        self.start = (t, read, now);
        // A busy guest: measure its latency without our reads now and then.
        self.since_pause += 1;
        if enough && self.since_pause >= PAUSE_EVERY {
            self.pausing = true;
        }
        let limit = self.limit();
        self.report.final_rate = self.nominal();
        debug!(?avg, baseline = ?self.baseline, delivered, hurt, limit, "pacing window");
        Verdict::Rate(limit)
    }

    /// The limiter's rate now (0: unlimited; [`PAUSED`] in a pause).
    pub fn limit(&self) -> u64 {
        if self.pausing {
            PAUSED
        } else {
            self.nominal()
        }
    }

    /// The rate outside pauses (0: unlimited).
    fn nominal(&self) -> u64 {
        if self.rate >= CEILING {
            0
        } else {
            self.rate
        }
    }

    pub fn report(&self) -> &Report {
        &self.report
    }
}

/// What the pacing did (`--json`: `pacing`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// The guest's lifetime average read latency at the start, µs (none:
    /// too few reads to judge them).
    pub baseline_read_us: Option<f64>,
    /// The same for writes.
    pub baseline_write_us: Option<f64>,
    /// Windows judged.
    pub windows: u64,
    /// Windows where the guest's latency rose and the backup slowed down.
    pub slowed: u64,
    /// Windows the backup paused in to measure the guest without its reads.
    pub paused: u64,
    /// The lowest rate set, bytes per second.
    pub lowest_rate: u64,
    /// The rate at the end (0: unlimited).
    pub final_rate: u64,
    /// Why the pacing stopped early (the rate then stayed as it was).
    pub error: Option<String>,
}

/// Pace `limit` until `done`: read the guest's counters every [`WINDOW`]
/// (`window` for probes that cost more, such as a `virsh` process) and
/// apply the controller's rate. `read` counts the bytes the backup read.
pub fn run(
    probe: &mut dyn LatencyProbe,
    limit: &RateLimiter,
    read: &AtomicU64,
    done: &AtomicBool,
    window: Duration,
) -> Report {
    // The limiter may be shared by the next read (a plan's next disk of
    // the same VM): never leave it paused.
    if limit.rate() == PAUSED {
        limit.set_rate(START_RATE);
    }
    let mut c = match probe.totals() {
        Ok(t) => Controller::new(t, Instant::now()),
        Err(e) => {
            warn!(error = %e, "cannot read the guest's I/O counters; the backup keeps its starting rate");
            return Report {
                error: Some(e),
                lowest_rate: limit.rate(),
                final_rate: limit.rate(),
                ..Report::default()
            };
        }
    };
    limit.set_rate(c.limit());
    let step = Duration::from_millis(10).min(window);
    'pace: loop {
        let until = Instant::now() + window;
        while Instant::now() < until {
            if done.load(Ordering::Relaxed) {
                break 'pace;
            }
            std::thread::sleep(step);
        }
        match probe.totals() {
            Ok(t) => {
                if let Verdict::Rate(r) = c.judge(t, read.load(Ordering::Relaxed), Instant::now()) {
                    if r != limit.rate() {
                        limit.set_rate(r);
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the guest's I/O counters; the backup keeps its rate");
                c.report.error = Some(e);
                break 'pace;
            }
        }
    }
    // Never left paused: any reads still to come go on at the last rate.
    limit.set_rate(c.report.final_rate);
    c.report
}

/// Run `work` (the store's reads) while [`run`] paces `limit` beside it on
/// a scoped thread; `work`'s result and the pacing's report.
pub fn beside<R>(
    probe: &mut (dyn LatencyProbe + Send),
    limit: &RateLimiter,
    read: &AtomicU64,
    window: Duration,
    work: impl FnOnce() -> R,
) -> (R, Option<Report>) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let pacer = s.spawn(|| run(probe, limit, read, &done, window));
        let r = work();
        done.store(true, Ordering::Relaxed);
        (r, pacer.join().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Lifetime: 1000 writes at 1 ms, 1000 reads at 2 ms.
    fn start() -> IoTotals {
        IoTotals {
            read_ops: 1000,
            read_ns: 2000 * MS,
            write_ops: 1000,
            write_ns: 1000 * MS,
        }
    }

    /// `t` plus `n` writes of `ms` each.
    fn writes(t: IoTotals, n: u64, ms: f64) -> IoTotals {
        IoTotals {
            write_ops: t.write_ops + n,
            write_ns: t.write_ns + (n as f64 * ms * MS as f64) as u64,
            ..t
        }
    }

    #[test]
    fn a_hurt_guest_halves_what_was_read_and_a_calm_one_speeds_up() {
        let t0 = Instant::now();
        let mut c = Controller::new(start(), t0);
        assert_eq!(c.report().baseline_write_us, Some(1000.0));
        assert_eq!(c.report().baseline_read_us, Some(2000.0));
        assert_eq!(c.limit(), START_RATE);
        // Writes at 1.2 ms: within 1.25x, faster by half; the guest is busy,
        // so the next window is a pause.
        let t1 = writes(start(), 50, 1.2);
        assert_eq!(c.judge(t1, 12 << 20, t0 + WINDOW), Verdict::Rate(PAUSED));
        assert_eq!(c.report().final_rate, START_RATE + START_RATE / 2);
        // The pause measures 1 ms writes: the baseline stays 1 ms.
        let t2 = writes(t1, 50, 1.0);
        let v = c.judge(t2, 12 << 20, t0 + 2 * WINDOW);
        assert_eq!(v, Verdict::Rate(START_RATE + START_RATE / 2));
        assert_eq!(c.report().paused, 1);
        // Writes at 2 ms: hurt. The backup read 10 MiB in 0.2 s (50 MiB/s),
        // below the nominal 96 MiB/s: half of what it read.
        let t3 = writes(t2, 50, 2.0);
        let v = c.judge(t3, 22 << 20, t0 + 3 * WINDOW);
        assert_eq!(v, Verdict::Rate(25 << 20));
        assert_eq!(c.report().slowed, 1);
        // Still hurt: down to the floor, never below, with a pause every
        // PAUSE_EVERY windows (its 1 ms keeps the baseline).
        let mut t = t3;
        for i in 4..16 {
            let ms = if c.limit() == PAUSED { 1.0 } else { 5.0 };
            t = writes(t, 50, ms);
            c.judge(t, 22 << 20, t0 + i * WINDOW);
        }
        assert_eq!(c.report().lowest_rate, FLOOR);
        assert_eq!(c.report().final_rate, FLOOR);
        assert_eq!(c.report().paused, 3);
    }

    #[test]
    fn a_cost_our_reads_do_not_cause_does_not_slow_the_backup() {
        // The guest's writes take 2.5 ms whether the backup reads or pauses
        // (copy-before-write, another VM's load): 2.5x the lifetime
        // baseline, but the same as without our reads.
        let t0 = Instant::now();
        let mut c = Controller::new(start(), t0);
        let t1 = writes(start(), 50, 2.5);
        c.judge(t1, 0, t0 + WINDOW);
        assert_eq!(c.report().slowed, 1, "the lifetime baseline judges first");
        assert_eq!(c.limit(), PAUSED);
        let mut t = writes(t1, 50, 2.5);
        c.judge(t, 0, t0 + 2 * WINDOW);
        assert_eq!(c.report().baseline_write_us, Some(1000.0));
        for i in 3..40 {
            t = writes(t, 50, 2.5);
            c.judge(t, 0, t0 + i * WINDOW);
        }
        assert_eq!(c.report().slowed, 1);
        assert_eq!(c.report().final_rate, 0, "the limit lifts");
    }

    #[test]
    fn few_operations_wait_and_an_idle_guest_lifts_the_limit() {
        let t0 = Instant::now();
        let mut c = Controller::new(start(), t0);
        // 3 slow writes in 0.2 s: too few to judge, the window stays open.
        let t1 = writes(start(), 3, 50.0);
        assert_eq!(c.judge(t1, 0, t0 + WINDOW), Verdict::Wait);
        // After the longest window they are judged (too few to be hurt),
        // and a guest that idle gets no pause.
        let v = c.judge(t1, 0, t0 + LONGEST_WINDOW);
        assert_eq!(v, Verdict::Rate(START_RATE + START_RATE / 2));
        // An idle guest: the limit grows to the ceiling and is lifted.
        let mut i = 2;
        while c.limit() != 0 {
            i += 1;
            assert!(i < 30, "the limit never lifted");
            c.judge(t1, 0, t0 + i * LONGEST_WINDOW);
        }
        assert_eq!(c.report().final_rate, 0);
        assert_eq!(c.report().paused, 0);
        // Hurt again: half of what was read, not of the lifted limit (and
        // a pause next).
        let t2 = writes(t1, 100, 4.0);
        let v = c.judge(t2, 400 << 20, t0 + i * LONGEST_WINDOW + WINDOW);
        assert_eq!(v, Verdict::Rate(PAUSED));
        assert_eq!(c.report().final_rate, 1000 << 20);
    }

    #[test]
    fn kinds_without_a_baseline_are_not_judged() {
        let t0 = Instant::now();
        // A guest that hardly ever read: only writes count.
        let s = IoTotals {
            read_ops: 10,
            read_ns: 10 * MS,
            ..start()
        };
        let mut c = Controller::new(s, t0);
        assert_eq!(c.report().baseline_read_us, None);
        // Counters that go backwards (a device replaced) are no operations.
        assert_eq!(c.judge(IoTotals::default(), 0, t0 + WINDOW), Verdict::Wait);
        let t1 = IoTotals {
            read_ops: s.read_ops + 100,
            read_ns: s.read_ns + 100 * 100 * MS,
            ..writes(s, 20, 1.0)
        };
        c.judge(t1, 0, t0 + 2 * WINDOW);
        assert_eq!(c.report().slowed, 0);
        assert_eq!(c.report().final_rate, START_RATE + START_RATE / 2);
    }

    struct Fails;
    impl LatencyProbe for Fails {
        fn totals(&mut self) -> Result<IoTotals, String> {
            Err("no such device".into())
        }
    }

    /// Busy 1 ms writes for `ok` samples, then an error.
    struct FailsAfter {
        ok: u32,
        t: IoTotals,
    }
    impl LatencyProbe for FailsAfter {
        fn totals(&mut self) -> Result<IoTotals, String> {
            if self.ok == 0 {
                return Err("QMP gone".into());
            }
            self.ok -= 1;
            self.t = writes(self.t, 50, 1.0);
            Ok(self.t)
        }
    }

    #[test]
    fn a_probe_that_fails_in_a_pause_leaves_the_reads_running() {
        // Start, one busy window (a pause follows), then the probe fails
        // at the end of the pause.
        let limit = RateLimiter::new(START_RATE);
        let mut probe = FailsAfter { ok: 2, t: start() };
        let r = run(
            &mut probe,
            &limit,
            &AtomicU64::new(0),
            &AtomicBool::new(false),
            Duration::from_millis(1),
        );
        assert_eq!(r.error.as_deref(), Some("QMP gone"));
        assert_eq!(r.windows, 1);
        assert_eq!(limit.rate(), START_RATE + START_RATE / 2);
    }

    #[test]
    fn a_probe_that_fails_keeps_the_starting_rate() {
        let limit = RateLimiter::new(START_RATE);
        let r = run(
            &mut Fails,
            &limit,
            &AtomicU64::new(0),
            &AtomicBool::new(false),
            WINDOW,
        );
        assert_eq!(r.error.as_deref(), Some("no such device"));
        assert_eq!(limit.rate(), START_RATE);
    }
}
