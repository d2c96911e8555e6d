//! Unix sockets that only their intended owner can ever connect to.
//!
//! Both the vhost-user socket and the control socket are created by
//! [`bind_private_socket`]:
//!
//! ```text
//! check the path      refuse a non-socket or a live socket; a stale one
//!                     (no listener behind it) is replaced
//! mkdir .sock…  0700  a fresh private directory beside the target
//! bind   …/s          only this user can reach it inside that directory
//! chown  …/s          --socket-owner USER[:GROUP], before anyone connects
//! chmod  …/s          0600, or 0660 when a group is given
//! rename …/s → path   atomically in place (replacing a stale socket)
//! rmdir  .sock…
//! ```
//!
//! So there is no moment at which the socket is reachable with looser
//! permissions or the wrong owner, whatever the umask. [`SocketFile`]
//! removes the socket again on drop, unless another process has since put
//! its own socket at the path.
//!
//! Only the vhost-user socket takes an owner: it is what a hypervisor
//! running as another user (libvirt's `libvirt-qemu`) must open. The
//! control socket pauses and throttles the migration, so it stays with the
//! daemon's user.

use std::fmt;
use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::unistd::{Group, User};
use tracing::debug;

/// Why a socket could not be created, or an owner not resolved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something that is not a socket is in the way.
    #[error("Refuse to replace {0}: not a socket")]
    NotASocket(PathBuf),
    /// A live process is listening on the path.
    #[error("Socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The existing path could not be inspected.
    #[error("Inspect socket path {path}")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating, restricting or placing the socket failed.
    #[error("Create socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Handing the socket to its owner failed.
    #[error("Give socket {path} to {owner}")]
    Chown {
        /// The socket path.
        path: PathBuf,
        /// The owner as given (`USER[:GROUP]`).
        owner: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The owner is not of the form `USER[:GROUP]`.
    #[error("Invalid socket owner {0:?}: expected USER or USER:GROUP")]
    OwnerSyntax(String),
    /// No such user.
    #[error("No user named {0}")]
    UnknownUser(String),
    /// No such group.
    #[error("No group named {0}")]
    UnknownGroup(String),
    /// The user or group database could not be read.
    #[error("Look up {0}")]
    LookUp(String, #[source] io::Error),
}

/// Result of socket creation.
pub type Result<T> = std::result::Result<T, Error>;

/// Who owns a socket: a user, and optionally a group that may connect too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    spec: String,
    uid: u32,
    gid: Option<u32>,
}

impl SocketOwner {
    /// The owning user id.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The owning group id, if a group was given.
    pub fn gid(&self) -> Option<u32> {
        self.gid
    }

    /// The socket's mode: 0660 when a group shares it, else 0600.
    pub fn mode(&self) -> u32 {
        if self.gid.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

impl fmt::Display for SocketOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl FromStr for SocketOwner {
    type Err = Error;

    /// Parses `USER[:GROUP]`; each part is a name or a numeric id.
    fn from_str(spec: &str) -> Result<SocketOwner> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(Error::OwnerSyntax(spec.to_owned()));
        }
        let uid = match user.parse::<u32>() {
            Ok(id) => id,
            Err(_) => User::from_name(user)
                .map_err(|e| Error::LookUp(format!("user {user}"), e.into()))?
                .ok_or_else(|| Error::UnknownUser(user.to_owned()))?
                .uid
                .as_raw(),
        };
        let gid = match group {
            None => None,
            Some(g) => Some(match g.parse::<u32>() {
                Ok(id) => id,
                Err(_) => Group::from_name(g)
                    .map_err(|e| Error::LookUp(format!("group {g}"), e.into()))?
                    .ok_or_else(|| Error::UnknownGroup(g.to_owned()))?
                    .gid
                    .as_raw(),
            }),
        };
        Ok(SocketOwner {
            spec: spec.to_owned(),
            uid,
            gid,
        })
    }
}

/// The socket file created by [`bind_private_socket`]. Dropping it removes
/// the file, unless another process has replaced it since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// (dev, ino) of the socket we placed.
    identity: (u64, u64),
}

impl SocketFile {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Creates a listening socket at `path`, mode 0600 (or 0660 with a group),
/// owned by `owner` (default: this process's user), with no window in
/// which anyone else could connect; see the module docs. A stale socket
/// at `path` is replaced; anything else there is refused.
pub fn bind_private_socket(
    path: &Path,
    owner: Option<&SocketOwner>,
) -> Result<(UnixListener, SocketFile)> {
    check_existing(path)?;
    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp_dir = private_dir(parent).map_err(bind_err)?;
    let tmp_sock = tmp_dir.join("s");
    let placed = place(&tmp_sock, path, owner);
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    let listener = placed?;
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
        },
    ))
}

