//! Patch records end to end: a changed-blocks source with `Partial`
//! chunks, restore, chains, materialize, gc, copy, verify and damage.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::backup::changed::{ChangedOptions, ChangedSource, ChunkState};
use crate::backup::tests::image;
use crate::chunk::RecordKind;
use crate::crypto::{KdfParams, Secret};
use crate::format::{MAX_PATCH_CHAIN, RECORD_HEADER_LEN};
use crate::id::ChunkId;
use crate::pack::PackWriter;
use crate::patch::{self, PatchRef, GRAIN};
use crate::restore::RestoreOptions;
use crate::{ErrorKind, GcOptions, Store};

/// 4 grains per chunk: a patch of at most 2 grains, more is materialized.
const CS: usize = 4 * GRAIN;
const CHUNKS: usize = 64;

/// An in-memory source: per chunk a state and, for `Partial`, the dirty
/// grains; records every range read.
struct Src<'a> {
    data: &'a [u8],
    plan: Vec<ChunkState>,
    grains: Vec<Vec<bool>>,
    read: AtomicU64,
    ranges: Mutex<Vec<(u64, usize)>>,
}

impl<'a> Src<'a> {
    fn full(data: &'a [u8]) -> Src<'a> {
        Src {
            data,
            plan: vec![ChunkState::Data; CHUNKS],
            grains: vec![Vec::new(); CHUNKS],
            read: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
        }
    }

    /// Everything unchanged except `dirty`: `(chunk, grains)`; all four
    /// grains make a `Data` chunk.
    fn inc(data: &'a [u8], dirty: &[(usize, &[usize])]) -> Src<'a> {
        let mut s = Src::full(data);
        s.plan = vec![ChunkState::Unchanged; CHUNKS];
        for (c, gs) in dirty {
            let mut mask = vec![false; CS / GRAIN];
            for g in *gs {
                mask[*g] = true;
            }
            s.plan[*c] = if gs.len() == CS / GRAIN {
                ChunkState::Data
            } else {
                ChunkState::Partial
            };
            s.grains[*c] = mask;
        }
        s
    }
}

impl ChangedSource for Src<'_> {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        self.plan[chunk as usize]
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.ranges.lock().unwrap().push((offset, buf.len()));
        Ok(())
    }
    fn dirty_grains(&self, chunk: u64) -> Vec<bool> {
        self.grains[chunk as usize].clone()
    }
}

fn opts(parent: Option<&str>) -> ChangedOptions<'static> {
    ChangedOptions {
        image_size: (CS * CHUNKS) as u64,
        source: "test".into(),
        parent: parent.map(str::to_owned),
        progress: None,
        threads: Some(2),
        readers: 2,
    }
}

fn run(store: &Store, src: &Src<'_>, parent: Option<&str>) -> crate::BackupStats {
    let b = store.begin_changed_backup("vm").unwrap();
    b.run(src, &opts(parent)).unwrap()
}

fn write_grains(img: &mut [u8], c: usize, gs: &[usize], v: u8) {
    for g in gs {
        let at = c * CS + g * GRAIN;
        img[at..at + GRAIN].fill(v);
        img[at + 7] = (c + g) as u8;
    }
}

fn restored(store: &Store, reference: &str, dir: &std::path::Path) -> Vec<u8> {
    let out = dir.join("out.img");
    let _ = std::fs::remove_file(&out);
    store
        .restore(reference, &out, &RestoreOptions::default())
        .unwrap();
    std::fs::read(&out).unwrap()
}

/// The entry of chunk `c` in snapshot `r`.
fn entry(store: &Store, reference: &str, c: u64) -> ChunkId {
    store
        .open_snapshot(reference)
        .unwrap()
        .chunk_id(c)
        .unwrap()
        .unwrap()
}

fn patch_of(store: &Store, id: &ChunkId) -> Option<(ChunkId, usize)> {
    let mut buf = Vec::new();
    match store.read_record(id, &mut buf).unwrap() {
        RecordKind::Data => None,
        RecordKind::Patch => {
            let p = PatchRef::parse(&buf).unwrap();
            Some((p.base, p.count()))
        }
    }
}

