//! One group point: every disk of every VM of a plan, started at one
//! instant, then read into the store (see the crate doc for the sequence
//! and the failure guarantees).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use block::migrate::RateLimiter;
use hypervisor::live_backup::{self, fleece, Member, ReadOptions, Report, Target};
use hypervisor::pacing::Rate;
use hypervisor::qga::Qga;
use hypervisor::qmp::{self, Qmp};
use serde::Serialize;
use store::backup::changed::ChangedBackup;
use store::group::{GroupMember, GroupPoint};
use store::{ErrorKind, Store};
use tracing::{info, info_span, warn};

use crate::daemon_point::{self, DaemonMember};
use crate::plan::Plan;

/// Fleeced members read at once (one VM each: a VM has one NBD server).
/// The sessions of one writer lock may end at once: the store serializes
/// the index merge that ends each backup.
pub const PARALLEL_READS: usize = 3;
/// How long to wait for the store's writer lock held by another writer
/// (a daemon writing a protection point into the same store).
pub const LOCK_WAIT: Duration = Duration::from_secs(600);

/// Errors of a group backup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Failed to open store {path}")]
    OpenStore {
        path: PathBuf,
        #[source]
        source: store::Error,
    },
    #[error("VM {vm}: QMP {what} failed")]
    Qmp {
        vm: String,
        what: &'static str,
        #[source]
        source: Box<qmp::Error>,
    },
    #[error("VM {vm}: guest agent {what} failed")]
    Qga {
        vm: String,
        what: &'static str,
        #[source]
        source: Box<qmp::Error>,
    },
    #[error("VM {vm} drive {drive} (plan line {line})")]
    Member {
        vm: String,
        drive: String,
        line: usize,
        #[source]
        source: Box<live_backup::Error>,
    },
    #[error("VM {vm} drive {drive} (plan line {line}): served by our daemon")]
    Daemon {
        vm: String,
        drive: String,
        line: usize,
        #[source]
        source: Box<daemon_point::Error>,
    },
    #[error("Store operation failed")]
    Store(#[from] store::Error),
    #[error("Backup interrupted")]
    Interrupted,
    #[error("Control socket failed")]
    Control(#[source] Box<block::socket::Error>),
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// How the guests were held still for the instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pause {
    /// Every VM has a guest agent: filesystems frozen (application
    /// consistent), vCPUs running.
    Fsfreeze,
    /// QMP `stop` / `cont` of every VM.
    Stop,
}

/// One member of a group point (`--json`: `members[]`). A member served
/// by our daemon has `mode` `daemon`, its `daemon` control socket, and
/// no bytes of its own (the daemon's status counts them); its `seconds`
/// run from the cut to the point complete.
#[derive(Debug, Clone, Serialize)]
pub struct MemberReport {
    pub vm: String,
    pub drive: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<PathBuf>,
    #[serde(flatten)]
    pub report: Report,
}

/// What a group backup did (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// `SERVICE@ID`.
    pub group: String,
    pub service: String,
    /// The instant, RFC 3339.
    pub instant: String,
    pub pause: Pause,
    /// From the first guest paused (or frozen) to the last one resumed.
    pub blackout_ms: f64,
    pub members: Vec<MemberReport>,
    pub seconds: f64,
}

/// Options of [`run`].
pub struct Options<'a> {
    /// Set to stop (SIGTERM, Ctrl-C): no group point, changes stay tracked.
    pub abort: &'a AtomicBool,
    pub threads: Option<usize>,
    /// Read every disk in full, even where an incremental is possible.
    pub full: bool,
    /// How the NBD reads are paced: at most this many bytes per second,
    /// all disks together (0: unlimited), or each VM by its own guest's
    /// latency (`Rate::Auto`, every drive attached to a device).
    pub rate: Rate,
}

/// One VM during the backup.
struct VmRun {
    name: String,
    q: Qmp,
    qga: Option<Qga>,
    /// Members of this VM: index into the plan's member list.
    members: Vec<usize>,
    /// We stopped it (so we `cont` it).
    stopped: bool,
    frozen: bool,
    paused_at: Option<Instant>,
    blackout: Duration,
}

fn qmp_err<'a>(vm: &'a str, what: &'static str) -> impl FnOnce(qmp::Error) -> Error + 'a {
    move |source| Error::Qmp {
        vm: vm.to_owned(),
        what,
        source: Box::new(source),
    }
}

