//! Copying snapshots between stores (`recovery-cli copy`): local to S3, S3
//! to local, S3 to S3, for an off-site copy.
//!
//! Only chunks the destination lacks are sent: for each snapshot, every
//! chunk id its manifest names is looked up in the destination's index;
//! missing chunks are read (and verified) from the source, `FETCHERS` at a
//! time, re-encoded for the destination and appended to new packs. The
//! usual publish order holds: packs, then their indexes, then, once every
//! chunk of the snapshot is published, its manifest. So an interrupted copy
//! leaves whole packs and no manifest; re-running it finds those chunks in
//! the destination's index and sends only the rest (resumable), and a
//! snapshot whose manifest is already there is skipped.
//!
//! A delta manifest is copied with its base full manifest first (under the
//! same key, live or forgotten), so it stays readable on the destination.
//! Both stores must use the same chunk size and the same chunk ids (both
//! plaintext, or the same id key): manifests are copied as they are.

use std::collections::HashSet;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use tracing::{info, info_span};

use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::pack::{PackWriter, PACK_TARGET_SIZE};
use crate::repo::Store;
use crate::snapshot::reader::SnapshotReader;
use crate::snapshot::{self, forgotten_key, manifest_key, Listed};

/// Chunks fetched from the source at once (remote stores need many in
/// flight to fill the pipe).
const FETCHERS: usize = 16;
/// Chunk ids looked at per batch.
const BATCH: u64 = 1024;

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyStats {
    /// Snapshots whose manifest was published on the destination.
    pub snapshots_copied: u64,
    /// Snapshots the destination already had.
    pub snapshots_skipped: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunks the destination already had (deduplicated).
    pub chunks_present: u64,
    /// Stored bytes sent (records, after compression).
    pub bytes_sent: u64,
    /// Packs published on the destination.
    pub packs: u64,
    /// Wall time.
    pub seconds: f64,
}

struct Copier<'a> {
    src: &'a Store,
    dst: &'a Store,
    writer: PackWriter,
    /// Chunks added to this run's packs (the index view predates them).
    sent: HashSet<ChunkId>,
    stats: CopyStats,
    pool: rayon::ThreadPool,
}

impl Store {
    /// Copy snapshots (`NAME`, `NAME@ID` or `ID`; all live snapshots when
    /// `refs` is empty) from this store to `dst`. Takes `dst`'s writer lock.
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
        if self.chunk_id(probe) != dst.chunk_id(probe) {
            return Err(Error::invalid(format!(
                "Cannot copy from {} to {}: the stores derive chunk ids differently (different encryption keys); \
                 copy into a store initialised with the same key",
                self.location(),
                dst.location()
            )));
        }
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
            stats: CopyStats::default(),
            pool,
        };
        for l in &listed {
            c.copy_snapshot(l)?;
        }
        let mut stats = c.stats;
        stats.seconds = start.elapsed().as_secs_f64();
        info!(
            copied = stats.snapshots_copied,
            skipped = stats.snapshots_skipped,
            chunks = stats.chunks_sent,
            bytes = stats.bytes_sent,
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

    /// Send every chunk of `reader` the destination lacks, and publish the
    /// packs holding them.
    fn copy_chunks(&mut self, reader: &SnapshotReader) -> Result<()> {
        let mut ids = Vec::new();
        let mut first = 0;
        while first < reader.chunk_count() {
            reader.chunk_ids(first, BATCH, &mut ids)?;
            first += BATCH;
            let view = self.dst.index();
            let mut missing = Vec::new();
            for id in ids.iter().flatten() {
                if self.sent.contains(id) || view.lookup(id)?.is_some() {
                    self.stats.chunks_present += 1;
                } else if self.sent.insert(*id) {
                    missing.push(*id);
                }
            }
            let (src, dst) = (self.src, self.dst);
            let records: Vec<Result<(ChunkId, u32, Vec<u8>)>> = self.pool.install(|| {
                missing
                    .par_iter()
                    .map(|id| {
                        let mut plain = Vec::new();
                        src.read_chunk(id, &mut plain)?;
                        let mut rec = Vec::new();
                        dst.codec().encode_record(id, &plain, &mut rec);
                        Ok((*id, plain.len() as u32, rec))
                    })
                    .collect()
            });
            for r in records {
                let (id, raw_len, rec) = r?;
                self.stats.chunks_sent += 1;
                self.stats.bytes_sent += rec.len() as u64;
                self.writer.add(id, raw_len, &rec);
                if self.writer.is_full() {
                    self.flush()?;
                }
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        if self.writer.publish(self.dst.backend())?.is_some() {
            self.stats.packs += 1;
        }
        Ok(())
    }

    /// Publish the manifest at `key` on the destination: last, after every
    /// pack it needs.
    fn publish_manifest(&mut self, key: &str) -> Result<()> {
        let bytes = self
            .src
            .backend()
            .read(key)
            .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
        self.dst.backend().put(key, &bytes).ctx(|| {
            format!(
                "Failed to publish snapshot manifest {key} on {}",
                self.dst.location()
            )
        })
    }
}
