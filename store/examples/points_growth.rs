//! Measure store growth per protection point and read cost at depth, for a
//! sparse image (64 GiB holding 8 MiB by default, 64 KiB chunks).
//!
//! ```text
//! cargo run --release -p store --example points_growth -- [SIZE_GIB] [POINTS] [CHANGED_PER_POINT]
//! ```
//! Takes a full backup, then POINTS points each changing CHANGED_PER_POINT
//! random chunks, and prints per point the manifest bytes written (delta or
//! full), the pack bytes added and the time; then the cost of 200k random
//! `chunk_id` lookups on the base (full manifest) and on the deepest point.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use store::{BackupOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().map_or(Ok(64), |a| a.parse())?;
    let points: usize = args.next().map_or(Ok(40), |a| a.parse())?;
    let changed: u64 = args.next().map_or(Ok(4), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let size = gib << 30;
    let cs: u64 = 64 << 10;
    let chunks = size / cs;
    let src = dir.path().join("sparse.img");
    let f = std::fs::File::create(&src)?;
    f.set_len(size)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut block = vec![0u8; cs as usize];
    for i in 0..128u64 {
        rng.fill(&mut block[..]);
        f.write_all_at(&block, i * (size / 128))?;
    }
    f.sync_all()?;
    let store = Store::init(&dir.path().join("store"), cs as u32)?;
    let t = Instant::now();
    let base = store.backup("vm", &src, &BackupOptions::default())?;
    let full_bytes = base.manifest_bytes;
    println!(
        "base: full manifest {} bytes ({} chunks), {:.3} s",
        full_bytes,
        chunks,
        t.elapsed().as_secs_f64()
    );
    let mut total_manifest = 0u64;
    let mut total_packs = 0u64;
    let mut fulls = 0;
    let mut last = base.snapshot.clone();
    let mut worst = 0f64;
    for p in 1..=points {
        for _ in 0..changed {
            rng.fill(&mut block[..]);
            f.write_all_at(&block, rng.gen_range(0..chunks) * cs)?;
        }
        let t = Instant::now();
        let s = store.backup("vm", &src, &BackupOptions::default())?;
        let secs = t.elapsed().as_secs_f64();
        worst = worst.max(secs);
        total_manifest += s.manifest_bytes;
        total_packs += s.bytes_new;
        if s.delta.is_none() {
            fulls += 1;
        }
        if p <= 3 || p % 10 == 0 || s.delta.is_none() {
            println!(
                "point {p}: manifest {} bytes ({}), packs +{} bytes, {:.3} s",
                s.manifest_bytes,
                match &s.delta {
                    Some((_, n)) => format!("delta, {n} entries"),
                    None => "full".into(),
                },
                s.bytes_new,
                secs
            );
        }
        last = s.snapshot;
    }
    println!(
        "{points} points: manifests {} bytes ({} per point, {:.4} of a full manifest), \
         {fulls} compactions, packs {} bytes; slowest point {:.3} s",
        total_manifest,
        total_manifest / points.max(1) as u64,
        total_manifest as f64 / points.max(1) as f64 / full_bytes as f64,
        total_packs,
        worst
    );
    for (what, id) in [("base (full)", &base.snapshot), ("deepest point", &last)] {
        let t = Instant::now();
        let r = store.open_snapshot(&format!("vm@{id}"))?;
        let open = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let n = 200_000;
        let mut found = 0u64;
        for _ in 0..n {
            found += r.chunk_id(rng.gen_range(0..chunks))?.is_some() as u64;
        }
        println!(
            "{what}: open {:.3} ms, chunk_id {:.0} ns each ({found} non-zero of {n})",
            open * 1e3,
            t.elapsed().as_secs_f64() * 1e9 / n as f64
        );
    }
    Ok(())
}
