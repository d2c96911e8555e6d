//! Sealed objects: indexes and manifests of an encrypted store, readable at
//! any offset.
//!
//! ```text
//! header   32 B   magic "IRSEAL\0\0", version, segment shift s, nonce prefix (16 random bytes)
//! segment  ≤ 2^s B ciphertext ‖ 16 B tag, repeated; at least one (an empty
//!                 object has one empty segment); all but the last are full
//! ```
//! Segment `i` is sealed with nonce = prefix ‖ `i` (u64 LE) and associated
//! data = "IRSEGAD1" ‖ last-segment flag (1 B) ‖ `i` (u64 LE) ‖ object name
//! (the key; a forgotten manifest keeps its live name). So a changed byte,
//! segments reordered, an object truncated at a segment boundary or put
//! under another name all fail authentication, and a `pread` decrypts only
//! the segments it touches. The plaintext length follows from the
//! ciphertext length.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::Cipher;
use crate::backend::Object;
use crate::format::{
    u32_at, AEAD_TAG_LEN, SEALED_AD_MAGIC, SEALED_HEADER_LEN, SEALED_MAGIC, SEALED_VERSION,
};

/// The name sealed objects are bound to: the key without a `.forgotten`
/// suffix (forget and unforget rename manifests).
pub fn bound_name(key: &str) -> &str {
    key.strip_suffix(".forgotten").unwrap_or(key)
}

fn nonce(prefix: &[u8; 16], i: u64) -> [u8; 24] {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(prefix);
    n[16..].copy_from_slice(&i.to_le_bytes());
    n
}

fn ad(name: &str, i: u64, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(17 + name.len());
    a.extend_from_slice(&SEALED_AD_MAGIC);
    a.push(u8::from(last));
    a.extend_from_slice(&i.to_le_bytes());
    a.extend_from_slice(name.as_bytes());
    a
}

fn header(shift: u32, prefix: &[u8; 16]) -> [u8; SEALED_HEADER_LEN] {
    let mut h = [0u8; SEALED_HEADER_LEN];
    h[..8].copy_from_slice(&SEALED_MAGIC);
    h[8..12].copy_from_slice(&SEALED_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&shift.to_le_bytes());
    h[16..].copy_from_slice(prefix);
    h
}

/// Sealed length of `plain` plaintext bytes with segments of `1 << shift`.
pub fn sealed_len(plain: u64, shift: u32) -> u64 {
    let segs = plain.div_ceil(1 << shift).max(1);
    SEALED_HEADER_LEN as u64 + plain + segs * AEAD_TAG_LEN as u64
}

/// Plaintext length of a sealed object of `sealed` bytes, or `None` when no
/// sealed object has that length.
pub fn plain_len(sealed: u64, shift: u32) -> Option<u64> {
    let body = sealed.checked_sub(SEALED_HEADER_LEN as u64)?;
    let stride = (1u64 << shift) + AEAD_TAG_LEN as u64;
    let segs = body.div_ceil(stride).max(1);
    let plain = body.checked_sub(segs * AEAD_TAG_LEN as u64)?;
    (sealed_len(plain, shift) == sealed).then_some(plain)
}

/// Seal `src` (`len` plaintext bytes read with `pread`) into `dst`.
pub(crate) fn seal_into(
    cipher: &Cipher,
    name: &str,
    src: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    len: u64,
    dst: &mut dyn Write,
) -> io::Result<()> {
    let shift = cipher.segment_shift();
    let seg = 1u64 << shift;
    let prefix: [u8; 16] = rand::random();
    dst.write_all(&header(shift, &prefix))?;
    let segs = len.div_ceil(seg).max(1);
    let mut buf = vec![0u8; seg as usize + AEAD_TAG_LEN];
    for i in 0..segs {
        let off = i * seg;
        let n = (len - off).min(seg) as usize;
        src(&mut buf[..n], off)?;
        let tag = cipher.seal(
            &nonce(&prefix, i),
            &ad(name, i, i + 1 == segs),
            &mut buf[..n],
        );
        buf[n..n + AEAD_TAG_LEN].copy_from_slice(&tag);
        dst.write_all(&buf[..n + AEAD_TAG_LEN])?;
    }
    Ok(())
}

