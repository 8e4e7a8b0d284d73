// SPDX-License-Identifier: Apache-2.0
//! Decoding of KVM exits into actions, in one function without KVM calls.
//!
//! [`handle_exit`] dispatches port and MMIO accesses to the buses and turns
//! every other exit into [`VcpuAction::Continue`] or [`VcpuAction::Stop`].
//! [`ExitSignal`] carries the first stop reason from whoever saw it (a vCPU
//! thread, or the i8042 on a reset request) to the VMM thread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cell0_devices::Bus;
use kvm_ioctls::VcpuExit;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset (i8042 0xFE, or a KVM reset system event).
    Reset,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
    /// A `stop` request on the API socket.
    Stopped,
    /// The VM's lease (`--lease-ms`) ended without a renewal: it is fenced.
    LeaseExpired,
    /// The guest halted with no way to wake up (only seen without an in-kernel irqchip).
    Halted,
    /// KVM_EXIT_SHUTDOWN: a triple fault, i.e. a guest crash.
    TripleFault,
    /// A KVM crash system event (the guest reported a panic).
    GuestPanic,
    /// KVM could not enter the guest.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// CPU on which it happened.
        cpu: u32,
    },
    /// KVM's instruction emulator gave up.
    InternalError,
    /// An exit the VMM does not handle.
    Unexpected(String),
}

impl StopReason {
    /// True when the guest ended on purpose (reset or power-off), false on a crash.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            Self::Reset | Self::PowerOff | Self::Stopped | Self::Halted
        )
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reset => write!(f, "guest reset"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::Halted => write!(f, "guest halted"),
            Self::Stopped => write!(f, "stopped through the API socket"),
            Self::LeaseExpired => write!(f, "lease expired: fenced"),
            Self::TripleFault => write!(f, "guest crashed: triple fault (KVM_EXIT_SHUTDOWN)"),
            Self::GuestPanic => write!(f, "guest crashed: it reported a panic"),
            Self::FailEntry { reason, cpu } => {
                write!(
                    f,
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )
            }
            Self::InternalError => write!(f, "guest crashed: KVM internal emulation error"),
            Self::Unexpected(s) => write!(f, "guest stopped on an unhandled exit: {s}"),
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// Stop this vCPU and end the VM.
    Stop(StopReason),
}

/// Counts accesses that hit no device (a guest probing, or a bug).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port accesses with no device.
    pub unhandled_pio: AtomicU64,
    /// MMIO accesses with no device.
    pub unhandled_mmio: AtomicU64,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Decodes one exit. Port and MMIO accesses go to `pio` and `mmio`; reads that
/// hit no device return all-ones (PIO) or zeros (MMIO), as on real hardware.
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus, c: &ExitCounters) -> VcpuAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
                c.unhandled_pio.fetch_add(1, Ordering::Relaxed);
            }
            VcpuAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                c.unhandled_pio.fetch_add(1, Ordering::Relaxed);
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0);
                c.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
            }
            VcpuAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                c.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
            }
            VcpuAction::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => VcpuAction::Continue,
        VcpuExit::Hlt => VcpuAction::Stop(StopReason::Halted),
        VcpuExit::Shutdown => VcpuAction::Stop(StopReason::TripleFault),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            VcpuAction::Stop(StopReason::PowerOff)
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuAction::Stop(StopReason::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => {
            VcpuAction::Stop(StopReason::GuestPanic)
        }
        VcpuExit::SystemEvent(ty, _) => {
            VcpuAction::Stop(StopReason::Unexpected(format!("system event {ty}")))
        }
        VcpuExit::FailEntry(reason, cpu) => VcpuAction::Stop(StopReason::FailEntry { reason, cpu }),
        VcpuExit::InternalError => VcpuAction::Stop(StopReason::InternalError),
        other => VcpuAction::Stop(StopReason::Unexpected(format!("{other:?}"))),
    }
}

/// The first stop reason of the VM, plus an eventfd that wakes the VMM thread.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<StopReason>>,
}

