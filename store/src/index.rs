//! The chunk index: chunk id → (pack, offset, length).
//!
//! Two levels, both immutable files published atomically:
//! - per-pack `index/<pack>.idx` files ([`idx`]), written by the writer right
//!   after each pack. While few (the writer merges above
//!   [`MERGE_THRESHOLD`]), readers hold them in memory;
//! - one merged, sorted `index/merged-<gen>.midx` ([`midx`]) looked up with
//!   `pread`, never loaded whole.
//!
//! An [`IndexView`] is a consistent snapshot of both, taken at open. A reader
//! that misses a chunk or finds a pack gone reloads its view once (a backup
//! or gc may have published since).

pub mod idx;
pub mod midx;

use std::collections::{HashMap, HashSet};
use std::iter::Peekable;

use tracing::{debug, warn};

use crate::backend::Backend;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::id::{ChunkId, PackId};
use idx::IdxEntry;
use midx::{midx_key, parse_midx_name, write_midx, Midx, MidxEntry};

/// The writer merges the per-pack indexes into a new merged index when more
/// than this many are unmerged.
pub const MERGE_THRESHOLD: usize = 16;

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The pack holding it.
    pub pack: PackId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Stored data length after the record header.
    pub stored_len: u32,
    /// The record is a patch ([`crate::patch`]): reading it also reads
    /// its base.
    pub patch: bool,
}

/// A consistent view of the index.
#[derive(Debug, Default)]
pub struct IndexView {
    midx: Option<Midx>,
    midx_packs: HashSet<PackId>,
    unmerged: HashMap<ChunkId, Loc>,
    unmerged_packs: Vec<PackId>,
    superseded: Vec<String>,
    damaged: Vec<String>,
}

impl IndexView {
    /// Load the current index, retrying when a concurrent merge deletes a
    /// file between listing and opening it.
    pub fn load(backend: &dyn Backend) -> Result<IndexView> {
        Self::load_without(backend, &HashSet::new())
    }

