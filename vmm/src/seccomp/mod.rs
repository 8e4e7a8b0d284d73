// SPDX-License-Identifier: Apache-2.0
//! Per-thread seccomp filters (rust-vmm `seccompiler`).
//!
//! Each kind of thread of `cell0-vmm` runs under its own allow-list, written as
//! a data file next to this module, with a justification (`comment`) for every
//! syscall:
//!
//! | thread | file | installed |
//! |---|---|---|
//! | VMM (event loop, devices, teardown) | `vmm.json` | by [`crate::vm::Vm::run`], once every vCPU thread has its filter, before any vCPU enters the guest |
//! | vCPU | `vcpu.json` | by each vCPU thread before its first `KVM_RUN` |
//! | API | `api.json` | by the API thread before it accepts a connection |
//! | vTPM worker | `vtpm.json` | by the worker thread once swtpm runs and the AK exists |
//!
//! A syscall outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`,
//! the process dies of `SIGSYS`). Installing a filter also sets `PR_SET_NO_NEW_PRIVS`.
//! No thread can add a syscall back: filters only stack, and `seccomp` itself is
//! on no list.
//!
//! Filters are on unless [`disable`] is called first (`cell0-vmm launch --no-seccomp`,
//! for debugging only). With filters on, a panic prints its message without a
//! backtrace, because symbolizing one needs files the filters deny.

mod gate;

use std::sync::{Once, OnceLock};

use seccompiler::{BpfProgram, TargetArch};

pub use gate::StartGate;

/// The kinds of threads that have a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The VMM thread: event loop, device emulation, teardown.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The API socket thread.
    Api,
    /// The vTPM worker thread (talks to swtpm).
    Vtpm,
}

impl ThreadKind {
    /// Every kind, in the order of [`Filters`].
    pub const ALL: [ThreadKind; 4] = [Self::Vmm, Self::Vcpu, Self::Api, Self::Vtpm];

    /// The filter's name (its key in its data file).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Vtpm => "vtpm",
        }
    }

    /// The filter's data file (seccompiler JSON).
    pub fn json(self) -> &'static str {
        match self {
            Self::Vmm => include_str!("vmm.json"),
            Self::Vcpu => include_str!("vcpu.json"),
            Self::Api => include_str!("api.json"),
            Self::Vtpm => include_str!("vtpm.json"),
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Vmm => 0,
            Self::Vcpu => 1,
            Self::Api => 2,
            Self::Vtpm => 3,
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the seccomp layer.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A data file does not compile.
    #[error("cannot compile the {kind} seccomp filter")]
    Compile {
        /// Which filter.
        kind: ThreadKind,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// A data file compiled, but not to a filter of its own name.
    #[error("the {0} seccomp data file holds no filter named {0}")]
    Missing(ThreadKind),
    /// The kernel refused the filter.
    #[error("cannot install the {kind} seccomp filter")]
    Install {
        /// Which filter.
        kind: ThreadKind,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// An earlier attempt to compile the filters failed.
    #[error("seccomp filters are unavailable: {0}")]
    Unavailable(String),
    /// A vCPU thread never reported back (it died before its first `KVM_RUN`).
    #[error("{missing} vCPU threads did not report their seccomp filter in time")]
    VcpuTimeout {
        /// How many did not.
        missing: usize,
    },
}

/// The compiled filters, one BPF program per [`ThreadKind`].
#[derive(Debug, Clone)]
pub struct Filters {
    programs: [BpfProgram; 4],
}

impl Filters {
    /// The program for `kind`.
    pub fn program(&self, kind: ThreadKind) -> &BpfProgram {
        &self.programs[kind.index()]
    }
}

/// Compiles every data file for x86_64.
pub fn compile() -> Result<Filters, SeccompError> {
    let mut programs: [BpfProgram; 4] = Default::default();
    for kind in ThreadKind::ALL {
        let mut map = seccompiler::compile_from_json(kind.json().as_bytes(), TargetArch::x86_64)
            .map_err(|source| SeccompError::Compile { kind, source })?;
        programs[kind.index()] = map.remove(kind.name()).ok_or(SeccompError::Missing(kind))?;
    }
    Ok(Filters { programs })
}

enum State {
    Off,
    On(Filters),
}

static STATE: OnceLock<Result<State, String>> = OnceLock::new();

fn state() -> Result<&'static State, SeccompError> {
    STATE
        .get_or_init(|| {
            compile()
                .map(State::On)
                .map_err(|e| error_chain(&e).to_string())
        })
        .as_ref()
        .map_err(|e| SeccompError::Unavailable(e.clone()))
}

/// Turns the filters off for this process (`--no-seccomp`). Returns false if
/// it came too late: a thread already asked for its filter.
pub fn disable() -> bool {
    STATE.set(Ok(State::Off)).is_ok() || matches!(STATE.get(), Some(Ok(State::Off)))
}

/// Compiles the filters now (so a broken data file stops the VMM before it
/// builds anything) and says whether they are on.
pub fn prepare() -> Result<bool, SeccompError> {
    Ok(matches!(state()?, State::On(_)))
}

/// Installs the filter of `kind` on the calling thread (a no-op when filters
/// are off). Call it first thing in a thread, before it handles anything a
/// guest or a client controls.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let State::On(filters) = state()? else {
        return Ok(());
    };
    quiet_panics();
    seccompiler::apply_filter(filters.program(kind))
        .map_err(|source| SeccompError::Install { kind, source })?;
    tracing::debug!(thread = %kind, "seccomp filter installed");
    #[cfg(test)]
    test_hook::after_install(kind);
    Ok(())
}

/// The vTPM worker's start hook (`VtpmOptions::worker_init`): in a jail, the
/// thread drops its capability bounding set (which is per thread, and the
/// worker exists before the VMM drops its own); then it installs its filter.
pub fn vtpm_worker_init() -> Result<(), String> {
    crate::jail::drop_bounding_set_if_jailed()?;
    install(ThreadKind::Vtpm).map_err(|e| error_chain(&e))
}

/// Replaces the panic hook with one that prints no backtrace: capturing and
/// symbolizing one opens files, which would kill the process with SIGSYS and
/// hide the panic message.
fn quiet_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let t = std::thread::current();
            let name = t.name().unwrap_or("<unnamed>");
            // eprintln! could itself panic on a closed stderr; ignore errors.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "thread '{name}' {info}\n(no backtrace: seccomp is on; run with --no-seccomp for one)"
            );
        }));
    });
}

/// An error and its sources on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Test-only: make a thread of the chosen kind call a syscall its filter
/// forbids right after installing it, so a test can watch the kernel kill the
/// process with SIGSYS. Compiled only into the crate's own unit tests.
#[cfg(test)]
pub(crate) mod test_hook {
    use super::ThreadKind;

    /// `CELL0_TEST_SECCOMP_VIOLATE=vcpu|vmm|api|vtpm` picks the thread.
    pub const ENV: &str = "CELL0_TEST_SECCOMP_VIOLATE";

    pub(super) fn after_install(kind: ThreadKind) {
        if std::env::var(ENV).is_ok_and(|v| v == kind.name()) {
            // socket(AF_INET6, SOCK_DGRAM) is on no list: a network socket is what
            // an escaped guest would want first.
            // SAFETY: socket(2) takes no pointers; the result is closed if it exists.
            let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) };
            if fd >= 0 {
                // SAFETY: fd is a socket this function just created.
                unsafe { libc::close(fd) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
