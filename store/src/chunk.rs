//! Chunk codec: zero detection, hashing, lz4 compression into pack records,
//! and verified decoding.
//!
//! A record is a [`RecordHeader`] followed by `stored_len` bytes of data,
//! compressed with lz4_flex's block format (safe decoder) when that saves
//! space, raw otherwise. Decoding always re-hashes the plaintext and compares
//! it with the id the caller asked for, so a read never returns wrong data.

use thiserror::Error;

use crate::format::{FormatError, RecordHeader, RECORD_FLAG_COMPRESSED, RECORD_HEADER_LEN};
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

/// Append the record for chunk `id` with plaintext `data` to `out`,
/// compressing when it saves space. Returns the stored data length.
pub fn encode_record(id: &ChunkId, data: &[u8], out: &mut Vec<u8>) -> u32 {
    let start = out.len();
    let bound = lz4_flex::block::get_maximum_output_size(data.len());
    out.resize(start + RECORD_HEADER_LEN + bound, 0);
    let body = start + RECORD_HEADER_LEN;
    let (flags, stored) = match lz4_flex::block::compress_into(data, &mut out[body..]) {
        Ok(n) if n < data.len() => (RECORD_FLAG_COMPRESSED, n),
        _ => {
            out[body..body + data.len()].copy_from_slice(data);
            (0, data.len())
        }
    };
    out.truncate(body + stored);
    let header = RecordHeader {
        id: id.0,
        raw_len: data.len() as u32,
        stored_len: stored as u32,
        flags,
    };
    out[start..body].copy_from_slice(&header.encode());
    stored as u32
}

/// Decode `record` (header + data) that the index says holds `id` with
/// `stored_len` data bytes; the verified plaintext replaces `out`'s content.
pub fn decode_record(
    record: &[u8],
    id: &ChunkId,
    stored_len: u32,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
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
    decode_body(&header, &record[RECORD_HEADER_LEN..], out)?;
    let found = ChunkId::of(out);
    if found != *id {
        return Err(ChunkError::HashMismatch { found });
    }
    Ok(())
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
