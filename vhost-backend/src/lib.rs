//! vhost-user-blk device: serves any [`block::BlockDevice`] to a VM.
//!
//! # What this crate owns
//! Only the virtio-blk device behind a vhost-user socket: the socket's
//! life cycle, the vhost-user messages, the virtqueues, request parsing and
//! execution, and the in-flight region that lets a restarted daemon finish
//! what a dead one held. It knows nothing of the store, the overlay or the
//! migration: everything below is one `Arc<dyn BlockDevice>` (crate
//! `block`), and it does not depend on `store`. The daemon (crate
//! `daemon`) builds the device stack and hands it to [`socket::BlockServer`].
//!
//! # Model
//! ```text
//!  BlockServer::bind ── socket (0600) ── serve: one frontend at a time, forever
//!    per connection: fresh VhostUserBlk (device) + BlkHandler (handler) + I/O pool
//!      BlkHandler     vhost-user messages: features, memory table, vrings,
//!                     in-flight region (GET/SET_INFLIGHT_FD), queue start/stop
//!      vq{N} thread   per queue: kick ─> Worker::process ─> pop, mark in flight,
//!                     Request::parse ─> run here (cheap) or on the pool
//!      blk-io-{i}     Request::execute on the BlockDevice ─> complete (used ring)
//! ```
//! A request goes parse → execute → status ([`request`]): `parse` enforces
//! every MUST of the virtio spec on the untrusted chain, `execute` hands
//! the guest buffers to [`BlockDevice::read_vectored_at`](block::BlockDevice::read_vectored_at) /
//! [`BlockDevice::write_vectored_at`](block::BlockDevice::write_vectored_at)
//! in one call, and the status byte says OK, IOERR or UNSUPP. Requests of
//! a queue complete out of order, as virtio allows ([`worker`] has the
//! argument, including why FLUSH needs no barrier).
//!
//! # Modules
//! | module | owns |
//! |---|---|
//! | [`socket`] | [`socket::BlockServer`] (bind through `block::socket::bind_private_socket`, optionally owned by `--socket-owner`, serve, reconnect), [`socket::StopHandle`], [`socket::Listening`] |
//! | [`handler`] | [`handler::BlkHandler`]: the `vhost` crate's `VhostUserBackendReqHandlerMut` for one connection, queue life cycle, the `vq{N}` threads |
//! | [`device`] | [`device::VhostUserBlk`] (features, config space, per-queue workers, the pool; quiesce) and [`device::DeviceConfig`] |
//! | [`worker`] | [`worker::Worker`]: pop, parse, dispatch inline or to the pool, complete, EVENT_IDX; `worker::held` (`HeldHeads`, what a queue holds), `worker::pool` (the I/O pool) |
//! | [`request`] | [`request::Request::parse`] (`request::chain`: walking a chain from its head index) and `execute` (`request::execute`) |
//! | [`inflight`] | the `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` region: layout, fetch/put protocol, recovery |
//! | [`wire`] | `#[repr(C)]` virtio-blk structs, the crate's only `unsafe` (`ByteValued` impls) |
//!
//! # Threads
//! | thread | how many | owns |
//! |---|---|---|
//! | the caller of [`socket::BlockServer::serve`] (the daemon's main thread) | 1 | accepting frontends, running one connection's vhost-user messages (under the handler's `Mutex`), the flush between connections |
//! | `vq{N}` | one per queue, per connection | waiting for the queue's kick (epoll on the kick eventfd, a wake eventfd and an exit eventfd) and, in the same thread, the queue's [`worker::Worker`]: there is no separate kick thread |
//! | `blk-io-{i}` | `DeviceConfig::io_threads` per connection (default four per CPU, 8..=32; 0 = none) | executing requests handed over by the workers and completing them |
//!
//! Which requests run on `vq{N}` and which go to the pool is decided per
//! request in [`worker`]: a lone request on an idle queue, refusals and
//! GET_ID run inline; a small (≤ 64 KiB) read the device says it can serve
//! from memory right now (every chunk cached or zero:
//! [`read_is_cheap`](block::BlockDevice::read_is_cheap)) runs inline,
//! untimed; other small reads and writes run inline only while the queue's
//! moving average of their run time is under 10 µs (reads) or 40 µs
//! (writes); that average starts at twice the limit, so a new connection's
//! small requests go to the pool until fast ones pull it down; everything
//! else goes to the pool.
//!
//! # Locks
//! Outermost first: the handler's `Mutex<BlkHandler>` → a queue's worker
//! lock (`Mutex<Worker>`, held by `vq{N}` for a whole kick's processing,
//! inline requests included) → the queue's vring lock
//! (`VringRwLock`, held only for popping chains, putting one used element
//! with its in-flight region updates, and signalling). The guest memory
//! `RwLock`, `HeldHeads`' mutex and the pool's queue are leaves. The vring
//! lock is never held while a request executes, so block-layer locks nest
//! under the worker lock (inline requests) or under nothing (pool threads),
//! never under the vring lock. The whole process's order is in
//! `docs/ARCHITECTURE.md`, "Lock order".
//!
//! # Reconnect and restart
//! The listening socket outlives connections: QEMU with `reconnect=1`
//! finds it again after a guest reboot, a QEMU restart, or a daemon
//! restart. Every connection starts from a fresh device state and ends
//! only once every request it took has completed and the device is
//! flushed. A daemon killed mid-request leaves the heads it held marked in
//! the frontend's in-flight region; the next daemon resubmits them in
//! their original order at queue start. The region's layout and the
//! recovery argument have one home, [`inflight`]; the queue life cycle is
//! in [`handler`].
//!
//! # Errors
//! Each module has its `thiserror` enum ([`socket::Error`],
//! [`device::Error`], [`worker::Error`], [`inflight::Error`],
//! [`request::ParseError`], `request::ExecuteError`). At the vhost trait
//! boundary errors become `io::Error::other`. Nothing a guest sends can
//! panic the daemon: a bad chain is `Rejected` (IOERR when its status byte
//! can be found, else returned with used length 0), a device error is
//! IOERR, an unknown request type UNSUPP, and a panicking device earns its
//! request an IOERR instead of a lost completion. Guest-triggered problems
//! log at `debug`, device errors at `warn`.

pub mod device;
pub mod handler;
pub mod inflight;
pub mod request;
pub mod socket;
pub mod wire;
pub mod worker;
