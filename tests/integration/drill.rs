//! `recovery-cli drill`: a real TCG guest booted from a snapshot in a
//! throwaway sandbox. A passing check, a check that never matches and a
//! snapshot whose root filesystem was broken before the backup; after
//! each, nothing of the drill is left (no process, no temporary
//! directory, no hold), the store verifies, and the drill record shows in
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
fn drill(guest: &Guest, store: &Path, tmp: &Path, check: &str, timeout: &str) -> Output {
    std::fs::create_dir_all(tmp).unwrap();
    let guest = guest.with_kernel_args("no_timer_check");
    recovery_cli()
        .env("TMPDIR", tmp)
        .args(["drill", "--json", "--store"])
        .arg(store)
        .args(["guest", "--check", check, "--timeout", timeout, "--"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline])
        .output()
        .unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drill printed no JSON report ({e}): {out:?}"))
}

/// Nothing of the drill is left: the sandbox directory is gone, no process
/// runs with it in its command line (QEMU's socket and console live
/// there), the daemon's hold is released and the store verifies.
fn assert_nothing_left(store: &Path, tmp: &Path) {
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

    let out = drill(&guest, &store, &tmp, "console:^PAYLOAD-OK", "180s");
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

    // A guest that keeps running (writing and checking files): the drill
    // ends at its timeout.
    let busy = guest.with_kernel_args("guestmode=loop guestiters=1000000");
    let out = drill(&busy, &store, &tmp, "console:NEVER-PRINTED", "20s");
    let r = report(&out);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(r["passed"], false, "{r:#}");
    assert_eq!(r["checks"][0]["passed"], false, "{r:#}");
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

    let out = drill(&guest, &store, &tmp, "console:^PAYLOAD-OK", "120s");
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
