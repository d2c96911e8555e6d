//! The background copier: a coordinator thread and a pool of workers.
//!
//! The coordinator runs passes. Each pass starts `workers` threads that
//! take the next chunk whose bit is clear from a shared cursor and copy it
//! (see [`MigratingDevice::copy_chunk`]); meanwhile the coordinator ticks:
//! it samples the rate, checkpoints (target sync + bitmap sync) every
//! `checkpoint_bytes` or `checkpoint_interval`, and logs progress. After a
//! pass:
//! - every bit set: checkpoint, optional verify, `state.json` = complete,
//!   switch to passthrough, free the overlay;
//! - chunks left that did not fail (a target error cut a copy short, a
//!   pause): another pass;
//! - only failed chunks left: state `failed`; a resume retries them.
//!
//! Threads hold only a `Weak` reference between chunks, so dropping the
//! device ends them (within one chunk); [`MigratingDevice::halt`] stops
//! and joins them.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{lock, ChunkBuf, Copied, CopyError, Layers, MigratingDevice, Phase};
use crate::device::BlockDevice;
use crate::state::MigrationState;

/// Longest backoff between retries of a chunk the target refused.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a worker should do next.
enum Next {
    Run,
    Wait,
    Exit,
}

/// What the coordinator does after a pass.
enum AfterPass {
    Again,
    Done,
    /// Only failed chunks are left: wait for a resume.
    WaitRetry,
}

/// The coordinator's clocks.
struct Ticker {
    last_checkpoint: Instant,
    last_log: Instant,
}

/// The coordinator thread's body.
pub(super) fn run(weak: Weak<MigratingDevice>) {
    let mut ticker = Ticker {
        last_checkpoint: Instant::now(),
        last_log: Instant::now(),
    };
    loop {
        let workers = match weak.upgrade() {
            Some(dev) if !dev.stopping() => {
                *lock(&dev.cursor) = 0;
                lock(&dev.ctl).retry = false;
                match spawn_workers(&weak, dev.opts.workers.max(1)) {
                    Ok(w) => w,
                    Err(e) => {
                        dev.fail(format!("Failed to start copier workers: {e}"));
                        return;
                    }
                }
            }
            _ => return,
        };
        while !workers.iter().all(|h| h.is_finished()) {
            let Some(dev) = weak.upgrade() else { break };
            dev.tick(&mut ticker);
            dev.wait_ctl(dev.tick_interval());
        }
        for h in workers {
            let _ = h.join();
        }
        let Some(dev) = weak.upgrade() else { return };
        if dev.stopping() {
            return;
        }
        dev.tick(&mut ticker);
        match dev.after_pass() {
            AfterPass::Again => {}
            AfterPass::Done => return,
            AfterPass::WaitRetry => {
                drop(dev);
                // Holds the device only while polling, so dropping it ends us.
                loop {
                    let Some(dev) = weak.upgrade() else { return };
                    match dev.poll_retry(&mut ticker) {
                        Some(AfterPass::Done) => return,
                        Some(_) => break,
                        None => dev.wait_ctl(Duration::from_millis(500)),
                    }
                }
            }
        }
    }
}

fn spawn_workers(weak: &Weak<MigratingDevice>, n: usize) -> io::Result<Vec<JoinHandle<()>>> {
    (0..n)
        .map(|i| {
            let weak = weak.clone();
            std::thread::Builder::new()
                .name(format!("copier-{i}"))
                .spawn(move || worker(weak))
        })
        .collect()
}

/// Marks a worker idle when dropped (see [`MigratingDevice::runnable`]).
struct Busy<'a>(&'a MigratingDevice);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.copier_busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn worker(weak: Weak<MigratingDevice>) {
    loop {
        let Some(dev) = weak.upgrade() else { return };
        match dev.runnable() {
            Next::Exit => return,
            Next::Wait => continue,
            Next::Run => {}
        }
        // runnable() counted this worker busy; it is idle again when this
        // turn ends, however it ends.
        let _busy = Busy(&dev);
        dev.yield_to_guest();
        let Some(l) = dev.layers() else { return };
        let Some(c) = dev.next_chunk(&l) else { return };
        dev.copy_in_background(&l, c);
    }
}

