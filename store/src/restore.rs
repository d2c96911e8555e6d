//! Full restore of a snapshot to a raw file or block device.
//!
//! Worker threads claim batches of chunk indexes (1 MiB of 64 KiB chunks)
//! from an atomic counter, read and verify the chunks, and write each run of
//! adjacent chunks with one `pwritev`; then they start the batch's writeback
//! (`fadvise(DONTNEED)`), so the final fsync does not find the whole image
//! dirty and the restore leaves the host's page cache alone. A regular-file
//! target is truncated and re-extended to the image size first, so zero
//! chunks are simply skipped and stay holes (sparse). A block device must be
//! at least as large as the image; zero chunks are written as zeros. The
//! target is fsynced before returning. From a remote store (S3) a batch is
//! fetched as pack spans, many in flight (`restore/spans.rs`).
//!
//! What may be written is decided before anything is opened for writing
//! (`restore/target.rs`):
//! - never inside a store, whatever the options: not under any directory
//!   holding a store `config.json`, not a hard link to a file of the source
//!   store, not the block device holding the source store;
//! - an existing regular file only with [`RestoreOptions::force`] (the
//!   refusal says what is there); a block device without, but not a mounted
//!   one (opened `O_EXCL`);
//! - the file checked is the file opened (device and inode compared), and a
//!   new file is created `O_EXCL` and removed again if the restore fails.

pub(crate) mod spans;
mod target;

pub use target::store_containing;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;
use tracing::{info, info_span};

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::repo::Store;
use crate::snapshot::reader::SnapshotReader;

/// Options of [`Store::restore`].
#[derive(Clone, Copy, Default)]
pub struct RestoreOptions<'a> {
    /// Called with byte counts as the image is restored.
    pub progress: Option<Progress<'a>>,
    /// Worker threads (default: twice the cores, to overlap I/O; from a
    /// remote store 16, so many GETs are in flight).
    pub threads: Option<usize>,
    /// Overwrite an existing regular file (never a file inside a store).
    pub force: bool,
}

impl std::fmt::Debug for RestoreOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("threads", &self.threads)
            .field("force", &self.force)
            .finish()
    }
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreStats {
    /// `NAME@ID` of the restored snapshot.
    pub snapshot: String,
    pub target: String,
    pub image_size: u64,
    /// Bytes written to the target (zero chunks of a file target are skipped).
    pub bytes_written: u64,
    pub chunks_total: u64,
    pub chunks_zero: u64,
    pub seconds: f64,
}

const BATCH: u64 = 16;

impl Store {
    /// Restore snapshot `reference` to `target` (a raw file, created, or
    /// overwritten with `force`, sparse where the image is zero; or a block
    /// device). Refuses any target inside a store (see the module docs).
    pub fn restore(
        &self,
        reference: &str,
        target: &Path,
        opts: &RestoreOptions<'_>,
    ) -> Result<RestoreStats> {
        let start = Instant::now();
        let reader = self.open_snapshot(reference)?;
        let snap = reader.info().reference();
        let span = info_span!("restore", snapshot = %snap, target = %target.display());
        let _e = span.enter();
        reader.verify_manifest()?;
        let checked = target::check(self.path(), target, opts.force)?;
        let (file, write_zeros) = checked.open(reader.image_size())?;
        let result = self.restore_into(&reader, &file, target, write_zeros, opts);
        if result.is_err() && checked.creates() {
            // Leave nothing behind that looks like a restored image.
            drop(file);
            let _ = std::fs::remove_file(target);
        }
        let (written, zeros) = result?;
        let stats = RestoreStats {
            snapshot: snap,
            target: target.display().to_string(),
            image_size: reader.image_size(),
            bytes_written: written,
            chunks_total: reader.chunk_count(),
            chunks_zero: zeros,
            seconds: start.elapsed().as_secs_f64(),
        };
        info!(
            bytes = stats.bytes_written,
            seconds = stats.seconds,
            "restore done"
        );
        Ok(stats)
    }

