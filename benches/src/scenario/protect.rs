//! `protect`: continuous protection (`instant-boot --protect
//! --protect-every 5s`) under a sustained 4 KiB random-write load at QD8,
//! paced to 20 MB/s and as fast as the daemon takes it, against the same
//! daemon without protection.
//!
//! Per case: a fresh state dir on the same store (a backup of the
//! realistic ext4 image), the blkio client writing over the whole disk for
//! the case's duration, and `status --json` sampled every 250 ms for
//! `protection.rpo_seconds` (from the first point on). Reported: write
//! IOPS and p50/p99 latency, RPO maximum and p99, points, the bytes points
//! read and added, and the store's growth against the bytes the guest
//! wrote and against one full manifest per point.
//!
//! Duration: `--duration` seconds per case, at least 60 (`--quick`: 20);
//! the 10 minutes is `--duration 600`.
//!
//! A/B on a shared machine: `--rounds N` runs the cases N times,
//! interleaved (case 1, 2, ..., then again), and reports per case the
//! round with the median write p99; `SIDEBYSIDE_PROTECT_CASES=2,3` runs only
//! those cases (0-based, in the table's order; the targets that need a
//! case left out are not reported).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use control::human::format_micros as us;
use control::latency::Latency;

use crate::client::{Client, Pattern, Stats, Workload};
use crate::image;
use crate::peers::Ours;
use crate::report::{bytes_str, ratio_str, Report, Table};
use crate::scenario::migrate::status;
use crate::stack::Server;
use crate::tools;
use crate::Ctx;

/// The point interval under test.
const EVERY: &str = "5s";
const EVERY_SECS: f64 = 5.0;
/// The paced load, bytes per second.
pub(crate) const PACED: f64 = 20e6;
/// Bytes per entry of a full manifest (`store::snapshot::manifest::ENTRY_LEN`).
const ENTRY_BYTES: u64 = 32;

/// The guest's load (also `live-backup`'s).
pub(crate) const WRITE: Workload = Workload {
    name: "4K rand write QD8",
    pattern: Pattern::RandWrite,
    block: 4096,
    qd: 8,
};

