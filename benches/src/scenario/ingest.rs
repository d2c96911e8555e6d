//! `ingest`: full backup then two 1 % incrementals of the realistic image,
//! ours against restic and borg: wall time and stored bytes.

use serde::Serialize;

use crate::image::{self, Borrowed};
use crate::peers::{Borg, Ours, Restic};
use crate::report::{bytes_str, mbps, median, ratio_str, secs_str, Report, Table};
use crate::tools::{self, dir_bytes};
use crate::Ctx;

/// One tool's result for one backup.
#[derive(Debug, Clone, Copy, Serialize)]
struct Measured {
    secs: f64,
    /// User + system CPU seconds.
    cpu: f64,
    /// Repository size after the backup.
    stored: u64,
    /// Growth of the repository by this backup.
    added: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Step {
    step: &'static str,
    ours: Measured,
    restic: Measured,
    borg: Measured,
}

const STEPS: [&str; 3] = ["full", "incremental 1", "incremental 2"];

/// One round: fresh repositories, the whole series with every tool.
fn round(ctx: &Ctx, series: &[std::path::PathBuf; 3]) -> anyhow::Result<(Vec<Step>, u64)> {
    let dir = ctx.scratch("ingest")?;
    let disk = dir.join("disk.img");
    let ours = Ours::init(&ctx.cli, &dir.join("ours"), None)?;
    let restic = Restic::init(&dir.join("restic"), &dir.join("restic-cache"))?;
    let borg = Borg::init(&dir.join("borg"), &dir.join("borg-base"))?;
    let restic_version = restic.repo_version()?;
    let mut steps = Vec::new();
    let mut last = [0u64; 3];
    for (i, src) in series.iter().enumerate() {
        let _moved = Borrowed::new(src, &disk)?;
        let mut measure = |k: usize, run: tools::Run, repo: &std::path::Path| {
            let stored = dir_bytes(repo)?;
            let m = Measured {
                secs: run.secs,
                cpu: run.cpu_secs,
                stored,
                added: stored.saturating_sub(last[k]),
            };
            last[k] = stored;
            anyhow::Ok(m)
        };
        ctx.prepare(&[&disk])?;
        let o = measure(0, ours.backup("disk", &disk)?.0, &ours.store)?;
        ctx.prepare(&[&disk])?;
        let r = measure(1, restic.backup(&disk)?, &restic.repo)?;
        ctx.prepare(&[&disk])?;
        let b = measure(2, borg.create(&format!("v{i}"), &disk)?, &borg.repo)?;
        eprintln!(
            "ingest: {}: ours {:.2} s (cpu {:.2}), restic {:.2} s (cpu {:.2}), borg {:.2} s (cpu {:.2})",
            STEPS[i], o.secs, o.cpu, r.secs, r.cpu, b.secs, b.cpu
        );
        steps.push(Step {
            step: STEPS[i],
            ours: o,
            restic: r,
            borg: b,
        });
    }
    crate::remove_dir_if_exists(&dir)?;
    Ok((steps, restic_version))
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("restic")?;
    tools::require("borg")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let series = image::series(&ctx.images, size)?;
    let mut report = ctx.report("ingest");
    let mut rounds = Vec::new();
    let mut restic_version = 0;
    for r in 0..ctx.rounds {
        eprintln!("ingest: round {}/{}", r + 1, ctx.rounds);
        let (steps, v) = round(ctx, &series)?;
        restic_version = v;
        rounds.push(steps);
    }
    // Median time per step and tool; sizes from the last round (they do
    // not depend on timing).
    let mut steps = rounds[rounds.len() - 1].clone();
    for (i, s) in steps.iter_mut().enumerate() {
        let med =
            |f: fn(&Step) -> f64| median(&rounds.iter().map(|r| f(&r[i])).collect::<Vec<_>>());
        s.ours.secs = med(|s| s.ours.secs);
        s.restic.secs = med(|s| s.restic.secs);
        s.borg.secs = med(|s| s.borg.secs);
        s.ours.cpu = med(|s| s.ours.cpu);
        s.restic.cpu = med(|s| s.restic.cpu);
        s.borg.cpu = med(|s| s.borg.cpu);
    }

    let mut time = Table::new(
        &format!(
            "Backup wall time, {} ext4 image (median of {} rounds)",
            bytes_str(size),
            ctx.rounds
        ),
        &[
            "backup",
            "ours",
            "restic",
            "borg",
            "restic ÷ ours",
            "borg ÷ ours",
        ],
    );
    for s in &steps {
        let cell = |m: &Measured| format!("{} ({:.0} MB/s)", secs_str(m.secs), mbps(size, m.secs));
        time.row(vec![
            s.step.to_string(),
            cell(&s.ours),
            cell(&s.restic),
            cell(&s.borg),
            ratio_str(s.restic.secs / s.ours.secs),
            ratio_str(s.borg.secs / s.ours.secs),
        ]);
    }
    time.note(format!(
        "Image: ext4 made with `mke2fs -d` from {:.0} % of its size in files from /usr; \
         each incremental rewrites {:.0} % of the 4 KiB blocks at random (seeds 1, 2).",
        image::FILL * 100.0,
        image::REWRITE * 100.0
    ));
    time.note(format!(
        "ours: `recovery-cli backup` (64 KiB chunks, lz4); restic: `restic backup`, repository \
         format v{restic_version} ({}); borg: `borg init -e none`, `borg create` (lz4, buzhash CDC).",
        if restic_version >= 2 {
            "zstd compression `auto`"
        } else {
            "no compression"
        }
    ));
    let mut cpu = Table::new(
        "CPU time (user + system, all threads and child processes; median)",
        &[
            "backup",
            "ours",
            "restic",
            "borg",
            "restic ÷ ours",
            "borg ÷ ours",
        ],
    );
    for s in &steps {
        cpu.row(vec![
            s.step.to_string(),
            secs_str(s.ours.cpu),
            secs_str(s.restic.cpu),
            secs_str(s.borg.cpu),
            ratio_str(s.restic.cpu / s.ours.cpu),
            ratio_str(s.borg.cpu / s.ours.cpu),
        ]);
    }
    cpu.note(
        "CPU time barely depends on what else runs on the machine; wall time on a loaded \
         machine favours single-threaded tools (borg), which lose less to contention than a \
         tool that needs every core.",
    );
    let mut stored = Table::new(
        "Repository size after each backup (growth in parentheses)",
        &["after", "ours", "restic", "borg", "ours ÷ borg"],
    );
    for s in &steps {
        let cell = |m: &Measured| format!("{} (+{})", bytes_str(m.stored), bytes_str(m.added));
        stored.row(vec![
            s.step.to_string(),
            cell(&s.ours),
            cell(&s.restic),
            cell(&s.borg),
            ratio_str(s.ours.stored as f64 / s.borg.stored as f64),
        ]);
    }
    report.tables.push(time);
    report.tables.push(cpu);
    report.tables.push(stored);

    for (i, s) in steps.iter().enumerate() {
        let goal = if i == 0 { 2.0 } else { 3.0 };
        report.target_min(
            &format!("{} backup: faster than restic", s.step),
            s.restic.secs / s.ours.secs,
            goal,
        );
        report.target_min(
            &format!("{} backup: faster than borg", s.step),
            s.borg.secs / s.ours.secs,
            goal,
        );
    }
    let end = &steps[steps.len() - 1];
    report.target_max(
        "stored size after the series vs borg",
        end.ours.stored as f64 / end.borg.stored as f64,
        1.10,
    );
    report.set("image_size", size);
    report.set("restic_repository_version", restic_version);
    report.set("steps", &steps);
    report.set("rounds", &rounds);
    Ok(report)
}
