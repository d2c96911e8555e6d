//! Service plans (`backup|snapshots|check|forget --plan`): every disk of
//! every VM at one instant, against real QEMU.
//!
//! - Consistency (two TCG guests): the host drives a global sequence of
//!   writes over the guests' consoles, each synced in the guest before the
//!   next one starts on the other VM, while `backup --plan` runs. The
//!   recovered group point must be a consistent cut (write k present ⇒
//!   every earlier write present). Two single-VM backups one after another,
//!   with writes in between, are not: the same check catches that.
//! - Without a guest (`-M none`, QEMU's block layer written through HMP
//!   `qemu-io`): members restore to what each disk held, a missing drive is
//!   one clear line, one VM's QEMU killed mid-backup leaves no group point
//!   and the other VM running, and the next backup is complete; `check`
//!   flags a failed run and a stale RPO; `forget --plan` removes whole
//!   groups, and a member of a live group cannot be forgotten alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::qmp::Qmp;
use hypervisor::testing;
use serde_json::{json, Value};

use crate::guest::{self, require_guest, Guest, RunningGuest, BOOT_TIMEOUT};
use crate::util::{recovery_cli, recovery_cli_path};

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const CHUNK: u32 = 65536;

/// Run `recovery-cli ARGS`.
pub(crate) fn cli(args: &[&str]) -> Output {
    recovery_cli()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run recovery-cli")
}

pub(crate) fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Exit 1 and one `error:` line holding every needle.
pub(crate) fn assert_one_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<_> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(" WARN "))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
}

pub(crate) fn restore(store: &Path, snapshot: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    let s = store::Store::open(store).unwrap();
    s.restore(snapshot, out, &store::RestoreOptions::default())
        .unwrap();
}

// ---------------------------------------------------------------------
// Without a guest.

/// A `-M none` QEMU with qcow2 disks, and what each disk holds.
pub(crate) struct Vm {
    pub(crate) name: &'static str,
    pub(crate) qmp: PathBuf,
    proc: testing::Proc,
    pub(crate) disks: Vec<(&'static str, PathBuf, Vec<u8>)>,
}

const SIZE: u64 = 16 * MIB;

impl Vm {
    pub(crate) fn start(dir: &Path, name: &'static str, drives: &[&'static str]) -> Vm {
        let mut disks = Vec::new();
        let mut args = Vec::new();
        for (i, d) in drives.iter().enumerate() {
            let img = dir.join(format!("{name}-{d}.qcow2"));
            testing::qemu_img_create(&img, "qcow2", SIZE);
            let byte = 0x41 + i as u8;
            testing::qemu_io(&img, "qcow2", &[&format!("write -P {byte} 1M 4M")]);
            let mut want = vec![0u8; SIZE as usize];
            want[MIB as usize..5 * MIB as usize].fill(byte);
            args.extend(testing::blockdev_args(&img, "qcow2", d));
            disks.push((*d, img, want));
        }
        let qmp = dir.join(format!("{name}.qmp"));
        let proc = testing::qemu_none(&qmp, &args);
        Vm {
            name,
            qmp,
            proc,
            disks,
        }
    }

    /// Start QEMU again on the same disks (after a kill).
    fn restart(&mut self) {
        let mut args = Vec::new();
        for (d, img, _) in &self.disks {
            args.extend(testing::blockdev_args(img, "qcow2", d));
        }
        self.proc = testing::qemu_none(&self.qmp, &args);
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp).unwrap()
    }

    /// Write through QEMU's block layer (as a guest's write goes).
    pub(crate) fn write(&mut self, disk: usize, offset: u64, len: u64, byte: u8) {
        let (d, _, want) = &mut self.disks[disk];
        let cmd = format!("qemu-io {d} \"write -P {byte} {offset} {len}\"");
        let out = Qmp::connect(&self.qmp)
            .unwrap()
            .execute_value(
                "human-monitor-command",
                Some(json!({ "command-line": cmd })),
            )
            .unwrap();
        let out = out.as_str().unwrap_or_default();
        assert!(!out.to_ascii_lowercase().contains("error"), "{cmd}: {out}");
        want[offset as usize..(offset + len) as usize].fill(byte);
    }

    pub(crate) fn running(&self) -> bool {
        let s = self.qmp().execute_value("query-status", None).unwrap();
        s["running"] == json!(true)
    }

    /// Nothing of ours left in QEMU; one bitmap per disk at most.
    pub(crate) fn assert_clean(&self) {
        let mut q = self.qmp();
        assert!(q.query_block_exports().unwrap().is_empty());
        assert!(q.query_block_jobs().unwrap().is_empty());
        let nodes = q.query_named_block_nodes().unwrap();
        let ours: Vec<_> = nodes
            .iter()
            .filter(|n| n.node_name.starts_with("ir-"))
            .map(|n| n.node_name.clone())
            .collect();
        assert!(ours.is_empty(), "{}: {ours:?}", self.name);
        for (d, _, _) in &self.disks {
            let n = nodes.iter().find(|n| n.node_name == *d).unwrap();
            assert!(n.dirty_bitmaps.len() <= 1, "{:?}", n.dirty_bitmaps);
        }
    }
}

