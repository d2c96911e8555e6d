//! The QEMU side of a live backup: resolve the drive, clear leftovers of
//! killed runs, start image fleecing with an NBD export, and tear it all
//! down again.
//!
//! Every object we create in QEMU or on disk carries the prefix
//! `ir-<store tag>-`, so a later run recognises (and removes) what a killed
//! run left behind, and never touches anybody else's objects:
//!
//! | object            | name                               |
//! |-------------------|------------------------------------|
//! | scratch node      | `ir-<tag>-fl-<token>` (≤ 31 chars) |
//! | backup job        | `ir-<tag>-job-<token>`             |
//! | NBD export        | `ir-<tag>-ex-<token>`              |
//! | dirty bitmap      | `ir-<tag>-<image name>-<token>`    |
//! | scratch file      | `<scratch dir>/ir-<tag>-<token>.fleece.qcow2` |
//! | NBD socket        | `<scratch dir>/ir-<tag>-<token>.nbd` |

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{Error, Result};
use crate::qmp::{self, DirtyBitmap, Qmp};

/// How long to wait for a cancelled backup job to go away.
const JOB_GONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Names of this run's objects.
#[derive(Debug, Clone)]
pub struct Names {
    /// `ir-<tag>-`
    pub prefix: String,
    pub token: String,
}

impl Names {
    /// Names for store tag `tag` (8 hex digits) and a fresh token.
    pub fn new(tag: &str) -> Names {
        let t = std::time::UNIX_EPOCH.elapsed().unwrap_or_default();
        let token = format!(
            "{:08x}",
            (t.as_micros() as u64 ^ (u64::from(std::process::id()) << 40)) as u32
        );
        Names {
            prefix: format!("ir-{tag}-"),
            token,
        }
    }

    pub fn node(&self) -> String {
        format!("{}fl-{}", self.prefix, self.token)
    }
    /// The copy-before-write filter the backup job inserts.
    pub fn filter(&self) -> String {
        format!("{}cbw-{}", self.prefix, self.token)
    }
    pub fn job(&self) -> String {
        format!("{}job-{}", self.prefix, self.token)
    }
    pub fn export(&self) -> String {
        format!("{}ex-{}", self.prefix, self.token)
    }
    /// Prefix of the bitmaps of image `name`.
    pub fn bitmap_prefix(&self, name: &str) -> String {
        format!("{}{name}-", self.prefix)
    }
    /// This run's new bitmap for image `name`.
    pub fn bitmap(&self, name: &str) -> String {
        format!("{}{}", self.bitmap_prefix(name), self.token)
    }
    /// Prefix of the in-memory copies of a base bitmap that incremental
    /// backup jobs hold (busy) for their copy-before-write. Image names
    /// never start with `.`, so no image's bitmaps
    /// ([`Names::bitmap_prefix`]) look like these.
    pub fn job_bitmap_prefix(&self) -> String {
        format!("{}.job-", self.prefix)
    }
    /// This run's copy of the base bitmap for its backup job.
    pub fn job_bitmap(&self) -> String {
        format!("{}{}", self.job_bitmap_prefix(), self.token)
    }
    pub fn scratch_file(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}{}.fleece.qcow2", self.prefix, self.token))
    }
    pub fn socket(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}{}.nbd", self.prefix, self.token))
    }
}

