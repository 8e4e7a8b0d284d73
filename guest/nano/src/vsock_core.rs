// SPDX-License-Identifier: Apache-2.0
//! The vsock stream socket layer, without any device: connections, their
//! state machine and credit, the listening ports, and which packet goes out
//! next. The driver (`vsock.rs` in the kernel) feeds it every packet the
//! device delivers ([`Core::on_packet`]) and asks it for packets to transmit
//! ([`Core::next_tx`]); unit tests drive it the same way with a simulated
//! host.
//!
//! Connection life (guest side):
//!
//! - `connect`: REQUEST goes out, state `Connecting`; RESPONSE makes it
//!   `Established`, RST makes it `Closed(Refused)`.
//! - A REQUEST to a listening port creates an `Established` connection,
//!   answers RESPONSE and queues it for `accept`.
//! - `close`: once queued data is sent, SHUTDOWN (both directions) goes out
//!   and the state is `Closing` until the host's RST (`Closed(Done)`). If the
//!   host had already shut both directions, RST goes out at once instead.
//! - An RST from the host closes the connection (`Reset`, or `Done` while
//!   closing); a packet that breaks the protocol resets it (`Protocol`).
//! - Connections in `Connecting` or `Closing` past their deadline are reset
//!   (`Timeout`).
//!
//! A closed connection keeps its slot (and its unread data) until the owner
//! calls `release`.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use cell0_proto::bytes::{Bytes, BytesMut};

use crate::vsock_wire::{
    Credit, HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, PeerReport, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer each connection advertises (`buf_alloc`).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// A CREDIT_UPDATE goes out once this much was consumed unreported.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Largest data payload per packet (the device's limit too).
pub const MAX_PKT_DATA: usize = 64 * 1024;
/// First port `connect` picks for the guest side.
pub const EPHEMERAL_BASE: u32 = 49152;

/// A connection handle (its slot).
pub type ConnId = usize;

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Orderly: both sides shut down.
    Done,
    /// The host refused the connection (RST to our REQUEST).
    Refused,
    /// The host reset an established connection.
    Reset,
    /// We reset it (`abort`).
    Aborted,
    /// Connecting or closing took too long.
    Timeout,
    /// The host broke the protocol (the text says how).
    Protocol(&'static str),
}

impl CloseReason {
    /// A short description.
    pub const fn describe(&self) -> &'static str {
        match self {
            CloseReason::Done => "closed",
            CloseReason::Refused => "refused by the host (RST)",
            CloseReason::Reset => "reset by the host",
            CloseReason::Aborted => "aborted by the guest",
            CloseReason::Timeout => "timed out",
            CloseReason::Protocol(why) => why,
        }
    }
}

/// A connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// REQUEST sent (or queued), waiting for RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
    /// We sent SHUTDOWN; waiting for the host's RST.
    Closing,
    /// Finished.
    Closed(CloseReason),
}

const WANT_RST: u8 = 1;
const WANT_REQUEST: u8 = 1 << 1;
const WANT_RESPONSE: u8 = 1 << 2;
const WANT_SHUTDOWN: u8 = 1 << 3;
const WANT_CREDIT_UPDATE: u8 = 1 << 4;

/// One stream connection.
#[derive(Debug)]
struct Conn {
    local_port: u32,
    peer_port: u32,
    state: State,
    credit: Credit,
    /// Received data not yet taken by the owner.
    rx: BytesMut,
    /// Bytes at the front of `rx` already counted as consumed (credit
    /// returned) though still buffered: see `Core::claim`.
    claimed: usize,
    /// The host will send no more (SHUTDOWN SEND).
    peer_eof: bool,
    /// The host will receive no more (SHUTDOWN RCV).
    peer_no_rcv: bool,
    /// Data the owner queued, not yet sent.
    sendq: VecDeque<Bytes>,
    sendq_bytes: usize,
    want: u8,
    credit_requested: bool,
    /// In the ready queue.
    queued: bool,
    /// Connect or close deadline (TSC).
    deadline: Option<u64>,
    /// The owner released it: free the slot once nothing is owed.
    released: bool,
}

