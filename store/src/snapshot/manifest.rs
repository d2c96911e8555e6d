//! The snapshot manifest file format.
//!
//! ```text
//! header   80 B   magic, version, chunk size, image size, chunk count,
//!                 created (µs), metadata length, reserved,
//!                 blake3(header with this field zeroed ‖ metadata)
//! metadata        JSON {"id","name","source","parent"}
//! entries  32 B × chunk count   chunk id, or 32 zero bytes for a zero chunk
//! trailer  32 B   blake3 of everything before it
//! ```
//! Entry `i` lives at a fixed offset, so offset → chunk is one `pread`
//! (O(1), nothing loaded).
//!
//! Version 2 is a *delta* manifest (see [`super::delta`]): the same header
//! (version 2), metadata that also names a `base` full manifest, then
//! ```text
//! count    8 B    number of delta entries
//! entries  40 B × count   chunk index (u64), chunk id or 32 zero bytes;
//!                         strictly increasing indexes
//! trailer  32 B   blake3 of everything before it
//! ``` Opening checks the header hash; the full-file
//! trailer is checked by `verify` and `restore`, which read every entry anyway.
//!
//! The writer fills a local temp file (workers `pwrite` entries in any order),
//! appends the trailer and publishes it atomically, after every pack the
//! entries name is durable.

use std::io::Write;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Object, TempObject};
use crate::error::{Error, IoContext, Result};
use crate::format::{
    arr32_at, check_magic_version, u32_at, u64_at, FormatError, DELTA_COUNT_LEN, DELTA_ENTRY_LEN,
    MANIFEST_DELTA_VERSION, MANIFEST_HEADER_LEN, MANIFEST_MAGIC, MANIFEST_MAX_META_LEN,
    MANIFEST_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, TRAILER_LEN,
};
use crate::id::ChunkId;
use crate::snapshot::{id_from_micros, rfc3339_micros, SnapshotInfo};

/// Size of one manifest entry.
pub const ENTRY_LEN: usize = 32;

#[derive(Serialize, Deserialize)]
struct Meta {
    id: String,
    name: String,
    source: String,
    parent: Option<String>,
    /// Version 2 only: id of the full manifest this delta applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<String>,
}

/// Parsed manifest header.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub info: SnapshotInfo,
    pub created_micros: i64,
    /// Offset of entry 0 (version 2: of the delta entry count).
    pub entries_offset: u64,
    /// Version 2 (delta) only: id of the base full manifest, and the number
    /// of delta entries.
    pub delta: Option<(String, u64)>,
}

impl Manifest {
    /// Total file length implied by the header.
    pub fn file_len(&self) -> u64 {
        match &self.delta {
            None => {
                self.entries_offset + self.info.chunk_count * ENTRY_LEN as u64 + TRAILER_LEN as u64
            }
            Some((_, n)) => {
                self.entries_offset
                    + DELTA_COUNT_LEN as u64
                    + n * DELTA_ENTRY_LEN as u64
                    + TRAILER_LEN as u64
            }
        }
    }

    /// Id of the base full manifest of a delta manifest.
    pub fn base(&self) -> Option<&str> {
        self.delta.as_ref().map(|(b, _)| b.as_str())
    }
}

fn bad(key: &str, e: FormatError) -> Error {
    Error::corrupt(format!("Snapshot manifest {key} is damaged")).with_source(e)
}

/// Number of chunks of an image.
pub fn chunk_count(image_size: u64, chunk_size: u32) -> u64 {
    image_size.div_ceil(chunk_size as u64)
}

pub(crate) fn header_bytes(
    version: u32,
    info: &SnapshotInfo,
    created: i64,
    meta: &[u8],
) -> [u8; MANIFEST_HEADER_LEN] {
    let mut h = [0u8; MANIFEST_HEADER_LEN];
    h[..8].copy_from_slice(&MANIFEST_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&info.chunk_size.to_le_bytes());
    h[16..24].copy_from_slice(&info.image_size.to_le_bytes());
    h[24..32].copy_from_slice(&info.chunk_count.to_le_bytes());
    h[32..40].copy_from_slice(&created.to_le_bytes());
    h[40..44].copy_from_slice(&(meta.len() as u32).to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&h);
    hasher.update(meta);
    h[48..80].copy_from_slice(hasher.finalize().as_bytes());
    h
}

