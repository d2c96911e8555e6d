//! Semantics of the protection layer over in-memory devices.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::*;
use crate::cache::ChunkCache;
use crate::mem_device::MemDevice;
use crate::migrate::{MigratingDevice, MigrationOptions, MigrationPhase};
use crate::overlay::Overlay;
use crate::snapshot::SnapshotLayer;
use crate::source::VecSource;
use crate::state::DirState;
use crate::target::Target;

const CHUNK: u32 = 16 << 10;
const CHUNKS: u64 = 32;

fn opts(full: bool) -> ProtectOptions {
    ProtectOptions {
        chunk_size: CHUNK,
        full,
        preserve_budget: DEFAULT_PRESERVE_BUDGET,
    }
}

fn open(dir: &Path, lower: Arc<dyn BlockDevice>, full: bool) -> Arc<ProtectLayer> {
    ProtectLayer::open(lower, dir, &opts(full)).unwrap()
}

/// A layer whose first point is a full read, keeping `budget` bytes of
/// preserved grains in memory.
fn open_full_with_budget(
    dir: &Path,
    lower: Arc<dyn BlockDevice>,
    budget: usize,
) -> Arc<ProtectLayer> {
    let opts = ProtectOptions {
        preserve_budget: budget,
        ..opts(true)
    };
    ProtectLayer::open(lower, dir, &opts).unwrap()
}

/// The disk as a point sees it: `base` (the disk at the last point) with
/// the captured chunks read through the point.
fn image_of(point: &Point, base: &[u8]) -> Vec<u8> {
    let mut img = base.to_vec();
    read_point(point, &mut img, 0, point.layer.nchunks);
    img
}

/// Reads the captured chunks among `first..first + n` through `point`
/// into `img` (the disk at the last point), as the store does: the
/// written grains of the chunks read in part in one call, the others
/// whole.
fn read_point(point: &Point, img: &mut [u8], first: u64, n: u64) {
    let cs = point.layer.chunk;
    let size = point.layer.size;
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    for c in (first..first + n).filter(|&c| point.is_captured(c)) {
        let at = c * cs;
        let end = (at + cs).min(size);
        match point.changed_grains(c) {
            None => point
                .read_at(&mut img[at as usize..end as usize], at)
                .unwrap(),
            Some(grains) => {
                for (i, _) in grains.iter().enumerate().filter(|(_, &w)| w) {
                    let off = at + i as u64 * GRAIN;
                    ranges.push((off, GRAIN.min(end - off) as usize));
                }
            }
        }
    }
    let mut got = vec![0; ranges.iter().map(|r| r.1).sum()];
    point.read_ranges(&ranges, &mut got).unwrap();
    let mut from = 0;
    for (off, len) in ranges {
        img[off as usize..off as usize + len].copy_from_slice(&got[from..from + len]);
        from += len;
    }
}

fn captured(point: &Point) -> Vec<u64> {
    (0..CHUNKS).filter(|&c| point.is_captured(c)).collect()
}

#[test]
fn a_point_holds_the_disk_at_its_instant_while_the_guest_rewrites_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let layer = open(dir.path(), mem.clone(), false);
    let cs = u64::from(CHUNK);
    assert!(layer.start_point().unwrap().1.is_none(), "nothing changed");
    let base = mem.snapshot();
    layer.write_at(&[0xa1; 4096], cs + 100).unwrap();
    layer.write_at(&[0xa3; 100], 3 * cs).unwrap();
    layer.write_zeroes(5 * cs, 2 * cs).unwrap();
    assert_eq!(layer.pending_bytes(), 4 * cs);
    let at_instant = mem.snapshot();
    let (_, point) = layer.start_point().unwrap();
    let point = point.unwrap();
    assert_eq!(captured(&point), [1, 3, 5, 6]);
    assert_eq!(point.chunks(), 4);
    // Chunks 1 and 3 are read in part (grains 0-1, grain 0), 5 and 6 whole.
    let t = true;
    assert_eq!(point.changed_grains(1), Some(vec![t, t, false, false]));
    assert_eq!(point.changed_grains(3), Some(vec![t, false, false, false]));
    assert_eq!(
        (point.changed_grains(5), point.changed_grains(2)),
        (None, None)
    );
    // After the instant: rewrite a captured chunk (preserved), write an
    // uncaptured one (not preserved), discard across a captured one.
    layer.write_at(&[0xb1; 8192], cs).unwrap();
    layer.write_at(&[0xb9; 512], 9 * cs).unwrap();
    layer.discard(2 * cs, 2 * cs).unwrap();
    // Only the grains written that the point reads: 8 KiB of chunk 1,
    // grain 0 of chunk 3.
    assert_eq!(layer.preserved_bytes(), 8192 + G);
    assert!(
        image_of(&point, &base) == at_instant,
        "the point differs from the disk at its instant"
    );
    assert_eq!(layer.preserved_bytes(), 0);
    point.finish().unwrap();
    // The next point has exactly the writes after the instant.
    let (_, next) = layer.start_point().unwrap();
    let next = next.unwrap();
    assert_eq!(captured(&next), [1, 2, 3, 9]);
    assert!(image_of(&next, &at_instant) == mem.snapshot());
    next.finish().unwrap();
}

