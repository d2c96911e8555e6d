//! `drill`: prove that a snapshot boots, and measure the RTO.
//!
//! `recovery-cli drill --store S SNAP --check CHECK... [--timeout 300s]
//! [--json] [-- EXTRA QEMU ARGS]`
//!
//! The drill is instant-boot in a sandbox: the daemon runs in this process
//! ([`daemon::Daemon`]) on a throwaway state dir in a temporary directory
//! (`recovery-drill-*`, so a leftover of a killed run is recognisable),
//! the guest's writes go to the throwaway overlay there, and QEMU
//! (`-accel tcg`) boots from its vhost-user socket with the serial console
//! written to a file, with no network unless a `tcp:` check asks for the
//! isolated user-mode one. The checks (`check`: `console:REGEX`, `qga`,
//! `tcp:PORT`, `exec:CMD`) must all pass within `--timeout`.
//!
//! Nothing of the drill stays behind, on every path (pass, fail, error,
//! Ctrl-C): QEMU is killed (and dies with us if we are killed: it is
//! spawned with a parent-death signal, `daemon::qemu`), the daemon is
//! stopped, its hold on the snapshot is released and the temporary
//! directory is removed. The store gains only a drill record
//! (`store::drill`), which `snapshots` shows.
//!
//! Times: `socket_ready_ms` is command start to the socket accepting
//! connections, `boot_seconds` QEMU start to the last check passing,
//! `rto_seconds` command start to the last check passing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use daemon::{Daemon, DaemonConfig, DeviceConfig, MigrationOptions, StopHandle};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use store::DrillRecord;
use tracing::{info, warn};

use super::{open_store, StoreArg};
use crate::output;
use check::{Check, Endpoints, ProbeState};

mod check;
pub mod group;
mod metrics;

/// The failure of a drill stopped by SIGINT or SIGTERM (not recorded).
const INTERRUPTED: &str = "interrupted";

/// Console lines shown when a drill fails.
const CONSOLE_TAIL_LINES: usize = 20;

/// Arguments of `drill`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot to boot: NAME, NAME@ID or ID.
    snapshot: String,
    /// A check that must pass: `console:REGEX` (a serial console line
    /// matches), `qga` (the guest agent answers guest-ping), `tcp:PORT`
    /// (the guest accepts a connection on PORT, forwarded from the host
    /// over an isolated user-mode network) or `exec:CMD` (`sh -c CMD`
    /// through the guest agent exits 0). Repeat for more; all must pass.
    #[arg(long = "check", value_name = "CHECK", required = true)]
    checks: Vec<String>,
    /// How long the checks may take (e.g. 300s, 5m, 90).
    #[arg(long, default_value = "300s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu_binary: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// Extra QEMU arguments (e.g. -kernel/-initrd/-append).
    #[arg(last = true, value_name = "QEMU ARGS")]
    qemu_args: Vec<String>,
}

/// Validated `drill` settings.
#[derive(Debug)]
pub struct Config {
    store: PathBuf,
    snapshot: String,
    checks: Vec<(String, Check)>,
    timeout: Duration,
    json: bool,
    qemu_binary: String,
    memory: u64,
    qemu_args: Vec<String>,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        if a.memory < 64 {
            bail!("--memory must be at least 64 (MiB)");
        }
        if a.timeout.is_zero() {
            bail!("--timeout must be more than 0");
        }
        let checks = a
            .checks
            .iter()
            .map(|s| Ok((s.clone(), Check::parse(s)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Config {
            store: a.store.store,
            snapshot: a.snapshot,
            checks,
            timeout: a.timeout,
            json: a.json,
            qemu_binary: a.qemu_binary,
            memory: a.memory,
            qemu_args: a.qemu_args,
        })
    }
}

/// `300s`, `5m`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 300s, 5m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("invalid duration {s:?}: use e.g. 300s, 5m or 1h")),
    };
    Ok(Duration::from_secs(secs))
}

