// SPDX-License-Identifier: Apache-2.0
//! The SYPAS v1 message schema: hand-written prost structs, no protoc and no
//! build step. `proto/sypas.proto` is the same schema as a .proto file; a test
//! keeps the two in step. Tag numbers are the wire contract: never reuse one.
//!
//! Each frame kind carries one message type (see [`Body`]). The Rust name of the
//! `Error` message is [`ErrorMsg`], so it does not shadow `core::error::Error`.

use alloc::string::String;
use alloc::vec::Vec;

use bytes::Bytes;

use crate::code::ErrorCode;
use crate::frame::{Frame, Kind};

/// HELLO: opens a session.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// Protocol versions the client speaks; empty means `[1]`.
    #[prost(uint32, repeated, tag = "1")]
    pub versions: Vec<u32>,
    /// The agent's id.
    #[prost(string, tag = "2")]
    pub agent_id: String,
    /// The capability token (a serialized biscuit), carried as bytes.
    #[prost(bytes = "bytes", tag = "3")]
    pub token: Bytes,
}

/// One granted right: a (service, method) pattern.
///
/// A pattern is `*` (anything), a name ending in `*` (that prefix, e.g.
/// `agent/*`), or an exact name.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Right {
    /// Service pattern.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Method pattern.
    #[prost(string, tag = "2")]
    pub method: String,
}

/// WELCOME: the answer to HELLO and to REFRESH.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Welcome {
    /// The session's id (the same after a REFRESH).
    #[prost(uint64, tag = "1")]
    pub session_id: u64,
    /// The rights the session holds.
    #[prost(message, repeated, tag = "2")]
    pub rights: Vec<Right>,
    /// When the token expires, in Unix seconds; 0 = no expiry.
    #[prost(uint64, tag = "3")]
    pub token_expiry: u64,
    /// The protocol version chosen for the session.
    #[prost(uint32, tag = "4")]
    pub version: u32,
}

/// A reference to bytes in the sender's shared-memory window.
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct ShmRef {
    /// Offset from the start of the window.
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    /// Length in bytes.
    #[prost(uint64, tag = "2")]
    pub length: u64,
}

/// CALL: a request to (service, method).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Call {
    /// Target service, e.g. `echo` or `agent/<id>`.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Method of the service.
    #[prost(string, tag = "2")]
    pub method: String,
    /// Inline argument bytes.
    #[prost(bytes = "bytes", tag = "3")]
    pub payload: Bytes,
    /// Bulk arguments in the shared-memory window, in order after `payload`.
    #[prost(message, repeated, tag = "4")]
    pub shm: Vec<ShmRef>,
}

/// REPLY: the successful answer to a CALL (empty for acks).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    /// Inline result bytes.
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: Bytes,
    /// Bulk results in the shared-memory window.
    #[prost(message, repeated, tag = "2")]
    pub shm: Vec<ShmRef>,
}

/// ERROR (`message Error` in sypas.proto): a typed failure.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorMsg {
    /// An [`ErrorCode`] value.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    /// A sentence for people and logs.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// EVENT: a publish (client → router) or a delivery (router → subscriber).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Topic name.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// Event bytes.
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
    /// On delivery: the publisher's agent id, set by the router (ignored on publish).
    #[prost(string, tag = "3")]
    pub source: String,
}

/// SUBSCRIBE: start receiving EVENTs on a topic.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Subscribe {
    /// Topic name.
    #[prost(string, tag = "1")]
    pub topic: String,
}

/// UNSUBSCRIBE: stop receiving EVENTs on a topic.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Unsubscribe {
    /// Topic name.
    #[prost(string, tag = "1")]
    pub topic: String,
}

/// PING: a liveness probe.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Ping {
    /// Any value; echoed in the PONG.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    /// Sender's clock in nanoseconds (any epoch); echoed in the PONG.
    #[prost(uint64, tag = "2")]
    pub timestamp_ns: u64,
}

