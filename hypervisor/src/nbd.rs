//! A small NBD client (read side) written from the NBD protocol spec.
//!
//! Handshake: fixed newstyle, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT` (e.g. `base:allocation` and
//! `qemu:dirty-bitmap:NAME`), then `NBD_OPT_GO`. Transmission: `NBD_CMD_READ`
//! and `NBD_CMD_BLOCK_STATUS` with structured replies, pipelined: any number
//! of requests may be in flight, from one thread ([`Client::submit_read`]
//! then [`Pending::wait_read`]) or from many (the client is `Sync`). One reader
//! thread owns the socket's read half and routes reply chunks to their
//! request by cookie; read data lands directly in the request's buffer.
//!
//! Everything the server sends is untrusted: [`proto`] checks every chunk
//! against its request (offsets inside the requested range, lengths bounded),
//! and a protocol violation fails every pending request with a clear error
//! instead of panicking.

pub mod proto;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::debug;

use proto::{Chunk, ExportInfo, Extent, ProtoError, ReplyHeader, Request};

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Failed to connect to NBD server at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("NBD I/O failed during {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("NBD protocol error during {what}")]
    Proto {
        what: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("NBD server refused {option} for export {export:?}: {message}")]
    Refused {
        option: &'static str,
        export: String,
        message: String,
    },
    #[error("NBD server has no meta context {name:?} on export {export:?}")]
    NoMetaContext { name: String, export: String },
    #[error("NBD {what} of {len} bytes at offset {offset} failed")]
    Request {
        what: &'static str,
        offset: u64,
        len: u32,
        #[source]
        source: ProtoError,
    },
    #[error("NBD {what} of {len} bytes at offset {offset} is outside the export ({size} bytes)")]
    Range {
        what: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("NBD connection lost: {0}")]
    Dead(String),
}

/// `Result` of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn proto_err(what: &'static str) -> impl FnOnce(ProtoError) -> Error {
    move |source| Error::Proto { what, source }
}

/// What to negotiate.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Export name (`""` is the default export).
    pub export: String,
    /// Meta contexts to select, e.g. `base:allocation`; each must be granted.
    pub meta_contexts: Vec<String>,
}

/// One in-flight request.
struct Slot {
    kind: u16,
    offset: u64,
    len: u32,
    /// Read buffer; taken by the reader thread while it fills it.
    buf: Option<Vec<u8>>,
    covered: u64,
    status: Vec<(u32, Vec<Extent>)>,
    error: Option<ProtoError>,
    done: bool,
    group: Arc<Group>,
}

/// Requests submitted together and waited for together: their waiter is
/// woken once, when the last of them is done (or the connection dies), not
/// once per reply.
struct Group {
    cv: Condvar,
    /// Requests of the group not done yet (changed under the state lock).
    left: AtomicUsize,
}

