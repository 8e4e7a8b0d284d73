// SPDX-License-Identifier: Apache-2.0
//! Guest-facing devices of cell0-vmm: the PIO/MMIO bus, legacy devices glue,
//! the virtio-mmio transport and virtio-vsock (and later the shared-memory device).

pub mod bus;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
