//! A fault-injecting HTTP proxy on loopback, in front of the S3 server.
//!
//! It handles one request at a time per client connection: it reads the
//! request head and body, decides a fault, and either answers itself (a
//! 503, a dropped connection) or forwards the request on a fresh upstream
//! connection (`Connection: close`) after an optional delay and relays the
//! response. Each request is thus a fault point of its own, whatever the
//! client's connection pooling does.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the next requests.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Answer this many next requests with 503 Slow Down.
    pub fail_5xx: u32,
    /// Drop the connection of this many next requests without an answer.
    pub drop: u32,
    /// Delay every forwarded request by this long.
    pub delay: Duration,
    /// Drop every request (the server is "gone") until cleared.
    pub down: bool,
}

#[derive(Debug, Default)]
struct State {
    faults: Mutex<Faults>,
    requests: AtomicU64,
    injected: AtomicU64,
    stop: AtomicBool,
}

/// A running proxy; stops accepting on drop.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    state: Arc<State>,
}

enum Action {
    Forward(Duration),
    Fail,
    Drop,
}

impl Proxy {
    /// Proxy `127.0.0.1:PORT` → `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &st);
                });
            }
        });
        Proxy { port, state }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replace the fault settings.
    pub fn set(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Faults injected so far (503s and drops).
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn action(st: &State) -> Action {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let mut f = st.faults.lock().unwrap();
    if f.down || f.drop > 0 {
        f.drop = f.drop.saturating_sub(1);
        st.injected.fetch_add(1, Ordering::Relaxed);
        return Action::Drop;
    }
    if f.fail_5xx > 0 {
        f.fail_5xx -= 1;
        st.injected.fetch_add(1, Ordering::Relaxed);
        return Action::Fail;
    }
    Action::Forward(f.delay)
}

/// Read one request (head and `Content-Length` body); None at EOF.
fn read_request(conn: &mut TcpStream) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let len = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    // Ask upstream to close after its answer: the relay ends at EOF.
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let is_conn = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"));
        if !is_conn {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Some((out.into_bytes(), body)))
}

fn serve(mut conn: TcpStream, upstream: u16, st: &State) -> io::Result<()> {
    // One request per connection: every answer says "Connection: close".
    let Some((head, body)) = read_request(&mut conn)? else {
        return Ok(());
    };
    match action(st) {
        Action::Drop => {
            let _ = conn.shutdown(Shutdown::Both);
        }
        Action::Fail => {
            conn.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
        Action::Forward(delay) => {
            std::thread::sleep(delay);
            let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
            up.write_all(&head)?;
            up.write_all(&body)?;
            io::copy(&mut up, &mut conn)?;
        }
    }
    Ok(())
}
