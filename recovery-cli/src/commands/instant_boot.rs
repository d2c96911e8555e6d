//! `instant-boot`: serve a snapshot as a vhost-user-blk device.
//!
//! The daemon binds its socket before it prints anything, so the QEMU
//! arguments it prints work the moment they appear. SIGINT and SIGTERM
//! stop it cleanly: the device is flushed and the socket removed. With
//! `--qemu` it also launches QEMU itself and stops when QEMU exits; it
//! exits non-zero, with QEMU's last error line, when QEMU fails or is
//! killed. That QEMU dies with the daemon (parent-death signal) and is
//! recorded in the state dir, so a restart never starts a second guest on
//! the same overlay while it runs (`daemon::qemu`).
//!
//! `--repair-from SNAPSHOT` (with `--target`) finishes a migration that
//! would stop on damaged chunks by taking those chunks from another backup
//! of the same image. It is never implied: the repaired data is older or
//! newer than the booted snapshot, so the operator chooses it.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use daemon::{
    Daemon, DaemonConfig, DeviceConfig, MigratingDevice, MigrationOptions, ProtectConfig,
    SocketOwner, StopHandle, MAX_IO_THREADS, SERIAL_BYTES,
};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use super::monitor::parse_rate;
use super::StoreArg;
use crate::output::{self, parse_size};

pub mod plan;

/// Arguments of `instant-boot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    remote: RemoteStoreArgs,
    /// Snapshot to serve: NAME, NAME@ID or ID.
    snapshot: String,
    /// Point in time: serve the newest snapshot of image SNAPSHOT (a NAME)
    /// at or before TIME: RFC 3339 (2026-12-06T11:05:03Z) or relative (-10m).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    at: Option<String>,
    /// vhost-user socket to create (mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Give the vhost-user socket to this user (mode 0600), or to USER and
    /// GROUP (mode 0660), before anyone can connect: libvirt's QEMU runs as
    /// `libvirt-qemu`. The control socket stays with the daemon's user.
    #[arg(long, value_name = "USER[:GROUP]")]
    socket_owner: Option<SocketOwner>,
    /// State directory: the overlay with the guest's writes and migration progress.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// Refuse guest writes (the device reports VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// Number of virtqueues, one worker thread each (default: cores, at most 16).
    #[arg(long, value_name = "N")]
    queues: Option<usize>,
    /// Threads running slow requests (large reads, cold chunks, flushes) for
    /// all queues; 0 runs every request on its queue's thread
    /// (default: four per CPU, 8 to 32).
    #[arg(long, value_name = "N")]
    io_threads: Option<usize>,
    /// Chunk cache budget.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    cache_size: u64,
    /// Serial number the guest sees (GET_ID), at most 20 bytes; default:
    /// the snapshot id's 20 digits (unique per snapshot).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
    /// Control socket for status, pause, resume and set-rate (default: STATE/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Migrate the disk to this raw file (created sparse if missing) or block device.
    #[arg(long, value_name = "PATH")]
    target: Option<PathBuf>,
    /// Copy rate limit in bytes per second (e.g. 100M); default unlimited.
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    copy_rate: Option<u64>,
    /// Chunks the copier moves in parallel.
    #[arg(long, default_value_t = 16, value_name = "N")]
    copy_workers: usize,
    /// Hash the target against snapshot + overlay before completing.
    #[arg(long)]
    verify: bool,
    /// Take chunks the served snapshot cannot deliver (corrupt, missing) from
    /// this other backup of the same image (NAME@ID or ID), so the migration
    /// completes; the guest's own writes are kept. Every repaired chunk is logged.
    #[arg(long, value_name = "SNAPSHOT")]
    repair_from: Option<String>,
    /// Continuous protection: write a protection point of the disk the
    /// guest sees into the store every --protect-every (changed chunks
    /// only; `restore --at` picks one by time).
    #[arg(long)]
    protect: bool,
    /// Time between protection points (at least 1s).
    #[arg(long, default_value = "5s", value_parser = parse_interval, value_name = "DURATION")]
    protect_every: Duration,
    /// Image name of the protection points (default: the snapshot's image name).
    #[arg(long, value_name = "NAME")]
    protect_name: Option<String>,
    /// Seconds between progress log lines.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    log_interval: u64,
    /// Print the start-up information as JSON.
    #[arg(long)]
    json: bool,
    /// Launch QEMU attached to the socket; arguments after `--` are passed to it.
    #[arg(long)]
    qemu: bool,
    /// QEMU binary for `--qemu`.
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    qemu_binary: String,
    /// Guest memory in MiB for the printed and launched QEMU arguments.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// Extra QEMU arguments (with `--qemu`).
    #[arg(last = true, value_name = "QEMU ARGS")]
    qemu_args: Vec<String>,
}

