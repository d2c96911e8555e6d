//! `s3-ingest`: backup and restore of the realistic image on a store on
//! S3 (issue 16), against restic on the same S3 server and against our
//! local store.
//!
//! One `moto_server` on loopback serves a bucket for our store
//! (`s3://bench/store`) and one for restic
//! (`s3:http://127.0.0.1:PORT/restic/repo`). The image is the ext4 image
//! of `ingest` and `restore` (2 GiB by default, `--size` overrides,
//! `--quick` 256 MiB). Every round starts from an empty server (moto's
//! `/moto-api/reset`) and empty stores, then runs, in this order, with the
//! page cache dropped before each when allowed:
//!
//! 1. backups: ours to a local store, ours to S3, `restic backup` to S3;
//! 2. restores: ours from the local store, ours from S3 (a fresh
//!    `--cache-dir` and `RECOVERY_DISK_CACHE_SIZE=0`, so every chunk comes
//!    from the server), `restic restore` from S3 (a fresh restic cache).
//!
//! Each restore ends with a `sync -f` of its target and is checked
//! byte for byte against the source outside the timed part; a difference
//! fails the scenario. Recorded per run: wall time, the CPU time of the
//! tool (user + system of it and its children) and moto's CPU time. The
//! tables show medians over `--rounds` and ratios; the issue sets no goal
//! here, so there are no targets.
//!
//! `target/release/sidebyside s3-ingest [--size 2G] [--rounds N] [--quick]`

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::image;
use crate::peers::{Ours, Restic};
use crate::report::{bytes_str, mbps, median, ratio_str, secs_str, Report, Table};
use crate::scenario::s3::{aws_env, http, Moto};
use crate::tools::{self, Run};
use crate::Ctx;

/// Our bucket and the store in it.
const BUCKET: &str = "bench";
const STORE: &str = "s3://bench/store";
/// restic's bucket.
const RESTIC_BUCKET: &str = "restic";
/// Snapshot name of our backups.
const SNAPSHOT: &str = "disk";

/// The columns: who stores where.
const TOOLS: [&str; 3] = ["ours, local store", "ours on S3", "restic on S3"];
const OPS: [&str; 2] = ["backup", "restore"];

/// One timed run.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Measured {
    secs: f64,
    /// User + system CPU seconds of the tool and its children.
    cpu: f64,
    /// moto's CPU seconds during the run (0 for the local store).
    server_cpu: f64,
}

/// One round: `[operation][tool]`, in [`OPS`] × [`TOOLS`] order.
type Round = [[Measured; 3]; 2];

/// Sets an environment variable for the processes spawned while it
/// lives, then puts back what was there, so that later scenarios of an
/// `all` run do not inherit it.
struct EnvGuard {
    key: &'static str,
    old: Option<OsString>,
}

impl EnvGuard {
    fn new(key: &'static str, value: impl AsRef<OsStr>) -> EnvGuard {
        let old = std::env::var_os(key);
        std::env::set_var(key, value);
        EnvGuard { key, old }
    }

    fn set(&self, value: impl AsRef<OsStr>) {
        std::env::set_var(self.key, value);
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        match &self.old {
            Some(v) => std::env::set_var(self.key, v),
            None => std::env::remove_var(self.key),
        }
    }
}

/// Times `f` and charges moto's CPU time meanwhile when `server` is set.
fn timed(
    server: Option<&Moto>,
    f: impl FnOnce() -> anyhow::Result<Run>,
) -> anyhow::Result<Measured> {
    let cpu = || server.map_or(0.0, |m| tools::cpu_seconds(m.child.id()));
    let before = cpu();
    let run = f()?;
    Ok(Measured {
        secs: run.secs,
        cpu: run.cpu_secs,
        server_cpu: cpu() - before,
    })
}

/// Fails unless `restored` holds the bytes of `source`; then removes it.
fn check_and_remove(source: &Path, restored: &Path, who: &str) -> anyhow::Result<()> {
    if !image::same_contents(source, restored)
        .with_context(|| format!("compare {}", restored.display()))?
    {
        bail!(
            "{who}: the restored image {} differs from {}",
            restored.display(),
            source.display()
        );
    }
    std::fs::remove_file(restored)?;
    Ok(())
}

