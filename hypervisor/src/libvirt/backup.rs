//! Live backup of a libvirt domain's disk through libvirt's backup API in
//! pull mode, with a checkpoint per snapshot for the next incremental.
//!
//! # Sequence
//! ```text
//!  store writer lock ─ dumpxml (disk, format, QEMU's user) ─ domblkinfo (size)
//!  end a backup job a killed run of this store left (its socket is ours)
//!  checkpoint-list ─ decide full / incremental (+ reason)
//!  backup-begin  <domainbackup mode='pull'> [<incremental>BASE</incremental>]
//!                 NBD on a unix socket in a directory QEMU's user owns
//!                <domaincheckpoint> NEW (bitmap on the disk)
//!  backup-dumpxml: export name and exported bitmap (qemu:dirty-bitmap:backup-<disk>)
//!  NBD: block status → chunk plan ─ read Data chunks, reuse the parent's ids
//!  domjobabort (always: the normal end of a pull backup) ─ remove the socket dir
//!  checkpoints: success → delete ours but NEW
//!               failure → delete NEW (BASE still records every change)
//! ```
//!
//! # Checkpoints and "never a wrong incremental"
//! A checkpoint is named like the QMP path's bitmaps,
//! `ir-<store tag>-<image>-<token>`, and each snapshot records its own in
//! its `source` (`libvirt:URI/DOMAIN#DISK?checkpoint=NAME`). An
//! incremental needs exactly the newest snapshot's checkpoint, a readable
//! parent snapshot and the same disk size; otherwise the backup is full and
//! says why. libvirt keeps every checkpoint's bitmap recording from its
//! creation until the checkpoint is deleted, and an incremental from BASE
//! covers every later checkpoint too, so checkpoints left by a failed or
//! killed run (or by other tools, such as virtnbdbackup) never hide a
//! change; we delete only our own, and only once a newer snapshot of ours
//! holds them. A raw disk cannot hold checkpoints: every backup is full.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use block::migrate::RateLimiter;
use store::backup::changed::{ChangedBackup, ChangedOptions, ChunkState};
use store::{SnapshotInfo, Store};
use tracing::{info, info_span, warn};

use super::{escape, parse_disks, parse_owner, BlkstatProbe, Owner, Virsh};
use crate::live_backup::fleece::{free_bytes, is_our_bitmap, Names, SCRATCH_HEADROOM};
use crate::live_backup::{self, source, store_tag, Report};
use crate::nbd;
use crate::pacing::{self, Rate};

/// Errors of a libvirt backup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Libvirt(#[from] super::Error),
    #[error("Domain {domain} has no disk {disk}; it has: {known}")]
    UnknownDisk {
        domain: String,
        disk: String,
        known: String,
    },
    #[error(
        "Domain {domain} already runs a backup job that is not ours (socket {socket}); \
         libvirt runs one backup job per domain"
    )]
    Busy { domain: String, socket: String },
    #[error("libvirt's backup job exports no NBD socket for disk {0}")]
    NoExport(String),
    #[error("NBD {what} failed")]
    Nbd {
        what: &'static str,
        #[source]
        source: nbd::Error,
    },
    #[error("Reading the export failed")]
    Export(#[from] live_backup::Error),
    #[error("Store operation failed")]
    Store(#[from] store::Error),
    #[error("Scratch directory {dir} is unusable")]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Scratch directory {dir} has {free} bytes free; the backup needs up to {need} \
         (the disk size) for blocks the guest overwrites during the backup"
    )]
    ScratchSpace { dir: PathBuf, free: u64, need: u64 },
    #[error("Backup interrupted")]
    Interrupted,
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What to back up and how.
pub struct Config<'a> {
    pub name: String,
    /// libvirt URI (`None`: virsh's default).
    pub connect: Option<String>,
    pub domain: String,
    /// Disk target (`vda`).
    pub disk: String,
    /// Read everything even when an incremental is possible.
    pub full: bool,
    /// Directory for the NBD socket and libvirt's scratch image.
    pub scratch: PathBuf,
    pub threads: Option<usize>,
    /// How the NBD reads are paced (see `live_backup::Config::rate`).
    pub rate: Rate,
    /// Set to stop the backup (Ctrl-C); changes stay tracked.
    pub abort: &'a AtomicBool,
    pub progress: Option<store::Progress<'a>>,
    /// Called with the disk size once it is known.
    pub on_size: Option<store::Progress<'a>>,
}

