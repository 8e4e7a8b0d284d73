// SPDX-License-Identifier: Apache-2.0
//
// The fixed layout of the nano guest: where the image sits in guest-physical
// memory (identity-mapped, so virtual == physical), the selectors, vectors and
// device addresses. build.rs `include!`s this file to write the linker script,
// so it holds plain constants and nothing else (no inner attributes, no `use`).

/// Guest-physical (and virtual) address the image is linked at: 1 MiB.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// The 256 interrupt stubs sit at a fixed address so that the IDT, whose
/// entries split each handler address into three fields, can be a constant.
pub const STUBS_ADDR: u64 = IMAGE_BASE;
/// Bytes per interrupt stub (each stub is at `STUBS_ADDR + vector * STUB_SIZE`).
pub const STUB_SIZE: u64 = 16;
/// Number of IDT vectors.
pub const IDT_VECTORS: usize = 256;

/// The per-CPU TSS array sits at a fixed address so that the GDT's TSS
/// descriptors (which split the base too) can be constants.
pub const TSS_ADDR: u64 = STUBS_ADDR + STUB_SIZE * IDT_VECTORS as u64;
/// log2 of the distance between two CPUs' TSSs.
pub const TSS_SHIFT: u32 = 7;
/// Distance between two CPUs' TSSs (a TSS is 0x68 bytes).
pub const TSS_STRIDE: u64 = 1 << TSS_SHIFT;
/// Limit (size - 1) of a TSS without an I/O permission bitmap.
pub const TSS_LIMIT: u32 = 0x67;

/// Most vCPUs the nano guest supports (vCPU index 0..MAX_CPUS-1); cell0-vmm
/// accepts 1 to 32.
pub const MAX_CPUS: usize = 32;

/// log2 of the size of a CPU's ring-0 area (ring-0 stack plus its record).
/// The areas are aligned to their size, so a stub finds its CPU's record by
/// masking RSP.
pub const KCPU_SHIFT: u32 = 13;
/// Size of a CPU's ring-0 area.
pub const KCPU_SIZE: usize = 1 << KCPU_SHIFT;
/// log2 of the size of a CPU's ring-3 stack.
pub const USTACK_SHIFT: u32 = 16;
/// Size of a CPU's ring-3 stack.
pub const USTACK_SIZE: usize = 1 << USTACK_SHIFT;
/// Size of a CPU's ring-3 stack used while reporting a fault.
pub const FSTACK_SIZE: usize = 16 * 1024;

/// GDT selectors.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// User 64-bit code selector (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
/// Selector of CPU 0's TSS; CPU k's is `TSS0_SEL + 16 * k`.
pub const TSS0_SEL: u16 = 0x28;
/// GDT entries (8 bytes each): null, kernel code, kernel data, user data,
/// user code, then a 16-byte TSS descriptor per CPU.
pub const GDT_ENTRIES: usize = 5 + 2 * MAX_CPUS;

/// Vector of the software interrupt ring 3 uses to ask ring 0 for port I/O,
/// interrupt-flag changes, halting and crashing: `int3` (#BP). On the
/// project's hosts (kvm_pvm) `int n` from ring 3 is turned into #UD for every
/// n tried (0x80, 0x81), while `int3` is delivered through the IDT like any
/// exception. Nothing else in the nano guest uses breakpoints.
pub const SYSCALL_VECTOR: u8 = 3;
/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector the IOAPIC routes the serial port's IRQ 4 to.
pub const SERIAL_VECTOR: u8 = 0x41;
/// Vector of the IPI that wakes application processors.
pub const WAKE_VECTOR: u8 = 0x42;
/// Vector of the first virtio-mmio device's interrupt; device k (in cmdline
/// order) gets `VIRTIO_VECTOR_BASE + k`.
pub const VIRTIO_VECTOR_BASE: u8 = 0x50;
/// LAPIC spurious-interrupt vector (no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Local APIC MMIO page (xAPIC mode).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// I/O APIC MMIO page.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Start of the virtio-mmio window (DESIGN.md §3).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The identity map covers guest-physical 0..IDENTITY_MAP_END with 2 MiB pages.
pub const IDENTITY_MAP_END: u64 = 4 << 30;
/// From here to IDENTITY_MAP_END (the 32-bit MMIO hole) pages are uncached.
pub const UNCACHED_START: u64 = 3 << 30;

/// 8250 UART data port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 command port; writing `I8042_RESET` resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 "pulse reset line" command.
pub const I8042_RESET: u8 = 0xfe;

/// CR0 the ring-0 entry loads: PE | MP | ET | NE | WP | PG (EM and TS clear).
pub const CR0_VALUE: u32 = 0x8001_0033;
/// CR4 the ring-0 entry loads: PAE | OSFXSR | OSXMMEXCPT (no SMEP/SMAP/TSD).
pub const CR4_VALUE: u32 = 0x0000_0620;

/// ELF note (section `.note.cell0`) that tells the VMM where APs enter.
pub const CELL0_NOTE_NAME: &[u8; 6] = b"CELL0\0";
/// Note type: the descriptor is the u64 guest-physical AP entry address.
pub const CELL0_NOTE_SMP_ENTRY: u32 = 0x100;
