// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport (virtio 1.x, MMIO version 2) as a bus device.
//!
//! One [`MmioTransport`] answers a device's 4 KiB window. Registers below
//! 0x100 are 32-bit and aligned; the device config space starts at 0x100 and
//! takes any width. Every guest access is checked: a register access of the
//! wrong size, a write in the wrong device state or an invalid value is ignored
//! and counted in [`MmioMetrics`] (and logged at a bounded rate); an unrecoverable problem
//! (bad queue setup at DRIVER_OK, a failed activation) sets NEEDS_RESET.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtQueue, VirtioDevice,
    count_and_warn, ring_problem, status,
};
use crate::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) MMIO layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported by cell0 devices ("C0LL" in little endian).
pub const VENDOR_ID: u32 = 0x4c4c_3043;
/// Offset of QueueNotify: register each queue's eventfd as a KVM ioeventfd at
/// `base + NOTIFY_REG_OFFSET` with datamatch = the queue index.
pub const NOTIFY_REG_OFFSET: u64 = regs::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Size of one device window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Where device config space starts in the window.
pub const CONFIG_SPACE_OFFSET: u64 = regs::VIRTIO_MMIO_CONFIG as u64;

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Creating a queue or interrupt eventfd failed.
    #[error("cannot create an event file descriptor")]
    EventFd(#[source] std::io::Error),
    /// The device reports a queue size virtio-queue rejects (zero, not a power of two, > 32768).
    #[error("device queue {index} has an invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size it reported.
        size: u16,
    },
}

/// Counters of guest mistakes and transport events, one set per device.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Register accesses of the wrong width/alignment, or to unknown offsets.
    pub invalid_access: AtomicU64,
    /// Status writes that skip or reorder steps (e.g. DRIVER_OK before FEATURES_OK).
    pub invalid_status: AtomicU64,
    /// Writes to a register that the current device status forbids.
    pub write_in_wrong_state: AtomicU64,
    /// FEATURES_OK refused: the driver accepted unoffered features or not VERSION_1.
    pub features_rejected: AtomicU64,
    /// QueueNum past QueueNumMax or not a power of two; misaligned ring addresses.
    pub invalid_queue_config: AtomicU64,
    /// QueueNotify for a queue that does not exist.
    pub invalid_notify: AtomicU64,
    /// Times the device was marked NEEDS_RESET by the transport.
    pub needs_reset: AtomicU64,
    /// Successful activations.
    pub activations: AtomicU64,
    /// Device resets by the driver (status 0).
    pub resets: AtomicU64,
}

impl MmioMetrics {
    /// Name/value pairs, for export.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("invalid_access", l(&self.invalid_access)),
            ("invalid_status", l(&self.invalid_status)),
            ("write_in_wrong_state", l(&self.write_in_wrong_state)),
            ("features_rejected", l(&self.features_rejected)),
            ("invalid_queue_config", l(&self.invalid_queue_config)),
            ("invalid_notify", l(&self.invalid_notify)),
            ("needs_reset", l(&self.needs_reset)),
            ("activations", l(&self.activations)),
            ("resets", l(&self.resets)),
        ]
    }
}

/// Per-queue configuration as the driver writes it.
struct QueueSlot {
    queue: Queue,
    /// The driver wrote a value the queue rejected; activation will fail.
    bad_config: bool,
}

/// A virtio-mmio v2 transport for one device. Put it on the MMIO bus at the
/// device's 4 KiB window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    device_type: u32,
    avail_features: u64,
    max_sizes: Vec<u16>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_unknown_page: bool,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    queue_evts: Vec<Arc<EventFd>>,
    interrupt: Interrupt,
    status: u32,
    metrics: Arc<MmioMetrics>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn new_queues(max_sizes: &[u16]) -> Result<Vec<QueueSlot>, MmioError> {
    max_sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            Queue::new(size)
                .map(|queue| QueueSlot {
                    queue,
                    bad_config: false,
                })
                .map_err(|_| MmioError::QueueMaxSize { index, size })
        })
        .collect()
}

