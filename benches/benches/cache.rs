//! criterion benches of the shared chunk cache under contention: 1 to 8
//! threads looking up hot chunks (all hits), and the same threads missing
//! in a cache too small for the working set (fetch, insert, evict).
//!
//! `cargo bench -p benches --bench cache`

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::cache::{ChunkCache, ChunkKey};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

const CHUNK: usize = 64 << 10;
const OPS_PER_ITER: u64 = 2000;

fn key(i: u64) -> ChunkKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    k
}

/// `threads` threads sharing `iters * OPS_PER_ITER` lookups over
/// `keys` distinct chunks; returns the wall time.
fn run(cache: &Arc<ChunkCache>, threads: usize, keys: u64, iters: u64) -> Duration {
    let chunk = Arc::new(vec![7u8; CHUNK]);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (cache, chunk) = (cache.clone(), chunk.clone());
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                for _ in 0..iters * OPS_PER_ITER / threads as u64 {
                    let k = key(rng.gen_range(0..keys));
                    let got = cache
                        .get_or_fetch(&k, || Ok(chunk.to_vec()))
                        .expect("fetch");
                    std::hint::black_box(got.len());
                }
            });
        }
    });
    start.elapsed()
}

fn contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk_cache");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    g.throughput(Throughput::Elements(OPS_PER_ITER));
    for threads in [1usize, 2, 4, 8] {
        // All hits: 1024 chunks (64 MiB) in a 256 MiB cache, filled first.
        let hot = Arc::new(ChunkCache::new(256 << 20));
        run(&hot, 1, 1024, 4);
        g.bench_with_input(BenchmarkId::new("hit", threads), &threads, |b, &n| {
            b.iter_custom(|iters| run(&hot, n, 1024, iters))
        });
        // Mostly misses: 4096 chunks (256 MiB) through a 32 MiB cache.
        let small = Arc::new(ChunkCache::new(32 << 20));
        g.bench_with_input(
            BenchmarkId::new("miss_evict", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| run(&small, n, 4096, iters)),
        );
    }
    g.finish();
}

criterion_group!(benches, contention);
criterion_main!(benches);
