//! [`S3Backend`]: a store on S3-compatible object storage, through the
//! `object_store` crate (AWS S3, MinIO, Ceph RGW, moto, ...).
//!
//! `object_store` is async; the [`Backend`] trait is sync and called from
//! many threads (backup workers, the boot path, the migration copier). The
//! backend owns one multi-threaded tokio runtime: each operation is spawned
//! onto it and the calling thread waits on a channel, so a caller may even
//! sit inside another runtime without panicking, and many calls are in
//! flight at once (one per calling thread).
//!
//! - **Reads** are ranged GETs (`get_range`): instant boot reads one chunk
//!   record of a pack, never the pack.
//! - **Publish** uploads the local temp file: one PUT below
//!   [`MULTIPART_THRESHOLD`], else a multipart upload with parts in flight
//!   in parallel. S3 makes an object visible only once its PUT (or its
//!   multipart completion) succeeded, so a reader sees nothing or all of it.
//!   Order (packs, then indexes, then the manifest) is kept by the callers,
//!   which publish one after the other: a failed upload returns an error
//!   before anything that names it is published.
//! - **Retries** with exponential backoff (100 ms doubling to 5 s) on 5xx,
//!   throttling, timeouts and connection errors are this backend's own loop
//!   (`object_store`'s retry layer only retries the parts of a multipart
//!   upload): every request has a timeout and every operation an overall
//!   deadline, the *retry time* ([`S3Options::op_timeout`], `instant-boot
//!   --store-retry-time`), so a dead or slow endpoint is an error after a
//!   bounded time, never a hang. Every failed request, retry and the last
//!   error are counted in [`RemoteStats`], which the daemon reports in its
//!   status.
//! - **Packs are opened lazily**: no HEAD, the length is asked only when a
//!   caller needs it; a chunk read is one ranged GET.
//! - **Disk cache** ([`super::disk_cache`]): every range read from a pack
//!   over the network (a chunk record, fetched exactly or by readahead) is
//!   kept under `cache_dir/chunks/`, bounded by
//!   [`S3Options::disk_cache_bytes`], and served from there later.
//! - **Rename** is copy then delete (S3 has no rename): a crash between the
//!   two leaves both names, which `forget` (re-run) or `unforget` resolve.
//! - **Cache**: index and manifest objects are immutable under their key;
//!   they are kept in `cache_dir/objects/` and served from there after a
//!   HEAD confirms the object still exists with the same size.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};
use tracing::{debug, warn};

use super::disk_cache::{DiskCache, DiskCacheStats};
use super::{Backend, Object, ObjectInfo, TempObject};

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Size of one multipart part.
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PART_CONCURRENCY: usize = 4;

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket ("" or "a/b", no slashes at the ends).
    pub prefix: String,
    /// `AWS_ENDPOINT_URL` (None: AWS).
    pub endpoint: Option<String>,
    /// `AWS_REGION` (default us-east-1).
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// Allow a plain-http endpoint (a local server).
    pub allow_http: bool,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// The retry time: give up on an operation (all its retries) after
    /// this long.
    pub op_timeout: Duration,
    /// Retries of one multipart part on 5xx, throttling and connection
    /// errors (other requests retry until `op_timeout`).
    pub max_retries: usize,
    /// Local directory for temp files and the index/manifest cache.
    pub cache_dir: PathBuf,
    /// Bound of the on-disk chunk cache under `cache_dir/chunks`; 0: none.
    pub disk_cache_bytes: u64,
}

impl S3Options {
    /// `s3://bucket/prefix`, for messages.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// What a remote store's requests went through (since it was opened):
/// the daemon's status reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// `s3://bucket/prefix`.
    pub location: String,
    /// The retry time: an operation fails after this long.
    pub retry_time: Duration,
    /// HTTP requests sent (attempts, retries included).
    pub requests: u64,
    /// Requests that failed (5xx, throttling, timeouts, connection errors;
    /// not the answers the store expects, such as "not found").
    pub request_errors: u64,
    /// Requests sent again after a failure.
    pub retries: u64,
    /// Operations that failed for good (retry time used up, or an error no
    /// retry helps).
    pub failed_operations: u64,
    /// The last request error and when it happened.
    pub last_error: Option<(String, SystemTime)>,
    /// The on-disk chunk cache, if there is one.
    pub disk_cache: Option<DiskCacheStats>,
}