#[test]
fn a_chunk_read_in_part_is_read_only_by_its_written_grains() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let layer = open(dir.path(), mem.clone(), false);
    let cs = u64::from(CHUNK);
    layer.write_at(&[1; 512], cs + 2 * G).unwrap();
    layer.write_at(&[2; 512], 3 * cs).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    let refused = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
    let mut chunk = vec![0; cs as usize];
    assert!(refused(point.read_at(&mut chunk, cs)), "read whole");
    let mut grain = vec![0; G as usize];
    assert!(
        refused(point.read_ranges(&[(cs, G as usize)], &mut grain)),
        "grain 0 was not written"
    );
    assert!(
        refused(point.read_ranges(&[(cs + 2 * G, 512)], &mut grain[..512])),
        "part of a grain"
    );
    assert!(
        refused(point.read_ranges(&[(5 * cs, G as usize)], &mut grain)),
        "not captured"
    );
    assert!(
        refused(point.read_ranges(&[(cs + 2 * G, G as usize)], &mut grain[..100])),
        "short buffer"
    );
    // Both chunks' grains in one call, as one range per chunk.
    let mut two = vec![0; 2 * G as usize];
    point
        .read_ranges(&[(cs + 2 * G, G as usize), (3 * cs, G as usize)], &mut two)
        .unwrap();
    assert!(two[..512] == [1; 512] && two[G as usize..][..512] == [2; 512]);
    assert!(
        point
            .read_ranges(&[(3 * cs, G as usize)], &mut grain)
            .is_err(),
        "each chunk is read once"
    );
    point.finish().unwrap();
}

#[test]
fn written_grains_survive_an_abandoned_point_but_not_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let cs = u64::from(CHUNK);
    let layer = open(dir.path(), mem.clone(), false);
    layer.write_at(&[1; 512], cs).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    layer.write_at(&[2; 512], cs + 2 * G).unwrap();
    point.abandon().unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    assert_eq!(
        point.changed_grains(1),
        Some(vec![true, false, true, false])
    );
    drop(point);
    drop(layer);
    // Reopened: the chunk is known changed, its grains are not.
    let layer = open(dir.path(), mem, false);
    let point = layer.start_point().unwrap().1.unwrap();
    assert_eq!(captured(&point), [1]);
    assert_eq!(point.changed_grains(1), None);
    let mut chunk = vec![0; cs as usize];
    point.read_at(&mut chunk, cs).unwrap();
    point.finish().unwrap();
    // Grains are tracked again from then on.
    layer.write_at(&[3; 512], cs + 3 * G).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    assert_eq!(
        point.changed_grains(1),
        Some(vec![false, false, false, true])
    );
}

#[test]
fn a_chunk_is_read_whole_once_its_patch_would_hold_more_than_half() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let layer = open(dir.path(), mem, false);
    let cs = u64::from(CHUNK);
    let (f, t) = (false, true);
    let point_after = |grain: u64| {
        layer.write_at(&[grain as u8; 512], cs + grain * G).unwrap();
        layer.start_point().unwrap().1.unwrap()
    };
    // Grains 0, then 1: the patch holds at most half of the 4 grains.
    let p = point_after(0);
    assert_eq!(p.changed_grains(1), Some(vec![t, f, f, f]));
    p.finish().unwrap();
    let p = point_after(1);
    assert_eq!(p.changed_grains(1), Some(vec![f, t, f, f]));
    p.finish().unwrap();
    // Grain 2 would make it 3 of 4: read whole (an abandoned point
    // changes nothing), and the patch starts again after it.
    let p = point_after(2);
    assert_eq!(p.changed_grains(1), None);
    p.abandon().unwrap();
    let p = layer.start_point().unwrap().1.unwrap();
    assert_eq!(p.changed_grains(1), None);
    p.finish().unwrap();
    let p = point_after(3);
    assert_eq!(p.changed_grains(1), Some(vec![f, f, f, t]));
}

