//! Key slots (`keys/<16 hex>`): the master key wrapped by one passphrase or
//! key file.
//!
//! A slot is a small JSON object:
//! ```text
//! {"format":"instant-recovery-key","version":1,"id":"<16 hex>",
//!  "kind":"passphrase"|"key-file","created":"<RFC 3339>","host":"…",
//!  "kdf":{"algorithm":"argon2id","version":19,"m_cost_kib":65536,"t_cost":3,
//!         "p_cost":1,"salt":"<32 hex>"},
//!  "aead":"xchacha20poly1305","nonce":"<48 hex>","wrapped":"<96 hex>"}
//! ```
//! `wrapped` is the XChaCha20-Poly1305 sealing of the 32-byte master key
//! under argon2id(secret, salt) with associated data "IRKEYSL1" ‖ slot id,
//! so a slot cannot be renamed into another. Slots are written through the
//! [`Backend`] (so they live on S3 too) with a whole-object put.

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use zeroize::Zeroizing;

use super::{Cipher, MasterKey, Secret, SecretKind, AEAD, KDF};
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, IoContext, Result};

/// `format` of a key slot.
pub const SLOT_FORMAT: &str = "instant-recovery-key";
/// Version of the key slot format.
pub const SLOT_VERSION: u32 = 1;
/// Directory of the key slots.
pub const KEYS_DIR: &str = "keys";
const SLOT_AD: &[u8; 8] = b"IRKEYSL1";

/// argon2id cost parameters of a new key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane (OWASP's argon2id guidance is ≥ 19 MiB, 2 passes).
    fn default() -> KdfParams {
        KdfParams {
            m_cost_kib: 64 << 10,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    fn argon2(&self) -> Result<Argon2<'static>> {
        let p = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32)).map_err(|e| {
            Error::invalid(format!(
                "Invalid argon2id parameters (memory {} KiB, {} passes, {} lanes): {e}",
                self.m_cost_kib, self.t_cost, self.p_cost
            ))
        })?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
    }
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    algorithm: String,
    version: u32,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct Slot {
    format: String,
    version: u32,
    id: String,
    kind: SecretKind,
    created: String,
    host: String,
    kdf: Kdf,
    aead: String,
    nonce: String,
    wrapped: String,
}

/// A key slot as listed by `key list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotInfo {
    /// The slot id (`keys/<id>`).
    pub id: String,
    /// Passphrase or key file.
    pub kind: SecretKind,
    /// When it was added (RFC 3339).
    pub created: String,
    /// The host that added it.
    pub host: String,
    /// Its argon2id parameters.
    pub kdf: KdfParams,
}

fn slot_key(id: &str) -> String {
    format!("{KEYS_DIR}/{id}")
}

fn derive(secret: &Secret, salt: &[u8], params: &KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    params
        .argon2()?
        .hash_password_into(secret.bytes(), salt, &mut out[..])
        .map_err(|e| Error::invalid(format!("Failed to derive the key: {e}")))?;
    Ok(out)
}

fn slot_cipher(kek: &[u8; 32]) -> Cipher {
    // The slot key seals only the master key; reuse Cipher's AEAD.
    use chacha20poly1305::aead::KeyInit;
    Cipher {
        aead: chacha20poly1305::XChaCha20Poly1305::new(kek.into()),
        records: super::RecordAead::XChaCha,
        id_key: Zeroizing::new([0; 32]),
        patch_id_key: Zeroizing::new([0; 32]),
        master: MasterKey(Zeroizing::new([0; 32])),
        segment_shift: 0,
    }
}

fn slot_ad(id: &str) -> Vec<u8> {
    let mut ad = SLOT_AD.to_vec();
    ad.extend_from_slice(id.as_bytes());
    ad
}

/// Wrap `master` for `secret` in a new slot; returns the slot id.
pub(crate) fn write_slot(
    backend: &dyn Backend,
    master: &MasterKey,
    secret: &Secret,
    params: &KdfParams,
) -> Result<String> {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 24] = rand::random();
    let kek = derive(secret, &salt, params)?;
    let mut wrapped = Zeroizing::new(master.0.to_vec());
    let tag = slot_cipher(&kek).seal(&nonce, &slot_ad(&id), &mut wrapped);
    wrapped.extend_from_slice(&tag);
    let slot = Slot {
        format: SLOT_FORMAT.into(),
        version: SLOT_VERSION,
        id: id.clone(),
        kind: secret.kind(),
        created: crate::snapshot::rfc3339_micros(crate::snapshot::now_micros()),
        host: crate::hold::hostname(),
        kdf: Kdf {
            algorithm: KDF.into(),
            version: 0x13,
            params: *params,
            salt: hex::encode(salt),
        },
        aead: AEAD.into(),
        nonce: hex::encode(nonce),
        wrapped: hex::encode(&wrapped[..]),
    };
    let mut json = serde_json::to_vec_pretty(&slot).unwrap_or_default();
    json.push(b'\n');
    let key = slot_key(&id);
    backend
        .put(&key, &json)
        .ctx(|| format!("Failed to write key slot {key}"))?;
    debug!(slot = %id, "added key slot");
    Ok(id)
}

