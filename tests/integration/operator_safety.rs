//! No operator mistake and no restart loses data or serves the wrong disk
//! (issue 10): an orphaned QEMU, a deleted or replaced target, two daemons
//! on one target, `--state` on a shared directory, a start that fails
//! half-way, and the `--qemu`, `--serial` and `--cache-size` mistakes a
//! user could make.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

use crate::boot::{materialize, store_with_backup, BootDaemon};
use crate::guest::{e2fsck, read_guest_file, require_guest, BOOT_TIMEOUT};
use crate::migrate::{num, status};
use crate::util::recovery_cli;

/// How long a start that must be refused may take.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(60);

/// A temp dir with a store holding `vm`, a backup of random data.
struct Fixture {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl Fixture {
    fn new(size: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(10).fill_bytes(&mut image);
        let path = dir.path().join("disk.img");
        std::fs::write(&path, &image).unwrap();
        let (store, _) = store_with_backup(dir.path(), "vm", &path);
        std::fs::remove_file(&path).unwrap();
        Fixture { dir, store }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `instant-boot` of `vm` with `args` (after the snapshot).
    fn instant_boot(&self, args: &[&str]) -> Command {
        let mut cmd = recovery_cli();
        cmd.arg("instant-boot")
            .arg("--store")
            .arg(&self.store)
            .arg("vm")
            .args(args);
        cmd
    }

    /// Runs `instant-boot` with `args`, which must be refused: returns its
    /// stderr. Panics if it starts serving instead.
    fn refused(&self, args: &[&str]) -> String {
        let out = run_until_exit(self.instant_boot(args), REFUSE_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "instant-boot {args:?} was not refused: {out:?}"
        );
        stderr
    }

    /// Starts a daemon in `DIR/name` (socket `vhost.sock`, state dir
    /// `state`) migrating to `target`.
    fn daemon(&self, name: &str, target: &Path, extra: &[&str]) -> BootDaemon {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = extra.to_vec();
        args.push("--target");
        BootDaemon::start(&self.store, "vm", &dir, &args, Some(target))
    }
}

/// Runs `cmd` to its end (killing it after `timeout`, then panicking).
fn run_until_exit(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn recovery-cli");
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {timeout:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        state.is_some_and(|s| s != "Z" && s != "X")
    })
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                    .is_some_and(|ppid| ppid == pid.to_string())
            })
        })
        .collect()
}

/// Waits (generously) until `cond` holds.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn migration_state(state: &Path) -> String {
    let text = std::fs::read_to_string(state.join("state.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["migration"].as_str().unwrap().to_string()
}

#[test]
fn a_deleted_target_is_refused_on_every_restart_and_never_recreated() {
    let f = Fixture::new(16 << 20);
    let target = f.path("target.raw");
    let daemon = f.daemon("a", &target, &["--copy-rate", "1M"]);
    let state = f.path("a/state");
    wait_until("chunks migrated", Duration::from_secs(60), || {
        num(&status(&state), "chunks_migrated") > 0
    });
    daemon.stop();
    assert_eq!(migration_state(&state), "in_progress");

    // Another path, while the recorded target is there: named, not created.
    let elsewhere = f.path("elsewhere.raw");
    let err = f.refused(&[
        "--socket",
        f.path("a/vhost.sock").to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--target",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!(
            "migrates to {}, not {}",
            target.canonicalize().unwrap().display(),
            elsewhere.display()
        )),
        "{err}"
    );
    assert!(!elsewhere.exists());

    std::fs::remove_file(&target).unwrap();
    let socket = f.path("a/vhost.sock");
    let args = [
        "--socket",
        socket.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ];
    // As a service manager would: again and again.
    for attempt in 1..=2 {
        let err = f.refused(&args);
        assert!(
            err.contains(&format!("Target {} does not exist", target.display()))
                && err.contains("records a migration to it"),
            "attempt {attempt}: {err}"
        );
        assert!(!target.exists(), "attempt {attempt} created the target");
        assert_eq!(migration_state(&state), "in_progress", "attempt {attempt}");
    }

    // Another file put in its place is not the target either (a new
    // inode, or the same inode number reused: the random id tells).
    std::fs::write(&target, vec![0u8; 16 << 20]).unwrap();
    let err = f.refused(&args);
    assert!(
        err.contains("is not the file the migration started on"),
        "{err}"
    );
    assert_eq!(migration_state(&state), "in_progress");
}

