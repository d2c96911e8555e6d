//! The `--state DIR` of an instant-boot daemon.
//!
//! This module is the one home of the state dir's layout; every other
//! doc links here.
//!
//! ```text
//! DIR/                  mode 0700 (a looser existing one is tightened); files 0600
//!   lock                  flock'ed exclusively while a daemon runs; holds its PID
//!   state.json            snapshot id, image size, chunk size, target, migration
//!                         state (`not_started` / `in_progress` / `complete`)
//!   overlay.data          sparse copy-on-write data file, image size  (block::overlay)
//!   overlay.bitmap        one bit per 4 KiB block the overlay holds    (block::overlay)
//!   migrated.bitmap       one bit per chunk on the target              (block::migrate)
//!   guest-written.bitmap  one bit per chunk the guest wrote after it
//!                         migrated, so `--verify` skips it            (block::migrate)
//!   *.bitmap.live         live journal of each bitmap above: a page-cache
//!                         mirror of its words, for a restart on the same
//!                         boot                                         (block::bitmap::journal)
//!   control.sock          control socket (0600), unless --control names another path
//!   qemu.json             the QEMU `instant-boot --qemu` runs on this overlay:
//!                         its PID and start time; removed when it exits
//!   protect-0.bitmap      with protection: chunks the guest changed since the
//!   protect-1.bitmap      last point, two files alternating roles (changed /
//!                         being captured)                      (block::protect)
//!   protect.preserved     scratch: chunks preserved for the point being copied
//!   protect.json          protection record: name, boot id, parent, last point
//!                                                              (daemon::protect)
//! ```
//!
//! `serve --disk` binds its state dir to `disk:NAME` (in the `snapshot_id`
//! field) instead of a snapshot id; it has no overlay.
//!
//! The bitmap and journal formats are documented in `block::bitmap` and
//! `block::bitmap::journal`. The block layers name their files through
//! [`LayerState`] (implemented here), so they never hard-code this layout.
//! Once a migration is complete, the overlay's files and
//! `guest-written.bitmap` (and their journals) are deleted.
//!
//! `state.json` is written atomically (temporary file, fsync, rename, fsync
//! of the directory) and created before any other file, so a state dir
//! either has no `state.json` (and nothing in it is trusted: the overlay
//! files are checked against the snapshot by their own headers) or a
//! complete one. The lock is an `flock` on `DIR/lock`, released by the
//! kernel when the daemon exits however it exits, so a stale lock file
//! never blocks a restart.
//!
//! # Whose directory
//!
//! An existing directory is only used if it is empty or a state dir (it
//! has `state.json`, or only what a start that crashed before writing it
//! leaves: `lock`, `state.json.tmp`). Anything else, `/tmp` say, is refused
//! untouched: no lock file, no change of mode. [`StateDir::created`] tells
//! whether this open made the state, so a start that fails afterwards can
//! take back everything it made ([`StateDir::remove_created`]).
//!
//! # The snapshot is held
//!
//! `state.json` keeps a random `holder` id made with the state. While the
//! migration is not complete, every start adds (idempotently) the store's
//! hold `holds/NAME/ID/HOLDER.json` on the snapshot (`store::hold`), so
//! `forget` refuses it naming this dir and gc keeps a force-forgotten one;
//! the daemon releases it when the migration completes, and a start that
//! created the state and then failed releases it too. A `complete` state
//! needs only the target and starts without the store. To discard a state
//! dir whose migration never completed, delete it and release its hold
//! with `recovery-cli release-hold --store STORE NAME@ID HOLDER`.
//!
//! # One guest per overlay
//!
//! `qemu.json` records the QEMU that `instant-boot --qemu` started, by PID
//! and by its start time in clock ticks since boot (field 22 of
//! `/proc/PID/stat`), so a PID reused by another process is not mistaken
//! for it. [`StateDir::live_guest`] finds it while it runs; a daemon
//! asked to start a guest refuses while one does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use block::file::write_atomic;
use block::state::{LayerFile, LayerState, MigrationState};
use block::target::TargetIdentity;

/// Version of `state.json`. Do not modify; add a new version instead.
pub const STATE_FORMAT_VERSION: u32 = 1;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const OVERLAY_DATA: &str = "overlay.data";
const OVERLAY_BITMAP: &str = "overlay.bitmap";
const MIGRATED_BITMAP: &str = "migrated.bitmap";
const GUEST_WRITTEN_BITMAP: &str = "guest-written.bitmap";
const CONTROL_SOCKET: &str = "control.sock";
const GUEST_FILE: &str = "qemu.json";

