//! `recovery-cli forget --store STORE SNAPSHOT [--force] [--json]`
//!
//! A held snapshot (an instant-boot state dir depends on it) is refused,
//! naming the holders, unless `--force`; even then gc keeps it while it is
//! held, and `unforget` brings it back.

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
    /// Forget it even if it is held (gc still keeps it while held).
    #[arg(long)]
    pub force: bool,
    /// Print the forgotten snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `forget` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub snapshot: String,
    pub force: bool,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        Ok(Config {
            store: a.store.store,
            snapshot: a.snapshot,
            force: a.force,
            json: a.json,
        })
    }
}

/// Forget the snapshot.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let info = s.forget_with(&c.snapshot, c.force)?;
    let holds = s.holds(Some(&info.reference()))?;
    if c.json {
        let mut v = serde_json::to_value(&info)?;
        v["snapshot"] = info.reference().into();
        v["holds"] = serde_json::to_value(&holds)?;
        return output::json(&v);
    }
    if holds.is_empty() {
        output::line(&format!(
            "Forgot {} (run gc to reclaim its space; `unforget {}` brings it back until then)",
            info.reference(),
            info.reference()
        ))
    } else {
        output::line(&format!(
            "Forgot {}; it is still held by {}, so gc keeps it until the hold is removed (`unforget {}` brings it back)",
            info.reference(),
            holds
                .iter()
                .map(|h| h.info.holder.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            info.reference()
        ))
    }
}
