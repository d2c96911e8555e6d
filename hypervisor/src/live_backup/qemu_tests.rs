//! Live backups against a real QEMU (`-M none`, a qcow2 or raw
//! `-blockdev`, no guest): the disk changes between and during backups
//! through QEMU's own block layer (HMP `qemu-io`), and every snapshot is
//! restored and compared with what the disk held at its point in time.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

use super::*;
use crate::testing;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

struct Vm {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    store: Store,
    qmp: PathBuf,
    proc: testing::Proc,
    img: PathBuf,
    format: &'static str,
    /// What the disk holds now.
    want: Vec<u8>,
}

impl Vm {
    fn start(format: &'static str) -> Option<Vm> {
        if !testing::require_qemu() {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let store = Store::init(&dir.join("store"), 65536).unwrap();
        let img = dir.join(format!("disk.{format}"));
        testing::qemu_img_create(&img, format, SIZE);
        let mut want = vec![0u8; SIZE as usize];
        testing::qemu_io(
            &img,
            format,
            &["write -P 0x61 1M 3M", "write -P 0x62 10M 64k"],
        );
        want[MIB as usize..4 * MIB as usize].fill(0x61);
        want[10 * MIB as usize..(10 * MIB + 65536) as usize].fill(0x62);
        let qmp = dir.join("qmp.sock");
        let proc = testing::qemu_none(&qmp, &Self::args(&dir, &img, format));
        Some(Vm {
            _dir: tmp,
            dir,
            store,
            qmp,
            proc,
            img,
            format,
            want,
        })
    }

    /// Shut QEMU down cleanly (`quit`: persistent bitmaps are written) and
    /// start it again on the same disk.
    fn restart(&mut self) {
        let _ = self.qmp().execute_value("quit", None);
        let deadline = std::time::Instant::now() + testing::START_TIMEOUT;
        while self.proc.running() {
            assert!(std::time::Instant::now() < deadline, "QEMU did not quit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.proc = testing::qemu_none(&self.qmp, &Self::args(&self.dir, &self.img, self.format));
    }

    /// The disk, and a second QMP monitor (`qmp2.sock`) for the test while
    /// a backup holds the first.
    fn args(dir: &Path, img: &Path, format: &str) -> Vec<String> {
        let mut args = testing::blockdev_args(img, format, "disk0");
        args.push("-qmp".into());
        args.push(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp2.sock").display()
        ));
        args
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp).unwrap()
    }

    /// Write `len` bytes of `byte` at `offset` through QEMU.
    fn write(&mut self, offset: u64, len: u64, byte: u8) {
        self.write_via("disk0", offset, len, byte)
    }

    /// The same through node `node` (the copy-before-write filter while a
    /// fleece runs: as the guest's writes go).
    fn write_via(&mut self, node: &str, offset: u64, len: u64, byte: u8) {
        qemu_io(
            &mut self.qmp(),
            node,
            &format!("write -P {byte} {offset} {len}"),
        );
        self.want[offset as usize..(offset + len) as usize].fill(byte);
    }

    /// `on_size` runs before the start transaction (tests raise `abort`
    /// there: the backup is then interrupted right after it).
    fn backup(
        &self,
        full: bool,
        abort: &AtomicBool,
        on_size: Option<store::Progress<'_>>,
    ) -> Result<Report> {
        self.backup_at(Rate::Fixed(0), full, abort, on_size)
    }

    /// [`Vm::backup`] with its reads paced by `rate`.
    fn backup_at(
        &self,
        rate: Rate,
        full: bool,
        abort: &AtomicBool,
        on_size: Option<store::Progress<'_>>,
    ) -> Result<Report> {
        let cfg = Config {
            name: "vm".into(),
            qmp: self.qmp.clone(),
            drive: "disk0".into(),
            full,
            scratch: self.dir.clone(),
            qga: None,
            threads: Some(2),
            rate,
            abort,
            progress: None,
            on_size,
        };
        run(&self.store, &cfg)
    }

    /// Restore `snapshot` and compare with `want`.
    fn check(&self, snapshot: &str, want: &[u8]) {
        let out = self.dir.join("restored.img");
        let _ = std::fs::remove_file(&out);
        self.store
            .restore(snapshot, &out, &store::RestoreOptions::default())
            .unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!("{snapshot} differs from the disk at byte {i}");
        }
    }

