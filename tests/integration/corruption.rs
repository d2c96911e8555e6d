//! A damaged store: a flipped bit or a truncated pack never reaches the
//! guest as data. The guest's read fails with EIO, the daemon logs the
//! chunk, snapshot and offset, `status` counts the errors, the copier marks
//! the chunk failed and migrates the rest, `verify` names the range, and
//! `--repair-from` finishes the migration from another backup.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

use crate::blkio_client::Client;
use crate::boot::store_with_backup;
use crate::util::recovery_cli;

const MIB: usize = 1 << 20;
/// The store's default chunk size.
const CHUNK: usize = 64 << 10;
const EIO: i32 = -libc::EIO;

/// An `instant-boot` daemon whose stderr (warn level) goes to a log file;
/// SIGKILL on drop.
pub struct LoggedDaemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub control: PathBuf,
    log: PathBuf,
}

impl LoggedDaemon {
    /// Starts `instant-boot --json STORE SNAPSHOT --socket DIR/vhost.sock
    /// --state STATE --control DIR/control.sock EXTRA...` and waits until
    /// it listens; panics with its log if it exits first.
    pub fn start(
        store: &Path,
        snapshot: &str,
        dir: &Path,
        state: &Path,
        extra: &[&OsStr],
    ) -> LoggedDaemon {
        let socket = dir.join("vhost.sock");
        let control = dir.join("control.sock");
        let log = dir.join("daemon.log");
        let mut child = recovery_cli()
            .arg("instant-boot")
            .arg("--store")
            .arg(store)
            .arg(snapshot)
            .arg("--socket")
            .arg(&socket)
            .arg("--state")
            .arg(state)
            .arg("--control")
            .arg(&control)
            .arg("--json")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn recovery-cli instant-boot");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let status = child.wait();
            panic!(
                "instant-boot exited before listening ({status:?}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        LoggedDaemon {
            child: Some(child),
            socket,
            control,
            log,
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `recovery-cli status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = recovery_cli()
            .args(["status", "--json", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(out.status.success(), "status failed: {out:?}");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Runs a control command (`pause`, `set-rate`...) with `args`.
    pub fn control(&self, command: &str, args: &[&str]) {
        let out = recovery_cli()
            .arg(command)
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} failed: {out:?}");
    }

    /// Polls the status until `done` holds; panics with the status and log
    /// after `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: the daemon must exit 0. Returns its log.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "instant-boot exited with {status}: {log}");
        log
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn num(status: &serde_json::Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {status}"))
}

/// Random (incompressible) bytes.
pub fn random_image(len: usize, seed: u64) -> Vec<u8> {
    let mut image = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut image);
    image
}

/// How to damage a chunk's record in its pack.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip one bit in the middle of the stored data.
    FlipBit,
    /// Cut the pack in the middle of the record (which must be its last).
    Truncate,
}

/// Damages the record of chunk `index` of `snapshot`; returns the chunk id.
fn damage(store: &Path, snapshot: &str, index: u64, how: Damage) -> String {
    let s = store::Store::open(store).unwrap();
    let reader = s.open_snapshot(snapshot).unwrap();
    let id = reader.chunk_id(index).unwrap().expect("a stored chunk");
    let loc = s.index().lookup(&id).unwrap().expect("an indexed chunk");
    let path = store.join(loc.pack.pack_key());
    let data = loc.offset + store::format::RECORD_HEADER_LEN as u64;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    match how {
        Damage::FlipBit => {
            let at = data + u64::from(loc.stored_len) / 2;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        }
        Damage::Truncate => {
            let end = data + u64::from(loc.stored_len);
            assert_eq!(
                f.metadata().unwrap().len(),
                end,
                "not the pack's last record"
            );
            f.set_len(data + u64::from(loc.stored_len) / 2).unwrap();
        }
    }
    f.sync_all().unwrap();
    id.to_string()
}

/// The chunk of `snapshot` whose record is the last one in its pack.
fn last_record_chunk(store: &Path, snapshot: &str) -> u64 {
    let s = store::Store::open(store).unwrap();
    let reader = s.open_snapshot(snapshot).unwrap();
    let index = s.index();
    (0..reader.chunk_count())
        .filter_map(|c| {
            let id = reader.chunk_id(c).unwrap()?;
            let loc = index.lookup(&id).unwrap()?;
            let len = std::fs::metadata(store.join(loc.pack.pack_key()))
                .unwrap()
                .len();
            let end =
                loc.offset + store::format::RECORD_HEADER_LEN as u64 + u64::from(loc.stored_len);
            (end == len).then_some(c)
        })
        .next()
        .expect("a chunk at the end of a pack")
}

/// Backs up `image` as `vm` in `dir/store`; returns the store and `vm@ID`.
fn backup(dir: &Path, image: &[u8]) -> (PathBuf, String) {
    let path = dir.join("disk.img");
    std::fs::write(&path, image).unwrap();
    let (store, id) = store_with_backup(dir, "vm", &path);
    (store, format!("vm@{id}"))
}

