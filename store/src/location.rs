//! Store locations: a local directory or `s3://BUCKET/PREFIX`, and the
//! options every open takes ([`OpenOptions`]).
//!
//! S3 credentials and endpoint follow the AWS conventions:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION` (or `AWS_DEFAULT_REGION`, default `us-east-1`) and
//! `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an S3-compatible
//! server. Plain `http://` is allowed only when the endpoint says so
//! explicitly (a local server). The *retry time* bounds each operation
//! with all its retries: [`OpenOptions::io_timeout`], else what a command
//! line set with [`set_default_retry_time`] (`--store-retry-time`), else
//! `RECOVERY_S3_TIMEOUT` (seconds), else 60 s. The on-disk chunk cache of
//! a remote store ([`crate::backend::DiskCache`]) holds up to
//! [`OpenOptions::disk_cache_bytes`], else [`set_default_disk_cache_bytes`],
//! else `RECOVERY_DISK_CACHE_SIZE` (bytes), else 1 GiB; 0 turns it off.

use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use std::sync::Arc;

use tracing::info;

use crate::backend::{Backend, S3Backend, S3Options};
use crate::config::{Config, CONFIG_KEY};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::lock::{self, LeaseState, ReaderLease};
use crate::repo::Store;

/// Default bound on one S3 operation, retries included.
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable overriding [`DEFAULT_S3_TIMEOUT`] (seconds).
pub const S3_TIMEOUT_ENV: &str = "RECOVERY_S3_TIMEOUT";

/// Default bound of a remote store's on-disk chunk cache.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 1 << 30;

/// Environment variable overriding [`DEFAULT_DISK_CACHE_BYTES`] (bytes).
pub const DISK_CACHE_ENV: &str = "RECOVERY_DISK_CACHE_SIZE";

/// Process-wide defaults set by the command line: retry time, disk cache.
static DEFAULTS: Mutex<(Option<Duration>, Option<u64>)> = Mutex::new((None, None));

fn defaults() -> (Option<Duration>, Option<u64>) {
    *DEFAULTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The retry time of remote stores opened from now on in this process
/// when their [`OpenOptions`] set none (`--store-retry-time`).
pub fn set_default_retry_time(t: Duration) {
    DEFAULTS.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(t);
}

/// The on-disk chunk cache bound of remote stores opened from now on in
/// this process when their [`OpenOptions`] set none (`--disk-cache-size`).
pub fn set_default_disk_cache_bytes(n: u64) {
    DEFAULTS.lock().unwrap_or_else(|p| p.into_inner()).1 = Some(n);
}

/// Where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on a local filesystem.
    Local(PathBuf),
    /// A bucket and a key prefix ("" for the bucket root).
    S3 {
        /// The bucket.
        bucket: String,
        /// The prefix, without leading or trailing `/`.
        prefix: String,
    },
}

impl Location {
    /// Parse `s3://BUCKET[/PREFIX]` or a path.
    pub fn parse(s: &str) -> Result<Location> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !valid_bucket {
                return Err(Error::invalid(format!(
                    "Invalid S3 location {s:?}: expected s3://BUCKET/PREFIX with a bucket name of 3-63 lowercase letters, digits, '-' or '.'"
                )));
            }
            if prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
                && !prefix.is_empty()
            {
                return Err(Error::invalid(format!(
                    "Invalid S3 location {s:?}: empty, '.' or '..' component in the prefix"
                )));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(Error::invalid(format!(
                    "Unsupported store location {s:?}: only local paths and s3://BUCKET/PREFIX"
                )));
            }
        }
        if s.is_empty() {
            return Err(Error::invalid("Empty store location"));
        }
        Ok(Location::Local(PathBuf::from(s)))
    }

    /// True for `s3://`.
    pub fn is_remote(&self) -> bool {
        matches!(self, Location::S3 { .. })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// How to open (or create) a store.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Local cache of a remote store (index and manifest objects, temp
    /// files). Default: [`default_cache_root`]/`<hash of the location>`.
    pub cache_dir: Option<PathBuf>,
    /// Bound on one remote operation with its retries (default
    /// `RECOVERY_S3_TIMEOUT` or [`DEFAULT_S3_TIMEOUT`]).
    pub io_timeout: Option<Duration>,
    /// S3 endpoint, overriding `AWS_ENDPOINT_URL` (tools and tests that
    /// talk to several servers from one process).
    pub s3_endpoint: Option<String>,
    /// S3 access key id and secret, overriding the `AWS_*` variables.
    pub s3_credentials: Option<(String, String)>,
    /// Bound of the on-disk chunk cache of a remote store (0: none).
    pub disk_cache_bytes: Option<u64>,
}

/// Environment variable naming the cache root (`recovery-cli --cache-dir`).
pub const CACHE_DIR_ENV: &str = "RECOVERY_CACHE_DIR";

