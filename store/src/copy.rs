//! Copying snapshots between stores (`recovery-cli copy`): local to S3, S3
//! to local, S3 to S3, plaintext or encrypted, for an off-site copy.
//!
//! Only chunks the destination lacks are sent. The usual publish order
//! holds: packs, then their indexes, then, once every chunk of the snapshot
//! is published, its manifest, and group records last, once every member is
//! there. So an interrupted copy leaves whole packs and no manifest;
//! re-running it finds those chunks in the destination's index and sends
//! only the rest (resumable), and a snapshot whose manifest is already
//! there is skipped.
//!
//! # Same ids or translated ids
//! When both stores derive chunk ids the same way (both plaintext, or the
//! same id key), every chunk id a manifest names is looked up in the
//! destination's index, missing chunks are read (and verified) from the
//! source, `FETCHERS` at a time, re-encoded for the destination, and the
//! manifests are copied as they are.
//!
//! Between stores with different ids (plaintext and encrypted, or two
//! encrypted stores with different keys: ids are blake3 keyed per store)
//! every chunk is read, decrypted and verified at the source, its id
//! computed under the destination's id key, and only then looked up in the
//! destination's index; a missing chunk is sealed for the destination. The
//! manifests (full and delta) are rewritten with the translated ids and a
//! new trailer (their header hash covers no chunk id). A resumed copy reads
//! the source again but sends only what is missing. The translation map is
//! kept in memory for the run (64 bytes per distinct chunk).
//!
//! A delta manifest is copied with its base full manifest first (under the
//! same key, live or forgotten), so it stays readable on the destination.
//! Both stores must use the same chunk size.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use tracing::{info, info_span};

use crate::backend::S3Backend;
use crate::chunk::RecordKind;
use crate::crypto::Secret;
use crate::error::{Error, IoContext, Result};
use crate::format::{DELTA_COUNT_LEN, DELTA_ENTRY_LEN, TRAILER_LEN};
use crate::group::GROUPS_DIR;
use crate::id::{ChunkId, PackId};
use crate::location::{s3_options, Location, OpenOptions};
use crate::pack::{PackWriter, PACK_TARGET_SIZE};
use crate::repo::Store;
use crate::restore::spans;
use crate::snapshot::manifest::{read_header, ENTRY_LEN};
use crate::snapshot::reader::SnapshotReader;
use crate::snapshot::{self, forgotten_key, manifest_key, Listed};

/// Chunks fetched from the source at once (remote stores need many in
/// flight to fill the pipe).
const FETCHERS: usize = 16;
/// Chunk ids looked at per batch.
const BATCH: u64 = 1024;
/// Chunks of a remote source one fetcher reads in pack spans (4 MiB of
/// 64 KiB chunks).
const SPAN_GROUP: usize = 64;

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyStats {
    /// Snapshots whose manifest was published on the destination.
    pub snapshots_copied: u64,
    /// Snapshots the destination already had.
    pub snapshots_skipped: u64,
    /// Group points whose record was published on the destination.
    pub groups_copied: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunks the destination already had (deduplicated).
    pub chunks_present: u64,
    /// Stored bytes sent (records, after compression).
    pub bytes_sent: u64,
    /// Packs published on the destination.
    pub packs: u64,
    /// The stores derive chunk ids differently (another key, or one is
    /// plaintext): chunks were re-keyed and manifests rewritten.
    pub ids_translated: bool,
    /// Wall time.
    pub seconds: f64,
}

/// One chunk read at the source: its id there, its id at the destination,
/// and, when the destination lacks it, its plaintext length and record.
type Fetched = (ChunkId, ChunkId, Option<(u32, Vec<u8>)>);

struct Copier<'a> {
    src: &'a Store,
    dst: &'a Store,
    writer: PackWriter,
    /// Destination ids of the chunks added to this run's packs (the index
    /// view predates them).
    sent: HashSet<ChunkId>,
    /// Source id → destination id, when the stores' ids differ.
    map: Option<HashMap<ChunkId, ChunkId>>,
    stats: CopyStats,
    pool: rayon::ThreadPool,
}

impl Store {
    /// [`Store::open_location`]; `secret` unlocks an encrypted store
    /// (`None`: the process-wide provider, as [`Store::open`]). `copy`
    /// opens its destination so when it has a key of its own.
    pub fn open_location_keyed(
        location: &str,
        opts: &OpenOptions,
        secret: Option<&Secret>,
    ) -> Result<Store> {
        match Location::parse(location)? {
            Location::Local(p) => Store::open_keyed(&p, secret),
            Location::S3 { bucket, prefix } => {
                let o = s3_options(&bucket, &prefix, opts)?;
                let b = S3Backend::new(&o).map_err(|e| {
                    Error::io(format!("Failed to set up S3 store {}", o.display()), e)
                })?;
                Store::open_backend_keyed(o.cache_dir.clone(), Arc::new(b), secret)
            }
        }
    }

