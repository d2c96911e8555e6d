//! Talk to QEMU and back up running VMs.
//!
//! Modules, one per remote system, each with a typed layer over its wire:
//! - [`nbd`]: an NBD client (fixed newstyle, structured replies, meta
//!   contexts, pipelined reads and block status); [`nbd::proto`] holds the
//!   pure parsers (fuzzed).
#![forbid(unsafe_code)]

pub mod nbd;

pub mod qga;
pub mod qmp;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
