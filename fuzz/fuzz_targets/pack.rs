//! Fuzzes pack decoding: record headers (`RecordHeader::decode`), the pack
//! walker (`store::pack::scan`), lz4 decompression and hash verification
//! (`store::chunk::decode_record`), and the store's read path
//! (`Store::read_chunk`) over a pack and an index built from the input.
//!
//! Input: a flags byte (bit 0: recompute each record header's check word,
//! bit 1: also rewrite each record's id to the hash of what its body
//! decodes to, bit 2: read through a real store), a count of extra index
//! entries and those entries (48 bytes each: id, offset, stored_len,
//! raw_len, as in an idx file), then the pack file.
//!
//! Checked: nothing panics and nothing allocates absurdly; a record that
//! decodes holds exactly its id's plaintext of its raw length; a record
//! asked for with the wrong length or id is refused; the store never
//! returns data whose hash is not the requested id.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use instant_recovery_fuzz::{seal_records, Cursor};
use libfuzzer_sys::fuzz_target;
use store::chunk::{decode_record, ChunkError, Codec};
use store::format::{
    RecordHeader, RECORD_FLAG_COMPRESSED, RECORD_FLAG_ENCRYPTED, RECORD_FLAG_PATCH,
    RECORD_HEADER_LEN,
};
use store::index::idx::{self, IdxEntry};
use store::pack::scan;
use store::{ChunkId, ErrorKind, PackId, Store};

const PACK: PackId = PackId([0x5a; 16]);

fn store() -> &'static (PathBuf, Store) {
    static STORE: OnceLock<(PathBuf, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fuzz-pack-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let path = dir.join("store");
        let store = Store::init(&path, 4096).expect("init store");
        (path, store)
    })
}

/// What a record's body decodes to, independently of the store's code
/// (`None` for a sealed record: this is a plaintext store, which refuses
/// it; sealed records are fuzzed by the `sealed` target's framing and the
/// store's unit tests).
fn plaintext(h: &RecordHeader, body: &[u8]) -> Option<Vec<u8>> {
    if h.flags & RECORD_FLAG_ENCRYPTED != 0 {
        return None;
    }
    if h.flags & RECORD_FLAG_COMPRESSED != 0 {
        let mut out = vec![0u8; h.raw_len as usize];
        match lz4_flex::block::decompress_into(body, &mut out) {
            Ok(n) if n == out.len() => Some(out),
            _ => None,
        }
    } else {
        Some(body.to_vec())
    }
}

/// Rewrites each decodable record's id to the hash of its plaintext (and
/// re-seals its header), so `decode_record` gets to succeed.
fn rehash(pack: &mut [u8]) {
    let records: Vec<(usize, RecordHeader, usize)> = scan(pack)
        .map_while(Result::ok)
        .map(|r| (r.offset as usize, r.header, r.record.len()))
        .collect();
    for (at, mut h, len) in records {
        if let Some(plain) = plaintext(&h, &pack[at + RECORD_HEADER_LEN..at + len]) {
            h.id = ChunkId::of(&plain).0;
            pack[at..at + RECORD_HEADER_LEN].copy_from_slice(&h.encode());
        }
    }
}

fn check_records(pack: &[u8]) -> Vec<IdxEntry> {
    let mut entries = Vec::new();
    let mut out = Vec::new();
    for r in scan(pack) {
        let Ok(r) = r else {
            break;
        };
        let h = r.header;
        let id = ChunkId(h.id);
        assert_eq!(r.record.len(), RECORD_HEADER_LEN + h.stored_len as usize);
        let expected = plaintext(&h, &r.record[RECORD_HEADER_LEN..]);
        match decode_record(r.record, &id, h.stored_len, &mut out) {
            Ok(()) => {
                assert_eq!(out.len(), h.raw_len as usize);
                assert_eq!(ChunkId::of(&out), id);
                assert_eq!(expected.as_deref(), Some(&out[..]));
            }
            Err(ChunkError::HashMismatch { found }) => {
                assert_ne!(found, id);
                if let Some(p) = &expected {
                    // A patch record's id is the patch hash of its payload.
                    let want = if h.flags & RECORD_FLAG_PATCH != 0 {
                        Codec::plain().patch_id(p)
                    } else {
                        ChunkId::of(p)
                    };
                    assert_eq!(want, found);
                }
            }
            // A verified patch record is refused where chunk data is asked for.
            Err(ChunkError::UnexpectedPatch) => assert!(h.flags & RECORD_FLAG_PATCH != 0),
            Err(e) => {
                let _ = format!("{e} {e:?}");
                assert!(expected.is_none(), "decodable record refused: {e:?}");
            }
        }
        // The same record asked for with the wrong length or id.
        assert!(decode_record(r.record, &id, h.stored_len.wrapping_add(1), &mut out).is_err());
        let mut other = id;
        other.0[0] ^= 1;
        assert!(decode_record(r.record, &other, h.stored_len, &mut out).is_err());
        entries.push(IdxEntry {
            id,
            offset: r.offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
            patch: false,
        });
    }
    entries
}

fn read_through_store(pack: &[u8], mut entries: Vec<IdxEntry>) {
    let (root, store) = store();
    entries.sort_by_key(|e| e.id);
    entries.dedup_by_key(|e| e.id);
    let pack_path = root.join(PACK.pack_key());
    let idx_path = root.join(PACK.idx_key());
    std::fs::create_dir_all(pack_path.parent().expect("pack dir")).expect("create pack dir");
    std::fs::write(&pack_path, pack).expect("write pack");
    let ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
    std::fs::write(&idx_path, idx::encode(&PACK, &mut entries)).expect("write idx");
    store.reload_index().expect("reload index");
    let mut out = Vec::new();
    for id in ids {
        match store.read_chunk(&id, &mut out) {
            Ok(()) => assert_eq!(ChunkId::of(&out), id, "store returned wrong data"),
            Err(e) => {
                let _ = format!("{e} {e:?}");
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::Corrupt | ErrorKind::Io | ErrorKind::NotFound
                    ),
                    "{e:?}"
                );
            }
        }
    }
    std::fs::remove_file(&idx_path).expect("remove idx");
    std::fs::remove_file(&pack_path).expect("remove pack");
}

fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let extra: Vec<IdxEntry> = (0..c.u8() % 8)
        .map(|_| {
            let mut id = [0u8; 32];
            let b = c.bytes(32);
            id[..b.len()].copy_from_slice(b);
            IdxEntry {
                id: ChunkId(id),
                offset: c.u64(),
                stored_len: c.u32(),
                raw_len: c.u32(),
                patch: false,
            }
        })
        .collect();
    let mut pack = c.rest().to_vec();
    for at in 0..pack.len().min(4 * RECORD_HEADER_LEN) {
        let _ = RecordHeader::decode(&pack[at..]);
    }
    check_records(&pack);
    if flags & 1 != 0 {
        seal_records(&mut pack);
        if flags & 2 != 0 {
            rehash(&mut pack);
        }
    }
    let mut entries = check_records(&pack);
    if flags & 4 != 0 {
        entries.extend(extra);
        read_through_store(&pack, entries);
    }
}

fuzz_target!(|data: &[u8]| run(data));