fn write_plan(dir: &Path, name: &str, rpo: &str, vms: &[&Vm], extra_disk: Option<&str>) -> PathBuf {
    let mut text = format!(
        "service = \"portal\"\nrpo = \"{rpo}\"\nretention = {{ keep_last = 2 }}\n\
         store = \"store\"\nscratch = \"scratch\"\n"
    );
    for vm in vms {
        let mut disks: Vec<String> = vm
            .disks
            .iter()
            .map(|(d, _, _)| format!("{{ drive = \"{d}\" }}"))
            .collect();
        if let (Some(x), "app") = (extra_disk, vm.name) {
            disks.push(format!("{{ drive = \"{x}\" }}"));
        }
        text.push_str(&format!(
            "\n[[vm]]\nname = \"{}\"\nqmp = \"{}\"\ndisks = [ {} ]\n",
            vm.name,
            vm.qmp.display(),
            disks.join(", ")
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn groups(store: &Path) -> Vec<store::group::GroupPoint> {
    store::Store::open(store).unwrap().groups("portal").unwrap()
}

/// Every member of `group` restores to what its disk holds.
fn check_group(store: &Path, group: &Value, vms: &[&Vm], dir: &Path) {
    for m in group["members"].as_array().unwrap() {
        let vm = vms.iter().find(|v| v.name == m["vm"]).unwrap();
        let (_, _, want) = vm.disks.iter().find(|d| d.0 == m["drive"]).unwrap();
        let out = dir.join("restored.img");
        restore(store, m["snapshot"].as_str().unwrap(), &out);
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "{} differs from the disk at the group point",
            m["snapshot"]
        );
    }
}

#[test]
fn plan_backup_failure_recovery_and_policy() {
    if !testing::require_qemu() {
        return;
    }
    recovery_cli_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    store::Store::init(&store, CHUNK).unwrap();
    let mut db = Vm::start(dir, "db", &["disk0"]);
    let mut app = Vm::start(dir, "app", &["disk0", "data"]);
    let plan = write_plan(dir, "portal.toml", "1h", &[&db, &app], None);
    let p = plan.to_str().unwrap();

    // A drive the VM does not have: one line naming VM, drive and plan line.
    let bad = write_plan(dir, "bad.toml", "1h", &[&db, &app], Some("nope"));
    let out = cli(&["backup", "--plan", bad.to_str().unwrap()]);
    assert_one_error(
        &out,
        &["VM app drive nope (plan line 15)", "Unknown drive \"nope\""],
    );
    db.assert_clean();
    app.assert_clean();
    assert!(db.running() && app.running());

    // `--rate auto` watches each guest's device; these disks have none
    // (`-M none`): one line naming the drive, nothing left in QEMU.
    let out = cli(&["backup", "--plan", p, "--rate", "auto"]);
    assert_one_error(&out, &["VM db drive", "attached to no device"]);
    db.assert_clean();
    app.assert_clean();

    // First group point: full, three members, one instant.
    let g1 = ok_json(&cli(&["backup", "--plan", p, "--json"]));
    assert!(g1["group"].as_str().unwrap().starts_with("portal@"), "{g1}");
    assert_eq!(g1["pause"], "stop");
    let members = g1["members"].as_array().unwrap();
    let names: Vec<&str> = members
        .iter()
        .map(|m| m["snapshot"].as_str().unwrap().split('@').next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["portal-db-disk0", "portal-app-disk0", "portal-app-data"]
    );
    for m in members {
        assert_eq!(m["mode"], "full", "{m}");
        assert!(m["blackout_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["bytes_read"].as_u64().unwrap() >= 4 * MIB, "{m}");
    }
    assert!(g1["blackout_ms"].as_f64().unwrap() > 0.0);
    check_group(&store, &g1, &[&db, &app], dir);
    db.assert_clean();
    app.assert_clean();
    assert!(db.running() && app.running());

    // Second: incremental by each disk's own bitmap (reads paced for the
    // whole service: `--rate` is taken; its pacing is tested in
    // `hypervisor`).
    db.write(0, 8 * MIB, 64 << 10, 0x51);
    app.write(1, 12 * MIB, 4096, 0x52);
    let g2 = ok_json(&cli(&["backup", "--plan", p, "--json", "--rate", "100M"]));
    for m in g2["members"].as_array().unwrap() {
        assert_eq!(m["mode"], "incremental", "{m}");
        assert!(m["bytes_read"].as_u64().unwrap() <= 64 << 10, "{m}");
    }
    check_group(&store, &g2, &[&db, &app], dir);

    // One VM's QEMU dies mid-backup (once the first scratch image exists:
    // from then until the last member is read one always does): no group
    // point, the other VM runs on, nothing left in it.
    db.write(0, 9 * MIB, 64 << 10, 0x61);
    let scratch = dir.join("scratch");
    let mut child = recovery_cli()
        .args(["backup", "--plan", p, "--full"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleeces = std::fs::read_dir(&scratch)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".fleece.qcow2"))
                    .count()
            })
            .unwrap_or(0);
        if fleeces >= 1 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the backup ended ({status}) before a scratch image appeared: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "no scratch image appeared");
        std::thread::sleep(Duration::from_micros(200));
    }
    app.proc.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("VM app"), "{err}");
    assert_eq!(
        groups(&store).len(),
        2,
        "a group point was published: {err}"
    );
    assert!(db.running(), "the other VM must keep running");
    db.assert_clean();
    // The member snapshot of the failed group is not left behind.
    let s = store::Store::open(&store).unwrap();
    assert_eq!(s.snapshots(Some("portal-db-disk0")).unwrap().len(), 2);
    drop(s);
    // check: the last run failed.
    let out = cli(&["check", "--plan", p]);
    assert_one_error(&out, &["The last run", "failed", "VM app"]);

    // QEMU back: the next backup is complete, and db's incremental holds
    // the change made before the failed run.
    app.restart();
    let g3 = ok_json(&cli(&["backup", "--plan", p, "--json"]));
    let modes: Vec<&str> = g3["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes[0], "incremental", "{g3}");
    check_group(&store, &g3, &[&db, &app], dir);
    let c = ok_json(&cli(&["check", "--plan", p, "--json"]));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["newest"], g3["group"]);

    // snapshots --plan lists the three group points; --at picks one.
    let list = ok_json(&cli(&["snapshots", "--plan", p, "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 3);
    let at = g2["instant"].as_str().unwrap();
    let picked = ok_json(&cli(&["snapshots", "--plan", p, "--at", at, "--json"]));
    assert_eq!(picked[0]["group"], g2["group"]);

    // A member of a live group cannot be forgotten alone.
    let member = g1["members"][0]["snapshot"].as_str().unwrap();
    let out = cli(&["forget", "--store", store.to_str().unwrap(), member]);
    assert_one_error(&out, &["member of group point", "forget --plan"]);

    // Retention keep_last = 2: the dry run changes nothing, then g1 goes
    // as a whole.
    let d = ok_json(&cli(&["forget", "--plan", p, "--dry-run", "--json"]));
    let keep: Vec<bool> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["keep"].as_bool().unwrap())
        .collect();
    assert_eq!(keep, [true, true, false]);
    assert_eq!(groups(&store).len(), 3);
    ok_json(&cli(&["forget", "--plan", p, "--json"]));
    let left: Vec<String> = groups(&store).iter().map(|g| g.reference()).collect();
    assert_eq!(
        left,
        [g2["group"].as_str().unwrap(), g3["group"].as_str().unwrap()]
    );
    let s = store::Store::open(&store).unwrap();
    for m in g1["members"].as_array().unwrap() {
        assert!(s.resolve(m["snapshot"].as_str().unwrap()).is_err(), "{m}");
    }
    for m in g2["members"].as_array().unwrap() {
        s.resolve(m["snapshot"].as_str().unwrap()).unwrap();
    }
    drop(s);

    // Image retention never splits a group: members of live groups stay.
    let r = ok_json(&cli(&[
        "forget",
        "--store",
        store.to_str().unwrap(),
        "portal-db-disk0",
        "--keep-last",
        "1",
        "--json",
    ]));
    assert!(r["remove"].as_array().unwrap().is_empty(), "{r}");
    assert!(
        r["keep"][1]["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("member of group point portal@"),
        "{r}"
    );

    // A stale RPO: with rpo = 1s, check fails once the newest point ages.
    let stale = write_plan(dir, "stale.toml", "1s", &[&db, &app], None);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cli(&["check", "--plan", stale.to_str().unwrap()]);
        if out.status.code() == Some(1) {
            assert_one_error(&out, &["RPO violated", g3["group"].as_str().unwrap()]);
            break;
        }
        assert!(out.status.success());
        assert!(Instant::now() < deadline, "check never flagged the RPO");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------
// Two guests and a cross-VM write protocol.

/// The guests' `/sbin/init`: on `w K` write `/seq/w-K`, sync, say
/// `WROTE K`.
const SEQ_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
stty -echo 2>/dev/null
mkdir -p /seq
sync
echo "SEQ-READY"
while read -r cmd k; do
    case "$cmd" in
    w) echo "$k" >"/seq/w-$k"; sync; echo "WROTE $k" ;;
    q) break ;;
    esac
done
sync
echo "GUEST-DONE"
poweroff -f
"#;

/// A qcow2 copy of the guest root with [`SEQ_INIT`].
fn seq_disk(guest: &Guest, dir: &Path, name: &str) -> PathBuf {
    let raw = seq_raw(guest, dir, name);
    let disk = dir.join(format!("{name}.qcow2"));
    testing::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
    );
    std::fs::remove_file(&raw).unwrap();
    disk
}

/// A raw copy of the guest root with [`SEQ_INIT`], `dir/NAME.raw`.
pub(crate) fn seq_raw(guest: &Guest, dir: &Path, name: &str) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::copy(&guest.root_img, &raw).unwrap();
    let init = dir.join("seq-init");
    std::fs::write(&init, SEQ_INIT).unwrap();
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(
        &cmds,
        format!(
            "rm /sbin/init\nwrite {} /sbin/init\nsif /sbin/init mode 0100755\n",
            init.display()
        ),
    )
    .unwrap();
    testing::run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&raw),
    );
    raw
}

