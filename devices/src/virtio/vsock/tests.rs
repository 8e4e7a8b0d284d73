// SPDX-License-Identifier: Apache-2.0
//! Device tests over the in-memory backend: the packet path through the queues,
//! interrupts, backpressure, and the malformed-chain half of the malicious-guest list.
#![allow(clippy::unwrap_used)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use super::packet::{Header, PKT_HEADER_SIZE};
use super::test_utils::*;
use super::uapi::*;
use super::*;
use crate::virtio::{Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn test_dev() -> Vsock<TestBackend> {
    let m = metrics();
    Vsock::with_backend(GUEST_CID, TestBackend::new(), m).unwrap()
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

#[test]
fn reports_type_features_queues_and_cid() {
    let d = test_dev();
    assert_eq!(d.device_type(), 19);
    assert_ne!(d.avail_features() & VIRTIO_F_VERSION_1, 0);
    assert_eq!(d.queue_max_sizes(), &[256, 256, 256]);
    let mut b = [0xffu8; 8];
    d.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST_CID);
    let mut b = [0xffu8; 4];
    d.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    // Out of range, including offsets that would overflow.
    let mut b = [0xffu8; 4];
    d.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    d.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn rejects_reserved_cids() {
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::with_backend(cid, TestBackend::new(), metrics()),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
}

#[test]
fn activation_checks_queues() {
    let mem = test_mem();
    let drv = GuestDriver::new(&mem);
    let mut d = test_dev();
    let irq = Interrupt::new().unwrap();
    let mut qs = drv.queues();
    qs.pop();
    assert!(matches!(
        d.activate(mem.clone(), qs, irq.clone()),
        Err(VirtioError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
    let mut qs = drv.queues();
    qs[TXQ_INDEX].queue.set_ready(false);
    assert!(matches!(
        d.activate(mem.clone(), qs, irq.clone()),
        Err(VirtioError::QueueNotReady(1))
    ));
    assert!(!d.is_activated());
    d.activate(mem.clone(), drv.queues(), irq.clone()).unwrap();
    assert!(d.is_activated());
    assert!(matches!(
        d.activate(mem.clone(), drv.queues(), irq),
        Err(VirtioError::AlreadyActive)
    ));
    assert_eq!(d.metrics().get("activate_fails"), Some(3));
    d.reset();
    assert!(!d.is_activated());
    assert_eq!(d.backend().resets, 1);
}

#[test]
fn tx_packets_reach_the_backend_and_raise_an_interrupt() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    assert!(!h.irq_fired());
    h.send(hdr(VSOCK_OP_RW, 1000, 1024), b"hello");
    h.send(hdr(VSOCK_OP_REQUEST, 1001, 1024), &[]);
    assert_eq!(h.drv.tx_used(), 2);
    assert!(h.irq_fired());
    assert_ne!(h.irq.status() & crate::virtio::INT_USED_RING, 0);
    let d = h.dev();
    assert_eq!(d.backend().tx.len(), 2);
    assert_eq!(d.backend().tx[0].data, b"hello");
    assert_eq!(d.backend().tx[0].hdr.src_port, 1000);
    assert_eq!(d.backend().tx[1].hdr.op, VSOCK_OP_REQUEST);
    assert_eq!(d.metrics().get("tx_packets"), Some(2));
}

#[test]
fn single_descriptor_packets_are_accepted() {
    // Linux >= 6.2 puts header and data in one descriptor.
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    let a = h.drv.alloc(64);
    let mut hd = hdr(VSOCK_OP_RW, 5, 6);
    hd.len = 3;
    mem.write_slice(&hd.to_bytes(), a).unwrap();
    mem.write_slice(b"abc", a.unchecked_add(PKT_HEADER_SIZE as u64))
        .unwrap();
    h.drv
        .push_chain(TXQ_INDEX, &[(a, PKT_HEADER_SIZE as u32 + 3, 0)]);
    h.kick(TXQ_INDEX);
    assert_eq!(h.dev().backend().tx[0].data, b"abc");
}

fn pkt(op: u16, data: &[u8]) -> GuestPkt {
    let mut hdr = hdr(op, 1024, 7);
    std::mem::swap(&mut hdr.src_cid, &mut hdr.dst_cid);
    GuestPkt {
        hdr,
        data: data.to_vec(),
    }
}

#[test]
fn backend_packets_wait_for_rx_buffers() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"one"));
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"two"));
    h.dev().backend().evfd.write(1).unwrap();
    h.pump();
    assert!(h.drv.take_rx().is_empty());
    h.give_rx(1, 4096);
    let got = h.drv.take_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, b"one");
    assert!(h.irq_fired());
    h.give_rx(4, 4096);
    let got = h.drv.take_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, b"two");
    assert_eq!(h.drv.rx_outstanding(), 3);
    assert_eq!(h.metric("rx_packets"), 2);
}

