// SPDX-License-Identifier: Apache-2.0
//! Ring 0 of the nano guest: the static tables it loads and the few lines of
//! assembly that load them, the interrupt stubs and the syscall stub.
//!
//! On the project's hosts ring-0 code is run by KVM's instruction emulator at
//! about 1 µs per instruction and must not touch SSE, so ring 0 is assembly
//! only and short: the entry loads GDT, IDT, CR0, CR4, CR3 and TR from tables
//! built at compile time, then `iretq`s into ring 3, where all Rust runs.
//! The stubs record an event and return; port I/O and `hlt` are ring-0 only,
//! so ring 3 asks for them through `int3` (see `sys`).

use core::cell::UnsafeCell;
use core::mem::{offset_of, size_of};
use core::ptr;
use core::sync::atomic::AtomicU64;

use cell0_nano::layout::{
    CELL0_NOTE_SMP_ENTRY, CR0_VALUE, CR4_VALUE, FSTACK_SIZE, GDT_ENTRIES, IDT_VECTORS, KCPU_SHIFT,
    KCPU_SIZE, LAPIC_BASE, MAX_CPUS, SPURIOUS_VECTOR, SYSCALL_VECTOR, TSS_ADDR, TSS_SHIFT,
    TSS0_SEL, USER_CS, USER_DS, USTACK_SHIFT, USTACK_SIZE,
};
use cell0_nano::record::{CpuRecord, FaultFrame};
use cell0_nano::tables::{self, IDENTITY_PDS, TABLE_FLAGS, TSS_RSP0_OFFSET, Tss};

use crate::sys;

/// A static that ring 0, the CPU itself or several CPUs write: interior
/// mutability, shared between CPUs. Every access goes through a raw pointer
/// and says why it is sound.
#[repr(transparent)]
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: `Shared` hands out raw pointers only; each user documents the
// ownership rule that makes its accesses race-free (per-CPU slots, or data
// written only by ring 0 / the CPU).
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the value.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

// ---------------------------------------------------------------------------
// Page tables: identity map of 0..4 GiB with 2 MiB pages, all with the U bit
// (ring 3 runs everything, MMIO included), uncached from 3 GiB up.

#[repr(C, align(4096))]
struct PageDirectories([[u64; 512]; IDENTITY_PDS]);

#[repr(C, align(4096))]
struct PageTable([*const u8; 512]);

// SAFETY: PML4 is never written by Rust; the PDPT sits in `Shared` and is
// written through raw pointers only (`link_pd`). The CPU only sets accessed
// and dirty bits, which are preset anyway.
unsafe impl Sync for PageTable {}

static PDS: PageDirectories = PageDirectories(tables::identity_pds());

/// Table entries that point at another static are pointers (address plus the
/// flag bits as an offset), so the linker fills them in.
const fn next_level(table: *const u8) -> *const u8 {
    table.wrapping_add(TABLE_FLAGS as usize)
}

/// The PDPT behind PML4 entry 0 (0..512 GiB). Entries 0..4 point at the
/// identity map's directories; ring 3 adds the shared-memory window's
/// directories above them at run time (`link_pd`), hence `Shared`.
static PDPT: Shared<PageTable> = Shared::new({
    let mut t = [ptr::null::<u8>(); 512];
    let mut i = 0;
    while i < IDENTITY_PDS {
        t[i] = next_level((&raw const PDS.0[i]).cast());
        i += 1;
    }
    PageTable(t)
});

static PML4: PageTable = {
    let mut t = [ptr::null::<u8>(); 512];
    t[0] = next_level(PDPT.get().cast_const().cast());
    PageTable(t)
};

