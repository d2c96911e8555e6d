//! criterion benches of the device read path below virtio: the snapshot
//! layer reading a real store snapshot through the chunk cache, on hits
//! (chunk cached) and misses (pack read + lz4 decode + blake3 verify);
//! and what the guest counters and latency histograms of `MeteredDevice`
//! (the top of the daemon's stack) add to a warm 4 KiB read.
//!
//! `cargo bench -p benches --bench device` (`-- metered` for the latter)

use std::sync::Arc;
use std::time::Duration;

use block::cache::ChunkCache;
use block::device::BlockDevice;
use block::metered::MeteredDevice;
use block::snapshot::SnapshotLayer;
use block::source::{ChunkSource, VecSource};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use store::{BackupOptions, Store};

const IMAGE: usize = 64 << 20;
const CHUNK: u32 = 64 << 10;

/// Disk-like data that lz4 compresses about 2×: text-ish runs mixed with
/// random binary runs, plus a few zero chunks.
fn image(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words: [&[u8]; 8] = [
        b"kernel ",
        b"module ",
        b"/usr/lib/",
        b"inode ",
        b"journal ",
        b"\n",
        b"ext4 ",
        b"\0\0\0\x01",
    ];
    let mut v = Vec::with_capacity(IMAGE + 512);
    while v.len() < IMAGE {
        if rng.gen_ratio(1, 8) {
            let start = v.len();
            v.resize(start + rng.gen_range(16..256), 0);
            rng.fill(&mut v[start..]);
        } else {
            v.extend_from_slice(words[rng.gen_range(0..words.len())]);
        }
    }
    v.truncate(IMAGE);
    for z in (0..IMAGE).step_by(16 * CHUNK as usize) {
        v[z..z + CHUNK as usize].fill(0);
    }
    v
}

/// A store in a temp dir holding `data` as snapshot `disk`, opened.
fn store_source(dir: &std::path::Path, data: &[u8]) -> Arc<dyn ChunkSource> {
    let img = dir.join("disk.img");
    std::fs::write(&img, data).expect("write image");
    let store = Store::init(&dir.join("store"), CHUNK).expect("init store");
    store
        .backup("disk", &img, &BackupOptions::default())
        .expect("backup");
    Arc::new(store.open_snapshot("disk").expect("open snapshot"))
}

/// Random aligned offsets of `len`-byte reads, avoiding nothing: zero
/// chunks are part of real images.
fn offsets(len: usize, n: usize) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| rng.gen_range(0..(IMAGE - len) / len) as u64 * len as u64)
        .collect()
}

fn read_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = image(1);
    let store: Arc<dyn ChunkSource> = store_source(dir.path(), &data);
    let vec: Arc<dyn ChunkSource> = Arc::new(VecSource::new(data, CHUNK));

    let mut g = c.benchmark_group("snapshot_layer_read");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (src_name, src) in [("store", &store), ("vec", &vec)] {
        for len in [4096usize, 1 << 20] {
            let offs = offsets(len, 4096);
            g.throughput(Throughput::Bytes(len as u64));
            // Hit: a cache larger than the image, filled first.
            let hot = SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(2 * IMAGE as u64)))
                .expect("layer");
            let mut buf = vec![0u8; len];
            for off in (0..IMAGE as u64).step_by(1 << 20) {
                let mut mb = vec![0u8; 1 << 20];
                hot.read_at(&mut mb, off).expect("warm read");
            }
            let mut i = 0;
            g.bench_function(BenchmarkId::new(format!("hit/{src_name}"), len), |b| {
                b.iter(|| {
                    hot.read_at(&mut buf, offs[i % offs.len()]).expect("read");
                    i += 1;
                })
            });
            // Miss: a cache of budget 0 keeps nothing, so every read
            // fetches (the store's packs stay in the page cache).
            let cold =
                SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(0))).expect("layer");
            let mut i = 0;
            g.bench_function(BenchmarkId::new(format!("miss/{src_name}"), len), |b| {
                b.iter(|| {
                    cold.read_at(&mut buf, offs[i % offs.len()]).expect("read");
                    i += 1;
                })
            });
        }
    }
    g.finish();
}

/// A warm 4 KiB read of the snapshot layer (chunk cached, from memory),
/// bare and through `MeteredDevice`: the cost of counting and timing a
/// request on the fastest path the guest has.
fn metered(c: &mut Criterion) {
    let data = image(1);
    let src: Arc<dyn ChunkSource> = Arc::new(VecSource::new(data, CHUNK));
    let layer = Arc::new(
        SnapshotLayer::new(src, Arc::new(ChunkCache::new(2 * IMAGE as u64))).expect("layer"),
    );
    let mut mb = vec![0u8; 1 << 20];
    for off in (0..IMAGE as u64).step_by(1 << 20) {
        layer.read_at(&mut mb, off).expect("warm read");
    }
    let metered = MeteredDevice::new(layer.clone());
    let offs = offsets(4096, 4096);
    let mut buf = vec![0u8; 4096];
    let mut g = c.benchmark_group("metered_read");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (name, dev) in [
        ("bare", &*layer as &dyn BlockDevice),
        ("metered", &metered as &dyn BlockDevice),
    ] {
        let mut i = 0;
        g.bench_function(BenchmarkId::new(name, 4096), |b| {
            b.iter(|| {
                dev.read_at(&mut buf, offs[i % offs.len()]).expect("read");
                i += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, read_path, metered);
criterion_main!(benches);
