//! One module per subcommand, each `Args` → `Config` → `run`.

pub mod backup;
pub mod break_lock;
pub mod copy;
pub mod drill;
pub mod files;
pub mod forget;
pub mod gc;
pub mod init;
pub mod instant_boot;
pub mod key;
pub mod live_backup;
pub mod monitor;
pub mod plan;
pub mod restore;
pub mod serve;
pub mod snapshots;
pub mod unforget;
pub mod verify;

use std::path::PathBuf;

use clap::Subcommand;

/// All subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new store.
    Init(init::Args),
    /// Back up a raw image file or block device as a new snapshot.
    #[command(
        after_help = "A whole service at one instant (a group point): recovery-cli backup --plan PLAN.toml [--full] [--json]; see recovery-cli backup --plan PLAN.toml --help"
    )]
    Backup(backup::Args),
    /// List snapshots.
    Snapshots(snapshots::Args),
    /// Restore a snapshot to a raw file or block device.
    Restore(restore::Args),
    /// List files in a snapshot without restoring it (partitions at the top).
    Ls(files::LsArgs),
    /// Print a file from a snapshot to stdout.
    Cat(files::CatArgs),
    /// Restore files and directories from a snapshot into a directory.
    RestoreFiles(files::RestoreFilesArgs),
    /// Mount a snapshot read-only with FUSE (each filesystem, plus disk.raw).
    Mount(files::MountArgs),
    /// Re-read and re-hash stored chunks; exit non-zero on any problem.
    Verify(verify::Args),
    /// Forget a snapshot (gc reclaims its space); refuses a held one without --force.
    Forget(forget::Args),
    /// Bring back a forgotten snapshot that gc has not deleted yet.
    Unforget(unforget::Args),
    /// Remove a hold whose holder is gone for good (e.g. a deleted state dir).
    ReleaseHold(unforget::ReleaseArgs),
    /// Reclaim space of chunks no snapshot uses.
    Gc(gc::Args),
    /// Serve a snapshot as a vhost-user-blk device for QEMU, writes to an overlay.
    InstantBoot(Box<instant_boot::Args>),
    /// Serve an existing raw file or block device for QEMU with continuous protection.
    Serve(Box<serve::Args>),
    /// Boot a snapshot in a throwaway sandbox and check that it comes up (records the result).
    Drill(Box<drill::Args>),
    /// Check a service plan: exit 1 when its RPO is violated or its last run failed.
    Check(plan::CheckArgs),
    /// Protect a service plan: a group point every interval, retention after each.
    Protect(plan::ProtectArgs),
    /// Copy snapshots between stores (local or s3://), sending only missing chunks.
    Copy(copy::Args),
    /// Remove the writer lock a dead writer left on an S3 store.
    BreakLock(break_lock::Args),
    /// Show a running daemon's state and migration progress (--watch for a live bar).
    Status(monitor::StatusArgs),
    /// Pause the background copier; guest I/O continues.
    Pause(monitor::ControlArgs),
    /// Resume a paused copier.
    Resume(monitor::ControlArgs),
    /// Change the copy rate limit (e.g. 50M, 1G, unlimited).
    SetRate(monitor::SetRateArgs),
    /// Print the daemon's Prometheus metrics (or a store's drill metrics with --store).
    Metrics(monitor::MetricsArgs),
    /// List, add or remove the passphrases and key files of an encrypted store.
    Key(key::Args),
}

impl Command {
    /// Validate the arguments and run the command.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Init(a) => init::run(a.try_into()?),
            Command::Backup(a) if a.live.qmp.is_some() || a.live.domain.is_some() => {
                live_backup::run(a.try_into()?)
            }
            Command::Backup(a) => backup::run(a.try_into()?),
            Command::Snapshots(a) => snapshots::run(a.try_into()?),
            Command::Restore(a) => restore::run(a.try_into()?),
            Command::Ls(a) => files::ls(a.try_into()?),
            Command::Cat(a) => files::cat(a.try_into()?),
            Command::RestoreFiles(a) => files::restore_files(a.try_into()?),
            Command::Mount(a) => files::mount(a.try_into()?),
            Command::Verify(a) => verify::run(a.try_into()?),
            Command::Forget(a) => forget::run(a.try_into()?),
            Command::Unforget(a) => unforget::run(a.try_into()?),
            Command::ReleaseHold(a) => unforget::release(a.try_into()?),
            Command::Gc(a) => gc::run(a.try_into()?),
            Command::InstantBoot(a) => instant_boot::run((*a).try_into()?),
            Command::Serve(a) => serve::run((*a).try_into()?),
            Command::Drill(a) => drill::run((*a).try_into()?),
            Command::Check(a) => plan::check(a),
            Command::Protect(a) => plan::protect(a),
            Command::Copy(a) => copy::run(a.try_into()?),
            Command::BreakLock(a) => break_lock::run(a.try_into()?),
            Command::Status(a) => monitor::status(a.try_into()?),
            Command::Pause(a) => monitor::pause(a.try_into()?),
            Command::Resume(a) => monitor::resume(a.try_into()?),
            Command::SetRate(a) => monitor::set_rate(a.try_into()?),
            Command::Metrics(a) => monitor::metrics(a.try_into()?),
            Command::Key(a) => key::run(a),
        }
    }
}

/// The `--store` option shared by commands.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArg {
    /// Store directory or s3://BUCKET/PREFIX (AWS_* variables for S3).
    #[arg(long, short = 's', env = "RECOVERY_STORE", value_name = "STORE")]
    pub store: PathBuf,
}

/// Open the store named by `--store`.
pub fn open_store(path: &std::path::Path) -> anyhow::Result<store::Store> {
    Ok(store::Store::open_location(
        &location(path)?,
        &store::OpenOptions::default(),
    )?)
}

/// A `--store` value as a location string (a path or `s3://BUCKET/PREFIX`).
pub fn location(path: &std::path::Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("Store location {} is not UTF-8", path.display()))
}