/// The snapshot `source` string: the domain's disk and the checkpoint
/// taken at its point in time.
pub fn source_string(uri: &str, domain: &str, disk: &str, checkpoint: &str) -> String {
    format!("libvirt:{uri}/{domain}#{disk}?checkpoint={checkpoint}")
}

/// The checkpoint recorded in a snapshot's `source`, if it was a libvirt
/// backup that took one.
pub fn recorded_checkpoint(source: &str) -> Option<&str> {
    source
        .strip_prefix("libvirt:")?
        .rsplit_once("?checkpoint=")
        .map(|(_, c)| c)
        .filter(|c| !c.is_empty())
}

/// Full or incremental.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Full { reason: String },
    Incremental { base: String, parent: String },
}

/// What [`decide`] looks at.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    pub full: bool,
    pub name: &'a str,
    pub newest: Option<&'a SnapshotInfo>,
    pub format: &'a str,
    pub size: u64,
    /// Our checkpoints of this image.
    pub ours: &'a [String],
    /// Checkpoints of other stores (`ir-` but not our prefix).
    pub others: &'a [String],
    /// Why the newest snapshot cannot be read, if it cannot.
    pub unreadable: Option<&'a str>,
}

/// Decide the mode before anything changes in libvirt.
pub fn decide(f: &Facts<'_>) -> Mode {
    let full = |reason: String| Mode::Full { reason };
    if f.format != "qcow2" {
        return full(format!(
            "the disk is {}: libvirt keeps checkpoints only on qcow2 disks",
            f.format
        ));
    }
    if f.full {
        return full("--full was given".into());
    }
    let Some(parent) = f.newest else {
        return full(format!("no earlier snapshot of {}", f.name));
    };
    let Some(want) = recorded_checkpoint(&parent.source) else {
        return full(format!(
            "the previous snapshot {} was not taken through libvirt (no checkpoint)",
            parent.reference()
        ));
    };
    if !f.ours.iter().any(|c| c == want) {
        return full(if !f.ours.is_empty() {
            format!(
                "the domain's checkpoint {} was taken for a snapshot that no longer exists \
                 (the newest is {}, which needs checkpoint {want})",
                f.ours[0],
                parent.reference()
            )
        } else if !f.others.is_empty() {
            format!(
                "the domain's checkpoints belong to another store or image ({}); \
                 checkpoint {want} of {} is missing",
                f.others.join(", "),
                parent.reference()
            )
        } else {
            format!(
                "checkpoint {want} of {} is missing (the domain was restarted without \
                 its checkpoint metadata, or it was deleted)",
                parent.reference()
            )
        });
    }
    if let Some(why) = f.unreadable {
        return full(format!(
            "the previous snapshot {} cannot be read ({why})",
            parent.reference()
        ));
    }
    if f.size != parent.image_size {
        return full(format!(
            "the disk is {} bytes, the previous snapshot {} has {}",
            f.size,
            parent.reference(),
            parent.image_size
        ));
    }
    Mode::Incremental {
        base: want.to_owned(),
        parent: parent.id.clone(),
    }
}

/// Our objects of one run on disk: `<scratch>/ir-<tag>-<token>.d/` holds
/// the NBD socket, libvirt's scratch image and the XML handed to virsh.
fn run_dir(names: &Names, scratch: &Path) -> PathBuf {
    scratch.join(format!("{}{}.d", names.prefix, names.token))
}

/// Whether `path` lies in a run directory of this store.
fn is_ours(path: &Path, names: &Names) -> bool {
    path.parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n.starts_with(&names.prefix) && n.ends_with(".d"))
}