/// Read and validate a manifest's header and metadata from `obj`.
pub fn read_header(obj: &dyn Object, key: &str) -> Result<Manifest> {
    let mut h = [0u8; MANIFEST_HEADER_LEN];
    obj.read_at(&mut h, 0)
        .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
    let version =
        match check_magic_version(&h, &MANIFEST_MAGIC, MANIFEST_VERSION, "snapshot manifest") {
            Ok(()) => MANIFEST_VERSION,
            Err(FormatError::UnsupportedVersion {
                version: MANIFEST_DELTA_VERSION,
                ..
            }) => MANIFEST_DELTA_VERSION,
            Err(FormatError::UnsupportedVersion { what, version, .. }) => {
                return Err(bad(
                    key,
                    FormatError::UnsupportedVersion {
                        what,
                        version,
                        supported: MANIFEST_DELTA_VERSION,
                    },
                ))
            }
            Err(e) => return Err(bad(key, e)),
        };
    let invalid = |detail: String| {
        bad(
            key,
            FormatError::Invalid {
                what: "snapshot manifest",
                detail,
            },
        )
    };
    let chunk_size = u32_at(&h, 12);
    let image_size = u64_at(&h, 16);
    let count = u64_at(&h, 24);
    let created = u64_at(&h, 32) as i64;
    let meta_len = u32_at(&h, 40);
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(invalid(format!("chunk size {chunk_size}")));
    }
    if count != chunk_count(image_size, chunk_size) {
        return Err(invalid(format!(
            "{count} chunks for image size {image_size}"
        )));
    }
    if meta_len > MANIFEST_MAX_META_LEN {
        return Err(invalid(format!("metadata length {meta_len}")));
    }
    let mut meta = vec![0u8; meta_len as usize];
    obj.read_at(&mut meta, MANIFEST_HEADER_LEN as u64)
        .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
    let stored = arr32_at(&h, 48);
    h[48..80].fill(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&h);
    hasher.update(&meta);
    if hasher.finalize().as_bytes() != &stored {
        return Err(bad(
            key,
            FormatError::BadChecksum {
                what: "snapshot manifest header",
            },
        ));
    }
    let meta: Meta =
        serde_json::from_slice(&meta).map_err(|e| invalid(format!("metadata: {e}")))?;
    let entries_offset = (MANIFEST_HEADER_LEN + meta_len as usize) as u64;
    let delta = match (version, meta.base) {
        (MANIFEST_VERSION, None) => None,
        (MANIFEST_DELTA_VERSION, Some(base)) => {
            if !super::is_snapshot_id(&base) || base >= meta.id {
                return Err(invalid(format!("base {base:?} of delta {}", meta.id)));
            }
            let mut n = [0u8; DELTA_COUNT_LEN];
            obj.read_at(&mut n, entries_offset)
                .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
            let n = u64::from_le_bytes(n);
            if n > count {
                return Err(invalid(format!("{n} delta entries for {count} chunks")));
            }
            Some((base, n))
        }
        (v, _) => return Err(invalid(format!("base field in a version {v} manifest"))),
    };
    let m = Manifest {
        delta,
        info: SnapshotInfo {
            id: meta.id,
            name: meta.name,
            image_size,
            chunk_size,
            chunk_count: count,
            created: rfc3339_micros(created),
            source: meta.source,
            parent: meta.parent,
        },
        created_micros: created,
        entries_offset,
    };
    let len = obj
        .len()
        .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
    if len != m.file_len() {
        return Err(invalid(format!(
            "file length {len}, expected {}",
            m.file_len()
        )));
    }
    Ok(m)
}

