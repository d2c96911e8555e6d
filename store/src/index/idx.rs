//! Per-pack index files (`index/<pack>.idx`): the sorted entries of one pack.
//!
//! Layout: header (magic, version, reserved, entry count, pack id), then
//! `count` entries (id, offset, stored_len, raw_len) sorted by id, then a
//! blake3 trailer over everything before it. Written right after the pack
//! itself is durable; small (about 1000 entries for a 32 MiB pack), so readers
//! load unmerged ones whole.

use crate::format::{
    arr32_at, check_magic_version, u32_at, u64_at, FormatError, IDX_ENTRY_LEN, IDX_HEADER_LEN,
    IDX_MAGIC, IDX_VERSION, INDEX_FLAG_PATCH, TRAILER_LEN,
};
use crate::id::{ChunkId, PackId};

/// One chunk's location inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdxEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Length of the stored (possibly compressed) data after the header.
    pub stored_len: u32,
    /// Plaintext length.
    pub raw_len: u32,
    /// The record is a patch ([`INDEX_FLAG_PATCH`] in `raw_len` on disk).
    pub patch: bool,
}

/// Encode the idx file of `pack`; sorts `entries` by id.
pub fn encode(pack: &PackId, entries: &mut [IdxEntry]) -> Vec<u8> {
    entries.sort_unstable_by_key(|e| e.id);
    let mut b = Vec::with_capacity(IDX_HEADER_LEN + entries.len() * IDX_ENTRY_LEN + TRAILER_LEN);
    b.extend_from_slice(&IDX_MAGIC);
    b.extend_from_slice(&IDX_VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    b.extend_from_slice(&pack.0);
    for e in entries.iter() {
        b.extend_from_slice(&e.id.0);
        b.extend_from_slice(&e.offset.to_le_bytes());
        b.extend_from_slice(&e.stored_len.to_le_bytes());
        let flag = if e.patch { INDEX_FLAG_PATCH } else { 0 };
        b.extend_from_slice(&(e.raw_len | flag).to_le_bytes());
    }
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    b
}

/// Decode and validate an idx file; returns its pack id and sorted entries.
pub fn decode(b: &[u8]) -> Result<(PackId, Vec<IdxEntry>), FormatError> {
    check_magic_version(b, &IDX_MAGIC, IDX_VERSION, "pack index")?;
    let invalid = |detail: String| FormatError::Invalid {
        what: "pack index",
        detail,
    };
    if b.len() < IDX_HEADER_LEN + TRAILER_LEN {
        return Err(invalid("truncated".into()));
    }
    let count = u64_at(b, 16);
    let expected = (count as u128) * IDX_ENTRY_LEN as u128 + (IDX_HEADER_LEN + TRAILER_LEN) as u128;
    if b.len() as u128 != expected {
        return Err(invalid(format!("length {} for {count} entries", b.len())));
    }
    let body = b.len() - TRAILER_LEN;
    if blake3::hash(&b[..body]).as_bytes() != &b[body..] {
        return Err(FormatError::BadChecksum { what: "pack index" });
    }
    let mut pack = [0u8; 16];
    pack.copy_from_slice(&b[24..40]);
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = IDX_HEADER_LEN;
    while at < body {
        entries.push(IdxEntry {
            id: ChunkId(arr32_at(b, at)),
            offset: u64_at(b, at + 32),
            stored_len: u32_at(b, at + 40),
            raw_len: u32_at(b, at + 44) & !INDEX_FLAG_PATCH,
            patch: u32_at(b, at + 44) & INDEX_FLAG_PATCH != 0,
        });
        at += IDX_ENTRY_LEN;
    }
    if entries.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(invalid("entries not sorted".into()));
    }
    Ok((PackId(pack), entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sorted_and_checksummed() {
        let pack = PackId([3; 16]);
        let mut entries: Vec<IdxEntry> = (0..100u32)
            .map(|i| IdxEntry {
                id: ChunkId::of(&i.to_le_bytes()),
                offset: 16 + i as u64 * 100,
                stored_len: 52,
                raw_len: 4096,
                patch: i % 3 == 0,
            })
            .collect();
        let bytes = encode(&pack, &mut entries);
        let (p, decoded) = decode(&bytes).unwrap();
        assert_eq!(p, pack);
        assert_eq!(decoded, entries);
        assert!(decoded.windows(2).all(|w| w[0].id < w[1].id));
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert!(matches!(decode(&bad), Err(FormatError::BadChecksum { .. })));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