impl MmioTransport {
    /// Builds the transport for `device`. `mem` is the VMM's guest memory (a clone
    /// shares the mappings). Creates one queue eventfd per device queue and the irqfd.
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        let queues = new_queues(&max_sizes)?;
        let queue_evts = (0..max_sizes.len())
            .map(|_| {
                EventFd::new(EFD_NONBLOCK)
                    .map(Arc::new)
                    .map_err(MmioError::EventFd)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            device_type,
            avail_features,
            max_sizes,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_page: false,
            queue_sel: 0,
            queues,
            queue_evts,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            status: 0,
            metrics: Arc::new(MmioMetrics::default()),
        })
    }

    /// One eventfd per queue, in queue order: register each with KVM as an
    /// ioeventfd at `base + NOTIFY_REG_OFFSET`, datamatch = its index (u32).
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// The irqfd: register it with KVM for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The transport's counters.
    pub fn metrics(&self) -> Arc<MmioMetrics> {
        self.metrics.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u32 {
        let nr = if self.interrupt.needs_reset() {
            status::NEEDS_RESET
        } else {
            0
        };
        self.status | nr
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// True when every bit of `set` is in the status and none of `clear`.
    fn status_has(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            regs::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            regs::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            regs::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            regs::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            regs::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            regs::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .max_sizes
                .get(self.queue_sel as usize)
                .map_or(0, |&s| u32::from(s)),
            regs::VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(q.queue.ready())),
            regs::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            regs::VIRTIO_MMIO_STATUS => self.device_status(),
            regs::VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: a length of all ones means "absent".
            regs::VIRTIO_MMIO_SHM_LEN_LOW | regs::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            regs::VIRTIO_MMIO_SHM_BASE_LOW | regs::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                count_and_warn(
                    &self.metrics.invalid_access,
                    "virtio-mmio: guest read a write-only or unknown register",
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::VIRTIO_MMIO_DRIVER_FEATURES => {
                if !self.status_has(status::DRIVER, status::FEATURES_OK | status::FAILED) {
                    return self.wrong_state("DriverFeatures");
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Pages past 1 hold no features; a set bit there can never be offered.
                    _ => self.acked_unknown_page |= v != 0,
                }
            }
            regs::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            regs::VIRTIO_MMIO_QUEUE_NUM => self.with_queue("QueueNum", |q| {
                u16::try_from(v)
                    .ok()
                    .and_then(|size| q.try_set_size(size).ok())
                    .is_some()
            }),
            regs::VIRTIO_MMIO_QUEUE_READY => self.with_queue("QueueReady", |q| {
                q.set_ready(v == 1);
                v <= 1
            }),
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW | regs::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let high = offset == regs::VIRTIO_MMIO_QUEUE_DESC_HIGH;
                self.with_queue("QueueDesc", |q| {
                    // Alignment is a property of the low half alone, so each
                    // half can be checked as it is written.
                    let a = set_half(q.desc_table(), high, v);
                    q.try_set_desc_table_address(GuestAddress(a)).is_ok()
                })
            }
            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW | regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let high = offset == regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
                self.with_queue("QueueAvail", |q| {
                    let a = set_half(q.avail_ring(), high, v);
                    q.try_set_avail_ring_address(GuestAddress(a)).is_ok()
                })
            }
            regs::VIRTIO_MMIO_QUEUE_USED_LOW | regs::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let high = offset == regs::VIRTIO_MMIO_QUEUE_USED_HIGH;
                self.with_queue("QueueUsed", |q| {
                    let a = set_half(q.used_ring(), high, v);
                    q.try_set_used_ring_address(GuestAddress(a)).is_ok()
                })
            }
            regs::VIRTIO_MMIO_QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                // Normally KVM's ioeventfd catches this write; without one, forward it.
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!(error = %e, queue = v, "cannot signal a queue eventfd");
                    }
                }
                None => count_and_warn(
                    &self.metrics.invalid_notify,
                    "virtio-mmio: guest notified a queue that does not exist",
                ),
            },
            regs::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            regs::VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => count_and_warn(
                &self.metrics.invalid_access,
                "virtio-mmio: guest wrote a read-only or unknown register",
            ),
        }
    }

    fn wrong_state(&self, what: &str) {
        count_and_warn(
            &self.metrics.write_in_wrong_state,
            &format!(
                "virtio-mmio: {what} written in device status {:#x}",
                self.status
            ),
        );
    }

    /// Applies a queue register write to the selected queue when queue setup is
    /// allowed (FEATURES_OK set, DRIVER_OK not). `f` returns false when the
    /// value was refused; the queue is then marked bad until reset.
    fn with_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue) -> bool) {
        if !self.status_has(status::FEATURES_OK, status::DRIVER_OK | status::FAILED) {
            return self.wrong_state(what);
        }
        let metrics = self.metrics.clone();
        let Some(slot) = self.selected_queue() else {
            return count_and_warn(
                &metrics.invalid_queue_config,
                "virtio-mmio: queue register written with QueueSel past the last queue",
            );
        };
        if !f(&mut slot.queue) {
            slot.bad_config = true;
            count_and_warn(
                &metrics.invalid_queue_config,
                &format!("virtio-mmio: invalid {what} value"),
            );
        }
    }

    fn set_status(&mut self, v: u32) {
        use status::*;
        // The driver may echo NEEDS_RESET back; it is the device's bit.
        let v = v & !NEEDS_RESET;
        let cur = self.status;
        if v == 0 {
            return self.reset();
        }
        let added = v & !cur;
        // Bits are only ever added, one step at a time, in spec order.
        let ok = v & cur == cur
            && match added {
                ACKNOWLEDGE => cur == 0,
                DRIVER => cur == ACKNOWLEDGE,
                FEATURES_OK => cur == ACKNOWLEDGE | DRIVER,
                DRIVER_OK => cur == ACKNOWLEDGE | DRIVER | FEATURES_OK,
                FAILED => true,
                0 => true,
                _ => false,
            };
        if !ok {
            return count_and_warn(
                &self.metrics.invalid_status,
                &format!("virtio-mmio: invalid status transition {cur:#x} -> {v:#x}"),
            );
        }
        match added {
            FEATURES_OK => {
                let unoffered = self.acked_features & !self.avail_features;
                if unoffered != 0
                    || self.acked_unknown_page
                    || self.acked_features & VIRTIO_F_VERSION_1 == 0
                {
                    // FEATURES_OK stays clear; the driver reads it back and gives up.
                    return count_and_warn(
                        &self.metrics.features_rejected,
                        &format!(
                            "virtio-mmio: driver features {:#x} refused (offered {:#x})",
                            self.acked_features, self.avail_features
                        ),
                    );
                }
                lock(&self.device).ack_features(self.acked_features);
                self.status = v;
            }
            DRIVER_OK => {
                self.status = v;
                self.activate();
            }
            _ => self.status = v,
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, slot) in self.queues.iter_mut().enumerate() {
            if slot.queue.ready() {
                let why = if slot.bad_config {
                    Some(String::new())
                } else {
                    ring_problem(&slot.queue, &self.mem).map(|w| format!(": {w}"))
                };
                if let Some(why) = why {
                    return self.fail(&format!(
                        "queue {i} is set up outside guest memory or badly{why}"
                    ));
                }
            }
            slot.queue.set_event_idx(event_idx);
        }
        // The device gets its own copy; the transport keeps the driver's
        // configuration so that register reads stay answerable.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (slot, evt)) in self.queues.iter().zip(&self.queue_evts).enumerate() {
            match Queue::try_from(slot.queue.state()) {
                Ok(queue) => queues.push(VirtQueue {
                    queue,
                    notify: evt.clone(),
                }),
                Err(e) => return self.fail(&format!("queue {i} state is invalid: {e}")),
            }
        }
        let res = lock(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone());
        match res {
            Ok(()) => {
                self.metrics.activations.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(&format!("device activation failed: {e}")),
        }
    }

    fn fail(&mut self, why: &str) {
        count_and_warn(&self.metrics.needs_reset, &format!("virtio-mmio: {why}"));
        self.interrupt.set_needs_reset();
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.metrics.resets.fetch_add(1, Ordering::Relaxed);
        // Sizes were validated in new(); keep the old slots if that ever changed.
        if let Ok(q) = new_queues(&self.max_sizes) {
            self.queues = q;
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_page = false;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.reset();
    }
}

fn set_half(cur: u64, high: bool, v: u32) -> u64 {
    if high {
        (cur & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (cur & !0xffff_ffff) | u64::from(v)
    }
}

/// Locks a device; a poisoned lock (a panic elsewhere) still yields the device.
fn lock(d: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            return lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(out) if offset % 4 == 0 => *out = self.read_reg(offset as u32).to_le_bytes(),
            _ => {
                data.fill(0);
                count_and_warn(
                    &self.metrics.invalid_access,
                    "virtio-mmio: register read that is not 32-bit and aligned",
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !self.status_has(status::DRIVER, status::FAILED) {
                return self.wrong_state("config space");
            }
            return lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset % 4 == 0 => self.write_reg(offset as u32, u32::from_le_bytes(b)),
            _ => count_and_warn(
                &self.metrics.invalid_access,
                "virtio-mmio: register write that is not 32-bit and aligned",
            ),
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