/// Seal a whole plaintext held in memory.
pub fn seal_bytes(cipher: &Cipher, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(sealed_len(plain.len() as u64, cipher.segment_shift()) as usize);
    let src = |buf: &mut [u8], off: u64| {
        buf.copy_from_slice(&plain[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    // Writing to a Vec and reading from a slice cannot fail.
    let _ = seal_into(cipher, name, &src, plain.len() as u64, &mut out);
    out
}

/// Seal the file `src` of `len` bytes into `dst`.
pub(crate) fn seal_file(
    cipher: &Cipher,
    name: &str,
    src: &File,
    len: u64,
    dst: &mut dyn Write,
) -> io::Result<()> {
    seal_into(cipher, name, &|b, off| src.read_exact_at(b, off), len, dst)
}

fn auth_error(name: &str, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Authentication failed for {name}: {what} (tampered, damaged or not this store's)"),
    )
}

/// A sealed object seen as its plaintext.
#[derive(Debug)]
pub struct SealedObject {
    inner: Arc<dyn Object>,
    cipher: Arc<Cipher>,
    name: String,
    prefix: [u8; 16],
    shift: u32,
    plain: u64,
    segs: u64,
    /// The last segment decrypted (`pread`s of a bucket or an entry run
    /// often hit the same one).
    last: Mutex<Option<(u64, Vec<u8>)>>,
}

impl SealedObject {
    /// Check the header of sealed object `key` and its length.
    pub fn open(
        inner: Arc<dyn Object>,
        cipher: Arc<Cipher>,
        key: &str,
    ) -> io::Result<SealedObject> {
        let name = bound_name(key).to_string();
        let mut h = [0u8; SEALED_HEADER_LEN];
        let len = inner.len()?;
        if len < SEALED_HEADER_LEN as u64 {
            return Err(auth_error(&name, format!("{len} bytes is too short")));
        }
        inner.read_at(&mut h, 0)?;
        if h[..8] != SEALED_MAGIC {
            return Err(auth_error(&name, "not a sealed object".into()));
        }
        let (version, shift) = (u32_at(&h, 8), u32_at(&h, 12));
        if version != SEALED_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("Sealed object {name} has version {version}, this program reads {SEALED_VERSION}"),
            ));
        }
        if shift != cipher.segment_shift() {
            return Err(auth_error(&name, format!("segment shift {shift}")));
        }
        let plain = plain_len(len, shift)
            .ok_or_else(|| auth_error(&name, format!("impossible length {len}")))?;
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&h[16..]);
        Ok(SealedObject {
            inner,
            cipher,
            name,
            prefix,
            shift,
            plain,
            segs: plain.div_ceil(1 << shift).max(1),
            last: Mutex::new(None),
        })
    }

    fn stride(&self) -> u64 {
        (1u64 << self.shift) + AEAD_TAG_LEN as u64
    }

    /// Decrypt segment `i` whose sealed bytes are `buf`; returns the plaintext length.
    fn open_segment(&self, i: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len() - AEAD_TAG_LEN;
        let (data, tag) = buf.split_at_mut(n);
        if !self.cipher.open(
            &nonce(&self.prefix, i),
            &ad(&self.name, i, i + 1 == self.segs),
            data,
            tag,
        ) {
            return Err(auth_error(&self.name, format!("segment {i}")));
        }
        Ok(n)
    }
}

