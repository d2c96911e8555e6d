//! [`DaemonStatus`]: the daemon's [`Control`], assembled from its parts.
//!
//! The status report combines the guest counters of the
//! [`MeteredDevice`], the migration (if there is a target), the chunk
//! cache's hit rate, the overlay's size, the failed chunk reads of the
//! store sources, continuous protection and the uptime. Control commands
//! (pause, resume, set-rate) go to the migration; without a target they
//! are refused with a message saying so. `point` and `point-wait` go to
//! protection (`crate::protect`), and are refused without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::bitmap::JournalState;
use block::cache::ChunkCache;
use block::device::BlockDevice;
use block::metered::MeteredDevice;
use block::migrate::{MigratingDevice, MigrationPhase, MigrationStatus};
use block::overlay::Overlay;
use block::source::ChunkSource;
use block::store_source::StoreSource;
use control::{Control, PointTaken, RemoteStore, State, Status};

use crate::protect::ProtectStatus;

const NO_TARGET: &str = "no migration target: start instant-boot with --target to migrate";

/// The daemon's status and controls. Build it with [`DaemonStatus::new`]
/// and the `with_*` methods.
pub struct DaemonStatus {
    snapshot: String,
    started: Instant,
    metered: Arc<MeteredDevice>,
    cache: Option<Arc<ChunkCache>>,
    overlay: Option<Arc<Overlay>>,
    migration: Option<Arc<MigratingDevice>>,
    sources: Vec<Arc<StoreSource>>,
    protection: Option<Arc<ProtectStatus>>,
}

impl DaemonStatus {
    /// Status of a daemon serving `snapshot` (its name or id, as shown to
    /// operators) through `metered`. Uptime counts from now.
    pub fn new(snapshot: impl Into<String>, metered: Arc<MeteredDevice>) -> DaemonStatus {
        DaemonStatus {
            snapshot: snapshot.into(),
            started: Instant::now(),
            metered,
            cache: None,
            overlay: None,
            migration: None,
            sources: Vec::new(),
            protection: None,
        }
    }

    /// Reports the hit rate of `cache`.
    pub fn with_cache(mut self, cache: Arc<ChunkCache>) -> DaemonStatus {
        self.cache = Some(cache);
        self
    }

    /// Reports the size of `overlay` (when there is no migration, which
    /// reports it itself, as 0 once the overlay is freed).
    pub fn with_overlay(mut self, overlay: Arc<Overlay>) -> DaemonStatus {
        self.overlay = Some(overlay);
        self
    }

    /// Reports and controls `migration`.
    pub fn with_migration(mut self, migration: Arc<MigratingDevice>) -> DaemonStatus {
        self.migration = Some(migration);
        self
    }

    /// Counts the failed chunk reads of `source` in `chunk_read_errors`
    /// (may be called once per source: the served snapshot, the repair one).
    pub fn with_store_source(mut self, source: Arc<StoreSource>) -> DaemonStatus {
        self.sources.push(source);
        self
    }

    /// Reports continuous protection (`status.protection`).
    pub fn with_protection(mut self, protection: Arc<ProtectStatus>) -> DaemonStatus {
        self.protection = Some(protection);
        self
    }

    fn protection(&self) -> Result<&Arc<ProtectStatus>, String> {
        self.protection
            .as_ref()
            .ok_or_else(|| control::status::NO_PROTECTION.to_string())
    }

    fn migration(&self) -> Result<&Arc<MigratingDevice>, String> {
        self.migration.as_ref().ok_or_else(|| NO_TARGET.to_string())
    }
}

impl Control for DaemonStatus {
    fn status(&self) -> Status {
        let guest = self.metered.counters();
        let bytes_total = self.metered.size();
        // Without a target nothing is copied: every chunk of the image
        // (the served snapshot's chunk size) waits in the store, and
        // every guest write goes to the overlay.
        let chunks_total = self
            .sources
            .first()
            .map(|s| u64::from(s.chunk_size()))
            .filter(|&cs| cs > 0)
            .map_or(0, |cs| bytes_total.div_ceil(cs));
        let (journal_active, journal_inactive_reason) = match &self.overlay {
            Some(o) => journal_fields(o.bitmap().journal_state()),
            None => (false, Some("no overlay".to_string())),
        };
        let mut status = Status {
            state: State::Serving,
            snapshot: self.snapshot.clone(),
            bytes_total,
            chunks_total,
            eta_seconds: Some(0.0),
            guest_read_ops: guest.read_ops,
            guest_read_bytes: guest.read_bytes,
            guest_write_ops: guest.write_ops,
            guest_write_bytes: guest.write_bytes,
            guest_flush_ops: guest.flush_ops,
            guest_io_errors: guest.io_errors,
            guest_latency: Some(guest_latency(&self.metered.latency())),
            chunk_read_errors: self.sources.iter().map(|s| s.read_errors()).sum(),
            overlay_write_bytes: guest.write_bytes,
            overlay_bytes: self.overlay.as_ref().map_or(0, |o| o.allocated_bytes()),
            cache_hit_rate: self.cache.as_ref().map_or(0.0, |c| c.stats().hit_rate()),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            journal_active,
            journal_inactive_reason,
            ..Status::default()
        };
        if let Some(m) = &self.migration {
            apply_migration(&m.status(), &mut status);
        }
        status.protection = self.protection.as_ref().map(|p| p.protection());
        status.remote_store = self.sources.first().and_then(|s| remote_store(s));
        status
    }

