//! Backup from a source that knows what changed: each chunk is `Data`
//! (read it), `Zero` (never read) or `Unchanged` since a given parent
//! snapshot (reuse the parent's chunk id, never read). Used by live backups
//! of running VMs, where a dirty bitmap says what changed.
//!
//! It runs the same pipeline as [`Store::backup`] (workers hash, dedup and
//! compress; packs are published before the manifest), with several reader
//! threads, so a source with latency (NBD) keeps several reads in flight.
//! Zero and unchanged runs go straight into the manifest.
//!
//! Correctness rests on the caller: `Unchanged` must mean "identical to
//! the parent snapshot at this chunk". The parent must have the same image
//! and chunk size; otherwise [`ChangedBackup::run`] refuses.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::{BackupOptions, BackupStats, Batch, Progress, Shared};
use crate::chunk::RecordKind;
use crate::error::{Error, Result};
use crate::format::MAX_PATCH_CHAIN;
use crate::id::ChunkId;
use crate::lock::WriterLock;
use crate::patch::{self, ChainInfo, GRAIN};
use crate::repo::Store;
use crate::snapshot::manifest::ENTRY_LEN;
use crate::snapshot::reader::SnapshotReader;
use crate::snapshot::{self, validate_name, SnapshotInfo};

/// What to do with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Changed: read and store it.
    Data,
    /// All zeros: never read.
    Zero,
    /// Identical to the parent snapshot's chunk: reuse its id.
    Unchanged,
    /// Changed in part since the parent snapshot: only the grains that
    /// [`ChangedSource::dirty_grains`] marks are read, and the chunk is
    /// stored as a patch over the parent's chunk ([`crate::patch`]), or
    /// whole once the patch would cover more than half of it.
    Partial,
}

/// A source that classifies its chunks and reads the `Data` ones.
/// `read_at` is called from several threads at once.
pub trait ChangedSource: Sync {
    /// State of chunk `chunk` (index in store chunks).
    fn chunk_state(&self, chunk: u64) -> ChunkState;
    /// Fill `buf` from `offset` (only ever whole `Data` chunk runs).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// For a `Partial` chunk: one flag per [`GRAIN`]-sized grain of the
    /// chunk, true where it changed. A source that never says `Partial`
    /// need not implement it.
    fn dirty_grains(&self, _chunk: u64) -> Vec<bool> {
        Vec::new()
    }
    /// Fill `buf` with the `(offset, len)` ranges back to back (the dirty
    /// grains of `Partial` chunks). A source with latency sends them all
    /// before waiting; the default reads them one by one.
    fn read_ranges(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        for &(offset, len) in ranges {
            self.read_at(offset, &mut buf[at..at + len])?;
            at += len;
        }
        Ok(())
    }
}

/// Options of [`ChangedBackup::run`].
#[derive(Clone)]
pub struct ChangedOptions<'a> {
    pub image_size: u64,
    /// Recorded as the snapshot's `source`.
    pub source: String,
    /// Id of the snapshot of the same name that `Unchanged` refers to.
    pub parent: Option<String>,
    pub progress: Option<Progress<'a>>,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Reader threads (reads in flight).
    pub readers: usize,
}

/// A backup in preparation: holds the writer lock from
/// [`Store::begin_changed_backup`] until dropped, so the caller can prepare
/// its source (talk to QEMU) knowing no other writer runs.
pub struct ChangedBackup<'s> {
    store: &'s Store,
    /// Shared by the sessions of one group point ([`Store::begin_changed_backups`]).
    _lock: std::sync::Arc<WriterLock>,
    name: String,
    newest: Option<SnapshotInfo>,
    created: Option<i64>,
}

impl Store {
    /// Take the writer lock for a changed-blocks backup of image `name`.
    pub fn begin_changed_backup(&self, name: &str) -> Result<ChangedBackup<'_>> {
        let mut one = self.begin_changed_backups(&[name])?;
        Ok(one.remove(0))
    }

    /// Take the writer lock once for changed-blocks backups of several
    /// images (the members of a group point): every session shares it, so
    /// no other writer runs until the last one is dropped. The sessions
    /// may run at once (each runs its own parallel pipeline; the index
    /// merge that ends each one is serialized in the store).
    pub fn begin_changed_backups(&self, names: &[&str]) -> Result<Vec<ChangedBackup<'_>>> {
        for name in names {
            validate_name(name)?;
        }
        if names.is_empty() {
            return Err(Error::invalid(
                "A changed-blocks backup needs an image name",
            ));
        }
        let lock = std::sync::Arc::new(self.lock_writer()?);
        names
            .iter()
            .map(|name| {
                let newest = match snapshot::list(self.backend(), Some(name), false)?.pop() {
                    Some(l) => Some(self.load_info(&l)?),
                    None => None,
                };
                Ok(ChangedBackup {
                    store: self,
                    _lock: lock.clone(),
                    name: (*name).to_owned(),
                    newest,
                    created: None,
                })
            })
            .collect()
    }
}

