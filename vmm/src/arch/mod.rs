// SPDX-License-Identifier: Apache-2.0
//! x86_64 guest layout and the CPU state the VMM sets before the first entry.
//!
//! Memory map (guest-physical):
//!
//! | range | use |
//! |---|---|
//! | `0x500..0x520` | boot GDT |
//! | `0x520..0x528` | boot IDT (empty) |
//! | `0x7000..0x8000` | zero page (`boot_params`) |
//! | `..0x8ff0` | boot stack |
//! | `0x9000..0xf000` | boot page tables: PML4, PDPT, 4 PDs (first 4 GiB, 2 MiB pages) |
//! | `0x20000..0x20800` | kernel command line |
//! | `0x9fc00..0xa0000` | MP table (EBDA) |
//! | `0x100000..` | kernel |
//! | top of low RAM | initrd |
//! | `0xc000_0000..0x1_0000_0000` | MMIO hole: virtio-mmio from `0xd000_0000`, IOAPIC, LAPIC |

pub mod cpu;
pub mod mptable;

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Boot IDT (limit 7, no gates: the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// Linux zero page.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the four page directories (2 MiB pages) that map the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line, NUL excluded (x86 `COMMAND_LINE_SIZE` is 2048 with the NUL).
pub const CMDLINE_MAX: usize = 2047;
/// Start of the EBDA, where the MP table goes; RAM below it is reported to the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (high memory).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM above it moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) given to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS pages (three pages, inside the MMIO hole).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Most vCPUs: the MP table must fit in the 1 KiB EBDA (as in Firecracker).
pub const MAX_VCPUS: u8 = 32;
/// Serial IRQ.
pub const SERIAL_IRQ: u32 = 4;

// The boot stack sits between the zero page and the page tables; the EBDA ends below the kernel.
const _: () = assert!(BOOT_STACK < PML4_ADDR && BOOT_STACK > ZERO_PAGE + 0x1000);
const _: () = assert!(EBDA_START + 0x400 <= HIMEM_START);

/// Guest RAM ranges for `size` bytes of memory: one range, or two around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(16 << 20), vec![(0, 16 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut r = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (ZERO_PAGE, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x4000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64 + 1),
            (EBDA_START, 0x400),
        ];
        r.sort();
        for w in r.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?}");
        }
    }
}
