//! A real QEMU guest boots from `recovery-cli instant-boot`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use block::cache::ChunkCache;
use block::device::BlockDevice;
use block::overlay::Overlay;
use block::snapshot::SnapshotLayer;
use daemon::state_dir::{StateBinding, StateDir};

use crate::guest::{e2fsck, read_guest_file, require_guest, run_to_completion, BOOT_TIMEOUT};
use crate::util::recovery_cli;

/// A running `instant-boot` daemon; SIGTERM on drop.
pub struct BootDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub ready: serde_json::Value,
}

impl BootDaemon {
    /// Starts `instant-boot --json` with `extra` arguments and waits until
    /// it reports that the socket is listening.
    /// `last` is appended after `extra` (e.g. the path of `--target`).
    pub fn start(
        store: &Path,
        snapshot: &str,
        dir: &Path,
        extra: &[&str],
        last: Option<&Path>,
    ) -> BootDaemon {
        Self::spawn(
            recovery_cli(),
            store,
            snapshot,
            dir,
            extra,
            last,
            Stdio::inherit(),
        )
    }

    /// [`BootDaemon::start`] with the daemon's stderr appended to `log`, so
    /// a test can show it in its failure message, and `env` added to its
    /// environment, e.g. `("RUST_LOG", "vhost_backend::handler=info")` (the
    /// daemon logs at `warn` by default).
    pub fn start_logged(
        store: &Path,
        snapshot: &str,
        dir: &Path,
        extra: &[&str],
        last: Option<&Path>,
        log: &Path,
        env: &[(&str, &str)],
    ) -> BootDaemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let mut cmd = recovery_cli();
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, store, snapshot, dir, extra, last, Stdio::from(file))
    }

    fn spawn(
        mut cmd: Command,
        store: &Path,
        snapshot: &str,
        dir: &Path,
        extra: &[&str],
        last: Option<&Path>,
        stderr: Stdio,
    ) -> BootDaemon {
        let socket = dir.join("vhost.sock");
        let mut child = cmd
            .arg("instant-boot")
            .arg("--store")
            .arg(store)
            .arg(snapshot)
            .arg("--socket")
            .arg(&socket)
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--json")
            .args(extra)
            .args(last)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn recovery-cli instant-boot");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read instant-boot output");
        assert!(
            !line.is_empty(),
            "instant-boot exited before listening: {:?}",
            child.wait()
        );
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready JSON");
        assert!(socket.exists(), "socket missing after ready");
        BootDaemon {
            child: Some(child),
            socket,
            ready,
        }
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then wait: the daemon must flush and exit 0.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        terminate(&child);
        let status = child.wait().expect("wait for instant-boot");
        assert!(status.success(), "instant-boot exited with {status}");
        assert!(!self.socket.exists(), "socket left behind");
    }
}

impl Drop for BootDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Initialises a store in `dir/store` and backs `image` up as `name`;
/// returns the store path and the snapshot id.
pub fn store_with_backup(dir: &Path, name: &str, image: &Path) -> (PathBuf, String) {
    let store = dir.join("store");
    let out = recovery_cli().arg("init").arg(&store).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = recovery_cli()
        .args(["backup", "--json", "--name", name, "--store"])
        .arg(&store)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = stats["id"].as_str().expect("snapshot id").to_string();
    (store, id)
}

