//! A Bloom filter of live chunk ids for gc's mark phase.
//!
//! Memory is ~10 bits per indexed chunk (≈125 MB for 10^8 chunks) instead of
//! 32+ bytes per id in an exact set. A false positive only keeps a dead chunk
//! alive (never the reverse), and a fresh random salt per gc run means a chunk
//! kept by chance once is very likely reclaimed next time.

use crate::id::ChunkId;

/// Bloom filter over chunk ids.
#[derive(Debug)]
pub struct Bloom {
    bits: Vec<u64>,
    nbits: u64,
    k: u64,
    salt: [u64; 2],
}

const BITS_PER_ITEM: u64 = 10;
const HASHES: u64 = 7;

impl Bloom {
    /// A filter sized for `expected` ids (about 1% false positives).
    pub fn new(expected: u64) -> Bloom {
        let nbits = (expected.max(1024) * BITS_PER_ITEM).div_ceil(64) * 64;
        Bloom {
            bits: vec![0u64; (nbits / 64) as usize],
            nbits,
            k: HASHES,
            salt: rand::random(),
        }
    }

    fn hashes(&self, id: &ChunkId) -> (u64, u64) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&id.0[..8]);
        b.copy_from_slice(&id.0[8..16]);
        (
            u64::from_le_bytes(a) ^ self.salt[0],
            (u64::from_le_bytes(b) ^ self.salt[1]) | 1,
        )
    }

    /// Add an id.
    pub fn insert(&mut self, id: &ChunkId) {
        let (a, b) = self.hashes(id);
        for i in 0..self.k {
            let bit = a.wrapping_add(i.wrapping_mul(b)) % self.nbits;
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// True if the id may have been added; false means certainly not.
    pub fn contains(&self, id: &ChunkId) -> bool {
        let (a, b) = self.hashes(id);
        (0..self.k).all(|i| {
            let bit = a.wrapping_add(i.wrapping_mul(b)) % self.nbits;
            self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(10_000);
        let ids: Vec<ChunkId> = (0..10_000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for id in &ids {
            b.insert(id);
        }
        assert!(ids.iter().all(|id| b.contains(id)));
        let fp = (10_000..30_000u32)
            .filter(|i| b.contains(&ChunkId::of(&i.to_le_bytes())))
            .count();
        assert!(fp < 20_000 / 25, "false positives: {fp}");
    }
}
