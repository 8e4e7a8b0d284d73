// SPDX-License-Identifier: Apache-2.0
//! The virtio-vsock device: moves packets between the guest's queues and a backend.
//!
//! Every chain goes through virtio-queue (which bounds chain length and rejects
//! loops and out-of-table indices) and the `virtio-vsock` packet parser (which
//! bounds-checks every guest address and length). A chain that fails either is
//! returned to the guest as used with length 0 and counted; a corrupt ring
//! (avail index past the queue size, unwritable used ring) marks the device
//! NEEDS_RESET and stops it until the driver resets it.

use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::packet::{PKT_HEADER_SIZE, PacketError, chain_is_complete};
use super::{
    MAX_PKT_BUF_SIZE, QUEUE_SIZES, RXQ_INDEX, TXQ_INDEX, UnixMuxer, VsockBackend, VsockError,
    VsockMetrics, VsockPacket,
};
use crate::virtio::{
    GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtQueue, VirtioDevice,
    VirtioError, count_and_warn,
};

/// Features the device offers.
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// State that exists between activation and reset.
#[derive(Debug)]
pub(crate) struct Active {
    pub(crate) mem: GuestMemory,
    pub(crate) queues: Vec<VirtQueue>,
    pub(crate) interrupt: Interrupt,
    /// Set after a ring corruption: the device stops until reset.
    pub(crate) broken: bool,
    /// The backend refused a TX packet; TX resumes once RX made progress.
    pub(crate) tx_stalled: bool,
}

/// A virtio-vsock device with backend `B`.
#[derive(Debug)]
pub struct Vsock<B: VsockBackend> {
    cid: u64,
    pub(crate) backend: B,
    acked_features: u64,
    pub(crate) metrics: Arc<VsockMetrics>,
    /// Written on activation so the event handler (on its own thread) starts
    /// watching the queues and the backend.
    pub(crate) activate_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// The queue eventfds of the last activation. They stay watched after a
    /// reset, so they must stay readable here too, or a guest kicking a reset
    /// device would wake the event loop forever.
    pub(crate) queue_evts: Vec<Arc<EventFd>>,
}

impl Vsock<UnixMuxer> {
    /// A device for guest `cid` whose host side is the hybrid Unix-socket muxer
    /// listening on `uds_path` (`--vsock-uds PATH --cid N`).
    pub fn new(cid: u64, uds_path: impl AsRef<Path>) -> Result<Self, VsockError> {
        check_cid(cid)?;
        let metrics = Arc::new(VsockMetrics::default());
        let backend = UnixMuxer::new(cid, uds_path, metrics.clone())?;
        Self::with_backend(cid, backend, metrics)
    }
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    if cid <= 2 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for guest `cid` over any backend; `metrics` should be the set the
    /// backend counts into as well.
    pub fn with_backend(
        cid: u64,
        backend: B,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        check_cid(cid)?;
        Ok(Self {
            cid,
            backend,
            acked_features: 0,
            metrics,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventSource)?,
            active: None,
            queue_evts: Vec::new(),
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The device's counters (shared with its backend).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Runs TX (when `tx_kicked` or stalled) and RX until neither can progress.
    pub(crate) fn process_queues(&mut self, tx_kicked: bool) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.broken {
            return;
        }
        let mut run_tx = tx_kicked || a.tx_stalled;
        // Each round that goes on consumes guest RX buffers, so this ends; the
        // bound is a second guard.
        for _ in 0..=usize::from(super::QUEUE_SIZE) {
            if run_tx {
                self.process_tx();
            }
            let rx_progress = self.process_rx();
            let Some(a) = self.active.as_ref() else {
                return;
            };
            if !(a.tx_stalled && rx_progress) || a.broken {
                break;
            }
            run_tx = true;
        }
    }

    /// Hands backend packets to the guest's RX buffers. Returns whether any
    /// buffer was used.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let m = &self.metrics;
        let mem = &a.mem;
        let q = &mut a.queues[RXQ_INDEX].queue;
        let mut used_any = false;
        let res: Result<(), virtio_queue::Error> = (|| {
            loop {
                q.disable_notification(mem)?;
                let mut backend_empty = false;
                while self.backend.has_pending_rx() {
                    let Some(mut chain) = q.iter(mem)?.next() else {
                        break;
                    };
                    let head = chain.head_index();
                    let len = if !chain_is_complete(&chain) {
                        count_and_warn(
                            &m.rx_bad_chain,
                            "vsock: RX descriptor chain loops or is too long",
                        );
                        0
                    } else {
                        match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE) {
                            Ok(mut pkt) => match self.backend.recv_pkt(&mut pkt) {
                                Ok(()) => {
                                    VsockMetrics::inc(&m.rx_packets);
                                    PKT_HEADER_SIZE as u32 + pkt.len()
                                }
                                Err(_) => {
                                    q.go_to_previous_position();
                                    backend_empty = true;
                                    break;
                                }
                            },
                            Err(e) => {
                                count_and_warn(
                                    &m.rx_bad_buffer,
                                    &format!("vsock: unusable RX buffer: {e}"),
                                );
                                0
                            }
                        }
                    };
                    crate::virtio::add_used(q, mem, head, len)?;
                    used_any = true;
                }
                // Re-enable kicks; if buffers arrived meanwhile and there is
                // something to send, go on.
                if !q.enable_notification(mem)? || backend_empty || !self.backend.has_pending_rx() {
                    return Ok(());
                }
            }
        })();
        finish_queue(a, RXQ_INDEX, res, used_any, m);
        used_any
    }

    /// Takes the guest's TX packets to the backend.
    pub(crate) fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let m = &self.metrics;
        let mem = &a.mem;
        let q = &mut a.queues[TXQ_INDEX].queue;
        let mut used_any = false;
        let mut stalled = false;
        let res: Result<(), virtio_queue::Error> = (|| {
            loop {
                q.disable_notification(mem)?;
                while let Some(chain) = q.iter(mem)?.next() {
                    let head = chain.head_index();
                    if tx_one(&mut self.backend, mem, chain, m) {
                        q.go_to_previous_position();
                        stalled = true;
                        break;
                    }
                    crate::virtio::add_used(q, mem, head, 0)?;
                    used_any = true;
                }
                if !q.enable_notification(mem)? || stalled {
                    return Ok(());
                }
            }
        })();
        a.tx_stalled = stalled;
        finish_queue(a, TXQ_INDEX, res, used_any, m);
    }

    /// Drains the event queue's kick; the device never posts events.
    pub(crate) fn process_evq(&mut self) {
        VsockMetrics::inc(&self.metrics.ev_queue_events);
    }
}

