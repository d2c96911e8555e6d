//! Service plans: protect and recover a whole multi-VM service (a database,
//! an application and a web VM) at one point in time, under one RPO and one
//! retention policy.
//!
//! | module      | what                                                        |
//! |-------------|-------------------------------------------------------------|
//! | [`plan`]    | the TOML plan file, validated with line and key             |
//! | [`backup`]  | one group point: every disk of every VM at one instant      |
//! | [`daemon_point`] | members served by our daemon: its protection point, cut in the window |
//! | [`check`]   | drill check specs (`console:REGEX`, `qga`, `tcp:PORT`, `exec:CMD`) |
//! | [`policy`]  | `check` (RPO, last run), `forget --plan` (retention), last-run record |
//! | [`protect`] | the long-lived scheduler: a group point every interval      |
//!
//! Group point records live in the store ([`store::group`]):
//! `groups/<service>/<id>.json`, published after every member snapshot,
//! plus `groups/<service>/last-run.json` (the outcome of the last run, for
//! `check`).
//!
//! # One instant
//! ```text
//!  daemon members: status of each daemon (reachable, protecting, points
//!          named <service>-<vm>-<drive>), then a point on each, waited
//!          for, so none is copying one when the window cuts (nothing paused)
//!  store writer lock (shared by every fleeced member's session; waited
//!          for while a daemon writes a point)
//!  per VM: QMP connect, clear leftovers, per fleeced disk: resolve drive,
//!          decide full/incremental, add the scratch node     (nothing paused)
//!  window: every VM with a guest agent → fsfreeze (all of them have one)
//!          otherwise → QMP stop on every running VM
//!          per VM: one transaction starting every fleeced disk's fleece +
//!          new bitmap; then `point` on every daemon at once (answered
//!          once its cut is taken)
//!          always: cont what we stopped, thaw what we froze
//!  read the fleeced members over NBD into the store, up to
//!          backup::PARALLEL_READS VMs at once (the store serializes the
//!          index merge that ends each; one member of a VM at a time; the
//!          cores are split among the reads: 8 NBD reads in flight each)
//!  daemon members: release the lock, `point-wait` on every daemon (it
//!          writes its point under the lock), take the lock again
//!  every member succeeded → publish groups/<service>/<id>.json
//! ```
//! A daemon member's snapshot is the daemon's protection point
//! ([`daemon_point`]); a group point is the same record whichever way its
//! members were taken.
//! No guest makes progress between the first and the last transaction, so
//! a write that one VM made after (causally) a write of another VM is in
//! the group point only if that earlier write is too: the group point is a
//! consistent cut. The fleeces (and the daemons' copy-before-write points)
//! hold the instant while the disks are read, so when each is read
//! changes nothing.
//!
//! # Failure guarantees
//! - The window always ends: every VM we stopped is `cont`-ed and every
//!   guest we froze is thawed, whatever failed (a VM whose QMP died stays
//!   as it is; the others run on).
//! - A daemon that does not answer fails the group before the window (its
//!   status) or in it (its cut): no group point; the window still ends.
//!   A daemon's point of a failed group stays, an ordinary point (the
//!   parent of the daemon's next one).
//! - Any member failing (QMP gone, scratch space, NBD, store) fails the
//!   group: no group point is published; every fleece is torn down; every
//!   member's new dirty bitmap is merged back into its base and the member
//!   snapshots already written are forgotten, so the next run's incremental
//!   starts from the previous group point and captures every change.
//! - A crash before the record is published leaves member snapshots that
//!   belong to no group (ordinary snapshots) and QEMU objects with our
//!   name prefix, which the next run clears (see
//!   [`hypervisor::live_backup`]).
#![forbid(unsafe_code)]

pub mod backup;
pub mod check;
pub mod daemon_point;
pub mod plan;
pub mod policy;
pub mod protect;

pub use plan::Plan;