    fn pause(&self) -> Result<(), String> {
        self.migration()?.pause();
        Ok(())
    }

    fn resume(&self) -> Result<(), String> {
        self.migration()?.resume();
        Ok(())
    }

    fn set_rate(&self, bytes_per_second: u64) -> Result<(), String> {
        self.migration()?.set_rate(bytes_per_second);
        Ok(())
    }

    fn point(&self, timeout: Duration) -> Result<PointTaken, String> {
        self.protection()?.point_now(timeout)
    }

    fn point_wait(&self, cut: u64, timeout: Duration) -> Result<PointTaken, String> {
        self.protection()?.wait_point(cut, timeout)
    }
}

/// The operator's state for a migration phase (one to one; `serving` is
/// the state without a migration).
pub fn operator_state(phase: MigrationPhase) -> State {
    match phase {
        MigrationPhase::Migrating => State::Migrating,
        MigrationPhase::Paused => State::Paused,
        MigrationPhase::Complete => State::Complete,
        MigrationPhase::Failed => State::Failed,
    }
}

/// Copies the migration's fields into the operator's status.
fn apply_migration(m: &MigrationStatus, status: &mut Status) {
    status.state = operator_state(m.phase);
    if m.error.is_some() {
        status.error = m.error.clone();
    }
    status.target = Some(m.target.clone());
    status.bytes_total = m.bytes_total;
    status.bytes_migrated = m.bytes_migrated;
    status.bytes_to_copy = m.bytes_to_copy;
    status.bytes_copied = m.bytes_copied;
    status.bytes_skipped = m.bytes_skipped;
    status.bytes_copied_on_read = m.bytes_copied_on_read;
    status.chunks_total = m.chunks_total;
    status.chunks_migrated = m.chunks_migrated;
    status.chunks_failed = m.chunks_failed;
    status.chunks_repaired = m.chunks_repaired;
    status.copy_rate = m.copy_rate;
    status.rate_limit = m.rate_limit;
    status.eta_seconds = m.eta_seconds;
    status.overlay_bytes = m.overlay_bytes;
    status.overlay_write_bytes = m.overlay_write_bytes;
    (status.journal_active, status.journal_inactive_reason) = journal_fields(m.journal.clone());
}

/// The request counters of the served store, if it is remote.
fn remote_store(source: &StoreSource) -> Option<RemoteStore> {
    let r = source.reader().store().raw_backend().remote_stats()?;
    let cache = r.disk_cache.unwrap_or_default();
    let (last_error, last_error_unix) = match r.last_error {
        Some((text, at)) => {
            let unix = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (Some(text), Some(unix.as_secs_f64()))
        }
        None => (None, None),
    };
    Some(RemoteStore {
        location: r.location,
        retry_time_seconds: r.retry_time.as_secs_f64(),
        requests: r.requests,
        request_errors: r.request_errors,
        retries: r.retries,
        failed_operations: r.failed_operations,
        last_error,
        last_error_unix,
        disk_cache_bytes: cache.bytes,
        disk_cache_capacity: cache.capacity,
        disk_cache_hits: cache.hits,
        disk_cache_misses: cache.misses,
    })
}

/// `journal_active` and `journal_inactive_reason` for a journal state.
fn journal_fields(state: JournalState) -> (bool, Option<String>) {
    match state {
        JournalState::Active => (true, None),
        JournalState::Inactive(reason) => (false, Some(reason)),
    }
}

