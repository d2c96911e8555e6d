//! The vhost-user-blk device driven by a real client: libblkio's
//! `virtio-blk-vhost-user` driver ([`crate::blkio_client`]) over a socket
//! in a temp dir.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blkio::{Blkio, ReqFlags};
use block::device::BlockDevice;
use block::mem_device::MemDevice;
use rand::{Rng, RngCore, SeedableRng};
use vhost_backend::device::DeviceConfig;
use vhost_backend::socket::{BlockServer, StopHandle};

use crate::blkio_client::{next_completion, read_on, write_on, Client, Options};

const MIB: usize = 1 << 20;

/// A server thread on a socket in its own temp dir.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<vhost_backend::socket::Result<()>>>,
}

impl Server {
    fn start(dev: Arc<dyn BlockDevice>, cfg: DeviceConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        let server = BlockServer::new(dev, cfg).unwrap();
        let listening = server.bind(&path).unwrap();
        let stop = StopHandle::new().unwrap();
        let thread_stop = stop.clone();
        let thread = thread::spawn(move || server.serve(listening, &thread_stop));
        Server {
            _dir: dir,
            path,
            stop,
            thread: Some(thread),
        }
    }

    fn shutdown(mut self) -> vhost_backend::socket::Result<()> {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn random_image(len: usize, seed: u64) -> Vec<u8> {
    let mut image = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut image);
    image
}

fn config(num_queues: usize) -> DeviceConfig {
    DeviceConfig {
        num_queues,
        serial: "test-disk".into(),
        ..DeviceConfig::default()
    }
}

/// A device whose writes always fail, to see device errors reach the client.
struct FailingWrites(MemDevice);

impl BlockDevice for FailingWrites {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::other("injected write failure"))
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
}

#[test]
fn every_byte_read_equals_the_image() {
    let size = 16 * MIB;
    let image = random_image(size, 1);
    let server = Server::start(Arc::new(MemDevice::from_vec(image.clone())), config(1));
    let mut c = Client::connect(&server.path, 4 * MIB);
    // The config space as a real driver sees it.
    assert_eq!(c.capacity(), size as u64);
    assert_eq!(c.blkio().get_i32("request-alignment").unwrap(), 512);
    assert_eq!(c.blkio().get_i32("optimal-io-alignment").unwrap(), 4096);
    assert_eq!(c.blkio().get_i32("max-segments").unwrap(), 126);
    assert_eq!(c.blkio().get_i32("discard-alignment").unwrap(), 4096);
    assert_eq!(c.blkio().get_u64("max-discard-len").unwrap(), 2 << 30);
    assert_eq!(c.blkio().get_u64("max-write-zeroes-len").unwrap(), 2 << 30);
    assert!(c.blkio().get_bool("flush-needed").unwrap());

    // Start and end of the device.
    assert_eq!(c.read(0, 512).unwrap(), image[..512]);
    assert_eq!(
        c.read((size - 512) as u64, 512).unwrap(),
        image[size - 512..]
    );
    assert_eq!(
        c.read((size - 4096) as u64, 4096).unwrap(),
        image[size - 4096..]
    );

    // The whole image in large requests.
    for chunk in (0..size).step_by(4 * MIB) {
        let got = c.read(chunk as u64, 4 * MIB).unwrap();
        assert!(got == image[chunk..chunk + 4 * MIB], "mismatch at {chunk}");
    }

    // Odd 512-byte-aligned ranges.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for _ in 0..200 {
        let sectors = rng.gen_range(1..=300usize);
        let start = rng.gen_range(0..size / 512 - sectors);
        let (off, len) = (start * 512, sectors * 512);
        let got = c.read(off as u64, len).unwrap();
        assert!(got == image[off..off + len], "mismatch at {off}+{len}");
    }
}