    /// Write every chunk of `reader` into `file`; returns bytes written and
    /// zero chunks.
    fn restore_into(
        &self,
        reader: &SnapshotReader,
        file: &File,
        target: &Path,
        write_zeros: bool,
        opts: &RestoreOptions<'_>,
    ) -> Result<(u64, u64)> {
        let remote = self.is_remote();
        let threads = opts
            .threads
            .unwrap_or_else(|| {
                if remote {
                    spans::REMOTE_THREADS
                } else {
                    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
                }
            })
            .max(1);
        let next = AtomicU64::new(0);
        let written = AtomicU64::new(0);
        let zeros = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        let ctx = Ctx {
            reader,
            file,
            target,
            write_zeros,
            batch: if remote { spans::SPAN_BATCH } else { BATCH },
            remote,
            next: &next,
            written: &written,
            zeros: &zeros,
            abort: &abort,
            progress: opts.progress,
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| ctx.run())).collect();
            let mut first = None;
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::new(crate::ErrorKind::Io, "Restore worker panicked"))
                });
                if let Err(e) = r {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), Err)
        })?;
        file.sync_all()
            .map_err(|e| Error::io_path("Failed to sync restore target", target, e))?;
        Ok((written.into_inner(), zeros.into_inner()))
    }
}

struct Ctx<'a> {
    reader: &'a SnapshotReader,
    file: &'a File,
    target: &'a Path,
    write_zeros: bool,
    /// Chunks claimed at once.
    batch: u64,
    /// Fetch each batch as pack spans.
    remote: bool,
    next: &'a AtomicU64,
    written: &'a AtomicU64,
    zeros: &'a AtomicU64,
    abort: &'a AtomicBool,
    progress: Option<Progress<'a>>,
}

