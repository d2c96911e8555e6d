//! qemu-guest-agent client: the same line-delimited JSON as QMP, without a
//! greeting. The agent's channel may hold stale input from an earlier
//! client, so every session starts with `guest-sync-delimited`: we send a
//! `0xFF` byte (resets the agent's parser), the agent answers with `0xFF`
//! followed by the echoed random id, and everything before that is dropped.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tracing::debug;

use crate::qmp::{Error, JsonConn, Result};

/// Time to wait for the agent to answer the sync.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// A synchronised guest-agent session.
pub struct Qga {
    conn: JsonConn,
    next_id: u64,
    path: PathBuf,
}

impl Qga {
    /// Connect to the agent's unix socket and synchronise.
    pub fn connect(path: &Path) -> Result<Qga> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut conn = JsonConn::new("guest agent", stream);
        let sync_id = u64::from(std::process::id()) << 20
            | (std::time::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.subsec_micros()) as u64);
        conn.send_raw(&[0xff], "guest-sync-delimited")?;
        conn.send(
            &json!({ "execute": "guest-sync-delimited", "arguments": { "id": sync_id } }),
            "guest-sync-delimited",
        )?;
        loop {
            if !conn.skip_past(0xff, SYNC_TIMEOUT, "guest-sync-delimited")? {
                return Err(Error::Unexpected {
                    peer: "guest agent",
                    command: "guest-sync-delimited".into(),
                    answer: format!(
                        "nothing within {} s (is qemu-guest-agent running in the guest?)",
                        SYNC_TIMEOUT.as_secs()
                    ),
                });
            }
            let v = conn.recv(SYNC_TIMEOUT, "guest-sync-delimited")?;
            if v.get("return") == Some(&json!(sync_id)) {
                break;
            }
        }
        debug!(path = %path.display(), "guest agent synchronised");
        Ok(Qga {
            conn,
            next_id: 1,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn execute(&mut self, cmd: &str) -> Result<serde_json::Value> {
        self.execute_args(cmd, None)
    }

    fn execute_args(
        &mut self,
        cmd: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.conn
            .execute(cmd, args, id, crate::qmp::COMMAND_TIMEOUT)
    }

    /// `guest-exec` of `path` with `args` (no shell), output captured:
    /// the guest's process id, for [`Qga::exec_status`].
    pub fn exec(&mut self, path: &str, args: &[&str]) -> Result<i64> {
        let v = self.execute_args(
            "guest-exec",
            Some(json!({ "path": path, "arg": args, "capture-output": true })),
        )?;
        v["pid"].as_i64().ok_or_else(|| Error::Unexpected {
            peer: "guest agent",
            command: "guest-exec".into(),
            answer: v.to_string(),
        })
    }

    /// `guest-exec-status` of a process started by [`Qga::exec`].
    pub fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        let v = self.execute_args("guest-exec-status", Some(json!({ "pid": pid })))?;
        let Some(exited) = v["exited"].as_bool() else {
            return Err(Error::Unexpected {
                peer: "guest agent",
                command: "guest-exec-status".into(),
                answer: v.to_string(),
            });
        };
        let data = |key: &str| v[key].as_str().map(decode_base64).unwrap_or_default();
        Ok(ExecStatus {
            exited,
            exit_code: v["exitcode"].as_i64(),
            signal: v["signal"].as_i64(),
            stdout: data("out-data"),
            stderr: data("err-data"),
        })
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping").map(drop)
    }

    /// `guest-fsfreeze-freeze`: number of filesystems frozen.
    pub fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze")?;
        v.as_u64().ok_or_else(|| Error::Unexpected {
            peer: "guest agent",
            command: "guest-fsfreeze-freeze".into(),
            answer: v.to_string(),
        })
    }

    /// `guest-fsfreeze-thaw`: number of filesystems thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw")?;
        v.as_u64().ok_or_else(|| Error::Unexpected {
            peer: "guest agent",
            command: "guest-fsfreeze-thaw".into(),
            answer: v.to_string(),
        })
    }

    /// `guest-fsfreeze-status`: `"thawed"` or `"frozen"`.
    pub fn fsfreeze_status(&mut self) -> Result<String> {
        let v = self.execute("guest-fsfreeze-status")?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Unexpected {
                peer: "guest agent",
                command: "guest-fsfreeze-status".into(),
                answer: v.to_string(),
            })
    }
}

/// What `guest-exec-status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStatus {
    /// Whether the process has ended.
    pub exited: bool,
    /// Its exit code, once it exited normally.
    pub exit_code: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    /// Captured output (invalid base64 from the guest decodes to nothing).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Standard base64 (the agent's `out-data`); stops at the first byte