impl ChangedBackup<'_> {
    /// The newest live snapshot of this image, if any.
    pub fn newest(&self) -> Option<&SnapshotInfo> {
        self.newest.as_ref()
    }

    /// Stamps the snapshot with `micros` (µs since the epoch) as its id and
    /// creation time instead of the time the run starts: a protection
    /// point is the disk at its instant, so `--at` finds it by that time.
    /// A time not after every existing snapshot's id becomes the next
    /// microsecond after the newest (ids are unique and ordered).
    pub fn set_created(&mut self, micros: i64) {
        self.created = Some(micros);
    }

    /// Run the backup from `src`.
    pub fn run(&self, src: &dyn ChangedSource, opts: &ChangedOptions<'_>) -> Result<BackupStats> {
        let start = Instant::now();
        let parent = match &opts.parent {
            Some(id) => {
                let r = self.store.open_snapshot(&format!("{}@{id}", self.name))?;
                if r.image_size() != opts.image_size || r.chunk_size() != self.store.chunk_size() {
                    return Err(Error::invalid(format!(
                        "Parent snapshot {}@{id} has image size {} and chunk size {}; \
                         the source has {} and the store {}",
                        self.name,
                        r.image_size(),
                        r.chunk_size(),
                        opts.image_size,
                        self.store.chunk_size()
                    )));
                }
                Some(r)
            }
            None => None,
        };
        let bopts = BackupOptions {
            progress: opts.progress,
            threads: opts.threads,
            pack_size: None,
            no_parent: parent.is_none(),
        };
        self.store.backup_with(
            &self.name,
            opts.image_size,
            opts.source.clone(),
            parent,
            &bopts,
            start,
            self.created,
            |shared, parent, per_batch, free, work| {
                read_changed(shared, src, parent, per_batch, opts.readers, free, work)
            },
        )
    }
}

/// Hand out runs of same-state chunks: `Data` runs up to a batch, others
/// up to 64 batches.
fn take_run(
    next: &Mutex<u64>,
    src: &dyn ChangedSource,
    chunks: u64,
    per_batch: u64,
) -> Option<(u64, u64, ChunkState)> {
    let mut g = next.lock().unwrap_or_else(|p| p.into_inner());
    let first = *g;
    if first >= chunks {
        return None;
    }
    let state = src.chunk_state(first);
    let mut n = 1;
    if state == ChunkState::Partial {
        // Up to a batch of `Partial` chunks, with the `Unchanged` ones
        // between them: scattered writes make short runs, and one batch
        // (one pipelined read of all its dirty grains) per patch would
        // cost a round trip and a batch each.
        let (mut partial, mut last) = (1, 1);
        while partial < per_batch && n < per_batch * 64 && first + n < chunks {
            match src.chunk_state(first + n) {
                ChunkState::Partial => {
                    partial += 1;
                    last = n + 1;
                }
                ChunkState::Unchanged => {}
                _ => break,
            }
            n += 1;
        }
        n = last;
    } else {
        let limit = if state == ChunkState::Data {
            per_batch
        } else {
            per_batch * 64
        };
        while n < limit && first + n < chunks && src.chunk_state(first + n) == state {
            n += 1;
        }
    }
    *g = first + n;
    Some((first, n, state))
}

