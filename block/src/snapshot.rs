//! The bottom block layer: a snapshot served read-only through the chunk cache.
//!
//! A read is split at chunk boundaries. A zero chunk (no key) is filled
//! with zeroes without touching the source or the cache; any other chunk
//! comes from the shared [`ChunkCache`], which fetches a missing chunk once
//! however many workers want it. A chunk the source cannot read or verify
//! fails the whole read with an `io::Error`: the layer never returns data
//! it could not verify, and never returns a chunk of the wrong length.
//!
//! A vectored read copies each piece of a cached chunk straight into guest
//! memory (one copy) and writes zeroes for zero chunks.

use std::io;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use crate::cache::{ChunkCache, ChunkData};
use crate::device::{total_len, BlockDevice, ReadDest};
use crate::file::{check_bounds, out_of_range, units_touched};
use crate::source::{chunk_len, ChunkSource};

/// A read-only [`BlockDevice`] over a [`ChunkSource`].
pub struct SnapshotLayer {
    source: Arc<dyn ChunkSource>,
    cache: Arc<ChunkCache>,
    size: u64,
    chunk_size: u32,
}

/// The error for every mutation of a read-only layer.
fn read_only_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the snapshot layer is read-only",
    )
}

impl SnapshotLayer {
    /// Serves `source` through `cache` (which may be shared with other layers).
    ///
    /// The image size must be a multiple of 512 and the chunk size a power
    /// of two; otherwise this returns an `InvalidInput` error.
    pub fn new(source: Arc<dyn ChunkSource>, cache: Arc<ChunkCache>) -> io::Result<SnapshotLayer> {
        let size = source.image_size();
        let chunk_size = source.chunk_size();
        if !size.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("image size {size} is not a multiple of 512"),
            ));
        }
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk size {chunk_size} is not a power of two of at least 512"),
            ));
        }
        Ok(SnapshotLayer {
            source,
            cache,
            size,
            chunk_size,
        })
    }

    /// The chunk size of the snapshot.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// The source this layer reads.
    pub fn source(&self) -> &Arc<dyn ChunkSource> {
        &self.source
    }

    /// The shared chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Chunk `index` in full: `None` for a zero chunk. With `transient`,
    /// a chunk fetched by this call is not kept in the cache (one-pass
    /// readers such as the copier).
    pub fn chunk(&self, index: u64, transient: bool) -> io::Result<Option<ChunkData>> {
        let expected = chunk_len(self.size, self.chunk_size, index);
        if expected == 0 {
            return Err(out_of_range(
                index.saturating_mul(u64::from(self.chunk_size)),
                0,
                self.size,
            ));
        }
        let Some(key) = self.source.chunk_key(index)? else {
            return Ok(None);
        };
        let fetch = || {
            let mut out = Vec::with_capacity(expected);
            self.source.read_chunk(index, &mut out)?;
            Ok(out)
        };
        let data = if transient {
            self.cache.get_or_fetch_transient(&key, fetch)?
        } else {
            self.cache.get_or_fetch(&key, fetch)?
        };
        check_chunk_len(index, data.len(), expected)?;
        Ok(Some(data))
    }
}

/// A chunk of the wrong length is never served.
fn check_chunk_len(index: u64, len: usize, expected: usize) -> io::Result<()> {
    if len != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("chunk {index} is {len} bytes long, expected {expected}"),
        ));
    }
    Ok(())
}

impl SnapshotLayer {
    /// Reads `len` bytes at `offset` into `dest`, chunk by chunk: zeroes
    /// for a zero chunk, a copy out of the cached chunk otherwise.
    fn read_into(&self, mut dest: ReadDest<'_, '_>, offset: u64, len: u64) -> io::Result<()> {
        check_bounds(offset, len, self.size)?;
        let cs = u64::from(self.chunk_size);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = pos / cs;
            let within = (pos % cs) as usize;
            // At most one chunk, so it fits in usize.
            let take = (end - pos).min(cs - within as u64) as usize;
            let mut run = dest.next_run(take)?;
            // A cached chunk is copied out under the cache's lock without
            // taking a reference to it; a miss goes through `chunk`.
            let cached = match self.source.chunk_key(index)? {
                None => Some(run.fill_zeroes()),
                Some(key) => self.cache.with_cached(&key, |data| {
                    check_chunk_len(
                        index,
                        data.len(),
                        chunk_len(self.size, self.chunk_size, index),
                    )?;
                    run.copy_from(&data[within..within + take])
                }),
            };
            match cached {
                Some(done) => done?,
                None => match self.chunk(index, false)? {
                    None => run.fill_zeroes()?,
                    Some(data) => run.copy_from(&data[within..within + take])?,
                },
            }
            pos += take as u64;
        }
        Ok(())
    }
}

