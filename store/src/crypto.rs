//! Encryption at rest: key material, key slots, sealed chunks, indexes and
//! manifests, keyed chunk ids.
//!
//! # Keys
//! `init --encrypt` draws a random 256-bit *master key*. Keys are derived
//! from it with blake3's `derive_key` (distinct contexts): the AEAD key that
//! seals every index and manifest (XChaCha20-Poly1305), the record key that
//! seals chunk records (AES-256-GCM with a key per record, `RecordAead`;
//! stores made before, `aead` = [`AEAD`] in the config, seal records with
//! the XChaCha20-Poly1305 key and keep doing so), and the chunk-id key: a chunk's id is `blake3::keyed_hash(id key, plaintext)`, so
//! equal plaintext in two stores has unrelated ids and an id says nothing
//! about content to whoever holds the store. A third derived value, the *key
//! check*, is recorded in `config.json` so a key slot holding another
//! store's key is recognised.
//!
//! The master key is stored only wrapped, in one or more *key slots*
//! (`keys/<16 hex>`, JSON, [`keyslot`]): argon2id of the passphrase or key
//! file bytes (parameters and a random salt in the slot) gives a key that
//! seals the master key. Opening tries the slots; none opening is one error,
//! "Wrong passphrase or key file for store X", never garbage. `key add` /
//! `key remove` manage the slots (the last one cannot be removed).
//!
//! # What is sealed
//! | object | how |
//! |---|---|
//! | chunk records in packs | each record's data (compressed first) is sealed alone with a random 24-byte nonce (AES-256-GCM under the key derived from its first 12 bytes, nonce = the last 12; older stores: XChaCha20-Poly1305); associated data = kind, chunk id, raw length, flags ([`crate::chunk::Codec`]) |
//! | `index/*.idx`, `index/*.midx`, `snapshots/**` (full and delta manifests) | sealed objects ([`object`]): 4 KiB segments, each sealed with nonce = random object prefix ‖ segment number and associated data = kind, last-segment flag, segment number, object name (a forgotten manifest keeps its name) |
//! | `config.json`, `keys/*`, `holds/*`, drill records, `lock` | plaintext metadata |
//!
//! The record header (keyed id, plaintext length, stored length, flags) stays
//! in the clear so packs remain self-describing (an index can be rebuilt, gc
//! can repack without the key of the data); it reveals each chunk's
//! compressed size. Zero chunks are never stored; in a manifest they are
//! entries like any other, inside the sealed manifest, so which chunks of an
//! image are zero is not visible (the total stored size is, as before).
//!
//! # Threat model
//! Someone who can read the store (a stolen disk, a bucket) learns the
//! number and sizes of objects and chunks, snapshot names and times (object
//! names), hold and drill metadata, and nothing of the content. Someone who
//! can also write it can delete objects (detected as missing) or replay an
//! older object under the same name (not detected: there is no global
//! root), but every changed, swapped or truncated chunk, index or manifest
//! fails authentication naming the object: a read returns an error, the
//! guest gets EIO, `verify` reports it. The passphrase is as strong as
//! argon2id with the slot's parameters makes it.

mod backend;
pub mod keyslot;
pub mod object;

pub use backend::EncryptedBackend;
pub use keyslot::{KdfParams, SlotInfo};

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::backend::Backend;
use crate::chunk::Codec;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::id::ChunkId;

/// The AEAD of key slots and sealed objects (indexes, manifests), and of
/// the chunk records of stores made before [`AEAD_AES_RECORDS`].
pub const AEAD: &str = "xchacha20poly1305";
/// The `aead` of stores made since: objects and slots as [`AEAD`], chunk
/// records with AES-256-GCM under a per-record key (see `RecordAead`).
pub const AEAD_AES_RECORDS: &str = "xchacha20poly1305+aes256gcm-records";
/// The key derivation function of key slots.
pub const KDF: &str = "argon2id";
/// Environment variable naming a key file.
pub const KEY_FILE_ENV: &str = "RECOVERY_KEY_FILE";
/// Environment variable holding the passphrase.
pub const PASSWORD_ENV: &str = "RECOVERY_PASSWORD";

