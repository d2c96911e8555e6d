//! Restore targets: every check happens before the target is opened for
//! writing, so a refused restore changes nothing.
//!
//! Rules (whatever the caller's flags):
//! - never write inside a store: the target's canonical location may not lie
//!   under any directory holding a store `config.json` (the source store or
//!   any other), nor be a hard link to a file of the source store (same device
//!   and inode), nor be the block device holding the source store's
//!   filesystem;
//! - an existing regular file is overwritten only with `force`; the refusal
//!   says what is there (size, and what it looks like);
//! - a block device needs no `force`, but is opened `O_EXCL`, so a mounted
//!   device (or one another program holds exclusively) is refused;
//! - anything else (directory, FIFO, character device) is refused;
//! - the file checked is the file opened: device and inode are compared
//!   after opening, and a new target is created with `O_EXCL`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::CONFIG_KEY;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{CONFIG_FORMAT, IDX_MAGIC, MANIFEST_MAGIC, MIDX_MAGIC, PACK_MAGIC};

/// What the target is, as checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Does not exist yet: created with `O_EXCL`.
    New,
    /// An existing regular file (`force` was given).
    File { dev: u64, ino: u64 },
    /// A block device.
    Block { rdev: u64 },
}

/// A target that passed every check; [`Checked::open`] opens it.
#[derive(Debug)]
pub(crate) struct Checked {
    path: PathBuf,
    kind: Kind,
}

fn refuse(target: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "Refusing to restore to {}: {why}",
        target.display()
    ))
}

/// True when `dir` holds a store's `config.json` (any version).
fn is_store_dir(dir: &Path) -> bool {
    let Ok(mut f) = File::open(dir.join(CONFIG_KEY)) else {
        return false;
    };
    let mut buf = Vec::new();
    if f.by_ref().take(64 << 10).read_to_end(&mut buf).is_err() {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        format: Option<String>,
    }
    serde_json::from_slice::<Probe>(&buf).is_ok_and(|p| p.format.as_deref() == Some(CONFIG_FORMAT))
}

/// The canonical path the target names (its parent canonicalised when it
/// does not exist yet).
fn canonical(target: &Path, exists: bool) -> Result<PathBuf> {
    if exists {
        return fs::canonicalize(target)
            .map_err(|e| Error::io_path("Failed to resolve restore target", target, e));
    }
    let name = target
        .file_name()
        .ok_or_else(|| refuse(target, "it names no file"))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(parent).map_err(|e| {
        Error::io_path(
            "Failed to resolve the directory of restore target",
            target,
            e,
        )
    })?;
    Ok(dir.join(name))
}

/// The store directory that `path` (existing or not) lies in or is, if any:
/// for callers outside the store that must never write into one (a
/// migration target, a state dir), as restore refuses to.
pub fn store_containing(path: &Path) -> Result<Option<PathBuf>> {
    let exists = fs::symlink_metadata(path).is_ok();
    let canon = canonical(path, exists)?;
    Ok(canon
        .ancestors()
        .find(|d| is_store_dir(d))
        .map(Path::to_path_buf))
}

/// What an existing file looks like, for the refusal message.
fn describe_file(path: &Path, len: u64) -> String {
    let mut head = [0u8; 8];
    let kind = match File::open(path).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) if head == PACK_MAGIC => " (it looks like a store pack file)",
        Ok(()) if head == IDX_MAGIC || head == MIDX_MAGIC => " (it looks like a store index file)",
        Ok(()) if head == MANIFEST_MAGIC => " (it looks like a store snapshot manifest)",
        Ok(()) if head.starts_with(b"QFI\xfb") => " (it looks like a qcow2 image)",
        _ => "",
    };
    format!("a regular file of {len} bytes{kind}")
}

/// A file of `store` with this device and inode, if any.
fn find_inode(store: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    let mut dirs = vec![store.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.dev() == dev && m.ino() == ino {
                return Some(e.path());
            }
        }
    }
    None
}

/// Check `target` for a restore from the store at `store`.
pub(crate) fn check(store: &Path, target: &Path, force: bool) -> Result<Checked> {
    let meta = match fs::metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io_path("Failed to stat restore target", target, e)),
    };
    let canon = canonical(target, meta.is_some())?;
    if let Some(dir) = canon.ancestors().skip(1).find(|d| is_store_dir(d)) {
        return Err(refuse(
            target,
            format!("it lies inside the store {}", dir.display()),
        ));
    }
    let store_meta =
        fs::metadata(store).map_err(|e| Error::io_path("Failed to stat store", store, e))?;
    let kind = match &meta {
        None => Kind::New,
        Some(m) if m.file_type().is_block_device() => {
            if m.rdev() == store_meta.dev() {
                return Err(refuse(
                    target,
                    format!("the device holds the store {}", store.display()),
                ));
            }
            Kind::Block { rdev: m.rdev() }
        }
        Some(m) if m.is_file() => {
            if m.nlink() > 1 && m.dev() == store_meta.dev() {
                if let Some(f) = find_inode(store, m.dev(), m.ino()) {
                    return Err(refuse(
                        target,
                        format!("it is a store file (a hard link to {})", f.display()),
                    ));
                }
            }
            if !force {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "Restore target {} already exists ({}); use --force to overwrite it",
                        target.display(),
                        describe_file(target, m.len())
                    ),
                ));
            }
            Kind::File {
                dev: m.dev(),
                ino: m.ino(),
            }
        }
        Some(m) if m.is_dir() => return Err(refuse(target, "it is a directory")),
        Some(_) => return Err(refuse(target, "it is not a regular file or block device")),
    };
    Ok(Checked {
        path: target.to_path_buf(),
        kind,
    })
}

