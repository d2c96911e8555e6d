//! `recovery-cli backup --qmp`: live backups of running QEMU VMs.
//!
//! - A real guest (TCG) boots from a qcow2 disk and writes numbered,
//!   fsynced files (`guestmode=files`) while we take a full and an
//!   incremental backup; each restored snapshot passes e2fsck after journal
//!   replay and holds every file the guest had synced before the backup.
//! - Without a guest (`-M none`, real QEMU block layer): SIGKILL of
//!   recovery-cli mid-backup, then the next backup clears the leftovers and
//!   holds every change; bad inputs give one clear line and leave nothing.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use hypervisor::qmp::Qmp;
use hypervisor::testing;
use serde_json::{json, Value};

use crate::guest::{self, require_guest, Guest, RunningGuest, BOOT_TIMEOUT, GUEST_MEM_MIB};
use crate::util::{recovery_cli, recovery_cli_path};

const CHUNK: u32 = 65536;

/// QEMU running `guest` from the qcow2 `disk` (node `disk0`) with a QMP
/// socket.
fn guest_cmd(guest: &Guest, disk: &Path, qmp: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-machine", "q35"])
        .args(["-m", &GUEST_MEM_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline])
        .args(testing::blockdev_args(disk, "qcow2", "disk0"))
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    cmd
}

/// `recovery-cli backup --qmp … --json` plus `extra` arguments.
fn live_backup(store: &Path, qmp: &Path, scratch: &Path, extra: &[&str]) -> Output {
    recovery_cli()
        .args(["backup", "--name", "vm", "--drive", "disk0", "--json"])
        .arg("--store")
        .arg(store)
        .arg("--qmp")
        .arg(qmp)
        .arg("--scratch")
        .arg(scratch)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run recovery-cli")
}

pub(crate) fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// A failed run: exit code 1 and one `error:` line naming `needle`.
fn assert_clear_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err}");
}

pub(crate) fn init_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    store::Store::init(&store, CHUNK).unwrap();
    store
}

/// Restore `snapshot` into `dir/name`.
fn restore(store: &Path, snapshot: &str, out: &Path) {
    let s = store::Store::open(store).unwrap();
    s.restore(snapshot, out, &store::RestoreOptions::default())
        .unwrap();
}

/// No export, job, scratch node or foreign bitmap of ours is left.
fn assert_no_leftovers(q: &mut Qmp) {
    assert!(q.query_block_exports().unwrap().is_empty());
    assert!(q.query_block_jobs().unwrap().is_empty());
    let nodes = q.query_named_block_nodes().unwrap();
    let ours: Vec<_> = nodes
        .iter()
        .filter(|n| n.node_name.starts_with("ir-"))
        .map(|n| n.node_name.clone())
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
    let disk = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
    let bitmaps: Vec<_> = disk.dirty_bitmaps.iter().map(|b| &b.name).collect();
    assert!(bitmaps.len() <= 1, "{bitmaps:?}");
}

/// `FILE <i> <sha256>` lines of the console so far. Only whole lines count:
/// the guest may be printing the last one while the host reads the log, and a
/// half-written digest is not the file's.
pub(crate) fn files(console: &str) -> Vec<(u32, String)> {
    let whole = match console.rfind('\n') {
        Some(end) => &console[..end],
        None => "",
    };
    whole
        .lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("FILE ")?.split_whitespace();
            let i = w.next()?.parse().ok()?;
            let sha = w.next()?;
            let digest = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
            digest.then(|| (i, sha.to_owned()))
        })
        .collect()
}

/// Restore `snapshot`, replay its journal (`e2fsck -fy`), check it is clean
/// and holds every file of `synced` with its content.
pub(crate) fn check_snapshot(store: &Path, snapshot: &str, synced: &[(u32, String)], dir: &Path) {
    let img = dir.join("check.img");
    let _ = std::fs::remove_file(&img);
    restore(store, snapshot, &img);
    let replay = Command::new("e2fsck")
        .arg("-fy")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        replay.status.code().is_some_and(|c| c <= 1),
        "e2fsck -fy {snapshot}: {}",
        String::from_utf8_lossy(&replay.stdout)
    );
    guest::e2fsck(&img).unwrap_or_else(|e| panic!("{snapshot}: {e}"));
    let scratch = dir.join("file.out");
    for (i, sha) in synced {
        let got = guest::guest_file_digest(&img, &format!("/files/f-{i}"), &scratch);
        assert_eq!(
            got,
            Some((16384, sha.clone())),
            "{snapshot}: /files/f-{i} (synced before the backup) is missing or differs"
        );
    }
}