/// Take one group point of `plan`.
pub fn run(plan: &Plan, opts: &Options<'_>) -> Result<GroupReport> {
    let store = Store::open(&plan.store).map_err(|source| Error::OpenStore {
        path: plan.store.clone(),
        source,
    })?;
    run_in(&store, plan, opts)
}

/// [`run`] on an open store.
pub fn run_in(store: &Store, plan: &Plan, opts: &Options<'_>) -> Result<GroupReport> {
    let span = info_span!("group_backup", service = %plan.service);
    let _e = span.enter();
    let started = Instant::now();
    let planned: Vec<(String, String, usize)> = plan
        .members()
        .map(|(vm, d)| (vm.name.clone(), d.drive.clone(), d.line))
        .collect();
    let names: Vec<String> = planned
        .iter()
        .map(|(vm, drive, _)| plan.member_name(vm, drive))
        .collect();
    // Members served by our daemon: reachable and protecting under the
    // member's name, before anything changes anywhere.
    let mut daemons: Vec<DaemonMember> = plan
        .members()
        .enumerate()
        .filter_map(|(m, (_, d))| Some(DaemonMember::new(m, d.daemon.as_deref()?, &names[m])))
        .collect();
    for d in daemons.iter_mut() {
        d.check().map_err(|e| daemon_err(&planned[d.index], e))?;
    }
    // No daemon busy copying a point when the window asks for its cut.
    daemon_point::settle_all(&mut daemons, store, opts.abort)
        .map_err(|(m, e)| daemon_err(&planned[m], e))?;
    let fleeced: Vec<bool> = plan.members().map(|(_, d)| d.daemon.is_none()).collect();
    // One writer lock for every fleeced member: no other run of this store
    // touches QEMU meanwhile, and (without daemon members) the group
    // record is published under it.
    let refs: Vec<&str> = (0..names.len())
        .filter(|&m| fleeced[m])
        .map(|m| names[m].as_str())
        .collect();
    let mut sessions: Vec<Option<ChangedBackup<'_>>> = (0..names.len()).map(|_| None).collect();
    if !refs.is_empty() {
        let mut taken = lock_sessions(store, &refs, opts.abort)?.into_iter();
        for (m, slot) in sessions.iter_mut().enumerate() {
            if fleeced[m] {
                *slot = taken.next();
            }
        }
    }

    let mut vms: Vec<VmRun> = Vec::new();
    let mut k = 0;
    for vm in &plan.vms {
        let q = Qmp::connect(&vm.qmp).map_err(qmp_err(&vm.name, "connect"))?;
        vms.push(VmRun {
            name: vm.name.clone(),
            q,
            qga: None,
            members: (k..k + vm.disks.len()).collect(),
            stopped: false,
            frozen: false,
            paused_at: None,
            blackout: Duration::ZERO,
        });
        k += vm.disks.len();
    }
    let tag = live_backup::store_tag(store);
    let base = fleece::Names::new(&tag);
    let base_token = u32::from_str_radix(&base.token, 16).unwrap_or(0);
    let mut members: Vec<Option<Member>> = (0..names.len()).map(|_| None).collect();
    let mut leftovers: Vec<Vec<String>> = vec![Vec::new(); vms.len()];

    let result = (|| -> Result<(Pause, Duration, i64)> {
        // Prepare: nothing paused yet.
        for (vi, v) in vms.iter_mut().enumerate() {
            let Some(&first) = v.members.iter().find(|&&m| fleeced[m]) else {
                continue;
            };
            leftovers[vi] = fleece::clear_leftovers(&mut v.q, &base, &plan.scratch)
                .map_err(|source| member_err(&planned[first], source))?;
            for &m in v.members.iter().filter(|&&m| fleeced[m]) {
                let mut n = base.clone();
                n.token = format!("{:08x}", base_token.wrapping_add(m as u32));
                let target = Target {
                    name: names[m].clone(),
                    qmp: plan.vms[vi].qmp.clone(),
                    drive: planned[m].1.clone(),
                    full: opts.full,
                    scratch: plan.scratch.clone(),
                };
                let newest = sessions[m].as_ref().and_then(|s| s.newest());
                let member = Member::prepare(&mut v.q, store, newest, n, &target)
                    .map_err(|source| member_err(&planned[m], source))?;
                let auto = opts.rate == Rate::Auto;
                let guest = if auto { member.require_guest() } else { Ok(()) };
                members[m] = Some(member);
                guest.map_err(|source| member_err(&planned[m], source))?;
            }
        }
        let all_agents = plan.vms.iter().all(|v| v.qga.is_some());
        if all_agents {
            for (vi, v) in vms.iter_mut().enumerate() {
                let path = plan.vms[vi].qga.as_ref().expect("all VMs have an agent");
                v.qga = Some(Qga::connect(path).map_err(|source| Error::Qga {
                    vm: v.name.clone(),
                    what: "connect",
                    source: Box::new(source),
                })?);
            }
        }
        let pause = if all_agents {
            Pause::Fsfreeze
        } else {
            Pause::Stop
        };
        if opts.abort.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let chunk = store.chunk_size();
        let window = Instant::now();
        let mut instant = 0;
        let started_all = (|| -> Result<()> {
            for v in vms.iter_mut() {
                hold(v, pause)?;
            }
            instant = store::snapshot::now_micros();
            for v in vms.iter_mut() {
                let mut actions = Vec::new();
                for &m in &v.members {
                    if let Some(member) = &members[m] {
                        actions.extend(member.start_actions(chunk));
                    }
                }
                if actions.is_empty() {
                    continue;
                }
                v.q.transaction(&actions)
                    .map_err(qmp_err(&v.name, "transaction (start fleecing)"))?;
                for &m in &v.members {
                    if let Some(member) = members[m].as_mut() {
                        member.started();
                    }
                }
            }
            // Every daemon cuts its point while the guests are still.
            daemon_point::cut_all(&mut daemons).map_err(|(m, e)| daemon_err(&planned[m], e))
        })();
        // Always: resume every guest we paused, whatever failed.
        let mut resumed = Ok(());
        for v in vms.iter_mut() {
            if let Err(e) = release(v) {
                warn!(vm = %v.name, "could not resume the guest: {e}");
                if resumed.is_ok() {
                    resumed = Err(e);
                }
            }
        }
        let blackout = window.elapsed();
        started_all?;
        resumed?;
        info!(
            blackout_ms = blackout.as_secs_f64() * 1000.0,
            ?pause,
            "group instant taken"
        );
        Ok((pause, blackout, instant))
    })();

    // Read the fleeced members (a few VMs at once), tearing each down as
    // soon as it is read.
    let mut done: Vec<Option<live_backup::Done>> = (0..names.len()).map(|_| None).collect();
    let read = result.and_then(|r| {
        read_members(
            &mut vms,
            &mut members,
            &sessions,
            store,
            opts,
            &planned,
            &mut done,
        )?;
        Ok(r)
    });
    // Tear down what is left (after a failure), then publish or not.
    for v in vms.iter_mut() {
        for &m in &v.members {
            if let Some(member) = members[m].as_mut() {
                let left = member.teardown(&mut v.q);
                if !left.is_empty() {
                    warn!(vm = %v.name, ?left, "cleanup left something behind; the next run removes it");
                }
            }
        }
    }
    // The daemons write their points under the store's writer lock: let
    // go of ours, wait for them, and take it again to publish.
    let mut publish_lock = Vec::new();
    let read = read.and_then(|r| {
        if daemons.is_empty() {
            return Ok(r);
        }
        sessions.iter_mut().for_each(|s| *s = None);
        daemon_point::wait_all(&mut daemons, store, opts.abort)
            .map_err(|(m, e)| daemon_err(&planned[m], e))?;
        publish_lock = lock_sessions(store, &[names[0].as_str()], opts.abort)?;
        Ok(r)
    });
    let published = read.and_then(|(pause, blackout, instant)| {
        let group_members = planned
            .iter()
            .zip(&done)
            .enumerate()
            .map(|(m, ((vm, drive, _), d))| GroupMember {
                vm: vm.clone(),
                drive: drive.clone(),
                snapshot: match d {
                    Some(d) => format!("{}@{}", d.0.name, d.0.snapshot),
                    None => daemons
                        .iter()
                        .find(|dm| dm.index == m)
                        .and_then(|dm| dm.snapshot())
                        .unwrap_or_default()
                        .to_owned(),
                },
            })
            .collect();
        let mut point = GroupPoint::new(
            &plan.service,
            instant,
            blackout.as_secs_f64() * 1000.0,
            group_members,
        )?;
        store.publish_group(&mut point)?;
        Ok((pause, blackout, point))
    });
    let ok = published.is_ok();
    for v in vms.iter_mut() {
        for &m in &v.members {
            if let Some(member) = members[m].as_mut() {
                if let Err(e) = member.finish(&mut v.q, ok) {
                    warn!(vm = %v.name, member = %names[m], "could not update dirty bitmaps: {e}");
                }
            }
        }
    }
    if !ok {
        // Member snapshots of a group that was not published: forget them,
        // so the next run's incrementals start from the previous group
        // point, whose bitmaps now hold every change since. (A daemon's
        // point stays: it is the parent of the daemon's next point.)
        for (m, d) in done.iter().enumerate() {
            if let Some(d) = d {
                let r = format!("{}@{}", d.0.name, d.0.snapshot);
                if let Err(e) = store.forget(&r) {
                    warn!(member = %names[m], "could not forget {r} of the failed group: {e}");
                }
            }
        }
    }
    let (pause, blackout, point) = published?;
    drop(sessions);
    drop(publish_lock);
    let mut reports = Vec::new();
    for (vi, v) in vms.iter().enumerate() {
        for &m in &v.members {
            let frozen = v.frozen.then_some(v.blackout);
            let report = match (members[m].as_ref(), done[m].take()) {
                (Some(member), Some(d)) => member.report(
                    d,
                    v.blackout,
                    frozen,
                    started,
                    std::mem::take(&mut leftovers[vi]),
                ),
                _ => {
                    let dm = daemons
                        .iter()
                        .find(|dm| dm.index == m)
                        .expect("daemon member");
                    daemon_report(dm, v.blackout, frozen)
                }
            };
            reports.push(MemberReport {
                vm: planned[m].0.clone(),
                drive: planned[m].1.clone(),
                daemon: daemons
                    .iter()
                    .find(|dm| dm.index == m)
                    .map(|dm| dm.path.clone()),
                report,
            });
        }
    }
    let report = GroupReport {
        group: point.reference(),
        service: plan.service.clone(),
        instant: point.instant.clone(),
        pause,
        blackout_ms: blackout.as_secs_f64() * 1000.0,
        members: reports,
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(group = %report.group, blackout_ms = report.blackout_ms, "group point published");
    Ok(report)
}

/// The report of a member whose point our daemon wrote.
fn daemon_report(dm: &DaemonMember, blackout: Duration, frozen: Option<Duration>) -> Report {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Report {
        snapshot: dm.snapshot().unwrap_or_default().to_owned(),
        mode: "daemon",
        reason: None,
        image_size: dm.size,
        bytes_read: 0,
        dirty_bytes: 0,
        bytes_new: 0,
        chunks_total: 0,
        chunks_new: 0,
        chunks_patch: 0,
        chunks_unchanged: 0,
        blackout_ms: ms(blackout),
        frozen_ms: frozen.map(ms),
        seconds: dm.seconds,
        parent: None,
        bitmap: String::new(),
        leftovers_cleared: Vec::new(),
        pacing: None,
    }
}

/// The store's writer lock, through changed-backup sessions of `names`
/// (every one shares it), waiting up to [`LOCK_WAIT`] while another
/// writer (a daemon's protection point) holds it.
fn lock_sessions<'a>(
    store: &'a Store,
    names: &[&str],
    abort: &AtomicBool,
) -> Result<Vec<ChangedBackup<'a>>> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(20);
    loop {
        match store.begin_changed_backups(names) {
            Err(e) if e.kind() == ErrorKind::Locked && Instant::now() < deadline => {
                if abort.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                if pause == Duration::from_millis(20) {
                    info!("waiting for the store's writer lock: {e}");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return Ok(r?),
        }
    }
}

/// One VM's share of the reads: its QMP and its fleeced members.
type VmReads<'v, 'm> = (&'v mut VmRun, Vec<(usize, &'m mut Member)>);

