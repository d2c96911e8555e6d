//! A libblkio `virtio-blk-vhost-user` client for the tests.
//!
//! Every I/O buffer lives in one blkio memory region (`alloc_mem_region` +
//! `map_mem_region`, a memfd shared with the server): the client's
//! [`Buffer`]. The client fills and reads that region through
//! `/proc/self/fd/N`, the same memfd, so it needs no raw pointer
//! dereferences.
//!
//! [`Client`]'s methods run one request at a time on queue 0 and wait for
//! it. Tests that need more (several queues from several threads, many
//! requests in flight, out-of-order completions) take the queues and the
//! buffer apart with [`Client::queue`] or [`Client::into_parts`] and use
//! [`read_on`], [`write_on`] and [`next_completion`].

use std::fs::{File, OpenOptions};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Outcome of one request: Ok or the negative errno blkio reported.
pub type Outcome = Result<(), i32>;

/// How long one request may take before the test fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`Client::connect_with`] asks for.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Virtqueues to start.
    pub queues: usize,
    /// Open the device read-only (a read-write open of a read-only device
    /// fails to start).
    pub read_only: bool,
    /// Bytes of the shared buffer region (the largest request).
    pub region_len: usize,
}

impl Options {
    /// One read-write queue and a region of `region_len` bytes.
    pub fn new(region_len: usize) -> Options {
        Options {
            queues: 1,
            read_only: false,
            region_len,
        }
    }

    /// With `n` queues.
    pub fn queues(self, n: usize) -> Options {
        Options { queues: n, ..self }
    }

    /// Read-only.
    pub fn read_only(self) -> Options {
        Options {
            read_only: true,
            ..self
        }
    }
}

/// The memory region shared with the server, which every request's
/// buffer is a slice of.
pub struct Buffer {
    region: MemoryRegion,
    mem: File,
}

impl Buffer {
    /// Address of `len` bytes at `at` in the region, for a request.
    pub fn ptr(&self, at: usize, len: usize) -> *mut u8 {
        assert!(
            at + len <= self.region.len,
            "{len} bytes at {at} do not fit the {}-byte buffer region",
            self.region.len
        );
        (self.region.addr + at) as *mut u8
    }

    /// Copies `data` into the region at `at`.
    pub fn fill(&self, at: usize, data: &[u8]) {
        self.ptr(at, data.len());
        self.mem.write_all_at(data, at as u64).unwrap();
    }

    /// The `len` bytes of the region at `at`.
    pub fn contents(&self, at: usize, len: usize) -> Vec<u8> {
        self.ptr(at, len);
        let mut out = vec![0u8; len];
        self.mem.read_exact_at(&mut out, at as u64).unwrap();
        out
    }
}

/// Reads `len` bytes at `offset` on `q` into the buffer region at `at`,
/// waits, and returns them.
pub fn read_on(
    q: &mut Blkioq,
    buf: &Buffer,
    at: usize,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, i32> {
    // Poison the buffer so stale data cannot pass for a read.
    buf.fill(at, &vec![0xa5; len]);
    q.read(offset, buf.ptr(at, len), len, 0, ReqFlags::empty());
    next_completion(q).1?;
    Ok(buf.contents(at, len))
}

/// Writes `data` at `offset` on `q` through the buffer region at `at`, and
/// waits.
pub fn write_on(q: &mut Blkioq, buf: &Buffer, at: usize, offset: u64, data: &[u8]) -> Outcome {
    buf.fill(at, data);
    q.write(
        offset,
        buf.ptr(at, data.len()),
        data.len(),
        0,
        ReqFlags::empty(),
    );
    next_completion(q).1
}

/// Waits for the next completion on `q`: (user_data, outcome).
pub fn next_completion(q: &mut Blkioq) -> (usize, Outcome) {
    let mut completions = [const { MaybeUninit::<Completion>::uninit() }; 1];
    let mut timeout = REQUEST_TIMEOUT;
    let n = q
        .do_io(&mut completions, 1, Some(&mut timeout), None)
        .expect("blkio do_io");
    assert_eq!(n, 1, "request timed out after {REQUEST_TIMEOUT:?}");
    // SAFETY: do_io returned 1, so it initialised the first completion.
    let c = unsafe { completions[0].assume_init_read() };
    (c.user_data, if c.ret == 0 { Ok(()) } else { Err(c.ret) })
}

/// A connected client with its queues and one mapped memory region.
pub struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    buf: Buffer,
}

