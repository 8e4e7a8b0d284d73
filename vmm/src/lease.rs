// SPDX-License-Identifier: Apache-2.0
//! The VM's lease (`cell0-vmm launch --lease-ms N`): a watchdog that fences
//! the VM when whoever launched it stops renewing it.
//!
//! A node agent of a cluster launches its VMMs with a lease and renews it
//! after each heartbeat the control plane acknowledged (docs/CLUSTER.md,
//! "Fencing", rule 5). If the agent dies and its host lives, nothing renews
//! the lease, and the VMM stops the guest on its own before the control plane
//! places the VM elsewhere: no VM runs on two nodes.
//!
//! - The lease ends at VMM start + N ms.
//! - `{"op":"lease","deadline_ns":D}` on the API socket renews it. `D` is a
//!   `CLOCK_MONOTONIC` time in nanoseconds: the agent runs on the same host,
//!   so both read the same clock. A deadline never moves backwards: an earlier
//!   one that is still in the future changes nothing. A deadline that has
//!   passed ends the VM at once (the lease is revoked). A lease that has
//!   already ended cannot be renewed.
//! - When the lease ends, the VMM thread's timerfd fires, the VMM logs
//!   `lease expired: fenced`, stops the guest and exits with
//!   [`EXIT_LEASE_EXPIRED`].
//! - The API socket serves `lease` from early in the build (before the vTPM
//!   is waited for and the boot measured), so the lease can be renewed while
//!   the VM is set up. Until the event loop runs, [`BuildWatchdog`] watches
//!   it: when it ends then, the VMM exits with [`EXIT_LEASE_EXPIRED`] at
//!   once, before any guest instruction; the vCPUs are not released either
//!   if it ended just before.
//!
//! Without `--lease-ms` there is no lease and the `lease` op answers `no_lease`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{Value, json};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{ApiExtension, error};
use crate::exit::{ExitSignal, StopReason};

/// Exit status of `cell0-vmm` when its lease ended (the VM was fenced).
pub const EXIT_LEASE_EXPIRED: u8 = 3;

/// Longest lease, at launch (`--lease-ms`) and from a renewal: one hour.
pub const MAX_LEASE_MS: u64 = 3_600_000;

const NS_PER_MS: u64 = 1_000_000;

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC always exists on Linux; a failure leaves 0 (a lease
    // then looks expired, which fails safe).
    debug_assert_eq!(r, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The request has no unsigned integer `deadline_ns`.
    #[error(
        "lease needs \"deadline_ns\": a CLOCK_MONOTONIC time in nanoseconds (unsigned integer)"
    )]
    BadRequest,
    /// The deadline is further away than [`MAX_LEASE_MS`].
    #[error(
        "deadline_ns {deadline_ns} is {ahead_ms} ms ahead; a lease lasts at most {MAX_LEASE_MS} ms"
    )]
    TooLong {
        /// The deadline asked for.
        deadline_ns: u64,
        /// How far ahead of now it is.
        ahead_ms: u64,
    },
    /// The lease ended before this renewal: the VM is being fenced.
    #[error("the lease ended {late_ms} ms ago: the VM is fenced and stops")]
    Expired {
        /// How long ago it ended.
        late_ms: u64,
    },
}

impl LeaseError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::TooLong { .. } => "out_of_range",
            Self::Expired { .. } => "lease_expired",
        }
    }
}

/// What a renewal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The deadline moved to the one asked for.
    Extended,
    /// The deadline asked for is earlier than the current one: nothing changed.
    Unchanged,
    /// The deadline asked for has passed: the VM stops now.
    Revoked,
}

impl Renewal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Extended => "extended",
            Self::Unchanged => "unchanged",
            Self::Revoked => "revoked",
        }
    }
}

/// The lease of one VM.
#[derive(Debug)]
pub struct Lease {
    deadline_ns: AtomicU64,
    exit: Arc<ExitSignal>,
}

impl Lease {
    /// A lease that ends at `deadline_ns` (`CLOCK_MONOTONIC`) and stops the VM through `exit`.
    pub fn new(deadline_ns: u64, exit: Arc<ExitSignal>) -> Self {
        Self {
            deadline_ns: AtomicU64::new(deadline_ns),
            exit,
        }
    }

