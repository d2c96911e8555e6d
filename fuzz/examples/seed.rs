//! Writes the seed corpora under `fuzz/corpus/<target>/` from the real
//! encoders: manifests from `ManifestWriter`, packs and idx files from
//! `PackWriter`, merged indexes in the compact form the `index` target
//! expands, virtio-blk requests the way a driver lays them out, and state
//! dir files (bitmaps, `state.json`) from `PersistentBitmap` and `StateDir`.
//!
//! Usage: `cargo run --example seed -- <corpus dir>` (scripts/fuzz.sh --seed).

use std::fs;
use std::path::{Path, PathBuf};

use instant_recovery_fuzz::request::{self, Desc, LimitBytes};
use instant_recovery_fuzz::Midx;
use store::backend::{Backend, LocalBackend};
use store::chunk::encode_record;
use store::index::idx::{self, IdxEntry};
use store::pack::PackWriter;
use store::snapshot::manifest::ManifestWriter;
use store::snapshot::{id_from_micros, manifest_key, SnapshotInfo};
use store::{ChunkId, PackId};
use block::bitmap::{BitmapHeader, BitmapKind, PersistentBitmap};
use daemon::state_dir::{StateBinding, StateDir};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&request_type.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

fn requests(dir: &Path) {
    let p = request::PAYLOAD_ADDR;
    let limits = LimitBytes {
        seg_max: 8,
        max_discard_seg: 4,
        max_write_zeroes_seg: 4,
        max_request_kib: 64,
        max_discard_sectors: 64,
        max_write_zeroes_sectors: 64,
    };
    let status = 0x3_7000;
    // IN: three buffers, one spanning the boundary of regions 0 and 1.
    let descs = [
        d(p, 16, 0, 0),
        d(0xFE00, 1024, WRITE, 0),
        d(0x2_0000, 512, WRITE, 0),
        d(status, 1, WRITE, 0),
    ];
    write(
        dir,
        "in",
        &request::encode(0, &descs, limits, &header(0, 8)),
    );
    // OUT with the data in the header's descriptor.
    let mut payload = header(1, 4);
    payload.extend((0..2048u32).map(|i| (i % 253) as u8));
    let descs = [d(p, 16 + 2048, 0, 0), d(status, 1, WRITE, 0)];
    write(dir, "out", &request::encode(0, &descs, limits, &payload));
    write(
        dir,
        "out-read-only",
        &request::encode(request::FLAG_READ_ONLY, &descs, limits, &payload),
    );
    // OUT near the end of an advertised-but-missing capacity.
    let mut payload = header(1, 150);
    payload.extend([7u8; 512]);
    write(
        dir,
        "out-capacity-lie",
        &request::encode(request::FLAG_CAPACITY_LIE, &descs, limits, &payload),
    );
    // FLUSH, GET_ID, unknown type.
    let descs = [d(p, 16, 0, 0), d(status, 1, WRITE, 0)];
    write(
        dir,
        "flush",
        &request::encode(0, &descs, limits, &header(4, 0)),
    );
    write(
        dir,
        "unsupported",
        &request::encode(0, &descs, limits, &header(99, 0)),
    );
    let descs = [
        d(p, 16, 0, 0),
        d(0x2_0000, 20, WRITE, 0),
        d(status, 1, WRITE, 0),
    ];
    write(
        dir,
        "get-id",
        &request::encode(0, &descs, limits, &header(8, 0)),
    );
    // DISCARD (2 segments) and WRITE_ZEROES with unmap.
    let mut payload = header(11, 0);
    payload.extend(segment(0, 8, 0));
    payload.extend(segment(100, 16, 0));
    let descs = [d(p, 16, 0, 0), d(p + 16, 32, 0, 0), d(status, 1, WRITE, 0)];
    write(
        dir,
        "discard",
        &request::encode(0, &descs, limits, &payload),
    );
    let mut payload = header(13, 0);
    payload.extend(segment(64, 32, 1));
    let descs = [d(p, 16, 0, 0), d(p + 16, 16, 0, 0), d(status, 1, WRITE, 0)];
    write(
        dir,
        "write-zeroes",
        &request::encode(0, &descs, limits, &payload),
    );
    // An indirect table (raw mode): head -> table of three descriptors.
    let table = p + 0x100;
    let mut payload = header(0, 2);
    payload.resize(0x100, 0);
    for (addr, len, flags, next) in [
        (p, 16u32, NEXT, 1u16),
        (0x2_1000, 1024, NEXT | WRITE, 2),
        (status, 1, WRITE, 0),
    ] {
        payload.extend_from_slice(&addr.to_le_bytes());
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&flags.to_le_bytes());
        payload.extend_from_slice(&next.to_le_bytes());
    }
    let descs = [d(table, 48, INDIRECT, 0)];
    write(
        dir,
        "indirect",
        &request::encode(request::FLAG_RAW_TABLE, &descs, limits, &payload),
    );
    // A loop (raw mode): 0 -> 1 -> 0.
    let descs = [d(p, 16, NEXT, 1), d(0x2_0000, 512, NEXT | WRITE, 0)];
    write(
        dir,
        "loop",
        &request::encode(request::FLAG_RAW_TABLE, &descs, limits, &header(0, 0)),
    );
}

