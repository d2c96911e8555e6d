//! Chunk store (design doc placeholder, filled in below).
#![forbid(unsafe_code)]

pub mod backend;
pub mod backup;
pub mod chunk;
pub mod config;
pub mod error;
pub mod format;
pub mod gc;
pub mod id;
pub mod index;
pub mod lock;
pub mod pack;
mod repo;
pub mod restore;
pub mod snapshot;
pub mod verify;

pub use backup::{BackupOptions, BackupStats, Progress};
pub use error::{Error, ErrorKind, Result};
pub use gc::{GcOptions, GcStats};
pub use id::{ChunkId, PackId};
pub use repo::Store;
pub use restore::{RestoreOptions, RestoreStats};
pub use snapshot::reader::SnapshotReader;
pub use snapshot::SnapshotInfo;
pub use verify::{Problem, ProblemKind, Usage, VerifyOptions, VerifyReport};
