//! Repeat the live incremental of `live_backup_measure` several times on
//! one prepared disk, for A/B comparisons with less noise than whole runs:
//! a qcow2 disk of random data (default 2 GiB) in `-M none` QEMU, a full
//! live backup, 1 % of its 4 KiB blocks rewritten offline; then, per round,
//! a hard-linked copy of the store, QEMU started, the live incremental,
//! QEMU stopped and the base bitmap restored (`qemu-img bitmap`), so every
//! round does the same work from the same state, from a settled machine
//! (`common::settle`).
//!
//! `cargo run --release -p hypervisor --features test-util --example
//! live_incremental_rounds [ROUNDS] [SIZE_MIB]`
#![forbid(unsafe_code)]

mod common;

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hypervisor::live_backup::{recorded_bitmap, run};
use hypervisor::qmp::Qmp;
use hypervisor::testing;

/// User + system CPU seconds of a process, from its `stat` file (in clock
/// ticks: compare sums over rounds).
fn cpu_secs(stat: &str) -> f64 {
    let s = std::fs::read_to_string(stat).unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11..13).map_or(0.0, |t| {
        t.iter().map(|x| x.parse::<f64>().unwrap_or(0.0)).sum()
    });
    ticks / 100.0
}

/// On-CPU and runnable-but-waiting seconds of process `pid`'s main thread
/// (QEMU's main loop, which serves NBD), from `/proc/PID/schedstat`.
fn main_thread_sched(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap_or_default();
    let v: Vec<f64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (
        v.first().copied().unwrap_or(0.0) / 1e9,
        v.get(1).copied().unwrap_or(0.0) / 1e9,
    )
}

fn main() {
    // RUST_LOG=info shows the phases with timestamps.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(5, |s| s.parse().expect("ROUNDS"));
    let mib: u64 = std::env::args()
        .nth(2)
        .map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = common::random_disk(dir.path(), mib);
    std::fs::remove_file(&raw).unwrap();
    let store_dir = dir.path().join("store");
    let store = store::Store::init(&store_dir, 65536).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let abort = AtomicBool::new(false);
    let cfg = common::config(dir.path(), &qmp, &abort);
    let args = testing::blockdev_args(&img, "qcow2", "disk0");
    let quit = |mut vm: testing::Proc| {
        let _ = Qmp::connect(&qmp).unwrap().execute_value("quit", None);
        let _ = vm.child.wait();
    };
    let vm = testing::qemu_none(&qmp, &args);
    let full = run(&store, &cfg).unwrap();
    println!("live full: {:.2} s", full.seconds);
    quit(vm);
    let newest = store.snapshots(Some("vm")).unwrap().pop().unwrap();
    let base = recorded_bitmap(&newest.source).unwrap().to_owned();
    drop(store);

    common::rewrite_one_percent(&img, mib);
    // Keep the base bitmap's content for the rounds.
    let g = hypervisor::live_backup::bitmap_granularity(65536).to_string();
    let bitmap = |args: &[&str]| {
        testing::run(Command::new("qemu-img").arg("bitmap").args(args));
    };
    let img_s = img.to_str().unwrap();
    bitmap(&["--add", "-g", &g, "--disable", img_s, "keep"]);
    bitmap(&["--merge", &base, img_s, "keep"]);
    // The rounds' stores are hard-linked copies at the original path (the
    // store's path names its QEMU objects and bitmaps).
    let orig = dir.path().join("store-orig");
    std::fs::rename(&store_dir, &orig).unwrap();

    let mut secs = Vec::new();
    let (mut cpu_ours, mut cpu_qemu) = (0.0, 0.0);
    let (mut main_runs, mut main_waits) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let copy = &store_dir;
        testing::run(Command::new("cp").arg("-al").arg(&orig).arg(copy));
        let store = store::Store::open(copy).unwrap();
        let vm = testing::qemu_none(&qmp, &args);
        let qemu_stat = format!("/proc/{}/stat", vm.child.id());
        common::settle();
        let (us0, qemu0) = (cpu_secs("/proc/self/stat"), cpu_secs(&qemu_stat));
        let main0 = main_thread_sched(vm.child.id());
        let t = Instant::now();
        let inc = run(&store, &cfg).unwrap();
        let wall = t.elapsed().as_secs_f64();
        let (us, qemu) = (
            cpu_secs("/proc/self/stat") - us0,
            cpu_secs(&qemu_stat) - qemu0,
        );
        let main1 = main_thread_sched(vm.child.id());
        let (main_run, main_wait) = (main1.0 - main0.0, main1.1 - main0.1);
        assert_eq!(inc.mode, "incremental", "{:?}", inc.reason);
        println!(
            "round {r}: live incremental {:.4} s (wall {wall:.4} s), CPU ours {us:.3} s QEMU {qemu:.3} s \
             (its main loop: on CPU {:.3} s, runnable but waiting {:.3} s), read {} KiB, chunks_patch {}",
            inc.seconds,
            main_run,
            main_wait,
            inc.bytes_read >> 10,
            inc.chunks_patch,
        );
        secs.push(inc.seconds);
        cpu_ours += us;
        cpu_qemu += qemu;
        main_runs.push(main_run);
        main_waits.push(main_wait);
        quit(vm);
        bitmap(&["--remove", img_s, &inc.bitmap]);
        bitmap(&["--add", "-g", &g, img_s, &base]);
        bitmap(&["--merge", "keep", img_s, &base]);
        drop(store);
        std::fs::remove_dir_all(copy).unwrap();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "QEMU's main loop per round: median {:.3} s on CPU, {:.3} s runnable but waiting for a core",
        median(&mut main_runs),
        median(&mut main_waits),
    );
    secs.sort_by(f64::total_cmp);
    println!(
        "live incremental over {rounds} rounds: median {:.4} s, min {:.4} s, max {:.4} s; \
         CPU per round: ours {:.3} s, QEMU {:.3} s",
        secs[secs.len() / 2],
        secs[0],
        secs[secs.len() - 1],
        cpu_ours / rounds as f64,
        cpu_qemu / rounds as f64,
    );
}
