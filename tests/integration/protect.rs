//! Continuous protection (issue 13): `instant-boot --protect` and
//! `serve --disk` write a protection point into the store every interval,
//! and every point is crash-consistent.
//!
//! The blkio tests write numbered **records**, one per 4 KiB block: record
//! `k` goes to block `k mod N` and carries `k`, so a block shows the newest
//! record written there. The writer keeps up to [`QD`] records in flight
//! and notes for each the wall-clock time (µs, the clock the daemon stamps
//! point instants with) just before it was queued and just after its
//! completion was reaped, so the noted submission is never later and the
//! noted acknowledgement never earlier than the real one. Record `k` is
//! *present* in a point when its block holds `k` or a later record (a
//! later record of the same block is only ever queued after `k`'s
//! completion, since `N > QD`). Each point, restored with `restore --at
//! INSTANT`, must then hold ([`check_point`]):
//! - (a) a prefix: if a record is present, so is every record acknowledged
//!   before it was submitted;
//! - (b) every record acknowledged before the point's instant (the strict
//!   form of "at least one interval before": the design takes the instant
//!   at the capture swap, see `/work/notes/protect-interface.md`);
//! - (c) no record submitted after the instant;
//! - and nothing else: every block is zeroes or a whole record.
//!
//! The QEMU test boots the test guest with `guestmode=files` and notes the
//! time each fsynced file's console line arrives; a restored point passes
//! `e2fsck` after journal replay and holds every file synced before its
//! instant.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blkio::ReqFlags;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

use crate::blkio_client::{next_completion, Client};
use crate::boot::store_with_backup;
use crate::guest::{self, require_guest, RunningGuest, BOOT_TIMEOUT};
use crate::util::{recovery_cli, recovery_cli_path};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Bytes per record: one block.
const BLOCK: usize = 4 * KIB;
/// Records in flight.
const QD: usize = 8;
/// How long a test waits for a condition the daemon should reach soon.
const DEADLINE: Duration = Duration::from_secs(180);
/// The first bytes of a record.
const MAGIC: &[u8; 8] = b"PROTREC1";

/// Now, in µs since the epoch.
fn now_us() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_micros()).unwrap()
}

