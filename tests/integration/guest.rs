//! QEMU test guest: build it once per test process, boot it, read its console.
//!
//! `scripts/build-guest.sh` produces a Debian cloud kernel, a busybox
//! initramfs that loads the virtio modules and `switch_root`s into
//! `/dev/vda`, and a 64 MiB ext4 root disk (`root.img`, a template: boot a
//! copy, see [`Guest::copy_root`]). The disk's `/sbin/init` prints one marker
//! per line on the serial console:
//!
//! | marker                  | meaning                                          |
//! |-------------------------|--------------------------------------------------|
//! | `GUEST-INIT <release>`  | the root disk's init started                     |
//! | `DISK-SERIAL: <s>`      | `/sys/block/vda/serial` (virtio-blk GET_ID)      |
//! | `PAYLOAD-OK` / `-BAD`   | `/payload.bin` matches `/payload.sha256`          |
//! | `SAW-BOOTS: <files>`    | `boot-<n>.txt` files left by earlier boots       |
//! | `WROTE-BOOT: <file>`    | this boot's record, synced                        |
//! | `LOOP <i> OK` / `BAD`   | `guestmode=loop` write-and-verify iterations     |
//! | `LOOP-SUM <i> <sha256>` | what iteration `i` wrote (just before its result)|
//! | `LOOP-FILE-SUM <i> <file> <sha256>` | the same for `/loop-<k>.dat` (`guestwriters=`)|
//! | `GUEST-DONE`            | root remounted read-only, about to power off     |
//! | `INITRAMFS-FAIL: <why>` | the initramfs could not mount the root disk      |
//!
//! QEMU always runs with `-accel tcg` (KVM guests hang on the CI machine),
//! `-no-reboot` and `panic=-1`, so a guest that panics exits instead of
//! looping; [`run_to_completion`] kills it on timeout anyway.
//!
//! Without QEMU or the kernel, [`Guest::build`] prints a loud skip message
//! and returns `None`; with `RECOVERY_REQUIRE_GUEST=1` (set by
//! `scripts/test.sh` and CI) it panics instead, so nothing skips in CI.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Guest RAM in MiB; the vhost-user memfd backend must have the same size.
pub const GUEST_MEM_MIB: u32 = 512;

/// Generous timeout for one boot under TCG on a loaded 2-core machine
/// (an idle boot takes about 3 s).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Skip the current test (loudly) when the guest cannot be built here.
///
/// Evaluates to the [`Guest`]; returns from the test otherwise.
macro_rules! require_guest {
    () => {
        match $crate::guest::Guest::build() {
            Some(guest) => guest,
            None => return,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_guest;

/// The built guest artefacts.
#[derive(Clone, Debug)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Pristine root disk template; never boot it directly.
    pub root_img: PathBuf,
    /// Kernel command line (`console=ttyS0 root=/dev/vda rw quiet panic=-1`
    /// plus anything added with [`Guest::with_kernel_args`]).
    pub cmdline: String,
}

impl Guest {
    /// Build (or reuse) the guest with `scripts/build-guest.sh`, once per
    /// test process. The cache directory is `$GUEST_CACHE_DIR` or the repo's
    /// `.guest-cache/`.
    pub fn build() -> Option<Guest> {
        static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
        match GUEST.get_or_init(build_uncached) {
            Ok(guest) => Some(guest.clone()),
            Err(why) => {
                if crate::util::skips_are_failures() {
                    panic!(
                        "test guest unavailable and {} is set: {why}",
                        crate::util::REQUIRE_ENV
                    );
                }
                eprintln!();
                eprintln!("!!! SKIPPING QEMU GUEST TEST: {why}");
                eprintln!("!!! run scripts/install-deps.sh && scripts/build-guest.sh");
                eprintln!();
                None
            }
        }
    }

    /// The same guest with extra kernel command-line arguments, e.g.
    /// `"guestmode=loop guestiters=5"`.
    pub fn with_kernel_args(&self, args: &str) -> Guest {
        let mut guest = self.clone();
        guest.cmdline = format!("{} {}", self.cmdline, args);
        guest
    }

    /// Copy the pristine root disk to `dir/root.img` and return its path.
    pub fn copy_root(&self, dir: &Path) -> PathBuf {
        let dst = dir.join("root.img");
        std::fs::copy(&self.root_img, &dst).unwrap_or_else(|e| {
            panic!("copy {} to {}: {e}", self.root_img.display(), dst.display())
        });
        dst
    }

    /// QEMU with the common arguments: TCG, q35, 1 vCPU, 512 MiB, serial
    /// console on stdout, no other devices, no reboot.
    fn base_cmd(&self, machine: &str) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", machine])
            .args(["-m", &GUEST_MEM_MIB.to_string(), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline]);
        cmd
    }

    /// QEMU booting from a vhost-user-blk socket (guest RAM shared through a
    /// memfd, as vhost-user requires). `extra` is appended to QEMU's
    /// arguments.
    pub fn qemu_vhost_user_cmd(&self, socket: &Path, extra: &[&str]) -> Command {
        self.vhost_user_cmd(socket, "", extra)
    }

    /// [`Guest::qemu_vhost_user_cmd`] with `reconnect=1` on the chardev:
    /// when the daemon goes away QEMU keeps the guest running and retries
    /// the socket every second, then resumes the device on the new daemon.
    pub fn qemu_vhost_user_reconnect_cmd(&self, socket: &Path, extra: &[&str]) -> Command {
        self.vhost_user_cmd(socket, ",reconnect=1", extra)
    }

    /// QEMU with a vhost-user-blk disk; `chardev_opts` is appended to the
    /// socket chardev's options.
    fn vhost_user_cmd(&self, socket: &Path, chardev_opts: &str, extra: &[&str]) -> Command {
        let mut cmd = self.base_cmd("q35,memory-backend=mem");
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=vu0,path={}{chardev_opts}",
                socket.display()
            ))
            .args(["-device", "vhost-user-blk-pci,chardev=vu0"])
            .args(extra);
        cmd
    }

    /// QEMU booting from a raw file (or block device) as a virtio disk.
    pub fn qemu_file_cmd(&self, disk: &Path) -> Command {
        let mut cmd = self.base_cmd("q35");
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            disk.display()
        ));
        cmd
    }
}