/// Links the page directory at `pd` (4 KiB-aligned, identity-mapped, filled
/// in) as PDPT entry `gib`, so it maps `gib` GiB..`gib + 1` GiB. Refuses
/// (`false`) an index inside the identity map, past 511, or already linked.
///
/// No TLB flush is needed: the entry goes from not present to present, and
/// no CPU caches a translation through a non-present entry (Intel SDM
/// 4.10.4.3); a shadow-paging host traps the write to the live table.
pub fn link_pd(gib: usize, pd: u64) -> bool {
    if !(IDENTITY_PDS..512).contains(&gib) || pd % 4096 != 0 {
        return false;
    }
    // SAFETY: `gib` < 512 is in bounds; the slot is read and written through
    // raw pointers only (volatile: the CPU walks this live table). Only the
    // BSP's ring 3 calls this, before any CPU touches the new range.
    unsafe {
        let slot = (&raw mut (*PDPT.get()).0[gib]).cast::<u64>();
        if ptr::read_volatile(slot) != 0 {
            return false;
        }
        ptr::write_volatile(slot, pd | TABLE_FLAGS);
    }
    true
}

// ---------------------------------------------------------------------------
// Descriptor tables.

#[repr(C, align(16))]
struct Gdt([u64; GDT_ENTRIES]);

/// Written by `ltr` (busy bits), hence `Shared`.
static GDT: Shared<Gdt> = Shared::new(Gdt(tables::gdt()));

#[repr(C, align(16))]
struct Idt([[u64; 2]; IDT_VECTORS]);

static IDT: Idt = Idt(tables::idt());

#[repr(C, align(128))]
struct TssSlot(Tss);

/// One TSS per CPU at the fixed `TSS_ADDR` (the GDT encodes it). Ring 0 of
/// CPU k writes only slot k's RSP0, once, at entry.
#[used]
#[unsafe(link_section = ".nano.tss")]
static TSS: Shared<[TssSlot; MAX_CPUS]> = Shared::new([const { TssSlot(Tss::new()) }; MAX_CPUS]);

// ---------------------------------------------------------------------------
// Per-CPU stacks and records.

/// A CPU's ring-0 area: the stack interrupts from ring 3 land on (TSS.RSP0
/// points at its top, which is where `record` starts) and the CPU's record.
/// Aligned to its size, so `rsp & !(KCPU_SIZE - 1)` finds it.
#[repr(C, align(8192))]
pub struct KernelCpu {
    stack: [u8; KCPU_SIZE - size_of::<CpuRecord>()],
    /// Written by the exception stub, read by ring 3.
    pub record: CpuRecord,
}

const _: () = assert!(size_of::<KernelCpu>() == KCPU_SIZE);
const _: () = assert!(offset_of!(KernelCpu, record) % 16 == 0);

/// Ring-0 areas, one per CPU (CPU k uses only slot k).
pub static KCPUS: Shared<[KernelCpu; MAX_CPUS]> = Shared::new(
    [const {
        KernelCpu {
            stack: [0; KCPU_SIZE - size_of::<CpuRecord>()],
            record: CpuRecord::new(),
        }
    }; MAX_CPUS],
);

#[repr(C, align(4096))]
struct Stack<const N: usize>([u8; N]);

/// Ring-3 stacks, one per CPU; the ring-0 entry points RSP at the top of slot k.
static USTACKS: Shared<[Stack<USTACK_SIZE>; MAX_CPUS]> =
    Shared::new([const { Stack([0; USTACK_SIZE]) }; MAX_CPUS]);

/// Ring-3 stacks the fault reporter runs on, one per CPU.
static FSTACKS: Shared<[Stack<FSTACK_SIZE>; MAX_CPUS]> =
    Shared::new([const { Stack([0; FSTACK_SIZE]) }; MAX_CPUS]);

/// Interrupts taken per vector (vectors 32..255), counted by the ring-0 stub.
pub static IRQ_COUNTS: [AtomicU64; IDT_VECTORS] = [const { AtomicU64::new(0) }; IDT_VECTORS];

/// The record of `cpu` (`cpu < MAX_CPUS`).
pub fn record(cpu: usize) -> *mut CpuRecord {
    assert!(cpu < MAX_CPUS);
    // SAFETY: `cpu` is in bounds; only a raw pointer is formed, no reference.
    unsafe { &raw mut (*KCPUS.get())[cpu].record }
}

