//! Backup: read an image, store its new chunks, publish a snapshot.
//!
//! Pipeline (all inside one `std::thread::scope`):
//! ```text
//! reader thread ──batches──▶ N workers ──records──▶ pack writer (calling thread)
//!   pread source               zero check, blake3,      PackWriter: publish pack,
//!   + parent ids               dedup, lz4 (new only),   then its .idx
//!                              pwrite manifest entries
//! ```
//! Buffers circulate through two bounded pools, so the hot loop allocates
//! nothing. A chunk whose id equals the parent snapshot's id at the same index
//! skips the index lookup; otherwise the merged index is consulted, and a
//! session set makes sure each new chunk is stored once.
//!
//! Sources: the reader asks a [`changed::ChangedSource`] what each chunk is:
//! `Data` (read it), `Zero` (never read; the manifest entry stays zero) or
//! `Unchanged` since a given parent (reuse the parent's id, never read). A
//! file or block device is a [`file::FileSource`] (holes of a sparse file are
//! `Zero`, found with `SEEK_DATA`/`SEEK_HOLE`); a live backup's dirty bitmap or
//! an NBD block-status source implements the same trait.
//!
//! Crash safety: packs and their indexes are published (fsync + rename +
//! directory fsync) before the manifest, and the manifest is published last,
//! atomically. A crash or ENOSPC at any point leaves at most unreferenced
//! packs (reused for dedup by the next backup, or reclaimed by gc) and temp
//! files (removed by the next writer).

pub mod changed;
pub mod file;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;
use tracing::{debug, info, info_span, warn};

use crate::chunk::{is_zero, record_bound, RecordKind};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::index::{self, IndexView, MERGE_THRESHOLD};
use crate::pack::{PackWriter, PACK_TARGET_SIZE};
use crate::patch::ChainInfo;
use crate::repo::Store;
#[cfg(test)]
use crate::restore::RestoreOptions;
use crate::snapshot::delta;
use crate::snapshot::manifest::{ManifestWriter, ENTRY_LEN};
use crate::snapshot::reader::SnapshotReader;
use crate::snapshot::{
    self, manifest_key, micros_from_id, now_micros, validate_name, SnapshotInfo,
};
use file::FileSource;

/// A progress callback: called with the number of bytes just processed.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// Options of [`Store::backup`].
#[derive(Clone, Copy, Default)]
pub struct BackupOptions<'a> {
    /// Called with byte counts as the image is processed.
    pub progress: Option<Progress<'a>>,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Target pack size (default 32 MiB).
    pub pack_size: Option<usize>,
    /// Ignore the previous snapshot of the same name.
    pub no_parent: bool,
}