/// Whether this `recovery-cli` has `instant-boot --protect`.
pub fn available(cli: &Path) -> bool {
    Command::new(cli)
        .args(["instant-boot", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--protect"))
}

/// One case's settings.
#[derive(Debug, Clone, Copy, Serialize)]
struct Case {
    label: &'static str,
    protect: bool,
    /// Bytes per second, or as fast as possible.
    pace: Option<f64>,
    /// Writes land in the first this many bytes (a hot set), or anywhere.
    hot: Option<u64>,
}

/// The hot set of the last case.
const HOT: u64 = 64 << 20;

const CASES: [Case; 5] = [
    Case {
        label: "no protection, as fast as possible",
        protect: false,
        pace: None,
        hot: None,
    },
    Case {
        label: "--protect-every 5s, as fast as possible",
        protect: true,
        pace: None,
        hot: None,
    },
    Case {
        label: "no protection, 20 MB/s",
        protect: false,
        pace: Some(PACED),
        hot: None,
    },
    Case {
        label: "--protect-every 5s, 20 MB/s",
        protect: true,
        pace: Some(PACED),
        hot: None,
    },
    Case {
        label: "--protect-every 5s, 20 MB/s into a 64 MiB hot set",
        protect: true,
        pace: Some(PACED),
        hot: Some(HOT),
    },
];

/// What one case measured.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    case: Case,
    stats: Stats,
    /// `rpo_seconds` samples once a point existed.
    rpo_samples: usize,
    rpo_max: f64,
    rpo_p99: f64,
    /// Samples whose protection state was `behind` / `failed`.
    behind: usize,
    failed: usize,
    points: u64,
    point_bytes_read: u64,
    point_bytes_new: u64,
    /// CPU seconds of the daemon process (every thread: the guest's
    /// requests and the points) while the client ran.
    daemon_cpu: f64,
    /// Store growth over the case (points' packs and manifests).
    store_growth: u64,
    /// Of which manifests (`snapshots/`).
    manifest_growth: u64,
    final_protection: serde_json::Value,
    /// The daemon's own time per write (`guest_latency.write` of the last
    /// status: through its block layers, without the client's or the
    /// virtqueue's scheduling); `None` from a daemon that does not report it.
    daemon_write: Option<Latency>,
}

/// Samples `status` every 250 ms until `stop`: (rpo_seconds, state).
fn sample(cli: PathBuf, control: PathBuf, stop: Arc<AtomicBool>) -> Vec<(Option<f64>, String)> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(s) = status(&cli, &control) {
            let pr = &s["protection"];
            out.push((
                pr["rpo_seconds"].as_f64(),
                pr["state"].as_str().unwrap_or_default().to_string(),
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    out
}

/// The value below which a fraction `p` of `v` lies (NaN if empty).
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn run_case(
    ctx: &Ctx,
    img: &Path,
    dir: &Path,
    case: Case,
    size: u64,
    secs: f64,
) -> anyhow::Result<Outcome> {
    let sub = dir.join("case");
    crate::remove_dir_if_exists(&sub)?;
    std::fs::create_dir_all(&sub)?;
    // A fresh store per case: the points of a case can take several GiB.
    let ours = Ours::init(&ctx.cli, &sub.join("store"), None)?;
    ours.backup("disk", img)?;
    let mut extra = vec!["--queues".to_string(), "1".to_string()];
    if case.protect {
        extra.extend(["--protect", "--protect-every", EVERY].map(String::from));
    }
    let store_before = tools::dir_bytes(&ours.store)?;
    let manifests_before = tools::dir_bytes(&ours.store.join("snapshots"))?;
    let mut server = Server::ours(&ctx.cli, &ours.store, "disk", &sub, 256 << 20, &extra)?;
    server.wait_ready(Duration::from_secs(30))?;
    let control = sub.join("state/control.sock");
    let mut client = Client::connect_retry(&server.socket, Duration::from_secs(10))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (cli, control, stop) = (ctx.cli.clone(), control.clone(), Arc::clone(&stop));
        std::thread::spawn(move || sample(cli, control, stop))
    };
    let duration = Duration::from_secs_f64(secs);
    let span = case.hot.unwrap_or(size).min(size);
    let cpu_before = tools::cpu_seconds(server.pid());
    let stats = match case.pace {
        Some(rate) => client.run_paced(&WRITE, span, duration, rate),
        None => client.run(&WRITE, span, duration, false),
    };
    let daemon_cpu = tools::cpu_seconds(server.pid()) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler thread");
    let stats = stats?;
    let last = status(&ctx.cli, &control)?;
    drop(client);
    server.stop()?;
    let pr = last["protection"].clone();
    if case.protect && !pr.is_object() {
        bail!("no protection in the status: {last}");
    }
    let rpo: Vec<f64> = samples.iter().filter_map(|(r, _)| *r).collect();
    let count = |state: &str| samples.iter().filter(|(_, s)| s == state).count();
    let num = |f: &str| pr[f].as_u64().unwrap_or(0);
    let out = Outcome {
        case,
        stats,
        rpo_samples: rpo.len(),
        rpo_max: rpo.iter().copied().fold(f64::NAN, f64::max),
        rpo_p99: percentile(&rpo, 0.99),
        behind: count("behind"),
        failed: count("failed"),
        points: num("points_written"),
        point_bytes_read: num("point_bytes_read"),
        point_bytes_new: num("point_bytes_new"),
        daemon_cpu,
        store_growth: tools::dir_bytes(&ours.store)?.saturating_sub(store_before),
        manifest_growth: tools::dir_bytes(&ours.store.join("snapshots"))?
            .saturating_sub(manifests_before),
        final_protection: pr,
        daemon_write: serde_json::from_value(last["guest_latency"]["write"].clone()).ok(),
    };
    crate::remove_dir_if_exists(&sub)?;
    eprintln!(
        "protect: {}: {:.0} IOPS, p99 {:.0} µs (the daemon's {}), RPO max {:.2} s p99 {:.2} s, {} points",
        case.label,
        out.stats.iops,
        out.stats.lat_p99_us,
        us(out.daemon_write.as_ref().and_then(|l| l.p99_us)),
        out.rpo_max,
        out.rpo_p99,
        out.points
    );
    Ok(out)
}

/// The daemon's write histograms of every round of a case, merged (`None`
/// when a round has none).
fn pooled_daemon_writes(rounds: &[Outcome]) -> Option<Latency> {
    rounds.iter().try_fold(Latency::default(), |mut acc, o| {
        acc.merge(o.daemon_write.as_ref()?);
        Some(acc)
    })
}

/// The cases to run: `SIDEBYSIDE_PROTECT_CASES` (comma-separated
/// indices into [`CASES`]), or all.
fn picked_cases() -> anyhow::Result<Vec<usize>> {
    let Ok(list) = std::env::var("SIDEBYSIDE_PROTECT_CASES") else {
        return Ok((0..CASES.len()).collect());
    };
    list.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(i) if i < CASES.len() => Ok(i),
            _ => bail!(
                "SIDEBYSIDE_PROTECT_CASES: {s:?} is not a case index below {}",
                CASES.len()
            ),
        })
        .collect()
}

