//! Tests of the migrating device and its copier, on real files with real
//! syncs: the whole stack is `VecSource` → `ChunkCache` → `SnapshotLayer`
//! → `Overlay` (in a state dir) → `MigratingDevice` → `Target` file.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cache::ChunkCache;
use crate::source::{check_read_write, VecSource};
use crate::state::DirState;

pub(super) const CS: u32 = 16 << 10;
const CSU: usize = CS as usize;

/// An image of `chunks` chunks (plus a short tail chunk of `tail` bytes):
/// every third chunk zero, one duplicate, the rest pseudo-random.
pub(super) fn image(chunks: usize, tail: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; chunks * CSU + tail];
    for (i, chunk) in data.chunks_mut(CSU).enumerate() {
        if i % 3 != 1 {
            rng.fill(chunk);
        }
    }
    if chunks > 6 {
        let (a, b) = data.split_at_mut(5 * CSU);
        b[..CSU].copy_from_slice(&a[..CSU]);
    }
    data
}

pub(super) struct Fixture {
    dir: tempfile::TempDir,
    pub(super) src: Arc<VecSource>,
    pub(super) snapshot: Arc<SnapshotLayer>,
    pub(super) image: Vec<u8>,
}

impl Fixture {
    pub(super) fn new(image: Vec<u8>) -> Fixture {
        let src = Arc::new(VecSource::new(image.clone(), CS));
        let snapshot =
            Arc::new(SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(1 << 20))).unwrap());
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            src,
            snapshot,
            image,
        }
    }

    fn size(&self) -> u64 {
        self.image.len() as u64
    }

    fn chunks(&self) -> u64 {
        self.size().div_ceil(u64::from(CS))
    }

    pub(super) fn state_path(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn target_path(&self) -> PathBuf {
        self.dir.path().join("target.raw")
    }

    fn state(&self) -> Arc<DirState> {
        Arc::new(DirState::open(&self.state_path(), "snap-1", self.size(), CS).unwrap())
    }

    fn try_open(&self, opts: MigrationOptions) -> Result<Arc<MigratingDevice>> {
        let state = self.state();
        let target = Target::open(&self.target_path(), self.size()).unwrap();
        if MigratingDevice::is_complete_in(&*state) {
            return MigratingDevice::open_complete(state, target);
        }
        let overlay = Arc::new(Overlay::open_in(&*state, self.snapshot.clone()).unwrap());
        MigratingDevice::open(state, overlay, self.snapshot.clone(), target, opts)
    }

    pub(super) fn open(&self, opts: MigrationOptions) -> Arc<MigratingDevice> {
        self.try_open(opts).unwrap()
    }

    pub(super) fn target_bytes(&self) -> Vec<u8> {
        let mut bytes = std::fs::read(self.target_path()).unwrap();
        bytes.truncate(self.image.len());
        bytes
    }

    /// Bits of the migrated bitmap as they are on disk.
    fn durable_chunks(&self) -> u64 {
        let header = BitmapHeader {
            kind: BitmapKind::MigratedChunks,
            granule: CS,
            image_size: self.size(),
            binding: "snap-1".into(),
        };
        PersistentBitmap::open(&self.state_path().join("migrated.bitmap"), &header)
            .map(|b| b.count_ones())
            .unwrap_or(0)
    }
}

pub(super) fn fast() -> MigrationOptions {
    MigrationOptions {
        workers: 4,
        checkpoint_interval: Duration::from_millis(20),
        yield_window: Duration::from_millis(1),
        max_yield: Duration::from_millis(2),
        ..MigrationOptions::default()
    }
}

pub(super) fn wait_complete(dev: &MigratingDevice) {
    let state = dev.wait(Duration::from_secs(60));
    assert_eq!(state, MigrationPhase::Complete, "{:?}", dev.status());
}

