//! `recovery-cli backup --domain`: live backups of a libvirt domain through
//! libvirt's backup API (pull mode, checkpoints), against a real libvirtd.
//!
//! One transient TCG domain boots the test guest from a qcow2 `vda` and
//! writes numbered, fsynced files (`guestmode=files`) the whole time:
//!
//! 1. a full backup, then an incremental one that reads only what the
//!    checkpoint's bitmap marks; libvirt then holds exactly one checkpoint
//!    of ours, the newest snapshot's;
//! 2. SIGKILL of recovery-cli while libvirt's export is up: the next backup
//!    ends the leftover job, is still incremental from the last good
//!    snapshot and holds every change;
//! 3. the parent snapshot's manifest damaged: the next backup is full and
//!    says why (never a wrong incremental).
//!
//! Each snapshot, restored, passes e2fsck after journal replay and holds
//! every file the guest had synced before that backup started.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use hypervisor::testing;
use serde_json::Value;

use crate::guest::{require_guest, Guest, BOOT_TIMEOUT};
use crate::libvirt::{ensure_libvirtd, virsh, wait_until, Domain, START_TIMEOUT, URI};
use crate::live_backup::{check_snapshot, files, init_store, report};
use crate::skip;
use crate::util::{recovery_cli, recovery_cli_path};

/// A TCG domain booting the test guest from the qcow2 `disk` as `vda`.
fn domain_xml(name: &str, guest: &Guest, dir: &Path, disk: &Path, console: &Path) -> String {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd");
    fs::copy(&guest.kernel, &kernel).expect("copy kernel");
    fs::copy(&guest.initrd, &initrd).expect("copy initrd");
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
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
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kernel.display(),
        initrd = initrd.display(),
        cmdline = guest.cmdline,
        disk = disk.display(),
        console = console.display(),
    )
}

struct Vm {
    dir: tempfile::TempDir,
    store: PathBuf,
    scratch: PathBuf,
    console: PathBuf,
    domain: Domain,
    name: String,
}

impl Vm {
    fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the guest has printed `FILE <n>`.
    fn wait_files(&self, n: usize) {
        let want = format!("FILE {n} ");
        assert!(
            wait_until(BOOT_TIMEOUT, || self.console().contains(&want)
                || !self.domain.exists()),
            "guest did not print {want:?}\n--- console ---\n{}\n--- QEMU log ---\n{}",
            self.console(),
            self.domain.log()
        );
        assert!(self.console().contains(&want), "{}", self.console());
    }

    fn backup_cmd(&self, extra: &[&str]) -> Command {
        let mut cmd = recovery_cli();
        cmd.args(["backup", "--name", "vm", "--disk", "vda", "--json"])
            .args(["--connect", URI, "--domain", &self.name])
            .arg("--store")
            .arg(&self.store)
            .arg("--scratch")
            .arg(&self.scratch)
            .args(extra)
            .stdin(Stdio::null());
        cmd
    }

    fn backup(&self, extra: &[&str]) -> Value {
        let out: Output = self.backup_cmd(extra).output().expect("run recovery-cli");
        report(&out)
    }

    /// Our checkpoints on the domain.
    fn checkpoints(&self) -> Vec<String> {
        let out = virsh(&["checkpoint-list", &self.name, "--name"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ir-"))
            .map(str::to_owned)
            .collect()
    }

    /// Whether libvirt runs a backup job on the domain.
    fn backup_job(&self) -> bool {
        let out = virsh(&["domjobinfo", &self.name]);
        String::from_utf8_lossy(&out.stdout).contains("Backup")
    }

    fn check(&self, r: &Value, synced: &[(u32, String)]) {
        check_snapshot(
            &self.store,
            r["snapshot"].as_str().unwrap(),
            synced,
            self.dir.path(),
        );
    }
}

/// Start the domain and wait for its first files.
fn start(guest: &Guest) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt's user: it must reach the disk and kernel inside.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let disk = dir.path().join("disk.qcow2");
    testing::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(&guest.root_img)
            .arg(&disk),
    );
    let store = init_store(dir.path());
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let name = format!(
        "recovery-test-libvirt-backup-{}-{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().unwrap().as_millis()
    );
    let console = dir.path().join("console.log");
    let xml = dir.path().join("domain.xml");
    fs::write(&xml, domain_xml(&name, guest, dir.path(), &disk, &console)).unwrap();
    let mut domain = Domain::create(&name, &xml);
    let out = domain.created(START_TIMEOUT);
    assert!(
        out.status.success(),
        "virsh create failed: {}\n--- QEMU log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        domain.log()
    );
    let vm = Vm {
        dir,
        store,
        scratch,
        console,
        domain,
        name,
    };
    vm.wait_files(3);
    vm
}