#[test]
fn a_full_point_reads_every_chunk_and_preserves_any() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = vec![0u8; (CHUNKS * u64::from(CHUNK)) as usize - 512];
    img.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i / 512) as u8);
    let mem = Arc::new(MemDevice::from_vec(img.clone()));
    let layer = open(dir.path(), mem.clone(), true);
    assert!(layer.full_needed());
    let (_, point) = layer.start_point().unwrap();
    let point = point.unwrap();
    assert!(point.full());
    assert_eq!(captured(&point).len() as u64, CHUNKS);
    layer.write_at(&[1; 512], 7 * u64::from(CHUNK)).unwrap();
    // The short last chunk reads short.
    let got = image_of(&point, &vec![0; img.len() + 512]);
    assert!(got[..img.len()] == img[..]);
    point.finish().unwrap();
    assert!(!layer.full_needed());
    assert_eq!(captured(&layer.start_point().unwrap().1.unwrap()), [7]);
}

#[test]
fn an_abandoned_point_gives_its_chunks_back() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let layer = open(dir.path(), mem, false);
    let cs = u64::from(CHUNK);
    layer.write_at(&[1; 512], 2 * cs).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    layer.write_at(&[2; 512], 4 * cs).unwrap();
    point.abandon().unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    assert_eq!(captured(&point), [2, 4]);
    // Dropped unfinished: abandoned too.
    drop(point);
    assert_eq!(captured(&layer.start_point().unwrap().1.unwrap()), [2, 4]);
}

#[test]
fn a_restart_merges_the_point_that_was_being_copied() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize));
    let cs = u64::from(CHUNK);
    let layer = open(dir.path(), mem.clone(), false);
    assert!(!layer.resumed());
    layer.write_at(&[1; 512], 2 * cs).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    layer.write_at(&[2; 512], 4 * cs).unwrap();
    // kill -9: nothing ends the point, nothing is synced.
    std::mem::forget(point);
    let again = open(dir.path(), mem, false);
    assert!(again.resumed());
    assert_eq!(
        captured(&again.start_point().unwrap().1.unwrap()),
        [2, 4],
        "changed ∪ capturing"
    );
}

/// A device that checks, on every write, that the protection bitmap on
/// disk already records the chunks written.
struct CheckingDevice {
    inner: MemDevice,
    files: [PathBuf; 2],
    checked: AtomicU64,
}

impl CheckingDevice {
    fn on_disk(&self, chunk: u64) -> bool {
        self.files.iter().any(|p| {
            let bytes = std::fs::read(p).unwrap();
            let at = changed::HEADER_SIZE as usize + (chunk / 64) as usize * 8;
            let word = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            word & (1 << (chunk % 64)) != 0
        })
    }
    fn check(&self, offset: u64, len: u64) {
        let cs = u64::from(CHUNK);
        for c in offset / cs..=(offset + len - 1) / cs {
            assert!(
                self.on_disk(c),
                "chunk {c} written before its bit reached the file"
            );
        }
        self.checked.fetch_add(1, Ordering::Relaxed);
    }
}

impl BlockDevice for CheckingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len);
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn a_changed_bit_is_in_the_file_before_the_data_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(CheckingDevice {
        inner: MemDevice::new((CHUNKS * u64::from(CHUNK)) as usize),
        files: CHANGED_FILES.map(|n| dir.path().join(n)),
        checked: AtomicU64::new(0),
    });
    let layer = open(dir.path(), dev.clone(), false);
    let cs = u64::from(CHUNK);
    layer.write_at(&[1; 4096], 3 * cs - 2048).unwrap();
    let point = layer.start_point().unwrap().1.unwrap();
    // Into the other file now.
    layer.write_zeroes(10 * cs, 3 * cs).unwrap();
    layer.discard(20 * cs + 512, 512).unwrap();
    point.finish().unwrap();
    layer.write_at(&[2; 512], 31 * cs).unwrap();
    assert_eq!(dev.checked.load(Ordering::Relaxed), 4);
}