/// Counters behind [`RemoteStats`].
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    request_errors: AtomicU64,
    retries: AtomicU64,
    failed_operations: AtomicU64,
    last_error: Mutex<Option<(String, SystemTime)>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.request_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((what, SystemTime::now()));
    }
}

/// First and longest pause between two attempts of a request.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How one operation ended, inside the runtime.
enum Outcome<T> {
    Done(T),
    Failed(object_store::Error),
    /// The retry time ran out; the last error.
    Expired(String),
}

/// State shared by the backend and the objects it opened.
#[derive(Debug)]
struct Shared {
    /// Requests without `object_store` retries: [`Shared::run`] retries.
    s3: Arc<AmazonS3>,
    /// With `object_store` retries, for the parts of multipart uploads.
    s3_parts: Arc<AmazonS3>,
    prefix: String,
    display: String,
    op_timeout: Duration,
    request_timeout: Duration,
    counters: Arc<Counters>,
    disk_cache: Option<DiskCache>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Whether an `object_store` error is worth another attempt: 5xx, 429,
/// 408, timeouts and connection errors; not "not found", a failed
/// condition, a refused credential or another 4xx.
fn retryable(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented { .. }
        | E::NotSupported { .. }
        | E::InvalidPath { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => false,
        _ => match http_status(&e.to_string()) {
            Some(s) => s >= 500 || s == 429 || s == 408,
            None => true,
        },
    }
}

/// The HTTP status an `object_store` error message names, if any.
fn http_status(msg: &str) -> Option<u16> {
    let at = msg.find("status code: ")? + "status code: ".len();
    msg.get(at..at + 3)?.parse().ok()
}

/// Answers that are part of the protocol, not failures of the endpoint.
fn expected(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
    )
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's context panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Shared {
    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Run one S3 operation to completion on the backend's runtime: each
    /// attempt (a future from `attempt`) bounded by the request timeout,
    /// failed attempts retried with backoff while the retry time lasts.
    fn run<T, F, Fut>(&self, op: &str, key: &str, attempt: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("S3 backend is shut down"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let retry_time = self.op_timeout;
        let request_timeout = self.request_timeout;
        let counters = self.counters.clone();
        let what = format!("S3 {op} {}/{key}", self.display);
        let start = Instant::now();
        rt.spawn(async move {
            let deadline = start + retry_time;
            let mut backoff = FIRST_BACKOFF;
            let outcome = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let error = match tokio::time::timeout(left.min(request_timeout), attempt()).await {
                    Ok(Ok(v)) => break Outcome::Done(v),
                    Ok(Err(e)) if !retryable(&e) => {
                        if !expected(&e) {
                            counters.error(format!("{what}: {e}"));
                        }
                        break Outcome::Failed(e);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!(
                        "no answer within {:.1} s",
                        left.min(request_timeout).as_secs_f64()
                    ),
                };
                counters.error(format!("{what}: {error}"));
                if Instant::now() + backoff >= deadline {
                    break Outcome::Expired(error);
                }
                debug!(%what, %error, backoff_ms = backoff.as_millis() as u64, "retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                counters.retries.fetch_add(1, Ordering::Relaxed);
            };
            let _ = tx.send(outcome);
        });
        let outcome = rx
            .recv()
            .map_err(|_| io::Error::other(format!("S3 {op} {key}: runtime stopped")))?;
        let e = match outcome {
            Outcome::Done(v) => return Ok(v),
            Outcome::Failed(e) => map_err(op, &self.display, key, e),
            Outcome::Expired(last) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "S3 {op} {}/{key} timed out after {:.1} s (retry time {} s): {last}",
                    self.display,
                    start.elapsed().as_secs_f64(),
                    retry_time.as_secs_f64()
                ),
            ),
        };
        if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::AlreadyExists {
            self.counters
                .failed_operations
                .fetch_add(1, Ordering::Relaxed);
        }
        Err(e)
    }

