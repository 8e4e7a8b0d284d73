// SPDX-License-Identifier: Apache-2.0
//! Bounded waits. The TSC rate is not known to the guest, so deadlines are in
//! TSC cycles with a conservative rate (cycles per millisecond at 1 GHz): on
//! a faster TSC a wait only ends sooner than its nominal length, never later.

/// TSC cycles counted as one millisecond (1 GHz; real TSCs are faster).
pub const CYCLES_PER_MS: u64 = 1_000_000;

/// The TSC.
pub fn now() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear, so ring 3 may use it.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// A deadline `cycles` TSC cycles from now.
pub fn deadline(cycles: u64) -> u64 {
    now().saturating_add(cycles)
}

/// Whether `deadline` has passed.
pub fn passed(deadline: u64) -> bool {
    now() >= deadline
}
