// SPDX-License-Identifier: Apache-2.0
//! A device on its virtio-mmio transport, with guest memory, an event loop
//! and a minimal split-ring driver: what the device harnesses share.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cell0_devices::BusDevice;
use cell0_devices::virtio::blk::{Block, MemDisk};
use cell0_devices::virtio::mmio::MmioTransport;
use cell0_devices::virtio::rng::{EntropySource, Rng};
use cell0_devices::virtio::vsock::packet::{Header, PKT_HEADER_SIZE};
use cell0_devices::virtio::vsock::uapi::*;
use cell0_devices::virtio::vsock::{
    UnixMuxer, VSOCK_HOST_CID, Vsock, VsockBackend, VsockChannel, VsockEpollListener, VsockError,
    VsockMetrics, VsockPacket,
};
use cell0_devices::virtio::{GuestMemory, VirtioDevice, status};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_mmio as regs;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory size of every rig (small, so random addresses often land).
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where packet and request buffers go.
pub const DATA_BASE: u64 = 0x8_0000;
/// The guest CID of the vsock rigs.
pub const GUEST_CID: u64 = 3;

/// Where queue `q`'s rings sit: (descriptor table, avail ring, used ring).
pub fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 * (q as u64 + 1);
    (base, base + 0x1000, base + 0x2000)
}

/// Which device sits behind the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-vsock with an in-memory backend.
    Vsock,
    /// virtio-blk on a 64-sector in-memory disk.
    Blk,
    /// virtio-blk, read-only.
    BlkRo,
    /// virtio-rng with a fixed entropy pattern.
    Rng,
}

impl Kind {
    /// A kind from any byte.
    pub fn from_byte(b: u8) -> Self {
        match b % 4 {
            0 => Self::Vsock,
            1 => Self::Blk,
            2 => Self::BlkRo,
            _ => Self::Rng,
        }
    }
}

/// An in-memory vsock backend: answers REQUESTs with a RESPONSE and echoes
/// data, so the RX path has something to deliver.
#[derive(Debug)]
pub struct EchoBackend {
    evfd: EventFd,
    rx: VecDeque<(Header, Vec<u8>)>,
    /// Packets the guest sent.
    pub sent: usize,
}

impl EchoBackend {
    fn new() -> Self {
        Self {
            evfd: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
            rx: VecDeque::new(),
            sent: 0,
        }
    }
}

impl VsockChannel for EchoBackend {
    fn recv_pkt(&mut self, pkt: &mut VsockPacket<'_>) -> Result<(), VsockError> {
        let Some((mut h, mut data)) = self.rx.pop_front() else {
            return Err(VsockError::NoData);
        };
        let room = pkt.data_slice().map_or(0, |s| s.len());
        data.truncate(room);
        if let Some(s) = pkt.data_slice() {
            s.copy_from(&data[..]);
        }
        h.len = data.len() as u32;
        h.write_to(pkt).map_err(VsockError::Packet)
    }

    fn send_pkt(&mut self, pkt: &VsockPacket<'_>) -> Result<(), VsockError> {
        self.sent += 1;
        if self.rx.len() >= 64 {
            return Err(VsockError::Backpressure);
        }
        let h = Header::of(pkt);
        let reply = |op, len| Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Header::default()
        };
        match h.op {
            VSOCK_OP_REQUEST => self.rx.push_back((reply(VSOCK_OP_RESPONSE, 0), Vec::new())),
            VSOCK_OP_RW => {
                let mut data = vec![0u8; pkt.data_slice().map_or(0, |s| s.len())];
                if let Some(s) = pkt.data_slice() {
                    s.copy_to(&mut data[..]);
                }
                self.rx
                    .push_back((reply(VSOCK_OP_RW, data.len() as u32), data));
            }
            VSOCK_OP_SHUTDOWN => self.rx.push_back((reply(VSOCK_OP_RST, 0), Vec::new())),
            _ => {}
        }
        Ok(())
    }

    fn has_pending_rx(&self) -> bool {
        !self.rx.is_empty()
    }
}

impl VsockEpollListener for EchoBackend {
    fn get_polled_fd(&self) -> RawFd {
        self.evfd.as_raw_fd()
    }
    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }
    fn notify(&mut self, _evset: EventSet) {
        let _ = self.evfd.read();
    }
}

