//! The command-line tools we measure: ours (`recovery-cli`), restic, borg
//! and qemu-img, each with its default settings.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use crate::tools::{self, Run};

/// `recovery-cli` on one store.
#[derive(Debug, Clone)]
pub struct Ours {
    pub cli: PathBuf,
    pub store: PathBuf,
}

impl Ours {
    /// `recovery-cli init STORE [--chunk-size N]`.
    pub fn init(cli: &Path, store: &Path, chunk_size: Option<u64>) -> anyhow::Result<Ours> {
        let mut cmd = Command::new(cli);
        cmd.arg("init").arg(store);
        if let Some(cs) = chunk_size {
            cmd.arg("--chunk-size").arg(cs.to_string());
        }
        tools::run(&mut cmd)?;
        Ok(Ours {
            cli: cli.to_path_buf(),
            store: store.to_path_buf(),
        })
    }

    /// `recovery-cli backup --json`: the run and its JSON result.
    pub fn backup(&self, name: &str, image: &Path) -> anyhow::Result<(Run, Value)> {
        let run = tools::run(
            Command::new(&self.cli)
                .arg("backup")
                .arg("--store")
                .arg(&self.store)
                .args(["--name", name, "--json"])
                .arg(image),
        )?;
        let json: Value = serde_json::from_str(&run.stdout)
            .with_context(|| format!("parse backup output {:?}", run.stdout))?;
        Ok((run, json))
    }

    /// `recovery-cli restore` of `snapshot` to `target`, then sync.
    pub fn restore(&self, snapshot: &str, target: &Path) -> anyhow::Result<Run> {
        tools::run_and_sync(
            Command::new(&self.cli)
                .arg("restore")
                .arg("--store")
                .arg(&self.store)
                // Rounds restore onto the previous round's file.
                .arg("--force")
                .arg(snapshot)
                .arg(target),
            target.parent().unwrap_or(Path::new("/")),
        )
    }
}

/// restic on one local repository (password `x`, cache inside `cache`).
#[derive(Debug, Clone)]
pub struct Restic {
    pub repo: PathBuf,
    pub cache: PathBuf,
}

impl Restic {
    fn cmd(&self) -> Command {
        let mut c = Command::new("restic");
        c.env("RESTIC_PASSWORD", "x")
            .env("RESTIC_CACHE_DIR", &self.cache)
            .arg("-r")
            .arg(&self.repo)
            .arg("-q");
        c
    }

    /// `restic init` with the default repository version.
    pub fn init(repo: &Path, cache: &Path) -> anyhow::Result<Restic> {
        let r = Restic {
            repo: repo.to_path_buf(),
            cache: cache.to_path_buf(),
        };
        tools::run(r.cmd().arg("init"))?;
        Ok(r)
    }

    /// The repository format version (1: no compression; 2: zstd "auto").
    pub fn repo_version(&self) -> anyhow::Result<u64> {
        let run = tools::run(self.cmd().args(["cat", "config"]))?;
        let v: Value = serde_json::from_str(&run.stdout)?;
        v["version"]
            .as_u64()
            .context("restic config has no version")
    }

    /// `restic backup --host bench IMAGE`.
    pub fn backup(&self, image: &Path) -> anyhow::Result<Run> {
        tools::run(self.cmd().args(["backup", "--host", "bench"]).arg(image))
    }

    /// `restic restore latest --target DIR`, then sync.
    pub fn restore(&self, target_dir: &Path) -> anyhow::Result<Run> {
        tools::run_and_sync(
            self.cmd()
                .args(["restore", "latest", "--target"])
                .arg(target_dir),
            target_dir,
        )
    }
}

/// borg on one local repository (unencrypted; state inside `base`).
#[derive(Debug, Clone)]
pub struct Borg {
    pub repo: PathBuf,
    pub base: PathBuf,
}

impl Borg {
    fn cmd(&self) -> Command {
        let mut c = Command::new("borg");
        c.env("BORG_BASE_DIR", &self.base)
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        c
    }

    /// `borg init -e none`.
    pub fn init(repo: &Path, base: &Path) -> anyhow::Result<Borg> {
        let b = Borg {
            repo: repo.to_path_buf(),
            base: base.to_path_buf(),
        };
        tools::run(b.cmd().args(["init", "-e", "none"]).arg(repo))?;
        Ok(b)
    }

    /// `borg create REPO::ARCHIVE IMAGE` (default compression: lz4).
    pub fn create(&self, archive: &str, image: &Path) -> anyhow::Result<Run> {
        tools::run(
            self.cmd()
                .arg("create")
                .arg(format!("{}::{archive}", self.repo.display()))
                .arg(image),
        )
    }
}

/// `qemu-img convert -O raw SRC DST`, then sync.
pub fn qemu_img_convert(src: &Path, dst: &Path) -> anyhow::Result<Run> {
    tools::run_and_sync(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(dst),
        dst.parent().unwrap_or(Path::new("/")),
    )
}