/// Reads every fleeced member into the store, at most [`PARALLEL_READS`]
/// VMs at once (one member of a VM at a time: a VM has one NBD server),
/// tearing each down once read. The first failure, after every started
/// read ended; no new read starts after a failure.
fn read_members(
    vms: &mut [VmRun],
    members: &mut [Option<Member>],
    sessions: &[Option<ChangedBackup<'_>>],
    store: &Store,
    opts: &Options<'_>,
    planned: &[(String, String, usize)],
    done: &mut [Option<live_backup::Done>],
) -> Result<()> {
    let mut slots: Vec<Option<&mut Member>> = members.iter_mut().map(Option::as_mut).collect();
    let work: Vec<VmReads<'_, '_>> = vms
        .iter_mut()
        .filter_map(|v| {
            let mine: Vec<(usize, &mut Member)> = v
                .members
                .iter()
                .filter_map(|&m| Some((m, slots[m].take()?)))
                .collect();
            (!mine.is_empty()).then_some((v, mine))
        })
        .collect();
    if work.is_empty() {
        return Ok(());
    }
    let workers = work.len().min(PARALLEL_READS);
    // Taken from the back: the plan's first VM first.
    let mut work = work;
    work.reverse();
    // The worker threads (all cores by default) are shared by the reads
    // running at once, not multiplied by them.
    let total = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let threads = Some((total / workers).max(1));
    // One limiter for every read at once: the service's rate; with
    // `auto`, one per VM, each set by its own guest's latency.
    let auto = opts.rate == Rate::Auto;
    let limit = RateLimiter::new(opts.rate.initial());
    let queue = Mutex::new(work);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(usize, Result<live_backup::Done>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let Some((v, mine)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return;
                };
                let own = auto.then(|| RateLimiter::new(opts.rate.initial()));
                let limit = own.as_ref().unwrap_or(&limit);
                for (m, member) in mine {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let session = sessions[m]
                        .as_ref()
                        .expect("a fleeced member has a session");
                    let d = member
                        .read(
                            &mut v.q,
                            store,
                            session,
                            &ReadOptions {
                                progress: None,
                                threads,
                                abort: opts.abort,
                                limit,
                                auto,
                            },
                        )
                        .map_err(|source| match source {
                            live_backup::Error::Interrupted => Error::Interrupted,
                            source => member_err(&planned[m], source),
                        });
                    member.teardown(&mut v.q);
                    if d.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((m, d));
                }
            });
        }
    });
    let mut first = Ok(());
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(m, _)| *m);
    for (m, d) in results {
        match d {
            Ok(d) => done[m] = Some(d),
            Err(e) if first.is_ok() => first = Err(e),
            Err(_) => {}
        }
    }
    first
}

