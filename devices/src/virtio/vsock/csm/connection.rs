// SPDX-License-Identifier: Apache-2.0
//! One vsock stream connection.
//!
//! Directions are named from the guest's side, as in the virtio spec: TX is
//! guest to host (guest data is written to the host stream), RX is host to
//! guest (host data is read straight into the guest's RX buffer).
//!
//! Credit: the guest may have at most `buf_alloc` (= [`CONN_TX_BUF_SIZE`])
//! bytes in flight towards the host, counted against the `fwd_cnt` the device
//! last reported; whatever the host socket does not take at once is buffered
//! here, so a guest that overruns the buffer has ignored its credit and the
//! connection is reset. Towards the guest, the device never sends more than
//! the guest's `buf_alloc - (rx_cnt - fwd_cnt)`.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::Shutdown;
use std::num::Wrapping;
use std::time::Instant;

use vm_memory::VolatileMemoryError;
use vmm_sys_util::epoll::EventSet;

use super::{CONN_CREDIT_UPDATE_THRESHOLD, CONN_TIMEOUT, CONN_TX_BUF_SIZE, VsockStream};
use crate::virtio::count_and_warn;
use crate::virtio::vsock::metrics::VsockMetrics;
use crate::virtio::vsock::packet::{Header, VsockPacket};
use crate::virtio::vsock::uapi::*;
use crate::virtio::vsock::{VSOCK_HOST_CID, VsockError};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST pending or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected, RESPONSE not yet delivered.
    PeerInit,
    /// Data may flow (each direction until it is shut down).
    Established,
    /// The host side is gone; SHUTDOWN (both) sent or pending, waiting for the guest's RST.
    Closing,
    /// Done: the muxer removes it.
    Killed,
}

const PEND_RST: u8 = 1;
const PEND_REQUEST: u8 = 1 << 1;
const PEND_RESPONSE: u8 = 1 << 2;
const PEND_RW: u8 = 1 << 3;
const PEND_SHUTDOWN: u8 = 1 << 4;
const PEND_CREDIT_UPDATE: u8 = 1 << 5;
const PEND_CREDIT_REQUEST: u8 = 1 << 6;

/// A connection between a guest port and a host stream.
#[derive(Debug)]
pub struct VsockConnection<S: VsockStream> {
    state: ConnState,
    stream: S,
    peer_cid: u64,
    local_port: u32,
    peer_port: u32,
    /// Packets owed to the guest (`PEND_*` bits).
    pending: u8,
    /// Flags of the pending SHUTDOWN.
    shutdown_flags: u32,
    /// Bytes for the host that are not guest data (the `OK <port>\n` line).
    ctl_buf: Vec<u8>,
    /// Guest data the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    /// Guest data bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last reported to the guest.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    /// Data bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    /// The guest will receive no more (SHUTDOWN RCV).
    peer_shut_rcv: bool,
    /// The guest will send no more (SHUTDOWN SEND).
    peer_shut_send: bool,
    /// We shut down the host stream's write side after the guest's SHUTDOWN SEND.
    host_write_shut: bool,
    /// The host stream reached end of file.
    local_eof: bool,
    /// The host stream hung up or failed: it is no longer watched.
    host_hup: bool,
    expiry: Option<Instant>,
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

impl<S: VsockStream> VsockConnection<S> {
    fn new(
        state: ConnState,
        stream: S,
        peer_cid: u64,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
    ) -> Self {
        Self {
            state,
            stream,
            peer_cid,
            local_port,
            peer_port,
            pending: 0,
            shutdown_flags: 0,
            ctl_buf: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            host_write_shut: false,
            local_eof: false,
            host_hup: false,
            expiry: None,
        }
    }

    /// A guest-initiated connection whose host stream is connected: a RESPONSE
    /// is pending. `peer_buf_alloc` comes from the guest's REQUEST.
    pub fn new_peer_init(
        stream: S,
        peer_cid: u64,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
    ) -> Self {
        let mut c = Self::new(
            ConnState::PeerInit,
            stream,
            peer_cid,
            local_port,
            peer_port,
            peer_buf_alloc,
        );
        c.pending = PEND_RESPONSE;
        c
    }

