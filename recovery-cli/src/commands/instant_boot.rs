//! `instant-boot`: serve a snapshot as a vhost-user-blk device.
//!
//! The daemon binds its socket before it prints anything, so the QEMU
//! arguments it prints work the moment they appear. SIGINT and SIGTERM
//! stop it cleanly: the device is flushed and the socket removed. With
//! `--qemu` it also launches QEMU itself and stops when QEMU exits.
//!
//! `--repair-from SNAPSHOT` (with `--target`) finishes a migration that
//! would stop on damaged chunks by taking those chunks from another backup
//! of the same image. It is never implied: the repaired data is older or
//! newer than the booted snapshot, so the operator chooses it.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use daemon::{
    Daemon, DaemonConfig, DeviceConfig, MigratingDevice, MigrationOptions, StopHandle,
    MAX_IO_THREADS,
};
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use super::monitor::parse_rate;
use super::StoreArg;
use crate::output::{self, parse_size};

/// Arguments of `instant-boot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArg,
    /// Snapshot to serve: NAME, NAME@ID or ID.
    snapshot: String,
    /// vhost-user socket to create (mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
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
    /// Serial number the guest sees (GET_ID); default: the snapshot id.
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

/// Validated `instant-boot` settings.
#[derive(Debug)]
pub struct Config {
    daemon: DaemonConfig,
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
        if !a.qemu && !a.qemu_args.is_empty() {
            bail!("extra QEMU arguments need --qemu");
        }
        if a.target.is_none() && (a.copy_rate.is_some() || a.verify || a.repair_from.is_some()) {
            bail!("--copy-rate, --verify and --repair-from need --target");
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
                snapshot: a.snapshot,
                socket: a.socket,
                state: a.state,
                cache_size: a.cache_size,
                device,
                control: a.control,
                target: a.target,
                migration,
                repair_from: a.repair_from,
                log_interval: Duration::from_secs(a.log_interval.max(1)),
            },
            json: a.json,
            qemu: a.qemu.then_some(QemuLaunch {
                binary: a.qemu_binary,
                extra: a.qemu_args,
            }),
            memory: a.memory,
        })
    }
}

/// What `instant-boot` prints once the socket accepts connections.
#[derive(Debug, Serialize)]
struct Ready {
    socket: String,
    control: String,
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repair_from: Option<String>,
    snapshot: String,
    image_size: u64,
    queues: usize,
    read_only: bool,
    qemu_args: Vec<String>,
    libvirt_xml: String,
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

/// The libvirt `<disk>` element for the socket, plus the shared memory it needs.
pub fn libvirt_xml(socket: &str) -> String {
    format!(
        "<!-- in <domain>: shared guest memory, required by vhost-user -->\n\
         <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n\
         <!-- in <devices>: -->\n\
         <disk type='vhostuser' device='disk'>\n  \
           <driver name='qemu' type='raw'/>\n  \
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
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).context("Failed to install signal handlers")?;
    let signal_handle = signals.handle();
    let daemon = Daemon::start(&cfg.daemon)?;
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
        libvirt_xml: libvirt_xml(&socket),
    };
    print_ready(&ready, cfg.json)?;
    info!(socket = %socket, snapshot = %ready.snapshot, "serving");

    let stop = daemon.stop_handle();
    let signal_stop = stop.clone();
    let signal_thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, "stopping");
                signal_stop.stop();
            }
        })
        .context("Failed to start the signal thread")?;

    let qemu_thread = match &cfg.qemu {
        Some(launch) => {
            let mut args = qemu;
            args.extend(launch.extra.iter().cloned());
            let child = Command::new(&launch.binary)
                .args(&args)
                .spawn()
                .with_context(|| format!("Failed to start {}", launch.binary))?;
            Some(watch_qemu(
                child,
                stop.clone(),
                daemon.migration().cloned(),
            )?)
        }
        None => None,
    };

    let result = daemon.run();
    signal_handle.close();
    let _ = signal_thread.join();
    if let Some(t) = qemu_thread {
        let _ = t.join();
    }
    result?;
    info!("stopped cleanly");
    Ok(())
}

/// Stops the daemon when QEMU exits (once the migration, if any, has
/// finished); kills QEMU if the daemon stops first.
fn watch_qemu(
    mut child: Child,
    stop: StopHandle,
    migration: Option<Arc<MigratingDevice>>,
) -> anyhow::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("qemu".into())
        .spawn(move || loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    info!(%status, "QEMU exited");
                    if let Some(m) = &migration {
                        if !m.is_complete() {
                            info!("waiting for the migration to finish");
                        }
                        while !stop.is_stopped()
                            && !m.wait(Duration::from_millis(200)).is_finished()
                        {
                        }
                    }
                    stop.stop();
                    return;
                }
                Ok(None) if stop.is_stopped() => {
                    warn!("daemon stopping: terminating QEMU");
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    warn!(error = %e, "lost track of QEMU");
                    stop.stop();
                    return;
                }
            }
        })
        .context("Failed to start the QEMU watcher")
}

fn print_ready(ready: &Ready, json: bool) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

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