/// The outcome of one check.
#[derive(Debug, Serialize)]
struct CheckResult {
    check: String,
    /// `console`, `qga`, `tcp` or `exec`.
    kind: &'static str,
    passed: bool,
    /// Command start to this check passing.
    #[serde(skip_serializing_if = "Option::is_none")]
    passed_after_seconds: Option<f64>,
    /// What passed it (the console line, the banner, the command's last
    /// output line) or why its last attempt failed.
    detail: String,
}

/// What `drill` reports.
#[derive(Debug, Serialize)]
struct Report {
    snapshot: String,
    passed: bool,
    checks: Vec<CheckResult>,
    rto_seconds: Option<f64>,
    socket_ready_ms: Option<u64>,
    boot_seconds: Option<f64>,
    /// Why the drill failed (timeout, QEMU exit, interrupted).
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// The last console lines, on failure.
    console_tail: Vec<String>,
}

/// One disk's daemon in the sandbox.
struct DaemonSlot {
    stop: StopHandle,
    thread: Option<thread::JoinHandle<daemon::Result<()>>>,
    /// The store and the daemon's hold on the snapshot (reference, holder).
    hold: Option<(Arc<store::Store>, String, String)>,
}

/// The sandbox: a daemon thread per disk and QEMU, torn down on drop
/// (every path).
struct Sandbox {
    daemons: Vec<DaemonSlot>,
    qemu: Option<Child>,
    /// Probe threads of the non-console checks, and their stop flag.
    probes: Vec<thread::JoinHandle<()>>,
    stop_probes: Arc<AtomicBool>,
}

