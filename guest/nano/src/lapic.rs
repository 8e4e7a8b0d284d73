// SPDX-License-Identifier: Apache-2.0
//! The local APIC (xAPIC, MMIO at 0xfee0_0000) and the I/O APIC (0xfec0_0000),
//! both reached from ring 3 through the identity map's uncached user pages.
//! Every CPU sees its own LAPIC at the same address.

use core::ptr;
use core::sync::atomic::{Ordering, fence};

use cell0_nano::layout::{IOAPIC_BASE, LAPIC_BASE, SPURIOUS_VECTOR};

/// LAPIC register offsets.
pub const ID: usize = 0x20;
/// End of interrupt.
pub const EOI: usize = 0xb0;
/// Spurious-interrupt vector register (bit 8: APIC software enable).
pub const SVR: usize = 0xf0;
/// Interrupt command register, low half (writing it sends the IPI).
pub const ICR_LOW: usize = 0x300;
/// Interrupt command register, high half (destination in bits 24..31).
pub const ICR_HIGH: usize = 0x310;
/// LVT timer.
pub const LVT_TIMER: usize = 0x320;
/// LVT LINT0 (the 8259's ExtINT line on the BSP).
pub const LVT_LINT0: usize = 0x350;
/// Timer initial count.
pub const TIMER_INITIAL: usize = 0x380;
/// Timer divide configuration.
pub const TIMER_DIVIDE: usize = 0x3e0;

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// SVR bit 8: the APIC accepts fixed interrupts only when it is set.
pub const SVR_ENABLE: u32 = 1 << 8;
/// ICR destination shorthand "all excluding self", fixed delivery, edge.
pub const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
/// Timer divide configuration value for "divide by 16".
pub const DIVIDE_BY_16: u32 = 0b0011;

/// Reads LAPIC register `reg`.
pub fn read(reg: usize) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped, uncached and user-accessible;
    // `reg` is one of the 16-byte aligned register offsets above.
    unsafe { ptr::read_volatile((LAPIC_BASE as usize + reg) as *const u32) }
}

/// Writes LAPIC register `reg`.
pub fn write(reg: usize, value: u32) {
    // SAFETY: as `read`.
    unsafe { ptr::write_volatile((LAPIC_BASE as usize + reg) as *mut u32, value) }
}

/// Software-enables this CPU's LAPIC (with the spurious vector), so that it
/// accepts fixed interrupts: IPIs, its timer, the IOAPIC's. Also masks LINT0,
/// where the BSP's LAPIC comes up wired to the unprogrammed 8259 PIC, whose
/// vectors would land on the exception vectors.
pub fn enable() {
    write(LVT_LINT0, LVT_MASKED);
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    // Later loads (say, of a flag another CPU set before sending an IPI) must
    // not pass the enabling store.
    fence(Ordering::SeqCst);
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Sends a fixed IPI with `vector` to every CPU but this one.
pub fn ipi_all_but_self(vector: u8) {
    write(ICR_HIGH, 0);
    write(ICR_LOW, ICR_ALL_BUT_SELF | u32::from(vector));
}

const IOREGSEL: usize = 0x00;
const IOWIN: usize = 0x10;

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC page is identity-mapped, uncached and
    // user-accessible; IOREGSEL and IOWIN are its two 32-bit registers.
    unsafe {
        ptr::write_volatile((IOAPIC_BASE as usize + IOREGSEL) as *mut u32, reg);
        ptr::write_volatile((IOAPIC_BASE as usize + IOWIN) as *mut u32, value);
    }
}

/// Routes IOAPIC input `pin` to `vector` on the CPU with APIC ID `apic_id`:
/// fixed delivery, physical destination, edge-triggered, active high.
pub fn ioapic_route(pin: u8, vector: u8, apic_id: u8) {
    let reg = 0x10 + 2 * u32::from(pin);
    ioapic_write(reg + 1, u32::from(apic_id) << 24);
    ioapic_write(reg, u32::from(vector));
}

/// Masks IOAPIC input `pin`.
pub fn ioapic_mask(pin: u8) {
    ioapic_write(0x10 + 2 * u32::from(pin), LVT_MASKED);
}
