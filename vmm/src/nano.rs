// SPDX-License-Identifier: Apache-2.0
//! The nano guest (guest/nano), built by build.rs and embedded as the default image.

/// The nano guest's ELF image.
pub static NANO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cell0-nano.elf"));
