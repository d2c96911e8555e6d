//! `io`: the same blkio workloads against our instant-boot daemon (cold
//! and warm chunk cache) and against qemu-storage-daemon exporting the raw
//! image (O_DIRECT + native AIO, and the defaults; from disk and from
//! tmpfs, its memory-speed best) or a qcow2 overlay over it (the
//! do-it-yourself instant recovery).
//!
//! With `--rounds N` every setup runs N times, the setups interleaved
//! round by round (a noisy neighbour hits all of them alike), and the
//! tables show each cell's median. Each cell also records the server's CPU
//! time per completed request: the server process's `utime + stime` from
//! `/proc/PID/stat` (all threads; the same quantity as `perf stat -e
//! task-clock -p PID`) over the workload, divided by the requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    /// qsd, raw image on tmpfs (`/dev/shm`), `cache.direct=on,aio=native`:
    /// memory speed, the strongest peer for warm reads.
    TmpfsDirect,
    /// qsd, raw image, default cache mode, page cache dropped per workload.
    RawCold,
    /// qsd, raw image, default cache mode, image pre-read into the page cache.
    RawWarm,
    /// qsd, qcow2 overlay over the raw image, page cache dropped per workload.
    Qcow2,
}

impl Setup {
    const ALL: [Setup; 7] = [
        Setup::OursCold,
        Setup::OursWarm,
        Setup::TmpfsDirect,
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
            Setup::TmpfsDirect => "qsd raw on tmpfs, cache.direct=on,aio=native",
            Setup::RawCold => "qsd raw, default, cold page cache",
            Setup::RawWarm => "qsd raw, default, warm page cache",
            Setup::Qcow2 => "qsd qcow2 overlay over raw, cold page cache",
        }
    }

    fn warm(self) -> bool {
        matches!(self, Setup::OursWarm | Setup::RawWarm)
    }
}

/// One workload's result on one server: the client's numbers and the
/// server's CPU time per completed request.
#[derive(Debug, Clone, Copy, Serialize)]
struct Cell {
    #[serde(flatten)]
    stats: Stats,
    server_cpu_us_per_request: f64,
}

type Results = BTreeMap<Setup, BTreeMap<&'static str, Cell>>;

/// Runs `w` on `client` and measures the server's CPU meanwhile.
fn run_cell(
    client: &mut Client,
    server: &Server,
    w: &Workload,
    size: u64,
    duration: Duration,
    one_pass: bool,
) -> anyhow::Result<Cell> {
    let before = tools::cpu_seconds(server.pid());
    let stats = client.run(w, size, duration, one_pass)?;
    let cpu = tools::cpu_seconds(server.pid()) - before;
    Ok(Cell {
        stats,
        server_cpu_us_per_request: cpu * 1e6 / stats.ops.max(1) as f64,
    })
}

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
        Setup::TmpfsDirect => {
            let shm = tmpfs_copy(raw)?;
            Server::qsd_raw(&shm, ",cache.direct=on,aio=native", &socket, &log)?
        }
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

/// A copy of `raw` in `/dev/shm` (made once per run, removed by
/// [`remove_tmpfs_copy`]).
fn tmpfs_copy(raw: &Path) -> anyhow::Result<PathBuf> {
    let shm = tmpfs_path();
    if !shm.exists() {
        std::fs::create_dir_all(shm.parent().unwrap_or(Path::new("/dev/shm")))?;
        std::fs::copy(raw, &shm)?;
    }
    Ok(shm)
}

fn tmpfs_path() -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/sidebyside-io-{}/raw.img",
        std::process::id()
    ))
}

fn remove_tmpfs_copy() -> anyhow::Result<()> {
    match tmpfs_path().parent() {
        Some(dir) => Ok(crate::remove_dir_if_exists(dir)?),
        None => Ok(()),
    }
}

/// Runs every workload against `setup`.
fn measure(
    ctx: &Ctx,
    setup: Setup,
    dir: &Path,
    store: &Path,
    raw: &Path,
    size: u64,
) -> anyhow::Result<BTreeMap<&'static str, Cell>> {
    let duration = Duration::from_secs_f64(ctx.duration);
    let mut out = BTreeMap::new();
    if setup == Setup::OursCold {
        // A fresh daemon per workload: every workload starts cold.
        for (i, w) in WORKLOADS.iter().enumerate() {
            let sub = dir.join(format!("w{i}"));
            let server = start(ctx, setup, &sub, store, raw, size)?;
            ctx.cold();
            let mut client = Client::connect_retry(&server.socket, Duration::from_secs(10))?;
            let cell = run_cell(&mut client, &server, w, size, duration, true)?;
            drop(client);
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;
            report_line(setup, w, &cell);
            out.insert(w.name, cell);
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
        let cell = run_cell(&mut client, &server, w, size, duration, !setup.warm())?;
        report_line(setup, w, &cell);
        out.insert(w.name, cell);
    }
    client.flush()?;
    drop(client);
    server.stop()?;
    Ok(out)
}

