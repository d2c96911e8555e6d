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
use std::sync::OnceLock;
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
                if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
                    panic!("test guest unavailable and RECOVERY_REQUIRE_GUEST is set: {why}");
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
        let mut cmd = self.base_cmd("q35,memory-backend=mem");
        cmd.arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"
            ))
            .arg("-chardev")
            .arg(format!("socket,id=vu0,path={}", socket.display()))
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
    /// QEMU start to the `GUEST-DONE` line: the guest boot time.
    pub done_after: Option<Duration>,
}

impl GuestOutput {
    /// Console lines, trimmed.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.console.lines().map(str::trim)
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
pub fn run_to_completion(mut cmd: Command, timeout: Duration) -> GuestOutput {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let console = thread::spawn(move || {
        let mut text = String::new();
        let mut done_after = None;
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let s = String::from_utf8_lossy(&line);
            if done_after.is_none() && s.trim() == "GUEST-DONE" {
                done_after = Some(started.elapsed());
            }
            text.push_str(&s);
            line.clear();
        }
        (text, done_after)
    });
    let mut stderr_pipe = child.stderr.take().expect("piped stderr");
    let stderr = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });

    let (status, timed_out) = wait_with_timeout(&mut child, started + timeout);
    let elapsed = started.elapsed();
    let (console, done_after) = console.join().expect("console reader");
    let stderr = stderr.join().expect("stderr reader");
    GuestOutput {
        console,
        stderr,
        status,
        timed_out,
        elapsed,
        done_after,
    }
}

fn wait_with_timeout(child: &mut Child, deadline: Instant) -> (Option<ExitStatus>, bool) {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return (None, true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("wait for QEMU: {e}"),
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
            "guest boot ({what}): {:.2?} to GUEST-DONE, {:.2?} total",
            out.done_after.unwrap_or_default(),
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
    fn guest_loop_mode_writes_and_verifies() {
        let guest = require_guest!().with_kernel_args("guestmode=loop guestiters=3");
        let dir = tempfile::tempdir().unwrap();
        let disk = guest.copy_root(dir.path());

        let out = run_to_completion(guest.qemu_file_cmd(&disk), BOOT_TIMEOUT);
        assert!(out.payload_ok(), "{out}");
        for i in 1..=3 {
            assert!(out.has(&format!("LOOP {i} OK")), "iteration {i}\n{out}");
        }
        assert!(out.has("LOOP-DONE 3"), "{out}");
        assert!(out.guest_done(), "{out}");
        e2fsck(&disk).unwrap();
        assert!(read_guest_file(&disk, "/loop.dat").is_some());
    }
}
