// SPDX-License-Identifier: Apache-2.0
//! The self-tests `cell0.test=NAME` selects. Each prints fixed lines (see
//! README.md for the exact output) and returns; a failure is an `Err` whose
//! text ends up in `test NAME failed: ...`.

use alloc::string::String;
use core::fmt;
use core::ptr;
use core::sync::atomic::Ordering;

use cell0_nano::layout::{IDENTITY_MAP_END, SERIAL_PORT, SERIAL_VECTOR, TIMER_VECTOR};

use crate::arch::IRQ_COUNTS;
use crate::{devtest, evil, lapic, nettest, routertest, say, smp, sys, time};

/// Why a self-test failed: the text after `test NAME failed: `.
#[derive(Debug)]
pub struct Fail(pub String);

impl From<&str> for Fail {
    fn from(s: &str) -> Self {
        Self(String::from(s))
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a self-test gets: the vCPU count and the whole cmdline (for its own
/// `cell0.*` keys and the `virtio_mmio.device=` entries).
pub struct Ctx<'a> {
    /// vCPUs (`cell0.cpus`).
    pub cpus: usize,
    /// The kernel cmdline.
    pub cmdline: &'a [u8],
}

/// A self-test: its name and body.
pub struct SelfTest {
    /// Name after `cell0.test=`.
    pub name: &'static str,
    /// The test.
    pub run: fn(&Ctx<'_>) -> Result<(), Fail>,
}

/// Every self-test.
pub const TESTS: &[SelfTest] = &[
    SelfTest {
        name: "serial",
        run: |c| serial(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "irq",
        run: |c| irq(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "serial-irq",
        run: |c| serial_irq(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "smp",
        run: |c| smp::test(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "panic",
        run: |c| fault(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "rust-panic",
        run: |c| rust_panic(c.cpus).map_err(Fail::from),
    },
    SelfTest {
        name: "sypas-echo",
        run: nettest::sypas_echo,
    },
    SelfTest {
        name: "sypas-serve",
        run: nettest::sypas_serve,
    },
    SelfTest {
        name: "vsock-flood",
        run: nettest::vsock_flood,
    },
    SelfTest {
        name: "sypas-bench",
        run: nettest::sypas_bench,
    },
    SelfTest {
        name: "sypas-shm",
        run: routertest::sypas_shm,
    },
    SelfTest {
        name: "sypas-agents",
        run: routertest::sypas_agents,
    },
    SelfTest {
        name: "sypas-refusal",
        run: routertest::sypas_refusal,
    },
    SelfTest {
        name: "blk",
        run: devtest::blk,
    },
    SelfTest {
        name: "rng",
        run: devtest::rng,
    },
    SelfTest {
        name: "evil",
        run: evil::evil,
    },
];

/// The test called `name`.
pub fn find(name: &[u8]) -> Option<&'static SelfTest> {
    TESTS.iter().find(|t| t.name.as_bytes() == name)
}

/// The text the serial test echoes.
pub const PANGRAM: &str = "The quick brown fox jumps over the lazy dog.";

fn serial(_cpus: usize) -> Result<(), &'static str> {
    say!("serial: {}", PANGRAM);
    let mut ascii = [0u8; 95];
    for (i, b) in ascii.iter_mut().enumerate() {
        *b = 0x20 + i as u8;
    }
    let ascii = core::str::from_utf8(&ascii).map_err(|_| "printable ASCII is not UTF-8")?;
    say!("serial: [{}]", ascii);
    // Longer than the console's 256-byte line buffer: sent in two writes.
    let mut digits = [0u8; 300];
    for (i, b) in digits.iter_mut().enumerate() {
        *b = b'0' + (i % 10) as u8;
    }
    let digits = core::str::from_utf8(&digits).map_err(|_| "digits are not UTF-8")?;
    say!("serial: {}", digits);
    Ok(())
}

/// Interrupts the `irq` test takes.
const IRQ_TICKS: u64 = 5;
/// LAPIC timer count per tick: 1 ms at KVM's 1 GHz APIC bus, divided by 16.
const IRQ_TIMER_COUNT: u32 = 62_500;
/// Nominal bound on the wait for one tick.
const IRQ_TICK_TIMEOUT_MS: u64 = 1_000;

fn count(vector: u8) -> u64 {
    IRQ_COUNTS[usize::from(vector)].load(Ordering::Acquire)
}

/// Waits (bounded) until the count of `vector` exceeds `before`.
fn wait_count_above(vector: u8, before: u64, timeout_ms: u64) -> bool {
    let deadline = time::deadline(timeout_ms * time::CYCLES_PER_MS);
    while count(vector) <= before {
        if time::passed(deadline) {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Takes `IRQ_TICKS` LAPIC timer interrupts while ring 3 runs with IF=1:
/// one-shot mode, re-armed after each, so the count is exact.
fn irq(_cpus: usize) -> Result<(), &'static str> {
    lapic::enable();
    lapic::write(lapic::TIMER_DIVIDE, lapic::DIVIDE_BY_16);
    lapic::write(lapic::LVT_TIMER, u32::from(TIMER_VECTOR));
    sys::irq_on();
    let mut taken = 0;
    while taken < IRQ_TICKS {
        let before = count(TIMER_VECTOR);
        lapic::write(lapic::TIMER_INITIAL, IRQ_TIMER_COUNT);
        if !wait_count_above(TIMER_VECTOR, before, IRQ_TICK_TIMEOUT_MS) {
            break;
        }
        taken += 1;
    }
    lapic::write(lapic::LVT_TIMER, lapic::LVT_MASKED);
    lapic::write(lapic::TIMER_INITIAL, 0);
    sys::irq_off();
    say!(
        "irq: lapic timer, one-shot, vector {:#x}: {}/{} interrupts",
        TIMER_VECTOR,
        taken,
        IRQ_TICKS
    );
    if taken == IRQ_TICKS {
        Ok(())
    } else {
        Err("the LAPIC timer interrupt did not arrive")
    }
}

/// IOAPIC input of the 8250's IRQ 4.
const SERIAL_IRQ: u8 = 4;
/// UART interrupt-enable register and its THR-empty bit.
const UART_IER: u16 = SERIAL_PORT + 1;
const IER_THR_EMPTY: u8 = 0x02;

/// Takes the 8250's THR-empty interrupt on IRQ 4, routed by the IOAPIC.
fn serial_irq(_cpus: usize) -> Result<(), &'static str> {
    lapic::enable();
    let apic_id = u8::try_from(lapic::id()).map_err(|_| "APIC ID above 255")?;
    lapic::ioapic_route(SERIAL_IRQ, SERIAL_VECTOR, apic_id);
    sys::irq_on();
    let before = count(SERIAL_VECTOR);
    // The transmitter is always empty, so enabling the interrupt raises it.
    sys::outb(UART_IER, IER_THR_EMPTY);
    let ok = wait_count_above(SERIAL_VECTOR, before, IRQ_TICK_TIMEOUT_MS);
    sys::outb(UART_IER, 0);
    lapic::ioapic_mask(SERIAL_IRQ);
    sys::irq_off();
    if !ok {
        return Err("no interrupt on IRQ 4 after enabling the THR-empty interrupt");
    }
    say!(
        "serial-irq: THR-empty interrupt on IRQ 4, vector {:#x}",
        SERIAL_VECTOR
    );
    Ok(())
}

/// An address the identity map does not cover.
pub const UNMAPPED: u64 = IDENTITY_MAP_END;

/// Writes to an unmapped address from ring 3: a #PF that must end the VM.
fn fault(_cpus: usize) -> Result<(), &'static str> {
    say!("panic: writing to unmapped address {:#x}", UNMAPPED);
    // SAFETY: deliberately invalid. The page fault is caught by the exception
    // stub, which reports it and crashes the VM; nothing runs after it.
    unsafe { ptr::write_volatile(UNMAPPED as *mut u64, 0xdead) };
    Err("writing to an unmapped address did not fault")
}

fn rust_panic(_cpus: usize) -> Result<(), &'static str> {
    panic!("deliberate panic from test rust-panic");
}
