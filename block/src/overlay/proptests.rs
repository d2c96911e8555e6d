//! Property tests of the overlay (over a real snapshot layer over a
//! `VecSource`) against a `Vec<u8>` model, including reopening after a
//! flush and "crashes" (dropping the overlay without a flush). Reads go
//! through `read_at` and through `read_vectored_at` into guest buffers cut
//! at random places, over runs of overlay, snapshot and discarded blocks.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::tests::{image, lower};
use super::{Overlay, BLOCK_SIZE};
use crate::device::tests::{check_vectored_read, read_vectored, split_lens};
use crate::device::BlockDevice;

/// Image size: 12 chunks of 8 KiB plus a tail that is not a whole block.
const SIZE: u64 = 8192 * 12 + 1536;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
    },
    Read {
        offset: u64,
        len: u64,
    },
    /// A read into guest buffers cut at `cuts`.
    ReadVectored {
        offset: u64,
        len: u64,
        cuts: Vec<usize>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Flush, drop, reopen: everything must be there.
    FlushReopen,
    /// Drop without flush, reopen: each block is its flushed or latest content.
    Crash,
}

/// Offsets near block and chunk boundaries, and anywhere.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (
            0..SIZE / BLOCK_SIZE + 1,
            prop_oneof![Just(0u64), Just(512), Just(4095), Just(4096 - 512)]
        )
            .prop_map(|(b, d)| (b * BLOCK_SIZE + d).min(SIZE - 1)),
        0..SIZE,
    ]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64),
        Just(512),
        Just(4096),
        Just(8192),
        1..10_000u64,
        1..SIZE,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (offset(), len(), any::<u8>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        3 => (offset(), len()).prop_map(|(offset, len)| Op::Read { offset, len }),
        3 => (offset(), len(), proptest::collection::vec(any::<usize>(), 0..10))
            .prop_map(|(offset, len, cuts)| Op::ReadVectored { offset, len, cuts }),
        2 => (offset(), len()).prop_map(|(offset, len)| Op::Discard { offset, len }),
        2 => (offset(), len()).prop_map(|(offset, len)| Op::WriteZeroes { offset, len }),
        2 => Just(Op::Flush),
        1 => Just(Op::FlushReopen),
        1 => Just(Op::Crash),
    ]
}

fn clamp(offset: u64, len: u64) -> (u64, u64) {
    (offset, len.min(SIZE - offset))
}

fn open(dir: &Path, low: Arc<dyn BlockDevice>) -> Overlay {
    Overlay::open(
        &dir.join("overlay.data"),
        &dir.join("overlay.bitmap"),
        "snap-prop",
        low,
    )
    .unwrap()
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut all = vec![0u8; dev.size() as usize];
    dev.read_at(&mut all, 0).unwrap();
    all
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn overlay_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let img = image(SIZE as usize, 0xfeed);
        let (src, low) = lower(&img);
        let mut ov = open(dir.path(), low.clone());
        let mut model = img.clone();
        let mut flushed = img.clone();
        for op in ops {
            match op {
                Op::Write { offset, len, seed } => {
                    let (offset, len) = clamp(offset, len);
                    let data = pattern(len, seed);
                    ov.write_at(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Op::Read { offset, len } => {
                    let (offset, len) = clamp(offset, len);
                    let mut buf = vec![0u8; len as usize];
                    ov.read_at(&mut buf, offset).unwrap();
                    prop_assert!(buf == model[offset as usize..(offset + len) as usize],
                        "read of {} at {} differs", len, offset);
                }
                Op::ReadVectored { offset, len, cuts } => {
                    let (offset, len) = clamp(offset, len);
                    let lens = split_lens(len as usize, &cuts);
                    check_vectored_read(&ov, offset, &lens);
                    let got = read_vectored(&ov, offset, &lens).unwrap();
                    prop_assert!(got == model[offset as usize..(offset + len) as usize],
                        "vectored read of {} at {} in {:?} differs", len, offset, lens);
                }
                Op::Discard { offset, len } => {
                    let (offset, len) = clamp(offset, len);
                    ov.discard(offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::WriteZeroes { offset, len } => {
                    let (offset, len) = clamp(offset, len);
                    ov.write_zeroes(offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Op::Flush => {
                    ov.flush().unwrap();
                    flushed.clone_from(&model);
                }
                Op::FlushReopen => {
                    ov.flush().unwrap();
                    drop(ov);
                    ov = open(dir.path(), low.clone());
                    let all = read_all(&ov);
                    prop_assert!(all == model, "reopened after flush: content differs");
                    flushed.clone_from(&model);
                }
                Op::Crash => {
                    drop(ov);
                    ov = open(dir.path(), low.clone());
                    let all = read_all(&ov);
                    for (b, got) in all.chunks(BLOCK_SIZE as usize).enumerate() {
                        let at = b * BLOCK_SIZE as usize;
                        let range = at..at + got.len();
                        prop_assert!(
                            got == &flushed[range.clone()] || got == &model[range],
                            "after a crash block {} is neither flushed nor latest", b
                        );
                    }
                    model.clone_from(&all);
                    flushed = all;
                }
            }
        }
        let all = read_all(&ov);
        prop_assert!(all == model, "final content differs");
        prop_assert!(src.data() == &img[..], "the snapshot was modified");
    }
}
