//! `startup`: time from spawning `recovery-cli instant-boot` to its socket
//! and to the first served blkio read, for a 1 GiB image and a 64 GiB
//! sparse one. It must be flat: nothing is read up front.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Client;
use crate::image;
use crate::peers::Ours;
use crate::report::{bytes_str, ratio_str, secs_str, Report, Table};
use crate::stack::Server;
use crate::Ctx;

#[derive(Debug, Clone, Serialize)]
struct Timing {
    image_size: u64,
    /// Spawn → socket exists, per repetition (s).
    socket: Vec<f64>,
    /// Spawn → first 4 KiB read completed, per repetition (s).
    first_read: Vec<f64>,
    backup_secs: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
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
    let mut report = Report::new("startup", ctx.cache_mode());

    let mut timings = Vec::new();
    for (name, img, size) in [("small", &small, small_size), ("big", &big, big_size)] {
        eprintln!("startup: backing up {}", bytes_str(size));
        let (run, _) = ours.backup(name, img)?;
        let mut t = Timing {
            image_size: size,
            socket: Vec::new(),
            first_read: Vec::new(),
            backup_secs: run.secs,
        };
        for rep in 0..ctx.reps {
            let sub = dir.join(format!("{name}-{rep}"));
            std::fs::create_dir_all(&sub)?;
            ctx.cold();
            let start = Instant::now();
            let mut server = Server::ours(&ctx.cli, &ours.store, name, &sub, 256 << 20, &[])?;
            server.wait_ready(Duration::from_secs(30))?;
            let socket = start.elapsed().as_secs_f64();
            let mut client = Client::connect_retry(&server.socket, Duration::from_secs(30))?;
            let data = client.read(0, 4096)?;
            let first = start.elapsed().as_secs_f64();
            if client.capacity() != size {
                anyhow::bail!("device capacity {} != image size {size}", client.capacity());
            }
            let mut want = vec![0u8; 4096];
            std::fs::File::open(img)?.read_exact_at(&mut want, 0)?;
            if data != want {
                anyhow::bail!("first read returned wrong data");
            }
            drop(client);
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;
            eprintln!(
                "startup: {} rep {rep}: socket {:.1} ms, first read {:.1} ms",
                bytes_str(size),
                socket * 1e3,
                first * 1e3
            );
            t.socket.push(socket);
            t.first_read.push(first);
        }
        timings.push(t);
    }
    crate::remove_dir_if_exists(&dir)?;

    let mut tab = Table::new(
        &format!(
            "`recovery-cli instant-boot` start-up ({} repetitions, page cache dropped before each)",
            ctx.reps
        ),
        &[
            "image",
            "spawn → socket (median / max)",
            "spawn → first 4 KiB read (median / max)",
            "backup of the image (for scale)",
        ],
    );
    for t in &timings {
        tab.row(vec![
            bytes_str(t.image_size),
            format!(
                "{} / {}",
                secs_str(median(&t.socket)),
                secs_str(max(&t.socket))
            ),
            format!(
                "{} / {}",
                secs_str(median(&t.first_read)),
                secs_str(max(&t.first_read))
            ),
            secs_str(t.backup_secs),
        ]);
    }
    let flat = median(&timings[1].first_read) / median(&timings[0].first_read);
    tab.note(format!(
        "{} image: sparse, the {} ext4 image at its start and 1 MiB of random data at its end. \
         Ratio big ÷ small (first read, median): {}.",
        bytes_str(big_size),
        bytes_str(small_size),
        ratio_str(flat)
    ));
    tab.note("The first read includes blkio's vhost-user handshake (connect, features, memory table, queue setup).");
    report.tables.push(tab);
    for t in &timings {
        let m = median(&t.socket);
        report.target(
            &format!(
                "{} image: ready for QEMU (socket) within 100 ms",
                bytes_str(t.image_size)
            ),
            "< 100 ms",
            secs_str(m),
            m < 0.1,
        );
    }
    report.target_max("start-up is flat: first read, big ÷ small", flat, 1.5);
    report.set("timings", &timings);
    Ok(report)
}
