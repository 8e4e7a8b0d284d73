// SPDX-License-Identifier: Apache-2.0
//! Compile-time encodings of the x86_64 descriptor tables and page-table
//! entries. Ring 0 only loads them (`lgdt`, `lidt`, `ltr`, `mov cr3`): building
//! them at run time in ring 0 would cost about 1 µs per instruction on the
//! project's hosts, so every table is a constant in the image.

use crate::layout::{
    GDT_ENTRIES, IDENTITY_MAP_END, IDT_VECTORS, KERNEL_CS, MAX_CPUS, STUB_SIZE, STUBS_ADDR,
    SYSCALL_VECTOR, TSS_ADDR, TSS_LIMIT, TSS_STRIDE, UNCACHED_START,
};

/// Page-table entry bits.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Reachable from ring 3 (every level must have it).
pub const PTE_USER: u64 = 1 << 2;
/// Write-through.
pub const PTE_PWT: u64 = 1 << 3;
/// Cache disable.
pub const PTE_PCD: u64 = 1 << 4;
/// Accessed: preset so that the CPU (emulated in ring 0) never writes it.
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Dirty: preset for the same reason.
pub const PTE_DIRTY: u64 = 1 << 6;
/// Page size: a PDE that maps a 2 MiB page.
pub const PTE_HUGE: u64 = 1 << 7;

/// Flags of a PML4 or PDPT entry that points at the next table.
pub const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;

/// Size of a 2 MiB page.
pub const HUGE_PAGE: u64 = 2 << 20;
/// Number of page directories (one per GiB) the identity map needs.
pub const IDENTITY_PDS: usize = (IDENTITY_MAP_END >> 30) as usize;

/// The PDE that identity-maps the 2 MiB page at `addr`, uncached from
/// `UNCACHED_START` up (the 32-bit MMIO hole: virtio-mmio, IOAPIC, LAPIC).
pub const fn identity_pde(addr: u64) -> u64 {
    let cache = if addr >= UNCACHED_START {
        PTE_PCD | PTE_PWT
    } else {
        0
    };
    addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_HUGE | cache
}

/// The PDE that maps the 2 MiB page of the shared-memory window at `addr`
/// (above 4 GiB; ordinary cached memory that the host maps too).
pub const fn shm_pde(addr: u64) -> u64 {
    addr | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED | PTE_DIRTY | PTE_HUGE
}

/// The page directories that identity-map 0..IDENTITY_MAP_END with 2 MiB
/// pages (never 1 GiB pages: they triple-fault on the project's hosts).
pub const fn identity_pds() -> [[u64; 512]; IDENTITY_PDS] {
    let mut pds = [[0u64; 512]; IDENTITY_PDS];
    let mut gib = 0;
    while gib < IDENTITY_PDS {
        let mut i = 0;
        while i < 512 {
            pds[gib][i] = identity_pde(((gib as u64) << 30) + i as u64 * HUGE_PAGE);
            i += 1;
        }
        gib += 1;
    }
    pds
}

