//! The error type of the crate: one variant per failed action.

use std::io;
use std::path::PathBuf;

/// `Result` alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, naming the action and its subject.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading image bytes from the snapshot failed (the source names the chunk).
    #[error("Failed to read image bytes at {offset} ({len} bytes)")]
    ReadImage {
        offset: u64,
        len: usize,
        #[source]
        source: store::Error,
    },
    /// A read beyond the end of the image or of a partition.
    #[error("Read of {len} bytes at {offset} is beyond the end ({size} bytes)")]
    BeyondEnd { offset: u64, len: usize, size: u64 },
    /// A path that cannot name anything inside a snapshot.
    #[error("Invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// Nothing at that path.
    #[error("No such file or directory: {path}")]
    NotFound { path: String },
    /// A path component that should be a directory is not.
    #[error("Not a directory: {path}")]
    NotADirectory { path: String },
    /// File contents were asked of a directory.
    #[error("Is a directory: {path}")]
    IsADirectory { path: String },
    /// File contents were asked of a device, fifo or socket.
    #[error("Not a regular file: {path}")]
    NotRegular { path: String },
    /// The partition holds something this crate cannot read in-process.
    #[error(
        "{part} holds {detected}, which is not readable in-process: use `recovery-cli mount` \
         and loop-mount its disk.raw (e.g. `mount -o ro,loop,offset={offset} MNT/disk.raw DIR`)"
    )]
    NotReadable {
        part: String,
        detected: String,
        offset: u64,
    },
    /// The ext2/3/4 filesystem of a partition cannot be opened.
    #[error("Failed to open the {detected} filesystem of {part}")]
    OpenFilesystem {
        part: String,
        detected: String,
        #[source]
        source: ext4_view::Ext4Error,
    },
    /// A filesystem operation on a path failed.
    #[error("Failed to read {path}")]
    Filesystem {
        path: String,
        #[source]
        source: ext4_view::Ext4Error,
    },
    /// The ext superblock of a volume is implausible.
    #[error("The ext superblock of {part} is damaged: {reason}")]
    Superblock { part: String, reason: String },
    /// A file's metadata contradicts itself.
    #[error("Failed to read {path}: damaged file ({what})")]
    Damaged { path: String, what: &'static str },
    /// A file claims a size no ext filesystem can hold.
    #[error(
        "{path} claims {size} bytes, more than ext4's limit of {limit} (damaged or hostile image?)"
    )]
    FileTooLarge { path: String, size: u64, limit: u64 },
    /// A directory has more entries than we accept from an untrusted image.
    #[error("Directory {path} has more than {limit} entries (refused: hostile or damaged image?)")]
    TooManyEntries { path: String, limit: usize },
    /// A tree is nested deeper than we accept from an untrusted image.
    #[error("{path} is nested deeper than {limit} levels (refused: hostile or damaged image?)")]
    TooDeep { path: String, limit: usize },
    /// A name in the image cannot be written as a file name.
    #[error("Refusing to restore {path:?}: {reason}")]
    BadName { path: String, reason: &'static str },
    /// The restore target already has something at that path.
    #[error("{} exists (use --force to overwrite)", path.display())]
    Exists { path: PathBuf },
    /// Writing a restored file, directory or link failed.
    #[error("Failed to {action} {}", path.display())]
    Write {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The mountpoint is not usable.
    #[error("Mountpoint {}: {reason}", path.display())]
    Mountpoint { path: PathBuf, reason: String },
    /// Mounting or serving the FUSE filesystem failed.
    #[error("Failed to {action} FUSE filesystem at {}", path.display())]
    Fuse {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound { .. } => libc::ENOENT,
            Error::NotADirectory { .. } => libc::ENOTDIR,
            Error::IsADirectory { .. } => libc::EISDIR,
            Error::InvalidPath { .. } | Error::NotRegular { .. } => libc::EINVAL,
            Error::Filesystem { source, .. } => match source {
                ext4_view::Ext4Error::NotFound => libc::ENOENT,
                ext4_view::Ext4Error::NotADirectory => libc::ENOTDIR,
                ext4_view::Ext4Error::IsADirectory => libc::EISDIR,
                ext4_view::Ext4Error::TooManySymlinks => libc::ELOOP,
                ext4_view::Ext4Error::PathTooLong => libc::ENAMETOOLONG,
                _ => libc::EIO,
            },
            Error::TooManyEntries { .. } => libc::EFBIG,
            Error::TooDeep { .. } => libc::ELOOP,
            _ => libc::EIO,
        }
    }
}
