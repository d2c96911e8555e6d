//! The `service-protect` thread: group points of a service served by one
//! daemon, aligned on one instant across its disks.
//!
//! Every disk of a protected service has its protection layer and point
//! writer (`crate::protect`), but no `protect` thread of its own. Every
//! interval (from the start of the previous cut) this thread:
//! 1. takes one cut on every disk (`block::protect::start_points`: every
//!    disk's gate held at once, one clock read), so a guest write
//!    acknowledged before the instant on any disk is in the cut and none
//!    started after it is, whatever disk it went to;
//! 2. writes each disk's point, one after another, through that disk's
//!    writer (the same code as a single daemon's point, named like the
//!    member snapshot, `<service>-<vm>-<drive>`); a disk that did not
//!    change gets a point of its own anyway (a delta with no entries), so
//!    no two group points share a member;
//! 3. when every disk's point is complete, publishes the group point
//!    (`store::group`, the record `backup --plan` writes), under the
//!    store's writer lock.
//!
//! When a disk's point fails, the points not yet written are abandoned
//! (their chunks stay changed, in the next cut) and no group point is
//! published for that cut; the disks whose points were written keep them
//! as the parents of their next ones.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use block::protect::{start_points, ProtectLayer};
use store::group::{GroupMember, GroupPoint};

use crate::point_sched::Flag;
use crate::protect::MemberWriter;

/// One protected disk of the service.
pub(crate) struct ProtectedDisk {
    /// The VM and drive the group record names.
    pub(crate) vm: String,
    pub(crate) drive: String,
    pub(crate) layer: Arc<ProtectLayer>,
    pub(crate) writer: MemberWriter,
}

/// The service's cuts: the thread, once spawned, and its stop signal.
pub(crate) struct ServiceProtect {
    service: String,
    interval: Duration,
    disks: Vec<ProtectedDisk>,
    stop: Arc<Flag>,
}

/// The running thread.
pub(crate) struct ServiceProtectThread {
    stop: Arc<Flag>,
    thread: JoinHandle<()>,
}

impl ServiceProtect {
    pub(crate) fn new(service: &str, interval: Duration, disks: Vec<ProtectedDisk>) -> Self {
        ServiceProtect {
            service: service.to_owned(),
            interval,
            disks,
            stop: Arc::default(),
        }
    }

    /// Starts the `service-protect` thread.
    pub(crate) fn spawn(mut self) -> std::io::Result<ServiceProtectThread> {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("service-protect".into())
            .spawn(move || {
                crate::protect::lower_priority();
                self.run();
            })?;
        Ok(ServiceProtectThread { stop, thread })
    }

    /// Waits until `deadline`; true if stopped.
    fn wait_until(&self, deadline: Instant) -> bool {
        self.stop.wait_until(deadline)
    }

    fn run(&mut self) {
        // The first cut at once: until it exists the RPO is unknown.
        let mut next = Instant::now();
        loop {
            if self.wait_until(next) {
                return;
            }
            let started = Instant::now();
            match self.cut() {
                Ok(point) => {
                    tracing::info!(group = %point.reference(), members = point.members.len(), "group point published")
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, error = %e, "group point failed; the changes wait for the next cut")
                }
            }
            next = (started + self.interval).max(Instant::now());
        }
    }

    /// One aligned cut, its points and its group record.
    fn cut(&mut self) -> Result<GroupPoint, String> {
        let layers: Vec<_> = self.disks.iter().map(|d| d.layer.clone()).collect();
        let (instant, points) =
            start_points(&layers).map_err(|e| format!("cannot start the cut: {e}"))?;
        let mut members = Vec::new();
        // A failure drops the points not yet written: abandoned, their
        // chunks stay changed.
        for (disk, point) in self.disks.iter_mut().zip(points) {
            let snapshot = disk
                .writer
                .write(instant, point)
                .map_err(|e| format!("point of {}: {e}", disk.writer.name()))?;
            members.push(GroupMember {
                vm: disk.vm.clone(),
                drive: disk.drive.clone(),
                snapshot,
            });
        }
        let micros = instant
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut point = GroupPoint::new(&self.service, micros, 0.0, members)
            .map_err(|e| block::error_chain(&e))?;
        self.disks[0].writer.publish(&mut point)?;
        Ok(point)
    }
}

