//! What the live backup examples share: the disk, its rewrite, the config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use hypervisor::live_backup::Config;
use hypervisor::testing;
use rand::Rng;

/// A raw file of `mib` MiB of random data in `dir`, and a qcow2 copy.
pub fn random_disk(dir: &Path, mib: u64) -> (PathBuf, PathBuf) {
    let raw = dir.join("disk.raw");
    testing::run(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("of={}", raw.display()))
            .arg(format!("count={mib}")),
    );
    let img = dir.join("disk.qcow2");
    testing::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img),
    );
    (raw, img)
}

/// The live backup of drive `disk0` of the VM on `qmp` as image `vm`,
/// scratch in `dir`.
pub fn config<'a>(dir: &Path, qmp: &Path, abort: &'a AtomicBool) -> Config<'a> {
    Config {
        name: "vm".into(),
        qmp: qmp.to_path_buf(),
        drive: "disk0".into(),
        full: false,
        scratch: dir.to_path_buf(),
        qga: None,
        threads: None,
        rate: hypervisor::pacing::Rate::Fixed(0),
        abort,
        progress: None,
        on_size: None,
    }
}

/// Rewrite 1 % of the 4 KiB blocks of the `mib` MiB qcow2 `img` at random,
/// offline (through qemu-io, so its persistent bitmaps record them).
pub fn rewrite_one_percent(img: &Path, mib: u64) {
    let blocks = mib * 256;
    let mut rng = rand::thread_rng();
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for _ in 0..blocks / 100 {
        let b = rng.gen_range(0..blocks);
        c.args([
            "-c",
            &format!("write -P {} {} 4k", rng.gen_range(1..255), b * 4096),
        ]);
    }
    c.arg(img);
    testing::run(&mut c);
}

/// Before a timed backup: the setup's writeback done (`sync`), then the
/// page cache dropped, as the side-by-side benchmarks do, so that neither
/// contender finds the disk in memory or pays for the other's writes.
/// With `LIVE_MEASURE_WARM=1`, or without the right to drop the cache
/// (not root), only the `sync`.
pub fn settle() {
    testing::run(&mut Command::new("sync"));
    if std::env::var_os("LIVE_MEASURE_WARM").is_some_and(|v| v == "1") {
        return;
    }
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("note: page cache not dropped ({e}): the timed backups read a warm cache");
    }
}