const CTX_AEAD: &str = "instant-recovery store 2026-12 aead key";
const CTX_ID: &str = "instant-recovery store 2026-12 chunk id key";
const CTX_PATCH_ID: &str = "instant-recovery store 2026-12 patch id key";
const CTX_CHECK: &str = "instant-recovery store 2026-12 key check";
const CTX_RECORD_AES: &str = "instant-recovery store 2026-12 record aes-256-gcm key";

/// The `encryption` section of an encrypted store's `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// Always [`AEAD`].
    pub aead: String,
    /// Always [`KDF`].
    pub kdf: String,
    /// log2 of the plaintext segment size of sealed objects.
    pub segment_shift: u32,
    /// Hex of 16 bytes derived from the master key: tells a slot holding
    /// another store's key from this store's.
    pub key_check: String,
}

/// What unlocks a store: the bytes of a passphrase or of a key file.
pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
    kind: SecretKind,
}

/// Where a [`Secret`] came from (recorded in the key slot it opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// Typed or given in `RECOVERY_PASSWORD`.
    Passphrase,
    /// The whole content of a key file.
    KeyFile,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({:?}, {} bytes)", self.kind, self.bytes.len())
    }
}

impl Secret {
    /// A passphrase.
    pub fn passphrase(p: impl Into<String>) -> Result<Secret> {
        let p: String = p.into();
        if p.is_empty() {
            return Err(Error::invalid("The passphrase is empty"));
        }
        Ok(Secret {
            bytes: Zeroizing::new(p.into_bytes()),
            kind: SecretKind::Passphrase,
        })
    }

    /// The whole content of the key file at `path` (any bytes, at least 16).
    pub fn key_file(path: &Path) -> Result<Secret> {
        let bytes = Zeroizing::new(
            std::fs::read(path).map_err(|e| Error::io_path("Failed to read key file", path, e))?,
        );
        if bytes.len() < 16 {
            return Err(Error::invalid(format!(
                "Key file {} is too short ({} bytes, at least 16)",
                path.display(),
                bytes.len()
            )));
        }
        Ok(Secret {
            bytes,
            kind: SecretKind::KeyFile,
        })
    }

    /// From `RECOVERY_KEY_FILE` (a path) or else `RECOVERY_PASSWORD`; `None`
    /// when neither is set.
    pub fn from_env() -> Result<Option<Secret>> {
        if let Some(p) = std::env::var_os(KEY_FILE_ENV).filter(|p| !p.is_empty()) {
            return Secret::key_file(Path::new(&p)).map(Some);
        }
        match std::env::var(PASSWORD_ENV) {
            Ok(p) if !p.is_empty() => Secret::passphrase(p).map(Some),
            _ => Ok(None),
        }
    }

