//! Measure a live backup against `backup SOURCE` on the same disk:
//! a qcow2 disk of random data (default 2 GiB) in `-M none` QEMU, a full
//! live backup, then 1 % of its 4 KiB blocks rewritten (offline, through
//! qemu-io, so the persistent bitmap records them) and an incremental.
//! Every timed backup starts from a settled machine (`common::settle`: the
//! setup's 6 GiB of writes synced, the page cache dropped), as the
//! side-by-side benchmarks do; `LIVE_MEASURE_WARM=1` keeps the cache.
//!
//! `cargo run --release -p hypervisor --features test-util --example
//! live_backup_measure [SIZE_MIB]`
#![forbid(unsafe_code)]

mod common;

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use hypervisor::live_backup::run;
use hypervisor::qmp::Qmp;
use hypervisor::testing;

fn main() {
    // RUST_LOG=info shows the phases with timestamps.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let chunk: u32 = std::env::args()
        .nth(2)
        .map_or(65536, |s| s.parse().expect("CHUNK"));
    let mib: u64 = std::env::args()
        .nth(1)
        .map_or(2048, |s| s.parse().expect("SIZE_MIB"));
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = common::random_disk(dir.path(), mib);
    let store = store::Store::init(&dir.path().join("store"), chunk).unwrap();
    // The file-backup baseline: a store of its own, the old content first.
    let files = store::Store::init(&dir.path().join("files"), chunk).unwrap();
    files.backup("file", &raw, &Default::default()).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let abort = AtomicBool::new(false);
    let cfg = common::config(dir.path(), &qmp, &abort);
    let args = testing::blockdev_args(&img, "qcow2", "disk0");
    let mut vm = testing::qemu_none(&qmp, &args);
    common::settle();
    let full = run(&store, &cfg).unwrap();
    println!(
        "live full:        {:.2} s, read {} MiB, blackout {:.2} ms",
        full.seconds,
        full.bytes_read >> 20,
        full.blackout_ms
    );
    let _ = Qmp::connect(&qmp).unwrap().execute_value("quit", None);
    let _ = vm.child.wait();

    // 1 % of the 4 KiB blocks, rewritten offline (the bitmap is persistent).
    common::rewrite_one_percent(&img, mib);
    testing::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&raw),
    );

    let _vm = testing::qemu_none(&qmp, &args);
    common::settle();
    let inc = run(&store, &cfg).unwrap();
    println!(
        "live incremental: {:.2} s, read {} MiB ({} MiB dirty), blackout {:.2} ms",
        inc.seconds,
        inc.bytes_read >> 20,
        inc.dirty_bytes >> 20,
        inc.blackout_ms
    );
    common::settle();
    let t = Instant::now();
    let file = files.backup("file", &raw, &Default::default()).unwrap();
    println!(
        "backup SOURCE incremental (reads and hashes all): {:.2} s, read {} MiB",
        t.elapsed().as_secs_f64(),
        file.bytes_read >> 20
    );
    let fresh = store::Store::init(&dir.path().join("fresh"), chunk).unwrap();
    common::settle();
    let t = Instant::now();
    let full_file = fresh.backup("file", &raw, &Default::default()).unwrap();
    println!(
        "backup SOURCE full: {:.2} s, read {} MiB",
        t.elapsed().as_secs_f64(),
        full_file.bytes_read >> 20
    );
    println!(
        "live full / backup SOURCE full: {:.2}x the time; live incremental {:.1}x faster than backup SOURCE incremental",
        full.seconds / full_file.seconds,
        file.seconds / inc.seconds
    );
}
