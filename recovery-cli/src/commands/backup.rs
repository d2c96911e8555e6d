//! `recovery-cli backup --store STORE --name NAME SOURCE [--json]`

use std::path::PathBuf;

use store::BackupOptions;

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Image name (letters, digits, '.', '_', '-'); snapshots are NAME@ID.
    #[arg(long, short = 'n')]
    pub name: String,
    /// Raw image file or block device (or --qmp / --domain for a running VM).
    #[arg(required_unless_present = "live_vm", conflicts_with = "live_vm")]
    pub source: Option<PathBuf>,
    #[command(flatten)]
    pub live: super::live_backup::LiveArgs,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not use the previous snapshot of this name to skip index lookups.
    #[arg(long)]
    pub no_parent: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `backup` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub name: String,
    pub source: PathBuf,
    pub threads: Option<usize>,
    pub no_parent: bool,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        store::snapshot::validate_name(&a.name)?;
        if a.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        Ok(Config {
            store: a.store.store,
            name: a.name,
            source: a
                .source
                .ok_or_else(|| anyhow::anyhow!("SOURCE (or --qmp or --domain) is required"))?,
            threads: a.threads,
            no_parent: a.no_parent,
            json: a.json,
        })
    }
}

/// Run the backup.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let (_, size) = store::backup::open_source(&c.source)?;
    let pb = output::progress(size, "backup");
    let cb = |n: u64| pb.inc(n);
    let opts = BackupOptions {
        progress: Some(&cb),
        threads: c.threads,
        no_parent: c.no_parent,
        ..Default::default()
    };
    let stats = s.backup(&c.name, &c.source, &opts);
    pb.finish_and_clear();
    let stats = stats?;
    // Snapshots are named NAME@ID in every output (as restore and
    // snapshots do); the bare id stays available as `id`.
    let reference = format!("{}@{}", stats.name, stats.snapshot);
    let parent = stats.parent.as_ref().map(|p| format!("{}@{p}", stats.name));
    if c.json {
        let mut v = serde_json::to_value(&stats)?;
        v["id"] = stats.snapshot.clone().into();
        v["snapshot"] = reference.into();
        v["parent"] = parent.into();
        return output::json(&v);
    }
    output::line(&format!("snapshot    {reference}"))?;
    output::line(&format!("parent      {}", parent.as_deref().unwrap_or("-")))?;
    output::line(&format!(
        "read        {} of {} in {:.2} s ({}){}",
        output::size(stats.bytes_read),
        output::size(stats.image_size),
        stats.seconds,
        output::rate(stats.bytes_read, stats.seconds),
        if stats.bytes_read < stats.image_size {
            "; holes are not read"
        } else {
            ""
        }
    ))?;
    output::line(&format!(
        "chunks      {} total, {} new, {} zero, {} unchanged from parent",
        stats.chunks_total, stats.chunks_new, stats.chunks_zero, stats.chunks_parent
    ))?;
    output::line(&format!(
        "stored      {} new",
        output::size(stats.bytes_new)
    ))
}
