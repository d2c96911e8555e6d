//! The blkio client that drives every vhost-user-blk server the same way:
//! libblkio's `virtio-blk-vhost-user` driver, one queue, all I/O buffers in
//! one memory region (`alloc_mem_region` + `map_mem_region`, a memfd the
//! server maps).
//!
//! A workload keeps `qd` requests in flight: it submits `qd`, then reaps
//! completions with `do_io(min_completions = 1)` and resubmits each slot
//! until the duration is over. Each slot owns its own buffer in the region.
//!
//! This is the crate's only `unsafe`: reading the completions blkio wrote.

use std::fs::{File, OpenOptions};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

/// What a workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Pattern {
    /// Reads at random block-aligned offsets.
    RandRead,
    /// Reads one block after the other, wrapping at the end.
    SeqRead,
    /// Writes random data at random block-aligned offsets.
    RandWrite,
}

/// One I/O case.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub pattern: Pattern,
    /// Bytes per request.
    pub block: usize,
    /// Requests in flight.
    pub qd: usize,
}

/// The four cases of the `io` scenario.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4K rand read QD1",
        pattern: Pattern::RandRead,
        block: 4096,
        qd: 1,
    },
    Workload {
        name: "4K rand read QD32",
        pattern: Pattern::RandRead,
        block: 4096,
        qd: 32,
    },
    Workload {
        name: "1M seq read QD1",
        pattern: Pattern::SeqRead,
        block: 1 << 20,
        qd: 1,
    },
    Workload {
        name: "4K rand write QD32",
        pattern: Pattern::RandWrite,
        block: 4096,
        qd: 32,
    },
];

/// What a workload measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
}

impl Stats {
    /// The numbers of `ops` requests of `block` bytes in `secs`, with
    /// their latencies.
    pub(crate) fn new(ops: u64, block: u64, secs: f64, mut lat_us: Vec<f32>) -> Stats {
        lat_us.sort_by(f32::total_cmp);
        let pct = |p: f64| {
            lat_us
                .get(((lat_us.len() as f64 - 1.0) * p).round() as usize)
                .map_or(f64::NAN, |&v| f64::from(v))
        };
        let bytes = ops * block;
        Stats {
            ops,
            bytes,
            secs,
            iops: ops as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            lat_p50_us: pct(0.50),
            lat_p99_us: pct(0.99),
        }
    }
}

/// A connected client with one queue and one mapped region.
pub struct Client {
    _blkio: Blkio,
    q: Blkioq,
    region: MemoryRegion,
    mem: File,
    capacity: u64,
    filled: bool,
}

/// Region size: enough for 32 slots of 1 MiB.
const REGION: usize = 32 << 20;

