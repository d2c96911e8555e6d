//! Talk to QEMU and back up running VMs.
//!
//! One module per remote system, each a typed layer over its wire, plus the
//! orchestration that uses them:
//!
//! | module          | talks to                 | wire                                   |
//! |-----------------|--------------------------|----------------------------------------|
//! | [`qmp`]         | QEMU monitor             | line-delimited JSON on a unix socket    |
//! | [`qga`]         | qemu-guest-agent         | the same JSON, resynchronised by 0xFF   |
//! | [`nbd`]         | QEMU's NBD server        | NBD fixed newstyle, structured replies  |
//! | [`live_backup`] | all three, and the store | fleecing + dirty bitmaps → snapshots    |
//! | [`libvirt`]     | libvirtd, through virsh  | backup API (pull mode) + checkpoints    |
//! | [`pacing`]      | (QMP or virsh counters)  | `--rate auto`: guest latency → read rate |
//!
//! [`nbd::proto`] holds the NBD parsers without I/O, so they can be fuzzed
//! (`fuzz/fuzz_targets/nbd_reply.rs`). Everything a server sends is
//! untrusted: malformed input is an error naming what was wrong, never a
//! panic.
//!
//! Concurrency: a [`qmp::Qmp`] session is used by one thread; an
//! [`nbd::Client`] is `Sync` and pipelines requests from any number of
//! threads (one reader thread routes replies by cookie).
//!
//! The design of a live backup (point in time, bitmaps, cleanup after
//! failures and kills) is in [`live_backup`].
#![forbid(unsafe_code)]

pub mod libvirt;
pub mod live_backup;
pub mod nbd;
pub mod pacing;
pub mod qga;
pub mod qmp;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;
