//! QMP client: line-delimited JSON over QEMU's monitor unix socket, with a
//! typed command layer.
//!
//! Protocol (QEMU `docs/interop/qmp-spec`): on connect QEMU sends a greeting
//! `{"QMP": {"version": …, "capabilities": […]}}`; the client answers
//! `qmp_capabilities` and may then `execute` commands. Every answer is
//! `{"return": …, "id": …}` or `{"error": {"class", "desc"}, "id": …}`;
//! asynchronous `{"event": …}` lines may arrive at any time and are skipped.
//!
//! A QMP socket serves one client at a time: a second client is accepted
//! by the kernel but QEMU never greets it. So a missing greeting within the
//! timeout means "taken by another client", and a greeting that is not QMP
//! JSON means "not a QEMU monitor". Both are reported as such.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, trace};

/// Default time to wait for QEMU's greeting.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to wait for the answer to one command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of QMP (and the guest agent, which speaks the same JSON).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Failed to connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a QEMU QMP socket: it sent {got:?}")]
    NotQmp { path: PathBuf, got: String },
    #[error("{path} is not a QEMU QMP socket: it closed the connection without a greeting")]
    ClosedBeforeGreeting { path: PathBuf },
    #[error(
        "No QMP greeting from {path} within {secs} s: the QMP socket is in use by another client \
         (QEMU serves one client per QMP socket; add a second -qmp socket for backups)"
    )]
    Taken { path: PathBuf, secs: u64 },
    #[error("{peer} I/O failed during {what}")]
    Io {
        peer: &'static str,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{peer} closed the connection during {what}")]
    Closed { peer: &'static str, what: String },
    #[error("{peer} sent invalid JSON during {what}: {line:?}")]
    Json {
        peer: &'static str,
        what: String,
        line: String,
    },
    #[error("{peer} command {command} failed: {desc} ({class})")]
    Command {
        peer: &'static str,
        command: String,
        class: String,
        desc: String,
    },
    #[error("{peer} command {command} answered unexpectedly: {answer}")]
    Unexpected {
        peer: &'static str,
        command: String,
        answer: String,
    },
}

impl Error {
    /// QEMU's error description for a failed command.
    pub fn qemu_desc(&self) -> Option<&str> {
        match self {
            Error::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A line-delimited JSON connection (QMP and the guest agent).
pub(crate) struct JsonConn {
    pub(crate) peer: &'static str,
    pub(crate) stream: UnixStream,
    buf: Vec<u8>,
}

/// The result of reading one line with a deadline.
pub(crate) enum Line {
    Full(String),
    /// EOF; the partial line, if any.
    Eof(String),
    /// Deadline passed; the partial line, if any.
    Timeout(String),
}

impl JsonConn {
    pub(crate) fn new(peer: &'static str, stream: UnixStream) -> JsonConn {
        JsonConn {
            peer,
            stream,
            buf: Vec::new(),
        }
    }

    fn io(&self, what: &str, source: io::Error) -> Error {
        Error::Io {
            peer: self.peer,
            what: what.to_owned(),
            source,
        }
    }

    /// Read bytes until a `\n`, EOF, or the deadline.
    pub(crate) fn read_line(&mut self, timeout: Duration, what: &str) -> Result<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Line::Full(String::from_utf8_lossy(&line).trim().to_owned()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Line::Timeout(
                    String::from_utf8_lossy(&self.buf).into_owned(),
                ));
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| self.io(what, e))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Line::Eof(String::from_utf8_lossy(&self.buf).into_owned())),
                Ok(n) => {
                    if self.buf.len() > (64 << 20) {
                        return Err(Error::Json {
                            peer: self.peer,
                            what: what.to_owned(),
                            line: "(line longer than 64 MiB)".into(),
                        });
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(what, e)),
            }
        }
    }

    /// Drop buffered input up to and including byte `delim` (guest agent
    /// resynchronisation); `false` on timeout.
    pub(crate) fn skip_past(&mut self, delim: u8, timeout: Duration, what: &str) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == delim) {
                self.buf.drain(..=pos);
                return Ok(true);
            }
            self.buf.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| self.io(what, e))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Closed {
                        peer: self.peer,
                        what: what.to_owned(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.io(what, e)),
            }
        }
    }

    pub(crate) fn send(&mut self, v: &Value, what: &str) -> Result<()> {
        let mut line = v.to_string();
        trace!(peer = self.peer, %line, "send");
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io(what, e))
    }

    pub(crate) fn send_raw(&mut self, b: &[u8], what: &str) -> Result<()> {
        self.stream.write_all(b).map_err(|e| self.io(what, e))
    }

    /// Read the next JSON object, skipping events.
    pub(crate) fn recv(&mut self, timeout: Duration, what: &str) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.read_line(left, what)? {
                Line::Full(l) => l,
                Line::Eof(_) => {
                    return Err(Error::Closed {
                        peer: self.peer,
                        what: what.to_owned(),
                    })
                }
                Line::Timeout(_) => {
                    return Err(self.io(
                        what,
                        io::Error::new(io::ErrorKind::TimedOut, "no answer in time"),
                    ))
                }
            };
            if line.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|_| Error::Json {
                peer: self.peer,
                what: what.to_owned(),
                line: line.chars().take(200).collect(),
            })?;
            if v.get("event").is_some() {
                trace!(peer = self.peer, %line, "event skipped");
                continue;
            }
            trace!(peer = self.peer, %line, "recv");
            return Ok(v);
        }
    }

    /// Send `{"execute": cmd, "arguments": args, "id": id}` and return the
    /// `return` value of the answer carrying `id`.
    pub(crate) fn execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
        id: u64,
        timeout: Duration,
    ) -> Result<Value> {
        let mut req = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.send(&req, cmd)?;
        loop {
            let mut v = self.recv(timeout, cmd)?;
            if v.get("id").is_some_and(|x| x != &json!(id)) {
                debug!(peer = self.peer, answer = %v, "answer to another request skipped");
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Command {
                    peer: self.peer,
                    command: cmd.to_owned(),
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return match v.get_mut("return") {
                Some(r) => Ok(r.take()),
                None => Err(Error::Unexpected {
                    peer: self.peer,
                    command: cmd.to_owned(),
                    answer: v.to_string(),
                }),
            };
        }
    }
}

/// A QMP session with capabilities negotiated.
pub struct Qmp {
    conn: JsonConn,
    next_id: u64,
    timeout: Duration,
    version: String,
    path: PathBuf,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    /// Drive id (empty for `-blockdev` nodes attached to a device).
    pub device: String,
    /// Device path, e.g. `/machine/peripheral/virtio0/virtio-backend`.
    pub qdev: Option<String>,
    pub inserted: Option<BlockDeviceInfo>,
}

/// The medium of a `query-block` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    pub drv: String,
    pub file: String,
}