/// Writes snapshot + overlay (what the guest sees) to `out`, reading the
/// state dir the way the daemon does.
pub fn materialize(store: &Path, snapshot: &str, state: &Path, out: &Path) {
    let store = store::Store::open(store).unwrap();
    let reader = Arc::new(store.open_snapshot(snapshot).unwrap());
    let info = reader.info().clone();
    let state = StateDir::open_or_create(
        state,
        &StateBinding {
            snapshot_id: info.id.clone(),
            image_size: info.image_size,
            chunk_size: info.chunk_size,
        },
    )
    .unwrap();
    let lower = SnapshotLayer::new(reader, Arc::new(ChunkCache::new(64 << 20))).unwrap();
    let overlay = Overlay::open_in(&state, Arc::new(lower)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut image = Vec::with_capacity(info.image_size as usize);
    let mut offset = 0;
    while offset < info.image_size {
        let n = buf.len().min((info.image_size - offset) as usize);
        overlay.read_at(&mut buf[..n], offset).unwrap();
        image.extend_from_slice(&buf[..n]);
        offset += n as u64;
    }
    std::fs::write(out, image).unwrap();
}

fn verify_store(store: &Path) {
    let out = recovery_cli()
        .arg("verify")
        .arg("--store")
        .arg(store)
        .output()
        .unwrap();
    assert!(out.status.success(), "verify failed: {out:?}");
}

#[test]
fn guest_boots_from_store_and_keeps_its_writes_across_restarts() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, id) = store_with_backup(dir.path(), "guest", &image);
    std::fs::remove_file(&image).unwrap();

    // First boot, straight from the store.
    let daemon = BootDaemon::start(&store, "guest", dir.path(), &["--queues", "1"], None);
    assert_eq!(daemon.ready["snapshot"], format!("guest@{id}"));
    let first = run_to_completion(guest.qemu_vhost_user_cmd(&daemon.socket, &[]), BOOT_TIMEOUT);
    first.assert_clean_boot();
    assert!(first.saw_boots().is_empty(), "{first}");
    assert_eq!(first.wrote_boot(), Some("boot-1.txt"), "{first}");
    // GET_ID: the snapshot id's 20 digits (unique; virtio holds 20 bytes).
    let serial: String = id.chars().filter(char::is_ascii_digit).collect();
    assert_eq!(serial.len(), 20, "{id}");
    assert_eq!(first.disk_serial(), Some(serial.as_str()), "{first}");
    daemon.stop();

    // The overlay holds the file, the merged disk is clean, the snapshot
    // is untouched.
    let merged = dir.path().join("merged.img");
    materialize(&store, "guest", &dir.path().join("state"), &merged);
    e2fsck(&merged).unwrap();
    let record = read_guest_file(&merged, "/boot-1.txt").expect("boot-1.txt in overlay");
    assert!(record.contains("boot 1\n"), "{record}");
    verify_store(&store);
    let pristine = dir.path().join("pristine.img");
    let out = recovery_cli()
        .arg("restore")
        .arg("--store")
        .arg(&store)
        .arg("guest")
        .arg(&pristine)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(read_guest_file(&pristine, "/boot-1.txt").is_none());
    assert_eq!(
        std::fs::read(&pristine).unwrap(),
        std::fs::read(&guest.root_img).unwrap(),
        "the snapshot changed"
    );

    // Second boot on the same state, by a new daemon: sees the first
    // boot's file.
    let daemon = BootDaemon::start(&store, "guest", dir.path(), &["--queues", "2"], None);
    let second = run_to_completion(guest.qemu_vhost_user_cmd(&daemon.socket, &[]), BOOT_TIMEOUT);
    second.assert_clean_boot();
    assert_eq!(second.saw_boots(), ["boot-1.txt"], "{second}");
    assert_eq!(second.wrote_boot(), Some("boot-2.txt"), "{second}");
    daemon.stop();
    materialize(&store, "guest", &dir.path().join("state"), &merged);
    e2fsck(&merged).unwrap();
    verify_store(&store);
}

#[test]
fn state_made_for_another_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    std::fs::write(&a, vec![1u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![2u8; 1 << 20]).unwrap();
    let (store, _) = store_with_backup(dir.path(), "a", &a);
    let out = recovery_cli()
        .args(["backup", "--name", "b", "--store"])
        .arg(&store)
        .arg(&b)
        .output()
        .unwrap();
    assert!(out.status.success());

    let daemon = BootDaemon::start(&store, "a", dir.path(), &[], None);
    daemon.stop();
    let out = recovery_cli()
        .arg("instant-boot")
        .arg("--store")
        .arg(&store)
        .arg("b")
        .arg("--socket")
        .arg(dir.path().join("b.sock"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:"), "{err}");
    assert!(err.lines().count() == 1, "not one line: {err}");
    assert!(!dir.path().join("b.sock").exists());
}

#[test]
fn unknown_snapshot_and_missing_store_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![1u8; 1 << 20]).unwrap();
    let (store, _) = store_with_backup(dir.path(), "a", &img);
    for (store, snap, needle) in [
        (store.clone(), "nope", "nope"),
        (dir.path().join("missing"), "a", "missing"),
    ] {
        let out = recovery_cli()
            .arg("instant-boot")
            .arg("--store")
            .arg(&store)
            .arg(snap)
            .arg("--socket")
            .arg(dir.path().join("x.sock"))
            .arg("--state")
            .arg(dir.path().join("st"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}
