// SPDX-License-Identifier: Apache-2.0
//! Test helpers: a guest driver over virtio-queue's `MockSplitQueue`, an
//! in-memory backend, and a harness that runs the device on a real event manager.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::packet::{Header, PKT_HEADER_SIZE};
use super::uapi::*;
use super::{
    EVQ_INDEX, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VSOCK_HOST_CID, Vsock, VsockBackend, VsockChannel,
    VsockEpollListener, VsockError, VsockMetrics, VsockPacket,
};
use crate::virtio::{GuestMemory, Interrupt, VirtQueue, VirtioDevice};

/// Guest memory size used by the tests.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Where packet buffers are allocated from.
const BUF_BASE: u64 = 0x10_0000;
/// Guest CID used by the tests.
pub const GUEST_CID: u64 = 3;

pub fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A packet as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPkt {
    pub hdr: Header,
    pub data: Vec<u8>,
}

/// The driver side of the three vsock queues.
pub struct GuestDriver<'a> {
    pub mem: &'a GuestMemory,
    queues: [MockSplitQueue<'a, GuestMemory>; 3],
    free: [VecDeque<u16>; 3],
    /// head -> descriptor indices of the chain, per queue.
    chains: [HashMap<u16, Vec<u16>>; 3],
    /// RX head -> (header address, data address).
    rx_bufs: HashMap<u16, (GuestAddress, GuestAddress)>,
    used_seen: [u16; 3],
    next_buf: u64,
    pub notify: Vec<Arc<EventFd>>,
}

impl<'a> GuestDriver<'a> {
    pub fn new(mem: &'a GuestMemory) -> Self {
        let q = |base| MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let free = || (0..QUEUE_SIZE).collect::<VecDeque<u16>>();
        Self {
            mem,
            queues: [q(0), q(0x1_0000), q(0x2_0000)],
            free: [free(), free(), free()],
            chains: Default::default(),
            rx_bufs: HashMap::new(),
            used_seen: [0; 3],
            next_buf: BUF_BASE,
            notify: (0..3)
                .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
                .collect(),
        }
    }

    /// Fresh queue objects configured like a driver would, for activation.
    pub fn queues(&self) -> Vec<VirtQueue> {
        self.queues
            .iter()
            .zip(&self.notify)
            .map(|(m, n)| VirtQueue {
                queue: m.create_queue::<Queue>().unwrap(),
                notify: n.clone(),
            })
            .collect()
    }

