// SPDX-License-Identifier: Apache-2.0
//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]: it says what it is (type, features,
//! queue sizes, config space) and, once the driver sets DRIVER_OK, receives its
//! queues, the guest memory and an [`Interrupt`] in [`VirtioDevice::activate`].
//! The [`MmioTransport`] decodes the virtio-mmio (version 2) register window and
//! drives that life cycle. Queue kicks arrive on one `EventFd` per queue (a KVM
//! ioeventfd); interrupts leave on one irqfd `EventFd`. The vCPU loop sees neither.
//!
//! # Wiring a device into the VMM
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use cell0_devices::Bus;
//! use cell0_devices::virtio::{MmioTransport, VirtioDevice, mmio::NOTIFY_REG_OFFSET};
//! use cell0_devices::virtio::vsock::Vsock;
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! // `--vsock-uds /run/vm0.vsock --cid 3`
//! let vsock = Arc::new(Mutex::new(Vsock::new(3, "/run/vm0.vsock")?));
//!
//! // The device's event handler runs on the VMM's event-manager thread.
//! let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! em.add_subscriber(vsock.clone());
//!
//! // The transport is the bus device for the 4 KiB window.
//! let (base, irq) = (0xd000_0000u64, 5u32);
//! let transport = MmioTransport::new(mem.clone(), vsock.clone() as Arc<Mutex<dyn VirtioDevice>>)?;
//! for (index, evt) in transport.queue_evts().iter().enumerate() {
//!     // vm.register_ioevent(evt.as_ref(), &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
//!     //                     index as u32)?;
//!     let _ = (index, evt, base + NOTIFY_REG_OFFSET);
//! }
//! // vm.register_irqfd(transport.irqfd(), irq)?;
//! let mut mmio_bus = Bus::new();
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, 0x1000)?;
//! let cmdline_part = format!("virtio_mmio.device=4K@{base:#x}:{irq}");
//! # let _ = cmdline_part;
//! # Ok(())
//! # }
//! ```

pub mod blk;
pub mod mmio;
pub mod rng;
pub(crate) mod single_queue;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use mmio::MmioTransport;

/// Guest memory type shared by every virtio device.
pub type GuestMemory = GuestMemoryMmap<()>;

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// InterruptStatus bit: the device used a buffer in at least one queue.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration (or NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors of the virtio device layer.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The transport handed the device a different number of queues than it has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// A queue the device needs was not made ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// Writing the irqfd failed.
    #[error("cannot signal the interrupt")]
    Interrupt(#[source] io::Error),
    /// Writing an eventfd the device uses internally failed.
    #[error("cannot write an event file descriptor")]
    EventFd(#[source] io::Error),
    /// The device cannot be activated twice without a reset.
    #[error("device is already active")]
    AlreadyActive,
}

/// A queue handed to a device at activation: the virtio-queue state plus the
/// eventfd the guest's QueueNotify writes signal (the KVM ioeventfd).
#[derive(Debug)]
pub struct VirtQueue {
    /// Queue state as configured by the driver.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: Arc<EventFd>,
}

/// A virtio device, independent of the transport it sits behind.
pub trait VirtioDevice: Send {
    /// Virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of [`Self::avail_features`]);
    /// called once the driver sets FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of device config space at `offset`. Bytes past
    /// the end of the config space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; out-of-range or read-only writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<VirtQueue>,
        interrupt: Interrupt,
    ) -> Result<(), VirtioError>;
    /// Stops the device and drops its queues, so the transport can start over.
    fn reset(&mut self);
    /// Whether [`Self::activate`] succeeded and no reset followed.
    fn is_activated(&self) -> bool;
}

#[derive(Debug)]
struct InterruptInner {
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// Times NEEDS_RESET was set (for the log limiter; a guest can loop reset → error).
    needs_reset_count: AtomicU64,
    config_generation: AtomicU32,
    irqfd: EventFd,
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus register
/// and the irqfd that KVM turns into the device's GSI. Cloning shares it
/// between the transport (vCPU thread) and the device (event thread).
#[derive(Debug, Clone)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

impl Interrupt {
    /// A fresh, non-blocking irqfd with no interrupt pending.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                needs_reset_count: AtomicU64::new(0),
                config_generation: AtomicU32::new(0),
                irqfd: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    fn raise(&self, bit: u32) -> Result<(), VirtioError> {
        self.inner.status.fetch_or(bit, Ordering::SeqCst);
        self.inner.irqfd.write(1).map_err(VirtioError::Interrupt)
    }

