//! A libvirt domain built from the snippet `instant-boot` prints boots from
//! our socket, once the socket belongs to the user libvirt runs QEMU as.
//!
//! With libvirt's default configuration QEMU runs as `libvirt-qemu`. The
//! test creates one transient `<domain type='qemu'>` (TCG, direct kernel
//! boot of the test guest, serial console to a file) whose disk and memory
//! backing are the printed snippet, and walks the story a user lives:
//!
//! 1. `instant-boot` without `--socket-owner`: QEMU cannot open the
//!    root-owned 0600 socket. Its log says `Permission denied` and
//!    `virsh create` keeps waiting while QEMU retries (the snippet asks for
//!    reconnects), so the test waits for the log line, not for virsh.
//! 2. `instant-boot --socket-owner libvirt-qemu` on the same socket path:
//!    the waiting QEMU connects, `virsh create` returns, and the guest
//!    boots from the store, checks its payload and powers off.
//!
//! One domain serves both steps: every `virsh create` makes libvirt re-probe
//! QEMU here (about a minute on a loaded machine), so a second domain would
//! double the test's time without testing more.
//!
//! libvirtd and virtlogd are started (as root) when they are not running.
//! Domains are named `recovery-test-libvirt-*` and destroyed on every path.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::boot::{store_with_backup, BootDaemon};
use crate::guest::{require_guest, Guest, GuestOutput, BOOT_TIMEOUT};
use crate::skip;

/// libvirt's connection for system domains.
pub(crate) const URI: &str = "qemu:///system";
/// The user libvirt's default configuration runs QEMU as.
const QEMU_USER: &str = "libvirt-qemu";
/// How long libvirt may take to start QEMU: each domain start re-probes
/// QEMU's capabilities here (KVM is not usable), about a minute under load.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound for single virsh commands that should answer at once.
const VIRSH_TIMEOUT: &str = "60";

/// Runs `virsh -c qemu:///system ARGS` under `timeout`.
pub(crate) fn virsh(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(VIRSH_TIMEOUT)
        .args(["virsh", "-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout virsh")
}

/// Waits until `cond` holds or `timeout` passes; whether it held.
pub(crate) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Makes sure libvirtd answers on [`URI`], starting virtlogd and libvirtd
/// if needed (root only).
pub(crate) fn ensure_libvirtd() -> Result<(), String> {
    if !crate::util::is_root() {
        return Err("only root can give the socket to another user".into());
    }
    let installed = Command::new("virsh")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        return Err("virsh is not installed (run scripts/install-deps.sh)".into());
    }
    if Command::new("id")
        .arg(QEMU_USER)
        .output()
        .map_or(true, |o| !o.status.success())
    {
        return Err(format!(
            "user {QEMU_USER} does not exist (libvirt-daemon-system missing)"
        ));
    }
    if virsh(&["version"]).status.success() {
        return Ok(());
    }
    // Either may already run (then it refuses to start twice): what counts
    // is that libvirtd answers afterwards.
    for daemon in ["virtlogd", "libvirtd"] {
        let _ = Command::new(daemon)
            .arg("-d")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if wait_until(Duration::from_secs(60), || {
        virsh(&["version"]).status.success()
    }) {
        Ok(())
    } else {
        Err(format!(
            "libvirtd does not answer on {URI}: {}",
            String::from_utf8_lossy(&virsh(&["version"]).stderr).trim()
        ))
    }
}

/// A transient libvirt domain being created by a background `virsh
/// create`; destroyed (and its QEMU log removed) on drop.
pub(crate) struct Domain {
    name: String,
    create: Option<Child>,
}

impl Domain {
    /// Starts `virsh create xml` in the background: with a socket QEMU
    /// cannot open it does not return while QEMU retries.
    pub(crate) fn create(name: &str, xml: &Path) -> Domain {
        let create = Command::new("virsh")
            .args(["-c", URI, "create"])
            .arg(xml)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virsh create");
        Domain {
            name: name.to_owned(),
            create: Some(create),
        }
    }

    /// QEMU's log, where libvirt puts QEMU's stderr.
    fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether `virsh create` is still waiting.
    fn creating(&mut self) -> bool {
        let child = self.create.as_mut().expect("virsh create running");
        child.try_wait().expect("poll virsh create").is_none()
    }

    /// Waits for `virsh create` to return; its output.
    pub(crate) fn created(&mut self, timeout: Duration) -> Output {
        let finished = wait_until(timeout, || !self.creating());
        let child = self.create.take().expect("virsh create running");
        if !finished {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        child.wait_with_output().expect("wait for virsh create")
    }

    /// Whether libvirt still knows the domain (a transient domain vanishes
    /// when its QEMU exits).
    pub(crate) fn exists(&self) -> bool {
        virsh(&["domstate", &self.name]).status.success()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if let Some(mut child) = self.create.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.log_path());
    }
}

/// The printed snippet's `<memoryBacking>` and `<disk>` elements.
fn snippet_parts(snippet: &str) -> (String, String) {
    let element = |open: &str, close: &str| {
        let start = snippet
            .find(open)
            .unwrap_or_else(|| panic!("no {open} in the snippet:\n{snippet}"));
        let end = snippet[start..]
            .find(close)
            .unwrap_or_else(|| panic!("no {close} in the snippet:\n{snippet}"))
            + start
            + close.len();
        snippet[start..end].to_owned()
    };
    (
        element("<memoryBacking>", "</memoryBacking>"),
        element("<disk ", "</disk>"),
    )
}

/// A TCG domain booting the test guest's kernel, with the snippet's memory
/// backing and disk and the serial console written to `console`.
fn domain_xml(name: &str, guest: &Guest, dir: &Path, snippet: &str, console: &Path) -> String {
    let (memory_backing, disk) = snippet_parts(snippet);
    // libvirt hands the kernel and initrd to QEMU's user for the run:
    // private copies keep the shared guest cache out of it.
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd");
    fs::copy(&guest.kernel, &kernel).expect("copy kernel");
    fs::copy(&guest.initrd, &initrd).expect("copy initrd");
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  {memory_backing}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        cmdline = guest.cmdline,
        console = console.display(),
    )
}

