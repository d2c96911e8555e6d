//! `restore-files`: copy files and trees out of a snapshot into a local
//! directory.
//!
//! Safety against a hostile image: every name is checked (no `/`, NUL, `.`,
//! `..`); every directory written into was created by us or checked to be a
//! real directory (never a symlink) under the target; files are created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`; symlinks are recreated as links, never
//! followed. Nothing existing is replaced without `force` (existing
//! directories are merged into). Depth is capped at [`MAX_DEPTH`].
//!
//! Files keep mode, mtime, and owner when run as root; all-zero 4 KiB blocks
//! are left as holes, so sparse files stay sparse. Hard links are restored
//! as separate copies. Device nodes, fifos and sockets are skipped (listed).
//! A failure on one file or directory is recorded and the rest goes on.
//!
//! Known limit: `ext4-view` does not expose inode numbers, so a directory
//! hard-linked into its own subtree (invalid, but a hostile image can hold
//! one) is not recognised as a cycle; the walk stops only at [`MAX_DEPTH`],
//! and several such links multiply the work. Fixing it needs inode numbers
//! from the reader (an upstream API) to keep a set of directories entered.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
use serde::Serialize;

use crate::browse::{chain, join, Browser, Entry, EntryKind, MAX_DIR_ENTRIES};
use crate::disk::Location;
use crate::error::{Error, Result};

/// Deepest tree restored.
pub const MAX_DEPTH: usize = 256;

/// Options of a restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Replace existing files, links and non-directories.
    pub force: bool,
}

/// One path that could not be restored.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Device nodes, fifos and sockets, not restored.
    pub skipped: Vec<String>,
    pub failed: Vec<Failure>,
}

fn write_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Write {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(shown: &str, name: &[u8]) -> Result<()> {
    let reason = if name.is_empty() {
        "empty name"
    } else if name == b"." || name == b".." {
        "name is '.' or '..'"
    } else if name.contains(&b'/') || name.contains(&0) {
        "name contains '/' or NUL"
    } else {
        return Ok(());
    };
    Err(Error::BadName {
        path: shown.to_string(),
        reason,
    })
}

struct Restorer<'a> {
    b: &'a Browser,
    opts: RestoreOptions,
    root: bool,
    report: RestoreReport,
}

/// Restore each of `paths` (user paths) into `to` under its own name
/// (`/p1/etc` → `TO/etc`; `/` → its contents into `TO`). `to` is created if
/// missing. Failures of single paths are in the report, not an `Err`.
pub fn restore(
    b: &Browser,
    paths: &[String],
    to: &Path,
    opts: RestoreOptions,
) -> Result<RestoreReport> {
    fs::create_dir_all(to).map_err(write_err("create directory", to))?;
    let mut r = Restorer {
        b,
        opts,
        root: rustix::process::geteuid().is_root(),
        report: RestoreReport::default(),
    };
    for p in paths {
        if let Err(e) = r.top(p, to) {
            r.fail(p, &e);
        }
    }
    Ok(r.report)
}