    /// Ring addresses (desc, avail, used) of queue `qi`.
    pub fn ring_addrs(&self, qi: usize) -> (u64, u64, u64) {
        let m = &self.queues[qi];
        (m.desc_table_addr().0, m.avail_addr().0, m.used_addr().0)
    }

    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let len = len.max(1).next_multiple_of(16);
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let a = GuestAddress(self.next_buf);
        self.next_buf += len;
        a
    }

    /// Takes `n` free descriptor indices of queue `qi`.
    pub fn alloc_indices(&mut self, qi: usize, n: usize) -> Vec<u16> {
        assert!(
            self.free[qi].len() >= n,
            "test driver ran out of descriptors"
        );
        self.free[qi].drain(..n).collect()
    }

    /// Writes descriptors at the given indices (as given, no flag fix-ups) and
    /// publishes `head`. `indices` are recorded as the chain to free on use.
    pub fn push_raw(&mut self, qi: usize, descs: &[(u16, RawDescriptor)], head: u16) {
        for (i, d) in descs {
            self.queues[qi].desc_table().store(*i, *d).unwrap();
        }
        self.chains[qi].insert(head, descs.iter().map(|(i, _)| *i).collect());
        self.publish(qi, head);
    }

    /// Publishes a raw head index in the avail ring.
    pub fn publish(&mut self, qi: usize, head: u16) {
        let avail = self.queues[qi].avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Builds a well-formed chain of `(addr, len, flags)` buffers and publishes it.
    pub fn push_chain(&mut self, qi: usize, bufs: &[(GuestAddress, u32, u16)]) -> u16 {
        let idx = self.alloc_indices(qi, bufs.len());
        let descs: Vec<(u16, RawDescriptor)> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(a, l, f))| {
                let last = k + 1 == bufs.len();
                let flags = if last {
                    f
                } else {
                    f | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { idx[k + 1] };
                (
                    idx[k],
                    RawDescriptor::from(SplitDescriptor::new(a.0, l, flags, next)),
                )
            })
            .collect();
        self.push_raw(qi, &descs, idx[0]);
        idx[0]
    }

    /// Queues a TX packet: header (its `len` set to the data's) and, if any,
    /// data in a second descriptor.
    pub fn send(&mut self, mut hdr: Header, data: &[u8]) -> u16 {
        hdr.len = data.len() as u32;
        let ha = self.alloc(PKT_HEADER_SIZE as u64);
        self.mem.write_slice(&hdr.to_bytes(), ha).unwrap();
        if data.is_empty() {
            return self.push_chain(TXQ_INDEX, &[(ha, PKT_HEADER_SIZE as u32, 0)]);
        }
        let da = self.alloc(data.len() as u64);
        self.mem.write_slice(data, da).unwrap();
        self.push_chain(
            TXQ_INDEX,
            &[(ha, PKT_HEADER_SIZE as u32, 0), (da, data.len() as u32, 0)],
        )
    }

    /// Gives the device `n` RX buffers with `data_len` bytes of data space each.
    pub fn give_rx(&mut self, n: usize, data_len: u32) {
        let w = VRING_DESC_F_WRITE as u16;
        for _ in 0..n {
            let ha = self.alloc(PKT_HEADER_SIZE as u64);
            let da = self.alloc(u64::from(data_len));
            let head = self.push_chain(
                RXQ_INDEX,
                &[(ha, PKT_HEADER_SIZE as u32, w), (da, data_len, w)],
            );
            self.rx_bufs.insert(head, (ha, da));
        }
    }

    /// Number of RX buffers the device has not used yet.
    pub fn rx_outstanding(&self) -> usize {
        self.chains[RXQ_INDEX].len()
    }

    fn take_used(&mut self, qi: usize) -> Vec<VirtqUsedElem> {
        let used = self.queues[qi].used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.used_seen[qi] != idx {
            let e: VirtqUsedElem = used
                .ring()
                .ref_at(usize::from(self.used_seen[qi] % QUEUE_SIZE))
                .unwrap()
                .load();
            self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
            if let Some(ix) = self.chains[qi].remove(&(e.id() as u16)) {
                for i in ix {
                    if !self.free[qi].contains(&i) {
                        self.free[qi].push_back(i);
                    }
                }
            }
            out.push(e);
        }
        out
    }

    /// TX chains the device returned since the last call.
    pub fn tx_used(&mut self) -> usize {
        self.take_used(TXQ_INDEX).len()
    }

    /// Packets the device delivered since the last call (in order). Buffers
    /// returned with a length shorter than a header are skipped.
    pub fn take_rx(&mut self) -> Vec<GuestPkt> {
        let mut out = Vec::new();
        for e in self.take_used(RXQ_INDEX) {
            let Some((ha, da)) = self.rx_bufs.remove(&(e.id() as u16)) else {
                continue;
            };
            if (e.len() as usize) < PKT_HEADER_SIZE {
                continue;
            }
            let mut hb = [0u8; PKT_HEADER_SIZE];
            self.mem.read_slice(&mut hb, ha).unwrap();
            let hdr = Header::from_bytes(&hb);
            let n = e.len() as usize - PKT_HEADER_SIZE;
            assert_eq!(n, hdr.len as usize, "used length must match the header");
            let mut data = vec![0u8; n];
            self.mem.read_slice(&mut data, da).unwrap();
            out.push(GuestPkt { hdr, data });
        }
        out
    }

    /// Used entries of the RX queue with a length shorter than a header.
    pub fn take_rx_raw(&mut self) -> Vec<VirtqUsedElem> {
        self.take_used(RXQ_INDEX)
    }

    /// Overwrites the avail index of queue `qi` (ring corruption).
    pub fn set_avail_idx(&mut self, qi: usize, idx: u16) {
        self.queues[qi].avail().idx().store(idx);
    }
}

/// A guest-to-host header with the test CIDs and stream type.
pub fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

