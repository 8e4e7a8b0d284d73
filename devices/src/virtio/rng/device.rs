// SPDX-License-Identifier: Apache-2.0
//! The virtio-rng device: every chain of device-writable buffers is filled
//! with random bytes (at most [`MAX_REQUEST_BYTES`] per chain).
//!
//! A chain that loops, is too long, points outside guest memory or holds a
//! device-readable buffer is returned as used with length 0 and counted. A
//! corrupt ring marks the device NEEDS_RESET and stops it until reset.

use std::io::Write;
use std::sync::Arc;

use crate::virtio::single_queue::SingleQueue;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Writer};

use super::{EntropySource, MAX_REQUEST_BYTES, OsEntropy, QUEUE_SIZES, RngError, RngMetrics};
use crate::virtio::{
    GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtQueue, VirtioDevice,
    VirtioError, count_and_warn,
};

/// Features the device offers.
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// A virtio-rng device over entropy source `S`.
pub struct Rng<S: EntropySource = OsEntropy> {
    pub(crate) source: S,
    acked_features: u64,
    pub(crate) metrics: Arc<RngMetrics>,
    /// Activation, eventfds and the queue.
    pub(crate) q: SingleQueue,
}

impl<S: EntropySource> std::fmt::Debug for Rng<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.q.active.is_some())
            .finish()
    }
}

impl Rng<OsEntropy> {
    /// A device fed by the host's `getrandom(2)`.
    pub fn new() -> Result<Self, RngError> {
        Self::with_source(OsEntropy)
    }
}

impl<S: EntropySource> Rng<S> {
    /// A device fed by `source`.
    pub fn with_source(source: S) -> Result<Self, RngError> {
        Ok(Self {
            source,
            acked_features: 0,
            metrics: Arc::new(RngMetrics::default()),
            q: SingleQueue::new().map_err(RngError::EventSource)?,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Fills every available buffer.
    pub(crate) fn process_queue(&mut self) {
        let Some(a) = self.q.active.as_mut() else {
            return;
        };
        if a.broken {
            return;
        }
        let m = &self.metrics;
        let mem = &a.mem;
        let q = &mut a.queue.queue;
        let mut used_any = false;
        let mut buf = Vec::new();
        let res: Result<(), virtio_queue::Error> = (|| {
            loop {
                q.disable_notification(mem)?;
                while let Some(chain) = q.iter(mem)?.next() {
                    let head = chain.head_index();
                    let len = fill_chain(mem, chain, &mut self.source, &mut buf, m);
                    crate::virtio::add_used(q, mem, head, len)?;
                    used_any = true;
                }
                if !q.enable_notification(mem)? {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = res {
            count_and_warn(
                &m.queue_errors,
                &format!("virtio-rng: the queue is corrupt: {e}"),
            );
            a.broken = true;
            a.interrupt.set_needs_reset();
            return;
        }
        if used_any && a.queue.queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.interrupt.signal_used_queue() {
                count_and_warn(&m.irq_fails, &format!("virtio-rng: {e}"));
            }
        }
    }
}

/// Fills one chain; returns the used length.
fn fill_chain<S: EntropySource>(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    source: &mut S,
    buf: &mut Vec<u8>,
    m: &RngMetrics,
) -> u32 {
    let mut descs = 0usize;
    let mut last_has_next = true;
    let mut readable = false;
    for d in chain.clone() {
        descs += 1;
        last_has_next = d.has_next();
        readable |= !d.is_write_only();
    }
    if descs == 0 || last_has_next || readable {
        count_and_warn(
            &m.bad_chain,
            "virtio-rng: chain loops, is too long or holds a device-readable buffer",
        );
        return 0;
    }
    let Ok(mut w) = Writer::<()>::new(mem, chain) else {
        count_and_warn(&m.bad_chain, "virtio-rng: buffer outside guest memory");
        return 0;
    };
    let n = w.available_bytes().min(MAX_REQUEST_BYTES);
    buf.resize(n, 0);
    if let Err(e) = source.fill(buf) {
        count_and_warn(
            &m.source_errors,
            &format!("virtio-rng: the entropy source failed: {e}"),
        );
        return 0;
    }
    if w.write_all(buf).is_err() {
        count_and_warn(&m.bad_chain, "virtio-rng: buffer outside guest memory");
        return 0;
    }
    RngMetrics::inc(&m.requests);
    RngMetrics::add(&m.bytes, n as u64);
    n as u32
}

impl<S: EntropySource> VirtioDevice for Rng<S> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-rng: guest wrote config space, which it has none of"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<VirtQueue>,
        interrupt: Interrupt,
    ) -> Result<(), VirtioError> {
        let res = self.q.activate(mem, queues, interrupt);
        match &res {
            Ok(()) => RngMetrics::inc(&self.metrics.activations),
            Err(_) => RngMetrics::inc(&self.metrics.activate_fails),
        }
        res
    }

    fn reset(&mut self) {
        self.q.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.q.active.is_some()
    }
}
