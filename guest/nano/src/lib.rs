// SPDX-License-Identifier: Apache-2.0
//! The pure parts of the cell0 nano guest: its fixed layout, the constant
//! descriptor and page tables, the per-CPU fault record, and the cmdline
//! parser. `no_std` in the kernel; with std under `cargo test`.
#![cfg_attr(not(test), no_std)]

pub mod cmdline;
pub mod record;
pub mod tables;
pub mod text;

/// The fixed layout (shared with build.rs, which writes the linker script).
pub mod layout {
    include!("layout.rs");
}
