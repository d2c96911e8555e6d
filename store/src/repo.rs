//! [`Store`]: opening a store and reading verified chunks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{debug, info};

use crate::backend::{Backend, LocalBackend, Object};
use crate::chunk::{Codec, RecordKind};
use crate::config::{Config, CONFIG_KEY};
use crate::crypto::{KdfParams, Secret};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{FormatError, MAX_PATCH_CHAIN, MAX_STORED_LEN, RECORD_HEADER_LEN};
use crate::id::{ChunkId, PackId};
use crate::index::{self, IndexView, Loc};
use crate::lock::{WriterLock, LOCK_FILE};
use crate::patch::{ChainHints, PatchRef};
use crate::snapshot::manifest::read_header;
use crate::snapshot::reader::SnapshotReader;
use crate::snapshot::{self, SnapshotInfo};

const PACK_CACHE: usize = 256;

/// A chunk store. Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// `/path` or `s3://bucket/prefix`, for messages.
    place: String,
    /// The storage itself, below any sealing wrapper: lock objects live here.
    raw: Arc<dyn Backend>,
    backend: Arc<dyn Backend>,
    config: Config,
    /// The store may hold patch chains (config version 4): set at open or
    /// by [`Store::enable_patches`].
    patches: AtomicBool,
    /// Chain depth and coverage of the patches written lately (see
    /// [`ChainHints`]).
    chain_hints: Mutex<ChainHints>,
    /// Plaintext or sealed records, plain or keyed ids (see [`crate::crypto`]).
    codec: Codec,
    index: RwLock<Arc<IndexView>>,
    packs: Mutex<HashMap<PackId, Arc<dyn Object>>>,
    /// Held while a backup ending reloads and merges the index: sessions
    /// that share one writer lock (`Store::begin_changed_backups`) may end
    /// at once, and two merges of one generation would each publish it and
    /// delete the per-pack indexes the other's copy does not hold.
    merging: Mutex<()>,
}