#[test]
fn running_guest_full_then_incremental() {
    let guest = require_guest!().with_kernel_args("guestmode=files");
    // Build the CLI first: the guest fills its disk if it waits long.
    recovery_cli_path();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    testing::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&guest.root_img)
            .arg(&disk),
    );
    let store = init_store(dir.path());
    let qmp = dir.path().join("qmp.sock");
    let mut vm = RunningGuest::spawn(guest_cmd(&guest, &disk, &qmp));
    assert!(
        vm.wait_for("FILE 3 ", BOOT_TIMEOUT).is_some(),
        "{}",
        vm.console()
    );

    let before1 = files(&vm.console());
    // Paced by the guest's latency: the counters of its device (found by
    // the drive's node) read through query-blockstats.
    let r1 = report(&live_backup(&store, &qmp, dir.path(), &["--rate", "auto"]));
    assert_eq!(r1["mode"], "full", "{r1}");
    assert_eq!(r1["pacing"]["error"], Value::Null, "{r1}");
    assert!(r1["reason"]
        .as_str()
        .unwrap()
        .contains("no earlier snapshot"));
    let size = r1["image_size"].as_u64().unwrap();
    assert_eq!(size, 64 << 20);

    let n = before1.len() as u32;
    let more = format!("FILE {} ", n + 5);
    assert!(
        vm.wait_for(&more, BOOT_TIMEOUT).is_some(),
        "{}",
        vm.console()
    );
    let before2 = files(&vm.console());
    let r2 = report(&live_backup(&store, &qmp, dir.path(), &[]));
    assert_eq!(r2["mode"], "incremental", "{r2}");
    assert_eq!(r2["reason"], Value::Null);
    assert!(r2.get("pacing").is_none(), "{r2}");
    let (read, dirty) = (
        r2["bytes_read"].as_u64().unwrap(),
        r2["dirty_bytes"].as_u64().unwrap(),
    );
    assert!(read > 0 && read <= dirty, "{r2}");
    assert!(read < size / 4, "incremental read {read} of {size}: {r2}");
    // The guest's scattered 4 KiB writes dirty chunks in part: stored as
    // patches of their dirty grains (restored and checked below).
    assert!(r2["chunks_patch"].as_u64().unwrap() > 0, "{r2}");
    assert_eq!(r1["chunks_patch"], 0, "{r1}");
    for r in [&r1, &r2] {
        for k in [
            "snapshot",
            "image_size",
            "bytes_read",
            "dirty_bytes",
            "bytes_new",
            "chunks_total",
            "chunks_new",
            "blackout_ms",
            "seconds",
        ] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
    }

    // The guest kept writing through both backups.
    let after = format!("FILE {} ", before2.len() + 2);
    assert!(
        vm.wait_for(&after, BOOT_TIMEOUT).is_some(),
        "{}",
        vm.console()
    );
    assert_no_leftovers(&mut Qmp::connect(&qmp).unwrap());
    vm.send_line("stop");
    let out = vm.finish(BOOT_TIMEOUT);
    assert!(out.guest_done(), "{out}");

    check_snapshot(
        &store,
        r1["snapshot"].as_str().unwrap(),
        &before1,
        dir.path(),
    );
    check_snapshot(
        &store,
        r2["snapshot"].as_str().unwrap(),
        &before2,
        dir.path(),
    );
}

/// `-M none` QEMU with a 96 MiB qcow2 `disk0` holding 64 MiB of data and
/// two QMP sockets (one for recovery-cli, one for the test).
struct Bare {
    dir: tempfile::TempDir,
    store: PathBuf,
    qmp: PathBuf,
    ctl: PathBuf,
    _proc: testing::Proc,
    want: Vec<u8>,
}

