//! `recovery-cli backup --store S --name N --qmp QMP_SOCKET --drive NODE
//! [--full] [--scratch DIR] [--qga QGA_SOCKET] [--json]`
//!
//! Back up a running QEMU VM's disk (see `hypervisor::live_backup`). Ctrl-C
//! stops the backup cleanly: QEMU is left as it was and every change stays
//! tracked for the next backup.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use hypervisor::live_backup::{self, Report};

use super::{backup, open_store};
use crate::output;

/// The live-backup flags of `backup`.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveArgs {
    /// QMP unix socket of a running QEMU: back up --drive while the VM runs
    /// (image fleecing; incrementals read only what a dirty bitmap marks).
    #[arg(long, value_name = "QMP_SOCKET", requires = "drive")]
    pub qmp: Option<PathBuf>,
    /// Disk to back up: block node name, drive id or device id (as
    /// `query-block` shows them).
    #[arg(long, value_name = "NODE", requires = "qmp")]
    pub drive: Option<String>,
    /// Read the whole disk even when an incremental is possible.
    #[arg(long, requires = "qmp")]
    pub full: bool,
    /// Directory for the scratch image and the NBD socket (default: the
    /// temp directory). Needs free space up to the disk size.
    #[arg(long, value_name = "DIR", requires = "qmp")]
    pub scratch: Option<PathBuf>,
    /// qemu-guest-agent socket: freeze the guest's filesystems around the
    /// start (always thawed).
    #[arg(long, value_name = "QGA_SOCKET", requires = "qmp")]
    pub qga: Option<PathBuf>,
}

/// Validated live-backup configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub name: String,
    pub qmp: PathBuf,
    pub drive: String,
    pub full: bool,
    pub scratch: PathBuf,
    pub qga: Option<PathBuf>,
    pub threads: Option<usize>,
    pub json: bool,
}

impl TryFrom<backup::Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: backup::Args) -> anyhow::Result<Config> {
        store::snapshot::validate_name(&a.name)?;
        if a.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        let l = a.live;
        Ok(Config {
            store: a.store.store,
            name: a.name,
            qmp: l.qmp.context("--qmp is required for a live backup")?,
            drive: l.drive.context("--drive is required with --qmp")?,
            full: l.full,
            scratch: l.scratch.unwrap_or_else(std::env::temp_dir),
            qga: l.qga,
            threads: a.threads,
            json: a.json,
        })
    }
}

/// Run the live backup.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    let abort = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while stopping exits at once (QEMU objects left
        // behind are cleared by the next run).
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&abort))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&abort)))
            .context("Failed to install the signal handler")?;
    }
    let pb = output::progress(0, "live backup");
    let inc = |n: u64| pb.inc(n);
    let len = |n: u64| pb.set_length(n);
    let cfg = live_backup::Config {
        name: c.name.clone(),
        qmp: c.qmp,
        drive: c.drive,
        full: c.full,
        scratch: c.scratch,
        qga: c.qga,
        threads: c.threads,
        abort: &abort,
        progress: Some(&inc),
        on_size: Some(&len),
    };
    let report = live_backup::run(&s, &cfg);
    pb.finish_and_clear();
    let report = report?;
    if c.json {
        return output::json(&report);
    }
    print_report(&report)
}

fn print_report(r: &Report) -> anyhow::Result<()> {
    output::line(&format!("snapshot    {}", r.snapshot))?;
    output::line(&format!(
        "parent      {}",
        r.parent.as_deref().unwrap_or("-")
    ))?;
    match &r.reason {
        Some(reason) => output::line(&format!("mode        full ({reason})"))?,
        None => output::line(&format!("mode        {}", r.mode))?,
    }
    let dirty = match r.mode {
        "incremental" => format!(" ({} marked dirty)", output::size(r.dirty_bytes)),
        _ => String::new(),
    };
    output::line(&format!(
        "read        {} of {}{dirty} in {:.2} s",
        output::size(r.bytes_read),
        output::size(r.image_size),
        r.seconds
    ))?;
    output::line(&format!(
        "chunks      {} total, {} new, {} unchanged (not read)",
        r.chunks_total, r.chunks_new, r.chunks_unchanged
    ))?;
    output::line(&format!("stored      {} new", output::size(r.bytes_new)))?;
    let frozen = r
        .frozen_ms
        .map(|f| format!(", filesystems frozen {f:.1} ms"))
        .unwrap_or_default();
    output::line(&format!(
        "guest       paused {:.1} ms{frozen}",
        r.blackout_ms
    ))?;
    if !r.leftovers_cleared.is_empty() {
        output::line(&format!(
            "cleared     {} (left by an interrupted run)",
            r.leftovers_cleared.join(", ")
        ))?;
    }
    Ok(())
}
