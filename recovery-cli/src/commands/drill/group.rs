//! `drill --plan`: boot a whole service at one group point and measure
//! the service RTO.
//!
//! `recovery-cli drill --plan service.toml [GROUP_ID | --at TIME] [--json]`
//!
//! Every VM of the plan boots in a sandbox of its own (the single-snapshot
//! drill's `super::boot_sandbox`: one throwaway daemon per disk, the
//! group point's member snapshots `<service>-<vm>-<drive>` as the disks,
//! QEMU with the VM's `drill_args`), in `boot_order`: a VM starts once the
//! previous one passed its checks, and stays up until the whole service
//! has been tried. Each VM has `drill_timeout` for its checks. The first
//! VM that fails ends the drill (the rest are reported as not started).
//!
//! The service RTO is the command's start to the last VM's last check
//! passing. Records: one per member snapshot (that VM's verdict and RTO)
//! and one for the group point ([`store::Store::add_group_drill_record`]),
//! which `check --plan` (`drill_every`), `snapshots --plan` and `metrics`
//! read. Nothing stays behind: every sandbox is torn down and the
//! temporary directory removed on every path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use service::Plan;
use store::DrillRecord;

use super::{
    boot_sandbox, print_checks, print_console_tail, Boot, Check, Report, Sandbox, SignalFlag,
    INTERRUPTED,
};
use crate::output;

/// Arguments of `drill --plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service plan (TOML) with `checks` per VM.
    #[arg(long, value_name = "PLAN")]
    pub plan: PathBuf,
    #[command(flatten)]
    pub point: PointArg,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu_binary: String,
    /// Guest memory of each VM in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory: u64,
}

/// `[GROUP_ID | --at TIME]`: which group point of the plan's service.
#[derive(Debug, clap::Args)]
pub struct PointArg {
    /// Group point: ID or SERVICE@ID (default: the newest).
    pub group: Option<String>,
    /// The newest group point at or before TIME (RFC 3339, or -10m, -2h).
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        conflicts_with = "group"
    )]
    pub at: Option<String>,
}

impl PointArg {
    /// Opens the plan's store and finds the group point.
    pub fn resolve(&self, plan: &Plan) -> anyhow::Result<(store::Store, store::group::GroupPoint)> {
        let store = store::Store::open(&plan.store)
            .with_context(|| format!("Failed to open store {}", plan.store.display()))?;
        let at = self
            .at
            .as_deref()
            .map(|t| store::point::parse_time(t, store::snapshot::now_micros()))
            .transpose()?;
        let point = store.resolve_group(&plan.service, self.group.as_deref(), at)?;
        Ok((store, point))
    }
}

/// One VM's outcome.
#[derive(Debug, Serialize)]
struct VmReport {
    vm: String,
    boot_order: u32,
    /// `NAME@ID` of each disk's member snapshot.
    disks: Vec<String>,
    /// `None`: not started (an earlier VM failed).
    #[serde(flatten)]
    report: Option<Report>,
}

/// What `drill --plan` reports.
#[derive(Debug, Serialize)]
struct GroupReport {
    group: String,
    passed: bool,
    /// Command start to the last VM passing.
    rto_seconds: Option<f64>,
    vms: Vec<VmReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
}

/// Run `drill --plan`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    if a.memory < 64 {
        bail!("--memory must be at least 64 (MiB)");
    }
    let plan = Plan::load(&a.plan)?;
    let (store, point) = a.point.resolve(&plan)?;
    let store = Arc::new(store);
    let report = drill_group(&plan, &store, &point, &a, start)?;
    if report.failure.as_deref() == Some(INTERRUPTED) {
        print(&report, a.json)?;
        bail!("Drill of {} interrupted", report.group);
    }
    record(&plan, &store, &point, &report)?;
    print(&report, a.json)?;
    if !report.passed {
        bail!(
            "Drill of {} failed: {}",
            report.group,
            report.failure.as_deref().unwrap_or("a check failed")
        );
    }
    Ok(())
}

