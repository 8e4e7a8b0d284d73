// SPDX-License-Identifier: Apache-2.0
//! The pure parts of the cell0 nano guest: its fixed layout, the constant
//! descriptor and page tables, the per-CPU fault record, the cmdline parser,
//! the e820 map, the heap allocator, virtqueue rings, the vsock wire format
//! and credit, the shared-memory window, and the test payload pattern.
//! `no_std` in the kernel; with std under `cargo test`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod cmdline;
pub mod e820;
pub mod heap;
pub mod pattern;
pub mod record;
pub mod shm;
pub mod tables;
pub mod text;
pub mod virtq;
pub mod vsock_core;
pub mod vsock_wire;

/// The fixed layout (shared with build.rs, which writes the linker script).
pub mod layout {
    include!("layout.rs");
}