#[test]
fn backpressure_holds_tx_until_rx_progresses() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    h.dev().backend_mut().backpressure = true;
    h.send(hdr(VSOCK_OP_RW, 1, 2), b"x");
    assert_eq!(h.drv.tx_used(), 0);
    assert!(h.dev().active.as_ref().unwrap().tx_stalled);
    h.dev().backend_mut().backpressure = false;
    // RX progress (the guest takes a packet) resumes TX.
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"y"));
    h.give_rx(1, 64);
    assert_eq!(h.drv.take_rx().len(), 1);
    assert_eq!(h.drv.tx_used(), 1);
    assert_eq!(h.dev().backend().tx[0].data, b"x");
}

#[test]
fn event_queue_kicks_are_harmless() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    h.kick_evq();
    h.kick_evq();
    assert_eq!(h.metric("ev_queue_events"), 2);
}

/// After each attack the device must still carry a good packet both ways.
fn still_serves(h: &mut Harness<'_, TestBackend>) {
    let before = h.dev().backend().tx.len();
    h.send(hdr(VSOCK_OP_RW, 9, 9), b"ok");
    let d = h.dev();
    assert_eq!(d.backend().tx.len(), before + 1, "device stopped taking TX");
    assert_eq!(d.backend().tx.last().unwrap().data, b"ok");
    drop(d);
    h.dev()
        .backend_mut()
        .rx
        .push_back(pkt(VSOCK_OP_RW, b"back"));
    // Packets an attack left queued come first.
    h.give_rx(4, 64);
    let got = h.drv.take_rx();
    assert_eq!(got.last().map(|p| p.data.clone()), Some(b"back".to_vec()));
    assert!(!h.irq.needs_reset());
}

#[test]
fn malicious_tx_chain_loop() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    let ha = h.drv.alloc(64);
    let mut hd = hdr(VSOCK_OP_RW, 1, 2);
    hd.len = 8;
    mem.write_slice(&hd.to_bytes(), ha).unwrap();
    let ix = h.drv.alloc_indices(TXQ_INDEX, 2);
    // a -> b -> a -> ...
    h.drv.push_raw(
        TXQ_INDEX,
        &[
            (ix[0], raw(ha.0, 44, NEXT, ix[1])),
            (ix[1], raw(ha.0, 64, NEXT, ix[0])),
        ],
        ix[0],
    );
    // A single descriptor pointing at itself.
    let s = h.drv.alloc_indices(TXQ_INDEX, 1)[0];
    h.drv.push_raw(TXQ_INDEX, &[(s, raw(ha.0, 64, NEXT, s))], s);
    h.kick(TXQ_INDEX);
    assert_eq!(
        h.drv.tx_used(),
        2,
        "looping chains are returned, not retried"
    );
    assert_eq!(h.metric("tx_bad_chain"), 2);
    assert!(h.dev().backend().tx.is_empty());
    still_serves(&mut h);
}

#[test]
fn malicious_rx_chain_loop() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    let a = h.drv.alloc(4096);
    let ix = h.drv.alloc_indices(RXQ_INDEX, 2);
    h.drv.push_raw(
        RXQ_INDEX,
        &[
            (ix[0], raw(a.0, 44, NEXT | WRITE, ix[1])),
            (ix[1], raw(a.0, 64, NEXT | WRITE, ix[0])),
        ],
        ix[0],
    );
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"z"));
    h.kick(RXQ_INDEX);
    assert_eq!(h.metric("rx_bad_chain"), 1);
    let used = h.drv.take_rx_raw();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len(), 0);
    // The packet was not lost: the next good buffer carries it.
    h.give_rx(1, 64);
    assert_eq!(h.drv.take_rx()[0].data, b"z");
    still_serves(&mut h);
}

