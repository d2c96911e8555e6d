//! `serve`: serve an existing raw file or block device (one that was never
//! backed up) as a vhost-user-blk device, with continuous protection.
//!
//! The disk goes through the same daemon as an instant boot, in
//! passthrough (as a completed migration's target is served), under the
//! protection layer: every `--protect-every` a protection point named
//! `--name` is written into the store, the first a full read, later ones
//! only the chunks the guest changed (see `daemon::protect`). This is how
//! a production VM joins without a recovery. SIGINT and SIGTERM stop it
//! cleanly: a point being written is abandoned, the disk is flushed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use daemon::{Daemon, DaemonConfig, DeviceConfig, ProtectConfig, SocketOwner, SERIAL_BYTES};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

use super::instant_boot::{
    libvirt_for, parse_interval, print_ready, qemu_args, stop_on_signal, Ready, RemoteStoreArgs,
};
use super::StoreArg;
use crate::output::parse_size;

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    remote: RemoteStoreArgs,
    /// The raw image file or block device to serve (used in place, locked).
    #[arg(long, value_name = "PATH")]
    disk: PathBuf,
    /// Image name of the protection points in the store.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// vhost-user socket to create (mode 0600).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Give the vhost-user socket to this user (mode 0600), or to USER and
    /// GROUP (mode 0660), before anyone can connect.
    #[arg(long, value_name = "USER[:GROUP]")]
    socket_owner: Option<SocketOwner>,
    /// State directory: the changed-chunk bitmaps and the protection record.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// Time between protection points (at least 1s).
    #[arg(long, default_value = "5s", value_parser = parse_interval, value_name = "DURATION")]
    protect_every: Duration,
    /// Control socket for status and metrics (default: STATE/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Chunk cache budget (unused by a disk served in place; accepted for
    /// symmetry with instant-boot).
    #[arg(long, default_value = "16M", value_parser = parse_size, value_name = "SIZE")]
    cache_size: u64,
    /// Number of virtqueues, one worker thread each (default: cores, at most 16).
    #[arg(long, value_name = "N")]
    queues: Option<usize>,
    /// Serial number the guest sees (default: NAME, cut to 20 bytes).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
    /// Seconds between progress log lines.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    log_interval: u64,
    /// Guest memory in MiB for the printed QEMU arguments.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// Print the start-up information as JSON.
    #[arg(long)]
    json: bool,
}

/// Validated `serve` settings.
#[derive(Debug)]
pub struct Config {
    daemon: DaemonConfig,
    disk: PathBuf,
    protect: ProtectConfig,
    memory: u64,
    json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        a.remote.apply();
        store::snapshot::validate_name(&a.name)?;
        let queues = a.queues.unwrap_or_else(DeviceConfig::default_num_queues);
        if !(1..=16).contains(&queues) {
            bail!("--queues must be between 1 and 16, not {queues}");
        }
        if let Some(serial) = &a.serial {
            if serial.len() > SERIAL_BYTES {
                bail!(
                    "--serial {serial:?} is {} bytes; a virtio-blk serial holds at most {SERIAL_BYTES}",
                    serial.len()
                );
            }
        }
        if a.memory < 64 {
            bail!("--memory must be at least 64 (MiB)");
        }
        let device = DeviceConfig {
            num_queues: queues,
            serial: a.serial.unwrap_or_default(),
            ..DeviceConfig::default()
        };
        Ok(Config {
            daemon: DaemonConfig {
                store: a.store.store,
                snapshot: a.name.clone(),
                socket: a.socket,
                socket_owner: a.socket_owner,
                state: a.state,
                cache_size: a.cache_size,
                device,
                control: a.control,
                target: None,
                migration: Default::default(),
                repair_from: None,
                log_interval: Duration::from_secs(a.log_interval.max(1)),
                starts_guest: false,
            },
            disk: a.disk,
            protect: ProtectConfig {
                name: Some(a.name),
                interval: a.protect_every,
            },
            memory: a.memory,
            json: a.json,
        })
    }
}

/// Serve the disk until stopped.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    let signals = Signals::new([SIGINT, SIGTERM]).context("Failed to install signal handlers")?;
    let signal_handle = signals.handle();
    let daemon = Daemon::serve_disk(&cfg.daemon, &cfg.disk, &cfg.protect)?;
    let socket = daemon.socket().display().to_string();
    let queues = cfg.daemon.device.num_queues;
    let ready = Ready {
        socket: socket.clone(),
        control: daemon.control_socket().display().to_string(),
        target: None,
        repair_from: None,
        snapshot: cfg.disk.display().to_string(),
        image_size: daemon.snapshot().image_size,
        queues,
        read_only: false,
        qemu_args: qemu_args(&socket, cfg.memory, queues),
        libvirt_xml: libvirt_for(&daemon, &cfg.daemon),
        protection: cfg.protect.name.clone(),
    };
    print_ready(&ready, cfg.json)?;
    info!(socket = %socket, disk = %cfg.disk.display(), "serving");
    let signal_thread = stop_on_signal(signals, daemon.stop_handle())?;
    let result = daemon.run();
    signal_handle.close();
    let _ = signal_thread.join();
    result?;
    info!("stopped cleanly");
    Ok(())
}
