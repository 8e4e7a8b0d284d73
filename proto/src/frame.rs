// SPDX-License-Identifier: Apache-2.0
//! The SYPAS v1 frame: a fixed 24-byte little-endian header, then the payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "SYP1"
//!      4     1  version (1)
//!      5     1  kind
//!      6     2  flags (u16 LE, none defined in v1: send 0, ignore on receipt)
//!      8     4  channel (u32 LE)
//!     12     8  request id (u64 LE)
//!     20     4  payload length (u32 LE, at most 16 MiB)
//!     24     …  payload (a protobuf message of the kind, see `msg`)
//! ```
//!
//! Two decoders share the same checks: [`decode_slice`] is stateless and
//! allocation-free (the nano guest runs it over its receive buffer), and
//! [`FrameDecoder`] pulls frames out of a `BytesMut` that a reader fills. Both
//! reject a bad prefix as soon as the offending byte arrives, and neither
//! panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::code::ErrorCode;

/// The four magic bytes that start every frame.
pub const MAGIC: [u8; 4] = *b"SYP1";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;
/// The largest payload a frame may carry (16 MiB).
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// Frame kinds, with their stable wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// Client → server: versions, agent id, capability token.
    Hello = 1,
    /// Server → client: answer to HELLO or REFRESH (session id, rights, expiry).
    Welcome = 2,
    /// A request for (service, method); answered by REPLY or ERROR.
    Call = 3,
    /// The successful answer to a CALL (or an ack of SUBSCRIBE/UNSUBSCRIBE/EVENT).
    Reply = 4,
    /// A typed error; request id 0 means it concerns the connection.
    Error = 5,
    /// Publish (client → router) or delivery (router → subscriber) on a topic.
    Event = 6,
    /// Liveness probe; answered by PONG echoing the payload.
    Ping = 7,
    /// Answer to PING.
    Pong = 8,
    /// A new capability token for the session; answered by WELCOME or ERROR.
    Refresh = 9,
    /// Orderly close: the sender sends nothing after it; the receiver answers GOODBYE and closes.
    Goodbye = 10,
    /// Subscribe to an EVENT topic; answered by REPLY or ERROR.
    Subscribe = 11,
    /// Unsubscribe from an EVENT topic; answered by REPLY or ERROR.
    Unsubscribe = 12,
}

impl Kind {
    /// Every kind, in numeric order.
    pub const ALL: [Kind; 12] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Call,
        Kind::Reply,
        Kind::Error,
        Kind::Event,
        Kind::Ping,
        Kind::Pong,
        Kind::Refresh,
        Kind::Goodbye,
        Kind::Subscribe,
        Kind::Unsubscribe,
    ];

    /// The kind for a wire value.
    pub const fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Call,
            4 => Kind::Reply,
            5 => Kind::Error,
            6 => Kind::Event,
            7 => Kind::Ping,
            8 => Kind::Pong,
            9 => Kind::Refresh,
            10 => Kind::Goodbye,
            11 => Kind::Subscribe,
            12 => Kind::Unsubscribe,
            _ => return None,
        })
    }

    /// The wire value.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The upper-case name used in docs/SYPAS.md.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "HELLO",
            Kind::Welcome => "WELCOME",
            Kind::Call => "CALL",
            Kind::Reply => "REPLY",
            Kind::Error => "ERROR",
            Kind::Event => "EVENT",
            Kind::Ping => "PING",
            Kind::Pong => "PONG",
            Kind::Refresh => "REFRESH",
            Kind::Goodbye => "GOODBYE",
            Kind::Subscribe => "SUBSCRIBE",
            Kind::Unsubscribe => "UNSUBSCRIBE",
        }
    }
}

impl core::fmt::Display for Kind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes are not a valid frame. Each maps to an [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first bytes are not `SYP1`; bytes not yet received read as 0.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The version byte is not [`VERSION`].
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// The kind byte is not a [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The payload length exceeds the limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Announced (or attempted) payload length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The input ended inside a frame.
    #[error("stream ended after {have} of {need} bytes of a frame")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame needs (24 while the header is incomplete).
        need: usize,
    },
}

impl FrameError {
    /// The ERROR code a peer sends for this failure.
    pub const fn code(&self) -> ErrorCode {
        match self {
            FrameError::BadMagic(_) => ErrorCode::BadMagic,
            FrameError::UnknownVersion(_) => ErrorCode::UnknownVersion,
            FrameError::UnknownKind(_) => ErrorCode::UnknownKind,
            FrameError::Oversize { .. } => ErrorCode::Oversize,
            FrameError::Truncated { .. } => ErrorCode::Truncated,
        }
    }
}