    /// Where it came from.
    pub fn kind(&self) -> SecretKind {
        self.kind
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Supplies the secret of an encrypted store (its location as argument)
/// when [`crate::Store::open`] is given none.
pub type SecretProvider = dyn Fn(&str) -> Result<Secret> + Send + Sync;

static PROVIDER: Mutex<Option<Arc<SecretProvider>>> = Mutex::new(None);

/// Install the process-wide secret provider (the CLI's: `--key-file`, the
/// environment, or a prompt). Libraries that open stores (the daemon) then
/// need no key plumbing.
pub fn set_secret_provider(p: Arc<SecretProvider>) {
    match PROVIDER.lock() {
        Ok(mut g) => *g = Some(p),
        Err(e) => *e.into_inner() = Some(p),
    }
}

/// The secret for store `where_`: the provider's, else the environment's.
pub(crate) fn default_secret(where_: &str) -> Result<Secret> {
    let provider = match PROVIDER.lock() {
        Ok(g) => g.clone(),
        Err(e) => e.into_inner().clone(),
    };
    if let Some(p) = provider {
        return p(where_);
    }
    Secret::from_env()?.ok_or_else(|| key_required(where_))
}

/// The one-line error for an encrypted store opened without a key.
pub fn key_required(where_: &str) -> Error {
    Error::new(
        ErrorKind::KeyRequired,
        format!(
            "Store {where_} is encrypted: give --key-file FILE (or {KEY_FILE_ENV}) or the passphrase in {PASSWORD_ENV}"
        ),
    )
}

/// The unwrapped master key.
pub(crate) struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    fn random() -> MasterKey {
        MasterKey(Zeroizing::new(rand::random()))
    }

    fn key_check(&self) -> String {
        hex::encode(&blake3::derive_key(CTX_CHECK, &self.0[..])[..16])
    }
}

/// How chunk records are sealed (the bulk of the data: the cipher's speed
/// is the cost of encryption on ingest and cold reads).
///
/// Both take the record's 24-byte random nonce. RustCrypto's
/// XChaCha20-Poly1305 runs at about 0.9 GB/s per core here; AES-256-GCM
/// from `ring` (BoringSSL's VAES/AVX-512 and AES-NI code, already in the
/// build through rustls) at about 6 GB/s (RustCrypto's `aes-gcm` at
/// about 1 GB/s: no gain). GCM's own 96-bit nonce is too short for random
/// nonces without a bound (2^32 records per key), so every record gets its
/// own key: `blake3::keyed_hash(record key, nonce[..12])`, with
/// `nonce[12..]` as the GCM nonce. Two records share a key only when 96
/// random bits collide, and a nonce only when 192 do: no practical bound
/// on records per store. The key schedule per record costs well under a
/// microsecond against ~5 µs of AES-GCM per 32 KiB record.
pub(crate) enum RecordAead {
    /// Stores made before: the store's XChaCha20-Poly1305 key.
    XChaCha,
    /// AES-256-GCM under a key derived per record from this one.
    Aes(Zeroizing<[u8; 32]>),
}

/// The keys of an unlocked store.
pub struct Cipher {
    aead: XChaCha20Poly1305,
    records: RecordAead,
    id_key: Zeroizing<[u8; 32]>,
    patch_id_key: Zeroizing<[u8; 32]>,
    master: MasterKey,
    segment_shift: u32,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    fn new(master: MasterKey, segment_shift: u32, aes_records: bool) -> Cipher {
        let mut aead_key = blake3::derive_key(CTX_AEAD, &master.0[..]);
        let aead = XChaCha20Poly1305::new((&aead_key).into());
        aead_key.zeroize();
        let records = if aes_records {
            RecordAead::Aes(Zeroizing::new(blake3::derive_key(
                CTX_RECORD_AES,
                &master.0[..],
            )))
        } else {
            RecordAead::XChaCha
        };
        Cipher {
            aead,
            records,
            id_key: Zeroizing::new(blake3::derive_key(CTX_ID, &master.0[..])),
            patch_id_key: Zeroizing::new(blake3::derive_key(CTX_PATCH_ID, &master.0[..])),
            master,
            segment_shift,
        }
    }

    /// A cipher from raw master key bytes, for tests and fuzzing (a real
    /// store unwraps its master key from a key slot).
    #[doc(hidden)]
    pub fn for_testing(master: [u8; 32], segment_shift: u32) -> Cipher {
        Cipher::new(MasterKey(Zeroizing::new(master)), segment_shift, true)
    }