/// PONG: the answer to PING, echoing its fields.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Pong {
    /// The PING's nonce.
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    /// The PING's timestamp.
    #[prost(uint64, tag = "2")]
    pub timestamp_ns: u64,
}

/// REFRESH: replaces the session's token; answered by WELCOME or ERROR.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refresh {
    /// The new capability token.
    #[prost(bytes = "bytes", tag = "1")]
    pub token: Bytes,
}

/// GOODBYE: an orderly close.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Goodbye {
    /// Why, for logs.
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// Why a frame's payload is not a message of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The payload does not decode as the kind's message.
    #[error("{kind} payload is malformed: {reason}")]
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// prost's description of the failure.
        reason: prost::DecodeError,
    },
}

impl MessageError {
    /// The ERROR code a peer sends for this failure.
    pub const fn code(&self) -> ErrorCode {
        ErrorCode::MalformedPayload
    }
}

/// A decoded message of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// HELLO.
    Hello(Hello),
    /// WELCOME.
    Welcome(Welcome),
    /// CALL.
    Call(Call),
    /// REPLY.
    Reply(Reply),
    /// ERROR.
    Error(ErrorMsg),
    /// EVENT.
    Event(Event),
    /// PING.
    Ping(Ping),
    /// PONG.
    Pong(Pong),
    /// REFRESH.
    Refresh(Refresh),
    /// GOODBYE.
    Goodbye(Goodbye),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
}

fn decode_as<M: prost::Message + Default>(kind: Kind, payload: Bytes) -> Result<M, MessageError> {
    M::decode(payload).map_err(|reason| MessageError::Malformed { kind, reason })
}

impl Body {
    /// Decodes `payload` as the message of `kind`.
    pub fn decode(kind: Kind, payload: Bytes) -> Result<Body, MessageError> {
        Ok(match kind {
            Kind::Hello => Body::Hello(decode_as(kind, payload)?),
            Kind::Welcome => Body::Welcome(decode_as(kind, payload)?),
            Kind::Call => Body::Call(decode_as(kind, payload)?),
            Kind::Reply => Body::Reply(decode_as(kind, payload)?),
            Kind::Error => Body::Error(decode_as(kind, payload)?),
            Kind::Event => Body::Event(decode_as(kind, payload)?),
            Kind::Ping => Body::Ping(decode_as(kind, payload)?),
            Kind::Pong => Body::Pong(decode_as(kind, payload)?),
            Kind::Refresh => Body::Refresh(decode_as(kind, payload)?),
            Kind::Goodbye => Body::Goodbye(decode_as(kind, payload)?),
            Kind::Subscribe => Body::Subscribe(decode_as(kind, payload)?),
            Kind::Unsubscribe => Body::Unsubscribe(decode_as(kind, payload)?),
        })
    }

    /// Decodes a frame's payload as the message of its kind.
    pub fn from_frame(frame: &Frame) -> Result<Body, MessageError> {
        Body::decode(frame.kind, frame.payload.clone())
    }

    /// The frame kind that carries this message.
    pub const fn kind(&self) -> Kind {
        match self {
            Body::Hello(_) => Kind::Hello,
            Body::Welcome(_) => Kind::Welcome,
            Body::Call(_) => Kind::Call,
            Body::Reply(_) => Kind::Reply,
            Body::Error(_) => Kind::Error,
            Body::Event(_) => Kind::Event,
            Body::Ping(_) => Kind::Ping,
            Body::Pong(_) => Kind::Pong,
            Body::Refresh(_) => Kind::Refresh,
            Body::Goodbye(_) => Kind::Goodbye,
            Body::Subscribe(_) => Kind::Subscribe,
            Body::Unsubscribe(_) => Kind::Unsubscribe,
        }
    }

