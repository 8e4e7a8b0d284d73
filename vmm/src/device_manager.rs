// SPDX-License-Identifier: Apache-2.0
//! Places virtio-mmio devices: a 4 KiB window each from `0xd000_0000`, IRQ 5
//! upward, queue kicks as KVM ioeventfds, interrupts as KVM irqfds, and one
//! `virtio_mmio.device=4K@0xADDR:IRQ` cmdline entry each, so Linux and the nano
//! guest discover them the same way.

use std::sync::{Arc, Mutex};

use cell0_devices::Bus;
use cell0_devices::virtio::mmio::NOTIFY_REG_OFFSET;
use cell0_devices::virtio::{MmioTransport, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};

/// Most virtio-mmio devices: IRQs 5..=23 on the IOAPIC.
pub const MAX_VIRTIO_DEVICES: u32 = 24 - VIRTIO_IRQ_BASE;

/// Errors while placing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No window or IRQ is left.
    #[error("no room for another virtio-mmio device (at most {MAX_VIRTIO_DEVICES})")]
    Full,
    /// The transport could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] cell0_devices::virtio::mmio::MmioError),
    /// A KVM registration failed.
    #[error("cannot register the device's {what} with KVM")]
    Kvm {
        /// ioeventfd or irqfd.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The bus refused the window.
    #[error("cannot map the device window")]
    Bus(#[from] cell0_devices::BusError),
}

/// One placed device, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Window base.
    pub base: u64,
    /// GSI.
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel cmdline entry that announces this device.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// Hands out MMIO windows and IRQs and registers devices with KVM and the bus.
#[derive(Debug, Default)]
pub struct DeviceManager {
    slots: Vec<MmioSlot>,
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next free slot.
    pub fn next_slot(&self) -> Result<MmioSlot, DeviceManagerError> {
        let n = u32::try_from(self.slots.len()).map_err(|_| DeviceManagerError::Full)?;
        if n >= MAX_VIRTIO_DEVICES {
            return Err(DeviceManagerError::Full);
        }
        Ok(MmioSlot {
            base: VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE + n,
        })
    }

    /// Places `dev` behind a new virtio-mmio transport.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        dev: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let slot = self.next_slot()?;
        let transport =
            MmioTransport::new(mem.clone(), dev).map_err(DeviceManagerError::Transport)?;
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt.as_ref(),
                &IoEventAddress::Mmio(slot.base + NOTIFY_REG_OFFSET),
                index as u32,
            )
            .map_err(|source| DeviceManagerError::Kvm {
                what: "queue ioeventfd",
                source,
            })?;
        }
        vm.register_irqfd(transport.irqfd(), slot.irq)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "irqfd",
                source,
            })?;
        mmio.insert(Arc::new(Mutex::new(transport)), slot.base, VIRTIO_MMIO_SIZE)?;
        self.slots.push(slot);
        Ok(slot)
    }

    /// Cmdline entries for every placed device.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots.iter().map(MmioSlot::cmdline_entry).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_4k_apart_with_consecutive_irqs() {
        let mut dm = DeviceManager::new();
        let s0 = dm.next_slot().unwrap();
        assert_eq!(
            s0,
            MmioSlot {
                base: 0xd000_0000,
                irq: 5
            }
        );
        assert_eq!(s0.cmdline_entry(), "virtio_mmio.device=4K@0xd0000000:5");
        dm.slots.push(s0);
        let s1 = dm.next_slot().unwrap();
        assert_eq!(
            s1,
            MmioSlot {
                base: 0xd000_1000,
                irq: 6
            }
        );
        for _ in 1..MAX_VIRTIO_DEVICES {
            let s = dm.next_slot().unwrap();
            dm.slots.push(s);
        }
        assert!(matches!(dm.next_slot(), Err(DeviceManagerError::Full)));
        assert_eq!(dm.cmdline_entries().len(), MAX_VIRTIO_DEVICES as usize);
    }
}