impl VsockBackend for EchoBackend {
    fn reset(&mut self) {
        self.rx.clear();
    }
}

/// Entropy that is a fixed pattern (so runs are reproducible).
#[derive(Debug, Default)]
pub struct PatternEntropy(u8);

impl EntropySource for PatternEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        for b in buf {
            self.0 = self.0.wrapping_add(37);
            *b = self.0;
        }
        Ok(())
    }
}

type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A device behind its transport, with guest memory and an event loop.
pub struct Rig {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The transport (the guest's only way in besides memory).
    pub transport: MmioTransport,
    events: EventManager<Sub>,
    /// Per queue: next avail index the driver publishes, used index seen.
    pub avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    /// Queue sizes the driver configured.
    pub sizes: Vec<u16>,
}

fn add<D: VirtioDevice + MutEventSubscriber + Send + 'static>(
    mem: &GuestMemory,
    events: &mut EventManager<Sub>,
    dev: D,
) -> MmioTransport {
    let dev = Arc::new(Mutex::new(dev));
    events.add_subscriber(dev.clone());
    MmioTransport::new(mem.clone(), dev).expect("the transport builds")
}

impl Rig {
    /// A rig for `kind` with an in-memory backend.
    pub fn new(kind: Kind) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let mut events = EventManager::<Sub>::new().expect("an event manager");
        let transport = match kind {
            Kind::Vsock => {
                let dev = Vsock::with_backend(
                    GUEST_CID,
                    EchoBackend::new(),
                    Arc::new(VsockMetrics::default()),
                )
                .expect("vsock");
                add(&mem, &mut events, dev)
            }
            Kind::Blk | Kind::BlkRo => {
                let dev = Block::with_backend(MemDisk::new(64), kind == Kind::BlkRo, b"fuzz")
                    .expect("blk");
                add(&mem, &mut events, dev)
            }
            Kind::Rng => {
                let dev = Rng::with_source(PatternEntropy::default()).expect("rng");
                add(&mem, &mut events, dev)
            }
        };
        Self::with_transport(mem, events, transport)
    }

    /// A vsock rig on the real Unix-socket muxer, listening on `uds`.
    pub fn vsock_muxer(uds: &Path) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let mut events = EventManager::<Sub>::new().expect("an event manager");
        let dev: Vsock<UnixMuxer> = Vsock::new(GUEST_CID, uds).expect("the muxer listens");
        let transport = add(&mem, &mut events, dev);
        Self::with_transport(mem, events, transport)
    }

    fn with_transport(
        mem: GuestMemory,
        events: EventManager<Sub>,
        transport: MmioTransport,
    ) -> Self {
        Self {
            mem,
            transport,
            events,
            avail_idx: Vec::new(),
            used_seen: Vec::new(),
            sizes: Vec::new(),
        }
    }

    /// A 32-bit register read.
    pub fn r(&mut self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// A 32-bit register write.
    pub fn w(&mut self, off: u32, v: u32) {
        self.transport.write(u64::from(off), &v.to_le_bytes());
    }

    /// Runs the device's pending events (queue kicks, activation, backend).
    pub fn pump(&mut self) {
        for _ in 0..4 {
            match self.events.run_with_timeout(0) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// The device's feature bits.
    pub fn device_features(&mut self) -> u64 {
        self.w(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.r(regs::VIRTIO_MMIO_DEVICE_FEATURES);
        self.w(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.r(regs::VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Number of queues (QueueNumMax is zero past the last one).
    pub fn queue_count(&mut self) -> usize {
        (0..8)
            .take_while(|&q| {
                self.w(regs::VIRTIO_MMIO_QUEUE_SEL, q);
                self.r(regs::VIRTIO_MMIO_QUEUE_NUM_MAX) != 0
            })
            .count()
    }

    /// Configures queue `q` with `size` entries at its fixed ring addresses.
    pub fn setup_queue(&mut self, q: usize, size: u16) {
        let (d, a, u) = ring_addrs(q);
        self.w(regs::VIRTIO_MMIO_QUEUE_SEL, q as u32);
        self.w(regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        for (lo, hi, v) in [
            (
                regs::VIRTIO_MMIO_QUEUE_DESC_LOW,
                regs::VIRTIO_MMIO_QUEUE_DESC_HIGH,
                d,
            ),
            (
                regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                a,
            ),
            (
                regs::VIRTIO_MMIO_QUEUE_USED_LOW,
                regs::VIRTIO_MMIO_QUEUE_USED_HIGH,
                u,
            ),
        ] {
            self.w(lo, v as u32);
            self.w(hi, (v >> 32) as u32);
        }
        self.w(regs::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// The whole driver init: features `offered & mask`, every queue with
    /// `size` entries (clamped to its maximum), DRIVER_OK.
    pub fn init(&mut self, feature_mask: u64, size: u16) {
        use status::*;
        self.w(regs::VIRTIO_MMIO_STATUS, 0);
        self.w(regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        self.w(regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        let f = self.device_features() & feature_mask;
        self.w(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(regs::VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        self.w(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(regs::VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        self.w(regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let n = self.queue_count();
        self.sizes.clear();
        for q in 0..n {
            self.w(regs::VIRTIO_MMIO_QUEUE_SEL, q as u32);
            let max = self.r(regs::VIRTIO_MMIO_QUEUE_NUM_MAX) as u16;
            let s = size.clamp(1, max.max(1));
            // A power of two, as the spec wants.
            let s = 1u16 << (15 - s.leading_zeros().min(15));
            self.setup_queue(q, s);
            self.sizes.push(s);
        }
        self.avail_idx = vec![0; n];
        self.used_seen = vec![0; n];
        self.w(
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        self.pump();
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn write_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let (d, _, _) = ring_addrs(q);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&b, GuestAddress(d + 16 * u64::from(i)));
    }

    /// Puts `head` in queue `q`'s avail ring and bumps the index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let (_, a, _) = ring_addrs(q);
        let size = self.sizes.get(q).copied().unwrap_or(1).max(1);
        let idx = self.avail_idx[q];
        let slot = a + 4 + 2 * u64::from(idx % size);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail_idx[q] = idx.wrapping_add(1);
        let _ = self.mem.write_obj(self.avail_idx[q], GuestAddress(a + 2));
    }

    /// Overwrites queue `q`'s avail index (ring corruption).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let (_, a, _) = ring_addrs(q);
        self.avail_idx[q] = idx;
        let _ = self.mem.write_obj(idx, GuestAddress(a + 2));
    }

    /// QueueNotify for `q`: the transport signals the queue's eventfd (KVM's
    /// ioeventfd does it in the VMM); then the device runs.
    pub fn kick(&mut self, q: u32) {
        self.w(regs::VIRTIO_MMIO_QUEUE_NOTIFY, q);
        self.pump();
    }

    /// The used entries of queue `q` since the last call: (id, len).
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let (_, _, u) = ring_addrs(q);
        let size = self.sizes.get(q).copied().unwrap_or(1).max(1);
        let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap_or(0);
        let mut out = Vec::new();
        let mut guard = 0;
        while self.used_seen[q] != idx && guard < usize::from(size) * 2 {
            let slot = u + 4 + 8 * u64::from(self.used_seen[q] % size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap_or(u32::MAX);
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap_or(0);
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            guard += 1;
        }
        out
    }

    /// How far queue `q`'s used index moved past what the driver ever
    /// published (it must never, unless the driver rewrote its avail index).
    pub fn used_idx(&self, q: usize) -> u16 {
        let (_, _, u) = ring_addrs(q);
        self.mem.read_obj(GuestAddress(u + 2)).unwrap_or(0)
    }

    /// Whether the device asks for a reset.
    pub fn needs_reset(&mut self) -> bool {
        self.r(regs::VIRTIO_MMIO_STATUS) & status::NEEDS_RESET != 0
    }
}

/// Writes a vsock header into guest memory at `addr`.
pub fn write_vsock_header(mem: &GuestMemory, addr: u64, h: &Header) {
    let _ = mem.write_slice(&h.to_bytes(), GuestAddress(addr));
}

/// Reads a vsock header from guest memory at `addr`.
pub fn read_vsock_header(mem: &GuestMemory, addr: u64) -> Option<Header> {
    let mut b = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
    Some(Header::from_bytes(&b))
}
