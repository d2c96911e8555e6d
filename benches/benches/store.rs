//! criterion benches of the chunk store: hashing, compression, insert
//! (backup ingest) and random chunk reads.
//!
//! `cargo bench -p benches --bench store`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use store::chunk::{decode_record, encode_record};
use store::{BackupOptions, ChunkId, Store};

/// Disk-like data that lz4 compresses about 2x: words from a small
/// vocabulary mixed with random binary runs.
fn realistic(size: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "kernel ",
        "module ",
        "0x7f3a ",
        "/usr/lib/",
        "error ",
        "config ",
        "ext4 ",
        "block ",
        "\x00\x00\x00\x01",
        "inode ",
        "journal ",
        "qemu ",
        "virtio ",
        "snapshot ",
        "\n",
        "data ",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(size + 64);
    while v.len() < size {
        if rng.gen_ratio(1, 8) {
            let n = rng.gen_range(16..256);
            let start = v.len();
            v.resize(start + n, 0);
            rng.fill(&mut v[start..]);
        } else {
            v.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        }
    }
    v.truncate(size);
    v
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    for size in [4usize << 10, 64 << 10, 1 << 20] {
        let data = realistic(size, 1);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("blake3", size), &data, |b, d| {
            b.iter(|| ChunkId::of(d))
        });
    }
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress");
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    let size = 64 << 10;
    g.throughput(Throughput::Bytes(size as u64));
    let mut random = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(4).fill(&mut random[..]);
    for (name, data) in [
        ("realistic", realistic(size, 2)),
        ("repeated-byte", vec![0x5au8; size]),
        // What a guest writing encrypted or compressed files stores: lz4
        // fails, and the record keeps the data as it is.
        ("random", random),
    ] {
        let id = ChunkId::of(&data);
        let mut out = Vec::with_capacity(2 * size);
        g.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| {
                out.clear();
                encode_record(&id, &data, &mut out)
            })
        });
        out.clear();
        let stored = encode_record(&id, &data, &mut out);
        let mut plain = Vec::with_capacity(size);
        g.bench_function(BenchmarkId::new("decode+verify", name), |b| {
            b.iter(|| decode_record(&out, &id, stored, &mut plain).expect("decode"))
        });
    }
    g.finish();
}

fn insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let size = 64usize << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.raw");
    std::fs::write(&src, realistic(size, 3)).expect("write image");
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("backup-64MiB-new", |b| {
        b.iter_batched(
            || {
                let d = tempfile::tempdir().expect("tempdir");
                let s = Store::init(&d.path().join("s"), 64 << 10).expect("init");
                (d, s)
            },
            |(d, s)| {
                s.backup("bench", &src, &BackupOptions::default())
                    .expect("backup");
                d
            },
            BatchSize::PerIteration,
        )
    });
    let sd = tempfile::tempdir().expect("tempdir");
    let s = Store::init(&sd.path().join("s"), 64 << 10).expect("init");
    s.backup("bench", &src, &BackupOptions::default())
        .expect("backup");
    g.bench_function("backup-64MiB-unchanged", |b| {
        b.iter(|| {
            s.backup("bench", &src, &BackupOptions::default())
                .expect("backup")
        })
    });
    g.finish();
}

fn random_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("read");
    g.sample_size(30).measurement_time(Duration::from_secs(5));
    let size = 64usize << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.raw");
    std::fs::write(&src, realistic(size, 4)).expect("write image");
    let s = Store::init(&dir.path().join("s"), 64 << 10).expect("init");
    s.backup("bench", &src, &BackupOptions::default())
        .expect("backup");
    let r = s.open_snapshot("bench").expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut buf = Vec::new();
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("random-chunk-64KiB", |b| {
        b.iter(|| {
            let i = rng.gen_range(0..r.chunk_count());
            r.read_chunk(i, &mut buf).expect("read");
        })
    });
    let mut small = vec![0u8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("random-read_at-4KiB", |b| {
        b.iter(|| {
            let off = rng.gen_range(0..(size as u64 / 4096)) * 4096;
            r.read_at(&mut small, off).expect("read");
        })
    });
    g.finish();
}

/// Encryption's cost: the same ingest and cold random reads on a
/// plaintext and an encrypted store (sealed records, sealed index and
/// manifest segments, keyed ids), side by side.
fn encryption(c: &mut Criterion) {
    use store::crypto::{KdfParams, Secret};
    let kdf = KdfParams {
        m_cost_kib: 8 << 10,
        t_cost: 1,
        p_cost: 1,
    };
    let secret = Secret::passphrase("bench").expect("secret");
    let make = |p: &std::path::Path, encrypted: bool| {
        if encrypted {
            Store::init_encrypted(p, 64 << 10, &secret, &kdf).expect("init")
        } else {
            Store::init(p, 64 << 10).expect("init")
        }
    };
    let size = 64usize << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("image.raw");
    std::fs::write(&src, realistic(size, 6)).expect("write image");
    let mut g = c.benchmark_group("encryption");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(size as u64));
    for (name, encrypted) in [("plain", false), ("encrypted", true)] {
        g.bench_function(BenchmarkId::new("ingest-64MiB", name), |b| {
            b.iter_batched(
                || {
                    let d = tempfile::tempdir().expect("tempdir");
                    let s = make(&d.path().join("s"), encrypted);
                    (d, s)
                },
                |(d, s)| {
                    s.backup("bench", &src, &BackupOptions::default())
                        .expect("backup");
                    d
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.sample_size(30).measurement_time(Duration::from_secs(5));
    for (name, encrypted) in [("plain", false), ("encrypted", true)] {
        let p = dir.path().join(name);
        let s = make(&p, encrypted);
        s.backup("bench", &src, &BackupOptions::default())
            .expect("backup");
        // A fresh open: no decrypted segment or chunk is cached yet.
        let s = Store::open_keyed(&p, Some(&secret)).expect("open");
        let r = s.open_snapshot("bench").expect("open");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut small = vec![0u8; 4096];
        g.throughput(Throughput::Bytes(4096));
        g.bench_function(BenchmarkId::new("cold-random-read_at-4KiB", name), |b| {
            b.iter(|| {
                let off = rng.gen_range(0..(size as u64 / 4096)) * 4096;
                r.read_at(&mut small, off).expect("read");
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    hashing,
    compression,
    insert,
    random_reads,
    encryption
);
criterion_main!(benches);
