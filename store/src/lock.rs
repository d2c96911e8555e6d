//! The store's writer lock and reader registrations.
//!
//! **Local stores** use advisory locks (`flock`): the writer lock on the
//! `lock` file, and the shared locks readers hold on the manifests they
//! serve (see [`crate::snapshot::reader`]).
//!
//! **Remote stores** (S3) have no `flock`; they use *lease objects* under
//! `locks/`:
//! - The writer lock is `locks/writer.json`, created with a conditional PUT
//!   (`If-None-Match: *`): of two writers racing, exactly one PUT succeeds.
//!   The body names the holder (host, PID) and its lease length. A thread
//!   refreshes the lease every third of it by rewriting the object with
//!   `If-Match: <etag>` (so a holder whose lock was broken notices, logs an
//!   error and stops refreshing), and drop deletes it.
//! - A reader (instant boot, mount, restore, verify) registers
//!   `locks/readers/<random>.json` naming the snapshot it reads *before* it
//!   opens the manifest, and refreshes it the same way; gc counts a
//!   forgotten manifest with a fresh registration as in use, exactly like a
//!   manifest a local reader holds a shared `flock` on.
//! - Freshness is judged by the storage's clock only: the age of a lease is
//!   the `Last-Modified` of a probe object gc (or the would-be writer) just
//!   wrote minus the lease's `Last-Modified`, so clock skew between hosts
//!   does not matter.
//! - A lease not refreshed for longer than its length is stale (the holder
//!   died or lost the network). A second writer never breaks it by itself:
//!   it fails with a message naming the holder and how long ago the lease
//!   expired, and `break-lock` deletes it. Stale reader registrations are
//!   ignored by gc and deleted.
//!
//! Failure cases: a writer that cannot refresh (network down) for longer
//! than its lease may have its lock broken by an operator while it still
//! runs; its next refresh then fails and it logs that it lost the lock.
//! Publishing is still safe in that case for backups (packs and indexes are
//! immutable, manifests are new names); only a concurrent gc could delete a
//! pack the lost writer is about to reference, which is why breaking a lock
//! is an explicit operator action.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::backend::Backend;
use crate::error::{Error, ErrorKind, IoContext, Result};

/// Name of the writer lock file inside the store directory.
pub const LOCK_FILE: &str = "lock";

/// The exclusive writer lock (one backup, gc or index merge at a time),
/// released on drop. The holder's PID is written into the file so that a
/// second writer can say who holds it.
#[derive(Debug)]
pub struct WriterLock {
    file: Option<File>,
    lease: Option<Lease>,
}

impl Drop for WriterLock {
    /// Unlock explicitly rather than by closing: a child another thread of
    /// this process is spawning holds a copy of every descriptor between
    /// its fork and its exec, and a `flock` lives until the last copy of
    /// the descriptor is closed. Closing alone could leave the store
    /// locked for that moment, and a writer that follows at once would
    /// fail with "locked by PID" naming this very process.
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            if let Err(e) = f.unlock() {
                warn!("failed to unlock the store's writer lock: {e}");
            }
        }
    }
}

