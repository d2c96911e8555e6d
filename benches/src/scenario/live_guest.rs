//! `live-backup-guest`: issue 12's guest cost as the issue states it, "4
//! KiB write p99 inside the guest during a backup, against idle", in a
//! real guest: QEMU (TCG, q35) boots the test guest from a copy of its root
//! disk, with a second virtio-blk disk (a qcow2 copy of the realistic ext4
//! image) that `recovery-cli backup --qmp` backs up while the guest writes
//! to it. The guest's load is `guest-writer` (`benches/guest-writer`, linked
//! statically and copied onto the root disk): 4 KiB `O_DIRECT` writes at
//! random offsets of the data disk, from several threads, paced; each
//! write's latency is the guest's own (syscall to completion), filed under
//! the phase the harness named on the serial console when it was
//! submitted.
//!
//! The cases are those of `live-backup` (no backup, back to back, 1 s
//! apart with the first `--full`) and the spaced one again with every
//! backup under `--rate` (`SIDEBYSIDE_GUEST_RATE`, default 50M) and under
//! `--rate auto` (paced by the guest's latency), interleaved per round on
//! the same VM (`SIDEBYSIDE_GUEST_CASES=limited,auto` runs only those, and
//! the no-backup case); the spaced cases switch the phase
//! around each backup process, so the writes submitted while the full
//! backup ran, while an incremental ran and between backups are counted
//! apart. QEMU's main loop serves both the
//! guest's virtio-blk requests (no iothread: the default of QEMU and of
//! libvirt) and the backup's QMP and NBD, as on a production host.
//!
//! `SIDEBYSIDE_GUEST_IOPS` (default 500) and `SIDEBYSIDE_GUEST_THREADS`
//! (default 4) set the load.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::peers::Ours;
use crate::report::{bytes_str, median, ratio_str, secs_str, Report, Table};
use crate::scenario::live_backup::{
    backups, disk_size_and_case_secs, realistic_qcow2, Backup, Backups, LiveBackup,
};
use crate::scenario::protect::median_by;
use crate::tools;
use crate::Ctx;

/// The data disk's node name (what `--drive` names) and its serial (how
/// the guest finds it).
const NODE: &str = "data0";
const SERIAL: &str = "bench-data";
/// Where the writer sits on the guest's root disk.
const WRITER: &str = "/guest-writer";

/// Builds `guest-writer` statically (the guest's root has no Rust
/// runtime libraries), in its own target directory under `build`.
fn build_writer(root: &Path, build: &Path) -> anyhow::Result<PathBuf> {
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    tools::run(
        Command::new(cargo)
            .current_dir(root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "guest-writer",
                "--target",
                triple,
            ])
            .arg("--target-dir")
            .arg(build),
    )
    .context("build guest-writer (static)")?;
    Ok(build.join(triple).join("release/guest-writer"))
}

/// A copy of the test guest's root disk with `writer` at [`WRITER`].
fn root_disk(root: &Path, writer: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    tools::run(&mut Command::new(root.join("scripts/build-guest.sh")))?;
    let disk = dir.join("root.img");
    std::fs::copy(root.join(".guest-cache/root.img"), &disk).context("copy root.img")?;
    for req in [
        format!("write {} {}", writer.display(), &WRITER[1..]),
        format!("sif {WRITER} mode 0100755"),
    ] {
        tools::run(Command::new("debugfs").args(["-w", "-R", &req]).arg(&disk))?;
    }
    Ok(disk)
}

/// The guest's serial console input, shared by the threads that name the
/// writer's phases.
struct Console(Mutex<ChildStdin>);