/// What a directory may hold and still be taken for a state dir whose
/// first start crashed before `state.json` was written.
const LEFT_BEFORE_STATE: [&str; 2] = [LOCK_FILE, "state.json.tmp"];

/// What a state dir is for: the snapshot being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBinding {
    /// The snapshot id (as the store prints it).
    pub snapshot_id: String,
    /// Image size in bytes.
    pub image_size: u64,
    /// The snapshot's chunk size in bytes.
    pub chunk_size: u32,
}

/// The contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Format version, [`STATE_FORMAT_VERSION`].
    pub format_version: u32,
    /// The snapshot this state belongs to.
    pub snapshot_id: String,
    /// Image size in bytes.
    pub image_size: u64,
    /// The snapshot's chunk size.
    pub chunk_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The migration target, once one was given.
    #[serde(default)]
    pub target: Option<PathBuf>,
    /// Migration progress.
    #[serde(default)]
    pub migration: MigrationState,
    /// What the target is, recorded when the migration started and checked
    /// on every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_identity: Option<TargetIdentity>,
    /// The stable id under which this state holds its snapshot in the
    /// store (`store::hold`), made with the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The snapshot's image name, so a complete state can be served
    /// without the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_name: Option<String>,
}

/// The QEMU `instant-boot --qemu` started on this state's overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// Its process id.
    pub pid: u32,
    /// Its start time, clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

