//! Snapshots: names, ids, references, listing and their manifests.
//!
//! A snapshot is the manifest `snapshots/<name>/<id>.snap`. Ids are UTC
//! timestamps with microseconds (`20261122T021152.123456Z`), so they sort by
//! time; the writer makes them strictly increasing across the whole store, so
//! an id alone identifies a snapshot. `forget` renames a manifest to
//! `<id>.snap.forgotten`; gc deletes it once no reader holds it.
//!
//! References: `NAME` (the newest snapshot of that image), `NAME@ID`, or `ID`.

pub mod delta;
pub mod manifest;
pub mod reader;

use serde::Serialize;
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::backend::Backend;
use crate::error::{Error, IoContext, Result};

/// Directory of all manifests.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Suffix of a live manifest.
pub const SNAP_SUFFIX: &str = ".snap";
/// Suffix of a forgotten manifest awaiting gc.
pub const FORGOTTEN_SUFFIX: &str = ".snap.forgotten";

const ID_FORMAT: &[FormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second].[subsecond digits:6]Z");

/// What a snapshot is, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Time-sortable id, e.g. `20261122T021152.123456Z`.
    pub id: String,
    /// Image name, e.g. `web01`.
    pub name: String,
    /// Image size in bytes.
    pub image_size: u64,
    /// Chunk size of the store when it was taken.
    pub chunk_size: u32,
    /// Number of chunks (the last one may be short).
    pub chunk_count: u64,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The backed-up source path.
    pub source: String,
    /// Id of the parent snapshot (previous snapshot of the same name).
    pub parent: Option<String>,
}

impl SnapshotInfo {
    /// `NAME@ID`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.id)
    }
}

/// Image names: `[A-Za-z0-9._-]`, 1..=128 characters, not starting with `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "Invalid image name {name:?}: {NAME_RULE}"
        )))
    }
}

const NAME_RULE: &str = "use letters, digits, '.', '_' and '-', not starting with '.'";

/// [`validate_name`] for the name part of a snapshot reference: the error
/// quotes the whole reference.
fn validate_reference_name(name: &str, reference: &str) -> Result<()> {
    validate_name(name).map_err(|_| {
        Error::invalid(format!(
            "Invalid snapshot {reference:?}: image names {NAME_RULE}"
        ))
    })
}

/// Format a time (µs since the epoch) as a snapshot id.
pub fn id_from_micros(micros: i64) -> Result<String> {
    let t = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .map_err(|e| Error::invalid(format!("Invalid snapshot time {micros}")).with_source(e))?;
    t.format(ID_FORMAT)
        .map_err(|e| Error::invalid("Failed to format snapshot id").with_source(e))
}