fn build_uncached() -> Result<Guest, String> {
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !qemu_ok {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    let repo = repo_root();
    let cache = std::env::var_os("GUEST_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".guest-cache"));
    let script = repo.join("scripts/build-guest.sh");
    let started = Instant::now();
    let out = Command::new(&script)
        .arg(&cache)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    eprintln!(
        "test guest ready in {} ({:.1?})",
        cache.display(),
        started.elapsed()
    );
    let cmdline = std::fs::read_to_string(cache.join("cmdline"))
        .map_err(|e| format!("read {}/cmdline: {e}", cache.display()))?;
    Ok(Guest {
        kernel: cache.join("vmlinuz"),
        initrd: cache.join("initramfs.cpio.gz"),
        root_img: cache.join("root.img"),
        cmdline: cmdline.trim().to_owned(),
    })
}

/// The workspace root (parent of this package's manifest directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// What a guest run produced.
#[derive(Debug)]
pub struct GuestOutput {
    /// Everything the guest printed on its serial console.
    pub console: String,
    /// QEMU's own stderr.
    pub stderr: String,
    /// QEMU's exit status (`None` if it had to be killed).
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// QEMU start to exit (or kill).
    pub elapsed: Duration,
    /// Console lines with their time since QEMU started.
    pub lines: Vec<(Duration, String)>,
}

impl GuestOutput {
    /// Console lines, trimmed.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|(_, l)| l.trim())
    }

    /// Time from QEMU start to the first console line starting with
    /// `prefix`.
    pub fn time_of(&self, prefix: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.trim().starts_with(prefix))
            .map(|(t, _)| *t)
    }

    /// QEMU start to `GUEST-DONE`: the guest boot time.
    pub fn done_after(&self) -> Option<Duration> {
        self.time_of("GUEST-DONE")
    }

    /// Whether a console line equals `marker`.
    pub fn has(&self, marker: &str) -> bool {
        self.lines().any(|l| l == marker)
    }

    /// The rest of the first console line starting with `prefix`.
    pub fn value(&self, prefix: &str) -> Option<&str> {
        self.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    }

    pub fn payload_ok(&self) -> bool {
        self.has("PAYLOAD-OK") && !self.has("PAYLOAD-BAD")
    }

    pub fn guest_done(&self) -> bool {
        self.has("GUEST-DONE")
    }

    /// Boot files listed by `SAW-BOOTS:` (empty for `none` or no line).
    pub fn saw_boots(&self) -> Vec<String> {
        match self.value("SAW-BOOTS:") {
            None | Some("none") => Vec::new(),
            Some(list) => list.split_whitespace().map(str::to_owned).collect(),
        }
    }

    /// The file this boot wrote (`WROTE-BOOT:`).
    pub fn wrote_boot(&self) -> Option<&str> {
        self.value("WROTE-BOOT:")
    }

    /// The virtio-blk serial the guest saw (`None` if empty).
    pub fn disk_serial(&self) -> Option<&str> {
        self.value("DISK-SERIAL:").filter(|s| *s != "none")
    }

    /// Panic with the console log unless the guest checked its payload,
    /// finished and powered off cleanly.
    #[track_caller]
    pub fn assert_clean_boot(&self) {
        assert!(
            !self.timed_out && self.status.is_some_and(|s| s.success()),
            "QEMU did not power off cleanly (status {:?}, timed out: {})\n{self}",
            self.status,
            self.timed_out
        );
        assert!(self.payload_ok(), "guest payload check failed\n{self}");
        assert!(self.guest_done(), "guest did not finish\n{self}");
        assert!(
            self.wrote_boot().is_some(),
            "guest wrote no boot file\n{self}"
        );
    }
}

