//! Reports: markdown tables for people, JSON for scripts.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::tools::Machine;

/// A markdown table with notes under it.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

impl Table {
    /// An empty table.
    pub fn new(title: &str, columns: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a row (padded or cut to the column count).
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    /// Adds a note printed under the table.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table as GitHub markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        if !self.title.is_empty() {
            let _ = writeln!(s, "**{}**\n", self.title);
        }
        let _ = writeln!(s, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.columns
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for row in &self.rows {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

/// A target from the issues and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

/// What one scenario run produced.
#[derive(Debug)]
pub struct Report {
    pub scenario: String,
    pub machine: Machine,
    pub tables: Vec<Table>,
    pub targets: Vec<Target>,
    pub data: Map<String, Value>,
}

impl Report {
    /// An empty report; records the machine and its load now.
    pub fn new(scenario: &str, cache_mode: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            machine: Machine::probe(cache_mode),
            tables: Vec::new(),
            targets: Vec::new(),
            data: Map::new(),
        }
    }

    /// Records a value in the JSON output.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        let v = serde_json::to_value(value).unwrap_or(Value::Null);
        self.data.insert(key.to_string(), v);
    }

    /// Checks a "higher is better" ratio against its goal.
    pub fn target_min(&mut self, what: &str, ratio: f64, goal: f64) {
        self.targets.push(Target {
            what: what.to_string(),
            goal: format!("≥ {goal:.2}×"),
            measured: ratio_str(ratio),
            met: ratio >= goal,
        });
    }

    /// Checks a "lower is better" ratio against its goal.
    pub fn target_max(&mut self, what: &str, ratio: f64, goal: f64) {
        self.targets.push(Target {
            what: what.to_string(),
            goal: format!("≤ {goal:.2}×"),
            measured: ratio_str(ratio),
            met: ratio <= goal,
        });
    }

    /// A target with a free-form measurement.
    pub fn target(&mut self, what: &str, goal: &str, measured: String, met: bool) {
        self.targets.push(Target {
            what: what.to_string(),
            goal: goal.to_string(),
            measured,
            met,
        });
    }

    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "_Run {} on {} ({} cores, {} GiB RAM, {}), {} build; {}; load average {:.2} at start, {:.2} at end._\n",
            m.date,
            m.cpu,
            m.cores,
            m.mem_gib,
            m.kernel,
            m.build,
            m.cache_mode,
            m.load_start,
            m.load_end.unwrap_or(f64::NAN),
        );
        for t in &self.tables {
            s.push_str(&t.markdown());
            s.push('\n');
        }
        if !self.targets.is_empty() {
            let mut t = Table::new("Targets", &["target", "goal", "measured", "verdict"]);
            for g in &self.targets {
                t.row(vec![
                    g.what.clone(),
                    g.goal.clone(),
                    g.measured.clone(),
                    if g.met { "met" } else { "**missed**" }.to_string(),
                ]);
            }
            s.push_str(&t.markdown());
        }
        s
    }

    /// Records the end load, prints the markdown and writes
    /// `OUT/SCENARIO.{md,json}`.
    pub fn finish(mut self, out: &Path) -> anyhow::Result<String> {
        self.machine.finish();
        let md = self.markdown();
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join(format!("{}.md", self.scenario)), &md)?;
        let json = serde_json::json!({
            "scenario": self.scenario,
            "machine": self.machine,
            "tables": self.tables,
            "targets": self.targets,
            "data": self.data,
        });
        std::fs::write(
            out.join(format!("{}.json", self.scenario)),
            serde_json::to_string_pretty(&json)?,
        )?;
        Ok(md)
    }
}

/// Replaces the text between `<!-- BEGIN name -->` and `<!-- END name -->`
/// in `doc` with `body`; `None` if the markers are missing.
pub fn splice(doc: &str, name: &str, body: &str) -> Option<String> {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let b = doc.find(&begin)? + begin.len();
    let e = b + doc[b..].find(&end)?;
    Some(format!("{}\n{}\n{}", &doc[..b], body.trim_end(), &doc[e..]))
}

/// `1.5 GiB`-style size.
pub fn bytes_str(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Throughput in MB/s (decimal, like the tools print it).
pub fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        f64::NAN
    }
}

/// The median (mean of the middle two for an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// `2.31×`.
pub fn ratio_str(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "-".to_string()
    }
}

/// Seconds with sensible precision.
pub fn secs_str(s: f64) -> String {
    if s < 0.1 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["1".into()]);
        t.note("n");
        assert_eq!(
            t.markdown(),
            "**T**\n\n| a | b |\n|---|---|\n| 1 |  |\n\n- n\n"
        );
    }

    #[test]
    fn splice_replaces_between_markers_only() {
        let doc = "x\n<!-- BEGIN io -->\nold\n<!-- END io -->\ny\n";
        let new = splice(doc, "io", "new\n").unwrap();
        assert_eq!(new, "x\n<!-- BEGIN io -->\nnew\n<!-- END io -->\ny\n");
        assert!(splice(doc, "boot", "z").is_none());
    }

    #[test]
    fn units_format() {
        assert_eq!(bytes_str(512), "512 B");
        assert_eq!(bytes_str(3 << 29), "1.5 GiB");
        assert_eq!(ratio_str(2.0), "2.00×");
        assert_eq!(ratio_str(f64::NAN), "-");
        assert_eq!(secs_str(0.0123), "12.3 ms");
        assert_eq!(secs_str(1.5), "1.50 s");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
