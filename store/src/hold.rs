//! Holds: records that something outside the store (an instant-boot state
//! directory) depends on a snapshot, so that it is not forgotten or
//! collected under it.
//!
//! A hold is the small JSON object `holds/<name>/<id>/<holder>.json`,
//! published atomically like every object (temp file, fsync, rename, fsync
//! the directory) and deleted when released:
//! ```text
//! {"holder":"5f0c…","description":"instant-boot state dir /var/lib/vm1",
//!  "host":"node1","pid":4242,"created":"2026-12-06T12:00:00.000000Z"}
//! ```
//! `holder` is a stable id chosen by the holder (e.g. a UUID its state dir
//! keeps), so adding a hold again (after a restart) is idempotent: it
//! replaces the record (new pid) and keeps its first `created`.
//!
//! Rules:
//! - [`Store::forget`] refuses a held snapshot, naming the holders;
//!   [`Store::forget_with`] with `force` forgets it anyway.
//! - gc treats a forgotten manifest that is still held as live: neither it
//!   nor its chunks are deleted while any hold on it exists. So a forced
//!   forget never strands a holder's data; [`Store::unforget`] brings the
//!   snapshot back, and once the last hold is removed the next gc reclaims
//!   it.
//! - Races: `add_hold` publishes the record, then checks the snapshot is
//!   still live (else it removes the record and fails); `forget` checks the
//!   holds, renames, then checks again and undoes the rename if a hold
//!   appeared meanwhile. gc runs under the writer lock, and a forgotten
//!   snapshot gains no new hold (add_hold needs a live one; unforget takes
//!   the writer lock), so gc's view of the holds of forgotten snapshots
//!   cannot go stale under it.

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::Store;
use crate::snapshot::{self, is_snapshot_id, now_micros, rfc3339_micros, validate_name};

/// Directory of all hold records.
pub const HOLDS_DIR: &str = "holds";

/// Who holds a snapshot, as the holder describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldInfo {
    /// Stable id of the holder: `[A-Za-z0-9._-]`, 1..=128 characters, not
    /// starting with `.` (e.g. a UUID kept in the holder's state dir).
    pub holder: String,
    /// For people: what holds it (e.g. `instant-boot state dir /var/lib/vm1`).
    pub description: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder when it (last) added the hold.
    pub pid: u32,
}

impl HoldInfo {
    /// A hold by `holder` for this process on this host.
    pub fn new(holder: impl Into<String>, description: impl Into<String>) -> HoldInfo {
        HoldInfo {
            holder: holder.into(),
            description: description.into(),
            host: hostname(),
            pid: std::process::id(),
        }
    }
}

/// A hold on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// `NAME@ID` of the held snapshot.
    #[serde(default)]
    pub snapshot: String,
    #[serde(flatten)]
    pub info: HoldInfo,
    /// When the hold was first added, RFC 3339.
    pub created: String,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, host {}, pid {})",
            self.info.holder, self.info.description, self.info.host, self.info.pid
        )
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn validate_holder(holder: &str) -> Result<()> {
    validate_name(holder).map_err(|_| {
        Error::invalid(format!(
            "Invalid holder id {holder:?}: use letters, digits, '.', '_' and '-', not starting with '.'"
        ))
    })
}

fn dir_key(name: &str, id: &str) -> String {
    format!("{HOLDS_DIR}/{name}/{id}")
}

fn hold_key(name: &str, id: &str, holder: &str) -> String {
    format!("{}/{holder}.json", dir_key(name, id))
}

/// `(name, id)` of `NAME@ID` without looking anything up (the snapshot may
/// be forgotten); other references are resolved to a live snapshot.
fn exact(store: &Store, reference: &str) -> Result<(String, String)> {
    if let Some((name, id)) = reference.split_once('@') {
        if validate_name(name).is_ok() && is_snapshot_id(id) {
            return Ok((name.to_string(), id.to_string()));
        }
    }
    if is_snapshot_id(reference) {
        if let Some(l) = snapshot::list(store.backend(), None, true)?
            .into_iter()
            .find(|l| l.id == reference)
        {
            return Ok((l.name, l.id));
        }
    }
    let l = snapshot::resolve(store.backend(), reference)?;
    Ok((l.name, l.id))
}