/// Several writers put numbered records (one 4 KiB block each, the
/// block's bytes hold the number) while points are taken. Each point must
/// hold a prefix of the acknowledged sequence: if record k is in it, so is
/// every record acknowledged before k was submitted; every record
/// acknowledged before the point started is in it, none submitted after.
#[test]
fn every_point_holds_a_prefix_of_the_acknowledged_writes() {
    const RECORDS: usize = 4 * 1024;
    const WRITERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let size = RECORDS * 4096;
    let mem = Arc::new(MemDevice::new(size));
    // A small budget: most preserved grains spill to the file.
    let layer = open_full_with_budget(dir.path(), mem.clone(), 4 * CHUNK as usize);
    // Logical clock: submit and ack ticks per record.
    let clock = AtomicU64::new(1);
    let submit: Vec<AtomicU64> = (0..RECORDS).map(|_| AtomicU64::new(0)).collect();
    let ack: Vec<AtomicU64> = (0..RECORDS).map(|_| AtomicU64::new(0)).collect();
    let next = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let mut base = vec![0u8; size];
    let mut points = 0;
    std::thread::scope(|s| {
        for _ in 0..WRITERS {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst) as usize;
                if k >= RECORDS {
                    return;
                }
                // Spread records over the chunks, in a scrambled order.
                let block = (k * 2654435761) % RECORDS;
                let mut rec = [0u8; 4096];
                rec[..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
                submit[k].store(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                layer.write_at(&rec, block as u64 * 4096).unwrap();
                ack[k].store(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
            });
        }
        while !done.load(Ordering::SeqCst) {
            // Read before the point starts: once every writer is past the
            // end, every write was acknowledged before this point, which
            // must then be the disk. (Read after it, a last write could
            // land just after the point's instant.)
            let finished = next.load(Ordering::SeqCst) as usize >= RECORDS + WRITERS;
            let before = clock.fetch_add(1, Ordering::SeqCst);
            let (_, point) = layer.start_point().unwrap();
            let after = clock.fetch_add(1, Ordering::SeqCst);
            let Some(point) = point else {
                done.store(finished, Ordering::SeqCst);
                continue;
            };
            let img = image_of(&point, &base);
            point.finish().unwrap();
            points += 1;
            let present: Vec<bool> = (0..RECORDS)
                .map(|k| {
                    let block = (k * 2654435761) % RECORDS;
                    img[block * 4096..block * 4096 + 8] == (k as u64 + 1).to_le_bytes()
                })
                .collect();
            // The newest submission among the present records: every
            // record acknowledged before it must be present.
            let newest_present = check_against_the_clock(&present, &submit, &ack, before, after);
            for j in 0..RECORDS {
                let aj = ack[j].load(Ordering::SeqCst);
                assert!(
                    aj == 0 || aj >= newest_present || present[j],
                    "record {j}, acknowledged before a present record was submitted, is missing"
                );
            }
            base = img;
            done.store(finished, Ordering::SeqCst);
        }
    });
    assert!(points >= 2, "only {points} points");
    assert!(base == mem.snapshot(), "the last point is not the disk");
}

/// Copy-before-write in grains, raced: while one thread reads a point
/// chunk by chunk, writers rewrite unaligned ranges of every chunk
/// (inside one grain, across grains, across chunks, over the same grain
/// again, discards). Whatever the interleaving, the point reads exactly
/// the disk at its instant, with most preserved grains in the spill file
/// (a one-grain budget).
#[test]
fn grains_rewritten_while_the_point_reads_them_keep_the_instant() {
    race_writes_against_the_point(false, |dir, img| {
        let mem = Arc::new(MemDevice::from_vec(img.to_vec()));
        let layer = open_full_with_budget(dir, mem, preserved::GRAIN as usize);
        (layer, img.to_vec(), None)
    });
}

/// The same race over an overlay on a snapshot, the overlay holding every
/// third grain before the instant: grains the overlay does not hold are
/// left in the snapshot, the others copied.
#[test]
fn grains_rewritten_while_the_point_reads_them_keep_the_instant_over_a_snapshot() {
    race_writes_against_the_point(false, |dir, img| {
        let stack = OverlayStack::new(dir, img);
        let at_instant = hold_every_third_grain(&*stack.overlay, img);
        let layer = ProtectLayer::open(stack.protected(), dir, &race_opts()).unwrap();
        (layer, at_instant, None)
    });
}

/// The same race while migrating: the copier starts at the instant (and
/// may complete while the point is read).
#[test]
fn grains_rewritten_while_the_point_reads_them_keep_the_instant_while_migrating() {
    race_writes_against_the_point(false, |dir, img| {
        let stack = OverlayStack::new(dir, img);
        let at_instant = hold_every_third_grain(&*stack.overlay, img);
        let m = stack.migrate(dir);
        let protected = Protected::Migrating(m.clone());
        let layer = ProtectLayer::open(protected, dir, &race_opts()).unwrap();
        (layer, at_instant, Some(m))
    });
}