fn read_slots(backend: &dyn Backend) -> Result<Vec<(String, Result<Slot>)>> {
    let mut names = backend
        .list(KEYS_DIR)
        .ctx(|| "Failed to list the key slots".into())?;
    names.sort();
    let mut out = Vec::new();
    for name in names {
        if name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let key = slot_key(&name);
        let bytes = match backend.read(&key) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("Failed to read key slot {key}"), e)),
        };
        let slot = serde_json::from_slice::<Slot>(&bytes)
            .map_err(|e| Error::corrupt(format!("Key slot {key} is unreadable")).with_source(e))
            .and_then(|s| {
                if s.format != SLOT_FORMAT || s.version != SLOT_VERSION {
                    Err(Error::new(
                        ErrorKind::UnsupportedVersion,
                        format!(
                            "Key slot {key} has format {:?} version {}, this program supports {SLOT_FORMAT} {SLOT_VERSION}",
                            s.format, s.version
                        ),
                    ))
                } else if s.id != name || s.kdf.algorithm != KDF || s.aead != AEAD {
                    Err(Error::corrupt(format!("Key slot {key} is invalid")))
                } else {
                    Ok(s)
                }
            });
        out.push((name, slot));
    }
    Ok(out)
}

/// Parse a slot from its bytes (fuzzing entry point): its info, or an error.
pub fn parse_slot(bytes: &[u8]) -> Result<SlotInfo> {
    let s: Slot = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt("Key slot is unreadable").with_source(e))?;
    decode_fields(&s)?;
    Ok(info(&s))
}

struct Fields {
    salt: Vec<u8>,
    nonce: [u8; 24],
    wrapped: Vec<u8>,
}

fn decode_fields(s: &Slot) -> Result<Fields> {
    let bad = |what: &str| Error::corrupt(format!("Key slot {} has an invalid {what}", s.id));
    let salt = hex::decode(&s.kdf.salt).map_err(|_| bad("salt"))?;
    if !(8..=64).contains(&salt.len()) {
        return Err(bad("salt"));
    }
    let mut nonce = [0u8; 24];
    hex::decode_to_slice(&s.nonce, &mut nonce).map_err(|_| bad("nonce"))?;
    let wrapped = hex::decode(&s.wrapped).map_err(|_| bad("wrapped key"))?;
    if wrapped.len() != 32 + 16 {
        return Err(bad("wrapped key"));
    }
    if s.kdf.version != 0x13 {
        return Err(bad("argon2 version"));
    }
    // Refuse costs that would exhaust the machine before trying a slot an
    // attacker may have planted (4 GiB, 64 passes at most).
    let p = s.kdf.params;
    if p.m_cost_kib > 4 << 20 || p.t_cost > 64 || p.p_cost > 16 {
        return Err(bad("argon2 cost"));
    }
    Ok(Fields {
        salt,
        nonce,
        wrapped,
    })
}

fn info(s: &Slot) -> SlotInfo {
    SlotInfo {
        id: s.id.clone(),
        kind: s.kind,
        created: s.created.clone(),
        host: s.host.clone(),
        kdf: s.kdf.params,
    }
}

fn try_unwrap(s: &Slot, secret: &Secret) -> Result<Option<MasterKey>> {
    let f = decode_fields(s)?;
    let kek = derive(secret, &f.salt, &s.kdf.params)?;
    let mut buf = Zeroizing::new(f.wrapped[..32].to_vec());
    if !slot_cipher(&kek).open(&f.nonce, &slot_ad(&s.id), &mut buf, &f.wrapped[32..]) {
        return Ok(None);
    }
    let mut m = Zeroizing::new([0u8; 32]);
    m.copy_from_slice(&buf);
    Ok(Some(MasterKey(m)))
}

