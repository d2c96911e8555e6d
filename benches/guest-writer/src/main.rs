//! `guest-writer`: the in-guest load of the side-by-side harness's
//! `live-backup-guest` scenario. It runs inside the TCG test guest
//! (`guestmode=exec`), writes 4 KiB blocks at random 4 KiB-aligned
//! offsets of a whole disk with `O_DIRECT` (each write is one virtio-blk
//! request; the time is the guest's own view of it, syscall to completion),
//! paced, from several threads at once, and reports the latencies per
//! *phase*: the host names the current phase by writing `phase NAME` on
//! the serial console, and `stop` ends the run. Each write counts in the
//! phase that was current when it was submitted; a phase named again
//! resumes (its writes are pooled).
//!
//! Settings come from the kernel command line (`/proc/cmdline`):
//! - `writer.serial=S`: the disk is the virtio-blk disk whose serial is S
//!   (`/sys/block/*/serial`), never the root disk by accident;
//! - `writer.threads=N` (default 4): writers, each with one write in flight;
//! - `writer.iops=N` (default 1000): the writes per second of all threads
//!   together, evenly spaced per thread (open loop: a late write is not
//!   made up for by a burst).
//!
//! Console output, one line each:
//! - `WRITER-READY <device> <bytes>` once the disk is open;
//! - `WRITER-PHASE <name>` when a phase starts;
//! - at `stop`, per phase in order: `WRITER-STATS <name> n=<writes>
//!   p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=.. errors=..`;
//! - then `WRITER-DONE`; `WRITER-FAIL <why>` if it cannot run.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Linux x86-64 `O_DIRECT`.
const O_DIRECT: i32 = 0o40000;
const BLOCK: usize = 4096;

#[derive(Debug)]
struct Config {
    serial: String,
    threads: usize,
    iops: u64,
}

fn config(cmdline: &str) -> Result<Config, String> {
    let mut c = Config {
        serial: String::new(),
        threads: 4,
        iops: 1000,
    };
    for arg in cmdline.split_whitespace() {
        let Some((key, value)) = arg.split_once('=') else {
            continue;
        };
        let num = |v: &str| {
            v.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{key}={v}: not a positive number"))
        };
        match key {
            "writer.serial" => c.serial = value.to_string(),
            "writer.threads" => c.threads = num(value)? as usize,
            "writer.iops" => c.iops = num(value)?,
            _ => {}
        }
    }
    if c.serial.is_empty() {
        return Err("no writer.serial= on the kernel command line".into());
    }
    Ok(c)
}

/// `/dev/<name>` of the block device whose serial is `serial`.
fn device_with_serial(serial: &str) -> Result<String, String> {
    let dir = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for entry in dir.flatten() {
        let s = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            return Ok(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    Err(format!("no disk with serial {serial}"))
}

/// xorshift64*: offsets need no more.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One write: the phase it was submitted in, its latency in µs (`u32::MAX`
/// for an error).
type Sample = (u16, u32);

fn writer(
    file: &File,
    blocks: u64,
    interval: Duration,
    seed: u64,
    phase: &AtomicUsize,
    stop: &AtomicBool,
) -> Vec<Sample> {
    // O_DIRECT needs a block-aligned buffer: the aligned block inside a
    // buffer twice its size.
    let mut raw = vec![0u8; 2 * BLOCK];
    let skip = raw.as_ptr().align_offset(BLOCK);
    let buf = &mut raw[skip..skip + BLOCK];
    let mut rng = Rng(seed | 1);
    for b in buf.chunks_mut(8) {
        b.copy_from_slice(&rng.next().to_le_bytes());
    }
    let mut samples = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        // Open loop: after a stall, resume the pace from now rather than
        // sending the missed writes in a burst.
        let now = Instant::now();
        if next < now {
            next = now;
        }
        let offset = rng.next() % blocks * BLOCK as u64;
        buf[..8].copy_from_slice(&rng.next().to_le_bytes());
        let p = phase.load(Ordering::Relaxed) as u16;
        let t = Instant::now();
        let lat = match file.write_all_at(buf, offset) {
            Ok(()) => t.elapsed().as_micros().min(u32::MAX as u128 - 1) as u32,
            Err(_) => u32::MAX,
        };
        samples.push((p, lat));
    }
    samples
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn run() -> Result<(), String> {
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let cfg = config(&cmdline)?;
    let dev = device_with_serial(&cfg.serial)?;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&dev)
        .map_err(|e| format!("open {dev}: {e}"))?;
    let size = std::fs::read_to_string(format!("/sys/class/block/{}/size", &dev[5..]))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .ok_or_else(|| format!("size of {dev} unknown"))?;
    let blocks = size / BLOCK as u64;
    if blocks == 0 {
        return Err(format!("{dev} is smaller than one block"));
    }
    let interval = Duration::from_secs_f64(cfg.threads as f64 / cfg.iops as f64);
    let names = Arc::new(Mutex::new(vec!["start".to_string()]));
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let file = Arc::new(file);
    println!("WRITER-READY {dev} {size}");
    let workers: Vec<_> = (0..cfg.threads)
        .map(|k| {
            let (file, phase, stop) = (file.clone(), phase.clone(), stop.clone());
            std::thread::spawn(move || {
                writer(
                    &file,
                    blocks,
                    interval,
                    0x9e37_79b9 * (k as u64 + 1),
                    &phase,
                    &stop,
                )
            })
        })
        .collect();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line == "stop" {
            break;
        }
        if let Some(name) = line.strip_prefix("phase ") {
            let name = name.trim();
            let mut names = names.lock().unwrap_or_else(|e| e.into_inner());
            let index = match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
            phase.store(index, Ordering::Relaxed);
            println!("WRITER-PHASE {name}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_phase: Vec<Vec<u32>> = vec![Vec::new(); names.lock().map_or(0, |n| n.len())];
    for w in workers {
        for (p, lat) in w
            .join()
            .map_err(|_| "a writer thread panicked".to_string())?
        {
            if let Some(v) = per_phase.get_mut(p as usize) {
                v.push(lat);
            }
        }
    }
    let names = names.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = std::io::stdout().lock();
    for (name, mut lat) in names.iter().zip(per_phase) {
        let errors = lat.iter().filter(|&&l| l == u32::MAX).count();
        lat.retain(|&l| l != u32::MAX);
        lat.sort_unstable();
        let _ = writeln!(
            out,
            "WRITER-STATS {name} n={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} errors={errors}",
            lat.len(),
            percentile(&lat, 0.50),
            percentile(&lat, 0.90),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
            lat.last().copied().unwrap_or(0),
        );
    }
    let _ = writeln!(out, "WRITER-DONE");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        println!("WRITER-FAIL {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_the_writer_settings_only() {
        let c = config("console=ttyS0 writer.serial=data writer.threads=2 writer.iops=500 quiet")
            .unwrap();
        assert_eq!((c.serial.as_str(), c.threads, c.iops), ("data", 2, 500));
        assert!(config("console=ttyS0")
            .unwrap_err()
            .contains("writer.serial"));
        assert!(config("writer.serial=d writer.iops=0").is_err());
        assert!(config("writer.serial=d writer.threads=x").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 0.999), 100);
        assert_eq!(percentile(&[], 0.99), 0);
        assert_eq!(percentile(&[7], 0.5), 7);
    }
}