    /// The keyed id of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// The keyed id of a patch payload (a key of its own: a patch id is
    /// never a chunk id).
    pub fn patch_id(&self, payload: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.patch_id_key, payload).as_bytes())
    }

    pub(crate) fn seal(&self, nonce: &[u8; 24], ad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        // Encryption fails only for messages beyond 256 GiB.
        self.aead
            .encrypt_in_place_detached(XNonce::from_slice(nonce), ad, buf)
            .map(Into::into)
            .unwrap_or_default()
    }

    /// Decrypt in place; `false` when authentication fails.
    pub(crate) fn open(&self, nonce: &[u8], ad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        if nonce.len() != 24 || tag.len() != 16 {
            return false;
        }
        self.aead
            .decrypt_in_place_detached(XNonce::from_slice(nonce), ad, buf, Tag::from_slice(tag))
            .is_ok()
    }

    /// Seal a chunk record's data in place with the store's record AEAD.
    pub(crate) fn seal_record(&self, nonce: &[u8; 24], ad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let RecordAead::Aes(k) = &self.records else {
            return self.seal(nonce, ad, buf);
        };
        let mut tag = [0u8; 16];
        // Sealing fails only for messages beyond GCM's 64 GiB: the zero
        // tag then never opens.
        if let Some(Ok(t)) = record_key(k, nonce)
            .map(|(key, n)| key.seal_in_place_separate_tag(n, ring::aead::Aad::from(ad), buf))
        {
            tag.copy_from_slice(t.as_ref());
        }
        tag
    }

    /// Open a chunk record's data in place; `false` when authentication
    /// fails.
    pub(crate) fn open_record(&self, nonce: &[u8], ad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        let RecordAead::Aes(k) = &self.records else {
            return self.open(nonce, ad, buf, tag);
        };
        let (Some((key, n)), Ok(tag)) = (record_key(k, nonce), ring::aead::Tag::try_from(tag))
        else {
            return false;
        };
        key.open_in_place_separate_tag(n, ring::aead::Aad::from(ad), tag, buf, 0..)
            .is_ok()
    }

    pub(crate) fn segment_shift(&self) -> u32 {
        self.segment_shift
    }
}

/// The AES-256-GCM key and nonce of the record with this 24-byte nonce
/// (see [`RecordAead`]); `None` for a nonce of another length.
fn record_key(
    key: &[u8; 32],
    nonce: &[u8],
) -> Option<(ring::aead::LessSafeKey, ring::aead::Nonce)> {
    let (key_nonce, gcm_nonce) = (nonce.get(..12)?, nonce.get(12..24)?);
    if nonce.len() != 24 {
        return None;
    }
    let mut sub = *blake3::keyed_hash(key, key_nonce).as_bytes();
    let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &sub).ok();
    sub.zeroize();
    let n = ring::aead::Nonce::try_assume_unique_for_key(gcm_nonce).ok()?;
    Some((ring::aead::LessSafeKey::new(unbound?), n))
}

/// A store being created encrypted: the config section, the first slot
/// written, and the codec.
pub(crate) fn init_keys(
    backend: &dyn Backend,
    secret: &Secret,
    params: &KdfParams,
) -> Result<EncryptionConfig> {
    let master = MasterKey::random();
    keyslot::write_slot(backend, &master, secret, params)?;
    Ok(EncryptionConfig {
        aead: AEAD_AES_RECORDS.into(),
        kdf: KDF.into(),
        segment_shift: crate::format::SEALED_SEGMENT_SHIFT,
        key_check: master.key_check(),
    })
}

