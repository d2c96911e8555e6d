//! Drill records: proof that a snapshot booted (or did not) in a
//! recovery drill (`recovery-cli drill`), and how long it took.
//!
//! A record is the small JSON object
//! `drills/<name>/<id>/<micros>.json` (`micros`: the drill's time in µs
//! since the epoch, 16 digits, so names sort by time), published
//! atomically like every object (temp file, fsync, rename, fsync the
//! directory) and never changed afterwards:
//! ```text
//! {"snapshot":"vm1@20261206T120000.000000Z","time":"2026-12-06T12:05:00.000000Z",
//!  "passed":true,"rto_seconds":4.2,"checks":["console:PAYLOAD-OK"]}
//! ```
//! A drill of a whole service (`drill --plan`) adds one record per member
//! snapshot and one for the group point,
//! `drills/@<service>/<group id>/<micros>.json` (`@` cannot start an
//! image name, so these never mix with an image's), whose `snapshot` is
//! `SERVICE@ID` and whose `rto_seconds` is the service RTO.
//!
//! Records are history, not data: gc and verify ignore `drills/` (a record
//! of a forgotten snapshot is harmless and small), and adding one needs no
//! lock (each drill writes its own key).

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::repo::Store;
use crate::snapshot::{self, now_micros, rfc3339_micros};

/// Directory of all drill records.
pub const DRILLS_DIR: &str = "drills";

/// Prefix of a service's directory of group drill records under
/// [`DRILLS_DIR`].
const GROUP_PREFIX: &str = "@";

/// The outcome of one drill of one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// `NAME@ID` of the drilled snapshot (filled in by [`Store::add_drill_record`]).
    #[serde(default)]
    pub snapshot: String,
    /// When the drill ran, RFC 3339 (filled in by [`Store::add_drill_record`]).
    #[serde(default)]
    pub time: String,
    /// Whether every check passed.
    pub passed: bool,
    /// Command start to the last check passing (`None` when one failed).
    pub rto_seconds: Option<f64>,
    /// The checks, as given (`console:REGEX`, `qga`).
    pub checks: Vec<String>,
}

impl Store {
    /// Appends `record` as a drill of live snapshot `reference` (its
    /// `snapshot` and `time` are set here) and returns the stored record.
    pub fn add_drill_record(&self, reference: &str, record: &DrillRecord) -> Result<DrillRecord> {
        let l = snapshot::resolve(self.backend(), reference)?;
        self.put_drill_record(&l.name, &l.id, record)
    }

    /// Publishes `record` as `drills/<dir>/<id>/<now>.json` with
    /// `snapshot` = `<dir without @>@<id>` and `time` = now.
    fn put_drill_record(&self, dir: &str, id: &str, record: &DrillRecord) -> Result<DrillRecord> {
        let micros = now_micros();
        let name = dir.strip_prefix(GROUP_PREFIX).unwrap_or(dir);
        let stored = DrillRecord {
            snapshot: format!("{name}@{id}"),
            time: rfc3339_micros(micros),
            ..record.clone()
        };
        let key = format!("{DRILLS_DIR}/{dir}/{id}/{micros:016}.json");
        let mut bytes = serde_json::to_vec_pretty(&stored)
            .map_err(|e| Error::invalid("Failed to encode drill record").with_source(e))?;
        bytes.push(b'\n');
        self.backend()
            .put(&key, &bytes)
            .ctx(|| format!("Failed to write drill record {key}"))?;
        tracing::info!(snapshot = %stored.snapshot, passed = stored.passed, "recorded drill");
        Ok(stored)
    }

    /// Drill records of `NAME@ID`, oldest first. A record that cannot be
    /// decoded is skipped with a warning (records are history, not data).
    pub fn drill_records(&self, reference: &str) -> Result<Vec<DrillRecord>> {
        let (name, id) = reference
            .split_once('@')
            .ok_or_else(|| Error::invalid(format!("Expected NAME@ID, not {reference:?}")))?;
        snapshot::validate_name(name)?;
        if !snapshot::is_snapshot_id(id) {
            return Err(Error::invalid(format!(
                "Invalid snapshot id {id:?} in {reference:?}"
            )));
        }
        let dir = format!("{DRILLS_DIR}/{name}/{id}");
        Ok(self.records_in(&dir)?.into_iter().map(|(_, r)| r).collect())
    }

    /// Appends `record` as a drill of the whole group point `point` (its
    /// `snapshot` is set to `SERVICE@ID`, its `time` to now).
    pub fn add_group_drill_record(
        &self,
        point: &crate::group::GroupPoint,
        record: &DrillRecord,
    ) -> Result<DrillRecord> {
        snapshot::validate_name(&point.service)?;
        if !snapshot::is_snapshot_id(&point.id) {
            return Err(Error::invalid(format!(
                "Invalid group point id {:?}",
                point.id
            )));
        }
        self.put_drill_record(
            &format!("{GROUP_PREFIX}{}", point.service),
            &point.id,
            record,
        )
    }

