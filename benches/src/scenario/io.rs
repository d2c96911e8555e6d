//! `io`: the same blkio workloads against our instant-boot daemon (cold
//! and warm chunk cache) and against qemu-storage-daemon exporting the raw
//! image (O_DIRECT + native AIO, and the defaults) or a qcow2 overlay over
//! it (the do-it-yourself instant recovery).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::client::{Client, Pattern, Stats, Workload, WORKLOADS};
use crate::image;
use crate::peers::Ours;
use crate::report::{bytes_str, ratio_str, Report, Table};
use crate::stack::Server;
use crate::tools;
use crate::Ctx;

/// A server configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Setup {
    /// Ours, a fresh daemon (empty chunk cache, default 256 MiB budget,
    /// fresh overlay) and a dropped page cache for every workload.
    OursCold,
    /// Ours with a cache larger than the image, pre-read once.
    OursWarm,
    /// qsd, raw image, `cache.direct=on,aio=native`.
    RawDirect,
    /// qsd, raw image, default cache mode, page cache dropped per workload.
    RawCold,
    /// qsd, raw image, default cache mode, image pre-read into the page cache.
    RawWarm,
    /// qsd, qcow2 overlay over the raw image, page cache dropped per workload.
    Qcow2,
}

impl Setup {
    const ALL: [Setup; 6] = [
        Setup::OursCold,
        Setup::OursWarm,
        Setup::RawDirect,
        Setup::RawCold,
        Setup::RawWarm,
        Setup::Qcow2,
    ];

    fn label(self) -> &'static str {
        match self {
            Setup::OursCold => "ours, cold cache",
            Setup::OursWarm => "ours, warm cache",
            Setup::RawDirect => "qsd raw, cache.direct=on,aio=native",
            Setup::RawCold => "qsd raw, default, cold page cache",
            Setup::RawWarm => "qsd raw, default, warm page cache",
            Setup::Qcow2 => "qsd qcow2 overlay over raw, cold page cache",
        }
    }

    fn warm(self) -> bool {
        matches!(self, Setup::OursWarm | Setup::RawWarm)
    }
}

type Results = BTreeMap<Setup, BTreeMap<&'static str, Stats>>;

/// Starts the server for `setup` in `dir`.
fn start(
    ctx: &Ctx,
    setup: Setup,
    dir: &Path,
    store: &Path,
    raw: &Path,
    size: u64,
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("qsd.sock");
    let log = dir.join("qsd.log");
    let mut server = match setup {
        Setup::OursCold => Server::ours(&ctx.cli, store, "disk", dir, 256 << 20, &[])?,
        Setup::OursWarm => Server::ours(&ctx.cli, store, "disk", dir, 2 * size, &[])?,
        Setup::RawDirect => Server::qsd_raw(raw, ",cache.direct=on,aio=native", &socket, &log)?,
        Setup::RawCold | Setup::RawWarm => Server::qsd_raw(raw, "", &socket, &log)?,
        Setup::Qcow2 => {
            let ovl = dir.join("overlay.qcow2");
            tools::run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(raw)
                    .arg(&ovl),
            )?;
            Server::qsd_qcow2(&ovl, &socket, &log)?
        }
    };
    server.wait_ready(Duration::from_secs(30))?;
    Ok(server)
}

/// Runs every workload against `setup`.
fn measure(
    ctx: &Ctx,
    setup: Setup,
    dir: &Path,
    store: &Path,
    raw: &Path,
    size: u64,
) -> anyhow::Result<BTreeMap<&'static str, Stats>> {
    let duration = Duration::from_secs_f64(ctx.duration);
    let mut out = BTreeMap::new();
    if setup == Setup::OursCold {
        // A fresh daemon per workload: every workload starts cold.
        for (i, w) in WORKLOADS.iter().enumerate() {
            let sub = dir.join(format!("w{i}"));
            let server = start(ctx, setup, &sub, store, raw, size)?;
            ctx.cold();
            let mut client = Client::connect_retry(&server.socket, Duration::from_secs(10))?;
            let stats = client.run(w, size, duration, true)?;
            drop(client);
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;
            report_line(setup, w, &stats);
            out.insert(w.name, stats);
        }
        return Ok(out);
    }
    let server = start(ctx, setup, dir, store, raw, size)?;
    let mut client = Client::connect_retry(&server.socket, Duration::from_secs(10))?;
    if setup.warm() {
        ctx.cold();
        client.read_all()?;
    }
    // Reads first: the write workload changes what later reads would see.
    let mut order: Vec<&Workload> = WORKLOADS.iter().collect();
    order.sort_by_key(|w| w.pattern == Pattern::RandWrite);
    for w in order {
        if !setup.warm() {
            ctx.cold();
        }
        let stats = client.run(w, size, duration, !setup.warm())?;
        report_line(setup, w, &stats);
        out.insert(w.name, stats);
    }
    client.flush()?;
    drop(client);
    server.stop()?;
    Ok(out)
}

fn report_line(setup: Setup, w: &Workload, s: &Stats) {
    eprintln!(
        "io: {:<45} {:<20} {:>9.0} IOPS {:>8.1} MB/s p99 {:>8.0} us",
        setup.label(),
        w.name,
        s.iops,
        s.mb_per_s,
        s.lat_p99_us
    );
}

