// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock driver: three split queues in static memory (RX, TX,
//! event), the socket layer (`cell0_nano::vsock_core::Core`) on top.
//!
//! Two ways to wait for the device:
//!
//! - **irq**: the device's IOAPIC pin is routed to a vector; the ring-0 stub
//!   counts the interrupt and EOIs; ring 3 sleeps in `sti; hlt` (the `wait`
//!   syscall) and, after a device interrupt, reads and acknowledges
//!   InterruptStatus. With EVENT_IDX the driver asks for interrupts only for
//!   RX (and for TX when it waits for free descriptors). A 10 ms LAPIC timer
//!   bounds every sleep so deadlines are seen.
//! - **poll**: the pin stays masked and `used_event` is kept far ahead, so
//!   the device never interrupts; ring 3 spins on the used indices, which
//!   costs no VM exit. An interrupt costs tens of µs on the project's hosts.
//!
//! RX buffers are single descriptors of `RX_BUF_SIZE` bytes (header and data
//! together); a TX packet is a header descriptor (from a static slot) plus,
//! for data, a descriptor pointing straight into the sender's `Bytes`, which
//! stays alive until the device returns the chain.

use alloc::format;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use cell0_nano::cmdline::MmioDevice;
use cell0_nano::layout::{TIMER_VECTOR, VIRTIO_VECTOR_BASE};
use cell0_nano::virtq::{Buf, F_EVENT_IDX, FreeList, QueueMem, Virtq};
use cell0_nano::vsock_core::{Core, Timeouts};
use cell0_nano::vsock_wire::{EVENT_TRANSPORT_RESET, HEADER_LEN, Header};
use cell0_proto::bytes::Bytes;

use crate::arch::{IRQ_COUNTS, Shared};
use crate::selftest::Fail;
use crate::virtio::{DEVICE_ID_VSOCK, INT_CONFIG, Mmio, reg, status};
use crate::{lapic, sys, time};

/// RX queue size (buffers posted to the device).
pub const RXQ_SIZE: usize = 128;
/// TX queue size (descriptors; a data packet takes two).
pub const TXQ_SIZE: usize = 256;
/// Event queue size.
pub const EVQ_SIZE: usize = 8;
/// Bytes per RX buffer, header included.
pub const RX_BUF_SIZE: usize = 8192;
/// Queue indices.
const RXQ: u32 = 0;
const TXQ: u32 = 1;
const EVQ: u32 = 2;
/// Offset of `guest_cid` in the device config space.
const CONFIG_GUEST_CID: usize = 0;
/// Header slot size (44 bytes used).
const HDR_SLOT: usize = 64;
/// Event buffer size (`struct virtio_vsock_event` is a le32 id).
const EV_BUF: usize = 8;
/// Period of the LAPIC timer that bounds sleeps in irq mode: 10 ms at
/// KVM's 1 GHz APIC bus, divided by 16.
const WATCHDOG_COUNT: u32 = 625_000;
/// LVT timer periodic mode.
const LVT_PERIODIC: u32 = 1 << 17;
/// Iterations of a poll-mode spin before `wait` returns to its caller.
const SPIN: u32 = 20_000;
/// How long the host has to answer a REQUEST or a SHUTDOWN.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
const CLOSE_TIMEOUT_MS: u64 = 5_000;
/// IOAPIC inputs.
const IOAPIC_PINS: u32 = 24;

#[repr(C, align(4096))]
struct RxBufs([[u8; RX_BUF_SIZE]; RXQ_SIZE]);