/// A decoded, validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Flags (none defined in v1).
    pub flags: u16,
    /// Logical channel; replies echo the request's channel.
    pub channel: u32,
    /// Request id; replies echo it, 0 means "no reply expected".
    pub request_id: u64,
    /// Payload length in bytes.
    pub payload_len: u32,
}

impl Header {
    /// The 24 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind.as_u8();
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.channel.to_le_bytes());
        out[12..20].copy_from_slice(&self.request_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Checks the bytes that have arrived so far. `Ok(None)`: a valid prefix of a
    /// header, more bytes needed. `Ok(Some(h))`: a complete, valid header (the
    /// payload may still be missing). Checks run in wire order, so the first bad
    /// byte decides the error, as soon as it arrives.
    pub fn parse_prefix(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
        let have = buf.len().min(MAGIC.len());
        if buf[..have] != MAGIC[..have] {
            let mut seen = [0u8; 4];
            seen[..have].copy_from_slice(&buf[..have]);
            return Err(FrameError::BadMagic(seen));
        }
        match buf.get(4) {
            Some(&v) if v != VERSION => return Err(FrameError::UnknownVersion(v)),
            _ => {}
        }
        let kind = match buf.get(5) {
            Some(&k) => Kind::from_u8(k).ok_or(FrameError::UnknownKind(k))?,
            None => return Ok(None),
        };
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let channel = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let request_id =
            u64::from_le_bytes([h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]]);
        let payload_len = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        if payload_len as usize > max_payload.min(MAX_PAYLOAD) {
            return Err(FrameError::Oversize {
                len: u64::from(payload_len),
                max: max_payload.min(MAX_PAYLOAD),
            });
        }
        Ok(Some(Header {
            kind,
            flags,
            channel,
            request_id,
            payload_len,
        }))
    }

    /// Total frame length: header plus payload.
    pub const fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// The result of [`decode_slice`] on a buffer that is not (yet) in error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The buffer holds a valid prefix; at least `needed` more bytes are required.
    NeedMore {
        /// Minimum number of further bytes before a frame can be complete.
        needed: usize,
    },
    /// A complete frame at the start of the buffer.
    Frame {
        /// Its header.
        header: Header,
        /// Its payload, borrowed from the buffer.
        payload: &'a [u8],
        /// Bytes the frame occupies (header + payload); drop these to advance.
        consumed: usize,
    },
}

/// Decodes the frame at the start of `buf` without allocating.
///
/// Use it over a receive buffer that accumulates bytes: on `NeedMore` read more
/// and call again; on `Frame` handle it and drop `consumed` bytes; on an error
/// send ERROR(`err.code()`) and close. At end of stream, a non-empty buffer that
/// still gives `NeedMore` is [`FrameError::Truncated`] (see [`truncated_at_eof`]).
pub fn decode_slice(buf: &[u8], max_payload: usize) -> Result<Decoded<'_>, FrameError> {
    match Header::parse_prefix(buf, max_payload)? {
        None => Ok(Decoded::NeedMore {
            needed: HEADER_LEN - buf.len().min(HEADER_LEN),
        }),
        Some(header) => {
            let total = header.frame_len();
            match buf.get(HEADER_LEN..total) {
                Some(payload) => Ok(Decoded::Frame {
                    header,
                    payload,
                    consumed: total,
                }),
                None => Ok(Decoded::NeedMore {
                    needed: total - buf.len(),
                }),
            }
        }
    }
}

/// The error to report when a stream ends with `buf` still undecoded, if any.
pub fn truncated_at_eof(buf: &[u8], max_payload: usize) -> Result<(), FrameError> {
    if buf.is_empty() {
        return Ok(());
    }
    let need = match Header::parse_prefix(buf, max_payload)? {
        Some(h) => h.frame_len(),
        None => HEADER_LEN,
    };
    Err(FrameError::Truncated {
        have: buf.len().min(need),
        need,
    })
}

/// An owned frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: Kind,
    /// Flags (none defined in v1).
    pub flags: u16,
    /// Logical channel.
    pub channel: u32,
    /// Request id (0 = no reply expected).
    pub request_id: u64,
    /// The payload, usually an encoded message of `kind`.
    pub payload: Bytes,
}