/// The figure a workload is judged by: MB/s for large blocks, IOPS otherwise.
fn figure(w: &Workload, s: &Stats) -> f64 {
    if w.block >= 1 << 20 {
        s.mb_per_s
    } else {
        s.iops
    }
}

fn cell(w: &Workload, s: &Stats) -> String {
    if w.block >= 1 << 20 {
        format!("{:.0} MB/s", s.mb_per_s)
    } else {
        format!("{:.0}", s.iops)
    }
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("qemu-storage-daemon")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 1 << 30 });
    let img = image::realistic(&ctx.images, size)?;
    let dir = ctx.scratch("io")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("disk", &img)?;
    let raw = dir.join("raw.img");
    std::fs::copy(&img, &raw)?;
    let mut report = ctx.report("io");

    let mut results: Results = BTreeMap::new();
    for setup in Setup::ALL {
        let sub = dir.join(format!("{setup:?}"));
        let r = measure(ctx, setup, &sub, &ours.store, &raw, size)?;
        results.insert(setup, r);
    }
    crate::remove_dir_if_exists(&dir)?;

    let mut cols = vec!["server"];
    cols.extend(WORKLOADS.iter().map(|w| w.name));
    cols.push("QD1 read p50 / p99");
    let mut abs = Table::new(
        &format!(
            "blkio workloads on a {} ext4 image, {:.0} s each (IOPS unless noted)",
            bytes_str(size),
            ctx.duration
        ),
        &cols,
    );
    for (setup, r) in &results {
        let mut row = vec![setup.label().to_string()];
        for w in &WORKLOADS {
            row.push(r.get(w.name).map_or("-".into(), |s| cell(w, s)));
        }
        row.push(r.get(WORKLOADS[0].name).map_or("-".into(), |s| {
            format!("{:.0} / {:.0} µs", s.lat_p50_us, s.lat_p99_us)
        }));
        abs.row(row);
    }
    abs.note(
        "Client: libblkio virtio-blk-vhost-user, 1 queue, buffers in one mapped memfd region; \
         QD32 keeps 32 requests in flight (submit, reap with min_completions = 1, resubmit).",
    );
    abs.note(
        "Ours: `recovery-cli instant-boot` (64 KiB chunks, overlay in a fresh --state); cold = a \
         fresh daemon with an empty 256 MiB cache and a dropped page cache for every workload; \
         warm = cache budget 2× the image, whole image read once first.",
    );
    abs.note(
        "qsd: qemu-storage-daemon --export vhost-user-blk; cold rows drop the page cache before \
         each workload, the warm row reads the whole image once first.",
    );
    abs.note(
        "Cold sequential reads stop after one pass over the image (or the duration), so they \
         stay cold; warm ones wrap around. Random reads over the whole image for the full \
         duration warm up as they go, for every server alike.",
    );

    let ratio = |a: Setup, b: Setup, w: &Workload| -> f64 {
        match (
            results.get(&a).and_then(|r| r.get(w.name)),
            results.get(&b).and_then(|r| r.get(w.name)),
        ) {
            (Some(x), Some(y)) => figure(w, x) / figure(w, y),
            _ => f64::NAN,
        }
    };
    let pairs = [
        (Setup::OursWarm, Setup::RawWarm),
        (Setup::OursWarm, Setup::RawDirect),
        (Setup::OursCold, Setup::RawDirect),
        (Setup::OursCold, Setup::RawCold),
        (Setup::OursCold, Setup::Qcow2),
        (Setup::OursWarm, Setup::Qcow2),
    ];
    let mut cols = vec!["ratio"];
    cols.extend(WORKLOADS.iter().map(|w| w.name));
    let mut rel = Table::new("Ratios (ours ÷ peer; > 1 means we are faster)", &cols);
    for (a, b) in pairs {
        let mut row = vec![format!("{} ÷ {}", a.label(), b.label())];
        row.extend(WORKLOADS.iter().map(|w| ratio_str(ratio(a, b, w))));
        rel.row(row);
    }
    report.tables.push(abs);
    report.tables.push(rel);

    let [qd1, qd32, seq, write] = &WORKLOADS;
    for (w, base) in [
        (qd1, Setup::RawWarm),
        (qd32, Setup::RawWarm),
        (seq, Setup::RawWarm),
    ] {
        report.target_min(
            &format!("warm {} vs qsd raw (page cache warm)", w.name),
            ratio(Setup::OursWarm, base, w),
            1.0,
        );
    }
    for w in [qd1, qd32, seq] {
        report.target_min(
            &format!("warm {} vs qsd raw (O_DIRECT)", w.name),
            ratio(Setup::OursWarm, Setup::RawDirect, w),
            1.0,
        );
    }
    for w in [qd1, qd32] {
        report.target_min(
            &format!("cold {} vs qsd raw (O_DIRECT)", w.name),
            ratio(Setup::OursCold, Setup::RawDirect, w),
            0.5,
        );
    }
    report.target_min(
        &format!("{} vs qsd qcow2 overlay (cold)", write.name),
        ratio(Setup::OursCold, Setup::Qcow2, write),
        1.0,
    );
    report.set("image_size", size);
    report.set("duration_s", ctx.duration);
    let json: BTreeMap<String, &BTreeMap<&str, Stats>> =
        results.iter().map(|(k, v)| (format!("{k:?}"), v)).collect();
    report.set("results", json);
    Ok(report)
}
