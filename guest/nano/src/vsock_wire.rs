// SPDX-License-Identifier: Apache-2.0
//! virtio-vsock wire format (virtio 1.2 §5.10) and stream credit accounting.
//!
//! Every packet starts with a 44-byte little-endian header. Each packet also
//! carries the sender's receive-buffer size (`buf_alloc`) and how many bytes
//! it has consumed from it (`fwd_cnt`); a sender may have at most
//! `peer.buf_alloc - (tx_cnt - peer.fwd_cnt)` bytes of data in flight.

/// Size of the packet header.
pub const HEADER_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Shutdown of one or both directions (flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit information, unsolicited.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Event-queue event: the transport was reset (all connections are gone).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The name of an op, for messages.
pub const fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "REQUEST",
        OP_RESPONSE => "RESPONSE",
        OP_RST => "RST",
        OP_SHUTDOWN => "SHUTDOWN",
        OP_RW => "RW",
        OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}

/// A packet header in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Data bytes after the header.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// `OP_*`.
    pub op: u16,
    /// Op flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender consumed from its receive buffer (free-running).
    pub fwd_cnt: u32,
}

impl Header {
    /// The wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Credit accounting of one stream connection, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer, advertised in every packet.
    pub buf_alloc: u32,
    /// Bytes we consumed from it (free-running).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last sent to the peer.
    pub fwd_cnt_sent: u32,
    /// Data bytes received (free-running).
    pub rx_cnt: u32,
    /// The peer's receive buffer, from its last packet.
    pub peer_buf_alloc: u32,
    /// The peer's consumed count, from its last packet.
    pub peer_fwd_cnt: u32,
    /// Data bytes we sent (free-running).
    pub tx_cnt: u32,
}

/// What a peer's credit report says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerReport {
    /// Plausible; recorded.
    Ok,
    /// It claims to have consumed bytes we never sent; ignored.
    Lie,
}

impl Credit {
    /// A connection that advertises `buf_alloc` and knows nothing of its peer.
    pub const fn new(buf_alloc: u32) -> Self {
        Self {
            buf_alloc,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// Data bytes we may send now.
    pub const fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records the peer's `buf_alloc` and `fwd_cnt` from any packet it sent.
    pub fn peer_report(&mut self, buf_alloc: u32, fwd_cnt: u32) -> PeerReport {
        let advanced = fwd_cnt.wrapping_sub(self.peer_fwd_cnt);
        let outstanding = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc = buf_alloc;
        if advanced > outstanding {
            return PeerReport::Lie;
        }
        self.peer_fwd_cnt = fwd_cnt;
        PeerReport::Ok
    }

    /// Bytes the peer may still send us: our buffer minus what it holds.
    pub const fn our_free(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// Accounts `n` data bytes received; false when they exceed the credit
    /// we gave (the peer ignored flow control).
    pub fn received(&mut self, n: u32) -> bool {
        if n > self.our_free() {
            return false;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        true
    }

    /// Accounts `n` data bytes sent.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Accounts `n` received bytes consumed by the application.
    pub fn consumed(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Consumed bytes the peer has not heard about.
    pub const fn unreported(&self) -> u32 {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent)
    }

    /// Whether a CREDIT_UPDATE should go out now: the peer has not heard of
    /// at least `threshold` consumed bytes.
    pub const fn update_due(&self, threshold: u32) -> bool {
        self.unreported() >= threshold
    }

    /// Fills our credit into an outgoing header and records it as sent.
    pub fn stamp(&mut self, h: &mut Header) {
        h.buf_alloc = self.buf_alloc;
        h.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x0102_0304,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(op_name(OP_CREDIT_REQUEST), "CREDIT_REQUEST");
        assert_eq!(op_name(99), "unknown");
    }

    #[test]
    fn send_credit_follows_the_peer_reports() {
        let mut c = Credit::new(1000);
        assert_eq!(c.peer_free(), 0, "nothing known of the peer yet");
        assert_eq!(c.peer_report(128, 0), PeerReport::Ok);
        assert_eq!(c.peer_free(), 128);
        c.sent(100);
        assert_eq!(c.peer_free(), 28);
        c.sent(28);
        assert_eq!(c.peer_free(), 0);
        assert_eq!(c.peer_report(128, 64), PeerReport::Ok);
        assert_eq!(c.peer_free(), 64);
        // Claiming more than was ever sent is ignored.
        assert_eq!(c.peer_report(128, 129), PeerReport::Lie);
        assert_eq!(c.peer_free(), 64);
        // A peer that shrinks its buffer below what is in flight gives 0, not a wrap.
        assert_eq!(c.peer_report(10, 64), PeerReport::Ok);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn counters_wrap_around_u32() {
        let mut c = Credit::new(100);
        c.tx_cnt = u32::MAX - 10;
        c.peer_fwd_cnt = u32::MAX - 10;
        assert_eq!(c.peer_report(50, u32::MAX - 10), PeerReport::Ok);
        c.sent(30);
        assert_eq!(c.peer_free(), 20);
        assert_eq!(c.peer_report(50, 5), PeerReport::Ok);
        assert_eq!(c.peer_free(), 50 - 14);
    }

    #[test]
    fn receive_credit_and_updates() {
        let mut c = Credit::new(100);
        assert!(c.received(60));
        assert_eq!(c.our_free(), 40);
        assert!(!c.received(41), "more than the credit we gave");
        assert!(c.received(40));
        assert_eq!(c.our_free(), 0);
        c.consumed(70);
        assert_eq!(c.our_free(), 70);
        assert!(c.update_due(50));
        let mut h = Header::default();
        c.stamp(&mut h);
        assert_eq!((h.buf_alloc, h.fwd_cnt), (100, 70));
        assert!(!c.update_due(1));
        c.consumed(30);
        assert_eq!(c.unreported(), 30);
    }
}
