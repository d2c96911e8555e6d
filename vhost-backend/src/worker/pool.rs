//! The I/O pool: a few threads that execute requests beside the queue
//! workers, so one queue can have several requests in flight.
//!
//! Jobs are boxed closures in one FIFO. [`Pool::submit`] wakes at most as
//! many sleeping threads as it queued jobs, so a burst of small requests
//! does not stampede the whole pool. Dropping the pool lets the threads
//! finish every queued job, then joins them: nothing submitted is lost.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use tracing::debug;

/// A unit of work: one request executed and completed.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under this lock, so poisoning cannot leave the
        // queue half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fixed set of threads running [`Job`]s in submission order.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads` threads named `{name}-{i}`.
    pub fn new(name: &str, threads: usize) -> io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                idle: 0,
                stopping: false,
            }),
            ready: Condvar::new(),
        });
        let mut pool = Pool {
            shared,
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let shared = pool.shared.clone();
            // On failure, dropping `pool` stops the threads already started.
            let handle = thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || run(&shared))?;
            pool.threads.push(handle);
        }
        debug!(threads, "I/O pool started");
        Ok(pool)
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Queues `jobs` and wakes up to one sleeping thread per job.
    pub fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        let wake = {
            let mut state = self.shared.lock();
            let before = state.jobs.len();
            state.jobs.extend(jobs);
            (state.jobs.len() - before).min(state.idle)
        };
        for _ in 0..wake {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.ready.notify_all();
        for handle in self.threads.drain(..) {
            // A job that panicked has already been reported by the panic
            // hook; the other jobs still ran on the remaining threads.
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// A pool thread: runs jobs until the pool stops and the queue is empty.
fn run(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.stopping {
                    return;
                }
                state.idle += 1;
                state = shared
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn jobs_run_concurrently_and_drop_finishes_the_queue() {
        let pool = Pool::new("test-io", 3).unwrap();
        assert_eq!(pool.threads(), 3);
        // Three jobs that each wait for all three to have started: they
        // can only finish if they really run at the same time.
        let started = Arc::new(std::sync::Barrier::new(3));
        let (tx, rx) = mpsc::channel();
        pool.submit((0..3).map(|i| {
            let (started, tx) = (started.clone(), tx.clone());
            Box::new(move || {
                started.wait();
                tx.send(i).unwrap();
            }) as Job
        }));
        let mut got: Vec<i32> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);

        // Queued work survives dropping the pool.
        let done = Arc::new(AtomicUsize::new(0));
        pool.submit((0..50).map(|_| {
            let done = done.clone();
            Box::new(move || {
                thread::sleep(Duration::from_micros(200));
                done.fetch_add(1, Ordering::SeqCst);
            }) as Job
        }));
        drop(pool);
        assert_eq!(done.load(Ordering::SeqCst), 50);
    }
}
