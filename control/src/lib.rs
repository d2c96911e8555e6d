//! The control protocol between an instant-boot daemon and its monitors.
//!
//! # What this crate owns
//! Plain data and text, nothing of the device: the operator's status type
//! ([`Status`], [`State`]) and the [`Control`] trait a daemon implements,
//! the request and response lines of the control socket ([`Request`],
//! [`Response`], [`handle_line`]), the client ([`client`]), and the texts
//! built from a status (Prometheus in [`metrics`], progress lines in
//! [`progress`], units in [`human`]). It depends on no crate of this
//! workspace, so `recovery-cli status` links no virtio and no store. The
//! server (socket, threads) is `daemon::control_server`, and the daemon's
//! `Control` is `daemon::operator_status::DaemonStatus`.
//!
//! # Wire protocol
//! Line-delimited JSON on a unix socket (by default `control.sock` in the
//! daemon's state dir, mode 0600). One request object per line, one
//! response object per line, any number of requests per connection:
//!
//! ```text
//! {"cmd":"status"}                              {"ok":true,"status":{...}}
//! {"cmd":"pause"}                               {"ok":true}
//! {"cmd":"resume"}                              {"ok":true}
//! {"cmd":"set-rate","bytes_per_second":N}       {"ok":true}
//! {"cmd":"metrics"}                             {"ok":true,"metrics":"# HELP ..."}
//! {"cmd":"point"}                               {"ok":true,"point":{"cut":N,"name":..,"instant":..,"instant_micros":..}}
//! {"cmd":"point-wait","cut":N}                  {"ok":true,"point":{...,"snapshot":"NAME@ID"}}
//! anything else                                 {"ok":false,"error":"..."}
//! ```
//!
//! `point` asks a protecting daemon for a protection point now, out of its
//! schedule, and answers once the cut is taken (every write acknowledged
//! before `instant` is in the point, none issued after the request
//! arrived): a caller that holds its guests still around the request gets
//! the disk as it was then. The point is then written into the store in
//! the background; `point-wait` answers once it is complete, with its
//! snapshot (`NAME@ID`, a point of its own even when nothing changed
//! since the last one), or an error if writing it failed. Both take an optional `timeout_ms` (default
//! [`POINT_TIMEOUT`]); give the client a longer one. A daemon without
//! protection refuses both.
//!
//! A line is at most [`MAX_LINE`] bytes; a server serves at most
//! [`MAX_CLIENTS`] connections at once and tells the next one so. The
//! client sends one request per connection and waits at most
//! [`DEFAULT_TIMEOUT`] for the answer.
//!
//! # The status type
//! [`Status`] is the one report an operator sees: the control socket
//! serves it as JSON, `recovery-cli status --json` prints it unchanged, and
//! `/metrics` ([`render_metrics`]) renders the same fields as Prometheus
//! text. Fields are only ever added, never renamed (new ones are
//! `#[serde(default)]`, so an older daemon's report still parses). The
//! daemon fills it at each request from its parts:
//!
//! | fields | come from |
//! |---|---|
//! | `state`, `error`, `target`, `bytes_total`, `bytes_migrated`, `bytes_copied_on_read`, `chunks_*`, `copy_rate`, `rate_limit`, `eta_seconds` | the migration's `block::migrate::MigrationStatus` (without a target: `state` = `serving`, `chunks_total` from the image, nothing migrated, `eta_seconds` 0) |
//! | `bytes_to_copy`, `bytes_copied`, `bytes_skipped` | the migration's progress sums (`block::migrate::progress`): data still to move or moved, zero chunks skipped; [`Status::progress`] is weighed by them |
//! | `overlay_write_bytes` | bytes of guest writes that went through the overlay (the migration counts them; without a target, every guest write) |
//! | `journal_active`, `journal_inactive_reason` | whether the live bitmap journals run (`block::bitmap::PersistentBitmap::journal_state`), and if not why |
//! | `guest_*_ops`, `guest_*_bytes`, `guest_io_errors` | the guest counters of `block::metered::MeteredDevice` |
//! | `guest_latency` (`/metrics`: the histogram `guest_request_seconds`) | its latency histograms per request type (`block::latency`), as [`latency::Latency`]: buckets, count, sum, p50/p99/p99.9 |
//! | `chunk_read_errors` | failed store fetches counted by each `block::store_source::StoreSource` (served and repair snapshot) |
//! | `overlay_bytes`, `cache_hit_rate`, `uptime_seconds`, `snapshot` | the overlay (or the migration), the chunk cache, the daemon |
//!
//! [`State`] is `serving` (no target), `migrating`, `paused`, `complete` or
//! `failed`; it maps one to one from the copier's
//! `block::migrate::MigrationPhase` (the one story of states, persistent
//! and run-time, is told in `block::state`). JSON has no NaN or infinity,
//! so non-finite rates and ETAs are reported as 0 or absent.
//!
//! # Concurrency
//! [`Control`] is `Send + Sync`: the daemon's server calls
//! [`handle_line`] from one thread per connection at the same time, and
//! every call builds a fresh [`Status`]. Nothing here holds a lock.
//!
//! # Errors
//! One [`Error`] enum for both sides, each variant naming the failed step
//! and the socket path (bind, connect, send, receive, timeout, a refused
//! request). A bad request line gets an error response, never a closed
//! connection.

