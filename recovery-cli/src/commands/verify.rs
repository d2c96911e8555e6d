//! `recovery-cli verify --store STORE [SNAPSHOT [--at TIME]] [--json]`
//!
//! A delta manifest (protection point) is checked with its base; a broken
//! chain names both snapshots.

use std::path::PathBuf;

use store::{ProblemKind, VerifyOptions};

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only the chunks of this snapshot (NAME, NAME@ID or ID); default: all.
    pub snapshot: Option<String>,
    /// Point in time: the newest snapshot of image SNAPSHOT (a NAME) at or
    /// before TIME: RFC 3339 (2026-12-06T11:05:03Z) or relative (-10m, -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `verify` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub snapshot: Option<String>,
    pub at: Option<String>,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if a.at.is_some() && a.snapshot.is_none() {
            anyhow::bail!("--at needs an image NAME");
        }
        Ok(Config {
            store: a.store.store,
            at: a.at,
            snapshot: a.snapshot,
            json: a.json,
        })
    }
}

/// Run verify; fails when anything is wrong.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let snapshot = match &c.snapshot {
        Some(r) => Some(s.resolve_ref_at(r, c.at.as_deref())?),
        None => None,
    };
    let total = snapshot.as_ref().map_or(0, |i| i.image_size);
    let reference = snapshot.map(|i| i.reference());
    let pb = output::progress(total, "verify");
    let cb = |n: u64| pb.inc(n);
    let report = s.verify(
        reference.as_deref(),
        &VerifyOptions {
            progress: Some(&cb),
            threads: None,
        },
    );
    pb.finish_and_clear();
    let report = report?;
    if c.json {
        output::json(&report)?;
    } else {
        for p in &report.problems {
            let what = match p.kind {
                ProblemKind::MissingChunk => "missing chunk",
                ProblemKind::CorruptChunk => "corrupt chunk",
                ProblemKind::CorruptManifest => "corrupt manifest",
                ProblemKind::DamagedIndex => "damaged index",
                _ => "problem",
            };
            let chunk = p.chunk.map(|c| format!(" {c}")).unwrap_or_default();
            let loc = p
                .location
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default();
            output::line(&format!("{what}{chunk}{loc}: {}", detail(p)))?;
            for u in &p.used_by {
                let ranges: Vec<String> = u
                    .ranges
                    .iter()
                    .map(|r| format!("{}-{}", r[0], r[1]))
                    .collect();
                let more = if u.ranges_omitted > 0 {
                    format!(" and {} more", u.ranges_omitted)
                } else {
                    String::new()
                };
                output::line(&format!(
                    "  used by {} bytes {}{more}",
                    u.snapshot,
                    ranges.join(", ")
                ))?;
            }
        }
        output::line(&summary(&report))?;
    }
    if !report.is_ok() {
        anyhow::bail!(
            "Verify found {}",
            plural(report.problems.len() as u64, "problem")
        );
    }
    Ok(())
}

/// `1 problem`, `2 problems`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The last line: what was checked, what is intact, how many problems.
fn summary(r: &store::VerifyReport) -> String {
    let damaged = r.problems.iter().filter(|p| p.chunk.is_some()).count() as u64;
    let intact = r.chunks_checked.saturating_sub(damaged);
    format!(
        "checked {} of {} in {:.2} s: {} intact ({}), {}",
        plural(r.chunks_checked, "chunk"),
        plural(r.snapshots_checked, "snapshot"),
        r.seconds,
        intact,
        output::size(r.bytes_checked),
        if r.is_ok() {
            "no problems".to_string()
        } else {
            plural(r.problems.len() as u64, "problem")
        }
    )
}

/// A problem's error without the leading message that only repeats the
/// chunk and location already printed.
fn detail(p: &store::Problem) -> &str {
    match (p.chunk, p.error.split_once(": ")) {
        (Some(c), Some((head, rest))) if head.contains(&c.to_string()) => rest,
        _ => &p.error,
    }
}
