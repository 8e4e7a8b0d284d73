// SPDX-License-Identifier: Apache-2.0
//! The host side of SYPAS on tokio: a [`server`], a [`client`], the hybrid
//! vsock `CONNECT` handshake ([`vsock`]) and an [`echo`] service.

pub mod client;
pub mod conn;
pub mod echo;
pub mod sdk;
pub mod server;
pub mod shm;
pub mod vsock;

use std::time::{SystemTime, UNIX_EPOCH};

use crate::code::ErrorCode;
use crate::msg::ErrorMsg;

pub use client::{Client, ClientConfig, ClientError, Disconnect, Endpoint, ReconnectPolicy};
pub use echo::EchoService;
pub use sdk::{AgentClient, RefreshPolicy, SdkError, TokenSource, TokenSourceError};
pub use server::{
    AcceptAll, Grant, Handler, HelloHook, Server, ServerConfig, Session, SessionCallError,
};
pub use shm::{ShmArena, ShmError, ShmWindow};

/// A typed error from a service or a peer: what an ERROR frame carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({}): {message}", code_name(*.code), .code)]
pub struct ServiceError {
    /// The wire code (an [`ErrorCode`] value, or one this build does not know).
    pub code: u32,
    /// The peer's sentence.
    pub message: String,
}

fn code_name(code: u32) -> &'static str {
    ErrorCode::from_u32(code).map_or("UNKNOWN", ErrorCode::name)
}

impl ServiceError {
    /// An error with a typed code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code: code.as_u32(),
            message: message.into(),
        }
    }

    /// The typed code, if this build knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u32(self.code)
    }

    /// `UNSUPPORTED` for a kind or feature this peer does not offer.
    pub fn unsupported(what: &str) -> ServiceError {
        ServiceError::new(
            ErrorCode::Unsupported,
            format!("{what} is not supported here."),
        )
    }
}

impl From<ServiceError> for ErrorMsg {
    fn from(e: ServiceError) -> ErrorMsg {
        ErrorMsg {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<ErrorMsg> for ServiceError {
    fn from(e: ErrorMsg) -> ServiceError {
        ServiceError {
            code: e.code,
            message: e.message,
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
