//! Verify: re-read and re-hash chunks, and report every damaged or missing
//! chunk with the snapshots and image byte ranges that use it.
//!
//! Without a snapshot, every chunk in the index is checked (one pass over the
//! merged index, bounded memory), then every live manifest's checksum is
//! checked and each entry is looked up, which finds chunks a manifest names
//! but the index lacks. With a snapshot, only the distinct chunks it names are
//! checked. In both cases the damaged set (small) is then matched against all
//! live manifests to report who is affected.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;
use tracing::{debug, info};

use crate::backup::Progress;
use crate::error::{ErrorKind, Result};
use crate::id::ChunkId;
use crate::index::Loc;
use crate::repo::Store;
use crate::snapshot;
use crate::snapshot::reader::SnapshotReader;

/// Options of [`Store::verify`].
#[derive(Clone, Copy, Default)]
pub struct VerifyOptions<'a> {
    /// Called with the plaintext bytes of each checked chunk.
    pub progress: Option<Progress<'a>>,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
}

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// A chunk named by a snapshot or the index cannot be found.
    MissingChunk,
    /// A chunk's stored data fails its checks.
    CorruptChunk,
    /// A snapshot manifest fails its checksum.
    CorruptManifest,
    /// An index file cannot be decoded.
    DamagedIndex,
}

/// Image bytes `[start, end)` of one snapshot that use a damaged chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `NAME@ID`.
    pub snapshot: String,
    /// Byte ranges `[start, end)`, coalesced; at most 100 listed.
    pub ranges: Vec<[u64; 2]>,
    /// Ranges not listed.
    pub ranges_omitted: u64,
}

/// One problem found by verify.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub chunk: Option<ChunkId>,
    /// Pack and offset, or the damaged file's key.
    pub location: Option<String>,
    /// The error chain.
    pub error: String,
    /// Snapshots and ranges that use the chunk.
    pub used_by: Vec<Usage>,
}

/// The result of [`Store::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub snapshots_checked: u64,
    /// Chunks read (intact or not).
    pub chunks_checked: u64,
    /// Plaintext bytes of the chunks that read back intact.
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
    pub seconds: f64,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

const MAX_RANGES: usize = 100;

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