impl Restorer<'_> {
    fn fail(&mut self, path: &str, e: &Error) {
        tracing::debug!(path, error = %chain(e), "not restored");
        self.report.failed.push(Failure {
            path: path.to_string(),
            error: chain(e),
        });
    }

    fn top(&mut self, path: &str, to: &Path) -> Result<()> {
        let disk = self.b.disk().clone();
        match disk.locate(path)? {
            Location::Top => {
                for vol in 0..disk.volumes().len() {
                    let name = disk.volumes()[vol].name.clone();
                    let shown = format!("/{name}");
                    if let Err(e) = self.volume_root(vol, &to.join(&name)) {
                        self.fail(&shown, &e);
                    }
                }
                Ok(())
            }
            Location::Volume { vol, inner } => {
                if inner == "/" {
                    let name = &disk.volumes()[vol].name;
                    let dest = if name.is_empty() {
                        to.to_path_buf()
                    } else {
                        to.join(name)
                    };
                    return self.volume_root(vol, &dest);
                }
                let e = self.b.stat_in(vol, inner.as_bytes())?;
                let dest = to.join(std::ffi::OsStr::from_bytes(&e.raw_name));
                self.entry(vol, inner.as_bytes(), &e, &dest, 0)
            }
        }
    }

    fn volume_root(&mut self, vol: usize, dest: &Path) -> Result<()> {
        let e = self.b.stat_in(vol, b"/")?;
        self.entry(vol, b"/", &e, dest, 0)
    }

    /// Make room for a new non-directory at `dest` (or check a directory).
    fn prepare(&self, dest: &Path, want_dir: bool) -> Result<bool> {
        match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(write_err("inspect", dest)(e)),
            Ok(m) if want_dir && m.is_dir() => Ok(true),
            Ok(_) if !self.opts.force => Err(Error::Exists {
                path: dest.to_path_buf(),
            }),
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(dest).map_err(write_err("remove", dest))?;
                Ok(false)
            }
            Ok(_) => {
                fs::remove_file(dest).map_err(write_err("remove", dest))?;
                Ok(false)
            }
        }
    }

    fn entry(
        &mut self,
        vol: usize,
        src: &[u8],
        e: &Entry,
        dest: &Path,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep {
                path: e.path.clone(),
                limit: MAX_DEPTH,
            });
        }
        match e.kind {
            EntryKind::Dir | EntryKind::Partition => self.dir(vol, src, e, dest, depth),
            EntryKind::File => {
                self.prepare(dest, false)?;
                self.file(vol, src, dest)?;
                self.report.files += 1;
                self.finish(e, dest)
            }
            EntryKind::Symlink => {
                self.prepare(dest, false)?;
                let target = e.raw_target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), dest)
                    .map_err(write_err("create symlink", dest))?;
                self.report.symlinks += 1;
                self.finish(e, dest)
            }
            _ => {
                self.report.skipped.push(e.path.clone());
                Ok(())
            }
        }
    }

    fn dir(&mut self, vol: usize, src: &[u8], e: &Entry, dest: &Path, depth: usize) -> Result<()> {
        if !self.prepare(dest, true)? {
            fs::create_dir(dest).map_err(write_err("create directory", dest))?;
            // Writable by us until its children are in.
            fs::set_permissions(dest, fs::Permissions::from_mode(0o700))
                .map_err(write_err("chmod", dest))?;
        }
        self.report.dirs += 1;
        let children = self.b.list_in(vol, src, MAX_DIR_ENTRIES)?;
        for c in &children {
            let path = join(src, &c.raw_name);
            let res = check_name(&c.path, &c.raw_name).and_then(|()| {
                let d = dest.join(std::ffi::OsStr::from_bytes(&c.raw_name));
                self.entry(vol, &path, c, &d, depth + 1)
            });
            if let Err(err) = res {
                self.fail(&c.path, &err);
            }
        }
        self.finish(e, dest)
    }

    fn file(&mut self, vol: usize, src: &[u8], dest: &Path) -> Result<()> {
        let mut reader = self.b.open_in(vol, src)?;
        let out: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .map_err(write_err("create", dest))?;
        let res = copy_sparse(&mut reader, &out, dest);
        if res.is_err() {
            drop(out);
            let _ = fs::remove_file(dest);
        }
        self.report.bytes += res?;
        Ok(())
    }

    /// Mode, owner (as root) and mtime, without following a symlink.
    fn finish(&self, e: &Entry, dest: &Path) -> Result<()> {
        if self.root {
            std::os::unix::fs::lchown(dest, Some(e.uid), Some(e.gid))
                .map_err(write_err("chown", dest))?;
        }
        if e.kind != EntryKind::Symlink {
            fs::set_permissions(dest, fs::Permissions::from_mode(e.mode & 0o7777))
                .map_err(write_err("chmod", dest))?;
        }
        let t = Timespec {
            tv_sec: e.mtime,
            tv_nsec: e.mtime_nsec as _,
        };
        let times = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(CWD, dest, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| write_err("set times of", dest)(err.into()))?;
        Ok(())
    }
}

/// Copies a file, leaving all-zero 4 KiB blocks as holes. Returns its size.
pub fn copy_sparse(reader: &mut crate::browse::FileReader, out: &File, dest: &Path) -> Result<u64> {
    const BLOCK: usize = 4096;
    let size = reader.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = reader.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            out.write_all_at(block, off + (i * BLOCK) as u64)
                .map_err(write_err("write", dest))?;
        }
        off += n as u64;
    }
    out.set_len(size).map_err(write_err("write", dest))?;
    Ok(size)
}
