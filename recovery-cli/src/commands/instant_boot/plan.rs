//! `instant-boot --plan`: bring a whole service back at one group point.
//!
//! `recovery-cli instant-boot --plan service.toml [GROUP_ID | --at TIME]
//! --state DIR --socket-dir DIR [--control P] [--copy-rate R] [--qemu]`
//!
//! One daemon process ([`daemon::service::Service`]) serves every disk of
//! every VM of the plan from the group point's member snapshots
//! (`<service>-<vm>-<drive>`, resolved like `drill --plan` does): one
//! vhost-user socket per disk at `SOCKET_DIR/<vm>-<drive>.sock`, one state
//! dir per disk at `STATE/<vm>-<drive>/`, each disk migrating to the
//! plan's `target` with its own copier under one service-wide copy-rate
//! limit, and one control socket (`SOCKET_DIR/control.sock` unless
//! `--control`) whose `status` has the totals and a report per disk.
//! Every disk must have a `target` in the plan: the service comes back
//! whole, onto its disks.
//!
//! With `--qemu`, the VMs start in `boot_order`, each once the previous
//! one's disks are being served (its guest has read from every one of
//! them; after two minutes without that, with a warning), with the QEMU
//! arguments `drill --plan` uses (TCG, the VM's
//! `drill_args`; console in `STATE/<vm>.console`, QEMU's stderr in
//! `STATE/<vm>.qemu.log`). The service stops once every guest has powered
//! off and every migration has finished, or at once when a QEMU fails.
//! Without `--qemu` it runs until SIGINT or SIGTERM. A restart with the
//! same `--state` resumes every disk.
//!
//! With `--protect [--protect-every 5s]`, the daemon protects every disk
//! and publishes a group point of the service every interval, its disks
//! cut at one instant (`daemon::service`'s `service-protect` thread).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use daemon::service::{DiskConfig, Running, Service, ServiceConfig};
use daemon::{DaemonConfig, DeviceConfig, MigrationOptions};
use serde::Serialize;
use service::Plan;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use crate::commands::drill::group::{boot_order, member_snapshots, PointArg};
use crate::commands::drill::guest_args;
use crate::commands::monitor::parse_rate;
use crate::output::{self, parse_size};

/// Arguments of `instant-boot --plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Service plan (TOML); every disk needs a `target`.
    #[arg(long, value_name = "PLAN")]
    pub plan: PathBuf,
    #[command(flatten)]
    pub point: PointArg,
    /// State directory: one subdirectory per disk, `DIR/<vm>-<drive>/`.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Existing directory for the vhost-user sockets, `DIR/<vm>-<drive>.sock`.
    #[arg(long, value_name = "DIR")]
    pub socket_dir: PathBuf,
    /// Control socket for the whole service (default: SOCKET_DIR/control.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Copy rate limit of the whole service, bytes per second (e.g. 100M);
    /// default unlimited.
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    pub copy_rate: Option<u64>,
    /// Chunks each disk's copier moves in parallel.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub copy_workers: usize,
    /// Virtqueues per disk.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub queues: usize,
    /// Chunk cache budget of the whole service (shared out between disks).
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    pub cache_size: u64,
    /// Seconds between progress log lines.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub log_interval: u64,
    /// Print the start-up information (and each VM started) as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Start every VM in boot order with its plan's `drill_args`.
    #[arg(long)]
    pub qemu: bool,
    /// QEMU binary for `--qemu`.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu_binary: String,
    /// Guest memory of each VM in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub memory: u64,
    /// Continuous protection of the whole service: every --protect-every,
    /// one cut across every disk at one instant, a point per disk (named
    /// like its member snapshot) and a group point of the service
    /// (`snapshots --plan`, `restore`, `instant-boot --plan GROUP`).
    #[arg(long)]
    pub protect: bool,
    /// Time between group points (at least 1s).
    #[arg(long, default_value = "5s", value_parser = super::parse_interval, value_name = "DURATION")]
    pub protect_every: Duration,
}

/// One disk, as announced.
#[derive(Debug, Serialize)]
struct ReadyDisk {
    disk: String,
    vm: String,
    drive: String,
    snapshot: String,
    socket: String,
    target: String,
    image_size: u64,
}

/// One VM, as announced.
#[derive(Debug, Serialize)]
struct ReadyVm {
    vm: String,
    boot_order: u32,
    /// `<vm>-<drive>` of each disk, the first one boots.
    disks: Vec<String>,
    qemu_args: Vec<String>,
}