/// For an encrypted store, unlock it with `secret` (or the default source)
/// and wrap `backend` so indexes and manifests are sealed; for a plaintext
/// store, return `backend` and the plaintext codec unchanged.
pub(crate) fn unlock(
    backend: Arc<dyn Backend>,
    config: &Config,
    where_: &str,
    secret: Option<&Secret>,
) -> Result<(Arc<dyn Backend>, Codec)> {
    let Some(enc) = &config.encryption else {
        return Ok((backend, Codec::plain()));
    };
    let known = [AEAD, AEAD_AES_RECORDS].contains(&enc.aead.as_str());
    if !known || enc.kdf != KDF || !(10..=20).contains(&enc.segment_shift) {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!(
                "Store {where_} uses encryption {}/{} (segments 2^{}), this program supports {AEAD} or {AEAD_AES_RECORDS} with {KDF}",
                enc.aead, enc.kdf, enc.segment_shift
            ),
        ));
    }
    let owned;
    let secret = match secret {
        Some(s) => s,
        None => {
            owned = default_secret(where_)?;
            &owned
        }
    };
    let master = keyslot::unwrap_any(backend.as_ref(), secret, &enc.key_check, where_)?;
    let aes = enc.aead == AEAD_AES_RECORDS;
    let cipher = Arc::new(Cipher::new(master, enc.segment_shift, aes));
    let wrapped: Arc<dyn Backend> = Arc::new(EncryptedBackend::new(backend, cipher.clone()));
    Ok((wrapped, Codec::sealed(cipher)))
}