/// The round whose `key` (write p99) is the median (the lower middle one).
pub(crate) fn median_by<T>(mut rounds: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    rounds.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = rounds.len().saturating_sub(1) / 2;
    rounds.into_iter().nth(mid)
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    if !available(&ctx.cli) {
        bail!("skipped: this recovery-cli has no `instant-boot --protect` yet");
    }
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 1 << 30 });
    let secs = if ctx.quick {
        20.0
    } else {
        ctx.duration.max(60.0)
    };
    let img = image::realistic(&ctx.images, size)?;
    let dir = ctx.scratch("protect")?;
    let mut report = ctx.report("protect");
    let picked = picked_cases()?;
    let mut rounds: Vec<Vec<Outcome>> = vec![Vec::new(); CASES.len()];
    for round in 0..ctx.rounds.max(1) {
        for &i in &picked {
            ctx.cold();
            eprintln!("protect: round {}, case {i}", round + 1);
            rounds[i].push(run_case(ctx, &img, &dir, CASES[i], size, secs)?);
        }
    }
    crate::remove_dir_if_exists(&dir)?;
    for (i, r) in rounds.iter().enumerate() {
        if r.len() > 1 {
            let p99: Vec<String> = r
                .iter()
                .map(|o| format!("{:.0}", o.stats.lat_p99_us))
                .collect();
            let daemon: Vec<String> = r
                .iter()
                .map(|o| us(o.daemon_write.as_ref().and_then(|l| l.p99_us)))
                .collect();
            eprintln!(
                "protect: case {i} write p99 per round (µs): {}; the daemon's: {}",
                p99.join(" "),
                daemon.join(", ")
            );
        }
    }
    let pooled: Vec<Option<Latency>> = rounds.iter().map(|r| pooled_daemon_writes(r)).collect();
    let by_case: Vec<Option<Outcome>> = rounds
        .into_iter()
        .map(|r| median_by(r, |o: &Outcome| o.stats.lat_p99_us))
        .collect();
    let outcomes: Vec<Outcome> = by_case.iter().flatten().cloned().collect();

    let chunks = size.div_ceil(64 << 10);
    let full_manifest = chunks * ENTRY_BYTES;
    let mut t = Table::new(
        &format!(
            "4 KiB random writes at QD8 over a {} disk for {secs:.0} s, points every {EVERY}",
            bytes_str(size)
        ),
        &[
            "case",
            "IOPS",
            "MB/s",
            "write p50",
            "write p99",
            "the daemon's write p50",
            "the daemon's write p99",
            "daemon CPU",
            "RPO max",
            "RPO p99",
            "behind samples",
            "points",
            "read by points",
            "store growth",
            "growth ÷ bytes written",
            "growth per hour",
            "manifests ÷ full manifest per point",
        ],
    );
    for o in &outcomes {
        let s = &o.stats;
        let p = o.case.protect;
        let dash = |v: String| if p { v } else { "-".to_string() };
        t.row(vec![
            o.case.label.to_string(),
            format!("{:.0}", s.iops),
            format!("{:.1}", s.mb_per_s),
            format!("{:.0} µs", s.lat_p50_us),
            format!("{:.0} µs", s.lat_p99_us),
            us(o.daemon_write.as_ref().and_then(|l| l.p50_us)),
            us(o.daemon_write.as_ref().and_then(|l| l.p99_us)),
            format!("{:.1} s", o.daemon_cpu),
            dash(format!("{:.2} s", o.rpo_max)),
            dash(format!("{:.2} s", o.rpo_p99)),
            dash(format!("{} of {}", o.behind, o.rpo_samples)),
            dash(o.points.to_string()),
            dash(bytes_str(o.point_bytes_read)),
            dash(bytes_str(o.store_growth)),
            dash(ratio_str(o.store_growth as f64 / s.bytes as f64)),
            dash(bytes_str((o.store_growth as f64 * 3600.0 / s.secs) as u64)),
            dash(ratio_str(
                o.manifest_growth as f64 / (o.points.max(1) * full_manifest) as f64,
            )),
        ]);
    }
    t.note(format!(
        "Daemon: `recovery-cli instant-boot --queues 1 [--protect --protect-every {EVERY}]` of a \
         backup of the realistic ext4 image, a fresh state dir per case; client: blkio, one \
         queue, 8 requests in flight, random 4 KiB-aligned offsets over the whole disk, \
         incompressible data; a fresh store per case; paced cases submit at 20 MB/s (5120 IOPS) when a slot is free; \
         the hot-set case writes only into the first 64 MiB."
    ));
    t.note(
        "The daemon's write p50/p99: `guest_latency.write` of `status --json` at the end of the \
         case, the time each write spent in the daemon's block layers (protection included; the \
         client's and the virtqueue's scheduling are not), from histograms with buckets at most \
         15 % wide.",
    );
    t.note(
        "Daemon CPU: user + system seconds of the daemon process (all threads: the guest's \
         requests and the points) while the client ran, from `/proc/PID/stat`.",
    );
    t.note(
        "RPO: `protection.rpo_seconds` from `status --json` every 250 ms, from the first point \
         on (the age of the newest complete point); `behind` means more than twice the interval.",
    );
    t.note(format!(
        "Store growth: the store directory's bytes after the case minus before (packs and \
         manifests of the points); a full manifest of this disk is {} ({chunks} chunks × \
         {ENTRY_BYTES} B).",
        bytes_str(full_manifest)
    ));
    report.tables.push(t);

    let [off_max, on_max, off_paced, on_paced] = [0, 1, 2, 3].map(|i| by_case[i].as_ref());
    if let Some(on_paced) = on_paced {
        report.target(
            "RPO at 20 MB/s (max rpo_seconds)",
            &format!("≤ {:.0} s (2× interval)", 2.0 * EVERY_SECS),
            format!("{:.2} s", on_paced.rpo_max),
            on_paced.rpo_max <= 2.0 * EVERY_SECS && on_paced.failed == 0,
        );
    }
    if let (Some(off), Some(on)) = (off_paced, on_paced) {
        report.target_max(
            "write p99 with protection ÷ without, 20 MB/s",
            on.stats.lat_p99_us / off.stats.lat_p99_us,
            1.3,
        );
    }
    if let (Some(Some(off)), Some(Some(on))) = (pooled.get(2), pooled.get(3)) {
        if let (Some(a), Some(b)) = (off.p99_us, on.p99_us) {
            report.target_max(
                "the daemon's own write p99 with protection ÷ without, 20 MB/s, every round pooled",
                b / a,
                1.3,
            );
        }
    }
    if let (Some(off), Some(on)) = (off_max, on_max) {
        report.target_max(
            "write p99 with protection ÷ without, as fast as possible",
            on.stats.lat_p99_us / off.stats.lat_p99_us,
            1.3,
        );
        report.target_min(
            "write IOPS with protection ÷ without, as fast as possible",
            on.stats.iops / off.stats.iops,
            1.0 / 1.3,
        );
    }
    report.set("rounds", ctx.rounds.max(1));
    report.set("image_size", size);
    report.set("seconds_per_case", secs);
    report.set("interval", EVERY);
    report.set("cases", &outcomes);
    Ok(report)
}