fn seq_guest_cmd(guest: &Guest, disk: &Path, qmp: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-machine", "q35"])
        .args(["-m", "192", "-smp", "1"])
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

/// Drives writes 1, 2, 3, … round-robin over the guests, each one synced
/// before the next starts, until `stop`; `done` counts finished writes.
pub(crate) struct Writer {
    stop: Arc<AtomicBool>,
    pub(crate) done: Arc<AtomicU32>,
    thread: std::thread::JoinHandle<Vec<RunningGuest>>,
}

impl Writer {
    pub(crate) fn start(vms: Vec<RunningGuest>) -> Writer {
        Self::start_from(vms, 1)
    }

    /// [`Writer::start`] with write `first` (earlier ones were done).
    pub(crate) fn start_from(mut vms: Vec<RunningGuest>, first: u32) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU32::new(first - 1));
        let (s, d) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut k = first;
            while !s.load(Ordering::Relaxed) {
                let n = vms.len();
                let vm = &mut vms[(k as usize - 1) % n];
                vm.send_line(&format!("w {k}"));
                assert!(
                    vm.wait_for(&format!("WROTE {k}"), BOOT_TIMEOUT).is_some(),
                    "write {k}: {}",
                    vm.console()
                );
                d.store(k, Ordering::SeqCst);
                k += 1;
            }
            vms
        });
        Writer { stop, done, thread }
    }

    /// Wait until `n` writes are done.
    pub(crate) fn wait_done(&self, n: u32) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while self.done.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "writes stalled at {}",
                self.done.load(Ordering::SeqCst)
            );
            assert!(!self.thread.is_finished(), "the writer stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn finish(self) -> Vec<RunningGuest> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer")
    }
}