/// Ring-3 start-up of `cpu`: tells the exception stub which stack the fault
/// reporter runs on. Called once per CPU, by that CPU, before anything else.
pub fn init_cpu(cpu: usize) {
    assert!(cpu < MAX_CPUS);
    // SAFETY: slot `cpu` of FSTACKS belongs to this CPU; we only compute its end.
    let top = unsafe {
        (&raw mut (*FSTACKS.get())[cpu])
            .cast::<u8>()
            .add(FSTACK_SIZE)
    } as u64;
    // SAFETY: this CPU owns its record; ring 0 reads `fault_stack_top` only
    // after an exception on this same CPU. The -8 gives the reporter the
    // stack alignment of a function entry.
    unsafe { ptr::write_volatile(&raw mut (*record(cpu)).fault_stack_top, top - 8) };
}

/// The CPU whose ring-3 stack (or fault stack) we are running on, found from
/// RSP: ring 3 has no per-CPU register, and reading the APIC ID would cost a
/// VM exit.
pub fn current_cpu() -> usize {
    let rsp: usize;
    // SAFETY: reads RSP only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    let ustacks = USTACKS.get() as usize;
    let fstacks = FSTACKS.get() as usize;
    if let Some(off) = rsp
        .checked_sub(ustacks)
        .filter(|o| *o < USTACK_SIZE * MAX_CPUS)
    {
        off / USTACK_SIZE
    } else if let Some(off) = rsp
        .checked_sub(fstacks)
        .filter(|o| *o < FSTACK_SIZE * MAX_CPUS)
    {
        off / FSTACK_SIZE
    } else {
        0
    }
}

const REC_OFF: usize = offset_of!(KernelCpu, record);
const FAULT: usize = offset_of!(CpuRecord, fault);

macro_rules! reg_off {
    ($f:ident) => {
        FAULT + offset_of!(FaultFrame, $f)
    };
}

// The ring-0 entry points. The VMM enters `nano_entry` on the BSP and
// `nano_ap_entry` (named by the CELL0 ELF note) on each AP, in 64-bit mode at
// CPL 0 with IF=0, rsi = boot_params and, for APs, rdi = vCPU index. Nothing
// else the VMM set up is trusted: GDT, IDT, CR0/CR3/CR4 and TR are ours.
core::arch::global_asm!(
    r#"
    .section .text.nano_entry, "ax"
    .globl nano_entry
    .globl nano_ap_entry
    .code64
nano_entry:
    xorl %edi, %edi
nano_ap_entry:
    cmpq ${max_cpus}, %rdi
    jae 9f
    lgdt nano_gdtr(%rip)
    lidt nano_idtr(%rip)
    movl ${cr4}, %eax
    movq %rax, %cr4
    movl ${cr0}, %eax
    movq %rax, %cr0
    leaq {pml4}(%rip), %rax
    movq %rax, %cr3
    /* rsp = TSS[k].rsp0 = top of this CPU's ring-0 stack (= its record);
       the VMM enters APs with rsp = 0. */
    movq %rdi, %rax
    shlq ${kcpu_shift}, %rax
    leaq {kcpus}+{rec_off}(%rax), %rax
    movq %rdi, %rcx
    shlq ${tss_shift}, %rcx
    movq %rax, {tss_addr}+{rsp0_off}(%rcx)
    movq %rax, %rsp
    movl %edi, %ecx
    shll $4, %ecx
    addl ${tss0_sel}, %ecx
    ltr %cx
    /* iretq into ring 3: nano_main(rdi = cpu, rsi = boot_params), IF=0. */
    movq %rdi, %rax
    shlq ${ustack_shift}, %rax
    leaq {ustacks}+{ustack_size}-8(%rax), %rax
    pushq ${user_ds}
    pushq %rax
    pushq $2
    pushq ${user_cs}
    leaq {main}(%rip), %rax
    pushq %rax
    iretq
9:  /* A vCPU index past MAX_CPUS: no stacks for it, park it. */
    cli
    hlt
    jmp 9b

    .section .rodata.nano_dtr, "a"
    .balign 16
nano_gdtr:
    .word {gdt_size}-1
    .quad {gdt}
    .balign 16
nano_idtr:
    .word {idt_size}-1
    .quad {idt}
    .balign 16
nano_null_idtr:
    .word 0
    .quad 0

    /* ELF note: name "CELL0", type CELL0_NOTE_SMP_ENTRY, desc = u64 AP entry. */
    .section .note.cell0, "a", @note
    .balign 4
    .long 6
    .long 8
    .long {note_type}
    .asciz "CELL0"
    .balign 4
    .quad nano_ap_entry
    .text
"#,
    max_cpus = const MAX_CPUS,
    cr4 = const CR4_VALUE,
    cr0 = const CR0_VALUE,
    pml4 = sym PML4,
    kcpu_shift = const KCPU_SHIFT,
    kcpus = sym KCPUS,
    rec_off = const REC_OFF,
    tss_shift = const TSS_SHIFT,
    tss_addr = const TSS_ADDR,
    rsp0_off = const TSS_RSP0_OFFSET,
    tss0_sel = const TSS0_SEL,
    ustack_shift = const USTACK_SHIFT,
    ustacks = sym USTACKS,
    ustack_size = const USTACK_SIZE,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    main = sym crate::nano_main,
    gdt_size = const size_of::<Gdt>(),
    gdt = sym GDT,
    idt_size = const size_of::<Idt>(),
    idt = sym IDT,
    note_type = const CELL0_NOTE_SMP_ENTRY,
    options(att_syntax)
);

