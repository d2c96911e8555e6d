//! Group points: one instant across several snapshots (every disk of every
//! VM of a service), recovered as a whole.
//!
//! # Record
//! A group point is a small JSON object published atomically through the
//! [`Backend`](crate::backend::Backend) as `groups/<service>/<id>.json`:
//! ```text
//! {"format":"instant-recovery-group","version":1,"service":"portal",
//!  "id":"20261206T151500.123456Z","instant":"2026-12-06T15:15:00.123456Z",
//!  "blackout_ms":41.2,
//!  "members":[{"vm":"db","drive":"disk0","snapshot":"portal-db-disk0@20261206T151501.000001Z"}, …]}
//! ```
//! The id is the instant the guests were paused (or frozen) and every
//! fleecing transaction ran, so `--at T` picks the newest group point with
//! an instant at or before T. Members are ordinary snapshots, usable by
//! every other command.
//!
//! # Durability and crash consistency
//! The record is published only after every member's manifest is durable
//! (each member publishes its packs, then its manifest), so a visible group
//! point never names a missing snapshot. A crash before the record leaves
//! member snapshots that belong to no group: ordinary snapshots, harmless,
//! and the next group point is complete on its own.
//!
//! # Forget and gc
//! A group goes as a whole ([`Store::forget_group`]): its record is deleted
//! first (so a group is never seen half-forgotten), then each member is
//! forgotten; gc frees the chunks. Member snapshots of a live group are
//! kept by gc like any live snapshot. Forgetting one member on its own
//! would split the group: [`Store::group_of`] lets `forget` refuse it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::repo::Store;
use crate::snapshot::{self, id_from_micros, micros_from_id, rfc3339_micros, validate_name};

/// Directory of the group records.
pub const GROUPS_DIR: &str = "groups";
/// `format` of a group record (do not modify).
pub const GROUP_FORMAT: &str = "instant-recovery-group";
/// Version of the group record (do not modify).
pub const GROUP_VERSION: u32 = 1;
const SUFFIX: &str = ".json";

/// One member of a group point: one disk of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMember {
    pub vm: String,
    pub drive: String,
    /// `NAME@ID` of the member snapshot.
    pub snapshot: String,
}

/// A group point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub format: String,
    pub version: u32,
    pub service: String,
    /// Time-sortable id (the instant), like a snapshot id.
    pub id: String,
    /// The instant, RFC 3339 with µs.
    pub instant: String,
    /// Longest time any guest was paused or frozen for the start.
    pub blackout_ms: f64,
    pub members: Vec<GroupMember>,
}

impl GroupPoint {
    /// A new group point of `service` taken at `instant` (µs since the
    /// epoch).
    pub fn new(
        service: &str,
        instant: i64,
        blackout_ms: f64,
        members: Vec<GroupMember>,
    ) -> Result<GroupPoint> {
        validate_name(service)?;
        Ok(GroupPoint {
            format: GROUP_FORMAT.into(),
            version: GROUP_VERSION,
            service: service.into(),
            id: id_from_micros(instant)?,
            instant: rfc3339_micros(instant),
            blackout_ms,
            members,
        })
    }

    /// `SERVICE@ID`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.service, self.id)
    }

    /// The instant in µs since the epoch.
    pub fn micros(&self) -> i64 {
        micros_from_id(&self.id).unwrap_or(0)
    }
}

fn group_key(service: &str, id: &str) -> String {
    format!("{GROUPS_DIR}/{service}/{id}{SUFFIX}")
}

impl Store {
    /// Publish a group point, after checking that every member snapshot
    /// exists. Its id is made unique within the service (a later µs if
    /// taken).
    pub fn publish_group(&self, point: &mut GroupPoint) -> Result<()> {
        validate_name(&point.service)?;
        for m in &point.members {
            self.resolve(&m.snapshot).map_err(|e| {
                e.context(format!(
                    "Group point {} names member {}",
                    point.reference(),
                    m.snapshot
                ))
            })?;
        }
        let mut micros = point.micros();
        while self
            .backend()
            .exists(&group_key(&point.service, &point.id))
            .ctx(|| format!("Failed to look up group point {}", point.reference()))?
        {
            micros += 1;
            point.id = id_from_micros(micros)?;
            point.instant = rfc3339_micros(micros);
        }
        let data = serde_json::to_vec_pretty(point)
            .map_err(|e| Error::invalid("Failed to encode a group point").with_source(e))?;
        let key = group_key(&point.service, &point.id);
        self.backend()
            .put(&key, &data)
            .ctx(|| format!("Failed to publish group point {}", point.reference()))?;
        Ok(())
    }

    /// The live group points of `service`, oldest first.
    pub fn groups(&self, service: &str) -> Result<Vec<GroupPoint>> {
        validate_name(service)?;
        let dir = format!("{GROUPS_DIR}/{service}");
        let mut names = self
            .backend()
            .list(&dir)
            .ctx(|| format!("Failed to list {dir}"))?;
        names.sort();
        let mut out = Vec::new();
        for n in names {
            let Some(id) = n.strip_suffix(SUFFIX) else {
                continue;
            };
            if !snapshot::is_snapshot_id(id) {
                continue;
            }
            out.push(self.load_group(service, id)?);
        }
        Ok(out)
    }