impl Sandbox {
    fn kill_qemu(&mut self) {
        if let Some(mut child) = self.qemu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills QEMU (so probes blocked on its sockets return), joins the
    /// probes, stops the daemons, releases their holds.
    fn teardown(&mut self) -> anyhow::Result<()> {
        self.kill_qemu();
        self.stop_probes.store(true, Ordering::SeqCst);
        for p in self.probes.drain(..) {
            let _ = p.join();
        }
        let mut result = Ok(());
        for slot in &mut self.daemons {
            slot.stop.stop();
        }
        for slot in self.daemons.drain(..) {
            if let Some(t) = slot.thread {
                let r = match t.join() {
                    Ok(r) => r.context("The drill's daemon failed"),
                    Err(_) => Err(anyhow::anyhow!("The drill's daemon panicked")),
                };
                if result.is_ok() {
                    result = r;
                }
            }
            if let Some((store, reference, holder)) = slot.hold {
                if let Err(e) = store.remove_hold(&reference, &holder) {
                    warn!(error = %e, "failed to release the drill's hold; `recovery-cli release-hold` removes it");
                    if result.is_ok() {
                        result = Err(e).context("Failed to release the drill's hold");
                    }
                }
            }
        }
        result
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// SIGINT and SIGTERM set a flag while a drill runs (the drill then
/// stops and cleans up).
struct SignalFlag {
    interrupted: Arc<AtomicBool>,
    handle: signal_hook::iterator::Handle,
    thread: Option<thread::JoinHandle<()>>,
}

impl SignalFlag {
    fn install() -> anyhow::Result<SignalFlag> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let mut signals =
            Signals::new([SIGINT, SIGTERM]).context("Failed to install signal handlers")?;
        let handle = signals.handle();
        let flag = interrupted.clone();
        let thread = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    flag.store(true, Ordering::SeqCst);
                }
            })
            .context("Failed to start the signal thread")?;
        Ok(SignalFlag {
            interrupted,
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalFlag {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The drill's temporary directory (`recovery-drill-*`).
fn sandbox_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("recovery-drill-")
        .tempdir()
        .context("Failed to create the drill's temporary directory")
}

/// Run the drill.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let start = Instant::now();
    let store = Arc::new(open_store(&cfg.store)?);
    let signals = SignalFlag::install()?;
    let tmp = sandbox_dir()?;
    let boot = Boot {
        store: &cfg.store,
        snapshots: std::slice::from_ref(&cfg.snapshot),
        checks: &cfg.checks,
        deadline: start + cfg.timeout,
        timeout: cfg.timeout,
        qemu_binary: &cfg.qemu_binary,
        memory: cfg.memory,
        qemu_args: &cfg.qemu_args,
    };
    let result = boot_sandbox(&boot, &store, tmp.path(), start, &signals.interrupted)
        .and_then(|(mut sandbox, report, _)| sandbox.teardown().map(|()| report));
    drop(signals);
    let removed = tmp
        .close()
        .context("Failed to remove the drill's temporary directory");
    let report = result?;
    removed?;
    if report.failure.as_deref() == Some(INTERRUPTED) {
        // Not a verdict on the snapshot: no record.
        print_report(&report, cfg.json)?;
        bail!("Drill of {} interrupted", report.snapshot);
    }
    let record = DrillRecord {
        snapshot: String::new(),
        time: String::new(),
        passed: report.passed,
        rto_seconds: report.rto_seconds,
        checks: cfg.checks.iter().map(|(s, _)| s.clone()).collect(),
    };
    store
        .add_drill_record(&report.snapshot, &record)
        .context("Failed to record the drill")?;
    print_report(&report, cfg.json)?;
    if !report.passed {
        bail!(
            "Drill of {} failed: {}",
            report.snapshot,
            report.failure.as_deref().unwrap_or("a check failed")
        );
    }
    Ok(())
}

/// The sandbox daemon of one disk: throwaway state, no control socket,
/// no migration.
fn daemon_config(store: &Path, snapshot: &str, socket: &Path, state: &Path) -> DaemonConfig {
    DaemonConfig {
        store: store.to_path_buf(),
        snapshot: snapshot.to_owned(),
        socket: socket.to_path_buf(),
        socket_owner: None,
        state: state.to_path_buf(),
        cache_size: 256 << 20,
        device: DeviceConfig {
            num_queues: 1,
            ..DeviceConfig::default()
        },
        control: None,
        target: None,
        migration: MigrationOptions::default(),
        repair_from: None,
        log_interval: Duration::from_secs(3600),
        starts_guest: true,
    }
}

/// What one sandbox boots: one or more snapshots as the disks of one
/// guest (the first one boots), and the checks it must pass.
struct Boot<'a> {
    store: &'a Path,
    snapshots: &'a [String],
    checks: &'a [(String, Check)],
    /// When the checks have failed.
    deadline: Instant,
    /// For the failure message.
    timeout: Duration,
    qemu_binary: &'a str,
    memory: u64,
    qemu_args: &'a [String],
}

/// Boots the sandbox in `tmp` and runs the checks; returns the running
/// sandbox (the caller tears it down), the report (times from `start`)
/// and the reference of each disk's snapshot.
fn boot_sandbox(
    cfg: &Boot<'_>,
    store: &Arc<store::Store>,
    tmp: &Path,
    start: Instant,
    interrupted: &AtomicBool,
) -> anyhow::Result<(Sandbox, Report, Vec<String>)> {
    let console = tmp.join("console.log");
    let mut sandbox = Sandbox {
        daemons: Vec::new(),
        qemu: None,
        probes: Vec::new(),
        stop_probes: Arc::new(AtomicBool::new(false)),
    };
    let mut sockets = Vec::new();
    let mut references = Vec::new();
    for (i, snapshot) in cfg.snapshots.iter().enumerate() {
        let socket = tmp.join(format!("vhost{i}.sock"));
        let daemon_cfg =
            daemon_config(cfg.store, snapshot, &socket, &tmp.join(format!("state{i}")));
        let daemon = Daemon::start(&daemon_cfg)?;
        let reference = daemon.snapshot().reference();
        let holder = daemon.state_dir().holder().ok();
        let stop = daemon.stop_handle();
        let thread = thread::Builder::new()
            .name("drill-daemon".into())
            .spawn(move || daemon.run())
            .context("Failed to start the daemon thread")?;
        sandbox.daemons.push(DaemonSlot {
            stop,
            thread: Some(thread),
            hold: holder.map(|h| (store.clone(), reference.clone(), h)),
        });
        sockets.push(socket);
        references.push(reference);
    }
    let socket_ready_ms = start.elapsed().as_millis() as u64;
    let reference = references.first().cloned().unwrap_or_default();
    info!(snapshot = %reference, disks = references.len(), socket_ready_ms, "drill: daemon ready");

    let mut args = guest_args(&sockets, cfg.memory, &console);
    let endpoints = Endpoints::for_checks(cfg.checks.iter().map(|(_, c)| c), tmp)?;
    args.extend(endpoints.qemu_args());
    args.extend(cfg.qemu_args.iter().cloned());
    let qemu_log = std::fs::File::create(tmp.join("qemu.log"))
        .context("Failed to create the QEMU log file")?;
    // Spawned from this thread, which lives as long as the drill: QEMU
    // dies with us (parent-death signal). Its own process group: a Ctrl-C
    // at the terminal reaches only us, and we stop it.
    let qemu_started = Instant::now();
    sandbox.qemu = Some(
        daemon::qemu::spawn_tied(
            Command::new(cfg.qemu_binary)
                .args(&args)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(qemu_log),
        )
        .with_context(|| format!("Failed to start {}", cfg.qemu_binary))?,
    );

    let mut results: Vec<CheckResult> = cfg
        .checks
        .iter()
        .map(|(s, c)| CheckResult {
            check: s.clone(),
            kind: c.kind(),
            passed: false,
            passed_after_seconds: None,
            detail: match c {
                Check::Console(_) => "no console line matched".into(),
                _ => "not tried yet".into(),
            },
        })
        .collect();
    // One probe thread per non-console check; `None` for console checks.
    let qmp = check::SharedQmp::default();
    let mut probes: Vec<Option<Arc<std::sync::Mutex<ProbeState>>>> = Vec::new();
    for (_, c) in cfg.checks {
        if let Check::Console(_) = c {
            probes.push(None);
            continue;
        }
        let state = Arc::new(std::sync::Mutex::new(ProbeState::default()));
        sandbox.probes.push(check::spawn_probe(
            c.clone(),
            &endpoints,
            qmp.clone(),
            state.clone(),
            sandbox.stop_probes.clone(),
        )?);
        probes.push(Some(state));
    }
    let deadline = cfg.deadline;
    let mut failure = None;
    loop {
        let text = read_lossy(&console);
        for (((_, check), result), probe) in cfg.checks.iter().zip(&mut results).zip(&probes) {
            if result.passed {
                continue;
            }
            match (check, probe) {
                (Check::Console(re), _) => {
                    if let Some(line) = text.lines().find(|l| re.is_match(l)) {
                        result.passed = true;
                        result.passed_after_seconds = Some(start.elapsed().as_secs_f64());
                        result.detail = line.trim_end().to_string();
                    }
                }
                (_, Some(p)) => {
                    let p = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(at) = p.passed_at {
                        result.passed = true;
                        result.passed_after_seconds =
                            Some(at.saturating_duration_since(start).as_secs_f64());
                    }
                    if !p.detail.is_empty() {
                        result.detail = p.detail;
                    }
                }
                (_, None) => {}
            }
        }
        if results.iter().all(|r| r.passed) {
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            failure = Some(INTERRUPTED.to_string());
            break;
        }
        if let Some(child) = sandbox.qemu.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                // One last look: the guest may have printed and powered off.
                let text = read_lossy(&console);
                let late = cfg.checks.iter().zip(results.iter()).any(|((_, c), r)| {
                    matches!(c, Check::Console(re) if !r.passed && text.lines().any(|l| re.is_match(l)))
                });
                if !late {
                    let log = read_lossy(&tmp.join("qemu.log"));
                    let last = log.lines().last().unwrap_or("").trim().to_string();
                    failure = Some(match last.is_empty() {
                        true => format!("QEMU exited ({status}) before every check passed"),
                        false => {
                            format!("QEMU exited ({status}) before every check passed: {last}")
                        }
                    });
                    break;
                }
                continue;
            }
        }
        if Instant::now() >= deadline {
            failure = Some(format!(
                "timed out after {}s",
                cfg.timeout.as_secs_f64().round()
            ));
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let passed = failure.is_none();
    let last_pass = results
        .iter()
        .filter_map(|r| r.passed_after_seconds)
        .fold(0.0f64, f64::max);
    let console_tail = match passed {
        true => Vec::new(),
        false => {
            let text = read_lossy(&console);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..]
                .iter()
                .map(|l| l.trim_end().to_string())
                .collect()
        }
    };
    let boot_seconds =
        passed.then(|| (last_pass - qemu_started.duration_since(start).as_secs_f64()).max(0.0));
    // QEMU goes at once on failure (the caller tears down the rest).
    if !passed {
        sandbox.kill_qemu();
    }
    let report = Report {
        snapshot: reference,
        passed,
        checks: results,
        rto_seconds: passed.then_some(last_pass),
        socket_ready_ms: Some(socket_ready_ms),
        boot_seconds,
        failure,
        console_tail,
    };
    Ok((sandbox, report, references))
}

