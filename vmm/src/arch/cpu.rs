// SPDX-License-Identifier: Apache-2.0
//! Boot CPU state: GDT, identity page tables, segment/control registers,
//! general registers, FPU, MSRs, CPUID and the local APIC's LINT pins.
//!
//! The VMM enters every guest directly in 64-bit long mode (Linux 64-bit boot
//! protocol): flat code/data segments, paging on with identity tables that map
//! the first 4 GiB with 2 MiB pages (1 GiB pages triple-fault on nested KVM).

use kvm_bindings::{
    CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, ZERO_PAGE};

/// Errors while setting up boot CPU state.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Writing a boot table into guest memory failed.
    #[error("cannot write the boot {what} into guest memory")]
    WriteTable {
        /// Which table.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("cannot set vCPU {what}")]
    Ioctl {
        /// Which register set.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Building a KVM FAM structure failed.
    #[error("cannot build the {what} list")]
    Fam {
        /// Which list.
        what: &'static str,
    },
}

type Result<T> = std::result::Result<T, CpuError>;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Builds a GDT descriptor from flags (access byte and flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes GDT entry `index` of `table` into the segment KVM expects.
pub fn segment_from_gdt(table: &[u64], index: usize) -> kvm_segment {
    let e = table[index];
    let base = ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000);
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: if (e >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the boot GDT, the empty IDT and the identity page tables into guest memory.
/// Done once per VM; every vCPU shares them.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let wr = |what, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| CpuError::WriteTable { what, source })
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        wr("GDT", GDT_ADDR + 8 * i as u64, *e)?;
    }
    wr("IDT", IDT_ADDR, 0)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories of 512 2 MiB pages each.
    wr("PML4", PML4_ADDR, PDPT_ADDR | 0x3)?;
    let mut pd = Vec::with_capacity(4 * 4096);
    for i in 0..4u64 {
        wr("PDPT", PDPT_ADDR + 8 * i, (PD_ADDR + 0x1000 * i) | 0x3)?;
    }
    for i in 0..2048u64 {
        // Present | writable | page size (2 MiB).
        pd.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(|source| CpuError::WriteTable {
            what: "page directory",
            source,
        })
}

/// Special registers for 64-bit entry, on top of what KVM reports.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(&BOOT_GDT, 1);
    let data = segment_from_gdt(&BOOT_GDT, 2);
    let tss = segment_from_gdt(&BOOT_GDT, 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry. `rdi` carries the vCPU index (used by the nano
/// guest's direct SMP entry; Linux ignores it).
pub fn entry_regs(entry: u64, vcpu_index: u64, stack: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi: ZERO_PAGE,
        rdi: vcpu_index,
        ..Default::default()
    }
}

/// Sets sregs, regs, FPU and MSRs for a vCPU entering at `entry`.
pub fn setup_entry(vcpu: &VcpuFd, entry: u64, vcpu_index: u64) -> Result<()> {
    let sregs = vcpu.get_sregs().map_err(|source| CpuError::Ioctl {
        what: "sregs",
        source,
    })?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(|source| CpuError::Ioctl {
            what: "sregs",
            source,
        })?;
    let stack = if vcpu_index == 0 { BOOT_STACK } else { 0 };
    vcpu.set_regs(&entry_regs(entry, vcpu_index, stack))
        .map_err(|source| CpuError::Ioctl {
            what: "regs",
            source,
        })?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| CpuError::Ioctl {
        what: "FPU",
        source,
    })?;
    setup_msrs(vcpu)
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Fam { what: "MSR" })?;
    let n = vcpu.set_msrs(&msrs).map_err(|source| CpuError::Ioctl {
        what: "MSRs",
        source,
    })?;
    if n != entries.len() {
        tracing::warn!(
            set = n,
            wanted = entries.len(),
            "KVM accepted only some boot MSRs"
        );
    }
    Ok(())
}

/// Filters the host's supported CPUID for vCPU `index` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // Initial APIC ID, logical processor count, hypervisor bit, HTT.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // x2APIC ID of this vCPU.
                e.edx = u32::from(index);
            }
            0x6 => {
                // No energy-performance bias MSR.
                e.ecx &= !(1 << 3);
            }
            0xa => {
                // No architectural performance monitoring.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x370;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT and LINT1 to NMI, as a PC's BIOS would.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut l = vcpu.get_lapic().map_err(|source| CpuError::Ioctl {
        what: "LAPIC",
        source,
    })?;
    let v0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, with_delivery_mode(v0, APIC_MODE_EXTINT));
    let v1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, with_delivery_mode(v1, APIC_MODE_NMI));
    vcpu.set_lapic(&l).map_err(|source| CpuError::Ioctl {
        what: "LAPIC",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_decodes_as_64_bit() {
        let cs = segment_from_gdt(&BOOT_GDT, 1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        let tss = segment_from_gdt(&BOOT_GDT, 3);
        assert_eq!((tss.type_, tss.s, tss.selector), (0xb, 0, 0x18));
        let null = segment_from_gdt(&BOOT_GDT, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn sregs_enable_long_mode_with_our_tables() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    }

    #[test]
    fn page_tables_identity_map_4_gib_with_2_mib_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3, (PD_ADDR + 0x3000) | 3);
        // The entry that maps 0xfee0_0000 (LAPIC) is a 2 MiB page at 0xfee0_0000 & !(2M-1).
        let idx = 0xfee0_0000u64 >> 21;
        let e: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * idx)).unwrap();
        assert_eq!(e, (idx << 21) | 0x83);
        assert_eq!(e & (1 << 7), 1 << 7, "2 MiB page bit set");
    }

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        let v = with_delivery_mode(lapic_reg(&l, APIC_LVT0), APIC_MODE_NMI);
        assert_eq!(v, 0x0001_0400);
    }
}
