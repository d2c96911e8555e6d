//! Reading inside volumes: [`Browser`] opens each readable filesystem once
//! (lazily, through `ext4-view` over the volume's bytes) and answers
//! `stat`, `list`, `read_link` and `open` with bounded work.
//!
//! Symlinks are resolved here (`Browser::resolve`), not by `ext4-view`:
//! it reads a link's target whole, sized by the link's inode, so a hostile
//! inode claiming a 200 GB target would exhaust memory. We check every
//! link's size (`MAX_SYMLINK_LEN`) before reading its target and hand
//! `ext4-view` only paths whose directory components are real directories.
//! Resolution stays inside the filesystem: an absolute target starts at
//! that filesystem's root and `..` stops there, so no name in an image can
//! reach another volume or the host; at most [`MAX_SYMLINK_HOPS`] links are
//! followed per path. Directory listings are capped at [`MAX_DIR_ENTRIES`].
//!
//! A `Browser` is not `Send` (the filesystem handles are `Rc`-based); the
//! [`Disk`] below it is, so each thread makes its own browser.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::io;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};
use serde::Serialize;

use crate::detect::FsKind;
use crate::device::{ReadAt, Slice};
use crate::disk::{Disk, Location};
use crate::error::{Error, Result};

/// Most entries accepted from one directory of an image.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;

/// Largest file opened: ext4's own limit with 4 KiB blocks (16 TiB). A
/// larger size is a damaged or hostile inode, and seeking into it would walk
/// more blocks than any real file has.
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Block,
    Char,
    Fifo,
    Socket,
    /// A partition at the top of a partitioned disk.
    Partition,
}

impl EntryKind {
    /// `ls -l` type letter.
    pub fn letter(self) -> char {
        match self {
            EntryKind::File => '-',
            EntryKind::Dir | EntryKind::Partition => 'd',
            EntryKind::Symlink => 'l',
            EntryKind::Block => 'b',
            EntryKind::Char => 'c',
            EntryKind::Fifo => 'p',
            EntryKind::Socket => 's',
        }
    }

    fn of(t: FileType) -> EntryKind {
        match t {
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => EntryKind::Symlink,
            FileType::BlockDevice => EntryKind::Block,
            FileType::CharacterDevice => EntryKind::Char,
            FileType::Fifo => EntryKind::Fifo,
            FileType::Socket => EntryKind::Socket,
            _ => EntryKind::File,
        }
    }
}

/// One file, directory, link or partition, as `ls -l` and `--json` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Name (lossy UTF-8; `raw_name` has the bytes).
    pub name: String,
    /// User-visible path from the snapshot's top.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Filesystem of a partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsKind>,
    /// Filesystem label of a partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The name's bytes.
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    /// Symlink target bytes.
    #[serde(skip)]
    pub raw_target: Option<Vec<u8>>,
}

/// The full chain of an error, `a: b: c`.
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `ext4-view`'s reader trait over a volume's bytes.
struct ExtReader(Slice);

impl Ext4Read for ExtReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn StdError + Send + Sync + 'static>> {
        self.0
            .read_at(dst, start_byte)
            .map_err(|e| Box::new(io::Error::other(chain(&e))) as _)
    }
}

/// Longest symlink target ext4 can hold (one block, at most 4 KiB, less
/// the terminating NUL; Linux's PATH_MAX). ext4-view reads a target whole,
/// sized by the inode, so a hostile size must be refused before it asks.
const MAX_SYMLINK_LEN: u64 = 4096;

/// Most symlinks followed while resolving one path (Linux's limit).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// Refuses a symlink whose inode claims a target longer than ext4 allows.
fn check_symlink_len(path: &str, len: u64) -> Result<()> {
    if len > MAX_SYMLINK_LEN {
        return Err(Error::Damaged {
            path: path.to_string(),
            what: "symlink target longer than 4096 bytes",
        });
    }
    Ok(())
}

fn fs_err(path: &str, e: Ext4Error) -> Error {
    let path = path.to_string();
    match e {
        Ext4Error::NotFound => Error::NotFound { path },
        Ext4Error::NotADirectory => Error::NotADirectory { path },
        Ext4Error::IsADirectory => Error::IsADirectory { path },
        Ext4Error::IsASpecialFile => Error::NotRegular { path },
        source => Error::Filesystem { path, source },
    }
}