impl Ctx<'_> {
    fn run(&self) -> Result<()> {
        let r = self.work();
        if r.is_err() {
            self.abort.store(true, Ordering::Relaxed);
        }
        r
    }

    fn work(&self) -> Result<()> {
        let count = self.reader.chunk_count();
        let cs = self.reader.chunk_size() as u64;
        let mut ids = Vec::new();
        let mut bufs: Vec<Vec<u8>> = (0..self.batch).map(|_| Vec::new()).collect();
        let mut lens = Vec::with_capacity(self.batch as usize);
        let mut span = Vec::new();
        let zero = vec![0u8; if self.write_zeros { cs as usize } else { 0 }];
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let first = self.next.fetch_add(self.batch, Ordering::Relaxed);
            if first >= count {
                return Ok(());
            }
            self.reader.chunk_ids(first, self.batch, &mut ids)?;
            // Decode the batch, then write each run of adjacent chunks with
            // one `pwritev` (zero chunks of a file target end a run: they
            // stay holes).
            lens.clear();
            for (i, id) in ids.iter().enumerate() {
                let index = first + i as u64;
                let len = self.reader.chunk_len(index)?;
                lens.push(len);
                match id {
                    None => {
                        self.zeros.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) if self.remote => {}
                    Some(id) => self.reader.read_chunk_id(index, id, len, &mut bufs[i])?,
                }
            }
            if self.remote {
                spans::fill(self.reader, first, &ids, &lens, &mut bufs, &mut span)?;
            }
            let mut run: Vec<&[u8]> = Vec::with_capacity(ids.len());
            let mut run_at = first * cs;
            let mut written = 0u64;
            for (i, id) in ids.iter().enumerate() {
                let data: Option<&[u8]> = match id {
                    Some(_) => Some(&bufs[i]),
                    None if self.write_zeros => Some(&zero[..lens[i]]),
                    None => None,
                };
                let offset = (first + i as u64) * cs;
                match data {
                    Some(d) => {
                        if run.is_empty() {
                            run_at = offset;
                        }
                        run.push(d);
                    }
                    None => written += self.write_run(&mut run, run_at)?,
                }
            }
            written += self.write_run(&mut run, run_at)?;
            self.written.fetch_add(written, Ordering::Relaxed);
            // Start writing the batch back now (and drop it from the page
            // cache once written): the final fsync then has little left to
            // do, and the restore does not push the host's cache out.
            let end = (first + ids.len() as u64) * cs;
            let _ = rustix::fs::fadvise(
                self.file,
                first * cs,
                end - first * cs,
                rustix::fs::Advice::DontNeed,
            );
            if let Some(p) = self.progress {
                p(lens.iter().map(|&l| l as u64).sum());
            }
        }
    }

    /// Write `run` (adjacent chunks) at `offset` with `pwritev`, then empty
    /// it; returns the bytes written.
    fn write_run(&self, run: &mut Vec<&[u8]>, offset: u64) -> Result<u64> {
        let total: usize = run.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            // Skip what is written, then write the rest in one call.
            let mut skip = done;
            let mut slices = Vec::with_capacity(run.len());
            for b in run.iter() {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                slices.push(std::io::IoSlice::new(&b[skip..]));
                skip = 0;
            }
            let at = offset + done as u64;
            match rustix::io::pwritev(self.file, &slices, at) {
                Ok(0) => {
                    return Err(self.write_error(at, std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.write_error(at, e.into())),
            }
        }
        run.clear();
        Ok(total as u64)
    }

    fn write_error(&self, offset: u64, e: std::io::Error) -> Error {
        Error::io(
            format!(
                "Failed to write restore target {} at offset {offset}",
                self.target.display()
            ),
            e,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::tests::{image, setup};
    use crate::{BackupOptions, ErrorKind};

    #[test]
    fn restore_never_writes_into_a_store_and_needs_force_to_overwrite() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        let img = image(40, 1 << 20);
        std::fs::write(&src, &img).unwrap();
        store.backup("vm", &src, &BackupOptions::default()).unwrap();
        let force = RestoreOptions {
            force: true,
            ..Default::default()
        };
        let config = store.path().join("config.json");
        let config_before = std::fs::read(&config).unwrap();
        let pack = std::fs::read_dir(store.path().join("packs"))
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .map(|e| e.unwrap().path())
            .next()
            .unwrap();
        let pack_before = std::fs::read(&pack).unwrap();
        for t in [&config, &pack, &store.path().join("tmp/new.img")] {
            let e = store.restore("vm", t, &force).unwrap_err();
            assert!(e.to_string().contains("inside the store"), "{e}");
        }
        assert_eq!(std::fs::read(&config).unwrap(), config_before);
        assert_eq!(std::fs::read(&pack).unwrap(), pack_before);
        assert!(!store.path().join("tmp/new.img").exists());
        assert!(store.verify(None, &Default::default()).unwrap().is_ok());

        let out = dir.path().join("out.img");
        std::fs::write(&out, b"precious").unwrap();
        let e = store
            .restore("vm", &out, &RestoreOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
        store.restore("vm", &out, &force).unwrap();
        assert!(std::fs::read(&out).unwrap() == img);
    }

    #[test]
    fn failed_restore_removes_the_file_it_created() {
        let (dir, store) = setup(4096);
        let src = dir.path().join("disk.img");
        std::fs::write(&src, image(41, 256 << 10)).unwrap();
        store.backup("vm", &src, &BackupOptions::default()).unwrap();
        // Damage every pack: the first chunk read fails.
        for d in std::fs::read_dir(store.path().join("packs")).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                let mut b = std::fs::read(&p).unwrap();
                for x in b.iter_mut().skip(200) {
                    *x ^= 0x55;
                }
                std::fs::write(&p, b).unwrap();
            }
        }
        let out = dir.path().join("out.img");
        let e = store
            .restore("vm", &out, &RestoreOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
        assert!(!out.exists(), "a failed restore left its new target");
    }
}