/// The same race on a point that reads only the grains written since
/// the last point (every third grain: at most half of each chunk):
/// copy-before-write preserves only those, however the writes fall.
#[test]
fn written_grains_rewritten_while_a_partial_point_reads_them_keep_the_instant() {
    race_writes_against_the_point(true, |dir, img| {
        let mem = Arc::new(MemDevice::from_vec(img.to_vec()));
        let layer =
            ProtectLayer::open(mem as Arc<dyn BlockDevice>, dir, &partial_race_opts()).unwrap();
        let at_instant = hold_every_third_grain(&*layer, img);
        (layer, at_instant, None)
    });
}

/// The partial race while migrating: grains of the snapshot, of the
/// overlay and of the target, the copier running.
#[test]
fn written_grains_rewritten_while_a_partial_point_reads_them_keep_the_instant_while_migrating() {
    race_writes_against_the_point(true, |dir, img| {
        let stack = OverlayStack::new(dir, img);
        let m = stack.migrate(dir);
        let protected = Protected::Migrating(m.clone());
        let layer = ProtectLayer::open(protected, dir, &partial_race_opts()).unwrap();
        let at_instant = hold_every_third_grain(&*layer, img);
        (layer, at_instant, Some(m))
    });
}

/// A full point, a one-grain memory budget.
fn race_opts() -> ProtectOptions {
    ProtectOptions {
        preserve_budget: preserved::GRAIN as usize,
        ..opts(true)
    }
}

/// A point that is not a full read, a one-grain memory budget.
fn partial_race_opts() -> ProtectOptions {
    ProtectOptions {
        full: false,
        ..race_opts()
    }
}

/// Writes every third grain of `dev` (inverted bytes of `img`, so they
/// differ from the snapshot); returns the disk then.
fn hold_every_third_grain(dev: &dyn BlockDevice, img: &[u8]) -> Vec<u8> {
    let g = preserved::GRAIN as usize;
    let mut disk = img.to_vec();
    for (i, grain) in disk.chunks_mut(g).enumerate() {
        if i % 3 == 0 {
            grain.iter_mut().for_each(|b| *b = !*b);
            dev.write_at(grain, (i * g) as u64).unwrap();
        }
    }
    disk
}

/// What a race runs on: the layer, the disk at the instant, and a
/// migration to start once the point is.
type RaceSetup = (Arc<ProtectLayer>, Vec<u8>, Option<Arc<MigratingDevice>>);

/// Races writers against a point's reader on the layer `open(dir, image)`
/// makes (see the callers). The reader starts once the writers have made a
/// few writes, so some grains are preserved before it. The point is a full
/// read, or with `partial` a point over `image` that reads only the
/// grains written before it.
fn race_writes_against_the_point(partial: bool, open: impl Fn(&Path, &[u8]) -> RaceSetup) {
    const WRITERS: u64 = 3;
    let cs = u64::from(CHUNK);
    let size = CHUNKS * cs - 1024;
    for round in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![0u8; size as usize];
        img.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u64 * 7 + round) as u8);
        let (layer, at_instant, migration) = open(dir.path(), &img);
        let point = layer.start_point().unwrap().1.unwrap();
        assert_eq!(point.full(), !partial);
        if partial {
            assert!((0..CHUNKS).all(|c| point.changed_grains(c).is_some()));
        }
        if let Some(m) = &migration {
            m.start().unwrap();
        }
        let reading = AtomicBool::new(true);
        let writes = AtomicU64::new(0);
        let mut got = if partial {
            img.clone()
        } else {
            vec![0u8; size as usize]
        };
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let (layer, reading, writes) = (&layer, &reading, &writes);
                s.spawn(move || {
                    let mut x = round * 31 + w + 1;
                    let mut i = 0u64;
                    while reading.load(Ordering::Relaxed) || i < 200 {
                        // xorshift: offsets and lengths from 1 byte to
                        // over a chunk.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let len = 1 + x % (cs + 5000);
                        let off = (x >> 20) % size;
                        let len = len.min(size - off);
                        if x % 11 == 0 {
                            layer.discard(off, len).unwrap();
                        } else {
                            layer
                                .write_at(&vec![(0x80 | w) as u8; len as usize], off)
                                .unwrap();
                        }
                        i += 1;
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            while writes.load(Ordering::Relaxed) < 8 * WRITERS {
                std::thread::yield_now();
            }
            // The store reads a chunk or a few at a time, from the front.
            let mut c = 0;
            while c < CHUNKS {
                let n = (1 + c % 3).min(CHUNKS - c);
                read_point(&point, &mut got, c, n);
                c += n;
            }
            reading.store(false, Ordering::Relaxed);
        });
        assert!(
            got == at_instant,
            "round {round}: the point differs from the disk at its instant"
        );
        assert_eq!(layer.preserved_bytes(), 0, "every preserved grain was read");
        point.finish().unwrap();
        assert!(!dir.path().join(SPILL_FILE).exists());
        if let Some(m) = &migration {
            assert_eq!(m.wait(Duration::from_secs(60)), MigrationPhase::Complete);
        }
    }
}

