// SPDX-License-Identifier: Apache-2.0
//! The muxer's queue of packets owed to the guest.
//!
//! Entries name a connection with pending RX (its packets are built when the
//! guest provides a buffer) or an RST for a port pair with no connection. The
//! queue is bounded; when a connection cannot be queued it is marked out of
//! sync and rebuilt from the connection table once it drains, so connection
//! state is never lost. RSTs are only queued after the muxer checked for room.

use std::collections::VecDeque;

use super::muxer::ConnKey;

/// Capacity of the queue.
pub const MUXER_RXQ_SIZE: usize = 256;

/// One entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxerRx {
    /// A connection with pending RX.
    Conn(ConnKey),
    /// An RST from `local_port` to the guest's `peer_port`.
    Rst {
        /// Host-side port.
        local_port: u32,
        /// Guest-side port.
        peer_port: u32,
    },
}

/// The bounded queue.
#[derive(Debug)]
pub struct RxQueue {
    q: VecDeque<MuxerRx>,
    synced: bool,
}

impl Default for RxQueue {
    fn default() -> Self {
        Self {
            q: VecDeque::with_capacity(MUXER_RXQ_SIZE),
            synced: true,
        }
    }
}

impl RxQueue {
    /// Appends `rx`; on a full queue returns false and marks the queue out of sync.
    pub fn push(&mut self, rx: MuxerRx) -> bool {
        if self.q.len() >= MUXER_RXQ_SIZE {
            self.synced = false;
            return false;
        }
        self.q.push_back(rx);
        true
    }

    /// Takes the oldest entry.
    pub fn pop(&mut self) -> Option<MuxerRx> {
        self.q.pop_front()
    }

    /// Whether no more entries fit.
    pub fn is_full(&self) -> bool {
        self.q.len() >= MUXER_RXQ_SIZE
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// False after an overflow, until [`Self::mark_synced`].
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Records that the connection table was re-queued in full.
    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.q.clear();
        self.synced = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_marks_out_of_sync() {
        let mut q = RxQueue::default();
        for p in 0..MUXER_RXQ_SIZE as u32 {
            assert!(q.push(MuxerRx::Rst {
                local_port: p,
                peer_port: p
            }));
        }
        assert!(q.is_full());
        assert!(!q.push(MuxerRx::Rst {
            local_port: 0,
            peer_port: 0
        }));
        assert!(!q.is_synced());
        assert_eq!(
            q.pop(),
            Some(MuxerRx::Rst {
                local_port: 0,
                peer_port: 0
            })
        );
        q.clear();
        assert!(q.is_empty() && q.is_synced());
    }
}
