//! vhost-user-blk backend: serves a store snapshot to a VM.
//!
//! Layers, top to bottom:
//! - the vhost-user device (`backend`, `worker`, `request`, `wire`), which
//!   speaks virtio-blk and knows nothing about storage;
//! - the block layers behind [`block::BlockDevice`]: the copy-on-write
//!   overlay over the snapshot reader (through a shared chunk cache), and
//!   the migration target.

pub mod bitmap;
pub mod block;
pub mod cache;
pub mod overlay;
pub mod snapshot_layer;
pub mod source;
pub mod state;