    /// The encoded message.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        use prost::Message;
        match self {
            Body::Hello(m) => m.encode_to_vec(),
            Body::Welcome(m) => m.encode_to_vec(),
            Body::Call(m) => m.encode_to_vec(),
            Body::Reply(m) => m.encode_to_vec(),
            Body::Error(m) => m.encode_to_vec(),
            Body::Event(m) => m.encode_to_vec(),
            Body::Ping(m) => m.encode_to_vec(),
            Body::Pong(m) => m.encode_to_vec(),
            Body::Refresh(m) => m.encode_to_vec(),
            Body::Goodbye(m) => m.encode_to_vec(),
            Body::Subscribe(m) => m.encode_to_vec(),
            Body::Unsubscribe(m) => m.encode_to_vec(),
        }
    }

    /// A frame on channel 0 carrying this message.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame::new(self.kind(), request_id, self.encode_to_vec())
    }
}

impl ErrorMsg {
    /// An ERROR message with a typed code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorMsg {
        ErrorMsg {
            code: code.as_u32(),
            message: message.into(),
        }
    }

    /// The typed code, if this build knows it.
    pub const fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u32(self.code)
    }
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl Right {
    /// A right for (service, method) patterns.
    pub fn new(service: impl Into<String>, method: impl Into<String>) -> Right {
        Right {
            service: service.into(),
            method: method.into(),
        }
    }

    /// The right that permits everything.
    pub fn all() -> Right {
        Right::new("*", "*")
    }

    /// Whether this right permits calling `method` of `service`.
    pub fn permits(&self, service: &str, method: &str) -> bool {
        pattern_matches(&self.service, service) && pattern_matches(&self.method, method)
    }
}

/// Whether any of `rights` permits (service, method).
pub fn permits(rights: &[Right], service: &str, method: &str) -> bool {
    rights.iter().any(|r| r.permits(service, method))
}

