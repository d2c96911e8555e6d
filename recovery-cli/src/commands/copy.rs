//! `recovery-cli copy --from STORE --to STORE [SNAPSHOT...] [--json]`:
//! copy snapshots between stores (local or `s3://`), sending only the
//! chunks the destination lacks; re-running an interrupted copy resumes it.

use std::path::PathBuf;

use super::open_store;
use crate::output;

/// Arguments of `copy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source store (directory or s3://BUCKET/PREFIX).
    #[arg(long, value_name = "STORE")]
    pub from: PathBuf,
    /// Destination store (directory or s3://BUCKET/PREFIX), already initialised.
    #[arg(long, value_name = "STORE")]
    pub to: PathBuf,
    /// Snapshots to copy (NAME for all of an image, NAME@ID or ID); all when none.
    pub snapshots: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `copy` configuration.
#[derive(Debug)]
pub struct Config {
    pub from: PathBuf,
    pub to: PathBuf,
    pub snapshots: Vec<String>,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if a.from == a.to {
            anyhow::bail!("--from and --to name the same store");
        }
        Ok(Config {
            from: a.from,
            to: a.to,
            snapshots: a.snapshots,
            json: a.json,
        })
    }
}

/// Run the copy.
pub fn run(c: Config) -> anyhow::Result<()> {
    let src = open_store(&c.from)?;
    let dst = open_store(&c.to)?;
    let stats = src.copy_to(&dst, &c.snapshots)?;
    if c.json {
        return output::json(&stats);
    }
    output::line(&format!(
        "Copied {} snapshots ({} already there) from {} to {}: sent {} chunks ({}) in {} packs, {} already present, in {:.2} s",
        stats.snapshots_copied,
        stats.snapshots_skipped,
        src.location(),
        dst.location(),
        stats.chunks_sent,
        output::size(stats.bytes_sent),
        stats.packs,
        stats.chunks_present,
        stats.seconds
    ))
}