impl Client {
    /// Connects to the vhost-user-blk socket at `path` (read-write).
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let err = |what: &str, e: blkio::Error| anyhow!("blkio {what}: {}", e.message());
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("new", e))?;
        let p = path.to_str().context("socket path is not UTF-8")?;
        blkio.set_str("path", p).map_err(|e| err("set path", e))?;
        blkio.connect().map_err(|e| err("connect", e))?;
        blkio
            .set_i32("num-queues", 1)
            .map_err(|e| err("set num-queues", e))?;
        let mut queues = blkio.start().map_err(|e| err("start", e))?.queues;
        let q = queues.pop().context("blkio started without a queue")?;
        let capacity = blkio.get_u64("capacity").map_err(|e| err("capacity", e))?;
        let region = blkio
            .alloc_mem_region(REGION)
            .map_err(|e| err("alloc_mem_region", e))?;
        blkio
            .map_mem_region(&region)
            .map_err(|e| err("map_mem_region", e))?;
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", region.fd))
            .context("open the region's memfd")?;
        Ok(Client {
            _blkio: blkio,
            q,
            region,
            mem,
            capacity,
            filled: false,
        })
    }

    /// Connects, retrying until `timeout` while the socket does not exist
    /// or refuses: for measuring start-up.
    pub fn connect_retry(path: &Path, timeout: Duration) -> anyhow::Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            if path.exists() {
                match Client::connect(path) {
                    Ok(c) => return Ok(c),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                bail!("socket {} did not appear", path.display());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Device size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Reads `len` bytes at `offset` (one request) and returns them.
    pub fn read(&mut self, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        if len > REGION {
            bail!("read of {len} bytes is larger than the region");
        }
        self.q.read(
            offset,
            self.region.addr as *mut u8,
            len,
            0,
            ReqFlags::empty(),
        );
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        if self.reap(&mut done, 1)? != 1 {
            bail!("read timed out");
        }
        let mut out = vec![0u8; len];
        self.mem.read_exact_at(&mut out, 0)?;
        Ok(out)
    }

    /// Reads the whole device sequentially in 1 MiB requests (to warm caches).
    pub fn read_all(&mut self) -> anyhow::Result<()> {
        let mut off = 0;
        while off < self.capacity {
            let len = (self.capacity - off).min(1 << 20) as usize;
            self.read(off, len)?;
            off += len as u64;
        }
        Ok(())
    }

    /// Waits for at least `min` completions; fails on any error status.
    /// Returns `(user_data of each completion)` count written to `done`.
    fn reap(&mut self, done: &mut [MaybeUninit<Completion>], min: usize) -> anyhow::Result<usize> {
        self.reap_within(done, min, Duration::from_secs(60))
    }

    /// [`Client::reap`] waiting at most `timeout`; 0 when nothing
    /// completed in time.
    fn reap_within(
        &mut self,
        done: &mut [MaybeUninit<Completion>],
        min: usize,
        mut timeout: Duration,
    ) -> anyhow::Result<usize> {
        let n = match self.q.do_io(done, min, Some(&mut timeout), None) {
            Err(e) if e.errno() == blkio::Errno::TIME => 0,
            other => other.map_err(|e| anyhow!("blkio do_io: {}", e.message()))?,
        };
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                bail!("request failed with errno {}", -c.ret);
            }
        }
        Ok(n)
    }

    /// Runs `w` over the first `span` bytes of the device for `duration`.
    /// With `one_pass`, a sequential workload also stops after reading the
    /// span once, so a cold run does not turn warm by wrapping around.
    pub fn run(
        &mut self,
        w: &Workload,
        span: u64,
        duration: Duration,
        one_pass: bool,
    ) -> anyhow::Result<Stats> {
        let block = w.block as u64;
        let blocks = self.blocks_for(w, span)?;
        self.fill_for(w)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut next_seq = 0u64;
        let mut offset = |rng: &mut rand::rngs::StdRng| match w.pattern {
            Pattern::SeqRead => {
                let o = next_seq * block;
                next_seq = (next_seq + 1) % blocks;
                o
            }
            _ => rng.gen_range(0..blocks) * block,
        };
        let mut started = vec![Instant::now(); w.qd];
        let mut lat_us: Vec<f32> = Vec::with_capacity(1 << 16);
        let mut done: Vec<MaybeUninit<Completion>> =
            (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
        let start = Instant::now();
        let end = start + duration;
        for (slot, at) in started.iter_mut().enumerate() {
            let off = offset(&mut rng);
            *at = Instant::now();
            self.submit(w, slot, off);
        }
        let mut in_flight = w.qd;
        let mut ops = 0u64;
        let mut submitted = w.qd as u64;
        let limit = if one_pass && w.pattern == Pattern::SeqRead {
            blocks
        } else {
            u64::MAX
        };
        while in_flight > 0 {
            let n = self.reap(&mut done, 1)?;
            let now = Instant::now();
            for c in &done[..n] {
                // SAFETY: `reap` returned n, so do_io initialised the first n.
                let slot = unsafe { c.assume_init_ref() }.user_data;
                ops += 1;
                lat_us.push(now.duration_since(started[slot]).as_secs_f32() * 1e6);
                if now < end && submitted < limit {
                    submitted += 1;
                    started[slot] = now;
                    let off = offset(&mut rng);
                    self.submit(w, slot, off);
                } else {
                    in_flight -= 1;
                }
            }
        }
        Ok(Stats::new(
            ops,
            block,
            start.elapsed().as_secs_f64(),
            lat_us,
        ))
    }

    /// Random-write (or read) workload `w` paced to `bytes_per_sec`: a
    /// request goes out when a slot is free and the pace allows it, so at
    /// most `w.qd` are in flight, and a server that cannot keep the pace
    /// gets them as fast as it completes them. Latency counts from the
    /// submission.
    pub fn run_paced(
        &mut self,
        w: &Workload,
        span: u64,
        duration: Duration,
        bytes_per_sec: f64,
    ) -> anyhow::Result<Stats> {
        self.run_paced_into(w, span, duration, bytes_per_sec, None)
    }

    /// [`Client::run_paced`] that also returns every request's submission
    /// time and latency (µs), to look at the requests of a time window.
    pub fn run_paced_timeline(
        &mut self,
        w: &Workload,
        span: u64,
        duration: Duration,
        bytes_per_sec: f64,
    ) -> anyhow::Result<(Stats, Vec<(Instant, f32)>)> {
        let mut timeline = Vec::with_capacity(1 << 16);
        let stats = self.run_paced_into(w, span, duration, bytes_per_sec, Some(&mut timeline))?;
        Ok((stats, timeline))
    }

    fn run_paced_into(
        &mut self,
        w: &Workload,
        span: u64,
        duration: Duration,
        bytes_per_sec: f64,
        mut timeline: Option<&mut Vec<(Instant, f32)>>,
    ) -> anyhow::Result<Stats> {
        let block = w.block as u64;
        let blocks = self.blocks_for(w, span)?;
        if bytes_per_sec <= 0.0 {
            bail!("workload {} needs a positive pace", w.name);
        }
        self.fill_for(w)?;
        let interval = Duration::from_secs_f64(w.block as f64 / bytes_per_sec);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut free: Vec<usize> = (0..w.qd).collect();
        let mut started = vec![Instant::now(); w.qd];
        let mut lat_us: Vec<f32> = Vec::with_capacity(1 << 16);
        let mut done: Vec<MaybeUninit<Completion>> =
            (0..w.qd).map(|_| MaybeUninit::uninit()).collect();
        let start = Instant::now();
        let end = start + duration;
        let mut due = start;
        let mut ops = 0u64;
        loop {
            let now = Instant::now();
            while now < end && now >= due {
                let Some(slot) = free.pop() else { break };
                started[slot] = now;
                let off = rng.gen_range(0..blocks) * block;
                self.submit(w, slot, off);
                due += interval;
            }
            if free.len() == w.qd {
                if now >= end {
                    break;
                }
                std::thread::sleep(due.saturating_duration_since(now));
                continue;
            }
            let wait = if free.is_empty() || now >= end {
                Duration::from_secs(60)
            } else {
                due.saturating_duration_since(now)
            };
            let n = self.reap_within(&mut done, 1, wait)?;
            let now = Instant::now();
            for c in &done[..n] {
                // SAFETY: `reap_within` returned n, so do_io initialised the first n.
                let slot = unsafe { c.assume_init_ref() }.user_data;
                ops += 1;
                let lat = now.duration_since(started[slot]).as_secs_f32() * 1e6;
                if let Some(t) = timeline.as_deref_mut() {
                    t.push((started[slot], lat));
                }
                lat_us.push(lat);
                free.push(slot);
            }
        }
        Ok(Stats::new(
            ops,
            block,
            start.elapsed().as_secs_f64(),
            lat_us,
        ))
    }

    /// The blocks of `w` in the first `span` bytes of the device; fails
    /// when the workload does not fit.
    fn blocks_for(&self, w: &Workload, span: u64) -> anyhow::Result<u64> {
        let blocks = span.min(self.capacity) / w.block as u64;
        if blocks == 0 || w.qd == 0 || w.qd * w.block > REGION {
            bail!("workload {} does not fit", w.name);
        }
        Ok(blocks)
    }

    /// Before a write workload: random contents in the region, so writes
    /// carry incompressible, non-zero data.
    fn fill_for(&mut self, w: &Workload) -> anyhow::Result<()> {
        if w.pattern == Pattern::RandWrite && !self.filled {
            let mut buf = vec![0u8; REGION];
            rand::rngs::StdRng::seed_from_u64(99).fill_bytes(&mut buf);
            self.mem.write_all_at(&buf, 0)?;
            self.filled = true;
        }
        Ok(())
    }

    fn submit(&mut self, w: &Workload, slot: usize, offset: u64) {
        let buf = self.region.addr + slot * w.block;
        match w.pattern {
            Pattern::RandRead | Pattern::SeqRead => {
                self.q
                    .read(offset, buf as *mut u8, w.block, slot, ReqFlags::empty())
            }
            Pattern::RandWrite => {
                self.q
                    .write(offset, buf as *const u8, w.block, slot, ReqFlags::empty())
            }
        }
    }

    /// FLUSH, waiting for it.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.q.flush(0, ReqFlags::empty());
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        self.reap(&mut done, 1)?;
        Ok(())
    }
}
