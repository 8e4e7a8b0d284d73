// SPDX-License-Identifier: Apache-2.0
//! Time from the TSC. Deadlines are in TSC cycles. Until `calibrate` has run,
//! the rate is a conservative guess (cycles per millisecond at 1 GHz: on a
//! faster TSC a wait only ends sooner than its nominal length, never later);
//! `calibrate` measures the real rate against the LAPIC timer, which KVM
//! counts at 1 GHz of host time.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::lapic;

/// TSC cycles counted as one millisecond before calibration (1 GHz; real TSCs
/// are faster).
pub const CYCLES_PER_MS: u64 = 1_000_000;

/// Measured TSC cycles per millisecond; 0 until `calibrate` succeeded.
static MEASURED_PER_MS: AtomicU64 = AtomicU64::new(0);

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

/// TSC cycles per millisecond: measured if `calibrate` ran, else the
/// conservative 1 GHz guess.
pub fn per_ms() -> u64 {
    match MEASURED_PER_MS.load(Ordering::Relaxed) {
        0 => CYCLES_PER_MS,
        n => n,
    }
}

/// Whether `per_ms` is a measurement.
pub fn calibrated() -> bool {
    MEASURED_PER_MS.load(Ordering::Relaxed) != 0
}

/// A deadline `ms` milliseconds from now (see `per_ms`).
pub fn deadline_ms(ms: u64) -> u64 {
    deadline(ms.saturating_mul(per_ms()))
}

/// TSC cycles as microseconds (see `per_ms`).
pub fn to_us(cycles: u64) -> u64 {
    (u128::from(cycles) * 1000 / u128::from(per_ms())) as u64
}

/// LAPIC timer divide configuration "divide by 1".
const DIVIDE_BY_1: u32 = 0b1011;
/// LAPIC current-count register.
const TIMER_CURRENT: usize = 0x390;
/// TSC cycles the measurement spans (a few milliseconds).
const CALIBRATION_CYCLES: u64 = 20_000_000;

/// One (TSC, LAPIC count) sample; the TSC is taken on both sides of the
/// count read (an MMIO exit) and averaged.
fn sample() -> (u64, u32) {
    let a = now();
    let c = lapic::read(TIMER_CURRENT);
    let b = now();
    (a + (b - a) / 2, c)
}

/// Measures the TSC rate against the LAPIC timer (one-shot, masked, divide by
/// 1, so it counts nanoseconds) over about 20 million TSC cycles, up to three
/// times until the result is plausible (100 MHz to 20 GHz). Leaves the timer
/// stopped. Returns the cycles per millisecond, or `None` (and keeps the
/// guess).
pub fn calibrate() -> Option<u64> {
    if calibrated() {
        return Some(per_ms());
    }
    for _ in 0..3 {
        if let Some(r) = measure() {
            MEASURED_PER_MS.store(r, Ordering::Relaxed);
            return Some(r);
        }
    }
    None
}

fn measure() -> Option<u64> {
    // The timer counts only while the APIC is software-enabled.
    lapic::enable();
    lapic::write(lapic::LVT_TIMER, lapic::LVT_MASKED);
    lapic::write(lapic::TIMER_DIVIDE, DIVIDE_BY_1);
    lapic::write(lapic::TIMER_INITIAL, u32::MAX);
    let (t0, c0) = sample();
    while now() - t0 < CALIBRATION_CYCLES {}
    let (t1, c1) = sample();
    lapic::write(lapic::TIMER_INITIAL, 0);
    let ns = u64::from(c0.wrapping_sub(c1));
    if ns == 0 {
        return None;
    }
    let per_ms = (u128::from(t1 - t0) * 1_000_000 / u128::from(ns)) as u64;
    (100_000..=20_000_000).contains(&per_ms).then_some(per_ms)
}