impl ServiceProtectThread {
    /// Stops the thread (a point being written fails once its disk
    /// stops, and is abandoned) and waits for it.
    pub(crate) fn stop(self) {
        self.stop.set();
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use block::device::BlockDevice;
    use block::mem_device::MemDevice;
    use store::Store;

    use super::*;
    use crate::protect::{Origin, ProtectConfig, Protector, MIN_INTERVAL};

    const SIZE: usize = 16 * 4096;

    /// Disk `<vm>-disk0` of service `svc` booted from a backup of zeroes
    /// named `svc-<vm>-disk0`, its protector and its part in the cuts.
    fn disk(dir: &Path, store: &Arc<Store>, vm: &str) -> (Protector, ProtectedDisk) {
        let name = format!("svc-{vm}-disk0");
        let src = dir.join(format!("{name}.img"));
        std::fs::write(&src, vec![0u8; SIZE]).unwrap();
        let id = store
            .backup(&name, &src, &Default::default())
            .unwrap()
            .snapshot;
        let state = dir.join(&name);
        std::fs::create_dir(&state).unwrap();
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SIZE));
        let cfg = ProtectConfig {
            name: None,
            interval: MIN_INTERVAL,
        };
        let origin = Origin {
            snapshot: Some((name, id)),
            fresh_state: true,
        };
        let mut p = Protector::open(&state, mem, store.clone(), &cfg, &origin).unwrap();
        let layer = p.layer().clone();
        let writer = p.take_writer().unwrap();
        let d = ProtectedDisk {
            vm: vm.into(),
            drive: "disk0".into(),
            layer,
            writer,
        };
        (p, d)
    }

    fn restore(store: &Store, reference: &str, dir: &Path) -> Vec<u8> {
        let out = dir.join("out.img");
        let _ = std::fs::remove_file(&out);
        store.restore(reference, &out, &Default::default()).unwrap();
        std::fs::read(&out).unwrap()
    }

    #[test]
    fn a_cut_publishes_a_group_of_its_own_points_and_a_failed_disk_publishes_none() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::init(&tmp.path().join("store"), 4096).unwrap());
        let (_pa, a) = disk(tmp.path(), &store, "a");
        let (mut pb, b) = disk(tmp.path(), &store, "b");
        let (la, lb) = (a.layer.clone(), b.layer.clone());
        let mut sp = ServiceProtect::new("svc", MIN_INTERVAL, vec![a, b]);
        la.write_at(&[1; 4096], 0).unwrap();
        lb.write_at(&[2; 4096], 4096).unwrap();
        let first = sp.cut().unwrap();
        assert_eq!(store.groups("svc").unwrap(), std::slice::from_ref(&first));
        let mut want_a = vec![0u8; SIZE];
        want_a[..4096].fill(1);
        let mut want_b = vec![0u8; SIZE];
        want_b[4096..8192].fill(2);
        let member = |g: &GroupPoint, vm: &str| {
            g.members
                .iter()
                .find(|m| m.vm == vm)
                .unwrap()
                .snapshot
                .clone()
        };
        assert!(restore(&store, &member(&first, "a"), tmp.path()) == want_a);
        assert!(restore(&store, &member(&first, "b"), tmp.path()) == want_b);
        assert!(member(&first, "a").starts_with("svc-a-disk0@"));

        // Nothing changed: still points of its own.
        let idle = sp.cut().unwrap();
        for vm in ["a", "b"] {
            assert_ne!(member(&idle, vm), member(&first, vm));
            assert!(
                restore(&store, &member(&idle, vm), tmp.path())
                    == restore(&store, &member(&first, vm), tmp.path())
            );
        }

        // Disk b's point cannot be read (its daemon stops): no group, and
        // its change stays tracked.
        la.write_at(&[3; 4096], 8192).unwrap();
        lb.write_at(&[4; 4096], 8192).unwrap();
        pb.stop();
        let err = sp.cut().unwrap_err();
        assert!(err.contains("svc-b-disk0"), "{err}");
        assert_eq!(store.groups("svc").unwrap(), [first, idle]);
        assert_eq!(lb.pending_bytes(), 4096);
    }
}
