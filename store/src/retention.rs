//! Retention: which snapshots of an image `forget --keep-*` keeps.
//!
//! The semantics are restic's (`restic forget --keep-*`), applied to backups
//! and protection points alike, per image name:
//! - snapshots are considered newest first;
//! - `--keep-last n` keeps the `n` newest;
//! - `--keep-hourly/daily/weekly/monthly/yearly n` each keep the newest
//!   snapshot of each of the `n` newest hours/days/ISO weeks/months/years
//!   *that have a snapshot* (buckets without one are not counted); when a
//!   policy has fewer buckets than `n`, the oldest snapshot is kept as well
//!   (restic ≥ 0.16: "oldest …"). `n` may be [`UNLIMITED`];
//! - `--keep-within D` keeps every snapshot strictly newer than the newest
//!   snapshot's time minus `D`;
//! - the union of all policies is kept, the rest is removed;
//! - held snapshots are always kept (reason `held by …`).
//!
//! Buckets use UTC (restic uses the local time zone). Removing a full
//! manifest that delta points use as their base is safe: gc keeps it as a
//! base (see [`crate::snapshot::delta`]).

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::repo::Store;
use crate::snapshot::{self, micros_from_id, rfc3339_micros};

/// A count that keeps every bucket.
pub const UNLIMITED: u64 = u64::MAX;

/// The `--keep-*` options. `None`: not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<u64>,
    pub hourly: Option<u64>,
    pub daily: Option<u64>,
    pub weekly: Option<u64>,
    pub monthly: Option<u64>,
    pub yearly: Option<u64>,
    /// µs.
    pub within: Option<i64>,
}

impl KeepPolicy {
    /// True when no option is given (which would remove everything).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// The decision for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `NAME@ID`.
    pub snapshot: String,
    pub id: String,
    /// RFC 3339.
    pub created: String,
    pub keep: bool,
    /// Why it is kept (empty when removed).
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy)]
enum Bucket {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    fn name(self) -> &'static str {
        match self {
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }

    fn key(self, micros: i64) -> i64 {
        let t = OffsetDateTime::from_unix_timestamp_nanos(micros as i128 * 1000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let (y, m, d, h) = (
            t.year() as i64,
            u8::from(t.month()) as i64,
            t.day() as i64,
            t.hour() as i64,
        );
        match self {
            Bucket::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Bucket::Daily => (y * 100 + m) * 100 + d,
            Bucket::Weekly => {
                let (wy, w, _) = t.to_iso_week_date();
                wy as i64 * 100 + w as i64
            }
            Bucket::Monthly => y * 100 + m,
            Bucket::Yearly => y,
        }
    }
}

/// Apply `policy` to snapshots `(id, time µs)` of one image, in any order.
/// Returns one decision per snapshot, newest first, without names (the
/// caller fills `snapshot`) and without holds.
pub fn apply(policy: &KeepPolicy, snaps: &[(String, i64)]) -> Vec<Decision> {
    let mut list: Vec<&(String, i64)> = snaps.iter().collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let newest = list.first().map(|s| s.1);
    let mut buckets: Vec<(Bucket, u64, Option<i64>)> = [
        (Bucket::Hourly, policy.hourly),
        (Bucket::Daily, policy.daily),
        (Bucket::Weekly, policy.weekly),
        (Bucket::Monthly, policy.monthly),
        (Bucket::Yearly, policy.yearly),
    ]
    .into_iter()
    .filter_map(|(b, n)| n.map(|n| (b, n, None)))
    .collect();
    let mut last_left = policy.last.unwrap_or(0);
    let count = list.len();
    list.into_iter()
        .enumerate()
        .map(|(nr, (id, t))| {
            let mut reasons = Vec::new();
            if last_left > 0 {
                reasons.push("last snapshot".to_string());
                if last_left != UNLIMITED {
                    last_left -= 1;
                }
            }
            let oldest = nr + 1 == count;
            for (b, left, seen) in buckets.iter_mut() {
                let key = b.key(*t);
                let new_bucket = *seen != Some(key);
                if (new_bucket || oldest) && *left > 0 {
                    reasons.push(if new_bucket {
                        format!("{} snapshot", b.name())
                    } else {
                        format!("oldest {} snapshot", b.name())
                    });
                    *seen = Some(key);
                    if *left != UNLIMITED {
                        *left -= 1;
                    }
                }
            }
            if let (Some(w), Some(newest)) = (policy.within, newest) {
                if *t > newest.saturating_sub(w) {
                    reasons.push("within".to_string());
                }
            }
            Decision {
                snapshot: String::new(),
                id: id.clone(),
                created: rfc3339_micros(*t),
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

impl Store {
    /// What `forget --keep-*` would do to image `name`: a decision per live
    /// snapshot, newest first. Held snapshots are kept.
    pub fn plan_retention(&self, name: &str, policy: &KeepPolicy) -> Result<Vec<Decision>> {
        if policy.is_empty() {
            return Err(Error::invalid(
                "No --keep-* option given: refusing to forget every snapshot",
            ));
        }
        let snaps: Vec<(String, i64)> = snapshot::list(self.backend(), Some(name), false)?
            .into_iter()
            .filter_map(|l| micros_from_id(&l.id).map(|t| (l.id, t)))
            .collect();
        let mut out = apply(policy, &snaps);
        for d in &mut out {
            d.snapshot = format!("{name}@{}", d.id);
            let holds = self.holds_of(name, &d.id)?;
            if !holds.is_empty() {
                let who: Vec<&str> = holds.iter().map(|h| h.info.holder.as_str()).collect();
                d.reasons.push(format!("held by {}", who.join(", ")));
                d.keep = true;
            }
        }
        Ok(out)
    }

    /// Apply a plan from [`plan_retention`](Self::plan_retention): forget
    /// every snapshot it removes (never a held one).
    pub fn apply_retention(&self, plan: &[Decision]) -> Result<usize> {
        let mut n = 0;
        for d in plan.iter().filter(|d| !d.keep) {
            self.forget_with(&d.snapshot, false)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;
    const D: i64 = 24 * H;

    /// A snapshot every 6 hours over 60 days, from 2026-01-01T00:00Z
    /// (a Thursday), like restic's test series.
    fn series() -> Vec<(String, i64)> {
        let start = 1_767_225_600_000_000;
        (0..240)
            .map(|i| {
                let t = start + i * 6 * H;
                (snapshot::id_from_micros(t).unwrap(), t)
            })
            .collect()
    }

    fn kept(policy: &KeepPolicy) -> Vec<String> {
        apply(policy, &series())
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.created)
            .collect()
    }

    #[test]
    fn keep_last_and_within() {
        let k = kept(&KeepPolicy {
            last: Some(3),
            ..Default::default()
        });
        assert_eq!(
            k,
            [
                "2026-03-01T18:00:00.000000Z",
                "2026-03-01T12:00:00.000000Z",
                "2026-03-01T06:00:00.000000Z"
            ]
        );
        // Strictly newer than newest - 1d: 4 snapshots.
        let k = kept(&KeepPolicy {
            within: Some(D),
            ..Default::default()
        });
        assert_eq!(k.len(), 4);
        assert_eq!(k[3], "2026-03-01T00:00:00.000000Z");
    }

    #[test]
    fn buckets_keep_newest_per_bucket() {
        let k = kept(&KeepPolicy {
            daily: Some(3),
            ..Default::default()
        });
        assert_eq!(
            k,
            [
                "2026-03-01T18:00:00.000000Z",
                "2026-02-28T18:00:00.000000Z",
                "2026-02-27T18:00:00.000000Z"
            ]
        );
        // ISO weeks: 2026-03-01 is a Sunday (week 9), so the newest of week 8
        // is Sunday 02-22.
        let k = kept(&KeepPolicy {
            weekly: Some(2),
            ..Default::default()
        });
        assert_eq!(
            k,
            ["2026-03-01T18:00:00.000000Z", "2026-02-22T18:00:00.000000Z"]
        );
        // Only 2 months have snapshots: both kept, and the oldest as well.
        let k = kept(&KeepPolicy {
            monthly: Some(5),
            ..Default::default()
        });
        assert_eq!(
            k,
            [
                "2026-03-01T18:00:00.000000Z",
                "2026-02-28T18:00:00.000000Z",
                "2026-01-31T18:00:00.000000Z",
                "2026-01-01T00:00:00.000000Z"
            ]
        );
        let k = kept(&KeepPolicy {
            hourly: Some(UNLIMITED),
            ..Default::default()
        });
        assert_eq!(k.len(), 240);
    }

    #[test]
    fn union_of_policies_with_reasons() {
        let d = apply(
            &KeepPolicy {
                last: Some(2),
                daily: Some(2),
                ..Default::default()
            },
            &series(),
        );
        let kept: Vec<_> = d.iter().filter(|d| d.keep).collect();
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].reasons, ["last snapshot", "daily snapshot"]);
        assert_eq!(kept[1].reasons, ["last snapshot"]);
        assert_eq!(kept[2].created, "2026-02-28T18:00:00.000000Z");
        assert_eq!(kept[2].reasons, ["daily snapshot"]);
        assert!(d.iter().filter(|d| !d.keep).all(|d| d.reasons.is_empty()));
        assert_eq!(d.len(), 240);
    }

    #[test]
    fn plan_keeps_held_snapshots_and_apply_forgets_the_rest() {
        let (dir, store) = crate::backup::tests::setup(4096);
        let img = dir.path().join("img");
        let mut ids = Vec::new();
        for i in 0..4u8 {
            std::fs::write(&img, vec![i + 1; 8192]).unwrap();
            ids.push(
                store
                    .backup("vm", &img, &Default::default())
                    .unwrap()
                    .snapshot,
            );
        }
        store
            .add_hold(
                &format!("vm@{}", ids[0]),
                &crate::HoldInfo::new("state-1", "test"),
            )
            .unwrap();
        assert!(store.plan_retention("vm", &KeepPolicy::default()).is_err());
        let plan = store
            .plan_retention(
                "vm",
                &KeepPolicy {
                    last: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        let keep: Vec<(&str, bool)> = plan.iter().map(|d| (d.id.as_str(), d.keep)).collect();
        assert_eq!(
            keep,
            [
                (ids[3].as_str(), true),
                (ids[2].as_str(), false),
                (ids[1].as_str(), false),
                (ids[0].as_str(), true)
            ]
        );
        assert_eq!(plan[3].reasons, ["held by state-1"]);
        assert_eq!(store.apply_retention(&plan).unwrap(), 2);
        let left: Vec<String> = store
            .snapshots(Some("vm"))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, [ids[0].clone(), ids[3].clone()]);
    }
}