/// One entry of `query-named-block-nodes`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedNode {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    pub file: String,
    #[serde(default, rename = "dirty-bitmaps")]
    pub dirty_bitmaps: Vec<DirtyBitmap>,
    pub image: Option<ImageInfo>,
}

/// Image details of a node.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    pub format: String,
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct DirtyBitmap {
    /// Empty for QEMU's internal (anonymous) bitmaps, e.g. a backup job's.
    #[serde(default)]
    pub name: String,
    pub count: u64,
    pub granularity: u32,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub inconsistent: bool,
}

/// One entry of `query-blockstats`: a device's I/O accounting.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockStatsEntry {
    /// Drive id (empty for `-blockdev` nodes attached to a device).
    #[serde(default)]
    pub device: String,
    /// Device path, as `query-block` gives it.
    pub qdev: Option<String>,
    pub stats: BlockStats,
}

/// Cumulative counters of one device (the guest's requests only).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BlockStats {
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJob {
    pub device: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: Option<String>,
}

/// One entry of `query-block-exports`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockExport {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
}

/// A `transaction` action.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Action {
    /// `blockdev-backup` into a fleecing scratch image: with `sync: none`
    /// the job copies before write every cluster the guest overwrites;
    /// with `sync: bitmap` only those of `bitmap`, and (at `speed` 1 byte
    /// a second) copies nothing on its own.
    BlockdevBackup {
        #[serde(rename = "job-id")]
        job_id: String,
        device: String,
        target: String,
        sync: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
        #[serde(rename = "bitmap-mode", skip_serializing_if = "Option::is_none")]
        bitmap_mode: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        speed: Option<u64>,
        /// `stop`: a failed copy pauses the job (its filter stays) instead
        /// of ending it.
        #[serde(rename = "on-source-error", skip_serializing_if = "Option::is_none")]
        on_source_error: Option<String>,
        #[serde(rename = "on-target-error", skip_serializing_if = "Option::is_none")]
        on_target_error: Option<String>,
        #[serde(rename = "auto-dismiss")]
        auto_dismiss: bool,
        /// Name of the copy-before-write filter node the job inserts.
        #[serde(rename = "filter-node-name", skip_serializing_if = "Option::is_none")]
        filter_node_name: Option<String>,
    },
    BlockDirtyBitmapAdd {
        node: String,
        name: String,
        granularity: u32,
        persistent: bool,
    },
    BlockDirtyBitmapRemove {
        node: String,
        name: String,
    },
    BlockDirtyBitmapEnable {
        node: String,
        name: String,
    },
    BlockDirtyBitmapDisable {
        node: String,
        name: String,
    },
    BlockDirtyBitmapMerge {
        node: String,
        target: String,
        bitmaps: Vec<String>,
    },
}