/// Three backups: full, then patches (one over a zero chunk), then a
/// chained patch and a materialized chunk. Every snapshot restores exactly.
fn three(dir: &std::path::Path, store: &Store) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut img = image(5, CS * CHUNKS);
    img[50 * CS..51 * CS].fill(0);
    let s1 = run(store, &Src::full(&img), None);
    assert!(!store.has_patches(), "a full backup writes no patch");
    let v1 = img.clone();

    write_grains(&mut img, 3, &[1], 0x31);
    write_grains(&mut img, 10, &[1], 0x32);
    write_grains(&mut img, 20, &[0], 0x33);
    write_grains(&mut img, 30, &[0, 1, 2, 3], 0x34);
    write_grains(&mut img, 50, &[2], 0x35);
    let src = Src::inc(
        &img,
        &[
            (3, &[1]),
            (10, &[1]),
            (20, &[0]),
            (30, &[0, 1, 2, 3]),
            (50, &[2]),
        ],
    );
    let s2 = run(store, &src, Some(&s1.snapshot));
    // Only the dirty grains were read.
    assert_eq!(s2.bytes_read, (4 * GRAIN + CS) as u64);
    assert_eq!(src.read.load(Ordering::Relaxed), s2.bytes_read);
    for (o, len) in src.ranges.lock().unwrap().iter() {
        let c = *o as usize / CS;
        assert!(
            *len == CS && c == 30 || *len == GRAIN && [3, 10, 20, 50].contains(&c),
            "read {len} bytes at {o}"
        );
    }
    assert_eq!(s2.chunks_patch, 4, "{s2:?}");
    assert!(store.has_patches());
    let cfg = std::fs::read_to_string(dir.join("store/config.json")).unwrap();
    assert!(cfg.contains("\"version\": 4"), "{cfg}");
    let v2 = img.clone();

    // Chunk 3: a second grain, chained over the first patch (the chain
    // replaces 2 of 4 grains). Chunk 10: two more grains make 3 of 4:
    // stored whole.
    write_grains(&mut img, 3, &[2], 0x41);
    write_grains(&mut img, 10, &[0, 3], 0x42);
    let src = Src::inc(&img, &[(3, &[2]), (10, &[0, 3])]);
    let s3 = run(store, &src, Some(&s2.snapshot));
    assert_eq!(s3.bytes_read, (3 * GRAIN) as u64);
    let v3 = img.clone();

    let r = |s: &crate::BackupStats| format!("vm@{}", s.snapshot);
    let base3 = entry(store, &r(&s1), 3);
    assert_eq!(patch_of(store, &entry(store, &r(&s2), 3)), Some((base3, 1)));
    assert_eq!(
        patch_of(store, &entry(store, &r(&s3), 3)),
        Some((entry(store, &r(&s2), 3), 1))
    );
    assert_eq!(patch_of(store, &entry(store, &r(&s3), 10)), None);
    assert_eq!(
        patch_of(store, &entry(store, &r(&s2), 50)),
        Some((ChunkId::default(), 1))
    );
    // Inherited unchanged: chunk 20's patch.
    assert_eq!(entry(store, &r(&s2), 20), entry(store, &r(&s3), 20));
    for (s, v) in [(&s1, &v1), (&s2, &v2), (&s3, &v3)] {
        assert!(restored(store, &r(s), dir) == *v, "{} differs", r(s));
    }
    assert!(store.verify(None, &Default::default()).unwrap().is_ok());
    (vec![r(&s1), r(&s2), r(&s3)], vec![v1, v2, v3])
}

fn setup() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("store"), CS as u32).unwrap();
    (dir, store)
}

#[test]
fn patches_restore_chain_and_materialize() {
    let (dir, store) = setup();
    three(dir.path(), &store);
    // A fresh open reads them too.
    let fresh = Store::open(&dir.path().join("store")).unwrap();
    assert!(fresh.has_patches());
    assert!(fresh.verify(None, &Default::default()).unwrap().is_ok());
}