/// The writes `/seq/w-K` in a restored disk (journal replayed first).
pub(crate) fn writes_in(store: &Path, snapshot: &str, dir: &Path) -> BTreeSet<u32> {
    let img = dir.join("cut.img");
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
    let out = Command::new("debugfs")
        .args(["-R", "ls -p /seq"])
        .arg(&img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5)?.strip_prefix("w-")?.parse().ok())
        .collect()
}

/// A consistent cut: the writes present form a prefix 1..=n of the global
/// order (write k present ⇒ every earlier write present on its VM).
pub(crate) fn consistent_cut(present: &BTreeSet<u32>) -> Result<u32, String> {
    let n = present.iter().next_back().copied().unwrap_or(0);
    let missing: Vec<u32> = (1..n).filter(|k| !present.contains(k)).collect();
    if missing.is_empty() {
        Ok(n)
    } else {
        Err(format!(
            "write {n} is present but earlier writes {missing:?} are not"
        ))
    }
}

#[test]
fn group_point_of_two_guests_is_a_consistent_cut() {
    let guest = require_guest!();
    recovery_cli_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    store::Store::init(&store, CHUNK).unwrap();
    let mut vms = Vec::new();
    let mut qmps = Vec::new();
    for name in ["a", "b"] {
        let disk = seq_disk(&guest, dir, name);
        let qmp = dir.join(format!("{name}.qmp"));
        let vm = RunningGuest::spawn(seq_guest_cmd(&guest, &disk, &qmp));
        qmps.push(qmp);
        vms.push(vm);
    }
    wait_seq_ready(&vms);
    let plan = dir.join("pair.toml");
    std::fs::write(
        &plan,
        format!(
            "service = \"pair\"\nrpo = \"1h\"\nstore = \"store\"\nscratch = \"scratch\"\n\
             [[vm]]\nname = \"a\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\n\
             [[vm]]\nname = \"b\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\n",
            qmps[0].display(),
            qmps[1].display()
        ),
    )
    .unwrap();

    // The group point, taken while the writes go on.
    let writer = Writer::start(vms);
    writer.wait_done(4);
    // Each VM's reads paced by its own guest's latency.
    let g = ok_json(&cli(&[
        "backup",
        "--plan",
        plan.to_str().unwrap(),
        "--json",
        "--rate",
        "auto",
    ]));
    for m in g["members"].as_array().unwrap() {
        assert_eq!(m["pacing"]["error"], serde_json::Value::Null, "{m}");
    }
    let after = writer.done.load(Ordering::SeqCst);
    writer.wait_done(after + 2);
    let mut present = BTreeSet::new();
    for m in g["members"].as_array().unwrap() {
        present.extend(writes_in(&store, m["snapshot"].as_str().unwrap(), dir));
    }
    let n = consistent_cut(&present).unwrap_or_else(|e| panic!("group point {}: {e}", g["group"]));
    assert!(
        n >= 4,
        "the cut holds {n} writes, at least 4 were done before"
    );
    eprintln!(
        "group point {}: writes 1..={n} of {after}+ present, blackout {:.1} ms",
        g["group"], g["blackout_ms"]
    );

    // Disk by disk (a, writes, then b) is not a consistent cut.
    let single = |name: &str, qmp: &Path| {
        ok_json(&cli(&[
            "backup",
            "--store",
            store.to_str().unwrap(),
            "--name",
            name,
            "--qmp",
            qmp.to_str().unwrap(),
            "--drive",
            "disk0",
            "--scratch",
            dir.join("scratch").to_str().unwrap(),
            "--json",
        ]))
    };
    let a = single("one-by-one-a", &qmps[0]);
    // Writes after a's backup ended: among three in a row, one on a is
    // followed by one on b.
    writer.wait_done(writer.done.load(Ordering::SeqCst) + 3);
    let b = single("one-by-one-b", &qmps[1]);
    let mut present = writes_in(&store, a["snapshot"].as_str().unwrap(), dir);
    present.extend(writes_in(&store, b["snapshot"].as_str().unwrap(), dir));
    assert!(
        consistent_cut(&present).is_err(),
        "disks captured one after another gave a consistent cut: {present:?}"
    );

    quit_seq_guests(writer.finish());
}

