//! `config.json`: the store's format marker, version and chunk size.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{CONFIG_FORMAT, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, STORE_VERSION};

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
}

impl Config {
    /// A config for a new store.
    pub fn new(chunk_size: u32) -> Result<Config> {
        validate_chunk_size(chunk_size)?;
        Ok(Config {
            format: CONFIG_FORMAT.into(),
            version: STORE_VERSION,
            chunk_size,
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
            Some(STORE_VERSION) => {}
            v => {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    format!(
                        "Store {where_} has format version {}, this program supports version {STORE_VERSION}",
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
        Ok(config)
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
        let v2 = br#"{"format":"instant-recovery-store","version":2,"chunk_size":65536}"#;
        let e = Config::parse(v2, "s").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
        assert!(e.to_string().contains("version 2"), "{e}");
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