impl MigratingDevice {
    fn stopping(&self) -> bool {
        lock(&self.ctl).stop
    }

    fn tick_interval(&self) -> Duration {
        (self.opts.checkpoint_interval / 2)
            .clamp(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// Waits for a control change or `timeout`.
    fn wait_ctl(&self, timeout: Duration) {
        let ctl = lock(&self.ctl);
        if ctl.stop {
            return;
        }
        let _ = self
            .ctl_changed
            .wait_timeout(ctl, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Marks the migration failed for good (until a restart).
    fn fail(&self, reason: String) {
        tracing::error!(%reason, "migration failed");
        self.update_ctl(|c| {
            c.phase = Phase::Failed(reason);
            c.stop = true;
        });
    }

    fn runnable(&self) -> Next {
        let ctl = lock(&self.ctl);
        if ctl.stop || ctl.phase != Phase::Migrating {
            return Next::Exit;
        }
        if !ctl.paused {
            // Counted under the control lock: once a pause has been seen
            // with no worker busy, no copy can start until a resume.
            self.copier_busy.fetch_add(1, Ordering::SeqCst);
            return Next::Run;
        }
        // Wait a while, then let the worker drop its reference.
        let _ = self
            .ctl_changed
            .wait_timeout(ctl, Duration::from_millis(200))
            .unwrap_or_else(|e| e.into_inner());
        self.paused_turns.fetch_add(1, Ordering::SeqCst);
        Next::Wait
    }

    /// Backs off while the guest is doing I/O, up to `max_yield`.
    fn yield_to_guest(&self) {
        let start = Instant::now();
        while self.guest_busy() && start.elapsed() < self.opts.max_yield && !self.stopping() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next chunk of this pass that is neither migrated nor failed.
    fn next_chunk(&self, l: &Layers) -> Option<u64> {
        let mut cursor = lock(&self.cursor);
        let failed = lock(&self.failed);
        loop {
            let c = l.migrated.next_clear(*cursor, self.chunks)?;
            *cursor = c + 1;
            if !failed.contains_key(&c) {
                return Some(c);
            }
        }
    }

    fn mark_failed(&self, c: u64, e: &dyn std::fmt::Display) {
        tracing::error!(
            chunk = c,
            offset = self.chunk_start(c),
            error = %e,
            "chunk could not be read; marked failed, the copier goes on"
        );
        lock(&self.failed).insert(c, e.to_string());
    }

    /// Copies chunk `c` for the copier: paced, retried while the target
    /// refuses writes, marked failed if it cannot be read.
    fn copy_in_background(&self, l: &Layers, c: u64) {
        let start = self.chunk_start(c);
        let len = self.chunk_len(c) as u64;
        // Zero chunks the overlay does not touch cost no store or target I/O.
        if !self.costs_nothing(l, c) {
            self.limiter.acquire(len, || self.stopping());
            if lock(&self.ctl).paused {
                // Paused while waiting: left for the next pass.
                return;
            }
        }
        // The served snapshot's error once it failed and a repair source
        // is set: from then on the chunk comes from the repair source.
        let mut repairing: Option<io::Error> = None;
        let prefetched = if l.overlay.any_present(start, len) {
            None
        } else {
            match l.snapshot.chunk(c, true) {
                Ok(chunk) => Some(chunk),
                Err(e) if self.repair.get().is_some() => {
                    repairing = Some(e);
                    None
                }
                Err(e) => return self.mark_failed(c, &e),
            }
        };
        let mut backoff = Duration::from_millis(10);
        loop {
            let result = match &repairing {
                None => self.copy_chunk(l, c, prefetched.clone()),
                Some(_) => self.repair_chunk(l, c),
            };
            match result {
                Ok(Copied::Now(data)) => {
                    if data.is_some() {
                        self.copier_copied.fetch_add(len, Ordering::Relaxed);
                    }
                    self.clear_target_error();
                    if let Some(primary) = &repairing {
                        self.note_repaired(c, primary);
                    }
                    return;
                }
                Ok(Copied::Already) => return,
                Err(CopyError::Read(e)) => match &repairing {
                    None if self.repair.get().is_some() => repairing = Some(e),
                    None => return self.mark_failed(c, &e),
                    Some(primary) => {
                        return self.mark_failed(c, &format!("{primary}; {e}"));
                    }
                },
                Err(CopyError::Write(e)) => {
                    self.note_target_error(c, &e);
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        let ctl = lock(&self.ctl);
                        if ctl.stop || ctl.paused {
                            // Left for the next pass.
                            return;
                        }
                        drop(ctl);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Periodic work of the coordinator: rate sample, checkpoint, log.
    fn tick(&self, t: &mut Ticker) {
        let Some(l) = self.layers() else { return };
        let now = Instant::now();
        lock(&self.window).sample(now, self.copier_copied.load(Ordering::Relaxed));
        let pending = self.since_checkpoint.load(Ordering::Relaxed);
        let due = pending >= self.opts.checkpoint_bytes
            || (pending > 0
                && now.duration_since(t.last_checkpoint) >= self.opts.checkpoint_interval);
        if due {
            t.last_checkpoint = now;
            if let Err(e) = self.checkpoint(&l) {
                self.fail(format!(
                    "Checkpoint failed: {e}; restart the daemon to resume from the last checkpoint"
                ));
                return;
            }
            tracing::debug!(chunks = l.migrated.count_ones(), "checkpoint");
        }
        if now.duration_since(t.last_log) >= self.opts.log_interval {
            t.last_log = now;
            let s = self.status();
            // The daemon's progress logger reports at info level.
            tracing::debug!(
                migrated = s.bytes_migrated,
                total = s.bytes_total,
                copied = s.bytes_copied,
                to_copy = s.bytes_to_copy,
                skipped = s.bytes_skipped,
                percent = format!(
                    "{:.1}",
                    100.0 * s.bytes_copied as f64 / s.bytes_to_copy.max(1) as f64
                ),
                rate = format!("{:.0}", s.copy_rate),
                eta_seconds = s.eta_seconds.map(|e| e.round()),
                copied_on_read = s.bytes_copied_on_read,
                failed = s.chunks_failed,
                "migration progress"
            );
        }
    }

    fn after_pass(&self) -> AfterPass {
        let Some(l) = self.layers() else {
            return AfterPass::Done;
        };
        if lock(&self.ctl).phase != Phase::Migrating {
            return AfterPass::Done;
        }
        if l.migrated.all_set() {
            self.complete(&l);
            return AfterPass::Done;
        }
        let failed = lock(&self.failed).len() as u64;
        let clear = self.chunks - l.migrated.count_ones();
        if clear > failed {
            // Copies cut short (target errors, a pause): go round again.
            return AfterPass::Again;
        }
        let (first, _) = lock(&self.failed)
            .iter()
            .next()
            .map(|(c, r)| (*c, r.clone()))
            .unwrap_or_default();
        self.set_phase(Phase::Failed(format!(
            "{failed} chunks could not be read from the store (first: chunk {first} at offset {}); resume retries them, or restart with --repair-from SNAPSHOT to take them from another backup of the image",
            self.chunk_start(first)
        )));
        tracing::error!(failed, "migration stopped with unreadable chunks");
        AfterPass::WaitRetry
    }

    /// In the failed state: `Again` on a resume (retry the failed chunks),
    /// `Done` on a stop or once copy-on-read has migrated them meanwhile,
    /// `None` to keep waiting.
    fn poll_retry(&self, ticker: &mut Ticker) -> Option<AfterPass> {
        {
            let mut ctl = lock(&self.ctl);
            if ctl.stop {
                return Some(AfterPass::Done);
            }
            if ctl.retry {
                ctl.retry = false;
                ctl.phase = Phase::Migrating;
                drop(ctl);
                self.ctl_changed.notify_all();
                lock(&self.failed).clear();
                tracing::info!("retrying failed chunks");
                return Some(AfterPass::Again);
            }
        }
        self.tick(ticker);
        let l = self.layers()?;
        if l.migrated.all_set() {
            lock(&self.failed).clear();
            self.set_phase(Phase::Migrating);
            self.complete(&l);
            return Some(AfterPass::Done);
        }
        None
    }

    /// Finishes a migration whose every bit is set (see the module doc).
    fn complete(&self, l: &Arc<Layers>) {
        if let Err(e) = self.checkpoint(l) {
            return self.fail(format!("Final target sync failed: {e}"));
        }
        if self.opts.verify {
            match self.verify(l) {
                Ok(()) => {}
                Err(reason) => {
                    tracing::error!(%reason, "verify failed");
                    self.set_phase(Phase::Failed(reason));
                    return;
                }
            }
        }
        let (_, target) = self.state.migration();
        if let Err(e) = self.state.set_migration(MigrationState::Complete, target) {
            return self.fail(format!("Failed to record completion: {e}"));
        }
        *self.layers.write().unwrap_or_else(|e| e.into_inner()) = None;
        crate::overlay::remove_files(&*self.state);
        self.clear_target_error();
        self.set_phase(Phase::Complete);
        tracing::info!(
            target = %self.target.path().display(),
            bytes = self.size,
            "migration complete: serving the target alone"
        );
    }

    /// Compares every chunk the guest has not written since it migrated
    /// with snapshot + overlay.
    fn verify(&self, l: &Layers) -> Result<(), String> {
        if self.guest_written_unreliable.load(Ordering::SeqCst) {
            return Err(
                "Verify impossible: guest writes to migrated chunks could not be recorded".into(),
            );
        }
        let (mut differ, mut skipped, mut first_bad) = (0u64, 0u64, None);
        let mut target_buf = Vec::new();
        for c in 0..self.chunks {
            if self.stopping() {
                return Err("Verify interrupted".into());
            }
            self.yield_to_guest();
            let start = self.chunk_start(c);
            let len = self.chunk_len(c);
            let _guard = l.locks.lock(c);
            if l.guest_written.get(c) {
                skipped += 1;
                continue;
            }
            let expected = if l.overlay.any_present(start, len as u64) {
                let mut buf = vec![0u8; len];
                l.overlay
                    .read_at(&mut buf, start)
                    .map(|()| Some(ChunkBuf::Owned(buf)))
            } else {
                l.snapshot.chunk(c, true).map(|o| o.map(ChunkBuf::Shared))
            };
            // A chunk the served snapshot cannot deliver was repaired.
            let expected = match expected {
                Err(_) if self.repair.get().is_some() => self.repaired_data(l, c),
                other => other,
            };
            target_buf.resize(len, 0);
            let same = match expected {
                Err(e) => {
                    tracing::error!(chunk = c, offset = start, error = %e, "verify cannot read the source chunk");
                    false
                }
                Ok(expected) => match self.target.read_at(&mut target_buf, start) {
                    Err(e) => {
                        tracing::error!(chunk = c, offset = start, error = %e, "verify cannot read the target");
                        false
                    }
                    Ok(()) => match expected {
                        Some(d) => d.bytes() == &target_buf[..],
                        None => super::is_zero(&target_buf),
                    },
                },
            };
            if !same {
                differ += 1;
                first_bad.get_or_insert(c);
                tracing::error!(
                    chunk = c,
                    offset = start,
                    "target differs from snapshot + overlay"
                );
            }
        }
        tracing::info!(
            chunks = self.chunks,
            differ,
            skipped_guest_written = skipped,
            "verify done"
        );
        match first_bad {
            None => Ok(()),
            Some(c) => Err(format!(
                "Verify failed: {differ} chunks differ between the target and snapshot + overlay (first: chunk {c} at offset {})",
                self.chunk_start(c)
            )),
        }
    }
}
