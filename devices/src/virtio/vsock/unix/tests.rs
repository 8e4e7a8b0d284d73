// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of the device with the Unix-socket muxer: a mock guest on
//! virtio-queue's `MockSplitQueue`, real Unix sockets in a temporary directory.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{LOCAL_PORT_BASE, UnixMuxer};
use crate::virtio::VirtioDevice;
use crate::virtio::vsock::csm::CONN_TX_BUF_SIZE;
use crate::virtio::vsock::packet::Header;
use crate::virtio::vsock::test_utils::*;
use crate::virtio::vsock::uapi::*;
use crate::virtio::vsock::{VSOCK_HOST_CID, Vsock, VsockBackend, VsockMetrics};

struct Env {
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        Self { _dir: dir, uds }
    }

    fn dev(&self, max_conns: usize) -> Vsock<UnixMuxer> {
        let m = metrics();
        let mux = UnixMuxer::new(GUEST_CID, &self.uds, m.clone()).unwrap();
        Vsock::with_backend(GUEST_CID, mux.with_max_connections(max_conns), m).unwrap()
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(port_path(&self.uds, port)).unwrap()
    }

    fn host_connect(&self, line: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(line).unwrap();
        c
    }
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

fn accept(l: &UnixListener) -> UnixStream {
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Reads whatever is there without blocking; Err(()) on end of file.
fn read_now(s: &mut UnixStream) -> Result<Vec<u8>, ()> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 65536];
    let r = loop {
        match s.read(&mut b) {
            Ok(0) => break Err(()),
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(out),
            Err(_) => break Err(()),
        }
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// Asserts the host stream ends: end of file, or a reset when the muxer
/// closed it with unread bytes in it.
fn host_sees_close(s: &mut UnixStream) {
    let mut b = Vec::new();
    match s.read_to_end(&mut b) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

/// Reads `n` bytes from the host stream while running the device, whose
/// buffered data only flows when the event loop runs.
fn drain_host(h: &mut H<'_>, s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        if out.len() >= n {
            break;
        }
        match read_now(s) {
            Ok(b) => out.extend(b),
            Err(()) => break,
        }
        h.pump();
    }
    out
}

type H<'a> = Harness<'a, UnixMuxer>;

fn ops(pkts: &[GuestPkt]) -> Vec<u16> {
    pkts.iter().map(|p| p.hdr.op).collect()
}

fn check_from_host(p: &GuestPkt, local: u32, peer: u32) {
    assert_eq!((p.hdr.src_cid, p.hdr.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, peer));
    assert_eq!(p.hdr.type_, VSOCK_TYPE_STREAM);
}

/// Guest connects from `gport` to host port `hport`; returns the host stream.
fn guest_connect(h: &mut H<'_>, l: &UnixListener, gport: u32, hport: u32) -> UnixStream {
    h.send(hdr(VSOCK_OP_REQUEST, gport, hport), &[]);
    let s = accept(l);
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_RESPONSE]);
    check_from_host(&rx[0], hport, gport);
    assert_eq!(rx[0].hdr.buf_alloc, CONN_TX_BUF_SIZE);
    s
}

fn rw(src: u32, dst: u32) -> Header {
    hdr(VSOCK_OP_RW, src, dst)
}

fn data_of(pkts: &[GuestPkt]) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.hdr.op == VSOCK_OP_RW)
        .flat_map(|p| p.data.clone())
        .collect()
}

#[test]
fn guest_initiated_connection_carries_data_and_shuts_down() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(1024);
    h.give_rx(16, 4096);
    let mut s = guest_connect(&mut h, &l, 5000, 1024);

    h.send(rw(5000, 1024), b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
    s.write_all(b"world").unwrap();
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(data_of(&rx), b"world");
    check_from_host(&rx[0], 1024, 5000);

    // Guest half-closes its sending side: the host reads end of file but can still write.
    let mut sd = hdr(VSOCK_OP_SHUTDOWN, 5000, 1024);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    h.send(sd, &[]);
    assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0);
    s.write_all(b"more").unwrap();
    h.pump();
    assert_eq!(data_of(&h.drv.take_rx()), b"more");

    // Full shutdown: the device answers RST and drops the connection.
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV;
    h.send(sd, &[]);
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_RST]);
    assert_eq!(h.dev().backend().connection_count(), 0);
    assert_eq!(h.metric("conns_removed"), 1);
    assert!(
        s.write_all(&[0u8; 1 << 20]).is_err(),
        "host socket is closed"
    );
}