impl WriterLock {
    /// Take the writer lock of the store at `root` without waiting.
    pub fn acquire(root: &Path) -> Result<WriterLock> {
        let path = root.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io_path("Failed to open lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let who = match s.trim().parse::<u32>() {
                    Ok(pid) => format!("PID {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(Error::new(
                    ErrorKind::Locked,
                    format!("Store {} is locked by {who}", root.display()),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io_path("Failed to lock", &path, e)),
        }
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            writeln!(f, "{}", std::process::id())
        };
        write_pid(&mut file).map_err(|e| Error::io_path("Failed to write", &path, e))?;
        Ok(WriterLock {
            file: Some(file),
            lease: None,
        })
    }

    /// Take the writer lock of a remote store without waiting (the lease
    /// object protocol in the module docs).
    pub fn acquire_remote(backend: Arc<dyn Backend>) -> Result<WriterLock> {
        let body = LeaseBody::new("writer", None);
        let place = backend.display();
        let mut retried = false;
        loop {
            match backend.create_new(WRITER_KEY, &body.to_json()) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // Our own lock, which an earlier holder in this process
                    // could not delete (endpoint down): ours to take back.
                    if !retried && take_orphan(backend.as_ref(), WRITER_KEY) {
                        retried = true;
                        continue;
                    }
                    return Err(locked_error(backend.as_ref(), &place));
                }
                Err(e) => return Err(Error::io(format!("Failed to lock store {place}"), e)),
            }
        }
        let lease = Lease::start(backend, WRITER_KEY.to_string(), body)?;
        info!(store = %place, "took the writer lock (lease {} s)", lease_secs());
        Ok(WriterLock {
            file: None,
            lease: Some(lease),
        })
    }

    /// False once a remote lease was lost (broken by someone else).
    pub fn is_held(&self) -> bool {
        self.lease
            .as_ref()
            .is_none_or(|l| !l.lost.load(Ordering::Relaxed))
    }
}

/// Key of the remote writer lock.
pub const WRITER_KEY: &str = "locks/writer.json";
/// Directory of remote reader registrations.
pub const READERS_DIR: &str = "locks/readers";
/// Environment variable overriding [`DEFAULT_LEASE_SECS`].
pub const LEASE_ENV: &str = "RECOVERY_LEASE_SECS";
/// Default lease length of remote locks, in seconds.
pub const DEFAULT_LEASE_SECS: u64 = 30;

/// Lease length: `RECOVERY_LEASE_SECS` or [`DEFAULT_LEASE_SECS`] (at least 3).
pub fn lease_secs() -> u64 {
    std::env::var(LEASE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_LEASE_SECS)
        .max(3)
}

/// The body of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseBody {
    /// "writer" or "reader".
    pub kind: String,
    /// Host name of the holder.
    pub host: String,
    /// PID of the holder.
    pub pid: u32,
    /// Lease length in seconds.
    pub lease_secs: u64,
    /// The snapshot a reader reads (`NAME@ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// When the lease was taken (holder's clock, informational).
    pub started_unix: u64,
}

