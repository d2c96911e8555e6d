//! The vhost-user-blk servers under test, each a separate process that the
//! blkio client (or QEMU) connects to:
//!
//! - ours: `recovery-cli instant-boot` (store → snapshot reader → chunk
//!   cache → snapshot layer → overlay in `--state` → vhost-user server);
//! - the peer: `qemu-storage-daemon` exporting a raw image or a qcow2
//!   overlay as vhost-user-blk.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running server process.
pub struct Server {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    log: PathBuf,
    what: String,
}

impl Server {
    /// `recovery-cli instant-boot --store STORE SNAPSHOT --cache-size N
    /// [EXTRA...]` with its socket (`DIR/ours.sock`), state (`DIR/state`)
    /// and log (`DIR/ours.log`) in `dir`.
    pub fn ours(
        cli: &Path,
        store: &Path,
        snapshot: &str,
        dir: &Path,
        cache_size: u64,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        let socket = dir.join("ours.sock");
        let mut cmd = Command::new(cli);
        cmd.arg("instant-boot")
            .arg("--store")
            .arg(store)
            .arg(snapshot)
            .arg("--socket")
            .arg(&socket)
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--cache-size")
            .arg(cache_size.to_string())
            .args(extra);
        Self::spawn(
            cmd,
            &socket,
            &dir.join("ours.log"),
            "recovery-cli instant-boot",
        )
    }

    /// qemu-storage-daemon exporting raw `image`; `file_opts` is appended to
    /// the file node, e.g. `",cache.direct=on,aio=native"`.
    pub fn qsd_raw(
        image: &Path,
        file_opts: &str,
        socket: &Path,
        log: &Path,
    ) -> anyhow::Result<Server> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}{file_opts}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0");
        Self::qsd(cmd, socket, log)
    }

    /// qemu-storage-daemon exporting the qcow2 `overlay` (its backing file
    /// is opened from the qcow2 header).
    pub fn qsd_qcow2(overlay: &Path, socket: &Path, log: &Path) -> anyhow::Result<Server> {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                overlay.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0");
        Self::qsd(cmd, socket, log)
    }

    fn qsd(mut cmd: Command, socket: &Path, log: &Path) -> anyhow::Result<Server> {
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=export0,node-name=disk0,writable=on,\
             addr.type=unix,addr.path={}",
            socket.display()
        ));
        Self::spawn(cmd, socket, log, "qemu-storage-daemon")
    }

    fn spawn(mut cmd: Command, socket: &Path, log: &Path, what: &str) -> anyhow::Result<Server> {
        let _ = std::fs::remove_file(socket);
        let out = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {what}"))?;
        Ok(Server {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            what: what.to_string(),
        })
    }

    /// Waits until the socket exists; fails if the process exits first.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited early ({status}):\n{}",
                    self.what,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} socket {} did not appear:\n{}",
                    self.what,
                    self.socket.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (both servers flush and exit), then wait; fails if the
    /// server exits with an error.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status}:\n{}", self.what, self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not stop on SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.terminate();
        }
    }
}