impl Store {
    /// Hold live snapshot `reference` for `info.holder`. Idempotent: adding
    /// the same holder again replaces its record (keeping `created`).
    pub fn add_hold(&self, reference: &str, info: &HoldInfo) -> Result<Hold> {
        validate_holder(&info.holder)?;
        let l = snapshot::resolve(self.backend(), reference)?;
        let key = hold_key(&l.name, &l.id, &info.holder);
        let created = match self.read_hold(&l.name, &l.id, &info.holder)? {
            Some(old) => old.created,
            None => rfc3339_micros(now_micros()),
        };
        let hold = Hold {
            snapshot: format!("{}@{}", l.name, l.id),
            info: info.clone(),
            created,
        };
        let mut bytes = serde_json::to_vec_pretty(&hold)
            .map_err(|e| Error::invalid("Failed to encode hold").with_source(e))?;
        bytes.push(b'\n');
        self.backend()
            .put(&key, &bytes)
            .ctx(|| format!("Failed to write hold {key}"))?;
        // Forgotten meanwhile: do not claim a hold on it.
        if !self
            .backend()
            .exists(&l.key())
            .ctx(|| format!("Failed to look up snapshot {}", hold.snapshot))?
        {
            let _ = self.backend().delete(&key);
            return Err(Error::not_found(format!(
                "Snapshot {} not found (forgotten while adding the hold)",
                hold.snapshot
            ))
            .with_snapshot(hold.snapshot.clone()));
        }
        info!(snapshot = %hold.snapshot, holder = %info.holder, "added hold");
        Ok(hold)
    }

    /// Release `holder`'s hold on `reference` (`NAME@ID` may name a
    /// forgotten snapshot). Returns whether there was one.
    pub fn remove_hold(&self, reference: &str, holder: &str) -> Result<bool> {
        validate_holder(holder)?;
        let (name, id) = exact(self, reference)?;
        let key = hold_key(&name, &id, holder);
        let existed = self
            .backend()
            .exists(&key)
            .ctx(|| format!("Failed to look up hold {key}"))?;
        self.backend()
            .delete(&key)
            .ctx(|| format!("Failed to delete hold {key}"))?;
        if existed {
            info!(snapshot = %format!("{name}@{id}"), holder, "removed hold");
        }
        Ok(existed)
    }

    /// Holds on `reference` (`NAME@ID` may name a forgotten snapshot), or
    /// on every snapshot when `None`; sorted by snapshot id, then holder.
    pub fn holds(&self, reference: Option<&str>) -> Result<Vec<Hold>> {
        let pairs = match reference {
            Some(r) => vec![exact(self, r)?],
            None => {
                let mut v = Vec::new();
                let b = self.backend();
                for name in b.list(HOLDS_DIR).ctx(|| "Failed to list holds".into())? {
                    if validate_name(&name).is_err() {
                        continue;
                    }
                    for id in b
                        .list(&format!("{HOLDS_DIR}/{name}"))
                        .ctx(|| format!("Failed to list holds of {name}"))?
                    {
                        if is_snapshot_id(&id) {
                            v.push((name.clone(), id));
                        }
                    }
                }
                v
            }
        };
        let mut out = Vec::new();
        for (name, id) in pairs {
            out.extend(self.holds_of(&name, &id)?);
        }
        out.sort_by(|a, b| {
            let id = |h: &Hold| h.snapshot.split_once('@').map(|x| x.1.to_string());
            id(a)
                .cmp(&id(b))
                .then_with(|| a.info.holder.cmp(&b.info.holder))
        });
        Ok(out)
    }

    /// Holds on snapshot `name@id`.
    pub(crate) fn holds_of(&self, name: &str, id: &str) -> Result<Vec<Hold>> {
        let dir = dir_key(name, id);
        let mut out = Vec::new();
        for file in self
            .backend()
            .list(&dir)
            .ctx(|| format!("Failed to list holds in {dir}"))?
        {
            let Some(holder) = file.strip_suffix(".json") else {
                continue;
            };
            if validate_holder(holder).is_err() {
                continue;
            }
            if let Some(h) = self.read_hold(name, id, holder)? {
                out.push(h);
            }
        }
        Ok(out)
    }

    fn read_hold(&self, name: &str, id: &str, holder: &str) -> Result<Option<Hold>> {
        let key = hold_key(name, id, holder);
        let bytes = match self.backend().read(&key) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("Failed to read hold {key}"), e)),
        };
        // A damaged record still holds: it names its holder by its key.
        let mut hold: Hold = serde_json::from_slice(&bytes).unwrap_or_else(|_| Hold {
            snapshot: String::new(),
            info: HoldInfo {
                holder: holder.to_string(),
                description: "unreadable hold record".into(),
                host: "unknown".into(),
                pid: 0,
            },
            created: String::new(),
        });
        hold.snapshot = format!("{name}@{id}");
        hold.info.holder = holder.to_string();
        Ok(Some(hold))
    }
}