#[test]
fn gc_keeps_the_bases_of_live_patches() {
    let (dir, store) = setup();
    // Opened before the store held a patch: its gc must still keep bases.
    let stale = Store::open(&dir.path().join("store")).unwrap();
    let (refs, vs) = three(dir.path(), &store);
    assert!(!stale.has_patches());
    let store = stale;
    // The full snapshot introduced the bases; the patch snapshot too.
    store.forget(&refs[0]).unwrap();
    store.forget(&refs[1]).unwrap();
    let stats = store
        .gc(&GcOptions {
            repack_threshold: 0.001,
        })
        .unwrap();
    assert!(stats.patch_bases >= 2, "{stats:?}");
    let fresh = Store::open(&dir.path().join("store")).unwrap();
    assert!(restored(&fresh, &refs[2], dir.path()) == vs[2]);
    assert!(fresh.verify(None, &Default::default()).unwrap().is_ok());
}

#[test]
fn copy_sends_patches_with_their_bases_or_materializes_them() {
    let (dir, store) = setup();
    let (refs, vs) = three(dir.path(), &store);
    // Same ids: only the last snapshot; its patches need bases from s1.
    let same = Store::init(&dir.path().join("same"), CS as u32).unwrap();
    store.copy_to(&same, &refs[2..]).unwrap();
    assert!(same.has_patches());
    assert!(restored(&same, &refs[2], dir.path()) == vs[2]);
    assert!(same.verify(None, &Default::default()).unwrap().is_ok());
    // Translated ids (encrypted): patches arrive as whole chunks.
    let (enc, _) = encrypted(&dir.path().join("enc"));
    store.copy_to(&enc, &[]).unwrap();
    for (r, v) in refs.iter().zip(&vs) {
        assert!(restored(&enc, r, dir.path()) == *v, "{r} differs");
    }
    assert!(enc.verify(None, &Default::default()).unwrap().is_ok());
}

/// The pack-span path of restore and copy from remote stores reads
/// patches as their whole chunks, like the chunk-by-chunk path.
#[test]
fn pack_spans_resolve_patches() {
    let (dir, store) = setup();
    let (refs, vs) = three(dir.path(), &store);
    let r = store.open_snapshot(&refs[2]).unwrap();
    let mut ids = Vec::new();
    r.chunk_ids(0, CHUNKS as u64, &mut ids).unwrap();
    let items: Vec<(usize, ChunkId)> = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| Some((i, (*id)?)))
        .collect();
    assert!(items.iter().any(|(_, id)| patch_of(&store, id).is_some()));
    let mut bufs = vec![Vec::new(); CHUNKS];
    let mut alone = |_: usize, id: &ChunkId, _: &mut Vec<u8>| -> crate::Result<()> {
        panic!("chunk {id} fell back to a read on its own")
    };
    crate::restore::spans::read_spans(&store, &items, &mut bufs, &mut Vec::new(), &mut alone)
        .unwrap();
    for (i, _) in &items {
        assert!(bufs[*i] == vs[2][i * CS..(i + 1) * CS], "chunk {i} differs");
    }
}

/// A new encrypted store at `path` and its passphrase.
fn encrypted(path: &std::path::Path) -> (Store, Secret) {
    const CHEAP: KdfParams = KdfParams {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };
    let pass = Secret::passphrase("pw").unwrap();
    let store = Store::init_encrypted(path, CS as u32, &pass, &CHEAP).unwrap();
    (store, pass)
}

#[test]
fn patches_on_an_encrypted_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, pass) = encrypted(&dir.path().join("store"));
    three(dir.path(), &store);
    let fresh = Store::open_keyed(&dir.path().join("store"), Some(&pass)).unwrap();
    assert!(fresh.has_patches());
}

