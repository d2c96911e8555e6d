//! The plan file: which VMs and disks make up a service, its RPO and its
//! retention policy (TOML).
//!
//! ```toml
//! service = "portal"
//! rpo = "15m"        # check alerts when the newest complete group point is older
//! interval = "5m"    # optional: protect takes a group point this often (default rpo/2)
//! retention = { keep_last = 4, keep_hourly = 24, keep_daily = 7, keep_weekly = 4 }
//! store = "/backups/store"
//! scratch = "/var/tmp"   # optional: scratch images and NBD sockets
//!
//! [[vm]]
//! name = "db"
//! qmp = "/run/portal/db.qmp"
//! qga = "/run/portal/db.qga"   # optional: fsfreeze instead of stop/cont
//! disks = [ { drive = "disk0", target = "/dev/vg/db-root" } ]
//! boot_order = 1
//! checks = ["console:login:", "qga"]   # optional: what a drill checks
//! drill_args = ["-kernel", "vmlinuz"]  # optional: extra QEMU args of the drill
//!
//! [[vm]]
//! name = "app"                 # a VM whose disk our daemon serves
//! qmp = "/run/portal/app.qmp"
//! disks = [ { drive = "disk0", daemon = "/run/portal/app-disk0.control" } ]
//! ```
//! A disk with `daemon` (the control socket of the `instant-boot
//! --protect` or `serve --protect-every` daemon serving it) is captured by
//! that daemon's protection point, cut while the guests are held still;
//! the daemon must write its points into the plan's store under the
//! member name `<service>-<vm>-<drive>` (its `--protect-name`), which the
//! backup checks. `drive` still names the member.
//! A drill (`recovery-cli drill --plan`) boots every VM in a sandbox and
//! runs its `checks` ([`crate::check`]); top-level `drill_every = "7d"`
//! (optional: `protect` drills the newest group point when the last
//! successful drill is older, and `check` alerts) and `drill_timeout =
//! "300s"` (optional, per VM; default 300 s) schedule and bound it. In
//! `drill_args` the value after `-kernel`, `-initrd`, `-dtb` or `-bios`
//! is a path and is taken relative to the plan's directory.
//! Every error names the file, the line and the key. Unknown keys are
//! refused (a typo must not silently drop a setting). Relative paths are
//! taken relative to the plan file's directory. Whether each drive exists
//! can only be checked against the running VM: the backup does that
//! (`query-block`) before anything changes in QEMU.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use store::retention::KeepPolicy;
use toml::Spanned;

/// Errors of reading a plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Failed to read plan {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `{path}:{line}: key {key}: {message}`.
    #[error("{path}:{line}: {}{message}", key.as_deref().map(|k| format!("key {k}: ")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: Option<String>,
        message: String,
    },
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A validated plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The plan file.
    pub path: PathBuf,
    pub service: String,
    /// µs.
    pub rpo: i64,
    /// µs between group points of `protect` (default `rpo / 2`).
    pub interval: i64,
    pub retention: KeepPolicy,
    pub store: PathBuf,
    pub scratch: PathBuf,
    /// In the plan's order.
    pub vms: Vec<Vm>,
    /// µs: a drill of the newest group point is due when the last
    /// successful one is older (`protect`, `check`).
    pub drill_every: Option<i64>,
    /// µs each VM's drill checks may take.
    pub drill_timeout: i64,
}

/// One VM of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub name: String,
    pub qmp: PathBuf,
    pub qga: Option<PathBuf>,
    pub disks: Vec<Disk>,
    pub boot_order: u32,
    /// Drill checks (validated specs, [`crate::check::Check::parse`]).
    pub checks: Vec<String>,
    /// Extra QEMU arguments of the drill sandbox (paths made absolute).
    pub drill_args: Vec<String>,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// Block node name, drive id or device id (as `query-block` shows them).
    pub drive: String,
    /// Migration target for `instant-boot --plan` (not used by backups).
    pub target: Option<PathBuf>,
    /// Control socket of our daemon serving this disk: its protection
    /// points are the member's snapshots (no fleecing).
    pub daemon: Option<PathBuf>,
    /// The line of the disk in the plan (for errors found at backup time).
    pub line: usize,
}

impl Plan {
    /// The member snapshot name of `vm`'s `drive`: `<service>-<vm>-<drive>`.
    pub fn member_name(&self, vm: &str, drive: &str) -> String {
        format!("{}-{vm}-{drive}", self.service)
    }

