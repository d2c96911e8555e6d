//! Which requests of one queue the device holds: popped from the
//! available ring, not yet on the used ring.
//!
//! Tracked per descriptor head, so stopping a queue can wait until the
//! device owns nothing, and so the set can later be mirrored into the
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` region that lets a restarted
//! daemon resubmit what a crashed one held.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The in-flight heads of one queue.
#[derive(Debug, Default)]
pub struct HeldHeads {
    heads: Mutex<Heads>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct Heads {
    /// Head → how many times it is in flight. More than once only when a
    /// (buggy) driver resubmits a head the device still holds.
    count: HashMap<u16, u32>,
    total: usize,
    /// Threads blocked in [`HeldHeads::wait_idle`].
    waiting: usize,
}

impl HeldHeads {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Heads> {
        // Updates are single map operations: a poisoned map is consistent.
        self.heads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the device took `head`; returns how many requests of
    /// this queue were in flight before.
    pub fn begin(&self, head: u16) -> usize {
        let mut heads = self.lock();
        let before = heads.total;
        *heads.count.entry(head).or_insert(0) += 1;
        heads.total += 1;
        before
    }

    /// Records that `head` is on the used ring.
    pub fn end(&self, head: u16) {
        let mut heads = self.lock();
        match heads.count.get_mut(&head) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                heads.count.remove(&head);
            }
            None => return,
        }
        heads.total -= 1;
        if heads.total == 0 {
            self.idle.notify_all();
        }
    }

    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().total == 0
    }

    /// The in-flight heads, ascending.
    pub fn heads(&self) -> Vec<u16> {
        let mut heads: Vec<u16> = self.lock().count.keys().copied().collect();
        heads.sort_unstable();
        heads
    }

    /// Blocks until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut heads = self.lock();
        if heads.total == 0 {
            return;
        }
        heads.waiting += 1;
        while heads.total > 0 {
            heads = self
                .idle
                .wait(heads)
                .unwrap_or_else(PoisonError::into_inner);
        }
        heads.waiting -= 1;
    }

    /// Threads blocked in [`HeldHeads::wait_idle`]: lets a test know a
    /// waiter is parked, so "it has not returned" is a fact, not a guess.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn tracks_heads_and_wakes_waiters_when_empty() {
        let f = Arc::new(HeldHeads::new());
        assert_eq!(f.begin(5), 0);
        assert_eq!(f.begin(2), 1);
        assert_eq!(f.begin(5), 2);
        assert_eq!(f.len(), 3);
        assert_eq!(f.heads(), [2, 5]);
        f.end(5);
        assert_eq!(f.heads(), [2, 5]);
        f.end(7); // never begun: ignored
        f.end(5);
        assert_eq!(f.heads(), [2]);

        let waiter = {
            let f = f.clone();
            thread::spawn(move || f.wait_idle())
        };
        // Parked in wait_idle with head 2 held: it can only return after
        // the end below (a spurious wake-up re-checks and waits again).
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.waiting() == 0 {
            assert!(
                !waiter.is_finished(),
                "wait_idle returned with head 2 in flight"
            );
            assert!(Instant::now() < deadline, "wait_idle never blocked");
            thread::yield_now();
        }
        f.end(2);
        waiter.join().unwrap();
        assert!(f.is_empty());
    }
}