/// that is not base64, so a hostile guest's answer cannot do more than
/// truncate its own output.
fn decode_base64(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => break,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// No qemu-ga runs here (it belongs in a guest, and frozen host
    /// filesystems would hang the machine), so this peer speaks the agent's
    /// documented wire protocol, stale bytes first.
    pub(crate) fn agent(sock: &Path) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"return\": {}}\n garbage").unwrap();
            let mut r = BufReader::new(s);
            let mut seen = Vec::new();
            let mut frozen = false;
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line)
                    .trim_start_matches('\u{fffd}')
                    .trim()
                    .to_owned();
                line.clear();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_owned();
                let answer = match cmd.as_str() {
                    "guest-sync-delimited" => {
                        w.write_all(&[0xff]).unwrap();
                        json!({ "return": v["arguments"]["id"] })
                    }
                    "guest-ping" => json!({ "return": {} }),
                    "guest-exec" => json!({ "return": { "pid": 42 } }),
                    "guest-exec-status" => json!({ "return": {
                        "exited": true, "exitcode": 3, "out-data": "aGkK" } }),
                    "guest-fsfreeze-freeze" => {
                        frozen = true;
                        json!({ "return": 2 })
                    }
                    "guest-fsfreeze-thaw" => {
                        frozen = false;
                        json!({ "return": 2 })
                    }
                    "guest-fsfreeze-status" => {
                        json!({ "return": if frozen { "frozen" } else { "thawed" } })
                    }
                    _ => json!({ "error": { "class": "CommandNotFound", "desc": "nope" } }),
                };
                seen.push(cmd);
                w.write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
            seen
        })
    }

    #[test]
    fn sync_freeze_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let t = agent(&sock);
        let mut g = Qga::connect(&sock).unwrap();
        g.ping().unwrap();
        assert_eq!(g.fsfreeze_status().unwrap(), "thawed");
        assert_eq!(g.fsfreeze_freeze().unwrap(), 2);
        assert_eq!(g.fsfreeze_status().unwrap(), "frozen");
        assert_eq!(g.fsfreeze_thaw().unwrap(), 2);
        let pid = g.exec("/bin/sh", &["-c", "echo hi; exit 3"]).unwrap();
        let st = g.exec_status(pid).unwrap();
        assert_eq!((st.exited, st.exit_code), (true, Some(3)));
        assert_eq!(st.stdout, b"hi\n");
        drop(g);
        let seen = t.join().unwrap();
        assert_eq!(seen[0], "guest-sync-delimited");
        assert_eq!(seen.len(), 8);
    }

    /// The real qemu-ga, listening on a unix socket on this host. Only
    /// commands that change nothing are sent (a freeze here would freeze
    /// the host's filesystems), and freezing is blocked anyway.
    #[test]
    fn real_agent_syncs_pings_and_reports_status() {
        let ok = std::process::Command::new("qemu-ga")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            if std::env::var_os("RECOVERY_REQUIRE_GUEST").is_some_and(|v| v != "0") {
                panic!("qemu-ga missing (qemu-guest-agent) and RECOVERY_REQUIRE_GUEST is set");
            }
            eprintln!("\n!!! SKIPPING qemu-ga test: qemu-ga not installed\n");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let child = std::process::Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(dir.path())
            .arg("-f")
            .arg(dir.path().join("qga.pid"))
            .args([
                "-b",
                "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw",
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = crate::testing::Proc {
            child,
            socket: sock.clone(),
        };
        crate::testing::wait_socket(&sock, &mut agent.child, "qemu-ga");
        let mut g = Qga::connect(&sock).unwrap();
        g.ping().unwrap();
        assert_eq!(g.fsfreeze_status().unwrap(), "thawed");
        drop(g);
        // A second session syncs past whatever the first left.
        let mut g = Qga::connect(&sock).unwrap();
        g.ping().unwrap();
        // guest-exec runs a harmless command here; its status is polled.
        let pid = g.exec("/bin/sh", &["-c", "echo hi; exit 3"]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let st = loop {
            let st = g.exec_status(pid).unwrap();
            if st.exited || std::time::Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!((st.exited, st.exit_code), (true, Some(3)), "{st:?}");
        assert_eq!(st.stdout, b"hi\n");
    }

    #[test]
    fn base64_decodes_and_stops_at_garbage() {
        assert_eq!(decode_base64("aGkK"), b"hi\n");
        assert_eq!(decode_base64("aGVsbG8="), b"hello");
        assert_eq!(decode_base64(""), b"");
        assert_eq!(decode_base64("aG\u{e9}kK"), b"h");
    }

    #[test]
    fn silent_agent_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = Qga::connect(&dir.path().join("none.sock")).err().unwrap();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