// The interrupt stubs: 16 bytes each at STUBS_ADDR + 16 * vector. Each pushes
// a zero error code where the CPU pushes none, then its vector, and jumps to
// the common code; the syscall vector goes to the syscall stub instead.
//
// Common code: vectors 32..255 are interrupts: count them, EOI the LAPIC
// (except the spurious vector) and return. Vectors 0..31 are exceptions, none
// of them expected: save the registers into this CPU's record and `iretq`
// into ring 3 at `nano_fault` on the fault stack, which prints the report
// and crashes the VM. A second exception while reporting triple-faults.
core::arch::global_asm!(
    r#"
    .section .nano.stubs, "ax"
    .globl nano_stubs
nano_stubs:
    .set nano_vec, 0
    .rept {vectors}
    .balign 16
    .if nano_vec == {syscall_vector}
    jmp nano_syscall
    .else
    .if (nano_vec == 8) || ((nano_vec >= 10) && (nano_vec <= 14)) || (nano_vec == 17) || (nano_vec == 21) || (nano_vec == 29) || (nano_vec == 30)
    .else
    pushq $0
    .endif
    pushq $nano_vec
    jmp nano_isr_common
    .endif
    .set nano_vec, nano_vec + 1
    .endr
    .balign 16
nano_stubs_end:

    .section .text.nano_isr, "ax"
nano_isr_common:
    pushq %rax
    movq 8(%rsp), %rax
    cmpq $32, %rax
    jb 2f
    lock incq {irq_counts}(,%rax,8)
    cmpl ${spurious}, %eax
    je 1f
    movl ${lapic_eoi}, %eax
    movl $0, (%rax)
1:  popq %rax
    addq $16, %rsp
    iretq

2:  movq %rsp, %rax
    andq $-{kcpu_size}, %rax
    addq ${rec_off}, %rax
    cmpq $0, {in_fault}(%rax)
    jne nano_die
    movq $1, {in_fault}(%rax)
    movq %rbx, {r_rbx}(%rax)
    movq %rcx, {r_rcx}(%rax)
    movq %rdx, {r_rdx}(%rax)
    movq %rsi, {r_rsi}(%rax)
    movq %rdi, {r_rdi}(%rax)
    movq %rbp, {r_rbp}(%rax)
    movq %r8, {r_r8}(%rax)
    movq %r9, {r_r9}(%rax)
    movq %r10, {r_r10}(%rax)
    movq %r11, {r_r11}(%rax)
    movq %r12, {r_r12}(%rax)
    movq %r13, {r_r13}(%rax)
    movq %r14, {r_r14}(%rax)
    movq %r15, {r_r15}(%rax)
    movq %rax, %rbx
    popq %rax
    movq %rax, {r_rax}(%rbx)
    popq %rax
    movq %rax, {r_vector}(%rbx)
    popq %rax
    movq %rax, {r_error}(%rbx)
    movq 0(%rsp), %rax
    movq %rax, {r_rip}(%rbx)
    movq 8(%rsp), %rax
    movq %rax, {r_cs}(%rbx)
    movq 16(%rsp), %rax
    movq %rax, {r_rflags}(%rbx)
    movq 24(%rsp), %rax
    movq %rax, {r_rsp}(%rbx)
    movq 32(%rsp), %rax
    movq %rax, {r_ss}(%rbx)
    movq %cr2, %rax
    movq %rax, {r_cr2}(%rbx)
    leaq {fault_entry}(%rip), %rax
    movq %rax, 0(%rsp)
    movq ${user_cs}, 8(%rsp)
    movq $2, 16(%rsp)
    movq {fstack}(%rbx), %rax
    movq %rax, 24(%rsp)
    movq ${user_ds}, 32(%rsp)
    movq %rbx, %rdi
    iretq

    /* Triple fault on purpose: with an empty IDT any exception escalates to
       a shutdown, which the VMM reports as a guest crash. */
    .globl nano_die
nano_die:
    lidt nano_null_idtr(%rip)
    ud2

    /* int3 from ring 3 (the syscall): eax = op, edx = port, ecx = count or
       value, rsi = buffer. Interrupt gate, so IF=0 in here. */
nano_syscall:
    testl %eax, %eax
    jnz 1f
    cld
    rep outsb
    iretq
1:  cmpl ${op_outb}, %eax
    jne 2f
    movl %ecx, %eax
    outb %al, %dx
    iretq
2:  cmpl ${op_irq_on}, %eax
    jne 3f
    orq $0x200, 16(%rsp)
    iretq
3:  cmpl ${op_irq_off}, %eax
    jne 4f
    andq $-0x201, 16(%rsp)
    iretq
4:  cmpl ${op_wait}, %eax
    jne 5f
    sti
    hlt
    cli
    iretq
5:  cmpl ${op_halt}, %eax
    jne nano_die
6:  hlt
    jmp 6b
    .text
"#,
    vectors = const IDT_VECTORS,
    syscall_vector = const SYSCALL_VECTOR,
    irq_counts = sym IRQ_COUNTS,
    spurious = const SPURIOUS_VECTOR,
    lapic_eoi = const LAPIC_BASE + crate::lapic::EOI as u64,
    kcpu_size = const KCPU_SIZE,
    rec_off = const REC_OFF,
    in_fault = const offset_of!(CpuRecord, in_fault),
    fstack = const offset_of!(CpuRecord, fault_stack_top),
    r_rax = const reg_off!(rax),
    r_rbx = const reg_off!(rbx),
    r_rcx = const reg_off!(rcx),
    r_rdx = const reg_off!(rdx),
    r_rsi = const reg_off!(rsi),
    r_rdi = const reg_off!(rdi),
    r_rbp = const reg_off!(rbp),
    r_r8 = const reg_off!(r8),
    r_r9 = const reg_off!(r9),
    r_r10 = const reg_off!(r10),
    r_r11 = const reg_off!(r11),
    r_r12 = const reg_off!(r12),
    r_r13 = const reg_off!(r13),
    r_r14 = const reg_off!(r14),
    r_r15 = const reg_off!(r15),
    r_vector = const reg_off!(vector),
    r_error = const reg_off!(error),
    r_rip = const reg_off!(rip),
    r_cs = const reg_off!(cs),
    r_rflags = const reg_off!(rflags),
    r_rsp = const reg_off!(rsp),
    r_ss = const reg_off!(ss),
    r_cr2 = const reg_off!(cr2),
    fault_entry = sym crate::fault::nano_fault,
    user_cs = const USER_CS,
    user_ds = const USER_DS,
    op_outb = const sys::OP_OUTB,
    op_irq_on = const sys::OP_IRQ_ON,
    op_irq_off = const sys::OP_IRQ_OFF,
    op_wait = const sys::OP_WAIT,
    op_halt = const sys::OP_HALT,
    options(att_syntax)
);
