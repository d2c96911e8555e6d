//! The backup source of a live backup: which chunks to read (from NBD
//! block status), and the reads themselves over the fleecing export.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use block::migrate::RateLimiter;
use store::backup::changed::{ChangedSource, ChunkState};
use store::patch::GRAIN;

use super::{Error, Result};
use crate::nbd::{self, proto, Client};

/// Per-chunk states, run-length encoded: `(first chunk, count, state)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub chunk_size: u64,
    pub image_size: u64,
    pub runs: Vec<(u64, u64, ChunkState)>,
    /// Bytes the dirty bitmap marks (the whole image for a full backup).
    pub dirty_bytes: u64,
    /// Dirty `[start, end)` ranges, sorted (`None`: full backup).
    pub dirty: Option<Vec<(u64, u64)>>,
    /// Ranges that read as zeros, sorted.
    pub zero: Vec<(u64, u64)>,
}

/// Sorted `[start, end)` ranges of the extents whose flags match `pred`,
/// adjacent ones merged.
fn ranges(ext: &[(u64, u64, u32)], pred: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l, f) in ext {
        if !pred(f) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == o => last.1 = o + l,
            _ => out.push((o, o + l)),
        }
    }
    out
}

/// The parts of sorted `ranges` inside `[start, end)`.
fn within(ranges: &[(u64, u64)], start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges[i..]
        .iter()
        .take_while(move |r| r.0 < end)
        .map(move |r| (r.0.max(start), r.1.min(end)))
}

impl Plan {
    /// Build the plan from `base:allocation` extents and, for an
    /// incremental, the dirty bitmap's extents (`None`: full). Each is a
    /// sorted, gap-free list of `(offset, len, flags)` covering the image.
    ///
    /// A chunk is `Unchanged` when the bitmap marks none of its bytes
    /// (incremental only), else `Zero` when every byte of it reads as zero,
    /// else `Partial` when the bitmap marks only part of it (incremental
    /// only: the store keeps a patch of its dirty 4 KiB grains over the
    /// parent's chunk), else `Data`.
    pub fn build(
        image_size: u64,
        chunk_size: u64,
        alloc: &[(u64, u64, u32)],
        dirty: Option<&[(u64, u64, u32)]>,
    ) -> Plan {
        let chunks = image_size.div_ceil(chunk_size);
        let dirty_ranges = dirty.map(|d| ranges(d, |f| f & proto::STATE_DIRTY != 0));
        let mut runs: Vec<(u64, u64, ChunkState)> = Vec::new();
        let (mut ai, mut di) = (0usize, 0usize);
        for c in 0..chunks {
            let start = c * chunk_size;
            let end = (start + chunk_size).min(image_size);
            let changed = match dirty {
                None => true,
                Some(d) => any_in(d, &mut di, start, end, |f| f & proto::STATE_DIRTY != 0),
            };
            let state = if !changed {
                ChunkState::Unchanged
            } else if any_in(alloc, &mut ai, start, end, |f| f & proto::STATE_ZERO == 0) {
                match &dirty_ranges {
                    Some(d) if within(d, start, end).ne([(start, end)]) => ChunkState::Partial,
                    _ => ChunkState::Data,
                }
            } else {
                ChunkState::Zero
            };
            match runs.last_mut() {
                Some(r) if r.2 == state && r.0 + r.1 == c => r.1 += 1,
                _ => runs.push((c, 1, state)),
            }
        }
        let dirty_bytes = match dirty {
            None => image_size,
            Some(d) => d
                .iter()
                .filter(|e| e.2 & proto::STATE_DIRTY != 0)
                .map(|e| e.1)
                .sum(),
        };
        Plan {
            chunk_size,
            image_size,
            runs,
            dirty_bytes,
            dirty: dirty_ranges,
            zero: ranges(alloc, |f| f & proto::STATE_ZERO != 0),
        }
    }

    /// State of chunk `c`.
    pub fn state(&self, c: u64) -> ChunkState {
        let i = self.runs.partition_point(|r| r.0 + r.1 <= c);
        self.runs.get(i).map_or(ChunkState::Zero, |r| r.2)
    }

    /// Number of chunks in `state`.
    pub fn count(&self, state: ChunkState) -> u64 {
        self.runs.iter().filter(|r| r.2 == state).map(|r| r.1).sum()
    }
}