/// A snapshot (in memory, `CHUNK` chunks) with an overlay over it.
struct OverlayStack {
    snapshot: Arc<SnapshotLayer>,
    overlay: Arc<Overlay>,
    state: Arc<DirState>,
}

impl OverlayStack {
    fn new(dir: &Path, image: &[u8]) -> OverlayStack {
        let src = Arc::new(VecSource::new(image.to_vec(), CHUNK));
        let snapshot =
            Arc::new(SnapshotLayer::new(src, Arc::new(ChunkCache::new(1 << 20))).unwrap());
        let state = Arc::new(
            DirState::open(&dir.join("state"), "snap", image.len() as u64, CHUNK).unwrap(),
        );
        let overlay = Arc::new(Overlay::open_in(&*state, snapshot.clone()).unwrap());
        OverlayStack {
            snapshot,
            overlay,
            state,
        }
    }

    fn protected(&self) -> Protected {
        Protected::Overlay {
            overlay: self.overlay.clone(),
            snapshot: self.snapshot.clone(),
        }
    }

    /// A migration of the stack to a new target in `dir` (copier not
    /// started).
    fn migrate(&self, dir: &Path) -> Arc<MigratingDevice> {
        let target = Target::open(&dir.join("target.raw"), self.snapshot.size()).unwrap();
        let opts = MigrationOptions {
            workers: 2,
            checkpoint_interval: Duration::from_millis(20),
            yield_window: Duration::from_millis(1),
            max_yield: Duration::from_millis(2),
            ..MigrationOptions::default()
        };
        MigratingDevice::open(
            self.state.clone(),
            self.overlay.clone(),
            self.snapshot.clone(),
            target,
            opts,
        )
        .unwrap()
    }
}

/// An image whose every byte tells where it is.
fn numbered_image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 512 * 13 + i) as u8).collect()
}

/// The whole disk as `layer` reads it now.
fn disk_of(layer: &ProtectLayer) -> Vec<u8> {
    let mut img = vec![0u8; layer.size() as usize];
    layer.read_at(&mut img, 0).unwrap();
    img
}

/// Writes `len` bytes of `byte` at `offset` to `layer` and to `model`
/// (the disk as it should be; reading a migrating disk would migrate it).
fn write_both(layer: &ProtectLayer, model: &mut [u8], byte: u8, len: u64, offset: u64) {
    let data = vec![byte; len as usize];
    layer.write_at(&data, offset).unwrap();
    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
}

const G: u64 = preserved::GRAIN;

/// A numbered image, the stack over it, its migration (copier not
/// started) and the protection layer over that.
fn migrating(
    dir: &Path,
) -> (
    Vec<u8>,
    OverlayStack,
    Arc<MigratingDevice>,
    Arc<ProtectLayer>,
) {
    let image = numbered_image((CHUNKS * u64::from(CHUNK)) as usize);
    let stack = OverlayStack::new(dir, &image);
    let m = stack.migrate(dir);
    let layer = ProtectLayer::open(Protected::Migrating(m.clone()), dir, &opts(false)).unwrap();
    (image, stack, m, layer)
}

/// Reads `point` whole: it must be `at_instant`; then finishes it.
fn assert_holds(point: Point, at_instant: &[u8]) {
    assert!(
        image_of(&point, at_instant) == at_instant,
        "the point differs from the disk at its instant"
    );
    point.finish().unwrap();
}

