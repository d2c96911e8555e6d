//! Reconnect without I/O loss (issue 5): `kill -9` of the daemon under a
//! running guest.
//!
//! QEMU's vhost-user chardev has `reconnect=1`: when the daemon dies, QEMU
//! keeps the guest running, stops the device and retries the socket every
//! second. A new daemon on the same store, state directory, socket and
//! target must take over so that the guest's write-and-verify loop never
//! sees an I/O error, no acknowledged write is lost, and the migration to
//! the target resumes from its last checkpoint.
//!
//! The guest runs [`WRITERS`] writers at once (O_DIRECT, each fsyncing its
//! file) and reads the files back at once, so several requests are in
//! flight together and complete out of order. Each kill lands while the
//! guest writes: after an iteration starts, the test polls the daemon until
//! its guest write counter rises, then stops it (SIGSTOP) at a moment it
//! holds guest requests (taken off the available ring, not yet used): it
//! reads the vhost-user in-flight region through QEMU's file descriptor of
//! it and, if no request is marked, lets the daemon run a few random
//! milliseconds and stops it again. The daemon stays stopped a few
//! hundred milliseconds more, so the guest's next requests stay
//! outstanding, and only then gets SIGKILL (the same crash, at the moment
//! it stopped).
//!
//! The new daemon must find those requests in the region and run them
//! again (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the test runs rounds until
//! a restarted daemon logged "recovered requests a previous daemon held"
//! (at least [`MIN_ROUNDS`], at most [`MAX_ROUNDS`]). The round summary
//! printed to stderr says how often the test stopped the daemon, how many
//! requests the region marked, how many the new daemon resubmitted, which
//! bitmaps it recovered from their live journals, and how many daemon
//! threads were inside an I/O system call at the kill.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, RngCore, SeedableRng};

use crate::boot::{store_with_backup, BootDaemon};
use crate::guest::{
    e2fsck, guest_file_digest, require_guest, write_guest_file, GuestOutput, RunningGuest,
    BOOT_TIMEOUT,
};
use crate::migrate::{num, status, wait_complete};
use crate::util::recovery_cli;

/// Kill-and-restart rounds at least.
const MIN_ROUNDS: u32 = 3;

/// Kill-and-restart rounds at most: rounds go on after [`MIN_ROUNDS`] while
/// no restarted daemon has resubmitted requests the killed one held.
const MAX_ROUNDS: u32 = 8;

/// Guest writers running at once in every loop iteration (`guestwriters=`
/// of scripts/build-guest.sh): `/loop.dat` and `/loop-<k>.dat`.
const WRITERS: u32 = 3;

/// The daemon's log filter: the recovery messages below are at INFO, the
/// default level is WARN.
const DAEMON_LOG: &str =
    "warn,vhost_backend::handler=info,vhost_backend::worker=info,block::bitmap=info";

/// Logged (INFO, `vhost_backend::handler`) by a daemon that found requests
/// marked in flight by the previous one, with `requests=<n>`.
const RECOVERED_REQUESTS: &str = "recovered requests a previous daemon held";

/// Logged (INFO, `vhost_backend::worker`) when it runs them again.
const RESUBMITTING: &str = "resubmitting the requests a previous daemon held";

/// Logged (INFO, `block::bitmap`) when a bitmap's live journal held
/// bits set after its last sync, with `path=<bitmap>`.
const RECOVERED_BITS: &str = "recovered bits a previous daemon set after its last sync";

/// Name of the in-flight region's memfd (vhost-backend/src/inflight.rs) as
/// `/proc/<pid>/fd` shows it.
const INFLIGHT_MEMFD: &str = "/memfd:vhost-blk-inflight";

/// How long to keep stopping the daemon until it holds a request, before
/// killing it anyway.
const AIM_WAIT: Duration = Duration::from_secs(3);

/// Copier rate limit: slow enough that the guest disk's non-zero data
/// ([`FILLER_BYTES`] and more) is still migrating after all rounds (zero
/// chunks cost nothing; copy-on-read of the guest's own reads adds to the
/// progress), fast enough to show progress between two looks.
const COPY_RATE: &str = "256K";