impl Conn {
    fn new(local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            local_port,
            peer_port,
            state,
            credit: Credit::new(BUF_ALLOC),
            rx: BytesMut::new(),
            claimed: 0,
            peer_eof: false,
            peer_no_rcv: false,
            sendq: VecDeque::new(),
            sendq_bytes: 0,
            want: 0,
            credit_requested: false,
            queued: false,
            deadline: None,
            released: false,
        }
    }

    fn can_send_data(&self) -> bool {
        matches!(self.state, State::Established | State::Closing) && !self.peer_no_rcv
    }

    /// Whether `next_packet` would produce something.
    fn has_work(&self) -> bool {
        let want = if self.sendq.is_empty() {
            self.want
        } else {
            self.want & !WANT_SHUTDOWN
        };
        want != 0
            || (self.can_send_data()
                && !self.sendq.is_empty()
                && (self.credit.peer_free() > 0 || !self.credit_requested))
    }

    fn header(&mut self, cid: u64, op: u16) -> Header {
        let mut h = Header {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.credit.stamp(&mut h);
        // Every packet carries our credit.
        self.want &= !WANT_CREDIT_UPDATE;
        h
    }

    /// The next packet for the host; `Err(())` when the next packet would
    /// carry data but the queue has no room for a data descriptor.
    fn next_packet(&mut self, cid: u64, data_ok: bool) -> Result<Option<Tx>, ()> {
        if self.want & WANT_RST != 0 {
            self.want = 0;
            return Ok(Some(Tx::control(self.header(cid, OP_RST))));
        }
        if self.want & WANT_REQUEST != 0 {
            self.want &= !WANT_REQUEST;
            return Ok(Some(Tx::control(self.header(cid, OP_REQUEST))));
        }
        if self.want & WANT_RESPONSE != 0 {
            self.want &= !WANT_RESPONSE;
            return Ok(Some(Tx::control(self.header(cid, OP_RESPONSE))));
        }
        if self.can_send_data() && !self.sendq.is_empty() {
            let free = self.credit.peer_free() as usize;
            if free > 0 {
                if !data_ok {
                    return Err(());
                }
                let front = self.sendq.front_mut().ok_or(())?;
                let n = front.len().min(free).min(MAX_PKT_DATA);
                let data = front.split_to(n);
                if front.is_empty() {
                    self.sendq.pop_front();
                }
                self.sendq_bytes -= n;
                self.credit.sent(n as u32);
                let mut h = self.header(cid, OP_RW);
                h.len = n as u32;
                return Ok(Some(Tx {
                    header: h,
                    data: Some(data),
                }));
            }
            if !self.credit_requested {
                self.credit_requested = true;
                return Ok(Some(Tx::control(self.header(cid, OP_CREDIT_REQUEST))));
            }
        }
        if self.want & WANT_SHUTDOWN != 0 && self.sendq.is_empty() {
            self.want &= !WANT_SHUTDOWN;
            let mut h = self.header(cid, OP_SHUTDOWN);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            return Ok(Some(Tx::control(h)));
        }
        if self.want & WANT_CREDIT_UPDATE != 0 {
            return Ok(Some(Tx::control(self.header(cid, OP_CREDIT_UPDATE))));
        }
        Ok(None)
    }
}

/// A packet to transmit: its header and, for RW, the data (a slice of what
/// the owner queued; keep it alive until the device has read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tx {
    /// The header.
    pub header: Header,
    /// Data after the header.
    pub data: Option<Bytes>,
}

impl Tx {
    fn control(header: Header) -> Self {
        Self { header, data: None }
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets received.
    pub rx_packets: u64,
    /// Data bytes received.
    pub rx_bytes: u64,
    /// Packets handed out for transmission.
    pub tx_packets: u64,
    /// Data bytes handed out.
    pub tx_bytes: u64,
    /// Packets for another CID, of another type or otherwise unusable.
    pub dropped: u64,
    /// Credit reports that claimed more than we sent.
    pub credit_lies: u64,
    /// RSTs sent.
    pub rsts_sent: u64,
    /// CREDIT_UPDATEs sent on their own.
    pub credit_updates_sent: u64,
    /// CREDIT_REQUESTs sent.
    pub credit_requests_sent: u64,
    /// Connections established (both directions).
    pub established: u64,
}

/// Connect and close timeouts, in TSC cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a REQUEST may wait for its RESPONSE.
    pub connect: u64,
    /// How long a SHUTDOWN may wait for the host's RST.
    pub close: u64,
}

