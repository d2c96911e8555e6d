//! `recovery-cli snapshots --store STORE [NAME] [--json]`

use std::path::PathBuf;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `snapshots`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Only snapshots of this image name.
    pub name: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `snapshots` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub name: Option<String>,
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
            json: a.json,
        })
    }
}

/// List snapshots.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let snaps = s.snapshots(c.name.as_deref())?;
    if c.json {
        return output::json(&snaps);
    }
    if snaps.is_empty() {
        return output::line("no snapshots");
    }
    let w = snaps.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
    output::line(&format!(
        "{:<24} {:<w$} {:>10} {:<27} SOURCE",
        "ID", "NAME", "SIZE", "CREATED"
    ))?;
    for i in &snaps {
        output::line(&format!(
            "{:<24} {:<w$} {:>10} {:<27} {}",
            i.id,
            i.name,
            output::size(i.image_size),
            i.created,
            i.source
        ))?;
    }
    Ok(())
}