#[test]
fn two_daemons_cannot_migrate_into_one_target() {
    let f = Fixture::new(8 << 20);
    let target = f.path("target.raw");
    let first = f.daemon("a", &target, &["--copy-rate", "1M"]);
    let second_state = f.path("b/state");
    std::fs::create_dir_all(f.path("b")).unwrap();
    let err = f.refused(&[
        "--socket",
        f.path("b/vhost.sock").to_str().unwrap(),
        "--state",
        second_state.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!(
            "Target {} is in use by PID {}",
            target.display(),
            first.pid()
        )),
        "{err}"
    );
    assert!(!second_state.exists(), "the refused start left its state");
    assert!(!f.path("b/vhost.sock").exists());
    first.stop();
}

#[test]
fn a_shared_directory_is_refused_as_state_and_left_untouched() {
    let f = Fixture::new(1 << 20);
    let shared = f.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(shared.join("other-user.txt"), b"theirs").unwrap();
    let err = f.refused(&[
        "--socket",
        f.path("vhost.sock").to_str().unwrap(),
        "--state",
        shared.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!("{} is not a state dir", shared.display())),
        "{err}"
    );
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "the shared directory's mode was changed");
    let names: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["other-user.txt"]);
}

#[test]
fn a_start_that_fails_leaves_no_state_behind() {
    let f = Fixture::new(1 << 20);
    let state = f.path("state");
    let target = f.path("target.raw");
    let state_arg = state.to_str().unwrap().to_string();
    let target_arg = target.to_str().unwrap().to_string();
    // A socket in a directory that does not exist.
    let err = f.refused(&[
        "--socket",
        "/nodir/x.sock",
        "--state",
        &state_arg,
        "--target",
        &target_arg,
    ]);
    assert!(err.contains("directory /nodir does not exist"), "{err}");
    assert!(!state.exists() && !target.exists());
    // A socket path too long for sun_path (108 bytes with its NUL).
    let long = f.path(&format!("{}.sock", "s".repeat(120)));
    let err = f.refused(&["--socket", long.to_str().unwrap(), "--state", &state_arg]);
    assert!(err.contains("must be shorter than 108"), "{err}");
    assert!(!state.exists());
    // A socket path naming a file: never replaced.
    std::fs::write(f.path("precious"), b"keep").unwrap();
    let err = f.refused(&[
        "--socket",
        f.path("precious").to_str().unwrap(),
        "--state",
        &state_arg,
    ]);
    assert!(err.contains("something other than a socket"), "{err}");
    assert_eq!(std::fs::read(f.path("precious")).unwrap(), b"keep");
    assert!(!state.exists());
    // A failure after the state was created (the socket is taken by a
    // running daemon) takes back the state and the target it created.
    let running = f.daemon("a", &f.path("other.raw"), &[]);
    let err = f.refused(&[
        "--socket",
        running.socket.to_str().unwrap(),
        "--state",
        &state_arg,
        "--target",
        &target_arg,
    ]);
    assert!(!state.exists(), "state left behind after: {err}");
    assert!(!target.exists(), "target left behind after: {err}");
    running.stop();
}

#[test]
fn serial_and_cache_size_mistakes_are_refused() {
    let f = Fixture::new(1 << 20);
    let state = f.path("state");
    let socket = f.path("vhost.sock");
    let base = [
        "--socket",
        socket.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ];
    let mut args = base.to_vec();
    args.extend(["--serial", "123456789012345678901"]);
    let err = f.refused(&args);
    assert!(
        err.contains("is 21 bytes; a virtio-blk serial holds at most 20"),
        "{err}"
    );
    let mut args = base.to_vec();
    args.extend(["--cache-size", "100000G"]);
    let err = f.refused(&args);
    assert!(err.contains("is more than this machine's memory"), "{err}");
    assert!(!state.exists());
}

/// QEMU arguments for a paused, headless guest without disks of its own.
const PAUSED_QEMU: [&str; 6] = ["-accel", "tcg", "-nodefaults", "-display", "none", "-S"];

