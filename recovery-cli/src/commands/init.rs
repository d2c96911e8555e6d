//! `recovery-cli init STORE [--chunk-size 64K]`

use std::path::PathBuf;

use crate::output;

/// Arguments of `init`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of the new store (created if missing; must be empty).
    pub store: PathBuf,
    /// Chunk size: a power of two from 4K to 4M (e.g. 4K, 64K, 1M, 4MiB).
    #[arg(long, default_value = "64K", value_parser = output::parse_size)]
    pub chunk_size: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `init` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub chunk_size: u32,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        let chunk_size = u32::try_from(a.chunk_size).map_err(|_| {
            anyhow::anyhow!("Chunk size {} is too large (at most 4M)", a.chunk_size)
        })?;
        store::config::validate_chunk_size(chunk_size)?;
        Ok(Config {
            store: a.store,
            chunk_size,
            json: a.json,
        })
    }
}

/// Create the store.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = store::Store::init(&c.store, c.chunk_size)?;
    if c.json {
        output::json(&serde_json::json!({
            "store": s.path(),
            "chunk_size": s.chunk_size(),
        }))
    } else {
        output::line(&format!(
            "Created store {} (chunk size {})",
            s.path().display(),
            output::size(s.chunk_size() as u64)
        ))
    }
}
