//! On-disk format constants and fixed-size headers.
//!
//! DO NOT MODIFY the magic numbers, versions or layouts in this file: stores
//! written by released versions must stay readable. A format change means a
//! new version number and code that reads both.
//!
//! All integers are little-endian. Every header's size is asserted at compile
//! time against the sum of its fields.

use thiserror::Error;

/// `format` value of `config.json`.
pub const CONFIG_FORMAT: &str = "instant-recovery-store";
/// Version of the store layout recorded in `config.json`.
pub const STORE_VERSION: u32 = 1;
/// Version of an encrypted store's layout (`config.json` then names the
/// encryption, see [`crate::crypto`]). A program that only knows
/// [`STORE_VERSION`] refuses it instead of reading ciphertext.
pub const STORE_VERSION_ENCRYPTED: u32 = 2;

/// Version of a store that holds patch records ([`RECORD_FLAG_PATCH`]),
/// plaintext or encrypted (the `encryption` section says which). A store
/// is upgraded from 1 or 2 when its first patch is written, so a program
/// that does not know patches (whose gc would drop their bases) refuses it
/// at open instead of misreading it.
pub const STORE_VERSION_PATCHES: u32 = 3;

/// Version of a store whose patch records may chain: a patch's base may
/// itself be a patch, at most [`MAX_PATCH_CHAIN`] records from chunk data
/// (plaintext or encrypted, as for version 3). Written from this version
/// on when a store gets patches; a version 3 store is upgraded before its
/// first patch of this program. A program that knows version 3 only (whose
/// gc marks one base per patch, and would drop the rest of a chain) refuses
/// it at open.
pub const STORE_VERSION_PATCH_CHAINS: u32 = 4;

/// Longest chain of patch records a chunk may resolve through: a patch of
/// depth `d` is `d` records over chunk data, and reading it is `d + 1`
/// record reads. A deeper chain is refused as corrupt.
pub const MAX_PATCH_CHAIN: u32 = 8;

