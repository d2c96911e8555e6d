//! Guest I/O counters: [`MeteredDevice`] wraps the device the guest sees.
//!
//! Every request is counted (ops, bytes, errors) with relaxed atomics;
//! the daemon's status report (`guest_*` fields) reads them. So is each
//! request's time through the layers below, into a latency histogram per
//! request type ([`MeteredDevice::latency`], module `latency`): what the
//! stack adds to a guest's request, without the virtqueue's own queueing.
//! The time of the last request is recorded too ([`MeteredDevice::idle_for`]). The
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
use crate::latency::{LatencyRecorder, LatencySnapshot};

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

/// Latency histograms of the guest's requests, by type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestLatency {
    pub read: LatencySnapshot,
    pub write: LatencySnapshot,
    pub flush: LatencySnapshot,
    /// Discard and write-zeroes requests.
    pub discard: LatencySnapshot,
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
    read_latency: LatencyRecorder,
    write_latency: LatencyRecorder,
    flush_latency: LatencyRecorder,
    discard_latency: LatencyRecorder,
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
            read_latency: LatencyRecorder::default(),
            write_latency: LatencyRecorder::default(),
            flush_latency: LatencyRecorder::default(),
            discard_latency: LatencyRecorder::default(),
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

    /// The latency histograms now (failed requests included).
    pub fn latency(&self) -> GuestLatency {
        GuestLatency {
            read: self.read_latency.snapshot(),
            write: self.write_latency.snapshot(),
            flush: self.flush_latency.snapshot(),
            discard: self.discard_latency.snapshot(),
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

    /// Counts a request that started at `start` and ended with `r`.
    fn count<T>(
        &self,
        start: Instant,
        (ops, latency): (&AtomicU64, &LatencyRecorder),
        bytes: Option<(&AtomicU64, u64)>,
        r: io::Result<T>,
    ) -> io::Result<T> {
        let end = Instant::now();
        latency.record(end.saturating_duration_since(start));
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
        let ns = (end.saturating_duration_since(self.epoch).as_nanos() as u64).max(1);
        self.last_io_ns.fetch_max(ns, Ordering::Relaxed);
        r
    }

    fn reads(&self) -> (&AtomicU64, &LatencyRecorder) {
        (&self.read_ops, &self.read_latency)
    }

    fn writes(&self) -> (&AtomicU64, &LatencyRecorder) {
        (&self.write_ops, &self.write_latency)
    }

    fn flushes(&self) -> (&AtomicU64, &LatencyRecorder) {
        (&self.flush_ops, &self.flush_latency)
    }

    fn discards(&self) -> (&AtomicU64, &LatencyRecorder) {
        (&self.discard_ops, &self.discard_latency)
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
        let (start, n) = (Instant::now(), buf.len() as u64);
        let r = self.inner.read_at(buf, offset);
        self.count(start, self.reads(), Some((&self.read_bytes, n)), r)
    }

    /// Passes guest memory down, so the layers below fill it directly.
    fn read_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.read_vectored_at(bufs, offset);
        let bytes = Some((&self.read_bytes, total_len(bufs)));
        self.count(start, self.reads(), bytes, r)
    }

    fn write_vectored_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.write_vectored_at(bufs, offset);
        let bytes = Some((&self.write_bytes, total_len(bufs)));
        self.count(start, self.writes(), bytes, r)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.write_at(buf, offset);
        let bytes = Some((&self.write_bytes, buf.len() as u64));
        self.count(start, self.writes(), bytes, r)
    }

    fn flush(&self) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.flush();
        self.count(start, self.flushes(), None, r)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.discard(offset, len);
        self.count(start, self.discards(), None, r)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let start = Instant::now();
        let r = self.inner.write_zeroes(offset, len);
        self.count(start, self.discards(), None, r)
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
        // Every request is timed, failed ones too, under its own type.
        let l = dev.latency();
        assert_eq!(l.read.count(), after.read_ops);
        assert_eq!(l.write.count(), after.write_ops);
        assert_eq!(l.flush.count(), after.flush_ops);
        assert_eq!(l.discard.count(), after.discard_ops);
        assert!(l.write.sum_ns > 0);
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