fn daemon_err(m: &(String, String, usize), source: daemon_point::Error) -> Error {
    Error::Daemon {
        vm: m.0.clone(),
        drive: m.1.clone(),
        line: m.2,
        source: Box::new(source),
    }
}

fn member_err(m: &(String, String, usize), source: live_backup::Error) -> Error {
    Error::Member {
        vm: m.0.clone(),
        drive: m.1.clone(),
        line: m.2,
        source: Box::new(source),
    }
}

/// Hold one VM still: freeze its filesystems, or `stop` it if it runs.
fn hold(v: &mut VmRun, pause: Pause) -> Result<()> {
    v.paused_at = Some(Instant::now());
    match pause {
        Pause::Fsfreeze => {
            let g = v.qga.as_mut().expect("agent connected");
            // Mark first: a freeze that fails halfway must still be thawed.
            v.frozen = true;
            g.fsfreeze_freeze().map_err(|source| Error::Qga {
                vm: v.name.clone(),
                what: "guest-fsfreeze-freeze",
                source: Box::new(source),
            })?;
        }
        Pause::Stop => {
            let status =
                v.q.execute_value("query-status", None)
                    .map_err(qmp_err(&v.name, "query-status"))?;
            if status.get("running").and_then(|r| r.as_bool()) == Some(true) {
                v.stopped = true;
                v.q.execute_value("stop", None)
                    .map_err(qmp_err(&v.name, "stop"))?;
            }
        }
    }
    Ok(())
}

/// Resume one VM held by [`hold`]; records its blackout.
fn release(v: &mut VmRun) -> Result<()> {
    let mut r = Ok(());
    if v.stopped {
        v.stopped = false;
        r =
            v.q.execute_value("cont", None)
                .map(drop)
                .map_err(qmp_err(&v.name, "cont"));
    }
    if let (true, Some(g)) = (v.frozen, v.qga.as_mut()) {
        if let Err(source) = g.fsfreeze_thaw() {
            r = r.and(Err(Error::Qga {
                vm: v.name.clone(),
                what: "guest-fsfreeze-thaw",
                source: Box::new(source),
            }));
        }
    }
    if let Some(t) = v.paused_at {
        v.blackout = t.elapsed();
    }
    r
}