    /// [`IndexView::load`], ignoring the unmerged indexes of the packs in
    /// `skip`. A chunk stored in several packs has one location in a view
    /// (the first index loaded wins), so a merge that drops packs must not
    /// load theirs: the surviving copy (e.g. the one gc just repacked)
    /// would otherwise be hidden behind the dropped one and lost.
    pub fn load_without(backend: &dyn Backend, skip: &HashSet<PackId>) -> Result<IndexView> {
        let mut attempt = 0;
        loop {
            match Self::load_once(backend, skip) {
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < 5 => {
                    debug!("index changed while loading, retrying: {e:?}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn load_once(backend: &dyn Backend, skip: &HashSet<PackId>) -> Result<IndexView> {
        let names = backend
            .list("index")
            .ctx(|| "Failed to list index directory".into())?;
        let mut view = IndexView::default();
        let newest = names.iter().filter_map(|n| parse_midx_name(n)).max();
        for name in &names {
            if let Some(g) = parse_midx_name(name) {
                if Some(g) != newest {
                    view.superseded.push(format!("index/{name}"));
                }
            }
        }
        if let Some(g) = newest {
            let m = Midx::open(backend, &midx_key(g))?;
            view.midx_packs = m.packs().iter().copied().collect();
            view.midx = Some(m);
        }
        for name in &names {
            let Some(stem) = name.strip_suffix(".idx") else {
                continue;
            };
            let key = format!("index/{name}");
            let Ok(pack) = stem.parse::<PackId>() else {
                warn!("ignoring unexpected index file {key}");
                continue;
            };
            if view.midx_packs.contains(&pack) {
                view.superseded.push(key);
                continue;
            }
            if skip.contains(&pack) {
                continue;
            }
            let bytes = match backend.read(&key) {
                Ok(b) => b,
                // A sealed index failing authentication (encrypted store):
                // damaged, like one failing its checksum.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    warn!("pack index {key} is damaged, ignoring it: {e}");
                    view.damaged.push(key);
                    continue;
                }
                Err(e) => return Err(Error::io(format!("Failed to read pack index {key}"), e)),
            };
            match idx::decode(&bytes) {
                Ok((p, entries)) if p == pack => view.add_pack(pack, &entries),
                Ok((p, _)) => {
                    warn!("pack index {key} names pack {p}; ignoring it");
                    view.damaged.push(key);
                }
                Err(e) => {
                    warn!("pack index {key} is damaged, ignoring it: {e}");
                    view.damaged.push(key);
                }
            }
        }
        Ok(view)
    }

    /// Add a freshly published pack to this view.
    pub fn add_pack(&mut self, pack: PackId, entries: &[IdxEntry]) {
        self.unmerged_packs.push(pack);
        for e in entries {
            self.unmerged.entry(e.id).or_insert(Loc {
                pack,
                offset: e.offset,
                stored_len: e.stored_len,
                patch: e.patch,
            });
        }
    }

    /// Find a chunk.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Loc>> {
        if let Some(loc) = self.unmerged.get(id) {
            return Ok(Some(*loc));
        }
        let Some(m) = &self.midx else {
            return Ok(None);
        };
        match m.lookup(id)? {
            Some(e) => Ok(Some(Loc {
                pack: m.pack(e.pack)?,
                offset: e.offset,
                stored_len: e.stored_len,
                patch: e.patch,
            })),
            None => Ok(None),
        }
    }

    /// Generation of the merged index (0 when there is none).
    pub fn generation(&self) -> u64 {
        self.midx.as_ref().map_or(0, Midx::generation)
    }

    /// The merged index, if any.
    pub fn midx(&self) -> Option<&Midx> {
        self.midx.as_ref()
    }

    /// Number of packs whose index is not merged yet.
    pub fn unmerged_pack_count(&self) -> usize {
        self.unmerged_packs.len()
    }

    /// Every pack the index knows.
    pub fn packs(&self) -> Vec<PackId> {
        let mut v: Vec<PackId> = self.midx_packs.iter().copied().collect();
        v.extend(self.unmerged_packs.iter().copied());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Number of indexed chunks (entries in both levels).
    pub fn chunk_count(&self) -> u64 {
        self.midx.as_ref().map_or(0, Midx::len) + self.unmerged.len() as u64
    }

    /// Index files that failed to decode (reported by verify).
    pub fn damaged(&self) -> &[String] {
        &self.damaged
    }

    /// Visit every entry: merged ones in id order, then unmerged ones.
    pub fn for_each(&self, mut f: impl FnMut(&ChunkId, &Loc) -> Result<()>) -> Result<()> {
        if let Some(m) = &self.midx {
            for e in m.iter() {
                let e = e?;
                let loc = Loc {
                    pack: m.pack(e.pack)?,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    patch: e.patch,
                };
                f(&e.id, &loc)?;
            }
        }
        for (id, loc) in &self.unmerged {
            f(id, loc)?;
        }
        Ok(())
    }

    fn unmerged_sorted(&self) -> Vec<(ChunkId, Loc)> {
        let mut v: Vec<(ChunkId, Loc)> = self.unmerged.iter().map(|(i, l)| (*i, *l)).collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }
}

/// Two-way merge of the merged index and the sorted unmerged entries,
/// dropping packs in `drop` and duplicate ids (the first copy wins).
struct MergeIter<'a, A: Iterator<Item = Result<(ChunkId, Loc)>>> {
    a: Peekable<A>,
    b: Peekable<std::vec::IntoIter<(ChunkId, Loc)>>,
    drop: &'a HashSet<PackId>,
    numbers: &'a HashMap<PackId, u32>,
    last: Option<ChunkId>,
}

impl<A: Iterator<Item = Result<(ChunkId, Loc)>>> Iterator for MergeIter<'_, A> {
    type Item = Result<MidxEntry>;

    fn next(&mut self) -> Option<Result<MidxEntry>> {
        loop {
            let take_a = match (self.a.peek(), self.b.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => true,
                (Some(Ok(x)), Some(y)) => x.0 <= y.0,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let (id, loc) = if take_a {
                match self.a.next()? {
                    Ok(x) => x,
                    Err(e) => return Some(Err(e)),
                }
            } else {
                self.b.next()?
            };
            if self.drop.contains(&loc.pack) || self.last == Some(id) {
                continue;
            }
            self.last = Some(id);
            let Some(&pack) = self.numbers.get(&loc.pack) else {
                return Some(Err(Error::corrupt(format!(
                    "Pack {} missing from table",
                    loc.pack
                ))));
            };
            return Some(Ok(MidxEntry {
                id,
                pack,
                stored_len: loc.stored_len,
                offset: loc.offset,
                patch: loc.patch,
            }));
        }
    }
}

/// Merge everything in `view` except the packs in `drop` into a new merged
/// index generation, publish it, delete what it supersedes, and return the
/// new view. Writer lock required.
pub fn merge(backend: &dyn Backend, view: &IndexView, drop: &HashSet<PackId>) -> Result<IndexView> {
    let generation = view.generation() + 1;
    let (table, numbers) = midx::pack_table(view.packs().into_iter().filter(|p| !drop.contains(p)));
    let a: Box<dyn Iterator<Item = Result<(ChunkId, Loc)>>> = match &view.midx {
        Some(m) => Box::new(m.iter().map(move |e| {
            let e = e?;
            Ok((
                e.id,
                Loc {
                    pack: m.pack(e.pack)?,
                    offset: e.offset,
                    stored_len: e.stored_len,
                    patch: e.patch,
                },
            ))
        })),
        None => Box::new(std::iter::empty()),
    };
    let it = MergeIter {
        a: a.peekable(),
        b: view.unmerged_sorted().into_iter().peekable(),
        drop,
        numbers: &numbers,
        last: None,
    };
    let count = write_midx(backend, generation, &table, it)?;
    debug!(
        generation,
        count,
        packs = table.len(),
        "published merged index"
    );
    // The dropped packs' own indexes are still there until the caller
    // deletes them; the new view must not resolve anything to them.
    let new = IndexView::load_without(backend, drop)?;
    cleanup(backend, &new)?;
    Ok(new)
}

/// Delete index files the current merged index supersedes. Writer lock required.
pub fn cleanup(backend: &dyn Backend, view: &IndexView) -> Result<()> {
    for key in &view.superseded {
        backend
            .delete(key)
            .ctx(|| format!("Failed to delete superseded index file {key}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    fn publish_idx(b: &LocalBackend, pack: PackId, ids: &[u32]) -> Vec<IdxEntry> {
        let mut entries: Vec<IdxEntry> = ids
            .iter()
            .map(|i| IdxEntry {
                id: ChunkId::of(&i.to_le_bytes()),
                offset: *i as u64,
                stored_len: 10,
                raw_len: 10,
                patch: false,
            })
            .collect();
        b.put(&pack.idx_key(), &idx::encode(&pack, &mut entries))
            .unwrap();
        entries
    }

    #[test]
    fn dropping_a_pack_keeps_the_copies_other_unmerged_packs_hold() {
        // Chunk 3 is in both packs (e.g. gc copied it from p1 into p2).
        // Whichever index loads first, merging without p1 keeps it in p2.
        for (first, second) in [([1u8; 16], [2u8; 16]), ([2; 16], [1; 16])] {
            let dir = tempfile::tempdir().unwrap();
            let b = LocalBackend::new(dir.path());
            let (p1, p2) = (PackId(first), PackId(second));
            publish_idx(&b, p1, &[1, 2, 3]);
            publish_idx(&b, p2, &[3, 4]);
            let drop: HashSet<PackId> = [p1].into_iter().collect();
            let v = IndexView::load_without(&b, &drop).unwrap();
            let v = merge(&b, &v, &drop).unwrap();
            let three = ChunkId::of(&3u32.to_le_bytes());
            assert_eq!(v.lookup(&three).unwrap().map(|l| l.pack), Some(p2));
            assert_eq!(v.chunk_count(), 2);
        }
    }

    #[test]
    fn load_merge_drop_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let (p1, p2, p3) = (PackId([1; 16]), PackId([2; 16]), PackId([3; 16]));
        publish_idx(&b, p1, &[1, 2, 3]);
        publish_idx(&b, p2, &[3, 4, 5]);
        let v = IndexView::load(&b).unwrap();
        assert_eq!(v.unmerged_pack_count(), 2);
        assert_eq!(v.generation(), 0);
        let id = |i: u32| ChunkId::of(&i.to_le_bytes());
        assert_eq!(v.lookup(&id(4)).unwrap().unwrap().pack, p2);
        assert!(v.lookup(&id(9)).unwrap().is_none());

        let v = merge(&b, &v, &HashSet::new()).unwrap();
        assert_eq!(v.generation(), 1);
        assert_eq!(v.unmerged_pack_count(), 0);
        assert_eq!(v.chunk_count(), 5, "duplicate id 3 kept once");
        assert!(b
            .list("index")
            .unwrap()
            .iter()
            .all(|n| n.ends_with(".midx")));

        publish_idx(&b, p3, &[6, 7]);
        let v = IndexView::load(&b).unwrap();
        assert_eq!(v.unmerged_pack_count(), 1);
        assert_eq!(v.lookup(&id(7)).unwrap().unwrap().pack, p3);
        assert_eq!(v.lookup(&id(1)).unwrap().unwrap().pack, p1);

        let v = merge(&b, &v, &[p1].into_iter().collect()).unwrap();
        assert_eq!(v.generation(), 2);
        assert!(
            v.lookup(&id(1)).unwrap().is_none(),
            "dropped pack's chunks gone"
        );
        // The first merge kept id 3's copy in p1 only; dropping p1 drops it
        // (gc copies live chunks out of a pack before dropping it).
        assert!(v.lookup(&id(3)).unwrap().is_none());
        assert_eq!(v.lookup(&id(4)).unwrap().unwrap().pack, p2);
        assert_eq!(v.packs(), vec![p2, p3]);
        assert_eq!(
            b.list("index").unwrap(),
            vec!["merged-0000000000000002.midx"]
        );
    }

    #[test]
    fn damaged_unmerged_idx_is_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let p = PackId([5; 16]);
        publish_idx(&b, p, &[1]);
        let path = dir.path().join(p.idx_key());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let v = IndexView::load(&b).unwrap();
        assert_eq!(v.damaged(), &[p.idx_key()]);
        assert_eq!(v.chunk_count(), 0);
    }
}