impl Console {
    /// Sends one line to the guest.
    fn send(&self, line: &str) -> std::io::Result<()> {
        let mut stdin = self.0.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Names the writer's current phase.
    fn phase(&self, name: &str) {
        let _ = self.send(&format!("phase {name}"));
    }
}

/// The TCG guest with its console (stdin for phase names, stdout for
/// markers); killed on drop.
struct Guest {
    child: Child,
    console: Console,
    lines: Receiver<(String, Instant)>,
    qmp: PathBuf,
    log: Vec<String>,
}

impl Guest {
    fn start(
        root: &Path,
        root_disk: &Path,
        data: &Path,
        dir: &Path,
        threads: u32,
        iops: u32,
    ) -> anyhow::Result<Guest> {
        let cache = root.join(".guest-cache");
        let cmdline = std::fs::read_to_string(cache.join("cmdline"))?;
        let qmp = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp);
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(cache.join("vmlinuz"))
            .arg("-initrd")
            .arg(cache.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(format!(
                "{} guestmode=exec guestexec={WRITER} writer.serial={SERIAL} \
                 writer.threads={threads} writer.iops={iops}",
                cmdline.trim()
            ))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=rootfile,filename={}",
                root_disk.display()
            ))
            .arg("-blockdev")
            .arg("driver=raw,node-name=root0,file=rootfile")
            .args(["-device", "virtio-blk-pci,drive=root0,serial=root"])
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=datafile,filename={}",
                data.display()
            ))
            .arg("-blockdev")
            .arg(format!("driver=qcow2,node-name={NODE},file=datafile"))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive={NODE},id=data,serial={SERIAL}"
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["-mon", "chardev=qmp0,mode=control"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn qemu-system-x86_64")?;
        let lines = tools::console_lines(child.stdout.take().context("guest console")?);
        let console = Console(Mutex::new(child.stdin.take().context("guest console")?));
        Ok(Guest {
            child,
            console,
            lines,
            qmp,
            log: Vec::new(),
        })
    }

    /// Waits for a console line starting with `marker`.
    fn expect(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((line, _)) = self.lines.recv_timeout(left) else {
                bail!(
                    "no {marker} from the guest within {timeout:?}; console:\n{}",
                    self.log[self.log.len().saturating_sub(30)..].join("\n")
                );
            };
            let line = line.trim_end().to_string();
            self.log.push(line.clone());
            for bad in [
                "WRITER-FAIL",
                "EXEC-MISSING",
                "INITRAMFS-FAIL",
                "PAYLOAD-BAD",
            ] {
                if line.starts_with(bad) {
                    bail!("guest: {line}");
                }
            }
            if line.starts_with(marker) {
                return Ok(line);
            }
        }
    }

    /// Stops the writer and collects its per-phase stats.
    fn finish(&mut self) -> anyhow::Result<HashMap<String, Phase>> {
        self.console.send("stop")?;
        let mut out = HashMap::new();
        loop {
            let line = self.expect("WRITER-", Duration::from_secs(120))?;
            if line.starts_with("WRITER-DONE") {
                return Ok(out);
            }
            if let Some(rest) = line.strip_prefix("WRITER-STATS ") {
                let (name, phase) = Phase::parse(rest)?;
                out.insert(name, phase);
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The writer's numbers for one phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Phase {
    writes: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    errors: u64,
}

impl Phase {
    /// `NAME n=.. p50_us=.. p90_us=.. p99_us=.. p999_us=.. max_us=..
    /// errors=..`.
    fn parse(line: &str) -> anyhow::Result<(String, Phase)> {
        let mut words = line.split_whitespace();
        let name = words.next().context("WRITER-STATS without a phase")?;
        let mut p = Phase::default();
        for w in words {
            let (k, v) = w.split_once('=').context("WRITER-STATS field")?;
            let v: f64 = v.parse().with_context(|| format!("WRITER-STATS {w}"))?;
            match k {
                "n" => p.writes = v as u64,
                "p50_us" => p.p50_us = v,
                "p99_us" => p.p99_us = v,
                "p999_us" => p.p999_us = v,
                "max_us" => p.max_us = v,
                "errors" => p.errors = v as u64,
                _ => {}
            }
        }
        Ok((name.to_string(), p))
    }
}

/// The cases, interleaved per round.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Idle,
    BackToBack,
    /// 1 s apart, the first `--full`.
    Spaced,
    /// As [`Kind::Spaced`], every backup with `--rate`.
    Limited,
    /// As [`Kind::Spaced`], every backup with `--rate auto`.
    Auto,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Idle,
        Kind::BackToBack,
        Kind::Spaced,
        Kind::Limited,
        Kind::Auto,
    ];

    fn backups(self) -> Backups {
        match self {
            Kind::Idle => Backups::None,
            Kind::BackToBack => Backups::BackToBack,
            Kind::Spaced | Kind::Limited | Kind::Auto => Backups::Spaced,
        }
    }

    /// Its name in `SIDEBYSIDE_GUEST_CASES` and in the writer's phases.
    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::BackToBack => "back-to-back",
            Kind::Spaced => "spaced",
            Kind::Limited => "limited",
            Kind::Auto => "auto",
        }
    }

    /// The cases to run: `SIDEBYSIDE_GUEST_CASES` (comma-separated names),
    /// or all; the no-backup case always runs (the ratios' base).
    fn picked() -> anyhow::Result<Vec<Kind>> {
        let Ok(list) = std::env::var("SIDEBYSIDE_GUEST_CASES") else {
            return Ok(Kind::ALL.to_vec());
        };
        let mut kinds = vec![Kind::Idle];
        for n in list.split(',').map(str::trim) {
            let Some(k) = Kind::ALL.into_iter().find(|k| k.name() == n) else {
                anyhow::bail!(
                    "SIDEBYSIDE_GUEST_CASES: {n:?} is none of {}",
                    Kind::ALL.map(Kind::name).join(", ")
                );
            };
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        Ok(kinds)
    }

    fn label(self, rate: &str) -> String {
        match self {
            Kind::Idle => "no backup".into(),
            Kind::BackToBack => "backups back to back".into(),
            Kind::Spaced => "1 s apart".into(),
            Kind::Limited => format!("1 s apart, --rate {rate}"),
            Kind::Auto => "1 s apart, --rate auto".into(),
        }
    }

    /// The writer's phase in round `round`: all the case's writes, or
    /// (spaced cases) those between backups (`None`), while the full
    /// backup ran (`Some(true)`), while an incremental ran (`Some(false)`).
    fn phase(self, round: usize, during: Option<bool>) -> String {
        let name = self.name();
        match during {
            None => format!("{name}-{round}"),
            Some(true) => format!("{name}-full-{round}"),
            Some(false) => format!("{name}-incremental-{round}"),
        }
    }
}