#[test]
fn writes_flush_discard_and_write_zeroes_read_back() {
    let size = 8 * MIB;
    let mut model = random_image(size, 3);
    let dev = Arc::new(MemDevice::from_vec(model.clone()));
    let server = Server::start(dev.clone(), config(1));
    let mut c = Client::connect(&server.path, 2 * MIB);

    let data = random_image(MIB + 1536, 4);
    for off in [0usize, 512, 3 * MIB + 4096 + 512, size - data.len()] {
        c.write(off as u64, &data).unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
        assert_eq!(c.read(off as u64, data.len()).unwrap(), data);
    }

    let flushes = dev.flush_count();
    c.flush().unwrap();
    assert_eq!(
        dev.flush_count(),
        flushes + 1,
        "FLUSH must reach the device"
    );

    c.discard(MIB as u64, 64 * 1024).unwrap();
    model[MIB..MIB + 64 * 1024].fill(0);
    c.write_zeroes(5 * MIB as u64 + 512, 3 * 4096).unwrap();
    model[5 * MIB + 512..5 * MIB + 512 + 3 * 4096].fill(0);

    for off in (0..size).step_by(2 * MIB) {
        let got = c.read(off as u64, 2 * MIB).unwrap();
        assert!(got == model[off..off + 2 * MIB], "mismatch at {off}");
    }
    assert!(
        dev.snapshot() == model,
        "device contents differ from the model"
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let image = random_image(MIB, 5);
    let dev = Arc::new(MemDevice::from_vec(image.clone()));
    let server = Server::start(
        dev.clone(),
        DeviceConfig {
            read_only: true,
            ..config(1)
        },
    );

    // A read-write client sees VIRTIO_BLK_F_RO and cannot start.
    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio
        .set_str("path", server.path.to_str().unwrap())
        .unwrap();
    blkio.connect().unwrap();
    assert!(blkio.start().is_err(), "read-write start on a RO device");
    drop(blkio);

    // A read-only client reads; every write-type request fails.
    let mut c = Client::connect_with(&server.path, Options::new(MIB).read_only());
    assert_eq!(c.read(4096, 8192).unwrap(), image[4096..4096 + 8192]);
    assert!(c.write(0, &[1u8; 4096]).is_err());
    assert!(c.write_zeroes(0, 4096).is_err());
    assert!(c.discard(0, 4096).is_err());
    assert!(dev.snapshot() == image, "a read-only device was modified");
}

#[test]
fn device_errors_reach_the_client_as_errors() {
    let image = random_image(MIB, 6);
    let dev = Arc::new(FailingWrites(MemDevice::from_vec(image.clone())));
    let server = Server::start(dev, config(1));
    let mut c = Client::connect(&server.path, MIB);
    let ret = c.write(0, &[7u8; 4096]).unwrap_err();
    assert_eq!(ret, -libc::EIO);
    // The device keeps serving after the failure.
    assert_eq!(c.read(0, 4096).unwrap(), image[..4096]);
}

#[test]
fn reading_past_the_end_fails_cleanly() {
    let size = MIB;
    let image = random_image(size, 7);
    let server = Server::start(Arc::new(MemDevice::from_vec(image.clone())), config(1));
    let mut c = Client::connect(&server.path, MIB);
    assert_eq!(c.read((size - 512) as u64, 1024).unwrap_err(), -libc::EIO);
    assert_eq!(c.read(size as u64, 512).unwrap_err(), -libc::EIO);
    assert!(c.write((size - 512) as u64, &[1u8; 1024]).is_err());
    // Still serving, and the failed write touched nothing.
    assert_eq!(
        c.read((size - 4096) as u64, 4096).unwrap(),
        image[size - 4096..]
    );
}

#[test]
fn two_queues_work_in_parallel() {
    let size = 16 * MIB;
    let image = random_image(size, 8);
    let dev = Arc::new(MemDevice::from_vec(image.clone()));
    let server = Server::start(dev.clone(), config(2));
    let c = Client::connect_with(&server.path, Options::new(4 * MIB).queues(2));
    assert_eq!(c.blkio().get_i32("max-queues").unwrap(), 2);
    let (_blkio, queues, buf) = c.into_parts();
    assert_eq!(queues.len(), 2);

    thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            let (buf, image) = (&buf, &image);
            s.spawn(move || {
                // Each thread owns half the device and half the region.
                let half = size / 2;
                let base = i * half;
                let region_off = i * 2 * MIB;
                let mut rng = rand::rngs::StdRng::seed_from_u64(10 + i as u64);
                let data = random_image(64 * 1024, 20 + i as u64);
                for round in 0..100 {
                    let off = base + rng.gen_range(0..(half - 256 * 1024) / 512) * 512;
                    let got = read_on(&mut q, buf, region_off, off as u64, 128 * 1024).unwrap();
                    assert!(
                        got == image[off..off + 128 * 1024],
                        "queue {i} round {round}"
                    );
                }
                let off = (base + 4096) as u64;
                write_on(&mut q, buf, region_off, off, &data).unwrap();
                let got = read_on(&mut q, buf, region_off, off, data.len()).unwrap();
                assert_eq!(got, data);
            });
        }
    });
    drop(server);
    let snap = dev.snapshot();
    assert_eq!(snap[4096..4096 + 64 * 1024], random_image(64 * 1024, 20));
    let second = size / 2 + 4096;
    assert_eq!(
        snap[second..second + 64 * 1024],
        random_image(64 * 1024, 21)
    );
}