impl std::fmt::Debug for BackupOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("threads", &self.threads)
            .field("pack_size", &self.pack_size)
            .field("no_parent", &self.no_parent)
            .finish()
    }
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupStats {
    /// Id of the new snapshot.
    pub snapshot: String,
    /// Image name.
    pub name: String,
    /// Parent snapshot id, if any.
    pub parent: Option<String>,
    pub image_size: u64,
    /// Bytes read from the source: holes of a sparse file, zero and
    /// unchanged chunks of a changed-blocks source are never read.
    pub bytes_read: u64,
    /// Bytes added to packs (records incl. headers).
    pub bytes_new: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Of the new chunks, those stored as patch records (a base chunk id
    /// and the changed grains, see [`crate::patch`]).
    pub chunks_patch: u64,
    pub chunks_zero: u64,
    /// Chunks identical to the parent's at the same index.
    pub chunks_parent: u64,
    pub packs_new: u64,
    /// When the snapshot was written as a delta manifest: its base and
    /// entry count (see [`crate::snapshot::delta`]).
    pub delta: Option<(String, u64)>,
    /// Size of the published manifest in bytes.
    pub manifest_bytes: u64,
    pub seconds: f64,
}

/// Open a source image and return it with its size (a multiple of 512).
pub fn open_source(source: &Path) -> Result<(File, u64)> {
    let mut file =
        File::open(source).map_err(|e| Error::io_path("Failed to open source", source, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io_path("Failed to stat source", source, e))?;
    let ft = meta.file_type();
    let size = if ft.is_block_device() {
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io_path("Failed to get the size of block device", source, e))?
    } else if ft.is_file() {
        meta.len()
    } else {
        return Err(Error::invalid(format!(
            "Source {} is not a regular file or block device",
            source.display()
        )));
    };
    if size % 512 != 0 {
        return Err(Error::invalid(format!(
            "Source {} has size {size}, which is not a multiple of 512 bytes",
            source.display()
        )));
    }
    Ok((file, size))
}

/// Alignment of batch buffers: what `O_DIRECT` reads need (see `file.rs`).
pub(crate) const READ_ALIGN: usize = 4096;

struct Batch {
    first: u64,
    len: usize,
    /// Allocated with [`READ_ALIGN`] spare bytes; the data starts at `at`,
    /// the first aligned byte, so a source can read into it with `O_DIRECT`.
    data: Vec<u8>,
    at: usize,
    parent: Vec<Option<ChunkId>>,
    /// Empty: the data is the chunks `first..` back to back. Otherwise one
    /// item per chunk from `first` (a partly changed run): its kind (`None`:
    /// unchanged, keep the parent's id) and the end of its bytes in the
    /// data (whole chunk data, or a patch payload).
    items: Vec<(Option<RecordKind>, usize)>,
    /// Chain hints of the patch items: `(item index, info)`, in item order;
    /// a worker files each under the patch's id once it has hashed it.
    hints: Vec<(usize, ChainInfo)>,
}

impl Batch {
    fn new(capacity: usize, chunks: usize) -> Batch {
        let data = vec![0u8; capacity + READ_ALIGN];
        // `align_offset` may give up (usize::MAX); the buffer then is merely
        // unaligned and the source reads it through the page cache.
        let at = data.as_ptr().align_offset(READ_ALIGN).min(READ_ALIGN);
        Batch {
            first: 0,
            len: 0,
            data,
            at,
            parent: Vec::with_capacity(chunks),
            items: Vec::new(),
            hints: Vec::new(),
        }
    }

    /// The batch's bytes.
    fn bytes(&self) -> &[u8] {
        &self.data[self.at..self.at + self.len]
    }

    /// Room for `len` bytes, to read into.
    fn room(&mut self, len: usize) -> &mut [u8] {
        &mut self.data[self.at..self.at + len]
    }

    /// The batch's items: `(kind, bytes)` per chunk (see `items`).
    fn items(&self) -> impl Iterator<Item = (Option<RecordKind>, &[u8])> {
        let data = &self.data[self.at..];
        let mut start = 0;
        self.items.iter().map(move |&(kind, end)| {
            let d = &data[start..end];
            start = end;
            (kind, d)
        })
    }

    /// Append an item of `kind` (the next chunk of the batch).
    pub(crate) fn push_item(&mut self, kind: Option<RecordKind>, bytes: &[u8]) {
        let start = self.items.last().map_or(0, |i| i.1);
        let end = start + bytes.len();
        if self.data.len() < self.at + end {
            self.data.resize(self.at + end, 0);
        }
        self.data[self.at + start..self.at + end].copy_from_slice(bytes);
        self.items.push((kind, end));
    }
}

struct Output {
    /// Records in `records[..used]`; the buffer keeps its length between
    /// batches, so encoding never clears or zeroes it again.
    records: Vec<u8>,
    used: usize,
    /// (id, raw_len, end offset in `records`).
    chunks: Vec<(ChunkId, u32, usize)>,
}

impl Counters {
    /// Append the manifest entry of an unchanged chunk whose parent entry
    /// is `id` (`None`: zero), counting it.
    fn push_parent(&self, entries: &mut Vec<u8>, id: Option<ChunkId>) {
        match id {
            Some(id) => {
                entries.extend_from_slice(&id.0);
                self.chunks_parent.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                entries.extend_from_slice(&[0u8; ENTRY_LEN]);
                self.chunks_zero.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    chunks_zero: AtomicU64,
    chunks_parent: AtomicU64,
    chunks_new: AtomicU64,
    chunks_patch: AtomicU64,
    /// Time the readers spent waiting for the source (µs, all readers).
    read_micros: AtomicU64,
}

struct Shared<'a> {
    store: &'a Store,
    view: &'a IndexView,
    manifest: &'a ManifestWriter,
    seen: Mutex<HashSet<ChunkId>>,
    /// Packs published by this backup (discarded if it fails).
    published: Mutex<Vec<PackId>>,
    counters: Counters,
    abort: AtomicBool,
    progress: Option<Progress<'a>>,
    chunk_size: usize,
    image_size: u64,
}

impl Store {
    /// Back up `source` (a raw image file or block device) as a new snapshot
    /// of image `name`.
    pub fn backup(
        &self,
        name: &str,
        source: &Path,
        opts: &BackupOptions<'_>,
    ) -> Result<BackupStats> {
        validate_name(name)?;
        let span = info_span!("backup", name, source = %source.display());
        let _e = span.enter();
        let start = Instant::now();
        let src = FileSource::open(source, self.chunk_size())?;
        let image_size = src.size();
        let _lock = self.lock_writer()?;

        let parent = if opts.no_parent {
            None
        } else {
            match snapshot::list(self.backend(), Some(name), false)?.pop() {
                Some(l) => match SnapshotReader::open(self, &l) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        warn!("not using parent snapshot {}@{}: {e:?}", l.name, l.id);
                        None
                    }
                },
                None => None,
            }
        };
        let source_desc = std::fs::canonicalize(source)
            .unwrap_or_else(|_| source.to_path_buf())
            .display()
            .to_string();
        self.backup_with(
            name,
            image_size,
            source_desc,
            parent,
            opts,
            start,
            None,
            // Holes are zero chunks, never read (see `file.rs`).
            |shared, parent, per_batch, free, work| {
                changed::read_changed(shared, &src, parent, per_batch, src.readers(), free, work)
            },
        )
    }

    /// The part of a backup every source shares: manifest, pipeline
    /// (`read` fills batches), publish, index merge, stats. The caller
    /// holds the writer lock.
    #[allow(clippy::too_many_arguments)]
    fn backup_with<R>(
        &self,
        name: &str,
        image_size: u64,
        source: String,
        parent: Option<SnapshotReader>,
        opts: &BackupOptions<'_>,
        start: Instant,
        created: Option<i64>,
        read: R,
    ) -> Result<BackupStats>
    where
        R: FnOnce(
                &Shared<'_>,
                Option<&SnapshotReader>,
                usize,
                &Receiver<Batch>,
                &Sender<Batch>,
            ) -> Result<()>
            + Send,
    {
        let all = snapshot::list(self.backend(), None, true)?;
        let last_micros = all
            .iter()
            .filter_map(|l| micros_from_id(&l.id))
            .max()
            .unwrap_or(0);
        // The snapshot's id is its creation time: `created` when the caller
        // sets it (a protection point's instant), else now; always after
        // every existing id, so ids stay unique and ordered.
        let created = created.unwrap_or_else(now_micros).max(last_micros + 1);
        let info = SnapshotInfo {
            id: String::new(),
            name: name.to_string(),
            image_size,
            chunk_size: self.chunk_size(),
            chunk_count: 0,
            created: String::new(),
            source,
            parent: parent.as_ref().map(|p| p.info().id.clone()),
        };
        let manifest = ManifestWriter::create(self.backend(), info, created)?;
        let view = self.index();
        let shared = Shared {
            store: self,
            view: &view,
            manifest: &manifest,
            seen: Mutex::new(HashSet::new()),
            published: Mutex::new(Vec::new()),
            counters: Counters::default(),
            abort: AtomicBool::new(false),
            progress: opts.progress,
            chunk_size: self.chunk_size() as usize,
            image_size,
        };
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let pipeline = run_pipeline(
            &shared,
            parent.as_ref(),
            threads,
            opts.pack_size.unwrap_or(PACK_TARGET_SIZE),
            read,
        );

        let c = &shared.counters;
        let counts = (
            c.bytes_read.load(Ordering::Relaxed),
            c.chunks_new.load(Ordering::Relaxed),
            c.chunks_zero.load(Ordering::Relaxed),
            c.chunks_parent.load(Ordering::Relaxed),
            c.chunks_patch.load(Ordering::Relaxed),
        );
        debug!(
            pipeline_s = start.elapsed().as_secs_f64(),
            source_wait_s = c.read_micros.load(Ordering::Relaxed) as f64 / 1e6,
            "pipeline done"
        );
        let published =
            std::mem::take(&mut *shared.published.lock().unwrap_or_else(|p| p.into_inner()));
        drop(shared);
        let key = manifest_key(name, &manifest.info().id.clone());
        let done = pipeline.and_then(|written| {
            Ok((
                written,
                self.publish_manifest(manifest, parent.as_ref(), &key)?,
            ))
        });
        let ((bytes_new, packs_new), (info, delta)) = match done {
            Ok(x) => x,
            Err(e) => {
                self.discard_packs(&published);
                return Err(e);
            }
        };
        drop(parent);
        debug!(
            seconds = start.elapsed().as_secs_f64(),
            "manifest published"
        );

        let merging = self.merging();
        let view = IndexView::load(self.backend())?;
        if view.unmerged_pack_count() > MERGE_THRESHOLD {
            let merged = index::merge(self.backend(), &view, &HashSet::new())?;
            self.set_index(merged);
        } else {
            self.set_index(view);
        }
        drop(merging);
        let stats = BackupStats {
            snapshot: info.id,
            name: name.to_string(),
            parent: info.parent,
            image_size,
            bytes_read: counts.0,
            bytes_new,
            chunks_total: info.chunk_count,
            chunks_new: counts.1,
            chunks_patch: counts.4,
            chunks_zero: counts.2,
            chunks_parent: counts.3,
            packs_new,
            delta,
            manifest_bytes: self.backend().size(&key).unwrap_or(0),
            seconds: start.elapsed().as_secs_f64(),
        };
        info!(
            snapshot = %stats.snapshot,
            bytes_new = stats.bytes_new,
            chunks_new = stats.chunks_new,
            chunks_patch = stats.chunks_patch,
            seconds = stats.seconds,
            "backup done"
        );
        Ok(stats)
    }
}

impl Store {
    /// Publish the manifest last: as a delta on the parent's base when that
    /// is small enough (see [`crate::snapshot::delta`]), else in full.
    fn publish_manifest(
        &self,
        manifest: ManifestWriter,
        parent: Option<&SnapshotReader>,
        key: &str,
    ) -> Result<(SnapshotInfo, Option<(String, u64)>)> {
        let info = manifest.info().clone();
        let limit = info.chunk_count / delta::DELTA_DIVISOR;
        if let Some(base) = parent.map(SnapshotReader::base_reader) {
            if limit > 0 && base.image_size() == info.image_size && base.info().name == info.name {
                let found = delta::diff(&manifest, info.chunk_count, limit, |first, buf| {
                    base.raw_entries(first, buf)
                })?;
                if let Some(entries) = found {
                    let base_id = base.info().id.clone();
                    delta::publish_delta(
                        self.backend(),
                        &info,
                        manifest.created_micros(),
                        &base_id,
                        &entries,
                        key,
                    )?;
                    return Ok((info, Some((base_id, entries.len() as u64))));
                }
            }
        }
        Ok((manifest.publish(self.backend(), key)?, None))
    }
}

fn run_pipeline<R>(
    shared: &Shared<'_>,
    parent: Option<&SnapshotReader>,
    threads: usize,
    pack_size: usize,
    read: R,
) -> Result<(u64, u64)>
where
    R: FnOnce(
            &Shared<'_>,
            Option<&SnapshotReader>,
            usize,
            &Receiver<Batch>,
            &Sender<Batch>,
        ) -> Result<()>
        + Send,
{
    let cs = shared.chunk_size;
    let per_batch = ((1usize << 20) / cs).max(1);
    let pool_size = threads * 2 + 2;
    let (work_tx, work_rx) = bounded::<Batch>(pool_size);
    let (free_tx, free_rx) = bounded::<Batch>(pool_size);
    let (out_tx, out_rx) = bounded::<Output>(pool_size);
    let (out_free_tx, out_free_rx) = bounded::<Output>(pool_size);
    for _ in 0..pool_size {
        let _ = free_tx.send(Batch::new(per_batch * cs, per_batch));
        let _ = out_free_tx.send(Output {
            records: Vec::new(),
            used: 0,
            chunks: Vec::new(),
        });
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let r = read(shared, parent, per_batch, &free_rx, &work_tx);
            if r.is_err() {
                shared.abort.store(true, Ordering::Relaxed);
            }
            r
        });
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (work_rx, free_tx, out_tx, out_free_rx) = (
                work_rx.clone(),
                free_tx.clone(),
                out_tx.clone(),
                out_free_rx.clone(),
            );
            workers.push(s.spawn(move || {
                let r = work(shared, &work_rx, &free_tx, &out_tx, &out_free_rx);
                if r.is_err() {
                    shared.abort.store(true, Ordering::Relaxed);
                }
                r
            }));
        }
        drop((work_rx, free_tx, out_tx, out_free_rx));
        let written = write_packs(shared, &out_rx, out_free_tx, pack_size);
        if written.is_err() {
            shared.abort.store(true, Ordering::Relaxed);
        }
        drop(out_rx);
        let mut first_err = None;
        let join = |r: std::thread::Result<Result<()>>| match r {
            Ok(r) => r,
            Err(_) => Err(Error::new(crate::ErrorKind::Io, "Backup worker panicked")),
        };
        for r in
            std::iter::once(join(reader.join())).chain(workers.into_iter().map(|w| join(w.join())))
        {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        let written = written?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(written),
        }
    })
}

