//! `recovery-cli`: back up VM disk images into a dedup chunk store, restore
//! them whole or file by file, boot them instantly from the store
//! (`instant-boot`) while a background copier moves them to production
//! storage, and watch and steer that daemon.
//!
//! # What this crate owns
//! Only the command line: parsing, validation, printing, signals, and
//! launching QEMU. Every piece of logic lives in a library crate below it
//! (see `docs/ARCHITECTURE.md` for the crate graph):
//!
//! | commands | module | library it drives |
//! |---|---|---|
//! | `init`, `backup`, `snapshots`, `restore`, `verify`, `forget`, `unforget`, `release-hold`, `gc` | [`commands`]`::{init, backup, …, unforget}` | `store` |
//! | `key list`, `key add`, `key remove` (an encrypted store's keys; the global `--key-file`, `RECOVERY_PASSWORD` or a prompt unlock every command) | [`commands::key`] | `store::crypto` |
//! | `backup --qmp` (a running VM's disk) | [`commands::live_backup`] | `hypervisor` |
//! | `ls`, `cat`, `restore-files`, `mount` | [`commands::files`] | `files` |
//! | `instant-boot` | [`commands::instant_boot`] | `daemon` (which assembles `block`, `vhost-backend`, `control`) |
//! | `drill` (boot a snapshot in a sandbox, check it, record the RTO) | [`commands::drill`] | `daemon`, `store` |
//! | `status`, `pause`, `resume`, `set-rate`, `metrics` | [`commands::monitor`] | `control` (client only) |
//!
//! The CLI does not link the virtio crates directly: `instant-boot` goes
//! through `daemon`'s re-exports (`DaemonConfig`, `DeviceConfig`,
//! `MigrationOptions`, `StopHandle`), and the monitor commands need only
//! the control protocol.
//!
//! # Model
//! Each command is one module under [`commands`] with the same shape:
//! clap `Args` → `TryFrom<Args> for Config` (validation, one-line errors)
//! → `run(Config)`. The binary (`main.rs`) only parses, installs the
//! `tracing` subscriber (with the `tracing-log` bridge for rust-vmm's
//! `log` records; `RUST_LOG`, default `warn`, on stderr) and prints the
//! error chain. [`output`] holds the shared printing helpers: a human
//! table or summary by default, one JSON object with `--json`, progress
//! bars only on a terminal.
//!
//! # Threads
//! Store commands run on the main thread and the store's own scoped
//! worker threads. `instant-boot` runs the daemon on the main thread
//! (`Daemon::run`) and adds its own: `signals` (SIGINT/SIGTERM →
//! `StopHandle::stop`) and, with `--qemu` (QEMU is spawned from the main
//! thread, so that its parent-death signal lasts as long as the daemon),
//! `qemu` (stops the daemon when QEMU exits, once the migration has
//! finished, or at once when QEMU failed; kills QEMU if the daemon stops
//! first) and `qemu-stderr` (copies QEMU's stderr, keeping its last lines
//! for the error message). `instant-boot --plan` serves every disk of a
//! service from one `daemon::service::Service` (a `disk-<vm>-<drive>`
//! thread per disk; with `--protect`, one `service-protect` thread for the
//! service's aligned group points) and, with `--qemu`, starts and watches
//! the VMs on the main thread in boot order. The daemon's threads are listed in `docs/ARCHITECTURE.md`.
//!
//! # Errors and exit codes
//! Commands return `anyhow::Result` (only here, never in the libraries);
//! `main` prints `error: outer: inner: root` on one line and exits 1.
//! Usage errors exit 2 (clap). `verify` exits 1 when it finds damage.
#![forbid(unsafe_code)]

pub mod commands;
pub mod output;

use clap::Parser;

/// Instant-recovery VM boot service.
#[derive(Debug, Parser)]
#[command(name = "recovery-cli", version, about, propagate_version = true)]
pub struct Cli {
    /// Key file of an encrypted store (its whole content is the key); without
    /// it the passphrase comes from RECOVERY_PASSWORD or a prompt.
    #[arg(long, global = true, env = "RECOVERY_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// Local cache of S3 stores (indexes, manifests, temp files); default
    /// $XDG_CACHE_HOME/recovery or ~/.cache/recovery.
    #[arg(long, global = true, env = "RECOVERY_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: commands::Command,
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    commands::key::install_secret_provider(cli.key_file);
    if let Some(d) = &cli.cache_dir {
        // Before any thread starts; daemons started from here inherit it.
        std::env::set_var(store::location::CACHE_DIR_ENV, d);
    }
    cli.command.run()
}
