// SPDX-License-Identifier: Apache-2.0
//! virtio-vsock (stream sockets) with a hybrid Unix-socket backend.
//!
//! The device ([`Vsock`]) moves packets between the guest's virtqueues and a
//! [`VsockBackend`]. The production backend is [`UnixMuxer`] (the Firecracker /
//! Cloud Hypervisor "hybrid vsock" model):
//!
//! - a guest connection to host port `P` becomes a connection to the Unix
//!   socket `<uds>_P`;
//! - a host process connects to `<uds>`, writes `CONNECT P\n`, and once the
//!   guest's listener on port `P` accepts, reads `OK <hostport>\n`; then bytes
//!   flow both ways.
//!
//! Layout: `device.rs` (the [`crate::virtio::VirtioDevice`]), `event_handler.rs`
//! (the event-manager subscriber), `metrics.rs`, `packet.rs` (header helpers over
//! the `virtio-vsock` crate's parser), `csm/` (one connection's state machine and
//! credit accounting), `unix/` (the muxer). Tests plug in their own backend
//! through the traits below.

pub mod csm;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod packet;
pub mod unix;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::RawFd;
use std::path::PathBuf;

use vmm_sys_util::epoll::EventSet;

pub use device::Vsock;
pub use metrics::VsockMetrics;
pub use packet::VsockPacket;
pub use unix::UnixMuxer;

/// Index of the receive (device to driver) queue.
pub const RXQ_INDEX: usize = 0;
/// Index of the transmit (driver to device) queue.
pub const TXQ_INDEX: usize = 1;
/// Index of the event queue.
pub const EVQ_INDEX: usize = 2;
/// Maximum size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue sizes as the transport reads them.
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE; 3];

/// The host's CID, as the guest addresses it.
pub const VSOCK_HOST_CID: u64 = 2;
/// Largest data payload of one packet, in either direction (Linux uses the same).
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;

/// Wire constants of the virtio-vsock protocol (virtio 1.2 §5.10).
pub mod uapi {
    /// Stream socket type: the only one this device supports.
    pub const VSOCK_TYPE_STREAM: u16 = 1;
    /// Connection request.
    pub const VSOCK_OP_REQUEST: u16 = 1;
    /// Connection accepted.
    pub const VSOCK_OP_RESPONSE: u16 = 2;
    /// Connection reset (refused or aborted).
    pub const VSOCK_OP_RST: u16 = 3;
    /// Half or full shutdown; flags say which directions.
    pub const VSOCK_OP_SHUTDOWN: u16 = 4;
    /// Data.
    pub const VSOCK_OP_RW: u16 = 5;
    /// Unsolicited credit information.
    pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flag: the sender will receive no more data.
    pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
    /// SHUTDOWN flag: the sender will send no more data.
    pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;
}

/// Errors of the vsock device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX`) or does not fit 32 bits.
    #[error("guest CID {0} is reserved or out of range")]
    InvalidCid(u64),
    /// Binding the host-side listening socket failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating an eventfd, epoll set or timer failed.
    #[error("cannot create an event source")]
    EventSource(#[source] io::Error),
    /// The backend cannot take a guest packet now (its queue towards the guest
    /// is full); the device retries once the guest has taken packets.
    #[error("backend queue to the guest is full")]
    Backpressure,
    /// The backend has no packet for the guest.
    #[error("no packet is pending for the guest")]
    NoData,
    /// A descriptor chain does not hold a valid packet.
    #[error("malformed packet")]
    Packet(#[source] packet::PacketError),
}

/// The packet path between the device and a backend.
pub trait VsockChannel {
    /// Fills `pkt` (a guest RX buffer: header plus data space) with the next
    /// packet for the guest. [`VsockError::NoData`] when there is none.
    fn recv_pkt(&mut self, pkt: &mut VsockPacket<'_>) -> Result<(), VsockError>;
    /// Handles one packet the guest sent. [`VsockError::Backpressure`] asks the
    /// device to hold the packet and retry later; any other outcome consumes it.
    fn send_pkt(&mut self, pkt: &VsockPacket<'_>) -> Result<(), VsockError>;
    /// Whether [`Self::recv_pkt`] would produce a packet.
    fn has_pending_rx(&self) -> bool;
}

/// How a backend is woken: one file descriptor the device's event handler
/// watches on the event manager.
pub trait VsockEpollListener {
    /// The descriptor to watch.
    fn get_polled_fd(&self) -> RawFd;
    /// The events to watch for.
    fn get_polled_evset(&self) -> EventSet;
    /// Called with the events that fired.
    fn notify(&mut self, evset: EventSet);
}

/// A vsock backend: what the device talks to on the host side.
pub trait VsockBackend: VsockChannel + VsockEpollListener + Send {
    /// Drops every connection (the driver reset the device).
    fn reset(&mut self);
}
