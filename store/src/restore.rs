//! Full restore of a snapshot to a raw file or block device.
//!
//! Worker threads claim batches of chunk indexes from an atomic counter, read
//! and verify the chunks, and `pwrite` them at their offsets. A regular-file
//! target is truncated and re-extended to the image size first, so zero
//! chunks are simply skipped and stay holes (sparse). A block device must be
//! at least as large as the image; zero chunks are written as zeros. The
//! target is fsynced before returning.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
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
    /// Worker threads (default: twice the cores, to overlap I/O).
    pub threads: Option<usize>,
}

impl std::fmt::Debug for RestoreOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("threads", &self.threads)
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

/// Open the restore target; returns it and whether zeros must be written.
fn open_target(target: &Path, image_size: u64) -> Result<(File, bool)> {
    let is_block = match fs::metadata(target) {
        Ok(m) if m.file_type().is_block_device() => true,
        Ok(m) if m.is_file() => false,
        Ok(_) => {
            return Err(Error::invalid(format!(
                "Restore target {} is not a regular file or block device",
                target.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io_path("Failed to stat restore target", target, e)),
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(false)
        .open(target)
        .map_err(|e| Error::io_path("Failed to open restore target", target, e))?;
    if is_block {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io_path("Failed to get the size of", target, e))?;
        if size < image_size {
            return Err(Error::invalid(format!(
                "Restore target {} has {size} bytes, the image needs {image_size}",
                target.display()
            )));
        }
    } else {
        // Drop old content so that skipped zero chunks read back as zeros.
        file.set_len(0)
            .and_then(|()| file.set_len(image_size))
            .map_err(|e| Error::io_path("Failed to size restore target", target, e))?;
    }
    Ok((file, is_block))
}

impl Store {
    /// Restore snapshot `reference` to `target` (a raw file, created or
    /// overwritten and sparse where the image is zero, or a block device).
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
        let (file, write_zeros) = open_target(target, reader.image_size())?;
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
            .max(1);
        let next = AtomicU64::new(0);
        let written = AtomicU64::new(0);
        let zeros = AtomicU64::new(0);
        let abort = AtomicBool::new(false);
        let ctx = Ctx {
            reader: &reader,
            file: &file,
            target,
            write_zeros,
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
        let stats = RestoreStats {
            snapshot: snap,
            target: target.display().to_string(),
            image_size: reader.image_size(),
            bytes_written: written.load(Ordering::Relaxed),
            chunks_total: reader.chunk_count(),
            chunks_zero: zeros.load(Ordering::Relaxed),
            seconds: start.elapsed().as_secs_f64(),
        };
        info!(
            bytes = stats.bytes_written,
            seconds = stats.seconds,
            "restore done"
        );
        Ok(stats)
    }
}

struct Ctx<'a> {
    reader: &'a SnapshotReader,
    file: &'a File,
    target: &'a Path,
    write_zeros: bool,
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
        let mut buf = Vec::new();
        let zero = vec![0u8; if self.write_zeros { cs as usize } else { 0 }];
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let first = self.next.fetch_add(BATCH, Ordering::Relaxed);
            if first >= count {
                return Ok(());
            }
            self.reader.chunk_ids(first, BATCH, &mut ids)?;
            let mut done = 0u64;
            for (i, id) in ids.iter().enumerate() {
                let index = first + i as u64;
                let len = self.reader.chunk_len(index)?;
                let offset = index * cs;
                let data: &[u8] = match id {
                    None => {
                        self.zeros.fetch_add(1, Ordering::Relaxed);
                        done += len as u64;
                        if !self.write_zeros {
                            continue;
                        }
                        &zero[..len]
                    }
                    Some(id) => {
                        self.reader.read_chunk_id(index, id, len, &mut buf)?;
                        &buf
                    }
                };
                self.file.write_all_at(data, offset).map_err(|e| {
                    Error::io(
                        format!(
                            "Failed to write restore target {} at offset {offset}",
                            self.target.display()
                        ),
                        e,
                    )
                })?;
                self.written.fetch_add(len as u64, Ordering::Relaxed);
                done += len as u64;
            }
            if let Some(p) = self.progress {
                p(done);
            }
        }
    }
}
