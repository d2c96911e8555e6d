//! `recovery-cli break-lock --store s3://BUCKET/PREFIX [--force]`: remove
//! the writer lock a dead writer left on an S3 store.

use std::path::PathBuf;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `break-lock`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Also break a lock whose lease is still being renewed (a live writer
    /// will then fail when it notices).
    #[arg(long)]
    pub force: bool,
}

/// Validated `break-lock` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub force: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        Ok(Config {
            store: a.store.store,
            force: a.force,
        })
    }
}

/// Break the lock.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    match s.break_lock(c.force)? {
        Some(state) => {
            let who = state
                .body
                .map(|b| format!("PID {} on {}", b.pid, b.host))
                .unwrap_or_else(|| "an unknown holder".into());
            output::line(&format!(
                "Removed the writer lock of {} held by {who} (last renewed {} s ago)",
                s.location(),
                state.age_secs
            ))
        }
        None => output::line(&format!("Store {} is not locked", s.location())),
    }
}
