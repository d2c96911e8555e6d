//! `recovery-cli restore --store STORE SNAPSHOT [--at TIME] TARGET [--force] [--json]`
//!
//! Never writes inside a store; an existing regular file is overwritten only
//! with `--force` (see `store::restore`).

use std::path::PathBuf;

use store::RestoreOptions;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Snapshot: NAME (newest), NAME@ID or ID.
    pub snapshot: String,
    /// Raw file (created, sparse) or block device (not mounted).
    pub target: PathBuf,
    /// Point in time: the newest snapshot of image SNAPSHOT (a NAME) at or
    /// before TIME: RFC 3339 (2026-12-06T11:05:03Z) or relative (-10m, -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Overwrite an existing regular file (never a file inside a store).
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: twice the cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `restore` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub snapshot: String,
    pub target: PathBuf,
    pub at: Option<String>,
    pub threads: Option<usize>,
    pub force: bool,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if a.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(Config {
            store: a.store.store,
            snapshot: a.snapshot,
            target: a.target,
            at: a.at,
            threads: a.threads,
            force: a.force,
            json: a.json,
        })
    }
}

/// Run the restore.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let info = s.resolve_ref_at(&c.snapshot, c.at.as_deref())?;
    let pb = output::progress(info.image_size, "restore");
    let cb = |n: u64| pb.inc(n);
    let opts = RestoreOptions {
        progress: Some(&cb),
        threads: c.threads,
        force: c.force,
    };
    let stats = s.restore(&info.reference(), &c.target, &opts);
    pb.finish_and_clear();
    let stats = stats?;
    if c.json {
        return output::json(&stats);
    }
    output::line(&format!(
        "Restored {} to {}: {} in {:.2} s ({})",
        stats.snapshot,
        stats.target,
        output::size(stats.image_size),
        stats.seconds,
        output::rate(stats.image_size, stats.seconds)
    ))
}
