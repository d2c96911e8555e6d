//! Service plans (see the `service` crate):
//! ```text
//! recovery-cli backup    --plan portal.toml [--full] [--rate RATE|auto] [--json]
//! recovery-cli snapshots --plan portal.toml [--at TIME] [--json]
//! recovery-cli check     --plan portal.toml [--json]
//! recovery-cli forget    --plan portal.toml [--dry-run] [--json]
//! recovery-cli protect   --plan portal.toml [--rate RATE|auto]
//! recovery-cli instant-boot --plan portal.toml [GROUP_ID | --at TIME] --state DIR --socket-dir DIR [--qemu]
//! ```
//! `check` and `protect` are subcommands of their own. `backup`,
//! `snapshots` and `forget` with `--plan` take no `--store` (the plan names
//! it), so [`dispatch`] recognises them before the main parser and parses
//! them with [`PlanCli`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use hypervisor::pacing::Rate;
use service::backup::GroupReport;
use service::{backup, policy, protect, Plan};

use crate::output;

/// The `--plan` option.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArg {
    /// Service plan (TOML): the service's VMs and disks, RPO, retention, store.
    #[arg(long, value_name = "PLAN")]
    pub plan: PathBuf,
}

/// `backup --plan`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub plan: PlanArg,
    /// Read every disk in full even where an incremental is possible.
    #[arg(long)]
    pub full: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read at most RATE bytes per second from the VMs, all disks together
    /// (e.g. 50M; default unlimited), or `auto`: each VM's reads slow down
    /// whenever its guest's disk latency rises.
    #[arg(long, value_name = "RATE|auto", value_parser = super::live_backup::parse_live_rate)]
    pub rate: Option<Rate>,
    #[arg(long)]
    pub json: bool,
}

/// `snapshots --plan`.
#[derive(Debug, clap::Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub plan: PlanArg,
    /// Only the group point `--at TIME` picks: the newest at or before TIME
    /// (RFC 3339, or relative: -10m, -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// `check --plan`: exit 1 when the RPO is violated or the last run failed.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub plan: PlanArg,
    #[arg(long)]
    pub json: bool,
}

/// `forget --plan`.
#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub plan: PlanArg,
    /// Print what would be kept and removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

/// `protect --plan`.
#[derive(Debug, clap::Args)]
pub struct ProtectArgs {
    #[command(flatten)]
    pub plan: PlanArg,
    /// Stop after N group points (default: run until SIGTERM).
    #[arg(long, value_name = "N")]
    pub points: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read at most RATE bytes per second from the VMs in each group
    /// point, all disks together (e.g. 50M; default unlimited), or `auto`
    /// (each VM by its guest's disk latency).
    #[arg(long, value_name = "RATE|auto", value_parser = super::live_backup::parse_live_rate)]
    pub rate: Option<Rate>,
    /// One JSON object per point on stdout instead of a log line.
    #[arg(long)]
    pub json: bool,
    /// Control socket: `status` and `metrics` (rpo_seconds, last point,
    /// failures), read with `recovery-cli metrics --control PATH`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// The commands that take `--plan` instead of `--store`.
#[derive(Debug, Parser)]
#[command(name = "recovery-cli", version)]
pub struct PlanCli {
    #[command(subcommand)]
    pub command: PlanCommand,
}

/// See [`PlanCli`].
#[derive(Debug, clap::Subcommand)]
pub enum PlanCommand {
    /// Back up every disk of every VM of the plan at one instant (a group point).
    Backup(BackupArgs),
    /// List the plan's group points.
    Snapshots(SnapshotsArgs),
    /// Apply the plan's retention to its group points (a group goes as a whole).
    Forget(ForgetArgs),
    /// Boot the whole service at a group point in sandboxes, run each VM's checks.
    Drill(super::drill::group::Args),
    /// Serve every disk of the service at a group point from one daemon, migrating each to its target.
    InstantBoot(super::instant_boot::plan::Args),
}

/// `Some(PlanCli)` when `args` is `backup|snapshots|forget … --plan …`
/// (clap's usage errors exit 2 as usual).
pub fn dispatch(args: &[OsString]) -> Option<PlanCli> {
    let sub = args.get(1)?.to_str()?;
    if !matches!(
        sub,
        "backup" | "snapshots" | "forget" | "drill" | "instant-boot"
    ) {
        return None;
    }
    let has_plan = args[2..].iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == "--plan" || a.starts_with("--plan="))
    });
    has_plan.then(|| PlanCli::parse_from(args))
}

impl PlanCli {
    /// Run the parsed command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            PlanCommand::Backup(a) => backup_plan(a),
            PlanCommand::Snapshots(a) => snapshots(a),
            PlanCommand::Forget(a) => forget(a),
            PlanCommand::Drill(a) => super::drill::group::run(a),
            PlanCommand::InstantBoot(a) => super::instant_boot::plan::run(a),
        }
    }
}