fn chunk(image: &[u8], c: u64) -> &[u8] {
    &image[c as usize * CHUNK..(c as usize + 1) * CHUNK]
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs at byte {i} (chunk {})", i / CHUNK);
    }
}

fn one_line_error(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing in {err}");
    }
}

#[test]
fn damaged_chunks_are_io_errors_for_the_guest_logged_counted_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let image = random_image(4 * MIB, 11);
    let (store, snap) = backup(dir.path(), &image);
    let flipped = 5;
    let truncated = last_record_chunk(&store, &snap);
    assert_ne!(truncated, flipped);
    let flipped_id = damage(&store, &snap, flipped, Damage::FlipBit);
    let truncated_id = damage(&store, &snap, truncated, Damage::Truncate);

    let state = dir.path().join("state");
    let daemon = LoggedDaemon::start(&store, &snap, dir.path(), &state, &[]);
    let mut client = Client::connect(&daemon.socket, CHUNK * 2);
    let cs = CHUNK as u64;
    // Reads touching a damaged chunk fail, however they are cut...
    assert_eq!(client.read(flipped * cs, 4096), Err(EIO));
    assert_eq!(client.read(flipped * cs + cs - 512, 512), Err(EIO));
    assert_eq!(client.read((flipped - 1) * cs, 2 * CHUNK), Err(EIO));
    assert_eq!(client.read(truncated * cs + 4096, 8192), Err(EIO));
    // ...every other byte reads as backed up.
    for c in (0..image.len() as u64 / cs).filter(|c| ![flipped, truncated].contains(c)) {
        let got = client.read(c * cs, CHUNK).unwrap();
        assert_same(&got, chunk(&image, c), &format!("chunk {c}"));
    }
    // A guest that overwrites a damaged chunk whole reads its own data.
    let fresh = vec![0x5au8; CHUNK];
    client.write(flipped * cs, &fresh).unwrap();
    assert_eq!(client.read(flipped * cs, CHUNK).unwrap(), fresh);

    let s = daemon.status();
    assert_eq!(s["state"], "serving", "{s}");
    assert_eq!(num(&s, "guest_io_errors"), 4, "{s}");
    assert!(num(&s, "chunk_read_errors") >= 4, "{s}");
    let metrics = recovery_cli()
        .args(["metrics", "--control"])
        .arg(&daemon.control)
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("instant_recovery_guest_io_errors_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("instant_recovery_chunk_read_errors_total"),
        "{metrics}"
    );
    drop(client);

    // The log names chunk id, snapshot and offset of both.
    let log = daemon.stop();
    for (c, id) in [(flipped, &flipped_id), (truncated, &truncated_id)] {
        let line = log
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("chunk {id} not logged: {log}"));
        assert!(line.contains(&snap), "{line}");
        assert!(line.contains(&format!("offset {}", c * cs)), "{line}");
    }

    // verify names the snapshot and the damaged byte ranges.
    let out = recovery_cli()
        .args(["verify", "--store"])
        .arg(&store)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    for (c, id) in [(flipped, &flipped_id), (truncated, &truncated_id)] {
        assert!(report.contains(id.as_str()), "{report}");
        let range = format!("used by {snap} bytes {}-{}", c * cs, (c + 1) * cs);
        assert!(report.contains(&range), "{range:?} missing: {report}");
    }
}

#[test]
fn the_copier_marks_damaged_chunks_failed_and_migrates_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let image = random_image(4 * MIB, 12);
    let (store, snap) = backup(dir.path(), &image);
    let bad = [7u64, 40];
    for c in bad {
        damage(&store, &snap, c, Damage::FlipBit);
    }
    let state = dir.path().join("state");
    let target = dir.path().join("target.raw");
    let daemon = LoggedDaemon::start(
        &store,
        &snap,
        dir.path(),
        &state,
        &[
            "--copy-rate".as_ref(),
            "8M".as_ref(),
            "--target".as_ref(),
            target.as_os_str(),
        ],
    );
    let s = daemon.wait_for(Duration::from_secs(60), "state failed", |s| {
        s["state"] == "failed"
    });
    let chunks = (image.len() / CHUNK) as u64;
    assert_eq!(num(&s, "chunks_failed"), 2, "{s}");
    assert_eq!(num(&s, "chunks_migrated"), chunks - 2, "{s}");
    let reason = s["error"].as_str().unwrap();
    assert!(
        reason.contains("2 chunks")
            && reason.contains("chunk 7")
            && reason.contains("--repair-from"),
        "{reason}"
    );
    // Migrated chunks are on the target and read from it; failed ones stay errors.
    let on_target = std::fs::read(&target).unwrap();
    for c in (0..chunks).filter(|c| !bad.contains(c)) {
        assert_same(
            chunk(&on_target, c),
            chunk(&image, c),
            &format!("target chunk {c}"),
        );
    }
    let mut client = Client::connect(&daemon.socket, CHUNK);
    let cs = CHUNK as u64;
    assert_eq!(client.read(7 * cs, 4096), Err(EIO));
    assert_eq!(client.read(8 * cs, CHUNK).unwrap(), chunk(&image, 8));
    drop(client);
    let log = daemon.stop();
    for c in bad {
        assert!(
            log.lines()
                .any(|l| l.contains("marked failed") && l.contains(&format!("offset={}", c * cs))),
            "chunk {c} not logged as failed: {log}"
        );
    }
}

