//! Block layers of the instant-recovery daemon: everything between a
//! guest's request and the bytes on disk, with no notion of virtio.
//!
//! # What this crate owns
//! The [`BlockDevice`] trait and every layer behind it: the read-only
//! snapshot layer over the shared chunk cache, the persistent
//! copy-on-write overlay, the migration to a target (copier, copy-on-read,
//! repair, throttle), the persistent bitmaps and their live journals, and
//! the vectored syscalls that move request data between files and guest
//! memory. It depends on `store` only through one module, `store_source`,
//! behind the `store` feature (the daemon turns it on; the vhost-user
//! device builds without the store), and
//! on `vm-memory` for [`VolatileSlice`](vm_memory::VolatileSlice); it does
//! not depend on `vhost`, `vhost-user-backend` or `virtio-queue`. The
//! vhost-user-blk device (crate `vhost-backend`) sits on top and talks only
//! to [`BlockDevice`]; the daemon (crate `daemon`) assembles the stack.
//!
//! # Model: a stack of `BlockDevice`s
//! ```text
//!  MeteredDevice        guest op/byte/error counters              (metered)
//!   └ MigratingDevice   with --target: routes by migrated bit      (migrate)
//!      ├ Target         raw file or block device                   (target)
//!      └ Overlay        guest writes, 4 KiB blocks, bitmap         (overlay, bitmap)
//!         └ SnapshotLayer  read-only, chunk by chunk               (snapshot)
//!            └ ChunkCache  sharded CLOCK, single-flight misses     (cache)
//!               └ ChunkSource: StoreSource ─> store::SnapshotReader (source, store_source)
//! ```
//! Without `--target` the overlay sits directly under the metered device.
//! Once a migration completes, `MigratingDevice` drops the overlay and the
//! snapshot layer and passes every request to the target.
//!
//! Every layer takes byte offsets and lengths already checked against
//! [`BlockDevice::size`]. Request data arrives as guest memory
//! ([`BlockDevice::read_vectored_at`] / [`BlockDevice::write_vectored_at`]):
//! - **reads** are served run by run ([`device::ReadDest`]): a migrated
//!   chunk and an overlay block go from their file to guest memory with
//!   `preadv` (no copy, [`io::preadv_all`]); a snapshot chunk is copied once
//!   from the cached chunk; a zero chunk is filled with zeroes;
//! - **writes** are copied once into a per-thread scratch buffer (guest
//!   memory may change under us; the default `write_vectored_at`), then
//!   written with `pwrite`.
//!
//! | request | migrated chunk | chunk not migrated (or no target) |
//! |---|---|---|
//! | read | target | copy-on-read (copy the chunk, serve from the copy; on failure from the overlay); without a target: overlay, whose absent blocks come from the snapshot layer |
//! | write | target | overlay: whole 4 KiB blocks written, partial blocks read-modify-write from below |
//! | discard, write-zeroes | zero the target range | overlay: punch a hole, set the bits |
//! | flush | overlay flush (data fdatasync, then its bitmap), then target fdatasync + migrated bitmap | same |
//!
//! # Modules
//! | module | owns |
//! |---|---|
//! | [`device`] | the [`BlockDevice`] trait (with `read_is_cheap`, the hint that lets the device run reads served from memory on the queue's thread), run-by-run read helpers (`ReadDest`, `ReadRun`, `SliceCursor`), the per-thread scratch buffer |
//! | [`io`] | `preadv_all` / `pwritev_all` between files and guest memory (unsafe: the syscalls) |
//! | [`mod@file`] | `write_atomic`, `sync_parent_dir`, `check_bounds` |
//! | [`socket`] | `bind_private_socket`: the vhost-user and control sockets, never reachable by anyone but their owner (private directory, chown to a `SocketOwner`, chmod, rename into place); `SocketFile` removes it on drop unless replaced |
//! | [`source`] | the [`source::ChunkSource`] seam to the store; `VecSource` and the shared `check_read_write` harness for tests |
//! | `store_source` | `store::SnapshotReader` as a `ChunkSource`, with an in-memory table of chunk keys (pages filled from the manifest on first use); store errors become `io::Error`s with their chain, counted |
//! | [`cache`] | [`cache::ChunkCache`], shared by every queue and the copier |
//! | [`snapshot`] | [`snapshot::SnapshotLayer`], the bottom layer |
//! | [`overlay`] | [`overlay::Overlay`] (copy-on-write, crash argument), `overlay::locks` (striped `LockTable`) |
//! | [`bitmap`] | [`bitmap::PersistentBitmap`] (format, sync ordering, `journal_state`), `bitmap::journal` (the `.live` journal) |
//! | [`target`] | [`target::Target`]: the raw file or block device migrated to; exclusive use (OFD write lock on a file, `O_EXCL` on a device), identity recorded in the state and checked on every start, zeroing without writing zeroes, sync |
//! | [`migrate`] | [`migrate::MigratingDevice`] (routing, crash argument, verify), `migrate::copier`, `migrate::repair` (`--repair-from`), `migrate::throttle` (rate limit and rate window), `migrate::progress` (bytes to copy, copied, skipped) |
//! | [`metered`] | [`metered::MeteredDevice`]: guest counters for the status report |
//! | [`protect`] | [`protect::ProtectLayer`]: continuous protection (persistent changed-chunk bitmaps, the point instant, copy-before-write while a point is copied); `protect::DiskDevice` (`serve --disk`: a raw file or device through `Target`) |
//! | [`state`] | [`state::LayerState`] (where the layers' files and migration record live; the daemon's state dir implements it), `MigrationState`, the one story of states |
//! | `mem_device` | `MemDevice` and `FileDevice`, reference devices (feature `test-util`) |
//!
//! # Concurrency
//! Every layer is `Send + Sync` and is called concurrently by the queue
//! threads, the I/O pool and the copier workers. Locks, outermost first
//! (the whole process's order is in `docs/ARCHITECTURE.md`, "Lock order"):
//! 1. **chunk stripes** (`MigratingDevice`, 4096 stripes by chunk index):
//!    guest writes/discards/write-zeroes of a range, and every copy of a
//!    chunk (copier, copy-on-read, repair);
//! 2. **overlay block stripes** (`Overlay`, 4096 stripes by 4 KiB block):
//!    every overlay mutation;
//! 3. **bitmap sync lock** (one per `PersistentBitmap`), held through its
//!    `sync_after`, including the data sync it wraps;
//! 4. **journal word lock** (one per journal), held for one 8-byte `pwrite`.
//!
//! A range takes its stripes in ascending order (`overlay::locks`), the
//! only way anybody holds two stripes of one table. Everything else is a
//! leaf held for a few field accesses and never across I/O that could need
//! another lock: the cache shards (a miss fetches outside any lock; threads
//! wanting the same chunk wait for that fetch, which takes no lock of this
//! crate; the store source's key-table pages are `OnceLock`s filled by one
//! `pread` each), the migration's `ctl`/`cursor`/`failed`/`window` mutexes
//! (`cursor` before `failed` is the only nesting), the rate limiter, and
//! the `layers` `RwLock` (cloned out, swapped once at completion). Plain
//! reads take no stripe (copy-on-read takes the chunk's, as any copy): a
//! bit is set only after its data is written and never cleared, so a
//! reader sees either the old layer or the complete new data. Threads: the copier's (`copier`, `copier-{i}`) are the only ones
//! this crate starts.
//!
//! # Formats and crash guarantees
//! - The bitmap file format is documented in [`bitmap`], the `.live`
//!   journal's in `bitmap::journal`; the layout of the state dir that holds
//!   them, in `daemon::state_dir`.
//! - The crash *arguments* live beside the code: bit ordering and torn
//!   writes in [`bitmap`], daemon restarts on the same boot in
//!   `bitmap::journal`, the overlay's claim in [`overlay`], the migration's
//!   in [`migrate`]. What is guaranteed, and which test proves it, has one
//!   home: `docs/ARCHITECTURE.md`, "Fault guarantees".
//!
//! # States
//! One story, told in [`state`]: the persistent `MigrationState`
//! (`state.json`), the running copier's [`migrate::MigrationPhase`]
//! (reported in [`migrate::MigrationStatus`]), and the operator's
//! `control::State`, which the daemon maps from the phase.
//!
//! # Errors
//! At the [`BlockDevice`] boundary everything is an `io::Error` (a guest
//! request then completes with `VIRTIO_BLK_S_IOERR`). Opening a layer has a
//! `thiserror` enum per module (`bitmap::Error`, `overlay::Error`,
//! `target::Error`, `migrate::Error`), each variant naming the failed
//! action and its path. A damaged chunk is an error, never data: the store
//! re-hashes every chunk it returns, and the cache never caches an error.
//! [`error_chain`] formats `outer: inner: root` for logs.

pub mod bitmap;
pub mod cache;
pub mod device;
pub mod file;
pub mod io;
pub mod latency;
#[cfg(any(test, feature = "test-util"))]
pub mod mem_device;
pub mod metered;
pub mod migrate;
pub mod overlay;
pub mod protect;
pub mod snapshot;
pub mod socket;
pub mod source;
pub mod state;
#[cfg(any(test, feature = "store"))]
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
