// SPDX-License-Identifier: Apache-2.0
//! SYPAS v1, cell0's secure IPC protocol (DESIGN.md §4, docs/SYPAS.md).
//!
//! The core — [`frame`] (the 24-byte header codec and an incremental decoder),
//! [`msg`] (the prost message schema, mirrored in `proto/sypas.proto`) and
//! [`code`] (the stable numeric error codes) — is `#![no_std]` + `alloc` when the
//! default `std` feature is off, so the freestanding nano guest links the same
//! code as the host. Nothing in the core panics on peer-controlled input.
//!
//! With the `host` feature (on by default) [`host`] adds a tokio client and
//! server: Unix sockets, the hybrid-vsock `CONNECT` handshake, request ids,
//! per-call timeouts, pipelining, PING/PONG heartbeats, GOODBYE and reconnect.

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod code;
pub mod frame;
pub mod msg;

#[cfg(feature = "host")]
pub mod host;

#[cfg(feature = "grpc")]
pub mod grpc;

/// The `bytes` and `prost` this crate is built with, for callers (such as the
/// nano guest) that should not name their own versions.
pub use {bytes, prost};

pub use code::ErrorCode;
pub use frame::{
    Decoded, Frame, FrameDecoder, FrameError, HEADER_LEN, Header, Kind, MAGIC, MAX_PAYLOAD,
    VERSION, decode_slice,
};
pub use msg::{Body, MessageError};

/// The vsock port on the host (CID 2) that a guest connects to for the SYPAS router.
pub const ROUTER_VSOCK_PORT: u32 = 1024;

/// The vsock CID of the host.
pub const HOST_CID: u32 = 2;
