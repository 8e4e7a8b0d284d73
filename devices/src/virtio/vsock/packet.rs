// SPDX-License-Identifier: Apache-2.0
//! Packet helpers over the `virtio-vsock` crate's parser.
//!
//! [`VsockPacket`] (from `virtio-vsock` 0.12, built on the same vm-memory and
//! virtio-queue versions as this crate) parses a descriptor chain into a header
//! copy (so the guest cannot change it after the checks) and bounds-checked
//! volatile slices. This module adds the owned [`Header`] used to build packets
//! for the guest, and the chain check the device runs before parsing.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

pub use virtio_vsock::packet::{Error as PacketError, PKT_HEADER_SIZE};

/// A packet over guest memory without dirty-page tracking (`GuestMemoryMmap<()>`).
pub type VsockPacket<'a> = virtio_vsock::packet::VsockPacket<'a, ()>;

/// Whether `chain` ends where the driver said it does: virtio-queue's walker
/// stops a chain that loops, runs past the queue size, points outside the
/// table or adds up to more than 2^32 bytes, and then the last descriptor it
/// yields still has NEXT set (or it yields none at all).
pub fn chain_is_complete<M>(chain: &DescriptorChain<M>) -> bool
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut last_has_next = None;
    for desc in chain.clone() {
        last_has_next = Some(desc.has_next());
    }
    last_has_next == Some(false)
}

/// A vsock packet header, in host byte order.
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
    /// Data length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl Header {
    /// The little-endian wire form.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
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
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
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

    /// The header of a parsed packet (the copy taken at parse time).
    pub fn of(pkt: &VsockPacket<'_>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Writes this header into an RX packet's header buffer.
    pub fn write_to(&self, pkt: &mut VsockPacket<'_>) -> Result<(), PacketError> {
        pkt.set_header_from_raw(&self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_is_44_bytes_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x0102_0304,
            dst_port: 1024,
            len: 5,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 0x1_0000,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(b[30], 5);
        assert_eq!(Header::from_bytes(&b), h);
    }

    proptest! {
        #[test]
        fn header_round_trips(bytes in proptest::array::uniform32(any::<u8>()),
                              tail in proptest::array::uniform12(any::<u8>())) {
            let mut b = [0u8; PKT_HEADER_SIZE];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&tail);
            prop_assert_eq!(Header::from_bytes(&b).to_bytes(), b);
        }
    }
}