/// What `instant-boot --plan` prints once every socket accepts connections.
#[derive(Debug, Serialize)]
struct Ready {
    service: String,
    group: String,
    control: String,
    copy_rate: u64,
    disks: Vec<ReadyDisk>,
    vms: Vec<ReadyVm>,
}

/// A VM of the plan, in boot order, with its disks' names and sockets.
struct VmPlan {
    name: String,
    boot_order: u32,
    disks: Vec<String>,
    sockets: Vec<PathBuf>,
    console: PathBuf,
    qemu_args: Vec<String>,
}

/// Run `instant-boot --plan`.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.memory < 64 {
        bail!("--memory must be at least 64 (MiB)");
    }
    if !(1..=16).contains(&a.queues) {
        bail!("--queues must be between 1 and 16, not {}", a.queues);
    }
    if !(1..=256).contains(&a.copy_workers) {
        bail!("--copy-workers must be between 1 and 256");
    }
    let plan = Plan::load(&a.plan)?;
    for (vm, disk) in plan.members() {
        let Some(target) = &disk.target else {
            bail!(
                "{}:{}: VM {} drive {} has no target: instant-boot --plan migrates every disk, add target = \"/path\" to it",
                plan.path.display(),
                disk.line,
                vm.name,
                disk.drive
            );
        };
        // Checked for every disk before any starts: a start that fails
        // half-way leaves the disks before it set up.
        let dir = target.parent().filter(|d| !d.as_os_str().is_empty());
        if !target.exists() && dir.is_some_and(|d| !d.is_dir()) {
            bail!(
                "{}:{}: the target of VM {} drive {} is in {}, which does not exist",
                plan.path.display(),
                disk.line,
                vm.name,
                disk.drive,
                dir.map(|d| d.display().to_string()).unwrap_or_default()
            );
        }
    }
    if !a.socket_dir.is_dir() {
        bail!(
            "Socket directory {} does not exist (create it first)",
            a.socket_dir.display()
        );
    }
    let point = a.point.resolve(&plan)?.1;

    // Everything the daemon creates is private to its user.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&a.state)
        .with_context(|| format!("Failed to create state dir {}", a.state.display()))?;
    let disk_count = plan.members().count().max(1) as u64;
    let mut disks = Vec::new();
    let mut vms = Vec::new();
    for vm in boot_order(&plan) {
        let snapshots = member_snapshots(vm, &point)?;
        let mut names = Vec::new();
        let mut sockets = Vec::new();
        for (d, snapshot) in vm.disks.iter().zip(snapshots) {
            let name = format!("{}-{}", vm.name, d.drive);
            let socket = a.socket_dir.join(format!("{name}.sock"));
            disks.push(DiskConfig {
                name: name.clone(),
                vm: vm.name.clone(),
                drive: d.drive.clone(),
                daemon: DaemonConfig {
                    store: plan.store.clone(),
                    snapshot,
                    socket: socket.clone(),
                    socket_owner: None,
                    state: a.state.join(&name),
                    cache_size: (a.cache_size / disk_count).max(16 << 20),
                    device: DeviceConfig {
                        num_queues: a.queues,
                        ..DeviceConfig::default()
                    },
                    control: None,
                    target: d.target.clone(),
                    migration: MigrationOptions {
                        workers: a.copy_workers,
                        ..MigrationOptions::default()
                    },
                    repair_from: None,
                    log_interval: Duration::from_secs(a.log_interval.max(1)),
                    starts_guest: a.qemu,
                },
            });
            names.push(name);
            sockets.push(socket);
        }
        let console = a.state.join(format!("{}.console", vm.name));
        let mut qemu_args = guest_args(&sockets, a.memory, &console);
        qemu_args.extend(vm.drill_args.iter().cloned());
        vms.push(VmPlan {
            name: vm.name.clone(),
            boot_order: vm.boot_order,
            disks: names,
            sockets,
            console,
            qemu_args,
        });
    }
    let cfg = ServiceConfig {
        service: plan.service.clone(),
        group: point.reference(),
        disks,
        control: a
            .control
            .clone()
            .unwrap_or_else(|| a.socket_dir.join("control.sock")),
        copy_rate: a.copy_rate.unwrap_or(0),
        log_interval: Duration::from_secs(a.log_interval.max(1)),
        protect: a.protect.then_some(daemon::ProtectConfig {
            name: None,
            interval: a.protect_every,
        }),
    };

    // Handlers go in before anything is announced.
    let signals = Signals::new([SIGINT, SIGTERM]).context("Failed to install signal handlers")?;
    let signal_handle = signals.handle();
    let service = Service::start(&cfg)?;
    let ready = ready(&service, &cfg, &plan, &vms);
    print_ready(&ready, a.json)?;
    info!(service = %cfg.service, group = %cfg.group, disks = ready.disks.len(), "serving");
    let running = service.serve()?;
    let stop = running.stop_handle();
    let signal_thread = super::on_signal(signals, move || stop.stop())?;

    let qemu_failed = match a.qemu {
        true => run_vms(&running, &vms, &a),
        false => None,
    };
    let result = running.wait();
    signal_handle.close();
    let _ = signal_thread.join();
    result?;
    if let Some(why) = qemu_failed {
        bail!(why);
    }
    info!("stopped cleanly");
    Ok(())
}