/// Panics at the first byte where `got` differs from `want`.
pub(super) fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs at byte {i} (chunk {}): got {:#04x}, want {:#04x}",
            i / CSU,
            got[i],
            want[i]
        );
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut all = vec![0u8; dev.size() as usize];
    dev.read_at(&mut all, 0).unwrap();
    all
}

#[test]
fn migrates_to_a_fresh_sparse_target_without_writing_zero_chunks() {
    let fx = Fixture::new(image(48, 0, 1));
    let dev = fx.open(fast());
    let mut model = fx.image.clone();
    // Guest writes before and during the copy: into a zero chunk, across
    // chunks, and a discard that turns a data chunk into zeroes.
    dev.write_at(&[0x11; 3000], u64::from(CS) + 100).unwrap();
    model[CSU + 100..CSU + 3100].fill(0x11);
    dev.discard(6 * u64::from(CS), u64::from(CS)).unwrap();
    model[6 * CSU..7 * CSU].fill(0);
    // What has to move: the 32 chunks with data in the snapshot (every
    // third one is zero), plus zero chunk 1 that the guest wrote into.
    // Chunk 6, discarded, is still counted: only its copy tells.
    let before = dev.status();
    assert_eq!(before.bytes_to_copy, 33 * u64::from(CS), "{before:?}");
    assert_eq!((before.bytes_copied, before.bytes_skipped), (0, 0));
    assert_eq!(before.overlay_write_bytes, 3000);
    assert_eq!(before.journal, JournalState::Active);
    dev.start().unwrap();
    dev.write_at(&[0x22; 8192], 10 * u64::from(CS) - 4096)
        .unwrap();
    model[10 * CSU - 4096..10 * CSU + 4096].fill(0x22);
    wait_complete(&dev);

    assert_same(&fx.target_bytes(), &model, "target after migration");
    let zero_chunks = model
        .chunks(CSU)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64;
    assert!(zero_chunks >= 15);
    let allocated = std::fs::metadata(fx.target_path()).unwrap().blocks() * 512;
    let data_bytes = fx.size() - zero_chunks * u64::from(CS);
    // Slack for an extent-tree block, less than one chunk.
    assert!(
        allocated <= data_bytes + 8192,
        "zero chunks were written: {allocated} bytes allocated for {data_bytes} bytes of data"
    );
    let s = dev.status();
    assert_eq!(s.phase, MigrationPhase::Complete);
    assert_eq!((s.bytes_migrated, s.bytes_total), (fx.size(), fx.size()));
    // Copied and skipped bytes add up to the image; every zero chunk of
    // the result was skipped, never copied; nothing is left to copy.
    assert_eq!(s.bytes_copied + s.bytes_skipped, fx.size(), "{s:?}");
    assert!(s.bytes_skipped >= zero_chunks * u64::from(CS), "{s:?}");
    assert_eq!(s.bytes_to_copy, s.bytes_copied, "{s:?}");
    assert_eq!(s.eta_seconds, Some(0.0));
    assert_eq!((s.chunks_migrated, s.chunks_total), (48, 48));
    assert_eq!(s.overlay_bytes, 0);
    assert!(dev.is_complete());
    assert!(
        !fx.state_path().join("overlay.data").exists(),
        "overlay not freed"
    );
    assert!(!fx.state_path().join("overlay.bitmap").exists());
    assert_eq!(dev.state.migration().0, MigrationState::Complete);

    // Passthrough: the shared check, and every change lands on the target.
    check_read_write(&*dev, &mut model);
    assert_same(
        &fx.target_bytes(),
        &model,
        "target after passthrough writes",
    );
}

#[test]
fn a_prefilled_target_is_zeroed_where_the_image_is_zero() {
    let fx = Fixture::new(image(30, 4096, 2));
    std::fs::write(fx.target_path(), vec![0xffu8; fx.image.len() + 8192]).unwrap();
    let dev = fx.open(fast());
    assert!(!dev.known_zero.load(Ordering::SeqCst));
    dev.start().unwrap();
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &fx.image, "prefilled target");
    // The bytes past the image are not ours and stay untouched.
    let all = std::fs::read(fx.target_path()).unwrap();
    assert!(all[fx.image.len()..].iter().all(|&b| b == 0xff));
}

