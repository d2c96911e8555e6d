//! `recovery-cli drill`: a real TCG guest booted from a snapshot in a
//! throwaway sandbox. A passing check, a check that never matches and a
//! snapshot whose root filesystem was broken before the backup; the agent
//! (`qga`, `exec:`) and network (`tcp:`) checks against a guest that
//! serves them (`guestmode=serve`: qemu-ga, a banner service on 8080, a
//! silent one on 8081), passing and failing with the reason; after each,
//! nothing of the drill is left (no process, no temporary directory, no
//! hold), the store verifies, and the drill record shows in
//! `snapshots --json`.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Output;

use crate::boot::store_with_backup;
use crate::guest::{require_guest, Guest};
use crate::util::recovery_cli;

/// Runs `drill` with `TMPDIR=tmp` (so the sandbox directory is made there)
/// and the guest's kernel, initramfs and command line. `no_timer_check`:
/// under TCG on a loaded machine the kernel's IO-APIC timer check can
/// fail and panic the guest before anything under test runs.
fn drill(guest: &Guest, store: &Path, tmp: &Path, checks: &[&str], timeout: &str) -> Output {
    std::fs::create_dir_all(tmp).unwrap();
    let guest = guest.with_kernel_args("no_timer_check");
    let mut cmd = recovery_cli();
    cmd.env("TMPDIR", tmp)
        .args(["drill", "--json", "--store"])
        .arg(store)
        .arg("guest");
    for c in checks {
        cmd.args(["--check", c]);
    }
    cmd.args(["--timeout", timeout, "--"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline])
        .output()
        .unwrap()
}

/// The result of check `check` in a drill report.
fn check<'a>(r: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {r:#}"))
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drill printed no JSON report ({e}): {out:?}"))
}

/// Nothing of the drill is left: the sandbox directory is gone, no process
/// runs with it in its command line (QEMU's socket and console live
/// there), the daemon's hold is released and the store verifies.
pub(crate) fn assert_nothing_left(store: &Path, tmp: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmp).unwrap().collect();
    assert!(left.is_empty(), "drill left {left:?} in {}", tmp.display());
    let needle = tmp.display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&needle),
            "a drill process still runs: {cmdline}"
        );
    }
    let out = recovery_cli()
        .args(["verify", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "verify failed: {out:?}");
    let holds = recovery_cli()
        .args(["snapshots", "--json", "--store"])
        .arg(store)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&holds.stdout).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["holds"], serde_json::json!([]), "hold left: {row}");
    }
}

/// The `last_drill` of the only snapshot in `snapshots --json`.
fn last_drill(store: &Path) -> serde_json::Value {
    let out = recovery_cli()
        .args(["snapshots", "--json", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows[0]["last_drill"].clone()
}

#[test]
fn a_good_snapshot_passes_and_a_check_that_never_matches_fails() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, id) = store_with_backup(dir.path(), "guest", &image);
    let tmp = dir.path().join("tmp");

    let out = drill(&guest, &store, &tmp, &["console:^PAYLOAD-OK"], "180s");
    let r = report(&out);
    assert!(out.status.success(), "drill failed: {r:#}\n{out:?}");
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["snapshot"], format!("guest@{id}"));
    assert_eq!(r["checks"][0]["passed"], true, "{r:#}");
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["boot_seconds"].is_number(), "{r:#}");
    assert!(r["socket_ready_ms"].is_number(), "{r:#}");
    assert_nothing_left(&store, &tmp);
    let record = last_drill(&store);
    assert_eq!(record["passed"], true, "{record}");
    assert_eq!(record["snapshot"], format!("guest@{id}"));
    let rto = r["rto_seconds"].as_f64().unwrap();

    // A guest that keeps running (writing and checking files) with no
    // agent and no network configured: the drill ends at its timeout; the
    // agent and port checks say why they failed (nothing answered).
    let busy = guest.with_kernel_args("guestmode=loop guestiters=1000000");
    let checks = ["console:NEVER-PRINTED", "qga", "tcp:8080"];
    let out = drill(&busy, &store, &tmp, &checks, "20s");
    let r = report(&out);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(r["passed"], false, "{r:#}");
    for c in checks {
        assert_eq!(check(&r, c)["passed"], false, "{r:#}");
    }
    let qga = check(&r, "qga")["detail"].as_str().unwrap();
    assert!(qga.contains("guest agent"), "{r:#}");
    let tcp = check(&r, "tcp:8080")["detail"].as_str().unwrap();
    assert!(tcp.contains("no answer"), "{r:#}");
    assert!(r["rto_seconds"].is_null(), "{r:#}");
    assert!(
        r["failure"].as_str().unwrap().contains("timed out"),
        "{r:#}"
    );
    assert!(r["console_tail"].is_array(), "{r:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Drill of guest@"), "{stderr}");
    assert_nothing_left(&store, &tmp);
    assert_eq!(last_drill(&store)["passed"], false);

    // The metrics: the passing drill's time and RTO, the failed one as
    // the newest, one of each.
    let m = metrics(&store);
    let stamp = sample(
        &m,
        "last_successful_drill_timestamp_seconds{image=\"guest\"}",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        stamp > now - 3600.0 && stamp <= now,
        "{stamp} vs {now}\n{m}"
    );
    assert_eq!(sample(&m, "drill_rto_seconds{image=\"guest\"}"), rto, "{m}");
    assert_eq!(sample(&m, "last_drill_passed{image=\"guest\"}"), 0.0, "{m}");
    let total = |r: &str| {
        sample(
            &m,
            &format!("drills_total{{image=\"guest\",result=\"{r}\"}}"),
        )
    };
    assert_eq!((total("passed"), total("failed")), (1.0, 1.0), "{m}");
}

