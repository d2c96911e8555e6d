//! How a protection point's threads share the CPU with the guest.
//!
//! A point is background work: its store threads (readers, hash and
//! compress workers) run as `SCHED_IDLE` while it copies, so they only
//! use a core nothing else wants. `nice` alone is not enough on a small
//! host: a woken request thread, or the vCPU thread it completes to,
//! is placed on an idle core, and a core running a niced thread is not
//! idle, so the woken thread queues behind its waker instead (measured:
//! the guest's write p99 at 20 MB/s with points every 5 s, 1.9× the
//! unprotected one with nice 10 against 1.15–1.4× with `SCHED_IDLE`; see
//! `docs/BENCHMARKS.md`). The cut (the gate's write side) and the end of
//! a point run at the `protect` thread's own priority (nice
//! [`crate::protect::POINT_NICE`]), never as `SCHED_IDLE`.
//!
//! **Starvation.** On a host whose cores are kept busy by other work, an
//! idle-class point would never finish, and a reader holding a capture
//! stripe (a few microseconds of copying) could keep a guest write to that
//! chunk waiting. A watchdog thread (`protect-watch`, started by
//! [`Background::run`]) therefore moves the point's threads back to
//! `SCHED_OTHER` (keeping their nice value) once the point has run for one
//! interval: the RPO stays within about two intervals, as with nice alone,
//! and any wait on a stripe ends then at the latest.
//!
//! The threads are found by name: the store's threads are unnamed, so
//! they carry the name of the thread that started them (`protect`, or a
//! service's `service-protect`).

use std::io;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Sets the calling thread's scheduling class: `SCHED_IDLE` when `idle`,
/// else `SCHED_OTHER` (the nice value is kept across both).
fn set_idle(tid: i32, idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the `sched_param` we pass, which is
    // alive and initialized for the call; tid 0 is the calling thread, any
    // other is a thread of this process (Linux schedules threads one by
    // one).
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a thread of this process can enter the idle class and leave
/// it again (checked once, on a thread of its own). Leaving it needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the thread's nice value;
/// without that a point would stay idle-class, and the watchdog could not
/// lift it, so points then keep to nice alone.
fn idle_class_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let probe = std::thread::Builder::new()
            .name("protect-probe".into())
            .spawn(|| {
                crate::protect::lower_priority();
                set_idle(0, true).and_then(|()| set_idle(0, false))
            })
            .map_err(|e| e.to_string())
            .and_then(|t| t.join().map_err(|_| "probe panicked".to_string()))
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = &probe {
            tracing::info!(error = %e, "protection: points cannot use the idle class here (nice only)");
        }
        probe.is_ok()
    })
}

/// The calling thread's name (`comm`).
fn own_name() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/thread-self/comm")?
        .trim_end()
        .to_owned())
}

/// Moves every thread of this process named `name` to `SCHED_OTHER`.
/// Returns how many were moved.
fn lift_named(name: &str) -> io::Result<usize> {
    let mut lifted = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the reads.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if comm.trim_end() == name && set_idle(tid, false).is_ok() {
            lifted += 1;
        }
    }
    Ok(lifted)
}

/// A one-shot signal with a timed wait: a point's copy is done (for its
/// watchdog), a service's `service-protect` thread must stop.
#[derive(Debug, Default)]
pub(crate) struct Flag {
    set: Mutex<bool>,
    cond: Condvar,
}

impl Flag {
    /// Raises the flag and wakes every waiter.
    pub(crate) fn set(&self) {
        *self.set.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.cond.notify_all();
    }

