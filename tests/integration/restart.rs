//! An acknowledged write survives `kill -9` of the daemon even without a
//! flush; after a machine crash it may be lost, but never turns into
//! garbage.
//!
//! The daemon keeps a live journal of its overlay and migration bitmaps
//! (`block/src/bitmap/journal.rs`): every bit is mirrored, as it is set,
//! into `<bitmap>.live` in the page cache, and the next daemon of the same
//! machine boot merges them. These tests drive `recovery-cli instant-boot`
//! with the blkio client (a real vhost-user frontend), write without
//! flushing, SIGKILL the daemon **while the client is still connected**
//! (a disconnect makes the daemon flush, which would hide a missing
//! journal), start a new daemon on the same state and read everything back.
//!
//! A machine crash is simulated by deleting the `*.live` journals before
//! the restart: a reboot makes the next daemon ignore them, and the
//! synced bitmaps alone are the truth. The page cache cannot be dropped
//! here, so what a test checks there is the model's promise: each 4 KiB
//! block reads as of the last flush or as written after it, never mixed.

use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};

use crate::blkio_client::Client;
use crate::boot::{store_with_backup, BootDaemon};
use crate::migrate::{num, status, wait_complete};
use crate::util::recovery_cli;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The store's default chunk size (what `store_with_backup` creates).
const CHUNK: usize = 64 * KIB;
/// The overlay's block: the granule of a lost unflushed write.
const BLOCK: usize = 4 * KIB;
/// Image size: 64 chunks.
const IMAGE: usize = 4 * MIB;
/// Snapshot chunks that are all zeroes.
const ZERO_CHUNKS: std::ops::Range<usize> = 20..24;
/// Bytes per read request when the test reads the whole device.
const READ_STEP: usize = MIB;
/// Copier rate limit: one chunk a second, so the copier (which starts at
/// chunk 0) stays far from the chunks the tests use.
const SLOW_COPY: &str = "64K";

/// A backed-up image and a state directory for the daemons, in one temp
/// dir.
struct Fixture {
    dir: tempfile::TempDir,
    snapshot: Vec<u8>,
    store: PathBuf,
    state: PathBuf,
    target: PathBuf,
}

impl Fixture {
    /// Random data with whole zero chunks ([`ZERO_CHUNKS`]) and a zero run
    /// that starts and ends inside a chunk.
    fn new(seed: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut snapshot = random_bytes(IMAGE, seed);
        snapshot[ZERO_CHUNKS.start * CHUNK..ZERO_CHUNKS.end * CHUNK].fill(0);
        snapshot[30 * CHUNK + 1000..31 * CHUNK + 5000].fill(0);
        let image = dir.path().join("disk.img");
        std::fs::write(&image, &snapshot).unwrap();
        let (store, _) = store_with_backup(dir.path(), "vm", &image);
        Fixture {
            state: dir.path().join("state"),
            target: dir.path().join("target.raw"),
            store,
            snapshot,
            dir,
        }
    }

    /// Starts `instant-boot` (one queue) on the fixture's state; with
    /// `migrate`, to the fixture's target at [`SLOW_COPY`].
    fn start(&self, migrate: bool) -> BootDaemon {
        if migrate {
            let args = ["--queues", "1", "--copy-rate", SLOW_COPY, "--target"];
            BootDaemon::start(
                &self.store,
                "vm",
                self.dir.path(),
                &args,
                Some(&self.target),
            )
        } else {
            BootDaemon::start(&self.store, "vm", self.dir.path(), &["--queues", "1"], None)
        }
    }

    /// [`Fixture::start`], and a client connected to it that sees the
    /// whole image.
    fn boot(&self, migrate: bool) -> (BootDaemon, Client) {
        let daemon = self.start(migrate);
        let client = Client::connect(&daemon.socket, READ_STEP);
        assert_eq!(client.capacity(), IMAGE as u64, "device size");
        (daemon, client)
    }

    /// Deletes the live journals in the state dir, as a reboot would make
    /// the next daemon ignore them; returns their names.
    fn forget_journals(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.state).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "live") {
                std::fs::remove_file(&path).unwrap();
                removed.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        removed.sort();
        removed
    }
}

