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
        let id = self.next_id;
        self.next_id += 1;
        self.conn
            .execute(cmd, None, id, crate::qmp::COMMAND_TIMEOUT)
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
        drop(g);
        let seen = t.join().unwrap();
        assert_eq!(seen[0], "guest-sync-delimited");
        assert_eq!(seen.len(), 6);
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
    }

    #[test]
    fn silent_agent_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = Qga::connect(&dir.path().join("none.sock")).err().unwrap();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
