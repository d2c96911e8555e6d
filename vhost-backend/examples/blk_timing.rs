//! Side-by-side timing of the vhost-user-blk device against
//! qemu-storage-daemon, measured in the same run with the same blkio client.
//!
//! ```text
//! cargo run --release -p vhost-backend --example blk_timing -- \
//!     [--image PATH] [--size-mib N] [--secs S] [--runs N] [--queues N] \
//!     [--targets file,mem,qsd,qsd-qcow2] [--workloads rr4k-qd1,...]
//! ```
//!
//! The image (1 GiB of random bytes by default) is created if missing and
//! read once so it sits in the page cache. Every target is a server process
//! of its own, started once: `file` is our server on a `FileDevice`, `mem`
//! on a `MemDevice` holding the image (`file@N`, `mem@N`: with an I/O pool
//! of N threads, `@0` runs every request on the queue's worker thread),
//! `qsd` is `qemu-storage-daemon --blockdev driver=file` (default cache
//! mode: page cache, thread-pool AIO) exporting vhost-user-blk, and
//! `qsd-qcow2` the same over a fresh qcow2 overlay on the image (the
//! do-it-yourself instant recovery).
//!
//! `base:file` runs `--serve file` from the binary named by the
//! `BLK_TIMING_BASE` environment variable: an older build, for before/after
//! comparisons in the same run.
//!
//! Each workload is measured on every target in short back-to-back slices,
//! rotating the order, `--runs` times; the report gives the median and the
//! range, and per-repetition ratios of our targets to the peers. Besides
//! IOPS it reports the server's CPU time per request (all its threads,
//! from `/proc/PID/task/*/schedstat`), which a busy machine disturbs much
//! less than throughput.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use block::mem_device::{FileDevice, MemDevice};
use block::BlockDevice;
use rand::{Rng, RngCore, SeedableRng};
use vhost_backend::device::DeviceConfig;
use vhost_backend::socket::{BlockServer, StopHandle};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    sequential: bool,
    write: bool,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "rr4k-qd1",
        block: 4 * KIB,
        depth: 1,
        sequential: false,
        write: false,
    },
    Workload {
        name: "rr4k-qd32",
        block: 4 * KIB,
        depth: 32,
        sequential: false,
        write: false,
    },
    Workload {
        name: "sr1m-qd4",
        block: MIB,
        depth: 4,
        sequential: true,
        write: false,
    },
    Workload {
        name: "sr1m-qd32",
        block: MIB,
        depth: 32,
        sequential: true,
        write: false,
    },
    Workload {
        name: "sr1m-qd1",
        block: MIB,
        depth: 1,
        sequential: true,
        write: false,
    },
    Workload {
        name: "rw4k-qd32",
        block: 4 * KIB,
        depth: 32,
        sequential: false,
        write: true,
    },
];