    /// Copy snapshots (`NAME`, `NAME@ID` or `ID`; all live snapshots when
    /// `refs` is empty) from this store to `dst`, then the group points
    /// whose members are all on `dst`. Takes `dst`'s writer lock.
    pub fn copy_to(&self, dst: &Store, refs: &[String]) -> Result<CopyStats> {
        let span = info_span!("copy", from = self.location(), to = dst.location());
        let _e = span.enter();
        let start = Instant::now();
        if self.chunk_size() != dst.chunk_size() {
            return Err(Error::invalid(format!(
                "Cannot copy from {} (chunk size {}) to {} (chunk size {}): chunk sizes differ",
                self.location(),
                self.chunk_size(),
                dst.location(),
                dst.chunk_size()
            )));
        }
        let probe = b"instant-recovery copy probe";
        let translate = self.chunk_id(probe) != dst.chunk_id(probe);
        let listed = if refs.is_empty() {
            snapshot::list(self.backend(), None, false)?
        } else {
            let mut v = Vec::new();
            for r in refs {
                v.push(snapshot::resolve(self.backend(), r)?);
            }
            v
        };
        let _lock = dst.lock_writer()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(FETCHERS)
            .thread_name(|i| format!("copy-fetch-{i}"))
            .build()
            .map_err(|e| Error::invalid(format!("Failed to start copy threads: {e}")))?;
        let mut c = Copier {
            src: self,
            dst,
            writer: PackWriter::new(PACK_TARGET_SIZE),
            sent: HashSet::new(),
            map: translate.then(HashMap::new),
            stats: CopyStats {
                ids_translated: translate,
                ..Default::default()
            },
            pool,
        };
        for l in &listed {
            c.copy_snapshot(l)?;
        }
        c.copy_groups()?;
        let mut stats = c.stats;
        stats.seconds = start.elapsed().as_secs_f64();
        info!(
            copied = stats.snapshots_copied,
            skipped = stats.snapshots_skipped,
            groups = stats.groups_copied,
            chunks = stats.chunks_sent,
            bytes = stats.bytes_sent,
            translated = stats.ids_translated,
            "copy done"
        );
        Ok(stats)
    }
}