/// Joins a directory path and a name (both raw bytes).
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Checks the ext superblock numbers that size `ext4-view`'s allocations
/// on load: the filesystem must fit its volume and have groups of at least
/// 256 blocks (as `mke2fs` makes), so a hostile superblock cannot make it
/// allocate descriptors for billions of groups. `Ok(Err(reason))` when bad.
fn check_superblock(vol: &Slice) -> Result<std::result::Result<(), String>> {
    let mut sb = [0u8; 1024];
    if vol.size() < 2048 {
        return Ok(Err("the volume is smaller than a superblock".into()));
    }
    vol.read_at(&mut sb, 1024)?;
    let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    let log = u32_at(0x18);
    if log > 6 {
        return Ok(Err(format!("block size exponent {log} is out of range")));
    }
    let block_size = 1024u64 << log;
    let blocks = (u64::from(u32_at(0x150)) << 32) | u64::from(u32_at(0x4));
    let per_group = u64::from(u32_at(0x20));
    let fs_bytes = blocks.saturating_mul(block_size);
    if fs_bytes > vol.size() {
        return Ok(Err(format!(
            "it claims {fs_bytes} bytes, more than the {} of its volume (damaged or truncated)",
            vol.size()
        )));
    }
    if per_group < 256 {
        return Ok(Err(format!("{per_group} blocks per group is out of range")));
    }
    Ok(Ok(()))
}

/// Reads the filesystems of one [`Disk`] (one per thread).
pub struct Browser {
    disk: Arc<Disk>,
    fs: RefCell<HashMap<usize, Ext4>>,
}

impl Browser {
    pub fn new(disk: Arc<Disk>) -> Browser {
        Browser {
            disk,
            fs: RefCell::new(HashMap::new()),
        }
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The filesystem of volume `vol`, opened on first use.
    pub fn fs(&self, vol: usize) -> Result<Ext4> {
        if let Some(fs) = self.fs.borrow().get(&vol) {
            return Ok(fs.clone());
        }
        self.disk.check_readable(vol)?;
        let v = &self.disk.volumes()[vol];
        let part = if v.name.is_empty() {
            "the disk".to_string()
        } else {
            v.name.clone()
        };
        let dev = self.disk.volume_device(vol);
        if let Err(reason) = check_superblock(&dev)? {
            return Err(Error::Superblock { part, reason });
        }
        let reader = ExtReader(dev);
        let fs = Ext4::load(Box::new(reader)).map_err(|source| Error::OpenFilesystem {
            part,
            detected: v.fs.to_string(),
            source,
        })?;
        self.fs.borrow_mut().insert(vol, fs.clone());
        Ok(fs)
    }

    fn shown(&self, vol: usize, inner: &[u8]) -> String {
        self.disk.display_path(vol, &String::from_utf8_lossy(inner))
    }

    /// The entry of a partition at the top of a partitioned disk.
    pub fn partition_entry(&self, vol: usize) -> Entry {
        let v = &self.disk.volumes()[vol];
        Entry {
            name: v.name.clone(),
            path: format!("/{}", v.name),
            kind: EntryKind::Partition,
            mode: 0o555,
            uid: 0,
            gid: 0,
            size: v.size,
            mtime: 0,
            mtime_nsec: 0,
            target: None,
            fs: Some(v.fs),
            label: v.label.clone(),
            raw_name: v.name.clone().into_bytes(),
            raw_target: None,
        }
    }

    fn entry(&self, vol: usize, path: &[u8], name: &[u8], m: &Metadata) -> Result<Entry> {
        let kind = EntryKind::of(m.file_type());
        let raw_target = if kind == EntryKind::Symlink {
            check_symlink_len(&self.shown(vol, path), m.len())?;
            let fs = self.fs(vol)?;
            let t = fs
                .read_link(path)
                .map_err(|e| fs_err(&self.shown(vol, path), e))?;
            Some(t.as_ref().to_vec())
        } else {
            None
        };
        let mtime = m.modified();
        Ok(Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            path: self.shown(vol, path),
            kind,
            mode: m.mode() as u32,
            uid: m.uid(),
            gid: m.gid(),
            size: m.len(),
            mtime: mtime.seconds(),
            mtime_nsec: mtime.nanoseconds(),
            target: raw_target
                .as_ref()
                .map(|t| String::from_utf8_lossy(t).into_owned()),
            fs: None,
            label: None,
            raw_name: name.to_vec(),
            raw_target,
        })
    }