pub mod client;
pub mod human;
pub mod latency;
pub mod metrics;
pub mod progress;
pub mod status;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::debug;

pub use client::{
    fetch_metrics, fetch_status, request, request_with_timeout, send_command, take_point,
    wait_point,
};
pub use metrics::render_metrics;
pub use status::{
    Control, DiskStatus, PointRef, Protection, ProtectionState, RemoteStore, State, Status,
};

/// How long the daemon waits, by default, for a `point` cut or a
/// `point-wait` completion before it answers with an error.
pub const POINT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest request line accepted, newline included.
pub const MAX_LINE: usize = 64 * 1024;
/// Most connections served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 64;
/// How long [`request`] waits for the daemon.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the control socket server and client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Control socket path {path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("Control socket {path} is in use by a running daemon")]
    InUse { path: PathBuf },
    #[error("Failed to inspect control socket path {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to bind control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to set up the control socket event loop")]
    EventLoop(#[source] io::Error),
    #[error("Failed to start the control socket thread")]
    Spawn(#[source] io::Error),
    #[error("Cannot connect to control socket {path}: is the daemon running?")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to send the request to control socket {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Failed to read the response from control socket {path}")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("No response from control socket {path} within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("Control socket {path} closed the connection without a response")]
    Closed { path: PathBuf },
    #[error("Invalid response from control socket {path}")]
    BadResponse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("Daemon refused the request: {0}")]
    Refused(String),
    #[error("Daemon response lacks the `{0}` field")]
    MissingField(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    SetRate {
        bytes_per_second: u64,
    },
    Metrics,
    /// A protection point now: answers once its instant is taken.
    Point {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Waits until the point of cut `cut` is complete in the store.
    PointWait {
        cut: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

/// A protection point asked for with `point` (the `point` field).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointTaken {
    /// The daemon's number of the cut, for `point-wait`.
    pub cut: u64,
    /// The image name the daemon writes its points under.
    pub name: String,
    /// The instant the point holds the disk at (RFC 3339, µs).
    pub instant: String,
    /// The same instant, µs since the epoch.
    pub instant_micros: i64,
    /// `NAME@ID` of the point, once complete (`point-wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A request's timeout: the one given in ms (bounded to a day), else
/// [`POINT_TIMEOUT`].
fn timeout_of(ms: Option<u64>) -> Duration {
    ms.filter(|&ms| ms > 0).map_or(POINT_TIMEOUT, |ms| {
        Duration::from_millis(ms.min(86_400_000))
    })
}

/// A response line. `ok` is false exactly when `error` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<PointTaken>,
}

impl Response {
    /// `{"ok":true}`.
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            status: None,
            metrics: None,
            point: None,
        }
    }

    /// `{"ok":false,"error":message}`.
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(message.into()),
            status: None,
            metrics: None,
            point: None,
        }
    }

    /// `Err(Error::Refused)` for an error response, the response otherwise.
    pub fn into_result(self) -> Result<Response> {
        if self.ok {
            Ok(self)
        } else {
            Err(Error::Refused(
                self.error.unwrap_or_else(|| "no reason given".to_string()),
            ))
        }
    }
}

