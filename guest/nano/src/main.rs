// SPDX-License-Identifier: Apache-2.0
//! cell0-nano: the freestanding x86_64 guest kernel that cell0's tests and
//! benchmarks boot. See README.md for the boot contract, the cmdline keys and
//! the exact serial output of each self-test.
//!
//! Ring 0 is the assembly in `arch`; everything in Rust runs in ring 3.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod console;
mod devtest;
mod evil;
mod fault;
mod galloc;
mod lapic;
mod mem;
mod nettest;
mod routertest;
mod selftest;
mod session;
mod shmwin;
mod simpledev;
mod smp;
mod sypas;
mod sys;
mod time;
mod virtio;
mod vsock;

use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

use cell0_nano::cmdline::{self, BP_CMD_LINE_PTR, BP_CMDLINE_SIZE, BP_EXT_CMD_LINE_PTR};
use cell0_nano::layout::{I8042_COMMAND_PORT, I8042_RESET, IDENTITY_MAP_END, MAX_CPUS};
use cell0_nano::text::Escaped;

use crate::fault::die;

/// Ring-3 entry of every CPU, from the ring-0 entry's `iretq`: `cpu` is the
/// vCPU index (0 on the BSP), `boot_params` the zero page's address.
pub extern "C" fn nano_main(cpu: usize, boot_params: usize) -> ! {
    arch::init_cpu(cpu);
    if cpu == 0 {
        bsp_main(boot_params)
    } else {
        smp::ap_main(cpu)
    }
}

/// TSC when the BSP reached ring 3 (the timing lines count from here).
pub static RING3_TSC: AtomicU64 = AtomicU64::new(0);

fn bsp_main(boot_params: usize) -> ! {
    RING3_TSC.store(time::now(), Ordering::Relaxed);
    let line = read_cmdline(boot_params);
    let opts = match cmdline::parse(line, MAX_CPUS) {
        Ok(opts) => opts,
        Err(cmdline::Error::BadCpus { value, max }) => {
            say!(
                "bad cell0.cpus value '{}': expected 1 to {}",
                Escaped(value),
                max
            );
            die()
        }
    };
    galloc::init(boot_params);
    say!("ready");
    if let Some(name) = opts.test {
        let Some(test) = selftest::find(name) else {
            say!("unknown test '{}'", Escaped(name));
            die()
        };
        let ctx = selftest::Ctx {
            cpus: opts.cpus,
            cmdline: line,
        };
        match (test.run)(&ctx) {
            Ok(()) => say!("test {} passed", test.name),
            Err(why) => {
                say!("test {} failed: {}", test.name, why);
                die()
            }
        }
    }
    reset()
}

/// Resets the machine through the i8042; the VMM exits with status 0.
pub fn reset() -> ! {
    sys::outb(I8042_COMMAND_PORT, I8042_RESET);
    sys::halt()
}

/// Reads a u32 of the zero page (or any guest RAM below 4 GiB).
pub fn read_u32(addr: usize) -> u32 {
    // SAFETY: `addr` lies in the zero page, which the VMM placed in guest RAM
    // below 4 GiB (the identity map covers it); unaligned reads are fine.
    unsafe { ptr::read_unaligned(addr as *const u32) }
}

/// The cmdline from `boot_params` (empty when there is none).
fn read_cmdline(boot_params: usize) -> &'static [u8] {
    if boot_params == 0 || boot_params as u64 >= IDENTITY_MAP_END {
        say!(
            "boot_params at {:#x} is outside the identity map",
            boot_params
        );
        die()
    }
    let addr = cmdline::cmdline_address(
        read_u32(boot_params + BP_CMD_LINE_PTR),
        read_u32(boot_params + BP_EXT_CMD_LINE_PTR),
    );
    if addr == 0 {
        return &[];
    }
    let max = match read_u32(boot_params + BP_CMDLINE_SIZE) as usize {
        0 => cmdline::DEFAULT_CMDLINE_MAX,
        n => n,
    };
    if addr.saturating_add(max as u64) > IDENTITY_MAP_END {
        say!("cmdline at {:#x} is outside the identity map", addr);
        die()
    }
    let start = addr as *const u8;
    let mut len = 0;
    // Bytes past the NUL are never touched: they need not be RAM.
    // SAFETY: the VMM wrote a NUL-terminated cmdline of at most
    // `cmdline_size` bytes there, inside the identity map (checked above).
    while len < max && unsafe { ptr::read_volatile(start.add(len)) } != 0 {
        len += 1;
    }
    // SAFETY: those `len` bytes were just read; nothing writes them while the
    // guest runs.
    unsafe { core::slice::from_raw_parts(start, len) }
}
