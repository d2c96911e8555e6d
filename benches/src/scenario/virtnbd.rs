//! `virtnbd`: live backup of a running libvirt domain's disk, ours
//! (`recovery-cli backup --domain`) against virtnbdbackup, both through
//! libvirt's backup API in pull mode.
//!
//! virtnbdbackup refuses a domain that holds checkpoints it did not create,
//! so each tool gets its own domain: two identical idle TCG domains (no OS,
//! SeaBIOS waits) whose `vda` are qcow2 copies of the realistic ext4 image.
//! Both disks receive the same changes, written through QEMU's block layer
//! (HMP `qemu-io` via libvirt, as a guest's writes would go, so the dirty
//! bitmaps see them): 1 % of the disk as 64 KiB blocks at random places
//! (libvirt's bitmaps have 64 KiB granularity, so a scattered 4 KiB write
//! costs both tools a 64 KiB read anyway; one monitor command per write
//! takes about half a second under TCG here, too slow for 1 % of the 4 KiB
//! blocks), a one-byte pattern each.
//!
//! Full: `--full` into an empty store against `virtnbdbackup -l full` into
//! an empty directory. Incremental: after each round of changes, `backup
//! --domain` (parent: the previous snapshot) against `virtnbdbackup -l inc`
//! into the same directory. Each round runs both tools, alternating which
//! goes first; tables show the median. Bytes read: ours from its JSON
//! (`bytes_read`), virtnbdbackup from its log ("bytes of data extents to
//! backup"). Store growth: bytes the store or directory grew by.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};

use crate::image;
use crate::report::{bytes_str, median, ratio_str, secs_str, Report, Table};
use crate::tools;
use crate::Ctx;

const URI: &str = "qemu:///system";
/// Fraction of the disk rewritten between incrementals, in [`BLOCK`]s.
const CHANGED: f64 = 0.01;
/// Size of one rewritten block.
const BLOCK: u64 = 65536;

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    Ok(tools::run(Command::new("virsh").args(["-c", URI]).args(args))?.stdout)
}