impl Object for SealedObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.plain)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("Read past the end of {}", self.name),
                )
            })?;
        let seg = 1u64 << self.shift;
        let (first, last) = (offset / seg, (end - 1) / seg);
        // One segment, decrypted by the previous read: no I/O.
        if first == last {
            let cache = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((i, plain)) = cache.as_ref() {
                if *i == first {
                    let at = (offset - first * seg) as usize;
                    buf.copy_from_slice(&plain[at..at + buf.len()]);
                    return Ok(());
                }
            }
        }
        // One read of every sealed segment the range touches.
        let start = SEALED_HEADER_LEN as u64 + first * self.stride();
        let stop = (SEALED_HEADER_LEN as u64 + (last + 1) * self.stride())
            .min(sealed_len(self.plain, self.shift));
        let mut sealed = vec![0u8; (stop - start) as usize];
        self.inner.read_at(&mut sealed, start)?;
        let mut out = 0usize;
        for (k, chunk) in sealed.chunks_mut(self.stride() as usize).enumerate() {
            let i = first + k as u64;
            let n = self.open_segment(i, chunk)?;
            let seg_start = i * seg;
            let from = offset.max(seg_start) - seg_start;
            let to = end.min(seg_start + n as u64) - seg_start;
            let take = (to - from) as usize;
            buf[out..out + take].copy_from_slice(&chunk[from as usize..to as usize]);
            out += take;
            if i == last {
                let mut cache = self.last.lock().unwrap_or_else(|p| p.into_inner());
                *cache = Some((i, chunk[..n].to_vec()));
            }
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.plain)
    }

    fn file(&self) -> Option<&File> {
        self.inner.file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    /// An in-memory object.
    #[derive(Debug)]
    struct Mem(Vec<u8>);
    impl Object for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            if o + buf.len() > self.0.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    fn cipher() -> Arc<Cipher> {
        Arc::new(Cipher::new(MasterKey::random(), 12, true))
    }

    #[test]
    fn lengths_round_trip() {
        for plain in [0u64, 1, 4095, 4096, 4097, 8192, 100_000] {
            let s = sealed_len(plain, 12);
            assert_eq!(plain_len(s, 12), Some(plain), "{plain}");
        }
        assert_eq!(plain_len(31, 12), None);
        assert_eq!(plain_len(32, 12), None, "no segment at all");
        assert_eq!(
            plain_len(32 + 4096 + 16 + 16, 12),
            None,
            "empty last segment"
        );
    }

    #[test]
    fn any_range_reads_back_and_tampering_fails() {
        let c = cipher();
        let plain: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        let sealed = seal_bytes(&c, "index/a.idx", &plain);
        assert_eq!(sealed.len() as u64, sealed_len(plain.len() as u64, 12));
        let o =
            SealedObject::open(Arc::new(Mem(sealed.clone())), c.clone(), "index/a.idx").unwrap();
        assert_eq!(o.len().unwrap(), plain.len() as u64);
        for (off, len) in [
            (0, 1),
            (4095, 2),
            (0, 20_000),
            (12_000, 8000),
            (19_999, 1),
            (5000, 5),
        ] {
            let mut buf = vec![0u8; len];
            o.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, plain[off..off + len], "{off}+{len}");
        }
        let mut buf = [0u8; 2];
        assert_eq!(
            o.read_at(&mut buf, 19_999).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // Another name: fails.
        let other =
            SealedObject::open(Arc::new(Mem(sealed.clone())), c.clone(), "index/b.idx").unwrap();
        let e = other.read_at(&mut [0u8; 1], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains("Authentication failed for index/b.idx"),
            "{e}"
        );
        // A forgotten manifest keeps its name.
        let m = seal_bytes(&c, "snapshots/w/1.snap", &plain);
        let f = SealedObject::open(Arc::new(Mem(m)), c.clone(), "snapshots/w/1.snap.forgotten")
            .unwrap();
        f.read_at(&mut [0u8; 10], 0).unwrap();
        // A changed byte anywhere.
        for at in [40usize, 4200, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            let o = SealedObject::open(Arc::new(Mem(bad)), c.clone(), "index/a.idx").unwrap();
            let mut all = vec![0u8; plain.len()];
            assert!(o.read_at(&mut all, 0).is_err(), "byte {at}");
        }
        // Truncated to a segment boundary: the new last segment was not last.
        let cut = SEALED_HEADER_LEN + 2 * (4096 + 16);
        let o = SealedObject::open(
            Arc::new(Mem(sealed[..cut].to_vec())),
            c.clone(),
            "index/a.idx",
        )
        .unwrap();
        assert!(o.read_at(&mut [0u8; 1], 8191).is_err());
        // Another store's key.
        let o = SealedObject::open(Arc::new(Mem(sealed.clone())), cipher(), "index/a.idx").unwrap();
        assert!(o.read_at(&mut [0u8; 1], 0).is_err());
        // Empty object.
        let e = seal_bytes(&c, "x", b"");
        let o = SealedObject::open(Arc::new(Mem(e)), c, "x").unwrap();
        assert_eq!(o.len().unwrap(), 0);
    }
}