impl Qmp {
    /// Connect, read the greeting (waiting up to [`GREETING_TIMEOUT`]) and
    /// negotiate capabilities.
    pub fn connect(path: &Path) -> Result<Qmp> {
        Self::connect_timeout(path, GREETING_TIMEOUT)
    }

    /// [`Qmp::connect`] with a greeting timeout.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut conn = JsonConn::new("QMP", stream);
        let greeting = match conn.read_line(timeout, "greeting")? {
            Line::Full(l) => l,
            Line::Eof(partial) if partial.is_empty() => {
                return Err(Error::ClosedBeforeGreeting {
                    path: path.to_path_buf(),
                })
            }
            Line::Timeout(partial) if partial.is_empty() => {
                return Err(Error::Taken {
                    path: path.to_path_buf(),
                    secs: timeout.as_secs().max(1),
                })
            }
            Line::Eof(partial) | Line::Timeout(partial) => partial,
        };
        let v: Option<Value> = serde_json::from_str(&greeting).ok();
        let Some(qmp) = v.as_ref().and_then(|v| v.get("QMP")) else {
            return Err(Error::NotQmp {
                path: path.to_path_buf(),
                got: greeting.chars().take(80).collect(),
            });
        };
        let q = &qmp["version"]["qemu"];
        let version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
        let mut s = Qmp {
            conn,
            next_id: 1,
            // Negotiation answers within the greeting timeout.
            timeout,
            version,
            path: path.to_path_buf(),
        };
        s.execute_value("qmp_capabilities", None)?;
        s.timeout = COMMAND_TIMEOUT;
        debug!(path = %path.display(), version = %s.version, "QMP connected");
        Ok(s)
    }

    /// QEMU's version (`7.2.0`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Execute a command and return its raw `return` value.
    pub fn execute_value(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn.execute(cmd, args, id, self.timeout)
    }

    /// Execute a command and decode its `return` value.
    pub fn execute<T: DeserializeOwned>(&mut self, cmd: &str, args: Option<Value>) -> Result<T> {
        let v = self.execute_value(cmd, args)?;
        serde_json::from_value(v.clone()).map_err(|_| Error::Unexpected {
            peer: "QMP",
            command: cmd.to_owned(),
            answer: v.to_string().chars().take(300).collect(),
        })
    }

    fn run(&mut self, cmd: &str, args: Value) -> Result<()> {
        self.execute_value(cmd, Some(args)).map(drop)
    }

    /// `query-block`.
    pub fn query_block(&mut self) -> Result<Vec<BlockInfo>> {
        self.execute("query-block", None)
    }

    /// `query-named-block-nodes` (flat: every node once).
    pub fn query_named_block_nodes(&mut self) -> Result<Vec<NamedNode>> {
        self.execute("query-named-block-nodes", Some(json!({ "flat": true })))
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&mut self) -> Result<Vec<BlockJob>> {
        self.execute("query-block-jobs", None)
    }

    /// `query-blockstats` of the devices (not of every node).
    pub fn query_blockstats(&mut self) -> Result<Vec<BlockStatsEntry>> {
        self.execute("query-blockstats", None)
    }

    /// `query-block-exports`.
    pub fn query_block_exports(&mut self) -> Result<Vec<BlockExport>> {
        self.execute("query-block-exports", None)
    }

    /// `blockdev-add` with arbitrary options (`driver`, `node-name`, …).
    pub fn blockdev_add(&mut self, options: Value) -> Result<()> {
        self.run("blockdev-add", options)
    }

    /// `blockdev-add` of a qcow2 image file `filename` as node `node`, with
    /// `backing` as its backing node: the fleecing scratch image.
    ///
    /// Flushes of the image and its file are no-ops (`cache.no-flush`):
    /// the scratch image lives only as long as one backup and is deleted
    /// after it, so its durability is worth nothing, while each flush is
    /// an fdatasync that QEMU runs with the disk drained: qcow2's metadata
    /// ordering flushes during the guest's copy-before-writes, and one at
    /// `blockdev-del` that paused the guest's I/O for 25 ms per backup here.
    pub fn blockdev_add_qcow2_overlay(
        &mut self,
        node: &str,
        filename: &Path,
        backing: &str,
    ) -> Result<()> {
        let no_flush = json!({ "no-flush": true });
        self.blockdev_add(json!({
            "driver": "qcow2",
            "node-name": node,
            "file": { "driver": "file", "filename": filename, "cache": no_flush },
            "backing": backing,
            "discard": "unmap",
            "cache": no_flush,
        }))
    }

    /// `blockdev-del`.
    pub fn blockdev_del(&mut self, node: &str) -> Result<()> {
        self.run("blockdev-del", json!({ "node-name": node }))
    }

    /// `transaction` of `actions`, all or nothing.
    pub fn transaction(&mut self, actions: &[Action]) -> Result<()> {
        self.run("transaction", json!({ "actions": actions }))
    }

    /// `nbd-server-start` on a unix socket.
    pub fn nbd_server_start(&mut self, socket: &Path) -> Result<()> {
        self.run(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": socket } } }),
        )
    }

    /// `nbd-server-stop`.
    pub fn nbd_server_stop(&mut self) -> Result<()> {
        self.execute_value("nbd-server-stop", None).map(drop)
    }

    /// `block-export-add type=nbd`, read-only, exporting `bitmaps` too.
    pub fn block_export_add(
        &mut self,
        id: &str,
        node: &str,
        export_name: &str,
        bitmaps: &[String],
    ) -> Result<()> {
        self.run(
            "block-export-add",
            json!({
                "type": "nbd",
                "id": id,
                "node-name": node,
                "name": export_name,
                "writable": false,
                "bitmaps": bitmaps,
            }),
        )
    }

    /// `block-export-del` (`force` drops connected clients).
    pub fn block_export_del(&mut self, id: &str, force: bool) -> Result<()> {
        let mode = if force { "hard" } else { "safe" };
        self.run("block-export-del", json!({ "id": id, "mode": mode }))
    }

    /// `block-job-cancel` (`force` also for paused jobs).
    pub fn block_job_cancel(&mut self, job: &str) -> Result<()> {
        self.run("block-job-cancel", json!({ "device": job, "force": true }))
    }

    /// `block-dirty-bitmap-add`.
    pub fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        granularity: u32,
        persistent: bool,
    ) -> Result<()> {
        self.run(
            "block-dirty-bitmap-add",
            json!({ "node": node, "name": name, "granularity": granularity, "persistent": persistent }),
        )
    }

    /// `block-dirty-bitmap-remove`.
    pub fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<()> {
        self.run(
            "block-dirty-bitmap-remove",
            json!({ "node": node, "name": name }),
        )
    }

    /// `block-dirty-bitmap-merge` of `bitmaps` into `target`.
    pub fn bitmap_merge(&mut self, node: &str, target: &str, bitmaps: &[String]) -> Result<()> {
        self.run(
            "block-dirty-bitmap-merge",
            json!({ "node": node, "target": target, "bitmaps": bitmaps }),
        )
    }

    /// Wait (polling `query-block-jobs`) until job `id` is gone.
    pub fn wait_job_gone(&mut self, id: &str, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.query_block_jobs()?.iter().any(|j| j.device == id) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use std::os::unix::net::UnixListener;

    #[test]
    fn negotiates_and_queries_real_qemu() {
        if !testing::require_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        testing::qemu_img_create(&img, "qcow2", 8 << 20);
        let sock = dir.path().join("qmp.sock");
        let _vm = testing::qemu_none(&sock, &testing::blockdev_args(&img, "qcow2", "disk0"));
        let mut q = Qmp::connect(&sock).unwrap();
        assert!(
            q.version().starts_with(|c: char| c.is_ascii_digit()),
            "{}",
            q.version()
        );
        let nodes = q.query_named_block_nodes().unwrap();
        let disk = nodes.iter().find(|n| n.node_name == "disk0").unwrap();
        assert_eq!(disk.drv, "qcow2");
        assert_eq!(disk.image.as_ref().unwrap().virtual_size, 8 << 20);
        q.bitmap_add("disk0", "b0", 65536, true).unwrap();
        q.transaction(&[
            Action::BlockDirtyBitmapAdd {
                node: "disk0".into(),
                name: "b1".into(),
                granularity: 65536,
                persistent: false,
            },
            Action::BlockDirtyBitmapDisable {
                node: "disk0".into(),
                name: "b0".into(),
            },
        ])
        .unwrap();
        let nodes = q.query_named_block_nodes().unwrap();
        let bitmaps = &nodes
            .iter()
            .find(|n| n.node_name == "disk0")
            .unwrap()
            .dirty_bitmaps;
        let b0 = bitmaps.iter().find(|b| b.name == "b0").unwrap();
        assert!(b0.persistent && !b0.recording);
        let b1 = bitmaps.iter().find(|b| b.name == "b1").unwrap();
        assert!(!b1.persistent && b1.recording && b1.granularity == 65536);
        // Errors name the command and QEMU's answer.
        let e = q.bitmap_remove("disk0", "nope").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("block-dirty-bitmap-remove") && msg.contains("nope"),
            "{msg}"
        );
        let e = q.blockdev_del("no-such-node").unwrap_err();
        assert!(e.qemu_desc().is_some(), "{e}");
        // A failed transaction changes nothing.
        let e = q
            .transaction(&[
                Action::BlockDirtyBitmapRemove {
                    node: "disk0".into(),
                    name: "b1".into(),
                },
                Action::BlockDirtyBitmapRemove {
                    node: "disk0".into(),
                    name: "missing".into(),
                },
            ])
            .unwrap_err();
        assert!(e.to_string().contains("transaction"), "{e}");
        let nodes = q.query_named_block_nodes().unwrap();
        let bitmaps = &nodes
            .iter()
            .find(|n| n.node_name == "disk0")
            .unwrap()
            .dirty_bitmaps;
        assert!(bitmaps.iter().any(|b| b.name == "b1"));
        // The session stays usable after errors.
        assert!(q.query_block_jobs().unwrap().is_empty());
    }

    #[test]
    fn second_client_is_reported_as_taken() {
        if !testing::require_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _vm = testing::qemu_none(&sock, &[]);
        let _first = Qmp::connect(&sock).unwrap();
        let e = Qmp::connect_timeout(&sock, Duration::from_secs(2))
            .err()
            .unwrap();
        assert!(matches!(e, Error::Taken { .. }), "{e}");
        assert!(e.to_string().contains("in use by another client"), "{e}");
    }

    #[test]
    fn bad_sockets_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Qmp::connect(&dir.path().join("missing.sock"))
            .err()
            .unwrap();
        assert!(matches!(e, Error::Connect { .. }), "{e}");
        assert!(e.to_string().contains("missing.sock"), "{e}");

        // A unix socket that speaks something else.
        let sock = dir.path().join("other.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"220 smtp.example.com ESMTP ready\r\n")
                .unwrap();
            let (s2, _) = l.accept().unwrap();
            drop(s2);
        });
        let e = Qmp::connect(&sock).err().unwrap();
        assert!(matches!(e, Error::NotQmp { .. }), "{e}");
        assert!(e.to_string().contains("not a QEMU QMP socket"), "{e}");
        let e = Qmp::connect(&sock).err().unwrap();
        assert!(matches!(e, Error::ClosedBeforeGreeting { .. }), "{e}");
        t.join().unwrap();
    }
}
