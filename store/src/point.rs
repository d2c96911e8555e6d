//! Point in time: "the image as it was at TIME".
//!
//! A time is RFC 3339 (`2026-12-06T11:05:03Z`, any offset, optional
//! fraction) or relative to now (`-10m`, `-2h`, `-30s`, `-1d`, or a sum such
//! as `-1h30m`). [`Store::resolve_at`] picks the newest live snapshot of the
//! image (backup or protection point alike) taken at or before that time.
//! A time before the image's first snapshot, or in the future, is an error.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::repo::Store;
use crate::snapshot::{self, micros_from_id, now_micros, rfc3339_micros, SnapshotInfo};

const S: i64 = 1_000_000;

/// Parse a duration such as `10m`, `2h`, `30s`, `1d`, `1w` or `1h30m` into µs.
pub fn parse_duration(s: &str) -> Result<i64> {
    let bad = || {
        Error::invalid(format!(
            "Invalid duration {s:?}: use a number and a unit (s, m, h, d, w), e.g. 10m, 2h, 1h30m"
        ))
    };
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => S,
            'm' => 60 * S,
            'h' => 3600 * S,
            'd' => 86_400 * S,
            'w' => 7 * 86_400 * S,
            _ => return Err(bad()),
        };
        let n: i64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
    }
    if !num.is_empty() || s.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// Parse a point in time (RFC 3339, or `-DURATION` before `now`) into µs
/// since the epoch.
pub fn parse_time(s: &str, now: i64) -> Result<i64> {
    if let Some(d) = s.strip_prefix('-') {
        return parse_duration(d)
            .map(|d| now - d)
            .map_err(|e| e.context(format!("Invalid time {s:?}")));
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        Error::invalid(format!(
            "Invalid time {s:?}: use RFC 3339 (2026-12-06T11:05:03Z) or a relative time (-10m, -2h, -30s)"
        ))
        .with_source(e)
    })?;
    Ok((t.unix_timestamp_nanos() / 1000) as i64)
}

impl Store {
    /// The newest live snapshot of image `name` taken at or before `at`
    /// (µs since the epoch).
    pub fn resolve_at(&self, name: &str, at: i64) -> Result<SnapshotInfo> {
        self.resolve_at_from(name, at, now_micros())
    }

    /// [`resolve_at`](Self::resolve_at) for a time as the user wrote it
    /// (`--at`): RFC 3339 or relative to now.
    pub fn resolve_at_str(&self, name: &str, at: &str) -> Result<SnapshotInfo> {
        let now = now_micros();
        self.resolve_at_from(name, parse_time(at, now)?, now)
    }

    /// What the CLI's `SNAPSHOT [--at TIME]` names: without `at`, the
    /// reference (`NAME`, `NAME@ID` or `ID`); with it, `reference` must be
    /// an image name, resolved with [`resolve_at_str`](Self::resolve_at_str).
    /// For every command that takes `--at` (restore, verify, instant boot,
    /// file-level restore).
    pub fn resolve_ref_at(&self, reference: &str, at: Option<&str>) -> Result<SnapshotInfo> {
        match at {
            None => self.resolve(reference),
            Some(at) => {
                if reference.contains('@') || snapshot::is_snapshot_id(reference) {
                    return Err(Error::invalid(format!(
                        "--at takes an image name, not the snapshot {reference:?}"
                    )));
                }
                self.resolve_at_str(reference, at)
            }
        }
    }

    /// Id of the base full manifest when the snapshot is a delta manifest
    /// (a protection point), `None` for a full manifest.
    pub fn snapshot_base(&self, info: &SnapshotInfo) -> Result<Option<String>> {
        for forgotten in [false, true] {
            let l = snapshot::Listed {
                name: info.name.clone(),
                id: info.id.clone(),
                forgotten,
            };
            let key = l.key();
            let obj = match self.backend().open(&key) {
                Ok(o) => o,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("Failed to open {key}"), e)),
            };
            let m = crate::snapshot::manifest::read_header(obj.as_ref(), &key)?;
            return Ok(m.base().map(str::to_owned));
        }
        Err(Error::not_found(format!(
            "Snapshot {} not found",
            info.reference()
        )))
    }

    fn resolve_at_from(&self, name: &str, at: i64, now: i64) -> Result<SnapshotInfo> {
        snapshot::validate_name(name)?;
        if at > now {
            return Err(Error::invalid(format!(
                "Time {} is in the future (now is {})",
                rfc3339_micros(at),
                rfc3339_micros(now)
            )));
        }
        let all = snapshot::list(self.backend(), Some(name), false)?;
        let Some(first) = all.first() else {
            return Err(Error::not_found(format!("Image {name} has no snapshots")));
        };
        let pick = all
            .iter()
            .rev()
            .find(|l| micros_from_id(&l.id).is_some_and(|t| t <= at));
        match pick {
            Some(l) => self.load_info(l),
            None => Err(Error::not_found(format!(
                "Time {} is before the first snapshot of {name} ({}@{}, taken {})",
                rfc3339_micros(at),
                name,
                first.id,
                micros_from_id(&first.id)
                    .map(rfc3339_micros)
                    .unwrap_or_default()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("30s").unwrap(), 30 * S);
        assert_eq!(parse_duration("10m").unwrap(), 600 * S);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400 * S);
        assert_eq!(parse_duration("2d").unwrap(), 2 * 86_400 * S);
        for bad in ["", "10", "m", "10x", "-5m", "99999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let now = 1_796_554_000 * S;
        assert_eq!(parse_time("-10m", now).unwrap(), now - 600 * S);
        assert_eq!(
            parse_time("2026-12-06T11:05:03Z", now).unwrap(),
            1_796_555_103 * S
        );
        assert_eq!(
            parse_time("2026-12-06T12:05:03.5+01:00", now).unwrap(),
            1_796_555_103 * S + S / 2
        );
        let e = parse_time("yesterday", now).unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }

    #[test]
    fn resolve_at_picks_newest_at_or_before() {
        let (dir, store) = crate::backup::tests::setup(4096);
        let img = dir.path().join("img");
        let mut ids = Vec::new();
        for i in 0..3u8 {
            std::fs::write(&img, vec![i + 1; 8192]).unwrap();
            let s = store.backup("vm", &img, &Default::default()).unwrap();
            ids.push(micros_from_id(&s.snapshot).unwrap());
        }
        let now = ids[2] + 10 * S;
        let id = |t| store.resolve_at_from("vm", t, now).map(|i| i.id);
        assert_eq!(
            id(ids[1]).unwrap(),
            snapshot::id_from_micros(ids[1]).unwrap()
        );
        assert_eq!(
            id(ids[2] - 1).unwrap(),
            snapshot::id_from_micros(ids[1]).unwrap()
        );
        assert_eq!(id(now).unwrap(), snapshot::id_from_micros(ids[2]).unwrap());
        let before = id(ids[0] - 1).unwrap_err().to_string();
        assert!(before.contains("before the first snapshot"), "{before}");
        let future = id(now + S).unwrap_err().to_string();
        assert!(store.resolve_ref_at("vm@x", Some("-1m")).is_err());
        assert!(future.contains("in the future"), "{future}");
        let newest = snapshot::id_from_micros(ids[2]).unwrap();
        assert_eq!(store.resolve_at_str("vm", "-0s").unwrap().id, newest);
        assert!(store.resolve_at_from("other", now, now).is_err());
    }
}
