//! Property tests of the store against a trivial model (the image bytes):
//! backup → restore and `SnapshotReader::read_at` give back exactly the image,
//! for random images with zero runs, repeated chunks and sizes that are not a
//! multiple of the chunk size.

use std::fs;

use proptest::prelude::*;
use store::{BackupOptions, RestoreOptions, Store};

/// A run of the image: zeros, random bytes, a repeat of earlier bytes, or a
/// single repeated byte.
#[derive(Debug, Clone)]
enum Run {
    Zero(usize),
    Random(Vec<u8>),
    Repeat { from: usize, len: usize },
    Fill(u8, usize),
}

fn run_strategy() -> impl Strategy<Value = Run> {
    prop_oneof![
        (1usize..40_000).prop_map(Run::Zero),
        proptest::collection::vec(any::<u8>(), 1..20_000).prop_map(Run::Random),
        (any::<usize>(), 1usize..30_000).prop_map(|(from, len)| Run::Repeat { from, len }),
        (any::<u8>(), 1usize..30_000).prop_map(|(b, n)| Run::Fill(b, n)),
    ]
}

/// Build an image from runs, rounded to a multiple of 512 bytes.
fn build(runs: &[Run]) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::new();
    for r in runs {
        match r {
            Run::Zero(n) => v.resize(v.len() + n, 0),
            Run::Random(b) => v.extend_from_slice(b),
            Run::Fill(b, n) => v.resize(v.len() + n, *b),
            Run::Repeat { from, len } => {
                if v.is_empty() {
                    continue;
                }
                let from = from % v.len();
                let len = (*len).min(v.len() - from);
                let copy = v[from..from + len].to_vec();
                v.extend_from_slice(&copy);
            }
        }
    }
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn backup_restore_and_read_at_match_the_image(
        runs in proptest::collection::vec(run_strategy(), 1..12),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        chunk_shift in 12u32..15,
        reads in proptest::collection::vec((any::<u64>(), 0usize..20_000), 1..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("s"), 1 << chunk_shift).unwrap();
        let src = dir.path().join("img");
        let out = dir.path().join("out");
        let mut img = build(&runs);
        let opts = BackupOptions { pack_size: Some(128 << 10), ..Default::default() };

        // Two generations: the second edits a few bytes and dedups against the first.
        for generation in 0..2 {
            if generation == 1 {
                for (at, b) in &edits {
                    if !img.is_empty() {
                        let i = at % img.len();
                        img[i] = *b;
                    }
                }
            }
            fs::write(&src, &img).unwrap();
            let stats = store.backup("p", &src, &opts).unwrap();
            prop_assert_eq!(stats.image_size, img.len() as u64);
            store.restore("p", &out, &RestoreOptions { force: true, ..Default::default() }).unwrap();
            prop_assert!(fs::read(&out).unwrap() == img, "restore differs");

            let r = store.open_snapshot("p").unwrap();
            prop_assert_eq!(r.image_size(), img.len() as u64);
            for (off, len) in &reads {
                if img.is_empty() {
                    break;
                }
                let off = (off % img.len() as u64) as usize;
                let len = (*len).min(img.len() - off);
                let mut buf = vec![0xAAu8; len];
                r.read_at(&mut buf, off as u64).unwrap();
                prop_assert!(buf == img[off..off + len], "read_at({off}, {len}) differs");
            }
            // Zero chunks are marked, never stored.
            let cs = 1usize << chunk_shift;
            for (i, c) in img.chunks(cs).enumerate() {
                let zero = c.iter().all(|&b| b == 0);
                prop_assert_eq!(r.chunk_id(i as u64).unwrap().is_none(), zero);
            }
        }
        prop_assert!(store.verify(None, &Default::default()).unwrap().is_ok());
    }
}
