//! `forget` and garbage collection.
//!
//! Protocol (see also the crate docs):
//! 1. `forget` atomically renames `<id>.snap` to `<id>.snap.forgotten`. New
//!    readers can no longer resolve it; readers already holding it keep their
//!    shared `flock` on the file.
//! 2. gc takes the writer lock (no backup or other gc runs), then for each
//!    forgotten manifest tries a non-blocking *exclusive* `flock`. Got it: no
//!    reader uses it; it will be deleted. Busy: a reader still serves it, so
//!    it counts as live this time.
//! 3. Mark: every chunk of every live manifest (and busy forgotten one) goes
//!    into a Bloom filter (false positives only keep garbage). A delta
//!    manifest marks its own entries and names its base: a forgotten base
//!    that a live (or busy) delta names is live too, manifest and chunks
//!    ([`GcStats::manifests_base`]), so forgetting any point, or the full
//!    manifest under it, never breaks another point. A base is a full
//!    manifest, so this is one step, not a walk.
//! 4. Sweep: per pack, live vs. dead bytes from one pass over the index.
//!    Packs with no live chunk are dropped; packs with at least
//!    `repack_threshold` dead bytes are repacked: their live chunks are
//!    verified and copied into new packs, which are published with their
//!    indexes. Packs that no index names (left by a crashed backup) are
//!    deleted.
//! 5. On a remote store, the reader registrations are listed again right
//!    before anything is deleted: a forgotten manifest that a reader
//!    registered for meanwhile is kept, and so is every pack holding one of
//!    its chunks ([`GcStats::packs_kept_for_readers`]). (The first listing
//!    of readers comes after the listing of manifests: a reader registers
//!    before it opens a live manifest, so a reader of a manifest forgotten
//!    before the listing is always seen; the second listing guards against
//!    the rest, such as a lease refreshed late.)
//! 6. A new merged index generation without the dropped packs is published;
//!    only then are the old packs and the forgotten manifests deleted.
//!    A reader whose index view still names a deleted pack reloads the index
//!    and finds the chunk in its new pack; packs it already had open stay
//!    readable (Unix unlink semantics).
//!
//! The new merged index is built from a view loaded *without* the dropped
//! packs' `.idx` files ([`IndexView::load_without`](crate::index::IndexView::load_without)):
//! a view keeps one location per chunk, and a repacked chunk is in both its
//! old and its new pack, so loading the old one could hide the new copy and
//! drop the chunk. A pack with a damaged record is left alone (verify
//! reports it); a pack whose `.idx` is merely damaged is not an orphan.
//!
//! A crash during gc: before the new merged index is published nothing is
//! deleted, and new packs are either unreferenced (dropped next time) or
//! indexed duplicates. After it, leftover old packs are orphans or unused,
//! and leftover forgotten manifests are deleted by the next gc.

mod bloom;

use std::collections::{HashMap, HashSet};
use std::fs::{File, TryLockError};
use std::io;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, info_span, warn};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{PACK_HEADER_LEN, RECORD_HEADER_LEN};
use crate::hold::held_error;
use crate::id::{ChunkId, PackId};
use crate::index::{self, IndexView};
use crate::pack::{scan, PackWriter, PACK_TARGET_SIZE};
use crate::repo::Store;
use crate::snapshot::delta::Delta;
use crate::snapshot::manifest::{decode_entry, read_header, ENTRY_LEN};
use crate::snapshot::{self, forgotten_key, Listed, SnapshotInfo};
use bloom::Bloom;

/// Default fraction of dead bytes that makes gc repack a pack.
pub const DEFAULT_REPACK_THRESHOLD: f64 = 0.2;

/// Options of [`Store::gc`].
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Repack a pack when at least this fraction of its bytes is dead.
    pub repack_threshold: f64,
}

impl Default for GcOptions {
    fn default() -> GcOptions {
        GcOptions {
            repack_threshold: DEFAULT_REPACK_THRESHOLD,
        }
    }
}

