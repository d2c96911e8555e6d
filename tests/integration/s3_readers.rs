//! gc on S3 while an instant boot reads (issue 16): a reader of a live
//! snapshot reads exact data throughout a gc that repacks, and a reader that
//! registers for a forgotten snapshot after gc's mark phase keeps that
//! snapshot and its chunks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use store::gc::GcPhase;
use store::{BackupOptions, GcOptions, RestoreOptions, Store};

use crate::s3::image;
use crate::s3::server::Moto;

#[test]
fn s3_gc_while_an_instant_boot_reads_and_a_reader_registers_mid_gc() {
    let moto = crate::require_moto!();
    let bucket = moto.bucket("gc-mid-reader");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let loc = format!("s3://{bucket}/p");
    let store =
        Store::init_location(&loc, 65536, &Moto::options(&moto.endpoint(), &d.join("c1"))).unwrap();
    let small_packs = BackupOptions {
        pack_size: Some(1 << 20),
        ..Default::default()
    };
    let (img_a, img_b) = (d.join("a.img"), d.join("b.img"));
    let (data_a, data_b) = (image(&img_a, 6, 21), image(&img_b, 6, 22));
    let sa = store.backup("a", &img_a, &small_packs).unwrap();
    let sb = store.backup("b", &img_b, &small_packs).unwrap();
    let (snap_a, snap_b) = (format!("a@{}", sa.snapshot), format!("b@{}", sb.snapshot));

    // Another process's view: an instant boot of b, reading all along.
    let booted =
        Store::open_location(&loc, &Moto::options(&moto.endpoint(), &d.join("c2"))).unwrap();
    let reader_b = booted.open_snapshot(&snap_b).unwrap();
    store.forget(&snap_a).unwrap();

    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let mut late = None;
    let gc = std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut buf = vec![0u8; data_b.len()];
            loop {
                let last = stop.load(Ordering::Acquire);
                reader_b.read_at(&mut buf, 0).unwrap();
                assert!(buf == data_b, "the instant boot read wrong data during gc");
                reads.fetch_add(1, Ordering::Relaxed);
                if last {
                    return;
                }
            }
        });
        // After the mark phase, an instant boot of a registers (as one that
        // resolved a just before it was forgotten would).
        let gc = store.gc_with(
            &GcOptions {
                repack_threshold: 0.0,
            },
            &mut |phase| {
                if phase == GcPhase::Marked {
                    late = booted.register_reader(&snap_a).unwrap();
                }
            },
        );
        stop.store(true, Ordering::Release);
        t.join().unwrap();
        gc.unwrap()
    });
    assert!(late.is_some(), "no reader registered mid-gc");
    assert!(reads.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        (gc.manifests_in_use, gc.manifests_deleted),
        (1, 0),
        "{gc:?}"
    );
    assert!(gc.packs_kept_for_readers > 0, "{gc:?}");

    // a is whole: back from forgotten, it restores exactly.
    store.unforget(&snap_a).unwrap();
    let out = d.join("a.out");
    store
        .restore(&snap_a, &out, &RestoreOptions::default())
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == data_a,
        "a lost chunks to gc"
    );
    assert!(store.verify(None, &Default::default()).unwrap().is_ok());

    // The late reader gone, the next gc reclaims a; b still reads exactly.
    store.forget(&snap_a).unwrap();
    drop(late);
    let gc = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(gc.manifests_deleted, 1, "{gc:?}");
    assert!(gc.bytes_freed > 0, "{gc:?}");
    let mut buf = vec![0u8; data_b.len()];
    reader_b.read_at(&mut buf, 0).unwrap();
    assert!(buf == data_b, "b differs after gc");
}