/// How a daemon reaches a remote (`s3://`) store; no effect on a local one.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteStoreArgs {
    /// Retry time of an S3 store: a request that keeps failing (5xx,
    /// throttling, a slow or dead endpoint) is retried this long, then the
    /// guest's read gets an I/O error instead of hanging; reported in
    /// status (default: RECOVERY_S3_TIMEOUT seconds, else 60s).
    #[arg(long, value_parser = parse_retry_time, value_name = "DURATION")]
    store_retry_time: Option<Duration>,
    /// Bound of the on-disk chunk cache of an S3 store, under --cache-dir:
    /// chunks fetched once are read from local disk afterwards (default
    /// 1G; 0 turns it off).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    disk_cache_size: Option<u64>,
}

impl RemoteStoreArgs {
    /// Make these the defaults of every store this process opens.
    pub fn apply(&self) {
        if let Some(t) = self.store_retry_time {
            store::location::set_default_retry_time(t);
        }
        if let Some(n) = self.disk_cache_size {
            store::location::set_default_disk_cache_bytes(n);
        }
    }
}

/// Parses a retry time (`30s`, `2m`), at least 1s.
fn parse_retry_time(s: &str) -> Result<Duration, String> {
    let micros = store::point::parse_duration(s).map_err(|e| e.to_string())?;
    let d = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    if d < Duration::from_secs(1) {
        return Err(format!("{s} is shorter than the minimum retry time of 1s"));
    }
    Ok(d)
}

/// Parses a protection interval (`5s`, `1m`, `1h30m`), at least 1s.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let micros = store::point::parse_duration(s).map_err(|e| e.to_string())?;
    let d = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    if d < daemon::protect::MIN_INTERVAL {
        return Err(format!("{s} is shorter than the minimum interval of 1s"));
    }
    Ok(d)
}

/// Validated `instant-boot` settings.
#[derive(Debug)]
pub struct Config {
    daemon: DaemonConfig,
    protect: Option<ProtectConfig>,
    json: bool,
    qemu: Option<QemuLaunch>,
    memory: u64,
}

#[derive(Debug)]
struct QemuLaunch {
    binary: String,
    extra: Vec<String>,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        a.remote.apply();
        let snapshot = snapshot_at(&a.store.store, &a.snapshot, a.at.as_deref())?;
        let queues = a.queues.unwrap_or_else(DeviceConfig::default_num_queues);
        if !(1..=16).contains(&queues) {
            bail!("--queues must be between 1 and 16, not {queues}");
        }
        let io_threads = a
            .io_threads
            .unwrap_or_else(DeviceConfig::default_io_threads);
        if io_threads > MAX_IO_THREADS {
            bail!("--io-threads must be between 0 and {MAX_IO_THREADS}, not {io_threads}");
        }
        if a.memory < 64 {
            bail!("--memory must be at least 64 (MiB)");
        }
        if let Some(serial) = &a.serial {
            if serial.len() > SERIAL_BYTES {
                bail!(
                    "--serial {serial:?} is {} bytes; a virtio-blk serial holds at most {SERIAL_BYTES}",
                    serial.len()
                );
            }
        }
        if let Some(total) = mem_total() {
            if a.cache_size > total {
                bail!(
                    "--cache-size {} is more than this machine's memory ({})",
                    output::size(a.cache_size),
                    output::size(total)
                );
            }
        }
        if !a.qemu && !a.qemu_args.is_empty() {
            bail!("extra QEMU arguments need --qemu");
        }
        if a.target.is_none() && (a.copy_rate.is_some() || a.verify || a.repair_from.is_some()) {
            bail!("--copy-rate, --verify and --repair-from need --target");
        }
        if !a.protect && a.protect_name.is_some() {
            bail!("--protect-name needs --protect");
        }
        if !(1..=256).contains(&a.copy_workers) {
            bail!("--copy-workers must be between 1 and 256");
        }
        if a.read_only && a.target.is_some() {
            bail!("--read-only cannot be combined with --target: the migrated disk is the guest's");
        }
        let migration = MigrationOptions {
            copy_rate: a.copy_rate.unwrap_or(0),
            workers: a.copy_workers,
            verify: a.verify,
            ..MigrationOptions::default()
        };
        let device = DeviceConfig {
            num_queues: queues,
            io_threads,
            read_only: a.read_only,
            serial: a.serial.unwrap_or_default(),
            ..DeviceConfig::default()
        };
        Ok(Config {
            daemon: DaemonConfig {
                store: a.store.store,
                snapshot,
                socket: a.socket,
                socket_owner: a.socket_owner,
                state: a.state,
                cache_size: a.cache_size,
                device,
                control: a.control,
                target: a.target,
                migration,
                repair_from: a.repair_from,
                log_interval: Duration::from_secs(a.log_interval.max(1)),
                starts_guest: a.qemu,
            },
            protect: a.protect.then(|| ProtectConfig {
                name: a.protect_name.clone(),
                interval: a.protect_every,
            }),
            json: a.json,
            qemu: a.qemu.then_some(QemuLaunch {
                binary: a.qemu_binary,
                extra: a.qemu_args,
            }),
            memory: a.memory,
        })
    }
}

