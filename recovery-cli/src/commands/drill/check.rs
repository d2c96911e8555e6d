//! The checks of a drill and the probes that run them against the guest.
//!
//! | check          | passes when                                   | QEMU gets                         |
//! |----------------|-----------------------------------------------|-----------------------------------|
//! | `console:REGEX`| a serial console line matches                 | serial console in a file          |
//! | `qga`          | qemu-guest-agent answers `guest-ping`         | virtio-serial agent port (socket) |
//! | `exec:CMD`     | `/bin/sh -c CMD` through the agent exits 0    | the same                          |
//! | `tcp:PORT`     | the guest accepts a connection on PORT        | isolated user-mode network        |
//!
//! Console checks are read by the drill's main loop; each other check runs
//! in a probe thread that retries until it passes or the drill ends (the
//! drill kills QEMU first, so a probe blocked on a socket returns at once).
//!
//! **`tcp:PORT` and user-mode networking.** The drill forwards a free host
//! port to the guest's PORT (`hostfwd=tcp:127.0.0.1:HOST-:PORT`, with
//! `restrict=on`: the guest reaches nothing outside). QEMU's slirp accepts
//! on the host side *before* it knows whether anything listens in the
//! guest, so a successful `connect()` proves nothing. Slirp then opens
//! its own connection to the guest: if the guest answers with a reset
//! (nothing listens) slirp closes our connection (we read EOF); while the
//! guest does not answer at all (network not up yet) our connection just
//! stays open. So the probe passes only on positive evidence:
//! - it reads at least one byte (a banner: SSH, SMTP, ...), or
//! - QEMU's own table of user-mode connections (`info usernet` over QMP)
//!   shows the forwarded connection `ESTABLISHED` with the guest, which
//!   covers services that wait for the client to speak first (HTTP).
//!
//! EOF means refused: the probe reconnects. A connection that shows
//! neither within two seconds is dropped and made again, so a guest whose
//! network comes up late is seen within about a second, not after slirp's
//! SYN retransmission backoff.

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use hypervisor::qga::Qga;
use hypervisor::qmp::Qmp;
use serde_json::json;

/// How long a probe waits between attempts.
const RETRY: Duration = Duration::from_millis(500);

/// A TCP connection that shows neither data nor an established guest
/// connection within this is dropped and made again.
const TCP_ATTEMPT: Duration = Duration::from_secs(2);

pub(super) use service::check::Check;

/// What QEMU gets for the checks, and where the probes find it.
#[derive(Debug, Default)]
pub(super) struct Endpoints {
    /// The guest agent's chardev socket, if a check needs the agent.
    pub agent: Option<PathBuf>,
    /// QEMU's QMP socket, if a check forwards a port.
    pub qmp: Option<PathBuf>,
    /// `(guest port, host port)` of each forwarded port.
    pub forwards: Vec<(u16, u16)>,
}

impl Endpoints {
    /// Endpoints for `checks` inside the sandbox directory `dir`; free
    /// host ports are picked for the forwards (a port taken by someone
    /// else between here and QEMU's start makes QEMU fail, and the drill
    /// with it, with QEMU's message).
    pub(super) fn for_checks<'a>(
        checks: impl Iterator<Item = &'a Check> + Clone,
        dir: &std::path::Path,
    ) -> anyhow::Result<Endpoints> {
        let mut ep = Endpoints::default();
        if checks.clone().any(Check::needs_agent) {
            ep.agent = Some(dir.join("qga.sock"));
        }
        for c in checks {
            if let Check::Tcp(port) = c {
                if ep.forwards.iter().any(|(g, _)| g == port) {
                    continue;
                }
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .context("Failed to find a free host port for a tcp check")?;
                ep.forwards.push((*port, l.local_addr()?.port()));
            }
        }
        if !ep.forwards.is_empty() {
            ep.qmp = Some(dir.join("qmp.sock"));
        }
        Ok(ep)
    }

    /// QEMU arguments: the agent channel, the isolated network (or none)
    /// and QMP.
    pub(super) fn qemu_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(sock) = &self.agent {
            args.extend([
                "-chardev".to_owned(),
                format!("socket,id=qga0,path={},server=on,wait=off", sock.display()),
                "-device".to_owned(),
                "virtio-serial-pci,id=vser0".to_owned(),
                "-device".to_owned(),
                "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".to_owned(),
            ]);
        }
        if self.forwards.is_empty() {
            args.extend(["-nic".to_owned(), "none".to_owned()]);
        } else {
            let fwd: String = self
                .forwards
                .iter()
                .map(|(g, h)| format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"))
                .collect();
            args.extend([
                "-netdev".to_owned(),
                format!("user,id=n0,restrict=on{fwd}"),
                "-device".to_owned(),
                "virtio-net-pci,netdev=n0".to_owned(),
            ]);
        }
        if let Some(sock) = &self.qmp {
            args.extend([
                "-qmp".to_owned(),
                format!("unix:{},server=on,wait=off", sock.display()),
            ]);
        }
        args
    }
}

