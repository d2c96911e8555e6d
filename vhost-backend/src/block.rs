//! The block-layer seam.
//!
//! Everything below the virtio request layer (the snapshot reader, the
//! copy-on-write overlay, the migration target) implements [`BlockDevice`].
//! Nothing behind this trait knows anything about virtio: requests arrive
//! as byte offsets and lengths, already validated against [`BlockDevice::size`].

use std::io;

/// A byte-addressed block device shared by all queue workers.
///
/// Callers guarantee `offset + len <= size()`; implementations still return
/// an error rather than panic if that is violated.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes (a multiple of 512).
    fn size(&self) -> u64;

    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Fills `buf` with the device contents starting at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// The guest no longer needs `len` bytes at `offset`; they read back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// `len` bytes at `offset` read back as zeroes from now on.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}
