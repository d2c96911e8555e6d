//! `s3`: instant boot from a store on S3 (issue 16) against the same
//! snapshot in a local store: guest boot time (TCG) and cold 4 KiB random
//! reads, with the S3 server (`moto_server`) on loopback and behind a
//! proxy adding 20 ms to every request (reads at random 4 KiB blocks that
//! hold data: zero blocks cost no fetch); and the migration copier's
//! throughput at +20 ms with 1, 4 and 16 chunks in flight
//! (`--copy-workers`), on a disk of random data.
//!
//! Every daemon starts with a fresh `--cache-dir` (so the on-disk chunk
//! cache is cold) and a fresh state dir; the page cache is dropped before
//! each timed run when allowed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::client::Client;
use crate::peers::Ours;
use crate::report::{bytes_str, mbps, median, ratio_str, secs_str, Report, Table};
use crate::scenario::boot::boot;
use crate::stack::Server;
use crate::tools;
use crate::Ctx;

/// The bucket and the store in it.
const BUCKET: &str = "bench";
const STORE: &str = "s3://bench/store";
/// Cold random reads per run.
const READS: usize = 300;
/// Latency the proxy adds to each request in the slow cases.
const SLOW: Duration = Duration::from_millis(20);
/// Size of the random-data disk the migrations copy.
const MIGRATE_BYTES: usize = 256 << 20;

/// `moto_server` on a free loopback port; killed on drop.
pub(crate) struct Moto {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Moto {
    pub(crate) fn start() -> anyhow::Result<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn moto_server (pip install 'moto[server]')")?;
        let mut m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(port, "GET", "/").is_err() {
            if let Some(st) = m.child.try_wait()? {
                bail!("moto_server exited at start: {st}");
            }
            if Instant::now() > deadline {
                bail!("moto_server did not answer on port {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(m)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP request; the status code.
pub(crate) fn http(port: u16, method: &str, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let code = std::str::from_utf8(&head[9..12])?.parse()?;
    Ok(code)
}

/// Points the AWS variables of the processes spawned from now on at
/// the S3 server on `port`.
pub(crate) fn aws_env(port: u16) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "bench");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "bench");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
}

/// A TCP relay in front of the S3 server that holds every chunk of bytes
/// a client sends (one per request: the requests are GETs) for `delay`
/// before passing it on. Connections stay open (keep-alive works).
struct Latency {
    port: u16,
    delay_us: Arc<AtomicU64>,
}

impl Latency {
    fn start(upstream: u16) -> anyhow::Result<Latency> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let delay_us = Arc::new(AtomicU64::new(0));
        let d = delay_us.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let d = d.clone();
                let (Ok(c2), Ok(u2)) = (conn.try_clone(), up.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || relay(conn, up, Some(d)));
                std::thread::spawn(move || relay(u2, c2, None));
            }
        });
        Ok(Latency { port, delay_us })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until EOF, sleeping `delay` before each chunk.
