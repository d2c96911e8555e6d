//! Restore from a remote store: a batch of chunks fetched as pack spans.
//!
//! A chunk is never fetched on its own: the chunks of a batch are looked up
//! in the index, sorted by pack and offset, and the records of one pack
//! that lie within [`SPAN_GAP`] of each other are coalesced into spans of
//! at most [`SPAN_MAX`], each one ranged GET (the gaps are fetched and
//! dropped: cheaper than another request). [`REMOTE_THREADS`] workers keep
//! that many GETs in flight. Every record is still decoded and verified on
//! its own; a span that fails (a pack repacked by gc meanwhile, a damaged
//! record) falls back to the chunk-by-chunk path, which reloads the index
//! and names the chunk in its error. `copy` reads a remote source the same
//! way ([`read_spans`]).

use crate::error::Result;
use crate::format::{MAX_STORED_LEN, RECORD_HEADER_LEN};
use crate::id::ChunkId;
use crate::index::Loc;
use crate::repo::Store;
use crate::snapshot::reader::SnapshotReader;

/// Chunks a worker claims at once from a remote store (8 MiB of 64 KiB
/// chunks): enough for its records to form long spans.
pub const SPAN_BATCH: u64 = 128;
/// Default workers, so GETs in flight, of a restore from a remote store.
pub const REMOTE_THREADS: usize = 16;
/// Records of one pack at most this far apart share a GET.
pub const SPAN_GAP: u64 = 256 << 10;
/// Longest span fetched by one GET.
pub const SPAN_MAX: u64 = 8 << 20;

/// Reads chunk `id` (item `i`) on its own into the buffer.
pub(crate) type ReadAlone<'a> = dyn FnMut(usize, &ChunkId, &mut Vec<u8>) -> Result<()> + 'a;

fn end_of(l: &Loc) -> u64 {
    l.offset + RECORD_HEADER_LEN as u64 + l.stored_len as u64
}

/// Fill `bufs[i]` with the verified plaintext of chunk `first + i` for
/// every stored chunk of `ids` (`lens[i]` bytes), fetching pack spans.
pub(super) fn fill(
    reader: &SnapshotReader,
    first: u64,
    ids: &[Option<ChunkId>],
    lens: &[usize],
    bufs: &mut [Vec<u8>],
    span: &mut Vec<u8>,
) -> Result<()> {
    let items: Vec<(usize, ChunkId)> = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| Some((i, (*id)?)))
        .collect();
    let mut alone = |i: usize, id: &ChunkId, buf: &mut Vec<u8>| {
        reader.read_chunk_id(first + i as u64, id, lens[i], buf)
    };
    read_spans(reader.store(), &items, bufs, span, &mut alone)?;
    for (i, id) in &items {
        if bufs[*i].len() != lens[*i] {
            alone(*i, id, &mut bufs[*i])?;
        }
    }
    Ok(())
}

/// Read the verified plaintext of chunk `id` into `bufs[i]` for every
/// `(i, id)` of `items`, in pack spans. A chunk that is not indexed, has an
/// impossible length, or whose span or record fails is read by `alone`
/// instead, which reloads the index or gives the chunk's error.
pub(crate) fn read_spans(
    store: &Store,
    items: &[(usize, ChunkId)],
    bufs: &mut [Vec<u8>],
    span: &mut Vec<u8>,
    alone: &mut ReadAlone<'_>,
) -> Result<()> {
    let mut wanted: Vec<(Loc, usize, ChunkId)> = Vec::with_capacity(items.len());
    for (i, id) in items {
        match store.locate(id)? {
            Some(loc) if loc.stored_len <= MAX_STORED_LEN => wanted.push((loc, *i, *id)),
            _ => alone(*i, id, &mut bufs[*i])?,
        }
    }
    wanted.sort_unstable_by_key(|(l, ..)| (l.pack, l.offset));
    let mut at = 0;
    while at < wanted.len() {
        let (pack, start) = (wanted[at].0.pack, wanted[at].0.offset);
        let mut end = end_of(&wanted[at].0);
        let mut next = at + 1;
        while let Some((l, ..)) = wanted.get(next) {
            if l.pack != pack || l.offset > end + SPAN_GAP || end_of(l).max(end) - start > SPAN_MAX
            {
                break;
            }
            end = end.max(end_of(l));
            next += 1;
        }
        span.resize((end - start) as usize, 0);
        let fetched = store.read_pack_span(&pack, start, span).is_ok();
        for (loc, i, id) in &wanted[at..next] {
            let from = (loc.offset - start) as usize;
            let rec = &span[from..from + RECORD_HEADER_LEN + loc.stored_len as usize];
            if !(fetched && store.decode_loc(id, loc, rec, &mut bufs[*i]).is_ok()) {
                alone(*i, id, &mut bufs[*i])?;
            }
        }
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::{BackupOptions, ErrorKind};

    /// Spans give the same bytes as chunk-by-chunk reads (duplicate and
    /// zero chunks, several packs), and a damaged record is still an error
    /// naming its chunk, never data.
    #[test]
    fn spans_read_what_chunks_read_and_damage_is_an_error() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        let mut img = image(42, 2 << 20);
        img[..8192].fill(0);
        let (a, b) = img.split_at_mut(1 << 20);
        b[..4096].copy_from_slice(&a[8192..8192 + 4096]);
        std::fs::write(&src, &img).unwrap();
        let opts = BackupOptions {
            pack_size: Some(256 << 10),
            ..Default::default()
        };
        store.backup("vm", &src, &opts).unwrap();
        let r = store.open_snapshot("vm").unwrap();
        let n = r.chunk_count();
        let mut ids = Vec::new();
        r.chunk_ids(0, n, &mut ids).unwrap();
        let lens: Vec<usize> = (0..n).map(|i| r.chunk_len(i).unwrap()).collect();
        let mut bufs = vec![Vec::new(); n as usize];
        let mut span = Vec::new();
        fill(&r, 0, &ids, &lens, &mut bufs, &mut span).unwrap();
        for (i, id) in ids.iter().enumerate() {
            let at = i * 4096;
            match id {
                Some(_) => assert!(bufs[i] == img[at..at + 4096], "chunk {i} differs"),
                None => assert!(img[at..at + 4096].iter().all(|&x| x == 0)),
            }
        }

        // Damage one record's data: that chunk fails, named, as it would alone.
        let id = ids[100].unwrap();
        let loc = store.locate(&id).unwrap().unwrap();
        let path = store.path().join(loc.pack.pack_key());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(loc.offset as usize) + RECORD_HEADER_LEN + 10] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        let e = fill(&r, 0, &ids, &lens, &mut bufs, &mut span).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
        assert_eq!(e.chunk(), Some(&id));
    }
}