fn snapshot_info(name: &str, size: u64, parent: Option<String>) -> SnapshotInfo {
    SnapshotInfo {
        id: String::new(),
        name: name.into(),
        image_size: size,
        chunk_size: 4096,
        chunk_count: 0,
        created: String::new(),
        source: "/dev/vg0/disk".into(),
        parent,
    }
}

fn manifests(dir: &Path, tmp: &Path) {
    let backend = LocalBackend::new(tmp);
    fs::create_dir_all(tmp.join("tmp")).expect("tmp dir");
    let cases: [(&str, u64, i64, bool); 4] = [
        ("web", 4096 * 3 + 512, 1_700_000_000_000_000, false),
        ("db", 4096 * 16, 1_700_000_100_000_000, true),
        ("empty", 0, 1_700_000_200_000_000, false),
        ("one", 4096, 1, false),
    ];
    for (name, size, created, parent) in cases {
        let parent = parent.then(|| id_from_micros(created - 1).expect("parent id"));
        let w = ManifestWriter::create(&backend, snapshot_info(name, size, parent), created)
            .expect("create manifest");
        let count = w.info().chunk_count;
        for i in (0..count).step_by(2) {
            w.set_entries(i, &ChunkId::of(&i.to_le_bytes()).0)
                .expect("set entry");
        }
        let key = manifest_key(name, &w.info().id.clone());
        w.publish(&backend, &key).expect("publish manifest");
        let bytes = backend.read(&key).expect("read manifest");
        for (flags, suffix) in [(0u8, "raw"), (3u8, "sealed-store")] {
            let mut seed = vec![flags];
            seed.extend_from_slice(&bytes);
            write(dir, &format!("{name}-{suffix}"), &seed);
        }
    }
}

