//! Who may touch a running VM's disk: only the daemon's user. The sockets
//! are 0600, the state dir 0700 (tightened if it existed with looser
//! bits), and another user can neither connect nor read the overlay.
//! Snapshot references that try to leave the store's directories are
//! refused by every command, with one line.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

use crate::boot::store_with_backup;
use crate::corruption::{random_image, LoggedDaemon};
use crate::skip;
use crate::util::recovery_cli;

/// Connects to a Unix socket; prints `connected` or the errno.
const CONNECT: &str = "import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print('connected')
except OSError as e:
    print(e.errno)";

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs `cmd args` as user and group 65534 (nobody) with no groups.
fn as_nobody(cmd: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", cmd])
        .args(args)
        .output()
        .expect("run setpriv")
}

/// The distribution's Python, which `nobody` can run (a `python3` first on
/// root's PATH may be a shim under /root, closed to other users).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Why another user cannot be simulated here, if it cannot.
fn nobody_unavailable() -> Option<String> {
    // /proc/self belongs to the effective user.
    let euid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    if euid != 0 {
        return Some("not running as root".into());
    }
    as_nobody_checked().err()
}

fn as_nobody_checked() -> Result<(), String> {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            "import os; print(os.getuid())",
        ])
        .output()
        .map_err(|e| format!("cannot run setpriv: {e}"))?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "65534" => Ok(()),
        _ => Err(format!("setpriv + python3 as nobody failed: {out:?}")),
    }
}

fn connect_as_nobody(socket: &Path) -> String {
    let out = as_nobody(SYSTEM_PYTHON, &["-c", CONNECT, socket.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sockets_and_state_are_private_to_the_daemons_user() {
    if let Some(why) = nobody_unavailable() {
        skip!("cannot act as another user: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    // Only our modes may keep other users out, not the temp dir's.
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, random_image(1 << 20, 31)).unwrap();
    let (store, _) = store_with_backup(dir.path(), "vm", &image);
    let state = dir.path().join("state");
    let daemon = LoggedDaemon::start(&store, "vm", dir.path(), &state, &[]);

    assert_eq!(mode(&daemon.socket), 0o600, "vhost-user socket");
    assert_eq!(mode(&daemon.control), 0o600, "control socket");
    assert_eq!(mode(&state), 0o700, "state dir");
    for file in ["overlay.data", "overlay.bitmap", "state.json"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }

    // The check can fail: nobody connects to a socket left open to all.
    let open = dir.path().join("open.sock");
    let _listener = UnixListener::bind(&open).unwrap();
    std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).unwrap();
    assert_eq!(connect_as_nobody(&open), "connected");
    // Ours refuse them.
    let eacces = libc::EACCES.to_string();
    assert_eq!(
        connect_as_nobody(&daemon.socket),
        eacces,
        "vhost-user socket"
    );
    assert_eq!(connect_as_nobody(&daemon.control), eacces, "control socket");
    let out = as_nobody("cat", &[state.join("overlay.data").to_str().unwrap()]);
    assert!(!out.status.success(), "nobody read the overlay: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    let out = as_nobody("ls", &[state.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "nobody listed the state dir: {out:?}"
    );
    daemon.stop();

    // A state dir made by someone else with loose bits is tightened.
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let loose = dir.path().join("loose-state");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, PermissionsExt::from_mode(0o755)).unwrap();
    let daemon = LoggedDaemon::start(&store, "vm", &second, &loose, &[]);
    assert_eq!(mode(&loose), 0o700, "existing state dir");
    let log = daemon.stop();
    assert!(log.contains("setting mode 0700"), "{log}");
}

fn one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{needle:?} missing: {err}");
}

#[test]
fn snapshot_references_that_leave_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, random_image(1 << 20, 32)).unwrap();
    let (store, id) = store_with_backup(dir.path(), "vm", &image);
    // A decoy manifest outside the store, where `../../decoy@ID` would
    // lead if references were joined onto paths unchecked.
    let decoy = dir.path().join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    let manifest = store.join("snapshots/vm").join(format!("{id}.snap"));
    let decoy_manifest = decoy.join(format!("{id}.snap"));
    std::fs::copy(&manifest, &decoy_manifest).unwrap();

    let escapes = [
        "../x".to_string(),
        "a/../../b".to_string(),
        "vm/../vm".to_string(),
        "/etc/passwd".to_string(),
        "../../decoy".to_string(),
        format!("../../decoy@{id}"),
        format!("/abs/vm@{id}"),
        "vm@../../x".to_string(),
        format!("vm@{id}/../../../decoy"),
    ];
    for bad in &escapes {
        let b = bad.as_str();
        // A `NAME@ID` error quotes the part it rejects.
        let needle = if b.contains('@') {
            "Invalid snapshot"
        } else {
            b
        };
        let cli = |args: &[&str]| {
            recovery_cli()
                .args(args)
                .arg("--store")
                .arg(&store)
                .output()
                .unwrap()
        };
        let boot = recovery_cli()
            .arg("instant-boot")
            .arg("--store")
            .arg(&store)
            .arg(b)
            .arg("--socket")
            .arg(dir.path().join("x.sock"))
            .arg("--state")
            .arg(dir.path().join("st"))
            .output()
            .unwrap();
        one_line_error(&boot, needle);
        assert!(!dir.path().join("st").exists(), "{b}: state dir created");
        assert!(!dir.path().join("x.sock").exists(), "{b}: socket created");
        let out = dir.path().join("restored.img");
        one_line_error(&cli(&["restore", b, out.to_str().unwrap()]), needle);
        assert!(!out.exists(), "{b}: restore wrote a file");
        one_line_error(&cli(&["forget", b]), needle);
        one_line_error(&cli(&["verify", b]), needle);
        one_line_error(
            &cli(&["backup", "--name", b, image.to_str().unwrap()]),
            "Invalid image name",
        );
    }
    for bad in ["a/b", "/tmp/vm", ".hidden", "..", "vm@x"] {
        let out = recovery_cli()
            .args(["backup", "--name", bad, "--store"])
            .arg(&store)
            .arg(&image)
            .output()
            .unwrap();
        one_line_error(&out, "Invalid image name");
    }

    // Nothing moved: the decoy and the store are as they were.
    assert!(decoy_manifest.exists(), "the decoy was forgotten");
    assert_eq!(std::fs::read_dir(&decoy).unwrap().count(), 1);
    let out = recovery_cli()
        .args(["snapshots", "--json", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "vm");
    let out = recovery_cli()
        .args(["verify", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
