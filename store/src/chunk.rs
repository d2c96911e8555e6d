//! Chunk codec: zero detection, hashing, lz4 compression into pack records,
//! and verified decoding.
//!
//! A record is a [`RecordHeader`] followed by `stored_len` bytes of data,
//! compressed with lz4_flex's block format (safe decoder) when that saves
//! space, raw otherwise. Decoding re-hashes the plaintext and compares it
//! with the id the caller asked for, so a read never returns wrong data; a
//! sealed record (encrypted store) is checked by its authentication tag,
//! which binds the id, instead.

use std::cell::RefCell;
use std::sync::Arc;

use thiserror::Error;

use crate::crypto::Cipher;
use crate::format::{
    FormatError, RecordHeader, AEAD_TAG_LEN, RECORD_AD_MAGIC, RECORD_FLAG_COMPRESSED,
    RECORD_FLAG_ENCRYPTED, RECORD_FLAG_PATCH, RECORD_HEADER_LEN, RECORD_NONCE_LEN,
    RECORD_SEAL_OVERHEAD,
};

/// blake3 `derive_key` context of plaintext patch ids: a patch id is never
/// the id of chunk data (domain separation).
const PATCH_ID_CONTEXT: &str = "instant-recovery store 2026-12 patch id";

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Chunk data.
    Data,
    /// A patch payload ([`crate::patch`]).
    Patch,
}
use crate::id::ChunkId;

