//! `recovery-cli backup --store S --name N --qmp QMP_SOCKET --drive NODE
//! [--full] [--scratch DIR] [--qga QGA_SOCKET] [--rate RATE] [--json]`
//!
//! `recovery-cli backup --store S --name N --domain DOM --disk vda
//! [--connect URI] [--full] [--scratch DIR] [--rate RATE] [--json]`
//!
//! Back up a running QEMU VM's disk (see `hypervisor::live_backup`), or a
//! libvirt domain's disk through libvirt's backup API (see
//! `hypervisor::libvirt::backup`). Ctrl-C stops the backup cleanly: the VM
//! is left as it was and every change stays tracked for the next backup.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use hypervisor::libvirt;
use hypervisor::live_backup::{self, Report};
use hypervisor::pacing::Rate;

use super::{backup, open_store};
use crate::output;

/// The live-backup flags of `backup`.
#[derive(Debug, Clone, clap::Args)]
pub struct LiveArgs {
    /// QMP unix socket of a running QEMU: back up --drive while the VM runs
    /// (image fleecing; incrementals read only what a dirty bitmap marks).
    #[arg(long, value_name = "QMP_SOCKET", requires = "drive", group = "live_vm")]
    pub qmp: Option<PathBuf>,
    /// Disk to back up: block node name, drive id or device id (as
    /// `query-block` shows them).
    #[arg(long, value_name = "NODE", requires = "qmp")]
    pub drive: Option<String>,
    /// libvirt domain (name or UUID): back up its --disk while it runs,
    /// through libvirt's backup API (pull mode, checkpoints for
    /// incrementals).
    #[arg(long, value_name = "DOMAIN", requires = "disk", group = "live_vm")]
    pub domain: Option<String>,
    /// Disk of --domain to back up, by target name (`vda`).
    #[arg(long, value_name = "TARGET", requires = "domain")]
    pub disk: Option<String>,
    /// libvirt URI for --domain (default: virsh's, qemu:///system for root).
    #[arg(long, value_name = "URI", requires = "domain")]
    pub connect: Option<String>,
    /// Read the whole disk even when an incremental is possible.
    #[arg(long, requires = "live_vm")]
    pub full: bool,
    /// Directory for the scratch image and the NBD socket (default: the
    /// temp directory). Needs free space up to the disk size.
    #[arg(long, value_name = "DIR", requires = "live_vm")]
    pub scratch: Option<PathBuf>,
    /// qemu-guest-agent socket: freeze the guest's filesystems around the
    /// start (always thawed).
    #[arg(long, value_name = "QGA_SOCKET", requires = "qmp")]
    pub qga: Option<PathBuf>,
    /// Read at most RATE bytes per second from the VM (e.g. 50M; default
    /// unlimited), or `auto`: slow down whenever the guest's own disk
    /// latency rises 1.25x above what it is while the backup pauses (one
    /// short pause in six). QEMU serves the backup's reads
    /// in the same main loop as the guest's I/O: a limit trades backup
    /// time for guest latency.
    #[arg(long, value_name = "RATE|auto", value_parser = parse_live_rate, requires = "live_vm")]
    pub rate: Option<Rate>,
}

/// Which VM, and how to reach it.
#[derive(Debug)]
pub enum Target {
    Qmp {
        qmp: PathBuf,
        drive: String,
        qga: Option<PathBuf>,
    },
    Libvirt {
        domain: String,
        disk: String,
        connect: Option<String>,
    },
}