/// Random data added to the 64 MiB guest disk before the backup, so the
/// copier has work for longer than the test runs (about 100 s at
/// [`COPY_RATE`]).
const FILLER_BYTES: usize = 24 << 20;

/// How long to wait for guest writes to show up in the daemon's counters
/// before killing it anyway.
const WRITE_WAIT: Duration = Duration::from_secs(3);

/// Loop iterations that must pass after each restart.
const ITERATIONS_AFTER_RESTART: u32 = 2;

/// Time for one loop iteration, including QEMU's reconnect (1 s retry) and
/// the new daemon's start. An idle TCG guest needs a second or two.
const ITERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The copier checkpoints its migrated bitmap about once a second; this
/// bounds the wait for a checkpoint that covers reported progress.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(60);

/// Guest kernel messages that mean the guest saw an I/O error.
const IO_ERROR_MARKERS: [&str; 4] = [
    "I/O error",
    "EXT4-fs error",
    "blk_update_request",
    "Buffer I/O",
];

/// Size of `/loop.dat` and `/loop-<k>.dat`, written by every loop
/// iteration.
const LOOP_FILE_BYTES: u64 = 1 << 20;

/// How long the restarted daemon's copier may take to move past the
/// progress it resumed from, after the guest passed its iterations (the
/// copier backs off while the guest does I/O, and the guest's writers keep
/// it busy).
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// The daemon under test and everything needed to start it again.
struct Setup {
    dir: tempfile::TempDir,
    store: PathBuf,
    target: PathBuf,
    state: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl Setup {
    /// Starts (or restarts) `instant-boot` on the same store, state,
    /// socket and target; its stderr goes to the shared log.
    fn start(&mut self) -> BootDaemon {
        self.starts += 1;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|mut f| writeln!(f, "=== daemon start {} ===", self.starts))
            .unwrap();
        BootDaemon::start_logged(
            &self.store,
            "guest",
            self.dir.path(),
            &["--queues", "1", "--copy-rate", COPY_RATE, "--target"],
            Some(&self.target),
            &self.log,
            &[("RUST_LOG", DAEMON_LOG)],
        )
    }

    /// What daemon start `n` (1 = the first) wrote to the log so far.
    fn start_log(&self, n: u32) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let from = format!("=== daemon start {n} ===\n");
        let to = format!("=== daemon start {} ===\n", n + 1);
        let Some((_, rest)) = log.split_once(&from) else {
            return String::new();
        };
        rest.split_once(&to)
            .map_or(rest, |(mine, _)| mine)
            .to_owned()
    }

    /// Bytes the target holds according to the running daemon.
    fn migrated(&self) -> u64 {
        num(&status(&self.state), "bytes_migrated")
    }

    /// Bytes the target holds once it is more than `from` (at most
    /// [`RESUME_WAIT`] later).
    fn migrated_beyond(&self, from: u64) -> u64 {
        let start = Instant::now();
        loop {
            let now = self.migrated();
            if now > from || start.elapsed() >= RESUME_WAIT {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last console lines and the daemons' stderr, for failure
    /// messages.
    fn context(&self, console: &str) -> String {
        let lines: Vec<&str> = console.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let log_lines: Vec<&str> = log.lines().collect();
        let log_tail = &log_lines[log_lines.len().saturating_sub(60)..];
        let mut out = String::new();
        let _ = writeln!(out, "--- guest console (last {} lines) ---", tail.len());
        for l in tail {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "--- daemon stderr (last {} lines) ---", log_tail.len());
        for l in log_tail {
            let _ = writeln!(out, "{l}");
        }
        out.push_str("---");
        out
    }
}

/// Writes [`FILLER_BYTES`] of random data into `image` as `/filler.bin`.
fn add_filler(image: &Path, dir: &Path, seed: u64) {
    let mut data = vec![0u8; FILLER_BYTES];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let filler = dir.join("filler.bin");
    std::fs::write(&filler, data).unwrap();
    write_guest_file(image, &filler, "/filler.bin");
    std::fs::remove_file(&filler).unwrap();
    e2fsck(image).unwrap_or_else(|e| panic!("image with filler: {e}"));
}

/// Polls the daemon until its guest write counter rises (the guest's
/// `sync` is sending writes), then waits a few random milliseconds more.
/// Returns the time waited, whether writes were seen and the last status.
fn wait_for_guest_writes(setup: &Setup, rng: &mut impl Rng) -> (Duration, bool, serde_json::Value) {
    let start = Instant::now();
    let base = num(&status(&setup.state), "guest_write_ops");
    let (seen, last) = loop {
        let now = status(&setup.state);
        if num(&now, "guest_write_ops") > base {
            break (true, now);
        }
        if start.elapsed() >= WRITE_WAIT {
            break (false, now);
        }
    };
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..20)));
    (start.elapsed(), seen, last)
}