    fn head(&self, key: &str) -> io::Result<ObjectInfo> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        let meta = self.run("HEAD", key, move || {
            let (s3, path) = (s3.clone(), path.clone());
            async move { s3.head(&path).await }
        })?;
        Ok(ObjectInfo {
            size: meta.size,
            modified_unix: meta.last_modified.timestamp(),
            etag: meta.e_tag,
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Bytes> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        self.run("GET", key, move || {
            let (s3, path) = (s3.clone(), path.clone());
            async move { s3.get_range(&path, offset..offset + len).await }
        })
    }

    fn put_mode(&self, key: &str, data: Bytes, mode: PutMode) -> io::Result<ObjectInfo> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        let len = data.len() as u64;
        let r = self.run("PUT", key, move || {
            let (s3, path, data) = (s3.clone(), path.clone(), data.clone());
            let opts = PutOptions {
                mode: mode.clone(),
                ..Default::default()
            };
            async move { s3.put_opts(&path, PutPayload::from(data), opts).await }
        })?;
        Ok(ObjectInfo {
            size: len,
            modified_unix: 0,
            etag: r.e_tag,
        })
    }
}

/// Map an `object_store` error to an `io::Error` naming the operation and
/// the object, keeping the kinds the store relies on.
fn map_err(op: &str, display: &str, key: &str, e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
        object_store::Error::Precondition { .. } => io::ErrorKind::ResourceBusy,
        object_store::Error::NotImplemented { .. } => io::ErrorKind::Unsupported,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("S3 {op} {display}/{key} failed: {e}"))
}

/// A store on an S3 bucket (under a prefix).
#[derive(Debug)]
pub struct S3Backend {
    shared: Arc<Shared>,
    tmp_dir: PathBuf,
    cache_dir: PathBuf,
    counter: AtomicU64,
}