impl Frame {
    /// A frame on channel 0 with no flags.
    pub fn new(kind: Kind, request_id: u64, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            flags: 0,
            channel: 0,
            request_id,
            payload: payload.into(),
        }
    }

    /// A frame carrying an encoded prost message.
    pub fn from_message(kind: Kind, request_id: u64, msg: &impl prost::Message) -> Frame {
        Frame::new(kind, request_id, msg.encode_to_vec())
    }

    /// The same frame on another channel.
    #[must_use]
    pub fn with_channel(mut self, channel: u32) -> Frame {
        self.channel = channel;
        self
    }

    /// The header for this frame, or `Oversize` if the payload is too large.
    pub fn header(&self) -> Result<Header, FrameError> {
        let len = self.payload.len();
        if len > MAX_PAYLOAD {
            return Err(FrameError::Oversize {
                len: len as u64,
                max: MAX_PAYLOAD,
            });
        }
        Ok(Header {
            kind: self.kind,
            flags: self.flags,
            channel: self.channel,
            request_id: self.request_id,
            // MAX_PAYLOAD fits in u32, checked above.
            payload_len: len as u32,
        })
    }

    /// Bytes this frame occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) -> Result<(), FrameError> {
        let header = self.header()?;
        dst.put_slice(&header.to_bytes());
        dst.put_slice(&self.payload);
        Ok(())
    }

    /// The encoded frame as a vector.
    pub fn to_vec(&self) -> Result<alloc::vec::Vec<u8>, FrameError> {
        let mut out = alloc::vec::Vec::with_capacity(self.encoded_len());
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes the payload as message `M`.
    pub fn decode_message<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.payload.clone())
    }
}