fn load(p: &PlanArg) -> anyhow::Result<Plan> {
    Ok(Plan::load(&p.plan)?)
}

fn open(plan: &Plan) -> anyhow::Result<store::Store> {
    store::Store::open(&plan.store)
        .with_context(|| format!("Failed to open store {}", plan.store.display()))
}

/// SIGINT/SIGTERM set the flag (a second one exits at once).
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&flag)))
            .context("Failed to install the signal handler")?;
    }
    Ok(flag)
}

fn backup_plan(a: BackupArgs) -> anyhow::Result<()> {
    if a.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    // The VMs run: their I/O wins the cores, as for one live backup.
    super::live_backup::lower_priority();
    let plan = load(&a.plan)?;
    let s = open(&plan)?;
    let abort = stop_flag()?;
    let r = backup::run_in(
        &s,
        &plan,
        &backup::Options {
            abort: &abort,
            threads: a.threads,
            full: a.full,
            rate: a.rate.unwrap_or(Rate::Fixed(0)),
        },
    );
    let recorded = match &r {
        Ok(g) => policy::record_outcome(&s, &plan.service, Ok(&g.group)),
        Err(e) => policy::record_outcome(&s, &plan.service, Err(&protect::chain(e))),
    };
    if let Err(e) = recorded {
        tracing::warn!("{}", protect::chain(&e));
    }
    let report = r?;
    if a.json {
        return output::json(&report);
    }
    print_group(&report)
}

