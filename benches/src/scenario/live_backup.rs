//! `live-backup`: what a live backup through QEMU (issue 12: fleecing
//! over QMP, the scratch qcow2, NBD, dirty bitmaps) costs the guest's
//! writes.
//!
//! QEMU's block layer is run as `qemu-storage-daemon`: the disk (a qcow2
//! copy of the realistic ext4 image) is served over vhost-user-blk to the
//! blkio client, which stands in for the guest (the same 4 KiB random
//! writes at QD8, paced to 20 MB/s, as the `protect` scenario), and QSD's
//! QMP monitor takes `recovery-cli backup --qmp` exactly as a VM's QEMU
//! would (`query-block` is empty there, so `--drive` is the node name).
//! Copy-before-write of a guest write happens in QSD's block layer as it
//! would in the VM's QEMU: this measures that, without a TCG guest's own
//! noise.
//!
//! Cases, interleaved per round (`--rounds`), the same QSD throughout:
//! the writes with no backup; the writes while backups run back to back
//! (the first one full, then incrementals through the persistent bitmap);
//! and backups 1 s apart (the first with `--full`), where the writes
//! submitted while a backup process ran are also reported alone (full and
//! incremental windows, from the client's per-request timeline): "the
//! guest's p99 during a backup". Reported: write p50/p99 per case (the
//! median round by p99; by the incremental windows' p99 for the spaced
//! case), the backups that ran and their blackout.
//! `SIDEBYSIDE_LIVE_SCRATCH=DIR` puts the scratch image in DIR instead of
//! next to the disk.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::client::{Client, Stats};
use crate::image;
use crate::peers::Ours;
use crate::report::{ratio_str, secs_str, Report, Table};
use crate::scenario::protect::{median_by, PACED, WRITE};
use crate::tools;
use crate::Ctx;

/// The node the backups name.
const NODE: &str = "disk0";

/// qemu-storage-daemon serving `disk` (qcow2) over vhost-user-blk with a
/// QMP monitor; killed on drop.
struct Qsd {
    child: Child,
    vhost: PathBuf,
    qmp: PathBuf,
}

impl Qsd {
    fn start(disk: &Path, dir: &Path) -> anyhow::Result<Qsd> {
        let (vhost, qmp) = (dir.join("vhost.sock"), dir.join("qmp.sock"));
        let _ = std::fs::remove_file(&vhost);
        let _ = std::fs::remove_file(&qmp);
        let log = std::fs::File::create(dir.join("qsd.log"))?;
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                disk.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name={NODE},file=file0"))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name={NODE},writable=on,\
                 addr.type=unix,addr.path={}",
                vhost.display()
            ))
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn qemu-storage-daemon")?;
        let mut qsd = Qsd { child, vhost, qmp };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(qsd.vhost.exists() && qsd.qmp.exists()) {
            if let Some(st) = qsd.child.try_wait()? {
                bail!(
                    "qemu-storage-daemon exited ({st}): {}",
                    std::fs::read_to_string(dir.join("qsd.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon sockets did not appear");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(qsd)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One backup that ran during a case.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Backup {
    pub(crate) mode: String,
    pub(crate) seconds: f64,
    pub(crate) blackout_ms: f64,
    pub(crate) bytes_read: u64,
    /// With `--rate auto`: (lowest rate, windows slowed, windows judged).
    pub(crate) pacing: Option<(u64, u64, u64)>,
    /// When the process ran.
    #[serde(skip)]
    pub(crate) window: (Instant, Instant),
}

/// The backups of a case.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Backups {
    None,
    /// One after the other, no pause.
    BackToBack,
    /// With [`GAP`] between them; the writes submitted while one ran are
    /// also reported on their own.
    Spaced,
}

impl Backups {
    /// How the case's backups ran, for the report (`None` without).
    pub(crate) fn label(self) -> Option<&'static str> {
        match self {
            Backups::None => None,
            Backups::BackToBack => Some("back to back"),
            Backups::Spaced => Some("1 s apart"),
        }
    }

    /// The pause after each backup: [`GAP`] when spaced, else none.
    pub(crate) fn gap(self) -> Duration {
        if self == Backups::Spaced {
            GAP
        } else {
            Duration::ZERO
        }
    }
}

/// The pause between backups in [`Backups::Spaced`].
const GAP: Duration = Duration::from_secs(1);

/// What one case measured.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    kind: Backups,
    stats: Stats,
    /// Spaced backups: the writes submitted while the full backup ran, and
    /// while an incremental ran.
    in_full: Option<Stats>,
    in_incremental: Option<Stats>,
    backups: Vec<Backup>,
    load_avg: f64,
}

/// What [`backups`] runs: `recovery-cli backup --qmp QMP --drive DRIVE
/// --scratch SCRATCH [--rate RATE]` into `ours`' store.
pub(crate) struct LiveBackup<'a> {
    pub(crate) ours: &'a Ours,
    pub(crate) qmp: &'a Path,
    pub(crate) drive: &'a str,
    pub(crate) scratch: &'a Path,
    pub(crate) rate: Option<&'a str>,
}