pub(super) fn read_changed(
    shared: &Shared<'_>,
    src: &dyn ChangedSource,
    parent: Option<&SnapshotReader>,
    per_batch: usize,
    readers: usize,
    free: &Receiver<Batch>,
    work: &Sender<Batch>,
) -> Result<()> {
    let cs = shared.chunk_size as u64;
    let chunks = shared.image_size.div_ceil(cs);
    let next = Mutex::new(0u64);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..readers.max(1))
            .map(|_| {
                s.spawn(|| {
                    let r = read_runs(
                        shared,
                        src,
                        parent,
                        per_batch as u64,
                        chunks,
                        &next,
                        free,
                        work,
                    );
                    if r.is_err() {
                        shared.abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let mut first_err = None;
        for t in threads {
            let r = t.join().unwrap_or_else(|_| {
                Err(Error::new(crate::ErrorKind::Io, "Backup reader panicked"))
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

#[allow(clippy::too_many_arguments)]
fn read_runs(
    shared: &Shared<'_>,
    src: &dyn ChangedSource,
    parent: Option<&SnapshotReader>,
    per_batch: u64,
    chunks: u64,
    next: &Mutex<u64>,
    free: &Receiver<Batch>,
    work: &Sender<Batch>,
) -> Result<()> {
    let cs = shared.chunk_size as u64;
    let c = &shared.counters;
    let mut ids: Vec<Option<ChunkId>> = Vec::new();
    let mut entries: Vec<u8> = Vec::new();
    let mut scratch = Scratch::default();
    while !shared.abort.load(Ordering::Relaxed) {
        let Some((first, n, state)) = take_run(next, src, chunks, per_batch) else {
            return Ok(());
        };
        let offset = first * cs;
        let len = ((first + n) * cs).min(shared.image_size) - offset;
        match state {
            ChunkState::Data => {
                let Ok(mut batch) = free.recv() else {
                    return Ok(());
                };
                let t = Instant::now();
                let read = src.read_at(offset, batch.room(len as usize));
                c.read_micros
                    .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                read.map_err(|e| {
                    Error::io(format!("Failed to read the source at offset {offset}"), e)
                })?;
                batch.first = first;
                batch.len = len as usize;
                match parent {
                    Some(p) => p.chunk_ids(first, n, &mut batch.parent)?,
                    None => batch.parent.clear(),
                }
                c.bytes_read.fetch_add(len, Ordering::Relaxed);
                if work.send(batch).is_err() {
                    return Ok(());
                }
            }
            ChunkState::Partial => {
                let p = parent.ok_or_else(|| {
                    Error::invalid(
                        "Source marks chunks changed in part but names no parent snapshot",
                    )
                })?;
                let Ok(mut batch) = free.recv() else {
                    return Ok(());
                };
                p.chunk_ids(first, n, &mut batch.parent)?;
                let read = partial_run(shared, src, first, n, &mut batch, &mut scratch)?;
                batch.first = first;
                batch.len = len as usize;
                c.bytes_read.fetch_add(read, Ordering::Relaxed);
                if work.send(batch).is_err() {
                    return Ok(());
                }
            }
            ChunkState::Zero | ChunkState::Unchanged => {
                entries.clear();
                if state == ChunkState::Zero {
                    entries.resize(n as usize * ENTRY_LEN, 0);
                    c.chunks_zero.fetch_add(n, Ordering::Relaxed);
                } else {
                    let p = parent.ok_or_else(|| {
                        Error::invalid("Source marks chunks unchanged but names no parent snapshot")
                    })?;
                    p.chunk_ids(first, n, &mut ids)?;
                    for id in &ids {
                        c.push_parent(&mut entries, *id);
                    }
                }
                shared.manifest.set_entries(first, &entries)?;
                if let Some(p) = shared.progress {
                    p(len);
                }
            }
        }
    }
    Ok(())
}

/// The grains of `new` that are set, as bits (`None` past 64 grains).
fn grain_bits(new: &[Option<&[u8]>]) -> Option<u64> {
    (new.len() <= 64).then(|| {
        new.iter()
            .enumerate()
            .filter(|(_, g)| g.is_some())
            .fold(0u64, |b, (i, _)| b | 1 << i)
    })
}

/// True when the index holds chunk `id` as a patch record.
fn store_is_patch(store: &Store, id: &ChunkId) -> Result<bool> {
    let loc = store.locate(id)?.ok_or_else(|| {
        Error::not_found(format!(
            "Chunk {id} of the parent snapshot is not in the index"
        ))
        .with_chunk(*id)
    })?;
    Ok(loc.patch)
}

/// Depth and coverage of patch `id`, a parent snapshot's entry for a chunk
/// of `len` bytes: from the store's hints, or read down its chain (each
/// patch's small payload, never the chunk data) and remembered. `None` when
/// a patch of the chain has grains this writer does not track (another
/// grain size, more than 64 grains): the chunk is then stored whole.
fn chain_info(
    store: &Store,
    id: &ChunkId,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<ChainInfo>> {
    let mut info = ChainInfo {
        depth: 0,
        covered: 0,
    };
    let mut cur = *id;
    loop {
        if let Some(h) = store.chain_hints().get(&cur) {
            info.depth += h.depth;
            info.covered |= h.covered;
            break;
        }
        info.depth += 1;
        if info.depth > MAX_PATCH_CHAIN {
            return Err(Error::corrupt(format!(
                "Patch {id} chains more than {MAX_PATCH_CHAIN} patches"
            ))
            .with_chunk(*id));
        }
        let p = store.read_patch(&cur, buf)?;
        if p.chunk_len as usize != len {
            return Err(Error::corrupt(format!(
                "Patch {cur} makes a chunk of {} bytes, the chunk has {len}",
                p.chunk_len
            ))
            .with_chunk(cur));
        }
        let Some(bits) = p.grain_bits().filter(|_| p.grain_size() == GRAIN) else {
            return Ok(None);
        };
        info.covered |= bits;
        if p.base.is_null() || !store_is_patch(store, &p.base)? {
            break;
        }
        cur = p.base;
    }
    store.chain_hints().insert(*id, info);
    Ok(Some(info))
}

/// How [`partial_run`] stores a chunk changed in part.
enum Layout {
    /// A patch of the new grains over the parent's entry (its chain hint,
    /// when this writer tracks its grains).
    OverParent(Option<ChainInfo>),
    /// The parent's entry is a patch (the id) as deep as chains go: one
    /// patch of its grains and the new ones over its base, so the chain
    /// keeps its depth.
    MergedWithParent(ChunkId, ChainInfo),
    /// The whole chunk (the chain would replace more than half of it).
    Whole,
}

/// Buffers of [`partial_run`], kept across runs.
#[derive(Default)]
struct Scratch {
    ranges: Vec<(u64, usize)>,
    grains: Vec<u8>,
    old: Vec<u8>,
    out: Vec<u8>,
}

/// Build the items of a run of `Partial` chunks `first..first + n` (with
/// `Unchanged` ones between them, which keep the parent's id) into `batch`
/// (whose `parent` holds the parent's ids): read the dirty grains of every
/// chunk at once, then per chunk a patch of the new grains over the
/// parent's entry (chunk data, or a patch: a chain); at
/// [`MAX_PATCH_CHAIN`], one patch of the parent patch's grains and the new
/// ones over the parent's base; or the whole chunk once the chain would
/// replace more than half of it (the parent's chunk read from the store,
/// never from the source).
/// Returns the bytes read from the source.
fn partial_run(
    shared: &Shared<'_>,
    src: &dyn ChangedSource,
    first: u64,
    n: u64,
    batch: &mut super::Batch,
    s: &mut Scratch,
) -> Result<u64> {
    let store = shared.store;
    store.enable_patches()?;
    let cs = shared.chunk_size as u64;
    let chunk_len = |c: u64| ((c + 1) * cs).min(shared.image_size) - c * cs;
    // Every dirty grain of the run, in order: one read request each run
    // of adjacent grains. An unchanged chunk has no mask.
    let masks: Vec<Option<Vec<bool>>> = (first..first + n)
        .map(|c| (src.chunk_state(c) == ChunkState::Partial).then(|| src.dirty_grains(c)))
        .collect();
    s.ranges.clear();
    for (k, mask) in masks.iter().enumerate() {
        let Some(mask) = mask else { continue };
        let c = first + k as u64;
        let len = chunk_len(c);
        if mask.len() != (len as usize).div_ceil(GRAIN) || !mask.iter().any(|&d| d) {
            return Err(Error::invalid(format!(
                "Source marks chunk {c} changed in part with a grain mask of {} grains ({} set) for a chunk of {len} bytes",
                mask.len(),
                mask.iter().filter(|&&d| d).count()
            )));
        }
        for (g, _) in mask.iter().enumerate().filter(|(_, &d)| d) {
            let off = c * cs + (g * GRAIN) as u64;
            let glen = ((g + 1) * GRAIN).min(len as usize) - g * GRAIN;
            match s.ranges.last_mut() {
                Some(r) if r.0 + r.1 as u64 == off => r.1 += glen,
                _ => s.ranges.push((off, glen)),
            }
        }
    }
    let total: usize = s.ranges.iter().map(|r| r.1).sum();
    s.grains.resize(total, 0);
    let t = Instant::now();
    let read = src.read_ranges(&s.ranges, &mut s.grains);
    shared
        .counters
        .read_micros
        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    read.map_err(|e| {
        Error::io(
            format!(
                "Failed to read the changed grains of chunks {first}..{}",
                first + n
            ),
            e,
        )
    })?;
    batch.items.clear();
    batch.hints.clear();
    let mut at = 0;
    for (k, mask) in masks.iter().enumerate() {
        let Some(mask) = mask else {
            batch.push_item(None, &[]);
            continue;
        };
        let c = first + k as u64;
        let len = chunk_len(c) as usize;
        // The new grains of this chunk, in `s.grains` from `at`.
        let mut new: Vec<Option<&[u8]>> = vec![None; mask.len()];
        for (g, _) in mask.iter().enumerate().filter(|(_, &d)| d) {
            let glen = ((g + 1) * GRAIN).min(len) - g * GRAIN;
            new[g] = Some(&s.grains[at..at + glen]);
            at += glen;
        }
        // The parent's entry: chunk data (or zeros), or a patch to chain on.
        let pid = batch.parent.get(k).copied().flatten();
        let new_bits = grain_bits(&new);
        let chain = match pid {
            Some(pid) if store_is_patch(store, &pid)? => {
                Some((pid, chain_info(store, &pid, len, &mut s.old)?))
            }
            _ => None,
        };
        let grains = new.len();
        let layout = match (chain, new_bits) {
            (None, _) => {
                let count = new.iter().filter(|g| g.is_some()).count();
                if patch::should_materialize(count, grains) {
                    Layout::Whole
                } else {
                    Layout::OverParent(new_bits.map(|covered| ChainInfo { depth: 1, covered }))
                }
            }
            (Some((parent, Some(c))), Some(bits)) => {
                let covered = c.covered | bits;
                if patch::should_materialize(covered.count_ones() as usize, grains) {
                    Layout::Whole
                } else if c.depth < MAX_PATCH_CHAIN {
                    Layout::OverParent(Some(ChainInfo {
                        depth: c.depth + 1,
                        covered,
                    }))
                } else {
                    Layout::MergedWithParent(
                        parent,
                        ChainInfo {
                            depth: c.depth,
                            covered,
                        },
                    )
                }
            }
            // Grains this writer cannot track.
            (Some(_), _) => Layout::Whole,
        };
        match layout {
            Layout::OverParent(hint) => {
                patch::encode(&pid.unwrap_or_default(), len as u32, |g| new[g], &mut s.out);
                if let Some(h) = hint {
                    batch.hints.push((batch.items.len(), h));
                }
                batch.push_item(Some(RecordKind::Patch), &s.out);
            }
            Layout::MergedWithParent(parent, hint) => {
                // The parent patch's grains and the new ones (which win),
                // over the parent's base: the chain keeps its depth.
                let p = store.read_patch(&parent, &mut s.old)?;
                if p.chunk_len as usize != len || p.grain_size() != GRAIN {
                    return Err(
                        Error::corrupt(format!("Patch {parent} does not fit chunk {c}"))
                            .with_chunk(parent),
                    );
                }
                let mut merged = new.clone();
                for (g, d) in p.iter() {
                    merged[g] = merged[g].or(Some(d));
                }
                patch::encode(&p.base, len as u32, |g| merged[g], &mut s.out);
                batch.hints.push((batch.items.len(), hint));
                batch.push_item(Some(RecordKind::Patch), &s.out);
            }
            Layout::Whole => {
                // Whole chunk: the parent's (its chain resolved), with the
                // new grains, from the store.
                s.out.clear();
                match pid {
                    None => s.out.resize(len, 0),
                    Some(pid) => store.read_chunk(&pid, &mut s.out)?,
                }
                if s.out.len() != len {
                    return Err(Error::corrupt(format!(
                        "Parent chunk {c} has {} bytes, expected {len}",
                        s.out.len()
                    )));
                }
                for (g, d) in new.iter().enumerate() {
                    if let Some(d) = d {
                        s.out[g * GRAIN..g * GRAIN + d.len()].copy_from_slice(d);
                    }
                }
                batch.push_item(Some(RecordKind::Data), &s.out);
            }
        }
    }
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::restore::RestoreOptions;

    /// An in-memory source with a per-chunk plan; counts the bytes read.
    struct Mem<'a> {
        data: &'a [u8],
        plan: Vec<ChunkState>,
        read: std::sync::atomic::AtomicU64,
    }

    impl ChangedSource for Mem<'_> {
        fn chunk_state(&self, chunk: u64) -> ChunkState {
            self.plan[chunk as usize]
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            for (i, _) in buf.chunks(4096).enumerate() {
                assert_eq!(
                    self.plan[(o / 4096) + i],
                    ChunkState::Data,
                    "read of a non-data chunk"
                );
            }
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(())
        }
    }

    fn opts(size: usize, parent: Option<String>) -> ChangedOptions<'static> {
        ChangedOptions {
            image_size: size as u64,
            source: "test".into(),
            parent,
            progress: None,
            threads: Some(2),
            readers: 3,
        }
    }

    #[test]
    fn changed_chunks_only_are_read_and_the_result_is_exact() {
        let (dir, store) = setup(4096);
        let size = 4096 * 300 + 1024;
        let mut img = image(7, size);
        img[..4096 * 10].fill(0);
        let chunks = size.div_ceil(4096);
        let full = Mem {
            data: &img,
            plan: (0..chunks)
                .map(|c| {
                    if c < 10 {
                        ChunkState::Zero
                    } else {
                        ChunkState::Data
                    }
                })
                .collect(),
            read: Default::default(),
        };
        let b = store.begin_changed_backup("vm").unwrap();
        assert!(b.newest().is_none());
        let s1 = b.run(&full, &opts(size, None)).unwrap();
        drop(b);
        assert_eq!(s1.bytes_read, (size - 4096 * 10) as u64);
        assert_eq!(full.read.load(Ordering::Relaxed), s1.bytes_read);

        // Change chunks 20, 21 and the short last one; zero chunk 50.
        img[20 * 4096..22 * 4096].fill(0x5a);
        img[300 * 4096..].fill(0x11);
        img[50 * 4096..51 * 4096].fill(0);
        let plan = (0..chunks)
            .map(|c| match c {
                20 | 21 | 300 => ChunkState::Data,
                50 => ChunkState::Zero,
                _ => ChunkState::Unchanged,
            })
            .collect();
        let inc = Mem {
            data: &img,
            plan,
            read: Default::default(),
        };
        let b = store.begin_changed_backup("vm").unwrap();
        assert_eq!(b.newest().unwrap().id, s1.snapshot);
        // Another writer is locked out meanwhile.
        assert_eq!(
            store.begin_changed_backup("vm").err().unwrap().kind(),
            crate::ErrorKind::Locked
        );
        let s2 = b.run(&inc, &opts(size, Some(s1.snapshot.clone()))).unwrap();
        drop(b);
        assert_eq!(s2.bytes_read, 4096 * 2 + 1024);
        assert_eq!(s2.parent.as_deref(), Some(s1.snapshot.as_str()));
        // At most 4 entries differ from the parent (<= 301 / 64): a delta.
        let (base, n) = s2.delta.clone().expect("a delta manifest");
        assert!(base == s1.snapshot && (3..=4).contains(&n), "{base} {n}");
        let out = dir.path().join("out.img");
        store
            .restore("vm", &out, &RestoreOptions::default())
            .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == img,
            "restored image differs"
        );
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());

        // Unchanged without a parent, or a parent of another size: refused.
        let b = store.begin_changed_backup("vm").unwrap();
        assert!(b.run(&inc, &opts(size, None)).is_err());
        assert!(b
            .run(&inc, &opts(size - 512, Some(s2.snapshot.clone())))
            .is_err());
    }

    /// The sessions of one writer lock run at once (a group point's
    /// members read in parallel) and each ends with an index merge: every
    /// pack stays indexed, every snapshot restores exactly, from a fresh
    /// open too.
    #[test]
    fn sessions_of_one_lock_ending_at_once_keep_every_pack_indexed() {
        let (dir, store) = setup(4096);
        let size = 4096 * 16;
        let data_plan = |n| (0..n).map(|_| ChunkState::Data).collect::<Vec<_>>();
        // Fill the unmerged index up to the merge threshold: each backup
        // of new data publishes one pack.
        for i in 0..crate::index::MERGE_THRESHOLD {
            let img = image(100 + i as u64, size);
            let src = Mem {
                data: &img,
                plan: data_plan(16),
                read: Default::default(),
            };
            let b = store.begin_changed_backup(&format!("fill{i}")).unwrap();
            b.run(&src, &opts(size, None)).unwrap();
        }
        let names = ["a", "b", "c", "d"];
        let imgs: Vec<Vec<u8>> = (0..names.len())
            .map(|i| image(200 + i as u64, size))
            .collect();
        let sessions = store.begin_changed_backups(&names).unwrap();
        std::thread::scope(|s| {
            for (b, img) in sessions.iter().zip(&imgs) {
                s.spawn(move || {
                    let src = Mem {
                        data: img,
                        plan: data_plan(16),
                        read: Default::default(),
                    };
                    b.run(&src, &opts(size, None)).unwrap();
                });
            }
        });
        drop(sessions);
        let fresh = Store::open(&dir.path().join("store")).unwrap();
        for st in [&store, &fresh] {
            for (name, img) in names.iter().zip(&imgs) {
                let out = dir.path().join(format!("{name}.img"));
                st.restore(name, &out, &RestoreOptions::default()).unwrap();
                assert!(std::fs::read(&out).unwrap() == *img, "{name} differs");
                std::fs::remove_file(&out).unwrap();
            }
        }
        assert!(fresh.verify(None, &Default::default()).unwrap().is_ok());
    }

    /// A source that fails its reads from the `fail_from`-th on.
    struct Failing<'a> {
        inner: Mem<'a>,
        fail_from: usize,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl ChangedSource for Failing<'_> {
        fn chunk_state(&self, chunk: u64) -> ChunkState {
            self.inner.chunk_state(chunk)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if self.calls.fetch_add(1, Ordering::Relaxed) >= self.fail_from {
                return Err(io::Error::other("source went away"));
            }
            self.inner.read_at(offset, buf)
        }
    }

    #[test]
    fn a_point_that_fails_midway_leaves_no_point_and_the_next_is_complete() {
        let (dir, store) = setup(4096);
        let size = 4096 * 256;
        let mut img = image(9, size);
        let all = |img: &[u8]| -> Vec<ChunkState> {
            img.chunks(4096).map(|_| ChunkState::Data).collect()
        };
        let b = store.begin_changed_backup("vm").unwrap();
        let plan = all(&img);
        let s1 = b
            .run(
                &Mem {
                    data: &img,
                    plan,
                    read: Default::default(),
                },
                &opts(size, None),
            )
            .unwrap();
        drop(b);
        // Change chunks 3 and 200 (two separate Data runs); the source
        // fails after the first read: packs may be written, no point is.
        img[3 * 4096..4 * 4096].fill(0x33);
        img[200 * 4096..201 * 4096].fill(0x44);
        let plan: Vec<ChunkState> = (0..256)
            .map(|c| {
                if c == 3 || c == 200 {
                    ChunkState::Data
                } else {
                    ChunkState::Unchanged
                }
            })
            .collect();
        let failing = Failing {
            inner: Mem {
                data: &img,
                plan: plan.clone(),
                read: Default::default(),
            },
            fail_from: 1,
            calls: Default::default(),
        };
        let b = store.begin_changed_backup("vm").unwrap();
        assert!(b
            .run(&failing, &opts(size, Some(s1.snapshot.clone())))
            .is_err());
        drop(b);
        let listed: Vec<String> = store
            .snapshots(Some("vm"))
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(listed, vec![s1.snapshot.clone()]);
        // The next point (same parent: the newest complete one) is whole.
        let b = store.begin_changed_backup("vm").unwrap();
        let s2 = b
            .run(
                &Mem {
                    data: &img,
                    plan,
                    read: Default::default(),
                },
                &opts(size, Some(s1.snapshot.clone())),
            )
            .unwrap();
        drop(b);
        assert_eq!(s2.delta, Some((s1.snapshot.clone(), 2)));
        let out = dir.path().join("out.img");
        store
            .restore("vm", &out, &RestoreOptions::default())
            .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == img,
            "restored point differs"
        );
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());
    }
}
