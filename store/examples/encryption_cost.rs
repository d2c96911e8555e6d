//! Encryption's cost, plaintext vs encrypted store in the same run: backup
//! ingest of a compressible image and cold random 4 KiB reads (fresh open,
//! no chunk cache). Prints wall time and process CPU time (user + system,
//! from /proc/self/stat), since the machine may be shared.
//!
//! `cargo run --release -p store --example encryption_cost [MiB] [rounds]`

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use store::crypto::{KdfParams, Secret};
use store::{BackupOptions, Store};

/// Disk-like data lz4 compresses about 2x.
fn image(size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut v = Vec::with_capacity(size + 256);
    while v.len() < size {
        if rng.gen_ratio(1, 8) {
            let n = rng.gen_range(16..256);
            let start = v.len();
            v.resize(start + n, 0);
            rng.fill(&mut v[start..]);
        } else {
            let w = ["kernel ", "ext4 ", "qemu ", "/usr/lib/", "data ", "\n"];
            v.extend_from_slice(w[rng.gen_range(0..w.len())].as_bytes());
        }
    }
    v.truncate(size);
    v
}

/// Process CPU seconds (user + system).
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let rest = &s[s.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn measure(f: impl FnOnce()) -> (f64, f64) {
    let (w, c) = (Instant::now(), cpu());
    f();
    (w.elapsed().as_secs_f64(), cpu() - c)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map_or(256, |a| a.parse().expect("MiB"));
    let rounds: usize = args.get(2).map_or(3, |a| a.parse().expect("rounds"));
    let reads = 20_000u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.raw");
    std::fs::write(&src, image(mib << 20)).expect("write image");
    let secret = Secret::passphrase("bench").expect("secret");
    let kdf = KdfParams::default();
    let make = |p: &Path, enc: bool| {
        if enc {
            Store::init_encrypted(p, 64 << 10, &secret, &kdf).expect("init")
        } else {
            Store::init(p, 64 << 10).expect("init")
        }
    };
    println!("{mib} MiB image, {rounds} rounds, {reads} random 4 KiB reads per round");
    let mut totals = [[0f64; 4]; 2];
    for round in 0..rounds {
        // Alternate the order so load changes hit both alike.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for enc in order {
            let p = dir.path().join(format!("s-{round}-{enc}"));
            let s = make(&p, enc);
            let (iw, ic) = measure(|| {
                s.backup("bench", &src, &BackupOptions::default())
                    .expect("backup");
            });
            drop(s);
            let s = Store::open_keyed(&p, Some(&secret)).expect("open");
            let r = s.open_snapshot("bench").expect("snapshot");
            let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64);
            let mut buf = vec![0u8; 4096];
            let blocks = (mib as u64) << 8;
            let (rw, rc) = measure(|| {
                for _ in 0..reads {
                    r.read_at(&mut buf, rng.gen_range(0..blocks) * 4096)
                        .expect("read");
                }
            });
            let t = &mut totals[usize::from(enc)];
            for (i, v) in [iw, ic, rw, rc].into_iter().enumerate() {
                t[i] += v;
            }
            drop(r);
            drop(s);
            std::fs::remove_dir_all(&p).expect("cleanup");
        }
    }
    let n = rounds as f64;
    let [p, e] = totals.map(|t| t.map(|v| v / n));
    let mb = mib as f64;
    println!("                   plain        encrypted    ratio");
    println!(
        "ingest wall        {:7.1} MiB/s {:7.1} MiB/s {:.3}",
        mb / p[0],
        mb / e[0],
        e[0] / p[0]
    );
    println!(
        "ingest CPU         {:7.2} s     {:7.2} s     {:.3}",
        p[1],
        e[1],
        e[1] / p[1]
    );
    let us = |s: f64| s / reads as f64 * 1e6;
    println!(
        "read 4K wall       {:7.1} us    {:7.1} us    {:.3}",
        us(p[2]),
        us(e[2]),
        e[2] / p[2]
    );
    println!(
        "read 4K CPU        {:7.1} us    {:7.1} us    {:.3}",
        us(p[3]),
        us(e[3]),
        e[3] / p[3]
    );
}
