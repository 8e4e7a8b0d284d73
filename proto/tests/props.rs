// SPDX-License-Identifier: Apache-2.0
//! Property tests for the no_std core: no input panics the decoders, encode
//! and decode round-trip in any chunking, and the two decoders agree.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use cell0_proto::frame::truncated_at_eof;
use cell0_proto::msg::{Call, Hello, Reply, ShmRef, Welcome};
use cell0_proto::{
    Body, Decoded, Frame, FrameDecoder, FrameError, HEADER_LEN, Kind, MAGIC, decode_slice,
};
use proptest::prelude::*;

fn any_kind() -> impl Strategy<Value = Kind> {
    proptest::sample::select(Kind::ALL.to_vec())
}

prop_compose! {
    fn any_frame()(
        kind in any_kind(),
        flags in any::<u16>(),
        channel in any::<u32>(),
        request_id in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) -> Frame {
        Frame { kind, flags, channel, request_id, payload: Bytes::from(payload) }
    }
}

/// Bytes that start like a frame often, so the deeper checks get exercised.
fn framey_bytes() -> impl Strategy<Value = Vec<u8>> {
    let raw = proptest::collection::vec(any::<u8>(), 0..512);
    prop_oneof![
        raw.clone(),
        (raw, any::<u8>(), any::<u8>(), 0u32..600).prop_map(|(tail, v, k, len)| {
            let mut b = MAGIC.to_vec();
            b.push(v % 3);
            b.push(k % 16);
            b.extend_from_slice(&[0; 14]);
            b.extend_from_slice(&len.to_le_bytes());
            b.extend(tail);
            b
        }),
    ]
}

/// Feeds `bytes` to a `FrameDecoder` in chunks of the given sizes; returns the
/// frames and the final error, as a reader would see them (EOF at the end).
fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> (Vec<Frame>, Option<FrameError>) {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().cycle();
    loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        if rest.is_empty() {
            break;
        }
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    match dec.decode_eof(&mut buf) {
        Ok(Some(f)) => {
            frames.push(f);
            (frames, None)
        }
        Ok(None) => (frames, None),
        Err(e) => (frames, Some(e)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in framey_bytes(), chunks in proptest::collection::vec(1usize..64, 1..8)) {
        let _ = decode_slice(&bytes, 1024);
        let _ = truncated_at_eof(&bytes, 1024);
        let (frames, _) = decode_chunked(&bytes, &chunks);
        for f in frames {
            let _ = Body::from_frame(&f);
        }
        for kind in Kind::ALL {
            let _ = Body::decode(kind, Bytes::from(bytes.clone()));
        }
    }

    #[test]
    fn frames_round_trip_in_any_chunking(frames in proptest::collection::vec(any_frame(), 0..6), chunks in proptest::collection::vec(1usize..300, 1..8)) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        prop_assert_eq!(wire.len(), frames.iter().map(Frame::encoded_len).sum::<usize>());
        let (decoded, err) = decode_chunked(&wire, &chunks);
        prop_assert_eq!(err, None);
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn a_cut_stream_yields_the_whole_frames_then_truncated(frames in proptest::collection::vec(any_frame(), 1..4), cut in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire).unwrap();
        }
        let cut = cut.index(wire.len());
        let (decoded, err) = decode_chunked(&wire[..cut], &[7]);
        let mut boundary = 0;
        let mut whole = 0;
        for f in &frames {
            if boundary + f.encoded_len() > cut {
                break;
            }
            boundary += f.encoded_len();
            whole += 1;
        }
        prop_assert_eq!(&decoded[..], &frames[..whole]);
        if boundary == cut {
            prop_assert_eq!(err, None);
        } else {
            let truncated = matches!(err, Some(FrameError::Truncated { .. }));
            prop_assert!(truncated);
        }
    }

    #[test]
    fn slice_and_chunked_decoders_agree(bytes in framey_bytes()) {
        let (frames, err) = decode_chunked(&bytes, &[1]);
        // Walk the same bytes with the stateless decoder.
        let mut rest = &bytes[..];
        let mut walked = Vec::new();
        let slice_err = loop {
            match decode_slice(rest, cell0_proto::MAX_PAYLOAD) {
                Ok(Decoded::Frame { header, payload, consumed }) => {
                    prop_assert_eq!(consumed, HEADER_LEN + payload.len());
                    walked.push((header.kind, header.request_id, payload.to_vec()));
                    rest = &rest[consumed..];
                }
                Ok(Decoded::NeedMore { needed }) => {
                    prop_assert!(needed > 0);
                    break truncated_at_eof(rest, cell0_proto::MAX_PAYLOAD).err();
                }
                Err(e) => break Some(e),
            }
        };
        let chunked: Vec<_> = frames.iter().map(|f| (f.kind, f.request_id, f.payload.to_vec())).collect();
        prop_assert_eq!(walked, chunked);
        prop_assert_eq!(slice_err.map(|e| e.code()), err.map(|e| e.code()));
    }

    #[test]
    fn messages_round_trip(
        service in ".{0,40}",
        method in "[a-z/*]{0,20}",
        payload in proptest::collection::vec(any::<u8>(), 0..1024),
        refs in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4),
        versions in proptest::collection::vec(any::<u32>(), 0..4),
        id in any::<u64>(),
    ) {
        let shm: Vec<ShmRef> = refs.iter().map(|&(offset, length)| ShmRef { offset, length }).collect();
        let bodies = [
            Body::Call(Call { service: service.clone(), method: method.clone(), payload: payload.clone().into(), shm: shm.clone() }),
            Body::Reply(Reply { payload: payload.clone().into(), shm }),
            Body::Hello(Hello { versions, agent_id: service.clone(), token: payload.into() }),
            Body::Welcome(Welcome { session_id: id, rights: vec![cell0_proto::msg::Right::new(service, method)], token_expiry: id / 2, version: 1 }),
        ];
        for body in bodies {
            let frame = body.to_frame(id);
            let wire = frame.to_vec().unwrap();
            let (decoded, err) = decode_chunked(&wire, &[13]);
            prop_assert_eq!(err, None);
            prop_assert_eq!(decoded.len(), 1);
            prop_assert_eq!(Body::from_frame(&decoded[0]).unwrap(), body);
        }
    }
}
