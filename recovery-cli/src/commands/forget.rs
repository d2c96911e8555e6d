//! `recovery-cli forget --store STORE SNAPSHOT [--json]`

use std::path::PathBuf;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `forget`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Snapshot: NAME (newest), NAME@ID or ID.
    pub snapshot: String,
    /// Print the forgotten snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `forget` configuration.
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

/// Forget the snapshot.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let info = s.forget(&c.snapshot)?;
    if c.json {
        return output::json(&info);
    }
    output::line(&format!(
        "Forgot {} (run gc to reclaim its space)",
        info.reference()
    ))
}
