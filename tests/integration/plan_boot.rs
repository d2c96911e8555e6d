//! `recovery-cli instant-boot --plan`: a whole service served by one
//! daemon at one group point. Two VMs (`-M none` QEMUs: `db` with its
//! root disk, `app` with its root disk and a data disk holding random
//! bytes) are backed up with `backup --plan`; then:
//!
//! - with `--qemu` the service boots under TCG, `db` first and `app` once
//!   `db`'s disk is served; the control socket reports the service's
//!   totals and a report per disk (`status --json`, `/metrics` with a
//!   `disk` label), `set-rate` changes the one service-wide limit; every
//!   disk migrates to its plan `target`, the daemon stops once the guests
//!   powered off, and each root target then boots alone (with the record
//!   its instant boot wrote) while the data target equals the data disk
//!   byte for byte;
//! - `pause` and `resume` through the one control socket act on every
//!   disk; killed with SIGKILL mid-migration, a restart with the same
//!   `--state` resumes every disk, and every target equals its member snapshot's
//!   image byte for byte;
//! - bad input (an unknown group point, a missing socket dir, a disk
//!   without a target) is refused with one clear line, nothing created.
//! - with `--protect`, the daemon publishes group points of the service:
//!   one after writes on two disks restores every member to exactly what
//!   its disk held, and every group point taken during a global sequence
//!   of writes over two disks holds a prefix of it (one cut across the
//!   disks).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use control::{State, Status};
use hypervisor::testing;
use serde_json::Value;

use crate::guest::{require_guest, run_to_completion, Guest, BOOT_TIMEOUT};
use crate::util::{persisted_bitmap, recovery_cli};

/// The disks of the plan: `(vm, drive)`, in boot order.
const DISKS: [(&str, &str); 3] = [("db", "disk0"), ("app", "disk0"), ("app", "data")];

/// Generous: TCG boots on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(600);

