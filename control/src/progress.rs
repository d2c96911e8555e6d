//! One-line progress and state-change texts, shared by the daemon's log
//! (`daemon::progress_log`) and `recovery-cli status`.

use super::human::{format_bytes, format_duration, format_rate};
use crate::status::{State, Status};

/// What has been done of what: `"1.0 GiB of 4.0 GiB copied, 12.0 GiB of
/// zeroes skipped"`, weighed like [`Status::progress`] (a daemon that
/// does not report bytes to copy: `"1.0 GiB of 4.0 GiB"` migrated).
pub fn amounts(status: &Status) -> String {
    if status.bytes_to_copy == 0 {
        return format!(
            "{} of {}",
            format_bytes(status.bytes_migrated),
            format_bytes(status.bytes_total)
        );
    }
    let mut text = format!(
        "{} of {} copied",
        format_bytes(status.bytes_copied.min(status.bytes_to_copy)),
        format_bytes(status.bytes_to_copy)
    );
    if status.bytes_skipped > 0 {
        text.push_str(&format!(
            ", {} of zeroes skipped",
            format_bytes(status.bytes_skipped)
        ));
    }
    text
}

/// `"migration 25.0% (1.0 GiB of 4.0 GiB copied, 8.0 GiB of zeroes
/// skipped) at 80.0 MiB/s, ETA 38s"`.
pub fn progress_line(status: &Status) -> String {
    let eta = match status.eta_seconds {
        Some(eta) => format_duration(eta),
        None => "unknown".to_string(),
    };
    let mut line = format!(
        "migration {:.1}% ({}) at {}",
        status.progress() * 100.0,
        amounts(status),
        format_rate(status.copy_rate),
    );
    if status.rate_limit > 0 {
        line.push_str(&format!(
            " (limit {})",
            format_rate(status.rate_limit as f64)
        ));
    }
    line.push_str(&format!(", ETA {eta}"));
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
    let done = amounts(status);
    match (previous, status.state) {
        (_, State::Paused) => Some(format!("migration paused at {done}")),
        (Some(State::Paused), State::Migrating) => Some(format!("migration resumed at {done}")),
        (_, State::Complete) => Some(format!(
            "migration complete: {} on the target",
            format_bytes(status.bytes_total)
        )),
        (_, State::Failed) => Some(format!(
            "migration failed at {done}: {}",
            status.error.as_deref().unwrap_or("unknown error")
        )),
        (Some(_), State::Migrating) => Some(format!("migration started at {done}")),
        (Some(_), State::Serving) => Some("serving without a migration target".to_string()),
        (None, State::Migrating | State::Serving) => None,
    }
}

/// A line saying whether the live journal runs, and if not, why.
pub fn journal_line(status: &Status) -> String {
    let reason = status
        .journal_inactive_reason
        .as_deref()
        .unwrap_or("no reason given");
    if status.journal_active {
        "live journal active: acknowledged writes survive a restart of the daemon".to_string()
    } else if status.state == State::Complete {
        format!("live journal stopped ({reason})")
    } else {
        format!(
            "live journal inactive ({reason}): acknowledged writes not yet flushed would not survive a restart of the daemon"
        )
    }
}

/// `"protection ok: RPO 3s (every 5s), last point vm@ID, 7 points, 1.0
/// MiB pending"`, or `None` when the daemon does not protect the disk.
pub fn protection_line(status: &Status) -> Option<String> {
    let p = status.protection.as_ref()?;
    let rpo = p.rpo_seconds.map_or("-".to_string(), format_duration);
    let mut line = format!(
        "protection {}: RPO {rpo} (every {})",
        p.state,
        format_duration(p.interval_seconds)
    );
    match &p.last_point {
        Some(last) => line.push_str(&format!(", last point {}", last.snapshot)),
        None => line.push_str(", no point yet"),
    }
    line.push_str(&format!(
        ", {} points, {} pending",
        p.points_written,
        format_bytes(p.pending_bytes)
    ));
    if let Some(reason) = &p.reason {
        line.push_str(&format!(": {reason}"));
    }
    Some(line)
}

