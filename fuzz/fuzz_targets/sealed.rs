//! Fuzzes the decoders of an encrypted store's own formats: key slots
//! (`store::crypto::keyslot::parse_slot`, JSON from `keys/<id>`) and sealed
//! objects (`store::crypto::object::SealedObject`, the segmented AEAD
//! framing of every index and manifest).
//!
//! Input: a flags byte, then the rest. Bit 0: the rest is a key slot.
//! Otherwise the rest is a plaintext (after a u16 byte position and a u8
//! xor mask): it is sealed under a fixed key, one byte of the sealed object
//! is xored (a zero mask changes nothing), and the object is read back in
//! ranges; the raw input is also opened as a sealed object as given.
//!
//! Checked: nothing panics; an unchanged sealed object reads back exactly
//! the plaintext; a changed one fails every read touching the changed
//! segment (any read, if the header changed); lengths agree with
//! `sealed_len`.

#![no_main]

use std::io;
use std::sync::Arc;

use instant_recovery_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;
use store::backend::Object;
use store::crypto::object::{plain_len, seal_bytes, sealed_len, SealedObject};
use store::crypto::Cipher;
use store::format::{AEAD_TAG_LEN, SEALED_HEADER_LEN};

#[derive(Debug)]
struct Mem(Vec<u8>);

impl Object for Mem {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let o = usize::try_from(offset).map_err(io::Error::other)?;
        match o.checked_add(buf.len()) {
            Some(end) if end <= self.0.len() => {
                buf.copy_from_slice(&self.0[o..end]);
                Ok(())
            }
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

const SHIFT: u32 = 12;
const NAME: &str = "index/fuzz.idx";

fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    if flags & 1 != 0 {
        let _ = store::crypto::keyslot::parse_slot(c.rest());
        return;
    }
    let cipher = Arc::new(Cipher::for_testing([7; 32], SHIFT));
    let at = usize::from(c.u16());
    let mask = c.u8();
    let plain = c.rest();
    // As given: decoding never panics.
    if let Ok(o) = SealedObject::open(Arc::new(Mem(data.to_vec())), cipher.clone(), NAME) {
        let len = o.len().unwrap();
        let mut buf = vec![0u8; (len as usize).min(1 << 16)];
        let _ = o.read_at(&mut buf, 0);
    }
    let mut sealed = seal_bytes(&cipher, NAME, plain);
    assert_eq!(sealed.len() as u64, sealed_len(plain.len() as u64, SHIFT));
    assert_eq!(
        plain_len(sealed.len() as u64, SHIFT),
        Some(plain.len() as u64)
    );
    let at = at % sealed.len();
    sealed[at] ^= mask;
    let o = match SealedObject::open(Arc::new(Mem(sealed)), cipher, NAME) {
        Ok(o) => o,
        Err(_) => {
            assert!(
                mask != 0 && at < SEALED_HEADER_LEN,
                "an intact header was refused"
            );
            return;
        }
    };
    // The changed segment, if the change is past the header.
    let seg = 1usize << SHIFT;
    let bad = (mask != 0 && at >= SEALED_HEADER_LEN)
        .then(|| (at - SEALED_HEADER_LEN) / (seg + AEAD_TAG_LEN));
    let bad_header = mask != 0 && at < SEALED_HEADER_LEN;
    for (off, len) in [
        (0, plain.len()),
        (seg - 1, 2),
        (plain.len() / 2, plain.len() / 3),
    ] {
        if len == 0 || off + len > plain.len() {
            continue;
        }
        let mut buf = vec![0u8; len];
        let r = o.read_at(&mut buf, off as u64);
        let touched = (off / seg..=(off + len - 1) / seg).any(|s| Some(s) == bad);
        if touched || bad_header {
            assert!(r.is_err(), "a changed object returned data at {off}+{len}");
        } else {
            r.expect("an intact segment failed");
            assert_eq!(buf, plain[off..off + len]);
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
