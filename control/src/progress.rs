//! One-line progress and state-change texts, shared by the daemon's log
//! (`daemon::progress_log`) and `recovery-cli status`.

use super::human::{format_bytes, format_duration, format_rate, percent};
use crate::status::{State, Status};

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
}
