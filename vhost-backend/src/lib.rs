//! vhost-user-blk device: serves any [`block::BlockDevice`] to a VM.
//!
//! (Design doc follows; see `docs/ARCHITECTURE.md` for the map.)

pub mod device;
pub mod handler;
pub mod inflight;
pub mod request;
pub mod socket;
pub mod wire;
pub mod worker;
