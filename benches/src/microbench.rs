//! The criterion results as one markdown table, for docs/BENCHMARKS.md.
//!
//! criterion writes `CRITERION_DIR/<group>/<bench>/new/{benchmark,estimates}.json`
//! for every benchmark; this reads the mean and the throughput of each.

use std::path::Path;

use serde_json::Value;

use crate::report::Table;

/// One criterion benchmark result.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    pub id: String,
    /// Mean time per iteration in nanoseconds.
    pub mean_ns: f64,
    /// Throughput per second, formatted ("1.6 GB/s", "8.3 M/s"), if declared.
    pub throughput: Option<String>,
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Reads one benchmark directory (the one holding `new/`).
fn read_bench(dir: &Path) -> Option<Bench> {
    let meta = read_json(&dir.join("new/benchmark.json"))?;
    let est = read_json(&dir.join("new/estimates.json"))?;
    let id = meta["full_id"].as_str()?.to_string();
    let mean_ns = est["mean"]["point_estimate"].as_f64()?;
    let per_sec = 1e9 / mean_ns;
    let throughput = match &meta["throughput"] {
        Value::Object(t) => t
            .get("Bytes")
            .and_then(Value::as_f64)
            .map(|b| format!("{:.1} MB/s", b * per_sec / 1e6))
            .or_else(|| {
                t.get("Elements")
                    .and_then(Value::as_f64)
                    .map(|e| format!("{:.2} M/s", e * per_sec / 1e6))
            }),
        _ => None,
    };
    Some(Bench {
        id,
        mean_ns,
        throughput,
    })
}

/// Every benchmark under `criterion_dir`, sorted by id.
pub fn collect(criterion_dir: &Path) -> Vec<Bench> {
    fn walk(dir: &Path, out: &mut Vec<Bench>) {
        if dir.join("new/benchmark.json").exists() {
            if let Some(b) = read_bench(dir) {
                out.push(b);
            }
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && e.file_name() != "report" {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(criterion_dir, &mut out);
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

fn time_str(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// The results as a table.
pub fn table(benches: &[Bench]) -> Table {
    let mut t = Table::new("", &["benchmark", "mean time", "throughput"]);
    for b in benches {
        t.row(vec![
            format!("`{}`", b.id),
            time_str(b.mean_ns),
            b.throughput.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criterion_output() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("group/case/4096/new");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            b.join("benchmark.json"),
            r#"{"full_id":"group/case/4096","throughput":{"Bytes":4096}}"#,
        )
        .unwrap();
        std::fs::write(
            b.join("estimates.json"),
            r#"{"mean":{"point_estimate":2048.0}}"#,
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("report")).unwrap();
        let got = collect(dir.path());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "group/case/4096");
        assert_eq!(got[0].throughput.as_deref(), Some("2000.0 MB/s"));
        let md = table(&got).markdown();
        assert!(
            md.contains("| `group/case/4096` | 2.05 µs | 2000.0 MB/s |"),
            "{md}"
        );
    }
}
