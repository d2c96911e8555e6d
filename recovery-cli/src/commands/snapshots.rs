//! `recovery-cli snapshots --store STORE [NAME] [--at TIME] [--forgotten] [--json]`
//!
//! Backups and protection points alike, with their instants (CREATED) and
//! KIND: `full`, or `delta` on a base full manifest (BASE). `--at` keeps, per
//! image, only the snapshot a `restore --at` would pick.
//!
//! One row per snapshot with its holds (who depends on it, e.g. an
//! instant-boot state dir); `--forgotten` adds forgotten snapshots that gc
//! has not deleted yet (`unforget` can bring them back).

use std::path::PathBuf;

use serde::Serialize;
use store::{DrillRecord, Hold, SnapshotInfo};

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `snapshots`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only snapshots of this image name.
    pub name: Option<String>,
    /// Only the snapshot of each image that `--at TIME` picks: the newest at
    /// or before TIME (RFC 3339, or relative: -10m, -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Also list forgotten snapshots that gc has not deleted yet.
    #[arg(long)]
    pub forgotten: bool,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `snapshots` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub name: Option<String>,
    pub forgotten: bool,
    pub at: Option<String>,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if let Some(n) = &a.name {
            store::snapshot::validate_name(n)?;
        }
        Ok(Config {
            store: a.store.store,
            name: a.name,
            forgotten: a.forgotten,
            at: a.at,
            json: a.json,
        })
    }
}

/// One listed snapshot: its info, whether it is forgotten, its holds.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    info: SnapshotInfo,
    /// `NAME@ID`.
    snapshot: String,
    forgotten: bool,
    /// `full` or `delta`.
    kind: &'static str,
    /// Base full manifest of a delta.
    base: Option<String>,
    holds: Vec<Hold>,
    /// The newest drill of this snapshot (`recovery-cli drill`).
    last_drill: Option<DrillRecord>,
    /// When a drill of this snapshot last passed: it was proven bootable.
    last_passed_drill: Option<String>,
}

/// List snapshots.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let mut listed: Vec<(SnapshotInfo, bool)> = s
        .snapshots(c.name.as_deref())?
        .into_iter()
        .map(|i| (i, false))
        .collect();
    if c.forgotten {
        listed.extend(
            s.forgotten_snapshots(c.name.as_deref())?
                .into_iter()
                .map(|i| (i, true)),
        );
        listed.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    }
    if let Some(at) = &c.at {
        let mut names: Vec<String> = listed.iter().map(|l| l.0.name.clone()).collect();
        names.sort();
        names.dedup();
        let mut picked = Vec::new();
        for n in &names {
            match s.resolve_at_str(n, at) {
                Ok(i) => picked.push(i.id),
                // Only an image asked for by name makes a miss an error.
                Err(e) if c.name.is_some() || e.kind() != store::ErrorKind::NotFound => {
                    return Err(e.into())
                }
                Err(_) => {}
            }
        }
        if names.is_empty() {
            if let Some(n) = &c.name {
                s.resolve_at_str(n, at)?;
            }
        }
        listed.retain(|l| !l.1 && picked.contains(&l.0.id));
    }
    let mut holds = s.holds(None)?;
    let mut rows: Vec<Row> = Vec::with_capacity(listed.len());
    for (info, forgotten) in listed {
        let snapshot = info.reference();
        let (mine, rest) = holds.drain(..).partition(|h| h.snapshot == snapshot);
        holds = rest;
        let base = s.snapshot_base(&info)?;
        rows.push(Row {
            info,
            snapshot,
            forgotten,
            kind: if base.is_some() { "delta" } else { "full" },
            base,
            holds: mine,
            last_drill: None,
            last_passed_drill: None,
        });
    }
    let rows = with_drills(&s, rows)?;
    if c.json {
        return output::json(&rows);
    }
    if rows.is_empty() {
        return output::line("no snapshots");
    }
    let held = |r: &Row| {
        let mut h: Vec<String> = r.holds.iter().map(|h| h.to_string()).collect();
        if r.forgotten {
            h.insert(0, "forgotten".into());
        }
        if h.is_empty() {
            "-".into()
        } else {
            h.join("; ")
        }
    };
    let w = |f: &dyn Fn(&Row) -> usize, title: &str| {
        rows.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let iw = w(&|r| r.info.id.len(), "ID");
    let nw = w(&|r| r.info.name.len(), "NAME");
    let cw = w(&|r| r.info.created.len(), "CREATED");
    let sw = w(&|r| r.info.source.len(), "SOURCE");
    let drill = |r: &Row| match (&r.last_drill, &r.last_passed_drill) {
        (None, _) => "-".to_string(),
        (Some(d), _) if d.passed => format!("passed {}", d.time),
        (Some(d), Some(ok)) => format!("FAILED {} (passed {ok})", d.time),
        (Some(d), None) => format!("FAILED {}", d.time),
    };
    let dw = w(&|r| drill(r).len(), "DRILL");
    let kind = |r: &Row| match &r.base {
        Some(b) => format!("delta:{b}"),
        None => r.kind.to_string(),
    };
    let kw = w(&|r| kind(r).len(), "KIND");
    output::line(
        format!(
            "{:<iw$} {:<nw$} {:>10} {:<cw$} {:<kw$} {:<sw$} {:<dw$} HOLDS",
            "ID", "NAME", "SIZE", "CREATED", "KIND", "SOURCE", "DRILL"
        )
        .trim_end(),
    )?;
    for r in &rows {
        output::line(&format!(
            "{:<iw$} {:<nw$} {:>10} {:<cw$} {:<kw$} {:<sw$} {:<dw$} {}",
            r.info.id,
            r.info.name,
            output::size(r.info.image_size),
            r.info.created,
            kind(r),
            r.info.source,
            drill(r),
            held(r)
        ))?;
    }
    Ok(())
}

/// Fills in each row's drills (`store::drill`).
fn with_drills(s: &store::Store, mut rows: Vec<Row>) -> anyhow::Result<Vec<Row>> {
    for r in &mut rows {
        let drills = s.drill_records(&r.snapshot)?;
        r.last_passed_drill = drills
            .iter()
            .rev()
            .find(|d| d.passed)
            .map(|d| d.time.clone());
        r.last_drill = drills.into_iter().last();
    }
    Ok(rows)
}