impl Checked {
    /// True when the restore creates the file (and should remove it if it fails).
    pub(crate) fn creates(&self) -> bool {
        self.kind == Kind::New
    }

    /// Open the checked target for an image of `image_size` bytes; returns
    /// the file and whether zero chunks must be written (block devices).
    pub(crate) fn open(&self, image_size: u64) -> Result<(File, bool)> {
        let target = &self.path;
        let open_err = |e| Error::io_path("Failed to open restore target", target, e);
        let mut opts = OpenOptions::new();
        opts.write(true);
        match self.kind {
            Kind::New => {
                opts.create_new(true);
            }
            Kind::File { .. } => {}
            // Fails with EBUSY when the device is mounted.
            Kind::Block { .. } => {
                opts.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
            }
        }
        let mut file = opts.open(target).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                refuse(
                    target,
                    "the device is in use (mounted, or held by another program)",
                )
            } else {
                open_err(e)
            }
        })?;
        let m = file
            .metadata()
            .map_err(|e| Error::io_path("Failed to stat restore target", target, e))?;
        let same = match self.kind {
            Kind::New => m.is_file(),
            Kind::File { dev, ino } => m.is_file() && m.dev() == dev && m.ino() == ino,
            Kind::Block { rdev } => m.file_type().is_block_device() && m.rdev() == rdev,
        };
        if !same {
            return Err(refuse(target, "it changed while it was being checked"));
        }
        if let Kind::Block { .. } = self.kind {
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io_path("Failed to get the size of", target, e))?;
            if size < image_size {
                return Err(Error::invalid(format!(
                    "Restore target {} has {size} bytes, the image needs {image_size}",
                    target.display()
                )));
            }
            return Ok((file, true));
        }
        // Drop old content so that skipped zero chunks read back as zeros
        // (holes).
        file.set_len(0)
            .and_then(|()| file.set_len(image_size))
            .map_err(|e| Error::io_path("Failed to size restore target", target, e))?;
        Ok((file, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_dirs_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_store_dir(dir.path()));
        fs::write(dir.path().join(CONFIG_KEY), br#"{"format":"other"}"#).unwrap();
        assert!(!is_store_dir(dir.path()));
        fs::write(
            dir.path().join(CONFIG_KEY),
            br#"{"format":"instant-recovery-store","version":99}"#,
        )
        .unwrap();
        assert!(is_store_dir(dir.path()), "any version is a store");
        let inside = dir.path().join("packs/x/y.img");
        assert_eq!(
            store_containing(dir.path()).unwrap().as_deref(),
            Some(fs::canonicalize(dir.path()).unwrap().as_path())
        );
        assert_eq!(
            store_containing(&dir.path().join("new")).unwrap(),
            store_containing(dir.path()).unwrap()
        );
        assert!(store_containing(&inside).is_err(), "missing parent dir");
        let outside = tempfile::tempdir().unwrap();
        assert_eq!(store_containing(&outside.path().join("x")).unwrap(), None);
    }

    #[test]
    fn checks_refuse_before_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("s");
        crate::Store::init(&store, 4096).unwrap();
        let other = dir.path().join("other");
        crate::Store::init(&other, 4096).unwrap();
        let kind = |p: &Path, force| check(&store, p, force).map(|c| c.kind);
        for inside in [
            store.join(CONFIG_KEY),
            store.join("packs/new.img"),
            other.join("x.img"),
            dir.path().join("s/../s/snapshots/x"),
        ] {
            let e = kind(&inside, true).unwrap_err();
            assert!(e.to_string().contains("lies inside the store"), "{e}");
        }
        // A hard link to a store file, from outside.
        let link = dir.path().join("link");
        fs::hard_link(store.join(CONFIG_KEY), &link).unwrap();
        let e = kind(&link, true).unwrap_err();
        assert!(e.to_string().contains("is a store file"), "{e}");

        let f = dir.path().join("f.img");
        assert_eq!(kind(&f, false).unwrap(), Kind::New);
        fs::write(&f, [7u8; 1000]).unwrap();
        let e = kind(&f, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(
            e.to_string().contains("a regular file of 1000 bytes"),
            "{e}"
        );
        assert!(matches!(kind(&f, true).unwrap(), Kind::File { .. }));
        fs::write(&f, crate::format::pack_header()).unwrap();
        let e = kind(&f, false).unwrap_err();
        assert!(e.to_string().contains("store pack file"), "{e}");
        let e = kind(dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = kind(&dir.path().join("nodir/x"), true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // Checked, then replaced by another file: refused at open.
        let c = check(&store, &f, true).unwrap();
        fs::rename(&f, dir.path().join("old")).unwrap();
        fs::write(&f, b"new").unwrap();
        let e = c.open(10).unwrap_err();
        assert!(e.to_string().contains("changed while"), "{e}");
        assert_eq!(fs::read(&f).unwrap(), b"new");
    }
}