/// Errors of the state dir.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the directory failed.
    #[error("Failed to create state dir {dir}")]
    CreateDir {
        /// The state dir.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Opening or locking the lock file failed.
    #[error("Failed to lock state dir {dir}")]
    Lock {
        /// The state dir.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("State dir {dir} is in use by {holder}")]
    Locked {
        /// The state dir.
        dir: PathBuf,
        /// "PID n", or "another process" if its PID is unknown.
        holder: String,
    },
    /// Reading `state.json` failed.
    #[error("Failed to read {path}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `state.json` is not valid.
    #[error("State file {path} is corrupt")]
    Parse {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// `state.json` has a version this build does not know.
    #[error("State file {path} has unsupported format version {version} (this build reads {STATE_FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The state file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The state belongs to another snapshot.
    #[error("State dir {dir} belongs to snapshot {found}, not {expected}; use another --state")]
    SnapshotMismatch {
        /// The state dir.
        dir: PathBuf,
        /// The snapshot being served.
        expected: String,
        /// The snapshot the state was made for.
        found: String,
    },
    /// Same snapshot id, different geometry: the state is damaged.
    #[error("State dir {dir} records {field} {found} for snapshot {snapshot}, but the snapshot has {expected}")]
    GeometryMismatch {
        /// The state dir.
        dir: PathBuf,
        /// The snapshot.
        snapshot: String,
        /// "image size" or "chunk size".
        field: &'static str,
        /// The snapshot's value.
        expected: u64,
        /// The recorded value.
        found: u64,
    },
    /// The directory holds other things: it is not a state dir.
    #[error("{dir} is not a state dir (it holds {entry} but no state.json); refusing to use it, choose an empty or new --state")]
    NotStateDir {
        /// The directory.
        dir: PathBuf,
        /// One entry that does not belong to a state dir.
        entry: String,
    },
    /// Writing `state.json` failed.
    #[error("Failed to write {path}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An open, locked state dir. The lock is held until this is dropped; keep
/// it alive as long as anything uses the files inside.
pub struct StateDir {
    dir: PathBuf,
    lock: File,
    state: Mutex<StateFile>,
    /// This open created the directory.
    created_dir: bool,
    /// This open wrote the first `state.json`.
    created_state: bool,
}

impl Drop for StateDir {
    /// Unlock explicitly, as `store::lock::WriterLock` does: a child being
    /// spawned holds a copy of the descriptor until its exec, and the
    /// `flock` would outlive this drop by that moment.
    fn drop(&mut self) {
        if let Err(e) = rustix::fs::flock(&self.lock, rustix::fs::FlockOperation::Unlock) {
            tracing::warn!(dir = %self.dir.display(), "failed to unlock the state dir: {e}");
        }
    }
}

impl std::fmt::Debug for StateDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDir").field("dir", &self.dir).finish()
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |source| Error::Lock {
        dir: dir.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("PID {pid}"),
                Err(_) => "another process".to_string(),
            };
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(e) => return Err(lock_err(e.into())),
    }
    file.set_len(0).map_err(lock_err)?;
    file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
        .map_err(lock_err)?;
    Ok(file)
}

impl StateDir {
    /// Opens the state dir `dir` for `binding`, creating it (mode 0700) and
    /// its `state.json` if needed, and locks it. Fails if another process
    /// holds it or if it belongs to another snapshot.
    pub fn open_or_create(dir: &Path, binding: &StateBinding) -> Result<StateDir> {
        let created_dir = match std::fs::symlink_metadata(dir) {
            Ok(_) => {
                check_ours(dir)?;
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(source) => {
                return Err(Error::CreateDir {
                    dir: dir.to_path_buf(),
                    source,
                })
            }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        let lock = lock_dir(dir)?;
        let mut created_state = false;
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let state = parse_state(&path, &bytes)?;
                check_binding(dir, &state, binding)?;
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let state = StateFile {
                    format_version: STATE_FORMAT_VERSION,
                    snapshot_id: binding.snapshot_id.clone(),
                    image_size: binding.image_size,
                    chunk_size: binding.chunk_size,
                    created_unix: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    target: None,
                    migration: MigrationState::NotStarted,
                    target_identity: None,
                    holder: Some(random_id()),
                    snapshot_name: None,
                };
                store_state(&path, &state)?;
                created_state = true;
                tracing::info!(dir = %dir.display(), snapshot = %binding.snapshot_id, "created state dir");
                state
            }
            Err(source) => return Err(Error::Read { path, source }),
        };
        Ok(StateDir {
            dir: dir.to_path_buf(),
            lock,
            state: Mutex::new(state),
            created_dir,
            created_state,
        })
    }

    /// The stable id under which this state holds its snapshot; made now
    /// (and recorded) for a state from before holds.
    pub fn holder(&self) -> Result<String> {
        if let Some(holder) = self.state().holder {
            return Ok(holder);
        }
        let holder = random_id();
        self.update(|s| s.holder = Some(holder.clone()))?;
        Ok(holder)
    }

    /// Whether this open made the state (wrote the first `state.json`).
    pub fn created(&self) -> bool {
        self.created_state
    }

    /// Takes back a state this open made ([`StateDir::created`]): removes
    /// the directory if this open created it, else what is in it. Does
    /// nothing to a state that existed before. For a start that failed.
    pub fn remove_created(&self) {
        if !self.created_state {
            return;
        }
        let removed = if self.created_dir {
            std::fs::remove_dir_all(&self.dir)
        } else {
            std::fs::read_dir(&self.dir).and_then(|entries| {
                for entry in entries {
                    let path = entry?.path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                }
                Ok(())
            })
        };
        match removed {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "removed the state this failed start created")
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "failed to remove the state this failed start created")
            }
        }
    }

    /// The QEMU recorded in this state, if it still runs.
    pub fn live_guest(&self) -> Option<GuestRecord> {
        let bytes = std::fs::read(self.dir.join(GUEST_FILE)).ok()?;
        let record: GuestRecord = serde_json::from_slice(&bytes).ok()?;
        (process_start_time(record.pid) == Some(record.start_time)).then_some(record)
    }

    /// Records `pid` as the QEMU running on this state's overlay.
    pub fn record_guest(&self, pid: u32) -> Result<GuestRecord> {
        let path = self.dir.join(GUEST_FILE);
        let write_err = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let start_time = process_start_time(pid)
            .ok_or_else(|| write_err(io::Error::other(format!("process {pid} is gone"))))?;
        let record = GuestRecord { pid, start_time };
        let bytes = serde_json::to_vec(&record).map_err(|e| write_err(io::Error::other(e)))?;
        write_atomic(&path, &bytes).map_err(write_err)?;
        Ok(record)
    }

    /// Forgets the recorded QEMU (it has exited).
    pub fn clear_guest(&self) {
        let _ = std::fs::remove_file(self.dir.join(GUEST_FILE));
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the current `state.json` contents.
    pub fn state(&self) -> StateFile {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the state with `f` and writes it atomically. On error the
    /// in-memory state is left unchanged.
    pub fn update<F: FnOnce(&mut StateFile)>(&self, f: F) -> Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.clone();
        f(&mut next);
        store_state(&self.state_path(), &next)?;
        *guard = next;
        Ok(())
    }

    /// The binding string stored in bitmap headers: the snapshot id.
    pub fn binding_tag(&self) -> String {
        self.state().snapshot_id
    }

    /// `DIR/state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// `DIR/lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK_FILE)
    }

    /// `DIR/control.sock`, the default control socket.
    pub fn control_socket_path(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }
}