    /// `inner` with every symlink in its directory components (and in its
    /// last one, with `follow_last`) replaced by its target, so that
    /// `ext4-view` follows none itself. Each link's size is checked before
    /// its target is read; `..` stops at the filesystem's root.
    fn resolve(&self, fs: &Ext4, vol: usize, inner: &[u8], follow_last: bool) -> Result<Vec<u8>> {
        let parts = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut todo: std::collections::VecDeque<Vec<u8>> = parts(inner).into();
        let mut done: Vec<Vec<u8>> = Vec::new();
        let mut hops = 0;
        let path_of = |done: &[Vec<u8>]| {
            let mut p = Vec::new();
            for c in done {
                p.push(b'/');
                p.extend_from_slice(c);
            }
            if p.is_empty() {
                p.push(b'/');
            }
            p
        };
        while let Some(c) = todo.pop_front() {
            if c == b".." {
                done.pop();
                continue;
            }
            done.push(c);
            let here = path_of(&done);
            if todo.is_empty() && !follow_last {
                break;
            }
            let m = fs
                .symlink_metadata(here.as_slice())
                .map_err(|e| fs_err(&self.shown(vol, &here), e))?;
            if m.file_type() != FileType::Symlink {
                continue;
            }
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(Error::Damaged {
                    path: self.shown(vol, inner),
                    what: "more than 40 symlinks to follow",
                });
            }
            check_symlink_len(&self.shown(vol, &here), m.len())?;
            let target = fs
                .read_link(here.as_slice())
                .map_err(|e| fs_err(&self.shown(vol, &here), e))?;
            let target = target.as_ref();
            done.pop();
            if target.first() == Some(&b'/') {
                done.clear();
            }
            for t in parts(target).into_iter().rev() {
                todo.push_front(t);
            }
        }
        Ok(path_of(&done))
    }

    /// `lstat` of `inner` (absolute, raw bytes) in volume `vol`.
    pub fn stat_in(&self, vol: usize, inner: &[u8]) -> Result<Entry> {
        let fs = self.fs(vol)?;
        let real = self.resolve(&fs, vol, inner, false)?;
        let m = fs
            .symlink_metadata(real.as_slice())
            .map_err(|e| fs_err(&self.shown(vol, inner), e))?;
        let name = inner.rsplit(|&b| b == b'/').next().unwrap_or(b"");
        let mut e = self.entry(vol, &real, name, &m)?;
        e.path = self.shown(vol, inner);
        if inner == b"/" {
            e.name = self.disk.volumes()[vol].name.clone();
            e.raw_name = e.name.clone().into_bytes();
        }
        Ok(e)
    }

    /// Names and types in directory `inner` of `vol` (no inode reads beyond
    /// the directory's own), at most `limit`.
    pub fn names_in(
        &self,
        vol: usize,
        inner: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, EntryKind)>> {
        let mut out = Vec::new();
        self.each_in(vol, inner, limit, |name, de| {
            let t = de
                .file_type()
                .map_err(|e| fs_err(&self.shown(vol, &join(inner, name)), e))?;
            out.push((name.to_vec(), EntryKind::of(t)));
            Ok(())
        })?;
        Ok(out)
    }

    /// Entries of directory `inner` of `vol` with their metadata, sorted by
    /// name, at most `limit`.
    pub fn list_in(&self, vol: usize, inner: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let real = self.resolve(&self.fs(vol)?, vol, inner, true)?;
        self.each_in(vol, &real, limit, |name, de| {
            let path = join(inner, name);
            let m = de
                .metadata()
                .map_err(|e| fs_err(&self.shown(vol, &path), e))?;
            let mut e = self.entry(vol, &join(&real, name), name, &m)?;
            e.path = self.shown(vol, &path);
            out.push(e);
            Ok(())
        })?;
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn each_in(
        &self,
        vol: usize,
        inner: &[u8],
        limit: usize,
        mut f: impl FnMut(&[u8], &ext4_view::DirEntry) -> Result<()>,
    ) -> Result<()> {
        let fs = self.fs(vol)?;
        let shown = || self.shown(vol, inner);
        let real = self.resolve(&fs, vol, inner, true)?;
        let mut n = 0usize;
        for de in fs
            .read_dir(real.as_slice())
            .map_err(|e| fs_err(&shown(), e))?
        {
            let de = de.map_err(|e| fs_err(&shown(), e))?;
            let name = de.file_name();
            let name = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            n += 1;
            if n > limit {
                return Err(Error::TooManyEntries {
                    path: shown(),
                    limit,
                });
            }
            f(name, &de)?;
        }
        Ok(())
    }

    /// The target of symlink `inner` in `vol`.
    pub fn read_link_in(&self, vol: usize, inner: &[u8]) -> Result<Vec<u8>> {
        let fs = self.fs(vol)?;
        let real = self.resolve(&fs, vol, inner, false)?;
        let m = fs
            .symlink_metadata(real.as_slice())
            .map_err(|e| fs_err(&self.shown(vol, inner), e))?;
        check_symlink_len(&self.shown(vol, inner), m.len())?;
        let t = fs
            .read_link(real.as_slice())
            .map_err(|e| fs_err(&self.shown(vol, inner), e))?;
        Ok(t.as_ref().to_vec())
    }

    /// Open regular file `inner` of `vol` (symlinks followed inside the
    /// filesystem).
    pub fn open_in(&self, vol: usize, inner: &[u8]) -> Result<FileReader> {
        let fs = self.fs(vol)?;
        let path = self.shown(vol, inner);
        let real = self.resolve(&fs, vol, inner, true)?;
        let file = fs.open(real.as_slice()).map_err(|e| fs_err(&path, e))?;
        let size = file.metadata().len();
        if size > MAX_FILE_SIZE {
            return Err(Error::FileTooLarge {
                path,
                size,
                limit: MAX_FILE_SIZE,
            });
        }
        Ok(FileReader { size, file, path })
    }

    /// `lstat` of a user path.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        match self.disk.locate(path)? {
            Location::Top => Ok(Entry {
                name: "/".into(),
                path: "/".into(),
                kind: EntryKind::Dir,
                mode: 0o555,
                uid: 0,
                gid: 0,
                size: self.disk.device().size(),
                mtime: 0,
                mtime_nsec: 0,
                target: None,
                fs: None,
                label: None,
                raw_name: Vec::new(),
                raw_target: None,
            }),
            Location::Volume { vol, inner } if inner == "/" && self.disk.partitioned() => {
                let mut e = self.partition_entry(vol);
                if self.disk.volumes()[vol].fs.readable() {
                    let root = self.stat_in(vol, b"/")?;
                    e.mode = root.mode;
                    e.uid = root.uid;
                    e.gid = root.gid;
                    e.mtime = root.mtime;
                    e.mtime_nsec = root.mtime_nsec;
                }
                Ok(e)
            }
            Location::Volume { vol, inner } => self.stat_in(vol, inner.as_bytes()),
        }
    }

    /// What `ls PATH` shows: a directory's entries, or the entry itself.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        match self.disk.locate(path)? {
            Location::Top => Ok((0..self.disk.volumes().len())
                .map(|v| self.partition_entry(v))
                .collect()),
            Location::Volume { vol, inner } => {
                let e = self.stat_in(vol, inner.as_bytes())?;
                if e.kind == EntryKind::Dir {
                    self.list_in(vol, inner.as_bytes(), MAX_DIR_ENTRIES)
                } else {
                    Ok(vec![e])
                }
            }
        }
    }

    /// Open a user path for reading.
    pub fn open(&self, path: &str) -> Result<FileReader> {
        match self.disk.locate(path)? {
            Location::Top => Err(Error::IsADirectory { path: path.into() }),
            Location::Volume { vol, inner } => self.open_in(vol, inner.as_bytes()),
        }
    }
}