    /// Nothing of ours is left in QEMU but one bitmap; no scratch files.
    fn assert_clean(&self) -> Vec<qmp::DirtyBitmap> {
        let mut q = self.qmp();
        assert!(q.query_block_exports().unwrap().is_empty());
        assert!(q.query_block_jobs().unwrap().is_empty());
        let nodes = q.query_named_block_nodes().unwrap();
        let names: Vec<_> = nodes.iter().map(|n| n.node_name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let leftovers: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ir-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let disk = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
        disk.dirty_bitmaps.clone()
    }
}

/// The member of an incremental over `base` (a backup's report), its
/// fleece prepared and its start transaction run, as `run` does before
/// exporting.
fn started_incremental(vm: &Vm, q: &mut Qmp, base: &Report) -> Member {
    let names = Names::new(&store_tag(&vm.store));
    let drive = fleece::resolve_drive(q, "disk0").unwrap();
    let mut m = Member {
        name: "vm".into(),
        new_bitmap: names.bitmap("vm"),
        drive: drive.clone(),
        mode: Mode::Incremental {
            base: base.bitmap.clone(),
            parent: base.snapshot.split('@').nth(1).unwrap().to_owned(),
        },
        names,
        qmp: vm.qmp.clone(),
        scratch: vm.dir.clone(),
        ours: Vec::new(),
        fleece: Fleece::default(),
        added: false,
        pacing: None,
    };
    m.fleece.prepare(q, &m.names, &drive, &vm.dir).unwrap();
    q.transaction(&m.start_actions(65536)).unwrap();
    m.started();
    m
}

/// HMP `qemu-io NODE "CMD"` over `q`; its output.
fn qemu_io(q: &mut Qmp, node: &str, cmd: &str) -> String {
    let line = format!("qemu-io {node} \"{cmd}\"");
    let out = q
        .execute_value(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )
        .unwrap();
    let out = out.as_str().unwrap_or_default().to_owned();
    assert!(!out.to_ascii_lowercase().contains("error"), "{line}: {out}");
    out
}

fn no_abort() -> AtomicBool {
    AtomicBool::new(false)
}

#[test]
fn full_then_incremental_reads_only_what_changed() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    let r1 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r1.mode, "full");
    assert!(
        r1.reason
            .as_deref()
            .unwrap()
            .contains("no earlier snapshot"),
        "{r1:?}"
    );
    // Zero ranges are never read: only the 3 MiB + 64 KiB written.
    assert_eq!(r1.bytes_read, 3 * MIB + 65536, "{r1:?}");
    let b = vm.assert_clean();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].name, r1.bitmap);
    // Finer than a chunk: a small write costs a small read.
    assert!(b[0].persistent && b[0].recording && b[0].granularity == 4096);
    vm.check(&r1.snapshot, &vm.want.clone());

    // 64 KiB, 4 KiB inside another chunk, and 128 KiB over two chunks.
    vm.write(2 * MIB, 65536, 0x71);
    vm.write(5 * MIB + 8192, 4096, 0x72);
    vm.write(20 * MIB, 131072, 0x73);
    let r2 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r2.mode, "incremental", "{r2:?}");
    assert_eq!(r2.reason, None);
    // Exactly the written bytes cross NBD; the rest of the 4 KiB write's
    // chunk comes from the parent snapshot.
    assert_eq!(r2.dirty_bytes, 65536 + 4096 + 131072, "{r2:?}");
    assert_eq!(r2.bytes_read, 65536 + 4096 + 131072, "{r2:?}");
    assert_eq!(r2.parent.as_deref(), r1.snapshot.split('@').nth(1));
    assert!(r2.chunks_unchanged >= SIZE / 65536 - 4 - 16, "{r2:?}");
    let b = vm.assert_clean();
    assert_eq!(
        b.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        [r2.bitmap.as_str()]
    );
    vm.check(&r2.snapshot, &vm.want.clone());
    vm.check(&r1.snapshot, &{
        let mut w = vm.want.clone();
        w[2 * MIB as usize..(2 * MIB + 65536) as usize].fill(0x61);
        w[(5 * MIB + 8192) as usize..(5 * MIB + 12288) as usize].fill(0);
        w[20 * MIB as usize..(20 * MIB + 131072) as usize].fill(0);
        w
    });

    // Nothing changed: nothing read. --full reads everything again.
    let r3 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(
        (r3.mode, r3.bytes_read, r3.dirty_bytes),
        ("incremental", 0, 0)
    );
    let r4 = vm.backup(true, &no_abort(), None).unwrap();
    assert_eq!(r4.mode, "full");
    assert!(r4.reason.as_deref().unwrap().contains("--full"));
    assert_eq!(r4.bytes_read, 3 * MIB + 65536 + 131072 + 65536, "{r4:?}");
    assert_eq!(vm.assert_clean().len(), 1);
    vm.check(&r4.snapshot, &vm.want.clone());
}

