//! `protect`'s control socket: the same line-delimited JSON as the
//! daemon's (see the `control` crate), so `recovery-cli metrics --control P`
//! reads it:
//!
//! ```text
//! {"cmd":"status"}    {"ok":true,"service":{"service","state","rpo_seconds",…}}
//! {"cmd":"metrics"}   {"ok":true,"metrics":"# HELP instant_recovery_service_rpo_seconds …"}
//! anything else       {"ok":false,"error":"…"}
//! ```
//! The socket is created private (0600) by `block::socket`. One thread
//! accepts connections, polling the stop flag; it serves one connection at
//! a time (requests are tiny).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use store::snapshot::now_micros;
use tracing::debug;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A client gets this long to send its line.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `protect` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    /// `starting` (no point yet), `ok`, `behind` (the newest complete group
    /// point is older than the RPO) or `failed` (the last point failed).
    pub state: String,
    /// Age of the newest group point (at the request).
    pub rpo_seconds: Option<f64>,
    pub rpo_target_seconds: f64,
    pub interval_seconds: f64,
    /// `SERVICE@ID`.
    pub last_point: Option<String>,
    /// µs since the epoch.
    pub last_point_micros: Option<i64>,
    pub last_blackout_ms: Option<f64>,
    pub points: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl ServiceStatus {
    /// The status as of `now` (µs): `rpo_seconds` and `state` filled in.
    pub fn at(&self, now: i64) -> ServiceStatus {
        let mut s = self.clone();
        s.rpo_seconds = s.last_point_micros.map(|t| (now - t).max(0) as f64 / 1e6);
        s.state = match (&s.last_error, s.rpo_seconds) {
            (Some(_), _) => "failed",
            (None, None) => "starting",
            (None, Some(age)) if age > s.rpo_target_seconds => "behind",
            (None, Some(_)) => "ok",
        }
        .into();
        s
    }

    /// Prometheus text.
    pub fn metrics(&self) -> String {
        let label = format!("{{service=\"{}\"}}", self.service);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: Option<f64>| {
            if let Some(v) = value {
                out.push_str(&format!(
                    "# HELP instant_recovery_service_{name} {help}\n\
                     # TYPE instant_recovery_service_{name} {kind}\n\
                     instant_recovery_service_{name}{label} {v}\n"
                ));
            }
        };
        metric(
            "rpo_seconds",
            "gauge",
            "Age of the newest group point.",
            self.rpo_seconds,
        );
        metric(
            "rpo_target_seconds",
            "gauge",
            "The plan's RPO.",
            Some(self.rpo_target_seconds),
        );
        metric(
            "last_point_timestamp_seconds",
            "gauge",
            "Instant of the newest group point.",
            self.last_point_micros.map(|t| t as f64 / 1e6),
        );
        metric(
            "last_blackout_milliseconds",
            "gauge",
            "Longest guest pause of the last group point.",
            self.last_blackout_ms,
        );
        metric(
            "points_total",
            "counter",
            "Group points taken by this protect process.",
            Some(self.points as f64),
        );
        metric(
            "failures_total",
            "counter",
            "Group points that failed.",
            Some(self.failures as f64),
        );
        for state in ["starting", "ok", "behind", "failed"] {
            out.push_str(&format!(
                "instant_recovery_service_state{{service=\"{}\",state=\"{state}\"}} {}\n",
                self.service,
                u8::from(self.state == state)
            ));
        }
        out
    }
}

/// The running control socket; dropping it stops the thread and removes
/// the socket.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _file: block::socket::SocketFile,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `status` on a private socket at `path`.
pub fn serve(
    path: &Path,
    status: Arc<Mutex<ServiceStatus>>,
) -> Result<Server, block::socket::Error> {
    let (listener, file) = block::socket::bind_private_socket(path, None)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| block::socket::Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("protect-control".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Err(e) = answer(conn, &status) {
                            debug!("control client: {e}");
                        }
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        })
        .map_err(|source| block::socket::Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Server {
        stop,
        thread: Some(thread),
        _file: file,
    })
}

fn answer(conn: UnixStream, status: &Mutex<ServiceStatus>) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        let now = status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .at(now_micros());
        let cmd = serde_json::from_str::<Value>(line.trim())
            .ok()
            .and_then(|v| v.get("cmd").and_then(Value::as_str).map(str::to_owned));
        let reply = match cmd.as_deref() {
            Some("status") => json!({ "ok": true, "service": now }),
            Some("metrics") => json!({ "ok": true, "metrics": now.metrics() }),
            Some(other) => {
                json!({ "ok": false, "error": format!("Unknown command {other:?}; protect answers status and metrics") })
            }
            None => json!({ "ok": false, "error": "Not a request: expected {\"cmd\":…}" }),
        };
        writeln!(writer, "{reply}")?;
        line.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_metrics_follow_the_newest_point() {
        let mut s = ServiceStatus {
            service: "portal".into(),
            rpo_target_seconds: 60.0,
            ..Default::default()
        };
        assert_eq!(s.at(0).state, "starting");
        s.last_point_micros = Some(1_000_000);
        let now = s.at(31_000_000);
        assert_eq!((now.state.as_str(), now.rpo_seconds), ("ok", Some(30.0)));
        assert_eq!(s.at(62_000_000).state, "behind");
        let m = now.metrics();
        assert!(
            m.contains("instant_recovery_service_rpo_seconds{service=\"portal\"} 30\n"),
            "{m}"
        );
        assert!(
            m.contains("state{service=\"portal\",state=\"ok\"} 1\n"),
            "{m}"
        );
        s.last_error = Some("x".into());
        assert_eq!(s.at(2_000_000).state, "failed");
    }
}