struct Args {
    image: PathBuf,
    size: usize,
    secs: f64,
    runs: usize,
    targets: Vec<String>,
    workloads: Vec<Workload>,
    queues: usize,
    /// Internal: run our server `NAME` on `SOCKET` (`--serve NAME --socket SOCKET`).
    serve: Option<(String, PathBuf)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        image: std::env::temp_dir().join("blk_timing.img"),
        size: 1024 * MIB,
        secs: 3.0,
        runs: 3,
        targets: vec!["file".into(), "mem".into(), "qsd".into()],
        workloads: WORKLOADS
            .iter()
            .copied()
            .filter(|w| w.name != "sr1m-qd1")
            .collect(),
        queues: 1,
        serve: None,
    };
    let mut serve_name = None;
    let mut socket = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--image" => args.image = value()?.into(),
            "--size-mib" => args.size = value()?.parse::<usize>().map_err(|e| e.to_string())? * MIB,
            "--secs" => {
                args.secs = value()?
                    .parse()
                    .map_err(|e: std::num::ParseFloatError| e.to_string())?
            }
            "--runs" => {
                args.runs = value()?
                    .parse()
                    .map_err(|e: std::num::ParseIntError| e.to_string())?
            }
            "--queues" => {
                args.queues = value()?
                    .parse()
                    .map_err(|e: std::num::ParseIntError| e.to_string())?
            }
            "--targets" => args.targets = value()?.split(',').map(str::to_owned).collect(),
            "--workloads" => {
                let names = value()?;
                args.workloads = names
                    .split(',')
                    .map(|n| {
                        WORKLOADS
                            .iter()
                            .find(|w| w.name == n)
                            .copied()
                            .ok_or(format!("unknown workload {n}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--serve" => serve_name = Some(value()?),
            "--socket" => socket = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    args.serve = serve_name.zip(socket);
    Ok(args)
}

/// Creates the image if it is missing or has the wrong size, then reads it
/// once so it is in the page cache.
fn prepare_image(path: &Path, size: usize) -> io::Result<()> {
    if std::fs::metadata(path).map(|m| m.len() as usize).ok() != Some(size) {
        let mut f = File::create(path)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut buf = vec![0u8; 4 * MIB];
        for _ in 0..size / buf.len() {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf)?;
        }
        f.sync_all()?;
    }
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 4 * MIB];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// A target server in its own process, so its CPU time can be read.
struct Running {
    child: Child,
    sock: PathBuf,
}

impl Running {
    /// CPU time of the server so far (user + system, every thread,
    /// including threads that have exited), in nanoseconds.
    fn cpu_ns(&self) -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return 0;
        };
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line, in clock ticks.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
            .sum();
        // /proc reports USER_HZ ticks, 100 per second on Linux.
        ticks * 10_000_000
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts target `name` serving `image` on a socket in `dir`.
fn start_target(name: &str, image: &Path, dir: &Path, queues: usize) -> Result<Running, String> {
    let sock = dir.join(format!("{}.sock", name.replace(['@', ':'], "-")));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = match name {
        "qsd" | "qsd-qcow2" => {
            let blockdev = if name == "qsd" {
                format!("driver=file,node-name=f,filename={}", image.display())
            } else {
                let overlay = dir.join("overlay.qcow2");
                let _ = std::fs::remove_file(&overlay);
                let status = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(image)
                    .arg(&overlay)
                    .status()
                    .map_err(|e| format!("qemu-img: {e}"))?;
                if !status.success() {
                    return Err("qemu-img create failed".into());
                }
                format!(
                    "driver=qcow2,node-name=f,file.driver=file,file.filename={}",
                    overlay.display()
                )
            };
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev")
                .arg(blockdev)
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues}",
                    sock.display()
                ));
            cmd
        }
        _ => {
            // `base:NAME`: the same server built from another revision, for
            // before/after runs (the binary named by BLK_TIMING_BASE).
            let (exe, name) = match name.strip_prefix("base:") {
                Some(rest) => (
                    PathBuf::from(
                        std::env::var_os("BLK_TIMING_BASE").ok_or("BLK_TIMING_BASE is not set")?,
                    ),
                    rest,
                ),
                None => (std::env::current_exe().map_err(|e| e.to_string())?, name),
            };
            let mut cmd = Command::new(exe);
            cmd.arg("--serve")
                .arg(name)
                .arg("--socket")
                .arg(&sock)
                .arg("--image")
                .arg(image)
                .arg("--queues")
                .arg(queues.to_string());
            cmd
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {name}: {e}"))?;
    let running = Running { child, sock };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running.sock.exists() {
        if Instant::now() > deadline {
            return Err(format!("{name} did not create its socket"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(running)
}

/// The `--serve NAME` mode: our server on `image` until killed.
/// `file` is a `FileDevice`, `mem` a `MemDevice` holding the image;
/// `@N` sets the I/O pool size (`@0`: requests run on the queue workers).
fn serve(name: &str, sock: &Path, image: &Path, queues: usize) -> Result<(), String> {
    let (kind, io_threads) = match name.split_once('@') {
        Some((kind, n)) => (
            kind,
            n.parse()
                .map_err(|_| format!("bad thread count in {name}"))?,
        ),
        None => (name, DeviceConfig::default_io_threads()),
    };
    let dev: Arc<dyn BlockDevice> = match kind {
        "file" => Arc::new(FileDevice::open(image, false).map_err(|e| e.to_string())?),
        "mem" => Arc::new(MemDevice::from_vec(
            std::fs::read(image).map_err(|e| e.to_string())?,
        )),
        other => return Err(format!("unknown target {other}")),
    };
    let cfg = DeviceConfig {
        num_queues: queues,
        io_threads,
        ..DeviceConfig::default()
    };
    let server = BlockServer::new(dev, cfg).map_err(|e| e.to_string())?;
    let stop = StopHandle::new().map_err(|e| e.to_string())?;
    server
        .bind_and_serve(sock, &stop)
        .map_err(|e| e.to_string())
}

/// Runs `w` for `secs` against the device at `sock`; returns (IOPS, MiB/s,
/// requests completed).
fn measure(sock: &Path, w: &Workload, secs: f64, size: u64) -> Result<(f64, f64, u64), String> {
    let e = |e: blkio::Error| e.to_string();
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(e)?;
    blkio
        .set_str("path", sock.to_str().ok_or("path")?)
        .map_err(e)?;
    blkio.connect().map_err(e)?;
    blkio.set_i32("num-queues", 1).map_err(e)?;
    let mut q = blkio.start().map_err(e)?.queues.remove(0);
    let region = blkio.alloc_mem_region(w.depth * w.block).map_err(e)?;
    blkio.map_mem_region(&region).map_err(e)?;
    if w.write {
        let mut mem = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", region.fd))
            .map_err(|e| e.to_string())?;
        let mut data = vec![0u8; region.len];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
        mem.write_all(&data).map_err(|e| e.to_string())?;
    }

    let blocks = size / w.block as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut next_seq = 0u64;
    let mut next_offset = || {
        let b = if w.sequential {
            let b = next_seq;
            next_seq = (next_seq + 1) % blocks;
            b
        } else {
            rng.gen_range(0..blocks)
        };
        b * w.block as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
        let buf = region.addr + slot * w.block;
        if w.write {
            q.write(offset, buf as *const u8, w.block, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf as *mut u8, w.block, slot, ReqFlags::empty());
        }
    };

    for slot in 0..w.depth {
        submit(&mut q, slot, next_offset());
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    let mut outstanding = w.depth;
    while outstanding > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(e)?;
        if n == 0 {
            return Err("request timed out".into());
        }
        let more = Instant::now() < deadline;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("request failed: {}", c.ret));
            }
            done += 1;
            if more {
                submit(&mut q, c.user_data, next_offset());
            } else {
                outstanding -= 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let iops = done as f64 / elapsed;
    Ok((iops, iops * w.block as f64 / MIB as f64, done))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Some((name, sock)) = &args.serve {
        if let Err(e) = serve(name, sock, &args.image, args.queues) {
            eprintln!("serve {name}: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = prepare_image(&args.image, args.size) {
        eprintln!("prepare image {}: {e}", args.image.display());
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // Every target runs for the whole session; each workload is measured
    // on all of them in short back-to-back slices, rotating the order, so
    // the ratios of one repetition compare like conditions.
    let mut running = Vec::new();
    for target in &args.targets {
        match start_target(target, &args.image, dir.path(), args.queues) {
            Ok(r) => running.push(r),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    // results[(workload, target)] = (IOPS, server CPU µs per request) per repetition
    let mut results: BTreeMap<(usize, String), Vec<(f64, f64)>> = BTreeMap::new();
    for (wi, w) in args.workloads.iter().enumerate() {
        for run in 0..args.runs {
            for k in 0..args.targets.len() {
                let ti = (k + run) % args.targets.len();
                let target = &args.targets[ti];
                let cpu_before = running[ti].cpu_ns();
                match measure(&running[ti].sock, w, args.secs, args.size as u64) {
                    Ok((iops, mibs, requests)) => {
                        let cpu = running[ti].cpu_ns().saturating_sub(cpu_before) as f64 / 1e3;
                        let per_req = cpu / requests as f64;
                        eprintln!(
                            "run {run} {target:<10} {:<10} {iops:>10.0} IOPS {mibs:>8.1} MiB/s \
                             {per_req:>7.2} us CPU/req",
                            w.name
                        );
                        results
                            .entry((wi, target.clone()))
                            .or_default()
                            .push((iops, per_req));
                    }
                    Err(e) => {
                        eprintln!("run {run} {target} {}: {e}", w.name);
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    drop(running);
    report(&args, &results);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(args: &Args, results: &BTreeMap<(usize, String), Vec<(f64, f64)>>) {
    println!(
        "\n{:<10} {:<10} {:>11} {:>23} {:>9} {:>12}",
        "workload", "target", "median IOPS", "range", "MiB/s", "us CPU/req"
    );
    for (wi, w) in args.workloads.iter().enumerate() {
        for t in &args.targets {
            let Some(v) = results.get(&(wi, t.clone())) else {
                continue;
            };
            let mut iops: Vec<f64> = v.iter().map(|r| r.0).collect();
            let mut cpu: Vec<f64> = v.iter().map(|r| r.1).collect();
            let m = median(&mut iops);
            println!(
                "{:<10} {:<10} {:>11.0} {:>11.0}..{:<11.0} {:>9.1} {:>12.2}",
                w.name,
                t,
                m,
                iops[0],
                iops[iops.len() - 1],
                m * w.block as f64 / MIB as f64,
                median(&mut cpu)
            );
        }
        // Ratios per repetition (same conditions), then their median and
        // range; for CPU, peer cost / our cost (above 1: we are cheaper).
        for ours in args.targets.iter().filter(|t| !t.starts_with("qsd")) {
            for peer in ["qsd", "qsd-qcow2"] {
                let (Some(a), Some(b)) = (
                    results.get(&(wi, ours.clone())),
                    results.get(&(wi, peer.to_owned())),
                ) else {
                    continue;
                };
                let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a.0 / b.0).collect();
                let mut c: Vec<f64> = a.iter().zip(b).map(|(a, b)| b.1 / a.1).collect();
                let (m, mc) = (median(&mut r), median(&mut c));
                println!(
                    "{:<10} {ours}/{peer}: IOPS {m:.2}x ({:.2}..{:.2}), CPU efficiency {mc:.2}x ({:.2}..{:.2})",
                    w.name,
                    r[0],
                    r[r.len() - 1],
                    c[0],
                    c[c.len() - 1]
                );
            }
        }
    }
}
