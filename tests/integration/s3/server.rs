//! A real local S3 server for the tests: `moto_server` (PyPI `moto[server]`,
//! installed by `scripts/install-deps.sh`) on a free loopback port, killed
//! on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use store::OpenOptions;

/// Credentials moto accepts (it does not check them).
pub const KEY_ID: &str = "recovery-test";
/// See [`KEY_ID`].
pub const SECRET: &str = "recovery-test-secret";

/// A running `moto_server`.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Send one raw HTTP/1.1 request; the status code, or None if the server
/// did not answer.
pub fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl Moto {
    /// Start a server, or None when `moto_server` is not installed.
    pub fn start() -> Option<Moto> {
        Self::start_on(free_port())
    }

    /// Start a server on `port` (to restart one that was killed).
    pub fn start_on(port: u16) -> Option<Moto> {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(port, "GET", "/").is_none() {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("moto_server exited at start: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(m)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (object_store cannot; moto takes an unsigned PUT).
    pub fn bucket(&self, name: &str) -> String {
        let st = http(self.port, "PUT", &format!("/{name}"));
        assert_eq!(st, Some(200), "create bucket {name}");
        name.to_string()
    }

    /// Open options reaching this server through `endpoint` (the server's or
    /// a proxy's), with a cache dir inside `dir`.
    pub fn options(endpoint: &str, cache: &std::path::Path) -> OpenOptions {
        OpenOptions {
            cache_dir: Some(cache.to_path_buf()),
            io_timeout: Some(Duration::from_secs(20)),
            s3_endpoint: Some(endpoint.to_string()),
            s3_credentials: Some((KEY_ID.into(), SECRET.into())),
            ..Default::default()
        }
    }

    /// The environment a `recovery-cli` child needs to reach `endpoint`.
    pub fn env(cmd: &mut Command, endpoint: &str, cache: &std::path::Path) {
        cmd.env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("XDG_CACHE_HOME", cache);
    }

    /// Kill the server (a crash, not a shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start moto or skip the test (a failure under `RECOVERY_REQUIRE_GUEST=1`).
#[macro_export]
macro_rules! require_moto {
    () => {
        match $crate::s3::server::Moto::start() {
            Some(m) => m,
            None => $crate::skip!(
                "moto_server is not installed (scripts/install-deps.sh installs moto[server])"
            ),
        }
    };
}
