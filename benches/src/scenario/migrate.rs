//! `migrate`: background migration of a realistic 2 GiB image with a cold
//! store cache, against `qemu-img convert -O raw` of the raw image and
//! `recovery-cli restore`; and guest 4 KiB random-read latency while the
//! copier runs (default throttling) against the same daemon idle.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::client::{Client, Stats, WORKLOADS};
use crate::image;
use crate::peers::{self, Ours};
use crate::report::{bytes_str, mbps, median, ratio_str, secs_str, Report, Table};
use crate::stack::Server;
use crate::tools;
use crate::Ctx;

/// Whether this `recovery-cli` has `instant-boot --target`.
pub fn available(cli: &Path) -> bool {
    Command::new(cli)
        .args(["instant-boot", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--target"))
}

/// `recovery-cli status --control SOCK --json`.
pub(crate) fn status(cli: &Path, control: &Path) -> anyhow::Result<serde_json::Value> {
    let run = tools::run(
        Command::new(cli)
            .arg("status")
            .arg("--control")
            .arg(control)
            .arg("--json"),
    )?;
    serde_json::from_str(&run.stdout).context("parse status --json")
}

/// Waits until the daemon reports `complete`; returns the last status.
pub(crate) fn wait_complete(
    cli: &Path,
    control: &Path,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if control.exists() {
            if let Ok(s) = status(cli, control) {
                match s["state"].as_str() {
                    Some("complete") => return Ok(s),
                    Some("failed") => bail!("migration failed: {}", s["error"]),
                    _ => {}
                }
            }
        }
        if Instant::now() > deadline {
            bail!("migration did not complete within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    idle: Stats,
    migrating: Stats,
    /// Whether the migration was still running when the measurement ended.
    still_migrating_at_end: bool,
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    if !available(&ctx.cli) {
        bail!("skipped: this recovery-cli has no `instant-boot --target` yet");
    }
    tools::require("qemu-img")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let img = image::realistic(&ctx.images, size)?;
    let dir = ctx.scratch("migrate")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("disk", &img)?;
    let mut report = ctx.report("migrate");
    let timeout = Duration::from_secs(1800);

    // Throughput: migration with no guest attached, cold page and chunk cache.
    let (mut ms, mut qs, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = serde_json::Value::Null;
    for round in 0..ctx.rounds {
        let sub = dir.join("mig");
        std::fs::create_dir_all(&sub)?;
        let target = sub.join("target.img");
        let extra = vec!["--target".to_string(), target.display().to_string()];
        ctx.cold();
        let start = Instant::now();
        let mut server = Server::ours(&ctx.cli, &ours.store, "disk", &sub, 256 << 20, &extra)?;
        server.wait_ready(Duration::from_secs(30))?;
        let control = sub.join("state/control.sock");
        last = wait_complete(&ctx.cli, &control, timeout)?;
        tools::run(Command::new("sync").arg("-f").arg(&sub))?;
        let mig = start.elapsed().as_secs_f64();
        server.stop()?;
        if round == 0 && !image::same_contents(&img, &target)? {
            bail!("the migrated target differs from the image");
        }
        crate::remove_dir_if_exists(&sub)?;

        ctx.cold();
        let q = peers::qemu_img_convert(&img, &dir.join("qemu.img"))?.secs;
        std::fs::remove_file(dir.join("qemu.img"))?;
        ctx.cold();
        let r = ours.restore("disk", &dir.join("restore.img"))?.secs;
        std::fs::remove_file(dir.join("restore.img"))?;
        eprintln!("migrate: ours {mig:.2} s, qemu-img {q:.2} s, restore {r:.2} s");
        ms.push(mig);
        qs.push(q);
        rs.push(r);
    }
    let (mig, q, r) = (median(&ms), median(&qs), median(&rs));

    // Latency: 4K random reads at QD1, idle daemon vs migrating daemon.
    let w = &WORKLOADS[0];
    let duration = Duration::from_secs_f64(ctx.duration);
    let mut lat = Vec::new();
    for with_target in [false, true] {
        let sub = dir.join(if with_target { "lat-mig" } else { "lat-idle" });
        std::fs::create_dir_all(&sub)?;
        let extra = if with_target {
            vec![
                "--target".to_string(),
                sub.join("target.img").display().to_string(),
            ]
        } else {
            Vec::new()
        };
        ctx.cold();
        let mut server = Server::ours(&ctx.cli, &ours.store, "disk", &sub, 256 << 20, &extra)?;
        server.wait_ready(Duration::from_secs(30))?;
        let mut client = Client::connect_retry(&server.socket, Duration::from_secs(10))?;
        let stats = client.run(w, size, duration, false)?;
        let still = with_target
            && status(&ctx.cli, &sub.join("state/control.sock"))
                .is_ok_and(|s| s["state"].as_str() != Some("complete"));
        drop(client);
        server.stop()?;
        crate::remove_dir_if_exists(&sub)?;
        eprintln!(
            "migrate: QD1 read {} p50 {:.0} us p99 {:.0} us",
            if with_target { "migrating" } else { "idle" },
            stats.lat_p50_us,
            stats.lat_p99_us
        );
        lat.push((stats, still));
    }
    crate::remove_dir_if_exists(&dir)?;
    let latency = Latency {
        idle: lat[0].0,
        migrating: lat[1].0,
        still_migrating_at_end: lat[1].1,
    };

    let mut t = Table::new(
        &format!(
            "Moving a {} ext4 image to a raw file (median of {} rounds)",
            bytes_str(size),
            ctx.rounds
        ),
        &["method", "time", "throughput", "ours ÷ method (throughput)"],
    );
    for (name, secs) in [
        (
            "ours: `instant-boot --target` background copier (cold cache, no guest)",
            mig,
        ),
        ("`qemu-img convert -O raw` of the raw image", q),
        ("`recovery-cli restore`", r),
    ] {
        t.row(vec![
            name.to_string(),
            secs_str(secs),
            format!("{:.0} MB/s", mbps(size, secs)),
            ratio_str(secs / mig),
        ]);
    }
    t.note(
        "Migration time runs from spawning the daemon to `status` reporting `complete` plus a \
         `sync -f`; the target is then compared with the image byte for byte. Every method \
         starts with a dropped page cache and ends with a sync.",
    );
    t.note(format!(
        "Copier settings: defaults (16 workers, no rate limit). Final status: {} bytes migrated, \
         copy rate {:.0} MB/s.",
        last["bytes_migrated"],
        last["copy_rate"].as_f64().unwrap_or(0.0) / 1e6
    ));
    let mut l = Table::new(
        &format!(
            "Guest 4 KiB random reads at QD1 for {:.0} s, cold start",
            ctx.duration
        ),
        &["daemon", "IOPS", "p50", "p99"],
    );
    for (name, s) in [
        ("idle (no target)", &latency.idle),
        ("migrating (default throttling)", &latency.migrating),
    ] {
        l.row(vec![
            name.to_string(),
            format!("{:.0}", s.iops),
            format!("{:.0} µs", s.lat_p50_us),
            format!("{:.0} µs", s.lat_p99_us),
        ]);
    }
    if !latency.still_migrating_at_end {
        l.note("The migration finished before the measurement ended, so part of it ran with passthrough I/O.");
    }
    report.tables.push(t);
    report.tables.push(l);
    report.target_min("migration throughput vs qemu-img convert", q / mig, 1.0);
    report.target_max(
        "4K random-read p99 during migration vs idle",
        latency.migrating.lat_p99_us / latency.idle.lat_p99_us,
        2.0,
    );
    report.set("image_size", size);
    report.set(
        "seconds",
        serde_json::json!({"migrate": mig, "qemu_img": q, "restore": r}),
    );
    report.set("final_status", last);
    report.set("latency", &latency);
    Ok(report)
}
