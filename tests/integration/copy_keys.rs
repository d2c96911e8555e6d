//! `copy` between stores whose chunk ids differ (issue 16): a plaintext
//! local store → an encrypted store on S3 → a local store encrypted under
//! another key, with a delta manifest and a group point, the last copy
//! interrupted and resumed, then restored byte-identical; a wrong or missing
//! destination key is one clear error.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use store::crypto::Secret;
use store::group::{GroupMember, GroupPoint};

use crate::s3::server::Moto;
use crate::s3::{any_indexed_pack, image, proxy};
use crate::util::recovery_cli;

const PASS_S3: &str = "the s3 store's passphrase";
const PASS_LOCAL: &str = "another passphrase, another key";
/// Cheap argon2id for tests.
const KDF: [&str; 4] = ["--kdf-memory", "8M", "--kdf-iterations", "1"];

/// `recovery-cli ARGS` reaching `endpoint`, with `pass` in
/// `RECOVERY_PASSWORD` and `to_pass` in `RECOVERY_TO_PASSWORD`.
fn cli(endpoint: &str, cache: &Path, pass: Option<&str>, to_pass: Option<&str>) -> Command {
    let mut c = recovery_cli();
    c.env_remove("RECOVERY_PASSWORD")
        .env_remove("RECOVERY_KEY_FILE")
        .env_remove("RECOVERY_TO_PASSWORD");
    Moto::env(&mut c, endpoint, cache);
    if let Some(p) = pass {
        c.env("RECOVERY_PASSWORD", p);
    }
    if let Some(p) = to_pass {
        c.env("RECOVERY_TO_PASSWORD", p);
    }
    c
}

fn json(out: Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Fails with exit 1 and one line on stderr containing every needle.
fn fails(out: Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing in {err}");
    }
}