    /// Every group drill record of `service` with its time (µs), by group
    /// point id, then time.
    pub fn group_drill_records(&self, service: &str) -> Result<Vec<(i64, DrillRecord)>> {
        snapshot::validate_name(service)?;
        let dir = format!("{DRILLS_DIR}/{GROUP_PREFIX}{service}");
        let mut ids = self
            .backend()
            .list(&dir)
            .ctx(|| format!("Failed to list drill records in {dir}"))?;
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.records_in(&format!("{dir}/{id}"))?);
        }
        Ok(out)
    }

    /// Every group drill record in the store, by service, group point id,
    /// then time.
    pub fn all_group_drill_records(&self) -> Result<Vec<(i64, DrillRecord)>> {
        let mut names = self
            .backend()
            .list(DRILLS_DIR)
            .ctx(|| format!("Failed to list drill records in {DRILLS_DIR}"))?;
        names.sort();
        let mut out = Vec::new();
        for service in names.iter().filter_map(|n| n.strip_prefix(GROUP_PREFIX)) {
            out.extend(self.group_drill_records(service)?);
        }
        Ok(out)
    }

    /// Every drill record in the store with its time (µs since the
    /// epoch, from its key), by image name, then snapshot id, then time.
    /// Records of forgotten snapshots are included (they are history);
    /// group records are not ([`Store::all_group_drill_records`]).
    pub fn all_drill_records(&self) -> Result<Vec<(i64, DrillRecord)>> {
        let mut out = Vec::new();
        let list = |dir: &str| {
            let mut names = self
                .backend()
                .list(dir)
                .ctx(|| format!("Failed to list drill records in {dir}"))?;
            names.sort();
            Ok::<_, Error>(names)
        };
        for name in list(DRILLS_DIR)? {
            if name.starts_with(GROUP_PREFIX) {
                continue;
            }
            for id in list(&format!("{DRILLS_DIR}/{name}"))? {
                out.extend(self.records_in(&format!("{DRILLS_DIR}/{name}/{id}"))?);
            }
        }
        Ok(out)
    }

    /// The records in one snapshot's directory, oldest first (names sort
    /// by time); an undecodable one is skipped with a warning.
    fn records_in(&self, dir: &str) -> Result<Vec<(i64, DrillRecord)>> {
        let mut files = self
            .backend()
            .list(dir)
            .ctx(|| format!("Failed to list drill records in {dir}"))?;
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let Some(micros) = file
                .strip_suffix(".json")
                .and_then(|m| m.parse::<i64>().ok())
            else {
                continue;
            };
            let key = format!("{dir}/{file}");
            let bytes = self
                .backend()
                .read(&key)
                .ctx(|| format!("Failed to read drill record {key}"))?;
            match serde_json::from_slice::<DrillRecord>(&bytes) {
                Ok(r) => out.push((micros, r)),
                Err(e) => tracing::warn!(key, error = %e, "skipping an undecodable drill record"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_and_listed_oldest_first() {
        let (dir, store) = crate::backup::tests::setup(4096);
        let img = dir.path().join("a.img");
        std::fs::write(&img, crate::backup::tests::image(1, 64 << 10)).unwrap();
        let s = store
            .backup("vm1", &img, &crate::BackupOptions::default())
            .unwrap();
        let reference = format!("vm1@{}", s.snapshot);
        assert!(store.drill_records(&reference).unwrap().is_empty());
        let failed = DrillRecord {
            snapshot: String::new(),
            time: String::new(),
            passed: false,
            rto_seconds: None,
            checks: vec!["console:X".into()],
        };
        let passed = DrillRecord {
            passed: true,
            rto_seconds: Some(3.5),
            ..failed.clone()
        };
        store.add_drill_record("vm1", &failed).unwrap();
        let stored = store.add_drill_record(&reference, &passed).unwrap();
        assert_eq!(stored.snapshot, reference);
        let records = store.drill_records(&reference).unwrap();
        assert_eq!(records.len(), 2);
        assert!(!records[0].passed);
        assert_eq!(records[1], stored);
        assert!(store.add_drill_record("nope", &passed).is_err());
        let all = store.all_drill_records().unwrap();
        assert_eq!(all.len(), 2);
        assert!(all[0].0 < all[1].0, "{all:?}");
        assert_eq!(all[1].1, stored);
        assert!(all.iter().all(|(_, r)| r.snapshot == reference));

        // A group drill: its own directory, not among the image records.
        let point = crate::group::GroupPoint::new(
            "svc",
            1_700_000_000_000_000,
            0.0,
            vec![crate::group::GroupMember {
                vm: "a".into(),
                drive: "d".into(),
                snapshot: reference.clone(),
            }],
        )
        .unwrap();
        let g = store.add_group_drill_record(&point, &passed).unwrap();
        assert_eq!(g.snapshot, point.reference());
        let groups = store.group_drill_records("svc").unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].1, g);
        assert_eq!(store.all_group_drill_records().unwrap(), groups);
        assert!(store.group_drill_records("other").unwrap().is_empty());
        assert_eq!(store.all_drill_records().unwrap().len(), 2);
    }
}
