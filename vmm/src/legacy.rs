// SPDX-License-Identifier: Apache-2.0
//! Legacy PC devices on the port bus: the 8250 UART (vm-superio) and the i8042
//! whose CPU-reset command ends the VM.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cell0_devices::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitSignal, StopReason};

/// Port of COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Ports of COM1.
pub const SERIAL_PORT_LEN: u64 = 8;
/// First i8042 port (data, 0x60); the command port is 0x64.
pub const I8042_PORT: u64 = 0x60;
/// i8042 range: 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// An interrupt line backed by a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial console output sink that logs the "first serial byte" boot milestone.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    seen_first: AtomicBool,
}

impl ConsoleOut {
    /// Wraps `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            seen_first: AtomicBool::new(false),
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && !self.seen_first.swap(true, Ordering::Relaxed) {
            tracing::info!(
                elapsed_us = crate::since_start_us(),
                "milestone: first serial byte"
            );
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The 8250 UART on the port bus.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Serial::new(IrqTrigger(irq), ConsoleOut::new(out)),
        }
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.writer_mut().flush()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(off, b) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        }
    }
}

/// Trigger that turns the i8042 CPU reset into a VM exit.
#[derive(Debug, Clone)]
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.signal(StopReason::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller: only its reset line matters.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// An i8042 whose reset command signals `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The trigger is infallible.
            let _ = self.inner.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_thr_writes_reach_the_sink() {
        let sink = Sink::default();
        let irq = EventFd::new(0).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"ok\n");
        // LSR reports the transmitter empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn i8042_reset_command_signals_exit() {
        let sig = Arc::new(ExitSignal::new().unwrap());
        let mut k = I8042::new(sig.clone());
        k.write(4, &[0x01]);
        assert_eq!(sig.reason(), None);
        k.write(0, &[0xfe]);
        assert_eq!(sig.reason(), None, "0xFE on the data port is not a reset");
        k.write(4, &[0xfe]);
        assert_eq!(sig.reason(), Some(StopReason::Reset));
    }
}
