//! vhost-user-blk backend: serves a store snapshot to a VM.
//!
//! Layers, top to bottom:
//! - the vhost-user device (`backend`, `worker`, `request`, `wire`), which
//!   speaks virtio-blk and knows nothing about storage;
//! - the block layers behind [`block::BlockDevice`]: the copy-on-write
//!   overlay over the snapshot reader (through a shared chunk cache), and
//!   the migration target.

pub mod backend;
pub mod bitmap;
pub mod block;
pub mod cache;
pub mod control;
pub mod daemon;
pub mod daemon_status;
pub mod handler;
pub mod inflight;
pub mod mem_device;
pub mod metered;
pub mod migrate;
pub mod overlay;
pub mod request;
pub mod serve;
pub mod snapshot_layer;
pub mod source;
pub mod state;
pub mod status;
pub mod store_source;
pub mod target;
pub mod wire;
pub mod worker;