/// Parses one TX chain and hands it to the backend. Returns true when the
/// backend asked for the packet to be retried later.
fn tx_one<B: VsockBackend>(
    backend: &mut B,
    mem: &GuestMemory,
    mut chain: DescriptorChain<&GuestMemory>,
    m: &VsockMetrics,
) -> bool {
    if !chain_is_complete(&chain) {
        count_and_warn(
            &m.tx_bad_chain,
            "vsock: TX descriptor chain loops or is too long",
        );
        return false;
    }
    match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE) {
        Ok(pkt) => match backend.send_pkt(&pkt) {
            Err(VsockError::Backpressure) => return true,
            Ok(()) | Err(_) => VsockMetrics::inc(&m.tx_packets),
        },
        Err(e) => {
            let (counter, what) = match e {
                PacketError::InvalidHeaderLen(_) => (&m.tx_bad_len, "length past the limit"),
                PacketError::InvalidMemoryAccess(_)
                | PacketError::InvalidVolatileAccess(_)
                | PacketError::FragmentedMemory => (&m.tx_bad_addr, "buffer outside guest memory"),
                _ => (&m.tx_bad_desc, "bad descriptor"),
            };
            count_and_warn(counter, &format!("vsock: TX packet dropped, {what}: {e}"));
        }
    }
    false
}

/// Signals the guest after a queue run, or marks the device broken on a ring error.
fn finish_queue(
    a: &mut Active,
    index: usize,
    res: Result<(), virtio_queue::Error>,
    used_any: bool,
    m: &VsockMetrics,
) {
    if let Err(e) = res {
        count_and_warn(
            &m.queue_errors,
            &format!("vsock: queue {index} is corrupt: {e}"),
        );
        a.broken = true;
        a.interrupt.set_needs_reset();
        return;
    }
    if !used_any {
        return;
    }
    let q: &mut Queue = &mut a.queues[index].queue;
    // With EVENT_IDX the driver may not want this interrupt; on a read error, send it.
    if q.needs_notification(&a.mem).unwrap_or(true) {
        if let Err(e) = a.interrupt.signal_used_queue() {
            count_and_warn(&m.irq_fails, &format!("vsock: {e}"));
        }
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "vsock: guest wrote read-only config space"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<VirtQueue>,
        interrupt: Interrupt,
    ) -> Result<(), VirtioError> {
        let res = (|| {
            if self.active.is_some() {
                return Err(VirtioError::AlreadyActive);
            }
            if queues.len() != QUEUE_SIZES.len() {
                return Err(VirtioError::QueueCount {
                    expected: QUEUE_SIZES.len(),
                    got: queues.len(),
                });
            }
            for i in [RXQ_INDEX, TXQ_INDEX] {
                if !queues[i].queue.ready() {
                    return Err(VirtioError::QueueNotReady(i));
                }
            }
            self.activate_evt.write(1).map_err(VirtioError::EventFd)?;
            self.queue_evts = queues.iter().map(|q| q.notify.clone()).collect();
            self.active = Some(Active {
                mem,
                queues,
                interrupt,
                broken: false,
                tx_stalled: false,
            });
            Ok(())
        })();
        match &res {
            Ok(()) => VsockMetrics::inc(&self.metrics.activations),
            Err(_) => VsockMetrics::inc(&self.metrics.activate_fails),
        }
        res
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.backend.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