/// The service `portal`: `db` (boot order 1) and `app` (boot order 2),
/// booted with the guest's kernel; each disk's target under `targets`
/// (none for the disks in `without_target`).
fn write_plan(
    dir: &Path,
    name: &str,
    guest: &Guest,
    qmps: &[PathBuf],
    targets: &Path,
    without_target: &[&str],
) -> PathBuf {
    let disk = |vm: &str, drive: &str| {
        let name = format!("{vm}-{drive}");
        match without_target.contains(&name.as_str()) {
            true => format!("{{ drive = \"{drive}\" }}"),
            false => format!(
                "{{ drive = \"{drive}\", target = \"{}\" }}",
                targets.join(format!("{name}.raw")).display()
            ),
        }
    };
    let args = format!(
        "[\"-kernel\", \"{}\", \"-initrd\", \"{}\", \"-append\", \"{} no_timer_check\"]",
        guest.kernel.display(),
        guest.initrd.display(),
        guest.cmdline
    );
    let text = format!(
        "service = \"portal\"\nrpo = \"1h\"\nstore = \"store\"\nscratch = \"scratch\"\n\n\
         [[vm]]\nname = \"app\"\nqmp = \"{}\"\ndisks = [ {}, {} ]\nboot_order = 2\ndrill_args = {args}\n\n\
         [[vm]]\nname = \"db\"\nqmp = \"{}\"\ndisks = [ {} ]\nboot_order = 1\ndrill_args = {args}\n",
        qmps[1].display(),
        disk("app", "disk0"),
        disk("app", "data"),
        qmps[0].display(),
        disk("db", "disk0"),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A service backed up at one group point.
struct Service {
    root: PathBuf,
    /// The disk images the group point holds, by `<vm>-<drive>`.
    images: Vec<(String, PathBuf)>,
    group: String,
    _vms: Vec<testing::Proc>,
}

impl Service {
    /// `name` in the test's directory.
    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn image(&self, disk: &str) -> &Path {
        &self.images.iter().find(|(n, _)| n == disk).unwrap().1
    }
}

/// Two `-M none` VMs over copies of the guest's root disk (and `app`'s
/// data disk: 4 MiB of random bytes in 16 MiB), backed up with
/// `backup --plan`; the plan `portal.toml` of the service with every
/// disk's target in `targets/`, and an empty `sockets/`.
fn back_up_service(dir: &Path, guest: &Guest) -> (Service, PathBuf) {
    store::Store::init(&dir.join("store"), 65536).unwrap();
    std::fs::create_dir_all(dir.join("scratch")).unwrap();
    let mut vms = Vec::new();
    let mut qmps = Vec::new();
    let mut images = Vec::new();
    for vm in ["db", "app"] {
        let mut args = Vec::new();
        for (_, drive) in DISKS.iter().filter(|(v, _)| *v == vm) {
            let img = dir.join(format!("{vm}-{drive}.raw"));
            match *drive {
                "disk0" => {
                    std::fs::copy(&guest.root_img, &img).unwrap();
                }
                _ => {
                    let mut data = vec![0u8; 4 << 20];
                    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
                    let mut f = std::fs::File::create(&img).unwrap();
                    f.write_all(&data).unwrap();
                    f.set_len(16 << 20).unwrap();
                }
            }
            args.extend(testing::blockdev_args(&img, "raw", drive));
            images.push((format!("{vm}-{drive}"), img));
        }
        let qmp = dir.join(format!("{vm}.qmp"));
        vms.push(testing::qemu_none(&qmp, &args));
        qmps.push(qmp);
    }
    let plan = write_plan(dir, "backup.toml", guest, &qmps, &dir.join("unused"), &[]);
    let out = recovery_cli()
        .args(["backup", "--json", "--plan"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let backup: Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets = dir.join("targets");
    std::fs::create_dir(&targets).unwrap();
    std::fs::create_dir(dir.join("sockets")).unwrap();
    let plan = write_plan(dir, "portal.toml", guest, &qmps, &targets, &[]);
    let service = Service {
        root: dir.to_path_buf(),
        images,
        group: backup["group"].as_str().unwrap().to_owned(),
        _vms: vms,
    };
    (service, plan)
}

/// `instant-boot --plan --json`, its stdout lines on a channel.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    fn start(plan: &Path, state: &Path, sockets: &Path, extra: &[&str]) -> Daemon {
        let mut child = recovery_cli()
            .args(["instant-boot", "--json", "--log-interval", "1", "--plan"])
            .arg(plan)
            .arg("--state")
            .arg(state)
            .arg("--socket-dir")
            .arg(sockets)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon { child, lines }
    }

    /// The next stdout line as JSON.
    fn next_json(&mut self) -> Value {
        let line = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|e| {
            panic!(
                "no line from instant-boot --plan ({e}): {:?}",
                self.child.try_wait()
            )
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// Waits for the process to exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "instant-boot --plan never stopped"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's PID; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the control socket until `done` holds for the status.
fn status_until(control: &Path, what: &str, done: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = control::fetch_status(control) {
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "never {what}: {s:#?}");
        }
        assert!(
            Instant::now() < deadline,
            "never {what}: control socket unreachable"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn disk<'a>(s: &'a Status, name: &str) -> &'a Status {
    &s.disks
        .iter()
        .find(|d| d.disk == name)
        .unwrap_or_else(|| panic!("no disk {name} in {s:#?}"))
        .status
}

/// The totals are the disks' sums, the service and its disks named.
fn assert_service_status(s: &Status, group: &str) {
    assert_eq!(s.service.as_deref(), Some("portal"));
    assert_eq!(s.snapshot, group);
    let names: Vec<_> = s.disks.iter().map(|d| d.disk.as_str()).collect();
    assert_eq!(names, ["db-disk0", "app-disk0", "app-data"], "boot order");
    let sum = |f: fn(&Status) -> u64| s.disks.iter().map(|d| f(&d.status)).sum::<u64>();
    assert_eq!(s.bytes_total, sum(|d| d.bytes_total));
    assert_eq!(s.bytes_to_copy, sum(|d| d.bytes_to_copy));
    assert_eq!(s.chunks_total, sum(|d| d.chunks_total));
    assert_eq!(s.guest_read_ops, sum(|d| d.guest_read_ops));
    for d in &s.disks {
        assert_eq!(
            d.status.rate_limit, s.rate_limit,
            "one limit for all: {s:#?}"
        );
        assert!(
            d.status
                .target
                .as_deref()
                .is_some_and(|t| t.ends_with(&format!("{}.raw", d.disk))),
            "{s:#?}"
        );
    }
}

/// Whether `a` and `b` hold the same bytes (`cmp`).
fn same_bytes(a: &Path, b: &Path) -> bool {
    std::process::Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[test]
fn the_service_boots_in_order_migrates_every_disk_and_each_target_boots_alone() {
    let guest = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let (service, plan) = back_up_service(tmp.path(), &guest);
    let (targets, state, sockets) = (
        service.dir("targets"),
        service.dir("state"),
        service.dir("sockets"),
    );

    // Slow enough to watch the migration while the guests boot.
    let mut daemon = Daemon::start(&plan, &state, &sockets, &["--qemu", "--copy-rate", "2M"]);
    let ready = daemon.next_json();
    assert_eq!(ready["group"], service.group.as_str(), "{ready:#}");
    let control = sockets.join("control.sock");
    assert_eq!(ready["control"], control.display().to_string().as_str());
    for (vm, drive) in DISKS {
        let socket = sockets.join(format!("{vm}-{drive}.sock"));
        assert!(std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket());
        assert!(state.join(format!("{vm}-{drive}")).is_dir());
    }

    // One control socket: totals, a report per disk, per-disk metrics.
    let s = status_until(&control, "migrating", |s| s.state == State::Migrating);
    assert_service_status(&s, &service.group);
    assert_eq!(s.rate_limit, 2 << 20);
    let metrics = control::fetch_metrics(&control).unwrap();
    assert!(
        metrics.contains("instant_recovery_service_info{service=\"portal\"} 1"),
        "{metrics}"
    );
    for (vm, drive) in DISKS {
        assert!(
            metrics.contains(&format!(
                "instant_recovery_disk_bytes_to_copy{{disk=\"{vm}-{drive}\"}}"
            )),
            "{metrics}"
        );
    }

    // db first; app once db's disk has been served.
    let first = daemon.next_json();
    assert_eq!(first["vm_started"], "db", "{first:#}");
    let second = daemon.next_json();
    assert_eq!(second["vm_started"], "app", "{second:#}");
    let s = control::fetch_status(&control).unwrap();
    assert!(disk(&s, "db-disk0").guest_read_ops > 0, "{s:#?}");

    // One limit for the whole service: lifted through the one socket.
    let out = recovery_cli()
        .args(["set-rate", "0", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let s = control::fetch_status(&control).unwrap();
    assert_eq!(s.rate_limit, 0, "{s:#?}");
    assert_service_status(&s, &service.group);
    // `status`: the service total, then a line per disk.
    let out = recovery_cli()
        .args(["status", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("portal (3 disks)"),
        "{out:?}"
    );
    for (vm, drive) in DISKS {
        assert!(text.contains(&format!("\n  {vm}-{drive}: ")), "{text}");
    }

    // The guests power off; the daemon stops once every disk is migrated.
    let status = daemon.wait();
    assert!(status.success(), "instant-boot --plan failed: {status}");
    for vm in ["db", "app"] {
        let console = std::fs::read_to_string(state.join(format!("{vm}.console"))).unwrap();
        assert!(
            console.contains("PAYLOAD-OK") && console.contains("GUEST-DONE"),
            "{vm}: {console}"
        );
    }
    for (vm, drive) in DISKS {
        let recorded = daemon::state_dir::peek(&state.join(format!("{vm}-{drive}"))).unwrap();
        assert_eq!(
            recorded.migration,
            block::state::MigrationState::Complete,
            "{vm}-{drive}"
        );
    }

    // Each root target boots alone, with the record its instant boot wrote.
    for vm in ["db", "app"] {
        let target = targets.join(format!("{vm}-disk0.raw"));
        let out = run_to_completion(guest.qemu_file_cmd(&target), BOOT_TIMEOUT);
        assert!(
            out.payload_ok() && out.guest_done(),
            "{vm}: {}",
            out.console
        );
        assert_eq!(out.saw_boots().len(), 1, "{vm}: {}", out.console);
    }
    // The data disk, which no guest wrote, is the member's bytes.
    assert!(same_bytes(
        &targets.join("app-data.raw"),
        service.image("app-data")
    ));
}

#[test]
fn a_killed_service_resumes_every_disk_and_each_target_equals_its_member() {
    let guest = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let (service, plan) = back_up_service(tmp.path(), &guest);
    let (targets, state, sockets) = (
        service.dir("targets"),
        service.dir("state"),
        service.dir("sockets"),
    );
    let control = sockets.join("control.sock");

    // A crawl: every disk has durable progress, none is done.
    let mut daemon = Daemon::start(&plan, &state, &sockets, &["--copy-rate", "1M"]);
    daemon.next_json();
    let bitmap = |(vm, drive): (&str, &str)| {
        persisted_bitmap(&state.join(format!("{vm}-{drive}")).join("migrated.bitmap")).0
    };
    let s = status_until(&control, "durable progress on every disk", |s| {
        s.state == State::Migrating && DISKS.iter().all(|&d| bitmap(d) > 0)
    });
    assert_service_status(&s, &service.group);
    assert_eq!(s.rate_limit, 1 << 20);
    // pause and resume act on every disk.
    let control_cmd = |cmd: &str| {
        let out = recovery_cli()
            .args([cmd, "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    control_cmd("pause");
    let s = control::fetch_status(&control).unwrap();
    assert_eq!(s.state, State::Paused, "{s:#?}");
    assert!(
        s.disks.iter().all(|d| d.status.state == State::Paused),
        "{s:#?}"
    );
    control_cmd("resume");
    let s = control::fetch_status(&control).unwrap();
    assert!(
        s.disks.iter().all(|d| d.status.state == State::Migrating),
        "{s:#?}"
    );
    let before: Vec<u64> = DISKS.iter().map(|&d| bitmap(d)).collect();
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(daemon);

    // Same state: every disk resumes from its own progress, unlimited now.
    let mut daemon = Daemon::start(&plan, &state, &sockets, &[]);
    daemon.next_json();
    let s = control::fetch_status(&control).unwrap();
    for (&(vm, drive), before) in DISKS.iter().zip(before) {
        let d = disk(&s, &format!("{vm}-{drive}"));
        assert!(
            d.chunks_migrated >= before,
            "{vm}-{drive} restarted from scratch: {s:#?}"
        );
    }
    let s = status_until(&control, "complete", |s| s.state == State::Complete);
    assert_service_status(&s, &service.group);
    assert!(
        s.disks.iter().all(|d| d.status.state == State::Complete),
        "{s:#?}"
    );
    assert_eq!(s.progress(), 1.0);
    assert!(daemon.terminate().success());
    for (vm, drive) in DISKS {
        let name = format!("{vm}-{drive}");
        assert!(
            same_bytes(&targets.join(format!("{name}.raw")), service.image(&name)),
            "{name}: the target differs from the member snapshot"
        );
    }
}

#[test]
fn bad_input_is_refused_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    store::Store::init(&dir.join("store"), 65536).unwrap();
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd"),
        root_img: dir.join("root.img"),
        cmdline: "console=ttyS0".into(),
    };
    let qmps = [dir.join("db.qmp"), dir.join("app.qmp")];
    let targets = dir.join("targets");
    std::fs::create_dir(&targets).unwrap();
    let plan = write_plan(dir, "portal.toml", &guest, &qmps, &targets, &[]);
    let no_target = write_plan(dir, "partial.toml", &guest, &qmps, &targets, &["app-data"]);
    let (state, sockets) = (dir.join("state"), dir.join("sockets"));
    std::fs::create_dir(&sockets).unwrap();
    let refused = |plan: &Path, sockets: &Path, group: &str| {
        let out = recovery_cli()
            .args(["instant-boot", "--plan"])
            .arg(plan)
            .arg(group)
            .arg("--state")
            .arg(&state)
            .arg("--socket-dir")
            .arg(sockets)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };
    let err = refused(&plan, &sockets, "20991231T000000.000000Z");
    assert!(
        err.contains("No group point 20991231T000000.000000Z of service portal"),
        "{err}"
    );
    let err = refused(&plan, &dir.join("nowhere"), "20991231T000000.000000Z");
    assert!(
        err.contains("Socket directory")
            && err.contains("nowhere")
            && err.contains("does not exist"),
        "{err}"
    );
    let err = refused(&no_target, &sockets, "20991231T000000.000000Z");
    assert!(
        err.contains("partial.toml:") && err.contains("VM app drive data has no target"),
        "{err}"
    );
    let elsewhere = write_plan(dir, "elsewhere.toml", &guest, &qmps, &dir.join("gone"), &[]);
    let err = refused(&elsewhere, &sockets, "20991231T000000.000000Z");
    assert!(
        err.contains("elsewhere.toml:")
            && err.contains("the target of VM app drive disk0 is in")
            && err.contains("which does not exist"),
        "{err}"
    );
    // Nothing was created.
    assert!(!state.exists());
    assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&targets).unwrap().count(), 0);
}

/// The group points of `portal` (`snapshots --plan --json`), oldest first.
fn group_points(plan: &Path) -> Vec<Value> {
    let out = recovery_cli()
        .args(["snapshots", "--json", "--plan"])
        .arg(plan)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `instant-boot --plan --protect --protect-every 1s`, started.
fn start_protected(plan: &Path, state: &Path, sockets: &Path) -> Daemon {
    let mut daemon = Daemon::start(
        plan,
        state,
        sockets,
        &["--protect", "--protect-every", "1s"],
    );
    daemon.next_json();
    daemon
}

/// Waits for a group point whose instant is after `micros`.
fn group_after(plan: &Path, micros: i64) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let found = group_points(plan).into_iter().find(|g| {
            let id = g["id"].as_str().unwrap();
            store::snapshot::micros_from_id(id).is_some_and(|t| t > micros)
        });
        if let Some(g) = found {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "no group point after the writes: {:#?}",
            group_points(plan)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `instant-boot --plan --protect`: writes on two disks, one after the
/// other, then a group point of the service published by the daemon
/// after them: its members restore to exactly what each disk held (the
/// written disks with their writes, the untouched one as booted), and the
/// group is an ordinary group point (`snapshots --plan`).
#[test]
fn a_protected_service_publishes_group_points_whose_members_hold_every_disk() {
    let guest = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let (service, plan) = back_up_service(tmp.path(), &guest);
    let (state, sockets) = (service.dir("state"), service.dir("sockets"));
    let before: Vec<String> = group_points(&plan)
        .iter()
        .map(|g| g["group"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(before, std::slice::from_ref(&service.group));
    let mut daemon = start_protected(&plan, &state, &sockets);

    // A global order of writes over two disks, each acknowledged and
    // flushed before the next.
    let written: Vec<(&str, u64, Vec<u8>)> = (0..8u8)
        .map(|k| {
            let disk = if k % 2 == 0 { "db-disk0" } else { "app-data" };
            let offset = (1 << 20) + u64::from(k / 2) * 65536 + 512;
            (disk, offset, vec![0xc0 | k; 4096])
        })
        .collect();
    let mut clients: Vec<(&str, crate::blkio_client::Client)> = ["db-disk0", "app-data"]
        .into_iter()
        .map(|d| {
            let c =
                crate::blkio_client::Client::connect(&sockets.join(format!("{d}.sock")), 64 << 10);
            (d, c)
        })
        .collect();
    for (disk, offset, data) in &written {
        let c = &mut clients.iter_mut().find(|(d, _)| d == disk).unwrap().1;
        c.write(*offset, data).unwrap();
        c.flush().unwrap();
    }
    let after_writes = store::snapshot::now_micros();
    drop(clients);

    let group = group_after(&plan, after_writes);
    assert!(daemon.terminate().success());
    assert_eq!(group["complete"], true, "{group:#}");
    let members = group["members"].as_array().unwrap();
    assert_eq!(members.len(), DISKS.len(), "{group:#}");
    for (vm, drive) in DISKS {
        let name = format!("{vm}-{drive}");
        let m = members
            .iter()
            .find(|m| m["vm"] == vm && m["drive"] == drive)
            .unwrap_or_else(|| panic!("no member {name}: {group:#}"));
        let snapshot = m["snapshot"].as_str().unwrap();
        assert!(
            snapshot.starts_with(&format!("portal-{name}@")),
            "{snapshot}"
        );
        let mut expected = std::fs::read(service.image(&name)).unwrap();
        for (_, offset, data) in written.iter().filter(|(d, _, _)| *d == name) {
            let at = *offset as usize;
            expected[at..at + data.len()].copy_from_slice(data);
        }
        let out = tmp.path().join(format!("{name}.restored"));
        crate::service::restore(&tmp.path().join("store"), snapshot, &out);
        assert!(
            std::fs::read(&out).unwrap() == expected,
            "{name}: member {snapshot} of {} differs from the disk",
            group["group"]
        );
    }
    // Every group point the daemon published names members of its own.
    let groups = group_points(&plan);
    let mut seen = std::collections::BTreeSet::new();
    for g in &groups {
        for m in g["members"].as_array().unwrap() {
            assert!(
                seen.insert(m["snapshot"].as_str().unwrap().to_owned()),
                "two group points share {m}: {groups:#?}"
            );
        }
    }
}

/// The service's group points are one cut across its disks: a writer
/// puts a global sequence of records on two disks in turn (record k on
/// `db-disk0` when k is even, else on `app-data`; each acknowledged and
/// flushed before the next is sent) while `instant-boot --plan --protect`
/// publishes group points. Every group point must hold a prefix of the
/// sequence across both disks: if record k is in its member, every
/// earlier record is in its own disk's member. A service whose disks were
/// cut one after another fails this as soon as a write lands between
/// the cuts.
#[test]
fn a_protected_service_cuts_every_disk_at_one_instant() {
    const RECORDS: u64 = 8192;
    let guest = require_guest!();
    let tmp = tempfile::tempdir().unwrap();
    let (service, plan) = back_up_service(tmp.path(), &guest);
    let (state, sockets) = (service.dir("state"), service.dir("sockets"));
    let mut daemon = start_protected(&plan, &state, &sockets);
    let disks = ["db-disk0", "app-data"];
    let mut clients: Vec<_> = disks
        .iter()
        .map(|d| crate::blkio_client::Client::connect(&sockets.join(format!("{d}.sock")), 4096))
        .collect();
    let place = |k: u64| ((k % 2) as usize, (k / 2) * 4096);
    let newer_groups = |plan: &Path| {
        group_points(plan)
            .into_iter()
            .filter(|g| g["group"] != service.group.as_str())
            .count()
    };
    // Write until three group points came out during the writes.
    let started = newer_groups(&plan);
    let mut written = 0;
    while written < RECORDS {
        let (disk, offset) = place(written);
        let mut rec = vec![0x5a; 4096];
        rec[..8].copy_from_slice(&(written + 1).to_le_bytes());
        clients[disk].write(offset, &rec).unwrap();
        clients[disk].flush().unwrap();
        written += 1;
        if written % 64 == 0 && newer_groups(&plan) >= started + 3 {
            break;
        }
    }
    drop(clients);
    // And one after the last write.
    let after_writes = store::snapshot::now_micros();
    group_after(&plan, after_writes);
    assert!(daemon.terminate().success());

    let store = tmp.path().join("store");
    let mut counts = Vec::new();
    for g in group_points(&plan)
        .iter()
        .filter(|g| g["group"] != service.group.as_str())
    {
        let images: Vec<Vec<u8>> = disks
            .iter()
            .map(|d| {
                let (vm, drive) = d.split_once('-').unwrap();
                let m = g["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["vm"] == vm && m["drive"] == drive)
                    .unwrap_or_else(|| panic!("no member {d}: {g:#}"));
                let out = tmp.path().join(format!("{d}.cut"));
                crate::service::restore(&store, m["snapshot"].as_str().unwrap(), &out);
                std::fs::read(&out).unwrap()
            })
            .collect();
        let present: Vec<bool> = (0..written)
            .map(|k| {
                let (disk, offset) = place(k);
                let at = offset as usize;
                images[disk][at..at + 8] == (k + 1).to_le_bytes()
            })
            .collect();
        let count = present.iter().take_while(|p| **p).count();
        assert!(
            present[count..].iter().all(|p| !p),
            "group point {}: record {count} is missing but a later one is present: \
             not one cut across the disks",
            g["group"]
        );
        counts.push(count as u64);
    }
    assert!(
        counts.iter().any(|&c| c > 0 && c < written),
        "no group point fell during the writes ({written} records; records per point {counts:?})"
    );
    assert_eq!(counts.last(), Some(&written), "{counts:?}");
}