/// What gc did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcStats {
    /// Forgotten manifests deleted.
    pub manifests_deleted: u64,
    /// Forgotten manifests kept because a reader still holds them.
    pub manifests_in_use: u64,
    /// Forgotten manifests kept because a hold record names them.
    pub manifests_held: u64,
    /// Live manifests.
    pub manifests_live: u64,
    /// Forgotten full manifests kept because a live delta manifest names
    /// them as its base.
    pub manifests_base: u64,
    /// Live patch records, whose base chunks were kept for them.
    pub patch_bases: u64,
    /// Indexed chunks before gc.
    pub chunks_before: u64,
    /// Indexed chunks after gc.
    pub chunks_after: u64,
    /// Packs deleted because none of their chunks is live.
    pub packs_deleted: u64,
    /// Packs rewritten without their dead chunks.
    pub packs_repacked: u64,
    /// New packs written by repacking.
    pub packs_written: u64,
    /// Unindexed packs (left by crashed backups) deleted.
    pub orphan_packs_deleted: u64,
    /// Packs that would have been dropped, kept because a reader that
    /// registered during gc (remote store) reads chunks in them.
    pub packs_kept_for_readers: u64,
    /// Pack bytes before gc.
    pub bytes_before: u64,
    /// Pack bytes after gc.
    pub bytes_after: u64,
    /// `bytes_before - bytes_after`.
    pub bytes_freed: u64,
    pub seconds: f64,
}

/// Where a gc is, for [`Store::gc_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GcPhase {
    /// Every chunk of every live (or still read) manifest is marked; the
    /// sweep, repacking and deletion follow.
    Marked,
}

#[derive(Debug, Default, Clone, Copy)]
struct PackUse {
    live_bytes: u64,
    live_chunks: u64,
}

impl Store {
    /// Forget a snapshot: it disappears from listings; gc reclaims its space
    /// once no reader and no hold keeps it. Refuses a held snapshot
    /// (`ErrorKind::Held`, naming the holders).
    pub fn forget(&self, reference: &str) -> Result<SnapshotInfo> {
        self.forget_with(reference, false)
    }

    /// [`Store::forget`]; with `force`, a held snapshot is forgotten too
    /// (gc still keeps it, and its chunks, while it is held).
    pub fn forget_with(&self, reference: &str, force: bool) -> Result<SnapshotInfo> {
        let l = snapshot::resolve(self.backend(), reference)?;
        let info = self.load_info(&l)?;
        let held = || -> Result<()> {
            let holds = self.holds_of(&l.name, &l.id)?;
            if force || holds.is_empty() {
                Ok(())
            } else {
                Err(held_error(&info.reference(), &holds))
            }
        };
        held()?;
        let to = forgotten_key(&l.name, &l.id);
        self.backend()
            .rename(&l.key(), &to)
            .ctx(|| format!("Failed to forget snapshot {}", info.reference()))?;
        // A hold added while we renamed: undo, the holder was first.
        if let Err(e) = held() {
            self.backend()
                .rename(&to, &l.key())
                .ctx(|| format!("Failed to restore held snapshot {}", info.reference()))?;
            return Err(e);
        }
        info!(snapshot = %info.reference(), force, "forgot snapshot");
        Ok(info)
    }