    /// When the lease ends (`CLOCK_MONOTONIC` ns).
    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns.load(Ordering::SeqCst)
    }

    fn fence(&self, why: &str) {
        tracing::error!(
            deadline_ns = self.deadline_ns(),
            "lease expired: fenced ({why}); stopping the guest"
        );
        self.exit.signal(StopReason::LeaseExpired);
    }

    /// Renews the lease to `deadline_ns`, as seen at `now_ns`.
    pub fn renew(&self, deadline_ns: u64, now_ns: u64) -> Result<Renewal, LeaseError> {
        let ahead_ns = deadline_ns.saturating_sub(now_ns);
        if ahead_ns > MAX_LEASE_MS * NS_PER_MS {
            return Err(LeaseError::TooLong {
                deadline_ns,
                ahead_ms: ahead_ns / NS_PER_MS,
            });
        }
        let mut cur = self.deadline_ns.load(Ordering::SeqCst);
        loop {
            if cur <= now_ns {
                // Ended already: the watchdog fires any moment; never revive it.
                self.fence("it ended before a renewal came");
                return Err(LeaseError::Expired {
                    late_ms: (now_ns - cur) / NS_PER_MS,
                });
            }
            if deadline_ns <= now_ns {
                // Stop the watchdog's re-arming, then stop the VM.
                self.deadline_ns.fetch_min(deadline_ns, Ordering::SeqCst);
                self.fence("revoked: a renewal with a deadline that has passed");
                return Ok(Renewal::Revoked);
            }
            if deadline_ns <= cur {
                return Ok(Renewal::Unchanged);
            }
            match self.deadline_ns.compare_exchange(
                cur,
                deadline_ns,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(Renewal::Extended),
                Err(now_cur) => cur = now_cur,
            }
        }
    }

    /// The time left at `now_ns`, or `None` once the lease has ended (the VM
    /// is then told to stop).
    pub fn check(&self, now_ns: u64) -> Option<Duration> {
        let d = self.deadline_ns();
        if d <= now_ns {
            self.fence("no renewal came before the deadline");
            None
        } else {
            Some(Duration::from_nanos(d - now_ns))
        }
    }
}

/// The `lease` op of the API socket.
pub struct LeaseApi(pub Arc<Lease>);

impl ApiExtension for LeaseApi {
    fn handle(&self, op: &str, req: &Value) -> Option<Value> {
        if op != "lease" {
            return None;
        }
        let Some(deadline_ns) = req.get("deadline_ns").and_then(Value::as_u64) else {
            let e = LeaseError::BadRequest;
            return Some(error(e.code(), e));
        };
        Some(match self.0.renew(deadline_ns, monotonic_ns()) {
            Ok(r) => json!({
                "ok": true,
                "renewal": r.as_str(),
                "deadline_ns": self.0.deadline_ns(),
            }),
            Err(e) => error(e.code(), e),
        })
    }
}

/// Without a lease, the `lease` op says so (instead of `unknown_op`).
pub struct NoLeaseApi;

impl ApiExtension for NoLeaseApi {
    fn handle(&self, op: &str, _req: &Value) -> Option<Value> {
        (op == "lease").then(|| {
            error(
                "no_lease",
                "this VM holds no lease (cell0-vmm was started without --lease-ms)",
            )
        })
    }
}

/// The watchdog on the VMM thread's event loop: a timerfd armed for the
/// deadline. When it fires it re-arms for a renewed deadline, or fences.
pub struct LeaseWatchdog {
    lease: Arc<Lease>,
    timer: TimerFd,
}

impl LeaseWatchdog {
    /// A watchdog of `lease` (not armed until the event loop adds it).
    pub fn new(lease: Arc<Lease>) -> std::io::Result<Self> {
        Ok(Self {
            lease,
            timer: TimerFd::new()?,
        })
    }

    /// Arms the timer for the time left, or fences when none is.
    fn arm(&mut self) {
        let Some(left) = self.lease.check(monotonic_ns()) else {
            return;
        };
        if let Err(e) = self.timer.reset(left.max(Duration::from_nanos(1)), None) {
            // Without a timer nothing would end the VM on time: end it now.
            tracing::error!(error = %e, "cannot arm the lease timer");
            self.lease.fence("the lease timer cannot be armed");
        }
    }
}

impl MutEventSubscriber for LeaseWatchdog {
    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        if events.event_set().contains(EventSet::IN) {
            // Drain the expiry count; the deadline decides.
            let _ = self.timer.wait();
            self.arm();
        }
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!(error = ?e, fd = self.timer.as_raw_fd(), "cannot watch the lease timer");
            self.lease.fence("the lease timer cannot be watched");
            return;
        }
        self.arm();
    }
}

