// SPDX-License-Identifier: Apache-2.0
//! Ring-3 side of the ring-0 syscall stub (`int3`). Port I/O needs ring 0
//! on the project's hosts (IOPL=3 stops working once IF=1), as do `hlt` and
//! changes of IF, so ring 3 asks the stub: eax = op, edx = port, ecx = count
//! or value, rsi = buffer.

use core::arch::asm;

/// `rep outsb`: rsi = buffer, ecx = length, edx = port. Must be 0 (the stub
/// tests it first, with `test eax, eax`).
pub const OP_OUTS: u32 = 0;
/// `out dx, al` with al = cl.
pub const OP_OUTB: u32 = 1;
/// Return to ring 3 with IF=1 (interrupts taken while ring 3 runs).
pub const OP_IRQ_ON: u32 = 2;
/// Return to ring 3 with IF=0.
pub const OP_IRQ_OFF: u32 = 3;
/// `sti; hlt; cli`: sleep until an interrupt has been taken, then return with
/// IF as it was. Race-free when called with IF=0: an interrupt that became
/// pending after the caller's last check is taken right after `sti`.
pub const OP_WAIT: u32 = 4;
/// `hlt` forever with IF=0 (park this vCPU).
pub const OP_HALT: u32 = 5;
/// Any other op triple-faults on purpose (see `crash`).
pub const OP_CRASH: u32 = 0xdead;

const _: () = assert!(OP_OUTS == 0);

/// Writes `bytes` to I/O port `port`, one `outb` each, in one syscall.
pub fn outs(port: u16, bytes: &[u8]) {
    // SAFETY: the stub only reads `bytes` (rep outsb from rsi, rcx bytes) and
    // writes the port; it returns with every register but rax, rcx and rsi
    // intact and the flags restored by iretq. The int pushes onto the ring-0
    // stack, never this one.
    unsafe {
        asm!(
            "int3",
            inout("eax") OP_OUTS => _,
            in("edx") u32::from(port),
            inout("rcx") bytes.len() => _,
            inout("rsi") bytes.as_ptr() => _,
            options(nostack, readonly, preserves_flags),
        );
    }
}

/// Writes one byte to I/O port `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as `outs`; the stub clobbers rax only.
    unsafe {
        asm!(
            "int3",
            inout("eax") OP_OUTB => _,
            in("edx") u32::from(port),
            in("ecx") u32::from(value),
            options(nostack, nomem, preserves_flags),
        );
    }
}

fn op(op: u32) {
    // SAFETY: ops without arguments; the stub changes only IF in the saved
    // RFLAGS (by design) and may take interrupts whose stubs only count them.
    // Memory is a clobber: interrupt counters may change across the call.
    unsafe {
        asm!("int3", inout("eax") op => _, options(nostack));
    }
}

/// From now on ring 3 runs with IF=1 and takes interrupts.
pub fn irq_on() {
    op(OP_IRQ_ON);
}

/// From now on ring 3 runs with IF=0.
pub fn irq_off() {
    op(OP_IRQ_OFF);
}

/// Sleeps until an interrupt has been taken (see `OP_WAIT`).
pub fn wait_for_interrupt() {
    op(OP_WAIT);
}

/// Parks this vCPU for good (`hlt` with IF=0).
pub fn halt() -> ! {
    // SAFETY: the stub never returns.
    unsafe { asm!("int3", in("eax") OP_HALT, options(nostack, noreturn)) }
}

/// Ends the VM as a crash: ring 0 loads an empty IDT and raises an exception,
/// which escalates to a triple fault (KVM_EXIT_SHUTDOWN; the VMM exits
/// non-zero).
pub fn crash() -> ! {
    // SAFETY: the stub never returns.
    unsafe { asm!("int3", in("eax") OP_CRASH, options(nostack, noreturn)) }
}