impl ShmRef {
    /// The byte range this ref covers inside a window of `window_len` bytes, or
    /// `None` if it does not lie wholly inside (including on overflow).
    pub fn range_in(&self, window_len: u64) -> Option<core::ops::Range<u64>> {
        let end = self.offset.checked_add(self.length)?;
        (end <= window_len).then_some(self.offset..end)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec;
    use prost::Message;

    #[test]
    fn every_kind_round_trips_through_a_frame() {
        let bodies = vec![
            Body::Hello(Hello {
                versions: vec![1],
                agent_id: "a1".into(),
                token: Bytes::from_static(b"tok"),
            }),
            Body::Welcome(Welcome {
                session_id: 7,
                rights: vec![Right::new("echo", "*")],
                token_expiry: 1_900_000_000,
                version: 1,
            }),
            Body::Call(Call {
                service: "echo".into(),
                method: "echo".into(),
                payload: Bytes::from_static(b"x"),
                shm: vec![ShmRef {
                    offset: 4096,
                    length: 10,
                }],
            }),
            Body::Reply(Reply {
                payload: Bytes::from_static(b"y"),
                shm: vec![],
            }),
            Body::Error(ErrorMsg::new(ErrorCode::TokenExpired, "Token expired.")),
            Body::Event(Event {
                topic: "t".into(),
                payload: Bytes::new(),
                source: "a2".into(),
            }),
            Body::Ping(Ping {
                nonce: 1,
                timestamp_ns: 2,
            }),
            Body::Pong(Pong {
                nonce: 1,
                timestamp_ns: 2,
            }),
            Body::Refresh(Refresh {
                token: Bytes::from_static(b"new"),
            }),
            Body::Goodbye(Goodbye {
                reason: "done".into(),
            }),
            Body::Subscribe(Subscribe { topic: "t".into() }),
            Body::Unsubscribe(Unsubscribe { topic: "t".into() }),
        ];
        assert_eq!(bodies.len(), Kind::ALL.len());
        for (i, body) in bodies.into_iter().enumerate() {
            let frame = body.to_frame(i as u64 + 1);
            assert_eq!(frame.kind, body.kind());
            assert_eq!(Body::from_frame(&frame).unwrap(), body);
        }
    }

    #[test]
    fn malformed_payload_is_typed() {
        // Field 2 of Hello is a string; invalid UTF-8 must be refused.
        let bad = Bytes::from_static(&[0x12, 0x02, 0xff, 0xfe]);
        let err = Body::decode(Kind::Hello, bad).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedPayload);
        // A truncated varint.
        let err = Body::decode(Kind::Ping, Bytes::from_static(&[0x08, 0xff])).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedPayload);
    }

    #[test]
    fn empty_payload_is_the_default_message() {
        assert_eq!(
            Body::decode(Kind::Goodbye, Bytes::new()).unwrap(),
            Body::Goodbye(Goodbye::default())
        );
    }

    #[test]
    fn rights_match_exact_prefix_and_wildcard() {
        let rights = vec![Right::new("echo", "echo"), Right::new("agent/*", "*")];
        assert!(permits(&rights, "echo", "echo"));
        assert!(!permits(&rights, "echo", "sleep"));
        assert!(permits(&rights, "agent/b7", "ping"));
        assert!(!permits(&rights, "agents", "ping"));
        assert!(Right::all().permits("anything", "at-all"));
        assert!(!permits(&[], "echo", "echo"));
    }

    #[test]
    fn shm_ref_bounds_include_overflow() {
        let r = ShmRef {
            offset: 10,
            length: 20,
        };
        assert_eq!(r.range_in(30), Some(10..30));
        assert_eq!(r.range_in(29), None);
        let r = ShmRef {
            offset: u64::MAX,
            length: 2,
        };
        assert_eq!(r.range_in(u64::MAX), None);
    }

    #[test]
    fn call_payload_is_not_copied_when_decoding_from_bytes() {
        let call = Call {
            service: "s".into(),
            method: "m".into(),
            payload: Bytes::from(vec![7u8; 4096]),
            shm: vec![],
        };
        let wire = Bytes::from(call.encode_to_vec());
        let decoded = Call::decode(wire.clone()).unwrap();
        let start = wire.as_ptr() as usize;
        let p = decoded.payload.as_ptr() as usize;
        assert!(p >= start && p < start + wire.len());
    }

    #[test]
    fn proto_file_declares_every_message_with_the_same_tags() {
        let proto = include_str!("../sypas.proto");
        for needle in [
            "message Hello {",
            "repeated uint32 versions = 1;",
            "string agent_id = 2;",
            "bytes token = 3;",
            "message Right {",
            "message Welcome {",
            "uint64 session_id = 1;",
            "repeated Right rights = 2;",
            "uint64 token_expiry = 3;",
            "uint32 version = 4;",
            "message ShmRef {",
            "uint64 offset = 1;",
            "uint64 length = 2;",
            "message Call {",
            "repeated ShmRef shm = 4;",
            "message Reply {",
            "repeated ShmRef shm = 2;",
            "message Error {",
            "uint32 code = 1;",
            "message Event {",
            "string source = 3;",
            "message Subscribe {",
            "message Unsubscribe {",
            "message Ping {",
            "uint64 timestamp_ns = 2;",
            "message Pong {",
            "message Refresh {",
            "bytes token = 1;",
            "message Goodbye {",
            "string reason = 1;",
        ] {
            assert!(proto.contains(needle), "sypas.proto lacks `{needle}`");
        }
        for code in ErrorCode::ALL {
            let line = alloc::format!("{} = {};", code.name(), code.as_u32());
            assert!(proto.contains(&line), "sypas.proto lacks `{line}`");
        }
        for kind in Kind::ALL {
            let line = alloc::format!("KIND_{} = {};", kind.name(), kind.as_u8());
            assert!(proto.contains(&line), "sypas.proto lacks `{line}`");
        }
    }
}