/// An RFC 3339 time (a snapshot's `created`, a point's `instant`) in µs.
fn parse_us(s: &str) -> i64 {
    store::point::parse_time(s, 0).unwrap_or_else(|e| panic!("bad time {s:?}: {e}"))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs `recovery-cli ARGS`, asserts success, returns stdout.
fn cli(args: &[&str]) -> String {
    let out = recovery_cli()
        .args(args)
        .output()
        .expect("run recovery-cli");
    assert!(
        out.status.success(),
        "recovery-cli {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn cli_json(args: &[&str]) -> Value {
    let out = cli(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?} ({e}): {out}"))
}

/// The contents of record `seq`: magic, the number, pseudo-random
/// (incompressible) filler, the number again at the end (a torn block
/// shows).
fn record(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[BLOCK - 8..].copy_from_slice(&seq.to_le_bytes());
    b
}

/// What block `block` of `n` holds: `Ok(None)` zeroes, `Ok(Some(k))` whole
/// record `k` (which belongs there), `Err` anything else.
fn parse_block(data: &[u8], block: usize, n: usize, written: usize) -> Result<Option<u64>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &data[..8] == MAGIC {
        let seq = u64::from_le_bytes(data[8..16].try_into().unwrap());
        if (seq as usize) < written && seq as usize % n == block && data == record(seq) {
            return Ok(Some(seq));
        }
        return Err(format!(
            "a damaged or misplaced record (number {seq}, {written} written)"
        ));
    }
    Err("bytes that are neither zeroes nor a record".into())
}

/// One record's times: noted just before queueing and just after the
/// completion was reaped (`i64::MAX` while not acknowledged).
#[derive(Clone, Copy, Debug)]
struct Rec {
    submit_us: i64,
    ack_us: i64,
}

/// The record writer: `N` blocks, records in flight on one queue.
struct Writer {
    client: Client,
    blocks: usize,
    recs: Vec<Rec>,
    /// At most this many records a second (bursts of [`QD`]).
    rate: u64,
}

impl Writer {
    fn new(client: Client, rate: u64) -> Writer {
        let blocks = (client.capacity() / BLOCK as u64) as usize;
        assert!(blocks > QD, "the device holds only {blocks} blocks");
        Writer {
            client,
            blocks,
            recs: Vec::new(),
            rate,
        }
    }

    /// Writes records until `stop` (asked about every 200 ms) says so;
    /// returns with nothing in flight.
    fn run(&mut self, mut stop: impl FnMut(&[Rec]) -> bool) {
        let (q, buf) = self.client.queue(0);
        let mut slots: [Option<usize>; QD] = [None; QD];
        let started = Instant::now();
        let first = self.recs.len();
        let mut next_ask = Instant::now();
        let mut stopping = false;
        loop {
            if !stopping && Instant::now() >= next_ask {
                stopping = stop(&self.recs);
                next_ask = Instant::now() + Duration::from_millis(200);
            }
            let due = first as u64 + started.elapsed().as_micros() as u64 * self.rate / 1_000_000;
            let in_flight = slots.iter().filter(|s| s.is_some()).count();
            // A burst: fill every slot once the rate allows a whole burst.
            if !stopping && in_flight == 0 && self.recs.len() as u64 <= due {
                for (slot, s) in slots.iter_mut().enumerate() {
                    let seq = self.recs.len();
                    let at = slot * BLOCK;
                    buf.fill(at, &record(seq as u64));
                    let offset = ((seq % self.blocks) * BLOCK) as u64;
                    self.recs.push(Rec {
                        submit_us: now_us(),
                        ack_us: i64::MAX,
                    });
                    q.write(offset, buf.ptr(at, BLOCK), BLOCK, slot, ReqFlags::empty());
                    *s = Some(seq);
                }
                continue;
            }
            if in_flight == 0 {
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let (slot, outcome) = next_completion(q);
            let acked = now_us();
            let seq = slots[slot].take().expect("a completion for a free slot");
            outcome.unwrap_or_else(|e| panic!("write of record {seq} failed: {e}"));
            self.recs[seq].ack_us = acked;
        }
    }
}

/// What [`check_point`] found, for the report.
#[derive(Debug, Default)]
struct PointCheck {
    /// Records submitted before the instant and acknowledged after it.
    straddling: usize,
    /// Of those, present.
    straddling_present: usize,
    /// Records acknowledged before the instant (all present).
    acked_before: usize,
}

/// Checks the restored point `img` (instant `instant`) against the records
/// (see the module doc); the error names the first violation.
fn check_point(
    what: &str,
    img: &[u8],
    recs: &[Rec],
    blocks: usize,
    instant: i64,
) -> Result<PointCheck, String> {
    if img.len() != blocks * BLOCK {
        return Err(format!(
            "{what}: {} bytes, not {}",
            img.len(),
            blocks * BLOCK
        ));
    }
    let mut tops: Vec<Option<u64>> = Vec::with_capacity(blocks);
    for (b, data) in img.chunks(BLOCK).enumerate() {
        tops.push(
            parse_block(data, b, blocks, recs.len())
                .map_err(|e| format!("{what}: block {b} holds {e}"))?,
        );
    }
    let present = |k: usize| tops[k % blocks].is_some_and(|s| s as usize >= k);
    let holds = |k: usize| match tops[k % blocks] {
        Some(s) => format!("record {s}"),
        None => "zeroes".into(),
    };
    // (a) The newest submission among the present records bounds the prefix.
    let newest = tops
        .iter()
        .flatten()
        .map(|&s| (recs[s as usize].submit_us, s))
        .max();
    let mut out = PointCheck::default();
    for (k, r) in recs.iter().enumerate() {
        if let Some((submitted, s)) = newest {
            if r.ack_us < submitted && !present(k) {
                return Err(format!(
                    "{what}: not a prefix: record {s} (submitted at {submitted} µs) is present, \
                     but record {k}, acknowledged before that at {} µs, is not (its block holds {})",
                    r.ack_us,
                    holds(k)
                ));
            }
        }
        if r.ack_us < instant {
            out.acked_before += 1;
            if !present(k) {
                return Err(format!(
                    "{what}: record {k}, acknowledged at {} µs, {} µs before the point's instant \
                     {instant}, is missing (its block holds {})",
                    r.ack_us,
                    instant - r.ack_us,
                    holds(k)
                ));
            }
        } else if r.submit_us > instant {
            if present(k) {
                return Err(format!(
                    "{what}: record {k}, submitted at {} µs, {} µs after the point's instant \
                     {instant}, is present",
                    r.submit_us,
                    r.submit_us - instant
                ));
            }
        } else {
            out.straddling += 1;
            out.straddling_present += usize::from(present(k));
        }
    }
    Ok(out)
}

/// A protection point as `snapshots --json` lists it.
#[derive(Clone, Debug)]
struct Point {
    /// `NAME@ID`.
    reference: String,
    created: String,
    instant_us: i64,
    kind: String,
}

/// The snapshots of `name`, oldest first.
fn points(store: &Path, name: &str) -> Vec<Point> {
    let list = cli_json(&["snapshots", "--store", p(store), name, "--json"]);
    let mut out: Vec<Point> = list
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|r| {
            let created = r["created"].as_str().expect("created").to_string();
            Point {
                reference: format!("{name}@{}", r["id"].as_str().expect("id")),
                instant_us: parse_us(&created),
                created,
                kind: r["kind"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect();
    out.sort_by_key(|pt| pt.instant_us);
    out
}

/// `restore --at INSTANT` of `point` into `out`: it must pick that point;
/// returns the image.
fn restore_at(store: &Path, name: &str, point: &Point, out: &Path) -> Vec<u8> {
    let r = cli_json(&[
        "restore",
        "--store",
        p(store),
        name,
        "--at",
        &point.created,
        p(out),
        "--force",
        "--json",
    ]);
    assert_eq!(
        r["snapshot"].as_str(),
        Some(point.reference.as_str()),
        "restore --at {} picked another snapshot: {r}",
        point.created
    );
    std::fs::read(out).unwrap()
}

/// A protecting daemon (`serve --disk` or `instant-boot --protect`), its
/// stderr in a log file; SIGKILL on drop.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// `serve --disk DISK --name NAME --protect-every EVERY` with its
    /// socket, state and log in `dir`.
    fn serve(dir: &Path, store: &Path, disk: &Path, name: &str, every: &str) -> Daemon {
        let mut cmd = recovery_cli();
        cmd.arg("serve")
            .args(["--store", p(store), "--disk", p(disk), "--name", name])
            .args(["--protect-every", every]);
        Self::spawn(cmd, dir)
    }

    /// `instant-boot --store STORE SNAPSHOT --protect EXTRA...` with its
    /// socket, state and log in `dir`.
    fn instant_boot(dir: &Path, store: &Path, snapshot: &str, extra: &[&str]) -> Daemon {
        let mut cmd = recovery_cli();
        cmd.args(["instant-boot", "--store", p(store), snapshot, "--protect"])
            .args(extra);
        Self::spawn(cmd, dir)
    }

    fn spawn(mut cmd: Command, dir: &Path) -> Daemon {
        let socket = dir.join("vhost.sock");
        let state = dir.join("state");
        let log = dir.join("daemon.log");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(file, "--- {cmd:?}").unwrap();
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--state")
            .arg(&state)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn recovery-cli");
        let mut d = Daemon {
            child: Some(child),
            socket,
            control: state.join("control.sock"),
            log,
        };
        d.wait(|_| true, "the daemon to answer status");
        assert!(d.socket.exists(), "no vhost-user socket");
        d
    }

    /// The daemon's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `status --json`, or `None` while the control socket does not answer.
    fn try_status(&self) -> Option<Value> {
        let out = recovery_cli()
            .args(["status", "--json", "--control", p(&self.control)])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    }

    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed\n--- log:\n{}", self.log()))
    }

    /// The status's `protection` object.
    fn protection(&self) -> Value {
        let s = self.status();
        assert!(s["protection"].is_object(), "no protection in {s}");
        s["protection"].clone()
    }

    /// Polls the status until `cond` holds ([`DEADLINE`]); panics if the
    /// daemon exits or protection fails. Returns that status.
    fn wait(&mut self, cond: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.try_status() {
                assert_ne!(
                    s["protection"]["state"],
                    "failed",
                    "protection failed: {s}\n--- log:\n{}",
                    self.log()
                );
                if cond(&s) {
                    return s;
                }
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) while waiting for {what}\n--- log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "waited {DEADLINE:?} for {what}; last status {:?}\n--- log:\n{}",
                self.try_status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a point whose instant is after `after_us`; returns its
    /// `last_point` object.
    fn wait_point_after(&mut self, after_us: i64) -> Value {
        let s = self.wait(
            |s| {
                s["protection"]["last_point"]["instant"]
                    .as_str()
                    .is_some_and(|t| parse_us(t) > after_us)
            },
            "a point after the last write",
        );
        s["protection"]["last_point"].clone()
    }

    /// SIGKILL.
    fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "the daemon exited with {status}\n--- log:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// A fresh store (64 KiB chunks) in `dir/store`.
fn init_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    cli(&["init", p(&store)]);
    store
}

/// A raw file of `len` bytes: zeroes, or random data from `seed`.
fn raw_disk(dir: &Path, len: usize, seed: Option<u64>) -> PathBuf {
    let path = dir.join("disk.raw");
    let f = File::create(&path).unwrap();
    f.set_len(len as u64).unwrap();
    if let Some(seed) = seed {
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        std::fs::write(&path, data).unwrap();
    }
    path
}

/// Restores every point of `name` with an instant in `window` (µs) and
/// checks it against the records; returns how many it checked and the
/// totals.
fn check_points(
    store: &Path,
    name: &str,
    dir: &Path,
    recs: &[Rec],
    blocks: usize,
    window: std::ops::RangeInclusive<i64>,
) -> (usize, PointCheck) {
    let out = dir.join("point.raw");
    let mut total = PointCheck::default();
    let mut n = 0;
    for pt in points(store, name) {
        if !window.contains(&pt.instant_us) {
            continue;
        }
        let img = restore_at(store, name, &pt, &out);
        let c = check_point(&pt.reference, &img, recs, blocks, pt.instant_us)
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{} ({}): {} records acknowledged before its instant, {} of {} straddling it present",
            pt.reference, pt.kind, c.acked_before, c.straddling_present, c.straddling
        );
        total.acked_before += c.acked_before;
        total.straddling += c.straddling;
        total.straddling_present += c.straddling_present;
        n += 1;
    }
    (n, total)
}

/// Writes `n` blocks of random data at random places through `client`
/// (QD1) and into `model`; returns when the last one was acknowledged.
fn write_random_blocks(client: &mut Client, model: &mut [u8], rng: &mut impl Rng, n: usize) -> i64 {
    let mut last_ack = 0;
    for _ in 0..n {
        let offset = rng.gen_range(0..model.len() / BLOCK) * BLOCK;
        let mut data = vec![0u8; BLOCK];
        rng.fill_bytes(&mut data);
        client.write(offset as u64, &data).unwrap();
        last_ack = now_us();
        model[offset..offset + BLOCK].copy_from_slice(&data);
    }
    last_ack
}

/// Records at QD8 while `serve --disk --protect-every 1s` writes points;
/// every point is crash-consistent to the microsecond.
#[test]
fn every_point_is_crash_consistent_at_its_instant() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let disk = raw_disk(dir.path(), 16 * MIB, None);
    let mut daemon = Daemon::serve(dir.path(), &store, &disk, "vm", "1s");
    let client = Client::connect(&daemon.socket, QD * BLOCK);
    let mut w = Writer::new(client, 4000);
    let start = now_us();
    let before = num(&daemon.protection(), "points_written");
    let blocks = w.blocks;
    w.run(|recs| {
        let pr = daemon.protection();
        // Five points while writing, and at least a full cycle over the disk.
        num(&pr, "points_written") >= before + 5 && recs.len() > blocks
    });
    let last_ack = w.recs.iter().map(|r| r.ack_us).max().unwrap();
    // One more point after the last write: it holds every record.
    let last = daemon.wait_point_after(last_ack);
    let last_instant = parse_us(last["instant"].as_str().unwrap());
    drop(w.client);
    daemon.stop();

    let (n, total) = check_points(
        &store,
        "vm",
        dir.path(),
        &w.recs,
        w.blocks,
        start..=last_instant,
    );
    eprintln!(
        "{} records, {n} points checked; {} records straddled a point's instant, {} of them present",
        w.recs.len(),
        total.straddling,
        total.straddling_present
    );
    assert!(n >= 5, "only {n} points during the writes");
    cli(&["verify", "--store", p(&store)]);

    // A point boots: `instant-boot --at` its instant serves it.
    let list = points(&store, "vm");
    let pt = &list[list.len() / 2];
    let boot = dir.path().join("boot");
    std::fs::create_dir(&boot).unwrap();
    let d = crate::boot::BootDaemon::start(
        &store,
        "vm",
        &boot,
        &["--at", &pt.created, "--read-only", "--queues", "1"],
        None,
    );
    assert_eq!(d.ready["snapshot"].as_str(), Some(pt.reference.as_str()));
    let mut client = Client::connect_with(
        &d.socket,
        crate::blkio_client::Options::new(QD * BLOCK).read_only(),
    );
    let img = client.read_all(QD * BLOCK);
    check_point(&pt.reference, &img, &w.recs, w.blocks, pt.instant_us)
        .unwrap_or_else(|e| panic!("instant-boot --at: {e}"));
    drop(client);
    d.stop();
}

/// kill -9 of `serve --disk` while a point is being written, three times
/// at random moments: after each restart on the same state, the next
/// point holds every record acknowledged before the kill; in the end every
/// listed point is whole and crash-consistent, and the store verifies.
#[test]
fn kill_9_mid_point_leaves_whole_points_and_the_next_point_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let tmp = store.join("tmp");
    let disk = raw_disk(dir.path(), 16 * MIB, None);
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut recs: Vec<Rec> = Vec::new();
    let mut blocks = 0;
    let start = now_us();
    let mut kills_mid_point = 0;
    for round in 0..4 {
        let mut daemon = Daemon::serve(dir.path(), &store, &disk, "vm", "1s");
        let client = Client::connect(&daemon.socket, QD * BLOCK);
        let mut w = Writer::new(client, 4000);
        w.recs = std::mem::take(&mut recs);
        blocks = w.blocks;
        // A few records, then the next point must hold everything so far,
        // including what the killed daemon had not put in a point.
        let n = w.recs.len();
        w.run(|r| r.len() >= n + 64);
        let last_ack = w.recs.iter().map(|r| r.ack_us).max().unwrap();
        let pt = daemon.wait_point_after(last_ack);
        let point = Point {
            reference: pt["snapshot"].as_str().unwrap().to_string(),
            created: pt["instant"].as_str().unwrap().to_string(),
            instant_us: parse_us(pt["instant"].as_str().unwrap()),
            kind: String::new(),
        };
        let img = restore_at(&store, "vm", &point, &dir.path().join("next.raw"));
        check_point(
            &format!(
                "round {round}: the first point after the restart, {}",
                point.reference
            ),
            &img,
            &w.recs,
            blocks,
            point.instant_us,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if round == 3 {
            recs = std::mem::take(&mut w.recs);
            drop(w.client);
            daemon.stop();
            break;
        }
        // Keep writing; kill at a random moment while the store holds a
        // point's temporary files.
        let wait_polls = rng.gen_range(0..6);
        let mut polls = 0;
        let deadline = Instant::now() + DEADLINE;
        w.run(|_| {
            assert!(Instant::now() < deadline, "no point in progress seen");
            let busy = std::fs::read_dir(&tmp).is_ok_and(|d| d.count() > 0);
            polls += usize::from(busy);
            busy && polls > wait_polls
        });
        let busy = std::fs::read_dir(&tmp).is_ok_and(|d| d.count() > 0);
        kills_mid_point += usize::from(busy);
        daemon.kill();
        drop(w.client);
        recs = w.recs;
        cli(&["verify", "--store", p(&store)]);
    }
    eprintln!("{kills_mid_point} of 3 kills hit a point in progress");
    let (n, _) = check_points(&store, "vm", dir.path(), &recs, blocks, start..=i64::MAX);
    assert!(n >= 4, "only {n} points");
    cli(&["verify", "--store", p(&store)]);
}

/// `serve --disk` of a raw file that was never backed up: the first point
/// reads it all, the next ones only the changes; the newest point equals
/// the file byte for byte; status and metrics carry the protection fields.
#[test]
fn serve_disk_first_point_full_then_changes_only() {
    const SIZE: usize = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let disk = raw_disk(dir.path(), SIZE, Some(7));
    let mut model = std::fs::read(&disk).unwrap();
    let mut daemon = Daemon::serve(dir.path(), &store, &disk, "prod", "1s");
    let s = daemon.wait(
        |s| !s["protection"]["last_point"].is_null(),
        "the first point",
    );
    let pr = &s["protection"];
    assert_eq!(pr["name"], "prod", "{pr}");
    assert_eq!(pr["interval_seconds"].as_f64(), Some(1.0), "{pr}");
    assert!(
        ["ok", "behind"].contains(&pr["state"].as_str().unwrap_or_default()),
        "{pr}"
    );
    let first_read = num(pr, "point_bytes_read");
    assert!(
        first_read >= SIZE as u64,
        "the first point read {first_read} bytes of a {SIZE}-byte disk: {pr}"
    );
    assert!(num(pr, "points_written") >= 1, "{pr}");
    assert!(pr["rpo_seconds"].as_f64().is_some(), "{pr}");
    let list = points(&store, "prod");
    assert_eq!(list[0].kind, "full", "{list:?}");
    let snapshot = pr["last_point"]["snapshot"].as_str().unwrap();
    assert!(
        list.iter().any(|pt| pt.reference == snapshot),
        "{snapshot} not listed: {list:?}"
    );

    // Small changes: the next points read little.
    let mut client = Client::connect(&daemon.socket, BLOCK);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for _ in 0..3 {
        let read_before = num(&daemon.protection(), "point_bytes_read");
        let last_ack = write_random_blocks(&mut client, &mut model, &mut rng, 8);
        daemon.wait_point_after(last_ack);
        let pr = daemon.protection();
        let read = num(&pr, "point_bytes_read") - read_before;
        // 8 blocks touch at most 8 chunks of 64 KiB.
        assert!(
            read > 0 && read <= 8 * 64 * KIB as u64,
            "a point after 8 changed blocks read {read} bytes: {pr}"
        );
        assert!(num(&pr, "point_bytes_new") >= first_read.min(1), "{pr}");
    }
    let metrics = cli(&["metrics", "--control", p(&daemon.control)]);
    for m in [
        "instant_recovery_protection_rpo_seconds",
        "instant_recovery_protection_points_written_total",
        "instant_recovery_protection_point_bytes_read_total",
        "instant_recovery_protection_point_bytes_new_total",
        "instant_recovery_protection_pending_bytes",
        "instant_recovery_protection_last_point_timestamp_seconds",
        "instant_recovery_protection_state{state=\"ok\"}",
    ] {
        assert!(
            metrics.contains(m),
            "{m} missing from the metrics:\n{metrics}"
        );
    }

    // Another writer holds the store's lock: points wait, the RPO grows
    // past twice the interval (`behind`), and protection catches up once
    // the lock is free.
    let offset = 3 * BLOCK;
    let held = store::Store::open(&store).unwrap();
    let lock = held
        .begin_changed_backup("other")
        .expect("take the writer lock");
    client.write(offset as u64, &[0x5a; BLOCK]).unwrap();
    model[offset..offset + BLOCK].fill(0x5a);
    let s = daemon.wait(
        |s| s["protection"]["state"] == "behind",
        "protection to fall behind while the store is locked",
    );
    assert!(
        s["protection"]["rpo_seconds"].as_f64().unwrap() > 2.0,
        "{s}"
    );
    let metrics = cli(&["metrics", "--control", p(&daemon.control)]);
    assert!(
        metrics.contains("instant_recovery_protection_state{state=\"behind\"} 1"),
        "{metrics}"
    );
    drop(lock);
    daemon.wait_point_after(now_us());
    daemon.wait(
        |s| s["protection"]["state"] == "ok",
        "protection to catch up",
    );
    drop(client);
    daemon.stop();

    let list = points(&store, "prod");
    assert!(list.len() >= 4, "{list:?}");
    // Deltas on the full first point (compacted into a new full manifest
    // once they differ from it in more than 1/64 of the chunks).
    assert!(
        list[1..].iter().any(|pt| pt.kind == "delta"),
        "no later point is a delta: {list:?}"
    );
    let newest = list.last().unwrap();
    let img = restore_at(&store, "prod", newest, &dir.path().join("newest.raw"));
    assert!(img == model, "the newest point differs from the writes");
    assert!(
        img == std::fs::read(&disk).unwrap(),
        "the newest point differs from the disk file"
    );
    cli(&["verify", "--store", p(&store)]);
}

/// `instant-boot --target --protect`: points keep coming while the disk
/// migrates and after it completes, and each equals the guest's disk.
#[test]
fn points_continue_during_and_after_migration() {
    const SIZE: usize = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(21).fill_bytes(&mut model);
    let image = dir.path().join("image.raw");
    std::fs::write(&image, &model).unwrap();
    let (store, _) = store_with_backup(dir.path(), "vm", &image);
    let target = dir.path().join("target.raw");
    let mut daemon = Daemon::instant_boot(
        dir.path(),
        &store,
        "vm",
        &[
            "--protect-every",
            "1s",
            "--queues",
            "1",
            "--copy-rate",
            "1M",
            "--target",
            p(&target),
        ],
    );
    let mut client = Client::connect(&daemon.socket, BLOCK);
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let out = dir.path().join("point.raw");
    let mut check_next_point = |daemon: &mut Daemon, client: &mut Client, model: &mut Vec<u8>| {
        let last_ack = write_random_blocks(client, model, &mut rng, 16);
        let pt = daemon.wait_point_after(last_ack);
        let state = daemon.status()["state"].as_str().unwrap().to_string();
        let r = cli_json(&[
            "restore",
            "--store",
            p(&store),
            pt["snapshot"].as_str().unwrap(),
            p(&out),
            "--force",
            "--json",
        ]);
        assert!(
            std::fs::read(&out).unwrap() == *model,
            "point {r} (migration {state}) differs from the guest's writes"
        );
        state
    };
    let mut during = 0;
    while during < 3 {
        let state = check_next_point(&mut daemon, &mut client, &mut model);
        if state != "migrating" {
            break;
        }
        during += 1;
    }
    assert!(
        during >= 1,
        "the migration ended before a point was checked"
    );
    cli(&["set-rate", "--control", p(&daemon.control), "unlimited"]);
    daemon.wait(|s| s["state"] == "complete", "the migration to complete");
    for _ in 0..2 {
        let state = check_next_point(&mut daemon, &mut client, &mut model);
        assert_eq!(state, "complete");
    }
    let pr = daemon.protection();
    assert_eq!(pr["state"], "ok", "{pr}");
    drop(client);
    daemon.stop();
    assert!(
        std::fs::read(&target).unwrap() == model,
        "the target differs"
    );
    cli(&["verify", "--store", p(&store)]);
}

/// Waits for the guest's next `FILE <i> <sha256>` line and notes when it
/// was seen (after the file's fsync).
fn next_file(vm: &RunningGuest, synced: &mut Vec<(u32, String, i64)>) {
    let i = synced.len() as u32 + 1;
    let line = vm
        .wait_for(&format!("FILE {i} "), BOOT_TIMEOUT)
        .unwrap_or_else(|| panic!("no FILE {i}\n{}", vm.console()));
    let seen = now_us();
    let sha = line
        .split_whitespace()
        .nth(2)
        .expect("FILE i sha")
        .to_string();
    synced.push((i, sha, seen));
}

/// A TCG guest booted with `--protect-every 2s` writes fsynced files;
/// `restore --at` a time noted from the console gives a point that passes
/// e2fsck after journal replay and holds every file synced before the
/// point's instant (so every file synced an interval before the time, as
/// long as protection keeps up).
#[test]
fn guest_files_synced_before_the_point_are_in_it() {
    let guest = require_guest!().with_kernel_args("guestmode=files");
    recovery_cli_path();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, _) = store_with_backup(dir.path(), "guest", &image);
    std::fs::remove_file(&image).unwrap();
    let daemon = Daemon::instant_boot(
        dir.path(),
        &store,
        "guest",
        &["--protect-every", "2s", "--queues", "1"],
    );
    let mut vm = RunningGuest::spawn(guest.qemu_vhost_user_cmd(&daemon.socket, &[]));
    // (number, sha256, µs when its line was seen: after its fsync)
    let mut synced: Vec<(u32, String, i64)> = Vec::new();
    // Files until a point holds at least 4 of them, then a time T; again
    // once a point after that time holds 8 more.
    let mut times = Vec::new();
    while times.len() < 2 {
        next_file(&vm, &mut synced);
        let needed = 4 + 8 * times.len();
        if synced.len() <= needed {
            continue;
        }
        let newest = daemon.protection()["last_point"]["instant"]
            .as_str()
            .map(parse_us);
        let after = synced[needed - 1].2.max(times.last().copied().unwrap_or(0));
        // T is no earlier than that point's instant: under load the point
        // can be cut after the last file's line was seen, and a T before
        // it would pick the previous point, which may predate every file.
        if let Some(point) = newest.filter(|&t| t > after) {
            times.push(synced.last().unwrap().2.max(point));
        }
    }
    // A few more files after the last T.
    for _ in 0..3 {
        next_file(&vm, &mut synced);
    }
    let pr = daemon.protection();
    vm.send_line("stop");
    let out = vm.finish(BOOT_TIMEOUT);
    assert!(out.guest_done(), "{out}");
    daemon.stop();

    let img = dir.path().join("at.img");
    let scratch = dir.path().join("file.out");
    for t in times {
        let at = store::snapshot::rfc3339_micros(t);
        let r = cli_json(&[
            "restore",
            "--store",
            p(&store),
            "guest",
            "--at",
            &at,
            p(&img),
            "--force",
            "--json",
        ]);
        let chosen = r["snapshot"].as_str().expect("snapshot").to_string();
        let point = points(&store, "guest")
            .into_iter()
            .find(|pt| pt.reference == chosen)
            .expect("the chosen point is listed");
        assert!(
            point.instant_us <= t,
            "--at {at} picked {chosen}, a later point"
        );
        let replay = Command::new("e2fsck")
            .arg("-fp")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            replay.status.code().is_some_and(|c| c <= 1),
            "e2fsck -fp of {chosen} (--at {at}): {}{}",
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        );
        guest::e2fsck(&img).unwrap_or_else(|e| panic!("{chosen}: {e}"));
        let mut held = 0;
        for (i, sha, seen) in &synced {
            if *seen >= point.instant_us {
                continue;
            }
            let got = guest::guest_file_digest(&img, &format!("/files/f-{i}"), &scratch);
            assert_eq!(
                got,
                Some((16384, sha.clone())),
                "{chosen} (--at {at}): /files/f-{i}, synced {} µs before the point's instant, \
                 is missing or differs",
                point.instant_us - seen
            );
            held += 1;
        }
        eprintln!(
            "--at {at}: {chosen}, {:.2} s before the time, holds all {held} files synced before it",
            (t - point.instant_us) as f64 / 1e6
        );
        assert!(held >= 2, "the point holds only {held} files");
    }
    eprintln!("protection at the end: {pr}");
}

