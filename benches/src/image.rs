//! Benchmark images: a realistic ext4 filesystem filled from `/usr`, its
//! incremental versions, and large sparse images. Built once, cached.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use rand::{RngCore, SeedableRng};

use crate::tools;

/// Bump when the way images are built changes: cached images are rebuilt.
const RECIPE: &str = "ext4-usr-v1";

/// Fraction of the filesystem filled with files from `/usr`.
pub const FILL: f64 = 0.70;

/// Fraction of 4 KiB blocks each incremental rewrites.
pub const REWRITE: f64 = 0.01;

const BLOCK: u64 = 4096;

fn size_tag(size: u64) -> String {
    if size.is_multiple_of(1 << 30) {
        format!("{}G", size >> 30)
    } else {
        format!("{}M", size >> 20)
    }
}

fn stamp_ok(path: &Path, size: u64, recipe: &str) -> bool {
    let stamp = path.with_extension("stamp");
    fs::metadata(path).is_ok_and(|m| m.len() == size)
        && fs::read_to_string(stamp).is_ok_and(|s| s == recipe)
}

fn write_stamp(path: &Path, recipe: &str) -> io::Result<()> {
    fs::write(path.with_extension("stamp"), recipe)
}

/// The realistic image of `size` bytes: ext4 filled to [`FILL`] from
/// `/usr` with `mke2fs -d`. Cached in `images/`.
pub fn realistic(images: &Path, size: u64) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(images)?;
    let path = images.join(format!("ext4-{}-v0.img", size_tag(size)));
    if stamp_ok(&path, size, RECIPE) {
        return Ok(path);
    }
    let stage = images.join(format!("stage-{}", size_tag(size)));
    crate::remove_dir_if_exists(&stage)?;
    fs::create_dir_all(&stage)?;
    let mut budget = (size as f64 * FILL) as u64;
    eprintln!(
        "image: staging {} of /usr for a {} ext4 image",
        crate::report::bytes_str(budget),
        crate::report::bytes_str(size)
    );
    stage_tree(Path::new("/usr"), &stage, &mut budget)?;
    let _ = fs::remove_file(&path);
    let uuid = "6b1f3a52-0d3c-4e0e-9a7c-5be0c0ffee01";
    tools::run(
        Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", "1700000000")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "bench", "-U", uuid,
            ])
            .arg("-E")
            .arg(format!("hash_seed={uuid},root_owner=0:0"))
            .arg("-d")
            .arg(&stage)
            .arg(&path)
            .arg(format!("{}k", size >> 10)),
    )
    .context("mke2fs -d (is e2fsprogs installed?)")?;
    crate::remove_dir_if_exists(&stage)?;
    if fs::metadata(&path)?.len() != size {
        bail!("mke2fs made {} of the wrong size", path.display());
    }
    write_stamp(&path, RECIPE)?;
    Ok(path)
}

/// Copies files from `src` into `dst` in sorted order until `budget`
/// (allocated 4 KiB blocks) runs out. Skips what cannot be read.
fn stage_tree(src: &Path, dst: &Path, budget: &mut u64) -> anyhow::Result<()> {
    let mut entries: Vec<_> = match fs::read_dir(src) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(_) => return Ok(()),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if *budget == 0 {
            return Ok(());
        }
        let from = e.path();
        let to = dst.join(e.file_name());
        let Ok(meta) = fs::symlink_metadata(&from) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to)?;
            *budget = budget.saturating_sub(BLOCK);
            stage_tree(&from, &to, budget)?;
        } else if ft.is_symlink() {
            if let Ok(target) = fs::read_link(&from) {
                let _ = std::os::unix::fs::symlink(target, &to);
            }
        } else if ft.is_file() {
            let cost = meta.len().div_ceil(BLOCK) * BLOCK + BLOCK;
            if cost > *budget {
                continue;
            }
            if fs::copy(&from, &to).is_ok() {
                *budget -= cost;
            }
        }
    }
    Ok(())
}

