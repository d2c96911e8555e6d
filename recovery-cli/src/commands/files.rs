//! `ls`, `cat`, `restore-files` and `mount`: single files out of a snapshot
//! without restoring the disk (see the `files` crate).
//!
//! ```text
//! recovery-cli ls            --store S SNAP [PATH] [-l] [--json]
//! recovery-cli cat           --store S SNAP PATH
//! recovery-cli restore-files --store S SNAP PATH... --to DIR [--force] [--json]
//! recovery-cli mount         --store S SNAP MOUNTPOINT
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::files::restore::{restore, RestoreOptions};
use ::files::{Browser, Disk, EntryKind, ReadAt, SnapshotDevice};
use anyhow::Context;

use super::{open_store, StoreArg};
use crate::output;

/// Which snapshot to read (shared by the four commands).
#[derive(Debug, Clone, clap::Args)]
pub struct Source {
    #[command(flatten)]
    pub store: StoreArg,
    /// Snapshot: NAME (newest), NAME@ID or ID.
    pub snapshot: String,
    /// The newest snapshot of image SNAPSHOT (a name) taken at or before
    /// TIME: RFC 3339 (2026-12-06T11:05:03Z) or relative (-10m, -2h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Print how much was fetched from the store (to stderr) at the end.
    #[arg(long)]
    pub stats: bool,
}

/// An open snapshot: the device (holding the snapshot's shared lock) and its
/// disk layout.
struct Opened {
    dev: Arc<SnapshotDevice>,
    disk: Arc<Disk>,
}

impl Source {
    /// Open the snapshot (with `--at`, the point in time it names).
    fn open(&self) -> anyhow::Result<Opened> {
        let s = open_store(&self.store.store)?;
        let info = s.resolve_ref_at(&self.snapshot, self.at.as_deref())?;
        let reader = s.open_snapshot(&info.reference())?;
        let dev = Arc::new(SnapshotDevice::new(
            reader,
            ::files::device::DEFAULT_CACHE_BYTES,
        ));
        let disk = Disk::open(dev.clone() as Arc<dyn ReadAt>)
            .with_context(|| format!("Failed to read the disk layout of {}", self.snapshot))?;
        Ok(Opened {
            dev,
            disk: Arc::new(disk),
        })
    }
}

impl Opened {
    fn report(&self, on: bool) {
        if on {
            let s = self.dev.stats();
            eprintln!(
                "fetched {} chunks, {} bytes from the store",
                s.chunks(),
                s.bytes()
            );
        }
    }
}

/// Arguments of `ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub source: Source,
    /// Path inside the snapshot (`/p1/etc`; `/` lists the partitions).
    #[arg(default_value = "/")]
    pub path: String,
    /// Long listing: type, mode, owner, size, mtime (partitions: filesystem and label).
    #[arg(short = 'l')]
    pub long: bool,
    /// Print the entries as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `ls`.
#[derive(Debug)]
pub struct LsConfig {
    source: Source,
    path: String,
    long: bool,
    json: bool,
}

impl TryFrom<LsArgs> for LsConfig {
    type Error = anyhow::Error;
    fn try_from(a: LsArgs) -> anyhow::Result<LsConfig> {
        Ok(LsConfig {
            source: a.source,
            path: a.path,
            long: a.long,
            json: a.json,
        })
    }
}

fn mode_string(kind: EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind.letter());
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    s
}

/// Run `ls`.
pub fn ls(c: LsConfig) -> anyhow::Result<()> {
    let o = c.source.open()?;
    let b = Browser::new(o.disk.clone());
    let entries = b.list(&c.path)?;
    o.report(c.source.stats);
    if c.json {
        return output::json(&entries);
    }
    let mut out = std::io::stdout().lock();
    for e in &entries {
        let line = if !c.long {
            e.name.clone()
        } else if e.kind == EntryKind::Partition {
            format!(
                "{}  {:<24} {:>10}  {}",
                e.name,
                e.fs.map(|f| f.to_string()).unwrap_or_default(),
                output::size(e.size),
                e.label
                    .as_deref()
                    .map(|l| format!("label={l}"))
                    .unwrap_or_default()
            )
            .trim_end()
            .to_string()
        } else {
            let mtime = store::snapshot::rfc3339(e.mtime.saturating_mul(1_000_000));
            let mut l = format!(
                "{} {:>5} {:>5} {:>12} {} {}",
                mode_string(e.kind, e.mode),
                e.uid,
                e.gid,
                e.size,
                &mtime[..mtime.len().min(19)],
                e.name
            );
            if let Some(t) = &e.target {
                l.push_str(" -> ");
                l.push_str(t);
            }
            l
        };
        writeln!(out, "{line}").context("Failed to write to stdout")?;
    }
    Ok(())
}