impl S3Backend {
    /// Connect (lazily: no request is made here) to the bucket in `opts`.
    pub fn new(opts: &S3Options) -> io::Result<S3Backend> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()?;
        let tmp_dir = opts.cache_dir.join("tmp");
        let cache_dir = opts.cache_dir.join("objects");
        fs::create_dir_all(&tmp_dir)?;
        fs::create_dir_all(&cache_dir)?;
        let disk_cache = match opts.disk_cache_bytes {
            0 => None,
            n => Some(DiskCache::open(&opts.cache_dir.join("chunks"), n)?),
        };
        Ok(S3Backend {
            shared: Arc::new(Shared {
                s3: Arc::new(Self::client(opts, 0)?),
                s3_parts: Arc::new(Self::client(opts, opts.max_retries)?),
                prefix: opts.prefix.clone(),
                display: opts.display(),
                op_timeout: opts.op_timeout,
                request_timeout: opts.request_timeout,
                counters: Arc::default(),
                disk_cache,
                runtime: Some(runtime),
            }),
            tmp_dir,
            cache_dir,
            counter: AtomicU64::new(0),
        })
    }

    /// A client retrying each request `max_retries` times itself.
    fn client(opts: &S3Options, max_retries: usize) -> io::Result<AmazonS3> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&opts.bucket)
            .with_region(&opts.region)
            .with_allow_http(opts.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: FIRST_BACKOFF,
                    max_backoff: MAX_BACKOFF,
                    base: 2.0,
                },
                max_retries,
                retry_timeout: opts.op_timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(opts.request_timeout)
                    .with_connect_timeout(opts.request_timeout.min(Duration::from_secs(10)))
                    .with_allow_http(opts.allow_http)
                    .with_pool_max_idle_per_host(64),
            );
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(k) = &opts.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &opts.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        if let Some(t) = &opts.session_token {
            b = b.with_token(t);
        }
        b.build()
            .map_err(|e| io::Error::other(format!("Invalid S3 location {}: {e}", opts.display())))
    }

    /// What this backend's requests went through.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.shared.counters;
        RemoteStats {
            location: self.shared.display.clone(),
            retry_time: self.shared.op_timeout,
            requests: c.requests.load(Ordering::Relaxed),
            request_errors: c.request_errors.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failed_operations: c.failed_operations.load(Ordering::Relaxed),
            last_error: c
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            disk_cache: self.shared.disk_cache.as_ref().map(DiskCache::stats),
        }
    }

    /// `s3://bucket/prefix`.
    pub fn display(&self) -> &str {
        &self.shared.display
    }

    /// Immutable objects worth keeping locally: indexes and manifests.
    fn cacheable(key: &str) -> bool {
        key.starts_with("index/") || key.starts_with("snapshots/")
    }

    fn cache_path(&self, key: &str) -> PathBuf {
        self.cache_dir.join(key)
    }

    /// Download `key` whole into the cache (temp file, rename).
    fn fill_cache(&self, key: &str, size: u64) -> io::Result<File> {
        let data = self.shared.get_range(key, 0, size)?;
        if data.len() as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("S3 GET {}/{key}: short object", self.shared.display),
            ));
        }
        let dest = self.cache_path(key);
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)?;
        }
        let mut tmp = self.create_temp()?;
        tmp.file_mut().write_all(&data)?;
        fs::rename(tmp.path(), &dest)?;
        tmp.mark_published();
        File::open(&dest)
    }

    /// Upload `file` in parts; a failed upload starts over (from a new
    /// handle on the file) while the retry time lasts.
    fn upload_multipart(&self, key: &str, file: &FsPath) -> io::Result<()> {
        let (s3, path) = (self.shared.s3_parts.clone(), self.shared.path(key));
        let file = file.to_path_buf();
        self.shared.run("multipart PUT", key, move || {
            let (s3, path, file) = (s3.clone(), path.clone(), file.clone());
            async move { Self::multipart(s3, path, &file).await }
        })
    }

    async fn multipart(s3: Arc<AmazonS3>, path: Path, file: &FsPath) -> object_store::Result<()> {
        let generic = |e: io::Error| object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        };
        let mut file = File::open(file).map_err(generic)?;
        {
            let upload = s3.put_multipart(&path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = match read_full(&mut file, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(generic(e));
                    }
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = w.wait_for_capacity(PART_CONCURRENCY).await {
                    // Leave no parts behind (they are billed).
                    let _ = w.abort().await;
                    return Err(e);
                }
                w.write(&buf[..n]);
            }
            w.finish().await.map(|_| ())
        }
    }
}