#[test]
fn an_incremental_copies_before_write_only_what_it_reads() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    vm.backup(false, &no_abort(), None).unwrap();
    vm.write(2 * MIB, 65536, 0x71);
    vm.write(9 * MIB, 65536, 0x72);
    let at_instant = vm.want.clone();
    // While the incremental runs (after its start transaction), the guest
    // overwrites a dirty chunk and a clean one, through the
    // copy-before-write filter as a device's writes go. (The job copies
    // at most the first dirty run, 2 MiB, on its own: the filter stays
    // while 9 MiB is pending.)
    let grew = std::sync::Mutex::new(None::<(u64, u64)>);
    let once = std::sync::Once::new();
    let qmp2 = vm.dir.join("qmp2.sock");
    let during = |_: u64| {
        once.call_once(|| {
            let mut q = Qmp::connect(&qmp2).unwrap();
            let nodes = q.query_named_block_nodes().unwrap();
            let find = |kind: &str| {
                nodes
                    .iter()
                    .map(|n| n.node_name.clone())
                    .find(|n| n.starts_with("ir-") && n.contains(kind))
                    .unwrap()
            };
            let (filter, scratch) = (find("-cbw-"), find("-fl-"));
            // The scratch image's allocated bytes (its file's blocks).
            let used = |q: &mut Qmp| {
                let v = q.execute_value("query-named-block-nodes", None).unwrap();
                v.as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["node-name"] == scratch.as_str())
                    .and_then(|n| n["image"]["actual-size"].as_u64())
                    .unwrap()
            };
            let before = used(&mut q);
            // Once every dirty chunk is copied the job ends and takes the
            // filter away: the clean chunk first.
            qemu_io(&mut q, &filter, "write -P 0x82 6M 64k");
            let after_clean = used(&mut q);
            qemu_io(&mut q, &filter, "write -P 0x81 9M 64k");
            let after_dirty = used(&mut q);
            *grew.lock().unwrap() = Some((after_clean - before, after_dirty - after_clean));
        })
    };
    let cfg = Config {
        name: "vm".into(),
        qmp: vm.qmp.clone(),
        drive: "disk0".into(),
        full: false,
        scratch: vm.dir.clone(),
        qga: None,
        threads: Some(2),
        rate: Rate::Fixed(0),
        abort: &no_abort(),
        progress: Some(&during),
        on_size: None,
    };
    let r2 = run(&vm.store, &cfg).unwrap();
    assert_eq!(r2.mode, "incremental", "{r2:?}");
    vm.want[9 * MIB as usize..(9 * MIB + 65536) as usize].fill(0x81);
    vm.want[6 * MIB as usize..(6 * MIB + 65536) as usize].fill(0x82);
    // The point in time: the dirty chunk as it was, not the guest's later
    // write; the clean one from the parent.
    vm.check(&r2.snapshot, &at_instant);
    // The guest's write to a chunk the backup does not read cost no copy;
    // the one to a dirty chunk copied it first.
    let (clean, dirty) = grew
        .into_inner()
        .unwrap()
        .expect("the guest wrote during the backup");
    assert_eq!(clean, 0, "the scratch image grew on a clean chunk's write");
    assert!(dirty >= 65536, "the dirty chunk was not copied: {dirty}");
    vm.assert_clean();
    let r3 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r3.bytes_read, 2 * 65536, "{r3:?}");
    vm.check(&r3.snapshot, &vm.want.clone());
}

#[test]
fn auto_pacing_needs_a_guest_device() {
    // `-M none`: the node is attached to no device, so there is no guest
    // latency to watch. A clear error, and nothing left in QEMU.
    let Some(vm) = Vm::start("qcow2") else {
        return;
    };
    let e = vm
        .backup_at(Rate::Auto, false, &no_abort(), None)
        .unwrap_err();
    assert!(e.to_string().contains("attached to no device"), "{e}");
    vm.assert_clean();
}

#[test]
fn a_rate_limit_paces_the_reads() {
    let Some(vm) = Vm::start("qcow2") else {
        return;
    };
    let rate = 4 * MIB;
    let started = std::time::Instant::now();
    let r = vm
        .backup_at(Rate::Fixed(rate), false, &no_abort(), None)
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    assert_eq!(r.bytes_read, 3 * MIB + 65536, "{r:?}");
    // Each read waits for its slot: all but the first (at most a few
    // chunks at once) take bytes / rate. (Unlimited, this backup takes
    // a few ms.)
    let floor = (r.bytes_read - MIB) as f64 / rate as f64;
    assert!(
        took >= floor,
        "{took:.3} s for {} bytes at {rate} B/s",
        r.bytes_read
    );
    vm.check(&r.snapshot, &vm.want.clone());
}