fn ready(service: &Service, cfg: &ServiceConfig, plan: &Plan, vms: &[VmPlan]) -> Ready {
    let disks = service
        .disks()
        .map(|(name, d)| {
            let (vm, drive) = plan
                .members()
                .find(|(vm, disk)| format!("{}-{}", vm.name, disk.drive) == name)
                .map(|(vm, disk)| (vm.name.clone(), disk.drive.clone()))
                .unwrap_or_default();
            let target = cfg
                .disks
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.daemon.target.as_ref())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            ReadyDisk {
                disk: name.to_owned(),
                vm,
                drive,
                snapshot: d.snapshot().reference(),
                socket: d.socket().display().to_string(),
                target,
                image_size: d.snapshot().image_size,
            }
        })
        .collect();
    Ready {
        service: cfg.service.clone(),
        group: cfg.group.clone(),
        control: service.control_socket().display().to_string(),
        copy_rate: cfg.copy_rate,
        disks,
        vms: vms
            .iter()
            .map(|v| ReadyVm {
                vm: v.name.clone(),
                boot_order: v.boot_order,
                disks: v.disks.clone(),
                qemu_args: v.qemu_args.clone(),
            })
            .collect(),
    }
}

fn print_ready(r: &Ready, json: bool) -> anyhow::Result<()> {
    if json {
        let s = serde_json::to_string(r).context("Failed to encode JSON")?;
        return output::line(&s);
    }
    output::line(&format!(
        "Serving {} ({} disks of {} VMs) on one daemon",
        r.group,
        r.disks.len(),
        r.vms.len()
    ))?;
    for d in &r.disks {
        output::line(&format!(
            "  {} ({}, {}) on {}, migrating to {}",
            d.disk,
            d.snapshot,
            output::size(d.image_size),
            d.socket,
            d.target
        ))?;
    }
    output::line(&format!(
        "Control socket {} (recovery-cli status --control {} --watch)",
        r.control, r.control
    ))?;
    output::line("")?;
    output::line("Start the VMs in boot order with (what --qemu runs):")?;
    for v in &r.vms {
        output::line(&format!(
            "  {} (boot order {}): qemu-system-x86_64 {}",
            v.vm,
            v.boot_order,
            super::shell_words(&v.qemu_args)
        ))?;
    }
    output::line("")?;
    output::line("Press Ctrl-C to stop (every disk is flushed first).")
}

/// How long `--qemu` waits for a VM to read from every disk before it
/// starts the next VM anyway (a guest stuck in its firmware must not hold
/// the service back for ever).
const BOOT_WAIT: Duration = Duration::from_secs(120);

/// A VM's QEMU.
struct Guest<'a> {
    vm: &'a VmPlan,
    child: Child,
    exited: bool,
}