/// `MemTotal` of `/proc/meminfo` in bytes.
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What `instant-boot` (and `serve`) prints once the socket accepts
/// connections.
#[derive(Debug, Serialize)]
pub(super) struct Ready {
    pub(super) socket: String,
    pub(super) control: String,
    pub(super) target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) repair_from: Option<String>,
    pub(super) snapshot: String,
    pub(super) image_size: u64,
    pub(super) queues: usize,
    pub(super) read_only: bool,
    pub(super) qemu_args: Vec<String>,
    pub(super) libvirt_xml: String,
    /// With protection: the image name of the points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) protection: Option<String>,
}

/// QEMU arguments that attach a vhost-user-blk socket with shared guest RAM.
/// `reconnect=1`: if the daemon restarts (upgrade, crash), QEMU reconnects
/// within a second and the guest carries on; requests the old daemon held
/// are resubmitted from the in-flight region.
pub fn qemu_args(socket: &str, memory_mib: u64, queues: usize) -> Vec<String> {
    [
        "-machine",
        "q35,memory-backend=mem",
        "-m",
        &format!("{memory_mib}M"),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        "-chardev",
        &format!("socket,id=vu0,path={socket},reconnect=1"),
        "-device",
        &format!("vhost-user-blk-pci,chardev=vu0,num-queues={queues},bootindex=1"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The libvirt `<disk>` element for the socket (an absolute path, as
/// libvirt requires), plus the shared memory it needs and who must be able
/// to open the socket.
pub fn libvirt_xml(socket: &str, queues: usize, owner: Option<&SocketOwner>) -> String {
    let access = match owner {
        Some(owner) => format!("<!-- the socket belongs to {owner}, the user QEMU must run as -->"),
        None => "<!-- libvirt runs QEMU as libvirt-qemu: start instant-boot with \
                 --socket-owner libvirt-qemu (its directory must be searchable too) -->"
            .to_string(),
    };
    format!(
        "{access}\n\
         <!-- in <domain>: shared guest memory, required by vhost-user -->\n\
         <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n\
         <!-- in <devices>: -->\n\
         <disk type='vhostuser' device='disk'>\n  \
           <driver name='qemu' type='raw' queues='{queues}'/>\n  \
           <source type='unix' path='{socket}'><reconnect enabled='yes' timeout='1'/></source>\n  \
           <target dev='vda' bus='virtio'/>\n\
         </disk>"
    )
}

/// Serve the snapshot until stopped.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    // Everything the daemon creates (sockets, state files, a new target)
    // is private to its user from the first moment, whatever the caller's
    // umask: no window in which another user could open it.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    // Handlers go in before anything is announced, so a SIGTERM sent as
    // soon as the socket appears still stops the daemon cleanly.
    let signals = Signals::new([SIGINT, SIGTERM]).context("Failed to install signal handlers")?;
    let signal_handle = signals.handle();
    let daemon = Daemon::start_protected(&cfg.daemon, cfg.protect.as_ref())?;
    let socket = daemon.socket().display().to_string();
    let qemu = qemu_args(&socket, cfg.memory, cfg.daemon.device.num_queues);
    let ready = Ready {
        socket: socket.clone(),
        control: daemon.control_socket().display().to_string(),
        target: cfg.daemon.target.as_ref().map(|t| t.display().to_string()),
        repair_from: cfg.daemon.repair_from.clone(),
        snapshot: daemon.snapshot().reference(),
        image_size: daemon.snapshot().image_size,
        queues: cfg.daemon.device.num_queues,
        read_only: cfg.daemon.device.read_only,
        qemu_args: qemu.clone(),
        protection: daemon.status().status().protection.map(|p| p.name),
        libvirt_xml: libvirt_for(&daemon, &cfg.daemon),
    };
    print_ready(&ready, cfg.json)?;
    info!(socket = %socket, snapshot = %ready.snapshot, "serving");

    let stop = daemon.stop_handle();
    let signal_thread = stop_on_signal(signals, stop.clone())?;

    let qemu_thread = match &cfg.qemu {
        Some(launch) => {
            let mut args = qemu;
            args.extend(launch.extra.iter().cloned());
            // Spawned from the main thread, which lives as long as the
            // daemon: the parent-death signal follows the spawning thread.
            let spawned = daemon::qemu::spawn_tied(
                Command::new(&launch.binary)
                    .args(&args)
                    .stderr(Stdio::piped()),
            )
            .with_context(|| format!("Failed to start {}", launch.binary));
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    stop.stop();
                    let _ = daemon.run();
                    return Err(e);
                }
            };
            let state = daemon.state_dir().clone();
            if let Err(e) = state.record_guest(child.id()) {
                warn!(error = %e, "failed to record the QEMU in the state dir");
            }
            let stderr = forward_stderr(&mut child)?;
            Some(watch_qemu(
                child,
                stop.clone(),
                daemon.migration().cloned(),
                state,
                stderr,
            )?)
        }
        None => None,
    };

    let result = daemon.run();
    signal_handle.close();
    let _ = signal_thread.join();
    let qemu_failed = qemu_thread.and_then(|t| t.join().ok().flatten());
    result?;
    if let Some(why) = qemu_failed {
        bail!(why);
    }
    info!("stopped cleanly");
    Ok(())
}

/// The `signals` thread: stops the daemon at the first SIGINT or SIGTERM.
pub(super) fn stop_on_signal(
    signals: Signals,
    stop: StopHandle,
) -> anyhow::Result<thread::JoinHandle<()>> {
    on_signal(signals, move || stop.stop())
}

/// The `signals` thread: runs `stop` at the first SIGINT or SIGTERM.
fn on_signal(
    mut signals: Signals,
    stop: impl FnOnce() + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, "stopping");
                stop();
            }
        })
        .context("Failed to start the signal thread")
}