/// Rewrites `fraction` of the 4 KiB blocks of `path` with random data at
/// random places, chosen by `seed`; returns the number of blocks.
pub fn rewrite_blocks(path: &Path, fraction: f64, seed: u64) -> anyhow::Result<u64> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let blocks = file.metadata()?.len() / BLOCK;
    let n = ((blocks as f64) * fraction).round() as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked = rand::seq::index::sample(&mut rng, blocks as usize, n).into_vec();
    picked.sort_unstable();
    let mut buf = vec![0u8; BLOCK as usize];
    for b in &picked {
        rng.fill_bytes(&mut buf);
        file.write_all_at(&buf, *b as u64 * BLOCK)?;
    }
    file.sync_all()?;
    Ok(n as u64)
}

/// The incremental series: `[v0, v1, v2]`, where `v1` is `v0` with
/// [`REWRITE`] of its blocks rewritten (seed 1) and `v2` is `v1` with
/// another [`REWRITE`] rewritten (seed 2). Cached.
pub fn series(images: &Path, size: u64) -> anyhow::Result<[PathBuf; 3]> {
    let v0 = realistic(images, size)?;
    let mut prev = v0.clone();
    let mut out = vec![v0];
    for step in 1..=2u64 {
        let path = images.join(format!("ext4-{}-v{step}.img", size_tag(size)));
        let recipe = format!("{RECIPE}+sparse-rewrite{REWRITE}x{step}");
        if !stamp_ok(&path, size, &recipe) {
            eprintln!("image: making {}", path.display());
            let tmp = path.with_extension("tmp");
            // Keep the holes of v0 (free space), like a raw image file.
            tools::run(
                Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&prev)
                    .arg(&tmp),
            )?;
            rewrite_blocks(&tmp, REWRITE, step)?;
            fs::rename(&tmp, &path)?;
            write_stamp(&path, &recipe)?;
        }
        out.push(path.clone());
        prev = path;
    }
    Ok([out[0].clone(), out[1].clone(), out[2].clone()])
}

/// A sparse image of `size` bytes holding `head` at offset 0 and 1 MiB of
/// random data at the end. Cached.
pub fn sparse(images: &Path, size: u64, head: &Path) -> anyhow::Result<PathBuf> {
    let path = images.join(format!("sparse-{}.img", size_tag(size)));
    let head_len = fs::metadata(head)?.len();
    let recipe = format!("sparse-v1+{}", head.display());
    if stamp_ok(&path, size, &recipe) {
        return Ok(path);
    }
    if head_len + (1 << 20) > size {
        bail!(
            "sparse image of {size} bytes cannot hold {}",
            head.display()
        );
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    fs::copy(head, &tmp)?;
    let f = OpenOptions::new().write(true).open(&tmp)?;
    f.set_len(size)?;
    let mut tail = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(64).fill_bytes(&mut tail);
    f.write_all_at(&tail, size - (1 << 20))?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    write_stamp(&path, &recipe)?;
    Ok(path)
}

/// Moves `from` to `to` for the life of the guard, then back: the tools
/// see every version of an image at the same path without copying it.
pub struct Borrowed {
    from: PathBuf,
    to: PathBuf,
}

impl Borrowed {
    /// Renames `from` to `to` (same filesystem).
    pub fn new(from: &Path, to: &Path) -> anyhow::Result<Borrowed> {
        fs::rename(from, to)
            .with_context(|| format!("move {} to {}", from.display(), to.display()))?;
        Ok(Borrowed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        })
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Err(e) = fs::rename(&self.to, &self.from) {
            eprintln!(
                "warning: could not move {} back to {}: {e}",
                self.to.display(),
                self.from.display()
            );
        }
    }
}

/// Whether two files have the same contents.
pub fn same_contents(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_is_deterministic_and_touches_the_right_count() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for p in [&a, &b] {
            fs::write(p, vec![0u8; 400 * 4096]).unwrap();
            assert_eq!(rewrite_blocks(p, 0.01, 7).unwrap(), 4);
        }
        assert!(same_contents(&a, &b).unwrap());
        let data = fs::read(&a).unwrap();
        let changed = data
            .chunks(4096)
            .filter(|c| c.iter().any(|&x| x != 0))
            .count();
        assert_eq!(changed, 4);
        rewrite_blocks(&b, 0.01, 8).unwrap();
        assert!(!same_contents(&a, &b).unwrap());
    }

    #[test]
    fn borrowed_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"x").unwrap();
        {
            let _g = Borrowed::new(&a, &b).unwrap();
            assert!(!a.exists() && b.exists());
        }
        assert!(a.exists() && !b.exists());
    }
}
