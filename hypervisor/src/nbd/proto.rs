//! NBD wire format: constants, encoders and pure parsers (no I/O), so the
//! parsers can be fuzzed (`fuzz/fuzz_targets/nbd_reply.rs`).
//!
//! Everything follows the NBD protocol specification
//! (`doc/proto.md` of NetworkBlockDevice/nbd): big-endian integers, the
//! fixed newstyle handshake, option haggling with `NBD_OPT_GO`, and
//! structured replies in the transmission phase.
//!
//! Do not modify the numbers below: they are the protocol.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation; also prefixes every client option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// The server takes `NBD_CMD_FLAG_DF` on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;

/// `NBD_OPT_GO` information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flag: `NBD_CMD_FLAG_DF` (a read's data in one chunk, holes
/// not looked for).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: `NBD_CMD_FLAG_REQ_ONE` (one extent per context).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: the last chunk of this request.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply types.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Size of a request on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Size of an option reply header.
pub const OPTION_REPLY_LEN: usize = 20;
/// Longest option reply or structured chunk payload we accept (other than
/// read data, which is bounded by the request).
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// A protocol violation or a server error, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Bad magic {found:#x} in {what} (expected {expected:#x})")]
    Magic {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("Truncated {what}: {len} bytes")]
    Short { what: &'static str, len: usize },
    #[error("Invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("Server error {} ({}){}", .code, errno_name(*.code), if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server { code: u32, message: String },
}

/// Name of an NBD error value (they are Linux errno values).
pub fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Name of an option reply error type.
pub fn rep_err_name(t: u32) -> &'static str {
    match t & !REP_ERR_BIT {
        1 => "unsupported option",
        2 => "forbidden by policy",
        3 => "invalid option data",
        4 => "unsupported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size required",
        9 => "request too big",
        _ => "unknown error",
    }
}

fn invalid(what: &'static str, why: impl Into<String>) -> ProtoError {
    ProtoError::Invalid {
        what,
        why: why.into(),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn need(what: &'static str, b: &[u8], len: usize) -> Result<(), ProtoError> {
    if b.len() < len {
        Err(ProtoError::Short { what, len: b.len() })
    } else {
        Ok(())
    }
}

/// Parse the server's first 18 bytes; returns its handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, ProtoError> {
    need("greeting", b, 18)?;
    let m = be64(b, 0);
    if m != INIT_MAGIC {
        return Err(ProtoError::Magic {
            what: "greeting",
            found: m,
            expected: INIT_MAGIC,
        });
    }
    let m = be64(b, 8);
    if m != OPTS_MAGIC {
        return Err(invalid(
            "greeting",
            "not a newstyle server (oldstyle negotiation is not supported)",
        ));
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid("greeting", "server lacks fixed newstyle"));
    }
    Ok(flags)
}

/// Encode an option: magic, option, length, data.
pub fn encode_option(opt: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of `NBD_OPT_GO`: the export name and the information we request.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Data of `NBD_OPT_SET_META_CONTEXT`.
pub fn meta_context_data(export: &str, queries: &[String]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReply {
    /// Whether the reply type is an error.
    pub fn is_error(&self) -> bool {
        self.reply & REP_ERR_BIT != 0
    }
}

/// Parse an option reply header, checking it answers `option`.
pub fn parse_option_reply(b: &[u8], option: u32) -> Result<OptionReply, ProtoError> {
    need("option reply", b, OPTION_REPLY_LEN)?;
    let m = be64(b, 0);
    if m != REP_MAGIC {
        return Err(ProtoError::Magic {
            what: "option reply",
            found: m,
            expected: REP_MAGIC,
        });
    }
    let r = OptionReply {
        option: be32(b, 8),
        reply: be32(b, 12),
        len: be32(b, 16),
    };
    if r.option != option {
        return Err(invalid(
            "option reply",
            format!("answers option {} instead of {option}", r.option),
        ));
    }
    if r.len > MAX_PAYLOAD {
        return Err(invalid("option reply", format!("length {}", r.len)));
    }
    Ok(r)
}

/// What `NBD_OPT_GO` told us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) block sizes, if sent.
    pub block_size: Option<(u32, u32, u32)>,
}

/// Apply one `NBD_REP_INFO` payload to `info`; returns whether it was
/// `NBD_INFO_EXPORT`. Unknown information types are ignored, as the spec
/// requires.
pub fn parse_info(payload: &[u8], info: &mut ExportInfo) -> Result<bool, ProtoError> {
    need("NBD_REP_INFO", payload, 2)?;
    match be16(payload, 0) {
        INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(invalid(
                    "NBD_INFO_EXPORT",
                    format!("length {}", payload.len()),
                ));
            }
            info.size = be64(payload, 2);
            info.flags = be16(payload, 10);
            Ok(true)
        }
        INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(invalid(
                    "NBD_INFO_BLOCK_SIZE",
                    format!("length {}", payload.len()),
                ));
            }
            let (min, pref, max) = (be32(payload, 2), be32(payload, 6), be32(payload, 10));
            if !min.is_power_of_two() || min > 65536 || pref < min || max < pref {
                return Err(invalid(
                    "NBD_INFO_BLOCK_SIZE",
                    format!("minimum {min}, preferred {pref}, maximum {max}"),
                ));
            }
            info.block_size = Some((min, pref, max));
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Parse an `NBD_REP_META_CONTEXT` payload: (context id, name).
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, String), ProtoError> {
    need("NBD_REP_META_CONTEXT", payload, 4)?;
    let name = std::str::from_utf8(&payload[4..])
        .map_err(|_| invalid("NBD_REP_META_CONTEXT", "name is not UTF-8"))?;
    Ok((be32(payload, 0), name.to_owned()))
}

