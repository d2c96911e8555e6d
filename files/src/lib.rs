//! Recover any file: list, read and restore single files from a disk-image
//! snapshot without restoring the disk.
//!
//! # Layers
//! ```text
//!  restore (restore-files)   fuse (mount)      CLI ls / cat
//!            \                  |                /
//!             browse::Browser: stat, list, read_link, open   (one per thread)
//!               | ext4-view over a volume's bytes (ExtReader)
//!             disk::Disk: partition table + detected filesystem per volume
//!               | partition (GPT, MBR + EBR chain)   detect (magic numbers)
//!             device: ReadAt -> Slice (a partition) -> SnapshotDevice
//!               | bounded LRU of verified chunks, fetch counters
//!             store::SnapshotReader (shared flock on the manifest)
//! ```
//!
//! # Paths
//! A user path starts at the snapshot's top. On a partitioned disk the top
//! lists the partitions as `p1`, `p2`, ... (Linux numbering, logical MBR
//! partitions from `p5`); on an unpartitioned disk the top is the
//! filesystem's root. `..` is refused. Inside a filesystem `ext4-view`
//! resolves symlinks, and never outside it.
//!
//! # What is fetched
//! Only chunks holding the metadata and data a request needs: superblock and
//! group descriptors on first use of a filesystem, then inodes, directory
//! blocks, extent trees and file data. Zero chunks are never fetched. The
//! cache ([`device::DEFAULT_CACHE_BYTES`]) is an LRU; a file read once
//! sequentially costs its size plus metadata, rounded up to chunks.
//!
//! # Untrusted images
//! A snapshot is data from a guest, maybe a hostile one. Partition tables
//! are parsed with every number bounds-checked and every loop capped
//! ([`partition`]); filesystems are read by `ext4-view` (no `unsafe`, checked
//! arithmetic, checksums where the filesystem has them, capped symlink hops
//! and path length); directories are capped at [`browse::MAX_DIR_ENTRIES`]
//! entries and trees at [`restore::MAX_DEPTH`] levels; `restore-files` never
//! writes through a symlink and never outside its target directory.
//!
//! # Errors
//! A chunk that fails verification fails only the reads that touch it: the
//! error chain names the chunk index, the image offset and the chunk id.
//! Other files stay readable; `restore-files` goes on and lists failures;
//! `mount` answers `EIO` for that file and logs the chain.
//!
//! # Concurrency
//! [`device::SnapshotDevice`] and [`disk::Disk`] are `Send + Sync`; the
//! chunk cache is behind a mutex that is not held while fetching. A
//! [`browse::Browser`] holds `ext4-view` handles (`Rc`) and stays on one
//! thread; `mount` keeps one per FUSE thread.
#![forbid(unsafe_code)]

pub mod browse;
pub mod detect;
pub mod device;
pub mod disk;
pub mod error;
pub mod fuse;
pub mod partition;
pub mod restore;

pub use browse::{Browser, Entry, EntryKind, FileReader};
pub use detect::FsKind;
pub use device::{FetchStats, ReadAt, SnapshotDevice};
pub use disk::{Disk, Volume};
pub use error::{Error, Result};

/// Exercise every entry point on an untrusted image, with small bounds
/// (the fuzz target's body; also useful as a smoke test).
pub fn probe(image: Vec<u8>) {
    let disk = match Disk::open(std::sync::Arc::new(image)) {
        Ok(d) => std::sync::Arc::new(d),
        Err(_) => return,
    };
    let b = Browser::new(disk.clone());
    let _ = b.list("/");
    for vol in 0..disk.volumes().len() {
        probe_dir(&b, vol, b"/".to_vec(), 0);
    }
}

fn probe_dir(b: &Browser, vol: usize, dir: Vec<u8>, depth: usize) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = b.list_in(vol, &dir, 64) else {
        return;
    };
    for e in entries {
        let path = browse::join(&dir, &e.raw_name);
        match e.kind {
            EntryKind::Dir => probe_dir(b, vol, path, depth + 1),
            EntryKind::File => {
                if let Ok(mut f) = b.open_in(vol, &path) {
                    let mut buf = vec![0u8; 8192];
                    let _ = f.read_at(&mut buf, 0);
                    // Seeking costs a walk over the blocks before the offset.
                    let _ = f.read_at(&mut buf, f.size().min(1 << 20).saturating_sub(100));
                }
            }
            EntryKind::Symlink => {
                let _ = b.open_in(vol, &path);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/files_image/");
        std::fs::read(format!("{p}{name}")).unwrap()
    }

    fn names(b: &Browser, path: &str) -> Vec<String> {
        b.list(path).unwrap().into_iter().map(|e| e.name).collect()
    }

    /// The fuzz seeds are what they claim to be (real images from mke2fs
    /// and sfdisk), and the damaged ones still give what can be read.
    #[test]
    fn seed_images_read_and_damaged_ones_degrade() {
        for name in ["ext4-whole-disk", "damaged-ext4-inode-count"] {
            let b = Browser::new(Arc::new(Disk::open(Arc::new(seed(name))).unwrap()));
            assert!(!b.disk().partitioned(), "{name}");
            probe(seed(name));
            if name == "ext4-whole-disk" {
                assert_eq!(names(&b, "/"), ["abs", "d", "lost+found", "one", "up"]);
                let mut f = b.open("/abs").unwrap();
                let mut buf = [0u8; 3];
                assert_eq!(f.read_at(&mut buf, 0).unwrap(), 3);
                assert_eq!(&buf, b"hi\n");
            }
        }
        for name in ["gpt-ext2", "damaged-gpt-primary"] {
            let b = Browser::new(Arc::new(Disk::open(Arc::new(seed(name))).unwrap()));
            assert_eq!(b.disk().table(), partition::TableKind::Gpt, "{name}");
            assert_eq!(names(&b, "/p1/d"), ["f"], "{name}");
        }
        let b = Browser::new(Arc::new(
            Disk::open(Arc::new(seed("mbr-logical-ext2"))).unwrap(),
        ));
        assert_eq!(names(&b, "/"), ["p1", "p2", "p5", "p6"]);
        assert_eq!(b.disk().volumes()[2].fs, FsKind::Ext2);
        assert_eq!(names(&b, "/p5/d"), ["f"]);
        let b = Browser::new(Arc::new(
            Disk::open(Arc::new(seed("damaged-mbr-ebr-loop"))).unwrap(),
        ));
        assert_eq!(names(&b, "/"), ["p1", "p2", "p5", "p6"]);
        probe(seed("damaged-mbr-ebr-loop"));
        // Found by the fuzzer: a superblock whose group count made
        // ext4-view allocate 40 GB of descriptors.
        probe(seed("damaged-ext4-huge-group-count"));
    }

    /// A poor man's fuzz run that CI always does: every seed with bytes of
    /// its tables and metadata overwritten, one position at a time.
    #[test]
    fn damaged_seed_images_never_panic() {
        for name in ["ext4-whole-disk", "gpt-ext2", "mbr-logical-ext2"] {
            let clean = seed(name);
            let mut at = 0;
            while at < clean.len().min(96 * 1024) {
                for value in [0x00, 0xFF, 0x80] {
                    let mut img = clean.clone();
                    img[at] = value;
                    probe(img);
                }
                at += 61;
            }
        }
    }
}
