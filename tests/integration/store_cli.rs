//! CLI tests of the chunk store commands, running the real `recovery-cli`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::util::recovery_cli;

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = recovery_cli();
    for a in args {
        c.arg(a);
    }
    c.output().expect("run recovery-cli")
}

fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "recovery-cli failed: {}\nstdout: {}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

fn ok_json(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

/// Runs a failing command; returns its single stderr line.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    lines[0].to_string()
}

/// A disk-like image: random blocks, zero runs, repeated blocks.
fn make_image(path: &Path, seed: u64, size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let n = (rng.gen_range(1..64) * 4096).min(size - at);
        match rng.gen_range(0..5) {
            0 => {}
            1 if at >= n => {
                let from = rng.gen_range(0..(at - n) / 4096 + 1) * 4096;
                v.copy_within(from..from + n, at);
            }
            _ => rng.fill(&mut v[at..at + n]),
        }
        at += n;
    }
    fs::write(path, &v).expect("write image");
    v
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn init(&self, chunk: &str) {
        ok(&[&"init", &self.store(), &"--chunk-size", &chunk]);
    }
}

fn pack_files(store: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in fs::read_dir(store.join("packs"))
        .expect("packs dir")
        .flatten()
    {
        for f in fs::read_dir(d.path()).expect("pack subdir").flatten() {
            v.push(f.path());
        }
    }
    v.sort();
    v
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(p).expect("read dir").flatten() {
        let m = e.metadata().expect("metadata");
        n += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[test]
fn backup_restore_is_identical_and_second_backup_dedups() {
    let env = Env::new();
    env.init("4K");
    let src = env.path("disk.img");
    let mut img = make_image(&src, 1, 8 << 20);
    let s1 = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"web01",
        &src,
        &"--json",
    ]);
    assert_eq!(s1["image_size"], 8 << 20);
    assert_eq!(s1["bytes_read"], 8 << 20);
    assert_eq!(s1["chunks_total"], 2048);
    for k in [
        "snapshot",
        "bytes_new",
        "chunks_new",
        "chunks_zero",
        "seconds",
    ] {
        assert!(!s1[k].is_null(), "missing {k} in {s1}");
    }
    assert!(s1["chunks_zero"].as_u64().unwrap() > 0);
    // NAME@ID, as restore and snapshots print it; the bare id apart.
    let id1 = s1["id"].as_str().unwrap().to_string();
    assert_eq!(s1["snapshot"], format!("web01@{id1}"));
    assert!(s1["parent"].is_null());

    let out = env.path("restored.img");
    ok(&[&"restore", &"--store", &env.store(), &"web01", &out]);
    assert!(fs::read(&out).unwrap() == img, "restored image differs");

    // Rewrite 1% of the 4 KiB blocks, back up again: only those are new.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..20 {
        let b = rng.gen_range(0..2048) * 4096;
        rng.fill(&mut img[b..b + 4096]);
    }
    fs::write(&src, &img).unwrap();
    let s2 = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"web01",
        &src,
        &"--json",
    ]);
    let new = s2["chunks_new"].as_u64().unwrap();
    assert!((1..=20).contains(&new), "{s2}");
    assert!(s2["bytes_new"].as_u64().unwrap() <= 21 * 4200, "{s2}");
    assert_eq!(s2["parent"], s1["snapshot"]);

    assert_eq!(s2["parent"], format!("web01@{id1}"));
    let id2 = s2["id"].as_str().unwrap();
    let restored = ok_json(&[
        &"restore",
        &"--store",
        &env.store(),
        &format!("web01@{id2}"),
        &out,
        &"--force",
        &"--json",
    ]);
    assert_eq!(restored["snapshot"], s2["snapshot"]);
    ok(&[
        &"restore",
        &"--store",
        &env.store(),
        &format!("web01@{id2}"),
        &out,
        &"--force",
    ]);
    assert!(fs::read(&out).unwrap() == img, "second restore differs");

    // Restoring over an existing file of different content is still exact.
    let id1 = id1.as_str();
    ok(&[&"restore", &"--store", &env.store(), &id1, &out, &"--force"]);
    ok(&[&"restore", &"--store", &env.store(), &id2, &out, &"--force"]);
    assert!(fs::read(&out).unwrap() == img);

    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id1, id2]);
    // CREATED has the id's digits, trailing zeros included.
    for snap in list.as_array().unwrap() {
        let id = snap["id"].as_str().unwrap();
        let created = format!(
            "{}-{}-{}T{}:{}:{}Z",
            &id[0..4],
            &id[4..6],
            &id[6..8],
            &id[9..11],
            &id[11..13],
            &id[13..22]
        );
        assert_eq!(snap["created"], created, "{snap}");
    }
    let human = ok(&[&"snapshots", &"--store", &env.store(), &"web01"]);
    assert!(human.contains(id1) && human.contains("web01"), "{human}");
    // Columns line up: every row has its SOURCE at the header's column.
    let lines: Vec<&str> = human.lines().collect();
    let col = lines[0].find("SOURCE").unwrap();
    for l in &lines[1..] {
        assert_eq!(l.find(src.to_str().unwrap()), Some(col), "{human}");
    }
    let v = ok(&[&"verify", &"--store", &env.store()]);
    assert!(v.contains("no problems"), "{v}");
}

