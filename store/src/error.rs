//! The public error type of the store.
//!
//! Every failure carries an [`ErrorKind`] so callers can branch on the class
//! of problem (`err.kind() == ErrorKind::Locked`), a short message naming the
//! failed action with its context (path, chunk id, snapshot, offset), and the
//! underlying cause as [`std::error::Error::source`]. The message never repeats
//! the source: a binary prints the whole chain (`error: a: b: c`).

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::Path;

use crate::id::ChunkId;

/// `Result` alias used throughout the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The class of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A store, snapshot, chunk, pack or source does not exist.
    NotFound,
    /// Stored data failed a checksum or could not be decoded.
    Corrupt,
    /// Any other I/O failure.
    Io,
    /// Another process holds the store's writer lock.
    Locked,
    /// The caller passed something invalid (a name, a size, a reference).
    InvalidInput,
    /// The device holding the store or the target is full.
    NoSpace,
    /// The store or a file in it has a format version this program does not know.
    UnsupportedVersion,
    /// The directory exists but is not a store.
    NotAStore,
    /// Something that should be created already exists.
    AlreadyExists,
    /// The snapshot is held (see [`crate::hold`]).
    Held,
    /// The store is encrypted and no passphrase or key file was given.
    KeyRequired,
    /// No key slot of the encrypted store opens with the given secret.
    WrongKey,
}

/// A store error: a kind, a message with context, and an optional cause.
/// One pointer wide, so `Result<T, Error>` stays small.
pub struct Error(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: String,
    chunk: Option<ChunkId>,
    snapshot: Option<String>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with `message` (short, capitalised, no trailing dot).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            chunk: None,
            snapshot: None,
            source: None,
        }))
    }

    /// An I/O failure while doing `action`; the kind follows the I/O error
    /// (`NotFound`, `NoSpace`, `AlreadyExists`, otherwise `Io`).
    pub fn io(action: impl Into<String>, err: io::Error) -> Error {
        let kind = io_kind(&err);
        Error::new(kind, action).with_source(err)
    }

    /// An I/O failure on `path` while doing `action` ("Failed to read pack").
    pub fn io_path(action: &str, path: &Path, err: io::Error) -> Error {
        Error::io(format!("{action} {}", path.display()), err)
    }

    /// Data that failed a check.
    pub fn corrupt(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Invalid input from the caller.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Something missing.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }

    /// Attach the cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Error {
        self.0.source = Some(source.into());
        self
    }

    /// Attach the chunk this error concerns.
    pub fn with_chunk(mut self, chunk: ChunkId) -> Error {
        self.0.chunk = Some(chunk);
        self
    }

    /// Attach the snapshot this error concerns.
    pub fn with_snapshot(mut self, snapshot: impl Into<String>) -> Error {
        self.0.snapshot = Some(snapshot.into());
        self
    }

    /// Wrap this error in an outer context message, keeping kind, chunk and
    /// snapshot (the old message becomes the source).
    pub fn context(self, message: impl Into<String>) -> Error {
        let kind = self.0.kind;
        let chunk = self.0.chunk;
        let snapshot = self.0.snapshot.clone();
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            chunk,
            snapshot,
            source: Some(Box::new(self)),
        }))
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The chunk this error concerns, if any.
    pub fn chunk(&self) -> Option<&ChunkId> {
        self.0.chunk.as_ref()
    }

    /// The snapshot this error concerns, if any.
    pub fn snapshot(&self) -> Option<&str> {
        self.0.snapshot.as_deref()
    }

    /// The message of this error alone (without its causes).
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

/// Maps an I/O error to an [`ErrorKind`].
pub(crate) fn io_kind(err: &io::Error) -> ErrorKind {
    if err.raw_os_error() == Some(28) || err.kind() == io::ErrorKind::StorageFull {
        return ErrorKind::NoSpace;
    }
    match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.0.kind, self.0.message)?;
        let mut source = self
            .0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static));
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// Convenience: attach an action to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(action(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_maps_to_no_space_and_keeps_message_in_chain() {
        let err = Error::io("Failed to write pack", io::Error::from_raw_os_error(28));
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        let chain = format!("{err:?}");
        assert!(chain.contains("No space left on device"), "{chain}");
    }

    #[test]
    fn error_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn context_keeps_kind() {
        let err = Error::not_found("Chunk x not found").context("Failed to read snapshot a");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.to_string(), "Failed to read snapshot a");
        assert_eq!(err.source().unwrap().to_string(), "Chunk x not found");
    }
}