/// One round of one case and its backups.
struct Case {
    kind: Kind,
    round: usize,
    backups: Vec<Backup>,
}

fn run_case(
    ours: &Ours,
    guest: &Guest,
    scratch: &Path,
    (kind, rate): (Kind, &str),
    round: usize,
    secs: f64,
) -> anyhow::Result<Case> {
    let console = &guest.console;
    console.phase(&kind.phase(round, None));
    let stop = AtomicBool::new(false);
    let spaced = kind.backups() == Backups::Spaced;
    let around = |start: Option<bool>| {
        if spaced {
            console.phase(&kind.phase(round, start));
        }
    };
    let gap = kind.backups().gap();
    let rate = match kind {
        Kind::Limited => Some(rate),
        Kind::Auto => Some("auto"),
        _ => None,
    };
    let live = LiveBackup {
        ours,
        qmp: &guest.qmp,
        drive: NODE,
        scratch,
        rate,
    };
    let done = std::thread::scope(|s| {
        let worker = (kind != Kind::Idle).then(|| s.spawn(|| backups(&live, &stop, gap, &around)));
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        match worker {
            Some(w) => w.join().expect("backup thread"),
            None => Ok(Vec::new()),
        }
    })?;
    console.phase("between");
    if spaced {
        if let Some(b) = done.iter().skip(1).find(|b| b.mode != "incremental") {
            bail!(
                "a spaced backup after the first was {} (counted as incremental)",
                b.mode
            );
        }
    }
    eprintln!(
        "live-backup-guest: round {round}: {}: {} backups",
        kind.label(rate.unwrap_or_default()),
        done.len()
    );
    Ok(Case {
        kind,
        round,
        backups: done,
    })
}