/// Empties the server and makes the two buckets.
fn reset(moto: &Moto) -> anyhow::Result<()> {
    let code = http(moto.port, "POST", "/moto-api/reset")?;
    if code != 200 {
        bail!("moto reset answered {code}");
    }
    for bucket in [BUCKET, RESTIC_BUCKET] {
        let code = http(moto.port, "PUT", &format!("/{bucket}"))?;
        if code != 200 {
            bail!("cannot create bucket {bucket}: HTTP {code}");
        }
    }
    Ok(())
}

/// One round on an empty server and fresh stores in `dir`.
fn round(
    ctx: &Ctx,
    moto: &Moto,
    img: &Path,
    dir: &Path,
    cache_dir: &EnvGuard,
) -> anyhow::Result<(Round, u64)> {
    crate::remove_dir_if_exists(dir)?;
    std::fs::create_dir_all(dir)?;
    reset(moto)?;
    cache_dir.set(dir.join("cache-backup"));
    let local = Ours::init(&ctx.cli, &dir.join("local"), None)?;
    let s3 = Ours::init(&ctx.cli, Path::new(STORE), None)?;
    let restic_repo = PathBuf::from(format!(
        "s3:http://127.0.0.1:{}/{RESTIC_BUCKET}/repo",
        moto.port
    ));
    let restic = Restic::init(&restic_repo, &dir.join("restic-cache-backup"))?;
    let restic_version = restic.repo_version()?;

    let mut r = Round::default();
    ctx.prepare(&[img])?;
    r[0][0] = timed(None, || Ok(local.backup(SNAPSHOT, img)?.0))?;
    ctx.prepare(&[img])?;
    r[0][1] = timed(Some(moto), || Ok(s3.backup(SNAPSHOT, img)?.0))?;
    ctx.prepare(&[img])?;
    r[0][2] = timed(Some(moto), || restic.backup(img))?;

    let target = dir.join("restored.img");
    ctx.prepare(&[&local.store])?;
    r[1][0] = timed(None, || local.restore(SNAPSHOT, &target))?;
    check_and_remove(img, &target, "ours from the local store")?;

    // A cache dir that has never seen the store, and no chunk cache.
    cache_dir.set(dir.join("cache-restore"));
    ctx.prepare(&[])?;
    r[1][1] = timed(Some(moto), || s3.restore(SNAPSHOT, &target))?;
    check_and_remove(img, &target, "ours from S3")?;

    let restic = Restic {
        repo: restic_repo,
        cache: dir.join("restic-cache-restore"),
    };
    let out = dir.join("restic-out");
    ctx.prepare(&[])?;
    r[1][2] = timed(Some(moto), || restic.restore(&out))?;
    // restic restores the file under its absolute path.
    let restored = out.join(img.strip_prefix("/").unwrap_or(img));
    check_and_remove(img, &restored, "restic from S3")?;

    crate::remove_dir_if_exists(dir)?;
    Ok((r, restic_version))
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    tools::require("moto_server")?;
    tools::require("restic")?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 256 << 20 } else { 2 << 30 });
    let img = std::fs::canonicalize(image::realistic(&ctx.images, size)?)?;
    let dir = ctx.scratch("s3-ingest")?;
    let moto = Moto::start()?;
    aws_env(moto.port);
    let _no_chunk_cache = EnvGuard::new(store_env::DISK_CACHE, "0");
    let cache_dir = EnvGuard::new(store_env::CACHE_DIR, dir.join("cache"));
    let mut report = ctx.report("s3-ingest");

    let mut rounds: Vec<Round> = Vec::new();
    let mut restic_version = 0;
    for n in 0..ctx.rounds {
        eprintln!("s3-ingest: round {}/{}", n + 1, ctx.rounds);
        let (r, v) = round(ctx, &moto, &img, &dir.join(format!("r{n}")), &cache_dir)?;
        restic_version = v;
        for (op, row) in OPS.iter().zip(&r) {
            eprintln!(
                "s3-ingest: round {} {op}: {}",
                n + 1,
                TOOLS
                    .iter()
                    .zip(row)
                    .map(|(t, m)| format!(
                        "{t} {:.2} s (cpu {:.2}, moto {:.2})",
                        m.secs, m.cpu, m.server_cpu
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        rounds.push(r);
    }
    drop(moto);
    crate::remove_dir_if_exists(&dir)?;

    let med = |op: usize, tool: usize, f: fn(&Measured) -> f64| {
        median(&rounds.iter().map(|r| f(&r[op][tool])).collect::<Vec<_>>())
    };
    let mut time = Table::new(
        &format!(
            "Backup and restore of a {} ext4 image on S3 (moto on loopback): wall time \
             (median of {} rounds)",
            bytes_str(size),
            ctx.rounds
        ),
        &[
            "operation",
            TOOLS[0],
            TOOLS[1],
            TOOLS[2],
            "ours S3 ÷ restic S3",
            "ours S3 ÷ ours local",
        ],
    );
    let mut cpu = Table::new(
        "CPU time (user + system of the tool and its children; moto's own CPU apart; median)",
        &[
            "operation",
            TOOLS[0],
            TOOLS[1],
            TOOLS[2],
            "ours S3 ÷ restic S3",
            "moto CPU: ours",
            "moto CPU: restic",
        ],
    );
    let mut medians = Vec::new();
    for (op, name) in OPS.iter().enumerate() {
        let secs = [0, 1, 2].map(|t| med(op, t, |m| m.secs));
        let tool_cpu = [0, 1, 2].map(|t| med(op, t, |m| m.cpu));
        let server = [1, 2].map(|t| med(op, t, |m| m.server_cpu));
        let cell = |s: f64| format!("{} ({:.0} MB/s)", secs_str(s), mbps(size, s));
        time.row(vec![
            name.to_string(),
            cell(secs[0]),
            cell(secs[1]),
            cell(secs[2]),
            ratio_str(secs[1] / secs[2]),
            ratio_str(secs[1] / secs[0]),
        ]);
        cpu.row(vec![
            name.to_string(),
            secs_str(tool_cpu[0]),
            secs_str(tool_cpu[1]),
            secs_str(tool_cpu[2]),
            ratio_str(tool_cpu[1] / tool_cpu[2]),
            secs_str(server[0]),
            secs_str(server[1]),
        ]);
        medians.push(serde_json::json!({
            "operation": name, "secs": secs, "cpu": tool_cpu, "moto_cpu": server,
        }));
    }
    time.note(format!(
        "Image: the ext4 image of `ingest` (`mke2fs -d` from {:.0} % of its size in files \
         from /usr). Every round starts from an empty moto (`/moto-api/reset`) and empty stores; \
         the runs go in the order of the columns, backups first, the page cache dropped before \
         each when allowed.",
        image::FILL * 100.0
    ));
    time.note(format!(
        "ours: release `recovery-cli backup` / `restore` (64 KiB chunks, lz4, default threads) \
         to a local directory and to `{STORE}`; restore from S3 with a fresh `--cache-dir` and \
         `RECOVERY_DISK_CACHE_SIZE=0`. restic: `restic backup` / `restore latest` with \
         `-r s3:http://127.0.0.1:PORT/{RESTIC_BUCKET}/repo`, repository format v{restic_version}, \
         a fresh cache for the restore."
    ));
    time.note(
        "Restores include a final `sync -f` of the target; each restored image was compared \
         byte for byte with the source (outside the timing).",
    );
    cpu.note(
        "moto is a Python server: every request costs it CPU, so its column shows how much \
         work each tool's request pattern makes for the server (on these 2 cores it competes \
         with the client).",
    );
    report.tables.push(time);
    report.tables.push(cpu);
    report.set("image_size", size);
    report.set("tools", TOOLS);
    report.set("restic_repository_version", restic_version);
    report.set("medians", medians);
    report.set("rounds", &rounds);
    Ok(report)
}

/// The variables `recovery-cli` reads (store/src/location.rs).
mod store_env {
    /// Bound of the on-disk chunk cache of a remote store; 0 turns it off.
    pub const DISK_CACHE: &str = "RECOVERY_DISK_CACHE_SIZE";
    /// The local cache of S3 stores (`--cache-dir`).
    pub const CACHE_DIR: &str = "RECOVERY_CACHE_DIR";
}