/// Smallest allowed chunk size (4 KiB).
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
/// Largest allowed chunk size (4 MiB).
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Default chunk size (64 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;

/// Magic of a pack file.
pub const PACK_MAGIC: [u8; 8] = *b"IRPACK\0\0";
/// Version of the pack format.
pub const PACK_VERSION: u32 = 1;
/// Pack header: magic, version, reserved.
pub const PACK_HEADER_LEN: usize = 16;
const _: () = assert!(PACK_HEADER_LEN == 8 + 4 + 4);

/// Chunk record header: id, raw_len, stored_len, flags, check.
pub const RECORD_HEADER_LEN: usize = 48;
const _: () = assert!(RECORD_HEADER_LEN == 32 + 4 + 4 + 4 + 4);
/// Record flag: the data is lz4 (block format) compressed.
pub const RECORD_FLAG_COMPRESSED: u32 = 1;
/// Record flag: the data is sealed (encrypted store): a
/// [`RECORD_NONCE_LEN`]-byte nonce, the AEAD ciphertext of the (possibly
/// compressed) data, and a [`AEAD_TAG_LEN`]-byte tag.
pub const RECORD_FLAG_ENCRYPTED: u32 = 2;
/// Record flag: the data is a patch payload ([`crate::patch`]), not chunk
/// data: a base chunk id and the grains that differ from it. Its id is the
/// domain-separated hash of the payload ([`crate::chunk::Codec::patch_id`]).
pub const RECORD_FLAG_PATCH: u32 = 4;
/// Bit set in a per-pack index entry's `raw_len` and in a merged index
/// entry's `stored_len` when the record is a patch (lengths stay far below
/// it: at most [`MAX_STORED_LEN`]). A program that does not know it sees an
/// impossible length and refuses the chunk.
pub const INDEX_FLAG_PATCH: u32 = 1 << 31;
/// Magic at the start of a patch payload.
pub const PATCH_MAGIC: [u8; 8] = *b"IRPATCH1";
/// Patch payload header: magic, base chunk id, chunk length, log2 of the
/// grain size. Then the grain mask (one bit per grain, `ceil(grains / 8)`
/// bytes, bit `i % 8` of byte `i / 8`), then the marked grains' bytes in
/// order (the last grain of a short chunk is short).
pub const PATCH_HEADER_LEN: usize = 48;
const _: () = assert!(PATCH_HEADER_LEN == 8 + 32 + 4 + 4);
/// log2 of the grain size of the patches written (4 KiB: the dirty bitmap's
/// granularity). Readers accept 4 KiB up to the chunk size.
pub const PATCH_GRAIN_SHIFT: u32 = 12;
/// Nonce length of a sealed record (XChaCha20-Poly1305, or AES-256-GCM with
/// a key derived from the first half).
pub const RECORD_NONCE_LEN: usize = 24;
/// Authentication tag length (Poly1305).
pub const AEAD_TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its data.
pub const RECORD_SEAL_OVERHEAD: u32 = (RECORD_NONCE_LEN + AEAD_TAG_LEN) as u32;
/// Associated data prefix of a sealed record (followed by id, raw_len, flags).
pub const RECORD_AD_MAGIC: [u8; 8] = *b"IRCHUNK1";
/// Largest stored (possibly compressed) length a valid record can have.
pub const MAX_STORED_LEN: u32 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 64 + 64;
const _: () = assert!(MAX_CHUNK_SIZE + RECORD_SEAL_OVERHEAD < MAX_STORED_LEN);

/// Magic of a sealed (encrypted) index or manifest object.
pub const SEALED_MAGIC: [u8; 8] = *b"IRSEAL\0\0";
/// Version of the sealed object format.
pub const SEALED_VERSION: u32 = 1;
/// Sealed object header: magic, version, log2 of the segment size, nonce
/// prefix. Then segments: ciphertext of up to `1 << shift` plaintext bytes
/// and a tag each; the nonce of segment `i` is the prefix then `i` (u64).
pub const SEALED_HEADER_LEN: usize = 32;
const _: () = assert!(SEALED_HEADER_LEN == 8 + 4 + 4 + 16);
/// Default log2 of the plaintext segment size of sealed objects (4 KiB: a
/// random `pread` of a manifest entry or index bucket decrypts little).
pub const SEALED_SEGMENT_SHIFT: u32 = 12;
/// Associated data prefix of a sealed segment (followed by the last-segment
/// flag, the segment number and the object's name).
pub const SEALED_AD_MAGIC: [u8; 8] = *b"IRSEGAD1";

/// Magic of a per-pack index file.
pub const IDX_MAGIC: [u8; 8] = *b"IRIDX\0\0\0";
/// Version of the per-pack index format.
pub const IDX_VERSION: u32 = 1;
/// Per-pack index header: magic, version, reserved, entry count, pack id.
pub const IDX_HEADER_LEN: usize = 40;
const _: () = assert!(IDX_HEADER_LEN == 8 + 4 + 4 + 8 + 16);
/// Per-pack index entry: id, offset, stored_len, raw_len.
pub const IDX_ENTRY_LEN: usize = 48;
const _: () = assert!(IDX_ENTRY_LEN == 32 + 8 + 4 + 4);

/// Magic of a merged index file.
pub const MIDX_MAGIC: [u8; 8] = *b"IRMIDX\0\0";
/// Version of the merged index format.
pub const MIDX_VERSION: u32 = 1;
/// Merged index header: magic, version, fanout bits, generation, pack count,
/// entry count, blake3 of (header with this field zeroed + pack table + fanout).
pub const MIDX_HEADER_LEN: usize = 72;
const _: () = assert!(MIDX_HEADER_LEN == 8 + 4 + 4 + 8 + 8 + 8 + 32);
/// Merged index entry: id, pack number, stored_len, offset.
pub const MIDX_ENTRY_LEN: usize = 48;
const _: () = assert!(MIDX_ENTRY_LEN == 32 + 4 + 4 + 8);
/// Fanout of the merged index: buckets by the first 16 bits of the id.
pub const MIDX_FANOUT_BITS: u32 = 16;

/// Magic of a snapshot manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"IRSNAP\0\0";
/// Version of the manifest format.
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest header: magic, version, chunk size, image size, chunk count,
/// created (µs since epoch), metadata length, reserved, blake3 of
/// (header with this field zeroed + metadata).
pub const MANIFEST_HEADER_LEN: usize = 80;
const _: () = assert!(MANIFEST_HEADER_LEN == 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + 32);
/// Version of a delta manifest (same header and magic as version 1; the
/// metadata names a `base` full manifest, and the body is a `u64` entry
/// count followed by sorted [`DELTA_ENTRY_LEN`]-byte entries, then the
/// trailer). Version 1 (full) manifests are still written and read.
pub const MANIFEST_DELTA_VERSION: u32 = 2;
/// Delta entry count that precedes the entries of a delta manifest.
pub const DELTA_COUNT_LEN: usize = 8;
/// Delta manifest entry: chunk index, chunk id (32 zero bytes: zero chunk).
pub const DELTA_ENTRY_LEN: usize = 40;
const _: () = assert!(DELTA_ENTRY_LEN == 8 + 32);
/// Largest accepted manifest metadata (JSON) length.
pub const MANIFEST_MAX_META_LEN: u32 = 64 << 10;
/// Trailing checksum length (blake3) of idx, midx and manifest files.
pub const TRAILER_LEN: usize = 32;

/// A decoding failure of an on-disk structure.
#[derive(Debug, Error)]
pub enum FormatError {
    /// The magic number does not match.
    #[error("Bad magic in {what}")]
    BadMagic { what: &'static str },
    /// The version is not one this program reads.
    #[error("Unsupported {what} version {version} (supported: {supported})")]
    UnsupportedVersion {
        what: &'static str,
        version: u32,
        supported: u32,
    },
    /// A checksum does not match.
    #[error("Checksum mismatch in {what}")]
    BadChecksum { what: &'static str },
    /// A field has an impossible value.
    #[error("Invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

pub(crate) fn arr32_at(b: &[u8], at: usize) -> [u8; 32] {
    let mut x = [0u8; 32];
    x.copy_from_slice(&b[at..at + 32]);
    x
}

pub(crate) fn check_magic_version(
    b: &[u8],
    magic: &[u8; 8],
    version: u32,
    what: &'static str,
) -> Result<(), FormatError> {
    if b.len() < 12 || &b[..8] != magic {
        return Err(FormatError::BadMagic { what });
    }
    let v = u32_at(b, 8);
    if v != version {
        return Err(FormatError::UnsupportedVersion {
            what,
            version: v,
            supported: version,
        });
    }
    Ok(())
}

/// Header of one chunk record in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: [u8; 32],
    pub raw_len: u32,
    pub stored_len: u32,
    pub flags: u32,
}

impl RecordHeader {
    fn check(b: &[u8]) -> u32 {
        let h = blake3::hash(&b[..44]);
        u32_at(h.as_bytes(), 0)
    }

    /// Encode, including the header check word.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..32].copy_from_slice(&self.id);
        b[32..36].copy_from_slice(&self.raw_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.stored_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.flags.to_le_bytes());
        let c = Self::check(&b);
        b[44..48].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode and validate the check word and lengths.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(FormatError::Invalid {
                what: "chunk record",
                detail: "truncated header".into(),
            });
        }
        if Self::check(b) != u32_at(b, 44) {
            return Err(FormatError::BadChecksum {
                what: "chunk record header",
            });
        }
        let h = RecordHeader {
            id: arr32_at(b, 0),
            raw_len: u32_at(b, 32),
            stored_len: u32_at(b, 36),
            flags: u32_at(b, 40),
        };
        let sealed = if h.flags & RECORD_FLAG_ENCRYPTED != 0 {
            RECORD_SEAL_OVERHEAD
        } else {
            0
        };
        if h.raw_len > MAX_CHUNK_SIZE
            || h.flags & !(RECORD_FLAG_COMPRESSED | RECORD_FLAG_ENCRYPTED | RECORD_FLAG_PATCH) != 0
            || h.stored_len < sealed
            || (h.flags & RECORD_FLAG_COMPRESSED == 0 && h.stored_len != h.raw_len + sealed)
            || h.stored_len > MAX_STORED_LEN
        {
            return Err(FormatError::Invalid {
                what: "chunk record",
                detail: format!(
                    "raw_len {} stored_len {} flags {:#x}",
                    h.raw_len, h.stored_len, h.flags
                ),
            });
        }
        Ok(h)
    }
}

/// Encode a pack header.
pub fn pack_header() -> [u8; PACK_HEADER_LEN] {
    let mut b = [0u8; PACK_HEADER_LEN];
    b[..8].copy_from_slice(&PACK_MAGIC);
    b[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    b
}

/// Validate a pack header.
pub fn check_pack_header(b: &[u8]) -> Result<(), FormatError> {
    check_magic_version(b, &PACK_MAGIC, PACK_VERSION, "pack")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_check() {
        let h = RecordHeader {
            id: [7; 32],
            raw_len: 65536,
            stored_len: 1000,
            flags: RECORD_FLAG_COMPRESSED,
        };
        let mut b = h.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        b[33] ^= 1;
        assert!(matches!(
            RecordHeader::decode(&b),
            Err(FormatError::BadChecksum { .. })
        ));
    }

    #[test]
    fn record_header_rejects_absurd_lengths() {
        let h = RecordHeader {
            id: [1; 32],
            raw_len: u32::MAX,
            stored_len: 10,
            flags: 1,
        };
        assert!(RecordHeader::decode(&h.encode()).is_err());
        let h = RecordHeader {
            id: [1; 32],
            raw_len: 10,
            stored_len: 11,
            flags: 0,
        };
        assert!(RecordHeader::decode(&h.encode()).is_err());
    }

    #[test]
    fn pack_header_versions() {
        assert!(check_pack_header(&pack_header()).is_ok());
        let mut b = pack_header();
        b[8] = 9;
        assert!(matches!(
            check_pack_header(&b),
            Err(FormatError::UnsupportedVersion { version: 9, .. })
        ));
        assert!(check_pack_header(b"garbage garbage!").is_err());
    }
}