    /// Bring back a forgotten snapshot (`NAME@ID` or `ID`) that gc has not
    /// deleted yet. Takes the writer lock, so it never races with gc.
    pub fn unforget(&self, reference: &str) -> Result<SnapshotInfo> {
        let _lock = self.lock_writer()?;
        let not_found = || {
            Error::not_found(format!(
                "No forgotten snapshot {reference} (gc may have deleted it)"
            ))
            .with_snapshot(reference)
        };
        let (name, id) = match reference.split_once('@') {
            Some((n, i)) => {
                snapshot::validate_name(n)?;
                (n.to_string(), i.to_string())
            }
            None => match snapshot::list(self.backend(), None, true)?
                .into_iter()
                .find(|l| l.forgotten && l.id == reference)
            {
                Some(l) => (l.name, l.id),
                None if snapshot::is_snapshot_id(reference) => return Err(not_found()),
                None => {
                    return Err(Error::invalid(format!(
                        "Invalid snapshot {reference:?}: unforget takes NAME@ID or ID"
                    )))
                }
            },
        };
        if !snapshot::is_snapshot_id(&id) {
            return Err(Error::invalid(format!(
                "Invalid snapshot id {id:?} in {reference:?}"
            )));
        }
        let live = snapshot::manifest_key(&name, &id);
        let forgotten = forgotten_key(&name, &id);
        let b = self.backend();
        if b.exists(&live)
            .ctx(|| format!("Failed to look up {live}"))?
        {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("Snapshot {name}@{id} is not forgotten"),
            ));
        }
        if !b
            .exists(&forgotten)
            .ctx(|| format!("Failed to look up {forgotten}"))?
        {
            return Err(not_found());
        }
        b.rename(&forgotten, &live)
            .ctx(|| format!("Failed to unforget snapshot {name}@{id}"))?;
        let info = self.load_info(&Listed {
            name,
            id,
            forgotten: false,
        })?;
        info!(snapshot = %info.reference(), "unforgot snapshot");
        Ok(info)
    }

    /// Delete unreferenced chunks: see the module docs for the protocol.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcStats> {
        self.gc_with(opts, &mut |_| {})
    }

    /// [`Store::gc`], telling `on_phase` where it is (progress, tests).
    pub fn gc_with(&self, opts: &GcOptions, on_phase: &mut dyn FnMut(GcPhase)) -> Result<GcStats> {
        let span = info_span!("gc", store = %self.path().display());
        let _e = span.enter();
        let start = Instant::now();
        let _lock = self.lock_writer()?;
        let backend = self.backend();
        let view = self.index();
        let mut stats = GcStats {
            chunks_before: view.chunk_count(),
            ..Default::default()
        };

        // Forgotten manifests no reader holds are ours to delete.
        let mut doomed: Vec<(Listed, Option<File>)> = Vec::new();
        let mut live: Vec<Listed> = Vec::new();
        let listed = snapshot::list(backend, None, true)?;
        // Readers listed after the manifests: a reader registers before it
        // opens a live manifest, so one that opened a manifest forgotten
        // before this listing registered before it too.
        let remote_readers: HashSet<String> = self.remote_readers()?.into_iter().collect();
        for l in listed {
            if !l.forgotten {
                live.push(l);
                continue;
            }
            // Held (forgotten with --force): live until every hold is gone.
            if !self.holds_of(&l.name, &l.id)?.is_empty() {
                stats.manifests_held += 1;
                live.push(l);
                continue;
            }
            let Some(path) = backend.local_path(&l.key()) else {
                // Remote store: a registered reader keeps it, like an flock.
                if remote_readers.contains(&format!("{}@{}", l.name, l.id)) {
                    stats.manifests_in_use += 1;
                    live.push(l);
                } else {
                    doomed.push((l, None));
                }
                continue;
            };
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io_path("Failed to open", &path, e)),
            };
            match f.try_lock() {
                Ok(()) => doomed.push((l, Some(f))),
                Err(TryLockError::WouldBlock) => {
                    stats.manifests_in_use += 1;
                    live.push(l);
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io_path("Failed to lock", &path, e))
                }
            }
        }
        stats.manifests_live = live.len() as u64 - stats.manifests_in_use - stats.manifests_held;

        // Mark.
        let mut bloom = Bloom::new(view.chunk_count());
        let mut bases: HashSet<(String, String)> = HashSet::new();
        let mark_one = |l: &Listed, bloom: &mut Bloom| {
            mark(backend, l, bloom).map_err(|e| {
                e.context(format!(
                    "Failed to mark chunks of snapshot {}@{}; gc aborted",
                    l.name, l.id
                ))
            })
        };
        for l in &live {
            if let Some(base) = mark_one(l, &mut bloom)? {
                bases.insert((l.name.clone(), base));
            }
        }
        // A forgotten full manifest that a live delta names as its base
        // stays alive (manifest and chunks) until no delta names it.
        let (kept, rest): (Vec<_>, Vec<_>) = doomed
            .into_iter()
            .partition(|(l, _)| bases.contains(&(l.name.clone(), l.id.clone())));
        doomed = rest;
        for (l, _lock) in kept {
            mark_one(&l, &mut bloom)?;
            stats.manifests_base += 1;
        }
        stats.patch_bases = mark_patch_bases(self, &view, &mut bloom)?;
        on_phase(GcPhase::Marked);
        for (name, base) in &bases {
            let present = |forgotten| {
                let l = Listed {
                    name: name.clone(),
                    id: base.clone(),
                    forgotten,
                };
                backend.exists(&l.key()).unwrap_or(true)
            };
            if !present(false) && !present(true) {
                warn!("base snapshot {name}@{base} of a delta manifest is missing (broken chain)");
            }
        }

        // Sweep accounting.
        let mut usage: HashMap<PackId, PackUse> = HashMap::new();
        view.for_each(|id, loc| {
            let u = usage.entry(loc.pack).or_default();
            if bloom.contains(id) {
                u.live_bytes += (RECORD_HEADER_LEN + loc.stored_len as usize) as u64;
                u.live_chunks += 1;
            }
            Ok(())
        })?;
        let known: HashSet<PackId> = view.packs().into_iter().collect();
        let damaged: HashSet<PackId> = view
            .damaged()
            .iter()
            .filter_map(|k| k.strip_prefix("index/")?.strip_suffix(".idx")?.parse().ok())
            .collect();
        let mut drop: HashSet<PackId> = HashSet::new();
        let mut repack: Vec<PackId> = Vec::new();
        for p in list_packs(backend)? {
            let key = p.pack_key();
            let size = match backend.size(&key) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("Failed to stat pack {key}"), e)),
            };
            stats.bytes_before += size;
            if !known.contains(&p) {
                if damaged.contains(&p) {
                    warn!("keeping pack {p}: its index is damaged");
                    continue;
                }
                backend
                    .delete(&key)
                    .ctx(|| format!("Failed to delete orphan pack {key}"))?;
                stats.orphan_packs_deleted += 1;
                stats.bytes_freed += size;
                continue;
            }
            let u = usage.get(&p).copied().unwrap_or_default();
            let dead = size.saturating_sub(PACK_HEADER_LEN as u64 + u.live_bytes);
            if u.live_chunks == 0 {
                drop.insert(p);
            } else if dead as f64 >= opts.repack_threshold * size as f64 && dead > 0 {
                repack.push(p);
            }
        }

        // Repack.
        let mut writer = PackWriter::new(PACK_TARGET_SIZE);
        let mut buf = Vec::new();
        for p in repack {
            match live_records(self, &view, &bloom, &p, &mut buf) {
                Ok((bytes, keep)) => {
                    for (id, raw_len, start, end) in keep {
                        writer.add(id, raw_len, &bytes[start..end]);
                        if writer.is_full() && writer.publish(backend)?.is_some() {
                            stats.packs_written += 1;
                        }
                    }
                    drop.insert(p);
                    stats.packs_repacked += 1;
                }
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    warn!("not repacking pack {p}: {e:?}");
                }
                Err(e) => return Err(e),
            }
        }
        if writer.publish(backend)?.is_some() {
            stats.packs_written += 1;
        }

        // Right before anything a reader could need is deleted: readers
        // registered since the listing keep what they read.
        if self.is_remote() {
            let readers: HashSet<String> = self.remote_readers()?.into_iter().collect();
            let (late, rest): (Vec<_>, Vec<_>) = doomed
                .into_iter()
                .partition(|(l, _)| readers.contains(&format!("{}@{}", l.name, l.id)));
            doomed = rest;
            for (l, _) in &late {
                warn!(
                    "a reader of snapshot {}@{} registered during gc: keeping it and its chunks",
                    l.name, l.id
                );
                stats.manifests_in_use += 1;
                let Some(base) = mark_one(l, &mut bloom)? else {
                    continue;
                };
                let (kept, rest): (Vec<_>, Vec<_>) = doomed
                    .into_iter()
                    .partition(|(b, _)| b.name == l.name && b.id == base);
                doomed = rest;
                for (b, _) in kept {
                    mark_one(&b, &mut bloom)?;
                    stats.manifests_base += 1;
                }
            }
            if !late.is_empty() {
                mark_patch_bases(self, &view, &mut bloom)?;
                let mut needed = HashSet::new();
                view.for_each(|id, loc| {
                    if drop.contains(&loc.pack) && bloom.contains(id) {
                        needed.insert(loc.pack);
                    }
                    Ok(())
                })?;
                drop.retain(|p| !needed.contains(p));
                stats.packs_kept_for_readers = needed.len() as u64;
            }
        }

        // Publish the new index, then delete.
        // Without the dropped packs' own indexes: a chunk also in a dropped
        // pack must resolve to its surviving copy.
        let fresh = IndexView::load_without(backend, &drop)?;
        let merged = index::merge(backend, &fresh, &drop)?;
        stats.chunks_after = merged.chunk_count();
        self.set_index(merged);
        for p in &drop {
            if !usage.contains_key(p) || usage[p].live_chunks == 0 {
                stats.packs_deleted += 1;
            }
            // The pack's own index first (it may still be unmerged), so no
            // index ever names a deleted pack.
            let idx = p.idx_key();
            backend
                .delete(&idx)
                .ctx(|| format!("Failed to delete pack index {idx}"))?;
            let key = p.pack_key();
            backend
                .delete(&key)
                .ctx(|| format!("Failed to delete pack {key}"))?;
        }
        for (l, _lock) in &doomed {
            backend
                .delete(&l.key())
                .ctx(|| format!("Failed to delete forgotten manifest {}", l.key()))?;
            stats.manifests_deleted += 1;
        }
        drop_locks(doomed);
        stats.bytes_after = list_packs(backend)?
            .iter()
            .map(|p| backend.size(&p.pack_key()).unwrap_or(0))
            .sum();
        stats.bytes_freed = stats.bytes_before.saturating_sub(stats.bytes_after);
        stats.seconds = start.elapsed().as_secs_f64();
        info!(?stats, "gc done");
        Ok(stats)
    }
}

