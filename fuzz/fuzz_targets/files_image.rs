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
//! Checked: nothing panics out of `files`, hangs (libFuzzer's -timeout) or exhausts memory
//! (-rss_limit_mb), whatever the bytes.

#![no_main]

use std::sync::Once;

use libfuzzer_sys::fuzz_target;

static HOOK: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // `files` contains one known panic of ext4-view 1.0 (an unwrap on a
    // damaged block list) with catch_unwind; libfuzzer-sys's panic hook
    // would abort even on that caught one. Any panic that escapes `files`
    // still aborts: libfuzzer-sys catches it around this closure.
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if !info
                .location()
                .is_some_and(|l| l.file().contains("ext4-view"))
            {
                eprintln!("{info}");
            }
        }))
    });
    files::probe(data.to_vec());
});