#[test]
fn copy_on_read_moves_chunks_and_the_shared_check_holds_mid_migration() {
    let fx = Fixture::new(image(24, 2048, 3));
    let dev = fx.open(fast());
    let mut model = fx.image.clone();
    // Reads of chunks 2..=4 (a data, a zero and a data chunk) migrate them.
    let mut buf = vec![0u8; 2 * CSU + 100];
    dev.read_at(&mut buf, 2 * u64::from(CS) + 50).unwrap();
    assert_same(
        &buf,
        &model[2 * CSU + 50..4 * CSU + 150],
        "copy-on-read data",
    );
    let s = dev.status();
    assert_eq!(s.chunks_migrated, 3);
    assert_eq!(s.bytes_copied_on_read, 3 * u64::from(CS));
    let l = dev.layers().unwrap();
    assert!((2..=4).all(|c| l.migrated.get(c)) && !l.migrated.get(1) && !l.migrated.get(5));
    assert_same(
        &fx.target_bytes()[2 * CSU..5 * CSU],
        &model[2 * CSU..5 * CSU],
        "copied chunks on the target",
    );
    // Reading them again costs nothing more.
    dev.read_at(&mut buf, 2 * u64::from(CS) + 50).unwrap();
    assert_eq!(dev.status().bytes_copied_on_read, 3 * u64::from(CS));
    drop(l);

    // Every access pattern, half migrated (the check reads, so it migrates more).
    check_read_write(&*dev, &mut model);
    dev.start().unwrap();
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &model, "target");
}

#[test]
fn concurrent_guest_writes_and_flushes_during_migration_reach_the_target() {
    for seed in [11u64, 12, 13] {
        // A small image written hard: most copies overlap a write to their chunk.
        let fx = Fixture::new(image(32, 0, seed));
        // Slow store reads widen every race window between copies and writes.
        fx.src.set_read_delay(Duration::from_millis(1));
        let dev = fx.open(MigrationOptions {
            copy_rate: 1 << 20,
            ..fast()
        });
        let model = Mutex::new(fx.image.clone());
        let size = fx.size();
        const THREADS: u64 = 4;
        // Thread t owns 12 KiB stripes starting at 6 KiB + 12 KiB * j with
        // j % THREADS == t: every stripe straddles or touches a chunk edge.
        let stripe = |j: u64| (6144 + 12288 * j, (18432 + 12288 * j).min(size));
        let stripes = (size - 6144).div_ceil(12288);
        dev.start().unwrap();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (dev, model) = (&dev, &model);
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed * 100 + t);
                    let mut ops = 0;
                    while ops < 400 || (!dev.is_complete() && ops < 20_000) {
                        ops += 1;
                        let j = rng.gen_range(0..stripes / THREADS) * THREADS + t;
                        let (lo, hi) = stripe(j);
                        let sectors = (hi - lo) / 512;
                        let first = rng.gen_range(0..sectors);
                        let n = rng.gen_range(1..=sectors - first);
                        let (off, len) = (lo + first * 512, n * 512);
                        let range = off as usize..(off + len) as usize;
                        match rng.gen_range(0..10) {
                            0..=4 => {
                                let mut data = vec![0u8; len as usize];
                                rng.fill(&mut data[..]);
                                dev.write_at(&data, off).unwrap();
                                model.lock().unwrap()[range].copy_from_slice(&data);
                            }
                            5 => {
                                dev.write_zeroes(off, len).unwrap();
                                model.lock().unwrap()[range].fill(0);
                            }
                            6 => {
                                dev.discard(off, len).unwrap();
                                model.lock().unwrap()[range].fill(0);
                            }
                            7 => dev.flush().unwrap(),
                            _ => {
                                let mut got = vec![0u8; (hi - lo) as usize];
                                dev.read_at(&mut got, lo).unwrap();
                                let want = model.lock().unwrap()[lo as usize..hi as usize].to_vec();
                                assert_same(
                                    &got,
                                    &want,
                                    &format!("seed {seed} thread {t} stripe {j}"),
                                );
                            }
                        }
                    }
                });
            }
        });
        wait_complete(&dev);
        let model = model.into_inner().unwrap();
        assert_same(&read_all(&*dev), &model, &format!("seed {seed}: device"));
        assert_same(&fx.target_bytes(), &model, &format!("seed {seed}: target"));
    }
}

