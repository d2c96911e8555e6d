//! Block layers of the instant-recovery daemon.
//!
//! Everything between a guest's request and the bytes on disk, with no
//! notion of virtio: the vhost-user-blk device (crate `vhost-backend`)
//! sits on top and talks only to [`BlockDevice`].
//!
//! (The full design doc follows in this crate root; see
//! `docs/ARCHITECTURE.md` for the map.)

pub mod bitmap;
pub mod cache;
pub mod device;
pub mod file;
pub mod io;
#[cfg(any(test, feature = "test-util"))]
pub mod mem_device;
pub mod metered;
pub mod migrate;
pub mod overlay;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod store_source;
pub mod target;

pub use device::BlockDevice;

/// Formats an error with its whole source chain, `outer: inner: root`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
