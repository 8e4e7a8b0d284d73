// SPDX-License-Identifier: Apache-2.0
//! The virtio-mmio transport (virtio 1.2 §4.2, register layout version 2),
//! driven from ring 3 through the identity map's uncached user pages. Each
//! register access is an MMIO exit (about 19 µs on the project's hosts), so
//! the data path touches only QueueNotify (an ioeventfd) and, in interrupt
//! mode, InterruptStatus/InterruptACK.

use alloc::format;
use core::ptr;

use cell0_nano::cmdline::MmioDevice;
use cell0_nano::layout::{IDENTITY_MAP_END, UNCACHED_START};
use cell0_nano::virtq::{F_EVENT_IDX, F_VERSION_1};

use crate::selftest::Fail;

/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Device ID of virtio-vsock.
pub const DEVICE_ID_VSOCK: u32 = 19;

/// Register offsets.
pub mod reg {
    /// Magic value "virt".
    pub const MAGIC: usize = 0x000;
    /// Layout version (2 = virtio 1.x).
    pub const VERSION: usize = 0x004;
    /// Device type; 0 = no device here.
    pub const DEVICE_ID: usize = 0x008;
    /// Device features, 32 bits of the page `DEVICE_FEATURES_SEL` selects.
    pub const DEVICE_FEATURES: usize = 0x010;
    /// Device features page select.
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    /// Driver (accepted) features.
    pub const DRIVER_FEATURES: usize = 0x020;
    /// Driver features page select.
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    /// Queue select.
    pub const QUEUE_SEL: usize = 0x030;
    /// Largest size of the selected queue; 0 = no such queue.
    pub const QUEUE_NUM_MAX: usize = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: usize = 0x038;
    /// Selected queue ready.
    pub const QUEUE_READY: usize = 0x044;
    /// Queue notifier: write the queue index.
    pub const QUEUE_NOTIFY: usize = 0x050;
    /// Interrupt status (bit 0 used ring, bit 1 config change).
    pub const INTERRUPT_STATUS: usize = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: usize = 0x064;
    /// Device status.
    pub const STATUS: usize = 0x070;
    /// Descriptor table address, low half.
    pub const QUEUE_DESC_LOW: usize = 0x080;
    /// Descriptor table address, high half.
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    /// Available ring address, low half.
    pub const QUEUE_AVAIL_LOW: usize = 0x090;
    /// Available ring address, high half.
    pub const QUEUE_AVAIL_HIGH: usize = 0x094;
    /// Used ring address, low half.
    pub const QUEUE_USED_LOW: usize = 0x0a0;
    /// Used ring address, high half.
    pub const QUEUE_USED_HIGH: usize = 0x0a4;
    /// Configuration generation.
    pub const CONFIG_GENERATION: usize = 0x0fc;
    /// Device configuration space.
    pub const CONFIG: usize = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bit: configuration changed (or NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// Smallest register window a virtio-mmio device can have.
pub const MIN_WINDOW: u64 = 0x200;

/// One device's register window.
#[derive(Debug, Clone, Copy)]
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// The window of `dev`, if it lies in the uncached MMIO part of the
    /// identity map and is large enough to hold the registers.
    pub fn new(dev: &MmioDevice) -> Result<Self, Fail> {
        let end = dev.base.saturating_add(dev.size);
        if dev.base < UNCACHED_START || end > IDENTITY_MAP_END || dev.base % 4 != 0 {
            return Err(Fail(format!(
                "virtio-mmio window {:#x}+{:#x} is outside the uncached MMIO map {:#x}..{:#x}",
                dev.base, dev.size, UNCACHED_START, IDENTITY_MAP_END
            )));
        }
        if dev.size < MIN_WINDOW {
            return Err(Fail(format!(
                "virtio-mmio window at {:#x} is only {:#x} bytes",
                dev.base, dev.size
            )));
        }
        Ok(Self {
            base: dev.base as usize,
        })
    }

    /// Reads a 32-bit register.
    pub fn read(&self, off: usize) -> u32 {
        // SAFETY: the window lies in the identity map's uncached user pages
        // (checked in `new`) and `off` is one of the aligned registers or
        // config space offsets below the minimum window size.
        unsafe { ptr::read_volatile((self.base + off) as *const u32) }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, off: usize, v: u32) {
        // SAFETY: as `read`.
        unsafe { ptr::write_volatile((self.base + off) as *mut u32, v) }
    }

    /// The device's guest-physical base.
    pub fn base(&self) -> usize {
        self.base
    }

    fn fail(&self, why: &str) -> Fail {
        self.write(reg::STATUS, self.read(reg::STATUS) | status::FAILED);
        Fail(format!("virtio-mmio device at {:#x}: {}", self.base, why))
    }

    /// The device type, after checking magic and version; 0 = no device.
    pub fn probe(&self) -> Result<u32, Fail> {
        let magic = self.read(reg::MAGIC);
        if magic != MAGIC {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x}: bad magic {:#x}",
                self.base, magic
            )));
        }
        let version = self.read(reg::VERSION);
        if version != 2 {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x}: register layout version {} (need 2, virtio 1.x)",
                self.base, version
            )));
        }
        Ok(self.read(reg::DEVICE_ID))
    }

    /// Resets the device and negotiates features: VERSION_1 is required,
    /// EVENT_IDX taken when offered and `want_event_idx`. Ends with
    /// FEATURES_OK set (checked). Returns the accepted features.
    pub fn negotiate(&self, want_event_idx: bool) -> Result<u64, Fail> {
        self.write(reg::STATUS, 0);
        if self.read(reg::STATUS) != 0 {
            return Err(self.fail("the device did not reset"));
        }
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for page in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, page);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * page);
        }
        if offered & (1 << F_VERSION_1) == 0 {
            return Err(self.fail("the device does not offer VERSION_1"));
        }
        let mut accepted = 1u64 << F_VERSION_1;
        if want_event_idx {
            accepted |= offered & (1 << F_EVENT_IDX);
        }
        for page in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, page);
            self.write(reg::DRIVER_FEATURES, (accepted >> (32 * page)) as u32);
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(self.fail("the device refused our features"));
        }
        Ok(accepted)
    }

    /// Sets queue `index` up with `size` entries at the given ring addresses.
    pub fn setup_queue(&self, index: u32, size: u16, rings: (u64, u64, u64)) -> Result<(), Fail> {
        self.write(reg::QUEUE_SEL, index);
        if self.read(reg::QUEUE_READY) != 0 {
            return Err(self.fail("a queue is already ready after reset"));
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err(self.fail("the device lacks a queue the driver needs"));
        }
        if u32::from(size) > max {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x}: queue {} holds at most {} entries, the driver needs {}",
                self.base, index, max, size
            )));
        }
        self.write(reg::QUEUE_NUM, u32::from(size));
        let (desc, avail, used) = rings;
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_AVAIL_LOW, avail as u32);
        self.write(reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_USED_LOW, used as u32);
        self.write(reg::QUEUE_USED_HIGH, (used >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
        Ok(())
    }

    /// Sets DRIVER_OK and checks that the device did not ask for a reset.
    pub fn driver_ok(&self) -> Result<(), Fail> {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s | status::DRIVER_OK);
        let now = self.read(reg::STATUS);
        if now & status::NEEDS_RESET != 0 || now & status::DRIVER_OK == 0 {
            return Err(self.fail("the device did not accept DRIVER_OK (queue setup refused)"));
        }
        Ok(())
    }

    /// Reads a 64-bit little-endian config field at `off`, retrying until
    /// ConfigGeneration is stable around both halves.
    pub fn config_u64(&self, off: usize) -> u64 {
        loop {
            let g = self.read(reg::CONFIG_GENERATION);
            let lo = self.read(reg::CONFIG + off);
            let hi = self.read(reg::CONFIG + off + 4);
            if self.read(reg::CONFIG_GENERATION) == g {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }

    /// Notifies the device that queue `index` has new buffers.
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }

    /// Resets the device (status 0): it drops its queues and connections.
    pub fn reset(&self) {
        self.write(reg::STATUS, 0);
    }
}
