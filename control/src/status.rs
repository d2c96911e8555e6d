//! The daemon's status report and run-time controls.
//!
//! [`Status`] is the contract between the daemon and its monitors: the
//! control socket serves it as JSON, `recovery-cli status --json` prints
//! it unchanged, and `/metrics` renders it as Prometheus text. Fields are
//! only ever added, never renamed.

use serde::{Deserialize, Serialize};

use crate::latency::GuestLatency;

/// Where the daemon is in its life.
///
/// ```text
/// serving ──(--target)──> migrating <──> paused
///                             │
///                             ├──> complete   (all I/O passes to the target)
///                             └──> failed     (reason in `Status::error`)
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Serving from the store and overlay; no migration target.
    #[default]
    Serving,
    /// The copier is moving chunks to the target.
    Migrating,
    /// The copier is paused by the operator.
    Paused,
    /// Every chunk is on the target; I/O passes straight to it.
    Complete,
    /// The migration stopped on an error it cannot get past.
    Failed,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 5] = [
        State::Serving,
        State::Migrating,
        State::Paused,
        State::Complete,
        State::Failed,
    ];

    /// The state's name, as it appears in JSON, metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            State::Serving => "serving",
            State::Migrating => "migrating",
            State::Paused => "paused",
            State::Complete => "complete",
            State::Failed => "failed",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A point-in-time report of everything an operator watches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// Why the state is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub snapshot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,

    pub bytes_total: u64,
    /// Bytes of the image on the target: `bytes_copied + bytes_skipped`
    /// (for a migration that completed before this process started, the
    /// image size while both of those are 0).
    pub bytes_migrated: u64,
    pub bytes_copied_on_read: u64,
    /// Bytes of data the migration has to move, done or not: chunks that
    /// hold data in the snapshot or in the guest's writes. Zero chunks cost
    /// no copy and are not counted. Grows when the guest writes data into
    /// a zero chunk not migrated yet, shrinks when it zeroes one. Progress
    /// and the ETA are weighed by these bytes.
    #[serde(default)]
    pub bytes_to_copy: u64,
    /// Bytes of data written to the target (by the copier and by
    /// copy-on-read; chunks migrated by an earlier run of the daemon are
    /// counted by what they hold).
    #[serde(default)]
    pub bytes_copied: u64,
    /// Bytes migrated without a copy: zero chunks, which a target known to
    /// be zero already holds (or which are zeroed without writing data).
    #[serde(default)]
    pub bytes_skipped: u64,
    pub chunks_total: u64,
    pub chunks_migrated: u64,
    /// Chunks the copier could not read (corrupt or missing in the store).
    pub chunks_failed: u64,
    /// Chunks migrated from the `--repair-from` snapshot because the served
    /// snapshot's copy could not be read (since this process started).
    #[serde(default)]
    pub chunks_repaired: u64,
    /// Rate at which the background copier writes data to the target over
    /// a recent window, in bytes per second: copied bytes only (never
    /// skipped zero chunks, never copy-on-read, which the guest's reads
    /// cause and `bytes_copied_on_read` counts), and never above
    /// `rate_limit` when one is set.
    pub copy_rate: f64,
    /// The configured rate limit in bytes per second; 0 means unlimited.
    pub rate_limit: u64,
    /// Seconds until every byte of `bytes_to_copy` is on the target, at
    /// the current rate; 0 once complete and when serving without a
    /// target (there is nothing to copy); absent while unknown (no rate
    /// measured yet, or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,

    pub guest_read_ops: u64,
    pub guest_read_bytes: u64,
    pub guest_write_ops: u64,
    pub guest_write_bytes: u64,
    pub guest_flush_ops: u64,
    /// Guest requests that completed with an I/O error status.
    pub guest_io_errors: u64,
    /// The time guest requests spent in the daemon's block layers, by
    /// type (histograms and quantiles; the virtqueue's own queueing is
    /// not in it). Absent from daemons that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_latency: Option<GuestLatency>,
    /// Chunk fetches from the store that failed (corrupt, missing or
    /// unreadable chunk), by the guest's reads and the copier alike.
    #[serde(default)]
    pub chunk_read_errors: u64,

    /// Bytes of guest writes that landed in the overlay, because their
    /// chunk was not on the target yet, since this process started.
    /// Without a target every guest write goes there.
    #[serde(default)]
    pub overlay_write_bytes: u64,
    /// Bytes of guest data held in the overlay.
    pub overlay_bytes: u64,
    /// Chunk cache hits / (hits + misses), 0.0 before the first lookup.
    pub cache_hit_rate: f64,
    pub uptime_seconds: f64,

    /// Whether the live journal runs, so acknowledged writes not yet
    /// flushed survive a restart of the daemon (see `block::bitmap`).
    #[serde(default)]
    pub journal_active: bool,
    /// Why the journal does not run (`journal_active` false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_inactive_reason: Option<String>,

    /// Continuous protection (`--protect`, `serve`); absent when the
    /// daemon does not protect the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<Protection>,

    /// `instant-boot --plan`: the service whose group point is served;
    /// absent for a daemon of one disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `instant-boot --plan`: one report per disk, in boot order. The
    /// fields above are then the service's totals (sums of bytes, chunks,
    /// rates and guest counters; the worst state; `snapshot` is the group
    /// point), so a client of one disk reads the whole service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskStatus>,

    /// The remote (S3) store the chunks come from; absent for a local
    /// store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_store: Option<RemoteStore>,
}