/// Validated live-backup configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub name: String,
    pub target: Target,
    pub full: bool,
    pub scratch: PathBuf,
    pub threads: Option<usize>,
    /// How the NBD reads are paced.
    pub rate: Rate,
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
        let target = match (l.qmp, l.domain) {
            (Some(qmp), None) => Target::Qmp {
                qmp,
                drive: l.drive.context("--drive is required with --qmp")?,
                qga: l.qga,
            },
            (None, Some(domain)) => Target::Libvirt {
                domain,
                disk: l.disk.context("--disk is required with --domain")?,
                connect: l.connect,
            },
            _ => anyhow::bail!("a live backup takes either --qmp or --domain"),
        };
        Ok(Config {
            store: a.store.store,
            name: a.name,
            target,
            full: l.full,
            scratch: l.scratch.unwrap_or_else(std::env::temp_dir),
            threads: a.threads,
            rate: l.rate.unwrap_or(Rate::Fixed(0)),
            json: a.json,
        })
    }
}

/// `--rate`: `auto`, or a rate as `set-rate` takes it.
pub(crate) fn parse_live_rate(s: &str) -> Result<Rate, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(Rate::Auto);
    }
    super::monitor::parse_rate(s)
        .map(Rate::Fixed)
        .map_err(|e| format!("{e}, or auto"))
}

/// Nice value of a live backup's threads: the VM's QEMU serves the
/// backup's reads and the guest's I/O on the same cores, and the guest's
/// I/O must win them (as vzdump runs backups at a low I/O priority). On a
/// 2-core host with back-to-back backups of a guest writing 20 MB/s, the
/// guest's median write latency was 215 µs at nice 0 and 118 µs at
/// nice 10 (62 µs with no backup); the backups were no slower.
pub const LIVE_BACKUP_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`LIVE_BACKUP_NICE`]; call
/// it before any thread starts, as threads inherit it (Linux nice values
/// are per thread). Never raises it (`nice -n 15 recovery-cli` stays at
/// 15). A failure only costs the guest some latency.
pub fn lower_priority() {
    let nice = rustix::process::getpriority_process(None).unwrap_or(0);
    if nice < LIVE_BACKUP_NICE {
        if let Err(e) = rustix::process::setpriority_process(None, LIVE_BACKUP_NICE) {
            tracing::warn!(error = %e, "could not lower the backup's CPU priority");
        }
    }
}

/// Run the live backup.
pub fn run(c: Config) -> anyhow::Result<()> {
    lower_priority();
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
    let report = match c.target {
        Target::Qmp { qmp, drive, qga } => live_backup::run(
            &s,
            &live_backup::Config {
                name: c.name.clone(),
                qmp,
                drive,
                full: c.full,
                scratch: c.scratch,
                qga,
                threads: c.threads,
                rate: c.rate,
                abort: &abort,
                progress: Some(&inc),
                on_size: Some(&len),
            },
        )
        .map_err(anyhow::Error::from),
        Target::Libvirt {
            domain,
            disk,
            connect,
        } => libvirt::backup::run(
            &s,
            &libvirt::backup::Config {
                name: c.name.clone(),
                connect,
                domain,
                disk,
                full: c.full,
                scratch: c.scratch,
                threads: c.threads,
                rate: c.rate,
                abort: &abort,
                progress: Some(&inc),
                on_size: Some(&len),
            },
        )
        .map_err(anyhow::Error::from),
    };
    pb.finish_and_clear();
    let report = report?;
    if c.json {
        return output::json(&report);
    }
    print_report(&report)
}

/// What `--rate auto` did, in one line.
fn pacing_line(p: &hypervisor::pacing::Report) -> String {
    let rate = |r: u64| match r {
        0 => "unlimited".to_owned(),
        r => control::human::format_rate(r as f64),
    };
    let mut line = format!(
        "pacing      auto: {} windows, slowed {} times, lowest {}, at the end {}",
        p.windows,
        p.slowed,
        rate(p.lowest_rate),
        rate(p.final_rate)
    );
    if let Some(e) = &p.error {
        line.push_str(&format!(" (stopped: {e})"));
    }
    line
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
    if let Some(p) = &r.pacing {
        output::line(&pacing_line(p))?;
    }
    if !r.leftovers_cleared.is_empty() {
        output::line(&format!(
            "cleared     {} (left by an interrupted run)",
            r.leftovers_cleared.join(", ")
        ))?;
    }
    Ok(())
}
