//! `ls`, `cat`, `restore-files` and `mount` on disk images built with the
//! real tools (`sfdisk` for GPT and MBR with logical partitions, `mke2fs -d
//! TREE -E offset=` for ext4, ext3 and ext2, `mkswap`), backed up with the
//! real `recovery-cli`. Every file is compared with the source tree through
//! `cat` (a sample), `restore-files` and `mount` (`diff -r` over all), and
//! `disk.raw` under `mount` with a full `restore`.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

use crate::util::recovery_cli;

const MIB: u64 = 1 << 20;

/// The first tool these tests need that is missing, if any.
fn missing_tool() -> Option<String> {
    ["sfdisk", "mke2fs", "mkswap", "debugfs", "unshare"]
        .into_iter()
        .find(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("PATH=$PATH:/usr/sbin:/sbin; command -v {t}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|t| format!("{t} not installed (scripts/install-deps.sh installs fdisk, e2fsprogs)"))
}

/// Skips (or, under CI, fails) a test that lacks a tool or /dev/fuse.
macro_rules! require_env {
    (fuse) => {
        if !Path::new("/dev/fuse").exists() {
            $crate::skip!("/dev/fuse missing: mount cannot be tested");
        }
    };
    () => {
        if let Some(why) = missing_tool() {
            $crate::skip!("{why}");
        }
    };
}

/// Runs `cmd` with sh (sbin in PATH); panics with its output on failure.
fn sh(cmd: &str) -> Vec<u8> {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("PATH=$PATH:/usr/sbin:/sbin; {cmd}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn cli(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = recovery_cli();
    for a in args {
        c.arg(a);
    }
    c.output().expect("run recovery-cli")
}

fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<u8> {
    let o = cli(args);
    assert!(
        o.status.success(),
        "recovery-cli failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// A failing command: exit 1, one `error:` line naming the problem.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = cli(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "{err}");
    last
}

fn set_mtime(p: &Path, secs: u64) {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    let f = File::open(p).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// The small tree: a bit of everything but the big directory.
fn small_tree(root: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/fstab"),
        format!("UUID=x / ext4 defaults 0 1 # {seed}\n"),
    )
    .unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("one"), b"1").unwrap();
    let mut data = vec![0u8; 300_000];
    rng.fill_bytes(&mut data);
    fs::write(root.join("etc/blob.bin"), &data).unwrap();
    fs::hard_link(root.join("etc/blob.bin"), root.join("hardlink.bin")).unwrap();
    std::os::unix::fs::symlink("etc/fstab", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/fstab", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../etc/passwd", root.join("escape-link")).unwrap();
    fs::write(root.join("ünïcödé-名前.txt"), "ünï\n").unwrap();
    fs::set_permissions(root.join("etc/fstab"), fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime(&root.join("etc/fstab"), 1_500_000_000);
}

/// The full tree of the issue: 10k entries in one directory, deep paths,
/// links of every kind, sparse, empty, 1-byte and a large file, unicode.
fn full_tree(root: &Path) {
    small_tree(root, 1);
    let big = root.join("big");
    fs::create_dir(&big).unwrap();
    for i in 0..10_000 {
        fs::write(big.join(format!("f{i:05}")), format!("{i}\n")).unwrap();
    }
    let mut deep = root.to_path_buf();
    for i in 0..40 {
        deep.push(format!("level-{i:02}-directory"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf.txt"), b"deep leaf\n").unwrap();
    let sparse = File::create(root.join("sparse.bin")).unwrap();
    sparse.set_len(8 * MIB).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"middle", 4 * MIB + 123).unwrap();
    sparse.write_all_at(b"tail", 8 * MIB - 4).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut large = vec![0u8; 20 * MIB as usize];
    rng.fill_bytes(&mut large);
    fs::write(root.join("large.bin"), &large).unwrap();
    fs::create_dir(root.join("private")).unwrap();
    fs::write(root.join("private/owned"), b"owned\n").unwrap();
    if is_root() {
        std::os::unix::fs::chown(root.join("private/owned"), Some(1234), Some(5678)).unwrap();
    }
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(root.join("emoji-😀"), b"smile\n").unwrap();
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// One ext filesystem of `size` MiB from `tree` at `offset` MiB of `disk`.
fn mkfs(disk: &Path, kind: &str, label: &str, tree: &Path, offset_mib: u64, size_mib: u64) {
    sh(&format!(
        "mke2fs -q -F -t {kind} -L {label} -b 4096 -d '{}' -E offset={} '{}' {}M",
        tree.display(),
        offset_mib * MIB,
        disk.display(),
        size_mib
    ));
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn p(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }
}

/// GPT disk: p1 ext4 (full tree), p2 ext3, p3 ext2 (small trees), p4 swap.
/// MBR disk: p1 ext4, p2 extended with p5 ext3 and p6 ext2.
fn build() -> Fixture {
    let f = Fixture {
        dir: tempfile::tempdir().unwrap(),
    };
    full_tree(&f.p("full"));
    small_tree(&f.p("small2"), 2);
    small_tree(&f.p("small3"), 3);
    let gpt = f.p("gpt.img");
    File::create(&gpt).unwrap().set_len(150 * MIB).unwrap();
    sh(&format!(
        "printf 'label: gpt\\nstart=1MiB,size=96MiB,type=L\\nsize=16MiB,type=L\\nsize=16MiB,type=L\\nsize=8MiB,type=S\\n' | sfdisk -q '{}'",
        gpt.display()
    ));
    mkfs(&gpt, "ext4", "root", &f.p("full"), 1, 96);
    mkfs(&gpt, "ext3", "three", &f.p("small2"), 97, 16);
    mkfs(&gpt, "ext2", "two", &f.p("small3"), 113, 16);
    // mkswap on a partition of a file: write it to a temp file and splice in.
    let swap = f.p("swap.img");
    File::create(&swap).unwrap().set_len(8 * MIB).unwrap();
    sh(&format!("mkswap -q '{}'", swap.display()));
    sh(&format!(
        "dd if='{}' of='{}' bs=1M seek=129 conv=notrunc status=none",
        swap.display(),
        gpt.display()
    ));

    let mbr = f.p("mbr.img");
    File::create(&mbr).unwrap().set_len(64 * MIB).unwrap();
    sh(&format!(
        "printf 'label: dos\\nstart=1MiB,size=16MiB,type=83\\nstart=17MiB,size=44MiB,type=5\\nstart=18MiB,size=16MiB,type=83\\nstart=35MiB,size=16MiB,type=83\\n' | sfdisk -q '{}'",
        mbr.display()
    ));
    let out = sh(&format!("sfdisk -J '{}'", mbr.display()));
    let j: Value = serde_json::from_slice(&out).unwrap();
    let parts = j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(parts.len(), 4, "{j}");
    let start = |i: usize| parts[i]["start"].as_u64().unwrap() * 512 / MIB;
    mkfs(&mbr, "ext4", "mbrroot", &f.p("small2"), start(0), 16);
    mkfs(&mbr, "ext3", "logical5", &f.p("small2"), start(2), 16);
    mkfs(&mbr, "ext2", "logical6", &f.p("small3"), start(3), 16);

    let st = f.p("store");
    ok(&[&"init", &st]);
    ok(&[&"backup", &"--store", &st, &"--name", &"gpt", &gpt]);
    ok(&[&"backup", &"--store", &st, &"--name", &"mbr", &mbr]);
    f
}

fn ls_json(st: &Path, snap: &str, path: &str) -> Vec<Value> {
    let out = ok(&[&"ls", &"--store", &st, &snap, &path, &"--json"]);
    serde_json::from_slice::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `diff -r` without following links, ignoring lost+found.
fn diff_trees(a: &Path, b: &Path) {
    sh(&format!(
        "diff -r --no-dereference -x lost+found '{}' '{}'",
        a.display(),
        b.display()
    ));
}

/// Mode, mtime, symlink targets (and owner as root) match for every entry.
fn check_metadata(src: &Path, dst: &Path, owners: bool) {
    let mut stack = vec![PathBuf::new()];
    let mut n = 0;
    while let Some(rel) = stack.pop() {
        let (s, d) = (src.join(&rel), dst.join(&rel));
        let (ms, md) = (
            fs::symlink_metadata(&s).unwrap(),
            fs::symlink_metadata(&d).unwrap(),
        );
        n += 1;
        assert_eq!(ms.file_type(), md.file_type(), "{}", rel.display());
        if ms.file_type().is_symlink() {
            assert_eq!(fs::read_link(&s).unwrap(), fs::read_link(&d).unwrap());
        } else {
            assert_eq!(ms.mode() & 0o7777, md.mode() & 0o7777, "{}", rel.display());
            if !ms.is_dir() {
                assert_eq!(ms.mtime(), md.mtime(), "mtime of {}", rel.display());
            }
        }
        if owners {
            assert_eq!(
                (ms.uid(), ms.gid()),
                (md.uid(), md.gid()),
                "{}",
                rel.display()
            );
        }
        if ms.is_dir() {
            for e in fs::read_dir(&s).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    assert!(n > 10_000, "walked only {n} entries");
}

#[test]
fn files_match_the_source_tree_through_ls_cat_restore_and_mount() {
    require_env!();
    require_env!(fuse);
    let f = build();
    let st = f.p("store");

    // Top level: partitions with detected filesystems and labels.
    let top = ls_json(&st, "gpt", "/");
    let desc: Vec<(String, String, String)> = top
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["fs"].as_str().unwrap().to_string(),
                e["label"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = [
        ("p1", "ext4", "root"),
        ("p2", "ext3", "three"),
        ("p3", "ext2", "two"),
        ("p4", "swap", ""),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(desc, want);
    let long = String::from_utf8(ok(&[&"ls", &"--store", &st, &"gpt", &"-l"])).unwrap();
    assert!(
        long.contains("p1") && long.contains("ext4") && long.contains("label=root"),
        "{long}"
    );

    // 10k entries, in order, with metadata.
    let big = ls_json(&st, "gpt", "/p1/big");
    assert_eq!(big.len(), 10_000);
    assert_eq!(big[1234]["name"], "f01234");
    assert_eq!(big[1234]["size"], 5);
    let fstab = &ls_json(&st, "gpt", "/p1/etc/fstab")[0];
    assert_eq!(fstab["mode"], 0o640);
    assert_eq!(fstab["mtime"], 1_500_000_000);
    assert_eq!(fstab["kind"], "file");
    let link = &ls_json(&st, "gpt", "/p1/abs-link")[0];
    assert_eq!(
        (link["kind"].as_str(), link["target"].as_str()),
        (Some("symlink"), Some("/etc/fstab"))
    );
    let l = String::from_utf8(ok(&[&"ls", &"--store", &st, &"gpt", &"/p1/etc", &"-l"])).unwrap();
    assert!(
        l.lines()
            .any(|x| x.starts_with("-rw-r----- ") && x.ends_with(" fstab")),
        "{l}"
    );

    // Only the chunks under the file and its metadata are fetched.
    let store = store::Store::open(&st).unwrap();
    let dev = std::sync::Arc::new(files::SnapshotDevice::new(
        store.open_snapshot("gpt").unwrap(),
        files::device::DEFAULT_CACHE_BYTES,
    ));
    let disk = std::sync::Arc::new(files::Disk::open(dev.clone()).unwrap());
    let mut file = files::Browser::new(disk).open("/p1/large.bin").unwrap();
    let mut buf = vec![0u8; file.size() as usize];
    assert_eq!(file.read_at(&mut buf, 0).unwrap(), buf.len());
    assert_eq!(buf, fs::read(f.p("full/large.bin")).unwrap());
    let fetched = dev.stats().bytes();
    assert!(
        (20 * MIB..22 * MIB).contains(&fetched),
        "fetched {fetched} bytes for a 20 MiB file of a 150 MiB image"
    );
    drop(dev);

    // cat: a sample of files, links followed inside the filesystem.
    let full = f.p("full");
    let mut deep = String::from("/p1");
    for i in 0..40 {
        deep.push_str(&format!("/level-{i:02}-directory"));
    }
    deep.push_str("/leaf.txt");
    let cases: Vec<(String, PathBuf)> = vec![
        ("/p1/large.bin".into(), full.join("large.bin")),
        ("/p1/sparse.bin".into(), full.join("sparse.bin")),
        ("/p1/empty".into(), full.join("empty")),
        ("/p1/one".into(), full.join("one")),
        ("/p1/big/f09999".into(), full.join("big/f09999")),
        ("/p1/ünïcödé-名前.txt".into(), full.join("ünïcödé-名前.txt")),
        ("/p1/emoji-😀".into(), full.join("emoji-😀")),
        ("/p1/hardlink.bin".into(), full.join("etc/blob.bin")),
        ("/p1/rel-link".into(), full.join("etc/fstab")),
        ("/p1/abs-link".into(), full.join("etc/fstab")),
        (deep.clone(), full.join(deep.trim_start_matches("/p1/"))),
        ("/p2/etc/fstab".into(), f.p("small2/etc/fstab")),
        ("/p3/etc/blob.bin".into(), f.p("small3/etc/blob.bin")),
    ];
    for (p, src) in &cases {
        assert_eq!(
            ok(&[&"cat", &"--store", &st, &"gpt", p]),
            fs::read(src).unwrap(),
            "{p}"
        );
    }
    let mbr_top: Vec<String> = ls_json(&st, "mbr", "/")
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["name"].as_str().unwrap(),
                e["fs"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(mbr_top, ["p1:ext4", "p2:extended", "p5:ext3", "p6:ext2"]);
    assert_eq!(
        ok(&[&"cat", &"--store", &st, &"mbr", &"/p6/etc/fstab"]),
        fs::read(f.p("small3/etc/fstab")).unwrap()
    );

    // restore-files: whole trees, metadata, sparseness, refusal to overwrite.
    let out = f.p("out");
    ok(&[
        &"restore-files",
        &"--store",
        &st,
        &"gpt",
        &"/p1",
        &"/p2",
        &"--to",
        &out,
    ]);
    diff_trees(&full, &out.join("p1"));
    diff_trees(&f.p("small2"), &out.join("p2"));
    check_metadata(&full, &out.join("p1"), is_root());
    let sparse = fs::metadata(out.join("p1/sparse.bin")).unwrap();
    assert_eq!(sparse.len(), 8 * MIB);
    assert!(
        sparse.blocks() * 512 < MIB,
        "sparse.bin takes {} blocks",
        sparse.blocks()
    );
    let p2 = out.join("p2");
    let again: [&dyn AsRef<std::ffi::OsStr>; 7] = [
        &"restore-files",
        &"--store",
        &st,
        &"gpt",
        &"/p2/etc",
        &"--to",
        &p2,
    ];
    let err = fails(&again);
    assert!(err.contains("could not be restored"), "{err}");
    ok(&[&again[..], &[&"--force"]].concat());
    let mout = f.p("mbr-out");
    ok(&[
        &"restore-files",
        &"--store",
        &st,
        &"mbr",
        &"/p5",
        &"/p6/etc/blob.bin",
        &"--to",
        &mout,
    ]);
    diff_trees(&f.p("small2"), &mout.join("p5"));
    assert_eq!(
        fs::read(mout.join("blob.bin")).unwrap(),
        fs::read(f.p("small3/etc/blob.bin")).unwrap()
    );

    // mount: every tree, and disk.raw equal to a full restore.
    let raw = f.p("restored.raw");
    ok(&[&"restore", &"--store", &st, &"gpt", &raw]);
    let mnt = f.p("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(&st, "gpt", &mnt);
    diff_trees(&full, &mnt.join("p1"));
    diff_trees(&f.p("small2"), &mnt.join("p2"));
    diff_trees(&f.p("small3"), &mnt.join("p3"));
    assert_eq!(fs::read_dir(mnt.join("p4")).unwrap().count(), 0);
    assert_eq!(
        fs::read_link(mnt.join("p1/abs-link")).unwrap(),
        Path::new("/etc/fstab")
    );
    let st_meta = fs::metadata(mnt.join("p1/etc/fstab")).unwrap();
    assert_eq!(
        (st_meta.mode() & 0o7777, st_meta.mtime()),
        (0o640, 1_500_000_000)
    );
    sh(&format!(
        "cmp '{}' '{}'",
        mnt.join("disk.raw").display(),
        raw.display()
    ));
    assert!(
        fs::write(mnt.join("p1/new"), b"x").is_err(),
        "mount must be read-only"
    );
    m.stop();
}

/// A running `recovery-cli mount`, stopped with SIGTERM.
struct Mounted {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

fn mounted(mnt: &Path) -> bool {
    let canon = fs::canonicalize(mnt).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

impl Mounted {
    fn start(st: &Path, snap: &str, mnt: &Path) -> Mounted {
        // Its log goes to a file: a pipe nobody reads would fill up with
        // the EIO reports and stall the FUSE thread.
        let log = mnt.with_extension("log");
        let child = recovery_cli()
            .args(["mount", "--store"])
            .arg(st)
            .arg(snap)
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mounted {
            child,
            mnt: mnt.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !mounted(mnt) {
            if let Some(status) = m.child.try_wait().unwrap() {
                let err = fs::read_to_string(&m.log).unwrap_or_default();
                panic!("mount exited with {status}: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn stop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "mount did not exit on SIGTERM: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "mount exited with {status}: {}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        assert!(!mounted(&self.mnt), "still mounted after SIGTERM");
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Flips a bit in the stored record of chunk `index`; returns the chunk id.
fn corrupt_chunk(store: &Path, snapshot: &str, index: u64) -> String {
    let s = store::Store::open(store).unwrap();
    let reader = s.open_snapshot(snapshot).unwrap();
    let id = reader.chunk_id(index).unwrap().expect("a stored chunk");
    let loc = s.index().lookup(&id).unwrap().expect("an indexed chunk");
    let at = loc.offset + store::format::RECORD_HEADER_LEN as u64 + u64::from(loc.stored_len) / 2;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.join(loc.pack.pack_key()))
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    id.to_string()
}

#[test]
fn a_corrupt_chunk_fails_only_the_file_on_it() {
    require_env!();
    require_env!(fuse);
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for name in ["victim.bin", "other.bin", "third.bin"] {
        let mut v = vec![0u8; 512 * 1024];
        rng.fill_bytes(&mut v);
        fs::write(tree.join(name), v).unwrap();
    }
    // The filesystem alone first, to ask debugfs where victim.bin lives.
    let fsimg = d.path().join("fs.img");
    sh(&format!(
        "mke2fs -q -F -t ext4 -b 4096 -d '{}' '{}' 16M",
        tree.display(),
        fsimg.display()
    ));
    let o = sh(&format!(
        "debugfs -R 'bmap /victim.bin 64' '{}'",
        fsimg.display()
    ));
    let block: u64 = String::from_utf8_lossy(&o)
        .trim()
        .parse()
        .expect("a block number");
    let disk = d.path().join("disk.img");
    File::create(&disk).unwrap().set_len(20 * MIB).unwrap();
    sh(&format!(
        "printf 'label: gpt\\nstart=1MiB,type=L\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    sh(&format!(
        "dd if='{}' of='{}' bs=1M seek=1 conv=notrunc status=none",
        fsimg.display(),
        disk.display()
    ));
    let st = d.path().join("store");
    ok(&[&"init", &st]);
    ok(&[&"backup", &"--store", &st, &"--name", &"vm", &disk]);
    let chunk = (MIB + block * 4096) / (64 * 1024);
    let id = corrupt_chunk(&st, "vm", chunk);

    let err = fails(&[&"cat", &"--store", &st, &"vm", &"/p1/victim.bin"]);
    assert!(err.contains(&format!("chunk {chunk}")), "{err}");
    assert_eq!(
        ok(&[&"cat", &"--store", &st, &"vm", &"/p1/other.bin"]),
        fs::read(tree.join("other.bin")).unwrap()
    );
    let out = d.path().join("out");
    let o = cli(&[
        &"restore-files",
        &"--store",
        &st,
        &"vm",
        &"/p1",
        &"--to",
        &out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed: /p1/victim.bin") && err.contains(&id[..12]),
        "{err}"
    );
    assert_eq!(
        fs::read(out.join("p1/other.bin")).unwrap(),
        fs::read(tree.join("other.bin")).unwrap()
    );
    assert_eq!(
        fs::read(out.join("p1/third.bin")).unwrap(),
        fs::read(tree.join("third.bin")).unwrap()
    );
    assert!(
        !out.join("p1/victim.bin").exists(),
        "a failed file is removed"
    );

    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(&st, "vm", &mnt);
    let e = fs::read(mnt.join("p1/victim.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        fs::read(mnt.join("p1/other.bin")).unwrap(),
        fs::read(tree.join("other.bin")).unwrap()
    );
    m.stop();
}

#[test]
fn bad_input_gets_one_clear_error() {
    require_env!();
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    small_tree(&tree, 5);
    let disk = d.path().join("disk.img");
    File::create(&disk).unwrap().set_len(40 * MIB).unwrap();
    sh(&format!(
        "printf 'label: dos\\nstart=1MiB,size=16MiB,type=83\\nsize=16MiB,type=83\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    mkfs(&disk, "ext4", "good", &tree, 1, 16);
    mkfs(&disk, "ext4", "bad", &tree, 17, 16);
    // Damage p2's superblock magic and its first inode table block.
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&[0u8; 2], 17 * MIB + 1024 + 56).unwrap();
    // An unpartitioned swap disk.
    let swap = d.path().join("swap.img");
    File::create(&swap).unwrap().set_len(4 * MIB).unwrap();
    sh(&format!("mkswap -q '{}'", swap.display()));
    let st = d.path().join("store");
    ok(&[&"init", &st]);
    ok(&[&"backup", &"--store", &st, &"--name", &"vm", &disk]);
    ok(&[&"backup", &"--store", &st, &"--name", &"swap", &swap]);

    let e = fails(&[&"cat", &"--store", &st, &"vm", &"/p1/nope"]);
    assert!(e.contains("No such file or directory: /p1/nope"), "{e}");
    let e = fails(&[&"ls", &"--store", &st, &"vm", &"/p1/etc/fstab/x"]);
    assert!(e.contains("Not a directory: /p1/etc/fstab/x"), "{e}");
    let e = fails(&[&"cat", &"--store", &st, &"vm", &"/p1/../../etc/passwd"]);
    assert!(e.contains("'..' is not allowed"), "{e}");
    let e = fails(&[
        &"restore-files",
        &"--store",
        &st,
        &"vm",
        &"/p1/../x",
        &"--to",
        &d.path().join("o"),
    ]);
    assert!(e.contains("'..' is not allowed"), "{e}");
    // A link pointing far above the root stays inside the filesystem.
    let e = fails(&[&"cat", &"--store", &st, &"vm", &"/p1/escape-link"]);
    assert!(e.contains("No such file or directory"), "{e}");
    let e = fails(&[&"cat", &"--store", &st, &"vm", &"/p1/etc"]);
    assert!(e.contains("Is a directory"), "{e}");
    let e = fails(&[&"ls", &"--store", &st, &"vm", &"/p7"]);
    assert!(e.contains("this disk has p1, p2"), "{e}");
    // Damaged superblock: detected as nothing, said so.
    let e = fails(&[&"ls", &"--store", &st, &"vm", &"/p2"]);
    assert!(
        e.contains("not readable in-process") && e.contains("mount"),
        "{e}"
    );
    // A partition (here a whole disk) that is not ext4.
    let e = fails(&[&"ls", &"--store", &st, &"swap", &"/"]);
    assert!(
        e.contains("holds swap") && e.contains("not readable in-process"),
        "{e}"
    );

    // Mountpoints: not a directory, not empty, missing.
    let file = d.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = fails(&[&"mount", &"--store", &st, &"vm", &file]);
    assert!(e.contains("not a directory"), "{e}");
    let e = fails(&[&"mount", &"--store", &st, &"vm", &tree]);
    assert!(e.contains("not an empty directory"), "{e}");
    let e = fails(&[&"mount", &"--store", &st, &"vm", &d.path().join("missing")]);
    assert!(e.contains("Mountpoint"), "{e}");

    // No /dev/fuse: a private mount namespace with an empty /dev.
    let empty = d.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let unshare = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec '{}' mount --store '{}' vm '{}'",
            crate::util::recovery_cli_path().display(),
            st.display(),
            empty.display()
        ))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&unshare.stderr);
    if !err.contains("error: ") {
        crate::skip!("cannot make a mount namespace to hide /dev/fuse: {err}");
    }
    assert_eq!(unshare.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/fuse is missing"), "{err}");
}

/// `--at` picks the point in time, for every file-level command alike.
#[test]
fn files_come_from_the_point_in_time_at_names() {
    require_env!();
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let disk = d.path().join("disk.img");
    let st = d.path().join("store");
    ok(&[&"init", &st]);
    let mut between = String::new();
    for (k, text) in ["first version\n", "second version\n"].iter().enumerate() {
        fs::write(tree.join("note.txt"), text).unwrap();
        let _ = fs::remove_file(&disk);
        File::create(&disk).unwrap().set_len(8 * MIB).unwrap();
        mkfs(&disk, "ext4", "pit", &tree, 0, 8);
        ok(&[&"backup", &"--store", &st, &"--name", &"vm", &disk]);
        if k == 0 {
            // After the first point, before the second one starts.
            between = String::from_utf8(sh("date -u +%Y-%m-%dT%H:%M:%S.%6NZ"))
                .unwrap()
                .trim()
                .to_string();
        }
    }
    let cat_at = |at: &str| ok(&[&"cat", &"--store", &st, &"vm", &"/note.txt", &"--at", &at]);
    assert_eq!(cat_at(&between), b"first version\n");
    assert_eq!(cat_at("-0s"), b"second version\n");
    let out = d.path().join("out");
    ok(&[
        &"restore-files",
        &"--store",
        &st,
        &"vm",
        &"/note.txt",
        &"--to",
        &out,
        &"--at",
        &between,
    ]);
    assert_eq!(fs::read(out.join("note.txt")).unwrap(), b"first version\n");
    let e = fails(&[
        &"ls",
        &"--store",
        &st,
        &"vm",
        &"--at",
        &"2000-01-01T00:00:00Z",
    ]);
    assert!(e.contains("2000-01-01"), "{e}");
}

/// A process in another mount namespace made while we are mounted (as
/// libvirt makes for every QEMU it starts) keeps a copy of the mount, which
/// pins the FUSE connection after our unmount: `mount` must still exit on
/// SIGTERM, and the copy must not serve the snapshot any longer.
#[test]
fn mount_exits_on_sigterm_while_another_namespace_holds_a_copy() {
    require_env!();
    require_env!(fuse);
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("note.txt"), b"pinned\n").unwrap();
    let disk = d.path().join("disk.img");
    File::create(&disk).unwrap().set_len(8 * MIB).unwrap();
    mkfs(&disk, "ext4", "pin", &tree, 0, 8);
    let st = d.path().join("store");
    ok(&[&"init", &st]);
    ok(&[&"backup", &"--store", &st, &"--name", &"vm", &disk]);
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut m = Mounted::start(&st, "vm", &mnt);
    assert_eq!(fs::read(mnt.join("fs/note.txt")).unwrap(), b"pinned\n");
    // The copy: a private mount namespace that lives until killed, and
    // that says when it exists (`unshare` only runs `sh` once it does).
    let ready = d.path().join("ns-ready");
    let mut holder = KillOnDrop(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("touch '{}' && exec sleep 600", ready.display()))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Some(status) = holder.0.try_wait().unwrap() {
            crate::skip!("cannot make a mount namespace: unshare exited with {status}");
        }
        assert!(Instant::now() < deadline, "unshare did not start in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = holder.0.id();
    let copy = PathBuf::from(format!("/proc/{pid}/root{}", mnt.display()));
    assert_eq!(fs::read(copy.join("fs/note.txt")).unwrap(), b"pinned\n");
    m.stop();
    assert!(
        fs::read(copy.join("fs/note.txt")).is_err(),
        "the copy still serves the snapshot after mount exited"
    );
}

/// A child killed (and reaped) when the test ends, whichever way.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