impl LeaseBody {
    fn new(kind: &str, snapshot: Option<String>) -> LeaseBody {
        LeaseBody {
            kind: kind.to_string(),
            host: hostname(),
            pid: std::process::id(),
            lease_secs: lease_secs(),
            snapshot,
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn parse(bytes: &[u8]) -> Option<LeaseBody> {
        serde_json::from_slice(bytes).ok()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".to_string())
}

/// The storage's current time: the `Last-Modified` of a probe object.
fn server_now(backend: &dyn Backend) -> io::Result<i64> {
    let key = format!("locks/clock-{}", hex::encode(rand::random::<[u8; 8]>()));
    backend.put(&key, b"")?;
    let r = backend.stat(&key);
    let _ = backend.delete(&key);
    Ok(r?.modified_unix)
}

/// A lease object somebody holds: its body, and its age by the storage's
/// clock.
#[derive(Debug, Clone)]
pub struct LeaseState {
    /// The key.
    pub key: String,
    /// Its body (None when unreadable).
    pub body: Option<LeaseBody>,
    /// Seconds since its last refresh.
    pub age_secs: i64,
}

impl LeaseState {
    /// Not refreshed for longer than its lease.
    pub fn is_stale(&self) -> bool {
        let lease = self
            .body
            .as_ref()
            .map_or(DEFAULT_LEASE_SECS, |b| b.lease_secs);
        self.age_secs > lease as i64
    }

    fn holder(&self) -> String {
        match &self.body {
            Some(b) => format!("PID {} on {}", b.pid, b.host),
            None => "an unknown holder".to_string(),
        }
    }
}

fn lease_state(backend: &dyn Backend, key: &str, now: i64) -> io::Result<LeaseState> {
    let info = backend.stat(key)?;
    let body = LeaseBody::parse(&backend.read(key)?);
    Ok(LeaseState {
        key: key.to_string(),
        body,
        age_secs: (now - info.modified_unix).max(0),
    })
}

/// The holder of a remote store's writer lock, if any.
pub fn writer_state(backend: &dyn Backend) -> Result<Option<LeaseState>> {
    let now = server_now(backend).ctx(|| "Failed to read the storage's clock".into())?;
    match lease_state(backend, WRITER_KEY, now) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("Failed to read the writer lock", e)),
    }
}

fn locked_error(backend: &dyn Backend, place: &str) -> Error {
    let state = match writer_state(backend) {
        Ok(Some(s)) => s,
        // Released in between, or unreadable: plain "locked".
        _ => {
            return Error::new(
                ErrorKind::Locked,
                format!("Store {place} is locked by another writer"),
            )
        }
    };
    let lease = state
        .body
        .as_ref()
        .map_or(DEFAULT_LEASE_SECS, |b| b.lease_secs);
    if state.is_stale() {
        Error::new(
            ErrorKind::Locked,
            format!(
                "Store {place} is locked by {}, but its lease expired {} s ago (the writer probably died); \
                 if no other writer runs, remove the lock with `recovery-cli break-lock --store {place}`",
                state.holder(),
                state.age_secs - lease as i64
            ),
        )
    } else {
        Error::new(
            ErrorKind::Locked,
            format!(
                "Store {place} is locked by {} (lease renewed {} s ago)",
                state.holder(),
                state.age_secs
            ),
        )
    }
}

/// Delete a remote store's writer lock. Refuses a fresh lease unless
/// `force`. Returns the lease removed, if there was one.
pub fn break_lock(backend: &dyn Backend, force: bool) -> Result<Option<LeaseState>> {
    let place = backend.display();
    let Some(state) = writer_state(backend)? else {
        return Ok(None);
    };
    if !state.is_stale() && !force {
        return Err(Error::new(
            ErrorKind::Locked,
            format!(
                "Store {place} is locked by {} whose lease is fresh (renewed {} s ago); not breaking a live lock",
                state.holder(),
                state.age_secs
            ),
        ));
    }
    backend
        .delete(WRITER_KEY)
        .ctx(|| format!("Failed to break the lock of {place}"))?;
    warn!(store = %place, holder = %state.holder(), "broke the writer lock");
    Ok(Some(state))
}

/// A reader's registration on a remote store, refreshed until dropped.
#[derive(Debug)]
pub struct ReaderLease {
    _lease: Lease,
}

impl ReaderLease {
    /// Register a reader of `snapshot` (`NAME@ID`).
    pub fn register(backend: Arc<dyn Backend>, snapshot: &str) -> Result<ReaderLease> {
        let key = format!(
            "{READERS_DIR}/{}.json",
            hex::encode(rand::random::<[u8; 12]>())
        );
        let body = LeaseBody::new("reader", Some(snapshot.to_string()));
        backend
            .create_new(&key, &body.to_json())
            .ctx(|| format!("Failed to register as a reader of {snapshot}"))?;
        debug!(key, snapshot, "registered reader");
        Ok(ReaderLease {
            _lease: Lease::start(backend, key, body)?,
        })
    }
}

/// Snapshots (`NAME@ID`) that registered readers with a fresh lease are
/// reading. Stale registrations are deleted when `reap`.
pub fn active_readers(backend: &dyn Backend, reap: bool) -> Result<Vec<String>> {
    let names = backend
        .list(READERS_DIR)
        .ctx(|| "Failed to list registered readers".into())?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let now = server_now(backend).ctx(|| "Failed to read the storage's clock".into())?;
    let mut out = Vec::new();
    for n in names {
        let key = format!("{READERS_DIR}/{n}");
        let state = match lease_state(backend, &key, now) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("Failed to read reader lease {key}"), e)),
        };
        if state.is_stale() {
            if reap {
                info!(key, "removing a stale reader registration");
                let _ = backend.delete(&key);
            }
            continue;
        }
        if let Some(s) = state.body.and_then(|b| b.snapshot) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Lease objects this process failed to delete on release (`display/key`).
