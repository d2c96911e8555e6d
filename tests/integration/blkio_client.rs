//! A libblkio `virtio-blk-vhost-user` client for the tests.
//!
//! Every I/O buffer lives in one blkio memory region (`alloc_mem_region` +
//! `map_mem_region`, a memfd shared with the server). The client fills and
//! reads that region through `/proc/self/fd/N`, the same memfd, so it
//! needs no raw pointer dereferences.

use std::fs::{File, OpenOptions};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Outcome of one request: Ok or the negative errno blkio reported.
pub type Outcome = Result<(), i32>;

/// A connected client with one queue and one mapped memory region.
pub struct Client {
    blkio: Blkio,
    queue: Blkioq,
    region: MemoryRegion,
    mem: File,
}

impl Client {
    /// Connects to the vhost-user-blk socket at `path` with a buffer region
    /// of `region_len` bytes (the largest request).
    pub fn connect(path: &Path, region_len: usize) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
        blkio.set_str("path", path.to_str().unwrap()).unwrap();
        blkio.connect().expect("connect to the vhost-user socket");
        blkio.set_i32("num-queues", 1).unwrap();
        let queue = blkio.start().expect("start blkio").queues.remove(0);
        let region = blkio.alloc_mem_region(region_len).unwrap();
        blkio.map_mem_region(&region).unwrap();
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", region.fd))
            .unwrap();
        Client {
            blkio,
            queue,
            region,
            mem,
        }
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= self.region.len);
        // Poison the buffer so stale data cannot pass for a read.
        self.mem.write_all_at(&vec![0xa5; len], 0).unwrap();
        self.queue.read(
            offset,
            self.region.addr as *mut u8,
            len,
            0,
            ReqFlags::empty(),
        );
        self.complete()?;
        let mut out = vec![0u8; len];
        self.mem.read_exact_at(&mut out, 0).unwrap();
        Ok(out)
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Outcome {
        assert!(data.len() <= self.region.len);
        self.mem.write_all_at(data, 0).unwrap();
        self.queue.write(
            offset,
            self.region.addr as *const u8,
            data.len(),
            0,
            ReqFlags::empty(),
        );
        self.complete()
    }

    /// Flushes the device.
    pub fn flush(&mut self) -> Outcome {
        self.queue.flush(0, ReqFlags::empty());
        self.complete()
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Outcome {
        self.queue.discard(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Outcome {
        self.queue.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    /// Waits for one completion and returns its outcome.
    fn complete(&mut self) -> Outcome {
        let mut completions = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = Duration::from_secs(60);
        let n = self
            .queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .expect("blkio do_io");
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io returned 1, so it initialised the first completion.
        let c = unsafe { completions[0].assume_init_read() };
        if c.ret == 0 {
            Ok(())
        } else {
            Err(c.ret)
        }
    }
}