/// Start virtlogd and libvirtd unless libvirtd already answers.
fn ensure_libvirtd() -> anyhow::Result<()> {
    if virsh(&["version"]).is_ok() {
        return Ok(());
    }
    for d in ["virtlogd", "libvirtd"] {
        let _ = Command::new(d)
            .arg("-d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while virsh(&["version"]).is_err() {
        if Instant::now() > deadline {
            bail!("libvirtd does not answer on {URI}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// A transient idle domain; destroyed on drop.
struct Domain {
    name: String,
}

impl Domain {
    fn create(name: &str, disk: &Path, dir: &Path) -> anyhow::Result<Domain> {
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
                 <vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>\
                 <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
                 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
                 <controller type='usb' model='none'/><memballoon model='none'/>\
                 </devices></domain>",
                disk.display()
            ),
        )?;
        virsh(&["create", &xml.to_string_lossy()])?;
        Ok(Domain {
            name: name.to_owned(),
        })
    }

    /// Write `pattern` over the [`BLOCK`]s at `offsets`, through QEMU's
    /// block layer (one virsh session for all).
    fn rewrite(&self, offsets: &[u64], pattern: u8) -> anyhow::Result<()> {
        let mut child = Command::new("virsh")
            .args(["-c", URI])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn virsh")?;
        {
            let mut stdin = child.stdin.take().context("virsh stdin")?;
            for o in offsets {
                writeln!(
                    stdin,
                    "qemu-monitor-command {} --hmp 'qemu-io -d \
                     /machine/peripheral/virtio-disk0/virtio-backend \"write -P {pattern} {o} {BLOCK}\"'",
                    self.name
                )?;
            }
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("rror") {
            bail!("rewriting blocks of {} failed: {text}", self.name);
        }
        Ok(())
    }

    fn delete_checkpoints(&self) -> anyhow::Result<()> {
        for c in virsh(&["checkpoint-list", &self.name, "--name"])?.lines() {
            if !c.trim().is_empty() {
                virsh(&["checkpoint-delete", &self.name, c.trim()])?;
            }
        }
        Ok(())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// One timed backup.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    secs: f64,
    read: u64,
    growth: u64,
}

fn ours(
    ctx: &Ctx,
    store: &Path,
    dom: &Domain,
    scratch: &Path,
    full: bool,
) -> anyhow::Result<Sample> {
    let before = tools::dir_bytes(store)?;
    let mut cmd = Command::new(&ctx.cli);
    cmd.args(["backup", "--name", "disk", "--disk", "vda", "--json"])
        .args(["--connect", URI, "--domain", &dom.name])
        .arg("--store")
        .arg(store)
        .arg("--scratch")
        .arg(scratch);
    if full {
        cmd.arg("--full");
    }
    let run = tools::run(&mut cmd)?;
    let r: serde_json::Value = serde_json::from_str(&run.stdout)?;
    let want = if full { "full" } else { "incremental" };
    if r["mode"] != want {
        bail!("recovery-cli took a {} backup, not {want}: {r}", r["mode"]);
    }
    Ok(Sample {
        secs: run.secs,
        read: r["bytes_read"].as_u64().unwrap_or(0),
        growth: tools::dir_bytes(store)?.saturating_sub(before),
    })
}

fn virtnbd(dir: &Path, dom: &Domain, scratch: &Path, full: bool) -> anyhow::Result<Sample> {
    let before = if dir.exists() {
        tools::dir_bytes(dir)?
    } else {
        0
    };
    let run = tools::run(
        Command::new("virtnbdbackup")
            .args(["-U", URI, "-d", &dom.name, "-n"])
            .args(["-l", if full { "full" } else { "inc" }])
            .arg("-S")
            .arg(scratch)
            .arg("-o")
            .arg(dir),
    )?;
    let read = (run.stdout.clone() + &run.stderr)
        .lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" bytes of data extents to backup")?;
            head.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    Ok(Sample {
        secs: run.secs,
        read,
        growth: tools::dir_bytes(dir)?.saturating_sub(before),
    })
}

fn table(title: &str, o: &[Sample], v: &[Sample]) -> Table {
    let med = |s: &[Sample], f: fn(&Sample) -> f64| median(&s.iter().map(f).collect::<Vec<_>>());
    let mut t = Table::new(
        title,
        &[
            "tool",
            "time",
            "bytes read",
            "store growth",
            "tool ÷ ours (time)",
        ],
    );
    let ot = med(o, |s| s.secs);
    for (name, s) in [
        ("ours: `recovery-cli backup --domain`", o),
        ("`virtnbdbackup`", v),
    ] {
        let secs = med(s, |s| s.secs);
        t.row(vec![
            name.to_string(),
            secs_str(secs),
            bytes_str(med(s, |s| s.read as f64) as u64),
            bytes_str(med(s, |s| s.growth as f64) as u64),
            ratio_str(secs / ot),
        ]);
    }
    t
}

/// Runs the scenario.
pub fn run(ctx: &Ctx) -> anyhow::Result<Report> {
    for t in ["virsh", "virtnbdbackup", "qemu-img"] {
        tools::require(t)?;
    }
    ensure_libvirtd()?;
    let size = ctx
        .size
        .unwrap_or(if ctx.quick { 128 << 20 } else { 512 << 20 });
    let raw = image::realistic(&ctx.images, size)?;
    let dir = ctx.scratch("virtnbd")?;
    // libvirt's QEMU user must reach the disks; the scratch directories
    // stay ours (recovery-cli and virtnbdbackup hand QEMU a socket there).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let tag = std::process::id();
    let mut doms = Vec::new();
    for who in ["ours", "vnb"] {
        let disk = dir.join(format!("{who}.qcow2"));
        tools::run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-O", "qcow2"])
                .arg(&raw)
                .arg(&disk),
        )?;
        eprintln!("virtnbd: starting domain {who} (libvirt probes QEMU: up to a minute)");
        doms.push((
            Domain::create(&format!("recovery-bench-{who}-{tag}"), &disk, &dir)?,
            disk,
        ));
    }
    let (od, vd) = (&doms[0], &doms[1]);
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let rounds = ctx.rounds;
    let store_at = |r: usize| dir.join(format!("store-{r}"));
    let vnb_at = |r: usize| dir.join(format!("vnb-{r}"));

    let (mut of, mut vf) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let store = store_at(r);
        tools::run(Command::new(&ctx.cli).arg("init").arg(&store))?;
        od.0.delete_checkpoints()?;
        let mut go = |first: bool| -> anyhow::Result<()> {
            if first {
                ctx.prepare(&[&od.1])?;
                of.push(ours(ctx, &store, &od.0, &scratch, true)?);
            } else {
                ctx.prepare(&[&vd.1])?;
                vf.push(virtnbd(&vnb_at(r), &vd.0, &scratch, true)?);
            }
            Ok(())
        };
        go(r % 2 == 0)?;
        go(r % 2 != 0)?;
        eprintln!(
            "virtnbd: full round {r}: ours {:.2} s, virtnbdbackup {:.2} s",
            of[r].secs, vf[r].secs
        );
    }

    let blocks = size / BLOCK;
    let n = ((blocks as f64) * CHANGED).round() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (last_store, last_vnb) = (store_at(rounds - 1), vnb_at(rounds - 1));
    let (mut oi, mut vi) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut offsets: Vec<u64> = rand::seq::index::sample(&mut rng, blocks as usize, n)
            .into_iter()
            .map(|b| b as u64 * BLOCK)
            .collect();
        offsets.sort_unstable();
        let pattern: u8 = rng.gen_range(1..=255);
        // Both disks at once (each write is a slow monitor round trip).
        std::thread::scope(|s| {
            let o = s.spawn(|| od.0.rewrite(&offsets, pattern));
            let v = vd.0.rewrite(&offsets, pattern);
            o.join()
                .map_err(|_| anyhow::anyhow!("rewrite thread panicked"))??;
            v
        })?;
        let mut go = |first: bool| -> anyhow::Result<()> {
            if first {
                ctx.prepare(&[&od.1])?;
                oi.push(ours(ctx, &last_store, &od.0, &scratch, false)?);
            } else {
                ctx.prepare(&[&vd.1])?;
                vi.push(virtnbd(&last_vnb, &vd.0, &scratch, false)?);
            }
            Ok(())
        };
        go(r % 2 == 0)?;
        go(r % 2 != 0)?;
        eprintln!(
            "virtnbd: incremental round {r}: ours {:.2} s ({} read), virtnbdbackup {:.2} s ({} read)",
            oi[r].secs,
            bytes_str(oi[r].read),
            vi[r].secs,
            bytes_str(vi[r].read)
        );
    }

    // The last snapshot is the disk as it is now (nothing writes to it).
    let restored = dir.join("restored.img");
    tools::run(
        Command::new(&ctx.cli)
            .args(["restore", "--store"])
            .arg(&last_store)
            .arg("disk")
            .arg(&restored),
    )?;
    tools::run(
        Command::new("qemu-img")
            .args(["compare", "-U", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(&restored)
            .arg(&od.1),
    )
    .context("the restored incremental differs from the domain's disk")?;
    drop(doms);

    let mut report = ctx.report("virtnbd");
    report.tables.push(table(
        &format!(
            "Full backup of a running libvirt domain's {} qcow2 disk (ext4, median of {rounds})",
            bytes_str(size)
        ),
        &of,
        &vf,
    ));
    let mut t = table(
        &format!(
            "Incremental backup after {:.0} % of the disk was rewritten ({n} random 64 KiB blocks, median of {rounds})",
            CHANGED * 100.0
        ),
        &oi,
        &vi,
    );
    t.note("Both read through libvirt's pull-mode backup: NBD export of the point in time, dirty bitmap of the checkpoint. virtnbdbackup writes its stream format uncompressed (no `-z`); ours stores compressed, deduplicated 64 KiB chunks and a new snapshot manifest.");
    t.note("Each tool has its own domain (virtnbdbackup refuses foreign checkpoints); both disks get the same writes. The restored last incremental of ours equals the domain's disk (qemu-img compare).");
    report.tables.push(t);
    let mt = |s: &[Sample]| median(&s.iter().map(|s| s.secs).collect::<Vec<_>>());
    report.target_max(
        "incremental time vs virtnbdbackup inc",
        mt(&oi) / mt(&vi),
        1.0,
    );
    report.target_max("full time vs virtnbdbackup full", mt(&of) / mt(&vf), 1.0);
    report.set("image_size", size);
    report.set("changed_blocks", n);
    let js = |s: &[Sample]| {
        s.iter()
            .map(|s| serde_json::json!({"secs": s.secs, "read": s.read, "growth": s.growth}))
            .collect::<Vec<_>>()
    };
    report.set(
        "samples",
        serde_json::json!({"ours_full": js(&of), "virtnbd_full": js(&vf),
            "ours_inc": js(&oi), "virtnbd_inc": js(&vi)}),
    );
    crate::remove_dir_if_exists(&dir)?;
    Ok(report)
}
