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