impl Bare {
    fn start() -> Option<Bare> {
        if !testing::require_qemu() {
            return None;
        }
        recovery_cli_path();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        testing::qemu_img_create(&img, "qcow2", 96 << 20);
        let mut cmds = Vec::new();
        let mut want = vec![0u8; 96 << 20];
        for i in 0..64u64 {
            let b = (i % 200 + 20) as u8;
            cmds.push(format!("write -P {b} {}M 1M", i + 16));
            want[((i + 16) << 20) as usize..((i + 17) << 20) as usize].fill(b);
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        testing::qemu_io(&img, "qcow2", &refs);
        let store = init_store(dir.path());
        let qmp = dir.path().join("qmp.sock");
        let ctl = dir.path().join("ctl.sock");
        let mut args = testing::blockdev_args(&img, "qcow2", "disk0");
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", ctl.display()));
        let proc = testing::qemu_none(&qmp, &args);
        Some(Bare {
            dir,
            store,
            qmp,
            ctl,
            _proc: proc,
            want,
        })
    }

    fn ctl(&self) -> Qmp {
        let deadline = Instant::now() + testing::START_TIMEOUT;
        loop {
            match Qmp::connect(&self.ctl) {
                Ok(q) => return q,
                Err(e) => assert!(Instant::now() < deadline, "control QMP: {e}"),
            }
        }
    }

    /// Write through `node` (the copy-before-write filter while a fleece
    /// runs, as a guest's writes would go).
    fn write(&mut self, q: &mut Qmp, node: &str, offset: u64, len: u64, byte: u8) {
        let cmd = format!("qemu-io {node} \"write -P {byte} {offset} {len}\"");
        let out = q
            .execute_value(
                "human-monitor-command",
                Some(json!({ "command-line": cmd })),
            )
            .unwrap();
        assert!(!out.as_str().unwrap_or_default().contains("rror"), "{out}");
        self.want[offset as usize..(offset + len) as usize].fill(byte);
    }

    fn check(&self, snapshot: &str) {
        let out = self.dir.path().join("restored.img");
        let _ = std::fs::remove_file(&out);
        restore(&self.store, snapshot, &out);
        let got = std::fs::read(&out).unwrap();
        assert!(got == self.want, "{snapshot} differs from the disk");
    }

    fn backup(&self, extra: &[&str]) -> Output {
        live_backup(&self.store, &self.qmp, self.dir.path(), extra)
    }
}

#[test]
fn sigkill_mid_backup_then_the_next_backup_has_every_change() {
    let Some(mut vm) = Bare::start() else {
        return;
    };
    let r1 = report(&vm.backup(&[]));
    let mut q = vm.ctl();
    vm.write(&mut q, "disk0", 20 << 20, 65536, 0xa1);

    // Kill recovery-cli as soon as its NBD export exists (its reads paced
    // at 1 MiB/s, so it surely still runs then).
    let mut child = recovery_cli()
        .args(["backup", "--name", "vm", "--drive", "disk0", "--full"])
        .args(["--rate", "1M"])
        .arg("--store")
        .arg(&vm.store)
        .arg("--qmp")
        .arg(&vm.qmp)
        .arg("--scratch")
        .arg(vm.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + testing::START_TIMEOUT;
    while q.query_block_exports().unwrap().is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup ended before the kill"
        );
        assert!(Instant::now() < deadline, "no export appeared");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let nodes = q.query_named_block_nodes().unwrap();
    let filter = nodes
        .iter()
        .find(|n| n.node_name.contains("-cbw-"))
        .map(|n| n.node_name.clone())
        .expect("the killed run's fleece is still in place");
    // The guest keeps writing meanwhile.
    vm.write(&mut q, &filter, 40 << 20, 131072, 0xa2);

    let r2 = report(&vm.backup(&[]));
    assert_eq!(r2["mode"], "incremental", "{r2}");
    assert!(
        !r2["leftovers_cleared"].as_array().unwrap().is_empty(),
        "{r2}"
    );
    assert_eq!(r2["bytes_read"], 3 * 65536, "{r2}");
    assert_eq!(
        r2["parent"],
        r1["snapshot"].as_str().unwrap().split('@').nth(1).unwrap()
    );
    assert_no_leftovers(&mut q);
    vm.check(r2["snapshot"].as_str().unwrap());
}

#[test]
fn bad_inputs_give_one_clear_line_and_leave_nothing() {
    let Some(mut vm) = Bare::start() else {
        return;
    };
    let dir = vm.dir.path().to_path_buf();
    let store = vm.store.clone();

    let out = live_backup(&store, &dir.join("missing.sock"), &dir, &[]);
    assert_clear_error(&out, "missing.sock");

    let other = dir.join("other.sock");
    let l = UnixListener::bind(&other).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut s, b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    });
    assert_clear_error(
        &live_backup(&store, &other, &dir, &[]),
        "is not a QEMU QMP socket",
    );
    t.join().unwrap();

    let mut q = vm.ctl();
    let out = recovery_cli()
        .args(["backup", "--name", "vm", "--drive", "nope", "--json"])
        .arg("--store")
        .arg(&store)
        .arg("--qmp")
        .arg(&vm.qmp)
        .arg("--scratch")
        .arg(&dir)
        .output()
        .unwrap();
    assert_clear_error(&out, "Unknown drive \"nope\"");
    assert_no_leftovers(&mut q);
    // A usage error (clap's: status 2), before anything touches QEMU.
    let out = live_backup(&store, &vm.qmp, &dir, &["--rate", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .next()
            .unwrap_or_default()
            .contains("invalid rate \"fast\""),
        "{err}"
    );

    {
        // Someone else holds the QMP socket.
        let _held = Qmp::connect(&vm.qmp).unwrap();
        assert_clear_error(&vm.backup(&[]), "in use by another client");
    }

    // A scratch directory without space: clean failure, guest unaffected.
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        let out = live_backup(&store, &vm.qmp, &small, &[]);
        let _ = Command::new("umount").arg(&small).status();
        assert_clear_error(&out, "Scratch directory");
        assert_no_leftovers(&mut q);
    } else if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
        panic!("cannot mount a small tmpfs for the scratch-space case");
    } else {
        eprintln!("!!! SKIPPING the scratch-space case: cannot mount a tmpfs here");
    }

    // After all that, a backup is complete and the disk still works.
    vm.write(&mut q, "disk0", 0, 65536, 0x77);
    let r = report(&vm.backup(&[]));
    assert_eq!(r["mode"], "full", "{r}");
    vm.check(r["snapshot"].as_str().unwrap());
    assert_no_leftovers(&mut q);
}