#[test]
fn grains_the_overlay_did_not_hold_are_read_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cs = u64::from(CHUNK);
    let image = numbered_image((CHUNKS * cs) as usize);
    let stack = OverlayStack::new(dir.path(), &image);
    let layer = ProtectLayer::open(stack.protected(), dir.path(), &opts(false)).unwrap();
    // Before the instant: the overlay holds grains 0 and 2 of chunk 1.
    layer.write_at(&[0x11; G as usize], cs).unwrap();
    layer.write_at(&[0x12; 100], cs + 2 * G + 7).unwrap();
    let at_instant = disk_of(&layer);
    // A full read: the point reads chunk 1 whole (read in part, it would
    // need only grains 0 and 2).
    layer.request_full();
    let point = layer.start_point().unwrap().1.unwrap();
    assert!(point.full());
    // After it: grains 0..4 of chunk 1, and part of grain 3 again.
    layer.write_at(&[0x22; 4 * G as usize], cs).unwrap();
    layer.write_at(&[0x23; 10], cs + 3 * G + 5).unwrap();
    assert_eq!(
        layer.preserved_bytes(),
        2 * G,
        "grains 0 and 2 copied, 1 and 3 left in the snapshot"
    );
    assert_holds(point, &at_instant);
}

#[test]
fn while_migrating_grains_migrated_or_in_the_overlay_are_copied() {
    let dir = tempfile::tempdir().unwrap();
    let cs = u64::from(CHUNK);
    let (image, _stack, _m, layer) = migrating(dir.path());
    // Chunk 1: grain 0 in the overlay. Chunk 2: migrated (a guest read
    // copies it), then grain 0 written on the target. Chunk 3: grain 1
    // in the overlay.
    let mut at_instant = image.clone();
    write_both(&layer, &mut at_instant, 0x11, G, cs);
    let mut buf = vec![0u8; 512];
    layer.read_at(&mut buf, 2 * cs).unwrap();
    write_both(&layer, &mut at_instant, 0x12, G, 2 * cs);
    write_both(&layer, &mut at_instant, 0x13, G, 3 * cs + G);
    // Full, so that whole chunks are preserved.
    layer.request_full();
    let point = layer.start_point().unwrap().1.unwrap();
    assert!(point.full());
    for c in 1..4 {
        layer.write_at(&[0x22; 4 * G as usize], c * cs).unwrap();
    }
    assert_eq!(
        layer.preserved_bytes(),
        G + 4 * G + G,
        "chunk 1: grain 0; chunk 2: every grain; chunk 3: grain 1"
    );
    assert_holds(point, &at_instant);
}

#[test]
fn grains_left_in_the_snapshot_are_read_from_it_after_the_migration_completes() {
    let dir = tempfile::tempdir().unwrap();
    let cs = u64::from(CHUNK);
    let (image, stack, m, layer) = migrating(dir.path());
    let mut at_instant = image.clone();
    write_both(&layer, &mut at_instant, 0x11, G, cs);
    write_both(&layer, &mut at_instant, 0x13, G, 3 * cs + G);
    layer.request_full();
    let point = layer.start_point().unwrap().1.unwrap();
    assert!(point.full());
    // Chunk 3 before completion: grain 1 copied, the others left in the
    // snapshot.
    layer.write_at(&[0x22; 4 * G as usize], 3 * cs).unwrap();
    assert_eq!(layer.preserved_bytes(), G);
    drop(stack);
    m.start().unwrap();
    assert_eq!(m.wait(Duration::from_secs(60)), MigrationPhase::Complete);
    assert!(m.snapshot().is_none(), "the migration let its layers go");
    // Chunk 1 after completion: everything is on the target, copied.
    layer.write_at(&[0x24; 4 * G as usize], cs).unwrap();
    assert_eq!(layer.preserved_bytes(), G + 4 * G);
    assert_holds(point, &at_instant);
}

#[test]
fn an_overlay_over_another_layer_than_the_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = numbered_image((CHUNKS * u64::from(CHUNK)) as usize);
    let a = OverlayStack::new(&dir.path().join("a"), &image);
    let b = OverlayStack::new(&dir.path().join("b"), &image);
    let mixed = Protected::Overlay {
        overlay: a.overlay.clone(),
        snapshot: b.snapshot.clone(),
    };
    assert!(matches!(
        ProtectLayer::open(mixed, dir.path(), &opts(false)),
        Err(Error::Layers(_))
    ));
}

