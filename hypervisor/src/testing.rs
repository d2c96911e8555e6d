//! Test harness (feature `test-util`): real `qemu-system-x86_64 -M none`,
//! real `qemu-nbd`, waited for by condition, killed on drop.
//!
//! When QEMU is missing, [`require_qemu`] prints a loud SKIP line, or panics
//! when `RECOVERY_REQUIRE_GUEST=1` (CI), so nothing skips in CI.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous deadline for a process to come up on a loaded machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `true` when QEMU's tools are installed; otherwise SKIP loudly (or panic
/// under `RECOVERY_REQUIRE_GUEST=1`) and return `false`.
pub fn require_qemu() -> bool {
    let ok = ["qemu-system-x86_64", "qemu-img", "qemu-nbd"]
        .iter()
        .all(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !ok {
        if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
            panic!("QEMU tools missing and RECOVERY_REQUIRE_GUEST is set");
        }
        eprintln!("\n!!! SKIPPING QEMU TEST: qemu-system-x86_64/qemu-img/qemu-nbd not installed\n");
    }
    ok
}

/// Wait until `path` is a unix socket, or panic with `what` after the
/// deadline (or when `child` exits).
pub fn wait_socket(path: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early ({st})");
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run a command to success or panic with its output.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f FORMAT PATH SIZE`.
pub fn qemu_img_create(path: &Path, format: &str, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string()));
}

/// `qemu-io -c CMD ... IMAGE` (e.g. `write -P 0xaa 0 64k`).
pub fn qemu_io(image: &Path, format: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(image);
    run(&mut c);
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub socket: PathBuf,
}

impl Proc {
    /// Kill it now (SIGKILL) and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-nbd` serving `image` (format `format`) on unix socket `socket`,
/// read-only, with extra arguments (e.g. `--bitmap=b0`).
pub fn qemu_nbd(image: &Path, format: &str, socket: &Path, extra: &[&str]) -> Proc {
    let _ = std::fs::remove_file(socket);
    let mut child = Command::new("qemu-nbd")
        .args(["--read-only", "--persistent", "--shared=8", "-f", format])
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    wait_socket(socket, &mut child, "qemu-nbd");
    Proc {
        child,
        socket: socket.to_path_buf(),
    }
}

/// `qemu-system-x86_64 -M none -accel tcg` with a QMP socket and the given
/// extra arguments (e.g. `-blockdev ...`): QMP and QEMU's NBD server without
/// a guest.
pub fn qemu_none(qmp: &Path, extra: &[String]) -> Proc {
    let _ = std::fs::remove_file(qmp);
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-monitor", "none", "-serial", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    wait_socket(qmp, &mut child, "qemu-system-x86_64");
    // A client that connects while QEMU is still starting may get its
    // greeting but no answer; wait until QMP answers.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let probe = crate::qmp::Qmp::connect_timeout(qmp, Duration::from_secs(5))
            .and_then(|mut q| q.execute_value("query-status", None));
        match probe {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "QMP never answered: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc {
        child,
        socket: qmp.to_path_buf(),
    }
}

/// `-blockdev` arguments of a file + format node named `node`.
pub fn blockdev_args(image: &Path, format: &str, node: &str) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!(
            "driver=file,node-name={node}-file,filename={}",
            image.display()
        ),
        "-blockdev".into(),
        format!("driver={format},node-name={node},file={node}-file"),
    ]
}