    /// Every (vm, disk) in the plan's order.
    pub fn members(&self) -> impl Iterator<Item = (&Vm, &Disk)> {
        self.vms
            .iter()
            .flat_map(|vm| vm.disks.iter().map(move |d| (vm, d)))
    }
}

/// A duration: `"15m"`, `"1h30m"` or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Text(String),
    Seconds(i64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    service: Spanned<String>,
    rpo: Spanned<RawDuration>,
    interval: Option<Spanned<RawDuration>>,
    #[serde(default)]
    retention: Option<Spanned<RawRetention>>,
    store: PathBuf,
    scratch: Option<PathBuf>,
    vm: Spanned<Vec<Spanned<RawVm>>>,
    drill_every: Option<Spanned<RawDuration>>,
    drill_timeout: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<u64>,
    keep_hourly: Option<u64>,
    keep_daily: Option<u64>,
    keep_weekly: Option<u64>,
    keep_monthly: Option<u64>,
    keep_yearly: Option<u64>,
    keep_within: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    qmp: PathBuf,
    qga: Option<PathBuf>,
    disks: Spanned<Vec<Spanned<RawDisk>>>,
    boot_order: Option<u32>,
    #[serde(default)]
    checks: Vec<Spanned<String>>,
    #[serde(default)]
    drill_args: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    drive: Spanned<String>,
    target: Option<PathBuf>,
    daemon: Option<Spanned<PathBuf>>,
}

/// QEMU options of `drill_args` whose value is a path (relative to the
/// plan's directory).
const DRILL_PATH_ARGS: [&str; 4] = ["-kernel", "-initrd", "-dtb", "-bios"];

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The key a serde message names (`missing field `qmp``, `unknown field
/// `foo``), if any.
fn key_in(message: &str) -> Option<String> {
    let rest = message.split_once('`')?.1;
    Some(rest.split_once('`')?.0.to_owned())
}