#[test]
fn crash_and_resume_never_loses_progress_or_flushed_writes() {
    let fx = Fixture::new(image(320, 0, 21));
    let opts = MigrationOptions {
        copy_rate: 1 << 20,
        checkpoint_interval: Duration::from_millis(30),
        ..fast()
    };
    let mut rng = StdRng::seed_from_u64(21);
    let mut model = fx.image.clone();
    let mut durable_before = 0;
    // Blocks written after the last flush before a crash: (offset, old, new).
    let mut unflushed: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
    let blocks = fx.size() / 4096;
    for round in 0..6 {
        // Odd rounds copy on read too; even rounds read everything back
        // (which would migrate it all with copy-on-read).
        let copy_on_read = round % 2 == 1;
        let dev = fx.open(MigrationOptions {
            copy_on_read,
            ..opts.clone()
        });
        assert_eq!(
            dev.wait(Duration::ZERO),
            MigrationPhase::Migrating,
            "round {round}"
        );
        let resumed = dev.status().chunks_migrated;
        assert!(
            resumed >= durable_before,
            "round {round}: progress went back from {durable_before} to {resumed}"
        );
        if round > 1 {
            assert!(
                resumed > 0,
                "round {round}: nothing persisted across a crash"
            );
        }
        // An unflushed write survives whole or not at all.
        for (off, old, new) in unflushed.drain(..) {
            let mut got = vec![0u8; 4096];
            dev.read_at(&mut got, off).unwrap();
            assert!(
                got == old || got == new,
                "round {round}: block at {off} is neither before nor after its unflushed write"
            );
            model[off as usize..off as usize + 4096].copy_from_slice(&got);
        }
        // Everything flushed before the crash is there.
        if copy_on_read {
            let off = rng.gen_range(0..blocks - 8) * 4096;
            let mut got = vec![0u8; 8 * 4096];
            dev.read_at(&mut got, off).unwrap();
            let want = &model[off as usize..off as usize + got.len()];
            assert_same(&got, want, &format!("round {round}: after resume"));
        } else {
            assert_same(
                &read_all(&*dev),
                &model,
                &format!("round {round}: after resume"),
            );
        }

        dev.start().unwrap();
        let run_for = Duration::from_millis(rng.gen_range(80..250));
        let started = Instant::now();
        while started.elapsed() < run_for {
            let off = rng.gen_range(0..blocks) * 4096;
            let mut data = vec![0u8; 4096];
            if rng.gen_bool(0.8) {
                rng.fill(&mut data[..]);
                dev.write_at(&data, off).unwrap();
            } else {
                dev.discard(off, 4096).unwrap();
            }
            model[off as usize..off as usize + 4096].copy_from_slice(&data);
            if rng.gen_bool(0.2) {
                dev.flush().unwrap();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        dev.flush().unwrap();
        for _ in 0..8 {
            let off = rng.gen_range(0..blocks) * 4096;
            if unflushed.iter().any(|(o, _, _)| *o == off) {
                continue;
            }
            let mut data = vec![0u8; 4096];
            rng.fill(&mut data[..]);
            dev.write_at(&data, off).unwrap();
            let old = model[off as usize..off as usize + 4096].to_vec();
            unflushed.push((off, old, data));
        }
        // Crash: the copier stops dead, nothing is synced.
        dev.halt();
        let durable = fx.durable_chunks();
        assert!(
            durable >= durable_before,
            "round {round}: durable bits went back"
        );
        assert!(
            durable < fx.chunks(),
            "round {round}: migration finished too early for the test"
        );
        durable_before = durable;
        drop(dev);
    }
    let dev = fx.open(opts);
    assert!(dev.status().chunks_migrated >= durable_before);
    for (off, old, new) in unflushed.drain(..) {
        let mut got = vec![0u8; 4096];
        dev.read_at(&mut got, off).unwrap();
        assert!(got == old || got == new);
        model[off as usize..off as usize + 4096].copy_from_slice(&got);
    }
    dev.set_rate(0);
    dev.start().unwrap();
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &model, "target after the last resume");
}

/// Polls `cond` until it holds; panics after a generous deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rate_limit_is_honoured_and_changeable_and_status_reports_progress() {
    let mut img = image(64, 0, 31);
    img.iter_mut().filter(|b| **b == 0).for_each(|b| *b = 1);
    let fx = Fixture::new(img);
    let rate = 256u64 << 10;
    let dev = fx.open(MigrationOptions {
        copy_rate: rate,
        ..fast()
    });
    dev.start().unwrap();
    wait_until("progress and a measured rate", || {
        let s = dev.status();
        s.bytes_copied > 0 && s.copy_rate > 0.0
    });
    let mid = dev.status();
    assert_eq!(mid.phase, MigrationPhase::Migrating);
    assert_eq!(mid.rate_limit, rate);
    assert_eq!(mid.bytes_to_copy, fx.size(), "{mid:?}");
    assert!(mid.bytes_copied < mid.bytes_to_copy, "{mid:?}");
    // The rate shown beside the limit never exceeds it.
    assert!(mid.copy_rate <= rate as f64, "{mid:?}");
    assert!(mid.eta_seconds.is_some_and(|eta| eta > 0.0), "{mid:?}");
    dev.set_rate(0);
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &fx.image, "target");

    // At a crawl (1 B/s, far below one chunk per second), a guest reading
    // the whole image migrates it by copy-on-read: the guest's demand is
    // not paced, and it is counted apart, never in the copy rate shown
    // beside the limit. Lifting the limit at run time finishes the rest.
    let fx = Fixture::new(image(64, 0, 32));
    let dev = fx.open(MigrationOptions {
        copy_rate: 1,
        ..fast()
    });
    dev.start().unwrap();
    let mut all = vec![0u8; fx.image.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert_same(&all, &fx.image, "reads under a crawl");
    let s = dev.status();
    assert!(s.bytes_copied_on_read > 0, "{s:?}");
    assert!(s.copy_rate <= 1.0, "{s:?}");
    dev.set_rate(0);
    assert_eq!(dev.status().rate_limit, 0);
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &fx.image, "target");
}

