// SPDX-License-Identifier: Apache-2.0
//! Serial console: whole lines, each prefixed `cell0-nano: ` and ended by
//! "\n", written to the 8250 at 0x3f8 in one syscall (`rep outsb`) under a
//! ring-3 spinlock, so lines from several CPUs never interleave.
//!
//! The 8250s of cell0-vmm and Firecracker are always ready to take a byte, so
//! the console does not poll LSR (each poll would be another VM exit).

use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicUsize, Ordering};

use cell0_nano::layout::SERIAL_PORT;

use crate::sys;

/// Every line the nano guest prints starts with this.
pub const PREFIX: &str = "cell0-nano: ";

/// Who holds the console: 0 when free, else the holder's CPU index + 1.
static HOLDER: AtomicUsize = AtomicUsize::new(0);

const LINE_BUF: usize = 256;

struct LineWriter {
    buf: [u8; LINE_BUF],
    len: usize,
}

impl LineWriter {
    const fn new() -> Self {
        Self {
            buf: [0; LINE_BUF],
            len: 0,
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            sys::outs(SERIAL_PORT, &self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(LINE_BUF) {
            if self.len + chunk.len() > LINE_BUF {
                self.flush();
            }
            self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

fn write_line(args: fmt::Arguments<'_>) {
    let mut w = LineWriter::new();
    // LineWriter::write_str never fails; a Display impl that fails just cuts
    // the line short.
    let _ = w.write_str(PREFIX);
    let _ = w.write_fmt(args);
    let _ = w.write_str("\n");
    w.flush();
}

/// Prints one line (use the `say!` macro).
pub fn line(args: fmt::Arguments<'_>) {
    let me = crate::arch::current_cpu() + 1;
    while HOLDER
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spin_loop();
    }
    write_line(args);
    HOLDER.store(0, Ordering::Release);
}

/// Prints one line on the way down (fault or panic). Keeps the console once it
/// has it: only the dying CPU prints from then on. Waits a bounded time for
/// another holder, then writes regardless, since the holder may be the very
/// code that faulted.
pub fn line_dying(args: fmt::Arguments<'_>) {
    let me = crate::arch::current_cpu() + 1;
    let deadline = crate::time::deadline(crate::time::CYCLES_PER_MS * 100);
    while HOLDER.load(Ordering::Acquire) != me
        && HOLDER
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        && !crate::time::passed(deadline)
    {
        spin_loop();
    }
    HOLDER.store(me, Ordering::Release);
    write_line(args);
}

/// Prints a `cell0-nano: ` line.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::line(format_args!($($arg)*))
    };
}

/// Prints a `cell0-nano: ` line while the guest is going down.
#[macro_export]
macro_rules! say_dying {
    ($($arg:tt)*) => {
        $crate::console::line_dying(format_args!($($arg)*))
    };
}