#[test]
fn malicious_out_of_bounds_addresses() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    // Header outside guest memory.
    h.drv
        .push_chain(TXQ_INDEX, &[(GuestAddress(MEM_SIZE + 0x1000), 44, 0)]);
    // Header straddling the end of memory.
    h.drv
        .push_chain(TXQ_INDEX, &[(GuestAddress(MEM_SIZE - 20), 44, 0)]);
    // Valid header, data outside memory.
    let ha = h.drv.alloc(44);
    let mut hd = hdr(VSOCK_OP_RW, 1, 2);
    hd.len = 100;
    mem.write_slice(&hd.to_bytes(), ha).unwrap();
    h.drv.push_chain(
        TXQ_INDEX,
        &[(ha, 44, 0), (GuestAddress(u64::MAX - 50), 100, 0)],
    );
    h.kick(TXQ_INDEX);
    assert_eq!(h.drv.tx_used(), 3);
    assert_eq!(h.metric("tx_bad_addr"), 3);
    // RX buffers outside memory.
    h.drv.push_chain(
        RXQ_INDEX,
        &[
            (GuestAddress(u64::MAX - 10), 44, WRITE),
            (GuestAddress(0x20_0000), 64, WRITE),
        ],
    );
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"q"));
    h.kick(RXQ_INDEX);
    assert_eq!(h.metric("rx_bad_buffer"), 1);
    assert_eq!(h.drv.take_rx_raw()[0].len(), 0);
    h.give_rx(1, 64);
    assert_eq!(h.drv.take_rx()[0].data, b"q");
    still_serves(&mut h);
}

#[test]
fn malicious_length_overflow() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    // Header claims 4 GiB of data.
    let ha = h.drv.alloc(44);
    let mut hd = hdr(VSOCK_OP_RW, 1, 2);
    hd.len = u32::MAX;
    mem.write_slice(&hd.to_bytes(), ha).unwrap();
    let da = h.drv.alloc(64);
    h.drv.push_chain(TXQ_INDEX, &[(ha, 44, 0), (da, 64, 0)]);
    // Header claims more than the data descriptor holds.
    let ha2 = h.drv.alloc(44);
    hd.len = 1000;
    mem.write_slice(&hd.to_bytes(), ha2).unwrap();
    h.drv.push_chain(TXQ_INDEX, &[(ha2, 44, 0), (da, 64, 0)]);
    // Descriptor lengths that add up past 2^32.
    h.drv.push_chain(
        TXQ_INDEX,
        &[(ha, u32::MAX, 0), (da, u32::MAX, 0), (da, 8, 0)],
    );
    h.kick(TXQ_INDEX);
    assert_eq!(h.drv.tx_used(), 3);
    assert_eq!(h.metric("tx_bad_len"), 1);
    assert_eq!(h.metric("tx_bad_desc"), 1);
    assert_eq!(h.metric("tx_bad_chain"), 1);
    // An RX data buffer past the 64 KiB packet limit.
    let a = h.drv.alloc(44);
    h.drv.push_chain(
        RXQ_INDEX,
        &[(a, 44, WRITE), (GuestAddress(0x20_0000), 1 << 20, WRITE)],
    );
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"q"));
    h.kick(RXQ_INDEX);
    assert_eq!(h.metric("rx_bad_buffer"), 1);
    still_serves(&mut h);
}

#[test]
fn malicious_zero_length_buffers() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    let ha = h.drv.alloc(44);
    h.drv.push_chain(TXQ_INDEX, &[(ha, 0, 0)]);
    let mut hd = hdr(VSOCK_OP_RW, 1, 2);
    hd.len = 4;
    mem.write_slice(&hd.to_bytes(), ha).unwrap();
    h.drv.push_chain(TXQ_INDEX, &[(ha, 44, 0), (ha, 0, 0)]);
    // A device-writable TX buffer.
    h.drv.push_chain(TXQ_INDEX, &[(ha, 44, WRITE)]);
    h.kick(TXQ_INDEX);
    assert_eq!(h.drv.tx_used(), 3);
    assert_eq!(h.metric("tx_bad_desc"), 3);
    // Zero-length RX header and data buffers, and a read-only one.
    let a = h.drv.alloc(64);
    h.drv
        .push_chain(RXQ_INDEX, &[(a, 0, WRITE), (a, 64, WRITE)]);
    h.drv.push_chain(RXQ_INDEX, &[(a, 44, WRITE)]);
    h.drv.push_chain(RXQ_INDEX, &[(a, 44, 0), (a, 64, 0)]);
    h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"q"));
    h.kick(RXQ_INDEX);
    assert_eq!(h.metric("rx_bad_buffer"), 3);
    still_serves(&mut h);
}