/// The libvirt snippet for `daemon`'s socket, by its absolute path.
pub(super) fn libvirt_for(daemon: &Daemon, cfg: &DaemonConfig) -> String {
    libvirt_xml(
        &std::path::absolute(daemon.socket())
            .unwrap_or_else(|_| daemon.socket().to_path_buf())
            .display()
            .to_string(),
        cfg.device.num_queues,
        cfg.socket_owner.as_ref(),
    )
}

/// Lines of QEMU's stderr kept for the error message.
const QEMU_ERROR_LINES: usize = 3;

/// QEMU's stderr, copied to ours: its last lines, complete once the
/// thread copying them has ended (QEMU closed its stderr).
struct QemuStderr {
    last: Arc<Mutex<VecDeque<String>>>,
    copier: Option<thread::JoinHandle<()>>,
}

impl QemuStderr {
    /// QEMU's last lines (waits for the copy to end).
    fn last_lines(&mut self) -> Vec<String> {
        if let Some(copier) = self.copier.take() {
            let _ = copier.join();
        }
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.iter().cloned().collect()
    }
}

/// Copies QEMU's stderr to ours, keeping its last lines.
fn forward_stderr(child: &mut Child) -> anyhow::Result<QemuStderr> {
    let last = Arc::new(Mutex::new(VecDeque::new()));
    let Some(stderr) = child.stderr.take() else {
        return Ok(QemuStderr { last, copier: None });
    };
    let kept = last.clone();
    let copier = thread::Builder::new()
        .name("qemu-stderr".into())
        .spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() == QEMU_ERROR_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        })
        .context("Failed to start the QEMU stderr thread")?;
    Ok(QemuStderr {
        last,
        copier: Some(copier),
    })
}