    /// Waits until the flag is raised or `deadline` passes; true if raised.
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            if *set || now >= deadline {
                return *set;
            }
            set = self
                .cond
                .wait_timeout(set, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The copy of one point in the idle class, with its watchdog: made by
/// the thread that runs the point ([`Background::run`]).
pub struct Background;

impl Background {
    /// Runs `f` (the point's store run, which starts the point's threads)
    /// with the calling thread, and so every thread it starts, in the idle
    /// class; a watchdog lifts them all back to `SCHED_OTHER` if `f` has
    /// not returned after `limit`. The calling thread is back in
    /// `SCHED_OTHER` when this returns. Where the idle class cannot be
    /// set, `f` simply runs as it is.
    pub fn run<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
        if !idle_class_usable() {
            return f();
        }
        let name = match own_name() {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "protection: thread name unknown, point not idle-class");
                return f();
            }
        };
        let done = Flag::default();
        std::thread::scope(|s| {
            let watchdog = std::thread::Builder::new()
                .name("protect-watch".into())
                .spawn_scoped(s, || watch(&done, &name, limit));
            if let Err(e) = &watchdog {
                tracing::debug!(error = %e, "protection: no watchdog, point not idle-class");
                return f();
            }
            let idle = set_idle(0, true);
            if let Err(e) = &idle {
                tracing::debug!(error = %e, "protection: cannot run the point idle-class");
            }
            let out = f();
            if idle.is_ok() {
                if let Err(e) = set_idle(0, false) {
                    tracing::warn!(error = %e, "protection: the point thread stays idle-class");
                }
            }
            done.set();
            out
        })
    }
}

/// The watchdog: waits for `done` up to `limit`, then lifts the threads
/// named `name`.
fn watch(done: &Flag, name: &str, limit: Duration) {
    if done.wait_until(Instant::now() + limit) {
        return;
    }
    match lift_named(name) {
        Ok(n) => tracing::info!(
            threads = n,
            after = ?limit,
            "protection: point still copying after an interval, its threads leave the idle class"
        ),
        Err(e) => tracing::warn!(error = %e, "protection: could not lift the point's threads"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of thread `tid` (0: the caller).
    fn policy(tid: i32) -> i32 {
        // SAFETY: sched_getscheduler takes a plain thread id.
        unsafe { libc::sched_getscheduler(tid) }
    }

    fn gettid() -> i32 {
        rustix::thread::gettid().as_raw_nonzero().get()
    }

    #[test]
    fn the_run_and_its_threads_are_idle_class_and_the_caller_returns() {
        let t = std::thread::Builder::new()
            .name("bg-test-a".into())
            .spawn(|| {
                let before = policy(0);
                let (inside, child) = Background::run(Duration::from_secs(60), || {
                    let child = std::thread::spawn(|| policy(0)).join().unwrap();
                    (policy(0), child)
                });
                (before, inside, child, policy(0))
            })
            .unwrap();
        let (before, inside, child, after) = t.join().unwrap();
        assert_eq!(before, libc::SCHED_OTHER);
        assert_eq!(after, libc::SCHED_OTHER);
        if idle_class_usable() {
            assert_eq!(inside, libc::SCHED_IDLE);
            assert_eq!(child, libc::SCHED_IDLE, "started threads inherit the class");
        } else {
            eprintln!(
                "NOTE: this process cannot leave the idle class: the nice-only fallback is checked"
            );
            assert_eq!((inside, child), (libc::SCHED_OTHER, libc::SCHED_OTHER));
        }
    }

    #[test]
    fn the_watchdog_lifts_a_point_that_runs_past_its_limit() {
        let t = std::thread::Builder::new()
            .name("bg-test-b".into())
            .spawn(|| {
                Background::run(Duration::from_millis(300), || {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let child = std::thread::spawn(move || {
                        tx.send(gettid()).unwrap();
                        // Still running when the watchdog fires.
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while policy(0) == libc::SCHED_IDLE && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        policy(0)
                    });
                    let tid = rx.recv().unwrap();
                    if idle_class_usable() {
                        assert_eq!(policy(tid), libc::SCHED_IDLE);
                    }
                    let child = child.join().unwrap();
                    (child, policy(0))
                })
            })
            .unwrap();
        let (child, own) = t.join().unwrap();
        assert_eq!(child, libc::SCHED_OTHER, "the started thread was lifted");
        assert_eq!(own, libc::SCHED_OTHER, "the caller too");
    }

    #[test]
    fn lifting_touches_only_threads_of_that_name() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::Builder::new()
            .name("bg-test-other".into())
            .spawn(move || {
                set_idle(0, true).unwrap();
                tx.send(gettid()).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        assert_eq!(lift_named("bg-test-none").unwrap(), 0);
        assert_eq!(policy(tid), libc::SCHED_IDLE);
        assert_eq!(lift_named("bg-test-other").unwrap(), 1);
        assert_eq!(policy(tid), libc::SCHED_OTHER);
        stop_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