static RX_QUEUE: Shared<QueueMem<RXQ_SIZE>> = Shared::new(QueueMem::new());
static TX_QUEUE: Shared<QueueMem<TXQ_SIZE>> = Shared::new(QueueMem::new());
static EV_QUEUE: Shared<QueueMem<EVQ_SIZE>> = Shared::new(QueueMem::new());
static RX_BUFS: Shared<RxBufs> = Shared::new(RxBufs([[0; RX_BUF_SIZE]; RXQ_SIZE]));
static TX_HDRS: Shared<[[u8; HDR_SLOT]; TXQ_SIZE]> = Shared::new([[0; HDR_SLOT]; TXQ_SIZE]);
static EV_BUFS: Shared<[[u8; EV_BUF]; EVQ_SIZE]> = Shared::new([[0; EV_BUF]; EVQ_SIZE]);
/// The queue memory above belongs to at most one driver at a time.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// How the driver waits for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Interrupts (IOAPIC-routed), sleeping in `hlt`.
    Irq,
    /// Busy-polling the used rings; no interrupts, no exits while waiting.
    Poll,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Irq => "irq",
            Mode::Poll => "poll",
        })
    }
}

/// Driver counters (the socket layer has its own in `core.stats`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// QueueNotify writes.
    pub kicks: u64,
    /// Device interrupts handled.
    pub irqs: u64,
    /// Sleeps in `hlt` (irq mode).
    pub sleeps: u64,
    /// Sleeps that ended without a device interrupt (the 10 ms timer).
    pub timer_wakeups: u64,
    /// Used entries or packets the device got wrong.
    pub device_errors: u64,
}

struct TxSlot {
    hdr: u16,
    /// Keeps the data alive until the device has read it.
    _data: Option<Bytes>,
}

/// A running virtio-vsock device.
pub struct Vsock {
    mmio: Mmio,
    /// The device's interrupt line.
    pub irq: u32,
    vector: u8,
    /// How the driver waits.
    pub mode: Mode,
    /// Whether EVENT_IDX was negotiated.
    pub event_idx: bool,
    rxq: Virtq<RXQ_SIZE>,
    txq: Virtq<TXQ_SIZE>,
    evq: Virtq<EVQ_SIZE>,
    hdr_free: FreeList<TXQ_SIZE>,
    tx_inflight: Vec<Option<TxSlot>>,
    /// The socket layer.
    pub core: Core,
    /// Driver counters.
    pub stats: Stats,
    /// Why the device stopped working, if it did.
    pub broken: Option<&'static str>,
}