fn report_line(setup: Setup, w: &Workload, c: &Cell) {
    let s = &c.stats;
    eprintln!(
        "io: {:<45} {:<20} {:>9.0} IOPS {:>8.1} MB/s p99 {:>8.0} us, server {:>6.2} us CPU/req",
        setup.label(),
        w.name,
        s.iops,
        s.mb_per_s,
        s.lat_p99_us,
        c.server_cpu_us_per_request
    );
}

/// The round whose figure is the median of `rounds` (the lower middle one
/// for an even count), so a cell's numbers all come from one run.
fn median_cell(w: &Workload, mut rounds: Vec<Cell>) -> Option<Cell> {
    rounds.sort_by(|a, b| figure(w, &a.stats).total_cmp(&figure(w, &b.stats)));
    let mid = rounds.len().checked_sub(1)? / 2;
    rounds.get(mid).copied()
}

/// The figure a workload is judged by: MB/s for large blocks, IOPS otherwise.
fn figure(w: &Workload, s: &Stats) -> f64 {
    if w.block >= 1 << 20 {
        s.mb_per_s
    } else {
        s.iops
    }
}

fn cell(w: &Workload, c: &Cell) -> String {
    let s = &c.stats;
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

    // Every round runs every setup, interleaved; each cell keeps the
    // median round.
    let mut rounds: BTreeMap<Setup, BTreeMap<&'static str, Vec<Cell>>> = BTreeMap::new();
    for round in 0..ctx.rounds {
        for setup in Setup::ALL {
            eprintln!("io: round {}/{}: {}", round + 1, ctx.rounds, setup.label());
            let sub = dir.join(format!("{setup:?}"));
            let r = measure(ctx, setup, &sub, &ours.store, &raw, size);
            crate::remove_dir_if_exists(&sub)?;
            for (name, c) in r? {
                rounds
                    .entry(setup)
                    .or_default()
                    .entry(name)
                    .or_default()
                    .push(c);
            }
        }
    }
    remove_tmpfs_copy()?;
    crate::remove_dir_if_exists(&dir)?;
    let results: Results = rounds
        .into_iter()
        .map(|(setup, cells)| {
            let cells = WORKLOADS
                .iter()
                .filter_map(|w| {
                    let c = median_cell(w, cells.get(w.name)?.clone())?;
                    Some((w.name, c))
                })
                .collect();
            (setup, cells)
        })
        .collect();

    let mut cols = vec!["server"];
    cols.extend(WORKLOADS.iter().map(|w| w.name));
    cols.push("QD1 read p50 / p99");
    let mut abs = Table::new(
        &format!(
            "blkio workloads on a {} ext4 image, {:.0} s each (IOPS unless noted), median of {} interleaved round(s)",
            bytes_str(size),
            ctx.duration,
            ctx.rounds
        ),
        &cols,
    );
    for (setup, r) in &results {
        let mut row = vec![setup.label().to_string()];
        for w in &WORKLOADS {
            row.push(r.get(w.name).map_or("-".into(), |c| cell(w, c)));
        }
        row.push(r.get(WORKLOADS[0].name).map_or("-".into(), |c| {
            format!("{:.0} / {:.0} µs", c.stats.lat_p50_us, c.stats.lat_p99_us)
        }));
        abs.row(row);
    }
    let mut cpu = Table::new(
        "Server CPU per completed request (µs; utime + stime of the server process over the workload ÷ requests)",
        &cols[..cols.len() - 1],
    );
    for (setup, r) in &results {
        let mut row = vec![setup.label().to_string()];
        for w in &WORKLOADS {
            row.push(r.get(w.name).map_or("-".into(), |c| {
                format!("{:.2}", c.server_cpu_us_per_request)
            }));
        }
        cpu.row(row);
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
            (Some(x), Some(y)) => figure(w, &x.stats) / figure(w, &y.stats),
            _ => f64::NAN,
        }
    };
    let pairs = [
        (Setup::OursWarm, Setup::TmpfsDirect),
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
    report.tables.push(cpu);
    report.tables.push(rel);

    let [qd1, qd32, seq, write] = &WORKLOADS;
    report.target_min(
        &format!("warm {} vs qsd raw on tmpfs (O_DIRECT)", qd32.name),
        ratio(Setup::OursWarm, Setup::TmpfsDirect, qd32),
        1.2,
    );
    report.target_min(
        &format!("warm {} vs qsd raw on tmpfs (O_DIRECT)", qd1.name),
        ratio(Setup::OursWarm, Setup::TmpfsDirect, qd1),
        1.0,
    );
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
    let json: BTreeMap<String, &BTreeMap<&str, Cell>> =
        results.iter().map(|(k, v)| (format!("{k:?}"), v)).collect();
    report.set("results", json);
    Ok(report)
}
