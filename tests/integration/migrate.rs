//! Migration to a target while the guest runs: `instant-boot --target`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::blkio_client::Client;
use crate::boot::{store_with_backup, BootDaemon};
use crate::guest::{e2fsck, read_guest_file, require_guest, run_to_completion, BOOT_TIMEOUT};
use crate::util::recovery_cli;

const MIB: usize = 1 << 20;

/// `recovery-cli status --json` of the daemon whose state dir is `state`.
pub(crate) fn status(state: &Path) -> serde_json::Value {
    let out = recovery_cli()
        .args(["status", "--json", "--control"])
        .arg(state.join("control.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "status failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

pub(crate) fn num(status: &serde_json::Value, field: &str) -> u64 {
    status[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {status}"))
}

/// An image of random data with zero runs and repeated chunks.
fn test_image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut image = vec![0u8; len];
    rng.fill_bytes(&mut image);
    for _ in 0..8 {
        let start = rng.gen_range(0..len - MIB);
        let zeroes = rng.gen_range(1..MIB);
        image[start..start + zeroes].fill(0);
    }
    let (head, tail) = image.split_at_mut(len / 2);
    tail[..MIB].copy_from_slice(&head[..MIB]);
    image
}

/// Random guest I/O against the device and the model. Every request
/// returns success; the model records what the guest was acknowledged.
fn random_io(client: &mut Client, model: &mut [u8], rng: &mut impl Rng, ops: usize) {
    let size = model.len() as u64;
    for _ in 0..ops {
        let sectors = rng.gen_range(1..=128u64);
        let len = sectors * 512;
        let offset = rng.gen_range(0..(size - len) / 512) * 512;
        let range = offset as usize..(offset + len) as usize;
        match rng.gen_range(0..10) {
            0 => {
                client.discard(offset, len).unwrap();
                model[range].fill(0);
            }
            1 => {
                client.write_zeroes(offset, len).unwrap();
                model[range].fill(0);
            }
            2 => {
                let got = client.read(offset, len as usize).unwrap();
                assert!(
                    got == model[range],
                    "read at {offset} differs from the model"
                );
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                client.write(offset, &data).unwrap();
                model[range].copy_from_slice(&data);
            }
        }
    }
}

/// Polls the daemon until its migration is complete (2 minutes at most).
pub(crate) fn wait_complete(state: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(state)["state"] != "complete" {
        assert!(Instant::now() < deadline, "migration did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_target_equals(target: &Path, model: &[u8]) {
    let got = std::fs::read(target).unwrap();
    assert_eq!(got.len(), model.len(), "target size");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("target differs from the model at byte {i}");
    }
}

/// A store holding one backup `vm` of a test image, and the paths a
/// migrating daemon uses, all in one temp dir.
struct Fixture {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    store: PathBuf,
    target: PathBuf,
    state: PathBuf,
}

impl Fixture {
    fn new(size: usize, seed: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let image = test_image(size, seed);
        let image_path = dir.path().join("disk.img");
        std::fs::write(&image_path, &image).unwrap();
        let (store, _) = store_with_backup(dir.path(), "vm", &image_path);
        Fixture {
            target: dir.path().join("target.raw"),
            state: dir.path().join("state"),
            store,
            image,
            dir,
        }
    }

    /// Starts `instant-boot --target` with `args` before `--target`.
    fn daemon(&self, args: &[&str]) -> BootDaemon {
        let mut all = args.to_vec();
        all.push("--target");
        BootDaemon::start(&self.store, "vm", self.dir.path(), &all, Some(&self.target))
    }
}

#[test]
fn guest_writes_during_migration_all_reach_the_target() {
    let f = Fixture::new(24 * MIB, 1);
    let (image, target, state) = (&f.image, &f.target, &f.state);
    let daemon = f.daemon(&["--queues", "1", "--copy-rate", "6M"]);
    let mut client = Client::connect(&daemon.socket, 64 * 1024);
    assert_eq!(client.capacity(), image.len() as u64);
    let mut model = image.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);

    let mut last = status(state);
    let mut saw_migrating = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        random_io(&mut client, &mut model, &mut rng, 40);
        client.flush().unwrap();
        let now = status(state);
        for field in ["bytes_migrated", "chunks_migrated", "guest_write_ops"] {
            assert!(num(&now, field) >= num(&last, field), "{field} went back");
        }
        saw_migrating |= now["state"] == "migrating";
        last = now;
        if last["state"] == "complete" {
            break;
        }
        assert_ne!(last["state"], "failed", "{last}");
        assert!(
            Instant::now() < deadline,
            "migration did not finish: {last}"
        );
    }
    assert!(saw_migrating, "the guest never wrote during the migration");
    assert_eq!(num(&last, "bytes_migrated"), image.len() as u64);
    assert_eq!(num(&last, "chunks_migrated"), num(&last, "chunks_total"));
    assert_eq!(num(&last, "overlay_bytes"), 0);
    assert!(num(&last, "bytes_copied_on_read") > 0, "{last}");
    // Every guest request was timed, under its own type.
    let latency = &last["guest_latency"];
    for (op, ops) in [("write", "guest_write_ops"), ("flush", "guest_flush_ops")] {
        assert_eq!(latency[op]["count"], last[ops], "{op}: {latency}");
        let (p50, p99) = (&latency[op]["p50_us"], &latency[op]["p99_us"]);
        assert!(
            p50.as_f64() > Some(0.0) && p99.as_f64() >= p50.as_f64(),
            "{op}: {latency}"
        );
    }

    // After completion, I/O passes straight to the target.
    random_io(&mut client, &mut model, &mut rng, 40);
    client.flush().unwrap();
    drop(client);
    daemon.stop();
    assert_target_equals(target, &model);
    assert!(!state.join("overlay.data").exists(), "overlay not freed");
}

#[test]
fn killed_daemon_resumes_migration_and_keeps_flushed_writes() {
    let f = Fixture::new(24 * MIB, 3);
    let (image, target, state) = (&f.image, &f.target, &f.state);
    let args = ["--queues", "1", "--copy-rate", "4M"];

    let mut model = image.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut durable_floor = 0;
    for round in 0..4 {
        let daemon = f.daemon(&args);
        let start = status(state);
        assert!(
            num(&start, "chunks_migrated") >= durable_floor,
            "round {round}: progress went back from {durable_floor} to {start}"
        );
        if round > 0 {
            assert!(num(&start, "chunks_migrated") > 0, "resumed from zero");
        }
        let mut client = Client::connect(&daemon.socket, 64 * 1024);
        // Everything before this point is flushed: the model is exact.
        let wait = Duration::from_millis(rng.gen_range(300..1500));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            random_io(&mut client, &mut model, &mut rng, 10);
            client.flush().unwrap();
        }
        // Bits set before a checkpoint survive a kill: wait until the
        // checkpoint on disk holds what the status reported, then kill.
        durable_floor = num(&status(state), "chunks_migrated");
        let deadline = Instant::now() + Duration::from_secs(60);
        while crate::util::persisted_bitmap(&state.join("migrated.bitmap")).0 < durable_floor
            && status(state)["state"] != "complete"
        {
            assert!(
                Instant::now() < deadline,
                "no checkpoint holds {durable_floor} migrated chunks after 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if status(state)["state"] == "complete" {
            drop(client);
            daemon.stop();
            break;
        }
        daemon.kill();
    }

    // A last run finishes the migration.
    let daemon = f.daemon(&args);
    assert!(num(&status(state), "chunks_migrated") >= durable_floor);
    let mut client = Client::connect(&daemon.socket, 64 * 1024);
    let got = client.read(0, 64 * 1024).unwrap();
    assert!(got == model[..64 * 1024], "flushed data lost after kill -9");
    let out = recovery_cli()
        .args(["set-rate", "--control"])
        .arg(state.join("control.sock"))
        .arg("unlimited")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_complete(state);
    drop(client);
    daemon.stop();
    assert_target_equals(target, &model);
}

#[test]
fn status_watch_draws_a_progress_bar_until_complete() {
    let f = Fixture::new(8 * MIB, 5);
    let (image, target, state) = (&f.image, &f.target, &f.state);
    let daemon = f.daemon(&["--copy-rate", "4M"]);
    let pause = recovery_cli()
        .args(["pause", "--control"])
        .arg(state.join("control.sock"))
        .output()
        .unwrap();
    assert!(pause.status.success(), "{pause:?}");
    assert_eq!(status(state)["state"], "paused");
    let resume = recovery_cli()
        .args(["resume", "--control"])
        .arg(state.join("control.sock"))
        .output()
        .unwrap();
    assert!(resume.status.success(), "{resume:?}");

    // `script` gives the watcher a terminal, as a user would have.
    let cli = crate::util::recovery_cli_path();
    let watch = format!(
        "{} status --watch --interval 200ms --control {}",
        cli.display(),
        state.join("control.sock").display()
    );
    let out = Command::new("script")
        .args(["-qec", &watch, "/dev/null"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "watch failed: {screen}");
    assert!(screen.contains('%'), "no percentage drawn: {screen}");
    assert!(screen.contains("100"), "never reached 100%: {screen}");
    assert!(screen.contains("complete"), "{screen}");
    assert_eq!(status(state)["state"], "complete");
    daemon.stop();
    assert_target_equals(target, image);
}

#[test]
fn migrated_target_boots_on_its_own() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let (store, _) = store_with_backup(dir.path(), "guest", &image);
    std::fs::remove_file(&image).unwrap();
    let target = dir.path().join("target.raw");

    // Boot from the store while the disk migrates.
    let daemon = BootDaemon::start(
        &store,
        "guest",
        dir.path(),
        &["--queues", "1", "--target"],
        Some(&target),
    );
    let first = run_to_completion(guest.qemu_vhost_user_cmd(&daemon.socket, &[]), BOOT_TIMEOUT);
    first.assert_clean_boot();
    assert_eq!(first.wrote_boot(), Some("boot-1.txt"), "{first}");
    let state = dir.path().join("state");
    wait_complete(&state);
    daemon.stop();

    // The target alone is the disk now: a plain raw file boots.
    e2fsck(&target).unwrap();
    assert!(read_guest_file(&target, "/boot-1.txt").is_some());
    let second = run_to_completion(guest.qemu_file_cmd(&target), BOOT_TIMEOUT);
    second.assert_clean_boot();
    assert_eq!(second.saw_boots(), ["boot-1.txt"], "{second}");
    assert_eq!(second.wrote_boot(), Some("boot-2.txt"), "{second}");
    e2fsck(&target).unwrap();
}
