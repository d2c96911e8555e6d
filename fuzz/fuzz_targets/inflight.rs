//! Fuzzes the recovery of a `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` region
//! (`vhost_backend::inflight`): the region is memory another process (QEMU,
//! a dead daemon) hands over, so its contents are arbitrary.
//!
//! Input: u16 queue size, u16 the guest's used index, then the region's
//! bytes (cut or zero-padded to the region size), then a script of
//! operations (fetch / put of a head) run after recovery.
//!
//! Checked: nothing panics; the heads to resubmit are distinct and inside
//! the queue, the available ring continues at `used + resubmitted`; after
//! the script and a second recovery, exactly the fetched-but-not-put heads
//! (and the first recovery's, unless put) come back.

#![no_main]

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use instant_recovery_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;
use vhost_backend::inflight::{region_bytes, InflightRegion};

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let queue_size = c.u16() % 1024 + 1;
    let used = c.u16();
    let size = region_bytes(1, queue_size);
    let file = InflightRegion::create(1, queue_size).expect("memfd");
    let bytes = c.bytes((size as usize).min(data.len()));
    file.write_all_at(bytes, 0).expect("write region");
    let region = InflightRegion::map(file.try_clone().expect("dup"), 0, size, 1, queue_size)
        .expect("map");
    let q = region.queue(0).expect("queue 0");

    let first = q.start(0, used);
    let held: BTreeSet<u16> = first.resubmit.iter().copied().collect();
    assert_eq!(held.len(), first.resubmit.len(), "a head resubmitted twice");
    assert!(held.iter().all(|&h| h < queue_size), "a head outside the queue");
    assert_eq!(
        first.next_avail,
        used.wrapping_add(first.resubmit.len() as u16)
    );

    // The device runs: fetches new heads, puts some of them (and some
    // recovered ones), one at a time, as the worker does.
    let mut model = held;
    let mut used_now = used;
    while !c.is_empty() {
        let op = c.u8();
        let head = c.u16() % queue_size;
        if op & 1 == 0 {
            if !model.contains(&head) {
                assert!(q.fetch(head));
                model.insert(head);
            }
        } else if model.remove(&head) {
            q.pre_put(head);
            used_now = used_now.wrapping_add(1);
            q.post_put(head, used_now);
        }
    }
    let second = q.start(0, used_now);
    let got: BTreeSet<u16> = second.resubmit.iter().copied().collect();
    assert_eq!(got, model, "recovery lost or invented a request");
});