fn print_group(r: &GroupReport) -> anyhow::Result<()> {
    let vms = r
        .members
        .iter()
        .map(|m| m.vm.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    output::line(&format!("group       {}  (instant {})", r.group, r.instant))?;
    output::line(&format!(
        "paused      {:.1} ms across {vms} VM(s) ({})",
        r.blackout_ms,
        match r.pause {
            backup::Pause::Fsfreeze => "filesystems frozen",
            backup::Pause::Stop => "vCPUs stopped",
        }
    ))?;
    output::line(&format!(
        "{:<40} {:<12} {:>10} {:>10} {:>9}",
        "MEMBER", "MODE", "READ", "NEW", "PAUSED"
    ))?;
    for m in &r.members {
        output::line(&format!(
            "{:<40} {:<12} {:>10} {:>10} {:>6.1} ms",
            m.report.snapshot,
            m.report.mode,
            output::size(m.report.bytes_read),
            output::size(m.report.bytes_new),
            m.report.blackout_ms
        ))?;
        if let Some(reason) = &m.report.reason {
            output::line(&format!("    full: {reason}"))?;
        }
    }
    output::line(&format!("took        {:.2} s", r.seconds))
}

fn snapshots(a: SnapshotsArgs) -> anyhow::Result<()> {
    let plan = load(&a.plan)?;
    let s = open(&plan)?;
    let mut groups = s.groups(&plan.service)?;
    if let Some(at) = &a.at {
        let t = store::point::parse_time(at, store::snapshot::now_micros())?;
        groups = vec![s.resolve_group(&plan.service, None, Some(t))?];
    }
    // The newest drill of each group point (`drill --plan`).
    let drills = s.group_drill_records(&plan.service)?;
    let last_drill = |g: &store::group::GroupPoint| {
        let reference = g.reference();
        drills
            .iter()
            .filter(|(_, r)| r.snapshot == reference)
            .max_by_key(|(t, _)| *t)
            .map(|(_, r)| r.clone())
    };
    if a.json {
        let v: Vec<serde_json::Value> = groups
            .iter()
            .map(|g| {
                let mut v = serde_json::to_value(g).unwrap_or_default();
                v["group"] = g.reference().into();
                v["complete"] = policy::is_complete(&plan, g).into();
                v["last_drill"] = serde_json::to_value(last_drill(g)).unwrap_or_default();
                v
            })
            .collect();
        return output::json(&v);
    }
    output::line(&format!(
        "{:<36} {:<28} {:>9} {:>7}  MEMBERS",
        "GROUP", "INSTANT", "PAUSED", "DISKS"
    ))?;
    for g in &groups {
        let incomplete = if policy::is_complete(&plan, g) {
            ""
        } else {
            " (incomplete for this plan)"
        };
        let drill = match last_drill(g) {
            Some(d) if d.passed => format!(
                " (drill passed {}, RTO {:.1}s)",
                d.time,
                d.rto_seconds.unwrap_or(0.0)
            ),
            Some(d) => format!(" (drill FAILED {})", d.time),
            None => String::new(),
        };
        output::line(&format!(
            "{:<36} {:<28} {:>6.1} ms {:>7}  {}{incomplete}{drill}",
            g.reference(),
            g.instant,
            g.blackout_ms,
            g.members.len(),
            g.members
                .iter()
                .map(|m| m.snapshot.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ))?;
    }
    Ok(())
}

/// `check --plan`.
pub fn check(a: CheckArgs) -> anyhow::Result<()> {
    let plan = load(&a.plan)?;
    let s = open(&plan)?;
    let r = policy::check(&s, &plan, store::snapshot::now_micros())?;
    if a.json {
        output::json(&r)?;
    } else if r.ok {
        output::line(&format!(
            "OK: service {}: newest group point {} is {:.0} s old (RPO {:.0} s)",
            r.service,
            r.newest.as_deref().unwrap_or("-"),
            r.age_seconds.unwrap_or(0.0),
            r.rpo_seconds
        ))?;
    }
    if !r.ok {
        anyhow::bail!("Service {}: {}", r.service, r.problems.join("; "));
    }
    Ok(())
}

fn forget(a: ForgetArgs) -> anyhow::Result<()> {
    let plan = load(&a.plan)?;
    let s = open(&plan)?;
    let d = policy::forget(&s, &plan, a.dry_run)?;
    if a.json {
        return output::json(&d);
    }
    for g in &d {
        let what = match (g.decision.keep, a.dry_run) {
            (true, _) => format!("keep    ({})", g.decision.reasons.join(", ")),
            (false, true) => "would remove".into(),
            (false, false) => "removed".into(),
        };
        output::line(&format!("{:<36} {what}", g.decision.snapshot))?;
    }
    let removed = d.iter().filter(|g| !g.decision.keep).count();
    if removed > 0 && !a.dry_run {
        output::line(&format!(
            "{removed} group point(s) forgotten with their members; run gc to reclaim space"
        ))?;
    }
    Ok(())
}

/// After a group point: with `drill_every` in the plan and no successful
/// drill within it, drill `group` in a child `recovery-cli drill --plan`
/// (in the scheduler's thread: the next point waits for it, at most
/// `drill_timeout` per VM), and log its verdict. `check --plan` reports a
/// failed or overdue drill.
fn drill_if_due(plan: &Plan, group: &str) {
    if plan.drill_every.is_none() {
        return;
    }
    let due = open(plan)
        .and_then(|s| Ok(policy::drill_status(&s, plan, store::snapshot::now_micros())?.due));
    match due {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!("drill status: {e:#}");
            return;
        }
    }
    let _ = output::line(&format!("drill of {group}: due, starting"));
    let status = std::env::current_exe()
        .context("Failed to find recovery-cli")
        .and_then(|exe| {
            std::process::Command::new(exe)
                .args(["drill", "--plan"])
                .arg(&plan.path)
                .arg(group)
                .stdout(std::process::Stdio::null())
                .status()
                .context("Failed to run the drill")
        });
    let _ = output::line(&match status {
        Ok(s) if s.success() => format!("drill of {group}: passed"),
        Ok(s) => format!("drill of {group}: FAILED ({s}); see check --plan"),
        Err(e) => format!("drill of {group}: FAILED: {e:#}"),
    });
}

/// `protect --plan`: one log line per point; SIGTERM stops without a half
/// point.
pub fn protect(a: ProtectArgs) -> anyhow::Result<()> {
    if a.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    let plan = load(&a.plan)?;
    let stop = stop_flag()?;
    let json = a.json;
    let on_point = |o: &protect::PointOutcome| {
        let line = if json {
            serde_json::to_string(o).unwrap_or_default()
        } else {
            match (&o.report, &o.error) {
                (Some(r), _) => format!(
                    "point {} {} paused {:.1} ms, read {} in {:.2} s{}",
                    o.point,
                    r.group,
                    r.blackout_ms,
                    output::size(r.members.iter().map(|m| m.report.bytes_read).sum()),
                    r.seconds,
                    if o.forgotten.is_empty() {
                        String::new()
                    } else {
                        format!(", retention forgot {}", o.forgotten.join(" "))
                    }
                ),
                (None, Some(e)) => format!("point {} FAILED: {e}", o.point),
                (None, None) => format!("point {}", o.point),
            }
        };
        let _ = output::line(&line);
        if let Some(r) = &o.report {
            drill_if_due(&plan, &r.group);
        }
    };
    output::line(&format!(
        "protecting service {}: a group point every {:.0} s (RPO {:.0} s)",
        plan.service,
        plan.interval as f64 / 1e6,
        plan.rpo as f64 / 1e6
    ))?;
    let totals = protect::run(
        &plan,
        &protect::Options {
            stop: &stop,
            threads: a.threads,
            rate: a.rate.unwrap_or(Rate::Fixed(0)),
            max_points: a.points,
            on_point: &on_point,
            control: a.control.as_deref(),
        },
    )?;
    output::line(&format!(
        "stopped: {} point(s), {} failed",
        totals.points, totals.failures
    ))
}