    /// A host-initiated connection: a REQUEST to the guest is pending, and the
    /// guest has [`super::CONN_TIMEOUT`] to answer.
    pub fn new_local_init(stream: S, peer_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            ConnState::LocalInit,
            stream,
            peer_cid,
            local_port,
            peer_port,
            0,
        );
        c.pending = PEND_REQUEST;
        c.expiry = Some(Instant::now() + CONN_TIMEOUT);
        c
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// When the connection times out, if it is waiting for the guest.
    pub fn expiry(&self) -> Option<Instant> {
        self.expiry
    }

    /// Whether the connection is finished and can be dropped.
    pub fn is_killed(&self) -> bool {
        self.state == ConnState::Killed
    }

    /// Whether [`Self::recv_pkt`] may produce a packet.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Tears the connection down: an RST is owed to the guest and the host
    /// stream is closed (the host sees end of file).
    pub fn kill(&mut self) {
        if self.state == ConnState::Killed {
            return;
        }
        self.pending = PEND_RST;
        self.expiry = None;
        self.tx_buf = VecDeque::new();
        self.ctl_buf = Vec::new();
        self.host_hup = true;
        // The stream may already be closed by the peer; nothing to do then.
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Kills the connection if its deadline passed.
    pub fn check_timeout(&mut self, now: Instant, m: &VsockMetrics) {
        if self.expiry.is_some_and(|e| e <= now) {
            VsockMetrics::inc(&m.conn_timeouts);
            tracing::debug!(port = self.local_port, "vsock connection timed out");
            self.kill();
        }
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established && !self.peer_shut_rcv && !self.local_eof
    }

    /// Bytes the guest can still take, by its last credit report.
    fn peer_avail_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The events to watch on the host stream; `None` when it must not be
    /// watched at all (hung up, or being torn down). An empty set still
    /// reports a hang-up.
    pub fn polled_evset(&self) -> Option<EventSet> {
        if self.host_hup || self.state == ConnState::Killed || self.pending & PEND_RST != 0 {
            return None;
        }
        let mut ev = EventSet::empty();
        // Without credit, watch for host data only until a CREDIT_REQUEST went
        // out (a level-triggered readable stream would wake us in a loop).
        let credit = self.peer_avail_credit() > 0 || !self.credit_requested;
        if self.can_read_host() && self.pending & PEND_RW == 0 && credit {
            ev |= EventSet::IN;
        }
        if !self.ctl_buf.is_empty() || !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// Records the guest's credit report from a packet header. A `fwd_cnt`
    /// that claims more than the device ever sent is ignored and counted.
    fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32, m: &VsockMetrics) {
        self.peer_buf_alloc = buf_alloc;
        let advanced = (Wrapping(fwd_cnt) - self.peer_fwd_cnt).0;
        let outstanding = (self.rx_cnt - self.peer_fwd_cnt).0;
        if advanced > outstanding {
            count_and_warn(
                &m.credit_lies,
                "vsock: guest reported consuming bytes it was never sent",
            );
            return;
        }
        if advanced > 0 {
            self.credit_requested = false;
        }
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    fn bogus(&mut self, m: &VsockMetrics, op: u16) {
        count_and_warn(
            &m.bogus_op,
            &format!(
                "vsock: guest sent op {op} in connection state {:?}",
                self.state
            ),
        );
        self.kill();
    }

    /// Handles a packet the guest sent on this connection.
    pub fn send_pkt(&mut self, pkt: &VsockPacket<'_>, m: &VsockMetrics) {
        let op = pkt.op();
        if op == VSOCK_OP_RST {
            // The guest aborted (or answered our SHUTDOWN): nothing more is owed.
            self.kill();
            self.pending = 0;
            self.state = ConnState::Killed;
            return;
        }
        if self.state == ConnState::Killed || self.pending & PEND_RST != 0 {
            return;
        }
        self.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt(), m);
        match (self.state, op) {
            (ConnState::LocalInit, VSOCK_OP_RESPONSE) => {
                self.state = ConnState::Established;
                self.expiry = None;
                self.ctl_buf = format!("OK {}\n", self.local_port).into_bytes();
                self.flush(m);
            }
            (ConnState::Established | ConnState::Closing, VSOCK_OP_RW) => self.guest_data(pkt, m),
            (ConnState::Established | ConnState::Closing, VSOCK_OP_CREDIT_UPDATE) => {}
            (ConnState::Established | ConnState::Closing, VSOCK_OP_CREDIT_REQUEST) => {
                self.pending |= PEND_CREDIT_UPDATE;
            }
            (ConnState::Established | ConnState::Closing, VSOCK_OP_SHUTDOWN) => {
                self.peer_shut_rcv |= pkt.flags() & VSOCK_FLAGS_SHUTDOWN_RCV != 0;
                self.peer_shut_send |= pkt.flags() & VSOCK_FLAGS_SHUTDOWN_SEND != 0;
                if self.peer_shut_rcv {
                    self.pending &= !PEND_RW;
                }
                self.after_flush();
            }
            _ => self.bogus(m, op),
        }
    }

    fn guest_data(&mut self, pkt: &VsockPacket<'_>, m: &VsockMetrics) {
        let Some(data) = pkt.data_slice() else {
            return;
        };
        if self.peer_shut_send {
            return self.bogus(m, VSOCK_OP_RW);
        }
        VsockMetrics::add(&m.tx_bytes, data.len() as u64);
        if self.host_hup {
            // The host is gone; the guest learns it from our SHUTDOWN.
            return;
        }
        let mut written = 0;
        if self.ctl_buf.is_empty() && self.tx_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if would_block(&e) => {}
                Err(e) => return self.host_failed(m, &e.to_string()),
            }
        }
        let rest = data.len() - written;
        if rest > 0 {
            if self.tx_buf.len() + rest > CONN_TX_BUF_SIZE as usize {
                count_and_warn(
                    &m.credit_lies,
                    "vsock: guest sent more data than its credit allowed",
                );
                return self.kill();
            }
            let mut tmp = vec![0u8; rest];
            match data.offset(written) {
                Ok(tail) => {
                    tail.copy_to(&mut tmp[..]);
                }
                // Cannot happen (written <= len); drop the connection rather than guess.
                Err(_) => return self.kill(),
            }
            self.tx_buf.extend(tmp);
        }
        self.fwd_cnt += written as u32;
        self.maybe_credit_update();
    }