/// Re-hash the whole manifest and compare with its trailer.
pub fn verify_trailer(obj: &dyn Object, m: &Manifest, key: &str) -> Result<()> {
    let body = m.file_len() - TRAILER_LEN as u64;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < body {
        let n = (body - at).min(buf.len() as u64) as usize;
        obj.read_at(&mut buf[..n], at)
            .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    let mut t = [0u8; TRAILER_LEN];
    obj.read_at(&mut t, body)
        .ctx(|| format!("Failed to read snapshot manifest {key}"))?;
    if hasher.finalize().as_bytes() != &t {
        return Err(bad(
            key,
            FormatError::BadChecksum {
                what: "snapshot manifest",
            },
        ));
    }
    Ok(())
}

/// Decode one entry: `None` for a zero chunk.
pub fn decode_entry(b: &[u8]) -> Option<ChunkId> {
    let id = ChunkId(arr32_at(b, 0));
    (!id.is_null()).then_some(id)
}

/// The metadata JSON of a manifest (`base`: of a delta manifest).
pub(crate) fn meta_json(info: &SnapshotInfo, base: Option<&str>) -> Result<Vec<u8>> {
    let action = || format!("Failed to create manifest of snapshot {}", info.id);
    let meta = serde_json::to_vec(&Meta {
        id: info.id.clone(),
        name: info.name.clone(),
        source: info.source.clone(),
        parent: info.parent.clone(),
        base: base.map(str::to_owned),
    })
    .map_err(|e| Error::invalid(action()).with_source(e))?;
    if meta.len() > MANIFEST_MAX_META_LEN as usize {
        return Err(Error::invalid(format!(
            "{}: source path too long",
            action()
        )));
    }
    Ok(meta)
}

/// Builds a manifest in a temp file.
#[derive(Debug)]
pub struct ManifestWriter {
    tmp: TempObject,
    manifest: Manifest,
}

impl ManifestWriter {
    /// Start a manifest for `info` (whose `id` must be `id_from_micros(created)`).
    pub fn create(
        backend: &dyn Backend,
        mut info: SnapshotInfo,
        created: i64,
    ) -> Result<ManifestWriter> {
        info.id = id_from_micros(created)?;
        info.created = rfc3339_micros(created);
        info.chunk_count = chunk_count(info.image_size, info.chunk_size);
        let snap_id = info.id.clone();
        let action = || format!("Failed to create manifest of snapshot {snap_id}");
        let meta = meta_json(&info, None)?;
        let mut tmp = backend.create_temp().ctx(action)?;
        let header = header_bytes(MANIFEST_VERSION, &info, created, &meta);
        let manifest = Manifest {
            delta: None,
            info,
            created_micros: created,
            entries_offset: (MANIFEST_HEADER_LEN + meta.len()) as u64,
        };
        let f = tmp.file_mut();
        f.write_all(&header).ctx(action)?;
        f.write_all(&meta).ctx(action)?;
        // Entries start as zero (sparse): unset entries are zero chunks.
        f.set_len(manifest.file_len() - TRAILER_LEN as u64)
            .ctx(action)?;
        Ok(ManifestWriter { tmp, manifest })
    }

    /// The snapshot being written.
    pub fn info(&self) -> &SnapshotInfo {
        &self.manifest.info
    }

    /// Time of the snapshot being written (µs since the epoch).
    pub(crate) fn created_micros(&self) -> i64 {
        self.manifest.created_micros
    }

    /// Read back entries `first..` into `buf` (32 bytes each).
    pub(crate) fn read_entries(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        self.tmp
            .file()
            .read_exact_at(buf, self.manifest.entries_offset + first * ENTRY_LEN as u64)
            .ctx(|| {
                format!(
                    "Failed to read back manifest of snapshot {}",
                    self.manifest.info.id
                )
            })
    }

    /// Store entries `first..first + n` from `entries` (32 bytes each).
    /// Callable from many threads.
    pub fn set_entries(&self, first: u64, entries: &[u8]) -> Result<()> {
        self.tmp
            .file()
            .write_all_at(
                entries,
                self.manifest.entries_offset + first * ENTRY_LEN as u64,
            )
            .ctx(|| {
                format!(
                    "Failed to write manifest of snapshot {}",
                    self.manifest.info.id
                )
            })
    }

    /// Append the trailer and publish as `key`. Call only once every pack
    /// the entries name is durable.
    pub fn publish(self, backend: &dyn Backend, key: &str) -> Result<SnapshotInfo> {
        let action = || format!("Failed to publish snapshot manifest {key}");
        let body = self.manifest.file_len() - TRAILER_LEN as u64;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        let f = self.tmp.file();
        while at < body {
            let n = (body - at).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], at).ctx(action)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        f.write_all_at(hasher.finalize().as_bytes(), body)
            .ctx(action)?;
        backend.publish(self.tmp, key).ctx(action)?;
        Ok(self.manifest.info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    fn info(size: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: String::new(),
            name: "web".into(),
            image_size: size,
            chunk_size: 4096,
            chunk_count: 0,
            created: String::new(),
            source: "/dev/x".into(),
            parent: None,
        }
    }

    #[test]
    fn write_read_entries_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let w = ManifestWriter::create(&b, info(4096 * 3 + 512), 1_000_000).unwrap();
        assert_eq!(w.info().chunk_count, 4);
        let id = ChunkId::of(b"a");
        w.set_entries(2, &id.0).unwrap();
        let key = crate::snapshot::manifest_key("web", &w.info().id.clone());
        let published = w.publish(&b, &key).unwrap();
        let obj = b.open(&key).unwrap();
        let m = read_header(obj.as_ref(), &key).unwrap();
        assert_eq!(m.info, published);
        verify_trailer(obj.as_ref(), &m, &key).unwrap();
        let mut e = [0u8; 32];
        obj.read_at(&mut e, m.entries_offset + 2 * 32).unwrap();
        assert_eq!(decode_entry(&e), Some(id));
        obj.read_at(&mut e, m.entries_offset).unwrap();
        assert_eq!(decode_entry(&e), None);

        // A flipped entry byte is caught by the trailer, a header byte at open.
        let path = dir.path().join(&key);
        let good = std::fs::read(&path).unwrap();
        let mut bad_entry = good.clone();
        bad_entry[m.entries_offset as usize + 70] ^= 1;
        std::fs::write(&path, &bad_entry).unwrap();
        let obj = b.open(&key).unwrap();
        let m = read_header(obj.as_ref(), &key).unwrap();
        assert_eq!(
            verify_trailer(obj.as_ref(), &m, &key).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        let mut bad_header = good;
        bad_header[20] ^= 1;
        std::fs::write(&path, &bad_header).unwrap();
        let obj = b.open(&key).unwrap();
        assert_eq!(
            read_header(obj.as_ref(), &key).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
    }
}
