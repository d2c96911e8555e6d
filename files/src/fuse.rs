//! `mount`: a read-only FUSE view of a snapshot (through `fuser`, without
//! the libfuse C library: as root it mounts directly, otherwise through the
//! setuid `fusermount3`).
//!
//! ```text
//! MOUNTPOINT/disk.raw      the whole image, read-only (loop-mount it for
//!                          filesystems that are not read in-process)
//! MOUNTPOINT/p1/ ...       each partition; its tree if readable, else empty
//! MOUNTPOINT/fs/ ...       the filesystem of an unpartitioned disk
//! ```
//! Needs `/dev/fuse`, and either root or `fusermount3` (Debian: `fuse3`).
//! Inode numbers are handed out on lookup and kept for the mount's life.
//! One FUSE thread serves requests; it keeps its `Browser` and open files in
//! thread-local storage (the `ext4-view` handles are not `Send`). The
//! [`SnapshotDevice`](crate::device::SnapshotDevice) below holds the
//! snapshot's shared lock until unmount, so gc cannot delete its chunks.
//! SIGINT and SIGTERM unmount cleanly.
//!
//! An unmount does not always end the FUSE session: a process in another
//! mount namespace made while we were mounted (libvirt starts every QEMU
//! in one by default, and with private propagation it keeps a copy of our
//! mount) pins the connection, and the kernel keeps sending requests from
//! that copy. So after a signal's unmount the session gets
//! [`ABORT_GRACE`] to end, then the connection is aborted through fusectl
//! (`/sys/fs/fuse/connections/N/abort`): the copies answer ENOTCONN and
//! `mount` exits. Without fusectl it exits anyway, after a warning.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

use crate::browse::{chain, join, Browser, Entry, EntryKind, FileReader, MAX_DIR_ENTRIES};
use crate::disk::Disk;
use crate::error::{Error, Result};

/// The image never changes under a mount: let the kernel cache for long.
const TTL: Duration = Duration::from_secs(3600);
/// Path of the FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";
/// How long the session may outlive its unmount before the connection is
/// aborted (see the module doc).
pub const ABORT_GRACE: Duration = Duration::from_secs(3);
/// Where fusectl exposes each FUSE connection, by its device minor.
const FUSECTL: &str = "/sys/fs/fuse/connections";
const DISK_RAW: &str = "disk.raw";
const UNPARTITIONED_DIR: &str = "fs";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Node {
    Top,
    DiskRaw,
    /// A volume that is not read in-process: an empty directory.
    Opaque(usize),
    /// A path inside a readable volume.
    Fs(usize, Vec<u8>),
}

#[derive(Default)]
struct Inodes {
    nodes: Vec<Node>,
    by_node: HashMap<Node, u64>,
}

impl Inodes {
    fn ino(&mut self, n: Node) -> u64 {
        if let Some(&i) = self.by_node.get(&n) {
            return i;
        }
        self.nodes.push(n.clone());
        let i = self.nodes.len() as u64;
        self.by_node.insert(n, i);
        i
    }
}

type Listing = Arc<Vec<(u64, FileType, OsString)>>;

thread_local! {
    static BROWSER: RefCell<Option<Browser>> = const { RefCell::new(None) };
    static FILES: RefCell<HashMap<u64, FileReader>> = RefCell::new(HashMap::new());
}

/// The FUSE filesystem.
pub struct SnapshotFs {
    disk: Arc<Disk>,
    time: SystemTime,
    inodes: Mutex<Inodes>,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn fuse_kind(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir | EntryKind::Partition => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Block => FileType::BlockDevice,
        EntryKind::Char => FileType::CharDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
    }
}

fn errno(e: &Error) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::error!(error = %chain(e), "read failed");
    } else {
        tracing::debug!(error = %chain(e), "request failed");
    }
    Errno::from_i32(n)
}