#[test]
fn verify_names_snapshot_and_range_of_a_flipped_byte() {
    let env = Env::new();
    env.init("4K");
    let src = env.path("disk.img");
    // All-random data: every chunk is stored raw, one per 4 KiB.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut img = vec![0u8; 1 << 20];
    rng.fill(&mut img[..]);
    fs::write(&src, &img).unwrap();
    let s1 = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"db",
        &src,
        &"--json",
    ]);
    let packs = pack_files(&env.store());
    assert_eq!(packs.len(), 1);
    let mut pack = fs::read(&packs[0]).unwrap();
    let mid = pack.len() / 2;
    pack[mid] ^= 0x01;
    fs::write(&packs[0], &pack).unwrap();

    let o = run(&[&"verify", &"--store", &env.store(), &"--json"]);
    assert_eq!(o.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&o.stdout).expect("verify JSON");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    let p = &problems[0];
    assert_eq!(p["kind"], "corrupt_chunk");
    let used = &p["used_by"][0];
    let id = s1["id"].as_str().unwrap();
    assert_eq!(used["snapshot"], format!("db@{id}"));
    assert_eq!(used["snapshot"], s1["snapshot"]);
    let range = used["ranges"][0].as_array().unwrap();
    let (start, end) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
    assert_eq!(end - start, 4096);
    // The damaged range is the chunk whose record holds the flipped byte.
    let chunk = p["chunk"].as_str().unwrap();
    let data = &img[start as usize..end as usize];
    assert_eq!(chunk, store::ChunkId::of(data).to_string());

    // Human output names the snapshot and range too; single-snapshot verify agrees.
    let o = run(&[&"verify", &"--store", &env.store(), &"db"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("used by db@{id} bytes {start}-{end}")),
        "{out}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error: Verify found 1 problem\n"), "{err}");
    // The damaged chunk is reported once (not logged a second time), its
    // line does not repeat itself, and the count says what was intact.
    assert_eq!(
        out.matches(chunk).count() + err.matches(chunk).count(),
        1,
        "stdout: {out}\nstderr: {err}"
    );
    assert!(
        out.contains("checked 256 chunks of 1 snapshot in ")
            && out.contains(": 255 intact (1020.0 KiB), 1 problem\n"),
        "{out}"
    );

    // Restore refuses to produce wrong data and names the chunk.
    let e = fails(&[
        &"restore",
        &"--store",
        &env.store(),
        &"db",
        &env.path("out.img"),
    ]);
    assert!(e.contains(chunk), "{e}");
}

