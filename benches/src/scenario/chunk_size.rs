//! `chunk-size`: the ingest series (full + two 1 % incrementals) with
//! stores of 16 KiB to 4 MiB chunks: the dedup/speed trade-off, so the
//! default is chosen from data.

use serde::Serialize;

use crate::image::{self, Borrowed};
use crate::peers::Ours;
use crate::report::{bytes_str, mbps, median, secs_str, Report, Table};
use crate::tools::dir_bytes;
use crate::Ctx;

/// Chunk sizes compared.
pub const SIZES: [u64; 5] = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

#[derive(Debug, Clone, Serialize)]
struct Row {
    chunk_size: u64,
    secs: [f64; 3],
    cpu: [f64; 3],
    stored: [u64; 3],
    added: [u64; 3],
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let series = image::series(&ctx.images, size)?;
    let dir = ctx.scratch("chunk-size")?;
    let disk = dir.join("disk.img");
    let mut report = ctx.report("chunk-size");
    let mut rows = Vec::new();
    for cs in SIZES {
        let store = dir.join(format!("store-{}", cs >> 10));
        let mut row = Row {
            chunk_size: cs,
            secs: [0.0; 3],
            cpu: [0.0; 3],
            stored: [0; 3],
            added: [0; 3],
        };
        let mut secs: [Vec<f64>; 3] = Default::default();
        let mut cpu: [Vec<f64>; 3] = Default::default();
        for _ in 0..ctx.rounds {
            crate::remove_dir_if_exists(&store)?;
            let ours = Ours::init(&ctx.cli, &store, Some(cs))?;
            let mut last = 0;
            for (i, src) in series.iter().enumerate() {
                let _moved = Borrowed::new(src, &disk)?;
                ctx.prepare(&[&disk])?;
                let (run, _) = ours.backup("disk", &disk)?;
                let stored = dir_bytes(&store)?;
                secs[i].push(run.secs);
                cpu[i].push(run.cpu_secs);
                row.stored[i] = stored;
                row.added[i] = stored - last.min(stored);
                last = stored;
            }
        }
        row.secs = secs.map(|v| median(&v));
        row.cpu = cpu.map(|v| median(&v));
        eprintln!(
            "chunk-size {}: {:.2} / {:.2} / {:.2} s, +{} / +{}",
            bytes_str(cs),
            row.secs[0],
            row.secs[1],
            row.secs[2],
            bytes_str(row.added[1]),
            bytes_str(row.added[2])
        );
        crate::remove_dir_if_exists(&store)?;
        rows.push(row);
    }
    crate::remove_dir_if_exists(&dir)?;

    let mut t = Table::new(
        &format!(
            "Chunk size trade-off, {} ext4 image, full + two incrementals rewriting {:.0} % of \
             4 KiB blocks (median time of {} rounds)",
            bytes_str(size),
            image::REWRITE * 100.0,
            ctx.rounds
        ),
        &[
            "chunk size",
            "full",
            "incr 1",
            "incr 2",
            "CPU full / incr 1 / incr 2",
            "stored after full",
            "added by incr 1",
            "added by incr 2",
            "incr growth ÷ image",
        ],
    );
    for r in &rows {
        let t_cell = |s: f64| format!("{} ({:.0} MB/s)", secs_str(s), mbps(size, s));
        t.row(vec![
            bytes_str(r.chunk_size),
            t_cell(r.secs[0]),
            t_cell(r.secs[1]),
            t_cell(r.secs[2]),
            format!("{:.1} / {:.1} / {:.1} s", r.cpu[0], r.cpu[1], r.cpu[2]),
            bytes_str(r.stored[0]),
            bytes_str(r.added[1]),
            bytes_str(r.added[2]),
            format!(
                "{:.1} %",
                (r.added[1] + r.added[2]) as f64 / 2.0 / size as f64 * 100.0
            ),
        ]);
    }
    t.note("Stored bytes are the store directory's apparent size (packs, indexes, manifests).");
    t.note("Smaller chunks store less per incremental but need larger manifests and indexes and more per-chunk work.");
    report.tables.push(t);
    report.set("image_size", size);
    report.set("rows", &rows);
    Ok(report)
}
