//! `drill`: the RTO of a recovery drill (`recovery-cli drill`: instant
//! boot from the store until the check passes) against a full
//! `recovery-cli restore` followed by a boot from the restored disk, on
//! the same snapshot, until the same console line.
//!
//! The disk is a VM disk of `--size` (default 2 GiB, `--quick` 256 MiB):
//! the realistic ext4 image with the test guest's 64 MiB root filesystem
//! written over its start. The guest boots from the root filesystem and
//! reads its 4 MiB payload (`PAYLOAD-OK`); the rest of the disk is data
//! that a restore must copy and an instant boot never reads.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::image;
use crate::peers::Ours;
use crate::report::{bytes_str, median, ratio_str, secs_str, Report, Table};
use crate::tools;
use crate::Ctx;

/// The console line both paths wait for.
const MARKER: &str = "PAYLOAD-OK";

#[derive(Debug, Clone, Copy, Serialize)]
struct Drill {
    /// The drill's own report: command start to the check passing.
    rto: f64,
    socket_ready_ms: f64,
    /// QEMU start to the check passing.
    boot: f64,
    /// The whole command, teardown included.
    wall: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct RestoreBoot {
    /// `recovery-cli restore` and a sync of the target.
    restore: f64,
    /// QEMU start to the marker.
    boot: f64,
}

/// The guest's kernel, initramfs and command line.
struct Guest {
    kernel: std::path::PathBuf,
    initrd: std::path::PathBuf,
    cmdline: String,
}

/// Boots the guest from the raw file `disk` until [`MARKER`].
fn boot_file(guest: &Guest, disk: &Path, timeout: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-nic", "none"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &guest.cmdline])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu-system-x86_64")?;
    let rx = tools::console_lines(child.stdout.take().context("guest console")?);
    let deadline = start + timeout;
    let result = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((line, at)) if line.starts_with(MARKER) => {
                break Ok(at.duration_since(start).as_secs_f64())
            }
            Ok((line, _)) if line.starts_with("INITRAMFS-FAIL") => {
                break Err(anyhow::anyhow!("guest failed: {line}"))
            }
            Ok(_) => {}
            Err(_) => break Err(anyhow::anyhow!("no {MARKER} within {timeout:?}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// `recovery-cli drill` of `snapshot` with a console check for [`MARKER`].
fn drill(ctx: &Ctx, store: &Path, guest: &Guest) -> anyhow::Result<Drill> {
    let start = Instant::now();
    let run = tools::run(
        Command::new(&ctx.cli)
            .args(["drill", "--json", "--store"])
            .arg(store)
            .args(["disk", "--check", &format!("console:^{MARKER}")])
            .args(["--timeout", "300s", "--", "-kernel"])
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args(["-append", &guest.cmdline]),
    )?;
    let wall = start.elapsed().as_secs_f64();
    let r: serde_json::Value =
        serde_json::from_str(&run.stdout).context("parse the drill's JSON report")?;
    let num = |k: &str| {
        r[k].as_f64()
            .with_context(|| format!("no {k} in the drill report: {r}"))
    };
    Ok(Drill {
        rto: num("rto_seconds")?,
        socket_ready_ms: num("socket_ready_ms")?,
        boot: num("boot_seconds")?,
        wall,
    })
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("qemu-system-x86_64")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let cache = std::env::var_os("GUEST_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| ctx.root.join(".guest-cache"));
    eprintln!("drill: building the guest (cached)");
    tools::run(Command::new(ctx.root.join("scripts/build-guest.sh")).arg(&cache))
        .context("scripts/build-guest.sh (run scripts/install-deps.sh first)")?;
    let root_img = std::fs::read(cache.join("root.img")).context("read the guest's root.img")?;
    if (root_img.len() as u64) > size {
        bail!(
            "--size must be at least the guest root's {}",
            root_img.len()
        );
    }
    let guest = Guest {
        kernel: cache.join("vmlinuz"),
        initrd: cache.join("initramfs.cpio.gz"),
        cmdline: std::fs::read_to_string(cache.join("cmdline"))?
            .trim()
            .to_owned(),
    };
    let dir = ctx.scratch("drill")?;
    let disk = dir.join("disk.img");
    std::fs::copy(image::realistic(&ctx.images, size)?, &disk)?;
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk)?;
    f.write_all(&root_img)?;
    f.sync_all()?;
    drop(f);
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("disk", &disk)?;
    std::fs::remove_file(&disk)?;
    let mut report = ctx.report("drill");
    let timeout = Duration::from_secs(300);

    let (mut drills, mut restores) = (Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        // Alternate which goes first, so a drift in load hits both.
        for drill_turn in [rep % 2 == 0, rep % 2 == 1] {
            ctx.prepare(&[&ours.store])?;
            if drill_turn {
                let d = drill(ctx, &ours.store, &guest)?;
                eprintln!(
                    "drill: rep {rep} drill: RTO {:.2} s (socket {:.0} ms, boot {:.2} s, wall {:.2} s)",
                    d.rto, d.socket_ready_ms, d.boot, d.wall
                );
                drills.push(d);
            } else {
                let target = dir.join("restored.img");
                let restore = ours.restore("disk", &target)?.secs;
                ctx.cold();
                let boot = boot_file(&guest, &target, timeout)?;
                std::fs::remove_file(&target)?;
                eprintln!(
                    "drill: rep {rep} restore + boot: {:.2} s ({restore:.2} s + {boot:.2} s)",
                    restore + boot
                );
                restores.push(RestoreBoot { restore, boot });
            }
        }
    }
    crate::remove_dir_if_exists(&dir)?;
    if drills.is_empty() {
        bail!("no drills measured");
    }

    let rto = median(&drills.iter().map(|d| d.rto).collect::<Vec<_>>());
    let full = median(
        &restores
            .iter()
            .map(|r| r.restore + r.boot)
            .collect::<Vec<_>>(),
    );
    let mut t = Table::new(
        &format!(
            "Time to a proven-booted {} VM disk (TCG guest to `{MARKER}`), median of {} each",
            bytes_str(size),
            ctx.reps
        ),
        &["path", "restore", "boot", "RTO", "all RTOs", "ratio"],
    );
    let med = |v: Vec<f64>| median(&v);
    let all = |v: Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    t.row(vec![
        "`recovery-cli drill` (instant boot from the store)".into(),
        format!(
            "— (socket {:.0} ms)",
            med(drills.iter().map(|d| d.socket_ready_ms).collect())
        ),
        secs_str(med(drills.iter().map(|d| d.boot).collect())),
        secs_str(rto),
        all(drills.iter().map(|d| d.rto).collect()),
        "1.00x".into(),
    ]);
    t.row(vec![
        "`recovery-cli restore` + boot from the restored file".into(),
        secs_str(med(restores.iter().map(|r| r.restore).collect())),
        secs_str(med(restores.iter().map(|r| r.boot).collect())),
        secs_str(full),
        all(restores.iter().map(|r| r.restore + r.boot).collect()),
        ratio_str(full / rto),
    ]);
    t.note(format!(
        "RTO: the drill's own `rto_seconds` (command start to the console check passing); \
         restore + boot: restore with a final sync, then QEMU (`-accel tcg`, 1 vCPU) from the \
         raw file to the same console line. The page cache is dropped before each run. \
         Drill wall time including teardown, median: {}.",
        secs_str(med(drills.iter().map(|d| d.wall).collect()))
    ));
    report.tables.push(t);
    report.set("restore_boot_over_drill_rto", full / rto);
    report.set("image_size", size);
    report.set("drills", &drills);
    report.set("restore_boot", &restores);
    Ok(report)
}
