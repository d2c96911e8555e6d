//! `restore`: full restore of the realistic image: `recovery-cli restore`
//! against `qemu-img convert -O raw` of the raw image and `restic restore`.

use crate::image;
use crate::peers::{self, Ours, Restic};
use crate::report::{bytes_str, mbps, median, ratio_str, secs_str, Report, Table};
use crate::tools;
use crate::Ctx;

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("restic")?;
    tools::require("qemu-img")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let img = image::realistic(&ctx.images, size)?;
    let dir = ctx.scratch("restore")?;
    eprintln!("restore: preparing the store and the restic repository");
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("disk", &img)?;
    let restic = Restic::init(&dir.join("restic"), &dir.join("restic-cache"))?;
    restic.backup(&img)?;
    let mut report = ctx.report("restore");

    let (mut os, mut qs, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..ctx.rounds {
        let ours_target = dir.join("ours.img");
        ctx.prepare(&[&ours.store])?;
        let run = ours.restore("disk", &ours_target)?;
        let o = run.secs;
        cpu[0].push(run.cpu_secs);
        if round == 0 && !image::same_contents(&img, &ours_target)? {
            anyhow::bail!("recovery-cli restore produced a different image");
        }
        std::fs::remove_file(&ours_target)?;
        ctx.prepare(&[&img])?;
        let run = peers::qemu_img_convert(&img, &dir.join("qemu.img"))?;
        let q = run.secs;
        cpu[1].push(run.cpu_secs);
        std::fs::remove_file(dir.join("qemu.img"))?;
        ctx.prepare(&[&restic.repo])?;
        let run = restic.restore(&dir.join("restic-out"))?;
        let r = run.secs;
        cpu[2].push(run.cpu_secs);
        crate::remove_dir_if_exists(&dir.join("restic-out"))?;
        eprintln!("restore: ours {o:.2} s, qemu-img {q:.2} s, restic {r:.2} s");
        os.push(o);
        qs.push(q);
        rs.push(r);
    }
    let (o, q, r) = (median(&os), median(&qs), median(&rs));
    crate::remove_dir_if_exists(&dir)?;

    let mut t = Table::new(
        &format!(
            "Full restore of a {} ext4 image (median of {} rounds)",
            bytes_str(size),
            ctx.rounds
        ),
        &[
            "tool",
            "time",
            "throughput",
            "ours ÷ tool (throughput)",
            "CPU (user + sys)",
        ],
    );
    let cpu = cpu.map(|v| median(&v));
    for (i, (name, secs)) in [
        ("ours: `recovery-cli restore`", o),
        ("`qemu-img convert -O raw` (raw → raw)", q),
        ("`restic restore`", r),
    ]
    .into_iter()
    .enumerate()
    {
        t.row(vec![
            name.to_string(),
            secs_str(secs),
            format!("{:.0} MB/s", mbps(size, secs)),
            ratio_str(secs / o),
            secs_str(cpu[i]),
        ]);
    }
    t.note("Every time includes a final `sync -f` of the target filesystem, so each tool's output is durable.");
    t.note("qemu-img copies the raw image itself (no store, no decompression or hashing) and skips its holes: the floor for copying the bytes on this disk.");
    report.tables.push(t);
    report.target_min("restore throughput vs qemu-img convert", q / o, 0.8);
    report.target_min("restore throughput vs restic restore", r / o, 2.0);
    report.set("image_size", size);
    report.set(
        "seconds",
        serde_json::json!({"ours": os, "qemu_img": qs, "restic": rs, "cpu_median": cpu}),
    );
    Ok(report)
}