/// Flip one byte of the record of `id` (its stored data).
fn damage(store: &Store, id: &ChunkId) {
    let loc = store.locate(id).unwrap().unwrap();
    let path = store.path().join(loc.pack.pack_key());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc.offset as usize + RECORD_HEADER_LEN + 60] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn damaged_base_or_patch_is_an_error_never_data() {
    for target in ["base", "patch"] {
        let (dir, store) = setup();
        let (refs, _) = three(dir.path(), &store);
        let pid = entry(&store, &refs[2], 3);
        let (base, _) = patch_of(&store, &pid).unwrap();
        damage(&store, if target == "base" { &base } else { &pid });
        let fresh = Store::open(&dir.path().join("store")).unwrap();
        let mut out = Vec::new();
        let e = fresh.read_chunk(&pid, &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{target}: {e:?}");
        let out = dir.path().join("x.img");
        assert!(fresh
            .restore(&refs[2], &out, &RestoreOptions::default())
            .is_err());
        assert!(!fresh.verify(None, &Default::default()).unwrap().is_ok());
    }
}

/// Encode a patch over `base` setting grain `g` to `v`, and pack it.
/// Returns its id and payload.
fn hand_patch(
    store: &Store,
    w: &mut PackWriter,
    base: &ChunkId,
    g: usize,
    v: u8,
) -> (ChunkId, Vec<u8>) {
    let grain = vec![v; GRAIN];
    let mut p = Vec::new();
    patch::encode(base, CS as u32, |i| (i == g).then_some(&grain[..]), &mut p);
    let id = store.codec().patch_id(&p);
    let mut rec = Vec::new();
    store
        .codec()
        .encode_kind(&id, &p, RecordKind::Patch, &mut rec);
    w.add(id, p.len() as u32, &rec);
    (id, p)
}

/// Hand-made patch records: a missing base is an error; a chain resolves
/// bottom up; a chain deeper than `MAX_PATCH_CHAIN` is corrupt.
#[test]
fn missing_base_chains_and_too_deep_a_chain() {
    let (_dir, store) = setup();
    store.enable_patches().unwrap();
    let data = image(9, CS);
    let did = store.chunk_id(&data);
    let mut w = PackWriter::new(1 << 20);
    let (id1, p1) = hand_patch(&store, &mut w, &did, 0, 7);
    assert_ne!(id1, store.chunk_id(&p1), "patch ids are not chunk ids");
    // A chain over patch 1: grain 1, then grain 0 again (the newest wins),
    // up to the limit, and one more.
    let mut chain = vec![id1];
    for k in 1..=MAX_PATCH_CHAIN as usize {
        let top = *chain.last().unwrap();
        chain.push(hand_patch(&store, &mut w, &top, k % 2, 7 + k as u8).0);
    }
    w.publish(store.backend()).unwrap();
    store.reload_index().unwrap();
    assert!(store.locate(&id1).unwrap().unwrap().patch);
    let mut out = Vec::new();
    let e = store.read_chunk(&id1, &mut out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:?}");
    // Once the base exists, every patch of the chain up to the limit reads.
    let mut w = PackWriter::new(1 << 20);
    let mut rec = Vec::new();
    store.codec().encode_record(&did, &data, &mut rec);
    w.add(did, CS as u32, &rec);
    w.publish(store.backend()).unwrap();
    store.reload_index().unwrap();
    let mut want = data.clone();
    for (k, id) in chain.iter().enumerate() {
        let g = k % 2;
        want[g * GRAIN..(g + 1) * GRAIN].fill(7 + k as u8);
        let r = store.read_chunk(id, &mut out);
        if k < MAX_PATCH_CHAIN as usize {
            r.unwrap();
            assert!(out == want, "depth {} differs", k + 1);
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
            assert!(format!("{e:?}").contains("chains more than"), "{e:?}");
        }
    }
    // A data read of a patch record is refused by the codec too.
    let mut buf = Vec::new();
    assert_eq!(
        store.read_record(&id1, &mut buf).unwrap(),
        RecordKind::Patch
    );
}

/// The depth of the patch chain of `id` (0: chunk data).
fn depth(store: &Store, id: &ChunkId) -> u32 {
    match patch_of(store, id) {
        None => 0,
        Some((base, _)) if base.is_null() => 1,
        Some((base, _)) => 1 + depth(store, &base),
    }
}

/// One grain rewritten by every incremental: the chain grows one patch a
/// snapshot up to `MAX_PATCH_CHAIN`; past it, the top patch and the new
/// grain become one patch over the same base (the depth stays); once the
/// chain would replace more than half the chunk, it is stored whole. A
/// writer that has not seen the chain (a fresh open) reads it for its
/// depth and continues it the same way.
#[test]
fn a_chain_grows_to_its_limit_merges_at_the_top_then_is_stored_whole() {
    let (dir, store) = setup();
    let mut img = image(5, CS * CHUNKS);
    let mut snap = run(&store, &Src::full(&img), None).snapshot;
    let max = MAX_PATCH_CHAIN;
    let mut store = store;
    let mut step = |store: &Store, img: &mut Vec<u8>, gs: &[usize], k: u32| {
        write_grains(img, 5, gs, k as u8);
        let s = run(store, &Src::inc(img, &[(5, gs)]), Some(&snap));
        snap = s.snapshot;
        let r = format!("vm@{snap}");
        assert!(restored(store, &r, dir.path()) == *img, "incremental {k}");
        entry(store, &r, 5)
    };
    for k in 1..=max + 2 {
        if k == 4 || k == max + 2 {
            store = Store::open(&dir.path().join("store")).unwrap();
        }
        let id = step(&store, &mut img, &[0], k);
        assert_eq!(depth(&store, &id), k.min(max), "incremental {k}");
    }
    // Grain 1 joins the top patch: half the chunk, still a patch.
    let id = step(&store, &mut img, &[1], max + 3);
    assert_eq!(depth(&store, &id), max);
    assert_eq!(patch_of(&store, &id).unwrap().1, 2);
    // Grain 2 makes three of four: whole.
    let id = step(&store, &mut img, &[2], max + 4);
    assert_eq!(depth(&store, &id), 0);
    assert!(store.verify(None, &Default::default()).unwrap().is_ok());
}

mod model {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Writes of one grain each: (chunk, grain, byte).
        Inc(Vec<(usize, usize, u8)>),
        /// Forget the n-th (mod count) snapshot but the newest.
        Forget(usize),
        Gc,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => proptest::collection::vec((0usize..8, 0usize..4, 1u8..255), 1..6).prop_map(Op::Inc),
            2 => any::<usize>().prop_map(Op::Forget),
            1 => Just(Op::Gc),
        ]
    }

    /// Every snapshot of the model reads back exactly, and every patch any
    /// of them names rests on chunk data within `MAX_PATCH_CHAIN` patches.
    fn check(store: &Store, model: &[(String, Vec<u8>)]) {
        let mut buf = Vec::new();
        for (r, img) in model {
            let reader = store.open_snapshot(r).unwrap();
            for c in 0..CHUNKS as u64 {
                reader.read_chunk(c, &mut buf).unwrap();
                let at = c as usize * CS;
                assert!(buf[..] == img[at..at + CS], "{r} chunk {c} differs");
                if let Some(id) = reader.chunk_id(c).unwrap() {
                    assert!(
                        depth(store, &id) <= MAX_PATCH_CHAIN,
                        "{r} chunk {c}: a chain too deep"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Model: snapshot -> image. Incrementals of scattered grain
        /// writes (patches, chains, materialized chunks), forget
        /// and gc in any order: every remaining snapshot reads back exactly.
        #[test]
        fn patches_forget_and_gc_match_the_model(ops in proptest::collection::vec(op(), 1..12)) {
            let (_dir, store) = setup();
            let mut img = image(21, CS * CHUNKS);
            img[5 * CS..6 * CS].fill(0);
            let s = run(&store, &Src::full(&img), None);
            let mut model = vec![(format!("vm@{}", s.snapshot), img.clone())];
            for op in ops {
                match op {
                    Op::Inc(writes) => {
                        let mut dirty: Vec<(usize, Vec<usize>)> = Vec::new();
                        for (c, g, b) in writes {
                            let at = c * CS + g * GRAIN;
                            img[at..at + GRAIN].fill(b);
                            match dirty.iter_mut().find(|d| d.0 == c) {
                                Some(d) if !d.1.contains(&g) => d.1.push(g),
                                Some(_) => {}
                                None => dirty.push((c, vec![g])),
                            }
                        }
                        let dirty: Vec<(usize, &[usize])> =
                            dirty.iter().map(|(c, g)| (*c, &g[..])).collect();
                        let parent = model.last().unwrap().0.split('@').nth(1).unwrap().to_owned();
                        let s = run(&store, &Src::inc(&img, &dirty), Some(&parent));
                        model.push((format!("vm@{}", s.snapshot), img.clone()));
                    }
                    Op::Forget(n) if model.len() > 1 => {
                        let (r, _) = model.remove(n % (model.len() - 1));
                        store.forget(&r).unwrap();
                    }
                    Op::Forget(_) => {}
                    Op::Gc => {
                        store.gc(&GcOptions { repack_threshold: 0.001 }).unwrap();
                    }
                }
                check(&store, &model);
            }
            prop_assert!(store.verify(None, &Default::default()).unwrap().is_ok());
        }
    }
}