/// `live` one after the other, `gap` apart, until `stop`.
/// `around(Some(full))` is called just before each backup process starts
/// (`full`: it was asked for with `--full`), and `around(None)` just after
/// it ends.
pub(crate) fn backups(
    live: &LiveBackup<'_>,
    stop: &AtomicBool,
    gap: Duration,
    around: &(dyn Fn(Option<bool>) + Sync),
) -> anyhow::Result<Vec<Backup>> {
    let LiveBackup {
        ours,
        qmp,
        drive,
        scratch,
        rate,
    } = *live;
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // Spaced backups start with a full one, to see its window too.
        let full = !gap.is_zero() && out.is_empty();
        around(Some(full));
        let t0 = Instant::now();
        let run = tools::run(
            Command::new(&ours.cli)
                .arg("backup")
                .args(full.then_some("--full"))
                .arg("--store")
                .arg(&ours.store)
                .args(["--name", "live", "--json", "--drive", drive])
                .arg("--qmp")
                .arg(qmp)
                .arg("--scratch")
                .arg(scratch)
                .args(rate.map(|r| ["--rate", r]).into_iter().flatten()),
        );
        let t1 = Instant::now();
        around(None);
        let run = run?;
        let v: Value = serde_json::from_str(&run.stdout)
            .with_context(|| format!("parse backup output {:?}", run.stdout))?;
        out.push(Backup {
            mode: v["mode"].as_str().unwrap_or_default().to_string(),
            seconds: v["seconds"].as_f64().unwrap_or(run.secs),
            blackout_ms: v["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            bytes_read: v["bytes_read"].as_u64().unwrap_or(0),
            pacing: v.get("pacing").map(|p| {
                let n = |k: &str| p[k].as_u64().unwrap_or(0);
                (n("lowest_rate"), n("slowed"), n("windows"))
            }),
            window: (t0, t1),
        });
        let resume = Instant::now() + gap;
        while !stop.load(Ordering::Relaxed) && Instant::now() < resume {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(out)
}

/// The stats of the requests of `timeline` submitted inside one of
/// `windows`.
fn within(timeline: &[(Instant, f32)], windows: &[(Instant, Instant)]) -> Option<Stats> {
    let lat: Vec<f32> = timeline
        .iter()
        .filter(|(at, _)| windows.iter().any(|(a, b)| a <= at && at <= b))
        .map(|&(_, l)| l)
        .collect();
    let secs: f64 = windows.iter().map(|(a, b)| (*b - *a).as_secs_f64()).sum();
    (!lat.is_empty()).then(|| Stats::new(lat.len() as u64, WRITE.block as u64, secs, lat))
}

fn run_case(
    ours: &Ours,
    qsd: &Qsd,
    client: &mut Client,
    scratch: &Path,
    kind: Backups,
    size: u64,
    secs: f64,
) -> anyhow::Result<Outcome> {
    let duration = Duration::from_secs_f64(secs);
    let stop = AtomicBool::new(false);
    let gap = kind.gap();
    let live = LiveBackup {
        ours,
        qmp: &qsd.qmp,
        drive: NODE,
        scratch,
        rate: None,
    };
    let (run, backups) = std::thread::scope(|s| {
        let worker =
            (kind != Backups::None).then(|| s.spawn(|| backups(&live, &stop, gap, &|_| {})));
        let run = client.run_paced_timeline(&WRITE, size, duration, PACED);
        stop.store(true, Ordering::Relaxed);
        let backups = match worker {
            Some(w) => w.join().expect("backup thread"),
            None => Ok(Vec::new()),
        };
        (run, backups)
    });
    let (stats, timeline) = run?;
    let backups = backups?;
    let windows = |full: bool| -> Vec<(Instant, Instant)> {
        backups
            .iter()
            .filter(|b| (b.mode == "full") == full)
            .map(|b| b.window)
            .collect()
    };
    let spaced = kind == Backups::Spaced;
    let out = Outcome {
        kind,
        stats,
        in_full: spaced.then(|| within(&timeline, &windows(true))).flatten(),
        in_incremental: spaced.then(|| within(&timeline, &windows(false))).flatten(),
        backups,
        load_avg: tools::load_avg(),
    };
    eprintln!(
        "live-backup: {}: p50 {:.0} µs, p99 {:.0} µs, {} backups, load {:.1}{}",
        out.kind
            .label()
            .map_or("no backup".into(), |k| format!("backups {k}")),
        out.stats.lat_p50_us,
        out.stats.lat_p99_us,
        out.backups.len(),
        out.load_avg,
        match &out.in_incremental {
            Some(s) => format!(
                "; writes while an incremental ran: p50 {:.0} µs, p99 {:.0} µs ({} writes)",
                s.lat_p50_us, s.lat_p99_us, s.ops
            ),
            None => String::new(),
        }
    );
    Ok(out)
}

/// The disk size (`--size`; 1 GiB, `--quick` 256 MiB) and the seconds per
/// case (`--duration`, at least 30; `--quick` 10) of the live-backup
/// scenarios.
pub(crate) fn disk_size_and_case_secs(ctx: &Ctx) -> (u64, f64) {
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 1 << 30 });
    let secs = if ctx.quick {
        10.0
    } else {
        ctx.duration.max(30.0)
    };
    (size, secs)
}