/// The first virtio-vsock device among `devices` (the cmdline's
/// `virtio_mmio.device=` entries), with its index.
pub fn find(devices: &[MmioDevice]) -> Result<(usize, MmioDevice), Fail> {
    if devices.is_empty() {
        return Err(Fail::from(
            "no virtio_mmio.device= on the cmdline (start the VMM with --vsock-uds)",
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        if Mmio::new(d)?.probe()? == DEVICE_ID_VSOCK {
            return Ok((i, *d));
        }
    }
    Err(Fail::from(
        "no virtio-vsock device among the virtio-mmio devices",
    ))
}

impl Vsock {
    /// Brings up the device `dev` (the `index`-th virtio-mmio device, which
    /// picks its interrupt vector) in `mode`.
    pub fn open(dev: &MmioDevice, index: usize, mode: Mode) -> Result<Self, Fail> {
        if dev.irq >= IOAPIC_PINS {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x} has IRQ {}, past the IOAPIC's {} inputs",
                dev.base, dev.irq, IOAPIC_PINS
            )));
        }
        let vector = u8::try_from(usize::from(VIRTIO_VECTOR_BASE) + index)
            .ok()
            .filter(|v| *v < 0xff)
            .ok_or_else(|| Fail::from("too many virtio-mmio devices for the vector range"))?;
        let mmio = Mmio::new(dev)?;
        if mmio.probe()? != DEVICE_ID_VSOCK {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x} is not virtio-vsock",
                dev.base
            )));
        }
        if IN_USE.swap(true, Ordering::AcqRel) {
            return Err(Fail::from("the vsock driver is already running"));
        }
        Self::start(mmio, dev, vector, mode).inspect_err(|_| {
            // The statics are free again; the device is left failed or reset.
            IN_USE.store(false, Ordering::Release);
        })
    }

    /// Negotiates, sets the queues up, posts the buffers, sets DRIVER_OK
    /// and routes the interrupt. The caller holds IN_USE.
    fn start(mmio: Mmio, dev: &MmioDevice, vector: u8, mode: Mode) -> Result<Self, Fail> {
        let features = mmio.negotiate(true)?;
        let event_idx = features & (1 << F_EVENT_IDX) != 0;
        // SAFETY: IN_USE makes this driver the only user of the queue
        // statics; they are identity-mapped guest RAM and live forever.
        let (rxq, txq, evq) = unsafe {
            (
                Virtq::new(RX_QUEUE.get(), event_idx),
                Virtq::new(TX_QUEUE.get(), event_idx),
                Virtq::new(EV_QUEUE.get(), event_idx),
            )
        };
        mmio.setup_queue(RXQ, rxq.size(), rxq.addresses())?;
        mmio.setup_queue(TXQ, txq.size(), txq.addresses())?;
        mmio.setup_queue(EVQ, evq.size(), evq.addresses())?;
        let cid = mmio.config_u64(CONFIG_GUEST_CID);
        let timeouts = Timeouts {
            connect: CONNECT_TIMEOUT_MS * time::per_ms(),
            close: CLOSE_TIMEOUT_MS * time::per_ms(),
        };
        let mut v = Self {
            mmio,
            irq: dev.irq,
            vector,
            mode,
            event_idx,
            rxq,
            txq,
            evq,
            hdr_free: FreeList::full(),
            tx_inflight: (0..TXQ_SIZE).map(|_| None).collect(),
            core: Core::new(cid, timeouts),
            stats: Stats::default(),
            broken: None,
        };
        let rx_base = RX_BUFS.get() as u64;
        for i in 0..RXQ_SIZE {
            v.rxq.push(&[Buf {
                addr: rx_base + (i * RX_BUF_SIZE) as u64,
                len: RX_BUF_SIZE as u32,
                write: true,
            }]);
        }
        let ev_base = EV_BUFS.get() as u64;
        for i in 0..EVQ_SIZE {
            v.evq.push(&[Buf {
                addr: ev_base + (i * EV_BUF) as u64,
                len: EV_BUF as u32,
                write: true,
            }]);
        }
        v.rxq.publish();
        v.evq.publish();
        v.arm_used_events(false);
        v.mmio.driver_ok()?;
        if mode == Mode::Irq {
            lapic::enable();
            let apic_id = u8::try_from(lapic::id()).map_err(|_| Fail::from("APIC ID above 255"))?;
            lapic::ioapic_route(dev.irq as u8, vector, apic_id);
            lapic::write(lapic::TIMER_DIVIDE, lapic::DIVIDE_BY_16);
            lapic::write(lapic::LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
            lapic::write(lapic::TIMER_INITIAL, WATCHDOG_COUNT);
        }
        // Tell the device about the RX and event buffers.
        v.rxq.needs_kick();
        v.evq.needs_kick();
        v.kick(RXQ);
        v.kick(EVQ);
        Ok(v)
    }

    /// The guest's CID (from the device config).
    pub fn cid(&self) -> u64 {
        self.core.cid()
    }

    /// The register window's base.
    pub fn base(&self) -> usize {
        self.mmio.base()
    }

    fn kick(&mut self, q: u32) {
        self.stats.kicks += 1;
        self.mmio.notify(q);
    }

    /// Sets each queue's `used_event`: in poll mode far ahead (no
    /// interrupts), in irq mode at the next RX and event entry, and for TX at
    /// the next entry only when `tx_wanted`.
    fn arm_used_events(&mut self, tx_wanted: bool) {
        if !self.event_idx {
            return;
        }
        let poll = self.mode == Mode::Poll;
        self.rxq.set_used_event(if poll { 0 } else { 1 });
        self.evq.set_used_event(if poll { 0 } else { 1 });
        self.txq
            .set_used_event(if !poll && tx_wanted { 1 } else { 0 });
    }

    fn device_error(&mut self, why: &'static str) {
        self.stats.device_errors += 1;
        if self.broken.is_none() {
            self.broken = Some(why);
        }
    }

    /// Takes what the device returned, hands received packets to the socket
    /// layer, reposts RX buffers and sends what the socket layer has.
    /// Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let mut progress = false;
        while let Some(r) = self.txq.pop_used() {
            progress = true;
            match r {
                Ok((head, _)) => {
                    if let Some(slot) = self.tx_inflight[usize::from(head)].take() {
                        self.hdr_free.push(slot.hdr);
                    }
                }
                Err(_) => self.device_error("the device returned a TX buffer it never had"),
            }
        }
        let mut reposted = false;
        while let Some(r) = self.rxq.pop_used() {
            progress = true;
            let Ok((head, len)) = r else {
                self.device_error("the device returned an RX buffer it never had");
                continue;
            };
            let addr = self.rxq.desc(head).addr;
            self.on_rx(addr, len as usize);
            self.rxq.push(&[Buf {
                addr,
                len: RX_BUF_SIZE as u32,
                write: true,
            }]);
            reposted = true;
        }
        while let Some(r) = self.evq.pop_used() {
            progress = true;
            let Ok((head, len)) = r else {
                self.device_error("the device returned an event buffer it never had");
                continue;
            };
            let addr = self.evq.desc(head).addr;
            if len >= 4 {
                // SAFETY: the device is done with this event buffer (it is on
                // the used ring) and it holds at least 4 bytes.
                let id = unsafe { core::ptr::read_volatile(addr as *const u32) };
                if id == EVENT_TRANSPORT_RESET {
                    self.core.transport_reset();
                }
            }
            self.evq.push(&[Buf {
                addr,
                len: EV_BUF as u32,
                write: true,
            }]);
            self.evq.publish();
            if self.evq.needs_kick() {
                self.kick(EVQ);
            }
        }
        if reposted {
            self.rxq.publish();
            if self.rxq.needs_kick() {
                self.kick(RXQ);
            }
        }
        if progress && self.mode == Mode::Poll {
            self.arm_used_events(false);
        }
        self.core.tick(time::now());
        if self.flush_tx() {
            progress = true;
        }
        progress
    }

    /// One received packet in the RX buffer at `addr`, `len` bytes used.
    fn on_rx(&mut self, addr: u64, len: usize) {
        if !(HEADER_LEN..=RX_BUF_SIZE).contains(&len) {
            return self.device_error("the device used an RX buffer with a bad length");
        }
        // SAFETY: the buffer is one of RX_BUFS (we posted it), the device is
        // done with it (used ring), and `len` is within its size.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&bytes[..HEADER_LEN]);
        let h = Header::from_bytes(&hb);
        let Some(data) = bytes.get(HEADER_LEN..HEADER_LEN + h.len as usize) else {
            return self.device_error("a packet's length exceeds its RX buffer");
        };
        self.core.on_packet(&h, data);
    }

    /// Puts every packet the socket layer has on the TX queue (as far as
    /// descriptors last) and notifies the device if it wants it.
    fn flush_tx(&mut self) -> bool {
        let mut pushed = false;
        while let Some(tx) = self.core.next_tx(self.txq.free_descs()) {
            let Some(slot) = self.hdr_free.pop() else {
                // Cannot happen: a header slot per descriptor.
                self.device_error("out of TX header slots");
                break;
            };
            let hdr_addr = {
                // SAFETY: slot `slot` is free (not on the ring), so the device
                // does not read it; it is ours to fill.
                let p = unsafe { &raw mut (*TX_HDRS.get())[usize::from(slot)] };
                // SAFETY: as above; 44 bytes fit the 64-byte slot.
                unsafe { (p as *mut [u8; HEADER_LEN]).write(tx.header.to_bytes()) };
                p as u64
            };
            let hdr = Buf {
                addr: hdr_addr,
                len: HEADER_LEN as u32,
                write: false,
            };
            let head = match &tx.data {
                Some(d) => self.txq.push(&[
                    hdr,
                    Buf {
                        addr: d.as_ptr() as u64,
                        len: d.len() as u32,
                        write: false,
                    },
                ]),
                None => self.txq.push(&[hdr]),
            };
            let Some(head) = head else {
                // next_tx checked the free descriptors; cannot happen.
                self.hdr_free.push(slot);
                self.device_error("TX queue full after next_tx");
                break;
            };
            self.tx_inflight[usize::from(head)] = Some(TxSlot {
                hdr: slot,
                _data: tx.data,
            });
            pushed = true;
        }
        if pushed {
            self.txq.publish();
            if self.txq.needs_kick() {
                self.kick(TXQ);
            }
        }
        pushed
    }

    /// Waits until the device may have done something: in poll mode a
    /// bounded spin on the used indices; in irq mode a sleep until an
    /// interrupt (the device's, or the 10 ms timer's). Call when `poll`
    /// reported no progress.
    pub fn wait(&mut self) {
        if self.mode == Mode::Poll {
            for _ in 0..SPIN {
                if self.rxq.has_used() || self.txq.has_used() || self.evq.has_used() {
                    return;
                }
            }
            return;
        }
        let tx_blocked = self.core.has_tx();
        self.arm_used_events(tx_blocked);
        // Anything that arrived before used_event was set is seen here; after
        // it, the device interrupts, and `sti; hlt` takes that interrupt even
        // if it is already pending.
        if self.rxq.has_used() || self.evq.has_used() || (tx_blocked && self.txq.has_used()) {
            return;
        }
        let counter = &IRQ_COUNTS[usize::from(self.vector)];
        let before = counter.load(Ordering::Acquire);
        self.stats.sleeps += 1;
        sys::wait_for_interrupt();
        if counter.load(Ordering::Acquire) == before {
            self.stats.timer_wakeups += 1;
        } else {
            self.stats.irqs += 1;
            let st = self.mmio.read(reg::INTERRUPT_STATUS);
            if st != 0 {
                self.mmio.write(reg::INTERRUPT_ACK, st);
            }
            if st & INT_CONFIG != 0 && self.mmio.read(reg::STATUS) & status::NEEDS_RESET != 0 {
                self.device_error("the device set NEEDS_RESET");
            }
        }
    }

    /// Polls, runs `step` and waits, until `step` says it is finished, the
    /// device breaks, or `deadline` (TSC) passes. `step` drives the sessions
    /// (reads, sends) and returns `Some(true)` when finished, `Some(false)`
    /// when it did something, `None` when it had nothing to do. `Ok(false)`
    /// means the deadline passed.
    pub fn run_until<F>(&mut self, deadline: u64, mut step: F) -> Result<bool, Fail>
    where
        F: FnMut(&mut Vsock) -> Result<Option<bool>, Fail>,
    {
        loop {
            let mut progress = self.poll();
            match step(self)? {
                None => {}
                Some(true) => return Ok(true),
                Some(false) => progress = true,
            }
            if let Some(why) = self.broken {
                return Err(Fail(format!("virtio-vsock: {why}")));
            }
            if time::passed(deadline) {
                return Ok(false);
            }
            if !progress {
                // Anything still queued for TX now waits for descriptors.
                self.wait();
            }
        }
    }

    /// Stops the device: masks its interrupt, stops the timer, resets it
    /// (the VMM drops every connection, host sides see them close).
    pub fn shutdown(self) {
        if self.mode == Mode::Irq {
            lapic::write(lapic::LVT_TIMER, lapic::LVT_MASKED);
            lapic::write(lapic::TIMER_INITIAL, 0);
            lapic::ioapic_mask(self.irq as u8);
        }
        self.mmio.reset();
        IN_USE.store(false, Ordering::Release);
    }
}