/// Stops the daemon when QEMU exits (once the migration, if any, has
/// finished); kills QEMU if the daemon stops first. Returns why QEMU
/// failed, if it did (exited non-zero or was killed by someone else).
fn watch_qemu(
    mut child: Child,
    stop: StopHandle,
    migration: Option<Arc<MigratingDevice>>,
    state: Arc<daemon::state_dir::StateDir>,
    mut stderr: QemuStderr,
) -> anyhow::Result<thread::JoinHandle<Option<String>>> {
    thread::Builder::new()
        .name("qemu".into())
        .spawn(move || loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    state.clear_guest();
                    info!(%status, "QEMU exited");
                    let failed = qemu_failure(status, &mut stderr);
                    // A failed QEMU stops the daemon at once (the migration
                    // resumes on the next start).
                    if let (Some(m), None) = (&migration, &failed) {
                        if !m.is_complete() {
                            info!("waiting for the migration to finish");
                        }
                        while !stop.is_stopped()
                            && !m.wait(Duration::from_millis(200)).is_finished()
                        {
                        }
                    }
                    stop.stop();
                    return failed;
                }
                Ok(None) if stop.is_stopped() => {
                    warn!("daemon stopping: terminating QEMU");
                    let _ = child.kill();
                    let _ = child.wait();
                    state.clear_guest();
                    return None;
                }
                Ok(None) => thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    warn!(error = %e, "lost track of QEMU");
                    stop.stop();
                    return Some(format!("Lost track of QEMU: {e}"));
                }
            }
        })
        .context("Failed to start the QEMU watcher")
}

/// Why QEMU's exit is a failure, with its last stderr lines; `None` for a
/// clean exit (status 0: the guest powered off).
fn qemu_failure(status: std::process::ExitStatus, stderr: &mut QemuStderr) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return None;
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("QEMU exited with status {code}"),
        (None, Some(sig)) => format!("QEMU was killed by signal {sig}"),
        _ => format!("QEMU failed: {status}"),
    };
    let lines = stderr.last_lines();
    Some(match lines.is_empty() {
        false => format!("{how}: {}", lines.join(" / ")),
        true => how,
    })
}

pub(super) fn print_ready(ready: &Ready, json: bool) -> anyhow::Result<()> {
    if json {
        let s = serde_json::to_string(ready).context("Failed to encode JSON")?;
        return output::line(&s);
    }
    output::line(&format!(
        "Serving {} ({}) on {}",
        ready.snapshot,
        output::size(ready.image_size),
        ready.socket
    ))?;
    if let Some(target) = &ready.target {
        output::line(&format!("Migrating to {target}"))?;
    }
    if let Some(repair) = &ready.repair_from {
        output::line(&format!(
            "Damaged chunks will be taken from {repair} (each one is logged)"
        ))?;
    }
    if let Some(name) = &ready.protection {
        output::line(&format!(
            "Protected: points of image {name} are written into the store (restore --at TIME picks one)"
        ))?;
    }
    output::line(&format!(
        "Control socket {} (recovery-cli status --control {} --watch)",
        ready.control, ready.control
    ))?;
    output::line("")?;
    output::line("Attach it to QEMU with:")?;
    output::line(&format!("  {}", shell_words(&ready.qemu_args)))?;
    output::line("")?;
    output::line("Or to a libvirt domain with:")?;
    for l in ready.libvirt_xml.lines() {
        output::line(&format!("  {l}"))?;
    }
    output::line("")?;
    output::line("Press Ctrl-C to stop (the device is flushed first).")
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=,./:".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `SNAPSHOT [--at TIME]`: the snapshot reference to serve.
fn snapshot_at(
    store: &std::path::Path,
    snapshot: &str,
    at: Option<&str>,
) -> anyhow::Result<String> {
    match at {
        None => Ok(snapshot.to_owned()),
        Some(at) => Ok(super::open_store(store)?
            .resolve_ref_at(snapshot, Some(at))?
            .reference()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn intervals_are_durations_of_at_least_a_second() {
        assert_eq!(parse_interval("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_interval("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("5").is_err());
        assert!(parse_interval("fast").is_err());
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn config(extra: &[&str]) -> anyhow::Result<Config> {
        let base = [
            "x", "--store", "/s", "snap", "--socket", "/v.sock", "--state", "/st",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra)).expect("arguments parse");
        Config::try_from(cli.args)
    }

    #[test]
    fn io_threads_default_to_the_pool_size_and_are_bounded() {
        let default = config(&[]).unwrap();
        assert_eq!(
            default.daemon.device.io_threads,
            DeviceConfig::default_io_threads()
        );
        assert_eq!(
            config(&["--io-threads", "0"])
                .unwrap()
                .daemon
                .device
                .io_threads,
            0
        );
        let err = config(&["--io-threads", "65"]).unwrap_err().to_string();
        assert!(
            err.contains("--io-threads must be between 0 and 64"),
            "{err}"
        );
    }
}