impl ExitSignal {
    /// A new signal with a non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` if none was recorded yet, and wakes the VMM thread.
    pub fn signal(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        if let Err(e) = self.evt.write(1) {
            // Only fails if the counter would overflow, which needs 2^64 signals.
            tracing::error!(error = %e, "cannot write the exit eventfd");
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd to watch.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_devices::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Echo>>) {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut pio = Bus::new();
        pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(dev.clone(), 0xd000_0000, 0x1000).unwrap();
        (pio, mmio, dev)
    }

    #[test]
    fn port_io_goes_to_the_bus() {
        let (pio, mmio, dev) = buses();
        let c = ExitCounters::default();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"hi"), &pio, &mmio, &c),
            VcpuAction::Continue
        );
        assert_eq!(dev.lock().unwrap().0, b"hi");
        let mut b = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3fd, &mut b), &pio, &mmio, &c);
        assert_eq!(b, [6]);
        assert_eq!(c.unhandled_pio.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unhandled_accesses_read_as_open_bus_and_are_counted() {
        let (pio, mmio, _) = buses();
        let c = ExitCounters::default();
        let mut b = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x80, &mut b), &pio, &mmio, &c);
        assert_eq!(b, [0xff, 0xff]);
        let mut m = [0xaau8; 4];
        handle_exit(VcpuExit::MmioRead(0x1000, &mut m), &pio, &mmio, &c);
        assert_eq!(m, [0; 4]);
        handle_exit(VcpuExit::MmioWrite(0x1000, &[1]), &pio, &mmio, &c);
        handle_exit(VcpuExit::IoOut(0x80, &[1]), &pio, &mmio, &c);
        assert_eq!(c.unhandled_pio.load(Ordering::Relaxed), 2);
        assert_eq!(c.unhandled_mmio.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn mmio_goes_to_the_bus_with_offsets() {
        let (pio, mmio, dev) = buses();
        let c = ExitCounters::default();
        let mut m = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0004, &mut m), &pio, &mmio, &c);
        assert_eq!(m, [5; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0050, &[9, 9]), &pio, &mmio, &c);
        assert_eq!(dev.lock().unwrap().0, [9, 9]);
    }

    #[test]
    fn stop_reasons() {
        let (pio, mmio, _) = buses();
        let c = ExitCounters::default();
        let cases = [
            (VcpuExit::Shutdown, StopReason::TripleFault),
            (VcpuExit::Hlt, StopReason::Halted),
            (VcpuExit::SystemEvent(1, &[]), StopReason::PowerOff),
            (VcpuExit::SystemEvent(2, &[]), StopReason::Reset),
            (VcpuExit::SystemEvent(3, &[]), StopReason::GuestPanic),
            (
                VcpuExit::FailEntry(0x21, 3),
                StopReason::FailEntry {
                    reason: 0x21,
                    cpu: 3,
                },
            ),
            (VcpuExit::InternalError, StopReason::InternalError),
        ];
        for (exit, want) in cases {
            assert_eq!(handle_exit(exit, &pio, &mmio, &c), VcpuAction::Stop(want));
        }
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &pio, &mmio, &c),
            VcpuAction::Stop(StopReason::Unexpected(_))
        ));
        assert_eq!(
            handle_exit(VcpuExit::Intr, &pio, &mmio, &c),
            VcpuAction::Continue
        );
    }

    #[test]
    fn clean_and_crash_reasons() {
        assert!(StopReason::Reset.is_clean());
        assert!(StopReason::PowerOff.is_clean());
        assert!(!StopReason::TripleFault.is_clean());
        assert!(!StopReason::InternalError.is_clean());
        assert!(!StopReason::LeaseExpired.is_clean());
    }

    #[test]
    fn exit_signal_keeps_the_first_reason() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.signal(StopReason::Reset);
        s.signal(StopReason::TripleFault);
        assert_eq!(s.reason(), Some(StopReason::Reset));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