impl BlockDevice for SnapshotLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.read_into(ReadDest::bytes(buf), offset, len)
    }

    /// Every chunk of the range is a zero chunk or in the cache.
    fn read_is_cheap(&self, offset: u64, len: u64) -> bool {
        let chunks = units_touched(offset, len, self.size, u64::from(self.chunk_size));
        chunks.is_some_and(|mut chunks| {
            chunks.all(|index| match self.source.chunk_key(index) {
                Ok(None) => true,
                Ok(Some(key)) => self.cache.contains(&key),
                Err(_) => false,
            })
        })
    }

    /// One copy per byte: from the cached chunk straight into guest memory.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.read_into(ReadDest::guest(bufs), offset, total_len(bufs))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only_error())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::device::tests::{check_vectored_read, read_vectored, split_lens};
    use crate::source::{check_read_write, VecSource};

    /// An image with data, zero, duplicate chunks and a short last chunk.
    fn test_image(chunk: usize, chunks: usize, tail: usize) -> Vec<u8> {
        let mut data = vec![0u8; chunk * chunks + tail];
        for (i, b) in data.iter_mut().enumerate() {
            let c = i / chunk;
            *b = match c % 4 {
                1 => 0,                        // zero chunk
                3 => (i % chunk) as u8 ^ 0x3c, // duplicate content
                _ => (i as u64).wrapping_mul(2654435761).to_le_bytes()[2],
            };
        }
        data
    }

    #[test]
    fn reads_match_the_source_image() {
        let image = test_image(8192, 9, 512);
        let src = Arc::new(VecSource::new(image.clone(), 8192));
        let layer = SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(1 << 20))).unwrap();
        assert!(layer.read_only());
        assert_eq!(layer.chunk_count(), 10);
        let mut model = image.clone();
        check_read_write(&layer, &mut model);
        assert_eq!(model, image);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Over data, zero and duplicate chunks and a short last chunk,
        /// with buffers cut anywhere: the vectored read is `read_at`.
        #[test]
        fn vectored_reads_match_read_at(
            offset in 0..4096u64 * 9 + 512,
            len in prop_oneof![1..600usize, 1..4096usize * 9 + 512],
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let image = test_image(4096, 9, 512);
            let src = Arc::new(VecSource::new(image.clone(), 4096));
            let layer = SnapshotLayer::new(src, Arc::new(ChunkCache::new(1 << 20))).unwrap();
            let len = len.min(image.len() - offset as usize);
            let lens = split_lens(len, &cuts);
            check_vectored_read(&layer, offset, &lens);
            let got = read_vectored(&layer, offset, &lens).unwrap();
            prop_assert!(got == image[offset as usize..offset as usize + len]);
        }
    }

    #[test]
    fn vectored_reads_fail_like_read_at() {
        let image = test_image(4096, 4, 0);
        let src = Arc::new(VecSource::new(image.clone(), 4096));
        let layer = SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(1 << 20))).unwrap();
        src.set_failing(2, true);
        let err = read_vectored(&layer, 4096, &[100, 4096, 8092]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        src.set_failing(2, false);
        assert_eq!(
            read_vectored(&layer, 4096, &[100, 4096, 8092]).unwrap(),
            image[4096..4 * 4096]
        );
        // Past the end, or more bytes than the buffers say, is an error.
        assert!(read_vectored(&layer, 4 * 4096 - 512, &[512, 1]).is_err());
        assert!(read_vectored(&layer, u64::MAX - 10, &[512]).is_err());
    }

    #[test]
    fn reads_are_cheap_once_their_chunks_are_cached() {
        let image = test_image(4096, 8, 0);
        let src = Arc::new(VecSource::new(image, 4096));
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let layer = SnapshotLayer::new(src.clone(), cache.clone()).unwrap();
        // Zero chunks (1, 5) cost nothing; data chunks only once cached.
        assert!(layer.read_is_cheap(4096, 4096));
        assert!(!layer.read_is_cheap(0, 4096));
        assert!(!layer.read_is_cheap(4096, 8192), "chunk 2 is not cached");
        let mut buf = vec![0u8; 4096];
        layer.read_at(&mut buf, 2 * 4096).unwrap();
        assert!(layer.read_is_cheap(4096, 8192));
        // Asking fetched nothing and counted no lookups.
        assert_eq!(src.reads(), 1);
        assert_eq!(cache.stats().hits + cache.stats().misses, 1);
        // Out of range or empty: never claimed cheap.
        assert!(!layer.read_is_cheap(8 * 4096, 512));
        assert!(!layer.read_is_cheap(0, 0));
    }

    #[test]
    fn zero_chunks_cost_no_io_and_duplicates_are_read_once() {
        let image = test_image(4096, 8, 0);
        let src = Arc::new(VecSource::new(image.clone(), 4096));
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let layer = SnapshotLayer::new(src.clone(), cache.clone()).unwrap();
        let mut buf = vec![1u8; 4096];
        layer.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, vec![0u8; 4096]);
        layer.read_at(&mut buf, 5 * 4096).unwrap();
        assert_eq!(src.reads(), 0, "zero chunks must not read the source");
        // Chunks 3 and 7 have the same content, hence the same key.
        layer.read_at(&mut buf, 3 * 4096).unwrap();
        layer.read_at(&mut buf, 7 * 4096).unwrap();
        assert_eq!(buf, image[7 * 4096..8 * 4096]);
        assert_eq!(src.reads(), 1);
        let mut all = vec![0u8; image.len()];
        layer.read_at(&mut all, 0).unwrap();
        assert_eq!(all, image);
        // Chunks 0, 2, 4, 6 and the 3/7 pair.
        assert_eq!(src.reads(), 5);
        assert_eq!(cache.stats().misses, 5);
    }

    #[test]
    fn a_corrupt_chunk_is_an_error_not_data() {
        let image = test_image(4096, 4, 0);
        let src = Arc::new(VecSource::new(image.clone(), 4096));
        let layer = SnapshotLayer::new(src.clone(), Arc::new(ChunkCache::new(1 << 20))).unwrap();
        src.set_failing(2, true);
        let mut buf = vec![0u8; 3 * 4096];
        let err = layer.read_at(&mut buf, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Not cached: once the chunk reads again, so does the layer.
        src.set_failing(2, false);
        layer.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, image[4096..4 * 4096]);
    }

    #[test]
    fn a_short_chunk_from_the_source_is_an_error() {
        struct Short;
        impl ChunkSource for Short {
            fn image_size(&self) -> u64 {
                8192
            }
            fn chunk_size(&self) -> u32 {
                4096
            }
            fn chunk_key(&self, index: u64) -> io::Result<Option<[u8; 32]>> {
                Ok(Some([index as u8; 32]))
            }
            fn read_chunk(&self, _index: u64, out: &mut Vec<u8>) -> io::Result<()> {
                out.clear();
                out.resize(100, 1);
                Ok(())
            }
        }
        let layer =
            SnapshotLayer::new(Arc::new(Short), Arc::new(ChunkCache::new(1 << 20))).unwrap();
        let mut buf = vec![0u8; 512];
        assert_eq!(
            layer.read_at(&mut buf, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn out_of_range_and_bad_geometry_are_errors() {
        let src = Arc::new(VecSource::new(vec![0u8; 4096], 4096));
        let layer = SnapshotLayer::new(src, Arc::new(ChunkCache::new(0))).unwrap();
        let mut buf = vec![0u8; 512];
        assert!(layer.read_at(&mut buf, u64::MAX - 10).is_err());
        assert!(layer.read_at(&mut buf, 4096).is_err());
        assert!(layer.chunk(1, false).is_err());
        let odd = Arc::new(VecSource::new(vec![0u8; 1000], 512));
        assert!(SnapshotLayer::new(odd, Arc::new(ChunkCache::new(0))).is_err());
    }
}