thread_local! {
    static RECORD_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Store {
    /// Create a new store at `path` (a missing or empty directory).
    pub fn init(path: &Path, chunk_size: u32) -> Result<Store> {
        Self::init_with(path, chunk_size, None)
    }

    /// Create a new encrypted store at `path`, its first key slot opened by
    /// `secret` (see [`crate::crypto`]).
    pub fn init_encrypted(
        path: &Path,
        chunk_size: u32,
        secret: &Secret,
        kdf: &KdfParams,
    ) -> Result<Store> {
        Self::init_with(path, chunk_size, Some((secret, kdf)))
    }

    fn init_with(
        path: &Path,
        chunk_size: u32,
        encrypt: Option<(&Secret, &KdfParams)>,
    ) -> Result<Store> {
        let mut config = Config::new(chunk_size)?;
        match fs::metadata(path) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "Cannot create a store at {}: it exists and is not a directory",
                        path.display()
                    ),
                ))
            }
            _ => {}
        }
        match fs::read_dir(path) {
            Ok(mut rd) => {
                if path.join(CONFIG_KEY).exists() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("A store already exists at {}", path.display()),
                    ));
                }
                if rd.next().is_some() {
                    return Err(Error::invalid(format!(
                        "Cannot create a store in {}: directory is not empty",
                        path.display()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(path)
                    .map_err(|e| Error::io_path("Failed to create store directory", path, e))?;
            }
            Err(e) => return Err(Error::io_path("Failed to read directory", path, e)),
        }
        let backend = LocalBackend::new(path);
        for d in ["packs", "index", "snapshots", "tmp"] {
            fs::create_dir_all(path.join(d))
                .map_err(|e| Error::io_path("Failed to create", &path.join(d), e))?;
        }
        fs::write(path.join(LOCK_FILE), b"")
            .map_err(|e| Error::io_path("Failed to create", &path.join(LOCK_FILE), e))?;
        if let Some((secret, kdf)) = encrypt {
            // The key slot first: a config naming encryption always has one.
            let enc = crate::crypto::init_keys(&backend, secret, kdf)?;
            config = Config::new_encrypted(chunk_size, enc)?;
        }
        backend
            .put(CONFIG_KEY, &config.to_json())
            .map_err(|e| Error::io_path("Failed to write", &path.join(CONFIG_KEY), e))?;
        crate::backend::sync_dir(path).map_err(|e| Error::io_path("Failed to sync", path, e))?;
        info!(path = %path.display(), chunk_size, encrypted = encrypt.is_some(), "initialised store");
        Store::open_keyed(path, encrypt.map(|(s, _)| s))
    }

    /// Open the store at `path`. An encrypted store asks the secret of the
    /// process-wide provider, else the environment
    /// ([`crate::crypto::set_secret_provider`]).
    pub fn open(path: &Path) -> Result<Store> {
        Self::open_keyed(path, None)
    }

    /// Open the store at `path`; `secret` unlocks it if it is encrypted
    /// (`None`: as [`Store::open`]).
    pub fn open_keyed(path: &Path, secret: Option<&Secret>) -> Result<Store> {
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::NotAStore,
                    format!("{} is not a store (not a directory)", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "Store {} does not exist",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io_path("Failed to open store", path, e)),
        }
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(path));
        Self::open_backend_keyed(path.to_path_buf(), backend, secret)
    }

    /// Open the store in `raw` (local or remote); `root` is its directory,
    /// or the local cache directory of a remote store.
    pub(crate) fn open_backend(root: PathBuf, raw: Arc<dyn Backend>) -> Result<Store> {
        Self::open_backend_keyed(root, raw, None)
    }

    /// [`Store::open_backend`]; `secret` unlocks an encrypted store.
    pub(crate) fn open_backend_keyed(
        root: PathBuf,
        raw: Arc<dyn Backend>,
        secret: Option<&Secret>,
    ) -> Result<Store> {
        let place = raw.display();
        let bytes = match raw.read(CONFIG_KEY) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotAStore,
                    format!("{place} is not a store (no config.json)"),
                ))
            }
            Err(e) => return Err(Error::io(format!("Failed to read {place}/{CONFIG_KEY}"), e)),
        };
        let config = Config::parse(&bytes, &place)?;
        let (backend, codec) = crate::crypto::unlock(raw.clone(), &config, &place, secret)?;
        let view = IndexView::load(backend.as_ref())?;
        debug!(store = %place, chunks = view.chunk_count(), "opened store");
        Ok(Store {
            inner: Arc::new(Inner {
                root,
                place,
                raw,
                backend,
                patches: AtomicBool::new(config.has_patches()),
                config,
                codec,
                index: RwLock::new(Arc::new(view)),
                packs: Mutex::new(HashMap::new()),
                merging: Mutex::new(()),
                chain_hints: Mutex::new(ChainHints::default()),
            }),
        })
    }

    /// The store directory (for a remote store: its local cache directory).
    pub fn path(&self) -> &Path {
        &self.inner.root
    }

    /// Where the store lives: its path or `s3://bucket/prefix`.
    pub fn location(&self) -> &str {
        &self.inner.place
    }

    /// True for a store on object storage.
    pub fn is_remote(&self) -> bool {
        self.inner.raw.is_remote()
    }

    /// The storage below any sealing wrapper (lock objects, copies of
    /// already sealed objects).
    pub fn raw_backend(&self) -> &Arc<dyn Backend> {
        &self.inner.raw
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.inner.config.chunk_size
    }

    /// How this store encodes chunks (plaintext, or sealed with keyed ids).
    pub fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    /// The id of a chunk's plaintext in this store (keyed when encrypted).
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.inner.codec.id_of(data)
    }

    /// The storage backend (for an encrypted store, the sealing wrapper).
    pub fn backend(&self) -> &dyn Backend {
        self.inner.backend.as_ref()
    }

    /// The current index view.
    pub fn index(&self) -> Arc<IndexView> {
        match self.inner.index.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Serializes the index reload and merge that end a backup (see
    /// `Inner::merging`).
    pub(crate) fn merging(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .merging
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_index(&self, view: IndexView) {
        let view = Arc::new(view);
        match self.inner.index.write() {
            Ok(mut g) => *g = view,
            Err(p) => *p.into_inner() = view,
        }
    }

    /// Reload the index from the backend (to see chunks published since open).
    pub fn reload_index(&self) -> Result<()> {
        let view = IndexView::load(self.backend())?;
        self.set_index(view);
        Ok(())
    }

    /// Take the writer lock, remove leftovers of crashed writers (temp files,
    /// superseded index files) and refresh the index.
    pub(crate) fn lock_writer(&self) -> Result<WriterLock> {
        let lock = if self.is_remote() {
            WriterLock::acquire_remote(self.inner.raw.clone())?
        } else {
            WriterLock::acquire(self.path())?
        };
        let n = self
            .backend()
            .clean_temp()
            .ctx(|| "Failed to clean the store's tmp directory".into())?;
        if n > 0 {
            info!(files = n, "removed leftover temporary files");
        }
        let view = IndexView::load(self.backend())?;
        index::cleanup(self.backend(), &view)?;
        self.set_index(view);
        Ok(lock)
    }

    fn pack_object(&self, pack: &PackId) -> Result<Arc<dyn Object>> {
        let mut cache = match self.inner.packs.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(o) = cache.get(pack) {
            return Ok(o.clone());
        }
        let key = pack.pack_key();
        let obj = self
            .backend()
            .open(&key)
            .ctx(|| format!("Failed to open pack {key}"))?;
        if cache.len() >= PACK_CACHE {
            if let Some(k) = cache.keys().next().copied() {
                cache.remove(&k);
            }
        }
        cache.insert(*pack, obj.clone());
        Ok(obj)
    }

    /// The chain hints of the patches written lately.
    pub(crate) fn chain_hints(&self) -> std::sync::MutexGuard<'_, ChainHints> {
        self.inner
            .chain_hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// True when the store may hold patch records.
    pub fn has_patches(&self) -> bool {
        self.inner.patches.load(Ordering::Relaxed)
    }

    /// Allow patch records: upgrade `config.json` to version 4 (once; from
    /// 1, 2 or 3), so a program that does not know patch chains refuses the
    /// store instead of misreading it (or, worse, collecting the bases
    /// patches need). Called under the writer lock before the first patch
    /// record is published.
    pub(crate) fn enable_patches(&self) -> Result<()> {
        if self.has_patches() {
            return Ok(());
        }
        // One upgrade, however many backup readers ask at once.
        let _g = self.merging();
        if self.has_patches() {
            return Ok(());
        }
        let config = self.inner.config.with_patches();
        self.inner
            .raw
            .put(CONFIG_KEY, &config.to_json())
            .ctx(|| format!("Failed to write {}/{CONFIG_KEY}", self.inner.place))?;
        info!(store = %self.inner.place, "store upgraded to format version 4 (patch chains)");
        self.inner.patches.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Read and verify the chunk at `loc` (a patch: with its base applied).
    pub(crate) fn read_loc(&self, id: &ChunkId, loc: &Loc, out: &mut Vec<u8>) -> Result<()> {
        let kind = self.read_loc_raw(id, loc, out)?;
        self.apply_patch(id, kind, out)
    }

    /// Read and verify the record at `loc`: chunk data or a patch payload.
    fn read_loc_raw(&self, id: &ChunkId, loc: &Loc, out: &mut Vec<u8>) -> Result<RecordKind> {
        let obj = self.pack_object(&loc.pack)?;
        let where_ = || format!("pack {} at offset {}", loc.pack, loc.offset);
        // The index is checksummed, not trusted: refuse a length no record
        // can have before allocating a buffer for it.
        if loc.stored_len > MAX_STORED_LEN {
            return Err(Error::corrupt(format!(
                "Index gives chunk {id} in {} an impossible length of {} bytes",
                where_(),
                loc.stored_len
            ))
            .with_chunk(*id));
        }
        RECORD_BUF.with(|buf| {
            let mut rec = buf.borrow_mut();
            rec.resize(RECORD_HEADER_LEN + loc.stored_len as usize, 0);
            obj.read_at(&mut rec, loc.offset).map_err(|e| {
                Error::io(format!("Failed to read chunk {id} from {}", where_()), e).with_chunk(*id)
            })?;
            self.decode_loc_raw(id, loc, &rec, out)
        })
    }

    /// Decode and verify `rec`, the record the index places at `loc` (a
    /// patch: with its base applied).
    pub(crate) fn decode_loc(
        &self,
        id: &ChunkId,
        loc: &Loc,
        rec: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let kind = self.decode_loc_raw(id, loc, rec, out)?;
        self.apply_patch(id, kind, out)
    }

    /// Turn a decoded record into chunk data: a patch payload in `out`
    /// becomes its base chunk with the patch's grains applied. A base that
    /// is itself a patch is resolved the same way, at most
    /// [`MAX_PATCH_CHAIN`] patches deep (a deeper chain is corrupt): the
    /// chain's payloads are read top down, then applied bottom up over the
    /// chunk data (or zeros) they rest on.
    fn apply_patch(&self, id: &ChunkId, kind: RecordKind, out: &mut Vec<u8>) -> Result<()> {
        if kind == RecordKind::Data {
            return Ok(());
        }
        let corrupt = |pid: &ChunkId, e: FormatError| {
            Error::corrupt(format!("Patch {pid} is corrupt"))
                .with_source(e)
                .with_chunk(*id)
        };
        let mut chain = vec![(*id, std::mem::take(out))];
        loop {
            let (pid, payload) = chain.last().expect("the chain starts with the patch");
            let p = PatchRef::parse(payload).map_err(|e| corrupt(pid, e))?;
            if p.base.is_null() {
                out.resize(p.chunk_len as usize, 0);
                break;
            }
            let (pid, base) = (*pid, p.base);
            let mut next = Vec::new();
            let kind = self.read_record(&base, &mut next).map_err(|e| {
                e.context(format!("Failed to read base chunk {base} of patch {pid}"))
                    .with_chunk(*id)
            })?;
            match kind {
                RecordKind::Data => {
                    *out = next;
                    break;
                }
                RecordKind::Patch if chain.len() < MAX_PATCH_CHAIN as usize => {
                    chain.push((base, next))
                }
                RecordKind::Patch => {
                    return Err(Error::corrupt(format!(
                        "Patch {id} chains more than {MAX_PATCH_CHAIN} patches"
                    ))
                    .with_chunk(*id))
                }
            }
        }
        for (pid, payload) in chain.iter().rev() {
            let p = PatchRef::parse(payload).map_err(|e| corrupt(pid, e))?;
            p.apply(out).map_err(|e| {
                out.clear();
                Error::corrupt(format!(
                    "Patch {pid} does not fit its base chunk {}",
                    p.base
                ))
                .with_source(e)
                .with_chunk(*id)
            })?;
        }
        Ok(())
    }

    /// Read patch record `id` (its payload into `buf`) and parse it: chunk
    /// data where the index says patch, or a payload that does not parse,
    /// is corrupt.
    pub(crate) fn read_patch<'b>(
        &self,
        id: &ChunkId,
        buf: &'b mut Vec<u8>,
    ) -> Result<PatchRef<'b>> {
        if self.read_record(id, buf)? != RecordKind::Patch {
            return Err(
                Error::corrupt(format!("Chunk {id} is indexed as a patch but is not one"))
                    .with_chunk(*id),
            );
        }
        PatchRef::parse(buf).map_err(|e| {
            Error::corrupt(format!("Patch {id} is corrupt"))
                .with_source(e)
                .with_chunk(*id)
        })
    }

    /// The verified record of chunk `id`, unresolved: chunk data, or a
    /// patch payload (to merge into a new patch, or to copy as it is).
    pub(crate) fn read_record(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<RecordKind> {
        self.with_loc(id, |loc| self.read_loc_raw(id, loc, out))
    }

    /// Decode and verify `rec`, the record the index places at `loc`.
    fn decode_loc_raw(
        &self,
        id: &ChunkId,
        loc: &Loc,
        rec: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<RecordKind> {
        self.inner
            .codec
            .decode_any(rec, id, loc.stored_len, out)
            .map_err(|e| {
                Error::corrupt(format!(
                    "Chunk {id} in pack {} at offset {} is corrupt",
                    loc.pack, loc.offset
                ))
                .with_source(e)
                .with_chunk(*id)
            })
    }

    /// Read `buf.len()` bytes of pack `pack` from `offset` in one request:
    /// a span of records (restore, copy from a remote store), exact (no
    /// readahead) and not kept in the disk cache.
    pub(crate) fn read_pack_span(&self, pack: &PackId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let key = pack.pack_key();
        self.backend().read_range_once(&key, offset, buf).ctx(|| {
            format!(
                "Failed to read {} bytes of pack {key} at offset {offset}",
                buf.len()
            )
        })
    }

    /// Find a chunk, reloading the index once on a miss.
    pub fn locate(&self, id: &ChunkId) -> Result<Option<Loc>> {
        if let Some(loc) = self.index().lookup(id)? {
            return Ok(Some(loc));
        }
        self.reload_index()?;
        self.index().lookup(id)
    }

    /// Read the verified plaintext of chunk `id` into `out`.
    ///
    /// If the chunk or its pack is missing (a backup or gc published a new
    /// index since this store was opened), reloads the index and retries once.
    pub fn read_chunk(&self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        let kind = self.read_record(id, out)?;
        self.apply_patch(id, kind, out)
    }

    /// Run `f` on the location of chunk `id`; if the chunk or its pack is
    /// missing, reload the index and retry once.
    fn with_loc<T>(&self, id: &ChunkId, mut f: impl FnMut(&Loc) -> Result<T>) -> Result<T> {
        let missing =
            || Error::not_found(format!("Chunk {id} is not in the index")).with_chunk(*id);
        let loc = self.locate(id)?.ok_or_else(missing)?;
        match f(&loc) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                debug!(chunk = %id, "pack gone, reloading index");
                self.reload_index()?;
                let loc = self.index().lookup(id)?.ok_or_else(missing)?;
                f(&loc)
            }
            other => other,
        }
    }

    /// Snapshots (of one image name, or all), oldest first.
    pub fn snapshots(&self, name: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for l in snapshot::list(self.backend(), name, false)? {
            match self.load_info(&l) {
                Ok(i) => out.push(i),
                // Forgotten between listing and opening.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Forgotten snapshots gc has not deleted yet (of one image name, or
    /// all), oldest first: what [`Store::unforget`] can bring back.
    pub fn forgotten_snapshots(&self, name: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for l in snapshot::list(self.backend(), name, true)? {
            if !l.forgotten {
                continue;
            }
            match self.load_info(&l) {
                Ok(i) => out.push(i),
                // Deleted by gc or unforgotten between listing and opening.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub(crate) fn load_info(&self, l: &snapshot::Listed) -> Result<SnapshotInfo> {
        let key = l.key();
        let obj = self
            .backend()
            .open(&key)
            .ctx(|| format!("Failed to open snapshot manifest {key}"))?;
        Ok(read_header(obj.as_ref(), &key)?.info)
    }

    /// Resolve `NAME`, `NAME@ID` or `ID`.
    pub fn resolve(&self, reference: &str) -> Result<SnapshotInfo> {
        let l = snapshot::resolve(self.backend(), reference)?;
        self.load_info(&l)
    }

    /// Open a snapshot for reading; the reader holds the snapshot's shared
    /// lock, which keeps gc from reclaiming it.
    pub fn open_snapshot(&self, reference: &str) -> Result<SnapshotReader> {
        let l = snapshot::resolve(self.backend(), reference)?;
        SnapshotReader::open(self, &l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_open_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let s = Store::init(&p, 4096).unwrap();
        assert_eq!(s.chunk_size(), 4096);
        assert_eq!(
            Store::init(&p, 4096).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(Store::open(&p).unwrap().chunk_size(), 4096);
        let e = Store::open(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert_eq!(
            Store::open(dir.path()).unwrap_err().kind(),
            ErrorKind::NotAStore
        );
        assert_eq!(
            Store::init(dir.path(), 4096).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "non-empty dir"
        );
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let e = Store::init(&file, 4096).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert_eq!(fs::read(&file).unwrap(), b"x");
        fs::write(
            p.join("config.json"),
            br#"{"format":"instant-recovery-store","version":7,"chunk_size":4096}"#,
        )
        .unwrap();
        let e = Store::open(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
    }

    /// Found by the `pack` fuzz target: an index entry claiming a stored
    /// length of gigabytes made the reader allocate it before reading.
    #[test]
    fn absurd_index_length_is_corrupt_without_allocating() {
        use crate::index::idx::{self, IdxEntry};
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(dir.path(), 4096).unwrap();
        let pack = PackId([7; 16]);
        let id = ChunkId::of(b"x");
        let mut rec = Vec::new();
        let stored = crate::chunk::encode_record(&id, b"x", &mut rec);
        let mut bytes = crate::format::pack_header().to_vec();
        bytes.extend_from_slice(&rec);
        s.backend().put(&pack.pack_key(), &bytes).unwrap();
        for (stored_len, ok) in [(stored, true), (u32::MAX - 100, false)] {
            let mut entries = [IdxEntry {
                id,
                offset: 16,
                stored_len,
                raw_len: 1,
                patch: false,
            }];
            s.backend()
                .put(&pack.idx_key(), &idx::encode(&pack, &mut entries))
                .unwrap();
            s.reload_index().unwrap();
            let mut out = Vec::new();
            let r = s.read_chunk(&id, &mut out);
            if ok {
                r.unwrap();
                assert_eq!(out, b"x");
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
                assert_eq!(e.chunk(), Some(&id));
                RECORD_BUF.with(|b| assert!(b.borrow().capacity() < 1 << 20));
            }
        }
    }

    #[test]
    fn missing_chunk_and_snapshot_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::init(dir.path(), 4096).unwrap();
        let mut out = Vec::new();
        let e = s.read_chunk(&ChunkId::of(b"x"), &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.chunk(), Some(&ChunkId::of(b"x")));
        assert_eq!(s.resolve("web").unwrap_err().kind(), ErrorKind::NotFound);
        assert!(s.snapshots(None).unwrap().is_empty());
    }
}