/// Whether `bitmap` is one of ours for the image with bitmap prefix
/// `prefix`: the prefix, then a token of hex digits only (so image `a`
/// never claims the bitmaps of image `a-b`).
pub fn is_our_bitmap(bitmap: &str, prefix: &str) -> bool {
    bitmap
        .strip_prefix(prefix)
        .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The disk being backed up.
#[derive(Debug, Clone)]
pub struct Drive {
    /// Its format node (where bitmaps live and the backup job starts).
    pub node: String,
    /// Its driver (`qcow2`, `raw`, …).
    pub drv: String,
    pub size: u64,
    pub bitmaps: Vec<DirtyBitmap>,
    /// The guest device the node is attached to, as `query-block` names it
    /// (drive id, device path), if any: whose I/O `--rate auto` watches.
    pub guest: Option<(String, Option<String>)>,
}

/// Find `drive`: a node name, a drive id, or a device id / QOM path as
/// `query-block` reports them.
pub fn resolve_drive(q: &mut Qmp, drive: &str) -> Result<Drive> {
    let qerr = |what| move |source| Error::Qmp { what, source };
    let blocks = q.query_block().map_err(qerr("query-block"))?;
    let nodes = q
        .query_named_block_nodes()
        .map_err(qerr("query-named-block-nodes"))?;
    let by_device = blocks.iter().find_map(|b| {
        let qdev = b.qdev.as_deref().unwrap_or("");
        let hit = (!b.device.is_empty() && b.device == drive)
            || qdev == drive
            || qdev.starts_with(&format!("/machine/peripheral/{drive}/"));
        if hit {
            b.inserted.as_ref().and_then(|i| i.node_name.clone())
        } else {
            None
        }
    });
    let node = by_device.unwrap_or_else(|| drive.to_owned());
    let Some(n) = nodes.iter().find(|n| n.node_name == node) else {
        let mut known: Vec<String> = blocks
            .iter()
            .filter(|b| b.inserted.is_some())
            .map(|b| {
                let dev = if b.device.is_empty() {
                    b.qdev.clone().unwrap_or_default()
                } else {
                    b.device.clone()
                };
                let node = b
                    .inserted
                    .as_ref()
                    .and_then(|i| i.node_name.clone())
                    .unwrap_or_default();
                format!("{dev} (node {node})")
            })
            .collect();
        if known.is_empty() {
            // No devices (e.g. -blockdev only): name the format nodes.
            known = nodes
                .iter()
                .filter(|n| n.drv != "file" && n.image.is_some())
                .map(|n| format!("node {} ({})", n.node_name, n.drv))
                .collect();
        }
        known.sort();
        return Err(Error::UnknownDrive {
            drive: drive.to_owned(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        });
    };
    let size =
        n.image.as_ref().map(|i| i.virtual_size).ok_or_else(|| {
            Error::Unsupported(format!("Drive {drive} (node {node}) has no medium"))
        })?;
    let guest = blocks
        .iter()
        .find(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) == Some(&node))
        .map(|b| (b.device.clone(), b.qdev.clone()));
    Ok(Drive {
        node: n.node_name.clone(),
        drv: n.drv.clone(),
        size,
        bitmaps: n.dirty_bitmaps.clone(),
        guest,
    })
}

/// Remove what a killed run of this store left in QEMU and in the scratch
/// directory: exports, the NBD server if only ours were on it, backup jobs,
/// scratch nodes and their files. Bitmaps are handled by the caller (their
/// changes must be kept). Returns what was removed.
pub fn clear_leftovers(q: &mut Qmp, names: &Names, scratch_dir: &Path) -> Result<Vec<String>> {
    let qerr = |what| move |source| Error::Qmp { what, source };
    let p = &names.prefix;
    let mut removed = Vec::new();
    let exports = q
        .query_block_exports()
        .map_err(qerr("query-block-exports"))?;
    let ours: Vec<_> = exports.iter().filter(|e| e.id.starts_with(p)).collect();
    for e in &ours {
        q.block_export_del(&e.id, true)
            .map_err(qerr("block-export-del"))?;
        removed.push(format!("export {}", e.id));
    }
    if !ours.is_empty() && ours.len() == exports.len() {
        // The server carried only our exports: it is ours.
        if q.nbd_server_stop().is_ok() {
            removed.push("NBD server".into());
        }
    }
    for j in q.query_block_jobs().map_err(qerr("query-block-jobs"))? {
        if j.device.starts_with(p) {
            q.block_job_cancel(&j.device)
                .map_err(qerr("block-job-cancel"))?;
            if !q
                .wait_job_gone(&j.device, JOB_GONE_TIMEOUT)
                .map_err(qerr("query-block-jobs"))?
            {
                return Err(Error::Unsupported(format!(
                    "Leftover backup job {} did not go away after cancel",
                    j.device
                )));
            }
            removed.push(format!("job {}", j.device));
        }
    }
    let mut files = Vec::new();
    for n in q
        .query_named_block_nodes()
        .map_err(qerr("query-named-block-nodes"))?
    {
        if n.node_name.starts_with(&format!("{p}fl-")) {
            q.blockdev_del(&n.node_name).map_err(qerr("blockdev-del"))?;
            files.push(PathBuf::from(&n.file));
            removed.push(format!("node {}", n.node_name));
        }
    }
    if let Ok(dir) = std::fs::read_dir(scratch_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(p) && (name.ends_with(".fleece.qcow2") || name.ends_with(".nbd")) {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files.dedup();
    for f in files {
        if std::fs::remove_file(&f).is_ok() {
            removed.push(format!("file {}", f.display()));
        }
    }
    if !removed.is_empty() {
        info!(?removed, "cleared leftovers of an earlier run");
    }
    Ok(removed)
}

/// Room a scratch directory needs beyond the disk size (the qcow2 image's
/// metadata), for the QMP and the libvirt paths alike.
pub(crate) const SCRATCH_HEADROOM: u64 = 16 << 20;

/// Free bytes in `dir`, for the QMP and the libvirt paths alike (each maps
/// the error to its own `Scratch` variant).
pub(crate) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Cluster size of the scratch image (qcow2's default).
const QCOW2_CLUSTER_BITS: u32 = 16;

/// Create an empty qcow2 (version 3) image of `size` bytes at `path`, as
/// `qemu-img create -f qcow2` does, without starting a process (that cost
/// about 8 ms of every backup): the header in cluster 0, the refcount
/// table in cluster 1, its one refcount block in cluster 2 and the L1
/// table from cluster 3 on, all zeros but the header and the refcounts of
/// these clusters (the file is sparse). QEMU allocates everything else as
/// the image is written.
pub fn create_qcow2(path: &Path, size: u64) -> std::io::Result<()> {
    let cluster = 1u64 << QCOW2_CLUSTER_BITS;
    let size = size.next_multiple_of(512);
    // Each L1 entry maps an L2 table of cluster / 8 entries, each a cluster.
    let l1_size = size.div_ceil(cluster * (cluster / 8));
    let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
    // qcow2's limit on the L1 table (32 MiB), and what one refcount block
    // of 16-bit entries covers.
    if l1_size * 8 > 32 << 20 || 3 + l1_clusters > cluster / 2 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("disk size {size} is too large for a qcow2 scratch image"),
        ));
    }
    let mut h = Vec::with_capacity(104);
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
    h.extend_from_slice(&0u32.to_be_bytes()); // backing file name length
    h.extend_from_slice(&QCOW2_CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&(l1_size as u32).to_be_bytes());
    h.extend_from_slice(&(3 * cluster).to_be_bytes()); // L1 table offset
    h.extend_from_slice(&cluster.to_be_bytes()); // refcount table offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16 bits
    h.extend_from_slice(&104u32.to_be_bytes()); // header length
                                                // Then the end of the header extensions: a zero type (the file's zeros).
    let refcounts: Vec<u8> = (0..3 + l1_clusters)
        .flat_map(|_| 1u16.to_be_bytes())
        .collect();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all_at(&h, 0)?;
    f.write_all_at(&(2 * cluster).to_be_bytes(), cluster)?;
    f.write_all_at(&refcounts, 2 * cluster)?;
    f.set_len((3 + l1_clusters) * cluster)
}

/// A running fleece: what exists, so [`Fleece::teardown`] removes exactly
/// that.
#[derive(Debug, Default)]
pub struct Fleece {
    pub scratch_file: Option<PathBuf>,
    pub node: Option<String>,
    pub job: Option<String>,
    /// The job's copy of the base bitmap: (node, name), removed once the
    /// job is gone.
    pub job_bitmap: Option<(String, String)>,
    pub server: Option<PathBuf>,
    pub export: Option<String>,
}

impl Fleece {
    /// Check the scratch directory (it must hold a copy of every block the
    /// guest may overwrite during the backup: up to the disk size, because
    /// QEMU fails guest writes when the scratch image cannot take them),
    /// create the scratch image and add it as a node backed by the disk.
    pub fn prepare(&mut self, q: &mut Qmp, names: &Names, drive: &Drive, dir: &Path) -> Result<()> {
        let need = drive.size + SCRATCH_HEADROOM;
        let free = free_bytes(dir).map_err(|source| Error::Scratch {
            dir: dir.to_path_buf(),
            source,
        })?;
        if free < need {
            return Err(Error::ScratchSpace {
                dir: dir.to_path_buf(),
                free,
                need,
            });
        }
        let file = names.scratch_file(dir);
        self.scratch_file = Some(file.clone());
        create_qcow2(&file, drive.size).map_err(|source| Error::Scratch {
            dir: dir.to_path_buf(),
            source,
        })?;
        let node = names.node();
        q.blockdev_add_qcow2_overlay(&node, &file, &drive.node)
            .map_err(|source| Error::Qmp {
                what: "blockdev-add (scratch image)",
                source,
            })?;
        self.node = Some(node);
        Ok(())
    }

    /// Start the NBD server on a socket in `dir` and export the scratch
    /// node with `bitmaps`.
    pub fn export(
        &mut self,
        q: &mut Qmp,
        names: &Names,
        dir: &Path,
        bitmaps: &[String],
    ) -> Result<PathBuf> {
        let socket = names.socket(dir);
        if let Err(e) = q.nbd_server_start(&socket) {
            let exports = q.query_block_exports().map_err(|source| Error::Qmp {
                what: "query-block-exports",
                source,
            })?;
            let desc = e.qemu_desc().unwrap_or("").to_owned();
            if desc.contains("already running") && exports.is_empty() {
                // An idle server (ours from a killed run, between start
                // and export): restart it on our socket.
                warn!("restarting QEMU's idle NBD server");
                q.nbd_server_stop().map_err(|source| Error::Qmp {
                    what: "nbd-server-stop",
                    source,
                })?;
                q.nbd_server_start(&socket).map_err(|source| Error::Qmp {
                    what: "nbd-server-start",
                    source,
                })?;
            } else if desc.contains("already running") {
                return Err(Error::Unsupported(format!(
                    "QEMU already runs an NBD server with exports of someone else ({}); \
                     it serves one NBD server at a time",
                    exports
                        .iter()
                        .map(|e| e.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            } else {
                return Err(Error::Qmp {
                    what: "nbd-server-start",
                    source: e,
                });
            }
        }
        self.server = Some(socket.clone());
        let node = self.node.clone().unwrap_or_default();
        let id = names.export();
        q.block_export_add(&id, &node, &id, bitmaps)
            .map_err(|source| Error::Qmp {
                what: "block-export-add",
                source,
            })?;
        self.export = Some(id);
        Ok(socket)
    }

    /// Remove everything this fleece created, in reverse order; returns
    /// the failures (logged), never stops early.
    pub fn teardown(&mut self, q: &mut Qmp) -> Vec<String> {
        let mut errors = Vec::new();
        fn note(errors: &mut Vec<String>, what: &str, r: std::result::Result<(), qmp::Error>) {
            if let Err(e) = r {
                warn!("cleanup: {what} failed: {e}");
                errors.push(format!("{what}: {e}"));
            }
        }
        if let Some(id) = self.export.take() {
            note(
                &mut errors,
                "block-export-del",
                q.block_export_del(&id, true),
            );
        }
        if let Some(sock) = self.server.take() {
            note(&mut errors, "nbd-server-stop", q.nbd_server_stop());
            let _ = std::fs::remove_file(sock);
        }
        if let Some(job) = self.job.take() {
            let r = q.block_job_cancel(&job);
            // A job that already ended is fine.
            let r = match r {
                Err(e)
                    if e.qemu_desc()
                        .is_some_and(|d| d.contains("not found") || d.contains("No active")) =>
                {
                    Ok(())
                }
                r => r,
            };
            note(&mut errors, "block-job-cancel", r);
            match q.wait_job_gone(&job, JOB_GONE_TIMEOUT) {
                Ok(true) => {}
                Ok(false) => errors.push(format!("backup job {job} did not end")),
                Err(e) => errors.push(format!("query-block-jobs: {e}")),
            }
        }
        if let Some((node, name)) = self.job_bitmap.take() {
            note(
                &mut errors,
                "block-dirty-bitmap-remove (the job's copy)",
                q.bitmap_remove(&node, &name),
            );
        }
        if let Some(node) = self.node.take() {
            note(&mut errors, "blockdev-del", q.blockdev_del(&node));
        }
        if let Some(f) = self.scratch_file.take() {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("remove {}: {e}", f.display()));
                }
            }
        }
        debug!(errors = errors.len(), "fleece torn down");
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img check` finds our scratch images consistent, before and
    /// after data is written to them, and `qemu-img info` reads their size.
    #[test]
    fn scratch_images_are_valid_qcow2() {
        if !crate::testing::require_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for size in [1u64 << 20, (2 << 30) + 512, 3 << 40, 600 << 40] {
            let img = dir.path().join(format!("{size}.qcow2"));
            create_qcow2(&img, size).unwrap();
            let check = |img: &Path| {
                crate::testing::run(
                    std::process::Command::new("qemu-img")
                        .args(["check", "-f", "qcow2"])
                        .arg(img),
                )
            };
            assert!(check(&img).contains("No errors"), "{size}");
            let info = crate::testing::run(
                std::process::Command::new("qemu-img")
                    .args(["info", "--output=json"])
                    .arg(&img),
            );
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(v["virtual-size"], size, "{info}");
            assert_eq!(v["cluster-size"], 65536, "{info}");
            assert_eq!(v["format-specific"]["data"]["compat"], "1.1", "{info}");
            let at = size / 2 / 65536 * 65536;
            crate::testing::qemu_io(
                &img,
                "qcow2",
                &[&format!("write -P 0x5a {at} 192k"), "write -P 0x6b 0 4k"],
            );
            crate::testing::qemu_io(
                &img,
                "qcow2",
                &[
                    &format!("read -P 0x5a {at} 192k"),
                    "read -P 0x6b 0 4k",
                    "read -P 0 4k 60k",
                ],
            );
            let out = check(&img);
            assert!(out.contains("No errors"), "{size}: {out}");
        }
        let e = create_qcow2(&dir.path().join("huge"), 1 << 62).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn names_fit_qemu_limits_and_bitmaps_are_told_apart() {
        let n = Names::new("0123abcd");
        assert!(n.node().len() <= 31, "{}", n.node());
        assert!(n.filter().len() <= 31, "{}", n.filter());
        assert!(n.node().starts_with("ir-0123abcd-fl-"));
        assert!(is_our_bitmap(&n.bitmap("a"), &n.bitmap_prefix("a")));
        assert!(!is_our_bitmap(&n.bitmap("a-b"), &n.bitmap_prefix("a")));
        assert!(!is_our_bitmap("ir-0123abcd-a-", &n.bitmap_prefix("a")));
        assert!(!is_our_bitmap("other", &n.bitmap_prefix("a")));
    }
}
