//! Side-by-side benchmark harness: us against the tools people use today,
//! measured in the same run, on the same data, on the same machine.
//!
//! `cargo run --release -p benches --bin sidebyside -- SCENARIO [--size 2G] [--quick]`
//!
//! | scenario     | ours                                   | peers                                        |
//! |--------------|----------------------------------------|----------------------------------------------|
//! | `ingest`     | `recovery-cli backup` (full + 2 incr.) | `restic backup`, `borg create`               |
//! | `chunk-size` | the same series at 16K..4M chunks      | (each other)                                 |
//! | `restore`    | `recovery-cli restore`                 | `qemu-img convert -O raw`, `restic restore`  |
//! | `io`         | store → cache → overlay → vhost-user   | qemu-storage-daemon: raw (direct, default), qcow2 overlay |
//! | `startup`    | spawn / construct → first blkio read   | 1 GiB vs 64 GiB sparse image                 |
//! | `boot`       | guest boot from our socket             | guest boot from qemu-storage-daemon          |
//! | `migrate`    | background copier, cold cache          | `qemu-img convert -O raw`, `recovery-cli restore` |
//! | `protect`    | `--protect-every 5s` under 4K random writes QD8 (RPO, write p99, store growth) | the same daemon without protection |
//! | `s3-ingest`  | `backup` / `restore` on S3 (moto) and on a local store | `restic backup` / `restore` on the same S3 server |
//!
//! Every scenario prints a markdown table of absolute numbers and of
//! ratios against its peers, checks the targets of the issues, and writes
//! `SCENARIO.json` and `SCENARIO.md` to the output directory
//! (`target/sidebyside/` by default). `sidebyside update-docs` splices the
//! `.md` files into `docs/BENCHMARKS.md` between
//! `<!-- BEGIN SCENARIO -->` / `<!-- END SCENARIO -->` markers.
//!
//! **Data.** The realistic image is an ext4 filesystem made by `mke2fs -d`
//! from a staging copy of the first files of `/usr` (sorted walk, about
//! 70 % full), with a fixed UUID, hash seed and fake time, so repeated runs
//! on one machine use the same bytes. Incrementals rewrite 1 % of the
//! 4 KiB blocks with random data at random places (seeds 1 and 2). Images
//! are built once and cached in `target/sidebyside/images/`.
//!
//! **Fairness.** The page cache is dropped before every timed run (when
//! `/proc/sys/vm/drop_caches` is writable; otherwise the report says
//! "warm"). Restore and migrate times include a final `sync` of the
//! target for every tool. The load average is recorded at the start and
//! end of each scenario, since the machine may be shared.
//!
//! The blkio client ([`client`]) is the only module with `unsafe`: reading
//! blkio's completion array.

pub mod client;
pub mod image;
pub mod microbench;
pub mod peers;
pub mod report;
pub mod scenario;
pub mod stack;
pub mod tools;

use std::path::{Path, PathBuf};

/// Settings shared by all scenarios.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The workspace root (for scripts and docs).
    pub root: PathBuf,
    /// Where reports go.
    pub out: PathBuf,
    /// Cached images.
    pub images: PathBuf,
    /// Scratch space (stores, repositories, targets); emptied per scenario.
    pub work: PathBuf,
    /// The `recovery-cli` binary.
    pub cli: PathBuf,
    /// Image size override.
    pub size: Option<u64>,
    /// Small sizes and short durations, for a smoke run.
    pub quick: bool,
    /// Drop the page cache before timed runs.
    pub drop_caches: bool,
    /// Seconds per I/O case.
    pub duration: f64,
    /// Repetitions of short measurements (startup, boot).
    pub reps: usize,
    /// Rounds of long measurements (ingest, chunk-size, restore, migrate);
    /// tables show the median.
    pub rounds: usize,
}

impl Ctx {
    /// A fresh, empty scratch directory for `scenario`.
    pub fn scratch(&self, scenario: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.join(scenario);
        remove_dir_if_exists(&dir)?;
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Drops the page cache if allowed; returns whether it did.
    pub fn cold(&self) -> bool {
        self.drop_caches && tools::drop_caches()
    }

    /// Before a timed run that reads `inputs`: drops the page cache, or
    /// with `--warm` reads the inputs once so that they are cached.
    pub fn prepare(&self, inputs: &[&Path]) -> anyhow::Result<()> {
        if self.drop_caches {
            self.cold();
        } else {
            for p in inputs {
                tools::read_tree(p)?;
            }
        }
        Ok(())
    }

    /// A report for scenario `name` (`NAME-warm` with `--warm`).
    pub fn report(&self, name: &str) -> report::Report {
        if self.drop_caches {
            report::Report::new(name, self.cache_mode())
        } else {
            report::Report::new(&format!("{name}-warm"), self.cache_mode())
        }
    }

    /// What [`Ctx::cold`] and [`Ctx::prepare`] do, for reports.
    pub fn cache_mode(&self) -> &'static str {
        if !self.drop_caches {
            "warm page cache: inputs read once before every timed run (--warm)"
        } else if tools::can_drop_caches() {
            "page cache dropped before every timed run"
        } else {
            "page cache NOT dropped (drop_caches not writable): warm-ish"
        }
    }
}

/// Removes `dir` and everything in it; fine if it does not exist.
pub fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Parses `2G`, `64K`, `1M`, `4MiB`, `512` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("invalid size unit in {s:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("x").is_err());
        assert!(parse_size("3Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