/// QEMU arguments of a guest (TCG, one vCPU, no default devices, no
/// reboot) whose disks are the vhost-user `sockets` (the first one boots),
/// its serial console written to `console`. The VM's own arguments
/// (kernel, checks' endpoints) go after them.
pub(super) fn guest_args(sockets: &[PathBuf], memory: u64, console: &Path) -> Vec<String> {
    let first = sockets
        .first()
        .map(|s| s.display().to_string())
        .unwrap_or_default();
    let mut args = super::instant_boot::qemu_args(&first, memory, 1);
    for (i, socket) in sockets.iter().enumerate().skip(1) {
        args.extend([
            "-chardev".to_owned(),
            format!("socket,id=vu{i},path={},reconnect=1", socket.display()),
            "-device".to_owned(),
            format!("vhost-user-blk-pci,chardev=vu{i},num-queues=1"),
        ]);
    }
    args.extend(
        [
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
        ]
        .map(String::from),
    );
    args.push(format!("file:{}", console.display()));
    args
}

/// `metrics --store`: the store's drill records as Prometheus text
/// (`metrics`).
pub fn metrics_text(store: &Path) -> anyhow::Result<String> {
    let store = open_store(store)?;
    let records = store
        .all_drill_records()
        .context("Failed to read the drill records")?;
    let services = store
        .all_group_drill_records()
        .context("Failed to read the group drill records")?;
    Ok(metrics::render(&records, &services))
}