impl Client {
    /// Connects to the vhost-user-blk socket at `path` with one queue and
    /// a buffer region of `region_len` bytes (the largest request).
    pub fn connect(path: &Path, region_len: usize) -> Client {
        Self::connect_with(path, Options::new(region_len))
    }

    /// Connects with `opts`; panics if the device refuses.
    pub fn connect_with(path: &Path, opts: Options) -> Client {
        Self::try_connect(path, opts)
            .unwrap_or_else(|e| panic!("connect to the vhost-user socket {}: {e}", path.display()))
    }

    /// Connects with `opts`, or returns the error of the step that failed
    /// (connecting, negotiating, starting the queues, mapping memory).
    fn try_connect(path: &Path, opts: Options) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path.to_str().expect("UTF-8 socket path"))?;
        blkio.set_bool("read-only", opts.read_only)?;
        blkio.connect()?;
        let queues = i32::try_from(opts.queues).expect("queue count fits i32");
        blkio.set_i32("num-queues", queues)?;
        let queues = blkio.start()?.queues;
        let region = blkio.alloc_mem_region(opts.region_len)?;
        blkio.map_mem_region(&region)?;
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", region.fd))
            .expect("open the buffer region's memfd");
        Ok(Client {
            blkio,
            queues,
            buf: Buffer { region, mem },
        })
    }

    /// The libblkio instance, to read the properties the device reported.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// Queue `i` and the buffer region, to submit requests by hand.
    pub fn queue(&mut self, i: usize) -> (&mut Blkioq, &Buffer) {
        (&mut self.queues[i], &self.buf)
    }

    /// The libblkio instance (keep it alive while the queues are used),
    /// the queues and the buffer region.
    pub fn into_parts(self) -> (Blkio, Vec<Blkioq>, Buffer) {
        (self.blkio, self.queues, self.buf)
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.read_queue(0, offset, len)
    }

    /// Reads `len` bytes at `offset` on queue `q`.
    pub fn read_queue(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        read_on(&mut self.queues[q], &self.buf, 0, offset, len)
    }

    /// Reads the whole device, `step` bytes per request; panics on an
    /// error, naming the offset.
    pub fn read_all(&mut self, step: usize) -> Vec<u8> {
        let size = self.capacity();
        let mut out = Vec::with_capacity(size as usize);
        let mut offset = 0;
        while offset < size {
            let len = step.min((size - offset) as usize);
            let data = self
                .read(offset, len)
                .unwrap_or_else(|e| panic!("read of {len} bytes at offset {offset} failed: {e}"));
            out.extend_from_slice(&data);
            offset += len as u64;
        }
        out
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Outcome {
        self.write_queue(0, offset, data)
    }

    /// Writes `data` at `offset` on queue `q`.
    pub fn write_queue(&mut self, q: usize, offset: u64, data: &[u8]) -> Outcome {
        write_on(&mut self.queues[q], &self.buf, 0, offset, data)
    }

    /// Flushes the device.
    pub fn flush(&mut self) -> Outcome {
        self.queues[0].flush(0, ReqFlags::empty());
        next_completion(&mut self.queues[0]).1
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Outcome {
        self.queues[0].discard(offset, len, 0, ReqFlags::empty());
        next_completion(&mut self.queues[0]).1
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Outcome {
        self.queues[0].write_zeroes(offset, len, 0, ReqFlags::empty());
        next_completion(&mut self.queues[0]).1
    }
}