impl SnapshotFs {
    /// A filesystem over `disk`; `time` is shown for synthetic entries.
    pub fn new(disk: Arc<Disk>, time: SystemTime) -> SnapshotFs {
        let mut inodes = Inodes::default();
        inodes.ino(Node::Top);
        SnapshotFs {
            disk,
            time,
            inodes: Mutex::new(inodes),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn with_browser<T>(&self, f: impl FnOnce(&Browser) -> T) -> T {
        BROWSER.with(|b| {
            let mut b = b.borrow_mut();
            if !b
                .as_ref()
                .is_some_and(|x| Arc::ptr_eq(x.disk(), &self.disk))
            {
                *b = Some(Browser::new(self.disk.clone()));
            }
            f(b.as_ref().expect("browser just set"))
        })
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        let i = u64::from(ino);
        lock(&self.inodes)
            .nodes
            .get(i.checked_sub(1)? as usize)
            .cloned()
    }

    fn synthetic(&self, ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    fn entry_attr(&self, ino: u64, e: &Entry) -> FileAttr {
        let mtime = if e.mtime >= 0 {
            UNIX_EPOCH + Duration::new(e.mtime as u64, e.mtime_nsec.min(999_999_999))
        } else {
            UNIX_EPOCH
        };
        let kind = fuse_kind(e.kind);
        FileAttr {
            ino: INodeNo(ino),
            size: e.size,
            blocks: e.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (e.mode & 0o7777) as u16,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: e.uid,
            gid: e.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// The node for a volume's root as shown at the top.
    fn volume_node(&self, vol: usize) -> Node {
        if self.disk.volumes()[vol].fs.readable() {
            Node::Fs(vol, b"/".to_vec())
        } else {
            Node::Opaque(vol)
        }
    }

    fn attr(&self, ino: u64, node: &Node) -> Result<FileAttr> {
        Ok(match node {
            Node::Top => self.synthetic(ino, FileType::Directory, 0, 0o555),
            Node::DiskRaw => {
                self.synthetic(ino, FileType::RegularFile, self.disk.device().size(), 0o444)
            }
            Node::Opaque(_) => self.synthetic(ino, FileType::Directory, 0, 0o555),
            Node::Fs(vol, path) => {
                let e = self.with_browser(|b| b.stat_in(*vol, path))?;
                self.entry_attr(ino, &e)
            }
        })
    }

    /// Children of a directory node: (node, kind, name).
    fn children(&self, node: &Node) -> Result<Vec<(Node, FileType, OsString)>> {
        match node {
            Node::Top => {
                let mut out = vec![(Node::DiskRaw, FileType::RegularFile, DISK_RAW.into())];
                for (vol, v) in self.disk.volumes().iter().enumerate() {
                    let name = if v.name.is_empty() {
                        UNPARTITIONED_DIR.to_string()
                    } else {
                        v.name.clone()
                    };
                    out.push((self.volume_node(vol), FileType::Directory, name.into()));
                }
                Ok(out)
            }
            Node::Opaque(_) => Ok(Vec::new()),
            Node::DiskRaw => Err(Error::NotADirectory {
                path: format!("/{DISK_RAW}"),
            }),
            Node::Fs(vol, path) => {
                let names = self.with_browser(|b| b.names_in(*vol, path, MAX_DIR_ENTRIES))?;
                Ok(names
                    .into_iter()
                    .map(|(name, kind)| {
                        let child = Node::Fs(*vol, join(path, &name));
                        (child, fuse_kind(kind), OsStr::from_bytes(&name).to_owned())
                    })
                    .collect())
            }
        }
    }
}

impl Filesystem for SnapshotFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(node) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let child = match &node {
            Node::Fs(vol, path) => Node::Fs(*vol, join(path, name.as_bytes())),
            Node::Top | Node::Opaque(_) | Node::DiskRaw => {
                let found = self
                    .children(&node)
                    .ok()
                    .and_then(|c| c.into_iter().find(|(_, _, n)| n == name).map(|(n, _, _)| n));
                match found {
                    Some(n) => n,
                    None => return reply.error(Errno::ENOENT),
                }
            }
        };
        if let Node::Fs(vol, path) = &child {
            // Stat before handing out an inode for a name that may not exist.
            return match self.with_browser(|b| b.stat_in(*vol, path)) {
                Ok(e) => {
                    let ino = lock(&self.inodes).ino(child.clone());
                    reply.entry(&TTL, &self.entry_attr(ino, &e), Generation(0))
                }
                Err(e) => reply.error(errno(&e)),
            };
        }
        let ino = lock(&self.inodes).ino(child.clone());
        match self.attr(ino, &child) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.attr(u64::from(ino), &node) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Some(Node::Fs(vol, path)) => match self.with_browser(|b| b.read_link_in(vol, &path)) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            },
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.node(ino) {
            Some(Node::DiskRaw) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(Node::Fs(vol, path)) => match self.with_browser(|b| b.open_in(vol, &path)) {
                Ok(f) => {
                    let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                    FILES.with(|m| m.borrow_mut().insert(fh, f));
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                }
                Err(e) => reply.error(errno(&e)),
            },
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(Node::DiskRaw) = self.node(ino) {
            let dev = self.disk.device();
            let end = offset.saturating_add(size as u64).min(dev.size());
            let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
            return match dev.read_at(&mut buf, offset) {
                Ok(()) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            };
        }
        let res = FILES.with(|m| {
            let mut m = m.borrow_mut();
            let f = m.get_mut(&fh.0)?;
            let mut buf = vec![0u8; size as usize];
            Some(f.read_at(&mut buf, offset).map(|n| {
                buf.truncate(n);
                buf
            }))
        });
        match res {
            Some(Ok(buf)) => reply.data(&buf),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(Errno::EBADF),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        FILES.with(|m| m.borrow_mut().remove(&fh.0));
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(node) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let children = match self.children(&node) {
            Ok(c) => c,
            Err(e) => return reply.error(errno(&e)),
        };
        let listing: Vec<_> = {
            let mut inodes = lock(&self.inodes);
            children
                .into_iter()
                .map(|(n, k, name)| (inodes.ino(n), k, name))
                .collect()
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(listing));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(listing) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let dots = [
            (u64::from(ino), FileType::Directory, "."),
            (u64::from(ino), FileType::Directory, ".."),
        ];
        let all = dots
            .iter()
            .map(|(i, k, n)| (*i, *k, OsStr::new(n)))
            .chain(listing.iter().map(|(i, k, n)| (*i, *k, n.as_os_str())));
        for (idx, (i, k, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), idx as u64 + 1, k, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: fuser::ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }
}

/// Checks that `path` is an empty directory.
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Mountpoint {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let mut it = std::fs::read_dir(path).map_err(|e| bad(e.to_string()))?;
    if it.next().is_some() {
        return Err(bad("not an empty directory".into()));
    }
    Ok(())
}

/// Mount `disk` read-only at `mountpoint` and serve until SIGINT, SIGTERM or
/// an external unmount; `ready` is called once mounted.
pub fn mount(
    disk: Arc<Disk>,
    mountpoint: &Path,
    fsname: &str,
    time: SystemTime,
    ready: impl FnOnce(),
) -> Result<()> {
    check_mountpoint(mountpoint)?;
    if !Path::new(FUSE_DEVICE).exists() {
        return Err(Error::Fuse {
            action: "mount",
            path: mountpoint.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "FUSE is not available: /dev/fuse is missing (load it with `modprobe fuse`; \
                 in a container pass --device /dev/fuse)",
            ),
        });
    }
    let fuse_err = |action| {
        move |source| Error::Fuse {
            action,
            path: mountpoint.to_path_buf(),
            source,
        }
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::FSName(fsname.to_string()),
        MountOption::Subtype("recovery-cli".into()),
        MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(1);
    let fs = SnapshotFs::new(disk, time);
    let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(fuse_err("mount"))?;
    // Read from mountinfo, never by a stat of the mountpoint: that would
    // be a FUSE request to this very server, which is not serving yet.
    let connection = connection_of(mountpoint);
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(fuse_err("install signal handlers for"))?;
    let handle = signals.handle();
    let ended = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let session_ended = Arc::clone(&ended);
    let mp = mountpoint.to_path_buf();
    let waiter = std::thread::spawn(move || {
        let Some(sig) = signals.forever().next() else {
            return;
        };
        tracing::info!(sig, "signal: unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, mountpoint = %mp.display(), "unmount failed");
        }
        // Whether the session ended within ABORT_GRACE.
        let ended_in_grace = || {
            let (lock, cv) = &*session_ended;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, ABORT_GRACE, |ended| !*ended)
                .unwrap_or_else(|p| p.into_inner());
            *guard
        };
        if ended_in_grace() {
            return;
        }
        tracing::warn!(
            mountpoint = %mp.display(),
            "the filesystem is still in use from another mount namespace after the unmount: \
             aborting its FUSE connection"
        );
        let aborted = connection
            .is_some_and(|minor| std::fs::write(format!("{FUSECTL}/{minor}/abort"), b"1").is_ok());
        if !ended_in_grace() {
            tracing::warn!(aborted, "the FUSE session did not end: exiting");
            std::process::exit(0);
        }
    });
    ready();
    let res = session.run().map_err(fuse_err("serve"));
    {
        let (lock, cv) = &*ended;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
    handle.close();
    let _ = waiter.join();
    res
}

/// The fusectl connection number (the device minor) of the mount at
/// `mountpoint`, from `/proc/self/mountinfo`.
fn connection_of(mountpoint: &Path) -> Option<u32> {
    let canon = std::fs::canonicalize(mountpoint).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    connection_in(&info, canon.to_str()?)
}

/// The minor device number of the last mount of `mountpoint` in
/// `mountinfo` text (fields: id, parent, major:minor, root, mountpoint…;
/// mountpoints with spaces are octal-escaped, as the kernel writes them).
fn connection_in(mountinfo: &str, mountpoint: &str) -> Option<u32> {
    let escaped = mountpoint
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
        .and_then(|l| l.split(' ').nth(2)?.split_once(':')?.1.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_is_the_minor_of_the_last_mount_at_the_path() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 30 0:52 / /tmp/a\\040b rw - fuse.recovery-cli vm ro\n\
                    91 30 0:53 / /tmp/m rw - fuse.recovery-cli vm ro\n\
                    95 91 0:57 / /tmp/m rw - fuse.recovery-cli vm ro\n";
        assert_eq!(connection_in(info, "/tmp/m"), Some(57));
        assert_eq!(connection_in(info, "/tmp/a b"), Some(52));
        assert_eq!(connection_in(info, "/tmp/none"), None);
        assert_eq!(connection_in("garbage\n\n", "/tmp/m"), None);
    }
}