/// How the requests to a remote store went (since the daemon started).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteStore {
    /// `s3://bucket/prefix`.
    pub location: String,
    /// The retry time (`--store-retry-time`): a store read fails, and the
    /// guest gets an I/O error, after retrying this long.
    pub retry_time_seconds: f64,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Requests that failed (5xx, throttling, timeouts, connection errors).
    pub request_errors: u64,
    /// Requests sent again after a failure.
    pub retries: u64,
    /// Operations that failed for good (the retry time used up, or an
    /// error no retry helps).
    pub failed_operations: u64,
    /// The last request error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the last request error happened (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_unix: Option<f64>,
    /// Bytes held by the on-disk chunk cache (`--disk-cache-size`).
    #[serde(default)]
    pub disk_cache_bytes: u64,
    /// Bound of the on-disk chunk cache; 0 when there is none.
    #[serde(default)]
    pub disk_cache_capacity: u64,
    /// Chunk reads served from the on-disk cache.
    #[serde(default)]
    pub disk_cache_hits: u64,
    /// Chunk reads the on-disk cache did not have.
    #[serde(default)]
    pub disk_cache_misses: u64,
}

/// One disk of a service (`Status::disks`): its name and its own report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// `<vm>-<drive>`, as in the socket's name.
    pub disk: String,
    /// The disk's report, its fields inline.
    #[serde(flatten)]
    pub status: Status,
}

/// How protection is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectionState {
    /// No point written (or found covering the disk) yet.
    #[default]
    Starting,
    /// The newest point is at most twice the interval old.
    Ok,
    /// The newest point is older than twice the interval.
    Behind,
    /// The last point failed (reason in [`Protection::reason`]); the
    /// guest keeps running and the next interval tries again.
    Failed,
}

impl ProtectionState {
    /// Every state.
    pub const ALL: [ProtectionState; 4] = [
        ProtectionState::Starting,
        ProtectionState::Ok,
        ProtectionState::Behind,
        ProtectionState::Failed,
    ];