#[test]
fn killed_backup_leaves_store_usable() {
    let env = Env::new();
    env.init("16K");
    let small = env.path("small.img");
    make_image(&small, 2, 1 << 20);
    let first = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"vm",
        &small,
        &"--json",
    ]);

    let big = env.path("big.img");
    let img = make_image(&big, 3, 160 << 20);
    let mut child = recovery_cli()
        .args(["backup", "--store"])
        .arg(env.store())
        .args(["--name", "vm"])
        .arg(&big)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has published at least one pack (or finished).
    let t = Instant::now();
    while pack_files(&env.store()).len() < 2 && t.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    if !killed {
        eprintln!("note: backup finished before it could be killed");
    }

    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    if killed {
        assert_eq!(
            list.as_array().unwrap().len(),
            1,
            "no partial snapshot: {list}"
        );
        assert_eq!(list[0]["id"], first["id"]);
    }
    let v = ok(&[&"verify", &"--store", &env.store()]);
    assert!(v.contains("no problems"), "{v}");
    let s = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"vm",
        &big,
        &"--json",
    ]);
    assert!(
        fs::read_dir(env.store().join("tmp"))
            .unwrap()
            .next()
            .is_none(),
        "tmp cleaned"
    );
    let out = env.path("out.img");
    ok(&[
        &"restore",
        &"--store",
        &env.store(),
        &s["snapshot"].as_str().unwrap(),
        &out,
    ]);
    assert!(fs::read(&out).unwrap() == img);
    ok(&[&"verify", &"--store", &env.store()]);
}

#[test]
fn second_writer_gets_locked_error() {
    let env = Env::new();
    env.init("64K");
    let src = env.path("d.img");
    make_image(&src, 4, 1 << 20);
    let _lock = store::lock::WriterLock::acquire(&env.store()).unwrap();
    let e = fails(&[&"backup", &"--store", &env.store(), &"--name", &"x", &src]);
    assert!(
        e.contains(&format!("is locked by PID {}", std::process::id())),
        "{e}"
    );
    let e = fails(&[&"gc", &"--store", &env.store()]);
    assert!(e.contains("locked by PID"), "{e}");
    // Readers are not blocked by the writer lock.
    ok(&[&"snapshots", &"--store", &env.store()]);
    ok(&[&"verify", &"--store", &env.store()]);
}