/// Whether an extent overlapping `[start, end)` has flags matching `pred`.
/// `at` is a cursor into the sorted extents; chunks are visited in order.
fn any_in(
    ext: &[(u64, u64, u32)],
    at: &mut usize,
    start: u64,
    end: u64,
    pred: impl Fn(u32) -> bool,
) -> bool {
    while *at < ext.len() && ext[*at].0 + ext[*at].1 <= start {
        *at += 1;
    }
    let mut i = *at;
    while i < ext.len() && ext[i].0 < end {
        if pred(ext[i].2) {
            return true;
        }
        i += 1;
    }
    // Past the last extent (a short answer): assume changed data.
    i == ext.len() && ext.last().is_none_or(|l| l.0 + l.1 < end)
}

/// Query both contexts over the whole export and build the plan.
pub fn plan(client: &Client, chunk_size: u64, dirty_context: Option<&str>) -> Result<Plan> {
    let size = client.size();
    let nerr = |source| Error::Nbd {
        what: "block status",
        source,
    };
    let alloc_id = client
        .context_id("base:allocation")
        .ok_or_else(|| Error::Unsupported("NBD export lacks base:allocation".into()))?;
    let mut ids = vec![alloc_id];
    if let Some(name) = dirty_context {
        ids.push(
            client
                .context_id(name)
                .ok_or_else(|| Error::Unsupported(format!("NBD export lacks {name}")))?,
        );
    }
    // Both contexts from one pass of block status requests, sent at once.
    let mut ext = client.extents_of(&ids, 0, size).map_err(nerr)?;
    let dirty = dirty_context.and_then(|_| ext.pop());
    let alloc = ext.pop().unwrap_or_default();
    Ok(Plan::build(size, chunk_size, &alloc, dirty.as_deref()))
}

/// Reads over NBD for the store's readers (several threads call
/// [`ChangedSource::read_at`] at once, so several reads are in flight; one
/// call also sends all its requests before waiting for any).
///
/// Only what changed crosses NBD: ranges that read as zeros are filled
/// locally, and of a chunk the bitmap marks only in part (`Partial`), only
/// the dirty 4 KiB grains are read ([`ChangedSource::read_ranges`]); the
/// store makes a patch of them over the parent's chunk id, so neither the
/// clean part nor the parent's data is read.
pub struct NbdSource<'a> {
    pub client: &'a Client,
    pub plan: &'a Plan,
    pub abort: &'a AtomicBool,
    /// Bytes read over NBD.
    pub bytes_read: AtomicU64,
    /// Paces the reads (`backup --rate`; rate 0: unlimited): QEMU serves
    /// them in the same main loop as the guest's I/O.
    pub limit: &'a RateLimiter,
}

impl NbdSource<'_> {
    /// Fill the parts of `buf` (image bytes `[offset, offset + len)`) that
    /// read as zeros; append the absolute ranges that must come from NBD.
    fn prepare(&self, offset: u64, buf: &mut [u8], need: &mut Vec<(u64, u64)>) {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        for (zs, ze) in within(&self.plan.zero, offset, end) {
            push_range(need, at, zs);
            buf[(zs - offset) as usize..(ze - offset) as usize].fill(0);
            at = ze;
        }
        push_range(need, at, end);
    }

    /// Read each `(start, end, pos)`: image bytes `[start, end)` into
    /// `buf[pos..]`, every request sent before the first wait.
    fn fetch(&self, parts: &[(u64, u64, usize)], buf: &mut [u8]) -> io::Result<()> {
        let stopped = || self.abort.load(Ordering::Relaxed);
        let interrupted = || io::Error::new(io::ErrorKind::Interrupted, "backup interrupted");
        if stopped() {
            return Err(interrupted());
        }
        let step = (self.client.max_request() as u64).clamp(4096, 4 << 20);
        let err = |e: nbd::Error| io::Error::other(nbd::error_chain(&e));
        // Every request in one write, one wake-up when all are answered.
        let mut reads = Vec::new();
        let mut dest = Vec::new();
        for &(s, e, pos) in parts {
            let mut at = s;
            while at < e {
                let len = (e - at).min(step);
                reads.push((at, vec![0u8; len as usize]));
                dest.push(pos + (at - s) as usize);
                at += len;
            }
        }
        if reads.is_empty() {
            return Ok(());
        }
        // Paced; a stop while waiting for the slot sends nothing.
        let bytes = reads.iter().map(|(_, b)| b.len() as u64).sum();
        self.limit.acquire(bytes, stopped);
        if stopped() {
            return Err(interrupted());
        }
        let data = self
            .client
            .submit_reads(reads)
            .and_then(|p| p.wait_reads())
            .map_err(err)?;
        let mut read = 0;
        for (data, pos) in data.iter().zip(dest) {
            buf[pos..pos + data.len()].copy_from_slice(data);
            read += data.len() as u64;
        }
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(())
    }
}