/// Waits until every guest's [`SEQ_INIT`] is ready for writes.
pub(crate) fn wait_seq_ready(vms: &[RunningGuest]) {
    for vm in vms {
        assert!(
            vm.wait_for("SEQ-READY", BOOT_TIMEOUT).is_some(),
            "{}",
            vm.console()
        );
    }
}

/// Tells every [`SEQ_INIT`] guest to power off, and checks it did.
pub(crate) fn quit_seq_guests(mut vms: Vec<RunningGuest>) {
    for vm in &mut vms {
        vm.send_line("q");
    }
    for vm in vms {
        let out = vm.finish(BOOT_TIMEOUT);
        assert!(out.guest_done(), "{out:?}");
    }
}

#[test]
fn protect_takes_points_applies_retention_and_stops_on_sigterm() {
    if !testing::require_qemu() {
        return;
    }
    recovery_cli_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    store::Store::init(&store, CHUNK).unwrap();
    let db = Vm::start(dir, "db", &["disk0"]);
    let app = Vm::start(dir, "app", &["disk0"]);
    let plan = write_plan(dir, "portal.toml", "2s", &[&db, &app], None);
    let p = plan.to_str().unwrap();

    // Three points one second apart (rpo/2); keep_last = 2 after each.
    let out = cli(&["protect", "--plan", p, "--points", "3", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let points: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(points.len(), 3, "{text}");
    for (i, pt) in points.iter().enumerate() {
        assert_eq!(pt["point"], i as u64 + 1);
        assert!(
            pt["report"]["group"]
                .as_str()
                .unwrap()
                .starts_with("portal@"),
            "{pt}"
        );
    }
    assert_eq!(points[2]["forgotten"][0], points[0]["report"]["group"]);
    let left: Vec<String> = groups(&store).iter().map(|g| g.reference()).collect();
    assert_eq!(
        left,
        [
            points[1]["report"]["group"].as_str().unwrap(),
            points[2]["report"]["group"].as_str().unwrap()
        ]
    );
    assert!(text.contains("stopped: 3 point(s), 0 failed"), "{text}");

    // SIGTERM while it waits: a clean exit, no half point, QEMU clean.
    let sock = dir.join("protect.sock");
    let mut child = recovery_cli()
        .args(["protect", "--plan", p, "--control"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while groups(&store).len() < 3 {
        assert!(Instant::now() < deadline, "protect took no point");
        assert!(child.try_wait().unwrap().is_none(), "protect exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The control socket: metrics with the RPO and the last point.
    let metrics = control::client::fetch_metrics(&sock).unwrap();
    assert!(
        metrics.contains("instant_recovery_service_rpo_seconds{service=\"portal\"} "),
        "{metrics}"
    );
    assert!(
        metrics.contains("instant_recovery_service_failures_total{service=\"portal\"} 0\n"),
        "{metrics}"
    );
    let rc = send_signal(child.id(), "TERM");
    assert!(rc, "kill -TERM");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stopped:"), "{text}");
    assert!(!sock.exists(), "the control socket is removed on exit");
    for vm in [&db, &app] {
        vm.assert_clean();
        assert!(vm.running());
    }
    // Every group point is whole.
    let s = store::Store::open(&store).unwrap();
    for g in s.groups("portal").unwrap() {
        assert_eq!(g.members.len(), 2);
        for m in &g.members {
            s.resolve(&m.snapshot).unwrap();
        }
    }
}

/// `kill -SIG PID`.
fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}