/// A 64-bit interrupt gate for `handler`: present, the given DPL, IST 0.
/// Interrupt gates clear IF on entry, so the stubs never nest by accident.
pub const fn interrupt_gate(handler: u64, selector: u16, dpl: u8) -> [u64; 2] {
    let type_attr: u64 = 0x80 | ((dpl as u64 & 3) << 5) | 0xe;
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (type_attr << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Address of the stub for `vector`.
pub const fn stub_address(vector: usize) -> u64 {
    STUBS_ADDR + vector as u64 * STUB_SIZE
}

/// The IDT: every vector goes to its stub at `stub_address(vector)`; only the
/// syscall vector may be raised from ring 3 (DPL 3).
pub const fn idt() -> [[u64; 2]; IDT_VECTORS] {
    let mut idt = [[0u64; 2]; IDT_VECTORS];
    let mut v = 0;
    while v < IDT_VECTORS {
        let dpl = if v == SYSCALL_VECTOR as usize { 3 } else { 0 };
        idt[v] = interrupt_gate(stub_address(v), KERNEL_CS, dpl);
        v += 1;
    }
    idt
}

/// An available 64-bit TSS descriptor (two GDT slots).
pub const fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// Address of CPU `cpu`'s TSS.
pub const fn tss_address(cpu: usize) -> u64 {
    TSS_ADDR + cpu as u64 * TSS_STRIDE
}

/// The GDT: null, kernel code (0x08), kernel data (0x10), user data (0x18),
/// user code (0x20), then one TSS descriptor per CPU from 0x28. Code and data
/// descriptors have the accessed bit preset so that loading them never writes
/// the table.
pub const fn gdt() -> [u64; GDT_ENTRIES] {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[1] = 0x00af_9b00_0000_ffff; // kernel code: L, P, DPL 0, execute/read, accessed
    gdt[2] = 0x00cf_9300_0000_ffff; // kernel data: P, DPL 0, read/write, accessed
    gdt[3] = 0x00cf_f300_0000_ffff; // user data: P, DPL 3, read/write, accessed
    gdt[4] = 0x00af_fb00_0000_ffff; // user code: L, P, DPL 3, execute/read, accessed
    let mut cpu = 0;
    while cpu < MAX_CPUS {
        let d = tss_descriptor(tss_address(cpu), TSS_LIMIT);
        gdt[5 + 2 * cpu] = d[0];
        gdt[6 + 2 * cpu] = d[1];
        cpu += 1;
    }
    gdt
}

/// A 64-bit task-state segment: only RSP0 (the ring-0 stack for interrupts
/// taken in ring 3) is used; no I/O permission bitmap.
#[repr(C, packed(4))]
pub struct Tss {
    _reserved0: u32,
    /// Stacks for CPL 0, 1, 2.
    pub rsp: [u64; 3],
    _reserved1: u64,
    /// Interrupt stack table.
    pub ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    /// Offset of the I/O bitmap; past the limit means "none".
    pub iomap_base: u16,
}

impl Tss {
    /// A TSS with every stack zero (RSP0 is stored by ring 0 at boot).
    pub const fn new() -> Self {
        Self {
            _reserved0: 0,
            rsp: [0; 3],
            _reserved1: 0,
            ist: [0; 7],
            _reserved2: 0,
            _reserved3: 0,
            iomap_base: TSS_LIMIT as u16 + 1,
        }
    }
}

impl Default for Tss {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte offset of RSP0 inside a TSS.
pub const TSS_RSP0_OFFSET: usize = core::mem::offset_of!(Tss, rsp);

const _: () = assert!(core::mem::size_of::<Tss>() == TSS_LIMIT as usize + 1);
const _: () = assert!(core::mem::size_of::<Tss>() as u64 <= TSS_STRIDE);
const _: () = assert!(TSS_RSP0_OFFSET == 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdes_map_identity_with_user_bit() {
        let pds = identity_pds();
        assert_eq!(pds[0][0], 0xe7);
        assert_eq!(pds[0][1], 0x20_0000 | 0xe7);
        // The LAPIC page is in the last 2 MiB page below 4 GiB, uncached.
        assert_eq!(pds[3][511], 0xffe0_0000 | 0xff);
        // virtio-mmio window start.
        assert_eq!(
            pds[3][(0xd000_0000u64 - (3 << 30)) as usize / (2 << 20)],
            0xd000_0000 | 0xff
        );
        // RAM below 3 GiB is cached.
        assert_eq!(pds[2][511] & (PTE_PCD | PTE_PWT), 0);
    }

    #[test]
    fn shm_pdes_are_cached_user_writable_2mib_pages() {
        assert_eq!(shm_pde(4 << 30), (4 << 30) | 0xe7);
        assert_eq!(shm_pde(4 << 30) & (PTE_PCD | PTE_PWT), 0);
    }

    #[test]
    fn interrupt_gate_splits_the_handler_address() {
        let g = interrupt_gate(0x1234_5678_9abc_def0, 0x08, 0);
        assert_eq!(g[0] & 0xffff, 0xdef0);
        assert_eq!((g[0] >> 16) & 0xffff, 0x08);
        assert_eq!((g[0] >> 32) & 0xff, 0); // IST 0
        assert_eq!((g[0] >> 40) & 0xff, 0x8e);
        assert_eq!(g[0] >> 48, 0x9abc);
        assert_eq!(g[1], 0x1234_5678);
        assert_eq!((interrupt_gate(0, 8, 3)[0] >> 40) & 0xff, 0xee);
    }

    #[test]
    fn idt_points_at_fixed_stubs() {
        let idt = idt();
        assert_eq!(idt[0][0] & 0xffff, STUBS_ADDR & 0xffff);
        let v = 0x41;
        let addr = (idt[v][0] & 0xffff) | ((idt[v][0] >> 48) << 16) | (idt[v][1] << 32);
        assert_eq!(addr, STUBS_ADDR + 0x41 * 16);
        assert_eq!((idt[SYSCALL_VECTOR as usize][0] >> 40) & 0xff, 0xee);
        assert_eq!((idt[0x80][0] >> 40) & 0xff, 0x8e);
        assert_eq!((idt[14][0] >> 40) & 0xff, 0x8e);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let d = tss_descriptor(0x1234_5678_9abc_def0, 0x67);
        assert_eq!(d[0] & 0xffff, 0x67);
        assert_eq!((d[0] >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((d[0] >> 40) & 0xff, 0x89);
        assert_eq!((d[0] >> 56) & 0xff, 0x9a);
        assert_eq!(d[1], 0x1234_5678);
    }

    #[test]
    fn gdt_has_one_tss_per_cpu() {
        let g = gdt();
        assert_eq!(g[0], 0);
        for cpu in 0..MAX_CPUS {
            let d = [g[5 + 2 * cpu], g[6 + 2 * cpu]];
            assert_eq!(d, tss_descriptor(TSS_ADDR + cpu as u64 * TSS_STRIDE, 0x67));
        }
    }

    #[test]
    fn tss_has_no_io_bitmap() {
        let t = Tss::new();
        let base = t.iomap_base;
        assert_eq!(base, 0x68);
    }
}