/// A failure decoding a chunk record.
#[derive(Debug, Error)]
pub enum ChunkError {
    /// The record header is damaged.
    #[error("Bad record header")]
    Header(#[source] FormatError),
    /// The record holds a different chunk than the index says.
    #[error("Record holds chunk {found} instead")]
    WrongId { found: ChunkId },
    /// The record's length disagrees with the index.
    #[error("Record length {found} does not match index length {expected}")]
    Length { found: u32, expected: u32 },
    /// lz4 decompression failed.
    #[error("Failed to decompress chunk data")]
    Decompress(#[source] lz4_flex::block::DecompressError),
    /// Decompressed to the wrong length.
    #[error("Decompressed to {found} bytes instead of {expected}")]
    RawLength { found: usize, expected: u32 },
    /// The plaintext hash differs from the id.
    #[error("Content hash is {found}")]
    HashMismatch { found: ChunkId },
    /// A sealed record failed authentication (tampered, moved or another
    /// store's).
    #[error("Authentication failed (tampered, damaged or not this store's)")]
    Authentication,
    /// A patch record where chunk data was required (a patch's base).
    #[error("Record is a patch where chunk data is required")]
    UnexpectedPatch,
    /// An encrypted store holds a plaintext record, or the reverse.
    #[error("Record is {}encrypted, the store is {}", if *.record { "" } else { "not " }, if *.record { "not" } else { "encrypted" })]
    EncryptionMismatch { record: bool },
}

thread_local! {
    static SEALED_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How a store turns chunks into records and back: plaintext ids and
/// records, or (encrypted store) keyed ids and sealed records.
#[derive(Debug, Clone, Default)]
pub struct Codec {
    cipher: Option<Arc<Cipher>>,
}

fn record_ad(id: &ChunkId, raw_len: u32, flags: u32) -> [u8; 48] {
    let mut ad = [0u8; 48];
    ad[..8].copy_from_slice(&RECORD_AD_MAGIC);
    ad[8..40].copy_from_slice(&id.0);
    ad[40..44].copy_from_slice(&raw_len.to_le_bytes());
    ad[44..48].copy_from_slice(&flags.to_le_bytes());
    ad
}

impl Codec {
    /// The codec of a plaintext store.
    pub fn plain() -> Codec {
        Codec { cipher: None }
    }

    /// The codec of an encrypted store.
    pub fn sealed(cipher: Arc<Cipher>) -> Codec {
        Codec {
            cipher: Some(cipher),
        }
    }

    /// The store's keys, if it is encrypted.
    pub fn cipher(&self) -> Option<&Arc<Cipher>> {
        self.cipher.as_ref()
    }

    /// The id of a chunk's plaintext: blake3, keyed in an encrypted store.
    pub fn id_of(&self, data: &[u8]) -> ChunkId {
        match &self.cipher {
            Some(c) => c.chunk_id(data),
            None => ChunkId::of(data),
        }
    }

    /// The id of a patch payload: blake3 in `derive_key` mode (keyed with a
    /// key of its own in an encrypted store), so it never equals the id of
    /// any chunk data.
    pub fn patch_id(&self, payload: &[u8]) -> ChunkId {
        match &self.cipher {
            Some(c) => c.patch_id(payload),
            None => {
                let mut h = blake3::Hasher::new_derive_key(PATCH_ID_CONTEXT);
                h.update(payload);
                ChunkId(*h.finalize().as_bytes())
            }
        }
    }

    /// [`encode_record`], sealing the data in an encrypted store (compressed
    /// first). Returns the stored data length.
    pub fn encode_record(&self, id: &ChunkId, data: &[u8], out: &mut Vec<u8>) -> u32 {
        self.encode_kind(id, data, RecordKind::Data, out)
    }

    /// [`Codec::encode_record`] of a record of `kind` (a patch payload gets
    /// [`RECORD_FLAG_PATCH`]).
    pub fn encode_kind(
        &self,
        id: &ChunkId,
        data: &[u8],
        kind: RecordKind,
        out: &mut Vec<u8>,
    ) -> u32 {
        let start = out.len();
        out.resize(start + record_bound(data.len()), 0);
        let n = self.encode_kind_into(id, data, kind, &mut out[start..]);
        out.truncate(start + n);
        (n - RECORD_HEADER_LEN) as u32
    }

    /// Write the record (header and stored data) of chunk `id` at the start
    /// of `out`, which holds at least [`record_bound`] bytes; returns the
    /// record's length. For callers that keep one buffer: nothing is
    /// cleared or allocated per chunk.
    pub fn encode_record_into(&self, id: &ChunkId, data: &[u8], out: &mut [u8]) -> usize {
        self.encode_kind_into(id, data, RecordKind::Data, out)
    }

    /// [`Codec::encode_record_into`] of a record of `kind`.
    pub fn encode_kind_into(
        &self,
        id: &ChunkId,
        data: &[u8],
        kind: RecordKind,
        out: &mut [u8],
    ) -> usize {
        let body = RECORD_HEADER_LEN
            + if self.cipher.is_some() {
                RECORD_NONCE_LEN
            } else {
                0
            };
        let raw_len = data.len() as u32;
        let (mut flags, n) = match lz4_flex::block::compress_into(data, &mut out[body..]) {
            Ok(n) if n < data.len() => (RECORD_FLAG_COMPRESSED, n),
            _ => {
                out[body..body + data.len()].copy_from_slice(data);
                (0, data.len())
            }
        };
        if kind == RecordKind::Patch {
            flags |= RECORD_FLAG_PATCH;
        }
        let mut stored = n;
        if let Some(c) = &self.cipher {
            flags |= RECORD_FLAG_ENCRYPTED;
            let nonce: [u8; RECORD_NONCE_LEN] = rand::random();
            out[RECORD_HEADER_LEN..body].copy_from_slice(&nonce);
            let ad = record_ad(id, raw_len, flags);
            let tag = c.seal_record(&nonce, &ad, &mut out[body..body + n]);
            out[body + n..body + n + AEAD_TAG_LEN].copy_from_slice(&tag);
            stored = n + RECORD_SEAL_OVERHEAD as usize;
        }
        let header = RecordHeader {
            id: id.0,
            raw_len,
            stored_len: stored as u32,
            flags,
        };
        out[..RECORD_HEADER_LEN].copy_from_slice(&header.encode());
        RECORD_HEADER_LEN + stored
    }

    /// [`decode_record`] for this store: authenticates and decrypts a sealed
    /// record (its tag binds `id`), or decodes a plaintext one and checks its
    /// hash. A patch record is an error: this wants chunk data.
    pub fn decode_record(
        &self,
        record: &[u8],
        id: &ChunkId,
        stored_len: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        match self.decode_any(record, id, stored_len, out)? {
            RecordKind::Data => Ok(()),
            RecordKind::Patch => {
                out.clear();
                Err(ChunkError::UnexpectedPatch)
            }
        }
    }

    /// [`Codec::decode_record`] of a data or patch record: `out` receives
    /// the verified chunk data or patch payload (a patch's id is checked
    /// with [`Codec::patch_id`]; its tag binds the patch flag).
    pub fn decode_any(
        &self,
        record: &[u8],
        id: &ChunkId,
        stored_len: u32,
        out: &mut Vec<u8>,
    ) -> Result<RecordKind, ChunkError> {
        let header = check_record(record, id, stored_len)?;
        let kind = if header.flags & RECORD_FLAG_PATCH != 0 {
            RecordKind::Patch
        } else {
            RecordKind::Data
        };
        let sealed = header.flags & RECORD_FLAG_ENCRYPTED != 0;
        if sealed != self.cipher.is_some() {
            return Err(ChunkError::EncryptionMismatch { record: sealed });
        }
        let body = &record[RECORD_HEADER_LEN..];
        match &self.cipher {
            None => {
                decode_body(&header, body, out)?;
                let found = match kind {
                    RecordKind::Data => self.id_of(out),
                    RecordKind::Patch => self.patch_id(out),
                };
                if found != *id {
                    return Err(ChunkError::HashMismatch { found });
                }
            }
            Some(c) => {
                let (nonce, rest) = body.split_at(RECORD_NONCE_LEN);
                let (ct, tag) = rest.split_at(rest.len() - AEAD_TAG_LEN);
                let ad = record_ad(id, header.raw_len, header.flags);
                if header.flags & RECORD_FLAG_COMPRESSED == 0 {
                    out.clear();
                    out.extend_from_slice(ct);
                    if !c.open_record(nonce, &ad, out, tag) {
                        out.clear();
                        return Err(ChunkError::Authentication);
                    }
                } else {
                    SEALED_BUF.with(|b| {
                        let mut b = b.borrow_mut();
                        b.clear();
                        b.extend_from_slice(ct);
                        if !c.open_record(nonce, &ad, &mut b, tag) {
                            return Err(ChunkError::Authentication);
                        }
                        decode_body(&header, &b, out)
                    })?;
                }
                // No keyed re-hash: the tag already binds this plaintext to
                // the id (in the associated data) under the store's key, and
                // only a holder of that key, who computed the id from this
                // plaintext, can make one. Hashing again cost a fifth of a
                // cold encrypted read.
            }
        }
        Ok(kind)
    }
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    for w in &mut words {
        let mut x = [0u8; 16];
        x.copy_from_slice(w);
        if u128::from_ne_bytes(x) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

/// The most bytes the record of `raw_len` plaintext bytes can take:
/// header, lz4's worst case, and a sealed record's nonce and tag.
pub fn record_bound(raw_len: usize) -> usize {
    RECORD_HEADER_LEN
        + RECORD_SEAL_OVERHEAD as usize
        + lz4_flex::block::get_maximum_output_size(raw_len)
}

/// Append the record for chunk `id` with plaintext `data` to `out`,
/// compressing when it saves space. Returns the stored data length.
pub fn encode_record(id: &ChunkId, data: &[u8], out: &mut Vec<u8>) -> u32 {
    Codec::plain().encode_record(id, data, out)
}

/// Decode `record` (header + data) that the index says holds `id` with
/// `stored_len` data bytes; the verified plaintext replaces `out`'s content.
pub fn decode_record(
    record: &[u8],
    id: &ChunkId,
    stored_len: u32,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    Codec::plain().decode_record(record, id, stored_len, out)
}

/// Decode a record's header and check it against the index's id and length.
fn check_record(record: &[u8], id: &ChunkId, stored_len: u32) -> Result<RecordHeader, ChunkError> {
    let header = RecordHeader::decode(record).map_err(ChunkError::Header)?;
    if header.id != id.0 {
        return Err(ChunkError::WrongId {
            found: ChunkId(header.id),
        });
    }
    if header.stored_len != stored_len || record.len() != RECORD_HEADER_LEN + stored_len as usize {
        return Err(ChunkError::Length {
            found: header.stored_len,
            expected: stored_len,
        });
    }
    Ok(header)
}

/// Decode a record body without checking the hash.
pub(crate) fn decode_body(
    header: &RecordHeader,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    out.clear();
    if header.flags & RECORD_FLAG_COMPRESSED != 0 {
        out.resize(header.raw_len as usize, 0);
        let n = lz4_flex::block::decompress_into(body, out).map_err(ChunkError::Decompress)?;
        if n != header.raw_len as usize {
            return Err(ChunkError::RawLength {
                found: n,
                expected: header.raw_len,
            });
        }
    } else {
        out.extend_from_slice(body);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn compressible_and_random_round_trip() {
        let text: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let random: Vec<u8> = (0..65536).map(|_| rand::random::<u8>()).collect();
        for data in [&text, &random] {
            let id = ChunkId::of(data);
            let mut rec = vec![1, 2, 3];
            let stored = encode_record(&id, data, &mut rec);
            assert_eq!(rec.len(), 3 + RECORD_HEADER_LEN + stored as usize);
            let mut out = Vec::new();
            decode_record(&rec[3..], &id, stored, &mut out).unwrap();
            assert_eq!(&out, data);
        }
        let mut rec = Vec::new();
        let stored = encode_record(&ChunkId::of(&text), &text, &mut rec);
        assert!((stored as usize) < text.len() / 10, "compressed {stored}");
        let mut rec = Vec::new();
        let stored = encode_record(&ChunkId::of(&random), &random, &mut rec);
        assert_eq!(stored as usize, random.len(), "random data stored raw");
    }

    #[test]
    fn corruption_is_detected() {
        let data = vec![5u8; 4096];
        let id = ChunkId::of(&data);
        let mut rec = Vec::new();
        let stored = encode_record(&id, &data, &mut rec);
        let mut out = Vec::new();
        // Flip a data byte.
        let mut bad = rec.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(decode_record(&bad, &id, stored, &mut out).is_err());
        // Ask for a different id.
        let other = ChunkId::of(b"other");
        assert!(matches!(
            decode_record(&rec, &other, stored, &mut out),
            Err(ChunkError::WrongId { .. })
        ));
        // Wrong length.
        assert!(matches!(
            decode_record(&rec, &id, stored + 1, &mut out),
            Err(ChunkError::Length { .. })
        ));
    }

    #[test]
    fn raw_record_with_flipped_byte_fails_hash() {
        let data: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        let id = ChunkId::of(&data);
        let mut rec = Vec::new();
        let stored = encode_record(&id, &data, &mut rec);
        rec[RECORD_HEADER_LEN + 100] ^= 1;
        let mut out = Vec::new();
        assert!(matches!(
            decode_record(&rec, &id, stored, &mut out),
            Err(ChunkError::HashMismatch { .. })
        ));
    }
}