/// The socket layer of one vsock device.
#[derive(Debug)]
pub struct Core {
    cid: u64,
    timeouts: Timeouts,
    conns: Vec<Option<Conn>>,
    by_ports: BTreeMap<(u32, u32), ConnId>,
    listening: Vec<u32>,
    accept_q: VecDeque<ConnId>,
    /// Headers owed to no connection (RSTs to unknown ports).
    ctrl: VecDeque<Header>,
    ready: VecDeque<ConnId>,
    next_port: u32,
    /// Earliest connection deadline, if any.
    next_deadline: Option<u64>,
    /// Counters.
    pub stats: Stats,
}

impl Core {
    /// A socket layer for guest `cid`.
    pub fn new(cid: u64, timeouts: Timeouts) -> Self {
        Self {
            cid,
            timeouts,
            conns: Vec::new(),
            by_ports: BTreeMap::new(),
            listening: Vec::new(),
            accept_q: VecDeque::new(),
            ctrl: VecDeque::new(),
            ready: VecDeque::new(),
            next_port: EPHEMERAL_BASE,
            next_deadline: None,
            stats: Stats::default(),
        }
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    fn conn(&self, id: ConnId) -> &Conn {
        match self.conns.get(id) {
            Some(Some(c)) => c,
            _ => panic!("vsock: no connection {id}"),
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> &mut Conn {
        match self.conns.get_mut(id) {
            Some(Some(c)) => c,
            _ => panic!("vsock: no connection {id}"),
        }
    }

    fn insert(&mut self, conn: Conn) -> ConnId {
        let key = (conn.local_port, conn.peer_port);
        let id = match self.conns.iter().position(Option::is_none) {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.by_ports.insert(key, id);
        id
    }

    fn enqueue(&mut self, id: ConnId) {
        let c = self.conn_mut(id);
        if !c.queued && c.has_work() {
            c.queued = true;
            self.ready.push_back(id);
        }
    }

    fn set_deadline(&mut self, id: ConnId, at: u64) {
        self.conn_mut(id).deadline = Some(at);
        self.next_deadline = Some(self.next_deadline.map_or(at, |d| d.min(at)));
    }

    /// Marks a connection closed and forgets its ports.
    fn set_closed(&mut self, id: ConnId, why: CloseReason) {
        let c = self.conn_mut(id);
        if matches!(c.state, State::Closed(_)) {
            return;
        }
        c.state = State::Closed(why);
        c.deadline = None;
        c.sendq.clear();
        c.sendq_bytes = 0;
        let key = (c.local_port, c.peer_port);
        if self.by_ports.get(&key) == Some(&id) {
            self.by_ports.remove(&key);
        }
    }

    /// Closes a connection with an RST to the host.
    fn reset(&mut self, id: ConnId, why: CloseReason) {
        self.conn_mut(id).want = WANT_RST;
        self.set_closed(id, why);
        self.enqueue(id);
    }

    fn rst_unknown(&mut self, h: &Header) {
        self.ctrl.push_back(Header {
            src_cid: self.cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Opens a connection to host port `port`; `now` is the TSC.
    pub fn connect(&mut self, port: u32, now: u64) -> ConnId {
        let local = loop {
            let p = self.next_port;
            self.next_port = if p == u32::MAX { EPHEMERAL_BASE } else { p + 1 };
            if self.by_ports.range((p, 0)..=(p, u32::MAX)).next().is_none()
                && !self.listening.contains(&p)
            {
                break p;
            }
        };
        let mut c = Conn::new(local, port, State::Connecting);
        c.want = WANT_REQUEST;
        let id = self.insert(c);
        self.set_deadline(id, now.saturating_add(self.timeouts.connect));
        self.enqueue(id);
        id
    }

    /// Accepts host connections to guest port `port` from now on.
    pub fn listen(&mut self, port: u32) {
        if !self.listening.contains(&port) {
            self.listening.push(port);
        }
    }

    /// Stops accepting new connections to `port`.
    pub fn unlisten(&mut self, port: u32) {
        self.listening.retain(|p| *p != port);
    }

    /// The next connection a host opened to a listening port.
    pub fn accept(&mut self) -> Option<ConnId> {
        self.accept_q.pop_front()
    }

    /// The state of a connection.
    pub fn state(&self, id: ConnId) -> State {
        self.conn(id).state
    }

    /// The (guest, host) ports of a connection.
    pub fn ports(&self, id: ConnId) -> (u32, u32) {
        let c = self.conn(id);
        (c.local_port, c.peer_port)
    }

    /// Queues `data` for sending. Ignored (false) unless the connection is
    /// established and not yet closed by us.
    pub fn send(&mut self, id: ConnId, data: Bytes) -> bool {
        let c = self.conn_mut(id);
        if c.state != State::Established || c.want & WANT_SHUTDOWN != 0 || c.peer_no_rcv {
            return false;
        }
        if !data.is_empty() {
            c.sendq_bytes += data.len();
            c.sendq.push_back(data);
            self.enqueue(id);
        }
        true
    }

    /// Bytes queued and not yet handed to the device.
    pub fn unsent(&self, id: ConnId) -> usize {
        self.conn(id).sendq_bytes
    }

    /// Received data not yet taken.
    pub fn received(&self, id: ConnId) -> &[u8] {
        &self.conn(id).rx
    }

    /// Counts `n` more bytes as consumed: the host gets the credit back.
    fn credit_consumed(&mut self, id: ConnId, n: usize) {
        let c = self.conn_mut(id);
        c.credit.consumed(n as u32);
        if c.credit.update_due(CREDIT_UPDATE_THRESHOLD) && !matches!(c.state, State::Closed(_)) {
            c.want |= WANT_CREDIT_UPDATE;
            self.enqueue(id);
        }
    }

    /// Removes `n` bytes from the front of `received` (fewer if fewer are
    /// there); returns how many of them were not yet claimed.
    fn remove(&mut self, id: ConnId, n: usize) -> (Bytes, usize) {
        let c = self.conn_mut(id);
        let n = n.min(c.rx.len());
        let data = c.rx.split_to(n).freeze();
        let unclaimed = n.saturating_sub(c.claimed);
        c.claimed = c.claimed.saturating_sub(n);
        (data, unclaimed)
    }

    /// Drops `n` received bytes and returns their credit to the host.
    pub fn consume(&mut self, id: ConnId, n: usize) {
        let (_, unclaimed) = self.remove(id, n);
        self.credit_consumed(id, unclaimed);
    }

    /// Takes the first `n` received bytes without copying and returns their
    /// credit to the host.
    pub fn split_received(&mut self, id: ConnId, n: usize) -> Bytes {
        let (data, unclaimed) = self.remove(id, n);
        self.credit_consumed(id, unclaimed);
        data
    }

    /// Returns the credit of everything received so far while the bytes stay
    /// in `received`: for a reader that will take them all (a frame larger
    /// than our receive buffer must be able to arrive whole).
    pub fn claim(&mut self, id: ConnId) {
        let c = self.conn_mut(id);
        let n = c.rx.len() - c.claimed;
        c.claimed = c.rx.len();
        self.credit_consumed(id, n);
    }

    /// Makes room for `n` more received bytes in one buffer.
    pub fn reserve_received(&mut self, id: ConnId, n: usize) {
        self.conn_mut(id).rx.reserve(n);
    }

    /// Whether the host shut down its sending side (no more data will come
    /// beyond what `received` holds).
    pub fn peer_eof(&self, id: ConnId) -> bool {
        let c = self.conn(id);
        c.peer_eof || matches!(c.state, State::Closed(_))
    }

    /// Orderly close: queued data goes out first, then SHUTDOWN; the
    /// connection is `Closing` until the host's RST.
    pub fn close(&mut self, id: ConnId, now: u64) {
        let c = self.conn_mut(id);
        match c.state {
            State::Connecting => self.reset(id, CloseReason::Aborted),
            State::Established if c.peer_eof && c.peer_no_rcv => {
                self.reset(id, CloseReason::Done);
            }
            State::Established => {
                c.state = State::Closing;
                c.want |= WANT_SHUTDOWN;
                let at = now.saturating_add(self.timeouts.close);
                self.set_deadline(id, at);
                self.enqueue(id);
            }
            State::Closing | State::Closed(_) => {}
        }
    }

    /// Resets the connection now (RST).
    pub fn abort(&mut self, id: ConnId) {
        if !matches!(self.conn(id).state, State::Closed(_)) {
            self.reset(id, CloseReason::Aborted);
        }
    }

    /// Gives the slot back once the connection is closed and its last
    /// packet is out. Call only after the connection is `Closed`.
    pub fn release(&mut self, id: ConnId) {
        let c = self.conn_mut(id);
        assert!(
            matches!(c.state, State::Closed(_)),
            "vsock: release of an open connection"
        );
        c.released = true;
        if !c.queued && c.want == 0 {
            self.conns[id] = None;
        }
    }

    /// Live (unreleased) connections.
    pub fn open_count(&self) -> usize {
        self.conns.iter().flatten().filter(|c| !c.released).count()
    }

    /// Handles one packet from the device; `data` is its payload (for RW).
    pub fn on_packet(&mut self, h: &Header, data: &[u8]) {
        self.stats.rx_packets += 1;
        if h.dst_cid != self.cid || h.src_cid != HOST_CID || data.len() != h.len as usize {
            self.stats.dropped += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.stats.dropped += 1;
            if h.op != OP_RST {
                self.rst_unknown(h);
            }
            return;
        }
        let Some(&id) = self.by_ports.get(&(h.dst_port, h.src_port)) else {
            if h.op == OP_REQUEST && self.listening.contains(&h.dst_port) {
                let mut c = Conn::new(h.dst_port, h.src_port, State::Established);
                c.credit.peer_report(h.buf_alloc, h.fwd_cnt);
                c.want = WANT_RESPONSE;
                let id = self.insert(c);
                self.stats.established += 1;
                self.accept_q.push_back(id);
                self.enqueue(id);
            } else if h.op != OP_RST {
                self.rst_unknown(h);
            }
            return;
        };
        let Some(c) = self.conns.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        let before = c.credit.peer_free();
        if c.credit.peer_report(h.buf_alloc, h.fwd_cnt) == PeerReport::Lie {
            self.stats.credit_lies += 1;
        }
        if c.credit.peer_free() > before {
            c.credit_requested = false;
        }
        let state = c.state;
        match (state, h.op) {
            (_, OP_RST) => {
                let why = match state {
                    State::Connecting => CloseReason::Refused,
                    State::Closing => CloseReason::Done,
                    _ => CloseReason::Reset,
                };
                // The host owes nothing more, and is owed nothing.
                c.want = 0;
                self.set_closed(id, why);
            }
            (State::Connecting, OP_RESPONSE) => {
                c.state = State::Established;
                c.deadline = None;
                self.stats.established += 1;
            }
            (State::Established | State::Closing, OP_RW) => {
                if c.peer_eof {
                    return self.reset(
                        id,
                        CloseReason::Protocol("the host sent data after SHUTDOWN"),
                    );
                }
                if !c.credit.received(h.len) {
                    return self.reset(id, CloseReason::Protocol("the host overran our credit"));
                }
                // Data for a connection we are closing is read and dropped.
                if state == State::Established {
                    c.rx.extend_from_slice(data);
                } else {
                    c.credit.consumed(h.len);
                }
                self.stats.rx_bytes += u64::from(h.len);
            }
            (State::Established | State::Closing, OP_CREDIT_UPDATE) => {}
            (State::Established | State::Closing, OP_CREDIT_REQUEST) => {
                c.want |= WANT_CREDIT_UPDATE;
            }
            (State::Established | State::Closing, OP_SHUTDOWN) => {
                c.peer_eof |= h.flags & SHUTDOWN_SEND != 0;
                c.peer_no_rcv |= h.flags & SHUTDOWN_RCV != 0;
                if c.peer_no_rcv {
                    c.sendq.clear();
                    c.sendq_bytes = 0;
                }
                if state == State::Closing && c.peer_eof && c.peer_no_rcv {
                    // Both sides are done: finish with our RST.
                    return self.reset(id, CloseReason::Done);
                }
            }
            (State::Closed(_), _) => {}
            (_, op) => {
                let why = match op {
                    OP_REQUEST => "the host sent REQUEST on an open connection",
                    OP_RESPONSE => "the host sent RESPONSE on an established connection",
                    OP_RW | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST | OP_SHUTDOWN => {
                        "the host sent data or credit before RESPONSE"
                    }
                    _ => "the host sent an unknown op",
                };
                return self.reset(id, CloseReason::Protocol(why));
            }
        }
        self.enqueue(id);
    }

    /// Resets every connection (the device reported a transport reset).
    pub fn transport_reset(&mut self) {
        for id in 0..self.conns.len() {
            if let Some(c) = &mut self.conns[id] {
                c.want = 0;
                self.set_closed(id, CloseReason::Reset);
            }
        }
        self.ctrl.clear();
        self.ready.clear();
        for c in self.conns.iter_mut().flatten() {
            c.queued = false;
        }
        self.accept_q.clear();
    }

    /// Resets connections whose connect or close deadline passed.
    pub fn tick(&mut self, now: u64) {
        if self.next_deadline.is_none_or(|d| now < d) {
            return;
        }
        self.next_deadline = None;
        for id in 0..self.conns.len() {
            let Some(deadline) = self.conns[id].as_ref().and_then(|c| c.deadline) else {
                continue;
            };
            match Some(deadline) {
                Some(d) if d <= now => self.reset(id, CloseReason::Timeout),
                Some(d) => self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
    }

    /// Whether a packet is waiting to go out.
    pub fn has_tx(&self) -> bool {
        !self.ctrl.is_empty() || !self.ready.is_empty()
    }

    /// The next packet to transmit, given the free descriptors of the TX
    /// queue (a data packet needs two, any other one). `None` when nothing
    /// can go out now.
    pub fn next_tx(&mut self, free_descs: usize) -> Option<Tx> {
        if free_descs == 0 {
            return None;
        }
        if let Some(h) = self.ctrl.pop_front() {
            self.stats.tx_packets += 1;
            self.stats.rsts_sent += 1;
            return Some(Tx::control(h));
        }
        let cid = self.cid;
        while let Some(id) = self.ready.pop_front() {
            let Some(c) = self.conns[id].as_mut() else {
                continue;
            };
            c.queued = false;
            let pkt = match c.next_packet(cid, free_descs >= 2) {
                Ok(p) => p,
                Err(()) => {
                    // Needs a data descriptor: keep its turn.
                    c.queued = true;
                    self.ready.push_front(id);
                    return None;
                }
            };
            if c.has_work() {
                c.queued = true;
                self.ready.push_back(id);
            } else if c.released && c.want == 0 {
                self.conns[id] = None;
            }
            let Some(pkt) = pkt else { continue };
            self.stats.tx_packets += 1;
            match pkt.header.op {
                OP_RST => self.stats.rsts_sent += 1,
                OP_CREDIT_UPDATE => self.stats.credit_updates_sent += 1,
                OP_CREDIT_REQUEST => self.stats.credit_requests_sent += 1,
                OP_RW => self.stats.tx_bytes += u64::from(pkt.header.len),
                _ => {}
            }
            return Some(pkt);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;
    const T: Timeouts = Timeouts {
        connect: 1000,
        close: 1000,
    };

    /// A packet from the host to the guest.
    fn host(op: u16, host_port: u32, guest_port: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: CID,
            src_port: host_port,
            dst_port: guest_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 128 * 1024,
            fwd_cnt: 0,
        }
    }

    fn drain(core: &mut Core) -> Vec<Tx> {
        let mut v = vec![];
        while let Some(p) = core.next_tx(64) {
            v.push(p);
        }
        v
    }

    fn ops(v: &[Tx]) -> Vec<u16> {
        v.iter().map(|p| p.header.op).collect()
    }

    fn established(core: &mut Core, port: u32) -> (ConnId, u32) {
        let id = core.connect(port, 0);
        let out = drain(core);
        assert_eq!(ops(&out), [OP_REQUEST]);
        let local = out[0].header.src_port;
        assert_eq!(out[0].header.dst_port, port);
        assert_eq!(out[0].header.buf_alloc, BUF_ALLOC);
        core.on_packet(&host(OP_RESPONSE, port, local), &[]);
        assert_eq!(core.state(id), State::Established);
        (id, local)
    }

    #[test]
    fn connect_send_receive_and_close_in_order() {
        let mut core = Core::new(CID, T);
        let (id, local) = established(&mut core, 1024);
        assert!(core.send(id, Bytes::from_static(b"hello")));
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RW]);
        assert_eq!(out[0].data.as_deref(), Some(&b"hello"[..]));
        assert_eq!(out[0].header.len, 5);
        let mut rw = host(OP_RW, 1024, local);
        rw.len = 3;
        core.on_packet(&rw, b"abc");
        assert_eq!(core.received(id), b"abc");
        core.consume(id, 2);
        assert_eq!(core.received(id), b"c");
        core.on_packet(&rw, b"def");
        core.claim(id);
        assert_eq!(core.received(id), b"cdef");
        assert!(
            drain(&mut core).is_empty(),
            "4 bytes claimed: below the threshold"
        );
        assert_eq!(&core.split_received(id, 3)[..], b"cde");
        assert_eq!(core.received(id), b"f");
        core.close(id, 3);
        assert_eq!(core.state(id), State::Closing);
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_SHUTDOWN]);
        assert_eq!(out[0].header.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(out[0].header.fwd_cnt, 6, "claimed bytes count as consumed");
        core.on_packet(&host(OP_RST, 1024, local), &[]);
        assert_eq!(core.state(id), State::Closed(CloseReason::Done));
        core.release(id);
        assert_eq!(core.open_count(), 0);
    }

    #[test]
    fn refused_and_timed_out_connections() {
        let mut core = Core::new(CID, T);
        let a = core.connect(1024, 0);
        let b = core.connect(1024, 0);
        let out = drain(&mut core);
        let (pa, pb) = (out[0].header.src_port, out[1].header.src_port);
        assert_ne!(pa, pb, "each connection gets its own port");
        core.on_packet(&host(OP_RST, 1024, pa), &[]);
        assert_eq!(core.state(a), State::Closed(CloseReason::Refused));
        core.tick(999);
        assert_eq!(core.state(b), State::Connecting);
        core.tick(1000);
        assert_eq!(core.state(b), State::Closed(CloseReason::Timeout));
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
    }

    #[test]
    fn data_respects_peer_credit_and_packet_size() {
        let mut core = Core::new(CID, T);
        let (id, local) = established(&mut core, 1024);
        // The host has 128 KiB of buffer: 64 KiB + 64 KiB, then a credit request.
        core.send(id, Bytes::from(vec![7u8; 200 * 1024]));
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RW, OP_RW, OP_CREDIT_REQUEST]);
        assert_eq!(out[0].header.len as usize, MAX_PKT_DATA);
        assert_eq!(core.unsent(id), 72 * 1024);
        // Nothing more until credit comes back; no second request.
        assert!(drain(&mut core).is_empty());
        let mut upd = host(OP_CREDIT_UPDATE, 1024, local);
        upd.fwd_cnt = 100 * 1024;
        core.on_packet(&upd, &[]);
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RW, OP_RW]);
        assert_eq!(out[0].header.len as usize, 64 * 1024);
        assert_eq!(out[1].header.len as usize, 8 * 1024);
        assert_eq!(core.unsent(id), 0);
    }

    #[test]
    fn a_data_packet_waits_for_two_descriptors() {
        let mut core = Core::new(CID, T);
        let (id, _) = established(&mut core, 1024);
        core.send(id, Bytes::from_static(b"x"));
        assert_eq!(core.next_tx(1), None);
        assert!(core.has_tx());
        assert_eq!(core.next_tx(2).map(|p| p.header.op), Some(OP_RW));
    }

    #[test]
    fn receive_credit_is_returned_and_enforced() {
        let mut core = Core::new(CID, T);
        let (id, local) = established(&mut core, 1024);
        let chunk = vec![1u8; 32 * 1024];
        let mut rw = host(OP_RW, 1024, local);
        rw.len = chunk.len() as u32;
        for _ in 0..8 {
            core.on_packet(&rw, &chunk);
        }
        assert_eq!(core.received(id).len(), BUF_ALLOC as usize);
        assert!(
            drain(&mut core).is_empty(),
            "nothing consumed, nothing to report"
        );
        core.consume(id, CREDIT_UPDATE_THRESHOLD as usize);
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_CREDIT_UPDATE]);
        assert_eq!(out[0].header.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        // A request for credit is answered at once.
        core.on_packet(&host(OP_CREDIT_REQUEST, 1024, local), &[]);
        assert_eq!(ops(&drain(&mut core)), [OP_CREDIT_UPDATE]);
        // Sending more than the credit left resets the connection.
        rw.len = CREDIT_UPDATE_THRESHOLD + 1;
        core.on_packet(&rw, &vec![0u8; rw.len as usize]);
        assert!(matches!(
            core.state(id),
            State::Closed(CloseReason::Protocol(_))
        ));
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
    }

    #[test]
    fn listening_port_accepts_and_answers() {
        let mut core = Core::new(CID, T);
        core.listen(5000);
        core.on_packet(&host(OP_REQUEST, 1 << 30, 5000), &[]);
        let id = core.accept().unwrap();
        assert_eq!(core.state(id), State::Established);
        assert_eq!(core.ports(id), (5000, 1 << 30));
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RESPONSE]);
        assert_eq!(out[0].header.dst_port, 1 << 30);
        // A REQUEST to a port nobody listens on is refused.
        core.on_packet(&host(OP_REQUEST, 1 << 30, 5001), &[]);
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RST]);
        assert_eq!(
            (out[0].header.src_port, out[0].header.dst_port),
            (5001, 1 << 30)
        );
        // The host closes: SHUTDOWN both, then our close answers RST at once.
        let mut sd = host(OP_SHUTDOWN, 1 << 30, 5000);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        core.on_packet(&sd, &[]);
        assert!(core.peer_eof(id));
        assert!(!core.send(id, Bytes::from_static(b"late")));
        core.close(id, 2);
        assert_eq!(core.state(id), State::Closed(CloseReason::Done));
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
    }

    #[test]
    fn close_flushes_queued_data_before_shutdown() {
        let mut core = Core::new(CID, T);
        let (id, local) = established(&mut core, 1024);
        core.send(id, Bytes::from_static(b"last words"));
        core.close(id, 5);
        let out = drain(&mut core);
        assert_eq!(ops(&out), [OP_RW, OP_SHUTDOWN]);
        // The host's SHUTDOWN (both) while closing ends it with our RST.
        let mut sd = host(OP_SHUTDOWN, 1024, local);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        core.on_packet(&sd, &[]);
        assert_eq!(core.state(id), State::Closed(CloseReason::Done));
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
        // A close that never gets its RST times out.
        let (id2, _) = established(&mut core, 1024);
        core.close(id2, 10);
        drain(&mut core);
        core.tick(10 + 1000);
        assert_eq!(core.state(id2), State::Closed(CloseReason::Timeout));
    }

    #[test]
    fn foreign_and_bogus_packets() {
        let mut core = Core::new(CID, T);
        let (id, local) = established(&mut core, 1024);
        let mut wrong_cid = host(OP_RW, 1024, local);
        wrong_cid.dst_cid = 4;
        core.on_packet(&wrong_cid, &[]);
        let mut short = host(OP_RW, 1024, local);
        short.len = 10;
        core.on_packet(&short, b"abc");
        assert_eq!(core.stats.dropped, 2);
        assert_eq!(core.state(id), State::Established);
        // A credit lie is counted and ignored.
        let mut lie = host(OP_CREDIT_UPDATE, 1024, local);
        lie.fwd_cnt = 99;
        core.on_packet(&lie, &[]);
        assert_eq!(core.stats.credit_lies, 1);
        // RST to an unknown connection is ignored; other ops get an RST.
        core.on_packet(&host(OP_RST, 1024, 7), &[]);
        core.on_packet(&host(OP_RW, 1024, 7), &[]);
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
        // RESPONSE on an established connection breaks the protocol.
        core.on_packet(&host(OP_RESPONSE, 1024, local), &[]);
        assert!(matches!(
            core.state(id),
            State::Closed(CloseReason::Protocol(_))
        ));
        assert_eq!(ops(&drain(&mut core)), [OP_RST]);
        // The slot is reused after release.
        core.release(id);
        let id2 = core.connect(1024, 0);
        assert_eq!(id2, id);
    }

    #[test]
    fn many_connections_share_the_queue_fairly() {
        let mut core = Core::new(CID, T);
        let ids: Vec<_> = (0..64).map(|_| established(&mut core, 1024).0).collect();
        for &id in &ids {
            core.send(id, Bytes::from(vec![0u8; 100 * 1024]));
        }
        // The first 64 packets go to 64 different connections.
        let first: Vec<u32> = (0..64)
            .map(|_| core.next_tx(2).unwrap().header.src_port)
            .collect();
        let mut uniq = first.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 64);
        core.transport_reset();
        assert!(!core.has_tx());
        assert!(
            ids.iter()
                .all(|id| core.state(*id) == State::Closed(CloseReason::Reset))
        );
    }
}