#[test]
fn qemu_failures_are_exit_codes_with_qemus_error() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
            panic!("qemu-system-x86_64 missing and RECOVERY_REQUIRE_GUEST is set");
        }
        crate::skip!("qemu-system-x86_64 is not installed");
    }
    let f = Fixture::new(1 << 20);
    let socket = f.path("vhost.sock");
    let state = f.path("state");
    let base = [
        "--socket",
        socket.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--qemu",
        "--",
    ];
    // QEMU rejects an argument.
    let mut args = base.to_vec();
    args.extend(PAUSED_QEMU);
    args.push("-no-such-option");
    let out = run_until_exit(f.instant_boot(&args), REFUSE_TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("QEMU exited with status 1") && err.contains("-no-such-option"),
        "{err}"
    );

    // QEMU is killed by someone else.
    let mut args = base.to_vec();
    args.extend(PAUSED_QEMU);
    let mut cli = f
        .instant_boot(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let qemu = wait_for_child(&cli);
    wait_until("QEMU recorded in the state", REFUSE_TIMEOUT, || {
        std::fs::read_to_string(state.join("qemu.json"))
            .is_ok_and(|r| r.contains(&format!("\"pid\":{qemu},")))
    });
    Command::new("kill")
        .args(["-KILL", &qemu.to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut cli, REFUSE_TIMEOUT);
    let mut err = String::new();
    cli.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "{status}: {err}");
    assert!(err.contains("QEMU was killed by signal 9"), "{err}");
    assert!(!state.join("qemu.json").exists(), "stale QEMU record");
}

#[test]
fn a_live_recorded_qemu_refuses_a_second_guest() {
    let f = Fixture::new(1 << 20);
    let socket = f.path("vhost.sock");
    let state = f.path("state");
    let (s, st) = (socket.to_str().unwrap(), state.to_str().unwrap());
    // Make the state, then record a live "QEMU" in it, as a daemon that
    // launched one would have.
    let daemon = BootDaemon::start(&f.store, "vm", f.dir.path(), &[], None);
    daemon.stop();
    let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
    let start_time = std::fs::read_to_string(format!("/proc/{}/stat", orphan.id()))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    std::fs::write(
        state.join("qemu.json"),
        format!("{{\"pid\":{},\"start_time\":{start_time}}}", orphan.id()),
    )
    .unwrap();
    let mut args = vec!["--socket", s, "--state", st, "--qemu", "--"];
    args.extend(PAUSED_QEMU);
    let err = f.refused(&args);
    assert!(
        err.contains(&format!("still runs (QEMU PID {})", orphan.id())),
        "{err}"
    );
    orphan.kill().unwrap();
    orphan.wait().unwrap();
    // Once it is gone, the record is stale and a start is fine (without
    // --qemu here, to need no guest).
    let daemon = BootDaemon::start(&f.store, "vm", f.dir.path(), &[], None);
    daemon.stop();
}

