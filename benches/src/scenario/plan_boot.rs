//! `plan-boot`: `instant-boot --plan` of a three-VM service (one disk
//! each, the realistic image series as the members of one group point)
//! against `instant-boot` of one of those disks: time from start to every
//! socket ready, and the aggregate migration throughput (image bytes of
//! every disk over the time until the last one is on its target, no guest
//! attached, no rate limit) against one disk's.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::image;
use crate::peers::Ours;
use crate::report::{mbps, median, ratio_str, secs_str, Report, Table};
use crate::scenario::migrate::wait_complete;
use crate::stack::Server;
use crate::Ctx;

/// The service's disks: `(vm, drive)`.
const DISKS: [(&str, &str); 3] = [("db", "disk0"), ("app", "disk0"), ("web", "disk0")];

/// Whether this `recovery-cli` has `instant-boot --plan`.
fn available(cli: &Path) -> bool {
    Command::new(cli)
        .args(["instant-boot", "--plan", "x", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--socket-dir"))
}

/// One run of the service: (ms to every socket ready, seconds to every
/// disk migrated, image bytes migrated).
fn service_round(ctx: &Ctx, plan: &Path, dir: &Path) -> anyhow::Result<(f64, f64, u64)> {
    let sockets = dir.join("sockets");
    std::fs::create_dir_all(&sockets)?;
    ctx.cold();
    let start = Instant::now();
    let mut child = Command::new(&ctx.cli)
        .args(["instant-boot", "--json", "--plan"])
        .arg(plan)
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--socket-dir")
        .arg(&sockets)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start instant-boot --plan")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let result = (|| {
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
        if ready["disks"].as_array().map_or(0, Vec::len) != DISKS.len() {
            bail!("instant-boot --plan served {ready}");
        }
        let control = sockets.join("control.sock");
        let done = wait_complete(&ctx.cli, &control, Duration::from_secs(1800))?;
        let secs = start.elapsed().as_secs_f64();
        Ok((secs, done["bytes_total"].as_u64().unwrap_or(0)))
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    let (secs, bytes) = result?;
    Ok((ready_ms, secs, bytes))
}

/// One run of one disk: (ms to the socket ready, seconds to migrated).
fn single_round(ctx: &Ctx, ours: &Ours, snapshot: &str, dir: &Path) -> anyhow::Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let extra = vec![
        "--target".to_string(),
        dir.join("target.raw").display().to_string(),
    ];
    ctx.cold();
    let start = Instant::now();
    let mut server = Server::ours(&ctx.cli, &ours.store, snapshot, dir, 256 << 20, &extra)?;
    server.wait_ready(Duration::from_secs(60))?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    let control = dir.join("state/control.sock");
    wait_complete(&ctx.cli, &control, Duration::from_secs(1800))?;
    let secs = start.elapsed().as_secs_f64();
    server.stop()?;
    Ok((ready_ms, secs))
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    if !available(&ctx.cli) {
        bail!("skipped: this recovery-cli has no `instant-boot --plan` yet");
    }
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 128 << 20 } else { 1 << 30 });
    let images = image::series(&ctx.images, size)?;
    let dir = ctx.scratch("plan-boot")?;
    let ours = Ours::init(&ctx.cli, &dir.join("store"), None)?;
    // The group point, as `backup --plan` publishes it (a local store:
    // the object is a file), its id the last member's instant.
    let mut members = Vec::new();
    let mut id = String::new();
    for ((vm, drive), img) in DISKS.iter().zip(&images) {
        let name = format!("portal-{vm}-{drive}");
        let (_, json) = ours.backup(&name, img)?;
        // `NAME@ID`.
        let reference = json["snapshot"]
            .as_str()
            .with_context(|| format!("backup printed no snapshot: {json}"))?
            .to_string();
        id = reference.rsplit('@').next().unwrap_or_default().to_string();
        members.push(serde_json::json!({"vm": vm, "drive": drive, "snapshot": reference}));
    }
    let group = serde_json::json!({
        "format": "instant-recovery-group",
        "version": 1,
        "service": "portal",
        "id": id,
        "instant": "",
        "blackout_ms": 0.0,
        "members": members,
    });
    let groups = ours.store.join("groups/portal");
    std::fs::create_dir_all(&groups)?;
    std::fs::write(groups.join(format!("{id}.json")), group.to_string())?;
    let first = members[0]["snapshot"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let mut report = ctx.report("plan-boot");
    let (mut s_ready, mut s_secs, mut one_ready, mut one_secs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for round in 0..ctx.rounds {
        let sub = dir.join("service");
        let targets = sub.join("targets");
        std::fs::create_dir_all(&targets)?;
        let plan = sub.join("portal.toml");
        let mut text = format!(
            "service = \"portal\"\nrpo = \"1h\"\nstore = \"{}\"\nscratch = \"{}\"\n",
            ours.store.display(),
            sub.display()
        );
        for (vm, drive) in DISKS {
            text.push_str(&format!(
                "\n[[vm]]\nname = \"{vm}\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"{drive}\", target = \"{}\" }} ]\n",
                sub.join(format!("{vm}.qmp")).display(),
                targets.join(format!("{vm}-{drive}.raw")).display()
            ));
        }
        std::fs::write(&plan, text)?;
        let (ready, secs, total) = service_round(ctx, &plan, &sub)?;
        if round == 0 && !image::same_contents(&images[2], &targets.join("web-disk0.raw"))? {
            bail!("the migrated web target differs from its image");
        }
        crate::remove_dir_if_exists(&sub)?;
        let one = dir.join("one");
        let (r1, t1) = single_round(ctx, &ours, &first, &one)?;
        crate::remove_dir_if_exists(&one)?;
        eprintln!(
            "plan-boot: service ready {ready:.0} ms, {} disks migrated in {secs:.2} s; one disk ready {r1:.0} ms, migrated in {t1:.2} s",
            DISKS.len()
        );
        bytes = total;
        s_ready.push(ready);
        s_secs.push(secs);
        one_ready.push(r1);
        one_secs.push(t1);
    }
    let (sr, ss, or, os) = (
        median(&s_ready),
        median(&s_secs),
        median(&one_ready),
        median(&one_secs),
    );
    let (service_mbps, one_mbps) = (mbps(bytes, ss), mbps(size, os));
    let mut t = Table::new(
        &format!(
            "instant-boot --plan: {} disks of {} MiB against one (median of {})",
            DISKS.len(),
            size >> 20,
            ctx.rounds
        ),
        &["", "sockets ready", "migrated", "throughput"],
    );
    t.row(vec![
        format!("service, {} disks, one daemon", DISKS.len()),
        format!("{sr:.0} ms"),
        secs_str(ss),
        format!("{service_mbps:.0} MB/s"),
    ]);
    t.row(vec![
        "one disk".into(),
        format!("{or:.0} ms"),
        secs_str(os),
        format!("{one_mbps:.0} MB/s"),
    ]);
    t.note(format!(
        "aggregate throughput {} of one disk's; the members are the realistic image series (they share most chunks), no guest, no rate limit",
        ratio_str(service_mbps / one_mbps.max(f64::MIN_POSITIVE))
    ));
    report.tables.push(t);
    report.set("service_ready_ms", sr);
    report.set("one_ready_ms", or);
    report.set("service_mbps", service_mbps);
    report.set("one_mbps", one_mbps);
    crate::remove_dir_if_exists(&dir)?;
    Ok(report)
}
