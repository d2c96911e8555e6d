//! `recovery-cli drill --plan`: a whole service booted at one group
//! point. Two VMs (`-M none` QEMUs whose disks hold the test guest's root
//! filesystem, one with a second data disk) are backed up with
//! `backup --plan`; the drill boots them in boot order from the member
//! snapshots (direct kernel boot through the plan's `drill_args`), runs
//! each VM's console and agent checks and reports the service RTO. A
//! check that never matches fails the drill with a non-zero exit and
//! leaves the later VM unstarted. Records: one per member snapshot and
//! one per group point; `check --plan` flags the failed drill under
//! `drill_every`, and `protect --plan` drills a new group point when the
//! last successful drill is older than `drill_every`. After each drill nothing is left and the store verifies.

use std::path::{Path, PathBuf};

use hypervisor::testing;
use serde_json::Value;

use crate::drill::{assert_nothing_left, metrics, sample};
use crate::guest::{require_guest, Guest};
use crate::util::recovery_cli;

/// The plan of service `portal`: VM `db` (disk0, boot order 1) and VM
/// `app` (disk0 and data, boot order 2), each with its checks.
fn write_plan(
    dir: &Path,
    name: &str,
    guest: &Guest,
    qmps: [&Path; 2],
    checks: [&str; 2],
    extra: &str,
) -> PathBuf {
    let args = |kernel_args: &str| {
        format!(
            "[\"-kernel\", \"{}\", \"-initrd\", \"{}\", \"-append\", \"{} no_timer_check {kernel_args}\"]",
            guest.kernel.display(),
            guest.initrd.display(),
            guest.cmdline
        )
    };
    let text = format!(
        "service = \"portal\"\nrpo = \"1h\"\nstore = \"store\"\nscratch = \"scratch\"\n{extra}\n\
         [[vm]]\nname = \"db\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\nboot_order = 1\n\
         checks = {}\ndrill_args = {}\n\
         [[vm]]\nname = \"app\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }}, {{ drive = \"data\" }} ]\n\
         boot_order = 2\nchecks = {}\ndrill_args = {}\n",
        qmps[0].display(),
        checks[0],
        args(""),
        qmps[1].display(),
        checks[1],
        args("guestmode=serve"),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn drill(plan: &Path, tmp: &Path) -> (std::process::Output, Value) {
    std::fs::create_dir_all(tmp).unwrap();
    let out = recovery_cli()
        .env("TMPDIR", tmp)
        .args(["drill", "--json", "--plan"])
        .arg(plan)
        .output()
        .unwrap();
    let r = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drill --plan printed no JSON report ({e}): {out:?}"));
    (out, r)
}

#[test]
fn a_two_vm_service_drill_passes_in_boot_order_and_a_failing_check_fails_it() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let store = dir.join("store");
    store::Store::init(&store, 65536).unwrap();
    std::fs::create_dir_all(dir.join("scratch")).unwrap();
    // The VMs: QEMU without a guest, its disks the guest's root image.
    let mut procs = Vec::new();
    let mut qmps = Vec::new();
    for (name, drives) in [("db", &["disk0"][..]), ("app", &["disk0", "data"][..])] {
        let mut args = Vec::new();
        for d in drives {
            let img = dir.join(format!("{name}-{d}.raw"));
            match *d {
                "disk0" => {
                    std::fs::copy(&guest.root_img, &img).unwrap();
                }
                _ => testing::qemu_img_create(&img, "raw", 16 << 20),
            }
            args.extend(testing::blockdev_args(&img, "raw", d));
        }
        let qmp = dir.join(format!("{name}.qmp"));
        procs.push(testing::qemu_none(&qmp, &args));
        qmps.push(qmp);
    }
    let qmps = [qmps[0].as_path(), qmps[1].as_path()];
    let good = write_plan(
        dir,
        "portal.toml",
        &guest,
        qmps,
        [
            "[\"console:^PAYLOAD-OK\"]",
            "[\"console:^QGA-STARTED\", \"qga\"]",
        ],
        "drill_timeout = \"180s\"\ndrill_every = \"7d\"",
    );
    let out = recovery_cli()
        .args(["backup", "--json", "--plan"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let backup: Value = serde_json::from_slice(&out.stdout).unwrap();
    let group = backup["group"].as_str().unwrap().to_owned();

    // The whole service passes; app boots after db passed.
    let tmp = dir.join("tmp");
    let (out, r) = drill(&good, &tmp);
    assert!(out.status.success(), "drill failed: {r:#}\n{out:?}");
    assert_eq!(
        (&r["group"], &r["passed"]),
        (&Value::from(group.clone()), &Value::Bool(true)),
        "{r:#}"
    );
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{r:#}");
    assert_eq!(
        (&vms[0]["vm"], &vms[1]["vm"]),
        (&"db".into(), &"app".into()),
        "{r:#}"
    );
    assert_eq!(vms[1]["disks"].as_array().unwrap().len(), 2, "{r:#}");
    for v in vms {
        assert_eq!(v["passed"], true, "{r:#}");
        for c in v["checks"].as_array().unwrap() {
            assert_eq!(c["passed"], true, "{r:#}");
        }
    }
    let db_rto = vms[0]["rto_seconds"].as_f64().unwrap();
    let app_rto = vms[1]["rto_seconds"].as_f64().unwrap();
    assert!(app_rto > db_rto, "app passed before db: {r:#}");
    assert_eq!(r["rto_seconds"].as_f64().unwrap(), app_rto, "{r:#}");
    eprintln!("service RTO {app_rto:.1}s (db {db_rto:.1}s)");
    assert_nothing_left(&store, &tmp);

    // Records: every member, and the group point.
    let s = store::Store::open(&store).unwrap();
    let point = s.resolve_group("portal", Some(&group), None).unwrap();
    for m in &point.members {
        let records = s.drill_records(&m.snapshot).unwrap();
        assert_eq!(records.len(), 1, "{}", m.snapshot);
        assert!(records[0].passed, "{records:?}");
    }
    let g = s.group_drill_records("portal").unwrap();
    assert_eq!(g.len(), 1);
    assert!(g[0].1.passed && g[0].1.snapshot == group, "{g:?}");
    assert_eq!(g[0].1.rto_seconds, Some(app_rto));
    let out = recovery_cli()
        .args(["snapshots", "--json", "--plan"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["group"], group.as_str(), "{rows:#}");
    assert_eq!(rows[0]["last_drill"]["passed"], true, "{rows:#}");
    let m = metrics(&store);
    assert_eq!(
        sample(&m, "last_drill_passed{service=\"portal\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "drill_rto_seconds{service=\"portal\"}"),
        app_rto,
        "{m}"
    );
    let out = recovery_cli()
        .args(["check", "--plan"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // db's check never matches: the drill fails (QEMU exits or the
    // timeout ends it), app is not started, and the exit is non-zero.
    let bad = write_plan(
        dir,
        "bad.toml",
        &guest,
        qmps,
        ["[\"console:^NEVER-PRINTED\"]", "[\"qga\"]"],
        "drill_timeout = \"30s\"\ndrill_every = \"7d\"",
    );
    let (out, r) = drill(&bad, &tmp);
    assert!(!out.status.success(), "{r:#}");
    assert_eq!(r["passed"], false, "{r:#}");
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms[0]["passed"], false, "{r:#}");
    // The guest powers off after its own checks: QEMU's exit ends it.
    assert!(vms[0]["failure"].is_string(), "{r:#}");
    assert!(
        !vms[0]["console_tail"].as_array().unwrap().is_empty(),
        "{r:#}"
    );
    assert!(vms[1].get("passed").is_none(), "app started: {r:#}");
    assert!(
        r["failure"].as_str().unwrap().starts_with("VM db: "),
        "{r:#}"
    );
    assert!(r["rto_seconds"].is_null(), "{r:#}");
    assert_nothing_left(&store, &tmp);
    let g = s.group_drill_records("portal").unwrap();
    assert_eq!(g.len(), 2);
    assert!(!g[1].1.passed);
    let m = metrics(&store);
    assert_eq!(
        sample(&m, "last_drill_passed{service=\"portal\"}"),
        0.0,
        "{m}"
    );

    // The newest drill failed: check --plan says so under drill_every.
    let out = recovery_cli()
        .args(["check", "--plan"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drill") && err.contains("failed"), "{err}");

    // protect --plan: the last successful drill is older than drill_every,
    // so the new group point is drilled after it is taken.
    let due = write_plan(
        dir,
        "due.toml",
        &guest,
        qmps,
        ["[\"console:^PAYLOAD-OK\"]", "[\"qga\"]"],
        "drill_timeout = \"180s\"\ndrill_every = \"1s\"",
    );
    // Wait until the last successful drill is older than drill_every.
    let last_pass = s
        .group_drill_records("portal")
        .unwrap()
        .iter()
        .filter(|(_, r)| r.passed)
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store::snapshot::now_micros() - last_pass <= 1_000_000 {
        assert!(std::time::Instant::now() < deadline, "clock stuck");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = recovery_cli()
        .env("TMPDIR", &tmp)
        .args(["protect", "--points", "1", "--plan"])
        .arg(&due)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let newest = s.groups("portal").unwrap().pop().unwrap().reference();
    assert_ne!(newest, group);
    assert!(
        text.contains(&format!("drill of {newest}: passed")),
        "{text}"
    );
    let g = s.group_drill_records("portal").unwrap();
    assert_eq!(g.len(), 3);
    assert!(
        g.iter().any(|(_, r)| r.passed && r.snapshot == newest),
        "{g:?}"
    );
    assert_nothing_left(&store, &tmp);
    drop(procs);
}