fn drop_locks(doomed: Vec<(Listed, Option<File>)>) {
    drop(doomed);
}

/// Add every chunk of manifest `l` to `bloom`. A live manifest forgotten
/// since listing is read under its new name. Returns the base of a delta
/// manifest (whose chunks are marked with the base).
fn mark(
    backend: &dyn crate::backend::Backend,
    l: &Listed,
    bloom: &mut Bloom,
) -> Result<Option<String>> {
    let mut key = l.key();
    let obj = match backend.open(&key) {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !l.forgotten => {
            key = forgotten_key(&l.name, &l.id);
            backend
                .open(&key)
                .ctx(|| format!("Failed to open snapshot manifest {key}"))?
        }
        Err(e) => {
            return Err(Error::io(
                format!("Failed to open snapshot manifest {key}"),
                e,
            ))
        }
    };
    let m = read_header(obj.as_ref(), &key)?;
    if let Some(base) = m.base() {
        for id in Delta::load(obj.as_ref(), &m, &key)?.ids() {
            bloom.insert(&id);
        }
        return Ok(Some(base.to_owned()));
    }
    let mut buf = vec![0u8; 4096 * ENTRY_LEN];
    let mut first = 0u64;
    while first < m.info.chunk_count {
        let n = (m.info.chunk_count - first).min(4096) as usize;
        let b = &mut buf[..n * ENTRY_LEN];
        obj.read_at(b, m.entries_offset + first * ENTRY_LEN as u64)
            .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
        for e in b.chunks_exact(ENTRY_LEN) {
            if let Some(id) = decode_entry(e) {
                bloom.insert(&id);
            }
        }
        first += n as u64;
    }
    Ok(None)
}

