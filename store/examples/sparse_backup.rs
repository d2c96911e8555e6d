//! Measure the backup and restore of a sparse image (64 GiB holding 8 MiB
//! by default).
//!
//! ```text
//! cargo run --release -p store --example sparse_backup -- [SIZE_GIB] [DATA_MIB] [DIR]
//! ```
//! Creates the image and a store (64 KiB chunks) in DIR (default: a temp
//! dir), backs it up twice (the second with a parent) and restores it, and
//! prints each step's time and bytes read.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use store::{BackupOptions, RestoreOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().map_or(Ok(64), |a| a.parse())?;
    let mib: u64 = args.next().map_or(Ok(8), |a| a.parse())?;
    let tmp = tempfile::tempdir()?;
    let dir = args.next().map_or(tmp.path().to_path_buf(), Into::into);
    let size = gib << 30;
    let src = dir.join("sparse.img");
    let f = std::fs::File::create(&src)?;
    f.set_len(size)?;
    let pieces = mib.max(1);
    let piece = vec![0x5au8; ((mib << 20) / pieces) as usize];
    for i in 0..pieces {
        f.write_all_at(&piece, i * (size / pieces))?;
    }
    f.sync_all()?;
    let store = Store::init(&dir.join("store"), 64 << 10)?;
    for round in ["first", "second"] {
        let t = Instant::now();
        let s = store.backup("sparse", &src, &BackupOptions::default())?;
        println!(
            "backup ({round}): {:.3} s, read {} bytes, {} chunks ({} zero)",
            t.elapsed().as_secs_f64(),
            s.bytes_read,
            s.chunks_total,
            s.chunks_zero
        );
    }
    let t = Instant::now();
    let r = store.restore("sparse", &dir.join("out.img"), &RestoreOptions::default())?;
    println!(
        "restore: {:.3} s, wrote {} bytes",
        t.elapsed().as_secs_f64(),
        r.bytes_written
    );
    Ok(())
}
