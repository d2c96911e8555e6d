//! `recovery-cli unforget --store STORE NAME@ID [--json]` and
//! `recovery-cli release-hold --store STORE NAME@ID HOLDER`.
//!
//! `forget` only renames a manifest; until gc deletes it (never while it is
//! held) `unforget` renames it back. `release-hold` removes a hold whose
//! holder is gone for good (a deleted state dir), so gc may reclaim it.

use std::path::PathBuf;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `unforget`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// The forgotten snapshot: NAME@ID or ID (as `forget` printed it).
    pub snapshot: String,
    /// Print the snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `unforget` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub snapshot: String,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        Ok(Config {
            store: a.store.store,
            snapshot: a.snapshot,
            json: a.json,
        })
    }
}

/// Bring the snapshot back.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let info = s.unforget(&c.snapshot)?;
    if c.json {
        return output::json(&info);
    }
    output::line(&format!("Unforgot {}", info.reference()))
}

/// Arguments of `release-hold`.
#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub store: StoreArg,
    /// The held snapshot: NAME@ID (may be forgotten) or a reference.
    pub snapshot: String,
    /// The holder id, as `snapshots` shows it.
    pub holder: String,
}

/// Validated `release-hold` configuration.
#[derive(Debug)]
pub struct ReleaseConfig {
    pub store: PathBuf,
    pub snapshot: String,
    pub holder: String,
}

impl TryFrom<ReleaseArgs> for ReleaseConfig {
    type Error = anyhow::Error;

    fn try_from(a: ReleaseArgs) -> anyhow::Result<ReleaseConfig> {
        Ok(ReleaseConfig {
            store: a.store.store,
            snapshot: a.snapshot,
            holder: a.holder,
        })
    }
}

/// Remove the hold.
pub fn release(c: ReleaseConfig) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    if !s.remove_hold(&c.snapshot, &c.holder)? {
        anyhow::bail!("Snapshot {} has no hold by {}", c.snapshot, c.holder);
    }
    output::line(&format!(
        "Released the hold of {} on {}",
        c.holder, c.snapshot
    ))
}
