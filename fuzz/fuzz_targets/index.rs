//! Fuzzes the chunk index decoders: per-pack `.idx` files
//! (`store::index::idx::decode`) and the merged `.midx` (`Midx::open`,
//! `lookup`, `iter`, `verify_checksum`), loaded together the way a store
//! opens them (`IndexView::load`) from an in-memory backend.
//!
//! Input: a flags byte (bit 0: recompute the idx trailers, bit 1: add a
//! merged index, bit 2: file the first idx under a different pack id),
//! an idx count, each idx as a u16 length and its bytes, the merged index in
//! the compact form of `instant_recovery_fuzz::Midx` (the real file is
//! 512 KiB of fanout), then 32-byte ids to look up.
//!
//! Checked: nothing panics; an idx that decodes re-encodes to the same
//! entries and is sorted; every id of an accepted idx is found; in a
//! well-formed merged index every entry is found by `lookup` with its exact
//! fields, `iter` returns the entries in order, and the checksum verifies.

#![no_main]

use instant_recovery_fuzz::{seal_idx, Cursor, MemBackend, Midx};
use libfuzzer_sys::fuzz_target;
use store::format::{INDEX_FLAG_PATCH, MIDX_ENTRY_LEN};
use store::index::idx;
use store::index::midx::{midx_key, MidxEntry};
use store::index::IndexView;
use store::{ChunkId, PackId};

fn midx_entry(b: &[u8; MIDX_ENTRY_LEN]) -> MidxEntry {
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    MidxEntry {
        id: ChunkId(id),
        pack: u32::from_le_bytes(b[32..36].try_into().unwrap()),
        stored_len: u32::from_le_bytes(b[36..40].try_into().unwrap()) & !INDEX_FLAG_PATCH,
        offset: u64::from_le_bytes(b[40..48].try_into().unwrap()),
        patch: b[39] & 0x80 != 0,
    }
}

fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let n_idx = c.u8() % 5;
    let mut backend = MemBackend::default();
    let mut accepted: Vec<(PackId, Vec<idx::IdxEntry>)> = Vec::new();
    for i in 0..n_idx {
        let len = usize::from(c.u16());
        let mut file = c.bytes(len).to_vec();
        if flags & 1 != 0 {
            seal_idx(&mut file);
        }
        let mut pack = [0u8; 16];
        if file.len() >= 40 {
            pack.copy_from_slice(&file[24..40]);
        }
        if i == 0 && flags & 4 != 0 {
            pack[0] ^= 0x80;
        }
        let pack = PackId(pack);
        // A later file under the same pack id replaces the earlier one in
        // the backend (as a store holds one idx per pack).
        accepted.retain(|(p, _)| *p != pack);
        match idx::decode(&file) {
            Ok((p, mut entries)) => {
                assert!(entries.windows(2).all(|w| w[0].id < w[1].id));
                let original = entries.clone();
                let again = idx::encode(&p, &mut entries);
                assert_eq!(
                    idx::decode(&again).expect("re-encoded idx decodes"),
                    (p, original.clone())
                );
                if p == pack {
                    accepted.push((p, original));
                }
            }
            Err(e) => {
                let _ = format!("{e} {e:?}");
            }
        }
        backend.insert(pack.idx_key(), file);
    }
    let midx = (flags & 2 != 0).then(|| Midx::decode(&mut c));
    if let Some(m) = &midx {
        backend.insert(midx_key(m.generation), m.to_file());
    }

    let view = match IndexView::load(&backend) {
        Ok(v) => v,
        Err(e) => {
            let _ = format!("{e} {e:?}");
            assert!(midx.is_some(), "load failed without a merged index: {e:?}");
            return;
        }
    };
    let _ = view.packs();
    let _ = view.chunk_count();
    let merged_packs: Vec<PackId> = view.midx().map(|m| m.packs().to_vec()).unwrap_or_default();
    for (p, entries) in &accepted {
        if merged_packs.contains(p) {
            continue;
        }
        for e in entries {
            assert!(
                view.lookup(&e.id).expect("unmerged lookup").is_some(),
                "chunk {} of an accepted idx not found",
                e.id
            );
        }
    }
    if let (Some(m), Some(spec)) = (view.midx(), &midx) {
        let entries: Vec<MidxEntry> = spec.entries.iter().map(midx_entry).collect();
        if spec.is_consistent() {
            assert_eq!(m.len(), entries.len() as u64);
            for e in &entries {
                assert_eq!(m.lookup(&e.id).expect("lookup"), Some(*e));
            }
            let all: Vec<MidxEntry> = m.iter().map(|r| r.expect("iter")).collect();
            assert_eq!(all, entries);
            m.verify_checksum().expect("sealed midx verifies");
        } else {
            for e in &entries {
                let _ = m.lookup(&e.id);
            }
            for r in m.iter().take(1024) {
                let _ = r;
            }
            let _ = m.verify_checksum();
        }
        let mut visited = 0u64;
        let _ = view.for_each(|_, _| {
            visited += 1;
            Ok(())
        });
        assert!(visited <= view.chunk_count());
    }
    while !c.is_empty() {
        let mut id = [0u8; 32];
        let b = c.bytes(32);
        id[..b.len()].copy_from_slice(b);
        let _ = view.lookup(&ChunkId(id));
    }
}

fuzz_target!(|data: &[u8]| run(data));
