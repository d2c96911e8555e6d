//! `recovery-cli snapshots --store STORE [NAME] [--forgotten] [--json]`
//!
//! One row per snapshot with its holds (who depends on it, e.g. an
//! instant-boot state dir); `--forgotten` adds forgotten snapshots that gc
//! has not deleted yet (`unforget` can bring them back).

use std::path::PathBuf;

use serde::Serialize;
use store::{Hold, SnapshotInfo};

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `snapshots`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only snapshots of this image name.
    pub name: Option<String>,
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
    holds: Vec<Hold>,
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
    let mut holds = s.holds(None)?;
    let rows: Vec<Row> = listed
        .into_iter()
        .map(|(info, forgotten)| {
            let snapshot = info.reference();
            let (mine, rest) = holds.drain(..).partition(|h| h.snapshot == snapshot);
            holds = rest;
            Row {
                info,
                snapshot,
                forgotten,
                holds: mine,
            }
        })
        .collect();
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
    output::line(
        format!(
            "{:<iw$} {:<nw$} {:>10} {:<cw$} {:<sw$} HOLDS",
            "ID", "NAME", "SIZE", "CREATED", "SOURCE"
        )
        .trim_end(),
    )?;
    for r in &rows {
        output::line(&format!(
            "{:<iw$} {:<nw$} {:>10} {:<cw$} {:<sw$} {}",
            r.info.id,
            r.info.name,
            output::size(r.info.image_size),
            r.info.created,
            r.info.source,
            held(r)
        ))?;
    }
    Ok(())
}