    fn load_group(&self, service: &str, id: &str) -> Result<GroupPoint> {
        let key = group_key(service, id);
        let data = self
            .backend()
            .read(&key)
            .ctx(|| format!("Failed to read group point {service}@{id}"))?;
        let g: GroupPoint = serde_json::from_slice(&data).map_err(|e| {
            Error::invalid(format!("Group point {key} is not valid JSON")).with_source(e)
        })?;
        if g.format != GROUP_FORMAT || g.version != GROUP_VERSION {
            return Err(Error::invalid(format!(
                "Group point {key} has format {:?} version {}; this build reads {GROUP_FORMAT:?} version {GROUP_VERSION}",
                g.format, g.version
            )));
        }
        Ok(g)
    }

    /// A group point of `service`: by id, else the newest at or before
    /// `at` (µs), else the newest.
    pub fn resolve_group(
        &self,
        service: &str,
        id: Option<&str>,
        at: Option<i64>,
    ) -> Result<GroupPoint> {
        let groups = self.groups(service)?;
        let found = match (id, at) {
            (Some(id), _) => {
                let id = id.strip_prefix(&format!("{service}@")).unwrap_or(id);
                groups.into_iter().find(|g| g.id == id)
            }
            (None, Some(at)) => groups.into_iter().rev().find(|g| g.micros() <= at),
            (None, None) => groups.into_iter().next_back(),
        };
        found.ok_or_else(|| {
            Error::not_found(match (id, at) {
                (Some(id), _) => format!("No group point {id} of service {service}"),
                (None, Some(at)) => format!(
                    "No group point of service {service} at or before {}",
                    rfc3339_micros(at)
                ),
                (None, None) => format!("Service {service} has no group point yet"),
            })
        })
    }

    /// Forget a group point as a whole: the record first, then every
    /// member snapshot (held members too: gc keeps them while held).
    /// Returns the members forgotten.
    pub fn forget_group(&self, point: &GroupPoint) -> Result<Vec<String>> {
        let key = group_key(&point.service, &point.id);
        self.backend()
            .delete(&key)
            .ctx(|| format!("Failed to forget group point {}", point.reference()))?;
        let mut forgotten = Vec::new();
        for m in &point.members {
            match self.forget_with(&m.snapshot, true) {
                Ok(info) => forgotten.push(info.reference()),
                // Already forgotten on its own: the group goes anyway.
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(forgotten)
    }

    /// The live group point that `snapshot` (`NAME@ID`) is a member of, if
    /// any (searched among every service).
    pub fn group_of(&self, snapshot: &str) -> Result<Option<GroupPoint>> {
        let services = self
            .backend()
            .list(GROUPS_DIR)
            .ctx(|| format!("Failed to list {GROUPS_DIR}"))?;
        for s in services {
            if validate_name(&s).is_err() {
                continue;
            }
            for g in self.groups(&s)? {
                if g.members.iter().any(|m| m.snapshot == snapshot) {
                    return Ok(Some(g));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::BackupOptions;

    #[test]
    fn groups_publish_resolve_and_forget_as_a_whole() {
        let (dir, store) = setup(4096);
        let mut members = Vec::new();
        for name in ["svc-a-disk0", "svc-b-disk0"] {
            let src = dir.path().join(name);
            std::fs::write(&src, image(7, 64 << 10)).unwrap();
            let st = store.backup(name, &src, &BackupOptions::default()).unwrap();
            members.push(GroupMember {
                vm: name[4..5].into(),
                drive: "disk0".into(),
                snapshot: format!("{name}@{}", st.snapshot),
            });
        }
        let t = snapshot::now_micros();
        let mut g1 = GroupPoint::new("svc", t, 1.5, members.clone()).unwrap();
        store.publish_group(&mut g1).unwrap();
        // The same instant again gets the next µs.
        let mut g2 = GroupPoint::new("svc", t, 2.0, members[..1].to_vec()).unwrap();
        store.publish_group(&mut g2).unwrap();
        assert_eq!(g2.micros(), t + 1);
        assert_eq!(store.groups("svc").unwrap(), [g1.clone(), g2.clone()]);
        assert_eq!(store.resolve_group("svc", None, None).unwrap(), g2);
        assert_eq!(store.resolve_group("svc", None, Some(t)).unwrap(), g1);
        assert_eq!(
            store
                .resolve_group("svc", Some(&g1.reference()), None)
                .unwrap(),
            g1
        );
        let e = store.resolve_group("svc", None, Some(t - 1)).unwrap_err();
        assert!(e.to_string().contains("at or before"), "{e}");
        assert_eq!(
            store.group_of(&members[1].snapshot).unwrap(),
            Some(g1.clone())
        );
        // A member that does not exist is refused.
        let mut bad = GroupPoint::new(
            "svc",
            t + 10,
            0.0,
            vec![GroupMember {
                vm: "x".into(),
                drive: "d".into(),
                snapshot: "svc-x-d@20261206T120000.000000Z".into(),
            }],
        )
        .unwrap();
        assert!(store.publish_group(&mut bad).is_err());
        // Forget g1 as a whole: its record and both members.
        let gone = store.forget_group(&g1).unwrap();
        assert_eq!(gone.len(), 2);
        assert_eq!(store.groups("svc").unwrap(), [g2.clone()]);
        assert!(store.resolve(&members[1].snapshot).is_err());
        // g2's member was forgotten with g1 (it was shared): forgetting g2
        // still removes its record.
        assert!(store.forget_group(&g2).unwrap().is_empty());
        assert!(store.groups("svc").unwrap().is_empty());
    }
}
