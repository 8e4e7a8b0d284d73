// SPDX-License-Identifier: Apache-2.0
//! The connection state machine: one vsock stream connection between a guest
//! socket and a host stream, with its credit accounting.

mod connection;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{ReadVolatile, WriteVolatile};

pub use connection::{ConnState, VsockConnection};

/// Receive buffer the device advertises to the guest per connection
/// (`buf_alloc`): guest data the host socket has not taken yet is buffered up
/// to this size. A guest that sends more has lied about credit.
pub const CONN_TX_BUF_SIZE: u32 = 128 * 1024;
/// Send a CREDIT_UPDATE once the host consumed this much since the last
/// `fwd_cnt` the guest saw.
pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;
/// How long the guest has to answer a connection request or a shutdown.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(2);

/// The host side of a connection: a non-blocking byte stream.
pub trait VsockStream: Read + Write + ReadVolatile + WriteVolatile + AsRawFd + Send {
    /// Shuts down one or both directions.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl VsockStream for UnixStream {
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}