#[test]
fn host_initiated_connection_gets_ok_and_carries_data() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    h.give_rx(16, 4096);
    // Data sent right after the CONNECT line must reach the guest, not be eaten.
    let mut c = env.host_connect(b"CONNECT 52\nearly");
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_REQUEST]);
    check_from_host(&rx[0], LOCAL_PORT_BASE, 52);

    let mut resp = hdr(VSOCK_OP_RESPONSE, 52, LOCAL_PORT_BASE);
    resp.buf_alloc = 4096;
    h.send(resp, &[]);
    assert_eq!(
        read_n(&mut c, 14),
        format!("OK {LOCAL_PORT_BASE}\n").as_bytes()
    );
    h.pump();
    assert_eq!(data_of(&h.drv.take_rx()), b"early");

    h.send(rw(52, LOCAL_PORT_BASE), b"from guest");
    assert_eq!(read_n(&mut c, 10), b"from guest");

    // Host closes: the guest gets SHUTDOWN (both), answers RST, the connection goes.
    drop(c);
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_SHUTDOWN]);
    assert_eq!(
        rx[0].hdr.flags,
        VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND
    );
    h.send(hdr(VSOCK_OP_RST, 52, LOCAL_PORT_BASE), &[]);
    assert_eq!(h.dev().backend().connection_count(), 0);
    assert_eq!(h.metric("host_conns_accepted"), 1);
}

#[test]
fn host_half_close_sends_shutdown_send_then_both() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(7);
    h.give_rx(16, 4096);
    let mut s = guest_connect(&mut h, &l, 40, 7);
    s.write_all(b"last words").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(data_of(&rx), b"last words");
    assert_eq!(rx.last().unwrap().hdr.op, VSOCK_OP_SHUTDOWN);
    assert_eq!(rx.last().unwrap().hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
    // The guest can still send to the half-closed host.
    h.send(rw(40, 7), b"reply");
    assert_eq!(read_n(&mut s, 5), b"reply");
    drop(s);
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_SHUTDOWN]);
    assert_eq!(
        rx[0].hdr.flags,
        VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND
    );
}

#[test]
fn refused_connections_get_rst() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    h.give_rx(16, 4096);
    // No socket at <uds>_9999.
    h.send(hdr(VSOCK_OP_REQUEST, 77, 9999), &[]);
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_RST]);
    check_from_host(&rx[0], 9999, 77);
    assert_eq!(h.metric("conns_refused"), 1);
    // Data for a connection that does not exist.
    h.send(rw(77, 9999), b"x");
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    // A stray RST is not answered.
    h.send(hdr(VSOCK_OP_RST, 77, 9999), &[]);
    assert!(h.drv.take_rx().is_empty());

    // Host side: the guest refuses (no listener) -> the host sees end of file, no OK.
    let mut c = env.host_connect(b"CONNECT 80\n");
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(ops(&rx), [VSOCK_OP_REQUEST]);
    h.send(hdr(VSOCK_OP_RST, 80, rx[0].hdr.src_port), &[]);
    let mut b = Vec::new();
    assert_eq!(c.read_to_end(&mut b).unwrap(), 0);

    // Malformed CONNECT lines are counted and closed.
    let mut c = env.host_connect(b"HELLO 80\n");
    h.pump();
    host_sees_close(&mut c);
    let mut c = env.host_connect(&[b'7'; 100]);
    h.pump();
    host_sees_close(&mut c);
    assert_eq!(h.metric("host_connect_bad"), 2);
}