/// Bad `serve` inputs are one clear error line each and leave no socket:
/// an interval under the 1 s minimum (a usage error, exit 2), a missing
/// disk and an invalid name (exit 1).
#[test]
fn bad_serve_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = init_store(dir.path());
    let disk = raw_disk(dir.path(), MIB, None);
    let missing = dir.path().join("missing.raw");
    let socket = dir.path().join("s.sock");
    let state = dir.path().join("state");
    for (disk, name, every, code, needle) in [
        (&disk, "vm", "0s", 2, "minimum interval of 1s"),
        (&missing, "vm", "1s", 1, "missing.raw"),
        (&disk, "bad/name", "1s", 1, "bad/name"),
    ] {
        let out = recovery_cli()
            .args([
                "serve",
                "--store",
                p(&store),
                "--disk",
                p(disk),
                "--name",
                name,
            ])
            .args(["--socket", p(&socket), "--state", p(&state)])
            .args(["--protect-every", every])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(needle),
            "{err}"
        );
        if code == 1 {
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
        assert!(!socket.exists(), "a socket was left behind: {err}");
    }
}

/// The checker itself: records written through a plain `instant-boot`
/// (no protection) and read back hold every record at an instant after
/// the last acknowledgement, and fail the check at an instant before the
/// last records were submitted, or when a record is damaged or lost.
#[test]
fn the_record_checker_catches_what_a_point_must_not_be() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_disk(dir.path(), 4 * MIB, None);
    let (store, _) = store_with_backup(dir.path(), "vm", &image);
    let d = crate::boot::BootDaemon::start(&store, "vm", dir.path(), &["--queues", "1"], None);
    let client = Client::connect(&d.socket, QD * BLOCK);
    let mut w = Writer::new(client, 4000);
    w.run(|recs| recs.len() > 3 * w_blocks(4 * MIB));
    let mut img = w.client.read_all(QD * BLOCK);
    drop(w.client);
    d.stop();
    let recs = &w.recs;
    let last = recs.iter().map(|r| r.ack_us).max().unwrap();
    let c = check_point("all", &img, recs, w.blocks, last + 1).unwrap();
    assert_eq!(c.acked_before, recs.len());
    let mid = recs[recs.len() - 100].submit_us;
    let e = check_point("mid", &img, recs, w.blocks, mid).unwrap_err();
    assert!(e.contains("after the point's instant"), "{e}");
    // A record acknowledged well before the end lost (its block holds the
    // record before it): neither a prefix nor complete.
    let k = recs.len() - 20;
    let at = (k % w.blocks) * BLOCK;
    img[at..at + BLOCK].copy_from_slice(&record((k - w.blocks) as u64));
    let e = check_point("lost", &img, recs, w.blocks, last + 1).unwrap_err();
    assert!(e.contains("not a prefix"), "{e}");
    img[at + 100] ^= 1;
    let e = check_point("torn", &img, recs, w.blocks, last + 1).unwrap_err();
    assert!(e.contains("damaged"), "{e}");
}

/// Blocks of a `len`-byte device.
fn w_blocks(len: usize) -> usize {
    len / BLOCK
}