impl Copier<'_> {
    fn has_manifest(&self, name: &str, id: &str) -> Result<bool> {
        for key in [manifest_key(name, id), forgotten_key(name, id)] {
            if self
                .dst
                .backend()
                .exists(&key)
                .ctx(|| format!("Failed to look up {key} in {}", self.dst.location()))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn copy_snapshot(&mut self, l: &Listed) -> Result<()> {
        if self.has_manifest(&l.name, &l.id)? {
            self.stats.snapshots_skipped += 1;
            return Ok(());
        }
        let reader = SnapshotReader::open(self.src, l)?;
        reader.verify_manifest()?;
        if reader.base().is_some() {
            let base = reader.base_reader();
            let info = base.info();
            if !self.has_manifest(&info.name, &info.id)? {
                self.copy_chunks(base)?;
                self.publish_manifest(base.key())?;
            }
        }
        self.copy_chunks(&reader)?;
        self.publish_manifest(reader.key())?;
        self.stats.snapshots_copied += 1;
        info!(snapshot = %reader.info().reference(), "copied snapshot");
        Ok(())
    }

    /// True when destination id `did` is in this run's packs or the
    /// destination's index.
    fn dst_has(&self, view: &crate::index::IndexView, did: &ChunkId) -> Result<bool> {
        Ok(self.sent.contains(did) || view.lookup(did)?.is_some())
    }

    /// Send every chunk of `reader` the destination lacks, and publish the
    /// packs holding them.
    fn copy_chunks(&mut self, reader: &SnapshotReader) -> Result<()> {
        let mut ids = Vec::new();
        let mut first = 0;
        while first < reader.chunk_count() {
            reader.chunk_ids(first, BATCH, &mut ids)?;
            first += BATCH;
            let view = self.dst.index();
            // Chunks to read at the source: with the same ids, the missing
            // ones; with translated ids, every one not seen yet (its
            // destination id needs its plaintext).
            let mut todo = Vec::new();
            let mut queued = HashSet::new();
            for id in ids.iter().flatten() {
                let seen = match &self.map {
                    Some(map) => map.contains_key(id),
                    None => self.dst_has(&view, id)?,
                };
                if seen || !queued.insert(*id) {
                    self.stats.chunks_present += 1;
                } else {
                    todo.push(*id);
                }
            }
            // Whatever the source's config said at open: another process
            // may have written patches since; its index marks them.
            if self.map.is_none() {
                self.copy_patches(&view, &mut todo, &mut queued)?;
            }
            for (id, did, rec) in self.fetch(&view, &todo)? {
                if let Some(map) = &mut self.map {
                    map.insert(id, did);
                }
                let Some((raw_len, rec)) = rec else {
                    self.stats.chunks_present += 1;
                    continue;
                };
                self.sent.insert(did);
                self.stats.chunks_sent += 1;
                self.stats.bytes_sent += rec.len() as u64;
                self.writer.add(did, raw_len, &rec);
                if self.writer.is_full() {
                    self.flush()?;
                }
            }
        }
        self.flush()
    }

    /// With the same ids: send the patch records of `todo` as they are
    /// (their ids are the same in the destination), each one's base that
    /// the destination lacks too, down the chain, and leave in `todo` the
    /// chunk data to fetch. With translated ids
    /// nothing is done here: a patch is read as its whole chunk and sent as
    /// chunk data under its destination id (materialized).
    fn copy_patches(
        &mut self,
        view: &crate::index::IndexView,
        todo: &mut Vec<ChunkId>,
        queued: &mut HashSet<ChunkId>,
    ) -> Result<()> {
        let mut data = Vec::with_capacity(todo.len());
        let mut payload = Vec::new();
        // A base joins the list: chunk data is fetched below, a patch (of
        // a chain) is sent here like the others.
        let mut work = std::mem::take(todo);
        let mut next = 0;
        while let Some(&id) = work.get(next) {
            next += 1;
            let is_patch = self.src.locate(&id)?.is_some_and(|l| l.patch);
            if !is_patch {
                data.push(id);
                continue;
            }
            let p = self.src.read_patch(&id, &mut payload)?;
            if !p.base.is_null() && !self.dst_has(view, &p.base)? && queued.insert(p.base) {
                work.push(p.base);
            }
            self.dst.enable_patches()?;
            let mut rec = Vec::new();
            self.dst
                .codec()
                .encode_kind(&id, &payload, RecordKind::Patch, &mut rec);
            self.sent.insert(id);
            self.stats.chunks_sent += 1;
            self.stats.bytes_sent += rec.len() as u64;
            self.writer.add(id, payload.len() as u32, &rec);
            if self.writer.is_full() {
                self.flush()?;
            }
        }
        *todo = data;
        Ok(())
    }

    /// Read, verify and (where the destination lacks it) re-encode each
    /// chunk of `todo`, `FETCHERS` at a time.
    fn fetch(&self, view: &crate::index::IndexView, todo: &[ChunkId]) -> Result<Vec<Fetched>> {
        let (dst, translate) = (self.dst, self.map.is_some());
        let plains = self.read_plain(todo)?;
        self.pool.install(|| {
            todo.par_iter()
                .zip(plains.into_par_iter())
                .map(|(id, plain)| {
                    let did = if translate {
                        let did = dst.chunk_id(&plain);
                        if self.dst_has(view, &did)? {
                            return Ok((*id, did, None));
                        }
                        did
                    } else {
                        *id
                    };
                    let mut rec = Vec::new();
                    dst.codec().encode_record(&did, &plain, &mut rec);
                    Ok((*id, did, Some((plain.len() as u32, rec))))
                })
                .collect()
        })
    }

    /// The verified plaintexts of `todo`, in order: chunk by chunk from a
    /// local source; from a remote one in pack spans, the chunks sorted by
    /// pack and offset and cut into groups of `SPAN_GROUP`, one group per
    /// fetcher (see [`crate::restore::spans`]).
    fn read_plain(&self, todo: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        let src = self.src;
        if !src.is_remote() {
            return self.pool.install(|| {
                todo.par_iter()
                    .map(|id| {
                        let mut plain = Vec::new();
                        src.read_chunk(id, &mut plain).map(|()| plain)
                    })
                    .collect()
            });
        }
        let view = src.index();
        let mut order: Vec<(Option<(PackId, u64)>, usize)> = todo
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let at = view.lookup(id).ok().flatten().map(|l| (l.pack, l.offset));
                (at, i)
            })
            .collect();
        order.sort_unstable();
        let groups: Vec<Vec<(usize, ChunkId)>> = order
            .chunks(SPAN_GROUP)
            .map(|g| g.iter().map(|&(_, i)| (i, todo[i])).collect())
            .collect();
        let read: Vec<Vec<(usize, Vec<u8>)>> = self.pool.install(|| {
            groups
                .par_iter()
                .map(|g| {
                    let local: Vec<(usize, ChunkId)> =
                        g.iter().enumerate().map(|(k, (_, id))| (k, *id)).collect();
                    let mut bufs = vec![Vec::new(); g.len()];
                    let mut alone =
                        |_: usize, id: &ChunkId, buf: &mut Vec<u8>| src.read_chunk(id, buf);
                    spans::read_spans(src, &local, &mut bufs, &mut Vec::new(), &mut alone)?;
                    Ok(g.iter().map(|(i, _)| *i).zip(bufs).collect())
                })
                .collect::<Result<_>>()
        })?;
        let mut out = vec![Vec::new(); todo.len()];
        for (i, plain) in read.into_iter().flatten() {
            out[i] = plain;
        }
        Ok(out)
    }

    fn flush(&mut self) -> Result<()> {
        if self.writer.publish(self.dst.backend())?.is_some() {
            self.stats.packs += 1;
        }
        Ok(())
    }

    /// Publish the manifest at `key` on the destination: last, after every
    /// pack it needs; with translated ids, rewritten first.
    fn publish_manifest(&mut self, key: &str) -> Result<()> {
        let mut bytes = self
            .src
            .backend()
            .read(key)
            .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
        if let Some(map) = &self.map {
            translate_manifest(&mut bytes, key, map)?;
        }
        self.dst.backend().put(key, &bytes).ctx(|| {
            format!(
                "Failed to publish snapshot manifest {key} on {}",
                self.dst.location()
            )
        })
    }

    /// Publish the live group points of the source whose members are all on
    /// the destination and which it lacks (after their members' manifests).
    fn copy_groups(&mut self) -> Result<()> {
        let (src, dst) = (self.src.backend(), self.dst.backend());
        let services = match src.list(GROUPS_DIR) {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("Failed to list {GROUPS_DIR}"), e)),
        };
        for service in services {
            if snapshot::validate_name(&service).is_err() {
                continue;
            }
            for g in self.src.groups(&service)? {
                let key = format!("{GROUPS_DIR}/{service}/{}.json", g.id);
                if dst
                    .exists(&key)
                    .ctx(|| format!("Failed to look up {key} in {}", self.dst.location()))?
                {
                    continue;
                }
                let mut complete = true;
                for m in &g.members {
                    let l = snapshot::resolve(dst, &m.snapshot);
                    match l {
                        Ok(_) => {}
                        Err(e) if e.kind() == crate::ErrorKind::NotFound => complete = false,
                        Err(e) => return Err(e),
                    }
                }
                if !complete {
                    continue;
                }
                let data = src
                    .read(&key)
                    .ctx(|| format!("Failed to read group point {key}"))?;
                dst.put(&key, &data).ctx(|| {
                    format!(
                        "Failed to publish group point {key} on {}",
                        self.dst.location()
                    )
                })?;
                self.stats.groups_copied += 1;
                info!(group = %g.reference(), "copied group point");
            }
        }
        Ok(())
    }
}

