//! `instant-boot --plan`: one process serves every disk of a service.
//!
//! A service is the group point of several VMs (`store::group`): one
//! member snapshot per disk. [`Service::start`] builds one disk stack per
//! member, each exactly the stack of a single-disk [`Daemon`] (its own
//! state dir, overlay, migration target and copier, its own vhost-user
//! socket and I/O threads), but without a control socket or progress
//! logger of its own (`Daemon::start_member`). What is shared:
//!
//! - **one store**, opened once (the members of one group point);
//! - **one copy-rate limit.** Every disk's copier takes its slots from one
//!   `block::migrate::RateLimiter` (`MigrationOptions::shared_limit`), so
//!   `--copy-rate` and `set-rate` bound the service's copy rate, not each
//!   disk's;
//! - **one control socket.** [`ServiceStatus`] is the service's
//!   `control::Control`: `status` reports the totals in the single-disk
//!   fields (a client of one disk reads the whole service) plus a
//!   `control::DiskStatus` per disk and the service's name; `pause`,
//!   `resume` and `set-rate` apply to every disk;
//! - **one progress logger**, over the totals.
//!
//! Restart with the same state dirs resumes every disk as a single daemon
//! resumes (each disk's state is its own, kill -9 safe: `block::migrate`,
//! `block::bitmap`).
//!
//! # Threads
//! [`Service::serve`] starts one `disk-<vm>-<drive>` thread per disk,
//! which accepts that disk's QEMU and runs its vhost-user messages (the
//! caller's thread in [`Daemon::run`]); its `vq{N}`, `blk-io-{i}`,
//! `copier`, `copier-{i}` and `hold-release` threads are those of a single
//! daemon. The service adds one `control-accept` (with its `control-conn`
//! threads) and one `progress-log`. When any disk's thread ends (stopped,
//! or its server failed), it stops every disk: a service runs whole or not
//! at all. With [`ServiceConfig::protect`], one `service-protect` thread
//! (`daemon/src/service/protect.rs`) takes every disk's points, cut at
//! one instant, and publishes the service's group points; no disk has a
//! `protect` thread.
//!
//! # Errors
//! [`Error`] names the disk whose start failed, with the single daemon's
//! error as its cause; a start that fails stops the disks already started
//! (their state dirs stay, and a restart resumes them).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::migrate::{MigratingDevice, RateLimiter};
use control::latency::GuestLatency;
use control::{Control, DiskStatus, State, Status};
use vhost_backend::socket::StopHandle;

use crate::control_server::ControlServer;
use crate::progress_log::{spawn_progress_logger, ProgressLogger};
use crate::state_dir::StateDir;
use crate::{check_socket_path, open_store, Daemon, DaemonConfig, ProtectConfig};

mod protect;
use protect::{ProtectedDisk, ServiceProtect, ServiceProtectThread};

/// Why a service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service has no disk.
    #[error("Service {0} has no disk to serve")]
    NoDisks(String),
    /// Two disks have one name (and would share a socket).
    #[error("Service {service} has two disks named {disk}")]
    DuplicateDisk {
        /// The service.
        service: String,
        /// The name.
        disk: String,
    },
    /// The control socket's path cannot work.
    #[error(transparent)]
    ControlPath(crate::Error),
    /// Opening the store failed (the store's error names it).
    #[error(transparent)]
    OpenStore(store::Error),
    /// Starting or serving one disk failed.
    #[error("Disk {disk}")]
    Disk {
        /// `<vm>-<drive>`.
        disk: String,
        /// The single daemon's error.
        #[source]
        source: Box<crate::Error>,
    },
    /// A disk's thread panicked.
    #[error("The thread of disk {0} panicked")]
    DiskPanicked(String),
    /// The control socket could not be created.
    #[error("Failed to start the control socket")]
    Control(#[source] control::Error),
    /// A thread could not be started.
    #[error("Failed to start the {0} thread")]
    Spawn(String, #[source] io::Error),
}

/// A `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// One disk of a service.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// `<vm>-<drive>`: the disk's name in status, metrics and logs.
    pub name: String,
    /// The VM and drive (a group point's member).
    pub vm: String,
    pub drive: String,
    /// The disk's daemon: member snapshot, socket, state dir, target,
    /// copier settings (`control`, `log_interval` and
    /// `migration.shared_limit` are the service's).
    pub daemon: DaemonConfig,
}