/// The `state.json` of `dir` if it has a valid one, read without taking
/// the lock (to decide what to open before opening the state).
pub fn peek(dir: &Path) -> Option<StateFile> {
    let path = dir.join(STATE_FILE);
    parse_state(&path, &std::fs::read(&path).ok()?).ok()
}

/// 128 random bits in hex: a holder id.
fn random_id() -> String {
    let mut raw = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .is_err()
    {
        // Unique enough on this host: the time and our PID.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        raw = (now ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// `DIR/control.sock`, the default control socket of the state dir `dir`.
pub fn control_socket_in(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Refuses an existing directory that is neither empty nor a state dir.
fn check_ours(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.iter().any(|n| n == STATE_FILE) {
        return Ok(());
    }
    match names
        .into_iter()
        .find(|n| !LEFT_BEFORE_STATE.contains(&n.as_str()))
    {
        Some(entry) => Err(Error::NotStateDir {
            dir: dir.to_path_buf(),
            entry,
        }),
        None => Ok(()),
    }
}

/// A process's start time in clock ticks after boot (`/proc/PID/stat`
/// field 22); `None` if it does not exist or has already exited (a zombie).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; field 22 is the 19th after it.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn parse_state(path: &Path, bytes: &[u8]) -> Result<StateFile> {
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let parse_err = |source| Error::Parse {
        path: path.to_path_buf(),
        source,
    };
    let version: Version = serde_json::from_slice(bytes).map_err(parse_err)?;
    if version.format_version != STATE_FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            version: version.format_version,
        });
    }
    serde_json::from_slice(bytes).map_err(parse_err)
}

fn check_binding(dir: &Path, state: &StateFile, binding: &StateBinding) -> Result<()> {
    if state.snapshot_id != binding.snapshot_id {
        return Err(Error::SnapshotMismatch {
            dir: dir.to_path_buf(),
            expected: binding.snapshot_id.clone(),
            found: state.snapshot_id.clone(),
        });
    }
    let geometry = [
        ("image size", binding.image_size, state.image_size),
        (
            "chunk size",
            u64::from(binding.chunk_size),
            u64::from(state.chunk_size),
        ),
    ];
    for (field, expected, found) in geometry {
        if expected != found {
            return Err(Error::GeometryMismatch {
                dir: dir.to_path_buf(),
                snapshot: binding.snapshot_id.clone(),
                field,
                expected,
                found,
            });
        }
    }
    Ok(())
}