/// Parse a snapshot id into µs since the epoch.
pub fn micros_from_id(id: &str) -> Option<i64> {
    let t = PrimitiveDateTime::parse(id, ID_FORMAT).ok()?.assume_utc();
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

/// True when `s` has the shape of a snapshot id.
pub fn is_snapshot_id(s: &str) -> bool {
    micros_from_id(s).is_some()
}

const RFC3339_MICROS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// RFC 3339 form of a time in µs since the epoch (shortest fraction).
pub fn rfc3339(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// RFC 3339 form of a time in µs since the epoch, always with six fraction
/// digits: a fixed width, and the same digits as the snapshot id (a
/// snapshot's `created`).
pub fn rfc3339_micros(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
        .ok()
        .and_then(|t| t.format(RFC3339_MICROS).ok())
        .unwrap_or_default()
}

/// Now, in µs since the epoch.
pub fn now_micros() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// Key of a live manifest.
pub fn manifest_key(name: &str, id: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{name}/{id}{SNAP_SUFFIX}")
}

/// Key of a forgotten manifest.
pub fn forgotten_key(name: &str, id: &str) -> String {
    format!("{SNAPSHOTS_DIR}/{name}/{id}{FORGOTTEN_SUFFIX}")
}

/// A manifest found by [`list`]: name, id, and whether it was forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub id: String,
    pub forgotten: bool,
}

impl Listed {
    /// Its backend key.
    pub fn key(&self) -> String {
        if self.forgotten {
            forgotten_key(&self.name, &self.id)
        } else {
            manifest_key(&self.name, &self.id)
        }
    }
}

/// List manifests (of one name, or all), sorted by id. Forgotten ones only
/// when `with_forgotten`.
pub fn list(
    backend: &dyn Backend,
    name: Option<&str>,
    with_forgotten: bool,
) -> Result<Vec<Listed>> {
    let names = match name {
        Some(n) => {
            validate_name(n)?;
            vec![n.to_string()]
        }
        None => backend
            .list(SNAPSHOTS_DIR)
            .ctx(|| "Failed to list snapshots".into())?
            .into_iter()
            .filter(|n| validate_name(n).is_ok())
            .collect(),
    };
    let mut out = Vec::new();
    for n in names {
        let dir = format!("{SNAPSHOTS_DIR}/{n}");
        for file in backend
            .list(&dir)
            .ctx(|| format!("Failed to list snapshots of {n}"))?
        {
            let (id, forgotten) = if let Some(id) = file.strip_suffix(FORGOTTEN_SUFFIX) {
                (id, true)
            } else if let Some(id) = file.strip_suffix(SNAP_SUFFIX) {
                (id, false)
            } else {
                continue;
            };
            if is_snapshot_id(id) && (with_forgotten || !forgotten) {
                out.push(Listed {
                    name: n.clone(),
                    id: id.to_string(),
                    forgotten,
                });
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// Resolve a reference (`NAME`, `NAME@ID` or `ID`) to a live manifest.
pub fn resolve(backend: &dyn Backend, reference: &str) -> Result<Listed> {
    let not_found =
        || Error::not_found(format!("Snapshot {reference} not found")).with_snapshot(reference);
    if let Some((name, id)) = reference.split_once('@') {
        validate_reference_name(name, reference)?;
        if !is_snapshot_id(id) {
            return Err(Error::invalid(format!(
                "Invalid snapshot id {id:?} in {reference:?}"
            )));
        }
        let listed = Listed {
            name: name.into(),
            id: id.into(),
            forgotten: false,
        };
        return match backend.exists(&listed.key()) {
            Ok(true) => Ok(listed),
            Ok(false) => Err(not_found()),
            Err(e) => Err(Error::io(
                format!("Failed to look up snapshot {reference}"),
                e,
            )),
        };
    }
    if is_snapshot_id(reference) {
        if let Some(l) = list(backend, None, false)?
            .into_iter()
            .find(|l| l.id == reference)
        {
            return Ok(l);
        }
    }
    // Not a name any snapshot can have (e.g. "../x"): say so, rather than
    // "not found", which would suggest a typo.
    validate_reference_name(reference, reference)?;
    list(backend, Some(reference), false)?
        .pop()
        .ok_or_else(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn ids_sort_by_time_and_round_trip() {
        let a = id_from_micros(1_795_000_000_123_456).unwrap();
        assert_eq!(a.len(), "20261122T021152.123456Z".len());
        assert!(a.ends_with('Z'));
        assert_eq!(micros_from_id(&a), Some(1_795_000_000_123_456));
        let b = id_from_micros(1_795_000_000_123_457).unwrap();
        assert!(a < b);
        assert!(is_snapshot_id("20261122T021152.123456Z"));
        assert!(!is_snapshot_id("web01"));
        assert!(rfc3339(0).starts_with("1970-01-01T00:00:00"));
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        // Trailing zeros stay: fixed width, same digits as the id.
        assert_eq!(
            rfc3339_micros(1_795_000_000_123_400),
            "2026-11-18T11:06:40.123400Z"
        );
        assert_eq!(
            id_from_micros(1_795_000_000_123_400).unwrap(),
            "20261118T110640.123400Z"
        );
    }

    #[test]
    fn names_are_validated() {
        for ok in ["web01", "a.b-c_d", "X"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "..", "a/b", "../x", "a b", "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolve_references() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let i1 = id_from_micros(1_000_000).unwrap();
        let i2 = id_from_micros(2_000_000).unwrap();
        let i3 = id_from_micros(3_000_000).unwrap();
        b.put(&manifest_key("web", &i1), b"x").unwrap();
        b.put(&manifest_key("web", &i2), b"x").unwrap();
        b.put(&manifest_key("db", &i3), b"x").unwrap();
        b.put(&forgotten_key("web", &i3), b"x").unwrap();
        assert_eq!(resolve(&b, "web").unwrap().id, i2);
        assert_eq!(resolve(&b, &format!("web@{i1}")).unwrap().id, i1);
        assert_eq!(resolve(&b, &i3).unwrap().name, "db");
        assert_eq!(
            resolve(&b, "nope").unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        assert_eq!(
            resolve(&b, &format!("db@{i1}")).unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        assert_eq!(
            resolve(&b, "../etc").unwrap_err().kind(),
            crate::ErrorKind::InvalidInput
        );
        assert_eq!(list(&b, None, false).unwrap().len(), 3);
        assert_eq!(list(&b, None, true).unwrap().len(), 4);
        assert_eq!(list(&b, Some("web"), false).unwrap().len(), 2);
    }
}
