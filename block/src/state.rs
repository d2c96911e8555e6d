//! What the block layers keep beside their data, and where.
//!
//! The overlay and the migration persist files (their data, bitmaps and
//! journals) and one small record: where the migration stands. They do not
//! know where these live or how the record is written; they reach them
//! through [`LayerState`], which the daemon's state dir implements (see
//! `daemon::state_dir`). Tests implement it over a temporary directory.
//!
//! # One story of states
//! | type | where | values | survives a restart |
//! |---|---|---|---|
//! | [`MigrationState`] | the persistent record | `not_started`, `in_progress`, `complete` | yes |
//! | [`crate::migrate::MigrationPhase`] | the running copier | `migrating`, `paused`, `complete`, `failed` | no |
//! | `control::State` | the operator's view | `serving` (no target) plus the four phases | no |
//!
//! A restart maps `in_progress` to `migrating` (the copier resumes; a
//! `failed` or `paused` copier comes back as `migrating`), and `complete`
//! to `complete` (the target alone is served). The daemon maps a phase to
//! the operator's state one to one, and reports `serving` when there is no
//! migration at all.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Migration progress as the persistent record holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// No target, or the copier has not started.
    #[default]
    NotStarted,
    /// The copier is running or will resume.
    InProgress,
    /// Every chunk is on the target and the target is synced: serve it alone.
    Complete,
}

/// The persistent files of the block layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFile {
    /// The overlay's sparse data file, image size.
    OverlayData,
    /// The overlay's allocation bitmap, one bit per 4 KiB block.
    OverlayBitmap,
    /// One bit per chunk migrated to the target.
    MigratedBitmap,
    /// One bit per chunk the guest wrote while migrating.
    GuestWrittenBitmap,
}

/// Where the block layers' files live, and their migration record.
pub trait LayerState: Send + Sync {
    /// The path of one of the layers' files.
    fn path(&self, file: LayerFile) -> PathBuf;
    /// A string naming the snapshot and geometry the files belong to,
    /// written into every bitmap header so files from another state are
    /// refused.
    fn binding_tag(&self) -> String;
    /// The recorded image size and chunk size.
    fn geometry(&self) -> (u64, u32);
    /// The recorded migration state and target (canonical path).
    fn migration(&self) -> (MigrationState, Option<PathBuf>);
    /// Records a new migration state and target, durably.
    fn set_migration(&self, state: MigrationState, target: Option<PathBuf>) -> io::Result<()>;
    /// Makes the removal of layer files durable (fsync of their directory).
    fn sync_dir(&self) -> io::Result<()>;
}

#[cfg(any(test, feature = "test-util"))]
pub use dir_state::DirState;

#[cfg(any(test, feature = "test-util"))]
mod dir_state {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::*;

    /// A [`LayerState`] over a plain directory, for tests: the files are
    /// named as the daemon names them and the record is a small JSON file.
    #[derive(Debug)]
    pub struct DirState {
        dir: PathBuf,
        tag: String,
        geometry: (u64, u32),
        lock: Mutex<()>,
    }

    #[derive(Serialize, Deserialize, Default)]
    struct Record {
        state: MigrationState,
        target: Option<PathBuf>,
    }

    impl DirState {
        /// Opens (creating if needed) `dir` for an image of `image_size`
        /// bytes in `chunk_size` chunks, bound to `tag`.
        pub fn open(dir: &Path, tag: &str, image_size: u64, chunk_size: u32) -> io::Result<Self> {
            std::fs::create_dir_all(dir)?;
            Ok(Self {
                dir: dir.to_path_buf(),
                tag: tag.to_string(),
                geometry: (image_size, chunk_size),
                lock: Mutex::new(()),
            })
        }

        /// The directory.
        pub fn dir(&self) -> &Path {
            &self.dir
        }

        fn record_path(&self) -> PathBuf {
            self.dir.join("migration.json")
        }

        fn record(&self) -> Record {
            std::fs::read(self.record_path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        }
    }

    impl LayerState for DirState {
        fn path(&self, file: LayerFile) -> PathBuf {
            self.dir.join(match file {
                LayerFile::OverlayData => "overlay.data",
                LayerFile::OverlayBitmap => "overlay.bitmap",
                LayerFile::MigratedBitmap => "migrated.bitmap",
                LayerFile::GuestWrittenBitmap => "guest-written.bitmap",
            })
        }

        fn binding_tag(&self) -> String {
            self.tag.clone()
        }

        fn geometry(&self) -> (u64, u32) {
            self.geometry
        }

        fn migration(&self) -> (MigrationState, Option<PathBuf>) {
            let r = self.record();
            (r.state, r.target)
        }

        fn set_migration(&self, state: MigrationState, target: Option<PathBuf>) -> io::Result<()> {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            let bytes = serde_json::to_vec(&Record { state, target }).map_err(io::Error::other)?;
            crate::file::write_atomic(&self.record_path(), &bytes)
        }

        fn sync_dir(&self) -> io::Result<()> {
            std::fs::File::open(&self.dir)?.sync_all()
        }
    }
}
