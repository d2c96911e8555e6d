//! criterion benches of the copy-on-write overlay over an in-memory lower
//! layer: whole-block writes to new and to present blocks, partial-block
//! writes (read-modify-write), reads of overlay and lower blocks, and a
//! write + flush (data fdatasync, then bitmap).
//!
//! `cargo bench -p benches --bench overlay`

use std::sync::Arc;
use std::time::Duration;

use block::device::BlockDevice;
use block::mem_device::MemDevice;
use block::overlay::Overlay;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, RngCore, SeedableRng};

const SIZE: usize = 256 << 20;
const BLOCK: u64 = 4096;
/// Size of the device under the new-block bench: 4M blocks, more than a
/// run writes.
const FRESH_SIZE: usize = 16 << 30;

fn overlay(dir: &std::path::Path, name: &str) -> Overlay {
    let mut lower = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut lower);
    Overlay::open(
        &dir.join(format!("{name}.data")),
        &dir.join(format!("{name}.bitmap")),
        "bench",
        Arc::new(MemDevice::from_vec(lower)),
    )
    .expect("open overlay")
}

fn random_block(rng: &mut rand::rngs::StdRng) -> u64 {
    rng.gen_range(0..SIZE as u64 / BLOCK) * BLOCK
}

fn overlay_ops(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("overlay");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(BLOCK));
    let mut data = vec![0u8; BLOCK as usize];
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut data);

    // Whole-block writes to blocks the overlay does not hold yet. A random
    // pick over the 64K blocks of the shared image would mostly hit present
    // blocks after the warm-up, so this overlay sits over a zero-filled
    // 16 GiB device (allocated lazily, never read) and visits its 4M blocks
    // in a fixed pseudo-random order without repeats: every write is new.
    let fresh = Overlay::open(
        &dir.path().join("fresh.data"),
        &dir.path().join("fresh.bitmap"),
        "bench",
        Arc::new(MemDevice::new(FRESH_SIZE)),
    )
    .expect("open overlay");
    let fresh_blocks = FRESH_SIZE as u64 / BLOCK;
    let mut next = 0u64;
    g.bench_function("write_4k_new_block", |b| {
        b.iter(|| {
            // An odd multiplier permutes 0..2^k, so no block comes twice.
            let block = next.wrapping_mul(0x9E37_79B9) % fresh_blocks;
            next += 1;
            assert!(next <= fresh_blocks, "ran out of new blocks");
            fresh.write_at(&data, block * BLOCK).expect("write")
        })
    });

    // Whole-block rewrites of blocks already in the overlay.
    let full = overlay(dir.path(), "full");
    for off in (0..16u64 << 20).step_by(BLOCK as usize) {
        full.write_at(&data, off).expect("prefill");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    g.bench_function("write_4k_present_block", |b| {
        b.iter(|| {
            let off = rng.gen_range(0..(16u64 << 20) / BLOCK) * BLOCK;
            full.write_at(&data, off).expect("write")
        })
    });

    // 512-byte writes into blocks not held yet: read-modify-write.
    let rmw = overlay(dir.path(), "rmw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    g.throughput(Throughput::Bytes(512));
    g.bench_function("write_512_partial_rmw", |b| {
        b.iter(|| {
            rmw.write_at(&data[..512], random_block(&mut rng) + 1024)
                .expect("write")
        })
    });
    g.throughput(Throughput::Bytes(BLOCK));

    // Reads: blocks held by the overlay, and blocks passed to the layer below.
    let mut buf = vec![0u8; BLOCK as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    g.bench_function("read_4k_overlay_block", |b| {
        b.iter(|| {
            let off = rng.gen_range(0..(16u64 << 20) / BLOCK) * BLOCK;
            full.read_at(&mut buf, off).expect("read")
        })
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    g.bench_function("read_4k_lower_block", |b| {
        b.iter(|| {
            let off = (16u64 << 20) + rng.gen_range(0..(32u64 << 20) / BLOCK) * BLOCK;
            full.read_at(&mut buf, off).expect("read")
        })
    });

    // A guest write followed by FLUSH: the durable-write cost.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    g.sample_size(10);
    g.bench_function("write_4k_then_flush", |b| {
        b.iter(|| {
            full.write_at(&data, random_block(&mut rng)).expect("write");
            full.flush().expect("flush")
        })
    });
    g.finish();
}

criterion_group!(benches, overlay_ops);
criterion_main!(benches);
