//! Fuzzes the patch payload parser (`store::patch::PatchRef::parse`) and
//! patch application: a patch record's payload is untrusted input once it
//! is read from a pack (a damaged or hostile store).
//!
//! Input: the payload itself.
//!
//! Checked: nothing panics and nothing allocates absurdly; a payload that
//! parses is self-consistent (at least one grain, grain bytes exactly the
//! marked grains' lengths), applies to a base of its chunk length and to
//! no other length, and (with 4 KiB grains) re-encodes byte for byte.

#![no_main]

use libfuzzer_sys::fuzz_target;
use store::patch::{self, PatchRef, GRAIN};

fn run(data: &[u8]) {
    let Ok(p) = PatchRef::parse(data) else {
        return;
    };
    let len = p.chunk_len as usize;
    assert!(p.count() >= 1 && p.count() <= p.grains());
    let grains: Vec<(usize, &[u8])> = p.iter().collect();
    assert_eq!(grains.len(), p.count());
    for (i, d) in &grains {
        assert!(p.is_set(*i));
        assert_eq!(d.len(), p.range(*i).len());
    }
    let mut chunk = vec![0xa5u8; len];
    p.apply(&mut chunk).expect("a parsed patch applies to its length");
    for (i, d) in &grains {
        assert_eq!(&chunk[p.range(*i)], *d);
    }
    assert!(p.apply(&mut vec![0u8; len + 1]).is_err());
    if p.grain_size() == GRAIN {
        let mut again = Vec::new();
        patch::encode(
            &p.base,
            p.chunk_len,
            |i| grains.iter().find(|g| g.0 == i).map(|g| g.1),
            &mut again,
        );
        assert_eq!(again, data, "re-encoding differs");
    }
}

fuzz_target!(|data: &[u8]| run(data));