#[test]
fn errors_are_one_clear_line() {
    let env = Env::new();
    let missing = env.path("missing");
    let e = fails(&[&"snapshots", &"--store", &missing]);
    assert!(e.contains("does not exist"), "{e}");
    let not_store = env.path("plain");
    fs::create_dir(&not_store).unwrap();
    let e = fails(&[&"snapshots", &"--store", &not_store]);
    assert!(e.contains("is not a store"), "{e}");

    env.init("64K");
    let e = fails(&[
        &"restore",
        &"--store",
        &env.store(),
        &"nosuch",
        &env.path("o"),
    ]);
    assert!(e.contains("Snapshot nosuch not found"), "{e}");
    let e = fails(&[
        &"verify",
        &"--store",
        &env.store(),
        &"nosuch@20260101T000000.000000Z",
    ]);
    assert!(e.contains("not found"), "{e}");
    let odd = env.path("odd.img");
    fs::write(&odd, vec![1u8; 1000]).unwrap();
    let e = fails(&[&"backup", &"--store", &env.store(), &"--name", &"x", &odd]);
    assert!(e.contains("not a multiple of 512"), "{e}");
    let e = fails(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"x",
        &env.path("nope.img"),
    ]);
    assert!(
        e.contains("Failed to open source") && e.contains("No such file"),
        "{e}"
    );
    let e = fails(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"../etc",
        &odd,
    ]);
    assert!(e.contains("Invalid image name \"../etc\""), "{e}");
    let e = fails(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"bad/name",
        &odd,
    ]);
    assert!(e.contains("Invalid image name \"bad/name\""), "{e}");
    let e = fails(&[&"init", &env.store()]);
    assert!(e.contains("already exists"), "{e}");
    let e = fails(&[&"init", &odd]);
    assert!(
        e.contains("Cannot create a store at") && e.contains("it exists and is not a directory"),
        "{e}"
    );
    // Decimal sizes are sizes; a fraction of a byte is named as such.
    let out = ok(&[&"init", &env.path("s4"), &"--chunk-size", &"0.0625M"]);
    assert!(out.contains("chunk size 64.0 KiB"), "{out}");
    let o = run(&[&"init", &env.path("s5"), &"--chunk-size", &"1.5G"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("invalid size unit"), "{err}");
    assert!(
        err.contains("1610612736") || err.contains("too large"),
        "{err}"
    );
    let o = run(&[&"init", &env.path("s6"), &"--chunk-size", &"0.3K"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a whole number of bytes"), "{err}");

    let cfg = env.store().join("config.json");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 99");
    fs::write(&cfg, text).unwrap();
    let e = fails(&[&"snapshots", &"--store", &env.store()]);
    assert!(e.contains("version 99"), "{e}");

    // Usage errors exit 2.
    let o = run(&[&"init", &env.path("s2"), &"--chunk-size", &"12Q"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[&"frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    // A bad but well-formed chunk size is a one-line error.
    let e = fails(&[&"init", &env.path("s3"), &"--chunk-size", &"3K"]);
    assert!(e.contains("power of two"), "{e}");
}

#[test]
fn gc_after_forget_reclaims_space_and_keeps_the_rest() {
    let env = Env::new();
    env.init("4K");
    let (a, b) = (env.path("a.img"), env.path("b.img"));
    make_image(&a, 10, 6 << 20);
    let img_b = make_image(&b, 11, 6 << 20);
    ok(&[&"backup", &"--store", &env.store(), &"--name", &"a", &a]);
    let sb = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"b",
        &b,
        &"--json",
    ]);
    let before = dir_size(&env.store().join("packs"));

    let out = ok(&[&"forget", &"--store", &env.store(), &"a"]);
    assert!(out.contains("Forgot a@"), "{out}");
    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let g = ok_json(&[&"gc", &"--store", &env.store(), &"--json"]);
    assert_eq!(g["manifests_deleted"], 1, "{g}");
    let after = dir_size(&env.store().join("packs"));
    assert!(after < before * 6 / 10, "packs {before} -> {after}: {g}");
    assert!(g["bytes_freed"].as_u64().unwrap() > 0);

    ok(&[&"verify", &"--store", &env.store()]);
    let out = env.path("out.img");
    ok(&[
        &"restore",
        &"--store",
        &env.store(),
        &sb["snapshot"].as_str().unwrap(),
        &out,
    ]);
    assert!(fs::read(&out).unwrap() == img_b);
    let e = fails(&[&"restore", &"--store", &env.store(), &"a", &out]);
    assert!(e.contains("not found"), "{e}");
}

/// Unmounts on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_fails_cleanly_and_next_backup_succeeds() {
    let env = Env::new();
    let mnt = env.path("small");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8M", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        crate::skip!("full_disk test: cannot mount a tmpfs (needs root)");
    }
    let _guard = Tmpfs(mnt.clone());
    let store = mnt.join("store");
    ok(&[&"init", &store, &"--chunk-size", &"16K"]);
    let big = env.path("big.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut img = vec![0u8; 24 << 20];
    rng.fill(&mut img[..]);
    fs::write(&big, &img).unwrap();
    let e = fails(&[&"backup", &"--store", &store, &"--name", &"vm", &big]);
    assert!(e.contains("No space left on device"), "{e}");
    let list = ok_json(&[&"snapshots", &"--store", &store, &"--json"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    assert!(
        fs::read_dir(store.join("tmp")).unwrap().next().is_none(),
        "no temp files left"
    );

    // The failed backup gave its space back: a smaller one fits.
    let small = env.path("small.img");
    let small_img = make_image(&small, 8, 2 << 20);
    let s = ok_json(&[
        &"backup", &"--store", &store, &"--name", &"vm", &small, &"--json",
    ]);
    ok(&[&"verify", &"--store", &store]);
    let out = env.path("out.img");
    ok(&[
        &"restore",
        &"--store",
        &store,
        &s["snapshot"].as_str().unwrap(),
        &out,
    ]);
    assert!(fs::read(&out).unwrap() == small_img);
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let o = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !o.status.success() {
            return None;
        }
        let dev = String::from_utf8(o.stdout).ok()?.trim().to_string();
        Path::new(&dev).exists().then_some(Loop(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn block_device_source_and_target() {
    let env = Env::new();
    env.init("16K");
    let src_file = env.path("src.img");
    let img = make_image(&src_file, 30, 4 << 20);
    let Some(src) = Loop::attach(&src_file) else {
        crate::skip!("block device test: cannot attach a loop device (needs root and losetup)");
    };
    let s = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"dev",
        &src.0,
        &"--json",
    ]);
    assert_eq!(
        s["image_size"],
        4 << 20,
        "size of a block device by seeking"
    );

    // Target device pre-filled with garbage: zero chunks must be written.
    let dst_file = env.path("dst.img");
    fs::write(&dst_file, vec![0xffu8; 5 << 20]).unwrap();
    let Some(dst) = Loop::attach(&dst_file) else {
        crate::skip!("block device test: cannot attach a second loop device");
    };
    ok(&[&"restore", &"--store", &env.store(), &"dev", &dst.0]);
    drop(dst);
    let out = fs::read(&dst_file).unwrap();
    assert!(out[..img.len()] == img[..], "device content differs");
    assert!(
        out[img.len()..].iter().all(|&b| b == 0xff),
        "bytes past the image untouched"
    );

    // A device smaller than the image is refused.
    let small_file = env.path("small.img");
    fs::write(&small_file, vec![0u8; 1 << 20]).unwrap();
    if let Some(small) = Loop::attach(&small_file) {
        let e = fails(&[&"restore", &"--store", &env.store(), &"dev", &small.0]);
        assert!(e.contains("the image needs"), "{e}");
    }
}

/// `restore` never writes inside a store, whatever the flags, and overwrites
/// an existing file only with `--force`.
#[test]
fn store_restore_refuses_store_files_and_existing_files() {
    let env = Env::new();
    env.init("4K");
    let src = env.path("disk.img");
    let img = make_image(&src, 50, 2 << 20);
    ok(&[&"backup", &"--store", &env.store(), &"--name", &"vm", &src]);
    let config = env.store().join("config.json");
    let config_before = fs::read(&config).unwrap();
    let pack = pack_files(&env.store()).remove(0);
    let pack_before = fs::read(&pack).unwrap();
    let store = env.store();
    for target in [&config, &pack] {
        for force in [false, true] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
                vec![&"restore", &"--store", &store, &"vm", target];
            if force {
                args.push(&"--force");
            }
            let e = fails(&args);
            assert!(e.contains("inside the store"), "{e}");
        }
    }
    assert!(
        fs::read(&config).unwrap() == config_before,
        "config.json changed"
    );
    assert!(fs::read(&pack).unwrap() == pack_before, "pack changed");
    let v = ok(&[&"verify", &"--store", &env.store()]);
    assert!(v.contains("no problems"), "{v}");

    // Another store is just as off limits.
    let other = env.path("other");
    ok(&[&"init", &other]);
    let e = fails(&[
        &"restore",
        &"--store",
        &env.store(),
        &"vm",
        &other.join("snapshots/x.img"),
        &"--force",
    ]);
    assert!(e.contains("inside the store"), "{e}");

    // An existing file: refused, untouched, with what is there; --force works.
    let out = env.path("out.img");
    fs::write(&out, b"precious data").unwrap();
    let e = fails(&[&"restore", &"--store", &env.store(), &"vm", &out]);
    assert!(
        e.contains("already exists (a regular file of 13 bytes)") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(fs::read(&out).unwrap(), b"precious data");
    let r = ok_json(&[
        &"restore",
        &"--store",
        &env.store(),
        &"vm",
        &out,
        &"--force",
        &"--json",
    ]);
    assert_eq!(r["image_size"], 2 << 20);
    assert!(fs::read(&out).unwrap() == img, "forced restore differs");
}

/// A held snapshot (an instant-boot state dir depends on it): forget refuses
/// it naming the holder, --force forgets it but gc keeps its chunks while it
/// is held, and unforget brings it back whole.
#[test]
fn store_held_snapshot_is_kept_until_released() {
    let env = Env::new();
    env.init("4K");
    let src = env.path("disk.img");
    let img = make_image(&src, 60, 2 << 20);
    let s = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"vm",
        &src,
        &"--json",
    ]);
    let reference = s["snapshot"].as_str().unwrap().to_string();
    let lib = store::Store::open(&env.store()).unwrap();
    lib.add_hold(
        "vm",
        &store::HoldInfo::new("state-5f0c", "instant-boot state dir /srv/vm"),
    )
    .unwrap();

    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    assert_eq!(list[0]["snapshot"], reference.as_str());
    assert_eq!(list[0]["holds"][0]["holder"], "state-5f0c", "{list}");
    assert_eq!(list[0]["holds"][0]["pid"], std::process::id(), "{list}");
    let human = ok(&[&"snapshots", &"--store", &env.store()]);
    assert!(
        human.contains("HOLDS") && human.contains("state-5f0c (instant-boot state dir /srv/vm"),
        "{human}"
    );

    let e = fails(&[&"forget", &"--store", &env.store(), &"vm"]);
    assert!(
        e.contains(&format!("Snapshot {reference} is held by state-5f0c")) && e.contains("--force"),
        "{e}"
    );
    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "refused forget changed nothing"
    );

    let packs = dir_size(&env.store().join("packs"));
    let out = ok(&[&"forget", &"--store", &env.store(), &"vm", &"--force"]);
    assert!(out.contains("still held by state-5f0c"), "{out}");
    let list = ok_json(&[&"snapshots", &"--store", &env.store(), &"--json"]);
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    let all = ok(&[&"snapshots", &"--store", &env.store(), &"--forgotten"]);
    assert!(all.contains("forgotten; state-5f0c"), "{all}");
    let g = ok_json(&[
        &"gc",
        &"--store",
        &env.store(),
        &"--repack-threshold",
        &"0",
        &"--json",
    ]);
    assert_eq!(g["manifests_held"], 1, "{g}");
    assert_eq!(g["manifests_deleted"], 0, "{g}");
    assert_eq!(dir_size(&env.store().join("packs")), packs, "{g}");

    let out = ok(&[&"unforget", &"--store", &env.store(), &reference]);
    assert!(out.contains(&format!("Unforgot {reference}")), "{out}");
    let target = env.path("out.img");
    ok(&[&"restore", &"--store", &env.store(), &"vm", &target]);
    assert!(
        fs::read(&target).unwrap() == img,
        "unforgotten snapshot differs"
    );
    ok(&[&"verify", &"--store", &env.store()]);

    // Released: forget needs no force, gc reclaims, nothing to unforget.
    ok(&[
        &"release-hold",
        &"--store",
        &env.store(),
        &reference,
        &"state-5f0c",
    ]);
    ok(&[&"forget", &"--store", &env.store(), &"vm"]);
    let g = ok_json(&[&"gc", &"--store", &env.store(), &"--json"]);
    assert_eq!(g["manifests_deleted"], 1, "{g}");
    let e = fails(&[&"unforget", &"--store", &env.store(), &reference]);
    assert!(e.contains("gc may have deleted it"), "{e}");
}

/// A 64 GiB sparse image holding 8 MiB: backup reads only the data
/// (`bytes_read`), and the restored file is exact and just as sparse.
#[test]
fn store_sparse_64g_image_reads_only_its_data() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const SIZE: u64 = 64 << 30;
    let env = Env::new();
    env.init("64K");
    let src = env.path("sparse.img");
    let f = fs::File::create(&src).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(64);
    let mut pieces = Vec::new();
    for i in 0..8u64 {
        let mut data = vec![0u8; 1 << 20];
        rng.fill(&mut data[..]);
        let at = i * (8 << 30) + (i * 4096);
        f.write_all_at(&data, at).unwrap();
        pieces.push((at, data));
    }
    f.sync_all().unwrap();
    let s = ok_json(&[
        &"backup",
        &"--store",
        &env.store(),
        &"--name",
        &"big",
        &src,
        &"--json",
    ]);
    assert_eq!(s["image_size"], SIZE);
    let read = s["bytes_read"].as_u64().unwrap();
    // 8 MiB, rounded out to 64 KiB chunks (7 pieces are unaligned).
    assert!(
        (8 << 20..=(8 << 20) + 8 * (64 << 10)).contains(&read),
        "read {read} bytes of a 64 GiB image holding 8 MiB: {s}"
    );
    let human = ok(&[&"backup", &"--store", &env.store(), &"--name", &"big", &src]);
    assert!(
        human.contains("read        8.")
            && human.contains(" MiB of 64.0 GiB in ")
            && human.contains("holes are not read"),
        "{human}"
    );

    let out = env.path("out.img");
    ok(&[&"restore", &"--store", &env.store(), &"big", &out]);
    let m = fs::metadata(&out).unwrap();
    assert_eq!(m.len(), SIZE);
    assert!(
        m.blocks() * 512 <= (8 << 20) + 16 * (64 << 10),
        "restore filled the holes: {} bytes allocated",
        m.blocks() * 512
    );
    let restored = fs::File::open(&out).unwrap();
    for (at, data) in &pieces {
        let mut buf = vec![0u8; data.len()];
        restored.read_exact_at(&mut buf, *at).unwrap();
        assert!(buf == *data, "piece at {at} differs");
        // The bytes around each piece are zeros.
        let mut edge = [0xffu8; 4096];
        restored
            .read_exact_at(&mut edge, at + data.len() as u64)
            .unwrap();
        assert!(edge.iter().all(|&b| b == 0), "after piece at {at}");
    }
}

/// A block device is restored to without --force, but never the device that
/// holds the store, nor a mounted one.
#[test]
fn store_restore_refuses_the_store_device_and_mounted_devices() {
    let env = Env::new();
    let img = env.path("fs.img");
    fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .is_ok_and(|s| s.success());
    let Some(dev) = Loop::attach(&img).filter(|_| mkfs) else {
        crate::skip!("mounted device test: needs mkfs.ext4, root and losetup");
    };
    let mnt = env.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg(&dev.0)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        crate::skip!("mounted device test: cannot mount a loop device");
    }
    let _unmount = Tmpfs(mnt.clone());
    // The store lives on the mounted device.
    let store = mnt.join("store");
    ok(&[&"init", &store, &"--chunk-size", &"16K"]);
    let src = env.path("src.img");
    make_image(&src, 70, 1 << 20);
    ok(&[&"backup", &"--store", &store, &"--name", &"vm", &src]);
    let before = dir_size(&store);
    let e = fails(&[&"restore", &"--store", &store, &"vm", &dev.0, &"--force"]);
    assert!(e.contains("the device holds the store"), "{e}");

    // Another store's device, also mounted: in use.
    let other_store = env.path("store");
    ok(&[&"init", &other_store, &"--chunk-size", &"16K"]);
    ok(&[&"backup", &"--store", &other_store, &"--name", &"vm", &src]);
    let e = fails(&[&"restore", &"--store", &other_store, &"vm", &dev.0]);
    assert!(e.contains("the device is in use"), "{e}");
    assert_eq!(dir_size(&store), before);
    ok(&[&"verify", &"--store", &store]);
}