/// Threads of the stopped process `pid` that are inside a block I/O system
/// call (pread64, pwrite64, preadv, pwritev, fsync, fdatasync, fallocate,
/// preadv2, pwritev2 on x86_64): requests the daemon had taken off the
/// queue and not finished when it died. Diagnostic only; 0 if unknown.
fn threads_in_io(pid: u32) -> usize {
    const IO_SYSCALLS: [u64; 9] = [17, 18, 295, 296, 74, 75, 285, 327, 328];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("syscall")).ok())
        .filter(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| IO_SYSCALLS.contains(&n))
        })
        .count()
}

/// Sends `signal` (a `kill -<signal>` name) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Waits until every thread of `pid` has stopped after SIGSTOP (state `T`
/// in `/proc/<pid>/task/<tid>/stat`), for at most a second.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task")).map(|tasks| {
            tasks.filter_map(Result::ok).all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                })
            })
        });
        if stopped.unwrap_or(true) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Requests the stopped daemon holds on queue 0: descriptor heads marked
/// in flight in the vhost-user in-flight region (spec, "Inflight I/O
/// tracking": per queue a 16-byte header with `u16 version` at 8 and
/// `u16 desc_num` at 10, then 16 bytes per head whose first byte is the
/// in-flight flag), read through QEMU's (`qemu` is its pid) file
/// descriptors of the region's memfd. QEMU may also hold the region of an
/// earlier device start during boot, whose requests all completed, so
/// every distinct region counts. `None` if QEMU holds none (not
/// negotiated).
fn held_requests(qemu: u32) -> Option<usize> {
    let mut seen = Vec::new();
    let mut held = None;
    for fd in std::fs::read_dir(format!("/proc/{qemu}/fd"))
        .ok()?
        .flatten()
    {
        let path = fd.path();
        let is_region = std::fs::read_link(&path)
            .is_ok_and(|to| to.to_string_lossy().starts_with(INFLIGHT_MEMFD));
        let Some(inode) = is_region
            .then(|| std::fs::metadata(&path).ok())
            .flatten()
            .map(|m| m.ino())
        else {
            continue;
        };
        if seen.contains(&inode) {
            continue;
        }
        seen.push(inode);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        *held.get_or_insert(0) += region_held(&bytes);
    }
    held
}

