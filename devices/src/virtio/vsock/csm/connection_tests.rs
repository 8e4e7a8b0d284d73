// SPDX-License-Identifier: Apache-2.0
//! Unit tests of one connection over an in-memory stream: credit arithmetic
//! (including counter wrap-around), buffering when the host is slow, and
//! protocol violations.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileSlice, WriteVolatile};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// A host stream in memory: takes at most `cap` bytes, hands out `input`.
struct FakeStream {
    evt: EventFd,
    taken: Vec<u8>,
    cap: usize,
    input: VecDeque<u8>,
    eof: bool,
    shut: std::cell::RefCell<Vec<Shutdown>>,
}

impl FakeStream {
    fn new(cap: usize) -> Self {
        Self {
            evt: EventFd::new(0).unwrap(),
            taken: Vec::new(),
            cap,
            input: VecDeque::new(),
            eof: false,
            shut: Default::default(),
        }
    }
}

impl Read for FakeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.input.len());
        for (d, s) in buf.iter_mut().zip(self.input.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

impl Write for FakeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cap - self.taken.len());
        if n == 0 && !buf.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        self.taken.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReadVolatile for FakeStream {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<'_, B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut tmp = vec![0u8; buf.len()];
        let n = self.read(&mut tmp).map_err(VolatileMemoryError::IOError)?;
        buf.copy_from(&tmp[..n]);
        Ok(n)
    }
}

impl WriteVolatile for FakeStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut tmp = vec![0u8; buf.len()];
        buf.copy_to(&mut tmp[..]);
        self.write(&tmp).map_err(VolatileMemoryError::IOError)
    }
}

impl AsRawFd for FakeStream {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl VsockStream for FakeStream {
    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        self.shut.borrow_mut().push(how);
        Ok(())
    }
}

const GUEST: u64 = 3;

fn guest_hdr(op: u16) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: VSOCK_HOST_CID,
        src_port: 10,
        dst_port: 20,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 1000,
        ..Header::default()
    }
}

/// Hands the connection a guest packet.
fn send(c: &mut VsockConnection<FakeStream>, m: &VsockMetrics, h: Header, data: &[u8]) {
    let mut hb = h.to_bytes();
    let mut db = data.to_vec();
    let d = if db.is_empty() {
        None
    } else {
        Some(&mut db[..])
    };
    // SAFETY: `hb` and `db` outlive `pkt`, which is dropped at the end of this
    // function, and nothing else touches them meanwhile.
    let mut pkt = unsafe { VsockPacket::new(&mut hb[..], d) }.unwrap();
    pkt.set_header_from_raw(&h.to_bytes()).unwrap();
    c.send_pkt(&pkt, m);
}

/// Takes the next packet for the guest, with room for `room` data bytes.
fn recv(
    c: &mut VsockConnection<FakeStream>,
    m: &VsockMetrics,
    room: usize,
) -> Option<(Header, Vec<u8>)> {
    let mut hb = [0u8; 44];
    let mut db = vec![0u8; room];
    {
        // SAFETY: as in `send`: the buffers outlive the packet (this block).
        let mut pkt = unsafe { VsockPacket::new(&mut hb[..], Some(&mut db[..])) }.unwrap();
        c.recv_pkt(&mut pkt, m).ok()?;
    }
    let h = Header::from_bytes(&hb);
    db.truncate(h.len as usize);
    Some((h, db))
}

fn established(cap: usize) -> (VsockConnection<FakeStream>, VsockMetrics) {
    let m = VsockMetrics::default();
    let mut c = VsockConnection::new_peer_init(FakeStream::new(cap), GUEST, 20, 10, 1000);
    let (h, _) = recv(&mut c, &m, 0).unwrap();
    assert_eq!(h.op, VSOCK_OP_RESPONSE);
    assert_eq!(c.state(), ConnState::Established);
    (c, m)
}