#[test]
fn pause_stops_progress_and_resume_continues() {
    let fx = Fixture::new(image(96, 0, 41));
    let dev = fx.open(MigrationOptions {
        copy_rate: 4 << 20,
        ..fast()
    });
    dev.start().unwrap();
    wait_until("the first chunks", || dev.status().chunks_migrated > 0);
    dev.pause();
    // In-flight chunks finish; once no worker is busy after the pause, no
    // copy can start before a resume.
    wait_until("the in-flight copies", || {
        dev.copier_busy.load(Ordering::SeqCst) == 0
    });
    let before = dev.status();
    assert_eq!(before.phase, MigrationPhase::Paused);
    assert!(
        before.chunks_migrated > 0 && before.chunks_migrated < 96,
        "{before:?}"
    );
    // Paused, a read of a chunk not migrated is served without copying it.
    let l = dev.layers().unwrap();
    let c = l.migrated.next_clear(0, 96).unwrap();
    drop(l);
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, c * u64::from(CS)).unwrap();
    assert_same(
        &buf,
        &fx.image[c as usize * CSU..c as usize * CSU + 4096],
        "paused read",
    );
    // Every worker goes round its paused wait a few times, copying nothing.
    let turns = dev.paused_turns.load(Ordering::SeqCst);
    wait_until("paused workers to wake", || {
        dev.paused_turns.load(Ordering::SeqCst) >= turns + 2 * fast().workers as u64
    });
    let after = dev.status();
    assert_eq!(
        after.chunks_migrated, before.chunks_migrated,
        "progress while paused"
    );
    assert_eq!(after.bytes_copied_on_read, 0);
    dev.resume();
    assert_eq!(dev.status().phase, MigrationPhase::Migrating);
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &fx.image, "target");
}