/// The one-line refusal for forgetting a held snapshot.
pub(crate) fn held_error(reference: &str, holds: &[Hold]) -> Error {
    let who: Vec<String> = holds.iter().map(|h| h.to_string()).collect();
    Error::new(
        ErrorKind::Held,
        format!(
            "Snapshot {reference} is held by {}; release the hold, or use --force to forget it anyway (its data stays until every hold is removed)",
            who.join("; ")
        ),
    )
    .with_snapshot(reference)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::{BackupOptions, GcOptions};

    fn read_all(store: &Store, reference: &str) -> Vec<u8> {
        let r = store.open_snapshot(reference).unwrap();
        let mut v = vec![0u8; r.image_size() as usize];
        r.read_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn a_held_snapshot_survives_forget_and_gc_until_released() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("a.img");
        let img = image(30, 512 << 10);
        std::fs::write(&src, &img).unwrap();
        let opts = BackupOptions {
            pack_size: Some(64 << 10),
            ..Default::default()
        };
        let s = store.backup("vm", &src, &opts).unwrap();
        let reference = format!("vm@{}", s.snapshot);
        let info = HoldInfo::new("state-1234", "instant-boot state dir /x");
        let h = store.add_hold("vm", &info).unwrap();
        assert_eq!(h.snapshot, reference);
        assert_eq!(h.info.pid, std::process::id());
        // Idempotent: same holder again, one record, first `created` kept.
        let again = store.add_hold(&reference, &info).unwrap();
        assert_eq!(again.created, h.created);
        assert_eq!(store.holds(None).unwrap(), vec![h.clone()]);
        assert_eq!(store.holds(Some("vm")).unwrap().len(), 1);
        let bad = HoldInfo::new("../x", "x");
        assert_eq!(
            store.add_hold("vm", &bad).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );

        // forget refuses, naming the holder, and changes nothing.
        let e = store.forget("vm").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Held);
        let msg = e.to_string();
        assert!(
            msg.contains("is held by state-1234 (instant-boot state dir /x")
                && msg.contains("--force"),
            "{msg}"
        );
        assert_eq!(store.snapshots(None).unwrap().len(), 1);

        // Forced: forgotten, but gc keeps it and its chunks while held.
        store.forget_with("vm", true).unwrap();
        assert!(store.snapshots(None).unwrap().is_empty());
        let g = store
            .gc(&GcOptions {
                repack_threshold: 0.0,
            })
            .unwrap();
        assert_eq!((g.manifests_held, g.manifests_deleted), (1, 0), "{g:?}");
        assert_eq!(g.bytes_freed, 0, "{g:?}");
        assert_eq!(store.holds(Some(&reference)).unwrap().len(), 1);
        // A new hold needs a live snapshot.
        assert_eq!(
            store
                .add_hold(&reference, &HoldInfo::new("other", "x"))
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );

        // unforget brings it back, whole.
        let back = store.unforget(&reference).unwrap();
        assert_eq!(back.id, s.snapshot);
        assert_eq!(read_all(&store, &reference), img);
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());
        assert_eq!(
            store.unforget(&reference).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );

        // Released: forget works, gc reclaims, unforget has nothing left.
        assert!(store.remove_hold(&reference, "state-1234").unwrap());
        assert!(!store.remove_hold(&reference, "state-1234").unwrap());
        store.forget("vm").unwrap();
        let g = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(g.manifests_deleted, 1, "{g:?}");
        assert_eq!(g.chunks_after, 0);
        let e = store.unforget(&reference).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("gc may have deleted it"), "{e}");
    }

    #[test]
    fn unforget_without_hold_and_by_id() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("a.img");
        std::fs::write(&src, image(31, 64 << 10)).unwrap();
        let s = store.backup("vm", &src, &BackupOptions::default()).unwrap();
        store.forget("vm").unwrap();
        assert_eq!(
            store.unforget("vm").unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        store.unforget(&s.snapshot).unwrap();
        assert_eq!(store.resolve("vm").unwrap().id, s.snapshot);
        // unforget waits for no one: it fails at once while gc or a backup runs.
        store.forget("vm").unwrap();
        let _lock = crate::lock::WriterLock::acquire(store.path()).unwrap();
        assert_eq!(
            store.unforget(&s.snapshot).unwrap_err().kind(),
            ErrorKind::Locked
        );
    }
}