/// Heads marked in flight in queue 0 of an in-flight region (0 if the
/// region was never started: version 0).
fn region_held(region: &[u8]) -> usize {
    let u16_at = |at: usize| {
        region
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    if u16_at(8) != 1 {
        return 0;
    }
    (0..usize::from(u16_at(10)))
        .filter(|head| region.get(16 + 16 * head) == Some(&1))
        .count()
}

/// Where the stop of one round landed.
struct Aim {
    /// SIGSTOPs sent until the daemon held a request (or [`AIM_WAIT`]
    /// passed).
    stops: u32,
    /// Requests held at the first stop: what a plain stop would have got.
    first: Option<usize>,
    /// Requests held at the last stop, the one the kill follows.
    held: Option<usize>,
}

/// Stops the daemon `pid` (SIGSTOP) at a moment it holds guest requests:
/// stops it and reads the in-flight region through QEMU (`qemu`, its pid);
/// while no request is marked,
/// lets it run a few random milliseconds (SIGCONT) and stops it again, for
/// at most [`AIM_WAIT`]. Returns with the daemon stopped.
fn stop_holding_requests(pid: u32, qemu: u32, rng: &mut impl Rng) -> Aim {
    let start = Instant::now();
    let mut aim = Aim {
        stops: 0,
        first: None,
        held: None,
    };
    loop {
        signal(pid, "STOP");
        wait_stopped(pid);
        aim.stops += 1;
        aim.held = held_requests(qemu);
        if aim.stops == 1 {
            aim.first = aim.held;
        }
        if aim.held != Some(0) || start.elapsed() >= AIM_WAIT {
            return aim;
        }
        signal(pid, "CONT");
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..5000)));
    }
}

/// The `<key>=<value>` field of a log line (tracing's text format).
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// What a restarted daemon logged about the killed one's state.
#[derive(Default)]
struct Recovery {
    /// Requests it found in flight (`None`: it logged no recovery).
    requests: Option<u64>,
    /// It logged that it runs them again.
    resubmitted: bool,
    /// Bitmaps (file names) whose live journal held bits set after their
    /// last sync, with the number of bits.
    bitmaps: Vec<(String, u64)>,
}

impl Recovery {
    fn from_log(log: &str) -> Recovery {
        let mut r = Recovery::default();
        for line in log.lines() {
            if line.contains(RECOVERED_REQUESTS) {
                let n = log_field(line, "requests").and_then(|n| n.parse::<u64>().ok());
                r.requests = Some(r.requests.unwrap_or(0) + n.unwrap_or(0));
            } else if line.contains(RESUBMITTING) {
                r.resubmitted = true;
            } else if line.contains(RECOVERED_BITS) {
                let name = log_field(line, "path")
                    .and_then(|p| Path::new(p).file_name())
                    .map_or_else(|| "?".to_owned(), |n| n.to_string_lossy().into_owned());
                let bits = log_field(line, "bits").and_then(|n| n.parse().ok());
                r.bitmaps.push((name, bits.unwrap_or(0)));
            }
        }
        r
    }

    /// The new daemon found held requests and ran them again.
    fn resubmitted(&self) -> bool {
        self.requests.is_some_and(|n| n > 0) && self.resubmitted
    }
}

/// `LOOP <i> OK|BAD` results in console order.
fn loop_results(console: &str) -> Vec<(u32, bool)> {
    console
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            if words.next() != Some("LOOP") {
                return None;
            }
            let i = words.next()?.parse().ok()?;
            match words.next()? {
                "OK" => Some((i, true)),
                "BAD" => Some((i, false)),
                _ => None,
            }
        })
        .collect()
}

/// The highest loop iteration that reported a result.
fn last_iteration(console: &str) -> u32 {
    loop_results(console)
        .iter()
        .map(|&(i, _)| i)
        .max()
        .unwrap_or(0)
}

/// Console lines that show a guest I/O error.
fn io_error_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| IO_ERROR_MARKERS.iter().any(|m| l.contains(m)))
        .collect()
}

/// Waits for iteration `i`'s result line and panics with the context
/// unless it is `LOOP <i> OK` and the guest printed no I/O error so far.
fn expect_ok(setup: &Setup, guest: &RunningGuest, i: u32, what: &str) {
    let line = guest.wait_for(&format!("LOOP {i} "), ITERATION_TIMEOUT);
    let console = guest.console();
    assert_eq!(
        line.as_deref(),
        Some(format!("LOOP {i} OK").as_str()),
        "{what}: iteration {i} did not pass within {ITERATION_TIMEOUT:?} (the in-flight \
         region marks {:?} requests held now)\n{}",
        held_requests(guest.pid()),
        setup.context(&console)
    );
    let errors = io_error_lines(&console);
    assert!(
        errors.is_empty(),
        "{what}: the guest saw I/O errors: {errors:?}\n{}",
        setup.context(&console)
    );
}

