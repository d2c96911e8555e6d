//! Periodic progress lines in the daemon's log, for journald.
//!
//! While the copier runs, one `info!` line per interval reports the
//! percentage, bytes copied, to copy and skipped, rate and ETA; state
//! changes (paused, resumed, complete, failed) are logged once when the
//! logger sees them. The first report says whether the live journal runs
//! (`info!`) or not and why (`warn!`), and so does every later change of
//! it (a journal write that fails). With continuous protection, each
//! change of its state (`starting`, `ok`, `behind`, `failed`) is logged
//! once with the RPO (`warn!` for `behind` and `failed`), and the RPO joins
//! every progress line while migrating. The CLI's default log filter shows
//! this module's `info!` lines. The
//! logger only reads [`Control::status`], so it can never slow the
//! copier down by more than one status snapshot per interval.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use tracing::{info, warn};

use control::progress::{journal_line, progress_line, protection_line, transition_line};
use control::{Control, ProtectionState, State, Status};

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
            let mut reporter = Reporter::default();
            loop {
                let status = control.status();
                for entry in reporter.report(&status) {
                    entry.log(&status);
                }
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

/// What the logger has seen, so each change is logged once.
#[derive(Default)]
struct Reporter {
    state: Option<State>,
    journal_active: Option<bool>,
    protection: Option<ProtectionState>,
}

/// One log entry due for a status.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// Whether the journal runs (first report, then each change); `warn`
    /// when it is off while writes could still be lost.
    Journal { warn: bool, line: String },
    /// A state change; `warn` when the migration failed.
    Transition { warn: bool, line: String },
    /// The periodic progress line (while migrating).
    Progress,
    /// A change of the protection state; `warn` when behind or failed.
    Protection { warn: bool, line: String },
}

impl Reporter {
    /// The entries `status` calls for, in order.
    fn report(&mut self, status: &Status) -> Vec<Entry> {
        let mut entries = Vec::new();
        if self.journal_active != Some(status.journal_active) {
            // A complete migration needs no journal: news, not a warning.
            let warn = !status.journal_active && status.state != State::Complete;
            entries.push(Entry::Journal {
                warn,
                line: journal_line(status),
            });
            self.journal_active = Some(status.journal_active);
        }
        if let Some(line) = transition_line(self.state, status) {
            entries.push(Entry::Transition {
                warn: status.state == State::Failed,
                line,
            });
        }
        if let Some(p) = &status.protection {
            if self.protection != Some(p.state) {
                entries.push(Entry::Protection {
                    warn: matches!(p.state, ProtectionState::Behind | ProtectionState::Failed),
                    line: protection_line(status).unwrap_or_default(),
                });
                self.protection = Some(p.state);
            }
        }
        if status.state == State::Migrating {
            entries.push(Entry::Progress);
        }
        self.state = Some(status.state);
        entries
    }
}

impl Entry {
    fn log(&self, status: &Status) {
        match self {
            Entry::Journal { warn: true, line } => warn!(
                journal_active = false,
                reason = status.journal_inactive_reason.as_deref().unwrap_or(""),
                "{line}"
            ),
            Entry::Journal { warn: false, line } => {
                info!(journal_active = status.journal_active, "{line}")
            }
            Entry::Transition { warn: true, line } => warn!(state = "failed", "{line}"),
            Entry::Transition { warn: false, line } => {
                info!(state = status.state.name(), "{line}")
            }
            Entry::Progress => log_progress(status),
            Entry::Protection { warn: true, line } => warn!("{line}"),
            Entry::Protection { warn: false, line } => info!("{line}"),
        }
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
        rpo_seconds = status.protection.as_ref().and_then(|p| p.rpo_seconds),
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

    #[test]
    fn protection_changes_are_reported_once_each() {
        let mut reporter = Reporter::default();
        let mut s = Status {
            journal_active: true,
            protection: Some(control::Protection {
                name: "vm".into(),
                interval_seconds: 5.0,
                ..Default::default()
            }),
            ..status(State::Serving, 0)
        };
        reporter.report(&s);
        let p = s.protection.as_mut().unwrap();
        p.state = ProtectionState::Ok;
        p.rpo_seconds = Some(2.0);
        let ok = reporter.report(&s);
        assert!(
            matches!(&ok[..], [Entry::Protection { warn: false, line }] if line.starts_with("protection ok: RPO 2s")),
            "{ok:?}"
        );
        assert!(reporter.report(&s).is_empty());
        let p = s.protection.as_mut().unwrap();
        p.state = ProtectionState::Failed;
        p.reason = Some("store full".into());
        let failed = reporter.report(&s);
        assert!(
            matches!(&failed[..], [Entry::Protection { warn: true, line }] if line.ends_with(": store full")),
            "{failed:?}"
        );
    }

    #[test]
    fn journal_and_state_changes_are_reported_once_each() {
        let mut reporter = Reporter::default();
        let kinds = |entries: Vec<Entry>| -> Vec<String> {
            entries
                .into_iter()
                .map(|e| match e {
                    Entry::Journal { warn, line } => format!("journal warn={warn}: {line}"),
                    Entry::Transition { warn, line } => format!("state warn={warn}: {line}"),
                    Entry::Progress => "progress".to_string(),
                    Entry::Protection { warn, line } => format!("protection warn={warn}: {line}"),
                })
                .collect()
        };
        let mut s = Status {
            journal_active: true,
            ..status(State::Migrating, 1 << 30)
        };
        let first = kinds(reporter.report(&s));
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first[0].starts_with("journal warn=false: live journal active"));
        assert_eq!(first[1], "progress");
        assert_eq!(kinds(reporter.report(&s)), ["progress"]);
        // A journal write fails: one warning with the reason.
        s.journal_active = false;
        s.journal_inactive_reason = Some("overlay bitmap: a write failed: EIO".into());
        let broken = kinds(reporter.report(&s));
        assert!(
            broken[0].starts_with(
                "journal warn=true: live journal inactive (overlay bitmap: a write failed: EIO)"
            ),
            "{broken:?}"
        );
        assert_eq!(kinds(reporter.report(&s)), ["progress"]);
        // Completion: the state change, and the journal stops at info.
        let done = Status {
            state: State::Complete,
            journal_active: false,
            journal_inactive_reason: Some("not needed".into()),
            ..s.clone()
        };
        s.journal_active = true;
        reporter.report(&s);
        let end = kinds(reporter.report(&done));
        assert_eq!(
            end,
            [
                "journal warn=false: live journal stopped (not needed)",
                "state warn=false: migration complete: 4.0 GiB on the target"
            ]
        );
        assert!(reporter.report(&done).is_empty());
    }
}