#[test]
fn malicious_avail_index_marks_needs_reset_and_reset_recovers() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    // Claim 1000 new buffers in a 256-entry ring.
    h.drv.set_avail_idx(TXQ_INDEX, 1000);
    h.kick(TXQ_INDEX);
    assert_eq!(h.metric("queue_errors"), 1);
    assert!(h.irq.needs_reset());
    assert_ne!(h.irq.status() & crate::virtio::INT_CONFIG, 0);
    // Broken until reset: kicks do nothing.
    h.kick(TXQ_INDEX);
    assert_eq!(h.metric("queue_errors"), 1);
    // Driver resets and re-activates on fresh rings.
    h.dev().reset();
    let drv = GuestDriver::new(&mem);
    h.dev()
        .activate(mem.clone(), drv.queues(), h.irq.clone())
        .unwrap();
    h.drv = drv;
    h.pump();
    h.irq.ack(u32::MAX);
    still_serves_after_reset(&mut h);
}

fn still_serves_after_reset(h: &mut Harness<'_, TestBackend>) {
    h.send(hdr(VSOCK_OP_RW, 9, 9), b"ok");
    assert_eq!(h.dev().backend().tx.last().unwrap().data, b"ok");
}

#[test]
fn random_chains_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let desc = (
        prop_oneof![0u64..MEM_SIZE, Just(MEM_SIZE - 8), any::<u64>()],
        prop_oneof![0u32..128, Just(44u32), any::<u32>()],
        0u16..8,
        0u16..300,
    );
    runner
        .run(
            &proptest::collection::vec((desc, any::<bool>()), 1..12),
            |chains| {
                let mem = test_mem();
                let mut h = Harness::new(&mem, test_dev());
                for ((addr, len, flags, next), rx) in chains {
                    let qi = if rx { RXQ_INDEX } else { TXQ_INDEX };
                    let i = h.drv.alloc_indices(qi, 1)[0];
                    // Garbage header bytes where the descriptor points, if it can.
                    let _ = mem.write_slice(&[0x5a; 44], GuestAddress(addr));
                    h.drv.push_raw(qi, &[(i, raw(addr, len, flags, next))], i);
                }
                h.dev().backend_mut().rx.push_back(pkt(VSOCK_OP_RW, b"q"));
                h.kick(TXQ_INDEX);
                h.kick(RXQ_INDEX);
                prop_assert!(!h.irq.needs_reset());
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn header_of_parsed_packet_matches_what_the_guest_wrote() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    let mut hd = hdr(VSOCK_OP_CREDIT_UPDATE, 77, 88);
    hd.flags = 3;
    hd.buf_alloc = 1234;
    hd.fwd_cnt = 99;
    h.send(hd, &[]);
    let got: Header = h.dev().backend().tx[0].hdr;
    assert_eq!(got, hd);
}

#[test]
fn malicious_head_index_past_the_queue_marks_needs_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    h.drv.publish(TXQ_INDEX, 300);
    h.kick(TXQ_INDEX);
    assert_eq!(h.metric("tx_bad_chain"), 1);
    assert_eq!(h.metric("queue_errors"), 1);
    assert!(h.irq.needs_reset());
}

#[test]
fn kicks_after_a_reset_do_not_spin_the_event_loop() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, test_dev());
    h.dev().reset();
    // The eventfds stay watched; the device must still consume them
    // (pump() fails if the loop never goes idle).
    h.kick(TXQ_INDEX);
    h.kick(RXQ_INDEX);
    h.kick_evq();
    assert_eq!(h.metric("tx_queue_events"), 1);
    assert_eq!(h.metric("rx_queue_events"), 1);
}