#[test]
fn unanswered_host_connection_times_out() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    h.give_rx(4, 4096);
    let mut c = env.host_connect(b"CONNECT 80\n");
    h.pump();
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_REQUEST]);
    // The guest never answers; the muxer's timer fires after CONN_TIMEOUT.
    for _ in 0..100 {
        if h.metric("conn_timeouts") == 1 {
            break;
        }
        h.wait(100);
    }
    assert_eq!(h.metric("conn_timeouts"), 1);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    let mut b = Vec::new();
    assert_eq!(c.read_to_end(&mut b).unwrap(), 0);
    assert_eq!(h.dev().backend().connection_count(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(9);
    h.give_rx(32, 4096);
    let mut req = hdr(VSOCK_OP_REQUEST, 3, 9);
    req.buf_alloc = 100;
    h.send(req, &[]);
    let mut s = accept(&l);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RESPONSE]);
    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    s.write_all(&payload).unwrap();
    h.pump();
    let rx = h.drv.take_rx();
    assert_eq!(data_of(&rx), payload[..100]);
    assert_eq!(rx.last().unwrap().hdr.op, VSOCK_OP_CREDIT_REQUEST);

    // A lie: the guest claims to have consumed bytes it never got. Ignored.
    let mut lie = hdr(VSOCK_OP_CREDIT_UPDATE, 3, 9);
    lie.buf_alloc = 100;
    lie.fwd_cnt = 1_000_000;
    h.send(lie, &[]);
    assert!(data_of(&h.drv.take_rx()).is_empty());
    assert_eq!(h.metric("credit_lies"), 1);

    // The truth: it consumed 100 bytes. The next 100 arrive.
    let mut upd = hdr(VSOCK_OP_CREDIT_UPDATE, 3, 9);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    h.send(upd, &[]);
    assert_eq!(data_of(&h.drv.take_rx()), payload[100..200]);
    upd.fwd_cnt = 200;
    upd.buf_alloc = 1000;
    h.send(upd, &[]);
    assert_eq!(data_of(&h.drv.take_rx()), payload[200..]);
}

#[test]
fn guest_to_host_respects_device_credit() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(9);
    h.give_rx(64, 4096);
    let mut s = guest_connect(&mut h, &l, 3, 9);
    // The guest sends as its credit allows while the host does not read.
    let (mut sent, mut fwd_seen, chunk) = (0u32, 0u32, 16 * 1024u32);
    let mut expect = Vec::new();
    let mut stalled = 0;
    while stalled < 2 {
        let credit = CONN_TX_BUF_SIZE - (sent - fwd_seen);
        if credit < chunk {
            stalled += 1;
        } else {
            let data: Vec<u8> = (0..chunk)
                .map(|i| (i as u8).wrapping_add(sent as u8))
                .collect();
            h.send(rw(3, 9), &data);
            expect.extend_from_slice(&data);
            sent += chunk;
        }
        for p in h.drv.take_rx() {
            assert_ne!(p.hdr.op, VSOCK_OP_RST);
            fwd_seen = p.hdr.fwd_cnt;
        }
        if h.drv.rx_outstanding() < 16 {
            h.give_rx(8, 4096);
        }
    }
    assert!(
        sent > CONN_TX_BUF_SIZE,
        "the host socket buffer took some before the credit ran out"
    );
    assert_eq!(h.metric("credit_lies"), 0);
    // The host drains; the device flushes its buffer and tells the guest.
    let got = drain_host(&mut h, &mut s, sent as usize);
    assert_eq!(got, expect);
    h.pump();
    let rx = h.drv.take_rx();
    let last = rx.last().unwrap();
    assert_eq!(last.hdr.op, VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(last.hdr.fwd_cnt, sent);
}

#[test]
fn credit_overrun_resets_the_connection() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(9);
    let l2 = env.listen(10);
    h.give_rx(16, 4096);
    let mut s = guest_connect(&mut h, &l, 3, 9);
    let mut other = guest_connect(&mut h, &l2, 4, 10);
    let chunk = vec![0xabu8; 64 * 1024];
    let mut rst = false;
    for _ in 0..64 {
        h.send(rw(3, 9), &chunk);
        if ops(&h.drv.take_rx()).contains(&VSOCK_OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "a guest that ignores its credit is reset");
    assert_eq!(h.metric("credit_lies"), 1);
    // The host sees the stream end after the bytes that fit.
    let mut b = Vec::new();
    s.read_to_end(&mut b).unwrap();
    // Other connections are unaffected.
    h.send(rw(4, 10), b"still here");
    assert_eq!(read_n(&mut other, 10), b"still here");
}