#[test]
fn repair_from_another_backup_completes_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let first = random_image(4 * MIB, 13);
    let (store, snap1) = backup(dir.path(), &first);
    // The second backup: chunks 10, 30 and 60 changed since.
    let mut second = first.clone();
    let cs = CHUNK as u64;
    for c in [10u64, 30, 60] {
        let start = c as usize * CHUNK;
        second[start..start + CHUNK].copy_from_slice(&random_image(CHUNK, 100 + c));
    }
    let path2 = dir.path().join("disk2.img");
    std::fs::write(&path2, &second).unwrap();
    let out = recovery_cli()
        .args(["backup", "--json", "--name", "vm", "--store"])
        .arg(&store)
        .arg(&path2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let snap2 = format!(
        "vm@{}",
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
            .as_str()
            .unwrap()
    );
    // Chunks 10 and 60 of the first backup are damaged; the second does
    // not use them.
    damage(&store, &snap1, 10, Damage::FlipBit);
    damage(&store, &snap1, 60, Damage::FlipBit);
    let small = dir.path().join("small.img");
    std::fs::write(&small, random_image(MIB, 14)).unwrap();
    let out = recovery_cli()
        .args(["backup", "--name", "other", "--store"])
        .arg(&store)
        .arg(&small)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let state = dir.path().join("state");
    let target = dir.path().join("target.raw");
    let boot = |extra: &[&str]| {
        recovery_cli()
            .arg("instant-boot")
            .arg("--store")
            .arg(&store)
            .arg(&snap1)
            .arg("--socket")
            .arg(dir.path().join("refused.sock"))
            .arg("--state")
            .arg(&state)
            .args(extra)
            .output()
            .unwrap()
    };
    // Refused, in one line each: another image, the served snapshot
    // itself, an unknown one, no target.
    let t = target.to_str().unwrap();
    one_line_error(
        &boot(&["--target", t, "--repair-from", "other"]),
        &["other@", "image size", "same image"],
    );
    one_line_error(
        &boot(&["--target", t, "--repair-from", &snap1]),
        &["is the snapshot being served"],
    );
    one_line_error(
        &boot(&["--target", t, "--repair-from", "nope"]),
        &["repair snapshot nope"],
    );
    one_line_error(&boot(&["--repair-from", &snap2]), &["--target"]);
    assert!(!target.exists(), "a refused start created the target");

    // Slow at first, so the guest writes before the copier gets there.
    let daemon = LoggedDaemon::start(
        &store,
        &snap1,
        dir.path(),
        &state,
        &[
            "--copy-rate".as_ref(),
            "128K".as_ref(),
            "--verify".as_ref(),
            "--repair-from".as_ref(),
            snap2.as_ref(),
            "--target".as_ref(),
            target.as_os_str(),
        ],
    );
    let mut client = Client::connect(&daemon.socket, CHUNK);
    // The damaged chunk is an error until the copier repairs it.
    assert_eq!(client.read(10 * cs, 4096), Err(EIO));
    // The guest writes the second block of damaged chunk 60: kept.
    let block = vec![0x42u8; 4096];
    client.write(60 * cs + 4096, &block).unwrap();
    client.flush().unwrap();
    daemon.control("set-rate", &["unlimited"]);
    let s = daemon.wait_for(Duration::from_secs(60), "completion", |s| {
        assert_ne!(s["state"], "failed", "{s}");
        s["state"] == "complete"
    });
    assert_eq!(num(&s, "chunks_repaired"), 2, "{s}");
    assert_eq!(num(&s, "chunks_failed"), 0, "{s}");
    // Repaired chunks read from the target now.
    assert_eq!(client.read(10 * cs, CHUNK).unwrap(), chunk(&second, 10));
    drop(client);
    let log = daemon.stop();
    for c in [10u64, 60] {
        let needle = format!("chunk {c} at offset {} repaired from {snap2}", c * cs);
        assert!(log.contains(&needle), "{needle:?} not logged: {log}");
    }

    // The first backup, but the damaged chunks from the second, with the
    // guest's block on top.
    let mut want = first.clone();
    for c in [10usize, 60] {
        want[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&second[c * CHUNK..(c + 1) * CHUNK]);
    }
    want[60 * CHUNK + 4096..60 * CHUNK + 8192].copy_from_slice(&block);
    assert_same(&std::fs::read(&target).unwrap(), &want, "target");
}
