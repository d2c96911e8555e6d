//! Patch records: sub-chunk deltas.
//!
//! A scattered 4 KiB write dirties a whole 64 KiB chunk. Instead of storing
//! the whole rewritten chunk, an incremental that knows which 4 KiB *grains*
//! changed (a live backup's dirty bitmap) stores a patch: the id of a base
//! chunk and only the grains that differ from it.
//!
//! # Payload ([`PATCH_HEADER_LEN`]-byte header, all little-endian)
//! ```text
//! magic "IRPATCH1" | base chunk id (32) | chunk length u32 | grain shift u32
//! grain mask: ceil(grains / 8) bytes, bit i % 8 of byte i / 8 = grain i
//! the marked grains' bytes, in grain order (a short chunk's last grain is short)
//! ```
//! A base id of 32 zero bytes means the all-zero chunk (never stored). The
//! payload is stored as a pack record with [`RECORD_FLAG_PATCH`]
//! (compressed, sealed on an encrypted store like any record); its id is
//! [`Codec::patch_id`](crate::chunk::Codec::patch_id) of the payload, a
//! hash domain-separated from chunk ids.
//!
//! # Chains
//! A patch's base is chunk data or another patch (store version 4): a new
//! patch over a chunk whose parent entry is a patch holds only the new
//! grains, over the parent's patch. A chain is at most
//! [`MAX_PATCH_CHAIN`] patches deep, so reading a patched chunk is at most
//! that many record reads plus one, never a walk of the snapshots. At that
//! depth a new patch holds the top patch's grains and the new ones, over
//! the top patch's base, so the depth stays. Once the chain would replace
//! more than half the chunk ([`should_materialize`]), the chunk is stored
//! whole instead. A version 3 store's patches all rest on data
//! (depth one); they are read the same way.
//!
//! [`PatchRef::parse`] takes hostile input: every length is checked, nothing
//! panics (fuzzed by `fuzz/fuzz_targets/patch.rs`).

use crate::format::{
    u32_at, FormatError, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PATCH_GRAIN_SHIFT, PATCH_HEADER_LEN,
    PATCH_MAGIC,
};
#[cfg(doc)]
use crate::format::{MAX_PATCH_CHAIN, RECORD_FLAG_PATCH};
use crate::id::ChunkId;

/// Grain size of the patches written (4 KiB).
pub const GRAIN: usize = 1 << PATCH_GRAIN_SHIFT;

fn invalid(detail: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        what: "patch",
        detail: detail.into(),
    }
}

/// A parsed, validated patch payload (borrowed).
#[derive(Debug, Clone, Copy)]
pub struct PatchRef<'a> {
    /// The base chunk (null: the zero chunk).
    pub base: ChunkId,
    /// Length of the chunk the patch produces (and of its base).
    pub chunk_len: u32,
    shift: u32,
    mask: &'a [u8],
    data: &'a [u8],
}

