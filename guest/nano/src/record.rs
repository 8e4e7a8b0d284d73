// SPDX-License-Identifier: Apache-2.0
//! The per-CPU record that ring-0 stubs fill in and ring-3 Rust reads. It
//! sits at the top of each CPU's ring-0 area, right above the ring-0 stack, so
//! a stub finds it by masking RSP (see `layout::KCPU_SHIFT`).

/// What the exception stub saved when a CPU took an unexpected exception.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultFrame {
    /// General registers at the time of the fault.
    pub rax: u64,
    /// rbx.
    pub rbx: u64,
    /// rcx.
    pub rcx: u64,
    /// rdx.
    pub rdx: u64,
    /// rsi.
    pub rsi: u64,
    /// rdi.
    pub rdi: u64,
    /// rbp.
    pub rbp: u64,
    /// r8.
    pub r8: u64,
    /// r9.
    pub r9: u64,
    /// r10.
    pub r10: u64,
    /// r11.
    pub r11: u64,
    /// r12.
    pub r12: u64,
    /// r13.
    pub r13: u64,
    /// r14.
    pub r14: u64,
    /// r15.
    pub r15: u64,
    /// Exception vector (0..31).
    pub vector: u64,
    /// Error code (0 for exceptions without one).
    pub error: u64,
    /// The interrupted context's RIP, CS, RFLAGS, RSP and SS.
    pub rip: u64,
    /// cs.
    pub cs: u64,
    /// rflags.
    pub rflags: u64,
    /// rsp.
    pub rsp: u64,
    /// ss.
    pub ss: u64,
    /// CR2 (the faulting address of a #PF).
    pub cr2: u64,
}

/// One CPU's record. Ring 3 writes `fault_stack_top` at start-up; the
/// exception stub writes `fault` and `in_fault`.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuRecord {
    /// Saved state of the last unexpected exception.
    pub fault: FaultFrame,
    /// Non-zero once a fault is being reported: a second fault then
    /// triple-faults at once instead of looping.
    pub in_fault: u64,
    /// Ring-3 stack pointer the fault reporter runs on.
    pub fault_stack_top: u64,
}

impl CpuRecord {
    /// An empty record.
    pub const fn new() -> Self {
        Self {
            fault: FaultFrame {
                rax: 0,
                rbx: 0,
                rcx: 0,
                rdx: 0,
                rsi: 0,
                rdi: 0,
                rbp: 0,
                r8: 0,
                r9: 0,
                r10: 0,
                r11: 0,
                r12: 0,
                r13: 0,
                r14: 0,
                r15: 0,
                vector: 0,
                error: 0,
                rip: 0,
                cs: 0,
                rflags: 0,
                rsp: 0,
                ss: 0,
                cr2: 0,
            },
            in_fault: 0,
            fault_stack_top: 0,
        }
    }
}

/// Mnemonic of an exception vector, for the fault report.
pub const fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        28 => "#HV",
        29 => "#VC",
        30 => "#SX",
        _ => "reserved",
    }
}

/// Whether the CPU pushes an error code for this exception vector.
pub const fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

const _: () = assert!(core::mem::size_of::<CpuRecord>() % 16 == 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_error_codes() {
        assert_eq!(exception_name(14), "#PF");
        assert_eq!(exception_name(13), "#GP");
        assert_eq!(exception_name(9), "reserved");
        assert!(has_error_code(14));
        assert!(has_error_code(8));
        assert!(!has_error_code(6));
        assert!(!has_error_code(32));
    }

    #[test]
    fn record_layout_is_stable() {
        assert_eq!(core::mem::offset_of!(FaultFrame, rax), 0);
        assert_eq!(core::mem::offset_of!(FaultFrame, cr2), 22 * 8);
        assert_eq!(core::mem::size_of::<CpuRecord>(), 208);
    }
}