fn relay(mut from: TcpStream, mut to: TcpStream, delay: Option<Arc<AtomicU64>>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(d) = &delay {
            std::thread::sleep(Duration::from_micros(d.load(Ordering::Relaxed)));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Where a case's daemon reads its chunks from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Local,
    S3(Duration),
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Local => "local store".into(),
            Case::S3(d) if d.is_zero() => "S3 (moto) on loopback".into(),
            Case::S3(d) => format!("S3 (moto), +{} ms per request", d.as_millis()),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct Results {
    boots: Vec<f64>,
    read_p50_us: Vec<f64>,
    read_p99_us: Vec<f64>,
    read_mean_us: Vec<f64>,
}

/// Sets what a daemon spawned next sees: the endpoint (through the proxy)
/// and a fresh cache dir.
fn daemon_env(proxy: &Latency, case: Case, cache: &Path) {
    if let Case::S3(d) = case {
        proxy.set(d);
    }
    std::env::set_var("AWS_ENDPOINT_URL", proxy.endpoint());
    std::env::set_var("RECOVERY_CACHE_DIR", cache);
}

fn start(
    ctx: &Ctx,
    local: &Path,
    snapshot: &str,
    case: Case,
    sub: &Path,
    proxy: &Latency,
    extra: &[String],
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(sub)?;
    daemon_env(proxy, case, &sub.join("cache"));
    let store = match case {
        Case::Local => local.to_path_buf(),
        Case::S3(_) => STORE.into(),
    };
    let mut server = Server::ours(&ctx.cli, &store, snapshot, sub, 256 << 20, extra)?;
    server.wait_ready(Duration::from_secs(60))?;
    Ok(server)
}

/// `READS` cold 4 KiB reads at random offsets of `blocks`, one at a
/// time: p50, p99 and mean latency in µs.
fn random_reads(socket: &Path, blocks: &[u64], seed: u64) -> anyhow::Result<(f64, f64, f64)> {
    let mut client = Client::connect_retry(socket, Duration::from_secs(30))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lat = Vec::with_capacity(READS);
    for _ in 0..READS {
        let at = blocks[rng.gen_range(0..blocks.len())];
        let t = Instant::now();
        client.read(at, 4096)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    Ok((p(0.5), p(0.99), mean))
}

/// Seconds from spawning a daemon with `--target` and `--copy-workers
/// workers` to its status reporting `complete`, and the requests its
/// store sent.
fn migration(
    ctx: &Ctx,
    local: &Path,
    sub: &Path,
    proxy: &Latency,
    workers: usize,
) -> anyhow::Result<(f64, u64)> {
    let target = sub.join("target.raw");
    let extra = [
        "--target".to_string(),
        target.display().to_string(),
        "--copy-workers".to_string(),
        workers.to_string(),
    ];
    let t = Instant::now();
    let server = start(ctx, local, "data", Case::S3(SLOW), sub, proxy, &extra)?;
    let control = sub.join("state/control.sock");
    let deadline = t + Duration::from_secs(1800);
    let requests = loop {
        if let Ok(s) = crate::scenario::migrate::status(&ctx.cli, &control) {
            match s["state"].as_str() {
                Some("complete") => break s["remote_store"]["requests"].as_u64().unwrap_or(0),
                Some("failed") => bail!("migration failed: {s}"),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("migration did not complete:\n{}", server.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = t.elapsed().as_secs_f64();
    server.stop()?;
    Ok((secs, requests))
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("moto_server")?;
    tools::require("qemu-system-x86_64")?;
    let cache = std::env::var_os("GUEST_CACHE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| ctx.root.join(".guest-cache"));
    eprintln!("s3: building the guest (cached)");
    tools::run(Command::new(ctx.root.join("scripts/build-guest.sh")).arg(&cache))
        .context("scripts/build-guest.sh (run scripts/install-deps.sh first)")?;
    let root_img = cache.join("root.img");
    let dir = ctx.scratch("s3")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    ours.backup("root", &root_img)?;
    // The 4 KiB blocks of the root disk that hold data.
    let root = std::fs::read(&root_img)?;
    let data_blocks: Vec<u64> = (0..root.len() / 4096)
        .filter(|b| root[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0))
        .map(|b| (b * 4096) as u64)
        .collect();
    drop(root);
    let data_img = dir.join("data.img");
    let mut data = vec![0u8; MIGRATE_BYTES];
    rand::rngs::StdRng::seed_from_u64(16).fill(&mut data[..]);
    std::fs::write(&data_img, &data)?;
    drop(data);
    ours.backup("data", &data_img)?;
    std::fs::remove_file(&data_img)?;

    let moto = Moto::start()?;
    if http(moto.port, "PUT", &format!("/{BUCKET}"))? != 200 {
        bail!("cannot create bucket {BUCKET}");
    }
    aws_env(moto.port);
    std::env::set_var("RECOVERY_CACHE_DIR", dir.join("setup-cache"));
    let local = ours.store.clone();
    tools::run(Command::new(&ctx.cli).args(["init", STORE]))?;
    tools::run(
        Command::new(&ctx.cli)
            .args(["copy", "--from"])
            .arg(&local)
            .args(["--to", STORE]),
    )?;
    let proxy = Latency::start(moto.port)?;

    let cases = [Case::Local, Case::S3(Duration::ZERO), Case::S3(SLOW)];
    let mut results = vec![Results::default(); cases.len()];
    let timeout = Duration::from_secs(600);
    for rep in 0..ctx.reps {
        // Rotate the order, so a drift in load hits every case.
        for k in 0..cases.len() {
            let i = (k + rep) % cases.len();
            let case = cases[i];
            let sub = dir.join(format!("{rep}-{i}-boot"));
            let server = start(ctx, &local, "root", case, &sub, &proxy, &[])?;
            ctx.cold();
            let b = boot(&ctx.root, &server.socket, timeout)?;
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;

            let sub = dir.join(format!("{rep}-{i}-reads"));
            let server = start(ctx, &local, "root", case, &sub, &proxy, &[])?;
            ctx.cold();
            let (p50, p99, mean) = random_reads(&server.socket, &data_blocks, rep as u64)?;
            server.stop()?;
            crate::remove_dir_if_exists(&sub)?;
            eprintln!(
                "s3: rep {rep} {}: GUEST-DONE {:.2} s; 4 KiB random reads p50 {p50:.0} µs, p99 {p99:.0} µs",
                case.name(),
                b.done
            );
            let r = &mut results[i];
            r.boots.push(b.done);
            r.read_p50_us.push(p50);
            r.read_p99_us.push(p99);
            r.read_mean_us.push(mean);
        }
    }

    let mut migrations = Vec::new();
    for workers in [1, 4, 16] {
        let sub = dir.join(format!("migrate-{workers}"));
        let (secs, requests) = migration(ctx, &local, &sub, &proxy, workers)?;
        crate::remove_dir_if_exists(&sub)?;
        eprintln!(
            "s3: migration at +20 ms with {workers} workers: {secs:.1} s, {requests} requests"
        );
        migrations.push((workers, secs, requests));
    }
    drop(moto);
    crate::remove_dir_if_exists(&dir)?;

    let mut report = ctx.report("s3");
    let mut t = Table::new(
        &format!(
            "Instant boot from S3 against a local store: guest boot (TCG, 1 vCPU) and {READS} cold \
             4 KiB random reads at QD1 (blocks holding data), median of {} runs",
            ctx.reps
        ),
        &[
            "store",
            "boot to GUEST-DONE",
            "boot ÷ local",
            "read p50",
            "read p99",
            "read mean",
        ],
    );
    let local_boot = median(&results[0].boots);
    for (case, r) in cases.iter().zip(&results) {
        let boot = median(&r.boots);
        t.row(vec![
            case.name(),
            secs_str(boot),
            ratio_str(boot / local_boot),
            format!("{:.0} µs", median(&r.read_p50_us)),
            format!("{:.0} µs", median(&r.read_p99_us)),
            format!("{:.0} µs", median(&r.read_mean_us)),
        ]);
    }
    t.note(
        "Each run starts a fresh daemon (fresh --cache-dir, so the on-disk chunk cache is cold; \
         256 MiB memory cache). The +20 ms proxy holds each request 20 ms before passing it on.",
    );
    report.tables.push(t);

    let mut m = Table::new(
        &format!(
            "Migration of a {} disk of random data from S3 at +20 ms per request, by chunks in flight",
            bytes_str(MIGRATE_BYTES as u64)
        ),
        &[
            "--copy-workers",
            "spawn to complete",
            "MB/s",
            "÷ 16 workers",
            "S3 requests",
        ],
    );
    let sixteen = migrations.last().map_or(f64::NAN, |m| m.1);
    for (w, secs, requests) in &migrations {
        m.row(vec![
            w.to_string(),
            secs_str(*secs),
            format!("{:.1}", mbps(MIGRATE_BYTES as u64, *secs)),
            ratio_str(secs / sixteen),
            requests.to_string(),
        ]);
    }
    m.note(
        "moto reads the whole object for every ranged GET, so each request costs in proportion \
         to the pack's size: fewer, larger requests win here more than they would on S3.",
    );
    report.tables.push(m);
    let slow = median(&results[2].boots) / local_boot;
    report.target_max("guest boot from S3 at +20 ms vs local store", slow, 1.5);
    report.set("cases", cases.map(Case::name));
    report.set("results", &results);
    report.set("migrations", &migrations);
    Ok(report)
}