impl<'a> PatchRef<'a> {
    /// Parse and validate `payload`.
    pub fn parse(payload: &'a [u8]) -> Result<PatchRef<'a>, FormatError> {
        if payload.len() < PATCH_HEADER_LEN {
            return Err(invalid("truncated header"));
        }
        if payload[..8] != PATCH_MAGIC {
            return Err(FormatError::BadMagic { what: "patch" });
        }
        let mut base = ChunkId::default();
        base.0.copy_from_slice(&payload[8..40]);
        let chunk_len = u32_at(payload, 40);
        let shift = u32_at(payload, 44);
        if chunk_len == 0 || chunk_len > MAX_CHUNK_SIZE {
            return Err(invalid(format!("chunk length {chunk_len}")));
        }
        if !(MIN_CHUNK_SIZE.trailing_zeros()..=MAX_CHUNK_SIZE.trailing_zeros()).contains(&shift) {
            return Err(invalid(format!("grain shift {shift}")));
        }
        let grains = (chunk_len as usize).div_ceil(1 << shift);
        let mask_len = grains.div_ceil(8);
        let rest = &payload[PATCH_HEADER_LEN..];
        if rest.len() < mask_len {
            return Err(invalid("truncated grain mask"));
        }
        let (mask, data) = rest.split_at(mask_len);
        if !grains.is_multiple_of(8) && mask[mask_len - 1] >> (grains % 8) != 0 {
            return Err(invalid("grain mask marks grains past the chunk"));
        }
        let p = PatchRef {
            base,
            chunk_len,
            shift,
            mask,
            data,
        };
        let count = p.count();
        if count == 0 {
            return Err(invalid("no grain"));
        }
        let expected: usize = (0..grains)
            .filter(|&i| p.is_set(i))
            .map(|i| p.range(i).len())
            .sum();
        if data.len() != expected {
            return Err(invalid(format!(
                "{} grain bytes, the mask needs {expected}",
                data.len()
            )));
        }
        Ok(p)
    }

    /// Number of grains of the chunk.
    pub fn grains(&self) -> usize {
        (self.chunk_len as usize).div_ceil(1 << self.shift)
    }

    /// Grain size in bytes.
    pub fn grain_size(&self) -> usize {
        1 << self.shift
    }

    /// True when the patch holds grain `i`.
    pub fn is_set(&self, i: usize) -> bool {
        self.mask
            .get(i / 8)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Number of grains the patch holds.
    pub fn count(&self) -> usize {
        self.mask.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// The held grains as bits (bit `i` = grain `i`), for a chunk of at
    /// most 64 grains.
    pub fn grain_bits(&self) -> Option<u64> {
        (self.grains() <= 64).then(|| {
            (0..self.grains())
                .filter(|&i| self.is_set(i))
                .fold(0u64, |b, i| b | 1 << i)
        })
    }

    /// Byte range of grain `i` in the chunk.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        let g = 1usize << self.shift;
        (i * g).min(self.chunk_len as usize)..((i + 1) * g).min(self.chunk_len as usize)
    }

    /// The held grains: `(grain index, bytes)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &'a [u8])> + '_ {
        let mut at = 0;
        (0..self.grains())
            .filter(|&i| self.is_set(i))
            .map(move |i| {
                let n = self.range(i).len();
                let d = &self.data[at..at + n];
                at += n;
                (i, d)
            })
    }

    /// Apply the patch to `chunk`, which holds the base's bytes.
    pub fn apply(&self, chunk: &mut [u8]) -> Result<(), FormatError> {
        if chunk.len() != self.chunk_len as usize {
            return Err(invalid(format!(
                "base chunk has {} bytes, the patch {}",
                chunk.len(),
                self.chunk_len
            )));
        }
        for (i, d) in self.iter() {
            chunk[self.range(i)].copy_from_slice(d);
        }
        Ok(())
    }
}

/// True when a patch holding `count` of `grains` grains should be stored
/// as a whole chunk instead (it covers more than half of it).
pub fn should_materialize(count: usize, grains: usize) -> bool {
    count * 2 > grains
}

/// What a writer needs to know of a patch to chain a new one over it:
/// its depth (patch records down to chunk data, 1 when its base is data)
/// and the grains the whole chain replaces in the chunk data under it
/// (bit `i` = grain `i`; chunks of at most 64 grains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainInfo {
    /// Patch records from this one down to chunk data.
    pub depth: u32,
    /// Grains the chain replaces.
    pub covered: u64,
}

/// Most patches [`ChainHints`] remembers before it starts over (about
/// 15 MiB).
const HINTS_MAX: usize = 1 << 18;

/// [`ChainInfo`] of recently written patches, by patch id, so the next
/// point or incremental chains over them without reading them back. A
/// patch id names its payload, and the payload its base, so an entry is
/// never stale; a miss costs a walk of the chain. Bounded: when full it
/// starts over.
#[derive(Debug, Default)]
pub struct ChainHints {
    map: std::collections::HashMap<ChunkId, ChainInfo>,
}

impl ChainHints {
    /// The info of patch `id`, if remembered.
    pub fn get(&self, id: &ChunkId) -> Option<ChainInfo> {
        self.map.get(id).copied()
    }

    /// Remember patch `id`'s info.
    pub fn insert(&mut self, id: ChunkId, info: ChainInfo) {
        if self.map.len() >= HINTS_MAX {
            self.map.clear();
        }
        self.map.insert(id, info);
    }
}