/// End a backup job a killed run of this store left behind and remove
/// its run directories; a job of somebody else is an error.
fn clear_leftovers(v: &Virsh, domain: &str, names: &Names, scratch: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Some(job) = v.backup_job(domain)? {
        let socket = job.socket.clone().unwrap_or_default();
        if !is_ours(Path::new(&socket), names) {
            return Err(Error::Busy {
                domain: domain.to_owned(),
                socket: if socket.is_empty() {
                    "none (TCP or push mode)".into()
                } else {
                    socket
                },
            });
        }
        v.job_abort(domain)?;
        removed.push(format!("backup job ({socket})"));
    }
    if let Ok(dir) = std::fs::read_dir(scratch) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&names.prefix)
                && name.ends_with(".d")
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed.push(format!("directory {}", e.path().display()));
            }
        }
    }
    if !removed.is_empty() {
        info!(?removed, "cleared leftovers of an earlier run");
    }
    Ok(removed)
}

/// The `<domainbackup>` XML of a pull-mode backup of `disk`.
pub fn backup_xml(disk: &str, base: Option<&str>, socket: &Path, scratch: &Path) -> String {
    let incremental = base
        .map(|b| format!("  <incremental>{}</incremental>\n", escape(b)))
        .unwrap_or_default();
    format!(
        "<domainbackup mode='pull'>\n{incremental}  <server transport='unix' socket='{}'/>\n  \
         <disks>\n    <disk name='{}' backup='yes' type='file'>\n      \
         <scratch file='{}'/>\n    </disk>\n  </disks>\n</domainbackup>\n",
        escape(&socket.to_string_lossy()),
        escape(disk),
        escape(&scratch.to_string_lossy()),
    )
}

/// The `<domaincheckpoint>` XML of checkpoint `name` on `disk` only.
pub fn checkpoint_xml(name: &str, disk: &str, description: &str) -> String {
    format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>{}</description>\n  \
         <disks>\n    <disk name='{}' checkpoint='bitmap'/>\n  </disks>\n</domaincheckpoint>\n",
        escape(name),
        escape(description),
        escape(disk)
    )
}

