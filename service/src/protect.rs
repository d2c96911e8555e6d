//! `protect --plan`: the long-lived scheduler. A group point every
//! `interval` (the plan's, default RPO/2), the plan's retention after each
//! point, one outcome per point for the caller to log.
//!
//! Stop: the `stop` flag (SIGTERM, SIGINT) ends the wait at once; a point
//! being taken is aborted the clean way (no group point is published, QEMU
//! is left as it was, every change stays tracked), so a stop never leaves
//! half a point. A failed point is recorded (`check` reports it) and the
//! scheduler carries on at the next tick.

pub mod control;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor::pacing::Rate;
use serde::Serialize;
use store::Store;
use tracing::warn;

use crate::backup::{self, GroupReport};
use crate::plan::Plan;
use crate::policy;

/// How often the wait between points looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The outcome of one scheduled point.
#[derive(Debug, Serialize)]
pub struct PointOutcome {
    /// 1-based.
    pub point: u64,
    pub report: Option<GroupReport>,
    /// The error chain of a failed point.
    pub error: Option<String>,
    /// Group points forgotten by retention after it.
    pub forgotten: Vec<String>,
}

/// Options of [`run`].
pub struct Options<'a> {
    pub stop: &'a AtomicBool,
    pub threads: Option<usize>,
    /// How each group point's NBD reads are paced (see
    /// [`backup::Options::rate`]).
    pub rate: Rate,
    /// Stop after this many points (tests).
    pub max_points: Option<u64>,
    /// Called after every point.
    pub on_point: &'a dyn Fn(&PointOutcome),
    /// Control socket (status and metrics, see [`control`]).
    pub control: Option<&'a Path>,
}

/// Totals of a protect run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Totals {
    pub points: u64,
    pub failures: u64,
}

/// The whole error chain on one line.
pub use hypervisor::nbd::error_chain as chain;

/// Run the scheduler until `opts.stop` is set.
pub fn run(plan: &Plan, opts: &Options<'_>) -> Result<Totals, backup::Error> {
    let store = Store::open(&plan.store).map_err(|source| backup::Error::OpenStore {
        path: plan.store.clone(),
        source,
    })?;
    let interval = Duration::from_micros(plan.interval as u64);
    let mut totals = Totals::default();
    let newest = store
        .groups(&plan.service)?
        .into_iter()
        .rev()
        .find(|g| policy::is_complete(plan, g));
    let status = Arc::new(Mutex::new(control::ServiceStatus {
        service: plan.service.clone(),
        rpo_target_seconds: plan.rpo as f64 / 1e6,
        interval_seconds: plan.interval as f64 / 1e6,
        last_point: newest.as_ref().map(|g| g.reference()),
        last_point_micros: newest.as_ref().map(|g| g.micros()),
        last_blackout_ms: newest.as_ref().map(|g| g.blackout_ms),
        ..Default::default()
    }));
    let _server = match opts.control {
        Some(p) => Some(
            control::serve(p, status.clone()).map_err(|e| backup::Error::Control(Box::new(e)))?,
        ),
        None => None,
    };
    loop {
        if opts.stop.load(Ordering::Relaxed) {
            break;
        }
        let tick = Instant::now();
        let r = backup::run_in(
            &store,
            plan,
            &backup::Options {
                abort: opts.stop,
                threads: opts.threads,
                full: false,
                rate: opts.rate,
            },
        );
        if matches!(r, Err(backup::Error::Interrupted)) {
            // Stopped mid-point: nothing was published; not a failure.
            break;
        }
        totals.points += 1;
        let mut outcome = PointOutcome {
            point: totals.points,
            report: None,
            error: None,
            forgotten: Vec::new(),
        };
        match r {
            Ok(report) => {
                if let Err(e) = policy::record_outcome(&store, &plan.service, Ok(&report.group)) {
                    warn!("{}", chain(&e));
                }
                if !plan.retention.is_empty() {
                    match policy::forget(&store, plan, false) {
                        Ok(d) => {
                            outcome.forgotten = d
                                .into_iter()
                                .filter(|d| !d.decision.keep)
                                .map(|d| d.decision.snapshot)
                                .collect()
                        }
                        Err(e) => warn!("retention failed: {}", chain(&e)),
                    }
                }
                outcome.report = Some(report);
            }
            Err(e) => {
                totals.failures += 1;
                let msg = chain(&e);
                if let Err(e) = policy::record_outcome(&store, &plan.service, Err(&msg)) {
                    warn!("{}", chain(&e));
                }
                outcome.error = Some(msg);
            }
        }
        {
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            st.points = totals.points;
            st.failures = totals.failures;
            st.last_error = outcome.error.clone();
            if let Some(r) = &outcome.report {
                st.last_point = Some(r.group.clone());
                st.last_point_micros = r
                    .group
                    .split_once('@')
                    .and_then(|(_, id)| store::snapshot::micros_from_id(id));
                st.last_blackout_ms = Some(r.blackout_ms);
            }
        }
        (opts.on_point)(&outcome);
        if opts.max_points.is_some_and(|m| totals.points >= m) {
            break;
        }
        while tick.elapsed() < interval && !opts.stop.load(Ordering::Relaxed) {
            std::thread::sleep(STOP_POLL.min(interval.saturating_sub(tick.elapsed())));
        }
    }
    Ok(totals)
}
