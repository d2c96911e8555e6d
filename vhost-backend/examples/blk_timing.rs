//! Side-by-side timing of the vhost-user-blk device against
//! qemu-storage-daemon, measured in the same run with the same blkio client.
//!
//! ```text
//! cargo run --release -p vhost-backend --example blk_timing -- \
//!     [--image PATH] [--size-mib N] [--secs S] [--runs N] \
//!     [--targets file,mem,qsd,qsd-qcow2] [--workloads rr4k-qd1,...]
//! ```
//!
//! The image (1 GiB of random bytes by default) is created if missing and
//! read once so it sits in the page cache. Each run measures every workload
//! on every target, in rotation, so a noisy neighbour on the machine hurts
//! all targets alike; the report gives the median and the range over runs,
//! and ratios of our targets to `qsd` (for writes also to `qsd-qcow2`, a
//! qcow2 overlay over the raw image: the do-it-yourself instant recovery).
//!
//! Targets: `file` is our server on a `FileDevice`, `mem` on a `MemDevice`
//! holding the image (`file@N`, `mem@N`: with an I/O pool of N threads,
//! `@0` runs every request on the queue's worker thread), `qsd` is `qemu-storage-daemon --blockdev driver=file`
//! (default cache mode: page cache, thread-pool AIO) exporting
//! vhost-user-blk, `qsd-qcow2` the same over a fresh qcow2 overlay.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use rand::{Rng, RngCore, SeedableRng};
use vhost_backend::backend::DeviceConfig;
use vhost_backend::block::BlockDevice;
use vhost_backend::mem_device::{FileDevice, MemDevice};
use vhost_backend::serve::{BlockServer, StopHandle};

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
    };
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
            other => return Err(format!("unknown argument {other}")),
        }
    }
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

/// A running target: our server thread or a qemu-storage-daemon process.
enum Running {
    Ours {
        stop: StopHandle,
        thread: Option<JoinHandle<vhost_backend::serve::Result<()>>>,
    },
    Qsd(Child),
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Ours { stop, thread } => {
                stop.stop();
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
            Running::Qsd(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn start_target(
    name: &str,
    image: &Path,
    mem_image: &mut Option<Arc<MemDevice>>,
    dir: &Path,
    queues: usize,
) -> Result<(Running, PathBuf), String> {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    // `file@N` / `mem@N`: our server with an I/O pool of N threads.
    let (name, io_threads) = match name.split_once('@') {
        Some((base, n)) => (
            base,
            n.parse()
                .map_err(|_| format!("bad thread count in {name}"))?,
        ),
        None => (name, DeviceConfig::default_io_threads()),
    };
    let ours = |dev: Arc<dyn BlockDevice>| -> Result<Running, String> {
        let cfg = DeviceConfig {
            num_queues: queues,
            io_threads,
            ..DeviceConfig::default()
        };
        let server = BlockServer::new(dev, cfg).map_err(|e| e.to_string())?;
        let listening = server.bind(&sock).map_err(|e| e.to_string())?;
        let stop = StopHandle::new().map_err(|e| e.to_string())?;
        let thread_stop = stop.clone();
        let thread = thread::spawn(move || server.serve(listening, &thread_stop));
        Ok(Running::Ours {
            stop,
            thread: Some(thread),
        })
    };
    let running = match name {
        "file" => ours(Arc::new(
            FileDevice::open(image, false).map_err(|e| e.to_string())?,
        ))?,
        "mem" => {
            if mem_image.is_none() {
                let bytes = std::fs::read(image).map_err(|e| e.to_string())?;
                *mem_image = Some(Arc::new(MemDevice::from_vec(bytes)));
            }
            ours(mem_image.clone().ok_or("no image")?)?
        }
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
            let child = Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(blockdev)
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                    sock.display()
                ))
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("qemu-storage-daemon: {e}"))?;
            let running = Running::Qsd(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                if Instant::now() > deadline {
                    return Err("qemu-storage-daemon did not create its socket".into());
                }
                thread::sleep(Duration::from_millis(10));
            }
            running
        }
        other => return Err(format!("unknown target {other}")),
    };
    Ok((running, sock))
}

/// Runs `w` for `secs` against the device at `sock`; returns (IOPS, MiB/s).
fn measure(sock: &Path, w: &Workload, secs: f64, size: u64) -> Result<(f64, f64), String> {
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
    Ok((iops, iops * w.block as f64 / MIB as f64))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = prepare_image(&args.image, args.size) {
        eprintln!("prepare image {}: {e}", args.image.display());
        std::process::exit(1);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut mem_image = None;
    // Every target runs for the whole session; each workload is measured
    // on all of them in short back-to-back slices, rotating the order, so
    // the ratios of one repetition compare like conditions.
    let mut running = Vec::new();
    for target in &args.targets {
        match start_target(target, &args.image, &mut mem_image, dir.path(), args.queues) {
            Ok(r) => running.push(r),
            Err(e) => {
                eprintln!("start {target}: {e}");
                std::process::exit(1);
            }
        }
    }
    // results[(workload, target)] = IOPS per repetition
    let mut results: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    for (wi, w) in args.workloads.iter().enumerate() {
        for run in 0..args.runs {
            for k in 0..args.targets.len() {
                let ti = (k + run) % args.targets.len();
                let target = &args.targets[ti];
                let sock = &running[ti].1;
                match measure(sock, w, args.secs, args.size as u64) {
                    Ok((iops, mibs)) => {
                        eprintln!(
                            "run {run} {:<10} {:<10} {:>10.0} IOPS {:>8.1} MiB/s",
                            target, w.name, iops, mibs
                        );
                        results.entry((wi, target.clone())).or_default().push(iops);
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

    println!(
        "\n{:<10} {:<10} {:>12} {:>22} {:>10}",
        "workload", "target", "median IOPS", "range", "MiB/s"
    );
    for (wi, w) in args.workloads.iter().enumerate() {
        for t in &args.targets {
            let Some(v) = results.get(&(wi, t.clone())) else {
                continue;
            };
            let mut v = v.clone();
            let m = median(&mut v);
            println!(
                "{:<10} {:<10} {:>12.0} {:>10.0}..{:<10.0} {:>10.1}",
                w.name,
                t,
                m,
                v[0],
                v[v.len() - 1],
                m * w.block as f64 / MIB as f64
            );
        }
        // Ratios per run (same run, same conditions), then their range.
        for ours in args.targets.iter().filter(|t| !t.starts_with("qsd")) {
            for peer in ["qsd", "qsd-qcow2"] {
                let (Some(a), Some(b)) = (
                    results.get(&(wi, ours.clone())),
                    results.get(&(wi, peer.to_owned())),
                ) else {
                    continue;
                };
                let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
                let m = median(&mut r);
                println!(
                    "{:<10} {ours}/{peer}: median {m:.2}x, range {:.2}..{:.2}x",
                    w.name,
                    r[0],
                    r[r.len() - 1]
                );
            }
        }
    }
}