/// Offset of chunk `n`.
fn chunk(n: usize) -> usize {
    n * CHUNK
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// One write of the test: where, what kind (for messages), and the data.
struct Write {
    offset: usize,
    what: &'static str,
    data: Vec<u8>,
}

/// The device as of the last flush and as of the last acknowledged write.
struct Model {
    snapshot: Vec<u8>,
    flushed: Vec<u8>,
    latest: Vec<u8>,
    writes: Vec<Write>,
    /// How many of `writes` the last flush covered.
    flushed_writes: usize,
}

impl Model {
    fn new(snapshot: &[u8]) -> Model {
        Model {
            snapshot: snapshot.to_vec(),
            flushed: snapshot.to_vec(),
            latest: snapshot.to_vec(),
            writes: Vec::new(),
            flushed_writes: 0,
        }
    }

    /// Writes `len` fresh random bytes at `offset` through `client` and
    /// records them as acknowledged.
    fn write(&mut self, client: &mut Client, offset: usize, len: usize, what: &'static str) {
        let seed = ((offset as u64) << 8) | self.writes.len() as u64;
        let data = random_bytes(len, seed);
        client
            .write(offset as u64, &data)
            .unwrap_or_else(|e| panic!("write of {len} bytes at offset {offset} ({what}): {e}"));
        self.latest[offset..offset + len].copy_from_slice(&data);
        self.writes.push(Write { offset, what, data });
    }

    /// [`Model::write`] of each `(offset, len, what)`, in order.
    fn write_all(&mut self, client: &mut Client, writes: &[(usize, usize, &'static str)]) {
        for &(offset, len, what) in writes {
            self.write(client, offset, len, what);
        }
    }

    /// A completed flush: every write so far is durable.
    fn flush(&mut self, client: &mut Client) {
        client.flush().expect("flush");
        self.flushed.clone_from(&self.latest);
        self.flushed_writes = self.writes.len();
    }

    /// What `found`, the device's bytes at offset `at`, look like.
    fn describe(&self, at: usize, found: &[u8]) -> String {
        let range = at..at + found.len();
        let candidates = [
            ("the written data", &self.latest[range.clone()]),
            ("the snapshot's data", &self.snapshot[range.clone()]),
            ("the data of the last flush", &self.flushed[range.clone()]),
        ];
        if let Some((name, _)) = candidates.iter().find(|(_, c)| *c == found) {
            return (*name).to_string();
        }
        if found.iter().all(|&b| b == 0) {
            return "zeroes".into();
        }
        if found.iter().all(|&b| b == 0xa5) {
            return "the client's poison bytes (the read filled nothing)".into();
        }
        let want = candidates[0].1;
        let differ: Vec<usize> = (0..found.len()).filter(|&i| found[i] != want[i]).collect();
        format!(
            "other data: {} of {} bytes differ from the last write, the first at offset {}",
            differ.len(),
            found.len(),
            range.start + differ[0]
        )
    }

    /// Asserts that `got`, the device's bytes where `w` wrote, are `w`'s.
    fn assert_write_there(&self, w: &Write, got: &[u8], when: &str) {
        assert!(
            got == w.data,
            "{when}: the acknowledged {}-byte write at offset {} ({}) is gone: \
             expected the written data, found {}",
            w.data.len(),
            w.offset,
            w.what,
            self.describe(w.offset, got),
        );
    }

    /// Asserts that `found`, the whole device or target file, holds every
    /// acknowledged write and the snapshot everywhere else. Writes must
    /// not overlap.
    fn assert_holds_every_write(&self, found: &[u8], when: &str) {
        assert_eq!(found.len(), self.latest.len(), "{when}: size");
        for w in &self.writes {
            self.assert_write_there(w, &found[w.offset..w.offset + w.data.len()], when);
        }
        if let Some((at, _, found)) = self.block_difference(&self.latest, found) {
            panic!(
                "{when}: bytes the test did not write changed in the 4 KiB block at offset {at} \
                 (chunk {}): expected the snapshot's data there, found {found}",
                at / CHUNK
            );
        }
    }

    /// Reads the whole device through `client` and
    /// [`Model::assert_holds_every_write`].
    fn assert_device_holds_every_write(&self, client: &mut Client, when: &str) {
        self.assert_holds_every_write(&client.read_all(READ_STEP), when);
    }

    /// The first 4 KiB block where `a` and `b` (whole images) differ: its
    /// offset and what each holds there.
    fn block_difference(&self, a: &[u8], b: &[u8]) -> Option<(usize, String, String)> {
        let at = first_different_block(a, b)? * BLOCK;
        let range = at..at + BLOCK;
        Some((
            at,
            self.describe(at, &a[range.clone()]),
            self.describe(at, &b[range]),
        ))
    }

    /// Asserts that every block of every flushed write that no later
    /// write touched reads as flushed.
    fn assert_flushed_writes_kept(&self, found: &[u8], when: &str) {
        for w in &self.writes[..self.flushed_writes] {
            let end = w.offset + w.data.len();
            for block in w.offset / BLOCK..end.div_ceil(BLOCK) {
                let range = block * BLOCK..(block + 1) * BLOCK;
                let flushed = &self.flushed[range.clone()];
                if self.latest[range.clone()] != *flushed {
                    continue; // a later, unflushed write may or may not be there
                }
                assert!(
                    found[range.clone()] == *flushed,
                    "{when}: the flushed {}-byte write at offset {} ({}) is gone from the \
                     4 KiB block at offset {}: expected the written data, found {}",
                    w.data.len(),
                    w.offset,
                    w.what,
                    range.start,
                    self.describe(range.start, &found[range.clone()]),
                );
            }
        }
    }

    /// Asserts the machine-crash promise on `found`, the whole device:
    /// each 4 KiB block reads as of the last flush or as of the last
    /// write, entirely. Returns how many blocks written after the flush
    /// kept their new data, and how many such blocks there are.
    fn assert_consistent_after_crash(&self, found: &[u8], when: &str) -> (usize, usize) {
        assert_eq!(found.len(), self.latest.len(), "{when}: size");
        let (mut kept, mut unflushed) = (0, 0);
        for block in 0..found.len() / BLOCK {
            let range = block * BLOCK..(block + 1) * BLOCK;
            let got = &found[range.clone()];
            let (flushed, latest) = (&self.flushed[range.clone()], &self.latest[range.clone()]);
            if flushed != latest {
                unflushed += 1;
                kept += usize::from(got == latest);
            }
            assert!(
                got == flushed || got == latest,
                "{when}: the 4 KiB block at offset {} (chunk {}) is neither as of the last \
                 flush nor as last written: found {}",
                range.start,
                range.start / CHUNK,
                self.describe(range.start, got),
            );
        }
        (kept, unflushed)
    }
}

/// Index of the first `BLOCK` where `a` and `b` differ.
fn first_different_block(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)
}

/// `recovery-cli set-rate` on the daemon of `state`.
fn set_rate(state: &Path, rate: &str) {
    let out = recovery_cli()
        .args(["set-rate", "--control"])
        .arg(state.join("control.sock"))
        .arg(rate)
        .output()
        .unwrap();
    assert!(out.status.success(), "set-rate {rate}: {out:?}");
}

/// SIGKILL with the client still connected, then drop the client.
fn kill_under(daemon: BootDaemon, client: Client) {
    daemon.kill();
    drop(client);
}

#[test]
fn unflushed_writes_survive_kill_9() {
    let f = Fixture::new(1);
    let mut model = Model::new(&f.snapshot);
    let (daemon, mut client) = f.boot(false);
    model.write_all(
        &mut client,
        &[
            (chunk(3) + 2 * BLOCK, BLOCK, "an aligned 4 KiB block"),
            (chunk(5), 4 * BLOCK, "four blocks at a chunk start"),
            (chunk(9) + BLOCK + 1536, 512, "a sector inside a block"),
            (chunk(12) - 6 * KIB, 12 * KIB, "spanning chunks 11 and 12"),
            (chunk(21) + 3 * BLOCK, BLOCK, "a block of a zero chunk"),
            (chunk(30) + 2 * KIB, 4 * KIB, "across a zero run"),
            (IMAGE - BLOCK, BLOCK, "the last block of the device"),
        ],
    );
    // No flush.
    kill_under(daemon, client);

    let (daemon, mut client) = f.boot(false);
    model.assert_device_holds_every_write(&mut client, "after kill -9 and restart");
    // And once more after a clean stop, which syncs the merged bits.
    drop(client);
    daemon.stop();
    let (daemon, mut client) = f.boot(false);
    model.assert_device_holds_every_write(
        &mut client,
        "after a clean restart that followed the kill -9",
    );
    drop(client);
    daemon.stop();
}

#[test]
fn unflushed_writes_to_migrated_chunks_survive_kill_9_and_reach_the_target() {
    let f = Fixture::new(2);
    let mut model = Model::new(&f.snapshot);
    let (daemon, mut client) = f.boot(true);

    // Copy-on-read migrates chunks 40..=45 (the copier is still near 0).
    let migrated = 40..46;
    for n in migrated.clone() {
        let got = client.read(chunk(n) as u64, CHUNK).unwrap();
        assert!(
            got == f.snapshot[chunk(n)..chunk(n + 1)],
            "chunk {n} does not read as the snapshot before any write"
        );
    }
    let before = status(&f.state);
    assert!(
        num(&before, "bytes_copied_on_read") >= (migrated.len() * CHUNK) as u64,
        "reading chunks {migrated:?} did not migrate them by copy-on-read: {before}"
    );
    assert_eq!(before["state"], "migrating", "{before}");

    // Writes to migrated chunks go to the target, the others to the overlay.
    model.write_all(
        &mut client,
        &[
            (chunk(40) + BLOCK, BLOCK, "a block of migrated chunk 40"),
            (chunk(42) + 9 * KIB, 512, "a sector of migrated chunk 42"),
            (chunk(44) - 6 * KIB, 12 * KIB, "migrated chunks 43 and 44"),
            (chunk(46) - 2 * KIB, 8 * KIB, "migrated chunk 45 into 46"),
            (chunk(50) + 5 * BLOCK, BLOCK, "a block of chunk 50"),
            (chunk(52) + 3 * KIB, KIB, "two sectors of chunk 52"),
        ],
    );
    // No flush.
    kill_under(daemon, client);

    // The writes to migrated chunks read back from the target; the others
    // are left in the overlay for the copier to move.
    let (daemon, mut client) = f.boot(true);
    for w in model
        .writes
        .iter()
        .filter(|w| migrated.contains(&(w.offset / CHUNK)))
    {
        let got = client.read(w.offset as u64, w.data.len()).unwrap();
        model.assert_write_there(w, &got, "after kill -9 and restart, mid-migration");
    }

    set_rate(&f.state, "unlimited");
    wait_complete(&f.state);
    let done = status(&f.state);
    assert_eq!(
        num(&done, "chunks_migrated"),
        num(&done, "chunks_total"),
        "{done}"
    );
    model.assert_device_holds_every_write(&mut client, "after kill -9, restart and migration");
    drop(client);
    daemon.stop();
    let target = std::fs::read(&f.target).unwrap();
    model.assert_holds_every_write(&target, "in the target file after the migration completed");
}

#[test]
fn after_a_simulated_reboot_unflushed_writes_are_old_or_new_never_garbage() {
    simulated_reboot(false);
}

#[test]
fn after_a_simulated_reboot_mid_migration_the_target_ends_consistent() {
    simulated_reboot(true);
}

/// Reads chunks `chunks` so that copy-on-read migrates them.
fn copy_on_read(client: &mut Client, chunks: &[usize]) {
    for &n in chunks {
        client.read(chunk(n) as u64, CHUNK).unwrap();
    }
}

/// Flushed writes, unflushed writes (some over flushed blocks), kill -9,
/// journals deleted, restart: every block reads as of the flush or as
/// last written. With `migrate`, the chunks written are migrated first
/// (before the flush for the flushed writes, after it for some unflushed
/// ones), and the completed target must equal what the device showed.
fn simulated_reboot(migrate: bool) {
    let f = Fixture::new(3);
    let mut model = Model::new(&f.snapshot);
    let (daemon, mut client) = f.boot(migrate);

    if migrate {
        copy_on_read(&mut client, &[3, 9, 11, 12]);
    }
    model.write_all(
        &mut client,
        &[
            (chunk(3) + 2 * BLOCK, 2 * BLOCK, "two blocks, flushed"),
            (chunk(12) - 6 * KIB, 12 * KIB, "chunks 11 and 12, flushed"),
            (chunk(9) + 1536, 512, "one sector, flushed"),
        ],
    );
    model.flush(&mut client);

    if migrate {
        copy_on_read(&mut client, &[16, 17, 21]);
    }
    model.write_all(
        &mut client,
        &[
            (chunk(3) + 13 * KIB, 512, "a sector over a flushed block"),
            (chunk(5), 4 * BLOCK, "four aligned blocks"),
            (chunk(12) - 2 * KIB, 8 * KIB, "over a flushed write"),
            (chunk(17) - 3 * KIB, 6 * KIB, "spanning chunks 16 and 17"),
            (chunk(21) + 512, 512, "a sector of a zero chunk"),
        ],
    );
    // No flush.
    kill_under(daemon, client);
    let removed = f.forget_journals();
    assert!(
        removed.iter().any(|n| n == "overlay.bitmap.live"),
        "kill -9 left no overlay journal to lose (found {removed:?}): the test simulates nothing"
    );

    let when = "after a simulated reboot and restart";
    let (daemon, mut client) = f.boot(migrate);
    let found = client.read_all(READ_STEP);
    model.assert_flushed_writes_kept(&found, when);
    let (kept, unflushed) = model.assert_consistent_after_crash(&found, when);
    eprintln!("{kept} of {unflushed} blocks written after the flush kept their new data");
    if migrate {
        set_rate(&f.state, "unlimited");
        wait_complete(&f.state);
        let again = client.read_all(READ_STEP);
        if let Some((at, before, after)) = model.block_difference(&found, &again) {
            panic!(
                "the migration changed what the guest reads in the 4 KiB block at offset {at} \
                 (chunk {}): {before} after the restart, {after} once migrated",
                at / CHUNK
            );
        }
    }
    drop(client);
    daemon.stop();
    if migrate {
        let target = std::fs::read(&f.target).unwrap();
        assert_eq!(target.len(), found.len(), "target size");
        if let Some((at, saw, holds)) = model.block_difference(&found, &target) {
            panic!(
                "the completed target differs from what the guest read in the 4 KiB block at \
                 offset {at} (chunk {}): the guest saw {saw}, the target holds {holds}",
                at / CHUNK
            );
        }
    }
}