/// A row's numbers, for the report's JSON.
#[derive(Debug, Clone, Serialize)]
struct Row {
    what: String,
    phase: String,
    writes: Phase,
    backups: usize,
    backup_seconds_median: f64,
    blackout_ms_max: f64,
}

fn env_u32(name: &str, default: u32) -> anyhow::Result<u32> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("{name}={v}: not a positive number")),
        Err(_) => Ok(default),
    }
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("qemu-system-x86_64")?;
    tools::require("qemu-img")?;
    tools::require("debugfs")?;
    let iops = env_u32("SIDEBYSIDE_GUEST_IOPS", 500)?;
    let rate = std::env::var("SIDEBYSIDE_GUEST_RATE").unwrap_or_else(|_| "50M".into());
    let threads = env_u32("SIDEBYSIDE_GUEST_THREADS", 4)?;
    let (size, secs) = disk_size_and_case_secs(ctx);
    let dir = ctx.scratch("live-backup-guest")?;
    let writer = build_writer(&ctx.root, &ctx.out.join("guest-writer-build"))?;
    let root_disk = root_disk(&ctx.root, &writer, &dir)?;
    let data = dir.join("data.qcow2");
    realistic_qcow2(ctx, size, &data)?;
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    let mut guest = Guest::start(&ctx.root, &root_disk, &data, &dir, threads, iops)?;
    guest.expect("WRITER-READY", Duration::from_secs(180))?;
    // The writer's first seconds (page faults, the guest settling) count
    // in no case.
    std::thread::sleep(Duration::from_secs(3));
    let kinds = Kind::picked()?;
    let mut cases = Vec::new();
    for round in 1..=ctx.rounds.max(1) {
        for &kind in &kinds {
            ctx.cold();
            cases.push(run_case(
                &ours,
                &guest,
                &scratch,
                (kind, &rate),
                round,
                secs,
            )?);
        }
    }
    let phases = guest.finish()?;
    drop(guest);
    let rounds = ctx.rounds.max(1);
    let get = |name: &str| phases.get(name).copied();

    // Per row: the case, which of its writes (see `Kind::phase`), the
    // backups to show; the median round by p99.
    let mut picks = vec![(Kind::Idle, None), (Kind::BackToBack, None)];
    for kind in [Kind::Spaced, Kind::Limited, Kind::Auto] {
        picks.extend([(kind, None), (kind, Some(true)), (kind, Some(false))]);
    }
    let mut rows = Vec::new();
    let mut per_round = String::new();
    for &(kind, during) in &picks {
        let what = match (kind.backups(), during) {
            (Backups::None, _) => kind.label(&rate),
            (Backups::BackToBack, _) => format!("{}: all writes", kind.label(&rate)),
            (_, None) => format!("{}: writes between backups", kind.label(&rate)),
            (_, Some(true)) => format!("{}: writes while the full backup ran", kind.label(&rate)),
            (_, Some(false)) => format!("{}: writes while an incremental ran", kind.label(&rate)),
        };
        let mut found = Vec::new();
        for case in cases.iter().filter(|c| c.kind == kind) {
            let name = kind.phase(case.round, during);
            if let Some(p) = get(&name) {
                found.push((name, p, case));
            }
        }
        per_round.push_str(&format!(
            "\n  {what}: p99 {} µs",
            found
                .iter()
                .map(|(_, p, _)| format!("{:.0}", p.p99_us))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let Some((phase, writes, case)) = median_by(found, |(_, p, _)| p.p99_us) else {
            continue;
        };
        let shown: Vec<&Backup> = case
            .backups
            .iter()
            .filter(|b| during.is_none_or(|full| (b.mode == "full") == full))
            .collect();
        let times: Vec<f64> = shown.iter().map(|b| b.seconds).collect();
        rows.push(Row {
            what,
            phase,
            writes,
            backups: shown.len(),
            backup_seconds_median: median(&times),
            blackout_ms_max: shown.iter().map(|b| b.blackout_ms).fold(f64::NAN, f64::max),
        });
    }
    // What --rate auto chose, per backup.
    for case in cases.iter().filter(|c| c.kind == Kind::Auto) {
        let paced: Vec<String> = case
            .backups
            .iter()
            .filter_map(|b| {
                let (lowest, slowed, windows) = b.pacing?;
                Some(format!(
                    "{} {:.2} s, lowest {}/s, slowed {slowed} of {windows}",
                    b.mode,
                    b.seconds,
                    bytes_str(lowest)
                ))
            })
            .collect();
        per_round.push_str(&format!(
            "\n  --rate auto, round {}: {}",
            case.round,
            paced.join("; ")
        ));
    }
    eprintln!("live-backup-guest: per round{per_round}");
    let errors: u64 = phases.values().map(|p| p.errors).sum();
    if errors > 0 {
        bail!("the guest saw {errors} failed writes");
    }
    let Some(idle) = rows.first().filter(|r| r.what == "no backup").cloned() else {
        bail!("no idle phase measured");
    };
    crate::remove_dir_if_exists(&dir)?;

    let mut t = Table::new(
        &format!(
            "4 KiB O_DIRECT random writes inside a TCG guest ({threads} threads, {iops} writes/s in all) \
             to a {} qcow2 disk of QEMU {}, {secs:.0} s per case, median of {rounds} rounds by p99",
            bytes_str(size),
            tools::version("qemu-system-x86_64", &["--version"])
        ),
        &[
            "writes submitted",
            "writes",
            "p50",
            "p99",
            "p99.9",
            "p99 ÷ no backup",
            "backups",
            "backup time (median)",
            "blackout max",
        ],
    );
    for r in &rows {
        let none = r.what == "no backup";
        let dash = |v: String| if none { "-".to_string() } else { v };
        t.row(vec![
            r.what.clone(),
            r.writes.writes.to_string(),
            format!("{:.0} µs", r.writes.p50_us),
            format!("{:.0} µs", r.writes.p99_us),
            format!("{:.0} µs", r.writes.p999_us),
            ratio_str(r.writes.p99_us / idle.writes.p99_us),
            dash(r.backups.to_string()),
            dash(secs_str(r.backup_seconds_median)),
            dash(format!("{:.1} ms", r.blackout_ms_max)),
        ]);
    }
    t.note(
        "QEMU (TCG, q35, 1 vCPU, no iothread) runs the test guest with a second virtio-blk disk, \
         a qcow2 copy of the realistic image; inside the guest, guest-writer writes 4 KiB blocks \
         at random 4 KiB-aligned offsets of that disk with O_DIRECT, each thread one write at a \
         time, paced, and times each write from the syscall to its return. \
         `recovery-cli backup --qmp QEMU_QMP --drive data0` runs back to back in the second case \
         (the very first one full, then incrementals through the persistent bitmap), and 1 s \
         apart (the first with --full) in the third, fourth and fifth, the fourth with --rate \
         on every backup and the fifth with --rate auto; the harness names the writer's phase \
         on the serial console when each backup process starts and ends.",
    );
    let mut report = ctx.report("live-backup-guest");
    report.tables.push(t);
    for r in rows.iter().skip(1) {
        report.target_max(
            &format!("in-guest write p99, {} ÷ no backup", r.what),
            r.writes.p99_us / idle.writes.p99_us,
            2.0,
        );
    }
    report.set("image_size", size);
    report.set("seconds_per_case", secs);
    report.set("rounds", rounds);
    report.set("writer_threads", threads);
    report.set("writer_iops", iops);
    report.set("rows", &rows);
    report.set("phases", &phases);
    Ok(report)
}
