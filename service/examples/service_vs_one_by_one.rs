//! Service backup time against backing the VMs up one by one: three real
//! QEMUs (`-M none`, one 128 MiB raw disk of random data each). Each round
//! sets up fresh VMs and a fresh store per mode (interleaved: group, then
//! one by one) and times a full backup of every disk, then an incremental
//! after 16 MiB of random writes per disk through QEMU:
//! - `group`: one `backup --plan` group point (one window, the members
//!   read `PARALLEL_READS` VMs at once);
//! - `one-by-one`: one single-VM live backup after the other.
//!
//! Prints wall seconds and this process's CPU seconds (user + system;
//! QEMU's own is not counted) per mode, the median over the rounds.
//!
//! `cargo run --release -p service --example service_vs_one_by_one`

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hypervisor::live_backup;
use hypervisor::qmp::Qmp;
use hypervisor::testing;
use serde_json::json;
use service::{backup, Plan};

const VMS: usize = 3;
const DISK: usize = 128 << 20;
const CHANGE: usize = 16 << 20;
const ROUNDS: usize = 3;

/// Deterministic incompressible bytes (xorshift64*).
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    _procs: Vec<testing::Proc>,
    qmps: Vec<PathBuf>,
    plan: Plan,
}

fn setup(seed: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    store::Store::init(&d.join("store"), 65536).unwrap();
    let mut procs = Vec::new();
    let mut qmps = Vec::new();
    let mut text = format!(
        "service = \"bench\"\nrpo = \"1h\"\nstore = \"{}\"\nscratch = \"{}\"\n",
        d.join("store").display(),
        d.display()
    );
    for i in 0..VMS {
        let img = d.join(format!("vm{i}.raw"));
        std::fs::write(&img, random(DISK, seed + i as u64)).unwrap();
        let qmp = d.join(format!("vm{i}.qmp"));
        procs.push(testing::qemu_none(
            &qmp,
            &testing::blockdev_args(&img, "raw", "disk0"),
        ));
        text.push_str(&format!(
            "[[vm]]\nname = \"vm{i}\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\n",
            qmp.display()
        ));
        qmps.push(qmp);
    }
    let plan = Plan::parse(&d.join("bench.toml"), &text).unwrap();
    Setup {
        _dir: dir,
        dir: d,
        _procs: procs,
        qmps,
        plan,
    }
}

/// 16 MiB of new random data at 8 MiB into every disk, through QEMU.
fn change(s: &Setup, seed: u64) {
    for (i, qmp) in s.qmps.iter().enumerate() {
        let src = s.dir.join(format!("change{i}.bin"));
        std::fs::write(&src, random(CHANGE, seed + i as u64)).unwrap();
        let cmd = format!("qemu-io disk0 \"write -s {} 8M {}\"", src.display(), CHANGE);
        let out = Qmp::connect(qmp)
            .unwrap()
            .execute_value(
                "human-monitor-command",
                Some(json!({ "command-line": cmd })),
            )
            .unwrap();
        let out = out.as_str().unwrap_or_default().to_owned();
        assert!(!out.to_ascii_lowercase().contains("error"), "{cmd}: {out}");
    }
}

fn group(s: &Setup) {
    let abort = AtomicBool::new(false);
    let opts = backup::Options {
        abort: &abort,
        threads: None,
        full: false,
        rate: hypervisor::pacing::Rate::Fixed(0),
    };
    backup::run(&s.plan, &opts).unwrap();
}

fn one_by_one(s: &Setup) {
    let abort = AtomicBool::new(false);
    let store = store::Store::open(&s.plan.store).unwrap();
    for (i, qmp) in s.qmps.iter().enumerate() {
        let cfg = live_backup::Config {
            name: format!("single-vm{i}"),
            qmp: qmp.clone(),
            drive: "disk0".into(),
            full: false,
            scratch: s.dir.clone(),
            qga: None,
            threads: None,
            rate: hypervisor::pacing::Rate::Fixed(0),
            abort: &abort,
            progress: None,
            on_size: None,
        };
        live_backup::run(&store, &cfg).unwrap();
    }
}

/// (wall, cpu) seconds of `f`.
fn timed(f: impl FnOnce()) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_seconds());
    f();
    (t.elapsed().as_secs_f64(), cpu_seconds() - c)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

type Mode = (&'static str, fn(&Setup));

fn main() {
    if !testing::require_qemu() {
        return;
    }
    let modes: [Mode; 2] = [("group", group), ("one-by-one", one_by_one)];
    // [mode][full|incremental] -> (wall, cpu) per round
    let mut results = vec![[Vec::new(), Vec::new()]; modes.len()];
    for round in 0..ROUNDS {
        for (m, (_, run)) in modes.iter().enumerate() {
            let s = setup(1000 * round as u64 + 1);
            results[m][0].push(timed(|| run(&s)));
            change(&s, 7000 + round as u64);
            results[m][1].push(timed(|| run(&s)));
        }
    }
    println!(
        "{VMS} VMs x {} MiB random, {} MiB changed per disk, median of {ROUNDS} rounds",
        DISK >> 20,
        CHANGE >> 20
    );
    println!("mode         full_wall_s  full_cpu_s  incr_wall_s  incr_cpu_s");
    let mut walls = Vec::new();
    for (m, (name, _)) in modes.iter().enumerate() {
        let med = |k: usize, wall: bool| {
            median(
                results[m][k]
                    .iter()
                    .map(|&(w, c)| if wall { w } else { c })
                    .collect(),
            )
        };
        println!(
            "{name:<12} {:>11.2} {:>11.2} {:>12.2} {:>11.2}",
            med(0, true),
            med(0, false),
            med(1, true),
            med(1, false)
        );
        walls.push((med(0, true), med(1, true)));
    }
    println!(
        "group / one-by-one wall: full {:.2}x, incremental {:.2}x",
        walls[0].0 / walls[1].0,
        walls[0].1 / walls[1].1
    );
}