#[test]
fn bogus_types_ops_and_cids() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(9);
    h.give_rx(16, 4096);
    let mut keep = guest_connect(&mut h, &l, 1, 9);
    let mut victim = guest_connect(&mut h, &l, 2, 9);

    let mut t = hdr(VSOCK_OP_REQUEST, 5, 9);
    t.type_ = 2;
    h.send(t, &[]);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    assert_eq!(h.metric("bogus_type"), 1);

    h.send(hdr(99, 6, 9), &[]);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    assert_eq!(h.metric("bogus_op"), 1);

    // An unknown op, and a REQUEST, on a live connection reset that connection only.
    h.send(hdr(0, 2, 9), &[]);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    assert_eq!(h.metric("bogus_op"), 2);
    let mut b = Vec::new();
    victim.read_to_end(&mut b).unwrap();
    h.send(hdr(VSOCK_OP_REQUEST, 1, 9), &[]);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RST]);
    keep.read_to_end(&mut b).unwrap();
    assert_eq!(h.metric("bogus_op"), 3);

    // Wrong CIDs are dropped without an answer.
    let mut c = hdr(VSOCK_OP_REQUEST, 7, 9);
    c.src_cid = 42;
    h.send(c, &[]);
    c.src_cid = GUEST_CID;
    c.dst_cid = 1;
    h.send(c, &[]);
    assert!(h.drv.take_rx().is_empty());
    assert_eq!(h.metric("bogus_cid"), 2);

    // A fresh connection still works.
    let mut s = guest_connect(&mut h, &l, 8, 9);
    h.send(rw(8, 9), b"fine");
    assert_eq!(read_n(&mut s, 4), b"fine");
}

#[test]
fn connection_flood_past_the_limit() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(8));
    let l = env.listen(9);
    h.give_rx(64, 256);
    for p in 100..120 {
        h.drv.send(hdr(VSOCK_OP_REQUEST, p, 9), &[]);
    }
    h.kick(crate::virtio::vsock::TXQ_INDEX);
    let rx = h.drv.take_rx();
    let n_resp = rx.iter().filter(|p| p.hdr.op == VSOCK_OP_RESPONSE).count();
    let n_rst = rx.iter().filter(|p| p.hdr.op == VSOCK_OP_RST).count();
    assert_eq!((n_resp, n_rst), (8, 12));
    assert_eq!(h.metric("conn_limit_rejected"), 12);
    let mut streams: Vec<UnixStream> = (0..8).map(|_| accept(&l)).collect();
    // The accepted ones work.
    let first = rx
        .iter()
        .find(|p| p.hdr.op == VSOCK_OP_RESPONSE)
        .unwrap()
        .hdr
        .dst_port;
    h.send(rw(first, 9), b"z");
    let mut got = 0;
    for s in &mut streams {
        got += read_now(s).unwrap().len();
    }
    assert_eq!(got, 1);
    // Host connections past the limit are closed.
    let mut c = env.host_connect(b"CONNECT 5\n");
    h.pump();
    host_sees_close(&mut c);
    assert_eq!(h.metric("conn_limit_rejected"), 13);
    // Freeing one makes room again.
    h.send(hdr(VSOCK_OP_RST, first, 9), &[]);
    h.send(hdr(VSOCK_OP_REQUEST, 500, 9), &[]);
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_RESPONSE]);
}

#[test]
fn many_connections_at_once() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(128));
    let l = env.listen(1024);
    h.give_rx(128, 1024);
    let n = 64u32;
    let mut hosts = Vec::new();
    for p in 0..n {
        hosts.push(guest_connect(&mut h, &l, 2000 + p, 1024));
        h.give_rx(1, 1024);
    }
    for p in 0..n {
        h.drv
            .send(rw(2000 + p, 1024), format!("conn {p}").as_bytes());
    }
    h.kick(crate::virtio::vsock::TXQ_INDEX);
    for (p, s) in hosts.iter_mut().enumerate() {
        let want = format!("conn {p}");
        assert_eq!(read_n(s, want.len()), want.as_bytes());
        s.write_all(format!("back {p}").as_bytes()).unwrap();
    }
    h.pump();
    let mut rx = h.drv.take_rx();
    while rx.iter().filter(|p| p.hdr.op == VSOCK_OP_RW).count() < n as usize {
        h.give_rx(64, 1024);
        let more = h.drv.take_rx();
        assert!(!more.is_empty(), "device stopped delivering");
        rx.extend(more);
    }
    for p in 0..n {
        let d: Vec<u8> = rx
            .iter()
            .filter(|x| x.hdr.op == VSOCK_OP_RW && x.hdr.dst_port == 2000 + p)
            .flat_map(|x| x.data.clone())
            .collect();
        assert_eq!(d, format!("back {p}").as_bytes());
    }
    assert_eq!(h.dev().backend().connection_count(), n as usize);
}