    /// Sets the used-buffer bit and raises the interrupt.
    pub fn signal_used_queue(&self) -> Result<(), VirtioError> {
        self.raise(INT_USED_RING)
    }

    /// Bumps ConfigGeneration, sets the config-change bit and raises the interrupt.
    pub fn signal_config_change(&self) -> Result<(), VirtioError> {
        self.inner.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG)
    }

    /// Marks the device NEEDS_RESET and tells the driver with a config-change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.inner.needs_reset.swap(true, Ordering::SeqCst) {
            count_and_warn(&self.inner.needs_reset_count, "virtio device needs a reset");
            if let Err(e) = self.raise(INT_CONFIG) {
                tracing::warn!(error = %e, "cannot raise the needs-reset interrupt");
            }
        }
    }

    /// Whether the device set NEEDS_RESET since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::SeqCst)
    }

    /// Current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Current ConfigGeneration.
    pub fn config_generation(&self) -> u32 {
        self.inner.config_generation.load(Ordering::SeqCst)
    }

    /// Clears the status bits and NEEDS_RESET (device reset).
    fn reset(&self) {
        self.inner.status.store(0, Ordering::SeqCst);
        self.inner.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The irqfd to register with KVM (`KVM_IRQFD`) for the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.inner.irqfd
    }
}

/// Guest errors of one kind on one device that are logged in full; after
/// these, only the ones whose count is a power of two are.
pub const LOG_FIRST: u64 = 8;

/// Whether the `n`-th (1-based) guest error of one kind on one device is
/// logged: the first [`LOG_FIRST`], then the 16th, 32nd, 64th, ... A guest
/// that triggers errors in a loop gets `LOG_FIRST + log2(n / LOG_FIRST)` lines
/// out of `n` errors (about 30 for a billion), while the counter stays exact.
pub fn log_decision(n: u64) -> bool {
    n != 0 && (n <= LOG_FIRST || n.is_power_of_two())
}

/// Adds one to `counter` and logs `what` at warn level when [`log_decision`]
/// says so. This is how guest misbehaviour is "counted in a metric, and logged
/// at a bounded rate": the counters are exported by cell0d.
pub(crate) fn count_and_warn(counter: &AtomicU64, what: &str) {
    let n = counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if !log_decision(n) {
        return;
    }
    if n < LOG_FIRST {
        tracing::warn!(count = n, "{what}");
    } else {
        tracing::warn!(
            count = n,
            "{what} ({n} so far; from now on logged only at every doubling, the counter is exact)"
        );
    }
}

/// `Queue::add_used` that refuses a head index outside the queue itself,
/// instead of letting virtio-queue log an ERROR line for each one (a guest can
/// put such indices in its avail ring in a loop). Same error as virtio-queue's.
pub(crate) fn add_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::QueueT;
    if head >= q.size() {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    q.add_used(mem, head, len)
}

/// What is wrong with where a queue's rings lie, or `None` when they all lie in
/// guest memory: virtio-queue's `is_valid` checks, with its messages, but
/// returned instead of logged as an ERROR line per call (a guest can set
/// DRIVER_OK with bad rings after every reset).
pub(crate) fn ring_problem(q: &Queue, mem: &GuestMemoryMmap) -> Option<String> {
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemory as _, Permissions};
    let n = u64::from(q.size());
    // Sizes from the virtio spec (split virtqueue), as virtio-queue checks them:
    // 16-byte descriptors; flags, idx, the entries and used_event/avail_event.
    let rings = [
        (
            "descriptor table",
            q.desc_table(),
            16 * n,
            Permissions::Read,
        ),
        (
            "available ring",
            q.avail_ring(),
            6 + 2 * n,
            Permissions::Read,
        ),
        ("used ring", q.used_ring(), 6 + 8 * n, Permissions::Write),
    ];
    rings.into_iter().find_map(|(what, addr, len, access)| {
        let fits =
            usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access));
        (!fits).then(|| {
            format!("virtio queue {what} is not accessible: start:{addr:#010x} size:{len:#010x}")
        })
    })
}

#[cfg(test)]
mod log_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_limiter_logs_the_first_errors_then_every_doubling() {
        let logged: Vec<u64> = (1..=100).filter(|&n| log_decision(n)).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]);
        assert!(!log_decision(0));
        // A flood of a million errors: 8 + 16, 32, ..., 2^19 = 8 + 16 lines.
        let lines = (1..=1_000_000u64).filter(|&n| log_decision(n)).count();
        assert_eq!(lines, 8 + 16);
    }
}