/// `$RECOVERY_CACHE_DIR`, else `$XDG_CACHE_HOME/recovery`, else
/// `~/.cache/recovery`, else a directory under the system temp dir. Each
/// remote store gets its own subdirectory (a hash of its location).
pub fn default_cache_root() -> PathBuf {
    if let Some(x) = std::env::var_os(CACHE_DIR_ENV).filter(|x| !x.is_empty()) {
        return PathBuf::from(x);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("recovery");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(".cache").join("recovery");
    }
    std::env::temp_dir().join("recovery-cache")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The S3 options for `bucket`/`prefix` from the AWS environment and `opts`.
pub fn s3_options(bucket: &str, prefix: &str, opts: &OpenOptions) -> Result<S3Options> {
    let place = Location::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    }
    .to_string();
    let endpoint = opts
        .s3_endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"));
    let (access_key_id, secret_access_key) = match &opts.s3_credentials {
        Some((k, s)) => (Some(k.clone()), Some(s.clone())),
        None => (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")),
    };
    let allow_http = endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let (default_retry, default_cache) = defaults();
    let op_timeout = match opts.io_timeout.or(default_retry) {
        Some(t) => t,
        None => match env(S3_TIMEOUT_ENV) {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "Invalid {S3_TIMEOUT_ENV}={v:?}: expected a number of seconds"
                    ))
                })?,
            None => DEFAULT_S3_TIMEOUT,
        },
    };
    let disk_cache_bytes = match opts.disk_cache_bytes.or(default_cache) {
        Some(n) => n,
        None => match env(DISK_CACHE_ENV) {
            Some(v) => v.parse::<u64>().map_err(|_| {
                Error::invalid(format!(
                    "Invalid {DISK_CACHE_ENV}={v:?}: expected a number of bytes"
                ))
            })?,
            None => DEFAULT_DISK_CACHE_BYTES,
        },
    };
    let cache_dir = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => {
            let h = blake3::hash(place.as_bytes());
            default_cache_root().join(&h.to_hex()[..16])
        }
    };
    Ok(S3Options {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint,
        region: env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string()),
        access_key_id,
        secret_access_key,
        session_token: env("AWS_SESSION_TOKEN"),
        allow_http,
        request_timeout: op_timeout.min(Duration::from_secs(30)),
        op_timeout,
        max_retries: 10,
        cache_dir,
        disk_cache_bytes,
    })
}

fn s3_backend(
    bucket: &str,
    prefix: &str,
    opts: &OpenOptions,
) -> Result<(PathBuf, Arc<dyn Backend>)> {
    let o = s3_options(bucket, prefix, opts)?;
    let b = S3Backend::new(&o)
        .map_err(|e| Error::io(format!("Failed to set up S3 store {}", o.display()), e))?;
    Ok((o.cache_dir, Arc::new(b)))
}

impl Store {
    /// Open the store at `location` (a path or `s3://BUCKET/PREFIX`).
    pub fn open_location(location: &str, opts: &OpenOptions) -> Result<Store> {
        match Location::parse(location)? {
            Location::Local(p) => Store::open(&p),
            Location::S3 { bucket, prefix } => {
                let (cache, backend) = s3_backend(&bucket, &prefix, opts)?;
                Store::open_backend(cache, backend)
            }
        }
    }

    /// Create a store at `location` (a missing or empty directory, or an
    /// S3 prefix holding no store).
    pub fn init_location(location: &str, chunk_size: u32, opts: &OpenOptions) -> Result<Store> {
        match Location::parse(location)? {
            Location::Local(p) => Store::init(&p, chunk_size),
            Location::S3 { bucket, prefix } => {
                let config = Config::new(chunk_size)?;
                let (cache, backend) = s3_backend(&bucket, &prefix, opts)?;
                let place = backend.display();
                let present = backend.list("").ctx(|| format!("Failed to list {place}"))?;
                if present.iter().any(|n| n == CONFIG_KEY) {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("A store already exists at {place}"),
                    ));
                }
                if !present.is_empty() {
                    return Err(Error::invalid(format!(
                        "Cannot create a store at {place}: the prefix is not empty ({})",
                        present.join(", ")
                    )));
                }
                // Conditional: of two racing inits, one wins.
                match backend.create_new(CONFIG_KEY, &config.to_json()) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(Error::new(
                            ErrorKind::AlreadyExists,
                            format!("A store already exists at {place}"),
                        ))
                    }
                    Err(e) => {
                        return Err(Error::io(
                            format!("Failed to write {place}/{CONFIG_KEY}"),
                            e,
                        ))
                    }
                }
                info!(store = %place, chunk_size, "initialised store");
                Store::open_backend(cache, backend)
            }
        }
    }

    /// Register as a reader of `snapshot` (`NAME@ID`) on a remote store, so
    /// gc keeps what it reads (see [`crate::lock`]); `None` on a local store,
    /// whose readers hold a shared `flock` instead.
    pub fn register_reader(&self, snapshot: &str) -> Result<Option<ReaderLease>> {
        if !self.is_remote() {
            return Ok(None);
        }
        ReaderLease::register(self.raw_backend().clone(), snapshot).map(Some)
    }

    /// Snapshots (`NAME@ID`) registered readers of a remote store are
    /// reading (empty for a local store).
    pub fn remote_readers(&self) -> Result<Vec<String>> {
        if !self.is_remote() {
            return Ok(Vec::new());
        }
        lock::active_readers(self.raw_backend().as_ref(), true)
    }

    /// Remove a remote store's writer lock left by a dead writer; a fresh
    /// lease only with `force`. Returns what was removed.
    pub fn break_lock(&self, force: bool) -> Result<Option<LeaseState>> {
        if !self.is_remote() {
            return Err(Error::invalid(format!(
                "Store {} is local: its lock is an flock, released when the writer exits",
                self.location()
            )));
        }
        lock::break_lock(self.raw_backend().as_ref(), force)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_locations() {
        assert_eq!(
            Location::parse("s3://my-bucket/a/b/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Location::parse("s3://my-bucket").unwrap().to_string(),
            "s3://my-bucket"
        );
        assert_eq!(
            Location::parse("/tmp/x").unwrap(),
            Location::Local("/tmp/x".into())
        );
        for bad in ["s3://", "s3://A_B/x", "s3://ok-bucket/a//b", "gs://b/p", ""] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }
}
