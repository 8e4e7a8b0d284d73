// SPDX-License-Identifier: Apache-2.0
//! Per-device virtio-rng counters, as atomics (exported by cell0d as Prometheus metrics).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! rng_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of one entropy device. Guest misbehaviour lands in
        /// `bad_chain` or `queue_errors` (and logged at a bounded rate, see `virtio::log_decision`).
        #[derive(Debug, Default)]
        pub struct RngMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl RngMetrics {
            /// Name/value pairs of every counter, for export.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

rng_metrics! {
    /// Successful activations.
    activations,
    /// Activations refused.
    activate_fails,
    /// Queue kicks.
    queue_events,
    /// Requests filled.
    requests,
    /// Random bytes handed to the guest.
    bytes,
    /// Chains that loop, are too long, point outside guest memory or hold
    /// device-readable buffers.
    bad_chain,
    /// The entropy source failed.
    source_errors,
    /// Corrupt ring state (avail index past the queue size, unwritable used ring).
    queue_errors,
    /// Interrupts that could not be raised.
    irq_fails,
}

impl RngMetrics {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads one counter by name (tests and diagnostics).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}
