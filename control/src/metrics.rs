//! Prometheus text exposition (format 0.0.4) of a [`Status`].
//!
//! Every metric is prefixed `instant_recovery_`. Monotonic counts are
//! counters with a `_total` suffix; everything else is a gauge. The state
//! is a one-hot gauge over every [`State`], so a dashboard can graph
//! `instant_recovery_state{state="migrating"}` without string matching.
//! `eta_seconds` is omitted while unknown rather than reported as a
//! sentinel.

use std::fmt::Write as _;

use crate::latency::GuestLatency;
use crate::status::{Protection, ProtectionState, RemoteStore, State, Status};

const PREFIX: &str = "instant_recovery_";

/// Renders `status` in the Prometheus text format: a `# HELP` and a
/// `# TYPE` line per metric, then its samples, one per line.
pub fn render_metrics(status: &Status) -> String {
    let mut out = Metrics::default();

    let target = status.target.as_deref().unwrap_or("");
    out.metric(
        "info",
        Kind::Gauge,
        "The snapshot being served and the migration target.",
    );
    out.sample(
        "info",
        &[("snapshot", &status.snapshot), ("target", target)],
        1.0,
    );

    out.metric(
        "state",
        Kind::Gauge,
        "Daemon state, one-hot over all states.",
    );
    for (state, name) in State::ALL.map(|s| (s, s.name())) {
        let value = if status.state == state { 1.0 } else { 0.0 };
        out.sample("state", &[("state", name)], value);
    }

    out.simple(
        "image_bytes",
        Kind::Gauge,
        "Size of the disk image in bytes.",
        status.bytes_total as f64,
    );
    out.simple(
        "bytes_migrated_total",
        Kind::Counter,
        "Bytes of the image migrated to the target.",
        status.bytes_migrated as f64,
    );
    out.simple(
        "bytes_copied_on_read_total",
        Kind::Counter,
        "Bytes migrated early because the guest read them.",
        status.bytes_copied_on_read as f64,
    );
    out.simple(
        "bytes_to_copy",
        Kind::Gauge,
        "Bytes of data the migration has to move, done or not (zero chunks excluded).",
        status.bytes_to_copy as f64,
    );
    out.simple(
        "bytes_copied_total",
        Kind::Counter,
        "Bytes of data written to the target.",
        status.bytes_copied as f64,
    );
    out.simple(
        "bytes_skipped_total",
        Kind::Counter,
        "Bytes migrated without a copy (zero chunks).",
        status.bytes_skipped as f64,
    );
    out.simple(
        "chunks",
        Kind::Gauge,
        "Number of chunks in the image.",
        status.chunks_total as f64,
    );
    out.simple(
        "chunks_migrated_total",
        Kind::Counter,
        "Chunks migrated to the target.",
        status.chunks_migrated as f64,
    );
    out.simple(
        "chunks_failed_total",
        Kind::Counter,
        "Chunks the copier could not read from the store.",
        status.chunks_failed as f64,
    );
    out.simple(
        "chunks_repaired_total",
        Kind::Counter,
        "Chunks migrated from the --repair-from snapshot.",
        status.chunks_repaired as f64,
    );
    out.simple(
        "migration_progress_ratio",
        Kind::Gauge,
        "Fraction of the data to copy that is on the target, 0 to 1 (zero chunks, which cost no copy, are not weighed).",
        status.progress(),
    );
    out.simple(
        "copy_rate_bytes_per_second",
        Kind::Gauge,
        "Rate of data written to the target over a recent window (copied bytes only; never above the limit).",
        status.copy_rate,
    );
    out.simple(
        "copy_rate_limit_bytes_per_second",
        Kind::Gauge,
        "Configured copy rate limit; 0 means unlimited.",
        status.rate_limit as f64,
    );
    if let Some(eta) = status.eta_seconds {
        out.simple(
            "eta_seconds",
            Kind::Gauge,
            "Estimated seconds until the migration completes.",
            eta,
        );
    }

    out.metric(
        "guest_ops_total",
        Kind::Counter,
        "Guest requests by operation.",
    );
    out.sample(
        "guest_ops_total",
        &[("op", "read")],
        status.guest_read_ops as f64,
    );
    out.sample(
        "guest_ops_total",
        &[("op", "write")],
        status.guest_write_ops as f64,
    );
    out.sample(
        "guest_ops_total",
        &[("op", "flush")],
        status.guest_flush_ops as f64,
    );
    out.metric(
        "guest_bytes_total",
        Kind::Counter,
        "Guest bytes by operation.",
    );
    out.sample(
        "guest_bytes_total",
        &[("op", "read")],
        status.guest_read_bytes as f64,
    );
    out.sample(
        "guest_bytes_total",
        &[("op", "write")],
        status.guest_write_bytes as f64,
    );
    out.simple(
        "guest_io_errors_total",
        Kind::Counter,
        "Guest requests completed with an I/O error.",
        status.guest_io_errors as f64,
    );
    out.simple(
        "chunk_read_errors_total",
        Kind::Counter,
        "Chunk fetches from the store that failed (corrupt or missing chunk).",
        status.chunk_read_errors as f64,
    );

    out.simple(
        "overlay_write_bytes_total",
        Kind::Counter,
        "Bytes of guest writes that landed in the overlay (their chunk not yet on the target).",
        status.overlay_write_bytes as f64,
    );
    out.simple(
        "overlay_bytes",
        Kind::Gauge,
        "Bytes of guest data held in the overlay.",
        status.overlay_bytes as f64,
    );
    out.simple(
        "cache_hit_ratio",
        Kind::Gauge,
        "Chunk cache hits over lookups.",
        status.cache_hit_rate,
    );
    out.simple(
        "uptime_seconds",
        Kind::Gauge,
        "Seconds since the daemon started.",
        status.uptime_seconds,
    );

    out.simple(
        "journal_active",
        Kind::Gauge,
        "1 if the live journal runs (acknowledged writes survive a daemon restart), 0 if not.",
        if status.journal_active { 1.0 } else { 0.0 },
    );
    if !status.journal_active {
        out.metric(
            "journal_inactive_info",
            Kind::Gauge,
            "Why the live journal does not run.",
        );
        let reason = status
            .journal_inactive_reason
            .as_deref()
            .unwrap_or("no reason given");
        out.sample("journal_inactive_info", &[("reason", reason)], 1.0);
    }
    if let Some(l) = &status.guest_latency {
        render_latency(&mut out, l);
    }
    if let Some(p) = &status.protection {
        render_protection(&mut out, p);
    }
    render_disks(&mut out, status);
    if let Some(r) = &status.remote_store {
        render_remote_store(&mut out, r);
    }

    out.text
}

