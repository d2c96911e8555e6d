//! The store on S3 (issue 16): every store operation against a real local
//! S3 server (moto), the lease locks, gc against a registered reader, and
//! faults through a loopback proxy.

pub mod proxy;
pub mod server;

use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};
use store::lock::{self, WriterLock};
use store::{
    BackupOptions, ErrorKind, GcOptions, OpenOptions, RestoreOptions, Store, VerifyOptions,
};

use server::Moto;

/// A test image: random 64 KiB blocks with zero runs, `mib` MiB.
pub fn image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; mib << 20];
    for (i, block) in data.chunks_mut(64 << 10).enumerate() {
        if i % 5 != 3 {
            rng.fill(block);
        }
    }
    fs::write(path, &data).unwrap();
    data
}

fn opts(m: &Moto, dir: &Path) -> OpenOptions {
    Moto::options(&m.endpoint(), &dir.join("cache"))
}

fn restore_bytes(store: &Store, snap: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("restored-{}", rand::random::<u32>()));
    store
        .restore(snap, &out, &RestoreOptions::default())
        .unwrap();
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

#[test]
fn s3_backup_restore_verify_forget_gc() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("store-ops");
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("s3://{bucket}/stores/one");
    let o = opts(&moto, dir.path());
    let store = Store::init_location(&loc, 65536, &o).unwrap();
    assert_eq!(store.location(), loc);
    assert!(store.is_remote());
    let e = Store::init_location(&loc, 65536, &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // 20 MiB: the first pack is uploaded in parts.
    let img = dir.path().join("disk.img");
    let v1 = image(&img, 20, 1);
    let s1 = store.backup("vm", &img, &BackupOptions::default()).unwrap();
    let mut v2 = v1.clone();
    v2[5 << 20..6 << 20].fill(7);
    fs::write(&img, &v2).unwrap();
    let small = BackupOptions {
        pack_size: Some(1 << 20),
        ..Default::default()
    };
    let s2 = store.backup("vm", &img, &small).unwrap();
    assert_eq!(store.snapshots(Some("vm")).unwrap().len(), 2);

    // A fresh process (fresh cache) sees the same store.
    let o2 = Moto::options(&moto.endpoint(), &dir.path().join("cache2"));
    let again = Store::open_location(&loc, &o2).unwrap();
    assert_eq!(again.snapshots(None).unwrap().len(), 2);
    assert!(restore_bytes(&again, &format!("vm@{}", s1.snapshot), dir.path()) == v1);
    assert!(restore_bytes(&again, &format!("vm@{}", s2.snapshot), dir.path()) == v2);
    let report = again.verify(None, &VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report:?}");

    // forget + gc frees the first snapshot's own chunks, keeps the second.
    store.forget(&format!("vm@{}", s1.snapshot)).unwrap();
    let repack_all = GcOptions {
        repack_threshold: 0.01,
    };
    let gc = store.gc(&repack_all).unwrap();
    assert_eq!(gc.manifests_deleted, 1, "{gc:?}");
    assert!(gc.bytes_freed > 0 && gc.packs_repacked > 0, "{gc:?}");
    let again = Store::open_location(&loc, &o2).unwrap();
    assert_eq!(again.snapshots(None).unwrap().len(), 1);
    assert!(restore_bytes(&again, &format!("vm@{}", s2.snapshot), dir.path()) == v2);
    assert!(again
        .verify(None, &VerifyOptions::default())
        .unwrap()
        .is_ok());

    // Not a store / bad locations are one clear error.
    let e = Store::open_location(&format!("s3://{bucket}/nothing"), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAStore, "{e}");
    let e = Store::open_location("s3://No_Such", &o).unwrap_err();
    assert!(e.to_string().contains("Invalid S3 location"), "{e}");
}

