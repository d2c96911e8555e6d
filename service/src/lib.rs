//! Service plans: protect and recover a whole multi-VM service (a database,
//! an application and a web VM) at one point in time, under one RPO and one
//! retention policy.
//!
//! | module      | what                                                        |
//! |-------------|-------------------------------------------------------------|
//! | [`plan`]    | the TOML plan file, validated with line and key             |
//! | [`backup`]  | one group point: every disk of every VM at one instant      |
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
//!  store writer lock (shared by every member session)
//!  per VM: QMP connect, clear leftovers, per disk: resolve drive, decide
//!          full/incremental, add the scratch node            (nothing paused)
//!  window: every VM with a guest agent → fsfreeze (all of them have one)
//!          otherwise → QMP stop on every running VM
//!          per VM: one transaction starting every disk's fleece + new bitmap
//!          always: cont what we stopped, thaw what we froze
//!  read each member over NBD into the store (each read is itself parallel:
//!          8 NBD reads in flight, hashing on every core)
//!  every member succeeded → publish groups/<service>/<id>.json
//! ```
//! No guest makes progress between the first and the last transaction, so
//! a write that one VM made after (causally) a write of another VM is in
//! the group point only if that earlier write is too: the group point is a
//! consistent cut. The fleeces hold the instant while the disks are read,
//! so reading them one after another changes nothing.
//!
//! # Failure guarantees
//! - The window always ends: every VM we stopped is `cont`-ed and every
//!   guest we froze is thawed, whatever failed (a VM whose QMP died stays
//!   as it is; the others run on).
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
pub mod plan;
pub mod policy;
pub mod protect;

pub use plan::Plan;