/// Run one backup of `cfg.disk` of `cfg.domain` into `store` as image
/// `cfg.name`.
pub fn run(store: &Store, cfg: &Config<'_>) -> Result<Report> {
    store::snapshot::validate_name(&cfg.name)?;
    let span =
        info_span!("libvirt_backup", name = %cfg.name, domain = %cfg.domain, disk = %cfg.disk);
    let _e = span.enter();
    let started = Instant::now();
    let names = Names::new(&store_tag(store));
    // The writer lock first: no other run of this store touches the domain
    // meanwhile, so a backup job on a socket of ours is a leftover.
    let session = store.begin_changed_backup(&cfg.name)?;
    let v = Virsh::new(cfg.connect.as_deref());
    let xml = v.domain_xml(&cfg.domain)?;
    let disks = parse_disks(&xml);
    let Some(disk) = disks.iter().find(|d| d.target == cfg.disk).cloned() else {
        let known: Vec<_> = disks
            .iter()
            .map(|d| format!("{} ({})", d.target, d.format))
            .collect();
        return Err(Error::UnknownDisk {
            domain: cfg.domain.clone(),
            disk: cfg.disk.clone(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        });
    };
    let size = v.disk_size(&cfg.domain, &cfg.disk)?;
    if let Some(f) = cfg.on_size {
        f(size);
    }
    let leftovers = clear_leftovers(&v, &cfg.domain, &names, &cfg.scratch)?;

    let prefix = names.bitmap_prefix(&cfg.name);
    let all = v.checkpoints(&cfg.domain)?;
    let ours: Vec<String> = all
        .iter()
        .filter(|c| is_our_bitmap(c, &prefix))
        .cloned()
        .collect();
    let others: Vec<String> = all
        .iter()
        .filter(|c| c.starts_with("ir-") && !c.starts_with(&names.prefix))
        .cloned()
        .collect();
    let unreadable = session.newest().and_then(|p| {
        store
            .open_snapshot(&p.reference())
            .and_then(|r| r.verify_manifest())
            .err()
            .map(|e| nbd::error_chain(&e))
    });
    let mode = decide(&Facts {
        full: cfg.full,
        name: &cfg.name,
        newest: session.newest(),
        format: &disk.format,
        size,
        ours: &ours,
        others: &others,
        unreadable: unreadable.as_deref(),
    });
    info!(?mode, "mode decided");
    let new_cp = (disk.format == "qcow2").then(|| names.bitmap(&cfg.name));

    let dir = run_dir(&names, &cfg.scratch);
    let mut begun = false;
    let result = backup(
        store,
        cfg,
        &session,
        &v,
        &dir,
        parse_owner(&xml),
        size,
        &mode,
        new_cp.as_deref(),
        &mut begun,
    );
    // The end of every pull backup, successful or not.
    if begun {
        if let Err(e) = v.job_abort(&cfg.domain) {
            warn!("could not end the backup job: {e}; the next run ends it");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("could not remove {}: {e}", dir.display());
        }
    }
    // Checkpoints: on success only the new one stays ours; on failure the
    // new one goes (the base still records every change since its snapshot).
    let stale: Vec<&String> = match (&result, &new_cp) {
        (Ok(_), Some(new)) => ours.iter().filter(|c| *c != new).collect(),
        (Ok(_), None) => ours.iter().collect(),
        // A failed begin may or may not have created it.
        (Err(_), Some(new))
            if begun && v.checkpoints(&cfg.domain).is_ok_and(|l| l.contains(new)) =>
        {
            vec![new]
        }
        (Err(_), _) => Vec::new(),
    };
    for c in stale {
        if let Err(e) = v.checkpoint_delete(&cfg.domain, c) {
            warn!("could not delete checkpoint {c}: {e}");
        }
    }
    let (stats, dirty_bytes, unchanged, blackout, pacing) = result?;
    let (mode_name, reason) = match &mode {
        Mode::Full { reason } => ("full", Some(reason.clone())),
        Mode::Incremental { .. } => ("incremental", None),
    };
    Ok(Report {
        snapshot: format!("{}@{}", stats.name, stats.snapshot),
        mode: mode_name,
        reason,
        image_size: stats.image_size,
        bytes_read: stats.bytes_read,
        dirty_bytes,
        bytes_new: stats.bytes_new,
        chunks_total: stats.chunks_total,
        chunks_new: stats.chunks_new,
        chunks_patch: stats.chunks_patch,
        chunks_unchanged: unchanged,
        blackout_ms: blackout.as_secs_f64() * 1000.0,
        frozen_ms: None,
        seconds: started.elapsed().as_secs_f64(),
        parent: stats.parent,
        bitmap: new_cp.unwrap_or_default(),
        leftovers_cleared: leftovers,
        pacing,
    })
}

type Done = (
    store::BackupStats,
    u64,
    u64,
    Duration,
    Option<pacing::Report>,
);

/// Begin the job, read its export into the store.
#[allow(clippy::too_many_arguments)]
fn backup(
    store: &Store,
    cfg: &Config<'_>,
    session: &ChangedBackup<'_>,
    v: &Virsh,
    dir: &Path,
    owner: Option<Owner>,
    size: u64,
    mode: &Mode,
    new_cp: Option<&str>,
    begun: &mut bool,
) -> Result<Done> {
    let scratch_err = |source| Error::Scratch {
        dir: cfg.scratch.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.scratch).map_err(scratch_err)?;
    let need = size + SCRATCH_HEADROOM;
    let free = free_bytes(&cfg.scratch).map_err(scratch_err)?;
    if free < need {
        return Err(Error::ScratchSpace {
            dir: cfg.scratch.clone(),
            free,
            need,
        });
    }
    std::fs::create_dir(dir).map_err(scratch_err)?;
    // QEMU (libvirt's user for it) creates the socket and the scratch
    // image here; nobody else may reach into it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(scratch_err)?;
    }
    if let Some(o) = owner {
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid)).map_err(scratch_err)?;
        }
    }
    let socket = dir.join("nbd.sock");
    let base = match mode {
        Mode::Incremental { base, .. } => Some(base.as_str()),
        Mode::Full { .. } => None,
    };
    let bxml = dir.join("backup.xml");
    let cxml = dir.join("checkpoint.xml");
    let write = |p: &Path, text: String| std::fs::write(p, text).map_err(scratch_err);
    write(
        &bxml,
        backup_xml(
            &cfg.disk,
            base,
            &socket,
            &dir.join(format!("{}.scratch.qcow2", cfg.disk)),
        ),
    )?;
    if let Some(cp) = new_cp {
        write(
            &cxml,
            checkpoint_xml(
                cp,
                &cfg.disk,
                &format!("recovery-cli backup of image {}", cfg.name),
            ),
        )?;
    }
    if cfg.abort.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    let t0 = Instant::now();
    let begin = v.backup_begin(&cfg.domain, &bxml, new_cp.map(|_| cxml.as_path()));
    let blackout = t0.elapsed();
    *begun = true;
    begin?;
    info!(
        begin_ms = blackout.as_secs_f64() * 1000.0,
        "point in time taken"
    );
    if cfg.abort.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }

    // What libvirt actually exports (names differ between versions).
    let job = v
        .backup_job(&cfg.domain)?
        .ok_or_else(|| Error::NoExport(cfg.disk.clone()))?;
    let (_, export, bitmap) = job
        .exports
        .iter()
        .find(|e| e.0 == cfg.disk)
        .cloned()
        .ok_or_else(|| Error::NoExport(cfg.disk.clone()))?;
    let socket = job.socket.map(PathBuf::from).unwrap_or(socket);
    let dirty_ctx = match (base, bitmap) {
        (Some(_), Some(b)) => Some(format!("qemu:dirty-bitmap:{b}")),
        (Some(_), None) => {
            return Err(Error::Export(live_backup::Error::Unsupported(format!(
                "libvirt exports no dirty bitmap for the incremental backup of {}",
                cfg.disk
            ))))
        }
        (None, _) => None,
    };
    let mut contexts = vec!["base:allocation".to_owned()];
    contexts.extend(dirty_ctx.clone());
    let client = nbd::Client::connect(
        &socket,
        &nbd::Options {
            export,
            meta_contexts: contexts,
        },
    )
    .map_err(|source| Error::Nbd {
        what: "connect",
        source,
    })?;
    let plan = source::plan(&client, store.chunk_size() as u64, dirty_ctx.as_deref())?;
    info!(
        dirty_bytes = plan.dirty_bytes,
        data_chunks = plan.count(ChunkState::Data),
        partial_chunks = plan.count(ChunkState::Partial),
        "plan ready"
    );
    let limit = RateLimiter::new(cfg.rate.initial());
    let src = source::NbdSource {
        client: &client,
        plan: &plan,
        abort: cfg.abort,
        bytes_read: Default::default(),
        limit: &limit,
    };
    let opts = ChangedOptions {
        image_size: size,
        source: source_string(v.uri(), &cfg.domain, &cfg.disk, new_cp.unwrap_or("")),
        parent: match mode {
            Mode::Incremental { parent, .. } => Some(parent.clone()),
            Mode::Full { .. } => None,
        },
        progress: cfg.progress,
        threads: cfg.threads,
        readers: 8,
    };
    let (result, pacing) = match cfg.rate {
        Rate::Fixed(_) => (session.run(&src, &opts), None),
        Rate::Auto => {
            let mut probe = BlkstatProbe {
                virsh: v,
                domain: &cfg.domain,
                disk: &cfg.disk,
            };
            // A virsh process per sample: a longer window.
            let window = pacing::WINDOW * 2;
            pacing::beside(&mut probe, &limit, &src.bytes_read, window, || {
                session.run(&src, &opts)
            })
        }
    };
    let mut stats = match result {
        Err(_) if cfg.abort.load(Ordering::Relaxed) => return Err(Error::Interrupted),
        r => r?,
    };
    stats.bytes_read = src.bytes_read.load(Ordering::Relaxed);
    Ok((
        stats,
        plan.dirty_bytes,
        plan.count(ChunkState::Unchanged),
        blackout,
        pacing,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(source: &str, size: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: "20261206T120000.000000Z".into(),
            name: "vm".into(),
            image_size: size,
            chunk_size: 65536,
            chunk_count: 0,
            created: String::new(),
            source: source.into(),
            parent: None,
        }
    }

    #[test]
    fn mode_falls_back_to_full_with_a_reason() {
        let src = source_string("qemu:///system", "dom", "vda", "ir-abc-vm-01");
        assert_eq!(recorded_checkpoint(&src), Some("ir-abc-vm-01"));
        assert_eq!(
            recorded_checkpoint(&source_string("default", "d", "vda", "")),
            None
        );
        assert_eq!(recorded_checkpoint("qemu:/q#d?bitmap=x"), None);
        let parent = info(&src, 1 << 30);
        let ours = ["ir-abc-vm-01".to_owned()];
        let facts = Facts {
            full: false,
            name: "vm",
            newest: Some(&parent),
            format: "qcow2",
            size: 1 << 30,
            ours: &ours,
            others: &[],
            unreadable: None,
        };
        assert_eq!(
            decide(&facts),
            Mode::Incremental {
                base: "ir-abc-vm-01".into(),
                parent: parent.id.clone()
            }
        );
        let why = |f: Facts<'_>| match decide(&f) {
            Mode::Full { reason } => reason,
            m => panic!("{m:?}"),
        };
        let file = info("/images/vm.img", 1 << 30);
        let bigger = info(&src, 2 << 30);
        let stray = ["ir-abc-vm-00".to_owned()];
        let foreign = ["ir-fff-vm-01".to_owned()];
        for (f, needle) in [
            (
                Facts {
                    full: true,
                    ..facts
                },
                "--full",
            ),
            (
                Facts {
                    format: "raw",
                    ..facts
                },
                "only on qcow2",
            ),
            (
                Facts {
                    newest: None,
                    ..facts
                },
                "no earlier snapshot",
            ),
            (
                Facts {
                    newest: Some(&file),
                    ..facts
                },
                "not taken through libvirt",
            ),
            (Facts { ours: &[], ..facts }, "is missing"),
            (
                Facts {
                    ours: &stray,
                    ..facts
                },
                "no longer exists",
            ),
            (
                Facts {
                    ours: &[],
                    others: &foreign,
                    ..facts
                },
                "another store",
            ),
            (
                Facts {
                    unreadable: Some("bad manifest"),
                    ..facts
                },
                "cannot be read (bad manifest)",
            ),
            (
                Facts {
                    newest: Some(&bigger),
                    ..facts
                },
                "previous snapshot",
            ),
        ] {
            let r = why(f);
            assert!(r.contains(needle), "{needle:?} not in {r:?}");
        }
    }

    #[test]
    fn job_xml_names_our_socket_and_checkpoint() {
        let names = Names::new("0123abcd");
        let dir = run_dir(&names, Path::new("/tmp/s"));
        assert!(is_ours(&dir.join("nbd.sock"), &names));
        assert!(!is_ours(Path::new("/tmp/s/other.d/nbd.sock"), &names));
        let x = backup_xml(
            "vda",
            Some("ir-1"),
            &dir.join("nbd.sock"),
            Path::new("/s&c"),
        );
        assert!(x.contains("<incremental>ir-1</incremental>"), "{x}");
        assert!(x.contains("file='/s&amp;c'"), "{x}");
        assert!(!backup_xml("vda", None, Path::new("/n"), Path::new("/s")).contains("incremental"));
        let c = checkpoint_xml("ir-1", "vda", "image <vm>");
        assert!(
            c.contains("<name>ir-1</name>") && c.contains("image &lt;vm&gt;"),
            "{c}"
        );
    }
}
