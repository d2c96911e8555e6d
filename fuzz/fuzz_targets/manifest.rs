//! Fuzzes the snapshot manifest decoder (`store::snapshot::manifest`) and
//! the snapshot reader built on it.
//!
//! Input: a flags byte, then the manifest file. The file is decoded as
//! given, then (flag bit 0) again with its header hash and trailer
//! recomputed, so the fuzzer gets past the checksums to the field checks,
//! the metadata JSON and the entries. With flag bit 1 a sealed manifest that
//! decodes is also published into a real store and read through
//! `Store::open_snapshot` / `SnapshotReader`.
//!
//! Checked: nothing panics; an accepted header is self-consistent (file
//! length, chunk count); every error is `Corrupt` or, for a file too short
//! to hold its header, `Io`; a reader returns only zeros for zero chunks
//! and never data for a chunk the store does not hold.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use instant_recovery_fuzz::{seal_manifest, MemObject};
use libfuzzer_sys::fuzz_target;
use store::backend::Object;
use store::snapshot::manifest::{
    chunk_count, decode_entry, read_header, verify_trailer, ENTRY_LEN,
};
use store::snapshot::{is_snapshot_id, manifest_key, validate_name};
use store::{ErrorKind, Store};

const KEY: &str = "snapshots/fuzz/manifest.snap";
const STORE_CHUNK_SIZE: u32 = 4096;

/// A real store in a temp dir, shared by all runs of the process.
fn store() -> &'static (PathBuf, Store) {
    static STORE: OnceLock<(PathBuf, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fuzz-manifest-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let path = dir.join("store");
        let store = Store::init(&path, STORE_CHUNK_SIZE).expect("init store");
        (path, store)
    })
}

fn check(file: Vec<u8>, through_store: bool) {
    let len = file.len() as u64;
    let obj = MemObject(Arc::new(file));
    let m = match read_header(&obj, KEY) {
        Ok(m) => m,
        Err(e) => {
            let _ = format!("{e} {e:?}");
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Io),
                "unexpected error kind {:?}: {e:?}",
                e.kind()
            );
            return;
        }
    };
    let info = &m.info;
    assert_eq!(m.file_len(), len);
    assert_eq!(
        info.chunk_count,
        chunk_count(info.image_size, info.chunk_size)
    );
    assert!(info.chunk_size.is_power_of_two());
    let _ = verify_trailer(&obj, &m, KEY);
    let mut entry = [0u8; ENTRY_LEN];
    for i in 0..info.chunk_count.min(1024) {
        obj.read_at(&mut entry, m.entries_offset + i * ENTRY_LEN as u64)
            .expect("entry inside the file");
        if let Some(id) = decode_entry(&entry) {
            assert!(!id.is_null());
        }
    }
    if through_store
        && info.chunk_size == STORE_CHUNK_SIZE
        && validate_name(&info.name).is_ok()
        && is_snapshot_id(&info.id)
    {
        read_through_store(&obj.0, &info.name, &info.id);
    }
}

fn read_through_store(file: &[u8], name: &str, id: &str) {
    let (root, store) = store();
    let path = root.join(manifest_key(name, id));
    let dir = path.parent().expect("manifest has a directory");
    std::fs::create_dir_all(dir).expect("create snapshot dir");
    std::fs::write(&path, file).expect("write manifest");
    let result = (|| -> store::Result<()> {
        let reader = store.open_snapshot(&format!("{name}@{id}"))?;
        assert_eq!(reader.chunk_size(), STORE_CHUNK_SIZE);
        let _ = reader.verify_manifest();
        let mut ids = Vec::new();
        reader.chunk_ids(0, 64, &mut ids)?;
        let mut out = Vec::new();
        for (i, cid) in ids.iter().enumerate() {
            let i = i as u64;
            assert_eq!(reader.chunk_id(i)?, *cid);
            match (reader.read_chunk(i, &mut out), cid) {
                (Ok(()), None) => {
                    assert_eq!(out.len(), reader.chunk_len(i)?);
                    assert!(out.iter().all(|&b| b == 0), "zero chunk read non-zero");
                }
                (Ok(()), Some(c)) => panic!("read chunk {c} the store does not hold"),
                (Err(e), _) => assert_ne!(e.kind(), ErrorKind::Io, "{e:?}"),
            }
        }
        let size = reader.image_size();
        let mut buf = vec![0u8; 1000];
        let _ = reader.read_at(&mut buf, size.saturating_sub(500));
        let _ = reader.read_at(&mut buf, 0);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = format!("{e:?}");
    }
    std::fs::remove_file(&path).expect("remove manifest");
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    check(file.to_vec(), false);
    if flags & 1 != 0 {
        let mut sealed = file.to_vec();
        seal_manifest(&mut sealed);
        check(sealed, flags & 2 != 0);
    }
});
