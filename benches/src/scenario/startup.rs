//! `startup`: time from spawning `recovery-cli instant-boot` to its socket
//! and to the first served blkio read, for a 1 GiB image and a 64 GiB
//! sparse one, with a cold and a warm page cache. It must be flat:
//! nothing is read up front.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::client::Client;
use crate::image;
use crate::peers::Ours;
use crate::report::{bytes_str, median, ratio_str, secs_str, Report, Table};
use crate::stack::Server;
use crate::Ctx;

#[derive(Debug, Clone, Serialize)]
struct Timing {
    image_size: u64,
    cold: bool,
    /// qemu-storage-daemon exporting the raw image instead of ours.
    qsd: bool,
    /// Spawn → socket exists, per repetition (s).
    socket: Vec<f64>,
    /// Spawn → blkio connected and started (vhost-user handshake done).
    connected: Vec<f64>,
    /// Spawn → first 4 KiB read completed, per repetition (s).
    first_read: Vec<f64>,
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// One start: spawn, wait for the socket, connect, read 4 KiB, stop.
/// Returns (spawn → socket, → connected, → first read) in seconds.
/// What is started: snapshot `name` of `store`, backed up from `img`.
struct Subject<'a> {
    store: &'a Path,
    name: &'a str,
    img: &'a Path,
    size: u64,
}

fn start_once(
    ctx: &Ctx,
    sub: &Subject<'_>,
    dir: &Path,
    cold: bool,
    qsd: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    let Subject {
        store,
        name,
        img,
        size,
    } = *sub;
    std::fs::create_dir_all(dir)?;
    let mut want = vec![0u8; 4096];
    std::fs::File::open(img)?.read_exact_at(&mut want, 0)?;
    if cold {
        ctx.cold();
    }
    let start = Instant::now();
    let mut server = if qsd {
        Server::qsd_raw(img, "", &dir.join("qsd.sock"), &dir.join("qsd.log"))?
    } else {
        Server::ours(&ctx.cli, store, name, dir, 256 << 20, &[])?
    };
    server.wait_ready(Duration::from_secs(30))?;
    let socket = start.elapsed().as_secs_f64();
    let mut client = Client::connect_retry(&server.socket, Duration::from_secs(30))?;
    let connected = start.elapsed().as_secs_f64();
    let data = client.read(0, 4096)?;
    let first = start.elapsed().as_secs_f64();
    if client.capacity() != size {
        bail!("device capacity {} != image size {size}", client.capacity());
    }
    if data != want {
        bail!("first read returned wrong data");
    }
    drop(client);
    server.stop()?;
    crate::remove_dir_if_exists(dir)?;
    Ok((socket, connected, first))
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    let small_size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 1 << 30 });
    let big_size: u64 = if ctx.quick { 8 << 30 } else { 64 << 30 };
    let small = image::realistic(&ctx.images, small_size)?;
    let big = image::sparse(&ctx.images, big_size, &small)?;
    let dir = ctx.scratch("startup")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    let mut report = ctx.report("startup");

    let mut timings = Vec::new();
    let mut backup_secs = Vec::new();
    for (name, img, size) in [("small", &small, small_size), ("big", &big, big_size)] {
        eprintln!("startup: backing up {}", bytes_str(size));
        let (run, _) = ours.backup(name, img)?;
        backup_secs.push(run.secs);
        let subject = Subject {
            store: &ours.store,
            name,
            img,
            size,
        };
        for (cold, qsd) in [(true, false), (true, true), (false, false), (false, true)] {
            let mut t = Timing {
                image_size: size,
                cold,
                qsd,
                socket: Vec::new(),
                connected: Vec::new(),
                first_read: Vec::new(),
            };
            if !cold {
                // Warm-up start, not counted.
                start_once(ctx, &subject, &dir.join("warmup"), false, qsd)?;
            }
            for rep in 0..ctx.reps {
                let sub = dir.join(format!("{name}-{rep}"));
                let (socket, connected, first) = start_once(ctx, &subject, &sub, cold, qsd)?;
                eprintln!(
                    "startup: {} {} {} rep {rep}: socket {:.1} ms, first read {:.1} ms",
                    if qsd { "qsd" } else { "ours" },
                    bytes_str(size),
                    if cold { "cold" } else { "warm" },
                    socket * 1e3,
                    first * 1e3
                );
                t.socket.push(socket);
                t.connected.push(connected);
                t.first_read.push(first);
            }
            timings.push(t);
        }
    }
    crate::remove_dir_if_exists(&dir)?;

    let mut tab = Table::new(
        &format!(
            "Start-up of `recovery-cli instant-boot` (store snapshot) and of qemu-storage-daemon \
             (raw image), {} repetitions each",
            ctx.reps
        ),
        &[
            "server",
            "image",
            "page cache",
            "spawn → socket (median / max)",
            "spawn → blkio connected (median)",
            "spawn → first 4 KiB read (median / max)",
        ],
    );
    for t in &timings {
        tab.row(vec![
            if t.qsd { "qsd raw" } else { "ours" }.to_string(),
            bytes_str(t.image_size),
            if t.cold { "dropped" } else { "warm" }.to_string(),
            format!(
                "{} / {}",
                secs_str(median(&t.socket)),
                secs_str(max(&t.socket))
            ),
            secs_str(median(&t.connected)),
            format!(
                "{} / {}",
                secs_str(median(&t.first_read)),
                secs_str(max(&t.first_read))
            ),
        ]);
    }
    let by = |size: u64, cold: bool| {
        timings
            .iter()
            .find(|t| t.image_size == size && t.cold == cold && !t.qsd)
            .map_or(f64::NAN, |t| median(&t.first_read))
    };
    let flat_warm = by(big_size, false) / by(small_size, false);
    let flat_cold = by(big_size, true) / by(small_size, true);
    tab.note(format!(
        "{} image: sparse, the {} ext4 image at its start and 1 MiB of random data at its end. \
         Ratio big ÷ small (first read, median): {} warm, {} cold.",
        bytes_str(big_size),
        bytes_str(small_size),
        ratio_str(flat_warm),
        ratio_str(flat_cold)
    ));
    tab.note(format!(
        "\"dropped\": the page cache is dropped right before the spawn, so the times include \
         loading the recovery-cli binary from disk. The first read includes blkio's vhost-user \
         handshake. For scale, backing up the images took {} and {}.",
        secs_str(backup_secs[0]),
        secs_str(backup_secs[1])
    ));
    report.tables.push(tab);
    for t in timings.iter().filter(|t| !t.qsd) {
        let m = median(&t.socket);
        report.target(
            &format!(
                "{} image, {} page cache: socket ready within 100 ms",
                bytes_str(t.image_size),
                if t.cold { "dropped" } else { "warm" }
            ),
            "< 100 ms",
            secs_str(m),
            m < 0.1,
        );
    }
    report.target_max("flat: first read, big ÷ small (warm)", flat_warm, 1.5);
    report.target_max("flat: first read, big ÷ small (cold)", flat_cold, 1.5);
    report.set("timings", &timings);
    report.set("backup_secs", &backup_secs);
    Ok(report)
}
