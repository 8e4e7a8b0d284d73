// SPDX-License-Identifier: Apache-2.0
//! Per-device virtio-blk counters, as atomics (exported by cell0d as Prometheus metrics).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! block_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of one block device. Guest misbehaviour lands in
        /// `bad_chain`, `no_status`, `malformed`, `out_of_range`, `ro_writes`,
        /// `unsupported` or `queue_errors` (and logged at a bounded rate, see `virtio::log_decision`).
        #[derive(Debug, Default)]
        pub struct BlockMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl BlockMetrics {
            /// Name/value pairs of every counter, for export.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

block_metrics! {
    /// Successful activations.
    activations,
    /// Activations refused.
    activate_fails,
    /// Queue kicks.
    queue_events,
    /// Read requests completed.
    reads,
    /// Write requests completed.
    writes,
    /// Flush requests completed.
    flushes,
    /// GET_ID requests completed.
    get_ids,
    /// Bytes read from the disk.
    read_bytes,
    /// Bytes written to the disk.
    write_bytes,
    /// Chains that loop, are too long, or point outside guest memory.
    bad_chain,
    /// Chains without a device-writable status byte.
    no_status,
    /// Requests with a short header or data buffers of the wrong direction or size.
    malformed,
    /// Requests past the end of the disk.
    out_of_range,
    /// Writes refused on a read-only disk.
    ro_writes,
    /// Requests of an unknown type.
    unsupported,
    /// Backend read, write or flush failures.
    io_errors,
    /// Corrupt ring state (avail index past the queue size, unwritable used ring).
    queue_errors,
    /// Interrupts that could not be raised.
    irq_fails,
}

impl BlockMetrics {
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