/// The guest's console file as a [`GuestOutput`] (QEMU's libvirt log in
/// place of its stderr).
fn console_output(console: &Path, domain: &Domain, started: Instant) -> GuestOutput {
    let text = fs::read_to_string(console).unwrap_or_default();
    let elapsed = started.elapsed();
    GuestOutput {
        lines: text.lines().map(|l| (elapsed, l.to_owned())).collect(),
        console: text,
        stderr: domain.log(),
        status: None,
        timed_out: false,
        elapsed,
    }
}

#[test]
fn libvirt_domain_from_the_printed_snippet_boots_once_the_socket_is_libvirts() {
    let guest = require_guest!();
    if let Err(why) = ensure_libvirtd() {
        skip!("libvirt test: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    // libvirt-qemu must reach the socket (and the kernel) inside.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let image = guest.copy_root(dir.path());
    let (store, id) = store_with_backup(dir.path(), "guest", &image);
    fs::remove_file(&image).unwrap();

    // 1. Without --socket-owner: the snippet says what is missing, and
    //    QEMU gets a clear permission error instead of a disk.
    let daemon = BootDaemon::start(&store, "guest", dir.path(), &["--queues", "2"], None);
    let snippet = daemon.ready["libvirt_xml"]
        .as_str()
        .expect("libvirt_xml in the ready JSON")
        .to_owned();
    let socket = daemon.socket.canonicalize().unwrap();
    for needed in [
        format!("path='{}'", socket.display()),
        "queues='2'".to_owned(),
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>".to_owned(),
        format!("--socket-owner {QEMU_USER}"),
    ] {
        assert!(snippet.contains(&needed), "{needed} missing:\n{snippet}");
    }
    let meta = fs::metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));

    let name = format!(
        "recovery-test-libvirt-{}-{}",
        std::process::id(),
        id.replace(['.', ':'], "-")
    );
    let console = dir.path().join("console.log");
    let xml = dir.path().join("domain.xml");
    fs::write(
        &xml,
        domain_xml(&name, &guest, dir.path(), &snippet, &console),
    )
    .unwrap();
    let started = Instant::now();
    let mut domain = Domain::create(&name, &xml);
    let denied = format!(
        "Failed to connect to '{}': Permission denied",
        socket.display()
    );
    let refused = wait_until(START_TIMEOUT, || {
        domain.log().contains(&denied) || !domain.creating()
    });
    assert!(
        refused && domain.log().contains(&denied),
        "QEMU did not report {denied:?} within {START_TIMEOUT:?}; virsh create: {:?}\n--- QEMU log ---\n{}",
        if domain.creating() { None } else { Some(domain.created(Duration::ZERO)) },
        domain.log()
    );
    assert!(
        domain.creating(),
        "virsh create returned although QEMU cannot open the disk"
    );
    daemon.stop();

    // 2. The same socket path, now owned by libvirt's QEMU user: the
    //    waiting QEMU connects and the guest boots from the store.
    let daemon = BootDaemon::start(
        &store,
        "guest",
        dir.path(),
        &["--queues", "2", "--socket-owner", QEMU_USER],
        None,
    );
    let owned = daemon.ready["libvirt_xml"].as_str().unwrap();
    assert!(
        owned.contains(&format!("the socket belongs to {QEMU_USER}")),
        "{owned}"
    );
    assert_eq!(snippet_parts(owned), snippet_parts(&snippet));
    let meta = fs::metadata(&socket).unwrap();
    let qemu_uid = String::from_utf8(
        Command::new("id")
            .args(["-u", QEMU_USER])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse::<u32>()
    .unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (qemu_uid, 0o600));

    let out = domain.created(START_TIMEOUT);
    assert!(
        out.status.success(),
        "virsh create failed: {}\n--- QEMU log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        domain.log()
    );
    let done = wait_until(BOOT_TIMEOUT, || {
        fs::read_to_string(&console).is_ok_and(|c| c.contains("GUEST-DONE")) || !domain.exists()
    });
    let booted = console_output(&console, &domain, started);
    assert!(
        done && booted.guest_done(),
        "guest did not finish\n{booted}"
    );
    assert!(booted.payload_ok(), "guest payload check failed\n{booted}");
    assert_eq!(booted.wrote_boot(), Some("boot-1.txt"), "{booted}");
    // GET_ID answered by our daemon: the snapshot's serial.
    let serial = daemon::default_serial(&id);
    assert_eq!(booted.disk_serial(), Some(serial.as_str()), "{booted}");
    // on_poweroff=destroy: the guest's power-off ends the domain.
    assert!(
        wait_until(Duration::from_secs(60), || !domain.exists()),
        "domain {name} still exists after the guest powered off"
    );
    drop(domain);
    daemon.stop();
}
