//! `metrics --store S`: the drill records as Prometheus text (format
//! 0.0.4), for a textfile collector (`recovery-cli metrics --store S >
//! /var/lib/node_exporter/drills.prom.tmp && mv ...`) or any scraper.
//!
//! Per image (the snapshot name), over every record in the store:
//!
//! | metric                                                        | type    | value                                        |
//! |---------------------------------------------------------------|---------|----------------------------------------------|
//! | `instant_recovery_last_successful_drill_timestamp_seconds`    | gauge   | Unix time of the newest passing drill; 0 if none passed |
//! | `instant_recovery_drill_rto_seconds`                          | gauge   | RTO of that drill (absent if none passed)    |
//! | `instant_recovery_last_drill_passed`                          | gauge   | 1 if the newest drill passed, else 0         |
//! | `instant_recovery_drills_total{result="passed"\|"failed"}`     | counter | drills recorded                              |
//!
//! An image whose drills all failed reports timestamp 0, so the usual
//! alert `time() - instant_recovery_last_successful_drill_timestamp_seconds
//! > 7 * 86400` fires for it too.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use store::DrillRecord;

const PREFIX: &str = "instant_recovery_";

#[derive(Default)]
struct Image {
    /// Time (µs) and RTO of the newest passing drill.
    last_pass: Option<(i64, Option<f64>)>,
    /// Time (µs) and verdict of the newest drill.
    last: Option<(i64, bool)>,
    passed: u64,
    failed: u64,
}

/// Renders the records (`(µs since the epoch, record)`, any order) of
/// images and of services (group drills, `drill --plan`: label
/// `service`).
pub(super) fn render(records: &[(i64, DrillRecord)], services: &[(i64, DrillRecord)]) -> String {
    let mut images: BTreeMap<(&str, &str), Image> = BTreeMap::new();
    let labelled = records
        .iter()
        .map(|r| ("image", r))
        .chain(services.iter().map(|r| ("service", r)));
    for (label, (micros, r)) in labelled {
        let name = r.snapshot.split_once('@').map_or(&*r.snapshot, |(n, _)| n);
        let img = images.entry((label, name)).or_default();
        if r.passed {
            img.passed += 1;
            if img.last_pass.is_none_or(|(t, _)| t <= *micros) {
                img.last_pass = Some((*micros, r.rto_seconds));
            }
        } else {
            img.failed += 1;
        }
        if img.last.is_none_or(|(t, _)| t <= *micros) {
            img.last = Some((*micros, r.passed));
        }
    }
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{PREFIX}{name}{{{labels}}} {v}");
        }
    };
    let image = |(label, n): &(&str, &str)| format!("{label}=\"{}\"", escape(n));
    metric(
        "last_successful_drill_timestamp_seconds",
        "gauge",
        "Unix time of the newest drill of the image that passed (0: none passed).",
        images
            .iter()
            .map(|(n, i)| (image(n), i.last_pass.map_or(0.0, |(t, _)| t as f64 / 1e6)))
            .collect(),
    );
    metric(
        "drill_rto_seconds",
        "gauge",
        "RTO of the newest passing drill: its start to the last check passing.",
        images
            .iter()
            .filter_map(|(n, i)| Some((image(n), i.last_pass?.1?)))
            .collect(),
    );
    metric(
        "last_drill_passed",
        "gauge",
        "1 if the newest drill of the image passed, else 0.",
        images
            .iter()
            .map(|(n, i)| (image(n), f64::from(u8::from(i.last.is_some_and(|l| l.1)))))
            .collect(),
    );
    metric(
        "drills_total",
        "counter",
        "Drills recorded for the image, by result.",
        images
            .iter()
            .flat_map(|(n, i)| {
                [("passed", i.passed), ("failed", i.failed)]
                    .map(|(r, c)| (format!("{},result=\"{r}\"", image(n)), c as f64))
            })
            .collect(),
    );
    out
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(snapshot: &str, passed: bool, rto: Option<f64>) -> DrillRecord {
        DrillRecord {
            snapshot: snapshot.into(),
            time: String::new(),
            passed,
            rto_seconds: rto,
            checks: vec!["qga".into()],
        }
    }

    #[test]
    fn newest_pass_and_counts_per_image() {
        let text = render(
            &[
                (3_000_000, record("a@1", false, None)),
                (1_000_000, record("a@1", true, Some(4.5))),
                (2_000_000, record("a@2", true, Some(3.25))),
                (5_000_000, record("b\"x@1", false, None)),
            ],
            &[],
        );
        let has = |l: &str| assert!(text.lines().any(|x| x == l), "{l} not in\n{text}");
        has("instant_recovery_last_successful_drill_timestamp_seconds{image=\"a\"} 2");
        has("instant_recovery_last_successful_drill_timestamp_seconds{image=\"b\\\"x\"} 0");
        has("instant_recovery_drill_rto_seconds{image=\"a\"} 3.25");
        has("instant_recovery_last_drill_passed{image=\"a\"} 0");
        has("instant_recovery_drills_total{image=\"a\",result=\"passed\"} 2");
        has("instant_recovery_drills_total{image=\"a\",result=\"failed\"} 1");
        has("# TYPE instant_recovery_drills_total counter");
        assert!(!text.contains("drill_rto_seconds{image=\"b"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("# HELP")).count(), 4);
        assert_eq!(render(&[], &[]).lines().count(), 8);
        let text = render(&[], &[(1_000_000, record("portal@1", true, Some(9.5)))]);
        let has = |l: &str| assert!(text.lines().any(|x| x == l), "{l} not in\n{text}");
        has("instant_recovery_drill_rto_seconds{service=\"portal\"} 9.5");
        has("instant_recovery_last_drill_passed{service=\"portal\"} 1");
    }
}