#[test]
fn damaged_parent_manifest_gives_a_full_backup_with_the_reason() {
    let Some(mut vm) = Bare::start() else {
        return;
    };
    let r1 = report(&vm.backup(&[]));
    let mut q = vm.ctl();
    vm.write(&mut q, "disk0", 8 << 20, 65536, 0xb1);
    // The parent's manifest damaged after its header: its chunk ids are
    // not to be trusted, so nothing may be reused from it.
    let id = r1["snapshot"].as_str().unwrap().split('@').nth(1).unwrap();
    let manifest = vm.store.join(format!("snapshots/vm/{id}.snap"));
    let mut bytes = std::fs::read(&manifest).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 16..] {
        *b ^= 0xff;
    }
    std::fs::write(&manifest, bytes).unwrap();

    let r2 = report(&vm.backup(&[]));
    assert_eq!(r2["mode"], "full", "{r2}");
    assert!(
        r2["reason"].as_str().unwrap().contains("cannot be read"),
        "{r2}"
    );
    assert_no_leftovers(&mut q);
    vm.check(r2["snapshot"].as_str().unwrap());
    // The bitmap the full backup started tracks the next incremental.
    vm.write(&mut q, "disk0", 30 << 20, 4096, 0xb2);
    let r3 = report(&vm.backup(&[]));
    assert_eq!(r3["mode"], "incremental", "{r3}");
    vm.check(r3["snapshot"].as_str().unwrap());
}
