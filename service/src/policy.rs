//! The plan's policies over group points: `check` (RPO and the last run,
//! for cron and monitoring), `forget --plan` (retention, a group goes as a
//! whole), and the last-run record they read.
//!
//! The last run's outcome is `groups/<service>/last-run.json` in the
//! store, `{"ok","time","group","error"}`, published atomically after
//! every `backup --plan` and every point of `protect`.

use serde::{Deserialize, Serialize};
use store::group::{GroupPoint, GROUPS_DIR};
use store::retention::{self, Decision};
use store::snapshot::{micros_from_id, now_micros, rfc3339_micros};
use store::Store;

use crate::plan::Plan;

/// Errors of the policies.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Store operation failed")]
    Store(#[from] store::Error),
    #[error("Failed to {what} the last-run record of service {service}")]
    LastRun {
        what: &'static str,
        service: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The plan of service {0} has no retention; add e.g. retention = {{ keep_last = 4 }}")]
    NoRetention(String),
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The outcome of the last run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub ok: bool,
    /// RFC 3339.
    pub time: String,
    /// `SERVICE@ID` of the group point it published.
    pub group: Option<String>,
    /// The error chain of a failed run.
    pub error: Option<String>,
}

fn last_run_key(service: &str) -> String {
    format!("{GROUPS_DIR}/{service}/last-run.json")
}

/// Record the outcome of a run.
pub fn record_run(store: &Store, service: &str, run: &LastRun) -> Result<()> {
    let data = serde_json::to_vec_pretty(run).map_err(|e| Error::LastRun {
        what: "encode",
        service: service.into(),
        source: e.into(),
    })?;
    store
        .backend()
        .put(&last_run_key(service), &data)
        .map_err(|source| Error::LastRun {
            what: "write",
            service: service.into(),
            source,
        })
}

/// The outcome of the last run, if any was recorded.
pub fn last_run(store: &Store, service: &str) -> Result<Option<LastRun>> {
    let key = last_run_key(service);
    let data = match store.backend().read(&key) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::LastRun {
                what: "read",
                service: service.into(),
                source,
            })
        }
    };
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|e| Error::LastRun {
            what: "decode",
            service: service.into(),
            source: e.into(),
        })
}

/// A group point with a member for every disk of the plan.
pub fn is_complete(plan: &Plan, g: &GroupPoint) -> bool {
    plan.members().all(|(vm, d)| {
        g.members
            .iter()
            .any(|m| m.vm == vm.name && m.drive == d.drive && !m.snapshot.is_empty())
    })
}

/// What `check --plan` found (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub service: String,
    pub ok: bool,
    /// One line per violation.
    pub problems: Vec<String>,
    pub rpo_seconds: f64,
    /// The newest complete group point.
    pub newest: Option<String>,
    /// Its age.
    pub age_seconds: Option<f64>,
    pub group_points: usize,
    pub last_run: Option<LastRun>,
    /// Drills of the service (`drill --plan`), when the plan has `drill_every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillStatus>,
}

/// The service's drills (`drill --plan`, group drill records).
#[derive(Debug, Clone, Serialize)]
pub struct DrillStatus {
    /// The newest drill.
    pub last: Option<store::DrillRecord>,
    /// Time of the newest successful drill, RFC 3339.
    pub last_success: Option<String>,
    /// Age of the newest successful drill.
    pub last_success_age_seconds: Option<f64>,
    /// A drill is due: none succeeded within `drill_every`.
    pub due: bool,
}

/// The drill status of `plan`'s service at `now` (µs); `due` is always
/// false without `drill_every`.
pub fn drill_status(store: &Store, plan: &Plan, now: i64) -> Result<DrillStatus> {
    let records = store.group_drill_records(&plan.service)?;
    let last = records.iter().max_by_key(|(t, _)| *t);
    let success = records
        .iter()
        .filter(|(_, r)| r.passed)
        .map(|(t, _)| *t)
        .max();
    let due = match (plan.drill_every, success) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(every), Some(t)) => now - t > every,
    };
    Ok(DrillStatus {
        last: last.map(|(_, r)| r.clone()),
        last_success: success.map(rfc3339_micros),
        last_success_age_seconds: success.map(|t| (now - t) as f64 / 1e6),
        due,
    })
}