/// The file's text (invalid UTF-8 replaced); empty if it cannot be read.
fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(r);
    }
    output::line(&format!(
        "Drill of {}: {}",
        r.snapshot,
        if r.passed { "PASSED" } else { "FAILED" }
    ))?;
    print_checks(r)?;
    if let Some(ms) = r.socket_ready_ms {
        output::line(&format!("Socket ready after {ms} ms"))?;
    }
    if let (Some(rto), Some(boot)) = (r.rto_seconds, r.boot_seconds) {
        output::line(&format!("RTO {rto:.1}s (boot {boot:.1}s)"))?;
    }
    if let Some(why) = &r.failure {
        output::line(&format!("Failure: {why}"))?;
        print_console_tail(r)?;
    }
    Ok(())
}

/// A line per check.
fn print_checks(r: &Report) -> anyhow::Result<()> {
    for c in &r.checks {
        let detail = match c.passed_after_seconds {
            Some(t) => format!(" after {t:.1}s: {}", c.detail),
            None => format!(": {}", c.detail),
        };
        output::line(&format!(
            "  {} {}{detail}",
            if c.passed { "pass" } else { "FAIL" },
            c.check
        ))?;
    }
    Ok(())
}

fn print_console_tail(r: &Report) -> anyhow::Result<()> {
    output::line("Console tail:")?;
    for l in &r.console_tail {
        output::line(&format!("  {l}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }
}
