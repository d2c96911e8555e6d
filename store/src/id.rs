//! Typed identifiers: [`ChunkId`] (blake3 of a chunk's plaintext) and
//! [`PackId`] (random name of a pack file).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The id of a chunk: the blake3 hash of its plaintext.
///
/// `Display` is lowercase hex, `FromStr` parses 64 hex digits. The all-zero
/// value never occurs as a real hash; manifests use it to mean "zero chunk".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// True for the all-zero value, which manifests use to mark zero chunks.
    pub fn is_null(&self) -> bool {
        self.0 == [0u8; 32]
    }

    /// Short form for logs (first 8 bytes as hex).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        // Cannot fail: the buffer is exactly twice the input length.
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = Error;

    fn from_str(s: &str) -> Result<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid(format!("Invalid chunk id {s:?}")).with_source(e))?;
        Ok(ChunkId(out))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<ChunkId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The name of a pack file: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh random pack id.
    pub fn random() -> PackId {
        PackId(rand::random())
    }

    /// The backend key of the pack file: `packs/<2 hex>/<id>.pack`.
    pub fn pack_key(&self) -> String {
        let h = self.to_string();
        format!("packs/{}/{h}.pack", &h[..2])
    }

    /// The backend key of the pack's own index: `index/<id>.idx`.
    pub fn idx_key(&self) -> String {
        format!("index/{self}.idx")
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

impl FromStr for PackId {
    type Err = Error;

    fn from_str(s: &str) -> Result<PackId> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid(format!("Invalid pack id {s:?}")).with_source(e))?;
        Ok(PackId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(s[..62].parse::<ChunkId>().is_err());
    }

    #[test]
    fn chunk_id_serializes_as_hex_string() {
        let id = ChunkId::of(b"x");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
    }

    #[test]
    fn pack_keys() {
        let p: PackId = "00112233445566778899aabbccddeeff".parse().unwrap();
        assert_eq!(
            p.pack_key(),
            "packs/00/00112233445566778899aabbccddeeff.pack"
        );
        assert_eq!(p.idx_key(), "index/00112233445566778899aabbccddeeff.idx");
    }
}
