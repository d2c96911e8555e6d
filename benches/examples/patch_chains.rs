//! Measure what patch chains cost and save: points of scattered 4 KiB
//! writes stored through the changed-blocks path (as the daemon's
//! protection points are), then a restore of the newest point.
//!
//! ```text
//! cargo run --release -p benches --example patch_chains -- [SIZE_MIB] [POINTS] [GRAINS_PER_POINT]
//! ```
//! Defaults: a 1024 MiB image of random data (64 KiB chunks), 12 points of
//! 25600 random 4 KiB grains each (5 s at 20 MB/s). Prints per point its
//! time, the patches and whole chunks it stored and the store's growth;
//! then the time to restore the newest point (checked against the image)
//! and the full backup, from a cold page cache (root: `drop_caches`) and
//! warm.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use benches::tools::{dir_bytes, drop_caches};
use rand::{Rng, SeedableRng};
use store::backup::changed::{ChangedOptions, ChangedSource, ChunkState};
use store::restore::RestoreOptions;
use store::{BackupOptions, Store};

const CS: usize = 64 << 10;
const GRAIN: usize = 4 << 10;
const GRAINS: usize = CS / GRAIN;

/// The image in memory and the grains written since the last point.
struct Image {
    data: Vec<u8>,
    dirty: Vec<u16>,
    read: AtomicU64,
}

impl ChangedSource for Image {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        match self.dirty[chunk as usize] {
            0 => ChunkState::Unchanged,
            u16::MAX => ChunkState::Data,
            _ => ChunkState::Partial,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn dirty_grains(&self, chunk: u64) -> Vec<bool> {
        let m = self.dirty[chunk as usize];
        (0..GRAINS).map(|g| m & (1 << g) != 0).collect()
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let points: usize = args.next().map_or(Ok(12), |a| a.parse())?;
    let per_point: usize = args.next().map_or(Ok(25600), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let size = mib << 20;
    let chunks = size / CS;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut img = Image {
        data: vec![0u8; size],
        dirty: vec![0; chunks],
        read: AtomicU64::new(0),
    };
    rng.fill(&mut img.data[..]);
    let src = dir.path().join("base.img");
    std::fs::write(&src, &img.data)?;
    let store = Store::init(&dir.path().join("store"), CS as u32)?;
    let base = store.backup("vm", &src, &BackupOptions::default())?;
    std::fs::remove_file(&src)?;
    let mut parent = base.snapshot.clone();
    let mut grown = dir_bytes(store.path())?;
    println!("{mib} MiB image, {points} points of {per_point} random 4 KiB grains");
    for p in 1..=points {
        img.dirty.fill(0);
        for _ in 0..per_point {
            let g = rng.gen_range(0..size / GRAIN);
            rng.fill(&mut img.data[g * GRAIN..(g + 1) * GRAIN]);
            img.dirty[g / GRAINS] |= 1 << (g % GRAINS);
        }
        let t = Instant::now();
        let s = store.begin_changed_backup("vm")?.run(
            &img,
            &ChangedOptions {
                image_size: size as u64,
                source: "example".into(),
                parent: Some(parent.clone()),
                progress: None,
                threads: None,
                readers: 1,
            },
        )?;
        let now = dir_bytes(store.path())?;
        println!(
            "point {p:2}: {:.3} s, {} patches, {} whole chunks, store +{} MiB",
            t.elapsed().as_secs_f64(),
            s.chunks_patch,
            s.chunks_new - s.chunks_patch,
            (now - grown) >> 20
        );
        grown = now;
        parent = s.snapshot;
    }
    let newest = format!("vm@{parent}");
    let full = format!("vm@{}", base.snapshot);
    let out = dir.path().join("out.img");
    for (what, r) in [("newest point", &newest), ("full backup", &full)] {
        for cache in ["cold", "warm"] {
            if cache == "cold" && !drop_caches() {
                println!("({what}: page cache not dropped, not root)");
            }
            let _ = std::fs::remove_file(&out);
            let t = Instant::now();
            store.restore(r, &out, &RestoreOptions::default())?;
            println!(
                "restore {what}, {cache}: {:.3} s",
                t.elapsed().as_secs_f64()
            );
            if r == &newest && std::fs::read(&out)? != img.data {
                anyhow::bail!("the restored newest point differs from the image");
            }
        }
    }
    Ok(())
}