/// Read until `buf` is full or EOF.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Backend for S3Backend {
    fn create_temp(&self) -> io::Result<TempObject> {
        TempObject::create_in(&self.tmp_dir, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    fn publish(&self, mut tmp: TempObject, key: &str) -> io::Result<()> {
        tmp.file_mut().flush()?;
        let len = tmp.file().metadata()?.len();
        debug!(key, len, "S3 publish");
        if len >= MULTIPART_THRESHOLD {
            self.upload_multipart(key, tmp.path())?;
        } else {
            let mut data = Vec::with_capacity(len as usize);
            File::open(tmp.path())?.read_to_end(&mut data)?;
            self.shared
                .put_mode(key, Bytes::from(data), PutMode::Overwrite)?;
        }
        // Keep what we wrote: the next open of an index or manifest is local.
        if Self::cacheable(key) {
            let dest = self.cache_path(key);
            if let Some(p) = dest.parent() {
                fs::create_dir_all(p)?;
            }
            if fs::rename(tmp.path(), &dest).is_ok() {
                tmp.mark_published();
            }
        }
        Ok(())
    }

    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>> {
        // A pack is immutable and read by exact ranges: no HEAD (a chunk
        // read is one GET, and one the disk cache may spare); a missing
        // pack is a NotFound from the GET.
        if key.starts_with("packs/") {
            return Ok(Arc::new(S3Object {
                shared: self.shared.clone(),
                key: key.to_string(),
                len: OnceLock::new(),
                window: Mutex::new(Window::default()),
                fetched: Condvar::new(),
            }));
        }
        let info = self.shared.head(key)?;
        if Self::cacheable(key) {
            let cached = self.cache_path(key);
            if let Ok(f) = File::open(&cached) {
                if f.metadata()?.len() == info.size {
                    return Ok(Arc::new(f));
                }
            }
            match self.fill_cache(key, info.size) {
                Ok(f) => return Ok(Arc::new(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => warn!(key, "cannot cache S3 object, reading remotely: {e}"),
            }
        }
        Ok(Arc::new(S3Object {
            shared: self.shared.clone(),
            key: key.to_string(),
            len: OnceLock::from(info.size),
            window: Mutex::new(Window::default()),
            fetched: Condvar::new(),
        }))
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let (s3, path) = (self.shared.s3.clone(), self.shared.path(dir));
        let r = self.shared.run("LIST", dir, move || {
            let (s3, path) = (s3.clone(), path.clone());
            async move { s3.list_with_delimiter(Some(&path)).await }
        })?;
        let mut names: Vec<String> = r
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .chain(
                r.common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_string)),
            )
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let (s3, path) = (self.shared.s3.clone(), self.shared.path(key));
        match self.shared.run("DELETE", key, move || {
            let (s3, path) = (s3.clone(), path.clone());
            async move { s3.delete(&path).await }
        }) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let _ = fs::remove_file(self.cache_path(key));
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (s3, a, b) = (
            self.shared.s3.clone(),
            self.shared.path(from),
            self.shared.path(to),
        );
        self.shared.run("COPY", from, move || {
            let (s3, a, b) = (s3.clone(), a.clone(), b.clone());
            async move { s3.copy(&a, &b).await }
        })?;
        self.delete(from)
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        Ok(self.shared.head(key)?.size)
    }

    fn local_path(&self, _key: &str) -> Option<PathBuf> {
        None
    }

    fn clean_temp(&self) -> io::Result<usize> {
        // Temp files are local; remove those of processes that are gone.
        let mut n = 0;
        for e in fs::read_dir(&self.tmp_dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| FsPath::new(&format!("/proc/{p}")).exists());
            if !alive && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn stat(&self, key: &str) -> io::Result<ObjectInfo> {
        self.shared.head(key)
    }

    fn create_new(&self, key: &str, data: &[u8]) -> io::Result<ObjectInfo> {
        self.shared
            .put_mode(key, Bytes::copy_from_slice(data), PutMode::Create)
    }

    fn replace_if(&self, key: &str, data: &[u8], etag: &str) -> io::Result<ObjectInfo> {
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(etag.to_string()),
            version: None,
        });
        self.shared
            .put_mode(key, Bytes::copy_from_slice(data), mode)
    }

    fn is_remote(&self) -> bool {
        true
    }

    /// One exact ranged GET, past the readahead window and the disk cache.
    fn read_range_once(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.shared.get_range(key, offset, buf.len() as u64)?;
        if data.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("S3 GET {}/{key}: short read", self.shared.display),
            ));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn display(&self) -> String {
        self.shared.display.clone()
    }

    fn remote_stats(&self) -> Option<RemoteStats> {
        Some(self.stats())
    }
}

/// An object read through ranged GETs.
#[derive(Debug)]
struct S3Object {
    shared: Arc<Shared>,
    key: String,
    /// The object's length, asked (HEAD) when first needed.
    len: OnceLock<u64>,
    /// Readahead: the last range fetched beyond what was asked.
    window: Mutex<Window>,
    /// Signalled when a readahead ends.
    fetched: Condvar,
}

