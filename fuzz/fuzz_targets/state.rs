//! Fuzzes the decoders of an instant-boot state dir: the persistent
//! bitmap file (`block::bitmap::PersistentBitmap::open`: header,
//! checksum, geometry, bit pages) and `state.json`
//! (`daemon::state_dir::StateDir::open_or_create`).
//!
//! Input: a flags byte (bit 0: recompute the bitmap header checksum, bit 1:
//! expect the header the file itself claims, bit 2: pad or cut the file to
//! the length that header implies), the expected header (kind, granule,
//! image size, binding), `state.json` (u16 length + bytes), then the bitmap
//! file.
//!
//! Checked: nothing panics; an opened bitmap's queries agree with each
//! other (`count_ones`, `get`, `run`, `next_clear`, `all_set`) and no bit
//! past the end is set; an accepted `state.json` matches the binding.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use instant_recovery_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;
use block::bitmap::{BitmapHeader, BitmapKind, PersistentBitmap, HEADER_SIZE, PAGE_BYTES};
use daemon::state_dir::{StateBinding, StateDir};

const CHECKSUM_AT: usize = HEADER_SIZE - 8;
/// Largest bitmap the harness pads a file to.
const MAX_FILE: usize = 64 << 10;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("fuzz-state-")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn kind(code: u32) -> BitmapKind {
    match code % 3 {
        0 => BitmapKind::OverlayBlocks,
        1 => BitmapKind::MigratedChunks,
        _ => BitmapKind::GuestWrittenChunks,
    }
}

/// The header a bitmap file claims (fields as stored, kind folded to a
/// known one).
fn claimed(file: &[u8]) -> Option<BitmapHeader> {
    let h = file.get(..HEADER_SIZE)?;
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().unwrap());
    let blen = usize::from(u16::from_le_bytes([h[40], h[41]])).min(256);
    Some(BitmapHeader {
        kind: kind(u32_at(16).wrapping_sub(1)),
        granule: u32_at(20),
        image_size: u64::from_le_bytes(h[24..32].try_into().unwrap()),
        binding: String::from_utf8_lossy(&h[42..42 + blen]).into_owned(),
    })
}

fn check_bitmap(b: &PersistentBitmap) {
    let n = b.len();
    assert_eq!(n, b.header().nbits());
    // Bit-by-bit cross-checks only for small bitmaps (the file is capped at
    // 64 KiB, but a huge granule count could still mean many bits).
    if n > 1 << 16 {
        return;
    }
    let ones = (0..n).filter(|&i| b.get(i)).count() as u64;
    assert_eq!(b.count_ones(), ones);
    assert_eq!(b.all_set(), ones == n);
    let first_clear = (0..n).find(|&i| !b.get(i));
    assert_eq!(b.next_clear(0, n), first_clear);
    let mut pos = 0;
    while pos < n {
        let (value, len) = b.run(pos, n);
        assert!(len > 0 && pos + len <= n);
        assert!((pos..pos + len).all(|i| b.get(i) == value));
        if pos + len < n {
            assert_ne!(b.get(pos + len), value);
        }
        pos += len;
    }
    assert_eq!(b.run(n, n + 100), (false, 0));
}

fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let mut expected = BitmapHeader {
        kind: kind(u32::from(c.u8())),
        granule: c.u32(),
        image_size: u64::from(c.u32()),
        binding: String::new(),
    };
    let blen = usize::from(c.u8());
    expected.binding = String::from_utf8_lossy(c.bytes(blen)).into_owned();
    let slen = usize::from(c.u16());
    let state_json = c.bytes(slen).to_vec();
    let mut file = c.rest().to_vec();

    if flags & 2 != 0 {
        if let Some(h) = claimed(&file) {
            expected = h;
        }
    }
    if flags & 4 != 0 {
        let pages = expected
            .nbits()
            .div_ceil(64)
            .div_ceil((PAGE_BYTES / 8) as u64);
        let len = (HEADER_SIZE as u64).saturating_add(pages.saturating_mul(PAGE_BYTES as u64));
        if len <= MAX_FILE as u64 {
            file.resize(len as usize, 0);
        }
    }
    if flags & 1 != 0 && file.len() >= HEADER_SIZE {
        let sum = fnv1a(&file[..CHECKSUM_AT]);
        file[CHECKSUM_AT..HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
    }

    let dir = dir();
    let path = dir.join("fuzz.bitmap");
    std::fs::write(&path, &file).expect("write bitmap");
    match PersistentBitmap::open(&path, &expected) {
        Ok(b) => {
            assert_eq!(b.header(), &expected);
            check_bitmap(&b);
        }
        Err(e) => {
            let _ = format!("{e} {e:?}");
        }
    }

    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    std::fs::write(state_dir.join("state.json"), &state_json).expect("write state.json");
    let binding = StateBinding {
        snapshot_id: "web@2024-01-01T00:00:00.000000Z".into(),
        image_size: 1 << 20,
        chunk_size: 65536,
    };
    match StateDir::open_or_create(&state_dir, &binding) {
        Ok(s) => {
            let st = s.state();
            assert_eq!(st.snapshot_id, binding.snapshot_id);
            assert_eq!(st.image_size, binding.image_size);
            assert_eq!(st.chunk_size, binding.chunk_size);
        }
        Err(e) => {
            let _ = format!("{e} {e:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