impl Plan {
    /// Read and validate the plan file at `path`.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Plan::parse(path, &text)
    }

    /// Validate plan text (`path` names it in errors and anchors relative
    /// paths).
    pub fn parse(path: &Path, text: &str) -> Result<Plan> {
        let err = |span: Range<usize>, key: Option<&str>, message: String| Error::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, span.start),
            key: key.map(str::to_owned),
            message,
        };
        let raw: RawPlan = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_owned();
            err(
                e.span().unwrap_or(0..0),
                key_in(&message).as_deref(),
                message,
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let service = raw.service.get_ref().clone();
        store::snapshot::validate_name(&service)
            .map_err(|e| err(raw.service.span(), Some("service"), e.to_string()))?;
        let duration = |d: &Spanned<RawDuration>, key: &str| -> Result<i64> {
            let micros = match d.get_ref() {
                RawDuration::Seconds(s) => s.saturating_mul(1_000_000),
                RawDuration::Text(t) if t.starts_with('-') => -1,
                RawDuration::Text(t) => store::point::parse_duration(t)
                    .map_err(|e| err(d.span(), Some(key), e.to_string()))?,
            };
            if micros <= 0 {
                return Err(err(
                    d.span(),
                    Some(key),
                    format!("{key} must be positive (e.g. \"15m\")"),
                ));
            }
            Ok(micros)
        };
        let rpo = duration(&raw.rpo, "rpo")?;
        let interval = match &raw.interval {
            Some(i) => duration(i, "interval")?,
            None => (rpo / 2).max(1_000_000),
        };
        let retention = match raw.retention {
            Some(r) => {
                let span = r.span();
                let r = r.into_inner();
                let p = KeepPolicy {
                    last: r.keep_last,
                    hourly: r.keep_hourly,
                    daily: r.keep_daily,
                    weekly: r.keep_weekly,
                    monthly: r.keep_monthly,
                    yearly: r.keep_yearly,
                    within: r
                        .keep_within
                        .as_ref()
                        .map(|w| duration(w, "retention.keep_within"))
                        .transpose()?,
                };
                if p.is_empty() {
                    return Err(err(
                        span,
                        Some("retention"),
                        "retention keeps nothing; give at least one keep_* above 0".into(),
                    ));
                }
                p
            }
            None => KeepPolicy::default(),
        };

        if raw.vm.get_ref().is_empty() {
            return Err(err(
                raw.vm.span(),
                Some("vm"),
                "a plan needs at least one [[vm]]".into(),
            ));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut vms = Vec::new();
        for (i, v) in raw.vm.into_inner().into_iter().enumerate() {
            let v = v.into_inner();
            let key = format!("vm[{i}].name");
            let name = v.name.get_ref().clone();
            let line = line_of(text, v.name.span().start);
            store::snapshot::validate_name(&name)
                .map_err(|e| err(v.name.span(), Some(&key), e.to_string()))?;
            if let Some(first) = seen.insert(name.clone(), line) {
                return Err(err(
                    v.name.span(),
                    Some(&key),
                    format!("two VMs are named {name:?} (the first on line {first})"),
                ));
            }
            if v.disks.get_ref().is_empty() {
                return Err(err(
                    v.disks.span(),
                    Some(&format!("vm[{i}].disks")),
                    format!("VM {name} has no disks"),
                ));
            }
            let mut drives: HashMap<String, usize> = HashMap::new();
            let mut disks = Vec::new();
            for (j, d) in v.disks.into_inner().into_iter().enumerate() {
                let d = d.into_inner();
                let key = format!("vm[{i}].disks[{j}].drive");
                let drive = d.drive.get_ref().clone();
                let dline = line_of(text, d.drive.span().start);
                let member = format!("{service}-{name}-{drive}");
                store::snapshot::validate_name(&member).map_err(|e| {
                    err(
                        d.drive.span(),
                        Some(&key),
                        format!("member snapshot name {member:?} is not valid: {e}"),
                    )
                })?;
                if let Some(first) = drives.insert(drive.clone(), dline) {
                    return Err(err(
                        d.drive.span(),
                        Some(&key),
                        format!("VM {name} lists drive {drive:?} twice (first on line {first})"),
                    ));
                }
                let daemon = match d.daemon {
                    Some(p) if p.get_ref().as_os_str().is_empty() => {
                        return Err(err(
                            p.span(),
                            Some(&format!("vm[{i}].disks[{j}].daemon")),
                            "daemon must be the path of the daemon's control socket".into(),
                        ));
                    }
                    Some(p) => Some(abs(p.into_inner())),
                    None => None,
                };
                disks.push(Disk {
                    drive,
                    target: d.target.map(abs),
                    daemon,
                    line: dline,
                });
            }
            let mut checks = Vec::new();
            for (j, c) in v.checks.iter().enumerate() {
                crate::check::Check::parse(c.get_ref()).map_err(|e| {
                    err(
                        c.span(),
                        Some(&format!("vm[{i}].checks[{j}]")),
                        e.to_string(),
                    )
                })?;
                checks.push(c.get_ref().clone());
            }
            let mut drill_args = v.drill_args;
            for k in 1..drill_args.len() {
                if DRILL_PATH_ARGS.contains(&drill_args[k - 1].as_str()) {
                    drill_args[k] = abs(PathBuf::from(&drill_args[k]))
                        .to_string_lossy()
                        .into_owned();
                }
            }
            vms.push(Vm {
                name,
                qmp: abs(v.qmp),
                qga: v.qga.map(abs),
                disks,
                boot_order: v.boot_order.unwrap_or(i as u32 + 1),
                checks,
                drill_args,
            });
        }
        // Member names must not collide (vm "a-b" drive "c" vs vm "a" drive "b-c").
        let mut members: HashMap<String, (String, String)> = HashMap::new();
        for vm in &vms {
            for d in &vm.disks {
                let m = format!("{service}-{}-{}", vm.name, d.drive);
                if let Some((v2, d2)) =
                    members.insert(m.clone(), (vm.name.clone(), d.drive.clone()))
                {
                    return Err(Error::Invalid {
                        path: path.to_path_buf(),
                        line: d.line,
                        key: Some("drive".into()),
                        message: format!(
                            "VM {} drive {} and VM {v2} drive {d2} would both be snapshot {m}",
                            vm.name, d.drive
                        ),
                    });
                }
            }
        }
        let drill_every = raw
            .drill_every
            .as_ref()
            .map(|d| duration(d, "drill_every"))
            .transpose()?;
        let drill_timeout = match &raw.drill_timeout {
            Some(d) => duration(d, "drill_timeout")?,
            None => 300_000_000,
        };
        Ok(Plan {
            path: path.to_path_buf(),
            service,
            rpo,
            interval,
            retention,
            store: abs(raw.store),
            scratch: raw.scratch.map(abs).unwrap_or_else(std::env::temp_dir),
            vms,
            drill_every,
            drill_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
service = "portal"
rpo = "15m"
retention = { keep_last = 4, keep_hourly = 24, keep_daily = 7, keep_weekly = 4 }
store = "store"

[[vm]]
name = "db"
qmp = "/run/portal/db.qmp"
qga = "/run/portal/db.qga"
disks = [ { drive = "disk0", target = "/dev/vg/db-root" } ]
boot_order = 1

[[vm]]
name = "app"
qmp = "app.qmp"
disks = [ { drive = "disk0" }, { drive = "data" } ]
"#;

    fn parse(text: &str) -> Result<Plan> {
        Plan::parse(Path::new("/etc/plans/portal.toml"), text)
    }

    /// The error for `text`: its line, key and message.
    fn bad(text: &str) -> (usize, Option<String>, String) {
        match parse(text).unwrap_err() {
            Error::Invalid {
                line, key, message, ..
            } => (line, key, message),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn good_plan_parses_with_defaults() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.service, "portal");
        assert_eq!(p.rpo, 15 * 60 * 1_000_000);
        assert_eq!(p.interval, p.rpo / 2);
        assert_eq!(p.retention.last, Some(4));
        assert_eq!(p.retention.weekly, Some(4));
        assert_eq!(p.store, Path::new("/etc/plans/store"));
        assert_eq!(p.vms.len(), 2);
        assert_eq!(p.vms[1].qmp, Path::new("/etc/plans/app.qmp"));
        assert_eq!(p.vms[1].boot_order, 2);
        assert_eq!(
            p.vms[0].qga.as_deref(),
            Some(Path::new("/run/portal/db.qga"))
        );
        let members: Vec<String> = p
            .members()
            .map(|(v, d)| p.member_name(&v.name, &d.drive))
            .collect();
        assert_eq!(
            members,
            ["portal-db-disk0", "portal-app-disk0", "portal-app-data"]
        );
        assert_eq!(p.vms[1].disks[1].line, 17);
        // An interval of its own, and an RPO in seconds.
        let p = parse(&GOOD.replace("rpo = \"15m\"", "rpo = 60\ninterval = \"10s\"")).unwrap();
        assert_eq!((p.rpo, p.interval), (60_000_000, 10_000_000));
    }

    #[test]
    fn the_example_plan_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/service/portal.toml");
        let p = Plan::load(&path).unwrap();
        assert_eq!(p.service, "portal");
        assert_eq!((p.rpo, p.interval), (900_000_000, 300_000_000));
        assert_eq!(p.members().count(), 4);
        assert_eq!(p.vms[2].qga, None);
    }

    #[test]
    fn drill_keys_parse_and_are_validated() {
        let p = parse(GOOD).unwrap();
        assert_eq!((p.drill_every, p.drill_timeout), (None, 300_000_000));
        assert!(p.vms[0].checks.is_empty() && p.vms[0].drill_args.is_empty());
        let text = GOOD
            .replace(
                "store = \"store\"\n",
                "store = \"store\"\ndrill_every = \"7d\"\ndrill_timeout = \"90s\"\n",
            )
            .replace(
                "boot_order = 1\n",
                "boot_order = 1\nchecks = [\"console:^READY$\", \"qga\", \"tcp:8080\", \"exec:true\"]\n\
                 drill_args = [\"-kernel\", \"vmlinuz\", \"-append\", \"console=ttyS0\", \"-initrd\", \"/boot/i\"]\n",
            );
        let p = parse(&text).unwrap();
        assert_eq!(p.drill_every, Some(7 * 86_400 * 1_000_000));
        assert_eq!(p.drill_timeout, 90_000_000);
        assert_eq!(p.vms[0].checks.len(), 4);
        assert_eq!(
            p.vms[0].drill_args,
            [
                "-kernel",
                "/etc/plans/vmlinuz",
                "-append",
                "console=ttyS0",
                "-initrd",
                "/boot/i"
            ]
        );
        // A bad check names its VM, index and line.
        let (line, key, msg) = bad(&text.replace("\"tcp:8080\"", "\"tcp:0\""));
        assert_eq!(
            (line, key.as_deref()),
            (15, Some("vm[0].checks[2]")),
            "{msg}"
        );
        assert!(msg.contains("Invalid port"), "{msg}");
        let (_, key, msg) = bad(&text.replace("\"qga\"", "\"ping\""));
        assert_eq!(key.as_deref(), Some("vm[0].checks[1]"), "{msg}");
        let (_, key, msg) = bad(&text.replace("console:^READY$", "console:("));
        assert_eq!(key.as_deref(), Some("vm[0].checks[0]"), "{msg}");
        assert!(msg.contains("Invalid regex"), "{msg}");
        let (line, key, msg) = bad(&text.replace("\"7d\"", "\"0s\""));
        assert_eq!((line, key.as_deref()), (6, Some("drill_every")), "{msg}");
        let (line, key, _) = bad(&text.replace("\"90s\"", "\"soon\""));
        assert_eq!((line, key.as_deref()), (7, Some("drill_timeout")));
        let (_, key, _) = bad(&text.replace("drill_args", "drill_arg"));
        assert_eq!(key.as_deref(), Some("drill_arg"));
    }

    #[test]
    fn daemon_served_disks_parse_and_are_validated() {
        let text = GOOD.replace(
            "{ drive = \"data\" }",
            "{ drive = \"data\", daemon = \"run/app-data.control\" }",
        );
        let p = parse(&text).unwrap();
        assert_eq!(p.vms[1].disks[0].daemon, None);
        assert_eq!(
            p.vms[1].disks[1].daemon.as_deref(),
            Some(Path::new("/etc/plans/run/app-data.control"))
        );
        let (line, key, msg) = bad(&text.replace("run/app-data.control", ""));
        assert_eq!(
            (line, key.as_deref()),
            (17, Some("vm[1].disks[1].daemon")),
            "{msg}"
        );
        let (line, key, msg) = bad(&text.replace("daemon = \"run", "deamon = \"run"));
        assert_eq!((line, key.as_deref()), (17, Some("deamon")), "{msg}");
        let (line, key, msg) = bad(&text.replace("\"run/app-data.control\"", "3"));
        assert_eq!(line, 17, "{key:?} {msg}");
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn missing_field_names_its_line_and_key() {
        let (line, key, msg) = bad(&GOOD.replace("qmp = \"app.qmp\"\n", ""));
        assert_eq!(key.as_deref(), Some("qmp"), "{msg}");
        assert!(msg.contains("missing field"), "{msg}");
        assert!((14..=16).contains(&line), "line {line}: {msg}");
        let (_, key, _) = bad(&GOOD.replace("store = \"store\"\n", ""));
        assert_eq!(key.as_deref(), Some("store"));
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let (line, key, msg) = bad(&GOOD.replace("boot_order = 1", "boot_ordr = 1"));
        assert_eq!(key.as_deref(), Some("boot_ordr"), "{msg}");
        assert_eq!(line, 12, "{msg}");
        let (line, key, _) = bad(&GOOD.replace("keep_daily", "keep_dayly"));
        assert_eq!((line, key.as_deref()), (4, Some("keep_dayly")));
        let (line, key, _) = bad(&format!("colour = \"blue\"\n{GOOD}"));
        assert_eq!((line, key.as_deref()), (1, Some("colour")));
    }

    #[test]
    fn two_vms_with_one_name_are_refused() {
        let (line, key, msg) = bad(&GOOD.replace("name = \"app\"", "name = \"db\""));
        assert_eq!(line, 15, "{msg}");
        assert_eq!(key.as_deref(), Some("vm[1].name"));
        assert!(
            msg.contains("two VMs are named \"db\" (the first on line 8)"),
            "{msg}"
        );
    }

    #[test]
    fn non_positive_rpo_is_refused() {
        for rpo in ["\"0s\"", "0", "-60", "\"-5m\""] {
            let (line, key, msg) = bad(&GOOD.replace("\"15m\"", rpo));
            assert_eq!((line, key.as_deref()), (3, Some("rpo")), "{rpo}: {msg}");
            assert!(msg.contains("must be positive"), "{msg}");
        }
        let (line, key, msg) = bad(&GOOD.replace("\"15m\"", "\"soon\""));
        assert_eq!((line, key.as_deref()), (3, Some("rpo")), "{msg}");
        assert!(msg.contains("Invalid duration"), "{msg}");
    }

    #[test]
    fn other_mistakes_are_named() {
        let (line, key, _) = bad(&GOOD.replace("{ drive = \"data\" }", "{ drive = \"disk0\" }"));
        assert_eq!((line, key.as_deref()), (17, Some("vm[1].disks[1].drive")));
        let (_, key, msg) = bad(&GOOD.replace("service = \"portal\"", "service = \"a/b\""));
        assert_eq!(key.as_deref(), Some("service"), "{msg}");
        let (_, key, msg) = bad(&GOOD.replace("qmp = \"app.qmp\"", "qmp = 7"));
        assert!(msg.contains("invalid type"), "{key:?} {msg}");
        let e = parse(&GOOD.replace("boot_order = 1", "boot_ordr = 1")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/plans/portal.toml:12: key boot_ordr: unknown field"),
            "{e}"
        );
    }
}