impl S3Object {
    fn len(&self) -> io::Result<u64> {
        if let Some(&n) = self.len.get() {
            return Ok(n);
        }
        let n = self.shared.head(&self.key)?.size;
        Ok(*self.len.get_or_init(|| n))
    }
}

/// Smallest and largest readahead of one object.
const READAHEAD_MIN: u64 = 256 << 10;
const READAHEAD_MAX: u64 = 8 << 20;

/// Bytes of an object fetched ahead, and how far ahead the next fetch goes.
#[derive(Debug, Default)]
struct Window {
    start: u64,
    data: Bytes,
    ahead: u64,
    /// The range a readahead in flight will bring.
    pending: Option<(u64, u64)>,
}

/// Ends a readahead: clears [`Window::pending`] and wakes its waiters.
struct PendingFetch<'a>(&'a S3Object);

impl Drop for PendingFetch<'_> {
    fn drop(&mut self) {
        let mut w = self.0.window.lock().unwrap_or_else(|p| p.into_inner());
        w.pending = None;
        drop(w);
        self.0.fetched.notify_all();
    }
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

impl Object for S3Object {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let want = buf.len() as u64;
        let end = offset.checked_add(want);
        // A lazily opened pack's length is not known (nor needed): a range
        // past its end is the GET's error.
        if let Some(&len) = self.len.get() {
            if end.is_none_or(|end| end > len) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {want} bytes at {offset} past the end of {}/{} ({len} bytes)",
                        self.shared.display, self.key
                    ),
                ));
            }
        }
        if want == 0 {
            return Ok(());
        }
        // A read inside the window is served from it; a read at (or just
        // past) its end is sequential: fetch ahead, doubling up to 8 MiB.
        // One readahead is in flight at a time: a read the pending fetch
        // covers, or that will be sequential once it is done, waits for it
        // (many threads reading one pack in order, like the migration
        // copier's workers, then share the growing windows instead of each
        // sending a request); a read behind it fetches exactly what it
        // needs, as random reads (instant boot) do. A readahead starts at
        // the window's end, not at a read past it: the chunks in between,
        // which other threads are about to read, come with it.
        let (fetch, from) = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if offset >= w.start && offset + want <= w.end() && !w.data.is_empty() {
                    let at = (offset - w.start) as usize;
                    buf.copy_from_slice(&w.data[at..at + buf.len()]);
                    drop(w);
                    if let Some(c) = &self.shared.disk_cache {
                        c.put(&self.key, offset, buf);
                    }
                    return Ok(());
                }
                if w.pending
                    .is_some_and(|(s, e)| offset >= s && offset <= e + (1 << 20))
                {
                    w = self.fetched.wait(w).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let sequential =
                    !w.data.is_empty() && offset >= w.start && offset <= w.end() + (1 << 20);
                if sequential && w.pending.is_none() {
                    let fetch = (w.ahead * 2).clamp(READAHEAD_MIN, READAHEAD_MAX);
                    let from = offset.min(w.end());
                    w.pending = Some((from, from + fetch.max(offset + want - from)));
                    break (fetch, from);
                }
                break (0, offset);
            }
        };
        // Whatever happens to the readahead, its waiters are woken.
        let _pending = (fetch > 0).then_some(PendingFetch(self));
        let cache = self.shared.disk_cache.as_ref();
        if let Some(c) = cache {
            if c.get(&self.key, offset, buf) {
                return Ok(());
            }
        }
        let need = offset + want - from;
        let len = if fetch > need {
            need.max(fetch.min(self.len()?.saturating_sub(from)))
        } else {
            need
        };
        let data = self.shared.get_range(&self.key, from, len)?;
        if data.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("S3 GET {}/{}: short read", self.shared.display, self.key),
            ));
        }
        let at = (offset - from) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        if let Some(c) = cache {
            c.put(&self.key, offset, buf);
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if fetch > 0 || w.data.is_empty() {
            *w = Window {
                start: from,
                data,
                ahead: fetch,
                pending: None,
            };
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        S3Object::len(self)
    }
}