/// One cut across two layers: a single writer alternates a global
/// sequence of writes between the two disks (record k on disk k % 2)
/// while the cutter takes aligned cuts. Every cut must hold a prefix of
/// the sequence across both disks: record k present on one disk means
/// every earlier record is present on its disk; every record
/// acknowledged before the cut is in it, none submitted after. Cutting
/// the disks one after another breaks the prefix.
#[test]
fn an_aligned_cut_holds_a_prefix_of_the_writes_across_layers() {
    const PER_DISK: usize = 1024;
    const RECORDS: usize = 2 * PER_DISK;
    let size = PER_DISK * 4096;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mems = [
        Arc::new(MemDevice::new(size)),
        Arc::new(MemDevice::new(size)),
    ];
    let layers: Vec<Arc<ProtectLayer>> = (0..2)
        .map(|d| open(dirs[d].path(), mems[d].clone(), false))
        .collect();
    let clock = AtomicU64::new(1);
    let submit: Vec<AtomicU64> = (0..RECORDS).map(|_| AtomicU64::new(0)).collect();
    let ack: Vec<AtomicU64> = (0..RECORDS).map(|_| AtomicU64::new(0)).collect();
    let written = AtomicBool::new(false);
    let mut bases = [vec![0u8; size], vec![0u8; size]];
    let mut cuts = 0;
    let record_at = |k: usize| (k % 2, (k / 2) * 4096);
    std::thread::scope(|s| {
        s.spawn(|| {
            for k in 0..RECORDS {
                let (disk, at) = record_at(k);
                let mut rec = [0u8; 4096];
                rec[..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
                submit[k].store(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
                layers[disk].write_at(&rec, at as u64).unwrap();
                ack[k].store(clock.fetch_add(1, Ordering::SeqCst), Ordering::SeqCst);
            }
            written.store(true, Ordering::SeqCst);
        });
        loop {
            let last = written.load(Ordering::SeqCst);
            let before = clock.fetch_add(1, Ordering::SeqCst);
            let (instant, points) = start_points(&layers).unwrap();
            let after = clock.fetch_add(1, Ordering::SeqCst);
            assert_eq!(points.len(), 2);
            for (d, point) in points.into_iter().enumerate() {
                let Some(point) = point else { continue };
                assert_eq!(point.instant(), instant, "one instant for every disk");
                bases[d] = image_of(&point, &bases[d]);
                point.finish().unwrap();
            }
            cuts += 1;
            let present: Vec<bool> = (0..RECORDS)
                .map(|k| {
                    let (disk, at) = record_at(k);
                    bases[disk][at..at + 8] == (k as u64 + 1).to_le_bytes()
                })
                .collect();
            let count = present.iter().take_while(|p| **p).count();
            assert!(
                present[count..].iter().all(|p| !p),
                "cut {cuts}: record {count} is missing but a later one is present"
            );
            check_against_the_clock(&present, &submit, &ack, before, after);
            if last {
                break;
            }
        }
    });
    assert!(cuts >= 2, "only {cuts} cuts");
    for d in 0..2 {
        assert!(
            bases[d] == mems[d].snapshot(),
            "disk {d}: the last cut is not the disk"
        );
    }
}

#[test]
fn a_cut_that_lists_a_layer_twice_or_finds_a_point_open_starts_nothing() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let size = (CHUNKS * u64::from(CHUNK)) as usize;
    let a = open(dirs[0].path(), Arc::new(MemDevice::new(size)), false);
    let b = open(dirs[1].path(), Arc::new(MemDevice::new(size)), false);
    a.write_at(&[1; 512], 0).unwrap();
    b.write_at(&[2; 512], 0).unwrap();
    assert!(start_points(&[a.clone(), a.clone()]).is_err());
    let open_b = b.start_point().unwrap().1.unwrap();
    assert!(start_points(&[a.clone(), b.clone()]).is_err());
    open_b.abandon().unwrap();
    // Nothing was started on `a`: its change is still pending, in the next cut.
    let (_, points) = start_points(&[a, b]).unwrap();
    assert!(points
        .iter()
        .all(|p| p.as_ref().is_some_and(|p| captured(p) == [0])));
}

/// Checks the records present in a point (or cut) taken between the
/// logical ticks `before` and `after`: every record acknowledged before it
/// is present, none submitted after it is. Returns the newest submission
/// tick among the present records.
fn check_against_the_clock(
    present: &[bool],
    submit: &[AtomicU64],
    ack: &[AtomicU64],
    before: u64,
    after: u64,
) -> u64 {
    let mut newest_present = 0;
    for k in 0..present.len() {
        let (sk, ak) = (
            submit[k].load(Ordering::SeqCst),
            ack[k].load(Ordering::SeqCst),
        );
        if ak != 0 && ak < before {
            assert!(
                present[k],
                "record {k} acknowledged before the point is missing"
            );
        }
        if sk == 0 || sk > after {
            assert!(!present[k], "record {k} submitted after the point is in it");
        }
        if present[k] {
            newest_present = newest_present.max(sk);
        }
    }
    newest_present
}
