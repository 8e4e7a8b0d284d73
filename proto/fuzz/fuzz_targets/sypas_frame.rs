// SPDX-License-Identifier: Apache-2.0
//! Fuzzes the frame decoders on arbitrary bytes in arbitrary chunks. Beyond
//! "never panics" it checks that the two decoders agree and that every frame
//! they return re-encodes to exactly the bytes it was decoded from.
#![no_main]

use cell0_proto::bytes::BytesMut;
use cell0_proto::frame::truncated_at_eof;
use cell0_proto::{Decoded, FrameDecoder, decode_slice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let max = 4096;

    // Stateless walk.
    let mut rest = bytes;
    let mut walked = Vec::new();
    let slice_end = loop {
        match decode_slice(rest, max) {
            Ok(Decoded::Frame { header, payload, consumed }) => {
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

    // Incremental, in chunks.
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
        frame.encode(&mut again).expect("a decoded frame re-encodes");
        assert_eq!(&again, raw);
    }
});
