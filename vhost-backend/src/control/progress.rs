//! Periodic progress lines in the daemon's log, for journald.
//!
//! While the copier runs, one `info!` line per interval reports the
//! percentage, bytes, rate and ETA; state changes (paused, resumed,
//! complete, failed) are logged once when the logger sees them. The
//! logger only reads [`Control::status`], so it can never slow the
//! copier down by more than one status snapshot per interval.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use tracing::{info, warn};

use super::human::{format_bytes, format_duration, format_rate, percent};
use crate::status::{Control, State, Status};

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
            loop {
                let status = control.status();
                if let Some(line) = transition_line(last, &status) {
                    if status.state == State::Failed {
                        warn!(state = "failed", "{line}");
                    } else {
                        info!(state = state_name(status.state), "{line}");
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

fn log_progress(status: &Status) {
    info!(
        percent = format_args!("{:.1}", percent(status.bytes_migrated, status.bytes_total)),
        bytes_migrated = status.bytes_migrated,
        bytes_total = status.bytes_total,
        copy_rate = status.copy_rate.round() as u64,
        eta_seconds = status.eta_seconds.map(|s| s.round() as u64),
        "{}",
        progress_line(status)
    );
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Serving => "serving",
        State::Migrating => "migrating",
        State::Paused => "paused",
        State::Complete => "complete",
        State::Failed => "failed",
    }
}

/// `"migration 25.0% (1.0 GiB of 4.0 GiB) at 80.0 MiB/s, ETA 38s"`.
pub fn progress_line(status: &Status) -> String {
    let eta = match status.eta_seconds {
        Some(eta) => format_duration(eta),
        None => "unknown".to_string(),
    };
    let mut line = format!(
        "migration {:.1}% ({} of {}) at {}, ETA {}",
        percent(status.bytes_migrated, status.bytes_total),
        format_bytes(status.bytes_migrated),
        format_bytes(status.bytes_total),
        format_rate(status.copy_rate),
        eta,
    );
    if status.rate_limit > 0 {
        line.push_str(&format!(
            " (limit {})",
            format_rate(status.rate_limit as f64)
        ));
    }
    if status.chunks_failed > 0 {
        line.push_str(&format!(", {} chunks failed", status.chunks_failed));
    }
    line
}

/// A line for a state change worth a log entry, or `None`. The first
/// report logs only states other than `serving` and `migrating` (those
/// are announced by the daemon itself at start-up).
pub fn transition_line(previous: Option<State>, status: &Status) -> Option<String> {
    if previous == Some(status.state) {
        return None;
    }
    let migrated = format_bytes(status.bytes_migrated);
    let total = format_bytes(status.bytes_total);
    match (previous, status.state) {
        (_, State::Paused) => Some(format!("migration paused at {migrated} of {total}")),
        (Some(State::Paused), State::Migrating) => {
            Some(format!("migration resumed at {migrated} of {total}"))
        }
        (_, State::Complete) => Some(format!("migration complete: {total} on the target")),
        (_, State::Failed) => Some(format!(
            "migration failed at {migrated} of {total}: {}",
            status.error.as_deref().unwrap_or("unknown error")
        )),
        (Some(_), State::Migrating) => Some(format!("migration started at {migrated} of {total}")),
        (Some(_), State::Serving) => Some("serving without a migration target".to_string()),
        (None, State::Migrating | State::Serving) => None,
    }
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
            error: None,
            snapshot: "s".into(),
            target: Some("/t".into()),
            bytes_total: 4 << 30,
            bytes_migrated: migrated,
            bytes_copied_on_read: 0,
            chunks_total: 1024,
            chunks_migrated: migrated >> 22,
            chunks_failed: 0,
            copy_rate: 80.0 * 1024.0 * 1024.0,
            rate_limit: 0,
            eta_seconds: Some(38.4),
            guest_read_ops: 0,
            guest_read_bytes: 0,
            guest_write_ops: 0,
            guest_write_bytes: 0,
            guest_flush_ops: 0,
            guest_io_errors: 0,
            chunk_read_errors: 0,
            chunks_repaired: 0,
            overlay_bytes: 0,
            cache_hit_rate: 0.0,
            uptime_seconds: 1.0,
        }
    }

    #[test]
    fn progress_line_reads_well() {
        let s = status(State::Migrating, 1 << 30);
        assert_eq!(
            progress_line(&s),
            "migration 25.0% (1.0 GiB of 4.0 GiB) at 80.0 MiB/s, ETA 38s"
        );
        let s = Status {
            eta_seconds: None,
            rate_limit: 50 << 20,
            chunks_failed: 2,
            ..s
        };
        assert_eq!(
            progress_line(&s),
            "migration 25.0% (1.0 GiB of 4.0 GiB) at 80.0 MiB/s, ETA unknown (limit 50.0 MiB/s), 2 chunks failed"
        );
    }

    #[test]
    fn transitions_are_logged_once() {
        let migrating = status(State::Migrating, 0);
        assert_eq!(transition_line(None, &migrating), None);
        assert_eq!(transition_line(Some(State::Migrating), &migrating), None);
        let paused = status(State::Paused, 1 << 30);
        assert_eq!(
            transition_line(Some(State::Migrating), &paused).as_deref(),
            Some("migration paused at 1.0 GiB of 4.0 GiB")
        );
        assert!(transition_line(Some(State::Paused), &migrating)
            .unwrap()
            .contains("resumed"));
        let failed = Status {
            error: Some("target: EIO".into()),
            ..status(State::Failed, 0)
        };
        assert!(transition_line(Some(State::Migrating), &failed)
            .unwrap()
            .ends_with(": target: EIO"));
        assert!(transition_line(None, &status(State::Complete, 4 << 30))
            .unwrap()
            .contains("complete"));
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
        std::thread::sleep(Duration::from_millis(60));
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
