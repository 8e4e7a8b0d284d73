// SPDX-License-Identifier: Apache-2.0
//! Guest-facing devices of cell0-vmm: the PIO/MMIO bus, legacy devices glue,
//! and (later) virtio-mmio, virtio-vsock and the shared-memory device.

pub mod bus;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