/// Binds `tmp` (inside a private directory), hands it to `owner`,
/// restricts it and renames it to `path`.
fn place(tmp: &Path, path: &Path, owner: Option<&SocketOwner>) -> Result<UnixListener> {
    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(tmp).map_err(bind_err)?;
    if let Some(owner) = owner {
        std::os::unix::fs::chown(tmp, Some(owner.uid), owner.gid).map_err(|source| {
            Error::Chown {
                path: path.to_owned(),
                owner: owner.to_string(),
                source,
            }
        })?;
    }
    let mode = owner.map_or(0o600, SocketOwner::mode);
    fs::set_permissions(tmp, Permissions::from_mode(mode)).map_err(bind_err)?;
    fs::rename(tmp, path).map_err(bind_err)?;
    Ok(listener)
}

/// Refuses a non-socket or a live socket at `path`; a stale socket (or
/// nothing) is fine.
fn check_existing(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(Error::NotASocket(path.to_owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(Error::InUse(path.to_owned())),
            Err(e) => {
                debug!(path = %path.display(), error = %e, "replacing stale socket");
                Ok(())
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates a fresh mode-0700 directory inside `parent`.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".sock{:x}.{n:x}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    #[test]
    fn socket_is_private_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let (listener, file) = bind_private_socket(&path, None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), rustix::process::geteuid().as_raw());
        // No temporary directory is left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(file.path(), path);
        // It accepts connections.
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn existing_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        fs::write(&file, b"data").unwrap();
        let err = bind_private_socket(&file, None).unwrap_err();
        assert!(matches!(err, Error::NotASocket(_)), "{err}");
        assert_eq!(fs::read(&file).unwrap(), b"data");

        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let (_live, placed) = bind_private_socket(&stale, None).unwrap();

        let err = bind_private_socket(&stale, None).unwrap_err();
        assert!(matches!(err, Error::InUse(_)), "{err}");
        // The refused attempt left the live socket alone.
        UnixStream::connect(&stale).unwrap();

        let nowhere = dir.path().join("missing/x.sock");
        let err = bind_private_socket(&nowhere, None).unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err}");
        assert!(err.to_string().contains("missing/x.sock"), "{err}");

        // A socket someone else put at the path is not ours to remove.
        fs::remove_file(&stale).unwrap();
        let _other = UnixListener::bind(&stale).unwrap();
        drop(placed);
        assert!(stale.exists());
    }

    #[test]
    fn owners_parse_names_and_ids() {
        let root = "root".parse::<SocketOwner>().unwrap();
        assert_eq!((root.uid(), root.gid(), root.mode()), (0, None, 0o600));
        let both = "root:root".parse::<SocketOwner>().unwrap();
        assert_eq!((both.uid(), both.gid(), both.mode()), (0, Some(0), 0o660));
        let ids = "65534:65533".parse::<SocketOwner>().unwrap();
        assert_eq!((ids.uid(), ids.gid()), (65534, Some(65533)));
        assert_eq!(ids.to_string(), "65534:65533");

        for bad in ["", ":", "root:", ":root"] {
            let err = bad.parse::<SocketOwner>().unwrap_err();
            assert!(matches!(err, Error::OwnerSyntax(_)), "{bad}: {err}");
        }
        let err = "no-such-user-x".parse::<SocketOwner>().unwrap_err();
        assert_eq!(err.to_string(), "No user named no-such-user-x");
        let err = "root:no-such-group-x".parse::<SocketOwner>().unwrap_err();
        assert_eq!(err.to_string(), "No group named no-such-group-x");
    }

    #[test]
    fn an_owner_gets_the_socket_before_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.sock");
        let owner: SocketOwner = "65534:65533".parse().unwrap();
        match bind_private_socket(&path, Some(&owner)) {
            Ok((_listener, _file)) => {
                assert!(is_root(), "only root can give a socket away");
                let meta = fs::symlink_metadata(&path).unwrap();
                assert_eq!((meta.uid(), meta.gid()), (65534, 65533));
                assert_eq!(meta.permissions().mode() & 0o777, 0o660);
            }
            Err(err) => {
                assert!(!is_root(), "root failed to chown: {err}");
                assert!(matches!(err, Error::Chown { .. }), "{err}");
                assert!(err.to_string().contains("65534:65533"), "{err}");
                // Nothing is left behind: no socket, no temporary directory.
                assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
            }
        }
        let user_only: SocketOwner = "65534".parse().unwrap();
        if is_root() {
            let path = dir.path().join("user.sock");
            let (_listener, _file) = bind_private_socket(&path, Some(&user_only)).unwrap();
            let meta = fs::symlink_metadata(&path).unwrap();
            assert_eq!(meta.uid(), 65534);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
    }
}