/// The plan's VMs in boot order (stable: plan order within a level), with
/// their checks parsed and each disk's member snapshot in `point`.
#[allow(clippy::type_complexity)]
fn vms_in_order<'a>(
    plan: &'a Plan,
    point: &store::group::GroupPoint,
) -> anyhow::Result<Vec<(&'a service::plan::Vm, Vec<(String, Check)>, Vec<String>)>> {
    boot_order(plan)
        .into_iter()
        .map(|vm| {
            if vm.checks.is_empty() {
                bail!(
                    "VM {} has no checks in plan {}: add e.g. checks = [\"console:login:\"]",
                    vm.name,
                    plan.path.display()
                );
            }
            let checks = vm
                .checks
                .iter()
                .map(|s| Ok((s.clone(), Check::parse(s)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((vm, checks, member_snapshots(vm, point)?))
        })
        .collect()
}

/// The plan's VMs in boot order (stable: plan order within a level).
pub(crate) fn boot_order(plan: &Plan) -> Vec<&service::plan::Vm> {
    let mut vms: Vec<_> = plan.vms.iter().collect();
    vms.sort_by_key(|v| v.boot_order);
    vms
}

/// The member snapshot in `point` of each of `vm`'s disks, in the plan's
/// order.
pub(crate) fn member_snapshots(
    vm: &service::plan::Vm,
    point: &store::group::GroupPoint,
) -> anyhow::Result<Vec<String>> {
    vm.disks
        .iter()
        .map(|d| {
            point
                .members
                .iter()
                .find(|m| m.vm == vm.name && m.drive == d.drive)
                .map(|m| m.snapshot.clone())
                .with_context(|| {
                    format!(
                        "Group point {} has no member for VM {} drive {}",
                        point.reference(),
                        vm.name,
                        d.drive
                    )
                })
        })
        .collect()
}

fn drill_group(
    plan: &Plan,
    store: &Arc<store::Store>,
    point: &store::group::GroupPoint,
    a: &Args,
    start: Instant,
) -> anyhow::Result<GroupReport> {
    let vms = vms_in_order(plan, point)?;
    let signals = SignalFlag::install()?;
    let tmp = super::sandbox_dir()?;
    let timeout = Duration::from_micros(plan.drill_timeout as u64);
    let mut sandboxes: Vec<Sandbox> = Vec::new();
    let mut reports = Vec::new();
    let mut failure = None;
    let mut result = Ok(());
    for (i, (vm, checks, disks)) in vms.iter().enumerate() {
        if failure.is_some() || result.is_err() {
            reports.push(VmReport {
                vm: vm.name.clone(),
                boot_order: vm.boot_order,
                disks: disks.clone(),
                report: None,
            });
            continue;
        }
        let dir = tmp.path().join(format!("{i}-{}", vm.name));
        let booted = std::fs::create_dir(&dir)
            .context("Failed to create a VM's sandbox directory")
            .and_then(|()| {
                let boot = Boot {
                    store: &plan.store,
                    snapshots: disks,
                    checks,
                    deadline: Instant::now() + timeout,
                    timeout,
                    qemu_binary: &a.qemu_binary,
                    memory: a.memory,
                    qemu_args: &vm.drill_args,
                };
                boot_sandbox(&boot, store, &dir, start, &signals.interrupted)
            });
        match booted {
            Ok((sandbox, report, refs)) => {
                sandboxes.push(sandbox);
                if !report.passed {
                    failure = Some(match report.failure.as_deref() {
                        Some(INTERRUPTED) => INTERRUPTED.to_owned(),
                        Some(why) => format!("VM {}: {why}", vm.name),
                        None => format!("VM {}: a check failed", vm.name),
                    });
                }
                reports.push(VmReport {
                    vm: vm.name.clone(),
                    boot_order: vm.boot_order,
                    disks: refs,
                    report: Some(report),
                });
            }
            Err(e) => result = Err(e.context(format!("Failed to boot VM {}", vm.name))),
        }
    }
    // Tear down in reverse boot order, then the directory.
    for mut s in sandboxes.into_iter().rev() {
        let r = s.teardown();
        if result.is_ok() {
            result = r;
        }
    }
    drop(signals);
    let removed = tmp
        .close()
        .context("Failed to remove the drill's temporary directory");
    result?;
    removed?;
    let passed = failure.is_none();
    let rto_seconds = passed.then(|| {
        reports
            .iter()
            .filter_map(|r| r.report.as_ref()?.rto_seconds)
            .fold(0.0f64, f64::max)
    });
    Ok(GroupReport {
        group: point.reference(),
        passed,
        rto_seconds,
        vms: reports,
        failure,
    })
}

/// A record per member snapshot of each VM that was tried, and one for
/// the group point.
fn record(
    plan: &Plan,
    store: &store::Store,
    point: &store::group::GroupPoint,
    r: &GroupReport,
) -> anyhow::Result<()> {
    let mut all_checks = Vec::new();
    for v in &r.vms {
        let checks = plan
            .vms
            .iter()
            .find(|p| p.name == v.vm)
            .map(|p| p.checks.clone())
            .unwrap_or_default();
        all_checks.extend(checks.iter().map(|c| format!("{}:{c}", v.vm)));
        let Some(report) = &v.report else { continue };
        let record = DrillRecord {
            snapshot: String::new(),
            time: String::new(),
            passed: report.passed,
            rto_seconds: report.rto_seconds,
            checks,
        };
        for disk in &v.disks {
            store
                .add_drill_record(disk, &record)
                .context("Failed to record the drill")?;
        }
    }
    let record = DrillRecord {
        snapshot: String::new(),
        time: String::new(),
        passed: r.passed,
        rto_seconds: r.rto_seconds,
        checks: all_checks,
    };
    store
        .add_group_drill_record(point, &record)
        .context("Failed to record the group drill")?;
    Ok(())
}

fn print(r: &GroupReport, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(r);
    }
    output::line(&format!(
        "Drill of {}: {}",
        r.group,
        if r.passed { "PASSED" } else { "FAILED" }
    ))?;
    for v in &r.vms {
        let Some(report) = &v.report else {
            output::line(&format!(
                "VM {} (boot order {}): not started",
                v.vm, v.boot_order
            ))?;
            continue;
        };
        output::line(&format!(
            "VM {} (boot order {}, {}): {}{}",
            v.vm,
            v.boot_order,
            v.disks.join(" "),
            if report.passed { "passed" } else { "FAILED" },
            report
                .rto_seconds
                .map(|t| format!(", RTO {t:.1}s"))
                .unwrap_or_default()
        ))?;
        print_checks(report)?;
        if !report.passed {
            print_console_tail(report)?;
        }
    }
    if let Some(rto) = r.rto_seconds {
        output::line(&format!("Service RTO {rto:.1}s"))?;
    }
    if let Some(why) = &r.failure {
        output::line(&format!("Failure: {why}"))?;
    }
    Ok(())
}
