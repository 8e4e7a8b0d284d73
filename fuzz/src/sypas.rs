// SPDX-License-Identifier: Apache-2.0
//! Targets `sypas_frame`, `sypas_message` and `shm_ref`: the SYPAS codec a
//! guest or client reaches first, and the shared-memory reference check the
//! router applies to every CALL and REPLY.
//!
//! `sypas_frame` and `sypas_message` took over the proto crate's first
//! cargo-fuzz project, so that one corpus replay covers every target.

use arbitrary::Unstructured;
use cell0_proto::bytes::{Bytes, BytesMut};
use cell0_proto::frame::truncated_at_eof;
use cell0_proto::msg::{Call, Reply, ShmRef};
use cell0_proto::prost::Message;
use cell0_proto::{Body, Decoded, FrameDecoder, Kind, decode_slice};

/// Arbitrary bytes in arbitrary chunks through both frame decoders: they agree
/// on the frames and the final error, and each frame re-encodes to exactly the
/// bytes it was decoded from.
pub fn frame(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let max = 4096;

    let mut rest = bytes;
    let mut walked = Vec::new();
    let slice_end = loop {
        match decode_slice(rest, max) {
            Ok(Decoded::Frame {
                header,
                payload,
                consumed,
            }) => {
                assert_eq!(consumed, header.frame_len());
                assert_eq!(payload.len(), header.payload_len as usize);
                assert_eq!(&header.to_bytes()[..], &rest[..24]);
                walked.push(rest[..consumed].to_vec());
                rest = &rest[consumed..];
            }
            Ok(Decoded::NeedMore { needed }) => {
                assert!(needed > 0);
                break truncated_at_eof(rest, max).err().map(|e| e.code());
            }
            Err(e) => break Some(e.code()),
        }
    };

    let mut dec = FrameDecoder::with_max_payload(max);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut end = None;
    'feed: for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    end = Some(e.code());
                    break 'feed;
                }
            }
        }
    }
    if end.is_none() {
        match dec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {}
            Err(e) => end = Some(e.code()),
        }
    }

    assert_eq!(end, slice_end);
    assert_eq!(frames.len(), walked.len());
    for (frame, raw) in frames.iter().zip(&walked) {
        let mut again = Vec::new();
        frame
            .encode(&mut again)
            .expect("a decoded frame re-encodes");
        assert_eq!(&again, raw);
    }
}

/// Every message kind: whatever decodes re-encodes and decodes to the same
/// message; refs in a CALL obey the window check.
pub fn message(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let Some(kind) = Kind::from_u8(k % 13) else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    if let Ok(body) = Body::decode(kind, payload.clone()) {
        assert_eq!(body.kind(), kind);
        let again = Body::decode(kind, Bytes::from(body.encode_to_vec())).expect("re-decodes");
        assert_eq!(again, body);
    }
    if let Ok(call) = Call::decode(payload) {
        let window = rest.len() as u64 * 4096;
        for r in &call.shm {
            check_ref(r, window);
            check_ref(r, u64::MAX);
            check_ref(r, 0);
        }
    }
}

/// `ShmRef::range_in` is the whole bounds check: it returns a range exactly
/// when the ref lies inside the window, without overflow.
pub fn check_ref(r: &ShmRef, window: u64) {
    match r.range_in(window) {
        Some(range) => {
            assert_eq!(range.start, r.offset);
            assert_eq!(range.end - range.start, r.length);
            assert!(range.end <= window);
        }
        None => assert!(
            r.offset
                .checked_add(r.length)
                .is_none_or(|end| end > window)
        ),
    }
}

/// Shm refs from CALLs and REPLYs (protobuf) and from raw integers, against
/// windows of interesting sizes (the VMM's are whole MiB).
pub fn shm_ref(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let windows = [0u64, 1, 4096, 1 << 20, 64 << 30, u64::MAX - 1, u64::MAX];
    let mut refs = Vec::new();
    if let Ok(n) = u.int_in_range(0usize..=8) {
        for _ in 0..n {
            let offset = u.arbitrary().unwrap_or(0);
            let length = u.arbitrary().unwrap_or(0);
            refs.push(ShmRef { offset, length });
        }
    }
    let rest = u.take_rest();
    if let Ok(c) = Call::decode(rest) {
        refs.extend(c.shm);
    }
    if let Ok(r) = Reply::decode(rest) {
        refs.extend(r.shm);
    }
    for r in &refs {
        for w in windows {
            check_ref(r, w);
            check_ref(r, w.wrapping_add(r.offset));
        }
    }
}
