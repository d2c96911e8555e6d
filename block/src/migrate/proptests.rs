//! Model-based test of the migrating device: random guest writes,
//! discards, reads (copy-on-read; into bytes and into guest buffers cut
//! at random places), flushes, copier steps, checkpoints and
//! crashes (drop without any sync, then reopen) against a `Vec<u8>` model.
//!
//! Two kinds of crash: a **kill** (the daemon dies, the machine runs on:
//! the live bitmap journals and the page cache survive), after which every
//! block must read exactly as the guest last wrote it, flushed or not; and
//! a **power loss** (journals ignored, as after a reboot), after which
//! every 4 KiB block must read as its content at the last flush or as one
//! of the contents guest requests gave it since. At the end, after a
//! flush, the completed target must equal the model exactly.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::tests::{fast, image, Fixture, CS};
use super::{MigrationOptions, MigrationPhase};
use crate::device::tests::{read_vectored, split_lens};
use crate::device::BlockDevice;

const CHUNKS: usize = 8;
const SIZE: u64 = CHUNKS as u64 * CS as u64;
const BLOCK: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: u64,
        seed: u8,
    },
    Discard {
        offset: u64,
        len: u64,
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
    Flush,
    /// The copier copies one chunk.
    Copy {
        chunk: u64,
    },
    /// The copier checkpoints (target sync, then the migrated bits).
    Checkpoint,
    /// The daemon dies (no sync) and a new one opens the same files.
    Kill,
    /// The machine loses power: as `Kill`, and the live journals no longer
    /// vouch for anything.
    PowerLoss,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE / 512, 1..=24u64).prop_map(|(sector, n)| {
        let offset = sector * 512;
        (offset, (n * 512).min(SIZE - offset))
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        1 => range().prop_map(|(offset, len)| Op::Discard { offset, len }),
        2 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        2 => (range(), proptest::collection::vec(any::<usize>(), 0..8))
            .prop_map(|((offset, len), cuts)| Op::ReadVectored { offset, len, cuts }),
        2 => Just(Op::Flush),
        3 => (0..CHUNKS as u64).prop_map(|chunk| Op::Copy { chunk }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Kill),
        1 => Just(Op::PowerLoss),
    ]
}

/// The model: current contents, and per block the contents it may have
/// after a crash (its flushed content, then every later version).
struct Model {
    bytes: Vec<u8>,
    versions: HashMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    fn block(&self, b: u64) -> Vec<u8> {
        self.bytes[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].to_vec()
    }

    fn apply(&mut self, offset: u64, data: &[u8]) {
        let (first, last) = (offset / BLOCK, (offset + data.len() as u64 - 1) / BLOCK);
        for b in first..=last {
            let before = self.block(b);
            self.versions.entry(b).or_insert_with(|| vec![before]);
        }
        self.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in first..=last {
            let now = self.block(b);
            if let Some(v) = self.versions.get_mut(&b) {
                v.push(now);
            }
        }
    }

    fn flushed(&mut self) {
        self.versions.clear();
    }
}

/// The copier is never started: the test drives copies itself.
fn no_copier() -> MigrationOptions {
    fast()
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let fx = Fixture::new(image(CHUNKS, 0, 5));
    let mut model = Model {
        bytes: fx.image.clone(),
        versions: HashMap::new(),
    };
    let mut dev = fx.open(no_copier());
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { offset, len, seed } => {
                let data: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ seed)
                    .collect();
                dev.write_at(&data, offset).unwrap();
                model.apply(offset, &data);
            }
            Op::Discard { offset, len } => {
                dev.discard(offset, len).unwrap();
                model.apply(offset, &vec![0u8; len as usize]);
            }
            Op::ReadVectored {
                offset,
                len,
                ref cuts,
            } => {
                let lens = split_lens(len as usize, cuts);
                let got = read_vectored(dev.as_ref(), offset, &lens).unwrap();
                let want = &model.bytes[offset as usize..(offset + len) as usize];
                prop_assert!(
                    got == want,
                    "op {}: vectored read of {} at {} in {:?} differs",
                    i,
                    len,
                    offset,
                    lens
                );
            }
            Op::Read { offset, len } => {
                let mut got = vec![0u8; len as usize];
                dev.read_at(&mut got, offset).unwrap();
                let want = &model.bytes[offset as usize..(offset + len) as usize];
                prop_assert!(
                    got == want,
                    "op {}: read of {} at {} differs",
                    i,
                    len,
                    offset
                );
            }
            Op::Flush => {
                dev.flush().unwrap();
                model.flushed();
            }
            Op::Copy { chunk } => {
                if let Some(l) = dev.layers() {
                    let _ = dev.copy_chunk(&l, chunk, None);
                }
            }
            Op::Checkpoint => {
                if let Some(l) = dev.layers() {
                    dev.checkpoint(&l).unwrap();
                }
            }
            Op::Kill | Op::PowerLoss => {
                let power_loss = matches!(op, Op::PowerLoss);
                dev.halt();
                drop(dev);
                if power_loss {
                    forget_journals(&fx.state_path());
                }
                dev = fx.open(no_copier());
                let mut all = vec![0u8; SIZE as usize];
                // Reading everything would copy it all: read the target and
                // overlay views without copy-on-read.
                dev.pause();
                dev.read_at(&mut all, 0).unwrap();
                dev.resume();
                for b in 0..SIZE / BLOCK {
                    let got = &all[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                    let latest = &model.bytes[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                    let ok = match model.versions.get(&b) {
                        _ if !power_loss => got == latest,
                        None => got == latest,
                        Some(v) => v.iter().any(|x| x == got),
                    };
                    prop_assert!(
                        ok,
                        "op {}: after the {} block {} is {}",
                        i,
                        if power_loss { "power loss" } else { "kill" },
                        b,
                        if power_loss {
                            "none of its versions since the last flush"
                        } else {
                            "not what the guest last wrote"
                        }
                    );
                }
                model.bytes = all;
                // After a kill nothing became durable: a later power loss
                // may still take back what was not flushed. After a power
                // loss what survived is what the disk holds.
                if power_loss {
                    model.flushed();
                }
            }
        }
    }
    dev.flush().unwrap();
    dev.start().unwrap();
    prop_assert_eq!(dev.wait(Duration::from_secs(30)), MigrationPhase::Complete);
    let target = fx.target_bytes();
    prop_assert!(
        target == model.bytes,
        "the completed target differs from the model"
    );
    // Complete: reads pass to the target, vectored ones too.
    let lens = split_lens(SIZE as usize - 700, &[1, 4095, 4097, CS as usize + 3]);
    let got = read_vectored(dev.as_ref(), 700, &lens).unwrap();
    prop_assert!(
        got == model.bytes[700..],
        "vectored read after completion differs"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_io_copies_and_crashes_match_the_model(ops in prop::collection::vec(op(), 1..48)) {
        run(&ops)?;
    }
}

/// Removes every live bitmap journal in `state`, as a reboot makes them
/// worthless.
fn forget_journals(state: &std::path::Path) {
    for entry in std::fs::read_dir(state).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "live") {
            std::fs::remove_file(path).unwrap();
        }
    }
}