#[test]
fn s3_second_writer_gets_lock_error_and_stale_lock_is_breakable() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("store-lock");
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("s3://{bucket}");
    let o = opts(&moto, dir.path());
    let store = Store::init_location(&loc, 65536, &o).unwrap();
    let img = dir.path().join("disk.img");
    image(&img, 1, 2);

    // Another writer (another Store, as another host would have) holds it.
    let other = Store::open_location(&loc, &o).unwrap();
    let held = WriterLock::acquire_remote(other.raw_backend().clone()).unwrap();
    let e = store
        .backup("vm", &img, &BackupOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("locked by PID {}", std::process::id()))
            && msg.contains("lease renewed"),
        "{msg}"
    );
    // A fresh lease is not broken without force.
    assert_eq!(
        store.break_lock(false).unwrap_err().kind(),
        ErrorKind::Locked
    );
    drop(held);
    store.backup("vm", &img, &BackupOptions::default()).unwrap();

    // A dead writer's lock: a lease of 3 s nobody refreshes.
    let body =
        br#"{"kind":"writer","host":"gone-host","pid":4242,"lease_secs":3,"started_unix":0}"#;
    store
        .raw_backend()
        .create_new(lock::WRITER_KEY, body)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let msg = loop {
        let e = store
            .backup("vm", &img, &BackupOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
        if e.to_string().contains("expired") {
            break e.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lease never expired: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        msg.contains("PID 4242 on gone-host") && msg.contains("break-lock"),
        "{msg}"
    );
    let broken = store.break_lock(false).unwrap().unwrap();
    assert_eq!(broken.body.unwrap().pid, 4242);
    store.backup("vm", &img, &BackupOptions::default()).unwrap();
    assert!(store.break_lock(false).unwrap().is_none());
}

#[test]
fn s3_gc_keeps_what_a_registered_reader_reads() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("store-readers");
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("s3://{bucket}/p");
    let o = opts(&moto, dir.path());
    let store = Store::init_location(&loc, 65536, &o).unwrap();
    let img = dir.path().join("disk.img");
    let data = image(&img, 4, 3);
    let s = store.backup("vm", &img, &BackupOptions::default()).unwrap();
    let snap = format!("vm@{}", s.snapshot);

    // An instant boot reads the snapshot from another process's view.
    let booted = Store::open_location(&loc, &o).unwrap();
    let reader = booted.open_snapshot(&snap).unwrap();
    assert_eq!(store.remote_readers().unwrap(), vec![snap.clone()]);
    store.forget_with(&snap, true).unwrap();
    let gc = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        (gc.manifests_in_use, gc.manifests_deleted),
        (1, 0),
        "{gc:?}"
    );
    assert_eq!(gc.bytes_freed, 0, "{gc:?}");
    let mut buf = vec![0u8; data.len()];
    reader.read_at(&mut buf, 0).unwrap();
    assert!(buf == data, "the reader read wrong data after gc");

    // The reader is gone: the next gc reclaims everything.
    drop(reader);
    assert!(store.remote_readers().unwrap().is_empty());
    let gc = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(gc.manifests_deleted, 1, "{gc:?}");
    assert!(gc.bytes_freed > 0, "{gc:?}");
}

fn cli(endpoint: &str, cache: &Path, args: &[&str]) -> std::process::Command {
    let mut c = crate::util::recovery_cli();
    Moto::env(&mut c, endpoint, cache);
    c.args(args);
    c
}