/// A probe's state, shared with the drill's main loop.
#[derive(Debug, Default, Clone)]
pub(super) struct ProbeState {
    /// When the check passed.
    pub passed_at: Option<Instant>,
    /// What the probe saw last (the pass, or why the last attempt failed).
    pub detail: String,
}

/// Shared by the probes: QEMU's QMP monitor takes one client at a time.
pub(super) type SharedQmp = Arc<Mutex<Option<Qmp>>>;

/// Starts the probe of a non-console check in its own thread.
pub(super) fn spawn_probe(
    check: Check,
    ep: &Endpoints,
    qmp: SharedQmp,
    state: Arc<Mutex<ProbeState>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<thread::JoinHandle<()>> {
    let agent = ep.agent.clone();
    let qmp_path = ep.qmp.clone();
    let forwards = ep.forwards.clone();
    thread::Builder::new()
        .name(format!("drill-{}", check.kind()))
        .spawn(move || {
            let set = |passed: bool, detail: String| {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.detail = detail;
                if passed {
                    s.passed_at = Some(Instant::now());
                }
            };
            while !stop.load(Ordering::SeqCst) {
                let attempt = match &check {
                    Check::Console(_) => return,
                    Check::Qga => agent.as_deref().map(ping).unwrap_or_else(no_endpoint),
                    Check::Exec(cmd) => agent
                        .as_deref()
                        .map(|a| exec(a, cmd, &stop))
                        .unwrap_or_else(no_endpoint),
                    Check::Tcp(port) => {
                        let host = forwards.iter().find(|(g, _)| g == port).map(|f| f.1);
                        match (host, &qmp_path) {
                            (Some(h), Some(q)) => tcp(*port, h, q, &qmp, &stop),
                            _ => no_endpoint(),
                        }
                    }
                };
                match attempt {
                    Ok(detail) => return set(true, detail),
                    Err(why) => set(false, why),
                }
                thread::sleep(RETRY);
            }
        })
        .context("Failed to start a probe thread")
}

fn no_endpoint() -> Result<String, String> {
    Err("no endpoint for this check".into())
}

/// Connects to the agent and pings it.
fn ping(agent: &std::path::Path) -> Result<String, String> {
    let mut g = Qga::connect(agent).map_err(|e| format!("guest agent: {e}"))?;
    g.ping().map_err(|e| format!("guest agent: {e}"))?;
    Ok("guest-ping answered".into())
}

/// Runs `/bin/sh -c cmd` through the agent and waits for its exit.
fn exec(agent: &std::path::Path, cmd: &str, stop: &AtomicBool) -> Result<String, String> {
    let mut g = Qga::connect(agent).map_err(|e| format!("guest agent: {e}"))?;
    let pid = g
        .exec("/bin/sh", &["-c", cmd])
        .map_err(|e| format!("guest-exec: {e}"))?;
    loop {
        let st = g
            .exec_status(pid)
            .map_err(|e| format!("guest-exec-status: {e}"))?;
        if st.exited {
            let out = |b: &[u8]| {
                let text = String::from_utf8_lossy(b);
                text.lines().last().unwrap_or("").trim().to_owned()
            };
            return match (st.exit_code, st.signal) {
                (Some(0), _) => Ok(format!("exit 0: {}", out(&st.stdout))),
                (Some(code), _) => Err(format!("exit {code}: {}", out(&st.stderr))),
                (None, Some(sig)) => Err(format!("killed by signal {sig}")),
                (None, None) => Err("ended without an exit code".into()),
            };
        }
        if stop.load(Ordering::SeqCst) {
            return Err(format!("still running (guest pid {pid})"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One connection to the forwarded port (see the module doc).
fn tcp(
    guest_port: u16,
    host_port: u16,
    qmp_path: &std::path::Path,
    qmp: &SharedQmp,
    stop: &AtomicBool,
) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect to {addr} (forwarded): {e}"))?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("set a read timeout: {e}"))?;
    let opened = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Err(refused(guest_port)),
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let line = text.lines().next().unwrap_or("").trim();
                return Ok(format!("banner: {line}"));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Err(refused(guest_port)),
        }
        match established(guest_port, host_port, qmp_path, qmp) {
            Ok(true) => return Ok("connection established (no banner)".into()),
            Ok(false) => {}
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::SeqCst) || opened.elapsed() >= TCP_ATTEMPT {
            return Err(format!(
                "no answer from guest port {guest_port} (guest network not up?)"
            ));
        }
    }
}

fn refused(port: u16) -> String {
    format!("the guest closed the connection at once (nothing listens on port {port}?)")
}

/// Whether QEMU's user-mode network shows a forwarded connection to
/// `guest_port` established with the guest.
fn established(
    guest_port: u16,
    host_port: u16,
    path: &std::path::Path,
    qmp: &SharedQmp,
) -> Result<bool, String> {
    let mut slot = qmp.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(Qmp::connect(path).map_err(|e| format!("QMP: {e}"))?);
    }
    let Some(q) = slot.as_mut() else {
        return Ok(false);
    };
    let table = match q.execute_value(
        "human-monitor-command",
        Some(json!({ "command-line": "info usernet" })),
    ) {
        Ok(v) => v.as_str().unwrap_or_default().to_owned(),
        Err(e) => {
            *slot = None;
            return Err(format!("QMP info usernet: {e}"));
        }
    };
    Ok(usernet_established(&table, host_port, guest_port))
}

/// Parses `info usernet`: a row
/// `TCP[ESTABLISHED] FD 127.0.0.1 HOST 10.0.2.15 GUEST RECVQ SENDQ`.
fn usernet_established(table: &str, host_port: u16, guest_port: u16) -> bool {
    table.lines().any(|l| {
        let t: Vec<&str> = l.split_whitespace().collect();
        t.len() >= 6
            && t[0] == "TCP[ESTABLISHED]"
            && t[3] == host_port.to_string()
            && t[5] == guest_port.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_args_follow_the_checks() {
        let dir = std::path::Path::new("/d");
        let none = Endpoints::for_checks([Check::parse("console:x").unwrap()].iter(), dir).unwrap();
        assert_eq!(none.qemu_args(), ["-nic", "none"]);
        let checks = [
            Check::parse("exec:true").unwrap(),
            Check::parse("tcp:22").unwrap(),
            Check::parse("tcp:22").unwrap(),
            Check::parse("tcp:80").unwrap(),
        ];
        let ep = Endpoints::for_checks(checks.iter(), dir).unwrap();
        assert_eq!(ep.agent.as_deref(), Some(dir.join("qga.sock").as_path()));
        assert_eq!(ep.forwards.len(), 2);
        let args = ep.qemu_args().join(" ");
        assert!(args.contains("name=org.qemu.guest_agent.0"), "{args}");
        assert!(args.contains("restrict=on"), "{args}");
        assert!(args.contains(&format!("hostfwd=tcp:127.0.0.1:{}-:22", ep.forwards[0].1)));
        assert!(args.contains("-qmp unix:/d/qmp.sock"), "{args}");
        assert!(!args.contains("-nic none"), "{args}");
    }

    #[test]
    fn usernet_table_parses() {
        let table = "Hub -1 (n0):\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n  TCP[ESTABLISHED]   87       127.0.0.1 18081       10.0.2.15  8081     0     0\n  TCP[SYN_SENT]      88       127.0.0.1 18082       10.0.2.15  9999     0     0\n  TCP[HOST_FORWARD]  12       127.0.0.1 18081       10.0.2.15  8081     0     0\n";
        assert!(usernet_established(table, 18081, 8081));
        assert!(!usernet_established(table, 18082, 9999));
        assert!(!usernet_established(table, 18080, 8080));
        assert!(!usernet_established("", 1, 1));
    }
}