/// The block layer's latency histograms as a status report.
fn guest_latency(l: &block::metered::GuestLatency) -> control::latency::GuestLatency {
    let one = |h: &block::latency::LatencySnapshot| {
        control::latency::Latency::new(h.sum_ns, h.buckets.iter().map(|&(le, n)| [le, n]).collect())
    };
    control::latency::GuestLatency {
        read: one(&l.read),
        write: one(&l.write),
        flush: one(&l.flush),
        discard: one(&l.discard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::mem_device::MemDevice;

    #[test]
    fn serving_without_a_target_reports_guest_io_and_refuses_controls() {
        let dev = Arc::new(MeteredDevice::new(Arc::new(MemDevice::from_vec(vec![
            0u8;
            8192
        ]))));
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let created = Instant::now();
        let status = DaemonStatus::new("vm@abcd", dev.clone()).with_cache(cache);
        dev.write_at(&[1; 512], 0).unwrap();
        let mut buf = [0u8; 1024];
        dev.read_at(&mut buf, 0).unwrap();
        dev.flush().unwrap();
        let s = status.status();
        assert_eq!(s.state, State::Serving);
        assert_eq!(s.snapshot, "vm@abcd");
        assert_eq!(s.bytes_total, 8192);
        assert_eq!((s.guest_read_ops, s.guest_read_bytes), (1, 1024));
        assert_eq!((s.guest_write_ops, s.guest_write_bytes), (1, 512));
        assert_eq!((s.guest_flush_ops, s.guest_io_errors), (1, 0));
        // Each request is in its type's latency histogram.
        let l = s.guest_latency.expect("latency");
        assert_eq!((l.read.count, l.write.count, l.flush.count), (1, 1, 1));
        assert!(l.write.p99_us.is_some_and(|us| us > 0.0));
        assert_eq!(l.discard.p99_us, None);
        assert_eq!(s.target, None);
        // Every guest write went to the overlay; nothing is left to copy.
        assert_eq!(s.overlay_write_bytes, 512);
        assert_eq!((s.bytes_to_copy, s.eta_seconds), (0, Some(0.0)));
        // Uptime counts from the status's creation, not from some other epoch.
        let bound = created.elapsed().as_secs_f64();
        assert!(
            s.uptime_seconds > 0.0 && s.uptime_seconds <= bound,
            "{} not in (0, {bound}]",
            s.uptime_seconds
        );
        for r in [status.pause(), status.resume(), status.set_rate(5)] {
            assert!(r.unwrap_err().contains("--target"));
        }
    }

    #[test]
    fn serving_counts_the_chunks_of_the_served_snapshot() {
        // 10 chunks of 4 KiB and a short tail chunk (images are whole sectors).
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.img");
        let data: Vec<u8> = (0..10 * 4096 + 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &data).unwrap();
        let store = store::Store::init(&tmp.path().join("store"), 4096).unwrap();
        store
            .backup("disk", &image, &store::BackupOptions::default())
            .unwrap();
        let reader = Arc::new(store.open_snapshot("disk").unwrap());
        let dev = Arc::new(MeteredDevice::new(Arc::new(MemDevice::from_vec(data))));
        let status = DaemonStatus::new("disk@x", dev)
            .with_store_source(Arc::new(StoreSource::new(reader)))
            .status();
        assert_eq!(status.state, State::Serving);
        assert_eq!((status.chunks_total, status.chunks_migrated), (11, 0));
        assert_eq!(status.eta_seconds, Some(0.0));
    }

    #[test]
    fn a_migration_fills_progress_and_journal_fields() {
        let m = MigrationStatus {
            phase: MigrationPhase::Migrating,
            error: None,
            target: "/t".into(),
            bytes_total: 100,
            bytes_migrated: 60,
            bytes_to_copy: 50,
            bytes_copied: 20,
            bytes_skipped: 40,
            bytes_copied_on_read: 10,
            chunks_total: 10,
            chunks_migrated: 6,
            chunks_failed: 0,
            chunks_repaired: 0,
            copy_rate: 5.0,
            rate_limit: 5,
            eta_seconds: Some(6.0),
            overlay_bytes: 8,
            overlay_write_bytes: 12,
            journal: JournalState::Inactive("migrated bitmap: cannot read the boot id".into()),
        };
        let mut s = Status {
            journal_active: true,
            ..Status::default()
        };
        apply_migration(&m, &mut s);
        assert_eq!(s.state, State::Migrating);
        assert_eq!(
            (s.bytes_to_copy, s.bytes_copied, s.bytes_skipped),
            (50, 20, 40)
        );
        assert_eq!(s.overlay_write_bytes, 12);
        assert!(!s.journal_active);
        assert_eq!(
            s.journal_inactive_reason.as_deref(),
            Some("migrated bitmap: cannot read the boot id")
        );
        apply_migration(
            &MigrationStatus {
                journal: JournalState::Active,
                ..m
            },
            &mut s,
        );
        assert!(s.journal_active && s.journal_inactive_reason.is_none());
    }
}
