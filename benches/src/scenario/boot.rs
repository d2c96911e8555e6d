//! `boot`: guest boot time (TCG, to the `GUEST-DONE` marker) from our
//! socket against qemu-storage-daemon exporting the same raw root disk.
//! The guest is built and booted by `scripts/build-guest.sh` and
//! `scripts/boot-guest.sh`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::peers::Ours;
use crate::report::{median, ratio_str, secs_str, Report, Table};
use crate::stack::Server;
use crate::tools;
use crate::Ctx;

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Boot {
    /// Script spawn → `GUEST-INIT` (the root disk's init started).
    pub(crate) init: f64,
    /// Script spawn → `GUEST-DONE`.
    pub(crate) done: f64,
}

/// Boots the guest from `socket` and times its console markers.
pub(crate) fn boot(root: &Path, socket: &Path, timeout: Duration) -> anyhow::Result<Boot> {
    let start = Instant::now();
    let mut child = Command::new(root.join("scripts/boot-guest.sh"))
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn scripts/boot-guest.sh")?;
    let rx = tools::console_lines(child.stdout.take().context("guest console")?);
    let mut init = None;
    let mut console = Vec::new();
    let deadline = start + timeout;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((line, at)) => {
                let t = at.duration_since(start).as_secs_f64();
                if line.starts_with("GUEST-INIT") {
                    init = Some(t);
                }
                if line.starts_with("PAYLOAD-BAD") || line.starts_with("INITRAMFS-FAIL") {
                    break Err(anyhow::anyhow!("guest failed: {line}"));
                }
                let done = line.starts_with("GUEST-DONE");
                console.push(line);
                if done {
                    break Ok(Boot {
                        init: init.unwrap_or(f64::NAN),
                        done: t,
                    });
                }
            }
            Err(_) => break Err(anyhow::anyhow!("no GUEST-DONE within {timeout:?}")),
        }
    };
    let exit_deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() && Instant::now() < exit_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| {
        let n = console.len();
        format!("console:\n{}", console[n.saturating_sub(30)..].join("\n"))
    })
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("qemu-system-x86_64")?;
    tools::require("qemu-storage-daemon")?;
    let cache = std::env::var_os("GUEST_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| ctx.root.join(".guest-cache"));
    eprintln!("boot: building the guest (cached)");
    tools::run(Command::new(ctx.root.join("scripts/build-guest.sh")).arg(&cache))
        .context("scripts/build-guest.sh (run scripts/install-deps.sh first)")?;
    let root_img = cache.join("root.img");
    let dir = ctx.scratch("boot")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("root", &root_img)?;
    let mut report = ctx.report("boot");
    let timeout = Duration::from_secs(300);

    let (mut ours_boots, mut qsd_boots) = (Vec::new(), Vec::new());
    for rep in 0..ctx.reps {
        // Alternate which goes first, so a drift in load hits both.
        for ours_turn in [rep % 2 == 0, rep % 2 == 1] {
            let sub = dir.join(format!("{rep}-{}", if ours_turn { "ours" } else { "qsd" }));
            std::fs::create_dir_all(&sub)?;
            let mut server = if ours_turn {
                Server::ours(&ctx.cli, &ours.store, "root", &sub, 256 << 20, &[])?
            } else {
                let disk = sub.join("root.img");
                std::fs::copy(&root_img, &disk)?;
                Server::qsd_raw(&disk, "", &sub.join("qsd.sock"), &sub.join("qsd.log"))?
            };
            server.wait_ready(Duration::from_secs(30))?;
            ctx.cold();
            let b = boot(&ctx.root, &server.socket, timeout)?;
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;
            eprintln!(
                "boot: rep {rep} {}: GUEST-INIT {:.2} s, GUEST-DONE {:.2} s",
                if ours_turn { "ours" } else { "qsd" },
                b.init,
                b.done
            );
            if ours_turn {
                ours_boots.push(b);
            } else {
                qsd_boots.push(b);
            }
        }
    }
    crate::remove_dir_if_exists(&dir)?;
    if ours_boots.is_empty() {
        bail!("no boots measured");
    }

    let med = |v: &[Boot], f: fn(&Boot) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let mut t = Table::new(
        &format!(
            "Guest boot (TCG, 1 vCPU) from a vhost-user-blk socket, median of {} boots each",
            ctx.reps
        ),
        &[
            "disk server",
            "to GUEST-INIT",
            "to GUEST-DONE",
            "all GUEST-DONE times",
        ],
    );
    for (name, v) in [
        (
            "ours: `recovery-cli instant-boot` (fresh cache and state)",
            &ours_boots,
        ),
        ("qemu-storage-daemon, raw copy of root.img", &qsd_boots),
    ] {
        t.row(vec![
            name.to_string(),
            secs_str(med(v, |b| b.init)),
            secs_str(med(v, |b| b.done)),
            v.iter()
                .map(|b| format!("{:.2}", b.done))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    let ratio = med(&ours_boots, |b| b.done) / med(&qsd_boots, |b| b.done);
    t.note(format!(
        "Ratio ours ÷ qsd (GUEST-DONE, median): {}. Times run from spawning \
         `scripts/boot-guest.sh --socket` (QEMU `-accel tcg`) to the console marker; the page \
         cache is dropped before each boot.",
        ratio_str(ratio)
    ));
    report.tables.push(t);
    report.target_max("guest boot time vs qemu-storage-daemon raw", ratio, 1.1);
    report.set("ours", &ours_boots);
    report.set("qsd", &qsd_boots);
    Ok(report)
}