fn chunk(i: u32, len: usize) -> Vec<u8> {
    if i.is_multiple_of(2) {
        (0..len).map(|j| (j as u32 % (i + 3)) as u8).collect()
    } else {
        // Incompressible: stored raw.
        let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

/// Publishes one pack of `n` chunks; returns (pack bytes, idx bytes, entries).
fn pack(backend: &LocalBackend, n: u32, len: usize) -> (Vec<u8>, Vec<u8>, Vec<IdxEntry>) {
    let mut w = PackWriter::new(1 << 20);
    let mut rec = Vec::new();
    for i in 0..n {
        let data = chunk(i, len);
        let id = ChunkId::of(&data);
        rec.clear();
        encode_record(&id, &data, &mut rec);
        w.add(id, data.len() as u32, &rec);
    }
    let p = w.publish(backend).expect("publish pack").expect("pack");
    (
        backend.read(&p.id.pack_key()).expect("read pack"),
        backend.read(&p.id.idx_key()).expect("read idx"),
        p.entries,
    )
}

fn packs(dir: &Path, tmp: &Path) {
    let backend = LocalBackend::new(tmp);
    for (n, len, name) in [
        (3u32, 4096usize, "small"),
        (6, 1000, "mixed"),
        (1, 4096, "one"),
    ] {
        let (bytes, _, _) = pack(&backend, n, len);
        for (flags, suffix) in [(0u8, "raw"), (7u8, "store")] {
            let mut seed = vec![flags, 0];
            seed.extend_from_slice(&bytes);
            write(dir, &format!("{name}-{suffix}"), &seed);
        }
    }
    // Store mode with one extra index entry pointing into the pack.
    let (bytes, _, entries) = pack(&backend, 2, 4096);
    let mut seed = vec![7u8, 1];
    let mut id = entries[0].id.0;
    id[31] ^= 1;
    seed.extend_from_slice(&id);
    seed.extend_from_slice(&entries[0].offset.to_le_bytes());
    seed.extend_from_slice(&entries[0].stored_len.to_le_bytes());
    seed.extend_from_slice(&entries[0].raw_len.to_le_bytes());
    seed.extend_from_slice(&bytes);
    write(dir, "extra-entry", &seed);
}

fn indexes(dir: &Path, tmp: &Path) {
    let backend = LocalBackend::new(tmp);
    let (_, idx_a, _) = pack(&backend, 4, 4096);
    let (_, idx_b, entries_b) = pack(&backend, 2, 1000);
    let empty = idx::encode(&PackId([9; 16]), &mut []);
    let with_idx = |flags: u8, files: &[&[u8]]| {
        let mut seed = vec![flags, files.len() as u8];
        for f in files {
            seed.extend_from_slice(&(f.len() as u16).to_le_bytes());
            seed.extend_from_slice(f);
        }
        seed
    };
    write(dir, "idx-one", &with_idx(0, &[&idx_a]));
    write(dir, "idx-two-sealed", &with_idx(1, &[&idx_a, &idx_b]));
    write(dir, "idx-empty", &with_idx(0, &[&empty]));
    write(dir, "idx-misnamed", &with_idx(4, &[&idx_b]));

    // Merged indexes: consistent (sorted, sealed), and with a bad fanout.
    let mut entries: Vec<[u8; 48]> = (0..40u32)
        .map(|i| {
            let mut e = [0u8; 48];
            e[..32].copy_from_slice(&ChunkId::of(&i.to_le_bytes()).0);
            e[32..36].copy_from_slice(&(i % 2).to_le_bytes());
            e[36..40].copy_from_slice(&(100 + i).to_le_bytes());
            e[40..48].copy_from_slice(&(u64::from(i) * 4096).to_le_bytes());
            e
        })
        .collect();
    entries.sort_by(|a, b| a[..32].cmp(&b[..32]));
    // Ids sharing a 16-bit prefix, to fill one fanout bucket.
    let mut bucket: Vec<[u8; 48]> = (0..70u32)
        .map(|i| {
            let mut e = [0u8; 48];
            e[0] = 0xab;
            e[1] = 0xcd;
            e[2..6].copy_from_slice(&i.to_be_bytes());
            e
        })
        .collect();
    bucket.sort_by(|a, b| a[..32].cmp(&b[..32]));
    let good = Midx {
        generation: 3,
        fanout_bits: 16,
        packs: vec![[1; 16], [2; 16]],
        entries,
        seal: true,
        ..Midx::default()
    };
    let big_bucket = Midx {
        generation: 4,
        fanout_bits: 16,
        packs: vec![[3; 16]],
        entries: bucket,
        seal: true,
        ..Midx::default()
    };
    let bad_fanout = Midx {
        fanout_patches: vec![(100, 5)],
        ..good.clone()
    };
    for (name, m, files) in [
        ("midx", &good, vec![]),
        ("midx-bucket", &big_bucket, vec![]),
        ("midx-bad-fanout", &bad_fanout, vec![]),
        ("midx-and-idx", &good, vec![&idx_b[..]]),
    ] {
        let mut seed = with_idx(3, &files);
        seed.extend(m.encode());
        // Two ids to look up: one present, one not.
        seed.extend_from_slice(&m.entries[0][..32]);
        seed.extend_from_slice(&entries_b[0].id.0);
        write(dir, name, &seed);
    }
}

fn state_seed(flags: u8, header: &BitmapHeader, state_json: &[u8], bitmap: &[u8]) -> Vec<u8> {
    let mut seed = vec![flags, 0];
    seed.extend_from_slice(&header.granule.to_le_bytes());
    seed.extend_from_slice(&(header.image_size as u32).to_le_bytes());
    seed.push(header.binding.len() as u8);
    seed.extend_from_slice(header.binding.as_bytes());
    seed.extend_from_slice(&(state_json.len() as u16).to_le_bytes());
    seed.extend_from_slice(state_json);
    seed.extend_from_slice(bitmap);
    seed
}

fn states(dir: &Path, tmp: &Path) {
    // state.json as the daemon writes it, for the binding the target expects.
    let binding = StateBinding {
        snapshot_id: "web@2024-01-01T00:00:00.000000Z".into(),
        image_size: 1 << 20,
        chunk_size: 65536,
    };
    let state_dir = tmp.join("state");
    drop(StateDir::open_or_create(&state_dir, &binding).expect("create state dir"));
    let state_json = fs::read(state_dir.join("state.json")).expect("read state.json");
    let cases = [
        (
            BitmapKind::OverlayBlocks,
            4096u32,
            1u64 << 20,
            vec![0u64, 5, 6, 7, 255],
        ),
        (
            BitmapKind::MigratedChunks,
            65536,
            65536 * 100 + 1,
            (0..101).collect(),
        ),
        (BitmapKind::GuestWrittenChunks, 4096, 0, vec![]),
    ];
    for (i, (kind, granule, image_size, bits)) in cases.into_iter().enumerate() {
        let header = BitmapHeader {
            kind,
            granule,
            image_size,
            binding: binding.snapshot_id.clone(),
        };
        let path = tmp.join(format!("b{i}.bitmap"));
        let b = PersistentBitmap::create(&path, &header).expect("create bitmap");
        for bit in bits {
            b.set(bit);
        }
        b.sync().expect("sync bitmap");
        drop(b);
        let bitmap = fs::read(&path).expect("read bitmap");
        write(
            dir,
            &format!("bitmap-{i}"),
            &state_seed(0, &header, &state_json, &bitmap),
        );
        write(
            dir,
            &format!("bitmap-{i}-claimed"),
            &state_seed(7, &header, b"", &bitmap),
        );
    }
    let other = String::from_utf8_lossy(&state_json).replace("1048576", "2097152");
    let header = BitmapHeader {
        kind: BitmapKind::OverlayBlocks,
        granule: 4096,
        image_size: 0,
        binding: String::new(),
    };
    write(
        dir,
        "state-mismatch",
        &state_seed(0, &header, other.as_bytes(), b""),
    );
}

fn main() {
    let out: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("corpus"));
    let tmp = tempfile::tempdir().expect("temp dir");
    for d in ["packs", "index", "snapshots", "tmp"] {
        fs::create_dir_all(tmp.path().join(d)).expect("store dirs");
    }
    requests(&out.join("request_parse"));
    manifests(&out.join("manifest"), tmp.path());
    packs(&out.join("pack"), tmp.path());
    indexes(&out.join("index"), tmp.path());
    states(&out.join("state"), tmp.path());
    patches(&out.join("patch"));
}

/// Patch payloads from the real encoder: one grain, scattered grains, a
/// short last grain, a zero base.
fn patches(dir: &Path) {
    let base = ChunkId::of(b"seed base");
    let grain = vec![0x5au8; store::patch::GRAIN];
    let g = store::patch::GRAIN as u32;
    let cases: [(&str, ChunkId, u32, &[usize]); 4] = [
        ("one", base, 16 * g, &[3]),
        ("scattered", base, 16 * g, &[0, 5, 15]),
        ("short_last", base, 3 * g + 100, &[3]),
        ("zero_base", ChunkId::default(), 4 * g, &[1]),
    ];
    for (name, base, len, set) in cases {
        let mut out = Vec::new();
        store::patch::encode(
            &base,
            len,
            |i| {
                let n = ((i + 1) * grain.len()).min(len as usize) - i * grain.len();
                set.contains(&i).then(|| &grain[..n])
            },
            &mut out,
        );
        write(dir, name, &out);
    }
}