/// The first child process of `cli` (its QEMU), once it has one.
fn wait_for_child(cli: &Child) -> u32 {
    let mut found = None;
    wait_until("QEMU to start", REFUSE_TIMEOUT, || {
        found = children(cli.id()).into_iter().next();
        found.is_some()
    });
    found.unwrap()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_orphaned_qemu_dies_with_the_daemon_and_the_rerun_keeps_the_guests_files() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let root = guest.copy_root(dir.path());
    let (store, _) = store_with_backup(dir.path(), "vm", &root);
    let state = dir.path().join("state");
    let socket = dir.path().join("vhost.sock");
    let run = |mode: &str, console: &Path| {
        let mut cmd = recovery_cli();
        cmd.arg("instant-boot")
            .arg("--store")
            .arg(&store)
            .args(["vm", "--queues", "1", "--socket"])
            .arg(&socket)
            .arg("--state")
            .arg(&state)
            .args(["--qemu", "--"])
            .args([
                "-accel",
                "tcg",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .arg("-append")
            .arg(guest.with_kernel_args(mode).cmdline)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let console = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    // First run: a guest writing and syncing files in a loop.
    let first_console = dir.path().join("console-1.log");
    let mut cli = run("guestmode=loop guestiters=0", &first_console)
        .spawn()
        .unwrap();
    let qemu = wait_for_child(&cli);
    wait_until("the first guest's synced files", BOOT_TIMEOUT, || {
        console(&first_console).contains("LOOP 1 OK")
    });
    // kill -9 of recovery-cli: its QEMU must not outlive it.
    cli.kill().unwrap();
    cli.wait().unwrap();
    wait_until(
        &format!("QEMU {qemu} to die with recovery-cli"),
        Duration::from_secs(30),
        || !alive(qemu),
    );

    // The rerun the README advises: a guest that checks and writes once.
    let second_console = dir.path().join("console-2.log");
    let out = run_until_exit(run("guestmode=check", &second_console), BOOT_TIMEOUT);
    let second = console(&second_console);
    assert!(out.status.success(), "{out:?}\n{second}");
    assert!(second.contains("GUEST-DONE"), "{second}");
    assert!(
        second.contains("boot-1.txt"),
        "the first boot's file is gone: {second}"
    );

    let image = dir.path().join("image.raw");
    materialize(&store, "vm", &state, &image);
    e2fsck(&image).unwrap();
    for file in ["/boot-1.txt", "/boot-2.txt"] {
        assert!(
            read_guest_file(&image, file).is_some(),
            "{file} missing after the rerun"
        );
    }
}

/// `recovery-cli` with `args`, which must succeed; its stdout.
fn cli_ok(args: &[&str]) -> String {
    let out = recovery_cli().args(args).output().unwrap();
    assert!(out.status.success(), "recovery-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_state_holds_its_snapshot_until_complete_and_then_needs_no_store() {
    let f = Fixture::new(8 << 20);
    let store = f.store.to_str().unwrap().to_string();
    let target = f.path("target.raw");
    let daemon = f.daemon("a", &target, &["--copy-rate", "1M"]);
    let state = f.path("a/state");
    let holder = {
        let text = std::fs::read_to_string(state.join("state.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["holder"]
            .as_str()
            .expect("holder in state.json")
            .to_string()
    };
    // While migrating, the snapshot is held: forget names the holder.
    let out = recovery_cli()
        .args(["forget", "--store", &store, "vm"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "forget of a held snapshot: {out:?}");
    assert!(
        err.contains(&format!("is held by {holder}")) && err.contains("instant-boot state dir"),
        "{err}"
    );
    // Restarting (kill -9, upgrade) does not add a second hold.
    daemon.kill();
    let daemon = f.daemon("a", &target, &["--copy-rate", "1M"]);
    let holds = cli_ok(&["snapshots", "--store", &store, "--json"]);
    assert_eq!(holds.matches(&holder).count(), 1, "{holds}");

    // Complete: the target alone is served and the hold is released.
    let out = recovery_cli()
        .args(["set-rate", "--control"])
        .arg(state.join("control.sock"))
        .arg("unlimited")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    crate::migrate::wait_complete(&state);
    wait_until("the hold to be released", Duration::from_secs(30), || {
        !cli_ok(&["snapshots", "--store", &store, "--json"]).contains(&holder)
    });
    daemon.stop();
    cli_ok(&["forget", "--store", &store, "vm"]);
    cli_ok(&["gc", "--store", &store]);

    // A complete state restarts without the snapshot, and without the store.
    let daemon = f.daemon("a", &target, &[]);
    assert_eq!(status(&state)["state"], "complete");
    daemon.stop();
    std::fs::remove_dir_all(&f.store).unwrap();
    let daemon = f.daemon("a", &target, &[]);
    assert_eq!(status(&state)["state"], "complete");
    daemon.stop();
}

#[test]
fn error_messages_name_each_thing_once() {
    let f = Fixture::new(1 << 20);
    let state = f.path("state");
    let missing_store = f.path("no-store");
    let out = run_until_exit(
        {
            let mut cmd = recovery_cli();
            cmd.arg("instant-boot")
                .arg("--store")
                .arg(&missing_store)
                .arg("vm")
                .arg("--socket")
                .arg(f.path("vhost.sock"))
                .arg("--state")
                .arg(&state);
            cmd
        },
        REFUSE_TIMEOUT,
    );
    let missing_target = f.path("no-dir/target.raw");
    let err_target = f.refused(&[
        "--socket",
        f.path("vhost.sock").to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--target",
        missing_target.to_str().unwrap(),
    ]);
    let err_store = String::from_utf8_lossy(&out.stderr).into_owned();
    for (err, path) in [(&err_store, &missing_store), (&err_target, &missing_target)] {
        let path = path.display().to_string();
        assert_eq!(err.matches(&path).count(), 1, "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(!state.exists());
}