/// A request to send: kind, flags, offset, length and, for a read, its
/// buffer.
struct Req {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
    buf: Option<Vec<u8>>,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Inner {
    writer: Mutex<UnixStream>,
    state: Mutex<State>,
    next: AtomicU64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kill(&self, why: String) {
        let mut st = self.state();
        st.dead.get_or_insert(why);
        for slot in st.slots.values() {
            slot.group.cv.notify_all();
        }
    }
}

/// Granted meta contexts: `(id, name)`.
type Contexts = Vec<(u32, String)>;

/// A connected NBD client: one connection, or several to one export
/// ([`Client::connect_many`]).
pub struct Client {
    /// The first carries block status requests (the meta context ids in
    /// `contexts` are its); reads take turns over all.
    conns: Vec<Conn>,
    next_conn: AtomicUsize,
    info: ExportInfo,
    contexts: Contexts,
    export: String,
}

/// One connection: its socket's write half, and the thread reading its
/// replies.
struct Conn {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

/// Submitted requests (one, or a batch sent in one write); wait for their
/// replies with [`Pending::wait_read`], [`Pending::wait_reads`],
/// [`Pending::wait_status`] or [`Pending::wait_statuses`].
#[must_use]
pub struct Pending<'a> {
    client: &'a Client,
    /// The connection they went out on.
    conn: usize,
    /// Cookies `first..first + n`.
    first: u64,
    n: u64,
    group: Arc<Group>,
}

/// Result of a block status request: per meta context id, the extents from
/// the request's offset on.
pub type BlockStatus = Vec<(u32, Vec<Extent>)>;

fn read_exact(s: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<()> {
    s.read_exact(buf).map_err(io_err(what))
}

/// Read one option reply (header and payload).
fn option_reply(
    s: &mut UnixStream,
    option: u32,
    what: &'static str,
) -> Result<(proto::OptionReply, Vec<u8>)> {
    let mut h = [0u8; proto::OPTION_REPLY_LEN];
    read_exact(s, &mut h, what)?;
    let r = proto::parse_option_reply(&h, option).map_err(proto_err(what))?;
    let mut payload = vec![0u8; r.len as usize];
    read_exact(s, &mut payload, what)?;
    Ok((r, payload))
}

impl Client {
    /// Connect to a unix socket and negotiate `opts`.
    pub fn connect(path: &Path, opts: &Options) -> Result<Client> {
        Self::connect_many(path, opts, 1)
    }

    /// Connect `n` times to the export (when the server allows several
    /// connections: `NBD_FLAG_CAN_MULTI_CONN`; otherwise once), for more
    /// reads in flight than the server serves on one connection (QEMU
    /// serves 16 at a time per connection). The meta contexts are
    /// negotiated on the first connection only.
    pub fn connect_many(path: &Path, opts: &Options, n: usize) -> Result<Client> {
        let (s, info, contexts) = Self::handshake(path, opts)?;
        let mut conns = vec![Self::start(s)?];
        if info.flags & proto::TFLAG_CAN_MULTI_CONN != 0 {
            let plain = Options {
                export: opts.export.clone(),
                meta_contexts: Vec::new(),
            };
            for _ in 1..n {
                let (s, other, _) = Self::handshake(path, &plain)?;
                if other.size != info.size {
                    return Err(Error::Proto {
                        what: "NBD_OPT_GO",
                        source: ProtoError::Invalid {
                            what: "second connection",
                            why: format!(
                                "export of {} bytes, the first connection's has {}",
                                other.size, info.size
                            ),
                        },
                    });
                }
                conns.push(Self::start(s)?);
            }
        }
        Ok(Client {
            conns,
            next_conn: AtomicUsize::new(0),
            info,
            contexts,
            export: opts.export.clone(),
        })
    }

    /// Connect and negotiate: the socket, ready for transmission, the
    /// export and the granted meta contexts.
    fn handshake(path: &Path, opts: &Options) -> Result<(UnixStream, ExportInfo, Contexts)> {
        let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut g = [0u8; 18];
        read_exact(&mut s, &mut g, "handshake")?;
        let flags = proto::parse_greeting(&g).map_err(proto_err("handshake"))?;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())
            .map_err(io_err("handshake"))?;
        let export = opts.export.clone();
        let refused = |option, r: &proto::OptionReply, p: &[u8]| Error::Refused {
            option,
            export: export.clone(),
            message: proto::option_error_message(r, p),
        };

        // Structured replies: required for block status and sparse reads.
        let mut out = Vec::new();
        proto::encode_option(proto::OPT_STRUCTURED_REPLY, &[], &mut out);
        s.write_all(&out)
            .map_err(io_err("NBD_OPT_STRUCTURED_REPLY"))?;
        let (r, p) = option_reply(
            &mut s,
            proto::OPT_STRUCTURED_REPLY,
            "NBD_OPT_STRUCTURED_REPLY",
        )?;
        if r.is_error() || r.reply != proto::REP_ACK {
            return Err(refused("NBD_OPT_STRUCTURED_REPLY", &r, &p));
        }

        let mut contexts = Vec::new();
        if !opts.meta_contexts.is_empty() {
            out.clear();
            proto::encode_option(
                proto::OPT_SET_META_CONTEXT,
                &proto::meta_context_data(&opts.export, &opts.meta_contexts),
                &mut out,
            );
            s.write_all(&out)
                .map_err(io_err("NBD_OPT_SET_META_CONTEXT"))?;
            loop {
                let (r, p) = option_reply(
                    &mut s,
                    proto::OPT_SET_META_CONTEXT,
                    "NBD_OPT_SET_META_CONTEXT",
                )?;
                if r.is_error() {
                    return Err(refused("NBD_OPT_SET_META_CONTEXT", &r, &p));
                }
                match r.reply {
                    proto::REP_META_CONTEXT => contexts.push(
                        proto::parse_meta_context(&p)
                            .map_err(proto_err("NBD_OPT_SET_META_CONTEXT"))?,
                    ),
                    proto::REP_ACK => break,
                    t => {
                        return Err(Error::Proto {
                            what: "NBD_OPT_SET_META_CONTEXT",
                            source: ProtoError::Invalid {
                                what: "option reply",
                                why: format!("unexpected reply type {t}"),
                            },
                        })
                    }
                }
            }
            for want in &opts.meta_contexts {
                if !contexts.iter().any(|(_, n)| n == want) {
                    return Err(Error::NoMetaContext {
                        name: want.clone(),
                        export: opts.export.clone(),
                    });
                }
            }
        }

        out.clear();
        proto::encode_option(proto::OPT_GO, &proto::go_data(&opts.export), &mut out);
        s.write_all(&out).map_err(io_err("NBD_OPT_GO"))?;
        let mut info = ExportInfo::default();
        let mut have_export = false;
        loop {
            let (r, p) = option_reply(&mut s, proto::OPT_GO, "NBD_OPT_GO")?;
            if r.is_error() {
                return Err(refused("NBD_OPT_GO", &r, &p));
            }
            match r.reply {
                proto::REP_INFO => {
                    have_export |=
                        proto::parse_info(&p, &mut info).map_err(proto_err("NBD_OPT_GO"))?
                }
                proto::REP_ACK => break,
                t => {
                    return Err(Error::Proto {
                        what: "NBD_OPT_GO",
                        source: ProtoError::Invalid {
                            what: "option reply",
                            why: format!("unexpected reply type {t}"),
                        },
                    })
                }
            }
        }
        if !have_export {
            return Err(Error::Proto {
                what: "NBD_OPT_GO",
                source: ProtoError::Invalid {
                    what: "option reply",
                    why: "no NBD_INFO_EXPORT".into(),
                },
            });
        }
        debug!(export = %opts.export, size = info.size, contexts = %proto::Contexts(&contexts), "NBD connected");
        Ok((s, info, contexts))
    }

    /// Start the reader thread of a negotiated connection.
    fn start(s: UnixStream) -> Result<Conn> {
        let rd = s.try_clone().map_err(io_err("socket clone"))?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(s),
            state: Mutex::new(State::default()),
            next: AtomicU64::new(1),
        });
        let shared = Arc::clone(&inner);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || {
                let why = match reader_loop(&shared, rd) {
                    Ok(()) => "connection closed by the server".to_owned(),
                    Err(e) => error_chain(&e),
                };
                shared.kill(why);
            })
            .map_err(io_err("reader thread spawn"))?;
        Ok(Conn {
            inner,
            reader: Some(reader),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    /// Largest request the server accepts (32 MiB if it did not say).
    pub fn max_request(&self) -> u32 {
        self.info.block_size.map_or(32 << 20, |b| b.2)
    }

    /// Id of a granted meta context.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    fn check_range(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        if len == 0
            || len > u32::MAX as u64
            || offset.checked_add(len).is_none_or(|e| e > self.info.size)
        {
            return Err(Error::Range {
                what,
                offset,
                len,
                size: self.info.size,
            });
        }
        Ok(())
    }

    /// Send `reqs` in one write on connection `conn`; their replies are
    /// waited for together.
    fn submit(&self, conn: usize, reqs: Vec<Req>) -> Result<Pending<'_>> {
        let inner = &self.conns[conn].inner;
        let n = reqs.len() as u64;
        let first = inner.next.fetch_add(n, Ordering::Relaxed);
        let group = Arc::new(Group {
            cv: Condvar::new(),
            left: AtomicUsize::new(reqs.len()),
        });
        let mut wire = Vec::with_capacity(reqs.len() * proto::REQUEST_LEN);
        {
            let mut st = inner.state();
            if let Some(why) = &st.dead {
                return Err(Error::Dead(why.clone()));
            }
            for (cookie, r) in (first..).zip(reqs) {
                let req = Request {
                    flags: r.flags,
                    kind: r.kind,
                    cookie,
                    offset: r.offset,
                    len: r.len,
                };
                wire.extend_from_slice(&req.encode());
                st.slots.insert(
                    cookie,
                    Slot {
                        kind: r.kind,
                        offset: r.offset,
                        len: r.len,
                        buf: r.buf,
                        covered: 0,
                        status: Vec::new(),
                        error: None,
                        done: false,
                        group: Arc::clone(&group),
                    },
                );
            }
        }
        let sent = inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&wire);
        if let Err(e) = sent {
            {
                let mut st = inner.state();
                for cookie in first..first + n {
                    st.slots.remove(&cookie);
                }
            }
            let e = Error::Io {
                what: "request send",
                source: e,
            };
            inner.kill(error_chain(&e));
            return Err(e);
        }
        Ok(Pending {
            client: self,
            conn,
            first,
            n,
            group,
        })
    }

    /// Send a read of `buf.len()` bytes at `offset`; the buffer comes back
    /// filled from [`Pending::wait_read`].
    pub fn submit_read(&self, offset: u64, buf: Vec<u8>) -> Result<Pending<'_>> {
        self.submit_reads(vec![(offset, buf)])
    }

    /// Send reads of `(offset, buffer)` in one write (the server sees them
    /// at once); the buffers come back filled, in order, from
    /// [`Pending::wait_reads`].
    ///
    /// Reads go with `NBD_CMD_FLAG_DF` when the server takes it: the data
    /// comes in one chunk, and the server does not look for holes in it
    /// first (QEMU's sparse read asks the block layer for the status of
    /// every read; our callers read only what they know holds data).
    pub fn submit_reads(&self, reads: Vec<(u64, Vec<u8>)>) -> Result<Pending<'_>> {
        let flags = if self.info.flags & proto::TFLAG_SEND_DF != 0 {
            proto::CMD_FLAG_DF
        } else {
            0
        };
        let mut reqs = Vec::with_capacity(reads.len());
        for (offset, buf) in reads {
            self.check_range("read", offset, buf.len() as u64)?;
            reqs.push(Req {
                kind: proto::CMD_READ,
                flags,
                offset,
                len: buf.len() as u32,
                buf: Some(buf),
            });
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.submit(conn, reqs)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.submit_read(offset, buf)?.wait_read()
    }

    /// Send a block status request for `[offset, offset + len)`.
    pub fn submit_block_status(&self, offset: u64, len: u32) -> Result<Pending<'_>> {
        self.submit_block_statuses(&[(offset, len)])
    }

    /// Send block status requests for `(offset, len)` ranges in one write.
    pub fn submit_block_statuses(&self, ranges: &[(u64, u32)]) -> Result<Pending<'_>> {
        let mut reqs = Vec::with_capacity(ranges.len());
        for &(offset, len) in ranges {
            self.check_range("block status", offset, len as u64)?;
            reqs.push(Req {
                kind: proto::CMD_BLOCK_STATUS,
                flags: 0,
                offset,
                len,
                buf: None,
            });
        }
        self.submit(0, reqs)
    }

    /// Block status of `[offset, offset + len)` for every selected context.
    pub fn block_status(&self, offset: u64, len: u32) -> Result<BlockStatus> {
        self.submit_block_status(offset, len)?.wait_status()
    }

    /// Extents of each of `contexts` over `[offset, end)` as absolute
    /// `(offset, len, flags)`, adjacent equal ones merged: the requests of
    /// one pass sent at once (each answers every context), then, for a
    /// part a reply left out, [`Client::extents`].
    pub fn extents_of(
        &self,
        contexts: &[u32],
        offset: u64,
        end: u64,
    ) -> Result<Vec<Vec<(u64, u64, u32)>>> {
        let step = self.max_request().min(1 << 30) as u64;
        self.extents_stepped(contexts, offset, end, step)
    }

    /// [`Client::extents_of`] with requests of `step` bytes.
    fn extents_stepped(
        &self,
        contexts: &[u32],
        offset: u64,
        end: u64,
        step: u64,
    ) -> Result<Vec<Vec<(u64, u64, u32)>>> {
        let ranges: Vec<(u64, u32)> = (offset..end)
            .step_by(step as usize)
            .map(|at| (at, (end - at).min(step) as u32))
            .collect();
        let answers = if ranges.is_empty() {
            Vec::new()
        } else {
            self.submit_block_statuses(&ranges)?.wait_statuses()?
        };
        let mut out = vec![Vec::new(); contexts.len()];
        for (&(at, len), st) in ranges.iter().zip(&answers) {
            let stop = at + len as u64;
            for (&context, out) in contexts.iter().zip(&mut out) {
                let ext = st
                    .iter()
                    .find(|(c, _)| *c == context)
                    .map(|(_, e)| e.as_slice())
                    .unwrap_or(&[]);
                let mut covered = at;
                for r in proto::extent_ranges(at, stop, ext) {
                    push_extent(out, r);
                    covered = r.0 + r.1;
                }
                if covered < stop {
                    for r in self.extents(context, covered, stop)? {
                        push_extent(out, r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Extents of one context over `[offset, end)` as absolute
    /// `(offset, len, flags)`, issuing as many requests as the server needs.
    pub fn extents(&self, context: u32, offset: u64, end: u64) -> Result<Vec<(u64, u64, u32)>> {
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut at = offset;
        let step = self.max_request().min(1 << 30) as u64;
        while at < end {
            let len = (end - at).min(step) as u32;
            let st = self.block_status(at, len)?;
            let ext = st
                .iter()
                .find(|(c, _)| *c == context)
                .map(|(_, e)| e.as_slice())
                .unwrap_or(&[]);
            let before = at;
            for r in proto::extent_ranges(at, at + len as u64, ext) {
                push_extent(&mut out, r);
                at = r.0 + r.1;
            }
            if at == before {
                return Err(Error::Request {
                    what: "block status",
                    offset: at,
                    len,
                    source: ProtoError::Invalid {
                        what: "block status reply",
                        why: format!("no extent for context {context}"),
                    },
                });
            }
        }
        Ok(out)
    }
}

/// Append extent `r` to `out`, merged with the last one when adjacent with
/// the same flags.
fn push_extent(out: &mut Vec<(u64, u64, u32)>, r: (u64, u64, u32)) {
    match out.last_mut() {
        Some(last) if last.2 == r.2 && last.0 + last.1 == r.0 => last.1 += r.1,
        _ => out.push(r),
    }
}

impl Pending<'_> {
    /// Wait until every request is done (or the connection dies); the
    /// slots in order, or the first request's error.
    fn wait(self) -> Result<Vec<Slot>> {
        let inner = &self.client.conns[self.conn].inner;
        let mut st = inner.state();
        while self.group.left.load(Ordering::Relaxed) > 0 && st.dead.is_none() {
            st = self.group.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let mut slots = Vec::with_capacity(self.n as usize);
        let mut first_err = None;
        for cookie in self.first..self.first + self.n {
            match st.slots.remove(&cookie) {
                Some(mut slot) if slot.done => match slot.error.take() {
                    Some(source) if first_err.is_none() => {
                        first_err = Some(Error::Request {
                            what: if slot.kind == proto::CMD_READ {
                                "read"
                            } else {
                                "block status"
                            },
                            offset: slot.offset,
                            len: slot.len,
                            source,
                        })
                    }
                    _ => slots.push(slot),
                },
                _ => {
                    if first_err.is_none() {
                        let why = st.dead.clone().unwrap_or_default();
                        first_err = Some(Error::Dead(why));
                    }
                }
            }
        }
        first_err.map_or(Ok(slots), Err)
    }

    /// Wait for a read; returns its buffer, filled.
    pub fn wait_read(self) -> Result<Vec<u8>> {
        Ok(self.wait_reads()?.pop().unwrap_or_default())
    }

    /// Wait for reads; returns their buffers, filled, in order.
    pub fn wait_reads(self) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .wait()?
            .into_iter()
            .map(|s| s.buf.unwrap_or_default())
            .collect())
    }

    /// Wait for a block status request.
    pub fn wait_status(self) -> Result<BlockStatus> {
        Ok(self.wait_statuses()?.pop().unwrap_or_default())
    }

    /// Wait for block status requests; their answers in order.
    pub fn wait_statuses(self) -> Result<Vec<BlockStatus>> {
        Ok(self.wait()?.into_iter().map(|s| s.status).collect())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let disc = Request {
            flags: 0,
            kind: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        for c in &mut self.conns {
            let w = c.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let mut w = &*w;
            let _ = w.write_all(&disc.encode());
            let _ = w.shutdown(std::net::Shutdown::Both);
            if let Some(r) = c.reader.take() {
                let _ = r.join();
            }
        }
        debug!(export = %self.export, connections = self.conns.len(), "NBD disconnected");
    }
}

/// `a: b: c` of an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The reader thread: route every reply chunk to its request.
fn reader_loop(inner: &Inner, s: UnixStream) -> Result<()> {
    // Buffered: a burst of small replies arrives in a few `read`s, not
    // three each.
    let mut s = io::BufReader::with_capacity(256 << 10, s);
    let mut hdr = [0u8; proto::STRUCTURED_HEADER_LEN];
    let mut payload = Vec::new();
    loop {
        match s.read_exact(&mut hdr[..4]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err("reply receive")(e)),
        }
        let n = ReplyHeader::header_len(&hdr[..4]).map_err(proto_err("reply receive"))?;
        read_exact(&mut s, &mut hdr[4..n], "reply receive")?;
        let h = ReplyHeader::parse(&hdr[..n]).map_err(proto_err("reply receive"))?;
        let cookie = h.cookie();
        let (kind, offset, len, mut buf) = {
            let mut st = inner.state();
            let slot = st.slots.get_mut(&cookie).ok_or_else(|| Error::Proto {
                what: "reply receive",
                source: ProtoError::Invalid {
                    what: "reply",
                    why: format!("unknown cookie {cookie}"),
                },
            })?;
            if slot.done {
                return Err(Error::Proto {
                    what: "reply receive",
                    source: ProtoError::Invalid {
                        what: "reply",
                        why: format!("reply to request {cookie}, which was already answered"),
                    },
                });
            }
            (slot.kind, slot.offset, slot.len, slot.buf.take())
        };
        let mut error = None;
        let mut status = None;
        let mut covered = 0u64;
        let done;
        match h {
            ReplyHeader::Simple { error: code, .. } => {
                done = true;
                if code != 0 {
                    error = Some(ProtoError::Server {
                        code,
                        message: String::new(),
                    });
                } else if kind == proto::CMD_READ {
                    let b = buf.as_mut().map_or(&mut [][..], |b| &mut b[..]);
                    read_exact(&mut s, b, "read data receive")?;
                    covered = len as u64;
                } else {
                    error = Some(ProtoError::Invalid {
                        what: "reply",
                        why: "simple reply to block status".into(),
                    });
                }
            }
            ReplyHeader::Structured {
                flags,
                kind: ckind,
                len: plen,
                ..
            } => {
                done = flags & proto::REPLY_FLAG_DONE != 0;
                if ckind == proto::REPLY_TYPE_OFFSET_DATA && kind == proto::CMD_READ {
                    // Data straight into the request's buffer.
                    let bad = |why: String| Error::Proto {
                        what: "read data receive",
                        source: ProtoError::Invalid {
                            what: "OFFSET_DATA",
                            why,
                        },
                    };
                    if (plen as usize) <= proto::OFFSET_DATA_HEADER {
                        return Err(bad(format!("payload of {plen} bytes")));
                    }
                    let mut o = [0u8; 8];
                    read_exact(&mut s, &mut o, "read data receive")?;
                    let at = u64::from_be_bytes(o);
                    let dlen = plen as u64 - 8;
                    let pos = proto::check_data_range(at, dlen, offset, len)
                        .map_err(proto_err("read data receive"))?;
                    let b = buf.as_mut().ok_or_else(|| bad("no buffer".into()))?;
                    read_exact(
                        &mut s,
                        &mut b[pos..pos + dlen as usize],
                        "read data receive",
                    )?;
                    covered = dlen;
                } else {
                    if plen > proto::MAX_PAYLOAD {
                        return Err(Error::Proto {
                            what: "reply receive",
                            source: ProtoError::Invalid {
                                what: "structured reply",
                                why: format!("payload of {plen} bytes"),
                            },
                        });
                    }
                    payload.resize(plen as usize, 0);
                    read_exact(&mut s, &mut payload, "reply receive")?;
                    match proto::parse_chunk(flags, ckind, &payload, kind, offset, len)
                        .map_err(proto_err("reply receive"))?
                    {
                        Chunk::None => {}
                        Chunk::Data { .. } => unreachable!("handled above"),
                        Chunk::Hole {
                            offset: at,
                            len: hl,
                        } => {
                            if let Some(b) = buf.as_mut() {
                                let pos = (at - offset) as usize;
                                b[pos..pos + hl as usize].fill(0);
                            }
                            covered = hl as u64;
                        }
                        Chunk::Status { context, extents } => status = Some((context, extents)),
                        Chunk::Error { code, message, .. } => {
                            error = Some(ProtoError::Server { code, message })
                        }
                    }
                }
            }
        }
        let mut st = inner.state();
        let Some(slot) = st.slots.get_mut(&cookie) else {
            continue;
        };
        slot.buf = buf;
        slot.covered += covered;
        if let Some(x) = status {
            slot.status.push(x);
        }
        if slot.error.is_none() {
            slot.error = error;
        }
        if done {
            if slot.error.is_none()
                && slot.kind == proto::CMD_READ
                && slot.covered != slot.len as u64
            {
                slot.error = Some(ProtoError::Invalid {
                    what: "read reply",
                    why: format!("{} of {} bytes sent", slot.covered, slot.len),
                });
            }
            slot.done = true;
            if slot.group.left.fetch_sub(1, Ordering::Relaxed) == 1 {
                slot.group.cv.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Qmp;
    use crate::testing;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 8 * MIB;

    /// An 8 MiB qcow2: 0xaa at [1M, 2M) and 0xbb at [4M, 4M+64K) before
    /// bitmap `b0` was added, then 0xcc at [6M, 6M+128K) and 0xdd at
    /// [1M+64K, 1M+128K) after. Returns the image and its expected bytes.
    fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
        let img = dir.join("disk.qcow2");
        testing::qemu_img_create(&img, "qcow2", SIZE);
        testing::qemu_io(
            &img,
            "qcow2",
            &["write -P 0xaa 1M 1M", "write -P 0xbb 4M 64k"],
        );
        testing::run(
            std::process::Command::new("qemu-img")
                .args(["bitmap", "--add", "-g", "65536"])
                .arg(&img)
                .arg("b0"),
        );
        testing::qemu_io(
            &img,
            "qcow2",
            &["write -P 0xcc 6M 128k", "write -P 0xdd 1088k 64k"],
        );
        let mut want = vec![0u8; SIZE as usize];
        for (off, len, b) in [
            (MIB, MIB, 0xaa),
            (4 * MIB, 64 << 10, 0xbb),
            (6 * MIB, 128 << 10, 0xcc),
            (1088 << 10, 64 << 10, 0xdd),
        ] {
            want[off as usize..(off + len) as usize].fill(b);
        }
        (img, want)
    }

    const DIRTY: [(u64, u64); 2] = [(1088 << 10, 64 << 10), (6 * MIB, 128 << 10)];

    fn opts(export: &str, bitmap: &str) -> Options {
        Options {
            export: export.into(),
            meta_contexts: vec![
                "base:allocation".into(),
                format!("qemu:dirty-bitmap:{bitmap}"),
            ],
        }
    }

    /// Reads (many in flight), allocation and dirty extents all match.
    fn check_export(c: &Client, want: &[u8], bitmap: &str) {
        assert_eq!(c.size(), SIZE);
        assert_ne!(c.flags() & proto::TFLAG_READ_ONLY, 0);
        // Reads below go with NBD_CMD_FLAG_DF.
        assert_ne!(c.flags() & proto::TFLAG_SEND_DF, 0);
        let step = 64 << 10;
        let pending: Vec<_> = (0..SIZE / step)
            .map(|i| c.submit_read(i * step, vec![0x55; step as usize]).unwrap())
            .collect();
        for (i, p) in pending.into_iter().enumerate() {
            let got = p.wait_read().unwrap();
            let at = i * step as usize;
            assert!(
                got == want[at..at + step as usize],
                "data differs in block {i}"
            );
        }
        // The same as one batch: one write, one wake-up.
        let got = c
            .submit_reads(
                (0..SIZE / step)
                    .map(|i| (i * step, vec![0x55; step as usize]))
                    .collect(),
            )
            .unwrap()
            .wait_reads()
            .unwrap();
        assert!(got.concat() == want, "batched reads differ");
        // Odd-sized read across a data/zero boundary.
        let got = c.read_at(2 * MIB - 1000, vec![1; 3000]).unwrap();
        assert_eq!(
            got,
            &want[(2 * MIB - 1000) as usize..(2 * MIB + 2000) as usize]
        );

        let alloc = c.context_id("base:allocation").unwrap();
        let ext = c.extents(alloc, 0, SIZE).unwrap();
        assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), SIZE);
        for (o, l, f) in &ext {
            let zero = want[*o as usize..(o + l) as usize].iter().all(|&b| b == 0);
            if f & proto::STATE_ZERO == 0 {
                continue;
            }
            assert!(zero, "extent {o}+{l} flagged zero holds data");
        }
        let data: u64 = ext
            .iter()
            .filter(|e| e.2 & proto::STATE_ZERO == 0)
            .map(|e| e.1)
            .sum();
        assert!((MIB + (64 << 10)..4 * MIB).contains(&data), "{ext:?}");

        let dirty = c
            .context_id(&format!("qemu:dirty-bitmap:{bitmap}"))
            .unwrap();
        let ext = c.extents(dirty, 0, SIZE).unwrap();
        let marked: Vec<_> = ext
            .iter()
            .filter(|e| e.2 & proto::STATE_DIRTY != 0)
            .map(|e| (e.0, e.1))
            .collect();
        assert_eq!(marked, DIRTY);
        // Both contexts from one pipelined pass, in steps smaller than the
        // export (as a server limiting requests makes them).
        let whole = c.extents(alloc, 0, SIZE).unwrap();
        for step in [SIZE, MIB, 3 * MIB + 4096] {
            let both = c.extents_stepped(&[alloc, dirty], 0, SIZE, step).unwrap();
            assert_eq!(both[1], ext, "step {step}");
            assert_eq!(both[0], whole, "step {step}");
        }
        assert_eq!(c.extents_of(&[dirty], 1000, 1000).unwrap(), [[]; 1]);
        // A status request in the middle of a dirty range starts there.
        let st = c.block_status(6 * MIB + 4096, 4096).unwrap();
        let (_, e) = st.iter().find(|(id, _)| *id == dirty).unwrap();
        assert_eq!(e[0].flags & proto::STATE_DIRTY, 1);

        // Out of range and zero-length requests never reach the server.
        assert!(matches!(
            c.read_at(SIZE - 10, vec![0; 20]),
            Err(Error::Range { .. })
        ));
        assert!(matches!(c.block_status(SIZE, 1), Err(Error::Range { .. })));
        assert!(matches!(c.read_at(0, Vec::new()), Err(Error::Range { .. })));
    }

    #[test]
    fn qemu_nbd_export_with_bitmap() {
        if !testing::require_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, want) = image(dir.path());
        let sock = dir.path().join("nbd.sock");
        let _srv = testing::qemu_nbd(&img, "qcow2", &sock, &["--bitmap=b0", "--export-name=disk"]);
        let c = Client::connect(&sock, &opts("disk", "b0")).unwrap();
        check_export(&c, &want, "b0");
        // From several threads at once, too.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (c, want) = (&c, &want);
                s.spawn(move || {
                    for i in 0..32u64 {
                        let at = ((t * 32 + i) * 65536) % SIZE;
                        let got = c.read_at(at, vec![0; 65536]).unwrap();
                        assert!(got == want[at as usize..at as usize + 65536]);
                    }
                });
            }
        });

        let e = Client::connect(&sock, &opts("nope", "b0")).err().unwrap();
        assert!(
            matches!(e, Error::Refused { .. } | Error::NoMetaContext { .. }),
            "{e}"
        );
        let e = Client::connect(&sock, &opts("disk", "other"))
            .err()
            .unwrap();
        assert!(matches!(e, Error::NoMetaContext { .. }), "{e}");
        assert!(e.to_string().contains("qemu:dirty-bitmap:other"), "{e}");
    }

    #[test]
    fn qemu_builtin_server_export_with_bitmap() {
        if !testing::require_qemu() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, want) = image(dir.path());
        let qmp = dir.path().join("qmp.sock");
        let _vm = testing::qemu_none(&qmp, &testing::blockdev_args(&img, "qcow2", "disk0"));
        let mut q = Qmp::connect(&qmp).unwrap();
        let sock = dir.path().join("nbd.sock");
        q.nbd_server_start(&sock).unwrap();
        // A read-only export takes only disabled bitmaps.
        q.transaction(&[crate::qmp::Action::BlockDirtyBitmapDisable {
            node: "disk0".into(),
            name: "b0".into(),
        }])
        .unwrap();
        q.block_export_add("e0", "disk0", "disk0", &["b0".into()])
            .unwrap();
        let c = Client::connect(&sock, &opts("disk0", "b0")).unwrap();
        check_export(&c, &want, "b0");
        // Reads taking turns over three connections (QEMU allows several
        // on a read-only export).
        let many = Client::connect_many(&sock, &opts("disk0", "b0"), 3).unwrap();
        assert_ne!(many.flags() & proto::TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(many.conns.len(), 3);
        check_export(&many, &want, "b0");
        drop(many);
        // The server going away fails pending and later requests cleanly.
        q.block_export_del("e0", true).unwrap();
        q.nbd_server_stop().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match c.read_at(0, vec![0; 4096]) {
                Err(Error::Dead(_)) | Err(Error::Request { .. }) | Err(Error::Io { .. }) => break,
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => assert!(std::time::Instant::now() < deadline, "export still served"),
            }
        }
    }

    #[test]
    fn non_nbd_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("x.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
        });
        let e = Client::connect(&sock, &Options::default()).err().unwrap();
        assert!(matches!(e, Error::Proto { .. }), "{e}");
        assert!(error_chain(&e).contains("Bad magic"), "{}", error_chain(&e));
        t.join().unwrap();
        let e = Client::connect(&dir.path().join("none"), &Options::default())
            .err()
            .unwrap();
        assert!(matches!(e, Error::Connect { .. }), "{e}");
    }

    /// A server that negotiates correctly (1 MiB export), then answers the
    /// first request with `reply(request) -> bytes`.
    /// Builds a reply to a raw request.
    type Reply = fn(&[u8; 28]) -> Vec<u8>;

    fn hostile(sock: &Path, reply: Reply) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut g = proto::INIT_MAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
            g.extend_from_slice(
                &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
            );
            s.write_all(&g).unwrap();
            let mut cflags = [0u8; 4];
            s.read_exact(&mut cflags).unwrap();
            let rep = |s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]| {
                let mut b = proto::REP_MAGIC.to_be_bytes().to_vec();
                b.extend_from_slice(&opt.to_be_bytes());
                b.extend_from_slice(&kind.to_be_bytes());
                b.extend_from_slice(&(data.len() as u32).to_be_bytes());
                b.extend_from_slice(data);
                s.write_all(&b).unwrap();
            };
            loop {
                let mut h = [0u8; 16];
                s.read_exact(&mut h).unwrap();
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).unwrap();
                if opt == proto::OPT_GO {
                    let mut info = vec![0, 0];
                    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    info.extend_from_slice(
                        &(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes(),
                    );
                    rep(&mut s, opt, proto::REP_INFO, &info);
                    rep(&mut s, opt, proto::REP_ACK, &[]);
                    break;
                }
                rep(&mut s, opt, proto::REP_ACK, &[]);
            }
            let mut req = [0u8; 28];
            s.read_exact(&mut req).unwrap();
            let _ = s.write_all(&reply(&req));
            // Keep the connection open until the client hangs up.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        })
    }

    fn chunk(req: &[u8; 28], flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&req[8..16]);
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn a_second_reply_to_an_answered_request_kills_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("evil.sock");
        let t = hostile(&sock, |r| {
            let mut p = 0u64.to_be_bytes().to_vec();
            p.extend_from_slice(&[7; 4096]);
            let mut b = chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, &p);
            b.extend(chunk(
                r,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                &[],
            ));
            b
        });
        let c = Client::connect(&sock, &Options::default()).unwrap();
        // A batch of two: the first is answered twice while the batch
        // still waits for the second (which the server never answers).
        let e = c
            .submit_reads(vec![(0, vec![0; 4096]), (4096, vec![0; 4096])])
            .unwrap()
            .wait_reads()
            .unwrap_err();
        assert!(matches!(e, Error::Dead(_)), "{e}");
        assert!(e.to_string().contains("already answered"), "{e}");
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn hostile_replies_fail_the_request_never_panic() {
        let cases: [(&str, Reply); 5] = [
            ("data outside the request", |r| {
                let mut p = (1u64 << 19).to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 16]);
                chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, &p)
            }),
            ("unknown cookie", |r| {
                let mut r2 = *r;
                r2[15] ^= 0xff;
                chunk(&r2, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[])
            }),
            ("short read", |r| {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 100]);
                chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, &p)
            }),
            ("server error", |r| {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&4u16.to_be_bytes());
                p.extend_from_slice(b"boom");
                chunk(r, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, &p)
            }),
            ("garbage", |_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        ];
        for (what, reply) in cases {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("evil.sock");
            let t = hostile(&sock, reply);
            let c = Client::connect(&sock, &Options::default()).unwrap();
            assert_eq!(c.size(), 1 << 20);
            let e = c.read_at(0, vec![0; 4096]).err();
            let e = e.unwrap_or_else(|| panic!("{what}: accepted"));
            let msg = error_chain(&e);
            if what == "server error" {
                assert!(msg.contains("EIO") && msg.contains("boom"), "{what}: {msg}");
                // A server error fails the request, not the connection.
                assert!(!matches!(e, Error::Dead(_)), "{what}: {msg}");
            }
            drop(c);
            t.join().unwrap();
        }
    }
}
