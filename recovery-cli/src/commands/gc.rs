//! `recovery-cli gc --store STORE [--json]`

use std::path::PathBuf;

use store::GcOptions;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `gc`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Repack a pack when at least this fraction of it is unused (0..=1).
    #[arg(long, default_value_t = store::gc::DEFAULT_REPACK_THRESHOLD)]
    pub repack_threshold: f64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `gc` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub repack_threshold: f64,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if !(0.0..=1.0).contains(&a.repack_threshold) {
            anyhow::bail!("--repack-threshold must be between 0 and 1");
        }
        Ok(Config {
            store: a.store.store,
            repack_threshold: a.repack_threshold,
            json: a.json,
        })
    }
}

/// Run gc.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let stats = s.gc(&GcOptions {
        repack_threshold: c.repack_threshold,
    })?;
    if c.json {
        return output::json(&stats);
    }
    output::line(&format!(
        "Deleted {} forgotten snapshots ({} still in use, {} held), {} packs deleted, {} repacked into {}; freed {} in {:.2} s",
        stats.manifests_deleted,
        stats.manifests_in_use,
        stats.manifests_held,
        stats.packs_deleted,
        stats.packs_repacked,
        stats.packs_written,
        output::size(stats.bytes_freed),
        stats.seconds
    ))
}
