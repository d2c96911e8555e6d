//! [`DaemonStatus`]: the daemon's [`Control`], assembled from its parts.
//!
//! The status report combines the guest counters of the
//! [`MeteredDevice`], the migration (if there is a target), the chunk
//! cache's hit rate, the overlay's size, the failed chunk reads of the
//! store sources and the uptime. Control commands
//! (pause, resume, set-rate) go to the migration; without a target they
//! are refused with a message saying so.

use std::sync::Arc;
use std::time::Instant;

use block::cache::ChunkCache;
use block::device::BlockDevice;
use block::metered::MeteredDevice;
use block::migrate::{MigratingDevice, MigrationPhase, MigrationStatus};
use block::overlay::Overlay;
use block::store_source::StoreSource;
use control::{Control, State, Status};

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

    fn migration(&self) -> Result<&Arc<MigratingDevice>, String> {
        self.migration.as_ref().ok_or_else(|| NO_TARGET.to_string())
    }
}

impl Control for DaemonStatus {
    fn status(&self) -> Status {
        let guest = self.metered.counters();
        let mut status = Status {
            state: State::Serving,
            error: None,
            snapshot: self.snapshot.clone(),
            target: None,
            bytes_total: self.metered.size(),
            bytes_migrated: 0,
            bytes_copied_on_read: 0,
            chunks_total: 0,
            chunks_migrated: 0,
            chunks_failed: 0,
            copy_rate: 0.0,
            rate_limit: 0,
            eta_seconds: None,
            guest_read_ops: guest.read_ops,
            guest_read_bytes: guest.read_bytes,
            guest_write_ops: guest.write_ops,
            guest_write_bytes: guest.write_bytes,
            guest_flush_ops: guest.flush_ops,
            guest_io_errors: guest.io_errors,
            chunk_read_errors: self.sources.iter().map(|s| s.read_errors()).sum(),
            chunks_repaired: 0,
            overlay_bytes: self.overlay.as_ref().map_or(0, |o| o.allocated_bytes()),
            cache_hit_rate: self.cache.as_ref().map_or(0.0, |c| c.stats().hit_rate()),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
        };
        if let Some(m) = &self.migration {
            apply_migration(&m.status(), &mut status);
        }
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
    status.bytes_copied_on_read = m.bytes_copied_on_read;
    status.chunks_total = m.chunks_total;
    status.chunks_migrated = m.chunks_migrated;
    status.chunks_failed = m.chunks_failed;
    status.chunks_repaired = m.chunks_repaired;
    status.copy_rate = m.copy_rate;
    status.rate_limit = m.rate_limit;
    status.eta_seconds = m.eta_seconds;
    status.overlay_bytes = m.overlay_bytes;
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
        assert_eq!(s.target, None);
        assert!(s.uptime_seconds >= 0.0);
        for r in [status.pause(), status.resume(), status.set_rate(5)] {
            assert!(r.unwrap_err().contains("--target"));
        }
    }
}
