//! [`EncryptedBackend`]: seals indexes and manifests on their way to any
//! backend (local or S3) and opens them on the way back.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::object::{bound_name, plain_len, seal_bytes, seal_file, SealedObject};
use super::Cipher;
use crate::backend::{Backend, Object, ObjectInfo, TempObject};

/// A backend wrapper for encrypted stores. Keys under `index/` and
/// `snapshots/` are sealed objects; everything else (packs, whose records
/// [`crate::chunk::Codec`] seals one by one, config, key slots, holds) passes
/// through unchanged.
#[derive(Debug)]
pub struct EncryptedBackend {
    inner: Arc<dyn Backend>,
    cipher: Arc<Cipher>,
}

/// Whether objects under `key` are sealed objects.
pub fn is_sealed_key(key: &str) -> bool {
    key.starts_with("index/") || key.starts_with("snapshots/")
}

impl EncryptedBackend {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Backend>, cipher: Arc<Cipher>) -> EncryptedBackend {
        EncryptedBackend { inner, cipher }
    }

    /// The backend below (it holds ciphertext).
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }
}

impl Backend for EncryptedBackend {
    fn create_temp(&self) -> io::Result<TempObject> {
        self.inner.create_temp()
    }

    fn publish(&self, mut tmp: TempObject, key: &str) -> io::Result<()> {
        if !is_sealed_key(key) {
            return self.inner.publish(tmp, key);
        }
        tmp.file_mut().flush()?;
        let len = tmp.file().metadata()?.len();
        let mut sealed = self.inner.create_temp()?;
        {
            let mut w = BufWriter::with_capacity(1 << 20, sealed.file_mut());
            seal_file(&self.cipher, bound_name(key), tmp.file(), len, &mut w)?;
            w.flush()?;
        }
        drop(tmp);
        self.inner.publish(sealed, key)
    }

    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>> {
        let obj = self.inner.open(key)?;
        if !is_sealed_key(key) {
            return Ok(obj);
        }
        Ok(Arc::new(SealedObject::open(obj, self.cipher.clone(), key)?))
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        self.inner.delete(key)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        let n = self.inner.size(key)?;
        if !is_sealed_key(key) {
            return Ok(n);
        }
        plain_len(n, self.cipher.segment_shift()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("Sealed object {key} has an impossible length of {n} bytes"),
            )
        })
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.inner.local_path(key)
    }

    fn clean_temp(&self) -> io::Result<usize> {
        self.inner.clean_temp()
    }

    fn stat(&self, key: &str) -> io::Result<ObjectInfo> {
        let mut info = self.inner.stat(key)?;
        if is_sealed_key(key) {
            info.size = self.size(key)?;
        }
        Ok(info)
    }

    // Conditional writes are for lock and lease objects, which are never
    // sealed; refuse them on sealed keys rather than store plaintext there.
    fn create_new(&self, key: &str, data: &[u8]) -> io::Result<ObjectInfo> {
        refuse_sealed(key, "conditional create")?;
        self.inner.create_new(key, data)
    }

    fn replace_if(&self, key: &str, data: &[u8], etag: &str) -> io::Result<ObjectInfo> {
        refuse_sealed(key, "conditional replace")?;
        self.inner.replace_if(key, data, etag)
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }

    fn read_range_once(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if is_sealed_key(key) {
            return self.open(key)?.read_at(buf, offset);
        }
        self.inner.read_range_once(key, offset, buf)
    }

    fn display(&self) -> String {
        self.inner.display()
    }

    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        if !is_sealed_key(key) {
            return self.inner.put(key, data);
        }
        self.inner
            .put(key, &seal_bytes(&self.cipher, bound_name(key), data))
    }
}

fn refuse_sealed(key: &str, what: &str) -> io::Result<()> {
    if is_sealed_key(key) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("No {what} of sealed object {key}"),
        ));
    }
    Ok(())
}
