//! The control socket server: one accept thread, one thread per client.
//!
//! Every thread waits in `epoll` on its socket and a shared stop
//! `eventfd` (written once, never read, so it wakes every waiter), which
//! lets [`ControlServer::shutdown`] join them all promptly without
//! timeouts or polling.
//!
//! The socket is created by [`block::socket::bind_private_socket`] (mode
//! 0600, never open to anyone else, not even for a moment). It stays with
//! the daemon's user even when `--socket-owner` gives the vhost-user
//! socket to the hypervisor's user: whoever can connect here can pause the
//! migration or change its rate, which is the operator's business, not the
//! hypervisor's.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use block::socket::{bind_private_socket, SocketFile};
use control::Control;
use control::{handle_line, Error, Response, Result, MAX_CLIENTS, MAX_LINE};

/// A connection idle this long is closed to free its slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its response within this is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const CONNECTION: u64 = 2;

/// A running control socket server. Dropping it stops it and removes the
/// socket, as [`ControlServer::shutdown`] does.
pub struct ControlServer {
    /// Removes the socket when dropped (after the threads are joined),
    /// unless another process has since put its own at the path.
    file: SocketFile,
    stop: Arc<EventFd>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    control: Arc<dyn Control>,
    stop: Arc<EventFd>,
    clients: AtomicUsize,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600) and starts serving.
    pub fn start(path: impl AsRef<Path>, control: Arc<dyn Control>) -> Result<ControlServer> {
        let path = path.as_ref();
        let (listener, file) =
            bind_private_socket(path, None).map_err(|e| socket_error(path, e))?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventLoop)?,
        );
        let epoll = watch(&[(listener.as_raw_fd(), LISTENER), (stop.as_raw_fd(), STOP)])
            .map_err(Error::EventLoop)?;
        let shared = Arc::new(Shared {
            control,
            stop: stop.clone(),
            clients: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept_thread = std::thread::Builder::new()
            .name("control-accept".to_string())
            .spawn(move || accept_loop(listener, epoll, shared))
            .map_err(Error::Spawn)?;
        info!(path = %path.display(), "control socket listening");
        Ok(ControlServer {
            file,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Stops serving: wakes and joins every thread, then removes the socket.
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            // Without the wake-up the threads would block forever; leave
            // them to die with the process rather than hang here.
            warn!(error = %e, "cannot signal the control socket threads to stop");
        } else if thread.join().is_err() {
            warn!("control socket thread panicked");
        }
        debug!(path = %self.path().display(), "control socket closed");
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// The control protocol's error for a socket that could not be created.
fn socket_error(path: &Path, e: block::socket::Error) -> Error {
    use block::socket::Error as S;
    match e {
        S::NotASocket(path) => Error::NotASocket { path },
        S::InUse(path) => Error::InUse { path },
        S::Inspect { path, source } => Error::Inspect { path, source },
        S::Bind { path, source } | S::Chown { path, source, .. } => Error::Bind { path, source },
        // Owner errors: no owner is ever given for the control socket.
        other => Error::Bind {
            path: path.to_owned(),
            source: io::Error::other(other),
        },
    }
}

/// An epoll set watching `fds` for input, each tagged with its token.
fn watch(fds: &[(i32, u64)]) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// Waits for an event; `Ok(None)` on timeout. Retries on EINTR.
fn wait(epoll: &Epoll, timeout: Option<Duration>) -> io::Result<Option<u64>> {
    let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut events = [EpollEvent::default(); 2];
    loop {
        match epoll.wait(timeout_ms, &mut events) {
            Ok(0) => return Ok(None),
            // Stop wins over any other ready event.
            Ok(n) => {
                let ready = &events[..n];
                let stop = ready.iter().any(|e| e.data() == STOP);
                return Ok(Some(if stop { STOP } else { ready[0].data() }));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn accept_loop(listener: UnixListener, epoll: Epoll, shared: Arc<Shared>) {
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(error = %e, "control socket: cannot make the listener non-blocking");
        return;
    }
    loop {
        match wait(&epoll, None) {
            Ok(Some(LISTENER)) => {}
            Ok(_) => break,
            Err(e) => {
                warn!(error = %e, "control socket: wait failed; no longer accepting");
                break;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => spawn_connection(stream, &shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ECONNABORTED, EMFILE and friends: log, keep serving.
                    warn!(error = %e, "control socket: accept failed");
                    break;
                }
            }
        }
    }
    let threads =
        std::mem::take(&mut *shared.connections.lock().unwrap_or_else(|p| p.into_inner()));
    for thread in threads {
        let _ = thread.join();
    }
}

fn spawn_connection(mut stream: UnixStream, shared: &Arc<Shared>) {
    let mut connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
    connections.retain(|t| !t.is_finished());
    if shared.clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
        let _ = stream.set_nonblocking(true);
        let _ = write_response(&mut stream, &Response::error("Too many control clients"));
        return;
    }
    shared.clients.fetch_add(1, Ordering::SeqCst);
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("control-conn".to_string())
        .spawn(move || {
            if let Err(e) = serve_connection(stream, &thread_shared) {
                debug!(error = %e, "control connection closed");
            }
            thread_shared.clients.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(thread) => connections.push(thread),
        Err(e) => {
            // The closure (and the stream) was dropped with the error.
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            warn!(error = %e, "control socket: cannot start a connection thread");
        }
    }
}

fn serve_connection(mut stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let epoll = watch(&[
        (stream.as_raw_fd(), CONNECTION),
        (shared.stop.as_raw_fd(), STOP),
    ])?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 8192];
    loop {
        // Answer every complete line already received.
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let response = handle_line(shared.control.as_ref(), &buf[..end]);
            buf.drain(..=end);
            write_response(&mut stream, &response)?;
        }
        if buf.len() >= MAX_LINE {
            let message = format!("Request line longer than {MAX_LINE} bytes");
            write_response(&mut stream, &Response::error(message))?;
            return Ok(());
        }
        match wait(&epoll, Some(IDLE_TIMEOUT))? {
            Some(CONNECTION) => {}
            _ => return Ok(()), // stop or idle
        }
        // Readable: this read returns at once with data, EOF or an error.
        match stream.read(&mut chunk) {
            Ok(0) => {
                // A last request without its newline still gets an answer.
                if !buf.is_empty() {
                    let response = handle_line(shared.control.as_ref(), &buf);
                    write_response(&mut stream, &response)?;
                }
                return Ok(());
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use std::time::Instant;

    use super::*;
    use control::{fetch_metrics, fetch_status, request, send_command, Request};
    use control::{State, Status};

    /// A stand-in for the daemon: atomics behind the `Control` trait.
    #[derive(Default)]
    struct FakeDaemon {
        paused: AtomicBool,
        rate: AtomicU64,
        status_calls: AtomicU64,
    }

    impl Control for FakeDaemon {
        fn status(&self) -> Status {
            self.status_calls.fetch_add(1, Ordering::SeqCst);
            let paused = self.paused.load(Ordering::SeqCst);
            Status {
                state: if paused {
                    State::Paused
                } else {
                    State::Migrating
                },
                snapshot: "vm/1".into(),
                target: Some("/prod/disk.raw".into()),
                bytes_total: 1 << 30,
                bytes_migrated: 1 << 28,
                bytes_copied_on_read: 4096,
                chunks_total: 256,
                chunks_migrated: 64,
                copy_rate: f64::NAN,
                rate_limit: self.rate.load(Ordering::SeqCst),
                eta_seconds: Some(f64::INFINITY),
                guest_read_ops: 1,
                guest_read_bytes: 4096,
                guest_write_ops: 2,
                guest_write_bytes: 8192,
                guest_flush_ops: 1,
                overlay_bytes: 8192,
                cache_hit_rate: 0.5,
                uptime_seconds: 3.0,
                ..Status::default()
            }
        }
        fn pause(&self) -> std::result::Result<(), String> {
            if self.paused.swap(true, Ordering::SeqCst) {
                return Err("Migration is already paused".into());
            }
            Ok(())
        }
        fn resume(&self) -> std::result::Result<(), String> {
            if !self.paused.swap(false, Ordering::SeqCst) {
                return Err("Migration is not paused".into());
            }
            Ok(())
        }
        fn set_rate(&self, bytes_per_second: u64) -> std::result::Result<(), String> {
            self.rate.store(bytes_per_second, Ordering::SeqCst);
            Ok(())
        }
    }

    fn start() -> (tempfile::TempDir, PathBuf, Arc<FakeDaemon>, ControlServer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let daemon = Arc::new(FakeDaemon::default());
        let server = ControlServer::start(&path, daemon.clone()).unwrap();
        (dir, path, daemon, server)
    }

    /// A raw client: sends `lines` as given and reads one response each.
    fn raw_exchange(path: &Path, payload: &[u8], responses: usize) -> Vec<serde_json::Value> {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(payload).unwrap();
        let mut reader = io::BufReader::new(stream);
        (0..responses)
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
            })
            .collect()
    }

    #[test]
    fn round_trip_of_every_command() {
        let (_dir, path, daemon, server) = start();

        let status = fetch_status(&path).unwrap();
        assert_eq!(status.state, State::Migrating);
        assert_eq!(status.bytes_migrated, 1 << 28);
        // Non-finite numbers cannot cross JSON; they arrive as unknown.
        assert_eq!(status.copy_rate, 0.0);
        assert_eq!(status.eta_seconds, None);

        send_command(&path, &Request::Pause).unwrap();
        assert!(daemon.paused.load(Ordering::SeqCst));
        assert_eq!(fetch_status(&path).unwrap().state, State::Paused);
        // The daemon's refusal reaches the client verbatim.
        let err = send_command(&path, &Request::Pause).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Daemon refused the request: Migration is already paused"
        );
        send_command(&path, &Request::Resume).unwrap();
        assert!(!daemon.paused.load(Ordering::SeqCst));

        send_command(
            &path,
            &Request::SetRate {
                bytes_per_second: 50 << 20,
            },
        )
        .unwrap();
        assert_eq!(daemon.rate.load(Ordering::SeqCst), 50 << 20);
        assert_eq!(fetch_status(&path).unwrap().rate_limit, 50 << 20);

        let metrics = fetch_metrics(&path).unwrap();
        assert!(
            metrics.contains("instant_recovery_state{state=\"migrating\"} 1\n"),
            "{metrics}"
        );
        assert!(metrics.contains("instant_recovery_copy_rate_limit_bytes_per_second 52428800\n"));
        server.shutdown();
    }

    #[test]
    fn malformed_requests_get_errors_and_the_connection_survives() {
        let (_dir, path, daemon, _server) = start();
        let bad: &[&[u8]] = &[
            b"not json",
            b"",
            b"{}",
            b"[1,2]",
            br#"{"cmd":"bogus"}"#,
            br#"{"cmd":"set-rate"}"#,
            br#"{"cmd":"set-rate","bytes_per_second":-1}"#,
            br#"{"cmd":"set-rate","bytes_per_second":"fast"}"#,
            b"\xff\xfe{\"cmd\":\"status\"}",
            br#"{"cmd":"status""#,
        ];
        let mut payload = Vec::new();
        for line in bad {
            payload.extend_from_slice(line);
            payload.push(b'\n');
        }
        payload.extend_from_slice(b"{\"cmd\":\"status\"}\r\n");
        let responses = raw_exchange(&path, &payload, bad.len() + 1);
        for (line, response) in bad.iter().zip(&responses) {
            assert_eq!(
                response["ok"],
                false,
                "{:?} → {response}",
                String::from_utf8_lossy(line)
            );
            let error = response["error"].as_str().unwrap();
            assert!(error.starts_with("Invalid request: "), "{error}");
        }
        assert_eq!(responses[bad.len()]["ok"], true);
        assert_eq!(responses[bad.len()]["status"]["state"], "migrating");
        assert!(responses[1]["error"].as_str().unwrap().contains("EOF"));
        assert!(responses[4]["error"].as_str().unwrap().contains("bogus"));
        assert!(responses[5]["error"]
            .as_str()
            .unwrap()
            .contains("bytes_per_second"));
        assert_eq!(
            daemon.rate.load(Ordering::SeqCst),
            0,
            "no bad set-rate got through"
        );
        // And the daemon keeps serving new clients.
        fetch_status(&path).unwrap();
    }

    #[test]
    fn last_line_without_newline_is_answered() {
        let (_dir, path, _daemon, _server) = start();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(br#"{"cmd":"resume"}"#).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert_eq!(
            out,
            "{\"ok\":false,\"error\":\"Migration is not paused\"}\n"
        );
    }

    #[test]
    fn overlong_line_closes_only_that_connection() {
        let (_dir, path, _daemon, _server) = start();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Never a newline: the server must cut it off, not buffer forever.
        let junk = vec![b'x'; MAX_LINE * 2];
        let _ = stream.write_all(&junk); // may fail once the server closes
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        let first = out.lines().next().unwrap();
        let response: Response = serde_json::from_str(first).unwrap();
        assert!(response.error.unwrap().contains("longer than"));
        fetch_status(&path).unwrap();
    }

    #[test]
    fn concurrent_clients_are_all_served() {
        let (_dir, path, daemon, _server) = start();
        // Idle clients holding connections open must not block anyone.
        let idle: Vec<UnixStream> = (0..8)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for j in 0..25 {
                        if (i + j) % 3 == 0 {
                            assert!(fetch_metrics(&path).unwrap().contains("instant_recovery_"));
                        } else {
                            assert_eq!(fetch_status(&path).unwrap().snapshot, "vm/1");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(daemon.status_calls.load(Ordering::SeqCst), 16 * 25);
        // A single connection pipelining many requests gets them in order.
        let mut payload = Vec::new();
        for rate in 1..=50u64 {
            payload.extend_from_slice(
                format!("{{\"cmd\":\"set-rate\",\"bytes_per_second\":{rate}}}\n").as_bytes(),
            );
        }
        let responses = raw_exchange(&path, &payload, 50);
        assert!(responses.iter().all(|r| r["ok"] == true));
        assert_eq!(daemon.rate.load(Ordering::SeqCst), 50);
        drop(idle);
    }

    #[test]
    fn too_many_clients_are_told_so() {
        let (_dir, path, _daemon, _server) = start();
        let held: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                // A round trip proves the connection holds a slot.
                s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
                let mut line = String::new();
                io::BufReader::new(&mut s).read_line(&mut line).unwrap();
                s
            })
            .collect();
        let response = request(&path, &Request::Status).unwrap();
        assert_eq!(response.error.as_deref(), Some("Too many control clients"));
        drop(held);
        // Slots free up once those clients leave.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fetch_status(&path).is_err() {
            assert!(Instant::now() < deadline, "slots never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn socket_is_0600_and_removed_on_shutdown_and_drop() {
        let (_dir, path, _daemon, server) = start();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No temporary name is left beside it.
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(server.path(), path);

        // An idle connection must not keep shutdown waiting.
        let _idle = UnixStream::connect(&path).unwrap();
        let started = Instant::now();
        server.shutdown();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!path.exists());
        let err = fetch_status(&path).unwrap_err();
        assert!(err.to_string().contains("is the daemon running?"), "{err}");

        let server = ControlServer::start(&path, Arc::new(FakeDaemon::default())).unwrap();
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn existing_paths_are_checked_before_binding() {
        let dir = tempfile::tempdir().unwrap();
        let daemon: Arc<dyn Control> = Arc::new(FakeDaemon::default());

        // A regular file is never clobbered.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        let err = ControlServer::start(&file, daemon.clone()).err().unwrap();
        assert!(matches!(err, Error::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        // A stale socket (its listener is gone) is replaced.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let server = ControlServer::start(&stale, daemon.clone()).unwrap();
        fetch_status(&stale).unwrap();

        // A live one is refused and left working.
        let err = ControlServer::start(&stale, daemon.clone()).err().unwrap();
        assert!(matches!(err, Error::InUse { .. }), "{err}");
        fetch_status(&stale).unwrap();
        drop(server);

        // A missing directory is a bind error naming the path.
        let nowhere = dir.path().join("missing/dir/control.sock");
        let err = ControlServer::start(&nowhere, daemon).err().unwrap();
        assert!(matches!(err, Error::Bind { .. }));
        assert!(err.to_string().contains("missing/dir/control.sock"));
    }

    #[test]
    fn shutdown_leaves_a_socket_that_replaced_ours() {
        let (dir, path, _daemon, server) = start();
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(server);
        assert!(path.exists(), "someone else's socket was removed");
        drop(other);
        drop(dir);
    }
}