fn cli_json(endpoint: &str, cache: &Path, args: &[&str]) -> serde_json::Value {
    let out = cli(endpoint, cache, args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// True once a pack and its index were published in local store `dir`.
pub(crate) fn any_indexed_pack(dir: &Path) -> bool {
    fs::read_dir(dir.join("index"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "idx"))
}

/// `init`/`backup`/`snapshots`/`restore` on `s3://`, and `copy` local → S3
/// → local, the last one killed after its first pack and resumed.
#[test]
fn s3_cli_copy_local_s3_local_interrupted_and_resumed() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("cli-copy");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("cache");
    let ep = moto.endpoint();
    let (local, back) = (d.join("local"), d.join("back"));
    let (local, back) = (local.to_str().unwrap(), back.to_str().unwrap());
    let s3 = format!("s3://{bucket}/offsite");
    let img = d.join("disk.img");
    // More than one batch of the copy (1024 chunks): its first pack is
    // published, with its index, while the second batch is still fetched.
    let data = image(&img, 80, 4);
    let img_s = img.to_str().unwrap();

    cli_json(&ep, &cache, &["init", local, "--json"]);
    cli_json(&ep, &cache, &["init", &s3, "--json"]);
    let b = cli_json(
        &ep,
        &cache,
        &["backup", "--store", local, "--name", "vm", img_s, "--json"],
    );
    let snap = b["snapshot"].as_str().unwrap().to_string();
    let id = snap.split_once('@').unwrap().1.to_string();

    // Local → S3, then again: nothing left to send.
    let c = cli_json(
        &ep,
        &cache,
        &["copy", "--from", local, "--to", &s3, "--json"],
    );
    assert_eq!(c["snapshots_copied"], 1, "{c}");
    assert!(c["chunks_sent"].as_u64().unwrap() > 0, "{c}");
    let c = cli_json(
        &ep,
        &cache,
        &["copy", "--from", local, "--to", &s3, "--json"],
    );
    assert_eq!(
        (c["snapshots_skipped"].as_u64(), c["chunks_sent"].as_u64()),
        (Some(1), Some(0)),
        "{c}"
    );
    let list = cli_json(&ep, &cache, &["snapshots", "--store", &s3, "--json"]);
    assert!(list.to_string().contains(&id), "{list}");
    let out = d.join("from-s3.img");
    cli_json(
        &ep,
        &cache,
        &[
            "restore",
            "--store",
            &s3,
            &snap,
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(fs::read(&out).unwrap() == data, "restore from S3 differs");

    // S3 → local through a slow link, killed once its first pack and its
    // index landed (a pack without its index is not there yet).
    cli_json(&ep, &cache, &["init", back, "--json"]);
    let proxy = proxy::Proxy::start(moto.port());
    proxy.set(proxy::Faults {
        delay: std::time::Duration::from_millis(100),
        ..Default::default()
    });
    let mut child = cli(
        &proxy.endpoint(),
        &cache,
        &["copy", "--from", &s3, "--to", back, "--json"],
    )
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !any_indexed_pack(Path::new(back)) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "copy ended before its first pack"
        );
        assert!(std::time::Instant::now() < deadline, "no pack after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let list = cli_json(&ep, &cache, &["snapshots", "--store", back, "--json"]);
    assert!(
        !list.to_string().contains(&id),
        "half-copied snapshot visible: {list}"
    );
    let c = cli_json(
        &ep,
        &cache,
        &["copy", "--from", &s3, "--to", back, "--json"],
    );
    assert_eq!(c["snapshots_copied"], 1, "{c}");
    assert!(
        c["chunks_present"].as_u64().unwrap() > 0,
        "resumed copy resent everything: {c}"
    );
    let out = d.join("back.img");
    cli_json(
        &ep,
        &cache,
        &[
            "restore",
            "--store",
            back,
            &snap,
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(
        fs::read(&out).unwrap() == data,
        "restore after copy back differs"
    );
}

/// 503s and dropped connections are retried; a slow endpoint past the
/// operation timeout is a bounded error, and the store works again after.
#[test]
fn s3_faults_5xx_drops_and_slow_responses() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("faults");
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy::Proxy::start(moto.port());
    let mut o = Moto::options(&proxy.endpoint(), &dir.path().join("cache"));
    o.io_timeout = Some(std::time::Duration::from_secs(4));
    let loc = format!("s3://{bucket}");
    let store = Store::init_location(&loc, 65536, &o).unwrap();
    let img = dir.path().join("disk.img");
    let data = image(&img, 3, 5);

    proxy.set(proxy::Faults {
        fail_5xx: 3,
        drop: 2,
        ..Default::default()
    });
    let s = store.backup("vm", &img, &BackupOptions::default()).unwrap();
    assert_eq!(proxy.injected(), 5);
    let snap = format!("vm@{}", s.snapshot);
    assert!(restore_bytes(&store, &snap, dir.path()) == data);

    // Slower than the operation timeout: an error, not a hang (with no
    // disk cache, which kept the chunks the restore read).
    let o = OpenOptions {
        disk_cache_bytes: Some(0),
        ..o
    };
    let reader = Store::open_location(&loc, &o)
        .unwrap()
        .open_snapshot(&snap)
        .unwrap();
    proxy.set(proxy::Faults {
        delay: std::time::Duration::from_secs(30),
        ..Default::default()
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let _ = tx.send(reader.read_at(&mut buf, 0).map_err(|e| format!("{e:?}")));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("a read through a stalled endpoint hung");
    let e = r.unwrap_err();
    assert!(e.contains("timed out"), "{e}");

    // The endpoint recovers: so does the store.
    proxy.set(proxy::Faults::default());
    assert!(restore_bytes(&store, &snap, dir.path()) == data);
}

/// The S3 server dies mid-backup: the backup fails (bounded), nothing is
/// half-published, and once the endpoint is back the retried backup works.
#[test]
fn s3_server_gone_mid_backup_publishes_nothing_and_retry_works() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("gone");
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy::Proxy::start(moto.port());
    let mut o = Moto::options(&proxy.endpoint(), &dir.path().join("cache"));
    o.io_timeout = Some(std::time::Duration::from_secs(5));
    let loc = format!("s3://{bucket}");
    let store = Store::init_location(&loc, 65536, &o).unwrap();
    let img = dir.path().join("disk.img");
    let data = image(&img, 8, 6);
    let small = BackupOptions {
        pack_size: Some(1 << 20),
        threads: Some(2),
        ..Default::default()
    };

    // Gone after a few packs went up.
    let before = proxy.requests();
    let p = &proxy;
    let r = std::thread::scope(|sc| {
        let h = sc.spawn(|| store.backup("vm", &img, &small));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while p.requests() < before + 8 && !h.is_finished() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        p.set(proxy::Faults {
            down: true,
            ..Default::default()
        });
        h.join().unwrap()
    });
    assert!(r.is_err(), "backup succeeded with the server gone");
    proxy.set(proxy::Faults::default());
    let fresh = Store::open_location(&loc, &o).unwrap();
    assert!(
        fresh.snapshots(None).unwrap().is_empty(),
        "half-published snapshot"
    );
    let s = fresh.backup("vm", &img, &small).unwrap();
    assert!(fresh
        .verify(None, &VerifyOptions::default())
        .unwrap()
        .is_ok());
    assert!(restore_bytes(&fresh, &format!("vm@{}", s.snapshot), dir.path()) == data);

    // A real kill of the server: a bounded error, never a hang.
    drop(proxy);
    let mut moto = moto;
    let direct = Moto::options(&moto.endpoint(), &dir.path().join("cache3"));
    let mut direct = direct;
    direct.io_timeout = Some(std::time::Duration::from_secs(5));
    let store = Store::open_location(&loc, &direct).unwrap();
    moto.kill();
    let e = store.backup("vm2", &img, &small).unwrap_err();
    assert!(!e.to_string().is_empty());
}

/// The QEMU test guest boots straight from an S3 store (instant boot:
/// chunks come through ranged GETs as the guest reads them).
#[test]
fn s3_guest_boots_from_an_s3_store() {
    let guest = crate::guest::require_guest!();
    let moto = crate::require_moto!();
    let bucket = moto.bucket("boot");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("cache");
    let ep = moto.endpoint();
    let image = guest.copy_root(d);
    let (local, id) = crate::boot::store_with_backup(d, "guest", &image);
    let s3 = format!("s3://{bucket}/boot");
    cli_json(&ep, &cache, &["init", &s3, "--json"]);
    let local = local.to_str().unwrap();
    cli_json(
        &ep,
        &cache,
        &["copy", "--from", local, "--to", &s3, "--json"],
    );

    let cache_s = cache.to_str().unwrap();
    let env = [
        ("AWS_ENDPOINT_URL", ep.as_str()),
        ("AWS_ACCESS_KEY_ID", server::KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", server::SECRET),
        ("AWS_REGION", "us-east-1"),
        ("RECOVERY_CACHE_DIR", cache_s),
    ];
    let log = d.join("daemon.log");
    let daemon = crate::boot::BootDaemon::start_logged(
        Path::new(&s3),
        "guest",
        d,
        &["--queues", "1"],
        None,
        &log,
        &env,
    );
    assert_eq!(daemon.ready["snapshot"], format!("guest@{id}"));
    let run = crate::guest::run_to_completion(
        guest.qemu_vhost_user_cmd(&daemon.socket, &[]),
        crate::guest::BOOT_TIMEOUT,
    );
    run.assert_clean_boot();
    assert_eq!(run.wrote_boot(), Some("boot-1.txt"), "{run}");
    daemon.stop();
}

/// Reads of 64 KiB at each offset of `offsets` through `reader`.
fn read_chunks(reader: &store::SnapshotReader, offsets: &[u64]) -> store::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    for &at in offsets {
        reader.read_at(&mut buf, at)?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// A bucket `name` holding a store with one backup of a 4 MiB image:
/// the location, the snapshot and the image.
fn backed_up(moto: &Moto, name: &str, d: &Path, seed: u64) -> (String, String, Vec<u8>) {
    let loc = format!("s3://{}", moto.bucket(name));
    let store = Store::init_location(&loc, 65536, &opts(moto, d)).unwrap();
    let img = d.join("disk.img");
    let data = image(&img, 4, seed);
    let s = store.backup("vm", &img, &BackupOptions::default()).unwrap();
    (loc, format!("vm@{}", s.snapshot), data)
}

/// The on-disk chunk cache: a second open of the same snapshot reads what
/// the first one fetched with the endpoint down; a torn cache entry is
/// never served (an error while the endpoint is down, the right bytes once
/// it is back).
#[test]
fn s3_disk_cache_serves_a_second_boot_with_the_endpoint_down() {
    let moto = crate::require_moto!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (loc, snap, data) = backed_up(&moto, "disk-cache", d, 11);

    let proxy = proxy::Proxy::start(moto.port());
    let cache = d.join("boot-cache");
    let o = OpenOptions {
        io_timeout: Some(std::time::Duration::from_secs(3)),
        disk_cache_bytes: Some(64 << 20),
        ..Moto::options(&proxy.endpoint(), &cache)
    };
    // Backwards: random reads (no readahead), as a booting guest's.
    let offsets: Vec<u64> = (0..64u64).rev().map(|i| i * 65536).collect();
    let expected: Vec<u8> = offsets
        .iter()
        .flat_map(|&at| data[at as usize..at as usize + 65536].to_vec())
        .collect();
    let first = Store::open_location(&loc, &o).unwrap();
    let reader = first.open_snapshot(&snap).unwrap();
    assert!(read_chunks(&reader, &offsets).unwrap() == expected);
    drop((reader, first));

    // A second boot: opened while the endpoint answers, then it is gone.
    let second = Store::open_location(&loc, &o).unwrap();
    let reader = second.open_snapshot(&snap).unwrap();
    proxy.set(proxy::Faults {
        down: true,
        ..Default::default()
    });
    let before = proxy.requests();
    assert!(read_chunks(&reader, &offsets).unwrap() == expected);
    let stats = second.raw_backend().remote_stats().unwrap();
    let dc = stats.disk_cache.unwrap();
    assert!(dc.hits > 0 && dc.bytes > 0, "{stats:?}");
    // Zero chunks are not fetched at all; the others came from disk.
    assert_eq!(proxy.requests(), before, "{stats:?}");

    // Torn entries (a crash mid-write): never served.
    let mut torn = 0;
    for sub in fs::read_dir(cache.join("chunks")).unwrap().flatten() {
        for e in fs::read_dir(sub.path()).unwrap().flatten() {
            let len = e.metadata().unwrap().len();
            fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .unwrap()
                .set_len(len / 2)
                .unwrap();
            torn += 1;
        }
    }
    assert!(torn > 0);
    proxy.set(proxy::Faults::default());
    let third = Store::open_location(&loc, &o).unwrap();
    let reader = third.open_snapshot(&snap).unwrap();
    proxy.set(proxy::Faults {
        down: true,
        ..Default::default()
    });
    let e = read_chunks(&reader, &offsets).unwrap_err();
    assert!(format!("{e:?}").contains("S3 GET"), "{e:?}");
    proxy.set(proxy::Faults::default());
    assert!(read_chunks(&reader, &offsets).unwrap() == expected);
    let dc = third
        .raw_backend()
        .remote_stats()
        .unwrap()
        .disk_cache
        .unwrap();
    assert!(dc.damaged > 0, "{dc:?}");
}

/// A daemon on an S3 store whose endpoint dies: the guest's read of a
/// chunk not cached fails with an I/O error after about the retry time
/// (`--store-retry-time`), never hangs; status reports the retry time,
/// the errors and the last one; once the endpoint is back, reads work.
#[test]
fn s3_daemon_read_fails_after_the_retry_time_and_recovers() {
    let moto = crate::require_moto!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (loc, snap, data) = backed_up(&moto, "retry-time", d, 12);

    let proxy = proxy::Proxy::start(moto.port());
    let ep = proxy.endpoint();
    let cache = d.join("daemon-cache");
    let env = [
        ("AWS_ENDPOINT_URL", ep.as_str()),
        ("AWS_ACCESS_KEY_ID", server::KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", server::SECRET),
        ("AWS_REGION", "us-east-1"),
        ("RECOVERY_CACHE_DIR", cache.to_str().unwrap()),
    ];
    let log = d.join("daemon.log");
    let daemon = crate::boot::BootDaemon::start_logged(
        Path::new(&loc),
        &snap,
        d,
        &[
            "--queues",
            "1",
            "--store-retry-time",
            "3s",
            "--disk-cache-size",
            "0",
        ],
        None,
        &log,
        &env,
    );
    let show_log = || fs::read_to_string(&log).unwrap_or_default();
    let mut client = crate::blkio_client::Client::connect(&daemon.socket, 1 << 20);
    let chunk = |at: usize| data[at..at + 65536].to_vec();
    assert!(client.read(0, 65536).unwrap() == chunk(0));
    let status = crate::migrate::status(&d.join("state"));
    let remote = &status["remote_store"];
    assert_eq!(remote["location"], loc.as_str(), "{status}");
    assert_eq!(remote["retry_time_seconds"], 3.0, "{status}");
    assert_eq!(remote["request_errors"], 0, "{status}");

    proxy.set(proxy::Faults {
        down: true,
        ..Default::default()
    });
    let at = 2 << 20;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = client.read(at as u64, 65536);
        let _ = tx.send((r.map(|_| ()), client));
    });
    let (r, mut client) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("a guest read hung on a dead endpoint\n{}", show_log()));
    assert!(r.is_err(), "read succeeded with the endpoint down");
    let status = crate::migrate::status(&d.join("state"));
    let remote = &status["remote_store"];
    assert!(remote["request_errors"].as_u64().unwrap() > 0, "{status}");
    assert!(
        remote["failed_operations"].as_u64().unwrap() > 0,
        "{status}"
    );
    let last = remote["last_error"].as_str().unwrap_or_default();
    assert!(
        last.starts_with("S3 ") && last.contains("/packs/"),
        "{status}"
    );
    assert!(
        remote["last_error_unix"].as_f64().unwrap() > 1.6e9,
        "{status}"
    );
    assert!(status["guest_io_errors"].as_u64().unwrap() > 0, "{status}");

    // The endpoint is back: the same read works.
    proxy.set(proxy::Faults::default());
    let again = client.read(at as u64, 65536);
    assert!(
        again.as_ref().ok() == Some(&chunk(at)),
        "{again:?}\n{}",
        show_log()
    );
    drop(client);
    daemon.stop();
}
