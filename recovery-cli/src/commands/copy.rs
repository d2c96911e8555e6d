//! `recovery-cli copy --from STORE --to STORE [SNAPSHOT...] [--json]`:
//! copy snapshots between stores (local or `s3://`), sending only the
//! chunks the destination lacks; re-running an interrupted copy resumes it.
//!
//! The source opens with the usual secret (global `--key-file`,
//! `RECOVERY_KEY_FILE`, `RECOVERY_PASSWORD` or a prompt). A destination
//! with a key of its own takes `--to-key-file FILE` or
//! `RECOVERY_TO_PASSWORD`; without either it opens like the source. Between
//! stores whose chunk ids differ (another key, or plaintext and encrypted)
//! chunks are re-keyed and re-sealed on the way (see `store::copy`).

use std::path::PathBuf;

use anyhow::Context;
use store::crypto::Secret;

use super::{location, open_store};
use crate::output;

/// Environment variable with the passphrase of the destination store.
pub const TO_PASSWORD_ENV: &str = "RECOVERY_TO_PASSWORD";

/// Arguments of `copy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source store (directory or s3://BUCKET/PREFIX).
    #[arg(long, value_name = "STORE")]
    pub from: PathBuf,
    /// Destination store (directory or s3://BUCKET/PREFIX), already initialised.
    #[arg(long, value_name = "STORE")]
    pub to: PathBuf,
    /// Key file of an encrypted destination with a key of its own (else
    /// RECOVERY_TO_PASSWORD, else the source's secret).
    #[arg(long, value_name = "FILE")]
    pub to_key_file: Option<PathBuf>,
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
    pub to_key_file: Option<PathBuf>,
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
            to_key_file: a.to_key_file,
            snapshots: a.snapshots,
            json: a.json,
        })
    }
}

/// Run the copy.
pub fn run(c: Config) -> anyhow::Result<()> {
    let src = open_store(&c.from)?;
    let dst = open_destination(&c)?;
    let stats = src.copy_to(&dst, &c.snapshots)?;
    if c.json {
        return output::json(&stats);
    }
    output::line(&format!(
        "Copied {} snapshots ({} already there) and {} group points from {} to {}{}: sent {} chunks ({}) in {} packs, {} already present, in {:.2} s",
        stats.snapshots_copied,
        stats.snapshots_skipped,
        stats.groups_copied,
        src.location(),
        dst.location(),
        if stats.ids_translated { " (chunks re-keyed)" } else { "" },
        stats.chunks_sent,
        output::size(stats.bytes_sent),
        stats.packs,
        stats.chunks_present,
        stats.seconds
    ))
}

/// The destination: with `--to-key-file` or `RECOVERY_TO_PASSWORD` when
/// given, else as any store.
fn open_destination(c: &Config) -> anyhow::Result<store::Store> {
    let secret = match (&c.to_key_file, std::env::var(TO_PASSWORD_ENV)) {
        (Some(f), _) => Some(Secret::key_file(f)?),
        (None, Ok(p)) => {
            Some(Secret::passphrase(p).with_context(|| format!("Invalid {TO_PASSWORD_ENV}"))?)
        }
        (None, Err(_)) => None,
    };
    let Some(secret) = secret else {
        return open_store(&c.to);
    };
    Ok(store::Store::open_location_keyed(
        &location(&c.to)?,
        &store::OpenOptions::default(),
        Some(&secret),
    )?)
}