/// The human message of an option error reply payload.
pub fn option_error_message(r: &OptionReply, payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    if text.is_empty() {
        rep_err_name(r.reply).to_owned()
    } else {
        format!("{}: {text}", rep_err_name(r.reply))
    }
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The header of a reply: simple, or one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes, no payload except read data on success).
    Simple { error: u32, cookie: u64 },
    /// A structured chunk header; `len` payload bytes follow.
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    /// How many header bytes a reply starting with `magic` (the first 4
    /// bytes) has.
    pub fn header_len(first4: &[u8]) -> Result<usize, ProtoError> {
        need("reply magic", first4, 4)?;
        match be32(first4, 0) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN),
            m => Err(ProtoError::Magic {
                what: "reply",
                found: m as u64,
                expected: STRUCTURED_REPLY_MAGIC as u64,
            }),
        }
    }

    /// Parse a complete header (16 or 20 bytes, see [`Self::header_len`]).
    pub fn parse(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
        let len = Self::header_len(b)?;
        need("reply header", b, len)?;
        if len == SIMPLE_REPLY_LEN {
            return Ok(ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            });
        }
        Ok(ReplyHeader::Structured {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            len: be32(b, 16),
        })
    }

    /// The request this reply answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        }
    }
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A parsed structured reply chunk, checked against its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE` (only valid with the DONE flag).
    None,
    /// `OFFSET_DATA`: `data` belongs at `offset` (absolute).
    Data { offset: u64, data: &'a [u8] },
    /// `OFFSET_HOLE`: `len` zero bytes at `offset`.
    Hole { offset: u64, len: u32 },
    /// `BLOCK_STATUS` for one meta context.
    Status { context: u32, extents: Vec<Extent> },
    /// An error for the whole request or at an offset.
    Error {
        code: u32,
        message: String,
        offset: Option<u64>,
    },
}

/// How many bytes of an `OFFSET_DATA` payload precede the data.
pub const OFFSET_DATA_HEADER: usize = 8;

/// Check an `OFFSET_DATA` chunk's position before reading its data:
/// `offset` (its first 8 payload bytes) and `data_len` must fall inside the
/// request `[req_offset, req_offset + req_len)`. Returns the position of the
/// data relative to the request.
pub fn check_data_range(
    offset: u64,
    data_len: u64,
    req_offset: u64,
    req_len: u32,
) -> Result<usize, ProtoError> {
    let end = offset.checked_add(data_len);
    let req_end = req_offset + req_len as u64;
    match end {
        Some(end) if offset >= req_offset && end <= req_end && data_len > 0 => {
            Ok((offset - req_offset) as usize)
        }
        _ => Err(invalid(
            "read reply",
            format!(
                "{data_len} bytes at offset {offset} outside the request ({req_len} bytes at {req_offset})"
            ),
        )),
    }
}

/// Parse a structured chunk of `kind` with `payload`, answering a request
/// of `req_kind` for `[req_offset, req_offset + req_len)`.
pub fn parse_chunk<'a>(
    flags: u16,
    kind: u16,
    payload: &'a [u8],
    req_kind: u16,
    req_offset: u64,
    req_len: u32,
) -> Result<Chunk<'a>, ProtoError> {
    match kind {
        REPLY_TYPE_NONE => {
            if flags & REPLY_FLAG_DONE == 0 || !payload.is_empty() {
                return Err(invalid(
                    "NBD_REPLY_TYPE_NONE",
                    "without DONE or with payload",
                ));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA if req_kind == CMD_READ => {
            need("OFFSET_DATA", payload, OFFSET_DATA_HEADER + 1)?;
            let offset = be64(payload, 0);
            let data = &payload[OFFSET_DATA_HEADER..];
            check_data_range(offset, data.len() as u64, req_offset, req_len)?;
            Ok(Chunk::Data { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE if req_kind == CMD_READ => {
            if payload.len() != 12 {
                return Err(ProtoError::Short {
                    what: "OFFSET_HOLE",
                    len: payload.len(),
                });
            }
            let offset = be64(payload, 0);
            let len = be32(payload, 8);
            check_data_range(offset, len as u64, req_offset, req_len)?;
            Ok(Chunk::Hole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS if req_kind == CMD_BLOCK_STATUS => {
            if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
                return Err(invalid(
                    "BLOCK_STATUS",
                    format!("payload of {} bytes", payload.len()),
                ));
            }
            let context = be32(payload, 0);
            let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
            for d in payload[4..].chunks_exact(8) {
                let e = Extent {
                    len: be32(d, 0),
                    flags: be32(d, 4),
                };
                if e.len == 0 {
                    return Err(invalid("BLOCK_STATUS", "zero-length extent"));
                }
                extents.push(e);
            }
            Ok(Chunk::Status { context, extents })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            need("error chunk", payload, 6)?;
            let code = be32(payload, 0);
            let mlen = be16(payload, 4) as usize;
            let extra = if kind == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            if payload.len() != 6 + mlen + extra {
                return Err(invalid(
                    "error chunk",
                    format!("message length {mlen} in {} bytes", payload.len()),
                ));
            }
            if code == 0 {
                return Err(invalid("error chunk", "error value 0"));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + mlen]).into_owned();
            let offset = if extra > 0 {
                let o = be64(payload, 6 + mlen);
                if o < req_offset || o >= req_offset + req_len as u64 {
                    return Err(invalid(
                        "error chunk",
                        format!("offset {o} outside the request"),
                    ));
                }
                Some(o)
            } else {
                None
            };
            Ok(Chunk::Error {
                code,
                message,
                offset,
            })
        }
        k => Err(invalid(
            "structured reply",
            format!("chunk type {k} for command {req_kind}"),
        )),
    }
}

/// Walks block status extents as absolute `(offset, len, flags)` ranges,
/// clipped to `[start, end)`.
pub fn extent_ranges(
    start: u64,
    end: u64,
    extents: &[Extent],
) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
    let mut at = start;
    extents.iter().filter_map(move |e| {
        if at >= end {
            return None;
        }
        let len = (e.len as u64).min(end - at);
        let r = (at, len, e.flags);
        at += len;
        Some(r)
    })
}

/// Flattened meta context name, e.g. for error messages.
pub struct Contexts<'a>(pub &'a [(u32, String)]);

impl fmt::Display for Contexts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (id, name)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name} (id {id})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn greeting_and_option_reply() {
        let mut g = Vec::new();
        g.extend_from_slice(&INIT_MAGIC.to_be_bytes());
        g.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        g[17] = 0;
        assert!(parse_greeting(&g).is_err());
        assert!(matches!(
            parse_greeting(b"SSH-2.0-OpenSSH_9.2 hello"),
            Err(ProtoError::Magic { .. })
        ));
        assert!(matches!(
            parse_greeting(b"short"),
            Err(ProtoError::Short { .. })
        ));

        let mut r = Vec::new();
        r.extend_from_slice(&REP_MAGIC.to_be_bytes());
        r.extend_from_slice(&OPT_GO.to_be_bytes());
        r.extend_from_slice(&(REP_ERR_BIT | 6).to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        let h = parse_option_reply(&r, OPT_GO).unwrap();
        assert!(h.is_error());
        assert_eq!(option_error_message(&h, b""), "unknown export");
        assert!(parse_option_reply(&r, OPT_SET_META_CONTEXT).is_err());
    }

    #[test]
    fn info_and_meta_context() {
        let mut p = vec![0, 0];
        p.extend_from_slice(&(1u64 << 30).to_be_bytes());
        p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        let mut info = ExportInfo::default();
        assert_eq!(parse_info(&p, &mut info), Ok(true));
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.flags, 3);
        let mut bs = vec![0, 3];
        for v in [1u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(parse_info(&bs, &mut info), Ok(false));
        assert_eq!(info.block_size, Some((1, 4096, 32 << 20)));
        bs[5] = 3; // minimum 3: not a power of two
        assert!(parse_info(&bs, &mut info).is_err());
        assert!(parse_info(&p[..5], &mut info).is_err());

        let mut m = 7u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"base:allocation");
        assert_eq!(parse_meta_context(&m), Ok((7, "base:allocation".into())));
        assert!(parse_meta_context(&m[..3]).is_err());
    }

    #[test]
    fn request_encoding() {
        let r = Request {
            flags: CMD_FLAG_REQ_ONE,
            kind: CMD_BLOCK_STATUS,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 65536,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 8, 0, 7]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &65536u32.to_be_bytes());
    }

    #[test]
    fn structured_chunks() {
        let b = structured(0, REPLY_TYPE_OFFSET_DATA, 9, &[0; 12]);
        assert_eq!(ReplyHeader::header_len(&b), Ok(20));
        assert_eq!(
            ReplyHeader::parse(&b),
            Ok(ReplyHeader::Structured {
                flags: 0,
                kind: 1,
                cookie: 9,
                len: 12
            })
        );
        // Data inside the request.
        let mut p = 1000u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[7; 24]);
        assert_eq!(
            parse_chunk(0, REPLY_TYPE_OFFSET_DATA, &p, CMD_READ, 1000, 24),
            Ok(Chunk::Data {
                offset: 1000,
                data: &[7; 24]
            })
        );
        // One byte past the end, before the start, or for the wrong command.
        assert!(parse_chunk(0, REPLY_TYPE_OFFSET_DATA, &p, CMD_READ, 1000, 23).is_err());
        assert!(parse_chunk(0, REPLY_TYPE_OFFSET_DATA, &p, CMD_READ, 1001, 100).is_err());
        assert!(parse_chunk(0, REPLY_TYPE_OFFSET_DATA, &p, CMD_BLOCK_STATUS, 1000, 24).is_err());
        // Offset overflow.
        let mut p = u64::MAX.to_be_bytes().to_vec();
        p.extend_from_slice(&[7; 2]);
        assert!(parse_chunk(0, REPLY_TYPE_OFFSET_DATA, &p, CMD_READ, 0, u32::MAX).is_err());

        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_chunk(0, REPLY_TYPE_OFFSET_HOLE, &h, CMD_READ, 0, 8192),
            Ok(Chunk::Hole {
                offset: 4096,
                len: 512
            })
        );
        assert!(parse_chunk(0, REPLY_TYPE_OFFSET_HOLE, &h, CMD_READ, 0, 4097).is_err());

        let mut s = 2u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 0u32), (8192, 3)] {
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(&flags.to_be_bytes());
        }
        let c = parse_chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            &s,
            CMD_BLOCK_STATUS,
            0,
            1 << 20,
        )
        .unwrap();
        let Chunk::Status { context, extents } = c else {
            panic!("{c:?}")
        };
        assert_eq!(context, 2);
        let r: Vec<_> = extent_ranges(100, 10_000, &extents).collect();
        assert_eq!(r, [(100, 4096, 0), (4196, 5804, 3)]);
        assert!(parse_chunk(0, REPLY_TYPE_BLOCK_STATUS, &s[..10], CMD_BLOCK_STATUS, 0, 1).is_err());

        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&4u16.to_be_bytes());
        e.extend_from_slice(b"oops");
        e.extend_from_slice(&10u64.to_be_bytes());
        assert_eq!(
            parse_chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR_OFFSET,
                &e,
                CMD_READ,
                0,
                100
            ),
            Ok(Chunk::Error {
                code: 5,
                message: "oops".into(),
                offset: Some(10)
            })
        );
        assert!(parse_chunk(0, REPLY_TYPE_ERROR, &e, CMD_READ, 0, 100).is_err());
        assert!(parse_chunk(0, REPLY_TYPE_NONE, &[], CMD_READ, 0, 1).is_err());
        assert!(parse_chunk(0, 77, &[], CMD_READ, 0, 1).is_err());
        let err = ProtoError::Server {
            code: 5,
            message: "oops".into(),
        };
        assert_eq!(err.to_string(), "Server error 5 (EIO): oops");
        assert!(ReplyHeader::parse(b"HTTP/1.1 200").is_err());
    }
}