/// Find the slot `secret` opens (slots of the secret's kind first) and
/// return the master key.
pub(crate) fn unwrap_any(
    backend: &dyn Backend,
    secret: &Secret,
    key_check: &str,
    where_: &str,
) -> Result<MasterKey> {
    let mut slots = read_slots(backend)?;
    if slots.is_empty() {
        return Err(Error::corrupt(format!(
            "Store {where_} is encrypted but has no key slots ({KEYS_DIR}/ is empty)"
        )));
    }
    slots.sort_by_key(|(_, s)| !matches!(s, Ok(s) if s.kind == secret.kind()));
    for (name, slot) in &slots {
        let slot = match slot {
            Ok(s) => s,
            Err(e) => {
                warn!("skipping key slot {name}: {e:?}");
                continue;
            }
        };
        match try_unwrap(slot, secret) {
            Ok(Some(master)) if master.key_check() == key_check => {
                debug!(slot = %name, "unlocked store");
                return Ok(master);
            }
            Ok(Some(_)) => warn!("key slot {name} holds the key of another store"),
            Ok(None) => {}
            Err(e) => warn!("skipping key slot {name}: {e:?}"),
        }
    }
    Err(Error::new(
        ErrorKind::WrongKey,
        format!("Wrong passphrase or key file for store {where_}"),
    ))
}

/// The readable slots.
pub(crate) fn list(backend: &dyn Backend) -> Result<Vec<SlotInfo>> {
    Ok(read_slots(backend)?
        .into_iter()
        .filter_map(|(_, s)| s.ok().map(|s| info(&s)))
        .collect())
}

/// Remove slot `id`, unless it is the last readable one.
pub(crate) fn remove(backend: &dyn Backend, id: &str, where_: &str) -> Result<()> {
    let slots = list(backend)?;
    if !slots.iter().any(|s| s.id == id) {
        return Err(Error::not_found(format!(
            "Store {where_} has no key slot {id}"
        )));
    }
    if slots.len() <= 1 {
        return Err(Error::invalid(format!(
            "Refusing to remove key slot {id}: it is the last key of store {where_}, which would become unreadable"
        )));
    }
    let key = slot_key(id);
    backend
        .delete(&key)
        .ctx(|| format!("Failed to delete key slot {key}"))?;
    debug!(slot = %id, "removed key slot");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    pub(crate) const CHEAP: KdfParams = KdfParams {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn wrap_unwrap_wrong_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let master = MasterKey::random();
        let check = master.key_check();
        let pass = Secret::passphrase("correct horse").unwrap();
        let a = write_slot(&b, &master, &pass, &CHEAP).unwrap();
        let got = unwrap_any(&b, &pass, &check, "s").unwrap();
        assert_eq!(*got.0, *master.0);
        let wrong = Secret::passphrase("wrong").unwrap();
        let e = unwrap_any(&b, &wrong, &check, "s").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::WrongKey);
        assert_eq!(e.to_string(), "Wrong passphrase or key file for store s");
        // Another store's key: not accepted.
        let e = unwrap_any(&b, &pass, &MasterKey::random().key_check(), "s")
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::WrongKey);
        // A slot renamed into another name fails authentication.
        let bytes = b.read(&slot_key(&a)).unwrap();
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace(&a, "00000000000000aa");
        b.put(&slot_key("00000000000000aa"), text.as_bytes())
            .unwrap();
        b.delete(&slot_key(&a)).unwrap();
        assert!(unwrap_any(&b, &pass, &check, "s").is_err());
        b.delete(&slot_key("00000000000000aa")).unwrap();
        let a = write_slot(&b, &master, &pass, &CHEAP).unwrap();
        let e = remove(&b, &a, "s").unwrap_err();
        assert!(e.to_string().contains("last key"), "{e}");
        let second = write_slot(&b, &master, &wrong, &CHEAP).unwrap();
        assert_eq!(list(&b).unwrap().len(), 2);
        assert!(unwrap_any(&b, &wrong, &check, "s").is_ok());
        remove(&b, &a, "s").unwrap();
        assert!(unwrap_any(&b, &pass, &check, "s").is_err());
        assert_eq!(list(&b).unwrap()[0].id, second);
        assert_eq!(
            remove(&b, "0123456789abcdef", "s").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn parse_rejects_garbage_and_absurd_costs() {
        assert!(parse_slot(b"{").is_err());
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let pass = Secret::passphrase("p").unwrap();
        let id = write_slot(&b, &MasterKey::random(), &pass, &CHEAP).unwrap();
        let bytes = b.read(&slot_key(&id)).unwrap();
        assert_eq!(parse_slot(&bytes).unwrap().kdf, CHEAP);
        let text = String::from_utf8(bytes).unwrap();
        let huge = text.replace("\"t_cost\": 1", "\"t_cost\": 100000");
        assert!(parse_slot(huge.as_bytes()).is_err());
    }
}