#[test]
fn unreadable_chunks_fail_the_migration_but_not_the_rest() {
    let fx = Fixture::new(image(40, 0, 51));
    fx.src.set_failing(5, true);
    fx.src.set_failing(9, true);
    let mut model = fx.image.clone();
    let dev = fx.open(fast());
    dev.start().unwrap();
    assert_eq!(dev.wait(Duration::from_secs(30)), MigrationPhase::Failed);
    let s = dev.status();
    assert_eq!((s.chunks_failed, s.chunks_migrated), (2, 38), "{s:?}");
    let reason = s.error.unwrap();
    assert!(
        reason.contains("2 chunks") && reason.contains("chunk 5"),
        "{reason}"
    );
    let failed: Vec<u64> = dev.failed_chunks().iter().map(|(c, _)| *c).collect();
    assert_eq!(failed, vec![5, 9]);
    // The guest gets an error for the bad chunk, data for the others.
    let mut buf = vec![0u8; 4096];
    assert!(dev.read_at(&mut buf, 5 * u64::from(CS)).is_err());
    dev.read_at(&mut buf, 4 * u64::from(CS)).unwrap();
    assert_same(&buf, &model[4 * CSU..4 * CSU + 4096], "chunk 4");
    let target = fx.target_bytes();
    for c in (0..40).filter(|c| *c != 5 && *c != 9) {
        assert_same(
            &target[c * CSU..(c + 1) * CSU],
            &model[c * CSU..(c + 1) * CSU],
            &format!("chunk {c}"),
        );
    }
    assert_eq!(dev.state.migration().0, MigrationState::InProgress);

    // The guest overwrites chunk 9 whole: it no longer needs the store.
    let fresh = vec![0x99u8; CSU];
    dev.write_at(&fresh, 9 * u64::from(CS)).unwrap();
    model[9 * CSU..10 * CSU].copy_from_slice(&fresh);
    // resume() turns the phase back to migrating before it returns, so
    // the wait sees the retry's outcome, not the old failure.
    dev.resume();
    assert_eq!(dev.status().phase, MigrationPhase::Migrating);
    assert_eq!(dev.wait(Duration::from_secs(30)), MigrationPhase::Failed);
    assert_eq!(dev.failed_chunks().len(), 1);
    // The store is repaired: the last retry completes.
    fx.src.set_failing(5, false);
    dev.resume();
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &model, "target");
}

#[test]
fn completion_survives_a_restart_and_serves_the_target_alone() {
    let fx = Fixture::new(image(20, 0, 61));
    let mut model = fx.image.clone();
    let dev = fx.open(fast());
    dev.write_at(&[5u8; 700], 300).unwrap();
    model[300..1000].fill(5);
    dev.start().unwrap();
    wait_complete(&dev);
    dev.shutdown().unwrap();
    drop(dev);

    // The store is gone for good: the target alone serves.
    for c in 0..20 {
        fx.src.set_failing(c, true);
    }
    let state = fx.state();
    assert!(MigratingDevice::is_complete_in(&*state));
    let target = Target::open(&fx.target_path(), fx.size()).unwrap();
    let dev = MigratingDevice::open_complete(state, target).unwrap();
    assert!(dev.is_complete());
    assert_eq!(dev.status().phase, MigrationPhase::Complete);
    dev.start().unwrap();
    check_read_write(&*dev, &mut model);
    drop(dev);
    // open() on a completed state also passes through, and removes the
    // overlay files a crash during completion could have left.
    let dev = fx.open(fast());
    assert!(dev.is_complete());
    assert!(!fx.state_path().join("overlay.data").exists());
    assert_same(&read_all(&*dev), &model, "reopened");
    drop(dev);
    assert_same(&fx.target_bytes(), &model, "target");
}