/// Executes one request against the daemon.
pub fn handle_request(control: &dyn Control, request: &Request) -> Response {
    let done = |result: std::result::Result<(), String>| match result {
        Ok(()) => Response::ok(),
        Err(message) => Response::error(message),
    };
    match request {
        Request::Status => Response {
            status: Some(finite(control.status())),
            ..Response::ok()
        },
        Request::Pause => done(control.pause()),
        Request::Resume => done(control.resume()),
        Request::SetRate { bytes_per_second } => done(control.set_rate(*bytes_per_second)),
        Request::Metrics => Response {
            metrics: Some(render_metrics(&control.status())),
            ..Response::ok()
        },
        Request::Point { timeout_ms } => point(control.point(timeout_of(*timeout_ms))),
        Request::PointWait { cut, timeout_ms } => {
            point(control.point_wait(*cut, timeout_of(*timeout_ms)))
        }
    }
}

fn point(result: std::result::Result<PointTaken, String>) -> Response {
    match result {
        Ok(p) => Response {
            point: Some(p),
            ..Response::ok()
        },
        Err(message) => Response::error(message),
    }
}

/// JSON has no NaN or infinity (serde_json writes `null`, which no
/// client can read back as a number): report such values as unknown.
fn finite(mut status: Status) -> Status {
    for value in [
        &mut status.copy_rate,
        &mut status.cache_hit_rate,
        &mut status.uptime_seconds,
    ] {
        if !value.is_finite() {
            *value = 0.0;
        }
    }
    status.eta_seconds = status.eta_seconds.filter(|eta| eta.is_finite());
    for disk in &mut status.disks {
        disk.status = finite(std::mem::take(&mut disk.status));
    }
    status
}

/// Parses and executes one request line (without its newline).
pub fn handle_line(control: &dyn Control, line: &[u8]) -> Response {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match serde_json::from_slice::<Request>(line) {
        Ok(request) => {
            debug!(?request, "control request");
            handle_request(control, &request)
        }
        Err(e) => Response::error(format!("Invalid request: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::State;

    #[test]
    fn wire_format_matches_the_documented_protocol() {
        let set = serde_json::to_string(&Request::SetRate {
            bytes_per_second: 5,
        })
        .unwrap();
        assert_eq!(set, r#"{"cmd":"set-rate","bytes_per_second":5}"#);
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
    }

    #[test]
    fn point_requests_round_trip_and_default_to_refused() {
        let line = serde_json::to_string(&Request::PointWait {
            cut: 3,
            timeout_ms: None,
        })
        .unwrap();
        assert_eq!(line, r#"{"cmd":"point-wait","cut":3}"#);
        let parsed: Request = serde_json::from_str(r#"{"cmd":"point"}"#).unwrap();
        assert_eq!(parsed, Request::Point { timeout_ms: None });
        assert_eq!(timeout_of(Some(0)), POINT_TIMEOUT);
        assert_eq!(timeout_of(Some(2500)), Duration::from_millis(2500));
        // A daemon that does not protect refuses, with a reason.
        struct Plain;
        impl Control for Plain {
            fn status(&self) -> Status {
                Status::default()
            }
            fn pause(&self) -> std::result::Result<(), String> {
                Ok(())
            }
            fn resume(&self) -> std::result::Result<(), String> {
                Ok(())
            }
            fn set_rate(&self, _: u64) -> std::result::Result<(), String> {
                Ok(())
            }
        }
        let r = handle_line(&Plain, br#"{"cmd":"point"}"#);
        assert!(!r.ok && r.error.unwrap().contains("does not protect"));
        let r = handle_line(&Plain, br#"{"cmd":"point-wait","cut":1}"#);
        assert!(!r.ok);
    }

    #[test]
    fn non_finite_numbers_are_reported_as_unknown() {
        let status = Status {
            state: State::Migrating,
            snapshot: "s".into(),
            copy_rate: f64::NAN,
            eta_seconds: Some(f64::INFINITY),
            cache_hit_rate: f64::NEG_INFINITY,
            uptime_seconds: 1.5,
            ..Status::default()
        };
        let clean = finite(status);
        assert_eq!(
            (clean.copy_rate, clean.cache_hit_rate, clean.eta_seconds),
            (0.0, 0.0, None)
        );
        assert_eq!(clean.uptime_seconds, 1.5);
        // And the cleaned report survives a JSON round trip.
        let json = serde_json::to_string(&clean).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), clean);
    }
}