impl std::fmt::Display for GuestOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "--- guest console ({:.1?}) ---", self.elapsed)?;
        writeln!(f, "{}", self.console.trim_end())?;
        writeln!(f, "--- qemu stderr ---")?;
        writeln!(f, "{}", self.stderr.trim_end())?;
        write!(f, "---")
    }
}

/// Run a QEMU command until it exits or `timeout` passes (then kill it),
/// capturing the serial console (stdout) and stderr.
pub fn run_to_completion(cmd: Command, timeout: Duration) -> GuestOutput {
    RunningGuest::spawn(cmd).finish(timeout)
}

/// Console lines seen so far, each with its time since QEMU started.
#[derive(Default)]
struct Console {
    lines: Vec<(Duration, String)>,
    closed: bool,
}

/// A QEMU process whose console is being collected. Use it when the test
/// must act while the guest runs (wait for a marker, then send `stop` to a
/// `guestmode=loop` guest). Killed on drop.
pub struct RunningGuest {
    child: Child,
    started: Instant,
    console: Arc<(Mutex<Console>, Condvar)>,
    readers: Vec<thread::JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl RunningGuest {
    /// Start QEMU (stdin piped to the serial console).
    pub fn spawn(mut cmd: Command) -> RunningGuest {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let shared = Arc::clone(&console);
        let out_reader = thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                let (lock, cvar) = &*shared;
                lock.lock().unwrap().lines.push((started.elapsed(), text));
                cvar.notify_all();
                line.clear();
            }
            let (lock, cvar) = &*shared;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let shared_err = Arc::clone(&stderr);
        let err_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut buf);
            *shared_err.lock().unwrap() = String::from_utf8_lossy(&buf).into_owned();
        });
        RunningGuest {
            child,
            started,
            console,
            readers: vec![out_reader, err_reader],
            stderr,
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until a console line starts with `prefix`; returns that line,
    /// or `None` if QEMU exits or `timeout` passes first.
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.console;
        let mut console = lock.lock().unwrap();
        loop {
            if let Some((_, line)) = console
                .lines
                .iter()
                .find(|(_, l)| l.trim().starts_with(prefix))
            {
                return Some(line.trim().to_owned());
            }
            let now = Instant::now();
            if console.closed || now >= deadline {
                return None;
            }
            console = cvar.wait_timeout(console, deadline - now).unwrap().0;
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        let (lock, _) = &*self.console;
        let console = lock.lock().unwrap();
        console
            .lines
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }

    /// Type a line on the guest's serial console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to QEMU serial console");
    }

    /// Wait for QEMU to exit (killing it after `timeout`) and collect the
    /// output.
    pub fn finish(mut self, timeout: Duration) -> GuestOutput {
        let deadline = Instant::now() + timeout;
        let (status, timed_out) = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break (Some(status), false),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break (None, true);
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("wait for QEMU: {e}"),
            }
        };
        let elapsed = self.started.elapsed();
        drop(self.child.stdin.take());
        for reader in self.readers.drain(..) {
            reader.join().expect("console reader");
        }
        let lines = std::mem::take(&mut self.console.0.lock().unwrap().lines);
        GuestOutput {
            console: lines.iter().map(|(_, l)| format!("{l}\n")).collect(),
            stderr: std::mem::take(&mut *self.stderr.lock().unwrap()),
            status,
            timed_out,
            elapsed,
            lines,
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `e2fsck -fn` of an ext4 image; `Err` carries its output when not clean.
pub fn e2fsck(img: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .map_err(|e| format!("run e2fsck: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} exited {}:\n{}{}",
            img.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Read a file from an ext4 image without mounting it (debugfs);
/// `None` if it does not exist.
pub fn read_guest_file(img: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .output()
        .expect("run debugfs");
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || err.contains("not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copy the host file `src` into an ext4 image as `path` (debugfs
/// `write`; the image must not be mounted or booted meanwhile).
pub fn write_guest_file(img: &Path, src: &Path, path: &str) {
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} {path}", src.display()))
        .arg(img)
        .output()
        .expect("run debugfs");
    // debugfs exits 0 even when the write fails; anything on stderr but
    // its version banner is the failure.
    let err = String::from_utf8_lossy(&out.stderr);
    let failed = err.lines().any(|l| !l.starts_with("debugfs "));
    assert!(
        out.status.success() && !failed,
        "debugfs write {} {path}: {err}",
        src.display()
    );
}

/// Size and SHA-256 (hex) of a file in an ext4 image, read without
/// mounting it (debugfs `dump` into `scratch`, then `sha256sum`); `None`
/// if the file does not exist.
pub fn guest_file_digest(img: &Path, path: &str, scratch: &Path) -> Option<(u64, String)> {
    let _ = std::fs::remove_file(scratch);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", scratch.display()))
        .arg(img)
        .output()
        .expect("run debugfs");
    if !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found") {
        return None;
    }
    let len = std::fs::metadata(scratch).ok()?.len();
    let sum = Command::new("sha256sum")
        .arg(scratch)
        .output()
        .expect("run sha256sum");
    assert!(sum.status.success(), "sha256sum failed: {sum:?}");
    let hex = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    Some((len, hex))
}

/// Byte offset of `path`'s first data block inside an ext4 image.
pub fn guest_file_offset(img: &Path, path: &str) -> u64 {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("bmap {path} 0"))
        .arg(img)
        .output()
        .expect("run debugfs");
    let block: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("debugfs bmap {path}: {out:?}"));
    block * 4096
}

/// A `qemu-storage-daemon` exporting a raw image as vhost-user-blk: the
/// peer we measure against. Killed on drop.
pub struct QemuStorageDaemon {
    child: Child,
    pub socket: PathBuf,
}

impl QemuStorageDaemon {
    /// Export `image` (raw) on `socket`, writable. `file_opts` is appended
    /// to the file blockdev, e.g. `",cache.direct=on,aio=native"`.
    pub fn export_raw(image: &Path, socket: &Path, file_opts: &str) -> QemuStorageDaemon {
        Self::spawn(
            &[
                "--blockdev".to_owned(),
                format!(
                    "driver=file,node-name=file0,filename={}{file_opts}",
                    image.display()
                ),
                "--blockdev".to_owned(),
                "driver=raw,node-name=disk0,file=file0".to_owned(),
            ],
            socket,
        )
    }

    /// Start with the given `--blockdev` arguments (the top node must be
    /// named `disk0`) and a vhost-user-blk export of `disk0` on `socket`.
    pub fn spawn(blockdev_args: &[String], socket: &Path) -> QemuStorageDaemon {
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new("qemu-storage-daemon")
            .args(blockdev_args)
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name=disk0,writable=on,\
                 addr.type=unix,addr.path={}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("qemu-storage-daemon exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon socket {} did not appear",
                socket.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
        QemuStorageDaemon {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// Stop the daemon and wait for it (it flushes on SIGTERM).
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        // SIGTERM lets it flush; fall back to SIGKILL.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuStorageDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_boot_time(what: &str, out: &GuestOutput) {
        eprintln!(
            "guest boot ({what}): {:.2?} to GUEST-INIT, {:.2?} to GUEST-DONE, {:.2?} total",
            out.time_of("GUEST-INIT").unwrap_or_default(),
            out.done_after().unwrap_or_default(),
            out.elapsed
        );
    }

    #[test]
    fn guest_boots_from_plain_file_disk() {
        let guest = require_guest!();
        let dir = tempfile::tempdir().unwrap();
        let disk = guest.copy_root(dir.path());

        let out = run_to_completion(guest.qemu_file_cmd(&disk), BOOT_TIMEOUT);
        report_boot_time("file disk", &out);
        out.assert_clean_boot();
        assert!(
            out.saw_boots().is_empty(),
            "fresh disk had boot files\n{out}"
        );
        assert_eq!(out.wrote_boot(), Some("boot-1.txt"), "{out}");
        assert_eq!(out.disk_serial(), None, "{out}");

        e2fsck(&disk).unwrap();
        let record = read_guest_file(&disk, "/boot-1.txt").expect("boot-1.txt on disk");
        assert!(record.contains("boot 1\n"), "{record}");
        assert!(read_guest_file(&guest.root_img, "/boot-1.txt").is_none());
    }

    #[test]
    fn guest_boots_through_qemu_storage_daemon_twice() {
        let guest = require_guest!();
        let dir = tempfile::tempdir().unwrap();
        let disk = guest.copy_root(dir.path());
        let socket = dir.path().join("vhost.sock");
        let qsd = QemuStorageDaemon::export_raw(&disk, &socket, "");

        let first = run_to_completion(guest.qemu_vhost_user_cmd(&qsd.socket, &[]), BOOT_TIMEOUT);
        report_boot_time("qemu-storage-daemon", &first);
        first.assert_clean_boot();
        assert!(first.saw_boots().is_empty(), "{first}");
        assert_eq!(first.wrote_boot(), Some("boot-1.txt"), "{first}");

        // The daemon keeps serving: QEMU reconnects for the second boot.
        let second = run_to_completion(guest.qemu_vhost_user_cmd(&qsd.socket, &[]), BOOT_TIMEOUT);
        report_boot_time("qemu-storage-daemon, second boot", &second);
        second.assert_clean_boot();
        assert_eq!(second.saw_boots(), ["boot-1.txt"], "{second}");
        assert_eq!(second.wrote_boot(), Some("boot-2.txt"), "{second}");
        qsd.stop();

        e2fsck(&disk).unwrap();
        let record = read_guest_file(&disk, "/boot-2.txt").expect("boot-2.txt on disk");
        assert!(record.contains("seen: boot-1.txt\n"), "{record}");
    }

    #[test]
    fn guest_reports_corrupt_payload() {
        let guest = require_guest!();
        let dir = tempfile::tempdir().unwrap();
        let disk = guest.copy_root(dir.path());
        let offset = guest_file_offset(&disk, "/payload.bin") + 1234;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut byte).unwrap();
        byte[0] ^= 0x5a;
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&byte).unwrap();
        file.sync_all().unwrap();
        drop(file);

        let out = run_to_completion(guest.qemu_file_cmd(&disk), BOOT_TIMEOUT);
        assert!(out.has("PAYLOAD-BAD"), "corruption not detected\n{out}");
        assert!(!out.payload_ok(), "{out}");
        assert!(out.guest_done(), "{out}");
    }

    #[test]
    fn guest_loop_mode_runs_until_told_to_stop() {
        let guest = require_guest!().with_kernel_args("guestmode=loop guestiters=0");
        let dir = tempfile::tempdir().unwrap();
        let disk = guest.copy_root(dir.path());

        let mut running = RunningGuest::spawn(guest.qemu_file_cmd(&disk));
        let second = running.wait_for("LOOP 2 ", BOOT_TIMEOUT);
        assert_eq!(
            second.as_deref(),
            Some("LOOP 2 OK"),
            "{}",
            running.console()
        );
        running.send_line("stop");
        let out = running.finish(BOOT_TIMEOUT);

        assert!(out.payload_ok(), "{out}");
        assert_eq!(out.wrote_boot(), Some("boot-1.txt"), "{out}");
        let iterations: u32 = out
            .value("LOOP-DONE")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no LOOP-DONE\n{out}"));
        assert!(iterations >= 2, "{out}");
        for i in 1..=iterations {
            assert!(out.has(&format!("LOOP {i} OK")), "iteration {i}\n{out}");
        }
        assert!(out.guest_done(), "{out}");
        assert!(out.status.is_some_and(|s| s.success()), "{out}");
        e2fsck(&disk).unwrap();
        assert!(read_guest_file(&disk, "/loop.dat").is_some());
    }
}