/// Append `[s, e)` to sorted ranges, merging with the last one.
fn push_range(v: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    if s >= e {
        return;
    }
    match v.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => v.push((s, e)),
    }
}

impl ChangedSource for NbdSource<'_> {
    fn chunk_state(&self, chunk: u64) -> ChunkState {
        self.plan.state(chunk)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_ranges(&[(offset, buf.len())], buf)
    }

    fn dirty_grains(&self, chunk: u64) -> Vec<bool> {
        let cs = self.plan.chunk_size;
        let start = chunk * cs;
        let end = (start + cs).min(self.plan.image_size);
        let grain = GRAIN as u64;
        let mut mask = vec![false; (end - start).div_ceil(grain) as usize];
        if let Some(d) = &self.plan.dirty {
            for (s, e) in within(d, start, end) {
                for g in (s - start) / grain..(e - start).div_ceil(grain) {
                    mask[g as usize] = true;
                }
            }
        }
        mask
    }

    fn read_ranges(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> io::Result<()> {
        // `buf` holds the ranges back to back: zero parts are filled here,
        // the rest is read, all ranges' requests at once.
        let mut parts = Vec::new();
        let mut need = Vec::new();
        let mut pos = 0usize;
        for &(offset, len) in ranges {
            need.clear();
            self.prepare(offset, &mut buf[pos..pos + len], &mut need);
            parts.extend(
                need.iter()
                    .map(|&(s, e)| (s, e, pos + (s - offset) as usize)),
            );
            pos += len;
        }
        self.fetch(&parts, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChunkState::*;

    #[test]
    fn plan_marks_dirty_zero_and_unchanged_chunks() {
        const Z: u32 = proto::STATE_ZERO | proto::STATE_HOLE;
        // 10 chunks of 64 KiB; data in [64K, 200K) and [576K, 640K).
        let k = 1024u64;
        let alloc = [
            (0, 64 * k, Z),
            (64 * k, 136 * k, 0),
            (200 * k, 376 * k, Z),
            (576 * k, 64 * k, 0),
        ];
        let full = Plan::build(640 * k, 64 * k, &alloc, None);
        assert_eq!(
            full.runs,
            [(0, 1, Zero), (1, 3, Data), (4, 5, Zero), (9, 1, Data)]
        );
        assert_eq!(full.dirty_bytes, 640 * k);
        // Dirty: 4 KiB inside chunk 2, and chunks 5..=6 (zero now).
        let dirty = [
            (0, 130 * k, 0),
            (130 * k, 4 * k, 1),
            (134 * k, 186 * k, 0),
            (320 * k, 128 * k, 1),
            (448 * k, 192 * k, 0),
        ];
        let inc = Plan::build(640 * k, 64 * k, &alloc, Some(&dirty));
        assert_eq!(
            inc.runs,
            [
                (0, 2, Unchanged),
                (2, 1, Partial),
                (3, 2, Unchanged),
                (5, 2, Zero),
                (7, 3, Unchanged)
            ]
        );
        assert_eq!(inc.dirty_bytes, 132 * k);
        assert_eq!(inc.state(2), Partial);
        assert_eq!(inc.state(6), Zero);
        assert_eq!(inc.state(9), Unchanged);
        assert_eq!(inc.count(Unchanged), 7);
        // A short last chunk, and extents that stop early count as data.
        let odd = Plan::build(100 * k, 64 * k, &[(0, 64 * k, Z)], None);
        assert_eq!(odd.runs, [(0, 1, Zero), (1, 1, Data)]);
    }
}