#[test]
fn device_reset_mid_transfer_closes_host_streams() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    let l = env.listen(9);
    h.give_rx(16, 4096);
    let mut s = guest_connect(&mut h, &l, 3, 9);
    let mut c = env.host_connect(b"CONNECT 4\n");
    h.pump();
    s.write_all(&[1u8; 10_000]).unwrap();
    h.send(rw(3, 9), &[2u8; 1000]);
    h.dev().reset();
    // Both host streams see a clean end of file, not a hang.
    let mut b = Vec::new();
    s.read_to_end(&mut b).unwrap();
    assert_eq!(b.len(), 1000);
    host_sees_close(&mut c);
    assert_eq!(h.dev().backend().connection_count(), 0);
    // The host socket still accepts after the driver comes back.
    let drv = GuestDriver::new(&mem);
    let irq = h.irq.clone();
    h.dev().activate(mem.clone(), drv.queues(), irq).unwrap();
    h.drv = drv;
    h.pump();
    h.give_rx(4, 4096);
    let _c2 = env.host_connect(b"CONNECT 4\n");
    h.pump();
    assert_eq!(ops(&h.drv.take_rx()), [VSOCK_OP_REQUEST]);
}

#[test]
fn dropping_the_muxer_removes_its_socket() {
    let env = Env::new();
    let m = UnixMuxer::new(GUEST_CID, &env.uds, metrics()).unwrap();
    assert!(env.uds.exists());
    assert!(UnixMuxer::new(GUEST_CID, &env.uds, metrics()).is_err());
    drop(m);
    assert!(!env.uds.exists());
    assert!(Vsock::new(GUEST_CID, &env.uds).is_ok());
}

#[test]
fn random_packet_headers_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let header = (
        prop_oneof![Just(GUEST_CID), any::<u64>()],
        prop_oneof![Just(VSOCK_HOST_CID), any::<u64>()],
        prop_oneof![0u32..4, any::<u32>()],
        prop_oneof![Just(9u32), 0u32..4, any::<u32>()],
        prop_oneof![0u16..9, any::<u16>()],
        prop_oneof![Just(VSOCK_TYPE_STREAM), any::<u16>()],
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(header, 1..24), |pkts| {
            let env = Env::new();
            let mem = test_mem();
            let mut h = Harness::new(&mem, env.dev(4));
            let l = env.listen(9);
            l.set_nonblocking(true).unwrap();
            h.give_rx(16, 512);
            for (src_cid, dst_cid, sp, dp, op, ty, flags, ba, fc, data) in pkts {
                let hd = Header {
                    src_cid,
                    dst_cid,
                    src_port: sp,
                    dst_port: dp,
                    len: data.len() as u32,
                    type_: ty,
                    op,
                    flags,
                    buf_alloc: ba,
                    fwd_cnt: fc,
                };
                h.send(hd, &data);
                while let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(b"noise");
                }
                h.give_rx(2, 512);
            }
            // Whatever happened, a clean connection still works.
            let _ = h.drv.take_rx();
            h.send(hdr(VSOCK_OP_RST, 1234, 9), &[]);
            h.dev().backend_mut().reset();
            h.give_rx(4, 512);
            l.set_nonblocking(false).unwrap();
            let mut s = guest_connect(&mut h, &l, 1234, 9);
            h.send(rw(1234, 9), b"alive");
            prop_assert_eq!(read_n(&mut s, 5), b"alive".to_vec());
            Ok(())
        })
        .unwrap();
}

#[test]
fn metrics_are_shared_between_device_and_muxer() {
    let env = Env::new();
    let mem = test_mem();
    let d = env.dev(1);
    // A handle taken before the device runs sees what the muxer counts.
    let m: std::sync::Arc<VsockMetrics> = d.metrics();
    let mut h = Harness::new(&mem, d);
    h.give_rx(2, 64);
    let _c = env.host_connect(b"CONNECT 5\n");
    h.pump();
    assert_eq!(m.get("host_conns_accepted"), Some(1));
    assert_eq!(m.get("conns_added"), Some(1));
    assert_eq!(m.get("rx_packets"), Some(1));
}

#[test]
fn failed_accept_pauses_the_listener_instead_of_spinning() {
    let env = Env::new();
    let mem = test_mem();
    let mut h = Harness::new(&mem, env.dev(16));
    h.give_rx(4, 256);
    h.dev().backend_mut().fail_next_accept = true;
    let _c = env.host_connect(b"CONNECT 5\n");
    // pump() fails if the still-readable listener kept waking the loop.
    h.pump();
    assert!(h.drv.take_rx().is_empty());
    // After the back-off the listener is watched again and the host gets through.
    let mut got = Vec::new();
    for _ in 0..50 {
        h.wait(50);
        got.extend(h.drv.take_rx());
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(ops(&got), [VSOCK_OP_REQUEST]);
}