#[test]
fn credit_arithmetic_survives_counter_wrap() {
    let (mut c, m) = established(1 << 20);
    // Pretend a lot has already flowed: both counters just below the wrap.
    c.rx_cnt = Wrapping(u32::MAX - 10);
    c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
    c.peer_buf_alloc = 100;
    assert_eq!(c.peer_avail_credit(), 100);
    c.stream.input.extend(vec![7u8; 60]);
    c.notify(EventSet::IN, &m);
    let (h, d) = recv(&mut c, &m, 4096).unwrap();
    assert_eq!((h.op, d.len()), (VSOCK_OP_RW, 60));
    assert_eq!(c.rx_cnt.0, 49, "rx_cnt wrapped");
    assert_eq!(c.peer_avail_credit(), 40);
    // The guest consumed all 60 (its fwd_cnt wraps too).
    let mut u = guest_hdr(VSOCK_OP_CREDIT_UPDATE);
    u.buf_alloc = 100;
    u.fwd_cnt = 49;
    send(&mut c, &m, u, &[]);
    assert_eq!(c.peer_avail_credit(), 100);
    assert_eq!(m.credit_lies.load(std::sync::atomic::Ordering::Relaxed), 0);
    // One byte more than was sent is a lie, across the wrap as well.
    u.fwd_cnt = 50;
    send(&mut c, &m, u, &[]);
    assert_eq!(m.credit_lies.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(c.peer_fwd_cnt.0, 49);
}

#[test]
fn slow_host_is_buffered_and_credit_updates_follow_the_flush() {
    let (mut c, m) = established(1000);
    let chunk = vec![1u8; 40_000];
    send(&mut c, &m, guest_hdr(VSOCK_OP_RW), &chunk);
    assert_eq!(c.stream.taken.len(), 1000);
    assert_eq!(c.tx_buf.len(), 39_000);
    assert_eq!(c.fwd_cnt.0, 1000);
    assert_eq!(c.polled_evset(), Some(EventSet::IN | EventSet::OUT));
    assert!(!c.has_pending_rx(), "below the update threshold");
    // The host takes everything; fwd_cnt crosses the threshold.
    c.stream.cap = usize::MAX;
    c.notify(EventSet::OUT, &m);
    assert_eq!(c.stream.taken.len(), 40_000);
    assert_eq!(c.polled_evset(), Some(EventSet::IN));
    let (h, _) = recv(&mut c, &m, 0).unwrap();
    assert_eq!(
        (h.op, h.fwd_cnt, h.buf_alloc),
        (VSOCK_OP_CREDIT_UPDATE, 40_000, CONN_TX_BUF_SIZE)
    );
    assert!(recv(&mut c, &m, 0).is_none());
}

#[test]
fn data_past_the_advertised_buffer_resets() {
    let (mut c, m) = established(0);
    let chunk = vec![2u8; 64 * 1024];
    send(&mut c, &m, guest_hdr(VSOCK_OP_RW), &chunk);
    send(&mut c, &m, guest_hdr(VSOCK_OP_RW), &chunk);
    assert_eq!(c.tx_buf.len(), CONN_TX_BUF_SIZE as usize);
    assert_eq!(m.credit_lies.load(std::sync::atomic::Ordering::Relaxed), 0);
    send(&mut c, &m, guest_hdr(VSOCK_OP_RW), &[3]);
    assert_eq!(m.credit_lies.load(std::sync::atomic::Ordering::Relaxed), 1);
    let (h, _) = recv(&mut c, &m, 0).unwrap();
    assert_eq!(h.op, VSOCK_OP_RST);
    assert!(c.is_killed());
    assert_eq!(c.polled_evset(), None);
}

#[test]
fn host_initiated_ok_line_is_not_guest_data() {
    let m = VsockMetrics::default();
    let mut c = VsockConnection::new_local_init(FakeStream::new(usize::MAX), GUEST, 1 << 30, 52);
    assert!(c.expiry().is_some());
    let (h, _) = recv(&mut c, &m, 0).unwrap();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (VSOCK_OP_REQUEST, 1 << 30, 52)
    );
    let mut r = guest_hdr(VSOCK_OP_RESPONSE);
    (r.src_port, r.dst_port) = (52, 1 << 30);
    send(&mut c, &m, r, &[]);
    assert_eq!(c.stream.taken, format!("OK {}\n", 1u32 << 30).into_bytes());
    assert_eq!(c.fwd_cnt.0, 0);
    assert!(c.expiry().is_none());
    let mut d = r;
    d.op = VSOCK_OP_RW;
    send(&mut c, &m, d, b"abc");
    assert_eq!(c.fwd_cnt.0, 3);
}

#[test]
fn ops_invalid_in_state_reset_the_connection() {
    let m = VsockMetrics::default();
    let mut c = VsockConnection::new_local_init(FakeStream::new(100), GUEST, 1 << 30, 52);
    let mut d = guest_hdr(VSOCK_OP_RW);
    (d.src_port, d.dst_port) = (52, 1 << 30);
    send(&mut c, &m, d, b"too early");
    assert_eq!(m.bogus_op.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(recv(&mut c, &m, 0).unwrap().0.op, VSOCK_OP_RST);
    assert!(c.stream.taken.is_empty());

    let (mut c, m) = established(100);
    let mut sd = guest_hdr(VSOCK_OP_SHUTDOWN);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    send(&mut c, &m, sd, &[]);
    assert_eq!(*c.stream.shut.borrow(), [Shutdown::Write]);
    send(&mut c, &m, guest_hdr(VSOCK_OP_RW), b"after shutdown");
    assert_eq!(m.bogus_op.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(recv(&mut c, &m, 0).unwrap().0.op, VSOCK_OP_RST);
    assert_eq!(*c.stream.shut.borrow(), [Shutdown::Write, Shutdown::Both]);
}

#[test]
fn host_eof_then_hangup_shut_down_in_two_steps() {
    let (mut c, m) = established(100);
    c.stream.input.extend(b"bye".iter());
    c.stream.eof = true;
    c.notify(EventSet::IN, &m);
    let (h, d) = recv(&mut c, &m, 64).unwrap();
    assert_eq!((h.op, d.as_slice()), (VSOCK_OP_RW, &b"bye"[..]));
    c.notify(EventSet::IN, &m);
    let (h, _) = recv(&mut c, &m, 64).unwrap();
    assert_eq!(
        (h.op, h.flags),
        (VSOCK_OP_SHUTDOWN, VSOCK_FLAGS_SHUTDOWN_SEND)
    );
    assert_eq!(
        c.polled_evset(),
        Some(EventSet::empty()),
        "still watched for the hang-up"
    );
    c.notify(EventSet::HANG_UP, &m);
    let (h, _) = recv(&mut c, &m, 64).unwrap();
    assert_eq!(
        h.flags,
        VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV
    );
    assert_eq!(c.state(), ConnState::Closing);
    assert_eq!(c.polled_evset(), None);
    // The guest's RST ends it; a late deadline does nothing more.
    send(&mut c, &m, guest_hdr(VSOCK_OP_RST), &[]);
    assert!(c.is_killed());
    c.check_timeout(Instant::now() + CONN_TIMEOUT * 2, &m);
    assert!(recv(&mut c, &m, 0).is_none());
}
