//! `recovery-cli init STORE [--chunk-size 64K] [--encrypt]`
//!
//! `--encrypt`: the key is the global `--key-file` (its content), else the
//! passphrase in `RECOVERY_PASSWORD`, else one typed twice.

use std::path::PathBuf;

use crate::output;

/// Arguments of `init`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory of the new store (created if missing; must be empty), or
    /// s3://BUCKET/PREFIX (an empty prefix of an existing bucket).
    pub store: PathBuf,
    /// Chunk size: a power of two from 4K to 4M (e.g. 4K, 64K, 1M, 4MiB).
    #[arg(long, default_value = "64K", value_parser = output::parse_size)]
    pub chunk_size: u64,
    /// Encrypt the store (chunks, indexes, manifests) with a key wrapped by
    /// the passphrase or the global --key-file.
    #[arg(long)]
    pub encrypt: bool,
    #[command(flatten)]
    pub kdf: super::key::KdfArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `init` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub chunk_size: u32,
    /// argon2id parameters of the first key (`--encrypt`).
    pub encrypt: Option<store::crypto::KdfParams>,
    pub json: bool,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        let chunk_size = u32::try_from(a.chunk_size).map_err(|_| {
            anyhow::anyhow!("Chunk size {} is too large (at most 4M)", a.chunk_size)
        })?;
        store::config::validate_chunk_size(chunk_size)?;
        Ok(Config {
            store: a.store,
            chunk_size,
            encrypt: a.encrypt.then(|| a.kdf.params()).transpose()?,
            json: a.json,
        })
    }
}

/// Create the store.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = match &c.encrypt {
        None => store::Store::init_location(
            &super::location(&c.store)?,
            c.chunk_size,
            &store::OpenOptions::default(),
        )?,
        Some(kdf) => {
            let secret = super::key::new_secret(
                super::key::key_file(),
                store::crypto::PASSWORD_ENV,
                "init --encrypt",
            )?;
            match store::Location::parse(&super::location(&c.store)?)? {
                store::Location::Local(p) => {
                    store::Store::init_encrypted(&p, c.chunk_size, &secret, kdf)?
                }
                store::Location::S3 { bucket, prefix } => {
                    let o = store::location::s3_options(
                        &bucket,
                        &prefix,
                        &store::OpenOptions::default(),
                    )?;
                    let raw = store::backend::S3Backend::new(&o).map_err(|e| {
                        store::Error::io(format!("Failed to set up S3 store {}", o.display()), e)
                    })?;
                    let present = store::backend::Backend::list(&raw, "").map_err(|e| {
                        store::Error::io(format!("Failed to list {}", o.display()), e)
                    })?;
                    if !present.is_empty() {
                        anyhow::bail!(
                            "Cannot create a store at {}: the prefix is not empty",
                            o.display()
                        );
                    }
                    let cache = o.cache_dir.clone();
                    store::Store::init_encrypted_in(
                        cache,
                        std::sync::Arc::new(raw),
                        c.chunk_size,
                        &secret,
                        kdf,
                    )?
                }
            }
        }
    };
    if c.json {
        output::json(&serde_json::json!({
            "store": s.location(),
            "chunk_size": s.chunk_size(),
            "encrypted": s.is_encrypted(),
        }))
    } else {
        output::line(&format!(
            "Created {}store {} (chunk size {})",
            if s.is_encrypted() { "encrypted " } else { "" },
            s.location(),
            output::size(s.chunk_size() as u64)
        ))
    }
}