fn work(
    shared: &Shared<'_>,
    work: &Receiver<Batch>,
    free: &Sender<Batch>,
    out: &Sender<Output>,
    out_free: &Receiver<Output>,
) -> Result<()> {
    let cs = shared.chunk_size;
    let mut entries = Vec::with_capacity(((1usize << 20) / cs).max(1) * ENTRY_LEN);
    while let Ok(mut batch) = work.recv() {
        if shared.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Ok(mut output) = out_free.recv() else {
            return Ok(());
        };
        output.used = 0;
        output.chunks.clear();
        entries.clear();
        let c = &shared.counters;
        let mut items: Box<dyn Iterator<Item = (Option<RecordKind>, &[u8])>> =
            if batch.items.is_empty() {
                Box::new(
                    batch
                        .bytes()
                        .chunks(cs)
                        .map(|d| (Some(RecordKind::Data), d)),
                )
            } else {
                Box::new(batch.items())
            };
        for (i, (kind, data)) in items.by_ref().enumerate() {
            let Some(kind) = kind else {
                // Unchanged inside a partly changed run: the parent's entry.
                c.push_parent(&mut entries, batch.parent.get(i).copied().flatten());
                continue;
            };
            if kind == RecordKind::Data && is_zero(data) {
                entries.extend_from_slice(&[0u8; ENTRY_LEN]);
                c.chunks_zero.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let id = match kind {
                RecordKind::Data => shared.store.chunk_id(data),
                RecordKind::Patch => shared.store.codec().patch_id(data),
            };
            if let Ok(h) = batch.hints.binary_search_by_key(&i, |h| h.0) {
                shared.store.chain_hints().insert(id, batch.hints[h].1);
            }
            entries.extend_from_slice(&id.0);
            if batch.parent.get(i).copied().flatten() == Some(id) {
                c.chunks_parent.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if shared.view.lookup(&id)?.is_some() {
                continue;
            }
            let fresh = match shared.seen.lock() {
                Ok(mut g) => g.insert(id),
                Err(p) => p.into_inner().insert(id),
            };
            if !fresh {
                continue;
            }
            let need = output.used + record_bound(data.len());
            if output.records.len() < need {
                output.records.resize(need, 0);
            }
            output.used += shared.store.codec().encode_kind_into(
                &id,
                data,
                kind,
                &mut output.records[output.used..],
            );
            output.chunks.push((id, data.len() as u32, output.used));
            c.chunks_new.fetch_add(1, Ordering::Relaxed);
            if kind == RecordKind::Patch {
                c.chunks_patch.fetch_add(1, Ordering::Relaxed);
            }
        }
        shared.manifest.set_entries(batch.first, &entries)?;
        let len = batch.len as u64;
        drop(items);
        batch.items.clear();
        batch.hints.clear();
        let _ = free.send(batch);
        if out.send(output).is_err() {
            return Ok(());
        }
        if let Some(p) = shared.progress {
            p(len);
        }
    }
    Ok(())
}

/// Fill packs from the workers' output; a publisher thread writes and
/// fsyncs full packs meanwhile (double buffering), so fsync latency does not
/// stall hashing and compression.
fn write_packs(
    shared: &Shared<'_>,
    outputs: &Receiver<Output>,
    out_free: Sender<Output>,
    pack_size: usize,
) -> Result<(u64, u64)> {
    let (full_tx, full_rx) = bounded::<PackWriter>(1);
    let (empty_tx, empty_rx) = bounded::<PackWriter>(2);
    std::thread::scope(|s| {
        let publisher = s.spawn(move || -> Result<u64> {
            let mut packs = 0;
            for mut w in full_rx {
                match publish(shared, &mut w) {
                    Ok(true) => packs += 1,
                    Ok(false) => {}
                    Err(e) => {
                        shared.abort.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                let _ = empty_tx.send(w);
            }
            Ok(packs)
        });
        let mut bytes = 0u64;
        let mut spare = Some(PackWriter::new(pack_size));
        let mut writer = PackWriter::new(pack_size);
        'outer: while let Ok(output) = outputs.recv() {
            let mut start = 0;
            for &(id, raw_len, end) in &output.chunks {
                writer.add(id, raw_len, &output.records[start..end]);
                bytes += (end - start) as u64;
                start = end;
                if writer.is_full() {
                    let next = match spare.take() {
                        Some(w) => w,
                        None => match empty_rx.recv() {
                            Ok(w) => w,
                            Err(_) => break 'outer,
                        },
                    };
                    if full_tx.send(std::mem::replace(&mut writer, next)).is_err() {
                        break 'outer;
                    }
                }
            }
            let _ = out_free.send(output);
            if shared.abort.load(Ordering::Relaxed) {
                break;
            }
        }
        if !shared.abort.load(Ordering::Relaxed) {
            let _ = full_tx.send(writer);
        }
        drop(full_tx);
        let packs = publisher
            .join()
            .unwrap_or_else(|_| Err(Error::new(crate::ErrorKind::Io, "Pack publisher panicked")))?;
        Ok((bytes, packs))
    })
}

fn publish(shared: &Shared<'_>, writer: &mut PackWriter) -> Result<bool> {
    let p = writer.publish(shared.store.backend())?;
    if let Some(p) = &p {
        shared
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.id);
    }
    Ok(p.is_some())
}

impl Store {
    /// Best-effort removal of the packs a failed backup published: nothing
    /// references them, and a full disk needs the space back. Index first,
    /// so the index never names a missing pack.
    fn discard_packs(&self, packs: &[PackId]) {
        for p in packs {
            let r = self
                .backend()
                .delete(&p.idx_key())
                .and_then(|()| self.backend().delete(&p.pack_key()));
            if let Err(e) = r {
                warn!("could not remove pack {p} of the failed backup: {e}");
            }
        }
        if !packs.is_empty() {
            info!(packs = packs.len(), "removed packs of the failed backup");
        }
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Store>();
    is::<SnapshotReader>();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ErrorKind;
    use rand::{Rng, SeedableRng};

    /// A test image: random chunks, zero runs and repeats.
    pub(crate) fn image(seed: u64, size: usize) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = vec![0u8; size];
        let mut at = 0;
        while at < size {
            let n = rng.gen_range(512..20_000).min(size - at);
            match rng.gen_range(0..4) {
                0 => {}
                1 if at >= n => {
                    let from = rng.gen_range(0..at - n + 1);
                    v.copy_within(from..from + n, at);
                }
                2 => v[at..at + n].fill(rng.gen()),
                _ => rng.fill(&mut v[at..at + n]),
            }
            at += n;
        }
        v
    }

    pub(crate) fn setup(chunk: u32) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::init(&dir.path().join("store"), chunk).unwrap();
        (dir, store)
    }

    #[test]
    fn backup_restore_round_trip_and_dedup() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        let mut img = image(1, 3 << 20);
        img[..8192].fill(0);
        std::fs::write(&src, &img).unwrap();
        let opts = BackupOptions {
            pack_size: Some(256 << 10),
            ..Default::default()
        };
        let s1 = store.backup("web", &src, &opts).unwrap();
        assert_eq!(s1.image_size, img.len() as u64);
        assert_eq!(s1.bytes_read, img.len() as u64);
        assert_eq!(s1.chunks_total, 768);
        assert!(s1.chunks_zero >= 2);
        assert!(s1.chunks_new > 0 && s1.chunks_new + s1.chunks_zero <= 768);
        assert!(s1.packs_new > 1);
        assert!(s1.parent.is_none());

        let out = dir.path().join("restored.img");
        let r = store
            .restore("web", &out, &RestoreOptions::default())
            .unwrap();
        assert_eq!(r.image_size, img.len() as u64);
        assert_eq!(std::fs::read(&out).unwrap(), img);

        // Unchanged image: nothing new, all from the parent.
        let s2 = store.backup("web", &src, &opts).unwrap();
        assert_eq!(s2.chunks_new, 0);
        assert_eq!(s2.bytes_new, 0);
        assert_eq!(s2.parent.as_deref(), Some(s1.snapshot.as_str()));
        assert_eq!(s2.chunks_parent + s2.chunks_zero, 768);
        assert!(s2.snapshot > s1.snapshot);

        // Change one 4 KiB block: one new chunk.
        img[100_000..104_096].fill(0xee);
        std::fs::write(&src, &img).unwrap();
        let s3 = store.backup("web", &src, &opts).unwrap();
        assert!(s3.chunks_new <= 2, "{s3:?}");
        let force = RestoreOptions {
            force: true,
            ..Default::default()
        };
        store.restore(&s3.snapshot, &out, &force).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), img);
        // The older snapshot is still intact.
        store
            .restore(&format!("web@{}", s1.snapshot), &out, &force)
            .unwrap();
        assert_ne!(std::fs::read(&out).unwrap(), img);

        let snaps = store.snapshots(Some("web")).unwrap();
        assert_eq!(snaps.len(), 3);
        assert_eq!(snaps[2].id, s3.snapshot);
        let report = store.verify(None, &Default::default()).unwrap();
        assert!(report.is_ok(), "{report:?}");
    }

    #[test]
    fn reader_random_access_and_odd_sizes() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        let img = image(2, 4096 * 10 + 1536);
        std::fs::write(&src, &img).unwrap();
        store.backup("db", &src, &BackupOptions::default()).unwrap();
        let r = store.open_snapshot("db").unwrap();
        assert_eq!(r.chunk_count(), 11);
        assert_eq!(r.chunk_len(10).unwrap(), 1536);
        let mut out = Vec::new();
        r.read_chunk(10, &mut out).unwrap();
        assert_eq!(out, &img[40960..]);
        for (off, len) in [(0usize, 1usize), (4000, 200), (0, img.len()), (40000, 2496)] {
            let mut buf = vec![0u8; len];
            r.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, &img[off..off + len]);
        }
        let mut buf = [0u8; 2];
        assert_eq!(
            r.read_at(&mut buf, img.len() as u64 - 1)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(r.chunk_id(11).unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn progress_reports_every_byte_and_second_writer_is_locked() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        std::fs::write(&src, image(3, 1 << 20)).unwrap();
        let seen = AtomicU64::new(0);
        let cb = |n: u64| {
            seen.fetch_add(n, Ordering::Relaxed);
        };
        let opts = BackupOptions {
            progress: Some(&cb),
            ..Default::default()
        };
        store.backup("a", &src, &opts).unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 1 << 20);
        let _lock = crate::lock::WriterLock::acquire(store.path()).unwrap();
        let e = store
            .backup("a", &src, &BackupOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert_eq!(
            store
                .backup("../x", &src, &BackupOptions::default())
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn source_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_source(&dir.path().join("nope")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let odd = dir.path().join("odd");
        std::fs::write(&odd, vec![1u8; 1000]).unwrap();
        let e = open_source(&odd).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
        let e = open_source(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
