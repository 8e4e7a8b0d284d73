// SPDX-License-Identifier: Apache-2.0
//! Stable numeric error codes carried in ERROR frames (`msg::ErrorMsg::code`).
//!
//! The numbers are part of the wire contract: never renumber one, only add new
//! ones. They are grouped in ranges of 16 so each layer has room to grow:
//!
//! | range | layer |
//! |---|---|
//! | 1–15 | framing and payload decoding |
//! | 16–31 | session state machine |
//! | 32–47 | capability tokens |
//! | 48–63 | authorisation |
//! | 64–79 | routing |
//! | 80–95 | shared memory |
//! | 96–111 | flow control and liveness |
//! | 112–127 | generic service errors |

/// A typed SYPAS error code. `0` is never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame does not start with `SYP1`.
    BadMagic = 1,
    /// The header's version byte is not one this peer speaks, or HELLO offered no common version.
    UnknownVersion = 2,
    /// The header's kind byte is not a known kind.
    UnknownKind = 3,
    /// The header announces a payload larger than the limit (16 MiB).
    Oversize = 4,
    /// The stream ended inside a frame.
    Truncated = 5,
    /// The payload is not a valid protobuf message of the frame's kind.
    MalformedPayload = 6,
    /// A well-formed frame of a kind this peer never accepts in this direction.
    UnexpectedKind = 7,

    /// HELLO on a session that already has one.
    AlreadyHello = 16,
    /// A CALL, EVENT, SUBSCRIBE or REFRESH before HELLO.
    NotHello = 17,

    /// The capability token has expired; the client should REFRESH.
    TokenExpired = 32,
    /// The token does not parse or its signature does not verify (forged).
    TokenInvalid = 33,
    /// The token was signed by a root key this cluster does not trust.
    WrongRoot = 34,
    /// An attenuated token tries to grant more than its parent.
    AttenuationWidens = 35,
    /// The token names another agent than the HELLO.
    AgentMismatch = 36,

    /// The session's rights do not cover the (service, method).
    PermissionDenied = 48,

    /// No service of that name is registered.
    NoSuchService = 64,
    /// The service has no such method.
    NoSuchMethod = 65,
    /// `agent/<id>`: the agent is not connected anywhere reachable.
    AgentUnreachable = 66,

    /// A shared-memory ref lies outside the sender's window (or overflows).
    ShmOutOfBounds = 80,
    /// The message carries shm refs but the session has no window.
    ShmUnavailable = 81,

    /// The peer or a service behind the router did not answer in time.
    Timeout = 96,
    /// An EVENT subscriber fell too far behind and was dropped.
    SlowConsumer = 97,
    /// Too many calls in flight; retry later.
    Busy = 98,
    /// The peer is shutting down.
    ShuttingDown = 99,

    /// The service rejected the request's arguments.
    BadRequest = 112,
    /// The peer does not support this kind (e.g. EVENT on a plain server).
    Unsupported = 113,
    /// An internal error in the peer or the service.
    Internal = 127,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 27] = [
        ErrorCode::BadMagic,
        ErrorCode::UnknownVersion,
        ErrorCode::UnknownKind,
        ErrorCode::Oversize,
        ErrorCode::Truncated,
        ErrorCode::MalformedPayload,
        ErrorCode::UnexpectedKind,
        ErrorCode::AlreadyHello,
        ErrorCode::NotHello,
        ErrorCode::TokenExpired,
        ErrorCode::TokenInvalid,
        ErrorCode::WrongRoot,
        ErrorCode::AttenuationWidens,
        ErrorCode::AgentMismatch,
        ErrorCode::PermissionDenied,
        ErrorCode::NoSuchService,
        ErrorCode::NoSuchMethod,
        ErrorCode::AgentUnreachable,
        ErrorCode::ShmOutOfBounds,
        ErrorCode::ShmUnavailable,
        ErrorCode::Timeout,
        ErrorCode::SlowConsumer,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::BadRequest,
        ErrorCode::Unsupported,
        ErrorCode::Internal,
    ];

    /// The wire value.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, if it is one this build knows.
    pub const fn from_u32(value: u32) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::BadMagic,
            2 => ErrorCode::UnknownVersion,
            3 => ErrorCode::UnknownKind,
            4 => ErrorCode::Oversize,
            5 => ErrorCode::Truncated,
            6 => ErrorCode::MalformedPayload,
            7 => ErrorCode::UnexpectedKind,
            16 => ErrorCode::AlreadyHello,
            17 => ErrorCode::NotHello,
            32 => ErrorCode::TokenExpired,
            33 => ErrorCode::TokenInvalid,
            34 => ErrorCode::WrongRoot,
            35 => ErrorCode::AttenuationWidens,
            36 => ErrorCode::AgentMismatch,
            48 => ErrorCode::PermissionDenied,
            64 => ErrorCode::NoSuchService,
            65 => ErrorCode::NoSuchMethod,
            66 => ErrorCode::AgentUnreachable,
            80 => ErrorCode::ShmOutOfBounds,
            81 => ErrorCode::ShmUnavailable,
            96 => ErrorCode::Timeout,
            97 => ErrorCode::SlowConsumer,
            98 => ErrorCode::Busy,
            99 => ErrorCode::ShuttingDown,
            112 => ErrorCode::BadRequest,
            113 => ErrorCode::Unsupported,
            127 => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// The name used in docs/SYPAS.md and in logs, e.g. `TOKEN_EXPIRED`.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::BadMagic => "BAD_MAGIC",
            ErrorCode::UnknownVersion => "UNKNOWN_VERSION",
            ErrorCode::UnknownKind => "UNKNOWN_KIND",
            ErrorCode::Oversize => "OVERSIZE",
            ErrorCode::Truncated => "TRUNCATED",
            ErrorCode::MalformedPayload => "MALFORMED_PAYLOAD",
            ErrorCode::UnexpectedKind => "UNEXPECTED_KIND",
            ErrorCode::AlreadyHello => "ALREADY_HELLO",
            ErrorCode::NotHello => "NOT_HELLO",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::TokenInvalid => "TOKEN_INVALID",
            ErrorCode::WrongRoot => "WRONG_ROOT",
            ErrorCode::AttenuationWidens => "ATTENUATION_WIDENS",
            ErrorCode::AgentMismatch => "AGENT_MISMATCH",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NoSuchService => "NO_SUCH_SERVICE",
            ErrorCode::NoSuchMethod => "NO_SUCH_METHOD",
            ErrorCode::AgentUnreachable => "AGENT_UNREACHABLE",
            ErrorCode::ShmOutOfBounds => "SHM_OUT_OF_BOUNDS",
            ErrorCode::ShmUnavailable => "SHM_UNAVAILABLE",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::SlowConsumer => "SLOW_CONSUMER",
            ErrorCode::Busy => "BUSY",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// Whether a peer that sends this code closes the connection after it.
    pub const fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::BadMagic
                | ErrorCode::UnknownVersion
                | ErrorCode::UnknownKind
                | ErrorCode::Oversize
                | ErrorCode::Truncated
                | ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
        )
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}({})", self.name(), self.as_u32())
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        code.as_u32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_names_are_unique() {
        let mut seen = alloc::vec::Vec::new();
        for v in 0..=1024u32 {
            if let Some(code) = ErrorCode::from_u32(v) {
                assert_eq!(code.as_u32(), v);
                assert!(!seen.contains(&code.name()));
                seen.push(code.name());
            }
        }
        assert_eq!(seen.len(), ErrorCode::ALL.len());
        assert!(ErrorCode::from_u32(0).is_none());
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(code.as_u32()), Some(code));
        }
    }
}