/// Everything `instant-boot --plan` needs to know (every disk's
/// `daemon.store` is the same; the first one's is opened, once).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The service's name.
    pub service: String,
    /// The group point served (`SERVICE@ID`), the totals' `snapshot`.
    pub group: String,
    /// Every disk, in boot order.
    pub disks: Vec<DiskConfig>,
    /// The control socket.
    pub control: PathBuf,
    /// The service's copy rate limit in bytes per second, 0 = unlimited.
    pub copy_rate: u64,
    /// How often progress is logged.
    pub log_interval: Duration,
    /// Protect every disk, with one group point per interval aligned on
    /// one instant across them (the `service-protect` thread, see
    /// `service/protect.rs`); `name` is not used: each disk's points
    /// carry its member snapshot's name.
    pub protect: Option<ProtectConfig>,
}

/// Stops every disk of a service, from any thread.
#[derive(Clone)]
pub struct ServiceStop(Arc<Vec<StopHandle>>);

impl ServiceStop {
    /// Stops every disk.
    pub fn stop(&self) {
        for s in self.0.iter() {
            s.stop();
        }
    }

    /// Whether the service is stopping (any disk was stopped).
    pub fn is_stopped(&self) -> bool {
        self.0.iter().any(StopHandle::is_stopped)
    }
}

/// A started service: every socket bound, not yet serving.
pub struct Service {
    disks: Vec<(String, Daemon)>,
    status: Arc<ServiceStatus>,
    control: ControlServer,
    logger: ProgressLogger,
    stop: ServiceStop,
    protect: Option<ServiceProtect>,
}

