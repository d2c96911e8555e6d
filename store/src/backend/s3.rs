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
//! - **Retries** with exponential backoff on 5xx, throttling and connection
//!   errors come from `object_store`'s retry layer; every request has a
//!   timeout and every operation an overall deadline
//!   ([`S3Options::op_timeout`]), so a dead endpoint is a bounded error,
//!   never a hang.
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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};
use tracing::{debug, warn};

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
    /// Give up on an operation (all its retries) after this long.
    pub op_timeout: Duration,
    /// Retries of one request on 5xx, throttling and connection errors.
    pub max_retries: usize,
    /// Local directory for temp files and the index/manifest cache.
    pub cache_dir: PathBuf,
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

/// State shared by the backend and the objects it opened.
#[derive(Debug)]
struct Shared {
    s3: Arc<AmazonS3>,
    prefix: String,
    display: String,
    op_timeout: Duration,
    runtime: Option<tokio::runtime::Runtime>,
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

    /// Run one S3 operation to completion on the backend's runtime, bounded
    /// by the operation deadline.
    fn run<T, F>(&self, op: &str, key: &str, fut: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("S3 backend is shut down"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = self.op_timeout;
        let start = std::time::Instant::now();
        rt.spawn(async move {
            let r = tokio::time::timeout(deadline, fut).await;
            let _ = tx.send(r);
        });
        let r = rx
            .recv()
            .map_err(|_| io::Error::other(format!("S3 {op} {key}: runtime stopped")))?;
        match r {
            Ok(Ok(v)) => Ok(v),
            // Retries exhausted at the deadline: say so.
            Ok(Err(e)) if start.elapsed() >= deadline.mul_f64(0.9) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "S3 {op} {}/{key} timed out after {:.1} s: {e}",
                    self.display,
                    start.elapsed().as_secs_f64()
                ),
            )),
            Ok(Err(e)) => Err(map_err(op, &self.display, key, e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "S3 {op} {}/{key} timed out after {} s",
                    self.display,
                    deadline.as_secs_f64()
                ),
            )),
        }
    }

    fn head(&self, key: &str) -> io::Result<ObjectInfo> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        let meta = self.run("HEAD", key, async move { s3.head(&path).await })?;
        Ok(ObjectInfo {
            size: meta.size,
            modified_unix: meta.last_modified.timestamp(),
            etag: meta.e_tag,
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Bytes> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        self.run("GET", key, async move {
            s3.get_range(&path, offset..offset + len).await
        })
    }

    fn put_mode(&self, key: &str, data: Bytes, mode: PutMode) -> io::Result<ObjectInfo> {
        let (s3, path) = (self.s3.clone(), self.path(key));
        let len = data.len() as u64;
        let r = self.run("PUT", key, async move {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            s3.put_opts(&path, PutPayload::from(data), opts).await
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
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&opts.bucket)
            .with_region(&opts.region)
            .with_allow_http(opts.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: opts.max_retries,
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
        let s3 = b.build().map_err(|e| {
            io::Error::other(format!("Invalid S3 location {}: {e}", opts.display()))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()?;
        let tmp_dir = opts.cache_dir.join("tmp");
        let cache_dir = opts.cache_dir.join("objects");
        fs::create_dir_all(&tmp_dir)?;
        fs::create_dir_all(&cache_dir)?;
        Ok(S3Backend {
            shared: Arc::new(Shared {
                s3: Arc::new(s3),
                prefix: opts.prefix.clone(),
                display: opts.display(),
                op_timeout: opts.op_timeout,
                runtime: Some(runtime),
            }),
            tmp_dir,
            cache_dir,
            counter: AtomicU64::new(0),
        })
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

    fn upload_multipart(&self, key: &str, mut file: File) -> io::Result<()> {
        let (s3, path) = (self.shared.s3.clone(), self.shared.path(key));
        self.shared.run("multipart PUT", key, async move {
            let upload = s3.put_multipart(&path).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = match read_full(&mut file, &mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(object_store::Error::Generic {
                            store: "S3",
                            source: Box::new(e),
                        });
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
        })
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
            let f = File::open(tmp.path())?;
            self.upload_multipart(key, f)?;
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
            len: info.size,
            window: std::sync::Mutex::new(Window::default()),
        }))
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let (s3, path) = (self.shared.s3.clone(), self.shared.path(dir));
        let r = self.shared.run("LIST", dir, async move {
            s3.list_with_delimiter(Some(&path)).await
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
        match self
            .shared
            .run("DELETE", key, async move { s3.delete(&path).await })
        {
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
        self.shared
            .run("COPY", from, async move { s3.copy(&a, &b).await })?;
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

    fn display(&self) -> String {
        self.shared.display.clone()
    }
}

/// An object read through ranged GETs.
#[derive(Debug)]
struct S3Object {
    shared: Arc<Shared>,
    key: String,
    len: u64,
    /// Readahead: the last range fetched beyond what was asked.
    window: std::sync::Mutex<Window>,
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
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

impl Object for S3Object {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let want = buf.len() as u64;
        if offset.checked_add(want).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {want} bytes at {offset} past the end of {}/{} ({} bytes)",
                    self.shared.display, self.key, self.len
                ),
            ));
        }
        if want == 0 {
            return Ok(());
        }
        // A read inside the window is served from it; a read at (or just
        // past) its end is sequential: fetch ahead, doubling up to 8 MiB.
        // Random reads (instant boot) fetch exactly what they need.
        let fetch = {
            let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if offset >= w.start && offset + want <= w.end() && !w.data.is_empty() {
                let at = (offset - w.start) as usize;
                buf.copy_from_slice(&w.data[at..at + buf.len()]);
                return Ok(());
            }
            let sequential =
                !w.data.is_empty() && offset >= w.start && offset <= w.end() + (1 << 20);
            if sequential {
                (w.ahead * 2).clamp(READAHEAD_MIN, READAHEAD_MAX)
            } else {
                0
            }
        };
        let len = want.max(fetch).min(self.len - offset);
        let data = self.shared.get_range(&self.key, offset, len)?;
        if data.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("S3 GET {}/{}: short read", self.shared.display, self.key),
            ));
        }
        buf.copy_from_slice(&data[..buf.len()]);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if fetch > 0 || w.data.is_empty() {
            *w = Window {
                start: offset,
                data,
                ahead: fetch,
            };
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}