fn store_state(path: &Path, state: &StateFile) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl LayerState for StateDir {
    fn path(&self, file: LayerFile) -> PathBuf {
        self.dir.join(match file {
            LayerFile::OverlayData => OVERLAY_DATA,
            LayerFile::OverlayBitmap => OVERLAY_BITMAP,
            LayerFile::MigratedBitmap => MIGRATED_BITMAP,
            LayerFile::GuestWrittenBitmap => GUEST_WRITTEN_BITMAP,
        })
    }

    fn binding_tag(&self) -> String {
        StateDir::binding_tag(self)
    }

    fn geometry(&self) -> (u64, u32) {
        let s = self.state();
        (s.image_size, s.chunk_size)
    }

    fn migration(&self) -> (MigrationState, Option<PathBuf>) {
        let s = self.state();
        (s.migration, s.target)
    }

    fn set_migration(&self, state: MigrationState, target: Option<PathBuf>) -> io::Result<()> {
        self.update(|s| {
            s.migration = state;
            s.target = target;
        })
        .map_err(io::Error::other)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(id: &str) -> StateBinding {
        StateBinding {
            snapshot_id: id.into(),
            image_size: 1 << 30,
            chunk_size: 1 << 20,
        }
    }

    #[test]
    fn create_then_reopen_keeps_the_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let sd = StateDir::open_or_create(&dir, &binding("aa11")).unwrap();
        assert_eq!(sd.state().snapshot_id, "aa11");
        assert_eq!(sd.state().migration, MigrationState::NotStarted);
        sd.update(|s| {
            s.target = Some("/dev/sdz".into());
            s.migration = MigrationState::InProgress;
        })
        .unwrap();
        assert_eq!(
            sd.path(LayerFile::OverlayBitmap),
            dir.join("overlay.bitmap")
        );
        drop(sd);
        let sd = StateDir::open_or_create(&dir, &binding("aa11")).unwrap();
        let st = sd.state();
        assert_eq!(st.migration, MigrationState::InProgress);
        assert_eq!(st.target.as_deref(), Some(Path::new("/dev/sdz")));
        assert_eq!(st.image_size, 1 << 30);
        let text = std::fs::read_to_string(sd.state_path()).unwrap();
        assert!(text.contains("\"migration\": \"in_progress\""), "{text}");
        assert!(!dir.join("state.json.tmp").exists());
    }

    #[test]
    fn another_snapshot_is_refused_naming_both() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
        drop(sd);
        let err = StateDir::open_or_create(tmp.path(), &binding("bb22")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("aa11") && msg.contains("bb22"), "{msg}");
        let mut other = binding("aa11");
        other.image_size = 1 << 29;
        assert!(matches!(
            StateDir::open_or_create(tmp.path(), &other),
            Err(Error::GeometryMismatch {
                field: "image size",
                ..
            })
        ));
    }

    #[test]
    fn a_second_daemon_is_refused_naming_the_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
        let err = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "State dir {} is in use by PID {}",
                tmp.path().display(),
                std::process::id()
            )
        );
        drop(sd);
        StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(shared.join("someone-elses.txt"), b"x").unwrap();
        let err = StateDir::open_or_create(&shared, &binding("aa11")).unwrap_err();
        assert!(matches!(err, Error::NotStateDir { .. }), "{err}");
        assert!(err.to_string().contains("someone-elses.txt"), "{err}");
        let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777);
        let names: Vec<_> = std::fs::read_dir(&shared).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A start that crashed before state.json left only the lock: ours.
        let crashed = tmp.path().join("crashed");
        std::fs::create_dir(&crashed).unwrap();
        std::fs::write(crashed.join("lock"), b"123\n").unwrap();
        StateDir::open_or_create(&crashed, &binding("aa11")).unwrap();
    }

    #[test]
    fn a_failed_start_takes_back_only_what_it_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new");
        let sd = StateDir::open_or_create(&dir, &binding("aa11")).unwrap();
        assert!(sd.created());
        sd.remove_created();
        assert!(!dir.exists());
        // An existing empty dir is emptied again, not removed.
        std::fs::create_dir(&dir).unwrap();
        let sd = StateDir::open_or_create(&dir, &binding("aa11")).unwrap();
        sd.remove_created();
        assert!(dir.is_dir());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        // A state that existed before is never removed.
        drop(StateDir::open_or_create(&dir, &binding("aa11")).unwrap());
        let sd = StateDir::open_or_create(&dir, &binding("aa11")).unwrap();
        assert!(!sd.created());
        sd.remove_created();
        assert!(dir.join("state.json").exists());
    }

    #[test]
    fn a_recorded_guest_is_live_only_while_its_process_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
        assert_eq!(sd.live_guest(), None);
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let record = sd.record_guest(child.id()).unwrap();
        assert_eq!(sd.live_guest(), Some(record.clone()));
        // The same PID with another start time is another process.
        let other = GuestRecord {
            start_time: record.start_time + 1,
            ..record
        };
        std::fs::write(
            tmp.path().join(GUEST_FILE),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        assert_eq!(sd.live_guest(), None);
        sd.record_guest(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(sd.live_guest(), None);
        sd.clear_guest();
        assert!(!tmp.path().join(GUEST_FILE).exists());
    }

    #[test]
    fn the_holder_id_is_made_with_the_state_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let sd = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
        let holder = sd.holder().unwrap();
        assert_eq!(holder.len(), 32);
        assert!(holder.chars().all(|c| c.is_ascii_hexdigit()), "{holder}");
        drop(sd);
        let sd = StateDir::open_or_create(tmp.path(), &binding("aa11")).unwrap();
        assert_eq!(sd.holder().unwrap(), holder);
        // Readable without the lock, while a daemon holds it.
        assert_eq!(peek(tmp.path()).unwrap().holder.as_deref(), Some(&*holder));
        assert!(peek(&tmp.path().join("none")).is_none());
    }

    #[test]
    fn corrupt_or_future_state_files_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("state.json"), b"{not json").unwrap();
        assert!(matches!(
            StateDir::open_or_create(tmp.path(), &binding("aa11")),
            Err(Error::Parse { .. })
        ));
        std::fs::write(
            tmp.path().join("state.json"),
            br#"{"format_version": 7, "whatever": 1}"#,
        )
        .unwrap();
        assert!(matches!(
            StateDir::open_or_create(tmp.path(), &binding("aa11")),
            Err(Error::UnsupportedVersion { version: 7, .. })
        ));
    }
}