impl crate::Store {
    /// Create an encrypted store in the empty storage `raw` (`root`: its
    /// directory, or a remote store's cache directory): the key slot
    /// first, then `config.json` (on a remote store with a conditional
    /// create, so of two racing inits one wins). For `init_location` of an
    /// S3 store with `--encrypt`; a local store uses
    /// [`crate::Store::init_encrypted`].
    pub fn init_encrypted_in(
        root: std::path::PathBuf,
        raw: Arc<dyn Backend>,
        chunk_size: u32,
        secret: &Secret,
        kdf: &KdfParams,
    ) -> Result<crate::Store> {
        let place = raw.display();
        let key = crate::config::CONFIG_KEY;
        let exists = || {
            Error::new(
                ErrorKind::AlreadyExists,
                format!("A store already exists at {place}"),
            )
        };
        if raw
            .exists(key)
            .map_err(|e| Error::io(format!("Failed to read {place}/{key}"), e))?
        {
            return Err(exists());
        }
        let enc = init_keys(raw.as_ref(), secret, kdf)?;
        let config = Config::new_encrypted(chunk_size, enc)?;
        let written = if raw.is_remote() {
            raw.create_new(key, &config.to_json()).map(|_| ())
        } else {
            raw.put(key, &config.to_json())
        };
        written.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists()
            } else {
                Error::io(format!("Failed to write {place}/{key}"), e)
            }
        })?;
        crate::Store::open_backend_keyed(root, raw, Some(secret))
    }

    /// Whether the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.codec().cipher().is_some()
    }

    fn cipher_or_err(&self) -> Result<&Arc<Cipher>> {
        self.codec().cipher().ok_or_else(|| {
            Error::invalid(format!(
                "Store {} is not encrypted: it has no keys",
                self.path().display()
            ))
        })
    }

    /// `obj`, read directly from the backend below (e.g. a local file
    /// opened for its lock), as the plaintext of object `key`.
    pub(crate) fn unseal(
        &self,
        key: &str,
        obj: Arc<dyn crate::backend::Object>,
    ) -> std::io::Result<Arc<dyn crate::backend::Object>> {
        match self.codec().cipher() {
            Some(c) if backend::is_sealed_key(key) => {
                Ok(Arc::new(object::SealedObject::open(obj, c.clone(), key)?))
            }
            _ => Ok(obj),
        }
    }

    /// The key slots of an encrypted store.
    pub fn key_slots(&self) -> Result<Vec<SlotInfo>> {
        self.cipher_or_err()?;
        keyslot::list(self.backend())
    }

    /// Add a key slot that `secret` opens; returns its id.
    pub fn add_key(&self, secret: &Secret, params: &KdfParams) -> Result<String> {
        let c = self.cipher_or_err()?;
        keyslot::write_slot(self.backend(), &c.master, secret, params)
    }

    /// Remove key slot `id`; refuses to remove the last one.
    pub fn remove_key(&self, id: &str) -> Result<()> {
        self.cipher_or_err()?;
        keyslot::remove(self.backend(), id, &self.path().display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_differ_per_master_key() {
        let a = Cipher::new(MasterKey::random(), 12, true);
        let b = Cipher::new(MasterKey::random(), 12, true);
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), ChunkId::of(b"x"));
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let c = Cipher::new(MasterKey::random(), 12, true);
        let nonce = [7u8; 24];
        let mut buf = b"hello world".to_vec();
        let tag = c.seal(&nonce, b"ad", &mut buf);
        assert_ne!(&buf, b"hello world");
        let mut ok = buf.clone();
        assert!(c.open(&nonce, b"ad", &mut ok, &tag));
        assert_eq!(&ok, b"hello world");
        let mut bad = buf.clone();
        assert!(!c.open(&nonce, b"other ad", &mut bad, &tag));
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(!c.open(&nonce, b"ad", &mut bad, &tag));
    }

    #[test]
    fn both_record_aeads_round_trip_and_detect_tampering() {
        use crate::chunk::ChunkError;
        let master = [3u8; 32];
        let codec = |aes| {
            Codec::sealed(Arc::new(Cipher::new(
                MasterKey(Zeroizing::new(master)),
                12,
                aes,
            )))
        };
        let text: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let random: Vec<u8> = (0..65536).map(|_| rand::random::<u8>()).collect();
        for aes in [false, true] {
            let c = codec(aes);
            for data in [&text, &random] {
                let id = c.id_of(data);
                let mut rec = Vec::new();
                let stored = c.encode_record(&id, data, &mut rec);
                assert!(!rec.windows(64).any(|w| w == &data[..64]), "aes {aes}");
                let mut out = Vec::new();
                c.decode_record(&rec, &id, stored, &mut out).unwrap();
                assert!(out == *data, "aes {aes}");
                // A changed ciphertext, nonce or tag byte fails authentication.
                let h = crate::format::RECORD_HEADER_LEN;
                for at in [h + 3, h + 30, rec.len() - 1] {
                    let mut bad = rec.clone();
                    bad[at] ^= 0x20;
                    assert!(
                        matches!(
                            c.decode_record(&bad, &id, stored, &mut out),
                            Err(ChunkError::Authentication)
                        ),
                        "aes {aes}, byte {at}"
                    );
                }
                // The other AEAD (same master key) does not open it.
                assert!(matches!(
                    codec(!aes).decode_record(&rec, &id, stored, &mut out),
                    Err(ChunkError::Authentication)
                ));
            }
        }
    }

    #[test]
    fn secrets() {
        assert!(Secret::passphrase("").is_err());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"short").unwrap();
        assert!(Secret::key_file(&f)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        std::fs::write(&f, [9u8; 32]).unwrap();
        let s = Secret::key_file(&f).unwrap();
        assert_eq!(s.kind(), SecretKind::KeyFile);
        assert!(!format!("{s:?}").contains('9'));
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::{BackupOptions, ErrorKind, RestoreOptions, Store, VerifyOptions};

    const CHEAP: KdfParams = KdfParams {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };

    /// An image with a marker string in every data chunk and zero chunks.
    fn image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut img = vec![0u8; 64 << 10];
        for (i, c) in img.chunks_mut(4096).enumerate() {
            if i % 3 != 0 {
                c[..16].copy_from_slice(b"SECRET-PLAINTEXT");
                c[16] = i as u8;
            }
        }
        let p = dir.join("img");
        std::fs::write(&p, &img).unwrap();
        (p, img)
    }

    fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                all_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    #[test]
    fn encrypted_store_round_trip_hides_plaintext_and_needs_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (img_path, img) = image(dir.path());
        let pass = Secret::passphrase("pw").unwrap();
        let sp = dir.path().join("s");
        let s = Store::init_encrypted(&sp, 4096, &pass, &CHEAP).unwrap();
        assert!(s.is_encrypted());
        s.backup("web", &img_path, &BackupOptions::default())
            .unwrap();
        // Delta manifests too: a second backup with one changed chunk.
        let mut img2 = img.clone();
        img2[5000] = 1;
        std::fs::write(&img_path, &img2).unwrap();
        s.backup("web", &img_path, &BackupOptions::default())
            .unwrap();
        let plain = Store::init(&dir.path().join("p"), 4096).unwrap();
        plain
            .backup("web", &img_path, &BackupOptions::default())
            .unwrap();
        // No plaintext (nor a plaintext id) anywhere in the encrypted store.
        let mut files = Vec::new();
        all_files(&sp, &mut files);
        let plain_id = ChunkId::of(&img2[4096..8192]);
        for f in &files {
            let b = std::fs::read(f).unwrap();
            assert!(!b.windows(16).any(|w| w == b"SECRET-PLAINTEXT"), "{f:?}");
            assert!(!b.windows(32).any(|w| w == plain_id.0), "{f:?}");
        }
        assert_ne!(s.chunk_id(&img2[4096..8192]), plain_id);
        drop(s);
        // Reopen: without a key, with a wrong one, with the right one.
        let e = Store::open(&sp).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::KeyRequired, "{e}");
        assert!(e.to_string().contains("is encrypted"), "{e}");
        let wrong = Secret::passphrase("nope").unwrap();
        let e = Store::open_keyed(&sp, Some(&wrong)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongKey);
        let s = Store::open_keyed(&sp, Some(&pass)).unwrap();
        let snaps = s.snapshots(Some("web")).unwrap();
        assert_eq!(snaps.len(), 2);
        for (snap, want) in [(&snaps[0], &img), (&snaps[1], &img2)] {
            let out = dir.path().join("out");
            let _ = std::fs::remove_file(&out);
            s.restore(&snap.reference(), &out, &RestoreOptions::default())
                .unwrap();
            assert!(std::fs::read(&out).unwrap() == *want);
        }
        let r = s.verify(None, &VerifyOptions::default()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Keys: add, list, remove; the last one stays.
        let second = Secret::passphrase("second").unwrap();
        let id2 = s.add_key(&second, &CHEAP).unwrap();
        assert_eq!(s.key_slots().unwrap().len(), 2);
        Store::open_keyed(&sp, Some(&second)).unwrap();
        let first = s
            .key_slots()
            .unwrap()
            .into_iter()
            .find(|k| k.id != id2)
            .unwrap();
        s.remove_key(&first.id).unwrap();
        assert_eq!(
            Store::open_keyed(&sp, Some(&pass)).unwrap_err().kind(),
            ErrorKind::WrongKey
        );
        let e = s.remove_key(&id2).unwrap_err();
        assert!(e.to_string().contains("last key"), "{e}");
        assert!(plain.add_key(&second, &CHEAP).is_err());
    }

    /// New stores seal records with AES-256-GCM; a store made before
    /// (config `aead` = xchacha20poly1305) keeps XChaCha20-Poly1305, and
    /// reading it with the other AEAD is an authentication error, never
    /// wrong data.
    #[test]
    fn stores_made_before_aes_records_keep_xchacha() {
        let dir = tempfile::tempdir().unwrap();
        let (img_path, img) = image(dir.path());
        let pass = Secret::passphrase("pw").unwrap();
        let sp = dir.path().join("s");
        drop(Store::init_encrypted(&sp, 4096, &pass, &CHEAP).unwrap());
        let config = sp.join(crate::config::CONFIG_KEY);
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(AEAD_AES_RECORDS), "{text}");
        let set = |aead: &str| {
            let j = text.replace(AEAD_AES_RECORDS, aead);
            std::fs::write(&config, j).unwrap();
        };
        set(AEAD);
        let s = Store::open_keyed(&sp, Some(&pass)).unwrap();
        s.backup("web", &img_path, &BackupOptions::default())
            .unwrap();
        let out = dir.path().join("out");
        s.restore("web", &out, &RestoreOptions::default()).unwrap();
        assert!(std::fs::read(&out).unwrap() == img);
        assert!(s.verify(None, &VerifyOptions::default()).unwrap().is_ok());
        drop(s);
        set(AEAD_AES_RECORDS);
        let s = Store::open_keyed(&sp, Some(&pass)).unwrap();
        let r = s.open_snapshot("web").unwrap();
        let mut buf = vec![0u8; 4096];
        let e = r.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        set("aes-ocb-unknown");
        let e = Store::open_keyed(&sp, Some(&pass)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion, "{e}");
    }

    /// A source whose chunks are all `Data` (first backup) or all
    /// `Unchanged` but for the listed ones (points).
    struct Points<'a> {
        data: &'a [u8],
        changed: Option<Vec<u64>>,
    }

    impl crate::backup::changed::ChangedSource for Points<'_> {
        fn chunk_state(&self, chunk: u64) -> crate::backup::changed::ChunkState {
            use crate::backup::changed::ChunkState;
            match &self.changed {
                None => ChunkState::Data,
                Some(c) if c.contains(&chunk) => ChunkState::Data,
                Some(_) => ChunkState::Unchanged,
            }
        }

        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn init_in_a_backend_then_open_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Backend> = Arc::new(crate::backend::LocalBackend::new(dir.path()));
        let pass = Secret::passphrase("pw").unwrap();
        let s =
            Store::init_encrypted_in(dir.path().into(), raw.clone(), 4096, &pass, &CHEAP).unwrap();
        assert!(s.is_encrypted());
        let e = Store::init_encrypted_in(dir.path().into(), raw, 4096, &pass, &CHEAP);
        assert_eq!(e.unwrap_err().kind(), ErrorKind::AlreadyExists);
        assert!(Store::open_keyed(dir.path(), Some(&pass))
            .unwrap()
            .is_encrypted());
    }

    #[test]
    fn protection_points_are_sealed_deltas_and_restore_exactly() {
        use crate::backup::changed::ChangedOptions;
        let dir = tempfile::tempdir().unwrap();
        let pass = Secret::passphrase("pw").unwrap();
        let s = Store::init_encrypted(&dir.path().join("s"), 4096, &pass, &CHEAP).unwrap();
        let mut img: Vec<u8> = (0..4096 * 256u32).map(|i| (i / 7) as u8).collect();
        let size = img.len() as u64;
        let opts = |parent: Option<String>| ChangedOptions {
            image_size: size,
            source: "test".into(),
            parent,
            progress: None,
            threads: Some(2),
            readers: 2,
        };
        let b = s.begin_changed_backup("vm").unwrap();
        let first = b
            .run(
                &Points {
                    data: &img,
                    changed: None,
                },
                &opts(None),
            )
            .unwrap();
        drop(b);
        let mut want = vec![img.clone()];
        let mut parent = first.snapshot.clone();
        for point in 0..3u8 {
            img[(10 + usize::from(point)) * 4096] = 0xee ^ point;
            let b = s.begin_changed_backup("vm").unwrap();
            let src = Points {
                data: &img,
                changed: Some(vec![10 + u64::from(point)]),
            };
            let st = b.run(&src, &opts(Some(parent.clone()))).unwrap();
            assert!(st.delta.is_some(), "point {point} is not a delta: {st:?}");
            parent = st.snapshot.clone();
            want.push(img.clone());
        }
        let snaps = s.snapshots(Some("vm")).unwrap();
        assert_eq!(snaps.len(), 4);
        for (snap, want) in snaps.iter().zip(&want) {
            let out = dir.path().join("out");
            let _ = std::fs::remove_file(&out);
            s.restore(&snap.reference(), &out, &RestoreOptions::default())
                .unwrap();
            assert!(
                std::fs::read(&out).unwrap() == *want,
                "{}",
                snap.reference()
            );
        }
        let r = s.verify(None, &VerifyOptions::default()).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }
}