#[test]
fn a_new_client_can_connect_after_a_disconnect() {
    let image = random_image(2 * MIB, 9);
    let dev = Arc::new(MemDevice::from_vec(image.clone()));
    let server = Server::start(dev.clone(), config(2));

    let mut first = Client::connect_with(&server.path, Options::new(MIB).queues(2));
    assert_eq!(first.read_queue(1, 0, 4096).unwrap(), image[..4096]);
    first.write(8192, &[0x11; 4096]).unwrap();
    drop(first);

    // A different queue count this time: nothing of the first session leaks.
    let mut second = Client::connect(&server.path, MIB);
    assert_eq!(second.read(8192, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(
        second.read(MIB as u64, 4096).unwrap(),
        image[MIB..MIB + 4096]
    );
    drop(second);

    let mut third = Client::connect_with(&server.path, Options::new(MIB).queues(2));
    assert_eq!(third.read_queue(1, 0, 512).unwrap(), image[..512]);
    drop(third);
    // The server notices the last disconnect asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.flush_count() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.flush_count() >= 3, "each disconnect flushes the device");
}

#[test]
fn socket_is_private_and_stop_flushes_and_cleans_up() {
    let dev = Arc::new(MemDevice::new(MIB));
    let started = Instant::now();
    let server = Server::start(dev.clone(), config(1));
    let mode = std::fs::metadata(&server.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A connected client is disconnected by stop.
    let mut c = Client::connect(&server.path, MIB);
    assert!(started.elapsed() < Duration::from_secs(5));
    c.write(0, &[3u8; 512]).unwrap();
    let path = server.path.clone();
    let flushes = dev.flush_count();
    server.shutdown().unwrap();
    assert!(dev.flush_count() > flushes, "stop must flush the device");
    assert!(!path.exists(), "socket left behind after stop");
    assert_eq!(dev.snapshot()[..512], [3u8; 512]);
}

#[test]
fn bind_replaces_a_stale_socket_but_not_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blk.sock");
    // A stale socket: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = BlockServer::new(Arc::new(MemDevice::new(MIB)), config(1)).unwrap();
    let live = server.bind(&path).unwrap();
    // Now the socket is live: a second daemon must not steal it.
    assert!(server.bind(&path).is_err());
    // Nor may bind clobber a regular file.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    assert!(server.bind(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    drop(live);
    assert!(!path.exists());
}

/// A device whose I/O at one offset blocks until the gate opens, and which
/// logs, in order, every write that returned and every flush call.
struct Gated {
    inner: MemDevice,
    gated: u64,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    log: std::sync::Mutex<Vec<Event>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Wrote(u64),
    Flushed,
}

impl Gated {
    fn new(image: Vec<u8>, gated: u64) -> Gated {
        Gated {
            inner: MemDevice::from_vec(image),
            gated,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            log: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn pass(&self, offset: u64) {
        if offset != self.gated {
            return;
        }
        // The timeout keeps a failing test from hanging forever.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut open = self.open.lock().unwrap();
        while !*open && Instant::now() < deadline {
            open = self
                .opened
                .wait_timeout(open, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn log(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.pass(offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pass(offset);
        self.inner.write_at(buf, offset)?;
        self.log.lock().unwrap().push(Event::Wrote(offset));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Event::Flushed);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn a_slow_request_does_not_hold_up_later_ones_on_the_same_queue() {
    let image = random_image(4 * MIB, 11);
    let dev = Arc::new(Gated::new(image.clone(), 0));
    let server = Server::start(dev.clone(), config(1));
    let mut c = Client::connect(&server.path, MIB);
    let (q, buf) = c.queue(0);
    // Request 1 reads the gated offset 0, request 2 reads 64 KiB further.
    q.read(0, buf.ptr(0, 4096), 4096, 1, ReqFlags::empty());
    q.read(65536, buf.ptr(4096, 4096), 4096, 2, ReqFlags::empty());
    assert_eq!(next_completion(q), (2, Ok(())));
    dev.open_gate();
    assert_eq!(next_completion(q), (1, Ok(())));
    let got = buf.contents(0, 8192);
    assert_eq!(got[..4096], image[..4096]);
    assert_eq!(got[4096..], image[65536..65536 + 4096]);
}

#[test]
fn flush_covers_every_write_completed_before_it_under_concurrency() {
    const WRITES: usize = 400;
    let dev = Arc::new(Gated::new(vec![0; 8 * MIB], u64::MAX));
    dev.open_gate();
    let server = Server::start(dev.clone(), config(1));
    let mut c = Client::connect(&server.path, MIB);
    let (q, buf) = c.queue(0);
    buf.fill(0, &random_image(MIB, 12));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    const FLUSH: usize = usize::MAX;
    let (mut submitted, mut outstanding) = (0usize, 0usize);
    let mut completed: Vec<u64> = Vec::new();
    // (writes completed when the flush was submitted, device log length then)
    let mut flush_pending: Option<(usize, usize)> = None;
    let mut flushes = 0;
    while submitted < WRITES || outstanding > 0 {
        while submitted < WRITES && outstanding < 16 {
            let offset = rng.gen_range(0..(8 * MIB / 4096) as u64) * 4096;
            let slot = submitted % 16;
            q.write(
                offset,
                buf.ptr(slot * 4096, 4096),
                4096,
                offset as usize,
                ReqFlags::empty(),
            );
            submitted += 1;
            outstanding += 1;
            // A flush now and then, with writes still in flight.
            if flush_pending.is_none() && submitted % 10 == 0 {
                flush_pending = Some((completed.len(), dev.log().len()));
                q.flush(FLUSH, ReqFlags::empty());
                outstanding += 1;
            }
        }
        let (user_data, outcome) = next_completion(q);
        outcome.unwrap();
        outstanding -= 1;
        if user_data != FLUSH {
            completed.push(user_data as u64);
            continue;
        }
        // Every write the client had seen complete was logged as written
        // before a flush call the device received after the FLUSH arrived.
        let (seen, log_start) = flush_pending.take().unwrap();
        let log = dev.log();
        let flush_at = log_start
            + log[log_start..]
                .iter()
                .position(|e| *e == Event::Flushed)
                .expect("FLUSH completed without a device flush");
        let durable: Vec<u64> = log[..flush_at]
            .iter()
            .filter_map(|e| match e {
                Event::Wrote(o) => Some(*o),
                Event::Flushed => None,
            })
            .collect();
        for offset in &completed[..seen] {
            assert!(durable.contains(offset), "write at {offset} not covered");
        }
        flushes += 1;
    }
    // Each flush stays pending until the client reaps it, so a busy host
    // can merge opportunities; a handful still ran amid writes.
    assert!(flushes >= 3, "only {flushes} flushes");
    assert_eq!(completed.len(), WRITES);
}

#[test]
fn stop_waits_for_requests_in_flight_then_flushes() {
    let dev = Arc::new(Gated::new(vec![0; MIB], 8192));
    let server = Server::start(dev.clone(), config(1));
    let mut c = Client::connect(&server.path, MIB);
    let (q, buf) = c.queue(0);
    buf.fill(0, &[0x5a; 4096]);
    // Two writes: the gated one stays in flight, the other completes.
    q.write(8192, buf.ptr(0, 4096), 4096, 1, ReqFlags::empty());
    q.write(0, buf.ptr(0, 4096), 4096, 2, ReqFlags::empty());
    assert_eq!(next_completion(q), (2, Ok(())));

    let stopper = thread::spawn(move || server.shutdown());
    thread::sleep(Duration::from_millis(300));
    assert!(
        !stopper.is_finished(),
        "the server stopped with a write in flight"
    );
    dev.open_gate();
    stopper.join().unwrap().unwrap();
    // The write finished before the shutdown flush.
    let log = dev.log();
    let wrote = log.iter().position(|e| *e == Event::Wrote(8192)).unwrap();
    assert!(log[wrote..].contains(&Event::Flushed), "{log:?}");
    assert_eq!(dev.inner.snapshot()[8192..8192 + 4096], [0x5a; 4096]);
    drop(c);
}

#[test]
fn qemu_guest_boots_from_the_device_and_reconnects() {
    use crate::guest::{e2fsck, read_guest_file, run_to_completion, BOOT_TIMEOUT};
    use block::mem_device::FileDevice;

    let guest = crate::guest::require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let disk = guest.copy_root(dir.path());
    let dev = Arc::new(FileDevice::open(&disk, false).unwrap());
    let server = Server::start(
        dev,
        DeviceConfig {
            serial: "vhost-test-serial".into(),
            ..config(2)
        },
    );

    let first = run_to_completion(guest.qemu_vhost_user_cmd(&server.path, &[]), BOOT_TIMEOUT);
    first.assert_clean_boot();
    assert!(first.saw_boots().is_empty(), "{first}");
    assert_eq!(first.wrote_boot(), Some("boot-1.txt"), "{first}");
    assert_eq!(first.disk_serial(), Some("vhost-test-serial"), "{first}");

    // A new QEMU process finds the same socket and the first boot's file.
    let second = run_to_completion(guest.qemu_vhost_user_cmd(&server.path, &[]), BOOT_TIMEOUT);
    second.assert_clean_boot();
    assert_eq!(second.saw_boots(), ["boot-1.txt"], "{second}");
    assert_eq!(second.wrote_boot(), Some("boot-2.txt"), "{second}");

    server.shutdown().unwrap();
    e2fsck(&disk).unwrap();
    let record = read_guest_file(&disk, "/boot-2.txt").expect("boot-2.txt on disk");
    assert!(record.contains("seen: boot-1.txt\n"), "{record}");
}
