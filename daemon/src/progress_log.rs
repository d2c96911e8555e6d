//! Periodic progress lines in the daemon's log, for journald.
//!
//! While the copier runs, one `info!` line per interval reports the
//! percentage, bytes copied, to copy and skipped, rate and ETA; state
//! changes (paused, resumed, complete, failed) are logged once when the
//! logger sees them. The first report says whether the live journal runs
//! (`info!`) or not and why (`warn!`), and so does every later change of
//! it (a journal write that fails). The CLI's default log filter shows
//! this module's `info!` lines. The
//! logger only reads [`Control::status`], so it can never slow the
//! copier down by more than one status snapshot per interval.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use tracing::{info, warn};

use control::progress::{journal_line, progress_line, transition_line};
use control::{Control, State, Status};

/// How often the daemon logs progress unless told otherwise.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// A running progress logger; stops (and joins its thread) on drop.
pub struct ProgressLogger {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressLogger {
    /// Stops the logger and waits for its thread to exit.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        // Dropping the sender disconnects the channel and wakes the thread.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ProgressLogger {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Starts a thread that logs migration progress every `interval` while
/// the state is `migrating`, and each state change once.
///
/// Fails only if the thread cannot be spawned.
pub fn spawn_progress_logger(
    control: Arc<dyn Control>,
    interval: Duration,
) -> std::io::Result<ProgressLogger> {
    let (stop, stopped) = bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("progress-log".to_string())
        .spawn(move || {
            let mut last: Option<State> = None;
            let mut journal: Option<bool> = None;
            loop {
                let status = control.status();
                if journal != Some(status.journal_active) {
                    log_journal(&status);
                    journal = Some(status.journal_active);
                }
                if let Some(line) = transition_line(last, &status) {
                    if status.state == State::Failed {
                        warn!(state = "failed", "{line}");
                    } else {
                        info!(state = status.state.name(), "{line}");
                    }
                }
                if status.state == State::Migrating {
                    log_progress(&status);
                }
                last = Some(status.state);
                match stopped.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        })?;
    Ok(ProgressLogger {
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn log_journal(status: &Status) {
    // A complete migration needs no journal: that is news, not a warning.
    if status.journal_active || status.state == State::Complete {
        info!(
            journal_active = status.journal_active,
            "{}",
            journal_line(status)
        );
    } else {
        warn!(
            journal_active = false,
            reason = status.journal_inactive_reason.as_deref().unwrap_or(""),
            "{}",
            journal_line(status)
        );
    }
}

fn log_progress(status: &Status) {
    info!(
        percent = format_args!("{:.1}", status.progress() * 100.0),
        bytes_migrated = status.bytes_migrated,
        bytes_total = status.bytes_total,
        bytes_to_copy = status.bytes_to_copy,
        bytes_copied = status.bytes_copied,
        bytes_skipped = status.bytes_skipped,
        copy_rate = status.copy_rate.round() as u64,
        eta_seconds = status.eta_seconds.map(|s| s.round() as u64),
        "{}",
        progress_line(status)
    );
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    fn status(state: State, migrated: u64) -> Status {
        Status {
            state,
            bytes_total: 4 << 30,
            bytes_migrated: migrated,
            ..Status::default()
        }
    }

    /// Counts status calls so the test sees the logger polling.
    struct Counting {
        calls: AtomicU64,
        state: Mutex<State>,
    }

    impl Control for Counting {
        fn status(&self) -> Status {
            self.calls.fetch_add(1, Ordering::SeqCst);
            status(*self.state.lock().unwrap(), 1 << 30)
        }
        fn pause(&self) -> Result<(), String> {
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            Ok(())
        }
        fn set_rate(&self, _: u64) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn logger_polls_every_interval_and_stops_promptly() {
        let control = Arc::new(Counting {
            calls: AtomicU64::new(0),
            state: Mutex::new(State::Migrating),
        });
        let logger = spawn_progress_logger(control.clone(), Duration::from_millis(20)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.calls.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "logger did not poll");
            std::thread::sleep(Duration::from_millis(5));
        }
        *control.state.lock().unwrap() = State::Complete;
        let start = Instant::now();
        logger.stop();
        let after_stop = control.calls.load(Ordering::SeqCst);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            start.elapsed()
        );
        // stop() joined the thread: nothing can poll any more.
        assert_eq!(
            control.calls.load(Ordering::SeqCst),
            after_stop,
            "logger still running"
        );

        // A long interval must not delay stop: drop wakes the thread.
        let logger = spawn_progress_logger(control.clone(), Duration::from_secs(3600)).unwrap();
        let start = Instant::now();
        drop(logger);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