#[test]
fn the_state_refuses_another_or_a_recreated_target() {
    let fx = Fixture::new(image(20, 0, 71));
    let dev = fx.open(fast());
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let state = fx.state();
    let overlay = Arc::new(Overlay::open_in(&*state, fx.snapshot.clone()).unwrap());
    let other = Target::open(&fx.dir.path().join("other.raw"), fx.size()).unwrap();
    let err = MigratingDevice::open(state, overlay, fx.snapshot.clone(), other, fast())
        .err()
        .unwrap();
    assert!(matches!(err, Error::TargetMismatch { .. }), "{err}");
    // The target vanished after chunk 0 was durably recorded on it.
    std::fs::remove_file(fx.target_path()).unwrap();
    let err = fx.try_open(fast()).err().unwrap();
    assert!(
        matches!(err, Error::TargetRecreated { chunks: 1, .. }),
        "{err}"
    );
}

#[test]
fn verify_passes_with_guest_writes_after_migration_and_catches_a_bad_target() {
    let fx = Fixture::new(image(24, 0, 81));
    let mut model = fx.image.clone();
    let dev = fx.open(MigrationOptions {
        verify: true,
        ..fast()
    });
    // Chunk 3 migrates, then the guest changes it on the target only.
    let mut buf = vec![0u8; 512];
    dev.read_at(&mut buf, 3 * u64::from(CS)).unwrap();
    dev.write_at(&[0x33; 1024], 3 * u64::from(CS) + 512)
        .unwrap();
    model[3 * CSU + 512..3 * CSU + 1536].fill(0x33);
    dev.start().unwrap();
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &model, "verified target");

    let fx = Fixture::new(image(24, 0, 82));
    let dev = fx.open(MigrationOptions {
        verify: true,
        ..fast()
    });
    dev.read_at(&mut buf, 7 * u64::from(CS)).unwrap();
    // Something else scribbles on the target behind our back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(fx.target_path())
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 16], 7 * u64::from(CS) + 99).unwrap();
    dev.start().unwrap();
    assert_eq!(dev.wait(Duration::from_secs(30)), MigrationPhase::Failed);
    let reason = dev.status().error.unwrap();
    assert!(
        reason.contains("Verify failed: 1 chunks") && reason.contains("chunk 7"),
        "{reason}"
    );
    assert_eq!(dev.state.migration().0, MigrationState::InProgress);
    assert!(
        fx.state_path().join("overlay.data").exists(),
        "overlay freed after a failed verify"
    );
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(path))
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot resize the tmpfs");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_target_fails_writes_keeps_reads_and_recovers() {
    let fx = Fixture::new(image(64, 0, 91));
    let Some(fs) = SmallFs::mount(fx.dir.path().join("small"), "256k") else {
        eprintln!("SKIPPED a_full_target_fails_writes_keeps_reads_and_recovers: cannot mount a tmpfs (needs root)");
        return;
    };
    let state = fx.state();
    let overlay = Arc::new(Overlay::open_in(&*state, fx.snapshot.clone()).unwrap());
    let target = Target::open(&fs.0.join("target.raw"), fx.size()).unwrap();
    let dev = MigratingDevice::open(state, overlay, fx.snapshot.clone(), target, fast()).unwrap();
    let mut model = fx.image.clone();
    // Chunk 1 is zero: on the fresh target, migrating it writes nothing.
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, u64::from(CS)).unwrap();
    assert!(dev.layers().unwrap().migrated.get(1));
    dev.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.status().error.is_none() {
        assert!(
            Instant::now() < deadline,
            "the target never filled up: {:?}",
            dev.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = dev.status();
    assert_eq!(s.phase, MigrationPhase::Migrating);
    assert!(
        s.error.as_ref().unwrap().contains("Target write failed"),
        "{s:?}"
    );
    assert!(s.chunks_migrated < 64);
    // A guest write to a migrated chunk needing new space fails...
    assert!(dev.write_at(&[7u8; 4096], u64::from(CS)).is_err());
    // ...writes to chunks not migrated go to the overlay, and reads work.
    let l = dev.layers().unwrap();
    let c = (0..64).rev().find(|&c| !l.migrated.get(c)).unwrap();
    drop(l);
    dev.write_at(&[8u8; 4096], c * u64::from(CS)).unwrap();
    model[c as usize * CSU..c as usize * CSU + 4096].fill(8);
    assert_same(&read_all(&*dev), &model, "reads while the target is full");
    dev.flush().unwrap();
    // Space comes back: the copier recovers on its own.
    fs.resize("16m");
    wait_complete(&dev);
    assert_eq!(dev.status().error, None);
    dev.write_at(&[7u8; 4096], u64::from(CS)).unwrap();
    model[CSU..CSU + 4096].fill(7);
    let mut on_target = std::fs::read(fs.0.join("target.raw")).unwrap();
    on_target.truncate(model.len());
    assert_same(&on_target, &model, "target after recovery");
    drop(dev);
}

#[test]
fn the_copier_backs_off_while_the_guest_is_busy() {
    let fx = Fixture::new(image(64, 0, 101));
    let dev = fx.open(MigrationOptions {
        workers: 2,
        // A wide window, so a guest thread descheduled on a loaded machine
        // still counts as busy.
        yield_window: Duration::from_millis(200),
        max_yield: Duration::from_millis(100),
        ..fast()
    });
    let mut buf = vec![0u8; 512];
    dev.read_at(&mut buf, 0).unwrap();
    let busy_for = Duration::from_millis(400);
    let started = Instant::now();
    dev.start().unwrap();
    // A guest that never pauses: each worker copies at most one chunk per
    // max_yield, so about 2 * 400 / 100 chunks instead of all 64.
    while started.elapsed() < busy_for {
        dev.read_at(&mut buf, 0).unwrap();
    }
    let during = dev.status().chunks_migrated;
    assert!(
        during <= 1 + 2 * 6,
        "{during} chunks copied while the guest was busy"
    );
    // Idle again: the copier runs at full speed.
    wait_complete(&dev);
    assert_same(&fx.target_bytes(), &fx.image, "target");
}

#[test]
fn status_says_which_journal_is_off_and_why() {
    let fx = Fixture::new(image(8, 0, 111));
    // A directory where the migrated bitmap's journal would go: that
    // journal cannot start, the others run.
    std::fs::create_dir_all(fx.state_path()).unwrap();
    let live = crate::bitmap::journal_path(&fx.state_path().join("migrated.bitmap"));
    std::fs::create_dir(&live).unwrap();
    let dev = fx.open(fast());
    match dev.status().journal {
        JournalState::Inactive(reason) => assert!(
            reason.starts_with("migrated bitmap: cannot create"),
            "{reason}"
        ),
        JournalState::Active => panic!("the migrated bitmap has no journal"),
    }
    dev.start().unwrap();
    wait_complete(&dev);
    // Complete: no journal is needed any more, and the status says so.
    match dev.status().journal {
        JournalState::Inactive(reason) => assert!(reason.starts_with("not needed"), "{reason}"),
        JournalState::Active => panic!("a complete migration keeps no journal"),
    }
}