/// The lease's watchdog while the VM is built, before the event loop (and
/// its [`LeaseWatchdog`]) runs: a thread that, when the lease ends, logs the
/// fence and ends the VMM at once with [`EXIT_LEASE_EXPIRED`], even while the
/// build waits on swtpm or measures the boot (seconds under load). No guest
/// instruction has run then. Dropping it (once the event loop takes over)
/// ends the thread.
pub struct BuildWatchdog {
    _built: std::sync::mpsc::Sender<()>,
}

impl BuildWatchdog {
    /// Starts the thread; it runs under the API thread's seccomp filter
    /// (futex, clock_gettime, write, exit_group).
    pub fn start(lease: Arc<Lease>) -> Result<Self, crate::api::ApiError> {
        use std::sync::mpsc::{self, RecvTimeoutError};
        let (built, rx) = mpsc::channel::<()>();
        crate::api::spawn_filtered("lease-build", move || {
            loop {
                let Some(left) = lease.check(monotonic_ns()) else {
                    eprintln!("cell0-vmm: {}", StopReason::LeaseExpired);
                    std::process::exit(i32::from(EXIT_LEASE_EXPIRED));
                };
                match rx.recv_timeout(left) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Built: the event loop's watchdog takes over.
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
        Ok(Self { _built: built })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = NS_PER_MS;

    fn lease(deadline: u64) -> Lease {
        Lease::new(deadline, Arc::new(ExitSignal::new().unwrap()))
    }

    #[test]
    fn renewals_extend_and_never_move_back() {
        let l = lease(1_000 * MS);
        assert_eq!(l.renew(1_500 * MS, 900 * MS), Ok(Renewal::Extended));
        assert_eq!(l.deadline_ns(), 1_500 * MS);
        assert_eq!(l.renew(1_200 * MS, 1_000 * MS), Ok(Renewal::Unchanged));
        assert_eq!(l.deadline_ns(), 1_500 * MS);
        assert_eq!(l.exit.reason(), None);
        assert_eq!(l.check(1_400 * MS), Some(Duration::from_millis(100)));
        assert_eq!(l.exit.reason(), None);
    }

    #[test]
    fn a_deadline_that_passed_revokes_and_an_ended_lease_stays_ended() {
        let l = lease(1_000 * MS);
        assert_eq!(l.renew(800 * MS, 900 * MS), Ok(Renewal::Revoked));
        assert_eq!(l.exit.reason(), Some(StopReason::LeaseExpired));
        assert_eq!(l.deadline_ns(), 800 * MS);
        assert_eq!(l.check(900 * MS), None);

        let l = lease(1_000 * MS);
        assert_eq!(
            l.renew(5_000 * MS, 1_250 * MS),
            Err(LeaseError::Expired { late_ms: 250 })
        );
        assert_eq!(l.deadline_ns(), 1_000 * MS, "an ended lease is not revived");
        assert_eq!(l.exit.reason(), Some(StopReason::LeaseExpired));
    }

    #[test]
    fn too_long_and_malformed_requests_are_refused_and_change_nothing() {
        let l = Arc::new(lease(monotonic_ns() + 60_000 * MS));
        let before = l.deadline_ns();
        let api = LeaseApi(l.clone());
        let far = monotonic_ns() + (MAX_LEASE_MS + 1_000) * MS;
        for (req, code) in [
            (json!({"op": "lease"}), "bad_request"),
            (json!({"op": "lease", "deadline_ns": -5}), "bad_request"),
            (json!({"op": "lease", "deadline_ns": 1.5}), "bad_request"),
            (json!({"op": "lease", "deadline_ns": "7"}), "bad_request"),
            (json!({"op": "lease", "deadline_ns": far}), "out_of_range"),
        ] {
            let r = api.handle("lease", &req).unwrap();
            assert_eq!(r["error"]["code"], code, "{req}");
        }
        assert_eq!(l.deadline_ns(), before);
        assert_eq!(l.exit.reason(), None);
        assert!(api.handle("describe", &json!({})).is_none());
        let ok = api
            .handle("lease", &json!({"op": "lease", "deadline_ns": before + MS}))
            .unwrap();
        assert_eq!(ok["renewal"], "extended");
        assert_eq!(ok["deadline_ns"], before + MS);
        assert_eq!(
            NoLeaseApi.handle("lease", &json!({}),).unwrap()["error"]["code"],
            "no_lease"
        );
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() >= a + 2 * MS);
    }
}