impl Service {
    /// Starts every disk in order, then the control socket and the
    /// progress logger. Fails, stopping what it started, if any disk
    /// cannot start.
    pub fn start(cfg: &ServiceConfig) -> Result<Service> {
        if cfg.disks.is_empty() {
            return Err(Error::NoDisks(cfg.service.clone()));
        }
        for (i, d) in cfg.disks.iter().enumerate() {
            if cfg.disks[..i].iter().any(|e| e.name == d.name) {
                return Err(Error::DuplicateDisk {
                    service: cfg.service.clone(),
                    disk: d.name.clone(),
                });
            }
        }
        check_socket_path("control socket", &cfg.control, true).map_err(Error::ControlPath)?;
        // One store for every disk (members of one group point).
        let store = Arc::new(open_store(&cfg.disks[0].daemon.store).map_err(Error::OpenStore)?);
        let limiter = Arc::new(RateLimiter::new(cfg.copy_rate));
        let mut disks: Vec<(String, Daemon)> = Vec::new();
        for d in &cfg.disks {
            let mut daemon_cfg = d.daemon.clone();
            daemon_cfg.migration.shared_limit = Some(limiter.clone());
            let protect = cfg.protect.as_ref().map(|p| ProtectConfig {
                name: None,
                ..p.clone()
            });
            match Daemon::start_member(&daemon_cfg, store.clone(), protect.as_ref()) {
                Ok(daemon) => {
                    tracing::info!(disk = %d.name, socket = %daemon.socket().display(), snapshot = %daemon.snapshot().reference(), "disk ready");
                    disks.push((d.name.clone(), daemon));
                }
                Err(e) => {
                    stop_started(disks);
                    return Err(Error::Disk {
                        disk: d.name.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
        let protect = cfg.protect.as_ref().map(|p| {
            let protected = disks
                .iter_mut()
                .zip(&cfg.disks)
                .filter_map(|((_, daemon), d)| {
                    let (layer, writer) = daemon.take_point_writer()?;
                    Some(ProtectedDisk {
                        vm: d.vm.clone(),
                        drive: d.drive.clone(),
                        layer,
                        writer,
                    })
                })
                .collect();
            ServiceProtect::new(&cfg.service, p.interval, protected)
        });
        let status = Arc::new(ServiceStatus {
            service: cfg.service.clone(),
            group: cfg.group.clone(),
            disks: disks.iter().map(|(n, d)| (n.clone(), d.status())).collect(),
            limiter,
            started: Instant::now(),
        });
        let control = match ControlServer::start(&cfg.control, status.clone()) {
            Ok(c) => c,
            Err(e) => {
                stop_started(disks);
                return Err(Error::Control(e));
            }
        };
        let logger = match spawn_progress_logger(status.clone(), cfg.log_interval) {
            Ok(l) => l,
            Err(e) => {
                control.shutdown();
                stop_started(disks);
                return Err(Error::Spawn("progress-log".into(), e));
            }
        };
        let stop = ServiceStop(Arc::new(
            disks.iter().map(|(_, d)| d.stop_handle()).collect(),
        ));
        Ok(Service {
            disks,
            status,
            control,
            logger,
            stop,
            protect,
        })
    }

    /// The disks, in boot order: name and daemon (socket, snapshot, state).
    pub fn disks(&self) -> impl Iterator<Item = (&str, &Daemon)> {
        self.disks.iter().map(|(n, d)| (n.as_str(), d))
    }

    /// The control socket.
    pub fn control_socket(&self) -> &Path {
        self.control.path()
    }

    /// The service's status and controls (what the control socket serves).
    pub fn status(&self) -> Arc<dyn Control> {
        self.status.clone()
    }

    /// Stops every disk from any thread.
    pub fn stop_handle(&self) -> ServiceStop {
        self.stop.clone()
    }

    /// Serves every disk on a thread of its own; [`Running::wait`] waits
    /// for them to stop.
    pub fn serve(self) -> Result<Running> {
        let mut threads = Vec::new();
        let mut migrations = Vec::new();
        let mut states = Vec::new();
        let mut spawn_error = None;
        for (name, daemon) in self.disks {
            if let Some(m) = daemon.migration() {
                migrations.push(m.clone());
            }
            states.push((name.clone(), daemon.state_dir().clone()));
            let stop = self.stop.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("disk-{name}"))
                .spawn(move || {
                    let result = daemon.run();
                    // One disk down takes the service down.
                    stop.stop();
                    result
                });
            match spawned {
                Ok(t) => threads.push((name, t)),
                Err(e) => {
                    // Not served: stop the others, flush it here.
                    self.stop.stop();
                    spawn_error.get_or_insert(Error::Spawn(format!("disk-{name}"), e));
                }
            }
        }
        let protect = match self.protect {
            Some(p) if spawn_error.is_none() => match p.spawn() {
                Ok(t) => Some(t),
                Err(e) => {
                    self.stop.stop();
                    spawn_error = Some(Error::Spawn("service-protect".into(), e));
                    None
                }
            },
            _ => None,
        };
        let running = Running {
            threads,
            migrations,
            states,
            status: self.status,
            control: self.control,
            logger: self.logger,
            stop: self.stop,
            protect,
        };
        match spawn_error {
            None => Ok(running),
            Some(e) => {
                let _ = running.wait();
                Err(e)
            }
        }
    }
}

/// Stops and flushes disks started before a failure.
fn stop_started(disks: Vec<(String, Daemon)>) {
    for (name, daemon) in disks {
        daemon.stop_handle().stop();
        if let Err(e) = daemon.run() {
            tracing::warn!(disk = %name, error = %e, "failed to stop a disk of a service that could not start");
        }
    }
}

/// A service being served.
pub struct Running {
    threads: Vec<(String, JoinHandle<crate::Result<()>>)>,
    migrations: Vec<Arc<MigratingDevice>>,
    states: Vec<(String, Arc<StateDir>)>,
    status: Arc<ServiceStatus>,
    control: ControlServer,
    logger: ProgressLogger,
    stop: ServiceStop,
    protect: Option<ServiceProtectThread>,
}

impl Running {
    /// Stops every disk from any thread.
    pub fn stop_handle(&self) -> ServiceStop {
        self.stop.clone()
    }

    /// The service's status and controls.
    pub fn status(&self) -> Arc<dyn Control> {
        self.status.clone()
    }

    /// The state dir of disk `name` (to record a guest started on it).
    pub fn state_dir(&self, name: &str) -> Option<&Arc<StateDir>> {
        self.states.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Whether every disk's migration has finished (complete or failed),
    /// waiting at most `timeout` for each.
    pub fn migrations_finished(&self, timeout: Duration) -> bool {
        self.migrations
            .iter()
            .all(|m| m.wait(timeout).is_finished())
    }

    /// Waits until every disk has stopped (after [`ServiceStop::stop`],
    /// or when one disk's server fails), then stops the `service-protect`
    /// thread (a point being written fails once its disk stops), the
    /// logger and the control socket. The first disk's error is returned.
    pub fn wait(self) -> Result<()> {
        let mut result = Ok(());
        for (name, t) in self.threads {
            let r = match t.join() {
                Ok(r) => r.map_err(|e| Error::Disk {
                    disk: name.clone(),
                    source: Box::new(e),
                }),
                Err(_) => Err(Error::DiskPanicked(name)),
            };
            if result.is_ok() {
                result = r;
            }
        }
        if let Some(p) = self.protect {
            p.stop();
        }
        self.logger.stop();
        self.control.shutdown();
        result
    }
}

/// The service's `control::Control`: the totals and a report per disk;
/// pause, resume and set-rate for all disks.
pub struct ServiceStatus {
    service: String,
    group: String,
    disks: Vec<(String, Arc<dyn Control>)>,
    limiter: Arc<RateLimiter>,
    started: Instant,
}

impl ServiceStatus {
    /// `op` on every disk: refused only if every disk refuses (the first
    /// reason, with its disk).
    fn each(
        &self,
        op: impl Fn(&dyn Control) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let mut refused = None;
        let mut done = false;
        for (name, d) in &self.disks {
            match op(d.as_ref()) {
                Ok(()) => done = true,
                Err(e) => {
                    refused.get_or_insert(format!("disk {name}: {e}"));
                }
            }
        }
        match (done, refused) {
            (false, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl Control for ServiceStatus {
    fn status(&self) -> Status {
        let disks: Vec<DiskStatus> = self
            .disks
            .iter()
            .map(|(name, d)| DiskStatus {
                disk: name.clone(),
                status: d.status(),
            })
            .collect();
        let mut total = totals(&disks);
        total.snapshot = self.group.clone();
        total.rate_limit = self.limiter.rate();
        total.uptime_seconds = self.started.elapsed().as_secs_f64();
        total.service = Some(self.service.clone());
        total.disks = disks;
        total
    }

    fn pause(&self) -> std::result::Result<(), String> {
        self.each(|d| d.pause())
    }

    fn resume(&self) -> std::result::Result<(), String> {
        self.each(|d| d.resume())
    }

    fn set_rate(&self, bytes_per_second: u64) -> std::result::Result<(), String> {
        // One limiter for every disk's copier.
        self.limiter.set_rate(bytes_per_second);
        tracing::info!(service = %self.service, bytes_per_second, "service copy rate limit set");
        Ok(())
    }
}

/// The service's totals over its disks' reports: sums of bytes, chunks,
/// rates and guest counters; the worst state (failed, then migrating,
/// paused, complete when all are; serving otherwise).
fn totals(disks: &[DiskStatus]) -> Status {
    let all = |state| disks.iter().all(|d| d.status.state == state);
    let any = |state| disks.iter().any(|d| d.status.state == state);
    let state = if any(State::Failed) {
        State::Failed
    } else if any(State::Migrating) {
        State::Migrating
    } else if any(State::Paused) {
        State::Paused
    } else if all(State::Complete) {
        State::Complete
    } else {
        State::Serving
    };
    let named = |pick: fn(&Status) -> Option<&String>| {
        disks
            .iter()
            .find_map(|d| pick(&d.status).map(|e| format!("disk {}: {e}", d.disk)))
    };
    let sum = |f: fn(&Status) -> u64| disks.iter().map(|d| f(&d.status)).sum::<u64>();
    let mut t = Status {
        state,
        error: named(|s| s.error.as_ref()),
        bytes_total: sum(|s| s.bytes_total),
        bytes_migrated: sum(|s| s.bytes_migrated),
        bytes_copied_on_read: sum(|s| s.bytes_copied_on_read),
        bytes_to_copy: sum(|s| s.bytes_to_copy),
        // A complete disk counts all its bytes to copy as copied.
        bytes_copied: sum(|s| match s.state {
            State::Complete => s.bytes_to_copy.max(s.bytes_copied),
            _ => s.bytes_copied,
        }),
        bytes_skipped: sum(|s| s.bytes_skipped),
        chunks_total: sum(|s| s.chunks_total),
        chunks_migrated: sum(|s| s.chunks_migrated),
        chunks_failed: sum(|s| s.chunks_failed),
        chunks_repaired: sum(|s| s.chunks_repaired),
        copy_rate: disks
            .iter()
            .map(|d| d.status.copy_rate)
            .filter(|r| r.is_finite())
            .sum(),
        guest_read_ops: sum(|s| s.guest_read_ops),
        guest_read_bytes: sum(|s| s.guest_read_bytes),
        guest_write_ops: sum(|s| s.guest_write_ops),
        guest_write_bytes: sum(|s| s.guest_write_bytes),
        guest_flush_ops: sum(|s| s.guest_flush_ops),
        guest_io_errors: sum(|s| s.guest_io_errors),
        guest_latency: disks
            .iter()
            .filter_map(|d| d.status.guest_latency.as_ref())
            .fold(None, |acc: Option<GuestLatency>, l| {
                let mut acc = acc.unwrap_or_default();
                acc.merge(l);
                Some(acc)
            }),
        chunk_read_errors: sum(|s| s.chunk_read_errors),
        overlay_write_bytes: sum(|s| s.overlay_write_bytes),
        overlay_bytes: sum(|s| s.overlay_bytes),
        cache_hit_rate: disks.iter().map(|d| d.status.cache_hit_rate).sum::<f64>()
            / disks.len().max(1) as f64,
        // A complete disk needs no journal: its writes go to the target.
        journal_active: disks.iter().all(|d| journal_ok(&d.status)),
        journal_inactive_reason: disks.iter().find(|d| !journal_ok(&d.status)).map(|d| {
            format!(
                "disk {}: {}",
                d.disk,
                d.status
                    .journal_inactive_reason
                    .as_deref()
                    .unwrap_or("inactive")
            )
        }),
        ..Status::default()
    };
    t.eta_seconds = match state {
        State::Complete | State::Serving => Some(0.0),
        State::Failed | State::Paused => None,
        State::Migrating => {
            let left = t.bytes_to_copy.saturating_sub(t.bytes_copied);
            (t.copy_rate > 0.0).then(|| left as f64 / t.copy_rate)
        }
    };
    t
}

/// Whether a disk's journal runs or is not needed (complete).
fn journal_ok(s: &Status) -> bool {
    s.journal_active || s.state == State::Complete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, state: State, to_copy: u64, copied: u64, rate: f64) -> DiskStatus {
        DiskStatus {
            disk: name.into(),
            status: Status {
                state,
                bytes_total: 64 << 20,
                bytes_to_copy: to_copy,
                bytes_copied: copied,
                copy_rate: rate,
                journal_active: true,
                guest_read_ops: 2,
                guest_latency: Some(GuestLatency {
                    read: control::latency::Latency::new(1, vec![[10_000, 2]]),
                    ..GuestLatency::default()
                }),
                ..Status::default()
            },
        }
    }

    #[test]
    fn totals_sum_the_disks_and_take_the_worst_state() {
        let disks = [
            disk("db-disk0", State::Complete, 8 << 20, 8 << 20, 0.0),
            disk(
                "app-disk0",
                State::Migrating,
                8 << 20,
                2 << 20,
                3.0 * (1 << 20) as f64,
            ),
        ];
        let t = totals(&disks);
        assert_eq!(t.state, State::Migrating);
        assert_eq!(t.bytes_total, 128 << 20);
        assert_eq!((t.bytes_to_copy, t.bytes_copied), (16 << 20, 10 << 20));
        assert_eq!(t.guest_read_ops, 4);
        // The disks' latency histograms add up.
        assert_eq!(t.guest_latency.as_ref().map(|l| l.read.count), Some(4));
        assert!(t.journal_active);
        // 6 MiB left at 3 MiB/s.
        assert_eq!(t.eta_seconds, Some(2.0));
        assert!((t.progress() - 10.0 / 16.0).abs() < 1e-9);

        let mut failed = disks.clone();
        failed[1].status.state = State::Failed;
        failed[1].status.error = Some("target gone".into());
        let t = totals(&failed);
        assert_eq!(t.state, State::Failed);
        assert_eq!(t.error.as_deref(), Some("disk app-disk0: target gone"));
        assert_eq!(t.eta_seconds, None);

        let mut paused = disks.clone();
        paused[1].status.state = State::Paused;
        assert_eq!(totals(&paused).state, State::Paused);

        let mut done = disks;
        done[1].status.state = State::Complete;
        done[1].status.journal_active = false;
        let t = totals(&done);
        assert_eq!(
            (t.state, t.eta_seconds, t.progress()),
            (State::Complete, Some(0.0), 1.0)
        );
    }
}