/// An in-memory backend: records what the guest sent, hands out queued packets.
#[derive(Debug)]
pub struct TestBackend {
    pub evfd: EventFd,
    pub rx: VecDeque<GuestPkt>,
    pub tx: Vec<GuestPkt>,
    pub backpressure: bool,
    pub notified: usize,
    pub resets: usize,
}

impl TestBackend {
    pub fn new() -> Self {
        Self {
            evfd: EventFd::new(EFD_NONBLOCK).unwrap(),
            rx: VecDeque::new(),
            tx: Vec::new(),
            backpressure: false,
            notified: 0,
            resets: 0,
        }
    }
}

impl VsockChannel for TestBackend {
    fn recv_pkt(&mut self, pkt: &mut VsockPacket<'_>) -> Result<(), VsockError> {
        let Some(mut p) = self.rx.pop_front() else {
            return Err(VsockError::NoData);
        };
        let room = pkt.data_slice().map_or(0, |s| s.len());
        p.data.truncate(room);
        if let Some(s) = pkt.data_slice() {
            s.copy_from(&p.data[..]);
        }
        p.hdr.len = p.data.len() as u32;
        p.hdr.write_to(pkt).map_err(VsockError::Packet)
    }

    fn send_pkt(&mut self, pkt: &VsockPacket<'_>) -> Result<(), VsockError> {
        if self.backpressure {
            return Err(VsockError::Backpressure);
        }
        let hdr = Header::of(pkt);
        let mut data = vec![0u8; pkt.data_slice().map_or(0, |s| s.len())];
        if let Some(s) = pkt.data_slice() {
            s.copy_to(&mut data[..]);
        }
        self.tx.push(GuestPkt { hdr, data });
        Ok(())
    }

    fn has_pending_rx(&self) -> bool {
        !self.rx.is_empty()
    }
}

impl VsockEpollListener for TestBackend {
    fn get_polled_fd(&self) -> RawFd {
        self.evfd.as_raw_fd()
    }

    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, _evset: EventSet) {
        let _ = self.evfd.read();
        self.notified += 1;
    }
}

impl VsockBackend for TestBackend {
    fn reset(&mut self) {
        self.rx.clear();
        self.resets += 1;
    }
}

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A device activated on a [`GuestDriver`]'s queues and run by a real event manager.
pub struct Harness<'a, B: VsockBackend + 'static> {
    pub drv: GuestDriver<'a>,
    pub dev: Arc<Mutex<Vsock<B>>>,
    pub em: Em,
    pub irq: Interrupt,
}

impl<'a, B: VsockBackend + 'static> Harness<'a, B> {
    pub fn new(mem: &'a GuestMemory, dev: Vsock<B>) -> Self {
        let drv = GuestDriver::new(mem);
        let dev = Arc::new(Mutex::new(dev));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = Interrupt::new().unwrap();
        dev.lock()
            .unwrap()
            .activate(mem.clone(), drv.queues(), irq.clone())
            .unwrap();
        let mut h = Self { drv, dev, em, irq };
        h.pump();
        h
    }

    pub fn dev(&self) -> MutexGuard<'_, Vsock<B>> {
        self.dev.lock().unwrap()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.dev().metrics().get(name).unwrap()
    }

    /// Runs the event manager until nothing is ready.
    pub fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("event loop never went idle");
    }

    /// Waits up to `ms` for one batch of events, then pumps.
    pub fn wait(&mut self, ms: i32) {
        self.em.run_with_timeout(ms).unwrap();
        self.pump();
    }

    pub fn kick(&mut self, qi: usize) {
        self.drv.notify[qi].write(1).unwrap();
        self.pump();
    }

    /// Sends a packet and kicks TX.
    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        self.drv.send(hdr, data);
        self.kick(TXQ_INDEX);
    }

    pub fn give_rx(&mut self, n: usize, len: u32) {
        self.drv.give_rx(n, len);
        self.kick(RXQ_INDEX);
    }

    /// Whether an interrupt was raised since the last call (reads the irqfd).
    pub fn irq_fired(&self) -> bool {
        self.irq.irqfd().read().is_ok()
    }

    pub fn kick_evq(&mut self) {
        self.kick(EVQ_INDEX);
    }
}

/// Metrics helper for backends built outside a harness.
pub fn metrics() -> Arc<VsockMetrics> {
    Arc::new(VsockMetrics::default())
}