/// `metrics --store`: the drill metrics in Prometheus text.
pub(crate) fn metrics(store: &Path) -> String {
    let out = recovery_cli()
        .args(["metrics", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of sample `instant_recovery_<series>` in `text`.
#[track_caller]
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    let prefix = format!("instant_recovery_{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_snapshot_with_a_zeroed_superblock_fails_its_drill() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    // The ext4 primary superblock: 1 KiB at offset 1 KiB.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.seek(SeekFrom::Start(1024)).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let (store, _) = store_with_backup(dir.path(), "guest", &image);
    let tmp = dir.path().join("tmp");

    let out = drill(&guest, &store, &tmp, &["console:^PAYLOAD-OK"], "120s");
    let r = report(&out);
    assert!(!out.status.success(), "a broken snapshot passed: {r:#}");
    assert_eq!(r["passed"], false, "{r:#}");
    let tail = r["console_tail"].as_array().unwrap();
    assert!(
        tail.iter()
            .any(|l| l.as_str().unwrap().contains("INITRAMFS-FAIL")),
        "the root filesystem did not fail to mount: {r:#}"
    );
    assert_nothing_left(&store, &tmp);
    assert_eq!(last_drill(&store)["passed"], false);
}

#[test]
fn agent_exec_and_tcp_checks_pass_against_a_serving_guest() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, id) = store_with_backup(dir.path(), "guest", &image);
    let tmp = dir.path().join("tmp");

    let serving = guest.with_kernel_args("guestmode=serve guestport=8080");
    let checks = [
        "qga",
        "exec:test -s /payload.bin && echo payload-there",
        "tcp:8080",
        "tcp:8081",
    ];
    let out = drill(&serving, &store, &tmp, &checks, "180s");
    let r = report(&out);
    assert!(out.status.success(), "drill failed: {r:#}\n{out:?}");
    let kinds: Vec<_> = checks
        .iter()
        .map(|c| check(&r, c)["kind"].clone())
        .collect();
    assert_eq!(kinds, ["qga", "exec", "tcp", "tcp"], "{r:#}");
    for c in checks {
        assert_eq!(check(&r, c)["passed"], true, "{r:#}");
        assert!(check(&r, c)["passed_after_seconds"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(check(&r, "qga")["detail"], "guest-ping answered", "{r:#}");
    assert_eq!(check(&r, checks[1])["detail"], "exit 0: payload-there");
    // 8080 sends a banner; 8081 sends nothing, so only QEMU's table of
    // user-mode connections can tell that the guest accepted.
    let banner = check(&r, "tcp:8080")["detail"].as_str().unwrap();
    assert!(banner.starts_with("banner: GUEST-SERVICE "), "{r:#}");
    let silent = check(&r, "tcp:8081")["detail"].as_str().unwrap();
    assert_eq!(silent, "connection established (no banner)", "{r:#}");
    let last = checks
        .iter()
        .map(|c| check(&r, c)["passed_after_seconds"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(r["rto_seconds"].as_f64().unwrap(), last, "{r:#}");
    assert_nothing_left(&store, &tmp);
    let record = last_drill(&store);
    assert_eq!(record["passed"], true, "{record}");
    assert_eq!(record["snapshot"], format!("guest@{id}"));
    assert_eq!(record["checks"], serde_json::json!(checks), "{record}");
    let m = metrics(&store);
    assert_eq!(sample(&m, "last_drill_passed{image=\"guest\"}"), 1.0, "{m}");
    let rto = r["rto_seconds"].as_f64().unwrap();
    assert_eq!(sample(&m, "drill_rto_seconds{image=\"guest\"}"), rto, "{m}");
}

#[test]
fn a_failing_command_and_a_closed_port_fail_with_their_reason() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, _) = store_with_backup(dir.path(), "guest", &image);
    let tmp = dir.path().join("tmp");

    // The agent answers (so the guest is up), but the command exits 7 on
    // every try and nothing listens on port 9999: slirp accepts on the
    // host side, the guest resets, the probe reads EOF.
    let serving = guest.with_kernel_args("guestmode=serve");
    let checks = ["qga", "exec:echo no >&2; exit 7", "tcp:9999"];
    let out = drill(&serving, &store, &tmp, &checks, "60s");
    let r = report(&out);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(r["passed"], false, "{r:#}");
    assert!(r["rto_seconds"].is_null(), "{r:#}");
    assert_eq!(check(&r, "qga")["passed"], true, "{r:#}");
    let exec = check(&r, checks[1]);
    assert_eq!(exec["passed"], false, "{r:#}");
    assert_eq!(exec["detail"], "exit 7: no", "{r:#}");
    let tcp = check(&r, "tcp:9999");
    assert_eq!(tcp["passed"], false, "{r:#}");
    let why = tcp["detail"].as_str().unwrap();
    assert!(why.contains("nothing listens on port 9999"), "{r:#}");
    assert!(
        r["console_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "SERVE-READY"),
        "{r:#}"
    );
    assert_nothing_left(&store, &tmp);
    assert_eq!(last_drill(&store)["passed"], false);
}
