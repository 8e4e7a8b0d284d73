// SPDX-License-Identifier: Apache-2.0
//! Reporting an unexpected exception or a Rust panic, then ending the VM with
//! a deliberate triple fault (the VMM sees KVM_EXIT_SHUTDOWN and exits
//! non-zero).

use core::panic::PanicInfo;
use core::ptr;

use cell0_nano::layout::KCPU_SIZE;
use cell0_nano::record::{CpuRecord, exception_name};

use crate::{arch, say_dying, sys};

/// Ends the VM as a crash. The last line on serial says so.
pub fn die() -> ! {
    say_dying!("crashing the VM (triple fault)");
    sys::crash()
}

/// Ring 3 entry of the exception stub: `record` is the faulting CPU's record,
/// filled in by ring 0; runs on the CPU's fault stack with IF=0.
pub extern "C" fn nano_fault(record: *const CpuRecord) -> ! {
    // SAFETY: ring 0 passes this CPU's record, written completely before the
    // iretq that got us here; nothing writes it while we read.
    let f = unsafe { ptr::read_volatile(&raw const (*record).fault) };
    let cpu = (record as usize - arch::KCPUS.get() as usize) / KCPU_SIZE;
    say_dying!(
        "fault: vector {} ({}) error {:#x} on cpu {}",
        f.vector,
        exception_name(f.vector),
        f.error,
        cpu
    );
    say_dying!(
        "rip {:#018x} cs {:#x} rflags {:#010x} rsp {:#018x} ss {:#x}",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss
    );
    if f.vector == 14 {
        say_dying!("cr2 {:#018x}", f.cr2);
    }
    say_dying!(
        "rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx
    );
    say_dying!(
        "rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}",
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8
    );
    say_dying!(
        "r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}",
        f.r9,
        f.r10,
        f.r11,
        f.r12
    );
    say_dying!(
        "r13 {:#018x} r14 {:#018x} r15 {:#018x}",
        f.r13,
        f.r14,
        f.r15
    );
    die()
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    match info.location() {
        Some(at) => say_dying!("panic at {}:{}: {}", at.file(), at.line(), info.message()),
        None => say_dying!("panic: {}", info.message()),
    }
    die()
}

/// The precompiled `core` refers to this symbol from its unwind tables; with
/// panic=abort nothing ever calls it. Release builds drop the reference (LTO);
/// a dev build needs the symbol to link.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {
    sys::crash()
}

/// The precompiled `alloc` refers to this from its cleanup paths; with
/// panic=abort nothing unwinds, so nothing ever calls it.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    sys::crash()
}