static ORPHANS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn orphan_id(backend: &dyn Backend, key: &str) -> String {
    format!("{}/{key}", backend.display())
}

/// If `key` is a lease this process left behind (no live holder here) and
/// it still names this host and PID, delete it and return true.
fn take_orphan(backend: &dyn Backend, key: &str) -> bool {
    let id = orphan_id(backend, key);
    let mut orphans = ORPHANS.lock().unwrap_or_else(|p| p.into_inner());
    let Some(pos) = orphans.iter().position(|o| *o == id) else {
        return false;
    };
    let ours = backend
        .read(key)
        .ok()
        .and_then(|b| LeaseBody::parse(&b))
        .is_some_and(|b| b.pid == std::process::id() && b.host == hostname());
    if ours && backend.delete(key).is_ok() {
        orphans.remove(pos);
        info!(
            key,
            "took back a lease this process could not release earlier"
        );
        return true;
    }
    false
}

/// A lease object and the thread refreshing it; drop stops the thread and
/// deletes the object (if it is still ours).
#[derive(Debug)]
struct Lease {
    backend: Arc<dyn Backend>,
    key: String,
    etag: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    fn start(backend: Arc<dyn Backend>, key: String, body: LeaseBody) -> Result<Lease> {
        let etag = backend
            .stat(&key)
            .ctx(|| format!("Failed to read lease object {key}"))?
            .etag;
        let etag = Arc::new(Mutex::new(etag));
        let lost = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<()>();
        let every = Duration::from_secs(body.lease_secs).div_f64(3.0);
        let thread = {
            let (backend, key, etag, lost) =
                (backend.clone(), key.clone(), etag.clone(), lost.clone());
            let bytes = body.to_json();
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || loop {
                    match rx.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let current = etag.lock().ok().and_then(|g| g.clone());
                    let r = match &current {
                        Some(t) => backend.replace_if(&key, &bytes, t),
                        None => backend.put(&key, &bytes).and_then(|()| backend.stat(&key)),
                    };
                    match r {
                        Ok(info) => {
                            if let Ok(mut g) = etag.lock() {
                                *g = info.etag;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::ResourceBusy | io::ErrorKind::NotFound
                            ) =>
                        {
                            error!(key, "lost the lease (the lock was broken): {e}");
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => warn!(key, "failed to refresh the lease, will retry: {e}"),
                    }
                })
                .map_err(|e| Error::io("Failed to start the lease thread", e))?
        };
        Ok(Lease {
            backend,
            key,
            etag,
            lost,
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Lease {
    fn orphan(&self) {
        let id = orphan_id(self.backend.as_ref(), &self.key);
        ORPHANS.lock().unwrap_or_else(|p| p.into_inner()).push(id);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        // Only delete the object if it is still ours.
        let ours = self.etag.lock().ok().and_then(|g| g.clone());
        match self.backend.stat(&self.key) {
            Ok(info) if ours.is_none() || info.etag == ours => {
                if let Err(e) = self.backend.delete(&self.key) {
                    warn!(key = %self.key, "failed to release the lease: {e}");
                    self.orphan();
                }
            }
            Ok(_) => warn!(key = %self.key, "lease object changed hands; not deleting it"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(key = %self.key, "failed to release the lease: {e}");
                self.orphan();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_with_pid() {
        let dir = tempfile::tempdir().unwrap();
        let l = WriterLock::acquire(dir.path()).unwrap();
        let e = WriterLock::acquire(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(
            e.to_string()
                .contains(&format!("locked by PID {}", std::process::id())),
            "{e}"
        );
        drop(l);
        WriterLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_copy_of_the_descriptor_does_not_keep_the_store_locked() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let l = WriterLock::acquire(dir.path()).unwrap();
        // What a child being spawned holds between its fork and its exec:
        // another descriptor of the same open file.
        let copy = l
            .file
            .as_ref()
            .unwrap()
            .as_fd()
            .try_clone_to_owned()
            .unwrap();
        drop(l);
        let again = WriterLock::acquire(dir.path());
        drop(copy);
        again.unwrap();
    }
}