fn human_duration(micros: i64) -> String {
    let s = micros / 1_000_000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Check `plan` against the store at time `now` (µs).
pub fn check(store: &Store, plan: &Plan, now: i64) -> Result<CheckReport> {
    let groups = store.groups(&plan.service)?;
    let newest = groups.iter().rev().find(|g| is_complete(plan, g));
    let last = last_run(store, &plan.service)?;
    let mut problems = Vec::new();
    let age = newest.map(|g| now - g.micros());
    match (newest, age) {
        (Some(g), Some(age)) if age > plan.rpo => problems.push(format!(
            "RPO violated: the newest complete group point {} is {} old, the RPO is {}",
            g.reference(),
            human_duration(age),
            human_duration(plan.rpo)
        )),
        (Some(_), _) => {}
        (None, _) => problems.push(format!(
            "RPO violated: service {} has no complete group point",
            plan.service
        )),
    }
    if let Some(l) = last.as_ref().filter(|l| !l.ok) {
        problems.push(format!(
            "The last run ({}) failed: {}",
            l.time,
            l.error.as_deref().unwrap_or("unknown error")
        ));
    }
    let drill = match plan.drill_every {
        Some(every) => {
            let d = drill_status(store, plan, now)?;
            if let Some(l) = d.last.as_ref().filter(|l| !l.passed) {
                problems.push(format!(
                    "The newest drill ({} of {}) failed",
                    l.time, l.snapshot
                ));
            }
            if d.due {
                problems.push(match d.last_success_age_seconds {
                    Some(age) => format!(
                        "Drill overdue: the last successful drill of service {} was {} ago, drill_every is {}",
                        plan.service,
                        human_duration((age * 1e6) as i64),
                        human_duration(every)
                    ),
                    None => format!(
                        "Drill overdue: service {} has no successful drill (drill_every is {})",
                        plan.service,
                        human_duration(every)
                    ),
                });
            }
            Some(d)
        }
        None => None,
    };
    Ok(CheckReport {
        service: plan.service.clone(),
        ok: problems.is_empty(),
        problems,
        rpo_seconds: plan.rpo as f64 / 1e6,
        newest: newest.map(GroupPoint::reference),
        age_seconds: age.map(|a| a as f64 / 1e6),
        group_points: groups.len(),
        last_run: last,
        drill,
    })
}

/// The decision for one group point (`forget --plan --json`).
#[derive(Debug, Clone, Serialize)]
pub struct GroupDecision {
    #[serde(flatten)]
    pub decision: Decision,
    /// Member snapshots (forgotten with the group).
    pub members: Vec<String>,
}

/// Apply the plan's retention to its group points, newest first. With
/// `dry_run` nothing changes. A group goes as a whole (its record, then its
/// members); `gc` frees the chunks.
pub fn forget(store: &Store, plan: &Plan, dry_run: bool) -> Result<Vec<GroupDecision>> {
    if plan.retention.is_empty() {
        return Err(Error::NoRetention(plan.service.clone()));
    }
    let groups = store.groups(&plan.service)?;
    let times: Vec<(String, i64)> = groups
        .iter()
        .map(|g| (g.id.clone(), micros_from_id(&g.id).unwrap_or(0)))
        .collect();
    let decisions = retention::apply(&plan.retention, &times);
    let mut out = Vec::new();
    for mut d in decisions {
        let Some(g) = groups.iter().find(|g| g.id == d.id) else {
            continue;
        };
        d.snapshot = g.reference();
        if !d.keep && !dry_run {
            store.forget_group(g)?;
        }
        out.push(GroupDecision {
            decision: d,
            members: g.members.iter().map(|m| m.snapshot.clone()).collect(),
        });
    }
    Ok(out)
}

/// Record a run's outcome (`group` on success, the error chain otherwise).
pub fn record_outcome(
    store: &Store,
    service: &str,
    outcome: std::result::Result<&str, &str>,
) -> Result<()> {
    let run = LastRun {
        ok: outcome.is_ok(),
        time: rfc3339_micros(now_micros()),
        group: outcome.ok().map(str::to_owned),
        error: outcome.err().map(str::to_owned),
    };
    record_run(store, service, &run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use store::group::GroupMember;

    fn plan(dir: &Path) -> Plan {
        let text = format!(
            r#"
service = "svc"
rpo = "10m"
retention = {{ keep_last = 2 }}
store = "{}"
[[vm]]
name = "a"
qmp = "a.qmp"
disks = [ {{ drive = "d" }} ]
"#,
            dir.join("store").display()
        );
        Plan::parse(&dir.join("svc.toml"), &text).unwrap()
    }

    #[test]
    fn check_flags_a_failed_or_overdue_drill_under_drill_every() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(dir.path());
        let store = Store::init(&p.store, 4096).unwrap();
        let src = dir.path().join("disk");
        std::fs::write(&src, vec![7u8; 8192]).unwrap();
        let st = store
            .backup("svc-a-d", &src, &store::BackupOptions::default())
            .unwrap();
        let m = GroupMember {
            vm: "a".into(),
            drive: "d".into(),
            snapshot: format!("svc-a-d@{}", st.snapshot),
        };
        let mut g = GroupPoint::new("svc", now_micros(), 1.0, vec![m]).unwrap();
        store.publish_group(&mut g).unwrap();
        let drill = |passed: bool| store::DrillRecord {
            snapshot: String::new(),
            time: String::new(),
            passed,
            rto_seconds: passed.then_some(5.0),
            checks: vec!["a:qga".into()],
        };
        // Without drill_every drills are not checked.
        let r = check(&store, &p, now_micros()).unwrap();
        assert!(r.ok && r.drill.is_none(), "{r:?}");
        p.drill_every = Some(3600 * 1_000_000);
        let r = check(&store, &p, now_micros()).unwrap();
        assert!(!r.ok);
        assert!(r.problems[0].contains("has no successful drill"), "{r:?}");
        store.add_group_drill_record(&g, &drill(true)).unwrap();
        let now = now_micros();
        let r = check(&store, &p, now).unwrap();
        assert!(r.ok, "{r:?}");
        assert!(!drill_status(&store, &p, now).unwrap().due);
        // Two hours later the drill is overdue.
        let r = check(&store, &p, now + 7200 * 1_000_000).unwrap();
        assert!(
            r.problems.iter().any(|p| p.starts_with("Drill overdue")),
            "{r:?}"
        );
        assert!(
            drill_status(&store, &p, now + 7200 * 1_000_000)
                .unwrap()
                .due
        );
        // The newest drill failed: flagged even with a recent success.
        store.add_group_drill_record(&g, &drill(false)).unwrap();
        let r = check(&store, &p, now_micros()).unwrap();
        assert!(!r.ok);
        assert!(r.problems[0].starts_with("The newest drill"), "{r:?}");
        assert!(r.problems[0].ends_with("failed"), "{r:?}");
    }

    #[test]
    fn check_flags_a_stale_rpo_and_a_failed_run_and_forget_keeps_whole_groups() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path());
        let store = Store::init(&p.store, 4096).unwrap();
        let now = now_micros();
        // Nothing yet.
        let r = check(&store, &p, now).unwrap();
        assert!(!r.ok);
        assert!(r.problems[0].contains("no complete group point"), "{r:?}");
        // Three group points, 30, 20 and 5 minutes old.
        let src = dir.path().join("disk");
        std::fs::write(&src, vec![7u8; 8192]).unwrap();
        let mut ids = Vec::new();
        for age_min in [30, 20, 5] {
            let st = store
                .backup("svc-a-d", &src, &store::BackupOptions::default())
                .unwrap();
            let m = GroupMember {
                vm: "a".into(),
                drive: "d".into(),
                snapshot: format!("svc-a-d@{}", st.snapshot),
            };
            let mut g = GroupPoint::new("svc", now - age_min * 60_000_000, 1.0, vec![m]).unwrap();
            store.publish_group(&mut g).unwrap();
            ids.push(g);
        }
        let r = check(&store, &p, now).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.newest.as_deref(), Some(ids[2].reference().as_str()));
        // Stale: 11 minutes later.
        let r = check(&store, &p, now + 6 * 60_000_000).unwrap();
        assert!(!r.ok);
        assert!(r.problems[0].contains("RPO violated"), "{r:?}");
        assert!(r.problems[0].contains("11m00s old"), "{r:?}");
        // A failed last run is flagged even with a fresh point.
        record_outcome(&store, "svc", Err("VM a: QMP connect failed")).unwrap();
        let r = check(&store, &p, now).unwrap();
        assert!(!r.ok);
        assert!(
            r.problems[0].contains("failed: VM a: QMP connect failed"),
            "{r:?}"
        );
        record_outcome(&store, "svc", Ok("svc@x")).unwrap();
        assert!(check(&store, &p, now).unwrap().ok);

        // Retention: keep_last = 2; the dry run changes nothing.
        let d = forget(&store, &p, true).unwrap();
        let kept: Vec<bool> = d.iter().map(|d| d.decision.keep).collect();
        assert_eq!(kept, [true, true, false]);
        assert_eq!(d[2].decision.snapshot, ids[0].reference());
        assert_eq!(store.groups("svc").unwrap().len(), 3);
        forget(&store, &p, false).unwrap();
        assert_eq!(store.groups("svc").unwrap(), ids[1..]);
        // The oldest group's member went with it; the others stay.
        assert!(store.resolve(&ids[0].members[0].snapshot).is_err());
        assert!(store.resolve(&ids[1].members[0].snapshot).is_ok());
        // A group missing a disk of the plan is not complete.
        let mut q = p.clone();
        q.vms[0].disks.push(crate::plan::Disk {
            drive: "e".into(),
            target: None,
            daemon: None,
            line: 0,
        });
        assert!(!check(&store, &q, now).unwrap().ok);
    }
}
