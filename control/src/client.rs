//! The control socket client: one request, one response, with a timeout.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Error, PointTaken, Request, Response, Result, DEFAULT_TIMEOUT};
use crate::status::Status;

/// Sends one request and waits up to [`DEFAULT_TIMEOUT`] for its response.
/// An error response is returned as `Ok`; see [`Response::into_result`].
pub fn request(path: &Path, request: &Request) -> Result<Response> {
    request_with_timeout(path, request, DEFAULT_TIMEOUT)
}

/// [`request`] with an explicit timeout for the whole exchange.
pub fn request_with_timeout(path: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let path_buf = || path.to_path_buf();
    let mut stream = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path_buf(),
        source,
    })?;
    let deadline = Instant::now() + timeout;
    let mut line = serde_json::to_vec(req).expect("a Request always serializes");
    line.push(b'\n');
    let sent = stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .and_then(|()| stream.write_all(&line));
    match sent {
        Ok(()) => {}
        // A daemon that refuses the connection (too many clients) answers
        // and closes at once, possibly before our request arrives: its
        // answer is still waiting to be read, so read on. Without one the
        // read below reports the connection closed.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        Err(source) => {
            return Err(match source.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                    path: path_buf(),
                    timeout,
                },
                _ => Error::Send {
                    path: path_buf(),
                    source,
                },
            })
        }
    }

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                path: path_buf(),
                timeout,
            });
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|source| Error::Receive {
                path: path_buf(),
                source,
            })?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(Error::Closed { path: path_buf() }),
            // A final line without its newline is still a whole response.
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout {
                    path: path_buf(),
                    timeout,
                });
            }
            // A daemon that closes on us before reading the request resets.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && buf.is_empty() => {
                return Err(Error::Closed { path: path_buf() });
            }
            Err(source) => {
                return Err(Error::Receive {
                    path: path_buf(),
                    source,
                })
            }
        }
    }
    serde_json::from_slice(&buf).map_err(|source| Error::BadResponse {
        path: path_buf(),
        source,
    })
}

/// Fetches the daemon's status.
pub fn fetch_status(path: &Path) -> Result<Status> {
    request(path, &Request::Status)?
        .into_result()?
        .status
        .ok_or(Error::MissingField("status"))
}

/// Fetches the daemon's Prometheus metrics text.
pub fn fetch_metrics(path: &Path) -> Result<String> {
    request(path, &Request::Metrics)?
        .into_result()?
        .metrics
        .ok_or(Error::MissingField("metrics"))
}

/// Sends a command that answers only `ok` (pause, resume, set-rate).
pub fn send_command(path: &Path, req: &Request) -> Result<()> {
    request(path, req)?.into_result().map(drop)
}

/// Asks a protecting daemon for a protection point now (`point`);
/// returns once its instant is taken, waiting at most `timeout`.
pub fn take_point(path: &Path, timeout: Duration) -> Result<PointTaken> {
    point_request(
        path,
        &Request::Point {
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        },
        timeout,
    )
}

/// Waits at most `timeout` for the point of `cut` to be complete in the
/// store (`point-wait`); its `snapshot` is then set.
pub fn wait_point(path: &Path, cut: u64, timeout: Duration) -> Result<PointTaken> {
    point_request(
        path,
        &Request::PointWait {
            cut,
            timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        },
        timeout,
    )
}

fn point_request(path: &Path, req: &Request, timeout: Duration) -> Result<PointTaken> {
    // The daemon answers by its own deadline; leave it time to say why.
    request_with_timeout(path, req, timeout + DEFAULT_TIMEOUT)?
        .into_result()?
        .point
        .ok_or(Error::MissingField("point"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn client_reports_timeouts_closed_connections_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // 1: accept and say nothing; 2: close at once; 3: answer garbage.
            let (silent, _) = listener.accept().unwrap();
            let (closed, _) = listener.accept().unwrap();
            drop(closed);
            let (mut garbage, _) = listener.accept().unwrap();
            let mut request = [0u8; 64];
            let n = garbage.read(&mut request).unwrap();
            assert_eq!(&request[..n], b"{\"cmd\":\"status\"}\n");
            garbage.write_all(b"<html>\n").unwrap();
            drop(silent);
        });

        let started = Instant::now();
        let err =
            request_with_timeout(&path, &Request::Status, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = request(&path, &Request::Status).unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err}");
        let err = request(&path, &Request::Status).unwrap_err();
        assert!(matches!(err, Error::BadResponse { .. }), "{err}");
        server.join().unwrap();

        let missing = dir.path().join("absent.sock");
        let err = request(&missing, &Request::Status).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Cannot connect to control socket {}: is the daemon running?",
                missing.display()
            )
        );
    }
}