/// A manifest held in memory, for [`read_header`].
#[derive(Debug)]
struct InMemory<'a>(&'a [u8]);

impl crate::backend::Object for InMemory<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.0.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&self.0[offset as usize..end as usize]);
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// Rewrite the chunk ids of manifest `bytes` (full or delta) through `map`
/// and give it a new trailer. The source trailer is checked first, so a
/// damaged manifest is never re-signed.
fn translate_manifest(bytes: &mut [u8], key: &str, map: &HashMap<ChunkId, ChunkId>) -> Result<()> {
    // Its own Object: `InMemory` borrows `bytes` only for the header.
    let m = read_header(&InMemory(bytes), key)?;
    let body = bytes.len() - TRAILER_LEN;
    if blake3::hash(&bytes[..body]).as_bytes()[..] != bytes[body..] {
        return Err(Error::corrupt(format!(
            "Snapshot manifest {key} is damaged (trailer checksum)"
        )));
    }
    let start = m.entries_offset as usize;
    let (start, stride, at) = match m.delta {
        None => (start, ENTRY_LEN, 0),
        Some(_) => (start + DELTA_COUNT_LEN, DELTA_ENTRY_LEN, 8),
    };
    for e in bytes[start..body].chunks_exact_mut(stride) {
        let mut id = ChunkId::default();
        id.0.copy_from_slice(&e[at..at + 32]);
        if id.is_null() {
            continue;
        }
        let Some(did) = map.get(&id) else {
            return Err(Error::invalid(format!(
                "Cannot translate snapshot manifest {key}: chunk {id} was not copied"
            ))
            .with_chunk(id));
        };
        e[at..at + 32].copy_from_slice(&did.0);
    }
    let trailer = blake3::hash(&bytes[..body]);
    bytes[body..].copy_from_slice(trailer.as_bytes());
    Ok(())
}
