// SPDX-License-Identifier: Apache-2.0
//! The start gate: vCPU threads install their filter, report in, and wait
//! here; the VMM thread installs its own filter once all have reported, and
//! only then lets them enter the guest. So no guest instruction runs while any
//! thread of the VMM is unfiltered.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::SeccompError;

#[derive(Debug, Default)]
struct GateState {
    arrived: usize,
    failure: Option<SeccompError>,
    /// `Some(true)`: go; `Some(false)`: give up without running.
    released: Option<bool>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct StartGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

impl StartGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// A gate that is already open (a thread passes straight through).
    pub fn opened() -> Self {
        let g = Self::new();
        g.release(true);
        g
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread with the outcome of installing its filter.
    /// Blocks until the gate is released; returns whether to run the guest.
    pub fn arrive(&self, installed: Result<(), SeccompError>) -> bool {
        let mut s = self.lock();
        s.arrived += 1;
        if let Err(e) = installed {
            s.failure.get_or_insert(e);
        }
        self.cv.notify_all();
        loop {
            match s.released {
                Some(go) => return go,
                None => s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Waits until `n` threads have arrived (at most `limit`); the first
    /// failure any of them reported, if one did.
    pub fn wait_arrivals(&self, n: usize, limit: Duration) -> Result<(), SeccompError> {
        let deadline = Instant::now() + limit;
        let mut s = self.lock();
        while s.arrived < n && s.failure.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SeccompError::VcpuTimeout {
                    missing: n - s.arrived,
                });
            }
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match s.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Opens the gate (`go`) or tells every waiting thread to give up.
    pub fn release(&self, go: bool) {
        let mut s = self.lock();
        s.released.get_or_insert(go);
        self.cv.notify_all();
    }
}