/// One kill: where the guest and the migration were.
struct Round {
    /// The iteration running when the daemon died.
    killed_in: u32,
    /// Delay after that iteration started.
    delay: Duration,
    /// The daemon's guest write counter rose just before the kill.
    mid_write: bool,
    /// How the stop was aimed at held requests.
    aim: Aim,
    /// How long the daemon was stopped (SIGSTOP) before SIGKILL.
    frozen: Duration,
    /// Daemon threads stopped inside an I/O system call.
    busy: usize,
    /// Progress reported at least one checkpoint before the kill.
    durable: u64,
    /// Progress reported just before the kill (may be lost).
    live: u64,
    /// Progress the restarted daemon reported first.
    resumed: u64,
    /// Progress after the guest passed its iterations on the new daemon.
    after: u64,
    /// The last passed iteration after the restart.
    reached: u32,
    /// What the new daemon recovered.
    recovery: Recovery,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = |n: Option<usize>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
        write!(
            f,
            "stopped {:.0?} into iteration {}{} after {} stops ({} requests held at the \
             first, {} at the last) with {} threads in I/O calls, killed {:.0?} later; \
             the new daemon resubmitted {} requests{}, recovered journal bits: {:?}; \
             passed up to {}; bytes migrated: {} checkpointed, {} live, {} at restart, \
             {} after",
            self.delay,
            self.killed_in,
            if self.mid_write { " (mid-write)" } else { "" },
            self.aim.stops,
            held(self.aim.first),
            held(self.aim.held),
            self.busy,
            self.frozen,
            self.recovery.requests.unwrap_or(0),
            if self.recovery.resubmitted {
                ""
            } else {
                " (no resubmission logged)"
            },
            self.recovery.bitmaps,
            self.reached,
            self.durable,
            self.live,
            self.resumed,
            self.after
        )
    }
}