/// All pack files present in the backend.
fn list_packs(backend: &dyn crate::backend::Backend) -> Result<Vec<PackId>> {
    let mut out = Vec::new();
    for dir in backend
        .list("packs")
        .ctx(|| "Failed to list packs".into())?
    {
        for name in backend
            .list(&format!("packs/{dir}"))
            .ctx(|| format!("Failed to list packs/{dir}"))?
        {
            if let Some(p) = name.strip_suffix(".pack").and_then(|s| s.parse().ok()) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

type Kept = Vec<(ChunkId, u32, usize, usize)>;

/// Mark the base of every live patch, down each chain: every patch the
/// filter holds (live, or a false positive) is read (a small payload) for
/// its base id, and a base that is a patch is read in turn, until chunk
/// data. A patch that cannot be read aborts gc: its base would otherwise be
/// collected. Returns the number of patches seen live. Done whatever this
/// handle's config says: another process may have written the first patch
/// since the store was opened; the index's patch bits are the truth.
fn mark_patch_bases(store: &Store, view: &IndexView, bloom: &mut Bloom) -> Result<u64> {
    let mut todo = Vec::new();
    view.for_each(|id, loc| {
        if loc.patch && bloom.contains(id) {
            todo.push(*id);
        }
        Ok(())
    })?;
    let mut seen: HashSet<ChunkId> = todo.iter().copied().collect();
    let mut payload = Vec::new();
    while let Some(id) = todo.pop() {
        let p = store.read_patch(&id, &mut payload).map_err(|e| {
            e.context(format!(
                "Failed to read patch {id} for its base; gc aborted"
            ))
        })?;
        if p.base.is_null() {
            continue;
        }
        bloom.insert(&p.base);
        // A base that is a patch (of a chain) needs its own base.
        let base_is_patch = view.lookup(&p.base)?.is_some_and(|l| l.patch);
        if base_is_patch && seen.insert(p.base) {
            todo.push(p.base);
        }
    }
    Ok(seen.len() as u64)
}

/// Read pack `p` and return its bytes with the live, verified records the
/// index attributes to it. A damaged record is a `Corrupt` error.
fn live_records(
    store: &Store,
    view: &IndexView,
    bloom: &Bloom,
    p: &PackId,
    buf: &mut Vec<u8>,
) -> Result<(Vec<u8>, Kept)> {
    let key = p.pack_key();
    let bytes = store
        .backend()
        .read(&key)
        .ctx(|| format!("Failed to read pack {key}"))?;
    let mut keep = Vec::new();
    for rec in scan(&bytes) {
        let rec =
            rec.map_err(|e| Error::corrupt(format!("Pack {key} is damaged")).with_source(e))?;
        let id = ChunkId(rec.header.id);
        if !bloom.contains(&id) {
            continue;
        }
        match view.lookup(&id)? {
            Some(loc) if loc.pack == *p && loc.offset == rec.offset => {}
            _ => continue,
        }
        store
            .codec()
            .decode_any(rec.record, &id, rec.header.stored_len, buf)
            .map_err(|e| {
                Error::corrupt(format!(
                    "Chunk {id} in pack {key} at offset {} is corrupt",
                    rec.offset
                ))
                .with_source(e)
                .with_chunk(id)
            })?;
        let start = rec.offset as usize;
        keep.push((id, rec.header.raw_len, start, start + rec.record.len()));
    }
    Ok((bytes, keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::BackupOptions;

    fn opts() -> BackupOptions<'static> {
        BackupOptions {
            pack_size: Some(64 << 10),
            ..Default::default()
        }
    }

    fn read_all(store: &Store, reference: &str) -> Vec<u8> {
        let r = store.open_snapshot(reference).unwrap();
        let mut v = vec![0u8; r.image_size() as usize];
        r.read_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn forget_then_gc_reclaims_and_keeps_the_rest() {
        let (dir, store) = setup(4096);
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        let img_a = image(10, 1 << 20);
        let mut img_b = image(11, 1 << 20);
        img_b[..256 << 10].copy_from_slice(&img_a[..256 << 10]);
        std::fs::write(&a, &img_a).unwrap();
        std::fs::write(&b, &img_b).unwrap();
        store.backup("a", &a, &opts()).unwrap();
        store.backup("b", &b, &opts()).unwrap();

        // gc with nothing forgotten frees nothing.
        let s = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(s.bytes_freed, 0, "{s:?}");

        let forgotten = store.forget("a").unwrap();
        assert_eq!(forgotten.name, "a");
        assert_eq!(store.resolve("a").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(store.snapshots(None).unwrap().len(), 1);

        // A fresh store handle whose index view predates gc.
        let stale = Store::open(store.path()).unwrap();
        let s = store
            .gc(&GcOptions {
                repack_threshold: 0.0,
            })
            .unwrap();
        assert_eq!(s.manifests_deleted, 1);
        assert!(s.bytes_freed > s.bytes_before / 4, "{s:?}");
        assert!(s.chunks_after < s.chunks_before);
        assert!(s.packs_deleted > 0);
        assert_eq!(read_all(&store, "b"), img_b);
        assert_eq!(
            read_all(&stale, "b"),
            img_b,
            "stale reader reloads the index"
        );
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());
        assert!(store.backend().list("snapshots/a").unwrap().is_empty());
    }

    #[test]
    fn gc_with_unmerged_pack_indexes_leaves_no_dangling_entries() {
        let (dir, store) = setup(4096);
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, image(20, 1 << 20)).unwrap();
        let img_b = image(21, 1 << 20);
        std::fs::write(&b, &img_b).unwrap();
        // Large packs: one per backup, never merged before gc.
        store.backup("a", &a, &BackupOptions::default()).unwrap();
        store.backup("b", &b, &BackupOptions::default()).unwrap();
        assert_eq!(store.index().unmerged_pack_count(), 2);
        store.forget("a").unwrap();
        store.gc(&GcOptions::default()).unwrap();
        let reopened = Store::open(store.path()).unwrap();
        let mut on_disk = list_packs(reopened.backend()).unwrap();
        on_disk.sort();
        assert_eq!(reopened.index().packs(), on_disk);
        let report = reopened.verify(None, &Default::default()).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(read_all(&reopened, "b"), img_b);
    }

    #[test]
    fn gc_keeps_forgotten_snapshot_held_by_a_reader() {
        let (dir, store) = setup(4096);
        let a = dir.path().join("a.img");
        let img = image(12, 512 << 10);
        std::fs::write(&a, &img).unwrap();
        store.backup("a", &a, &opts()).unwrap();
        let reader = store.open_snapshot("a").unwrap();
        store.forget("a").unwrap();
        // A reader opening after forget cannot get it.
        assert_eq!(
            store.open_snapshot("a").unwrap_err().kind(),
            ErrorKind::NotFound
        );

        let s = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(s.manifests_in_use, 1);
        assert_eq!(s.manifests_deleted, 0);
        assert_eq!(s.bytes_freed, 0);
        let mut v = vec![0u8; img.len()];
        reader.read_at(&mut v, 0).unwrap();
        assert_eq!(v, img);

        drop(reader);
        let s = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(s.manifests_deleted, 1);
        assert_eq!(s.chunks_after, 0);
        assert!(list_packs(store.backend()).unwrap().is_empty());
    }

    #[test]
    fn gc_deletes_orphan_packs_and_temp_files() {
        let (dir, store) = setup(4096);
        let a = dir.path().join("a.img");
        std::fs::write(&a, image(13, 256 << 10)).unwrap();
        store.backup("a", &a, &opts()).unwrap();
        // A pack without an index, as a crash between the two would leave.
        let mut w = PackWriter::new(1 << 20);
        let data = vec![9u8; 4096];
        let mut rec = Vec::new();
        crate::chunk::encode_record(&ChunkId::of(&data), &data, &mut rec);
        w.add(ChunkId::of(&data), 4096, &rec);
        let p = w.publish(store.backend()).unwrap().unwrap();
        store.backend().delete(&p.id.idx_key()).unwrap();
        std::fs::write(store.path().join("tmp/leftover.tmp"), b"x").unwrap();
        let s = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(s.orphan_packs_deleted, 1);
        assert!(!store.backend().exists(&p.id.pack_key()).unwrap());
        assert!(store.backend().list("tmp").unwrap().is_empty());
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());
    }
}
