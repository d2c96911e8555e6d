//! Fuzzes the NBD client's parsers of untrusted server input
//! (`hypervisor::nbd::proto`): the greeting, option replies
//! (`NBD_REP_INFO`, `NBD_REP_META_CONTEXT`) and structured reply chunks.
//!
//! Input: a selector byte (bit 0: the request is a block status, else a
//! read), the request's offset (u64) and length (u32), then a stream of
//! reply chunks exactly as they arrive on the socket (header, payload).
//! The same bytes are also fed to the handshake parsers.
//!
//! Checked: nothing panics; every accepted data or hole chunk lies inside
//! its request; block status extents are non-empty and, walked from the
//! request's offset, never leave the requested range.

#![no_main]

use hypervisor::nbd::proto::{self, Chunk, ExportInfo, ReplyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_greeting(data);
    if let Ok(r) = proto::parse_option_reply(data, proto::OPT_GO) {
        let payload = &data[proto::OPTION_REPLY_LEN..];
        let mut info = ExportInfo::default();
        let _ = proto::parse_info(payload, &mut info);
        let _ = proto::parse_meta_context(payload);
        let _ = proto::option_error_message(&r, payload);
    }

    if data.len() < 13 {
        return;
    }
    let kind = if data[0] & 1 == 1 {
        proto::CMD_BLOCK_STATUS
    } else {
        proto::CMD_READ
    };
    let req_offset = u64::from_be_bytes(data[1..9].try_into().unwrap()) >> 8;
    let req_len = u32::from_be_bytes(data[9..13].try_into().unwrap()).max(1);
    let req_end = req_offset + req_len as u64;
    let mut rest = &data[13..];
    while rest.len() >= 4 {
        let Ok(n) = ReplyHeader::header_len(rest) else {
            return;
        };
        let Ok(h) = ReplyHeader::parse(rest) else {
            return;
        };
        rest = &rest[n..];
        let ReplyHeader::Structured {
            flags,
            kind: ck,
            len,
            ..
        } = h
        else {
            continue;
        };
        let len = (len as usize).min(rest.len());
        let payload = &rest[..len];
        rest = &rest[len..];
        match proto::parse_chunk(flags, ck, payload, kind, req_offset, req_len) {
            Ok(Chunk::Data { offset, data }) => {
                assert!(offset >= req_offset && offset + data.len() as u64 <= req_end);
                assert_eq!(kind, proto::CMD_READ);
            }
            Ok(Chunk::Hole { offset, len }) => {
                assert!(offset >= req_offset && offset + len as u64 <= req_end);
            }
            Ok(Chunk::Status { extents, .. }) => {
                assert!(extents.iter().all(|e| e.len > 0));
                let mut at = req_offset;
                for (o, l, _) in proto::extent_ranges(req_offset, req_end, &extents) {
                    assert_eq!(o, at);
                    assert!(l > 0 && o + l <= req_end);
                    at = o + l;
                }
            }
            Ok(Chunk::Error { code, offset, .. }) => {
                assert_ne!(code, 0);
                if let Some(o) = offset {
                    assert!(o >= req_offset && o < req_end);
                }
            }
            Ok(Chunk::None) => assert_ne!(flags & proto::REPLY_FLAG_DONE, 0),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