/// `--qemu`: starts the VMs in boot order, each once the previous one's
/// disks are being served, then stops the service when every guest has
/// powered off and every migration has finished. Runs on the main thread,
/// which lives as long as the service: the QEMUs die with it
/// (parent-death signal). Returns why a QEMU failed, if one did.
fn run_vms(running: &Running, vms: &[VmPlan], a: &Args) -> Option<String> {
    let stop = running.stop_handle();
    let mut guests: Vec<Guest<'_>> = Vec::new();
    let mut failure = None;
    'boot: for vm in vms {
        if let Some(prev) = guests.last().map(|g| g.vm) {
            info!(vm = %vm.name, after = %prev.name, "waiting for the previous VM's disks to be served");
            let deadline = Instant::now() + BOOT_WAIT;
            while !served(running, &prev.disks) {
                if Instant::now() >= deadline {
                    warn!(vm = %vm.name, after = %prev.name, waited_secs = BOOT_WAIT.as_secs(), "the previous VM has not read all its disks yet; starting this one anyway");
                    break;
                }
                failure = failure.or_else(|| reap(running, &mut guests));
                if failure.is_some() || stop.is_stopped() {
                    break 'boot;
                }
                if guests.last().is_some_and(|g| g.exited) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        match spawn_vm(vm, running, a) {
            Ok(child) => {
                announce(vm, child.id(), a.json);
                guests.push(Guest {
                    vm,
                    child,
                    exited: false,
                });
            }
            Err(e) => {
                failure = Some(format!("{e:#}"));
                break;
            }
        }
    }
    while failure.is_none() && !stop.is_stopped() {
        failure = reap(running, &mut guests);
        if guests.iter().all(|g| g.exited) && running.migrations_finished(Duration::ZERO) {
            let status = running.status().status();
            if status.state == control::State::Failed {
                failure = Some(format!(
                    "Migration failed: {}",
                    status.error.as_deref().unwrap_or("no reason given")
                ));
            }
            info!("every guest powered off and every migration finished");
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.stop();
    for g in guests.iter_mut().filter(|g| !g.exited) {
        warn!(vm = %g.vm.name, "service stopping: terminating QEMU");
        let _ = g.child.kill();
        let _ = g.child.wait();
        clear_guest(running, g.vm);
    }
    failure
}

/// Whether every one of `disks` has served its guest (read from).
fn served(running: &Running, disks: &[String]) -> bool {
    let status = running.status().status();
    disks.iter().all(|name| {
        status
            .disks
            .iter()
            .any(|d| &d.disk == name && d.status.guest_read_ops > 0)
    })
}

/// Notes the guests that exited; the first failure (non-zero exit or a
/// signal), with QEMU's last stderr line.
fn reap(running: &Running, guests: &mut [Guest<'_>]) -> Option<String> {
    let mut failure = None;
    for g in guests.iter_mut().filter(|g| !g.exited) {
        let status = match g.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => continue,
            Err(e) => {
                g.exited = true;
                failure.get_or_insert(format!("Lost track of VM {}'s QEMU: {e}", g.vm.name));
                continue;
            }
        };
        g.exited = true;
        clear_guest(running, g.vm);
        info!(vm = %g.vm.name, %status, "QEMU exited");
        if !status.success() {
            let log = std::fs::read_to_string(qemu_log(g.vm)).unwrap_or_default();
            let last = log.lines().last().unwrap_or("").trim().to_owned();
            failure.get_or_insert(match last.is_empty() {
                true => format!("VM {}: QEMU exited ({status})", g.vm.name),
                false => format!("VM {}: QEMU exited ({status}): {last}", g.vm.name),
            });
        }
    }
    failure
}

/// QEMU's stderr log of `vm`, next to its console.
fn qemu_log(vm: &VmPlan) -> PathBuf {
    vm.console.with_extension("qemu.log")
}

/// Starts `vm`'s QEMU, recorded in each of its disks' state dirs.
fn spawn_vm(vm: &VmPlan, running: &Running, a: &Args) -> anyhow::Result<Child> {
    let log = std::fs::File::create(qemu_log(vm))
        .with_context(|| format!("Failed to create VM {}'s QEMU log", vm.name))?;
    let child = daemon::qemu::spawn_tied(
        Command::new(&a.qemu_binary)
            .args(&vm.qemu_args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )
    .with_context(|| format!("Failed to start {} for VM {}", a.qemu_binary, vm.name))?;
    for name in &vm.disks {
        if let Some(state) = running.state_dir(name) {
            if let Err(e) = state.record_guest(child.id()) {
                warn!(disk = %name, error = %e, "failed to record the QEMU in the state dir");
            }
        }
    }
    Ok(child)
}

fn clear_guest(running: &Running, vm: &VmPlan) {
    for name in &vm.disks {
        if let Some(state) = running.state_dir(name) {
            state.clear_guest();
        }
    }
}

/// A VM started: a JSON line with `--json`, a plain one otherwise.
fn announce(vm: &VmPlan, pid: u32, json: bool) {
    let line = match json {
        true => serde_json::json!({
            "vm_started": vm.name,
            "boot_order": vm.boot_order,
            "pid": pid,
            "console": vm.console.display().to_string(),
        })
        .to_string(),
        false => format!(
            "Started VM {} (boot order {}, QEMU PID {pid}, console {})",
            vm.name,
            vm.boot_order,
            vm.console.display()
        ),
    };
    if let Err(e) = output::line(&line) {
        warn!(error = %e, "failed to announce a VM");
    }
    info!(vm = %vm.name, pid, sockets = ?vm.sockets, "VM started");
}