#[test]
fn an_incremental_job_copies_one_run_at_most_on_its_own() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    let r1 = vm.backup(false, &no_abort(), None).unwrap();
    vm.write(2 * MIB, 65536, 0x71);
    vm.write(9 * MIB, 65536, 0x72);
    let mut q = vm.qmp();
    let mut m = started_incremental(&vm, &mut q, &r1);
    // Of the two dirty chunks it copies the first on its own (the rate
    // limit lets one run through), then only copies before write.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let jobs = q.execute_value("query-block-jobs", None).unwrap();
    let offset = jobs[0]["offset"].as_u64().unwrap_or(u64::MAX);
    assert!(
        jobs[0]["status"] == "running" && offset <= 65536 && jobs[0]["len"] == 131072,
        "{jobs}"
    );
    assert!(m.teardown(&mut q).is_empty());
    m.finish(&mut q, false).unwrap();
    drop(q);
    let b = vm.assert_clean();
    assert_eq!(
        b.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        [r1.bitmap.as_str()]
    );
}

#[test]
fn failed_and_interrupted_backups_keep_every_change_tracked() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    let r1 = vm.backup(false, &no_abort(), None).unwrap();
    vm.write(6 * MIB, 65536, 0x41);

    // Interrupted (as by Ctrl-C) after the start transaction.
    let abort = AtomicBool::new(false);
    let stop = |_: u64| abort.store(true, Ordering::Relaxed);
    vm.write(12 * MIB, 65536, 0x42);
    let e = vm.backup(true, &abort, Some(&stop)).unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    let b = vm.assert_clean();
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].recording);

    // Incremental interrupted after its start transaction: the new bitmap
    // is merged back into the base.
    let abort = AtomicBool::new(false);
    let stop = |_: u64| abort.store(true, Ordering::Relaxed);
    let e = vm.backup(false, &abort, Some(&stop)).unwrap_err();
    assert!(matches!(e, Error::Interrupted), "{e}");
    let b = vm.assert_clean();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].name, r1.bitmap);
    assert!(b[0].recording);

    vm.write(14 * MIB, 65536, 0x43);
    let r2 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r2.mode, "incremental", "{r2:?}");
    assert_eq!(r2.bytes_read, 3 * 65536, "{r2:?}");
    vm.check(&r2.snapshot, &vm.want.clone());
}

#[test]
fn leftovers_of_a_killed_run_are_cleared_and_changes_kept() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    let r1 = vm.backup(false, &no_abort(), None).unwrap();
    vm.write(3 * MIB, 65536, 0x51);
    vm.write(5 * MIB, 65536, 0x53);
    // What an incremental killed after exporting leaves: scratch node, job
    // (held on its copy of the base by its rate limit), export, NBD
    // server, the job's copy of the base, a disabled base and an enabled
    // new bitmap.
    let filter = {
        let mut q = vm.qmp();
        let mut m = started_incremental(&vm, &mut q, &r1);
        m.fleece
            .export(&mut q, &m.names, &vm.dir, std::slice::from_ref(&r1.bitmap))
            .unwrap();
        let filter = m.names.filter();
        std::mem::forget(m);
        filter
    };
    vm.write_via(&filter, 8 * MIB, 65536, 0x52);
    let r2 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r2.mode, "incremental", "{r2:?}");
    assert_eq!(r2.bytes_read, 3 * 65536, "{r2:?}");
    assert!(
        r2.leftovers_cleared.len() >= 4,
        "{:?}",
        r2.leftovers_cleared
    );
    let b = vm.assert_clean();
    assert_eq!(
        b.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        [r2.bitmap.as_str()]
    );
    vm.check(&r2.snapshot, &vm.want.clone());
}

