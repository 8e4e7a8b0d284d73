// SPDX-License-Identifier: Apache-2.0
//! vCPU threads: each runs `KVM_RUN` in a loop, hands exits to
//! [`crate::exit::handle_exit`], and stops on a stop action or a kick.
//!
//! State machine: `Created → Running → Exited`. A kick (a real-time signal)
//! breaks a thread out of `KVM_RUN` so it sees the stop request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cell0_devices::Bus;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::exit::{ExitCounters, ExitSignal, StopReason, VcpuAction, handle_exit};
use crate::seccomp::{StartGate, ThreadKind};

/// Lifecycle state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Configured, thread not yet in the guest.
    Created = 0,
    /// In or around `KVM_RUN`.
    Running = 1,
    /// The thread has left its loop.
    Exited = 2,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Created,
            1 => Self::Running,
            _ => Self::Exited,
        }
    }
}

/// Shared control block of one vCPU thread.
#[derive(Debug)]
pub struct VcpuControl {
    state: AtomicU8,
    stop: AtomicBool,
}

impl VcpuControl {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(VcpuState::Created as u8),
            stop: AtomicBool::new(false),
        }
    }

    /// Current state.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler, so a kick makes `KVM_RUN` return `EINTR`
/// instead of killing the process. Call once before spawning vCPU threads.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// vCPU index (also its APIC ID).
    pub index: u8,
    /// KVM vCPU.
    pub fd: VcpuFd,
    /// Port bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Where to report a stop.
    pub exit: Arc<ExitSignal>,
    /// Shared counters.
    pub counters: Arc<ExitCounters>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// Index.
    pub index: u8,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    /// Starts the vCPU on its own thread.
    pub fn start(self) -> std::io::Result<VcpuHandle> {
        self.start_gated(Arc::new(StartGate::opened()))
    }

    /// Starts the vCPU on its own thread, which installs its seccomp filter,
    /// reports to `gate` and enters the guest only once the gate opens.
    pub fn start_gated(self, gate: Arc<StartGate>) -> std::io::Result<VcpuHandle> {
        let control = Arc::new(VcpuControl::new());
        let c = control.clone();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&c, &gate))?;
        Ok(VcpuHandle {
            index,
            control,
            thread: Some(thread),
        })
    }

    fn run(mut self, control: &VcpuControl, gate: &StartGate) {
        control.set(VcpuState::Running);
        // The filter goes in before the first KVM_RUN; the gate holds the guest
        // back until every other thread has its filter too.
        if !gate.arrive(crate::seccomp::install(ThreadKind::Vcpu)) {
            control.set(VcpuState::Exited);
            return;
        }
        let mut first = true;
        while !control.stop.load(Ordering::Acquire) {
            if first {
                tracing::info!(
                    vcpu = self.index,
                    elapsed_us = crate::since_start_us(),
                    "milestone: vCPU first entry"
                );
                first = false;
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.pio, &self.mmio, &self.counters),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    VcpuAction::Continue
                }
                Err(e) => VcpuAction::Stop(StopReason::Unexpected(format!("KVM_RUN failed: {e}"))),
            };
            if let VcpuAction::Stop(reason) = action {
                tracing::debug!(vcpu = self.index, %reason, "vCPU stopping");
                self.exit.signal(reason);
                break;
            }
        }
        control.set(VcpuState::Exited);
    }
}

impl VcpuHandle {
    /// Current state.
    pub fn state(&self) -> VcpuState {
        self.control.state()
    }

    /// Asks the thread to stop and kicks it out of the guest until it has, for at most `timeout`.
    /// Returns false if it did not stop in time (it is then left detached).
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.control.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let Some(t) = self.thread.as_ref() else {
            return true;
        };
        while self.control.state() != VcpuState::Exited {
            if Instant::now() > deadline {
                tracing::warn!(vcpu = self.index, "vCPU thread did not stop in time");
                return false;
            }
            // The thread may be between the stop check and KVM_RUN: kick repeatedly.
            if t.kill(kick_signal()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(vcpu = self.index, "vCPU thread panicked");
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        for s in [VcpuState::Created, VcpuState::Running, VcpuState::Exited] {
            assert_eq!(VcpuState::from_u8(s as u8), s);
        }
        let c = VcpuControl::new();
        assert_eq!(c.state(), VcpuState::Created);
        c.set(VcpuState::Running);
        assert_eq!(c.state(), VcpuState::Running);
    }
}