    fn maybe_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_to_peer).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending |= PEND_CREDIT_UPDATE;
        }
    }

    /// Writes buffered bytes to the host stream as far as it takes them.
    fn flush(&mut self, m: &VsockMetrics) {
        while !self.ctl_buf.is_empty() {
            match self.stream.write(&self.ctl_buf) {
                Ok(0) => break,
                Ok(n) => drop(self.ctl_buf.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.host_failed(m, &e.to_string()),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.host_failed(m, &e.to_string()),
            }
        }
        self.maybe_credit_update();
        self.after_flush();
    }

    /// Applies the guest's shutdowns once nothing is left to write to the host.
    fn after_flush(&mut self) {
        let drained = self.ctl_buf.is_empty() && self.tx_buf.is_empty();
        if self.peer_shut_send && drained && !self.host_write_shut && !self.host_hup {
            self.host_write_shut = true;
            // The host may have closed already; it then sees nothing anyway.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.peer_shut_rcv && self.peer_shut_send {
            if drained || self.host_hup {
                // The guest closed both directions and waits for our RST.
                self.kill();
            } else if self.expiry.is_none() {
                // Give the host a while to take the rest.
                self.expiry = Some(Instant::now() + super::CONN_TIMEOUT);
            }
        }
    }

    /// The host stream failed: drop what it cannot take and close towards the guest.
    fn host_failed(&mut self, m: &VsockMetrics, why: &str) {
        VsockMetrics::inc(&m.host_write_errors);
        tracing::debug!(port = self.local_port, why, "vsock host stream failed");
        self.tx_buf = VecDeque::new();
        self.ctl_buf = Vec::new();
        self.host_hung_up();
    }

    fn host_hung_up(&mut self) {
        self.host_hup = true;
        match self.state {
            // Read what is left, then tell the guest (see `host_eof`).
            ConnState::Established if self.local_eof => self.host_eof(),
            ConnState::Established => self.pending |= PEND_RW,
            ConnState::Closing | ConnState::Killed => {}
            ConnState::LocalInit | ConnState::PeerInit => self.kill(),
        }
    }

    fn host_eof(&mut self) {
        self.local_eof = true;
        self.pending &= !PEND_RW;
        if self.host_hup {
            self.shutdown_flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
            self.state = ConnState::Closing;
            self.expiry = Some(Instant::now() + CONN_TIMEOUT);
        } else {
            // Half close: the host only stopped writing.
            self.shutdown_flags = VSOCK_FLAGS_SHUTDOWN_SEND;
        }
        self.pending |= PEND_SHUTDOWN;
    }

    /// Handles events on the host stream.
    pub fn notify(&mut self, evset: EventSet, m: &VsockMetrics) {
        if evset.contains(EventSet::ERROR) {
            return self.host_failed(m, "socket error");
        }
        if evset.contains(EventSet::OUT) {
            self.flush(m);
        }
        if evset.contains(EventSet::HANG_UP) && !self.host_hup {
            self.host_hung_up();
        } else if evset.contains(EventSet::IN) && self.can_read_host() {
            if self.peer_avail_credit() > 0 {
                self.pending |= PEND_RW;
            } else if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= PEND_CREDIT_REQUEST;
            }
        }
    }

    fn header(&mut self, op: u16) -> Header {
        self.last_fwd_cnt_to_peer = self.fwd_cnt;
        // Every packet carries our credit, so no separate update is owed.
        self.pending &= !PEND_CREDIT_UPDATE;
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn emit(&mut self, pkt: &mut VsockPacket<'_>, op: u16, flags: u32) -> Result<(), VsockError> {
        let mut h = self.header(op);
        h.flags = flags;
        h.write_to(pkt).map_err(VsockError::Packet)
    }

    /// Fills `pkt` with the next packet for the guest.
    pub fn recv_pkt(
        &mut self,
        pkt: &mut VsockPacket<'_>,
        m: &VsockMetrics,
    ) -> Result<(), VsockError> {
        if self.pending & PEND_RST != 0 {
            self.pending = 0;
            self.state = ConnState::Killed;
            VsockMetrics::inc(&m.rst_sent);
            return self.emit(pkt, VSOCK_OP_RST, 0);
        }
        if self.pending & PEND_REQUEST != 0 {
            self.pending &= !PEND_REQUEST;
            return self.emit(pkt, VSOCK_OP_REQUEST, 0);
        }
        if self.pending & PEND_RESPONSE != 0 {
            self.pending &= !PEND_RESPONSE;
            self.state = ConnState::Established;
            return self.emit(pkt, VSOCK_OP_RESPONSE, 0);
        }
        if self.pending & PEND_RW != 0 {
            match self.read_host(pkt, m) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
            if self.pending & PEND_RST != 0 {
                return self.recv_pkt(pkt, m);
            }
        }
        if self.pending & PEND_SHUTDOWN != 0 {
            self.pending &= !PEND_SHUTDOWN;
            let flags = self.shutdown_flags;
            return self.emit(pkt, VSOCK_OP_SHUTDOWN, flags);
        }
        if self.pending & PEND_CREDIT_UPDATE != 0 {
            return self.emit(pkt, VSOCK_OP_CREDIT_UPDATE, 0);
        }
        if self.pending & PEND_CREDIT_REQUEST != 0 {
            self.pending &= !PEND_CREDIT_REQUEST;
            return self.emit(pkt, VSOCK_OP_CREDIT_REQUEST, 0);
        }
        Err(VsockError::NoData)
    }

    /// Reads host data into the guest buffer. `Ok(true)`: `pkt` holds an RW packet.
    fn read_host(
        &mut self,
        pkt: &mut VsockPacket<'_>,
        m: &VsockMetrics,
    ) -> Result<bool, VsockError> {
        self.pending &= !PEND_RW;
        if !self.can_read_host() {
            return Ok(false);
        }
        let credit = self.peer_avail_credit();
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending |= PEND_CREDIT_REQUEST;
            }
            return Ok(false);
        }
        let Some(data) = pkt.data_slice() else {
            // A header-only buffer cannot carry data; keep it for later.
            self.pending |= PEND_RW;
            return Ok(false);
        };
        let max = data.len().min(credit as usize);
        let mut buf = match data.subslice(0, max) {
            Ok(b) => b,
            Err(_) => return Ok(false),
        };
        match self.stream.read_volatile(&mut buf) {
            Ok(0) => {
                self.host_eof();
                Ok(false)
            }
            Ok(n) => {
                let mut h = self.header(VSOCK_OP_RW);
                h.len = n as u32;
                h.write_to(pkt).map_err(VsockError::Packet)?;
                self.rx_cnt += n as u32;
                VsockMetrics::add(&m.rx_bytes, n as u64);
                if self.host_hup {
                    // Not watched any more: keep draining until end of file.
                    self.pending |= PEND_RW;
                }
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(e) => {
                tracing::debug!(port = self.local_port, error = %e, "vsock host read failed");
                self.kill();
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