#[test]
fn copy_rekeys_plain_to_encrypted_s3_to_another_key_resumed_and_restores_exactly() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("copy-rekey");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (cache, ep) = (d.join("cache"), moto.endpoint());
    let run =
        |pass, to_pass, args: &[&str]| cli(&ep, &cache, pass, to_pass).args(args).output().unwrap();
    let plain = d.join("plain");
    let other = d.join("other-key");
    let (plain_s, other_s) = (plain.to_str().unwrap(), other.to_str().unwrap());
    let s3 = format!("s3://{bucket}/enc");

    // A plaintext store: a full snapshot, then a delta (two chunks changed),
    // and a group point naming the delta.
    json(run(None, None, &["init", plain_s, "--json"]), "init plain");
    let img = d.join("disk.img");
    let v1 = image(&img, 64, 11);
    let backup = |what| {
        let img = img.to_str().unwrap();
        let args = ["backup", "--store", plain_s, "--name", "vm", img, "--json"];
        json(run(None, None, &args), what)
    };
    let b1 = backup("backup 1");
    let mut v2 = v1.clone();
    for chunk in [5usize, 700] {
        let at = chunk * 65536;
        v2[at..at + 65536].fill(chunk as u8 + 1);
        fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&v2[at..at + 65536], at as u64)
            .unwrap();
    }
    let b2 = backup("backup 2");
    assert!(!b2["delta"].is_null(), "second backup is not a delta: {b2}");
    let (snap1, snap2) = (
        b1["snapshot"].as_str().unwrap().to_string(),
        b2["snapshot"].as_str().unwrap().to_string(),
    );
    let mut group = GroupPoint::new(
        "portal",
        store::snapshot::now_micros(),
        1.5,
        vec![GroupMember {
            vm: "vm".into(),
            drive: "disk0".into(),
            snapshot: snap2.clone(),
        }],
    )
    .unwrap();
    store::Store::open(&plain)
        .unwrap()
        .publish_group(&mut group)
        .unwrap();

    // Plaintext → encrypted on S3: ids re-keyed, everything sent once.
    let init = run(
        Some(PASS_S3),
        None,
        &["init", &s3, "--encrypt", KDF[0], KDF[1], KDF[2], KDF[3]],
    );
    assert!(init.status.success(), "{init:?}");
    let copy = ["copy", "--from", plain_s, "--to", &s3, "--json"];
    let c = json(run(None, Some(PASS_S3), &copy), "copy plain → s3");
    assert_eq!(c["ids_translated"], true, "{c}");
    assert_eq!(
        (c["snapshots_copied"].as_u64(), c["groups_copied"].as_u64()),
        (Some(2), Some(1)),
        "{c}"
    );
    assert!(c["chunks_sent"].as_u64().unwrap() > 700, "{c}");
    let c = json(run(None, Some(PASS_S3), &copy), "copy plain → s3 again");
    assert_eq!(
        (
            c["snapshots_skipped"].as_u64(),
            c["chunks_sent"].as_u64(),
            c["groups_copied"].as_u64()
        ),
        (Some(2), Some(0), Some(0)),
        "{c}"
    );
    let out = d.join("from-s3.img");
    json(
        run(
            Some(PASS_S3),
            None,
            &[
                "restore",
                "--store",
                &s3,
                &snap2,
                out.to_str().unwrap(),
                "--json",
            ],
        ),
        "restore from s3",
    );
    assert!(
        fs::read(&out).unwrap() == v2,
        "restore of the re-keyed delta from S3 differs"
    );
    fs::remove_file(&out).unwrap();

    // Encrypted on S3 → encrypted locally under another key.
    let init = run(
        Some(PASS_LOCAL),
        None,
        &["init", other_s, "--encrypt", KDF[0], KDF[1], KDF[2], KDF[3]],
    );
    assert!(init.status.success(), "{init:?}");
    let copy = ["copy", "--from", &s3, "--to", other_s, "--json"];
    // The source's passphrase does not open the destination; nor does a wrong one.
    fails(
        run(Some(PASS_S3), None, &copy),
        &["Wrong passphrase or key file", other_s],
    );
    fails(
        run(Some(PASS_S3), Some("not it"), &copy),
        &["Wrong passphrase or key file", other_s],
    );
    fails(
        run(Some("not it"), Some(PASS_LOCAL), &copy),
        &["Wrong passphrase or key file", &s3],
    );
    assert!(!any_indexed_pack(&other), "a refused copy wrote packs");

    // Through a slow link, killed once its first pack landed, then resumed.
    let proxy = proxy::Proxy::start(moto.port());
    proxy.set(proxy::Faults {
        delay: Duration::from_millis(30),
        ..Default::default()
    });
    let mut child = cli(&proxy.endpoint(), &cache, Some(PASS_S3), Some(PASS_LOCAL))
        .args(copy)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !any_indexed_pack(&other) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "copy ended before its first pack"
        );
        assert!(Instant::now() < deadline, "no pack after 180 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let c = json(run(Some(PASS_S3), Some(PASS_LOCAL), &copy), "resumed copy");
    assert_eq!(c["ids_translated"], true, "{c}");
    assert_eq!(
        c["snapshots_copied"].as_u64().unwrap() + c["snapshots_skipped"].as_u64().unwrap(),
        2,
        "{c}"
    );
    assert_eq!(c["groups_copied"], 1, "{c}");
    assert!(
        c["chunks_present"].as_u64().unwrap() > 0,
        "resumed copy resent everything: {c}"
    );

    // Both points restore exactly with the new key; the store verifies.
    for (snap, want) in [(&snap1, &v1), (&snap2, &v2)] {
        let out = d.join("out.img");
        json(
            run(
                Some(PASS_LOCAL),
                None,
                &[
                    "restore",
                    "--store",
                    other_s,
                    snap,
                    out.to_str().unwrap(),
                    "--json",
                ],
            ),
            "restore from the other key",
        );
        assert!(
            fs::read(&out).unwrap() == *want,
            "restore of {snap} after two re-keyed copies differs"
        );
        fs::remove_file(&out).unwrap();
    }
    let v = run(Some(PASS_LOCAL), None, &["verify", "--store", other_s]);
    assert!(v.status.success(), "{v:?}");
    let s =
        store::Store::open_keyed(&other, Some(&Secret::passphrase(PASS_LOCAL).unwrap())).unwrap();
    let groups = s.groups("portal").unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].members[0].snapshot, snap2);
    let r = s.open_snapshot(&snap2).unwrap();
    assert!(
        r.base().is_some(),
        "the delta manifest was not kept a delta"
    );
}