/// The live-backup scenarios' disk: a qcow2 copy of the realistic ext4
/// image of `size` at `disk`.
pub(crate) fn realistic_qcow2(ctx: &Ctx, size: u64, disk: &Path) -> anyhow::Result<()> {
    let img = image::realistic(&ctx.images, size)?;
    tools::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&img)
            .arg(disk),
    )?;
    Ok(())
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("qemu-storage-daemon")?;
    tools::require("qemu-img")?;
    let (size, secs) = disk_size_and_case_secs(ctx);
    let dir = ctx.scratch("live-backup")?;
    let disk = dir.join("disk.qcow2");
    realistic_qcow2(ctx, size, &disk)?;
    // SIDEBYSIDE_LIVE_SCRATCH: the scratch image's directory elsewhere
    // (another disk, tmpfs), to see what its placement costs.
    let scratch = std::env::var_os("SIDEBYSIDE_LIVE_SCRATCH")
        .map_or_else(|| dir.join("scratch"), PathBuf::from);
    std::fs::create_dir_all(&scratch)?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    let qsd = Qsd::start(&disk, &dir)?;
    let mut client = Client::connect_retry(&qsd.vhost, Duration::from_secs(10))?;
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    let mut spaced = Vec::new();
    for round in 0..ctx.rounds.max(1) {
        eprintln!("live-backup: round {}", round + 1);
        ctx.cold();
        idle.push(run_case(
            &ours,
            &qsd,
            &mut client,
            &scratch,
            Backups::None,
            size,
            secs,
        )?);
        ctx.cold();
        busy.push(run_case(
            &ours,
            &qsd,
            &mut client,
            &scratch,
            Backups::BackToBack,
            size,
            secs,
        )?);
        ctx.cold();
        spaced.push(run_case(
            &ours,
            &qsd,
            &mut client,
            &scratch,
            Backups::Spaced,
            size,
            secs,
        )?);
    }
    drop(client);
    drop(qsd);
    let p99s = |v: &[Outcome]| {
        v.iter()
            .map(|o| format!("{:.0}", o.stats.lat_p99_us))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let inc_p99 = |o: &Outcome| o.in_incremental.map_or(f64::NAN, |s| s.lat_p99_us);
    eprintln!(
        "live-backup: write p99 per round (µs): no backup {}; backups back to back {}; \
         while an incremental ran (1 s apart) {}",
        p99s(&idle),
        p99s(&busy),
        spaced
            .iter()
            .map(|o| format!("{:.0}", inc_p99(o)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let rounds = idle.len();
    let p99 = |o: &Outcome| o.stats.lat_p99_us;
    let (Some(idle), Some(busy), Some(spaced)) = (
        median_by(idle, p99),
        median_by(busy, p99),
        median_by(spaced, inc_p99),
    ) else {
        bail!("no rounds");
    };
    crate::remove_dir_if_exists(&dir)?;

    let mut t = Table::new(
        &format!(
            "4 KiB random writes at QD8, 20 MB/s, through qemu-storage-daemon (qcow2, {}), {secs:.0} s per case, median of {rounds} rounds by p99",
            crate::report::bytes_str(size)
        ),
        &[
            "case",
            "IOPS",
            "write p50",
            "write p99",
            "p99 ÷ no backup",
            "backups (full + incremental)",
            "backup time (median)",
            "blackout max",
        ],
    );
    for o in [&idle, &busy, &spaced] {
        let s = &o.stats;
        let full = o.backups.iter().filter(|b| b.mode == "full").count();
        let times: Vec<f64> = o.backups.iter().map(|b| b.seconds).collect();
        let blackout = o
            .backups
            .iter()
            .map(|b| b.blackout_ms)
            .fold(f64::NAN, f64::max);
        let dash = |v: String| {
            if o.kind == Backups::None {
                "-".to_string()
            } else {
                v
            }
        };
        t.row(vec![
            o.kind.label().map_or("no backup".into(), |k| {
                format!("during `backup --qmp`, {k}: all writes")
            }),
            format!("{:.0}", s.iops),
            format!("{:.0} µs", s.lat_p50_us),
            format!("{:.0} µs", s.lat_p99_us),
            ratio_str(s.lat_p99_us / idle.stats.lat_p99_us),
            dash(format!("{} + {}", full, o.backups.len() - full)),
            dash(secs_str(crate::report::median(&times))),
            dash(format!("{blackout:.1} ms")),
        ]);
    }
    // The writes submitted while a backup process of the spaced case ran.
    for (what, st, full) in [
        ("the full backup", spaced.in_full, true),
        ("an incremental", spaced.in_incremental, false),
    ] {
        let Some(st) = st else { continue };
        let times: Vec<f64> = spaced
            .backups
            .iter()
            .filter(|b| (b.mode == "full") == full)
            .map(|b| b.seconds)
            .collect();
        t.row(vec![
            format!("while {what} ran (1 s apart): {} writes", st.ops),
            "-".into(),
            format!("{:.0} µs", st.lat_p50_us),
            format!("{:.0} µs", st.lat_p99_us),
            ratio_str(st.lat_p99_us / idle.stats.lat_p99_us),
            times.len().to_string(),
            secs_str(crate::report::median(&times)),
            "-".into(),
        ]);
    }
    let placement = if scratch.starts_with(&dir) {
        "on the same disk as the image".to_string()
    } else {
        format!("in {}", scratch.display())
    };
    t.note(format!(
        "qemu-storage-daemon 7.2 serves the qcow2 disk over vhost-user-blk to the blkio client \
         (one queue, 8 in flight, random 4 KiB-aligned offsets over the whole disk, paced at \
         20 MB/s); `recovery-cli backup --qmp QSD_QMP --drive disk0 --scratch DIR` runs back to \
         back in the second case, and 1 s apart (the first with --full) in the third, whose \
         writes submitted while a backup process ran are also shown alone: fleecing \
         (blockdev-backup into a scratch qcow2 backed by the disk: sync=none for a full, \
         sync=bitmap over the base's dirty clusters for an incremental), NBD export with the \
         dirty bitmap; the scratch image is {placement}."
    ));
    let mut report = ctx.report("live-backup");
    report.tables.push(t);
    report.target_max(
        "write p99 while an incremental runs (1 s apart) ÷ without, 20 MB/s",
        inc_p99(&spaced) / idle.stats.lat_p99_us,
        2.0,
    );
    if let Some(full) = spaced.in_full {
        report.target_max(
            "write p99 while a full backup runs ÷ without, 20 MB/s",
            full.lat_p99_us / idle.stats.lat_p99_us,
            2.0,
        );
    }
    report.target_max(
        "write p99 with backups back to back ÷ without, 20 MB/s",
        busy.stats.lat_p99_us / idle.stats.lat_p99_us,
        2.0,
    );
    report.set("image_size", size);
    report.set("seconds_per_case", secs);
    report.set("rounds", rounds);
    report.set("no_backup", &idle);
    report.set("during_backups", &busy);
    report.set("backups_spaced", &spaced);
    Ok(report)
}
