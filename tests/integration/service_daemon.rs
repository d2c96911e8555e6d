//! Services on our daemon (issue 15): where a service's VMs boot from our
//! daemons (`serve --disk` with protection), `backup --plan` takes the
//! group point from the daemons' protection points, cut on demand while
//! the guests are held still, in one window with a fleeced disk of a third
//! VM.
//!
//! - Two TCG guests boot from `serve` daemons (QEMU's vhost-user chardev
//!   reconnects) and run the cross-VM write protocol of
//!   `service.rs`; a third QEMU (`-M none`) has a qcow2 disk the backup
//!   fleeces. The group point's guest members are the daemons' points
//!   (ordinary snapshots: they restore) and form a consistent cut; the
//!   fleeced member restores to what its disk holds.
//! - A plan whose member names differ from the daemons' point names is one
//!   clear error before anything is paused.
//! - One daemon killed: no group point, every VM running; the daemon
//!   restarted on its state, the guest's disk comes back, and the next
//!   group point is complete (it holds every write done before it); one
//!   more, with nothing written, has members of its own.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::qmp::Qmp;
use serde_json::Value;

use crate::guest::{require_guest, RunningGuest, BOOT_TIMEOUT};
use crate::service::{
    assert_one_error, cli, consistent_cut, ok_json, quit_seq_guests, restore, seq_raw,
    wait_seq_ready, writes_in, Vm, Writer, CHUNK,
};
use crate::util::{recovery_cli, recovery_cli_path};