/// `instant-boot --plan`: the service's name and a sample per disk
/// (label `disk`, `<vm>-<drive>`) of the migration metrics; the metrics
/// above are the service's totals.
fn render_disks(out: &mut Metrics, status: &Status) {
    if let Some(service) = &status.service {
        out.metric(
            "service_info",
            Kind::Gauge,
            "The service whose group point the daemon serves.",
        );
        out.sample("service_info", &[("service", service)], 1.0);
    }
    if status.disks.is_empty() {
        return;
    }
    out.metric(
        "disk_state",
        Kind::Gauge,
        "State of each disk of the service, one-hot over all states.",
    );
    for d in &status.disks {
        for state in State::ALL {
            let value = if d.status.state == state { 1.0 } else { 0.0 };
            out.sample(
                "disk_state",
                &[("disk", &d.disk), ("state", state.name())],
                value,
            );
        }
    }
    type Field = fn(&Status) -> f64;
    let families: [(&str, Kind, &str, Field); 7] = [
        (
            "disk_image_bytes",
            Kind::Gauge,
            "Size of each disk in bytes.",
            |s| s.bytes_total as f64,
        ),
        (
            "disk_bytes_to_copy",
            Kind::Gauge,
            "Bytes of data each disk's migration has to move.",
            |s| s.bytes_to_copy as f64,
        ),
        (
            "disk_bytes_copied_total",
            Kind::Counter,
            "Bytes of data written to each disk's target.",
            |s| s.bytes_copied as f64,
        ),
        (
            "disk_bytes_migrated_total",
            Kind::Counter,
            "Bytes of each disk migrated to its target.",
            |s| s.bytes_migrated as f64,
        ),
        (
            "disk_migration_progress_ratio",
            Kind::Gauge,
            "Fraction of each disk's data to copy that is on its target, 0 to 1.",
            Status::progress,
        ),
        (
            "disk_copy_rate_bytes_per_second",
            Kind::Gauge,
            "Rate of data written to each disk's target over a recent window.",
            |s| s.copy_rate,
        ),
        (
            "disk_guest_io_errors_total",
            Kind::Counter,
            "Guest requests on each disk completed with an I/O error.",
            |s| s.guest_io_errors as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        out.metric(name, kind, help);
        for d in &status.disks {
            out.sample(name, &[("disk", &d.disk)], value(&d.status));
        }
    }
}

/// The `remote_store_*` metrics (only for a remote store).
fn render_remote_store(out: &mut Metrics, r: &RemoteStore) {
    out.metric(
        "remote_store_info",
        Kind::Gauge,
        "The remote store the chunks come from.",
    );
    out.sample("remote_store_info", &[("location", &r.location)], 1.0);
    let samples: [(&str, Kind, &str, f64); 8] = [
        (
            "remote_store_retry_time_seconds",
            Kind::Gauge,
            "A store read fails (guest I/O error) after retrying this long.",
            r.retry_time_seconds,
        ),
        (
            "remote_store_requests_total",
            Kind::Counter,
            "Requests sent to the remote store, retries included.",
            r.requests as f64,
        ),
        (
            "remote_store_request_errors_total",
            Kind::Counter,
            "Requests to the remote store that failed (5xx, throttling, timeouts, connection errors).",
            r.request_errors as f64,
        ),
        (
            "remote_store_retries_total",
            Kind::Counter,
            "Requests to the remote store sent again after a failure.",
            r.retries as f64,
        ),
        (
            "remote_store_failed_operations_total",
            Kind::Counter,
            "Remote store operations that failed for good.",
            r.failed_operations as f64,
        ),
        (
            "remote_store_last_error_timestamp_seconds",
            Kind::Gauge,
            "When the last request error happened (0: none yet).",
            r.last_error_unix.unwrap_or(0.0),
        ),
        (
            "remote_store_disk_cache_bytes",
            Kind::Gauge,
            "Bytes held by the on-disk chunk cache of the remote store.",
            r.disk_cache_bytes as f64,
        ),
        (
            "remote_store_disk_cache_hits_total",
            Kind::Counter,
            "Chunk reads served from the on-disk chunk cache.",
            r.disk_cache_hits as f64,
        ),
    ];
    for (name, kind, help, value) in samples {
        out.simple(name, kind, help, value);
    }
}

/// `guest_request_seconds`: a histogram per request type, with `le` at
/// 1-2-5 steps from 1 µs to 100 s (bounds of the recorded buckets, so
/// the cumulative counts are exact).
fn render_latency(out: &mut Metrics, l: &GuestLatency) {
    const NAME: &str = "guest_request_seconds";
    out.metric(
        NAME,
        Kind::Histogram,
        "Time guest requests spent in the daemon's block layers, by type.",
    );
    let bucket = format!("{NAME}_bucket");
    for (op, h) in l.by_op() {
        let mut le_ns = 1_000u64;
        while le_ns <= 100_000_000_000 {
            for step in [1, 2, 5] {
                let le = le_ns * step;
                if le > 100_000_000_000 {
                    break;
                }
                let secs = format_value(le as f64 / 1e9);
                out.sample(
                    &bucket,
                    &[("op", op), ("le", &secs)],
                    h.count_at_most(le) as f64,
                );
            }
            le_ns *= 10;
        }
        out.sample(&bucket, &[("op", op), ("le", "+Inf")], h.count as f64);
        out.sample(&format!("{NAME}_sum"), &[("op", op)], h.sum_seconds);
        out.sample(&format!("{NAME}_count"), &[("op", op)], h.count as f64);
    }
}

/// The `protection_*` metrics (only while the daemon protects the disk).
fn render_protection(out: &mut Metrics, p: &Protection) {
    out.metric(
        "protection_state",
        Kind::Gauge,
        "Continuous protection state, one-hot over all states.",
    );
    for state in ProtectionState::ALL {
        let value = if p.state == state { 1.0 } else { 0.0 };
        out.sample("protection_state", &[("state", state.name())], value);
    }
    if let Some(rpo) = p.rpo_seconds {
        out.simple(
            "protection_rpo_seconds",
            Kind::Gauge,
            "Age of the newest disk state held in the store (recovery point objective).",
            rpo,
        );
    }
    if let Some(t) = p
        .last_point
        .as_ref()
        .and_then(|l| instant_seconds(&l.instant))
    {
        out.simple(
            "protection_last_point_timestamp_seconds",
            Kind::Gauge,
            "Instant of the newest protection point, seconds since the Unix epoch.",
            t,
        );
    }
    out.simple(
        "protection_points_written_total",
        Kind::Counter,
        "Protection points written since the daemon started.",
        p.points_written as f64,
    );
    out.simple(
        "protection_point_bytes_read_total",
        Kind::Counter,
        "Bytes protection points read from the disk.",
        p.point_bytes_read as f64,
    );
    out.simple(
        "protection_point_bytes_new_total",
        Kind::Counter,
        "Bytes protection points added to the store.",
        p.point_bytes_new as f64,
    );
    out.simple(
        "protection_pending_bytes",
        Kind::Gauge,
        "Bytes of chunks changed since the newest protection point.",
        p.pending_bytes as f64,
    );
}

/// Seconds since the epoch of an RFC 3339 UTC instant
/// (`2026-12-06T11:05:03.123456Z`), `None` if it is not one.
fn instant_seconds(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn metric(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {PREFIX}{name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {PREFIX}{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.text, "{PREFIX}{name}");
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label(val));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    fn simple(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.metric(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes backslash and newline.
fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Prometheus spells the special floats `NaN`, `+Inf` and `-Inf`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::status::DiskStatus;

    fn sample_status() -> Status {
        Status {
            state: State::Migrating,
            snapshot: "vm1/2024-05-01".to_string(),
            target: Some("/dev/vg0/\"prod\"\\disk".to_string()),
            bytes_total: 4 << 30,
            bytes_migrated: 3 << 30,
            bytes_copied_on_read: 64 << 20,
            bytes_to_copy: 2 << 30,
            bytes_copied: 1 << 30,
            bytes_skipped: 2 << 30,
            chunks_total: 1024,
            chunks_migrated: 768,
            copy_rate: 123_456_789.5,
            eta_seconds: Some(26.1),
            guest_read_ops: 10,
            guest_read_bytes: 40960,
            guest_write_ops: 3,
            guest_write_bytes: 12288,
            guest_flush_ops: 1,
            overlay_write_bytes: 8192,
            overlay_bytes: 12288,
            cache_hit_rate: 0.75,
            uptime_seconds: 12.5,
            journal_active: true,
            ..Status::default()
        }
    }

    /// A parsed sample line: `name{labels} value`.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// A strict parser for the subset of the text format we emit.
    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let end;
            loop {
                // Label name up to '='.
                let start = chars.peek().map(|&(i, _)| i).ok_or("unterminated labels")?;
                if inner[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = inner[start..].find('=').ok_or("label without '='")? + start;
                let key = &inner[start..eq];
                if !is_metric_name(key) || key.contains(':') {
                    return Err(format!("bad label name {key:?}"));
                }
                while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err("label value not quoted".into());
                }
                let mut value = String::new();
                loop {
                    match chars.next().ok_or("unterminated label value")?.1 {
                        '\\' => match chars.next().ok_or("dangling escape")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        '"' => break,
                        '\n' => return Err("raw newline in label".into()),
                        c => value.push(c),
                    }
                }
                labels.insert(key.to_string(), value);
                match chars.next().ok_or("unterminated labels")? {
                    (_, ',') => continue,
                    (i, '}') => {
                        end = i + 1;
                        break;
                    }
                    (_, c) => return Err(format!("unexpected {c:?} after label")),
                }
            }
            rest = &inner[end..];
        }
        let value = rest.strip_prefix(' ').ok_or("no space before value")?;
        let value = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .map_err(|e| format!("bad value {v:?}: {e}"))?,
        };
        Ok(Sample {
            name: name.to_string(),
            labels,
            value,
        })
    }

    /// Parses a whole exposition, checking HELP/TYPE precede samples.
    fn parse(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line in exposition");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has text");
                assert!(is_metric_name(name) && !help.is_empty(), "{line}");
                assert!(
                    helps.insert(name.to_string(), ()).is_none(),
                    "duplicate HELP {name}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "dup TYPE {name}"
                );
            } else {
                assert!(!line.starts_with('#'), "unknown comment {line}");
                let sample = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                // A histogram's samples carry a suffix on its name.
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|x| sample.name.strip_suffix(x))
                    .find(|base| types.get(*base).is_some_and(|k| k == "histogram"))
                    .unwrap_or(&sample.name);
                let kind = types
                    .get(family)
                    .unwrap_or_else(|| panic!("no TYPE for {line}"));
                assert!(helps.contains_key(family), "no HELP for {line}");
                assert_eq!(kind == "counter", sample.name.ends_with("_total"), "{line}");
                assert!(sample.name.starts_with(PREFIX), "{line}");
                samples.push(sample);
            }
        }
        samples
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<_> = samples
            .iter()
            .filter(|s| s.name == format!("{PREFIX}{name}") && s.labels == want)
            .collect();
        assert_eq!(found.len(), 1, "expected one sample {name}{labels:?}");
        found[0].value
    }

    #[test]
    fn every_line_parses_and_values_match_the_status() {
        let status = sample_status();
        let text = render_metrics(&status);
        let samples = parse(&text);

        assert_eq!(
            value(&samples, "bytes_migrated_total", &[]),
            (3u64 << 30) as f64
        );
        assert_eq!(value(&samples, "bytes_to_copy", &[]), (2u64 << 30) as f64);
        assert_eq!(
            value(&samples, "bytes_copied_total", &[]),
            (1u64 << 30) as f64
        );
        assert_eq!(
            value(&samples, "bytes_skipped_total", &[]),
            (2u64 << 30) as f64
        );
        assert_eq!(value(&samples, "overlay_write_bytes_total", &[]), 8192.0);
        assert_eq!(value(&samples, "journal_active", &[]), 1.0);
        assert!(!text.contains("journal_inactive_info"));
        assert_eq!(value(&samples, "image_bytes", &[]), (4u64 << 30) as f64);
        assert_eq!(
            value(&samples, "copy_rate_bytes_per_second", &[]),
            123_456_789.5
        );
        // Half the data to copy is there (three quarters of the image,
        // most of it skipped zeroes).
        assert_eq!(value(&samples, "migration_progress_ratio", &[]), 0.5);
        assert_eq!(value(&samples, "eta_seconds", &[]), 26.1);
        assert_eq!(value(&samples, "guest_ops_total", &[("op", "write")]), 3.0);
        assert_eq!(
            value(&samples, "guest_bytes_total", &[("op", "read")]),
            40960.0
        );
        assert_eq!(value(&samples, "cache_hit_ratio", &[]), 0.75);
        // The target's quote and backslash survive the escaping round trip.
        let info = [
            ("snapshot", "vm1/2024-05-01"),
            ("target", "/dev/vg0/\"prod\"\\disk"),
        ];
        assert_eq!(value(&samples, "info", &info), 1.0);
    }

    #[test]
    fn a_remote_store_reports_its_retry_time_and_errors() {
        assert!(!render_metrics(&sample_status()).contains("remote_store"));
        let status = Status {
            remote_store: Some(RemoteStore {
                location: "s3://b/p".to_string(),
                retry_time_seconds: 30.0,
                requests: 100,
                request_errors: 7,
                retries: 5,
                failed_operations: 2,
                last_error: Some("S3 GET s3://b/p/packs/x: 503".to_string()),
                last_error_unix: Some(1.7e9),
                disk_cache_hits: 40,
                ..RemoteStore::default()
            }),
            ..sample_status()
        };
        let samples = parse(&render_metrics(&status));
        let location = [("location", "s3://b/p")];
        assert_eq!(value(&samples, "remote_store_info", &location), 1.0);
        assert_eq!(
            value(&samples, "remote_store_retry_time_seconds", &[]),
            30.0
        );
        assert_eq!(
            value(&samples, "remote_store_request_errors_total", &[]),
            7.0
        );
        assert_eq!(value(&samples, "remote_store_retries_total", &[]), 5.0);
        assert_eq!(
            value(&samples, "remote_store_failed_operations_total", &[]),
            2.0
        );
        assert_eq!(
            value(&samples, "remote_store_last_error_timestamp_seconds", &[]),
            1.7e9
        );
        assert_eq!(
            value(&samples, "remote_store_disk_cache_hits_total", &[]),
            40.0
        );
    }

    #[test]
    fn state_is_one_hot() {
        for (state, name) in State::ALL.map(|s| (s, s.name())) {
            let status = Status {
                state,
                ..sample_status()
            };
            let samples = parse(&render_metrics(&status));
            for other in State::ALL.map(State::name) {
                let expected = if other == name { 1.0 } else { 0.0 };
                assert_eq!(
                    value(&samples, "state", &[("state", other)]),
                    expected,
                    "{name}/{other}"
                );
            }
        }
    }

    #[test]
    fn unknown_eta_is_omitted_and_special_floats_are_spelled_right() {
        let status = Status {
            eta_seconds: None,
            copy_rate: f64::NAN,
            uptime_seconds: f64::INFINITY,
            bytes_total: 0,
            bytes_to_copy: 0,
            target: None,
            snapshot: "line\nbreak".to_string(),
            ..sample_status()
        };
        let text = render_metrics(&status);
        let samples = parse(&text);
        assert!(!text.contains("eta_seconds"));
        assert!(value(&samples, "copy_rate_bytes_per_second", &[]).is_nan());
        assert_eq!(value(&samples, "uptime_seconds", &[]), f64::INFINITY);
        assert_eq!(value(&samples, "migration_progress_ratio", &[]), 1.0);
        assert_eq!(
            value(
                &samples,
                "info",
                &[("snapshot", "line\nbreak"), ("target", "")]
            ),
            1.0
        );
    }

    #[test]
    fn an_inactive_journal_says_why() {
        let status = Status {
            journal_active: false,
            journal_inactive_reason: Some("cannot read \"boot_id\"".into()),
            ..sample_status()
        };
        let samples = parse(&render_metrics(&status));
        assert_eq!(value(&samples, "journal_active", &[]), 0.0);
        assert_eq!(
            value(
                &samples,
                "journal_inactive_info",
                &[("reason", "cannot read \"boot_id\"")]
            ),
            1.0
        );
    }

    #[test]
    fn latency_is_a_cumulative_histogram_per_request_type() {
        use crate::latency::{GuestLatency, Latency, ABOVE_ALL};
        assert!(!render_metrics(&sample_status()).contains("guest_request_seconds"));
        let write = Latency::new(
            2_500_000,
            vec![[1_120, 5], [2_000, 3], [45_000, 1], [ABOVE_ALL, 1]],
        );
        let status = Status {
            guest_latency: Some(GuestLatency {
                write,
                ..GuestLatency::default()
            }),
            ..sample_status()
        };
        let samples = parse(&render_metrics(&status));
        let bucket = |op, le| {
            value(
                &samples,
                "guest_request_seconds_bucket",
                &[("op", op), ("le", le)],
            )
        };
        assert_eq!(bucket("write", "0.000001"), 0.0);
        assert_eq!(bucket("write", "0.000002"), 8.0);
        assert_eq!(bucket("write", "0.00005"), 9.0);
        assert_eq!(bucket("write", "100"), 9.0);
        assert_eq!(bucket("write", "+Inf"), 10.0);
        assert_eq!(bucket("read", "+Inf"), 0.0);
        assert_eq!(
            value(&samples, "guest_request_seconds_count", &[("op", "write")]),
            10.0
        );
        assert_eq!(
            value(&samples, "guest_request_seconds_sum", &[("op", "write")]),
            0.0025
        );
        // Cumulative: never decreasing along `le`, 25 bounds and +Inf.
        let writes: Vec<f64> = samples
            .iter()
            .filter(|s| s.name.ends_with("_bucket") && s.labels["op"] == "write")
            .map(|s| s.value)
            .collect();
        assert_eq!(writes.len(), 26);
        assert!(writes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn protection_metrics_appear_only_while_protecting() {
        let plain = render_metrics(&sample_status());
        assert!(!plain.contains("protection"), "{plain}");
        let status = Status {
            protection: Some(Protection {
                state: ProtectionState::Behind,
                name: "vm".into(),
                interval_seconds: 5.0,
                last_point: Some(crate::status::PointRef {
                    id: "20261206T110503.250000Z".into(),
                    snapshot: "vm@20261206T110503.250000Z".into(),
                    instant: "2026-12-06T11:05:03.250000Z".into(),
                }),
                rpo_seconds: Some(12.5),
                points_written: 7,
                point_bytes_read: 1 << 20,
                point_bytes_new: 4096,
                pending_bytes: 65536,
                ..Protection::default()
            }),
            ..sample_status()
        };
        let samples = parse(&render_metrics(&status));
        assert_eq!(value(&samples, "protection_rpo_seconds", &[]), 12.5);
        assert_eq!(value(&samples, "protection_points_written_total", &[]), 7.0);
        assert_eq!(
            value(&samples, "protection_point_bytes_read_total", &[]),
            (1u64 << 20) as f64
        );
        assert_eq!(
            value(&samples, "protection_point_bytes_new_total", &[]),
            4096.0
        );
        assert_eq!(value(&samples, "protection_pending_bytes", &[]), 65536.0);
        assert_eq!(
            value(&samples, "protection_last_point_timestamp_seconds", &[]),
            1_796_555_103.25
        );
        for state in ProtectionState::ALL {
            let want = if state == ProtectionState::Behind {
                1.0
            } else {
                0.0
            };
            assert_eq!(
                value(&samples, "protection_state", &[("state", state.name())]),
                want
            );
        }
    }

    #[test]
    fn the_test_parser_rejects_malformed_lines() {
        for bad in [
            "instant_recovery_x",
            "instant_recovery_x 1 2",
            "instant-recovery 1",
            "instant_recovery_x{a=\"b} 1",
            "instant_recovery_x{a=b} 1",
            "instant_recovery_x{a=\"\\q\"} 1",
            "instant_recovery_x{a=\"b\"}1",
            "instant_recovery_x abc",
        ] {
            assert!(parse_sample(bad).is_err(), "{bad:?} should not parse");
        }
        let ok = parse_sample("instant_recovery_x{a=\"b\",c=\"d\"} 1.5").unwrap();
        assert_eq!(ok.labels.len(), 2);
        assert_eq!(ok.value, 1.5);
    }

    #[test]
    fn a_service_has_its_totals_and_a_labelled_sample_per_disk() {
        let disk = |name: &str, state, copied: u64| DiskStatus {
            disk: name.to_string(),
            status: Status {
                state,
                bytes_total: 64 << 20,
                bytes_to_copy: 8 << 20,
                bytes_copied: copied,
                ..Status::default()
            },
        };
        let status = Status {
            state: State::Migrating,
            bytes_total: 128 << 20,
            bytes_to_copy: 16 << 20,
            bytes_copied: 12 << 20,
            service: Some("portal".into()),
            disks: vec![
                disk("db-disk0", State::Complete, 8 << 20),
                disk("app-disk0", State::Migrating, 4 << 20),
            ],
            ..Status::default()
        };
        let samples = parse(&render_metrics(&status));
        assert_eq!(
            value(&samples, "bytes_copied_total", &[]),
            (12 << 20) as f64
        );
        assert_eq!(
            value(&samples, "service_info", &[("service", "portal")]),
            1.0
        );
        assert_eq!(
            value(
                &samples,
                "disk_bytes_copied_total",
                &[("disk", "app-disk0")]
            ),
            (4 << 20) as f64
        );
        assert_eq!(
            value(
                &samples,
                "disk_migration_progress_ratio",
                &[("disk", "app-disk0")]
            ),
            0.5
        );
        let state =
            |disk, state| value(&samples, "disk_state", &[("disk", disk), ("state", state)]);
        assert_eq!(state("db-disk0", "complete"), 1.0);
        assert_eq!(state("db-disk0", "migrating"), 0.0);
        assert_eq!(state("app-disk0", "migrating"), 1.0);
        // A daemon of one disk has none of them.
        let one = render_metrics(&sample_status());
        assert!(
            !one.contains("disk_state") && !one.contains("service_info"),
            "{one}"
        );
    }
}