#[test]
fn guest_rides_out_daemon_kill_9() {
    let guest = require_guest!().with_kernel_args(&format!(
        "guestmode=loop guestiters=0 guestwriters={WRITERS}"
    ));
    let started = Instant::now();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let image_size = std::fs::metadata(&image).unwrap().len();
    add_filler(&image, dir.path(), seed);
    let (store, _) = store_with_backup(dir.path(), "guest", &image);
    std::fs::remove_file(&image).unwrap();
    let mut setup = Setup {
        target: dir.path().join("target.raw"),
        state: dir.path().join("state"),
        log: dir.path().join("daemon.log"),
        store,
        dir,
        starts: 0,
    };
    eprintln!(
        "reconnect: seed {seed}, image {image_size} bytes, copy rate {COPY_RATE}/s, \
         {WRITERS} guest writers"
    );

    let mut daemon = setup.start();
    let mut running = RunningGuest::spawn(guest.qemu_vhost_user_reconnect_cmd(&daemon.socket, &[]));
    assert!(
        running.wait_for("LOOP-READY", BOOT_TIMEOUT).is_some(),
        "guest did not reach its loop\n{}",
        setup.context(&running.console())
    );
    for i in 1..=2 {
        expect_ok(&setup, &running, i, "before any kill");
    }

    let mut rounds: Vec<Round> = Vec::new();
    for round in 1..=MAX_ROUNDS {
        if round > MIN_ROUNDS && rounds.iter().any(|r| r.recovery.resubmitted()) {
            break;
        }
        let what = format!("round {round}");
        let before = status(&setup.state);
        assert_eq!(
            before["state"], "migrating",
            "{what}: the migration must still run when the daemon dies: {before}"
        );
        let durable = num(&before, "bytes_migrated");
        // Progress reported before a checkpoint survives a kill: wait until
        // the checkpoint on disk covers it.
        let deadline = Instant::now() + CHECKPOINT_WAIT;
        while crate::util::persisted_bitmap(&setup.state.join("migrated.bitmap")).1 < durable {
            assert!(
                Instant::now() < deadline,
                "{what}: no checkpoint covers {durable} migrated bytes after {CHECKPOINT_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        // Kill while the guest writes: the next result line starts an
        // iteration (its writers' O_DIRECT writes and fsyncs, sync, the
        // O_DIRECT read-backs).
        let seen = last_iteration(&running.console());
        expect_ok(&setup, &running, seen + 1, &what);
        let killed_in = seen + 2;
        let (delay, mid_write, last) = wait_for_guest_writes(&setup, &mut rng);
        let live = num(&last, "bytes_migrated");
        // Freeze the daemon first, at a moment it holds requests: requests
        // the guest submits meanwhile stay outstanding, so the kill always
        // strands guest I/O. SIGKILL of a stopped process is the same crash
        // at the moment it stopped.
        let aim = stop_holding_requests(daemon.pid(), running.pid(), &mut rng);
        let frozen = Duration::from_millis(rng.gen_range(100..600));
        std::thread::sleep(frozen);
        let busy = threads_in_io(daemon.pid());
        daemon.kill();

        daemon = setup.start();
        let resumed = setup.migrated();
        assert!(
            resumed >= durable,
            "{what}: migration progress went back from {durable} (checkpointed) to \
             {resumed} bytes after the restart\n{}",
            setup.context(&running.console())
        );

        let reached = killed_in + ITERATIONS_AFTER_RESTART;
        for i in killed_in..=reached {
            let after_restart = format!(
                "{what}, after the restart (stopped after {} stops, {:?} requests held)",
                aim.stops, aim.held
            );
            expect_ok(&setup, &running, i, &after_restart);
        }
        let after = setup.migrated_beyond(resumed);
        let recovery = Recovery::from_log(&setup.start_log(setup.starts));
        let r = Round {
            killed_in,
            delay,
            mid_write,
            aim,
            frozen,
            busy,
            durable,
            live,
            resumed,
            after,
            reached,
            recovery,
        };
        assert!(
            after > resumed,
            "{what}: migration did not resume: {resumed} bytes at the restart, still \
             {after} {RESUME_WAIT:?} after iteration {reached} ({r})\n{}",
            setup.context(&running.console())
        );
        eprintln!("reconnect: {what}: {r}");
        rounds.push(r);
    }
    assert!(
        rounds.iter().any(|r| r.mid_write),
        "no kill landed while the guest was writing (no write within {WRITE_WAIT:?} \
         of an iteration's start)"
    );
    let resubmitted = rounds.iter().filter(|r| r.recovery.resubmitted()).count();
    assert!(
        resubmitted > 0,
        "in {} rounds no restarted daemon logged \"{RECOVERED_REQUESTS}\" and \
         \"{RESUBMITTING}\": no kill stranded a request the daemon held\n{}\n\
         --- daemon stderr ---\n{}---",
        rounds.len(),
        rounds
            .iter()
            .enumerate()
            .map(|(i, r)| format!("round {}: {r}\n", i + 1))
            .collect::<String>(),
        std::fs::read_to_string(&setup.log).unwrap_or_default()
    );
    eprintln!(
        "reconnect: {resubmitted} of {} restarts resubmitted held requests (first in \
         round {})",
        rounds.len(),
        rounds
            .iter()
            .position(|r| r.recovery.resubmitted())
            .map_or(0, |i| i + 1)
    );
    // Not asserted: a restart recovers journal bits only when the killed
    // daemon had set bits after its last bitmap sync. For overlay.bitmap
    // that takes a guest write to a block new to the overlay, acknowledged
    // and not yet flushed at the kill; the loop mostly rewrites blocks the
    // overlay holds already, and writes to migrated chunks go to the
    // target. For migrated.bitmap it takes a chunk copied since the last
    // checkpoint (1 s). Both happen in some rounds, not in every run.
    let journal = |name: &str| {
        rounds
            .iter()
            .filter(|r| r.recovery.bitmaps.iter().any(|(b, _)| b == name))
            .count()
    };
    eprintln!(
        "reconnect: restarts that recovered live journal bits: overlay.bitmap {}, \
         migrated.bitmap {}, guest-written.bitmap {} (of {})",
        journal("overlay.bitmap"),
        journal("migrated.bitmap"),
        journal("guest-written.bitmap"),
        rounds.len()
    );
    let migrating = status(&setup.state);
    assert_eq!(
        migrating["state"], "migrating",
        "the kills must all land during the migration: {migrating}"
    );

    running.send_line("stop");
    let out = running.finish(BOOT_TIMEOUT);
    let done = check_guest_output(&setup, &out, &rounds);

    // Finish the migration at full speed, then the target alone is the disk.
    let rate = recovery_cli()
        .args(["set-rate", "--control"])
        .arg(setup.state.join("control.sock"))
        .arg("unlimited")
        .output()
        .unwrap();
    assert!(rate.status.success(), "set-rate failed: {rate:?}");
    wait_complete(&setup.state);
    daemon.stop();
    check_target(&setup, &out, done, image_size);
    eprintln!("reconnect: passed in {:.1?}", started.elapsed());
}

/// Asserts the guest stopped cleanly with every iteration OK and no I/O
/// error; returns the number of iterations.
fn check_guest_output(setup: &Setup, out: &GuestOutput, rounds: &[Round]) -> u32 {
    let context = || format!("{out}\n{}", setup.context(&out.console));
    assert!(
        !out.timed_out && out.status.is_some_and(|s| s.success()) && out.guest_done(),
        "the guest did not stop and power off cleanly after \"stop\"\n{}",
        context()
    );
    let errors = io_error_lines(&out.console);
    assert!(
        errors.is_empty(),
        "the guest saw I/O errors: {errors:?}\n{}",
        context()
    );
    let done: u32 = out
        .value("LOOP-DONE")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no LOOP-DONE\n{}", context()));
    let results = loop_results(&out.console);
    let expected: Vec<(u32, bool)> = (1..=done).map(|i| (i, true)).collect();
    assert_eq!(
        results,
        expected,
        "every iteration must pass, in order\n{}",
        context()
    );
    let mut previous = 0;
    for r in rounds {
        assert!(
            r.reached > r.killed_in && r.killed_in > previous,
            "iterations did not go up across the restart: {r}"
        );
        previous = r.reached;
    }
    assert!(done >= previous, "LOOP-DONE {done} < {previous}");
    done
}

/// The completed target holds a clean file system whose `/loop.dat` and
/// `/loop-<k>.dat` are what the guest's last iteration wrote.
fn check_target(setup: &Setup, out: &GuestOutput, done: u32, image_size: u64) {
    let target = &setup.target;
    assert_eq!(std::fs::metadata(target).unwrap().len(), image_size);
    e2fsck(target).unwrap_or_else(|e| panic!("target after migration: {e}"));
    let scratch = setup.dir.path().join("loop.dat");
    for k in 1..=WRITERS {
        let (file, prefix) = match k {
            1 => ("/loop.dat".to_owned(), format!("LOOP-SUM {done} ")),
            k => {
                let file = format!("/loop-{k}.dat");
                let prefix = format!("LOOP-FILE-SUM {done} {file} ");
                (file, prefix)
            }
        };
        let want = out.value(&prefix).unwrap_or_else(|| {
            panic!(
                "no \"{prefix}\" line (guest cache older than \
                 scripts/build-guest.sh?)\n{out}"
            )
        });
        let (len, sum) = guest_file_digest(target, &file, &scratch)
            .unwrap_or_else(|| panic!("{file} missing on the target"));
        assert_eq!(len, LOOP_FILE_BYTES, "{file} size on the target");
        assert_eq!(
            sum, want,
            "{file} on the target is not what iteration {done} wrote"
        );
    }
}