    /// The state's name, as in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ProtectionState::Starting => "starting",
            ProtectionState::Ok => "ok",
            ProtectionState::Behind => "behind",
            ProtectionState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A protection point in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRef {
    /// The snapshot id.
    pub id: String,
    /// `NAME@ID`.
    pub snapshot: String,
    /// The instant the point holds the disk at (RFC 3339, µs).
    pub instant: String,
}

/// Continuous protection: points written into the store every interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Protection {
    pub state: ProtectionState,
    /// Why the state is `failed` (or `behind`, when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The image name points are written under.
    pub name: String,
    pub interval_seconds: f64,
    /// The newest complete point.
    pub last_point: Option<PointRef>,
    /// Age of the newest instant whose disk state is in the store (the
    /// last point, or a later instant at which nothing had changed since
    /// it); null before the first.
    pub rpo_seconds: Option<f64>,
    /// Points written since this process started.
    pub points_written: u64,
    /// Bytes points read from the disk (since this process started).
    pub point_bytes_read: u64,
    /// Bytes points added to the store (since this process started).
    pub point_bytes_new: u64,
    /// Bytes of chunks changed since the newest complete point.
    pub pending_bytes: u64,
}

impl Status {
    /// Migration progress in `0.0..=1.0`, weighed by the bytes that have
    /// to move: `bytes_copied / bytes_to_copy`. 1.0 once complete. Without
    /// bytes to copy (an image of zeroes, or a daemon too old to report
    /// them), the share of the image migrated.
    pub fn progress(&self) -> f64 {
        if self.state == State::Complete {
            return 1.0;
        }
        let (done, total) = if self.bytes_to_copy > 0 {
            (self.bytes_copied, self.bytes_to_copy)
        } else {
            (self.bytes_migrated, self.bytes_total)
        };
        if total == 0 {
            return 1.0;
        }
        done.min(total) as f64 / total as f64
    }
}

/// Commands an operator sends to a running daemon.
pub trait Control: Send + Sync {
    /// A fresh status report.
    fn status(&self) -> Status;
    /// Stops the copier after its in-flight chunks; guest I/O continues.
    fn pause(&self) -> Result<(), String>;
    /// Restarts a paused copier.
    fn resume(&self) -> Result<(), String>;
    /// Sets the copy rate limit in bytes per second; 0 means unlimited.
    fn set_rate(&self, bytes_per_second: u64) -> Result<(), String>;
    /// Takes a protection point now, waiting at most `timeout` for its
    /// cut (`point` request); refused without protection.
    fn point(&self, timeout: std::time::Duration) -> Result<crate::PointTaken, String> {
        let _ = timeout;
        Err(NO_PROTECTION.to_string())
    }
    /// Waits at most `timeout` for the point of `cut` to be complete in
    /// the store (`point-wait` request).
    fn point_wait(
        &self,
        cut: u64,
        timeout: std::time::Duration,
    ) -> Result<crate::PointTaken, String> {
        let _ = (cut, timeout);
        Err(NO_PROTECTION.to_string())
    }
}

/// The refusal of `point` by a daemon without protection.
pub const NO_PROTECTION: &str =
    "this daemon does not protect its disk: start it with --protect (instant-boot) or serve --protect-every";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_report_reads_as_a_single_disk_report_and_round_trips() {
        let service = Status {
            state: State::Migrating,
            snapshot: "portal@20261206T120000.000000Z".into(),
            bytes_total: 2 << 20,
            service: Some("portal".into()),
            disks: vec![DiskStatus {
                disk: "db-disk0".into(),
                status: Status {
                    state: State::Complete,
                    bytes_total: 1 << 20,
                    target: Some("/dev/vg/db".into()),
                    ..Status::default()
                },
            }],
            ..Status::default()
        };
        let json = serde_json::to_value(&service).unwrap();
        // A disk's fields are inline, next to its name.
        assert_eq!(json["disks"][0]["disk"], "db-disk0");
        assert_eq!(json["disks"][0]["state"], "complete");
        assert_eq!(json["disks"][0]["bytes_total"], 1 << 20);
        assert!(json["disks"][0].get("disks").is_none(), "{json}");
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, service);
        // A report of one disk has neither field, and an older report
        // (without them) still parses.
        let one = serde_json::to_value(Status::default()).unwrap();
        assert!(one.get("disks").is_none() && one.get("service").is_none());
        let old: Status = serde_json::from_value(one).unwrap();
        assert!(old.disks.is_empty() && old.service.is_none());
    }
}