#[test]
fn libvirt_domain_full_then_incremental_through_checkpoints() {
    let guest = require_guest!().with_kernel_args("guestmode=files");
    if let Err(why) = ensure_libvirtd() {
        skip!("libvirt backup test: {why}");
    }
    recovery_cli_path();
    let vm = start(&guest);

    // 1. Full, then incremental.
    let before1 = files(&vm.console());
    // Paced by the guest's latency, from `virsh domblkstat`.
    let r1 = vm.backup(&["--rate", "auto"]);
    assert_eq!(r1["mode"], "full", "{r1}");
    assert_eq!(r1["pacing"]["error"], Value::Null, "{r1}");
    assert!(
        r1["reason"]
            .as_str()
            .unwrap()
            .contains("no earlier snapshot"),
        "{r1}"
    );
    let size = r1["image_size"].as_u64().unwrap();
    assert_eq!(size, 64 << 20);
    assert_eq!(vm.checkpoints(), [r1["bitmap"].as_str().unwrap()]);

    vm.wait_files(before1.len() + 5);
    let before2 = files(&vm.console());
    let r2 = vm.backup(&[]);
    assert_eq!(r2["mode"], "incremental", "{r2}");
    assert_eq!(r2["reason"], Value::Null);
    let (read, dirty) = (
        r2["bytes_read"].as_u64().unwrap(),
        r2["dirty_bytes"].as_u64().unwrap(),
    );
    assert!(read > 0 && read <= dirty, "{r2}");
    assert!(read < size / 4, "incremental read {read} of {size}: {r2}");
    assert!(r2["chunks_unchanged"].as_u64().unwrap() > 0, "{r2}");
    assert_eq!(
        r2["parent"],
        r1["snapshot"].as_str().unwrap().split('@').nth(1).unwrap()
    );
    assert_eq!(vm.checkpoints(), [r2["bitmap"].as_str().unwrap()]);
    assert!(!vm.backup_job());
    vm.check(&r1, &before1);
    vm.check(&r2, &before2);

    // 2. SIGKILL while libvirt's export is up: the job stays behind.
    let mut child = vm
        .backup_cmd(&["--full"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket_up = || {
        fs::read_dir(&vm.scratch)
            .is_ok_and(|d| d.flatten().any(|e| e.path().join("nbd.sock").exists()))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket_up() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup ended before the kill"
        );
        assert!(Instant::now() < deadline, "no NBD socket appeared");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(vm.backup_job(), "the killed run's backup job is gone");
    vm.wait_files(before2.len() + 3);
    let before3 = files(&vm.console());
    let r3 = vm.backup(&[]);
    assert_eq!(r3["mode"], "incremental", "{r3}");
    assert!(
        !r3["leftovers_cleared"].as_array().unwrap().is_empty(),
        "{r3}"
    );
    assert_eq!(
        r3["parent"],
        r2["snapshot"].as_str().unwrap().split('@').nth(1).unwrap()
    );
    assert_eq!(vm.checkpoints(), [r3["bitmap"].as_str().unwrap()]);
    assert!(!vm.backup_job());
    assert_eq!(fs::read_dir(&vm.scratch).unwrap().count(), 0);
    vm.check(&r3, &before3);

    // 3. The parent's manifest damaged: a full backup, with the reason.
    let id = r3["snapshot"].as_str().unwrap().split('@').nth(1).unwrap();
    let manifest = vm.store.join(format!("snapshots/vm/{id}.snap"));
    let mut bytes = fs::read(&manifest).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 16..] {
        *b ^= 0xff;
    }
    fs::write(&manifest, bytes).unwrap();
    vm.wait_files(before3.len() + 2);
    let before4 = files(&vm.console());
    let r4 = vm.backup(&[]);
    assert_eq!(r4["mode"], "full", "{r4}");
    assert!(
        r4["reason"].as_str().unwrap().contains("cannot be read"),
        "{r4}"
    );
    assert_eq!(vm.checkpoints(), [r4["bitmap"].as_str().unwrap()]);
    vm.check(&r4, &before4);

    // The guest kept writing through every backup.
    vm.wait_files(before4.len() + 2);
}
