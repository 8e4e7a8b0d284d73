// SPDX-License-Identifier: Apache-2.0
//! The router's counters: CALLs routed, by kind of target, and refusals
//! (what the refusal log records), by error code. Relaxed atomics: one add
//! per CALL. `cell0d serve` exports them on `/metrics`
//! (`cell0_sypas_calls_total{target}`, `cell0_sypas_denials_total{reason}`).

use std::sync::atomic::{AtomicU64, Ordering};

use cell0_proto::ErrorCode;

/// Where a CALL went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Target {
    /// The router's own methods (`router/…`).
    Router = 0,
    /// The node service (`cell0.node/…`: guest-agent bootstrap and ready).
    Node = 1,
    /// Another agent (`agent/<id>`).
    Agent = 2,
    /// An in-process service (`echo`, …).
    Local = 3,
    /// A service registered by a host process.
    Remote = 4,
    /// No such service.
    Unknown = 5,
}

impl Target {
    /// Every target, in label order.
    pub const ALL: [Target; 6] = [
        Target::Router,
        Target::Node,
        Target::Agent,
        Target::Local,
        Target::Remote,
        Target::Unknown,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Target::Router => "router",
            Target::Node => "node",
            Target::Agent => "agent",
            Target::Local => "local",
            Target::Remote => "remote",
            Target::Unknown => "unknown",
        }
    }
}

/// The router's counters. Shared by every listener.
#[derive(Debug)]
pub struct SypasStats {
    calls: [AtomicU64; 6],
    /// Indexed by wire code (all codes are below 128).
    denials: [AtomicU64; 128],
}

impl Default for SypasStats {
    fn default() -> Self {
        Self {
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            denials: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl SypasStats {
    /// A CALL reached the router's handler and was routed to `t`.
    pub(crate) fn call(&self, t: Target) {
        self.calls[t as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A request was refused with `code` (and written to the refusal log).
    pub(crate) fn denial(&self, code: u32) {
        if let Some(c) = self.denials.get(code as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// CALLs routed, by target label (every target, zeros included).
    pub fn calls(&self) -> Vec<(&'static str, u64)> {
        Target::ALL
            .iter()
            .map(|t| (t.label(), self.calls[*t as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// CALLs routed in all.
    pub fn calls_total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Refusals, by error-code name (codes seen at least once).
    pub fn denials(&self) -> Vec<(&'static str, u64)> {
        ErrorCode::ALL
            .iter()
            .filter_map(|c| {
                let n = self.denials[c.as_u32() as usize].load(Ordering::Relaxed);
                (n > 0).then_some((c.name(), n))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_target_and_code() {
        let s = SypasStats::default();
        s.call(Target::Local);
        s.call(Target::Local);
        s.call(Target::Agent);
        s.denial(ErrorCode::PermissionDenied.as_u32());
        s.denial(1000);
        assert_eq!(s.calls_total(), 3);
        assert!(s.calls().contains(&("local", 2)));
        assert!(s.calls().contains(&("router", 0)));
        assert_eq!(s.denials(), vec![("PERMISSION_DENIED", 1)]);
    }
}
