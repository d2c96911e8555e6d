//! Protection points through the real CLI: delta manifests, `--at`, and
//! `forget --keep-*` (restic retention) followed by gc.

use std::fs;
use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::util::recovery_cli;

fn run(args: &[&str]) -> Output {
    recovery_cli()
        .args(args)
        .output()
        .expect("run recovery-cli")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "recovery-cli {args:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

fn ok_json(args: &[&str]) -> Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

/// A failing command's single stderr line (exit 1).
fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn points_are_deltas_restore_at_a_time_and_retention_keeps_the_rest_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store = p(&store).to_string();
    ok(&["init", &store, "--chunk-size", "4K"]);
    // 512 chunks: a delta holds up to 8 entries.
    let src = dir.path().join("disk.img");
    let mut img: Vec<u8> = (0..512 * 4096u32).map(|i| (i % 251) as u8).collect();
    let mut points: Vec<(String, String, Vec<u8>)> = Vec::new();
    for k in 0..5usize {
        if k > 0 {
            img[k * 4096 * 50 + 7] ^= 0xa5;
        }
        fs::write(&src, &img).expect("write image");
        let s = ok_json(&[
            "backup",
            "--store",
            &store,
            "--name",
            "vm",
            p(&src),
            "--json",
        ]);
        let reference = s["snapshot"].as_str().expect("snapshot");
        let id = reference.strip_prefix("vm@").expect("NAME@ID").to_string();
        if k == 0 {
            assert!(s["delta"].is_null(), "{s}");
        } else {
            assert_eq!(s["delta"][1], k as u64, "{s}");
            assert!(s["manifest_bytes"].as_u64().unwrap() < 2048, "{s}");
        }
        let list = ok_json(&["snapshots", "--store", &store, "vm", "--json"]);
        let created = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.as_str())
            .expect("listed")["created"]
            .as_str()
            .unwrap()
            .to_string();
        points.push((id, created, img.clone()));
    }
    let list = ok_json(&["snapshots", "--store", &store, "vm", "--json"]);
    let kinds: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["full", "delta", "delta", "delta", "delta"]);
    let human = ok(&["snapshots", "--store", &store, "vm"]);
    assert!(human.contains("KIND") && human.contains(&format!("delta:{}", points[0].0)));

    // --at picks the newest point at or before the time.
    let out = dir.path().join("out.img");
    for (id, created, want) in &points {
        let r = ok_json(&[
            "restore",
            "--store",
            &store,
            "vm",
            "--at",
            created,
            p(&out),
            "--force",
            "--json",
        ]);
        assert_eq!(r["snapshot"], format!("vm@{id}"));
        assert!(fs::read(&out).unwrap() == *want, "point {id} differs");
        let one = ok_json(&[
            "snapshots",
            "--store",
            &store,
            "vm",
            "--at",
            created,
            "--json",
        ]);
        assert_eq!(one.as_array().unwrap().len(), 1);
        assert_eq!(one[0]["id"], id.as_str());
    }
    ok(&["verify", "--store", &store, "vm", "--at", "-0s"]);
    let e = fails(&[
        "restore",
        "--store",
        &store,
        "vm",
        "--at",
        "2000-01-01T00:00:00Z",
        p(&out),
        "--force",
    ]);
    assert!(e.contains("before the first snapshot of vm"), "{e}");
    let e = fails(&[
        "restore",
        "--store",
        &store,
        "vm",
        "--at",
        "2999-01-01T00:00:00Z",
        p(&out),
        "--force",
    ]);
    assert!(e.contains("in the future"), "{e}");
    let e = fails(&[
        "restore",
        "--store",
        &store,
        "vm",
        "--at",
        "yesterday",
        p(&out),
        "--force",
    ]);
    assert!(e.contains("RFC 3339"), "{e}");

    // Retention: keep the 2 newest. Dry run changes nothing.
    let plan = ok_json(&[
        "forget",
        "--store",
        &store,
        "vm",
        "--keep-last",
        "2",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["remove"].as_array().unwrap().len(), 3, "{plan}");
    assert_eq!(plan["keep"][0]["reasons"][0], "last snapshot");
    assert_eq!(
        ok_json(&["snapshots", "--store", &store, "vm", "--json"])
            .as_array()
            .unwrap()
            .len(),
        5
    );
    // The base full manifest and a middle point go; the deltas stay readable.
    let human = ok(&["forget", "--store", &store, "vm", "--keep-last", "2"]);
    assert!(human.contains("Kept 2 and forgot 3"), "{human}");
    let gc = ok_json(&["gc", "--store", &store, "--json"]);
    assert_eq!(gc["manifests_base"], 1, "{gc}");
    ok(&["verify", "--store", &store]);
    for (id, _, want) in &points[3..] {
        ok(&[
            "restore",
            "--store",
            &store,
            &format!("vm@{id}"),
            p(&out),
            "--force",
        ]);
        assert!(
            fs::read(&out).unwrap() == *want,
            "point {id} differs after gc"
        );
    }
    let e = fails(&["forget", "--store", &store, "vm", "--keep-daily", "x"]);
    assert!(e.contains("--keep-daily"), "{e}");
}

/// kill -9 of a backup writing a point, at several moments: every visible
/// snapshot is whole (restores to one of the two images exactly), verify
/// passes, and the next point is complete.
#[test]
fn kill_9_while_a_point_is_written_leaves_no_half_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let store = p(&store_dir).to_string();
    ok(&["init", &store, "--chunk-size", "4K"]);
    let src = dir.path().join("disk.img");
    let old: Vec<u8> = (0..8192 * 4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&src, &old).expect("write image");
    ok(&["backup", "--store", &store, "--name", "vm", p(&src)]);
    let mut new = old.clone();
    for c in 0..10 {
        new[c * 4096 * 700 + 1] ^= 0x5a;
    }
    fs::write(&src, &new).expect("write image");
    let out = dir.path().join("out.img");
    for attempt in 0..4u64 {
        let mut child = recovery_cli()
            .args(["backup", "--store", &store, "--name", "vm", p(&src)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn backup");
        // Kill at a different moment each time: after the manifest's temp
        // file exists (attempt 0), or after some tmp/ activity.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = 0u64;
        while std::time::Instant::now() < deadline {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if fs::read_dir(store_dir.join("tmp")).is_ok_and(|d| d.count() > 0) {
                seen += 1;
                if seen > attempt * 50 {
                    break;
                }
            }
            std::thread::yield_now();
        }
        let _ = child.kill();
        let _ = child.wait();
        let list = ok_json(&["snapshots", "--store", &store, "vm", "--json"]);
        for row in list.as_array().unwrap() {
            let r = format!("vm@{}", row["id"].as_str().unwrap());
            ok(&["restore", "--store", &store, &r, p(&out), "--force"]);
            let got = fs::read(&out).unwrap();
            assert!(
                got == old || got == new,
                "attempt {attempt}: {r} is a half point"
            );
        }
        ok(&["verify", "--store", &store]);
    }
    // The next point is complete (and a delta).
    let s = ok_json(&[
        "backup",
        "--store",
        &store,
        "--name",
        "vm",
        p(&src),
        "--json",
    ]);
    assert!(s["delta"].is_array(), "{s}");
    ok(&["restore", "--store", &store, "vm", p(&out), "--force"]);
    assert!(fs::read(&out).unwrap() == new, "the next point differs");
}