/// Encode a patch of [`GRAIN`]-sized grains over `base` (null: zeros) for a
/// chunk of `chunk_len` bytes into `out` (replacing its content). `grain(i)`
/// gives grain `i`'s bytes when the patch holds it; each must be exactly
/// the grain's length (shorter for a short chunk's last grain).
pub fn encode<'g>(
    base: &ChunkId,
    chunk_len: u32,
    grain: impl Fn(usize) -> Option<&'g [u8]>,
    out: &mut Vec<u8>,
) {
    let grains = (chunk_len as usize).div_ceil(GRAIN);
    out.clear();
    out.extend_from_slice(&PATCH_MAGIC);
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&chunk_len.to_le_bytes());
    out.extend_from_slice(&PATCH_GRAIN_SHIFT.to_le_bytes());
    let mask_at = out.len();
    out.resize(mask_at + grains.div_ceil(8), 0);
    for i in 0..grains {
        if let Some(d) = grain(i) {
            debug_assert_eq!(
                d.len(),
                ((i + 1) * GRAIN).min(chunk_len as usize) - i * GRAIN
            );
            out[mask_at + i / 8] |= 1 << (i % 8);
            out.extend_from_slice(d);
        }
    }
}

#[cfg(test)]
mod store_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(base: &ChunkId, len: u32, set: &[usize]) -> Vec<u8> {
        let data: Vec<Vec<u8>> = (0..(len as usize).div_ceil(GRAIN))
            .map(|i| {
                let n = ((i + 1) * GRAIN).min(len as usize) - i * GRAIN;
                vec![i as u8 + 1; n]
            })
            .collect();
        let mut out = Vec::new();
        encode(
            base,
            len,
            |i| set.contains(&i).then(|| &data[i][..]),
            &mut out,
        );
        out
    }

    #[test]
    fn encode_parse_apply_round_trip_including_a_short_last_grain() {
        let base = ChunkId::of(b"base");
        let len = 3 * GRAIN as u32 + 100;
        let p = payload(&base, len, &[1, 3]);
        let r = PatchRef::parse(&p).unwrap();
        assert_eq!(
            (r.base, r.chunk_len, r.grains(), r.count()),
            (base, len, 4, 2)
        );
        let mut chunk = vec![0xeeu8; len as usize];
        r.apply(&mut chunk).unwrap();
        assert!(chunk[..GRAIN].iter().all(|&b| b == 0xee));
        assert!(chunk[GRAIN..2 * GRAIN].iter().all(|&b| b == 2));
        assert!(chunk[2 * GRAIN..3 * GRAIN].iter().all(|&b| b == 0xee));
        assert!(chunk[3 * GRAIN..].iter().all(|&b| b == 4));
        // A base of another length is refused.
        assert!(r.apply(&mut vec![0u8; len as usize - 1]).is_err());
    }

    #[test]
    fn hostile_payloads_are_errors_not_panics() {
        let base = ChunkId::of(b"b");
        let good = payload(&base, 16 * GRAIN as u32, &[0, 15]);
        assert!(PatchRef::parse(&good).is_ok());
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(PatchRef::parse(&good[..n]).is_err(), "truncated at {n}");
        }
        // Trailing bytes, bad magic, absurd lengths, empty mask, stray bits.
        let mut long = good.clone();
        long.push(0);
        assert!(PatchRef::parse(&long).is_err());
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(PatchRef::parse(&bad).is_err());
        for (at, v) in [(40, 0u32), (40, u32::MAX), (44, 0), (44, 40), (44, 11)] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(PatchRef::parse(&bad).is_err(), "field {at} = {v}");
        }
        let empty = payload(&base, 16 * GRAIN as u32, &[]);
        assert!(PatchRef::parse(&empty).is_err());
        let short = payload(&base, 3 * GRAIN as u32, &[0]);
        let mut stray = short.clone();
        stray[PATCH_HEADER_LEN] |= 0x80;
        assert!(PatchRef::parse(&stray).is_err());
    }

    #[test]
    fn materialize_above_half() {
        assert!(!should_materialize(8, 16));
        assert!(should_materialize(9, 16));
        assert!(should_materialize(1, 1));
    }
}