impl Store {
    /// Verify one snapshot's chunks (`Some(reference)`) or the whole store.
    pub fn verify(
        &self,
        reference: Option<&str>,
        opts: &VerifyOptions<'_>,
    ) -> Result<VerifyReport> {
        let start = Instant::now();
        let mut problems: Vec<Problem> = Vec::new();
        self.reload_index()?;
        let view = self.index();
        for key in view.damaged() {
            problems.push(Problem {
                kind: ProblemKind::DamagedIndex,
                chunk: None,
                location: Some(key.clone()),
                error: format!("Index file {key} is damaged; its pack's chunks are unreachable"),
                used_by: Vec::new(),
            });
        }
        if let Some(m) = view.midx() {
            if let Err(e) = m.verify_checksum() {
                problems.push(Problem {
                    kind: ProblemKind::DamagedIndex,
                    chunk: None,
                    location: Some(m.key().to_string()),
                    error: chain(&e),
                    used_by: Vec::new(),
                });
            }
        }
        // Readers hold shared locks, so gc cannot remove what we check.
        let all: Vec<SnapshotReader> = {
            let mut v = Vec::new();
            for l in snapshot::list(self.backend(), None, false)? {
                match SnapshotReader::open(self, &l) {
                    Ok(r) => v.push(r),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => problems.push(Problem {
                        kind: ProblemKind::CorruptManifest,
                        chunk: None,
                        location: Some(l.key()),
                        error: chain(&e),
                        used_by: Vec::new(),
                    }),
                }
            }
            v
        };
        let selected: Vec<&SnapshotReader> = match reference {
            Some(r) => {
                let info = self.resolve(r)?;
                all.iter().filter(|s| s.info().id == info.id).collect()
            }
            None => all.iter().collect(),
        };
        for s in &selected {
            if let Err(e) = s.verify_manifest() {
                problems.push(Problem {
                    kind: ProblemKind::CorruptManifest,
                    chunk: None,
                    location: Some(s.key().to_string()),
                    error: chain(&e),
                    used_by: vec![Usage {
                        snapshot: s.info().reference(),
                        ranges: vec![[0, s.image_size()]],
                        ranges_omitted: 0,
                    }],
                });
            }
        }

        let checked = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let bad: Mutex<HashMap<ChunkId, Problem>> = Mutex::new(HashMap::new());
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let (tx, rx) = bounded::<Vec<(ChunkId, Option<Loc>)>>(threads * 2);
        let produce = |tx: crossbeam_channel::Sender<Vec<(ChunkId, Option<Loc>)>>| -> Result<()> {
            let mut batch = Vec::with_capacity(256);
            let send = |batch: &mut Vec<(ChunkId, Option<Loc>)>| {
                let full = std::mem::replace(batch, Vec::with_capacity(256));
                tx.send(full).is_ok()
            };
            if reference.is_none() {
                view.for_each(|id, loc| {
                    batch.push((*id, Some(*loc)));
                    if batch.len() == 256 {
                        send(&mut batch);
                    }
                    Ok(())
                })?;
                // Chunks manifests name but the index lacks.
                let mut missing = HashSet::new();
                scan_entries(&selected, |_, _, id| {
                    if !missing.contains(id) && view.lookup(id)?.is_none() {
                        missing.insert(*id);
                        batch.push((*id, None));
                        if batch.len() == 256 {
                            send(&mut batch);
                        }
                    }
                    Ok(())
                })?;
            } else {
                let mut seen = HashSet::new();
                scan_entries(&selected, |_, _, id| {
                    if seen.insert(*id) {
                        batch.push((*id, view.lookup(id)?));
                        if batch.len() == 256 {
                            send(&mut batch);
                        }
                    }
                    Ok(())
                })?;
            }
            if !batch.is_empty() {
                send(&mut batch);
            }
            Ok(())
        };
        std::thread::scope(|s| -> Result<()> {
            for _ in 0..threads {
                let rx = rx.clone();
                let (bad, checked, bytes) = (&bad, &checked, &bytes);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    while let Ok(batch) = rx.recv() {
                        for (id, loc) in batch {
                            checked.fetch_add(1, Ordering::Relaxed);
                            let r = match &loc {
                                None => Err(crate::Error::not_found(format!(
                                    "Chunk {id} is not in the index"
                                ))),
                                Some(loc) => self.read_loc(&id, loc, &mut buf),
                            };
                            match r {
                                Ok(()) => {
                                    bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                                    if let Some(p) = opts.progress {
                                        p(buf.len() as u64);
                                    }
                                }
                                Err(e) => {
                                    let kind = if e.kind() == ErrorKind::Corrupt {
                                        ProblemKind::CorruptChunk
                                    } else {
                                        ProblemKind::MissingChunk
                                    };
                                    // Reported once, in the report (not also logged).
                                    debug!(chunk = %id, "verify: {}", chain(&e));
                                    let p = Problem {
                                        kind,
                                        chunk: Some(id),
                                        location: loc.map(|l| {
                                            format!("pack {} offset {}", l.pack, l.offset)
                                        }),
                                        error: chain(&e),
                                        used_by: Vec::new(),
                                    };
                                    if let Ok(mut g) = bad.lock() {
                                        g.insert(id, p);
                                    }
                                }
                            }
                        }
                    }
                });
            }
            drop(rx);
            produce(tx)
        })?;

        let mut bad = bad.into_inner().unwrap_or_default();
        if !bad.is_empty() {
            let everyone: Vec<&SnapshotReader> = all.iter().collect();
            scan_entries(&everyone, |snap, index, id| {
                if let Some(p) = bad.get_mut(id) {
                    let cs = snap.chunk_size() as u64;
                    let range = [index * cs, ((index + 1) * cs).min(snap.image_size())];
                    add_range(&mut p.used_by, &snap.info().reference(), range);
                }
                Ok(())
            })?;
        }
        let mut chunk_problems: Vec<Problem> = bad.drain().map(|(_, p)| p).collect();
        chunk_problems.sort_by(|a, b| {
            let first = |p: &Problem| p.used_by.first().and_then(|u| u.ranges.first().copied());
            (
                a.used_by.first().map(|u| u.snapshot.clone()),
                first(a),
                a.chunk,
            )
                .cmp(&(
                    b.used_by.first().map(|u| u.snapshot.clone()),
                    first(b),
                    b.chunk,
                ))
        });
        problems.extend(chunk_problems);
        let report = VerifyReport {
            snapshots_checked: selected.len() as u64,
            chunks_checked: checked.load(Ordering::Relaxed),
            bytes_checked: bytes.load(Ordering::Relaxed),
            problems,
            seconds: start.elapsed().as_secs_f64(),
        };
        info!(
            chunks = report.chunks_checked,
            problems = report.problems.len(),
            "verify done"
        );
        Ok(report)
    }
}

/// Call `f(snapshot, index, id)` for every non-zero entry of `snaps`.
fn scan_entries(
    snaps: &[&SnapshotReader],
    mut f: impl FnMut(&SnapshotReader, u64, &ChunkId) -> Result<()>,
) -> Result<()> {
    let mut ids = Vec::new();
    for s in snaps {
        let mut first = 0;
        while first < s.chunk_count() {
            s.chunk_ids(first, 4096, &mut ids)?;
            for (i, id) in ids.iter().enumerate() {
                if let Some(id) = id {
                    f(s, first + i as u64, id)?;
                }
            }
            first += ids.len() as u64;
        }
    }
    Ok(())
}

fn add_range(used_by: &mut Vec<Usage>, snapshot: &str, range: [u64; 2]) {
    if used_by.last().is_none_or(|u| u.snapshot != snapshot) {
        used_by.push(Usage {
            snapshot: snapshot.to_string(),
            ranges: Vec::new(),
            ranges_omitted: 0,
        });
    }
    let Some(u) = used_by.last_mut() else { return };
    let full = u.ranges.len() >= MAX_RANGES;
    match u.ranges.last_mut() {
        Some(last) if last[1] == range[0] => last[1] = range[1],
        _ if full => u.ranges_omitted += 1,
        _ => u.ranges.push(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce_and_cap() {
        let mut u = Vec::new();
        add_range(&mut u, "a@1", [0, 10]);
        add_range(&mut u, "a@1", [10, 20]);
        add_range(&mut u, "a@1", [30, 40]);
        add_range(&mut u, "b@2", [0, 10]);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].ranges, vec![[0, 20], [30, 40]]);
        for i in 0..200 {
            add_range(&mut u, "c@3", [i * 20, i * 20 + 10]);
        }
        assert_eq!(u[2].ranges.len(), MAX_RANGES);
        assert_eq!(u[2].ranges_omitted, 100);
    }
}
