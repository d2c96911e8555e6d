//! Measure merged-index open time, RSS and lookup latency for a large
//! synthetic index.
//!
//! ```text
//! cargo run --release -p store --example index_scale -- 10000000 [DIR]
//! ```
//! Builds a store in DIR (default: a temp dir) whose merged index holds N
//! synthetic entries (1000 per pack), then reports build time, file size,
//! `Store::open` time, RSS before/after open, and lookup latency for present
//! and absent ids.

use std::time::Instant;

use store::index::midx::{write_midx, MidxEntry};
use store::{ChunkId, PackId, Store};

fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Id number `i` of `n`: sorted by construction, uniformly spread.
fn synthetic_id(i: u64, n: u64) -> ChunkId {
    let mut id = *blake3::hash(&i.to_le_bytes()).as_bytes();
    let prefix = ((i as u128) << 64) / n as u128;
    id[..8].copy_from_slice(&(prefix as u64).to_be_bytes());
    ChunkId(id)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp;
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("tempdir");
            tmp.path().to_path_buf()
        }
    };
    let root = dir.join("store");
    let store = Store::init(&root, 65536).expect("init");
    let packs: Vec<PackId> = (0..n.div_ceil(1000)).map(|_| PackId::random()).collect();
    let t = Instant::now();
    let entries = (0..n).map(|i| {
        Ok(MidxEntry {
            id: synthetic_id(i, n),
            pack: (i % packs.len() as u64) as u32,
            stored_len: 30_000,
            offset: 16 + (i / packs.len() as u64) * 30_048,
            patch: false,
        })
    });
    write_midx(store.backend(), 1, &packs, entries).expect("write midx");
    let build = t.elapsed();
    drop(store);
    let size = std::fs::metadata(root.join("index/merged-0000000000000001.midx"))
        .map(|m| m.len())
        .unwrap_or(0);

    let (rss0, _) = rss_kib();
    let t = Instant::now();
    let store = Store::open(&root).expect("open");
    let open = t.elapsed();
    let (rss1, _) = rss_kib();
    let view = store.index();
    assert_eq!(view.chunk_count(), n);

    let lookups = 100_000u64;
    let hits = |seed: u64| {
        let t = Instant::now();
        let mut x = seed;
        for _ in 0..lookups {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = x % n;
            let loc = view.lookup(&synthetic_id(i, n)).expect("lookup");
            assert!(loc.is_some(), "entry {i} not found");
        }
        t.elapsed()
    };
    let hit_first = hits(0x9e3779b97f4a7c15);
    let hit = hits(0x9e3779b97f4a7c15);
    let t = Instant::now();
    for i in 0..lookups {
        let id = ChunkId(*blake3::hash(&(i + u64::MAX / 2).to_le_bytes()).as_bytes());
        assert!(view.lookup(&id).expect("lookup").is_none());
    }
    let miss = t.elapsed();
    let (rss2, hwm) = rss_kib();
    println!("entries            {n}");
    println!("packs              {}", packs.len());
    println!(
        "midx size          {:.1} MiB",
        size as f64 / (1 << 20) as f64
    );
    println!("build              {:.1} s", build.as_secs_f64());
    println!("Store::open        {:.2} ms", open.as_secs_f64() * 1e3);
    println!("RSS before open    {rss0} KiB");
    println!(
        "RSS after open     {rss1} KiB (+{} KiB)",
        rss1.saturating_sub(rss0)
    );
    println!("RSS after lookups  {rss2} KiB (peak {hwm} KiB)");
    println!(
        "lookup hit         {:.2} us first pass, {:.2} us again",
        hit_first.as_secs_f64() * 1e6 / lookups as f64,
        hit.as_secs_f64() * 1e6 / lookups as f64
    );
    println!(
        "lookup miss        {:.2} us",
        miss.as_secs_f64() * 1e6 / lookups as f64
    );
}
