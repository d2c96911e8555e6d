//! Fuzzes the entry points of the `files` crate over an untrusted disk
//! image: the partition-table parsers (GPT with CRCs, MBR with an EBR
//! chain), filesystem detection, and the ext2/3/4 reader behind `ls`, `cat`
//! and `restore-files` (`files::probe` lists every volume's tree a few
//! levels deep, stats every entry, reads files at both ends and follows
//! symlinks).
//!
//! Input: the disk image itself. Seeds (fuzz/corpus/files_image/) are small
//! real images: ext4 on a whole disk, GPT with ext3, MBR with ext2 in
//! logical partitions, each damaged a little.
//!
//! Checked: nothing panics, hangs (libFuzzer's -timeout) or exhausts memory
//! (-rss_limit_mb), whatever the bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    files::probe(data.to_vec());
});
