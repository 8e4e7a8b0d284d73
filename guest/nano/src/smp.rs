// SPDX-License-Identifier: Apache-2.0
//! Application processors. The VMM starts each AP directly in 64-bit mode at
//! the address in the CELL0 ELF note (real-mode INIT/SIPI start-up does not
//! work on the project's hosts); after the same ring-0 entry as the BSP they
//! land here, in ring 3. They sleep (`hlt` in the syscall stub, so they cost
//! the host nothing) until the BSP releases them with an IPI.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use cell0_nano::layout::WAKE_VECTOR;

use crate::{lapic, say, sys, time};

/// What the BSP tells the APs: 0 = keep sleeping, `REPORT` = report in.
static COMMAND: AtomicU32 = AtomicU32::new(0);
const REPORT: u32 = 1;

/// CPUs that have reported in.
static ONLINE: AtomicUsize = AtomicUsize::new(0);

/// How long the BSP waits for every AP (nominal; see `time`).
const SMP_TIMEOUT_MS: u64 = 10_000;

/// An AP's life in ring 3.
pub fn ap_main(cpu: usize) -> ! {
    // Enabled before COMMAND is read: an IPI sent before this point is lost,
    // but then COMMAND was already set when we read it below.
    lapic::enable();
    while COMMAND.load(Ordering::Acquire) == 0 {
        // Ring 3 runs with IF=0, so an IPI arriving after the check stays
        // pending and ends the `sti; hlt` at once: no lost wake-up.
        sys::wait_for_interrupt();
    }
    say!("cpu {} online", cpu);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    sys::halt()
}

/// The `smp` self-test, on the BSP: release the APs, wait (bounded) until
/// `cpus` CPUs, the BSP included, have reported in.
pub fn test(cpus: usize) -> Result<(), &'static str> {
    say!("cpu 0 online");
    ONLINE.fetch_add(1, Ordering::AcqRel);
    COMMAND.store(REPORT, Ordering::Release);
    if cpus > 1 {
        lapic::enable();
        lapic::ipi_all_but_self(WAKE_VECTOR);
    }
    let deadline = time::deadline(SMP_TIMEOUT_MS * time::CYCLES_PER_MS);
    while ONLINE.load(Ordering::Acquire) < cpus && !time::passed(deadline) {
        spin_loop();
    }
    let online = ONLINE.load(Ordering::Acquire);
    say!("smp {}/{} cpus online", online, cpus);
    if online == cpus {
        Ok(())
    } else if online < cpus {
        Err("not every vCPU reported in before the timeout")
    } else {
        Err("more vCPUs reported in than cell0.cpus says")
    }
}