/// An open regular file.
pub struct FileReader {
    file: ext4_view::File,
    path: String,
    size: u64,
}

impl FileReader {
    /// File size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// User-visible path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Read up to `buf.len()` bytes at `offset`; fewer only at end of file.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let err = |e| fs_err(&self.path, e);
        if offset >= self.size {
            return Ok(0);
        }
        if self.file.position() != offset {
            self.file.seek_to(offset).map_err(err)?;
        }
        let want = buf
            .len()
            .min((self.size - offset).min(usize::MAX as u64) as usize);
        let mut done = 0;
        while done < want {
            // ext4-view 1.0 unwraps the next block of a file whose block
            // list ends before its size (a damaged inode): contain that
            // panic to this file.
            let file = &mut self.file;
            let dst = &mut buf[done..want];
            let res =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| file.read_bytes(dst)));
            match res {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => done += n,
                Ok(Err(e)) => {
                    // Start over at a clean position on the next call.
                    let _ = self.file.seek_to(0);
                    return Err(fs_err(&self.path, e));
                }
                Err(_) => {
                    let _ = self.file.seek_to(0);
                    return Err(Error::Damaged {
                        path: self.path.clone(),
                        what: "its block list ends before its size",
                    });
                }
            }
        }
        Ok(done)
    }
}
