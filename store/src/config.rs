//! `config.json`: the store's format marker, version and chunk size, and
//! for an encrypted store (version [`STORE_VERSION_ENCRYPTED`]) its
//! `encryption` section ([`EncryptionConfig`]).

use serde::{Deserialize, Serialize};

use crate::crypto::EncryptionConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    CONFIG_FORMAT, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, STORE_VERSION, STORE_VERSION_ENCRYPTED,
    STORE_VERSION_PATCHES, STORE_VERSION_PATCH_CHAINS,
};

/// Name of the config object.
pub const CONFIG_KEY: &str = "config.json";

/// The store configuration, fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Always [`CONFIG_FORMAT`].
    pub format: String,
    /// Store layout version.
    pub version: u32,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Present (and the version is [`STORE_VERSION_ENCRYPTED`]) when the
    /// store is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

impl Config {
    /// A config for a new store.
    pub fn new(chunk_size: u32) -> Result<Config> {
        validate_chunk_size(chunk_size)?;
        Ok(Config {
            format: CONFIG_FORMAT.into(),
            version: STORE_VERSION,
            chunk_size,
            encryption: None,
        })
    }

    /// A config for a new encrypted store.
    pub fn new_encrypted(chunk_size: u32, encryption: EncryptionConfig) -> Result<Config> {
        Ok(Config {
            version: STORE_VERSION_ENCRYPTED,
            encryption: Some(encryption),
            ..Config::new(chunk_size)?
        })
    }

    /// Parse and validate `config.json`.
    pub fn parse(bytes: &[u8], where_: &str) -> Result<Config> {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<String>,
            version: Option<u32>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::NotAStore,
                format!("{where_} is not a store (unreadable config.json)"),
            )
            .with_source(e)
        })?;
        if probe.format.as_deref() != Some(CONFIG_FORMAT) {
            return Err(Error::new(
                ErrorKind::NotAStore,
                format!(
                    "{where_} is not a store (config.json has format {:?})",
                    probe.format
                ),
            ));
        }
        match probe.version {
            Some(
                STORE_VERSION
                | STORE_VERSION_ENCRYPTED
                | STORE_VERSION_PATCHES
                | STORE_VERSION_PATCH_CHAINS,
            ) => {}
            v => {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    format!(
                        "Store {where_} has format version {}, this program supports versions {STORE_VERSION}, {STORE_VERSION_ENCRYPTED} (encrypted), {STORE_VERSION_PATCHES} (patch records) and {STORE_VERSION_PATCH_CHAINS} (patch chains)",
                        v.map_or("none".to_string(), |v| v.to_string())
                    ),
                ))
            }
        }
        let config: Config = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(format!("Store {where_} has an invalid config.json")).with_source(e)
        })?;
        validate_chunk_size(config.chunk_size)
            .map_err(|e| e.context(format!("Store {where_} has an invalid config.json")))?;
        let mismatch = match config.version {
            STORE_VERSION_PATCHES | STORE_VERSION_PATCH_CHAINS => false,
            v => (v == STORE_VERSION_ENCRYPTED) != config.encryption.is_some(),
        };
        if mismatch {
            return Err(Error::corrupt(format!(
                "Store {where_} has an invalid config.json (version {} {} an encryption section)",
                config.version,
                if config.encryption.is_some() {
                    "with"
                } else {
                    "without"
                }
            )));
        }
        Ok(config)
    }

    /// True when the store may hold patch records in chains
    /// ([`STORE_VERSION_PATCH_CHAINS`]), the patches this program writes. A
    /// version [`STORE_VERSION_PATCHES`] store holds patches too (read the
    /// same way) but is upgraded before this program writes one.
    pub fn has_patches(&self) -> bool {
        self.version == STORE_VERSION_PATCH_CHAINS
    }

    /// This config, upgraded to hold patch records in chains.
    pub fn with_patches(&self) -> Config {
        Config {
            version: STORE_VERSION_PATCH_CHAINS,
            ..self.clone()
        }
    }

    /// Serialize.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Chunk sizes must be a power of two from 4 KiB to 4 MiB.
pub fn validate_chunk_size(chunk_size: u32) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(Error::invalid(format!(
            "Chunk size {chunk_size} is not a power of two from 4 KiB to 4 MiB"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let c = Config::new(65536).unwrap();
        assert_eq!(Config::parse(&c.to_json(), "s").unwrap(), c);
        assert_eq!(
            Config::new(3000).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            Config::new(8 << 20).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            Config::new(2048).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        // Version 4 (patch chains) with and without encryption; version 3
        // (patches of depth one) is read, and upgraded before a patch.
        let c = Config::new(65536).unwrap().with_patches();
        assert!(c.has_patches());
        assert_eq!(c.version, STORE_VERSION_PATCH_CHAINS);
        assert_eq!(Config::parse(&c.to_json(), "s").unwrap(), c);
        let v3 = br#"{"format":"instant-recovery-store","version":3,"chunk_size":65536}"#;
        let v3 = Config::parse(v3, "s").unwrap();
        assert!(!v3.has_patches());
        assert!(v3.with_patches().has_patches());
        let v7 = br#"{"format":"instant-recovery-store","version":7,"chunk_size":65536}"#;
        let e = Config::parse(v7, "s").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
        assert!(e.to_string().contains("version 7"), "{e}");
        // An encrypted store's version without its section, or the reverse.
        let v2 = br#"{"format":"instant-recovery-store","version":2,"chunk_size":65536}"#;
        assert_eq!(
            Config::parse(v2, "s").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let enc = EncryptionConfig {
            aead: "xchacha20poly1305".into(),
            kdf: "argon2id".into(),
            segment_shift: 12,
            key_check: "00".into(),
        };
        let c = Config::new_encrypted(65536, enc).unwrap();
        assert_eq!(Config::parse(&c.to_json(), "s").unwrap(), c);
        let mut plain_v1 = c.clone();
        plain_v1.version = 1;
        assert_eq!(
            Config::parse(&plain_v1.to_json(), "s").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        // Plaintext stores keep their exact config bytes.
        assert!(!String::from_utf8(Config::new(65536).unwrap().to_json())
            .unwrap()
            .contains("encryption"));
        let other = br#"{"format":"something","version":1}"#;
        assert_eq!(
            Config::parse(other, "s").unwrap_err().kind(),
            ErrorKind::NotAStore
        );
        assert_eq!(
            Config::parse(b"\x00garbage", "s").unwrap_err().kind(),
            ErrorKind::NotAStore
        );
    }
}