#[test]
fn raw_disk_bitmaps_live_in_memory_and_bad_input_is_clear() {
    let Some(mut vm) = Vm::start("raw") else {
        return;
    };
    let r1 = vm.backup(false, &no_abort(), None).unwrap();
    let b = vm.assert_clean();
    assert!(!b[0].persistent, "{b:?}");
    vm.write(0, 65536, 0x11);
    // Someone removes our bitmap: the next backup is full and says why.
    vm.qmp().bitmap_remove("disk0", &r1.bitmap).unwrap();
    let r2 = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r2.mode, "full");
    assert!(
        r2.reason.as_deref().unwrap().contains("is missing"),
        "{r2:?}"
    );
    vm.check(&r2.snapshot, &vm.want.clone());

    // Unknown drive: the error lists the drives; nothing is left behind.
    let cfg = Config {
        name: "vm".into(),
        qmp: vm.qmp.clone(),
        drive: "nope".into(),
        full: false,
        scratch: vm.dir.clone(),
        qga: None,
        threads: None,
        rate: Rate::Fixed(0),
        abort: &no_abort(),
        progress: None,
        on_size: None,
    };
    let e = run(&vm.store, &cfg).unwrap_err();
    assert!(e.to_string().contains("Unknown drive \"nope\""), "{e}");
    assert!(e.to_string().contains("node disk0 (raw)"), "{e}");
    vm.assert_clean();
    // A wrong QMP path.
    let cfg = Config {
        qmp: vm.dir.join("missing.sock"),
        drive: "disk0".into(),
        ..cfg
    };
    let e = run(&vm.store, &cfg).unwrap_err();
    let chain = crate::nbd::error_chain(&e);
    assert!(chain.contains("missing.sock"), "{chain}");
    assert!(vm.proc.running());
}

#[test]
fn snapshot_names_record_their_bitmap() {
    let p = Path::new("/run/vm/qmp.sock");
    assert_eq!(
        recorded_bitmap(&source_string(p, "disk0", "ir-1-vm-2")),
        Some("ir-1-vm-2")
    );
}

#[test]
fn qcow2_bitmaps_survive_a_restart_raw_ones_do_not() {
    for format in ["qcow2", "raw"] {
        let Some(mut vm) = Vm::start(format) else {
            return;
        };
        vm.backup(false, &no_abort(), None).unwrap();
        vm.write(7 * MIB, 65536, 0x33);
        vm.restart();
        let r2 = vm.backup(false, &no_abort(), None).unwrap();
        if format == "qcow2" {
            assert_eq!(r2.mode, "incremental", "{r2:?}");
            assert_eq!(r2.bytes_read, 65536, "{r2:?}");
        } else {
            assert_eq!(r2.mode, "full", "{r2:?}");
            assert!(
                r2.reason.as_deref().unwrap().contains("is missing"),
                "{r2:?}"
            );
        }
        vm.check(&r2.snapshot, &vm.want.clone());
        vm.assert_clean();
    }
}

#[test]
fn guest_agent_freezes_only_around_the_start_transaction() {
    let Some(vm) = Vm::start("qcow2") else {
        return;
    };
    let sock = vm.dir.join("qga.sock");
    let agent = crate::qga::tests::agent(&sock);
    let abort = no_abort();
    let cfg = Config {
        name: "vm".into(),
        qmp: vm.qmp.clone(),
        drive: "disk0".into(),
        full: false,
        scratch: vm.dir.clone(),
        qga: Some(sock),
        threads: None,
        rate: Rate::Fixed(0),
        abort: &abort,
        progress: None,
        on_size: None,
    };
    let r = run(&vm.store, &cfg).unwrap();
    let frozen = r.frozen_ms.expect("frozen time reported");
    assert!(frozen >= r.blackout_ms, "{r:?}");
    // The session ends with the backup: frozen, thawed, nothing else.
    assert_eq!(
        agent.join().unwrap(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw"
        ]
    );
    vm.assert_clean();
    vm.check(&r.snapshot, &vm.want.clone());
}

#[test]
fn a_resized_disk_gets_a_full_backup_with_the_reason() {
    let Some(mut vm) = Vm::start("qcow2") else {
        return;
    };
    vm.backup(false, &no_abort(), None).unwrap();
    vm.qmp()
        .execute_value(
            "block_resize",
            Some(json!({ "node-name": "disk0", "size": SIZE + 16 * MIB })),
        )
        .unwrap();
    vm.want.resize((SIZE + 16 * MIB) as usize, 0);
    vm.write(SIZE + MIB, 65536, 0x5e);
    let r = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!(r.mode, "full", "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("the disk is"),
        "{r:?}"
    );
    assert_eq!(r.image_size, SIZE + 16 * MIB);
    vm.check(&r.snapshot, &vm.want.clone());
    // And the next one is incremental again.
    vm.write(0, 4096, 0x5f);
    let r = vm.backup(false, &no_abort(), None).unwrap();
    assert_eq!((r.mode, r.bytes_read), ("incremental", 4096), "{r:?}");
    vm.check(&r.snapshot, &vm.want.clone());
}
