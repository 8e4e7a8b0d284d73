// SPDX-License-Identifier: Apache-2.0
//! cell0-vmm: one KVM micro-VM per process.
//!
//! See docs/ARCHITECTURE.md for the code map.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod device_manager;
pub mod exit;
pub mod jail;
pub mod lease;
pub mod legacy;
pub mod nano;
pub mod seccomp;
pub mod shm;
pub mod tpm;
pub mod vcpu;
pub mod vm;

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Marks process start for the boot milestones. Call first thing in `main`.
pub fn mark_start() {
    let _ = START.get_or_init(Instant::now);
}

/// Microseconds since [`mark_start`].
pub fn since_start_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}
