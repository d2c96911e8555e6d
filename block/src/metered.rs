//! Guest I/O counters: [`MeteredDevice`] wraps the device the guest sees.
//!
//! Every request is counted (ops, bytes, errors) with relaxed atomics;
//! the daemon's status report (`guest_*` fields) reads them. The time of
//! the last request is recorded too ([`MeteredDevice::idle_for`]). The
//! copier does not read any of this: it keeps its own guest-activity
//! clock inside [`MigratingDevice`](crate::migrate::MigratingDevice),
//! which sees every guest request and yields to it.
//!
//! Vectored requests (guest memory) are passed down as they are, so the
//! layers below fill or drain guest memory themselves.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::device::{total_len, BlockDevice};

/// A snapshot of the guest counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestCounters {
    /// Read requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush requests.
    pub flush_ops: u64,
    /// Discard and write-zeroes requests.
    pub discard_ops: u64,
    /// Requests that failed.
    pub io_errors: u64,
}

/// A [`BlockDevice`] that counts the requests passing through it.
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    io_errors: AtomicU64,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last request's end, 0 = none yet.
    last_io_ns: AtomicU64,
}

impl MeteredDevice {
    /// Counts the requests to `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> MeteredDevice {
        MeteredDevice {
            inner,
            read_ops: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_ops: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            flush_ops: AtomicU64::new(0),
            discard_ops: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            epoch: Instant::now(),
            last_io_ns: AtomicU64::new(0),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// The counters now.
    pub fn counters(&self) -> GuestCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GuestCounters {
            read_ops: get(&self.read_ops),
            read_bytes: get(&self.read_bytes),
            write_ops: get(&self.write_ops),
            write_bytes: get(&self.write_bytes),
            flush_ops: get(&self.flush_ops),
            discard_ops: get(&self.discard_ops),
            io_errors: get(&self.io_errors),
        }
    }

    /// How long since the last request ended, `None` before the first.
    pub fn idle_for(&self) -> Option<Duration> {
        let last = self.last_io_ns.load(Ordering::Relaxed);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(last))
        })
    }

    fn count<T>(
        &self,
        ops: &AtomicU64,
        bytes: Option<(&AtomicU64, u64)>,
        r: io::Result<T>,
    ) -> io::Result<T> {
        ops.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(_) => {
                if let Some((counter, n)) = bytes {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.io_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ns = (self.epoch.elapsed().as_nanos() as u64).max(1);
        self.last_io_ns.fetch_max(ns, Ordering::Relaxed);
        r
    }
}

impl BlockDevice for MeteredDevice {
    fn read_is_cheap(&self, offset: u64, len: u64) -> bool {
        self.inner.read_is_cheap(offset, len)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        let r = self.inner.read_at(buf, offset);
        self.count(&self.read_ops, Some((&self.read_bytes, n)), r)
    }

    /// Passes guest memory down, so the layers below fill it directly.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let r = self.inner.read_vectored_at(bufs, offset);
        self.count(&self.read_ops, Some((&self.read_bytes, total_len(bufs))), r)
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let r = self.inner.write_vectored_at(bufs, offset);
        self.count(
            &self.write_ops,
            Some((&self.write_bytes, total_len(bufs))),
            r,
        )
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.inner.write_at(buf, offset);
        self.count(
            &self.write_ops,
            Some((&self.write_bytes, buf.len() as u64)),
            r,
        )
    }

    fn flush(&self) -> io::Result<()> {
        let r = self.inner.flush();
        self.count(&self.flush_ops, None, r)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.discard(offset, len);
        self.count(&self.discard_ops, None, r)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.inner.write_zeroes(offset, len);
        self.count(&self.discard_ops, None, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::tests::{check_vectored_read, read_vectored, split_lens};
    use crate::mem_device::MemDevice;
    use crate::source::check_read_write;

    #[test]
    fn counts_ops_bytes_and_errors_and_passes_data_through() {
        let mut model: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mem = Arc::new(MemDevice::from_vec(model.clone()));
        let dev = MeteredDevice::new(mem);
        assert_eq!(dev.idle_for(), None);
        check_read_write(&dev, &mut model);
        let c = dev.counters();
        assert!(c.read_ops > 10 && c.write_ops > 5 && c.flush_ops >= 1 && c.discard_ops > 0);
        // The shared check makes one read past the end, which fails.
        assert_eq!(c.io_errors, 1);
        let before = dev.counters();
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 4096).unwrap();
        dev.write_at(&buf[..512], 0).unwrap();
        let after = dev.counters();
        assert_eq!(after.read_ops - before.read_ops, 1);
        assert_eq!(after.read_bytes - before.read_bytes, 4096);
        assert_eq!(after.write_bytes - before.write_bytes, 512);
        assert!(dev.idle_for().unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn vectored_requests_pass_through_and_are_counted() {
        let image: Vec<u8> = (0..64 * 1024).map(|i| (i % 249) as u8).collect();
        let dev = MeteredDevice::new(Arc::new(MemDevice::from_vec(image.clone())));
        let lens = split_lens(10_000, &[1, 4096, 4097, 9000]);
        assert_eq!(read_vectored(&dev, 777, &lens).unwrap(), image[777..10_777]);
        check_vectored_read(&dev, 3, &[1, 0, 511]);
        let c = dev.counters();
        assert_eq!((c.read_ops, c.read_bytes), (3, 10_000 + 2 * 512));
        assert!(read_vectored(&dev, 64 * 1024 - 100, &[50, 51]).is_err());
        assert_eq!(dev.counters().io_errors, 1);
    }
}