/// A `serve --disk` daemon with protection; SIGKILL on drop.
struct Served {
    child: Option<Child>,
    args: Vec<String>,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, store: &Path, disk: &Path, name: &str) -> Served {
        let path = |p: PathBuf| p.to_str().unwrap().to_owned();
        let socket = dir.join(format!("{name}.sock"));
        let control = dir.join(format!("{name}.control"));
        let args = vec![
            "serve".into(),
            "--store".into(),
            path(store.to_path_buf()),
            "--disk".into(),
            path(disk.to_path_buf()),
            "--name".into(),
            name.into(),
            "--protect-every".into(),
            "3s".into(),
            "--queues".into(),
            "1".into(),
            "--socket".into(),
            path(socket.clone()),
            "--state".into(),
            path(dir.join(format!("{name}.state"))),
            "--control".into(),
            path(control.clone()),
        ];
        let mut s = Served {
            child: None,
            args,
            socket,
            control,
            log: dir.join(format!("{name}.log")),
        };
        s.spawn();
        s
    }

    /// Starts the daemon (again) and waits until it answers status.
    fn spawn(&mut self) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(file, "--- {:?}", self.args).unwrap();
        let child = recovery_cli()
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn recovery-cli serve");
        self.child = Some(child);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while control::fetch_status(&self.control).is_err() {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("serve exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "serve never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self.socket.exists(), "no vhost-user socket");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Points written under `name` into `store`.
    fn points(store: &Path, name: &str) -> Vec<String> {
        store::Store::open(store)
            .unwrap()
            .snapshots(Some(name))
            .unwrap()
            .iter()
            .map(|s| s.reference())
            .collect()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running(qmp: &Path) -> bool {
    let s = Qmp::connect(qmp)
        .unwrap()
        .execute_value("query-status", None)
        .unwrap();
    s["running"] == Value::Bool(true)
}

fn plan_text(service: &str, guests: &[(&str, &Path, &Path)], fleeced: &Vm) -> String {
    let mut text = format!(
        "service = \"{service}\"\nrpo = \"1h\"\nstore = \"store\"\nscratch = \"scratch\"\n"
    );
    for (name, qmp, daemon) in guests {
        text.push_str(&format!(
            "\n[[vm]]\nname = \"{name}\"\nqmp = \"{}\"\n\
             disks = [ {{ drive = \"disk0\", daemon = \"{}\" }} ]\n",
            qmp.display(),
            daemon.display()
        ));
    }
    text.push_str(&format!(
        "\n[[vm]]\nname = \"{}\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\n",
        fleeced.name,
        fleeced.qmp.display()
    ));
    text
}

/// The writes held by the guest members of `group`.
fn guest_writes(store: &Path, group: &Value, dir: &Path) -> std::collections::BTreeSet<u32> {
    let mut present = std::collections::BTreeSet::new();
    for m in group["members"].as_array().unwrap() {
        if m["mode"] == "daemon" {
            present.extend(writes_in(store, m["snapshot"].as_str().unwrap(), dir));
        }
    }
    present
}

#[test]
fn group_point_from_daemon_points_is_a_consistent_cut_and_survives_a_killed_daemon() {
    let guest = require_guest!();
    recovery_cli_path();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = dir.join("store");
    store::Store::init(&store, CHUNK).unwrap();

    // Two guests on our daemons, a third QEMU whose disk is fleeced.
    let mut daemons = Vec::new();
    let mut vms = Vec::new();
    let mut qmps = Vec::new();
    for name in ["a", "b"] {
        let raw = seq_raw(&guest, dir, name);
        let d = Served::start(dir, &store, &raw, &format!("pair-{name}-disk0"));
        let qmp = dir.join(format!("{name}.qmp"));
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
        vms.push(RunningGuest::spawn(
            guest.qemu_vhost_user_reconnect_cmd(&d.socket, &["-qmp", &qmp_arg]),
        ));
        qmps.push(qmp);
        daemons.push(d);
    }
    let mut c = Vm::start(dir, "c", &["disk0"]);
    wait_seq_ready(&vms);
    let guests: Vec<(&str, &Path, &Path)> = vec![
        ("a", &qmps[0], &daemons[0].control),
        ("b", &qmps[1], &daemons[1].control),
    ];
    let plan = dir.join("pair.toml");
    std::fs::write(&plan, plan_text("pair", &guests, &c)).unwrap();
    let p = plan.to_str().unwrap();

    // Member names the daemons do not write: one line, nothing paused.
    let other = dir.join("other.toml");
    std::fs::write(&other, plan_text("other", &guests, &c)).unwrap();
    let out = cli(&["backup", "--plan", other.to_str().unwrap()]);
    assert_one_error(
        &out,
        &[
            "VM a drive disk0 (plan line 9)",
            "writes its points as pair-a-disk0",
            "--protect-name other-a-disk0",
        ],
    );

    // The group point, taken while the writes go on.
    let writer = Writer::start(vms);
    writer.wait_done(4);
    c.write(0, 6 << 20, 64 << 10, 0x77);
    let g = ok_json(&cli(&["backup", "--plan", p, "--json"]));
    let after = writer.done.load(Ordering::SeqCst);
    writer.wait_done(after + 2);
    assert_eq!(g["pause"], "stop", "{g}");
    let members = g["members"].as_array().unwrap();
    let modes: Vec<&str> = members
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["daemon", "daemon", "full"], "{g}");
    for (m, name) in members.iter().zip(["pair-a-disk0", "pair-b-disk0"]) {
        let snapshot = m["snapshot"].as_str().unwrap();
        assert!(
            Served::points(&store, name).iter().any(|s| s == snapshot),
            "{snapshot} is not a point of {name}"
        );
        assert!(m["daemon"].as_str().unwrap().ends_with(".control"), "{m}");
    }
    // The group record names the daemons' points.
    let recorded = store::Store::open(&store).unwrap().groups("pair").unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].members[0].snapshot, members[0]["snapshot"]);
    let present = guest_writes(&store, &g, dir);
    let n = consistent_cut(&present).unwrap_or_else(|e| panic!("group point {}: {e}", g["group"]));
    assert!(
        n >= 4,
        "the cut holds {n} writes, at least 4 were done before"
    );
    eprintln!(
        "group point {} from daemon points: writes 1..={n} of {after}+ present, blackout {:.1} ms",
        g["group"], g["blackout_ms"]
    );
    let restored = dir.join("c.img");
    restore(&store, members[2]["snapshot"].as_str().unwrap(), &restored);
    assert!(
        std::fs::read(&restored).unwrap() == c.disks[0].2,
        "the fleeced member differs from its disk"
    );
    std::fs::remove_file(&restored).unwrap();

    // One daemon dies: no group point, every VM runs on.
    let done = writer.done.clone();
    let vms = writer.finish();
    let last = done.load(Ordering::SeqCst);
    daemons[1].kill();
    let out = cli(&["backup", "--plan", p]);
    assert_one_error(
        &out,
        &["VM b drive disk0", "Cannot reach daemon", "b-disk0.control"],
    );
    let groups = || store::Store::open(&store).unwrap().groups("pair").unwrap();
    assert_eq!(
        groups().len(),
        1,
        "a group point was published without daemon b"
    );
    assert!(running(&qmps[0]) && running(&qmps[1]) && c.running());
    c.assert_clean();

    // The daemon back on its state: the guest's disk reconnects, writes go
    // on on both guests, and the next group point holds every write done
    // before it.
    daemons[1].spawn();
    let writer = Writer::start_from(vms, last + 1);
    writer.wait_done(last + 4);
    let done = writer.done.clone();
    let vms = writer.finish();
    let last = done.load(Ordering::SeqCst);
    let g2 = ok_json(&cli(&["backup", "--plan", p, "--json"]));
    assert_eq!(groups().len(), 2);
    let present = guest_writes(&store, &g2, dir);
    assert_eq!(
        consistent_cut(&present),
        Ok(last),
        "the group point after the restart lacks writes done before it: {present:?}"
    );
    let modes: Vec<&str> = g2["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["daemon", "daemon", "incremental"], "{g2}");
    c.assert_clean();
    // Once more with the guests idle: every member is a snapshot of this
    // group's own (a daemon cuts a point even when nothing changed), so
    // forgetting one group never takes another's member.
    let g3 = ok_json(&cli(&["backup", "--plan", p, "--json"]));
    for (m2, m3) in g2["members"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g3["members"].as_array().unwrap())
    {
        assert_ne!(m2["snapshot"], m3["snapshot"], "{g2}\n{g3}");
    }
    let present = guest_writes(&store, &g3, dir);
    assert_eq!(consistent_cut(&present), Ok(last));

    quit_seq_guests(vms);
    for d in &mut daemons {
        d.kill();
    }
}

#[test]
fn backup_help_names_the_plan_form() {
    recovery_cli_path();
    let out = cli(&["backup", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("backup --plan PLAN.toml"), "{help}");
}