/// `"s3://b/p: 1200 requests, 3 errors (2 retried), 0 failed, retry time
/// 30s; disk cache 12.0 MiB of 1.0 GiB, 95.0% hits; last error 4s ago:
/// ..."`, or `None` for a local store.
pub fn remote_store_line(status: &Status, now_unix: f64) -> Option<String> {
    let r = status.remote_store.as_ref()?;
    let mut line = format!(
        "{}: {} requests, {} errors ({} retried), {} failed, retry time {}",
        r.location,
        r.requests,
        r.request_errors,
        r.retries,
        r.failed_operations,
        format_duration(r.retry_time_seconds)
    );
    if r.disk_cache_capacity > 0 {
        let looked = r.disk_cache_hits + r.disk_cache_misses;
        let hits = if looked == 0 {
            0.0
        } else {
            r.disk_cache_hits as f64 * 100.0 / looked as f64
        };
        line.push_str(&format!(
            "; disk cache {} of {}, {hits:.1}% hits",
            format_bytes(r.disk_cache_bytes),
            format_bytes(r.disk_cache_capacity)
        ));
    }
    if let Some(e) = &r.last_error {
        match r.last_error_unix {
            Some(t) => line.push_str(&format!(
                "; last error {} ago: {e}",
                format_duration((now_unix - t).max(0.0))
            )),
            None => line.push_str(&format!("; last error: {e}")),
        }
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: State, copied: u64) -> Status {
        Status {
            state,
            snapshot: "s".into(),
            target: Some("/t".into()),
            bytes_total: 16 << 30,
            bytes_to_copy: 4 << 30,
            bytes_copied: copied,
            bytes_skipped: 8 << 30,
            bytes_migrated: copied + (8 << 30),
            chunks_total: 4096,
            copy_rate: 80.0 * 1024.0 * 1024.0,
            eta_seconds: Some(38.4),
            uptime_seconds: 1.0,
            ..Status::default()
        }
    }

    #[test]
    fn progress_line_weighs_the_bytes_that_move() {
        let s = status(State::Migrating, 1 << 30);
        // 9 GiB of 16 GiB are on the target, but only a quarter of the
        // data that has to move.
        assert_eq!(
            progress_line(&s),
            "migration 25.0% (1.0 GiB of 4.0 GiB copied, 8.0 GiB of zeroes skipped) at 80.0 MiB/s, ETA 38s"
        );
        let s = Status {
            eta_seconds: None,
            rate_limit: 50 << 20,
            chunks_failed: 2,
            bytes_skipped: 0,
            ..s
        };
        assert_eq!(
            progress_line(&s),
            "migration 25.0% (1.0 GiB of 4.0 GiB copied) at 80.0 MiB/s (limit 50.0 MiB/s), ETA unknown, 2 chunks failed"
        );
        // A daemon that does not report bytes to copy: the image's share.
        let old = Status {
            bytes_to_copy: 0,
            bytes_copied: 0,
            bytes_skipped: 0,
            bytes_migrated: 4 << 30,
            ..s
        };
        assert!(
            progress_line(&old).starts_with("migration 25.0% (4.0 GiB of 16.0 GiB) at"),
            "{}",
            progress_line(&old)
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
            Some("migration paused at 1.0 GiB of 4.0 GiB copied, 8.0 GiB of zeroes skipped")
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
        assert_eq!(
            transition_line(None, &status(State::Complete, 4 << 30)).as_deref(),
            Some("migration complete: 16.0 GiB on the target")
        );
    }

    #[test]
    fn protection_line_shows_the_rpo() {
        assert_eq!(protection_line(&Status::default()), None);
        let s = Status {
            protection: Some(crate::status::Protection {
                state: crate::status::ProtectionState::Failed,
                reason: Some("store full".into()),
                name: "vm".into(),
                interval_seconds: 5.0,
                rpo_seconds: Some(12.4),
                points_written: 3,
                pending_bytes: 1 << 20,
                ..Default::default()
            }),
            ..Status::default()
        };
        assert_eq!(
            protection_line(&s).unwrap(),
            "protection failed: RPO 12s (every 5s), no point yet, 3 points, 1.0 MiB pending: store full"
        );
    }

    #[test]
    fn remote_store_line_counts_errors_and_the_cache() {
        assert_eq!(remote_store_line(&Status::default(), 0.0), None);
        let s = Status {
            remote_store: Some(crate::status::RemoteStore {
                location: "s3://b/p".into(),
                retry_time_seconds: 30.0,
                requests: 1200,
                request_errors: 3,
                retries: 2,
                failed_operations: 1,
                last_error: Some("HTTP 503".into()),
                last_error_unix: Some(96.0),
                disk_cache_bytes: 1 << 20,
                disk_cache_capacity: 1 << 30,
                disk_cache_hits: 3,
                disk_cache_misses: 1,
            }),
            ..Status::default()
        };
        assert_eq!(
            remote_store_line(&s, 100.0).unwrap(),
            "s3://b/p: 1200 requests, 3 errors (2 retried), 1 failed, retry time 30s; \
             disk cache 1.0 MiB of 1.0 GiB, 75.0% hits; last error 4s ago: HTTP 503"
        );
    }

    #[test]
    fn journal_line_says_why() {
        let active = Status {
            journal_active: true,
            ..Status::default()
        };
        assert!(journal_line(&active).starts_with("live journal active"));
        let off = Status {
            journal_inactive_reason: Some("cannot read the boot id".into()),
            ..Status::default()
        };
        assert!(journal_line(&off)
            .starts_with("live journal inactive (cannot read the boot id): acknowledged writes"));
        let complete = Status {
            state: State::Complete,
            journal_inactive_reason: Some("not needed".into()),
            ..Status::default()
        };
        assert_eq!(journal_line(&complete), "live journal stopped (not needed)");
    }
}