/// Pulls frames out of a byte buffer that a reader fills, in any chunking.
///
/// Once it has returned an error it keeps returning that error: a stream with a
/// framing error cannot be resynchronised and must be closed.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_payload: usize,
    failed: Option<FrameError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder with the protocol's payload limit.
    pub const fn new() -> FrameDecoder {
        FrameDecoder {
            max_payload: MAX_PAYLOAD,
            failed: None,
        }
    }

    /// A decoder with a lower payload limit (clamped to [`MAX_PAYLOAD`]).
    pub const fn with_max_payload(max_payload: usize) -> FrameDecoder {
        FrameDecoder {
            max_payload: if max_payload < MAX_PAYLOAD {
                max_payload
            } else {
                MAX_PAYLOAD
            },
            failed: None,
        }
    }

    /// The payload limit in force.
    pub const fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Bytes still needed in `buf` before the next frame can be complete, or
    /// the error that the buffered bytes already show.
    pub fn needed(&self, buf: &[u8]) -> Result<usize, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode_slice(buf, self.max_payload)? {
            Decoded::NeedMore { needed } => Ok(needed),
            Decoded::Frame { .. } => Ok(0),
        }
    }

    /// Takes the next complete frame off the front of `buf`. `Ok(None)`: need
    /// more bytes (nothing is consumed). The payload shares `buf`'s allocation.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let header = match decode_slice(buf, self.max_payload) {
            Ok(Decoded::NeedMore { .. }) => return Ok(None),
            Ok(Decoded::Frame { header, .. }) => header,
            Err(e) => {
                self.failed = Some(e.clone());
                return Err(e);
            }
        };
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(header.payload_len as usize).freeze();
        Ok(Some(Frame {
            kind: header.kind,
            flags: header.flags,
            channel: header.channel,
            request_id: header.request_id,
            payload,
        }))
    }

    /// Like [`decode`](Self::decode) once the stream has ended: a frame, `None`
    /// if `buf` is empty, or `Truncated` if bytes of an incomplete frame remain.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if let Err(e) = truncated_at_eof(buf, self.max_payload) {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec::Vec;

    fn sample() -> Frame {
        Frame {
            kind: Kind::Call,
            flags: 0x0102,
            channel: 0x0304_0506,
            request_id: 0x0708_090a_0b0c_0d0e,
            payload: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn header_layout_is_little_endian_24_bytes() {
        let bytes = sample().to_vec().unwrap();
        assert_eq!(bytes.len(), 29);
        assert_eq!(&bytes[0..4], b"SYP1");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 3);
        assert_eq!(&bytes[6..8], &[0x02, 0x01]);
        assert_eq!(&bytes[8..12], &[0x06, 0x05, 0x04, 0x03]);
        assert_eq!(
            &bytes[12..20],
            &[0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 0x09, 0x08, 0x07]
        );
        assert_eq!(&bytes[20..24], &[5, 0, 0, 0]);
        assert_eq!(&bytes[24..], b"hello");
    }

    #[test]
    fn byte_at_a_time_decoding_yields_the_frame() {
        let bytes = sample().to_vec().unwrap();
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(dec.decode(&mut buf).unwrap(), None, "early frame at {i}");
            buf.put_u8(*b);
        }
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(sample()));
        assert!(buf.is_empty());
        assert_eq!(dec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn bad_magic_is_reported_on_the_first_wrong_byte() {
        assert_eq!(
            decode_slice(b"SX", MAX_PAYLOAD),
            Err(FrameError::BadMagic(*b"SX\0\0"))
        );
        assert_eq!(
            decode_slice(b"GET / HTTP/1.1\r\n\r\n", MAX_PAYLOAD)
                .unwrap_err()
                .code(),
            ErrorCode::BadMagic
        );
        assert_eq!(
            decode_slice(b"SYP", MAX_PAYLOAD),
            Ok(Decoded::NeedMore { needed: 21 })
        );
    }

    #[test]
    fn version_kind_and_length_are_checked_in_order() {
        let mut bytes = sample().to_vec().unwrap();
        bytes[4] = 2;
        assert_eq!(
            decode_slice(&bytes[..5], MAX_PAYLOAD),
            Err(FrameError::UnknownVersion(2))
        );
        bytes[4] = 1;
        bytes[5] = 0;
        assert_eq!(
            decode_slice(&bytes[..6], MAX_PAYLOAD),
            Err(FrameError::UnknownKind(0))
        );
        bytes[5] = 13;
        assert_eq!(
            decode_slice(&bytes, MAX_PAYLOAD).unwrap_err().code(),
            ErrorCode::UnknownKind
        );
        bytes[5] = 3;
        bytes[20..24].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(
            decode_slice(&bytes[..24], MAX_PAYLOAD).unwrap_err().code(),
            ErrorCode::Oversize
        );
        // Exactly the limit is allowed.
        bytes[20..24].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
        assert_eq!(
            decode_slice(&bytes[..24], MAX_PAYLOAD),
            Ok(Decoded::NeedMore {
                needed: MAX_PAYLOAD
            })
        );
        // A lower decoder limit applies.
        assert_eq!(
            decode_slice(&bytes[..24], 1024).unwrap_err(),
            FrameError::Oversize {
                len: MAX_PAYLOAD as u64,
                max: 1024
            }
        );
    }

    #[test]
    fn eof_inside_a_frame_is_truncated_and_the_error_sticks() {
        let bytes = sample().to_vec().unwrap();
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&bytes[..26]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(
            dec.decode_eof(&mut buf),
            Err(FrameError::Truncated { have: 26, need: 29 })
        );
        assert_eq!(
            dec.decode(&mut buf).unwrap_err().code(),
            ErrorCode::Truncated
        );
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&bytes[..10]);
        assert_eq!(
            dec.decode_eof(&mut buf),
            Err(FrameError::Truncated { have: 10, need: 24 })
        );
    }

    #[test]
    fn several_frames_in_one_buffer_come_out_in_order() {
        let mut buf = BytesMut::new();
        let frames: Vec<Frame> = (0..5u64)
            .map(|i| Frame::new(Kind::Reply, i, alloc::vec![i as u8; i as usize * 7]))
            .collect();
        for f in &frames {
            f.encode(&mut buf).unwrap();
        }
        let mut dec = FrameDecoder::new();
        for f in &frames {
            assert_eq!(dec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert_eq!(dec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn encoding_an_oversize_payload_fails() {
        let f = Frame::new(Kind::Call, 1, alloc::vec![0u8; MAX_PAYLOAD + 1]);
        assert_eq!(f.to_vec().unwrap_err().code(), ErrorCode::Oversize);
        let f = Frame::new(Kind::Call, 1, alloc::vec![0u8; MAX_PAYLOAD]);
        assert_eq!(f.to_vec().unwrap().len(), MAX_PAYLOAD + HEADER_LEN);
    }

    #[test]
    fn kinds_round_trip() {
        for v in 0..=255u8 {
            if let Some(k) = Kind::from_u8(v) {
                assert_eq!(k.as_u8(), v);
            }
        }
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k.as_u8()), Some(k));
        }
    }
}