/// Arguments of `cat`.
#[derive(Debug, clap::Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub source: Source,
    /// File inside the snapshot, e.g. /p1/etc/fstab.
    pub path: String,
}

/// Validated `cat`.
#[derive(Debug)]
pub struct CatConfig {
    source: Source,
    path: String,
}

impl TryFrom<CatArgs> for CatConfig {
    type Error = anyhow::Error;
    fn try_from(a: CatArgs) -> anyhow::Result<CatConfig> {
        Ok(CatConfig {
            source: a.source,
            path: a.path,
        })
    }
}

/// Run `cat`: stream the file to stdout.
pub fn cat(c: CatConfig) -> anyhow::Result<()> {
    let o = c.source.open()?;
    let b = Browser::new(o.disk.clone());
    let mut f = b.open(&c.path)?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        match out.write_all(&buf[..n]) {
            // The reader went away (`| head`): stop quietly, as cat(1) does.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            res => res.context("Failed to write to stdout")?,
        }
        off += n as u64;
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        res => res.context("Failed to write to stdout")?,
    }
    o.report(c.source.stats);
    Ok(())
}

/// Arguments of `restore-files`.
#[derive(Debug, clap::Args)]
pub struct RestoreFilesArgs {
    #[command(flatten)]
    pub source: Source,
    /// Files or directories inside the snapshot (restored recursively).
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Directory to restore into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Replace existing files and links.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `restore-files`.
#[derive(Debug)]
pub struct RestoreFilesConfig {
    source: Source,
    paths: Vec<String>,
    to: PathBuf,
    force: bool,
    json: bool,
}

impl TryFrom<RestoreFilesArgs> for RestoreFilesConfig {
    type Error = anyhow::Error;
    fn try_from(a: RestoreFilesArgs) -> anyhow::Result<RestoreFilesConfig> {
        for p in &a.paths {
            ::files::disk::components(p)?;
        }
        Ok(RestoreFilesConfig {
            source: a.source,
            paths: a.paths,
            to: a.to,
            force: a.force,
            json: a.json,
        })
    }
}

/// Run `restore-files`; exits non-zero when any path failed.
pub fn restore_files(c: RestoreFilesConfig) -> anyhow::Result<()> {
    let o = c.source.open()?;
    let b = Browser::new(o.disk.clone());
    let r = restore(&b, &c.paths, &c.to, RestoreOptions { force: c.force })?;
    o.report(c.source.stats);
    if c.json {
        output::json(&r)?;
    } else {
        output::line(&format!(
            "Restored {} files ({}), {} directories, {} symlinks to {}",
            r.files,
            output::size(r.bytes),
            r.dirs,
            r.symlinks,
            c.to.display()
        ))?;
        for s in &r.skipped {
            eprintln!("skipped (special file): {s}");
        }
    }
    for f in &r.failed {
        eprintln!("failed: {}: {}", f.path, f.error);
    }
    if !r.failed.is_empty() {
        anyhow::bail!(
            "{} path(s) could not be restored (listed above)",
            r.failed.len()
        );
    }
    Ok(())
}

/// Arguments of `mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub source: Source,
    /// Empty directory to mount on. Needs /dev/fuse, and root or fusermount3.
    pub mountpoint: PathBuf,
}

/// Validated `mount`.
#[derive(Debug)]
pub struct MountConfig {
    source: Source,
    mountpoint: PathBuf,
}

impl TryFrom<MountArgs> for MountConfig {
    type Error = anyhow::Error;
    fn try_from(a: MountArgs) -> anyhow::Result<MountConfig> {
        ::files::fuse::check_mountpoint(&a.mountpoint)?;
        Ok(MountConfig {
            source: a.source,
            mountpoint: a.mountpoint,
        })
    }
}

/// Run `mount` until Ctrl-C, SIGTERM or `fusermount3 -u`.
pub fn mount(c: MountConfig) -> anyhow::Result<()> {
    let o = c.source.open()?;
    let info = o.dev.reader().info().clone();
    let time = store::snapshot::micros_from_id(&info.id)
        .and_then(|m| u64::try_from(m).ok())
        .map(|m| UNIX_EPOCH + Duration::from_micros(m))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mp = c.mountpoint.clone();
    let reference = info.reference();
    ::files::fuse::mount(
        o.disk.clone(),
        &c.mountpoint,
        &format!("recovery:{reference}"),
        time,
        || {
            let _ = output::line(&format!(
                "Mounted {reference} read-only at {} (Ctrl-C or `fusermount3 -u {}` to unmount)",
                mp.display(),
                mp.display()
            ));
        },
    )?;
    o.report(c.source.stats);
    Ok(())
}
