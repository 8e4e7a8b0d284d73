// SPDX-License-Identifier: Apache-2.0
//! Per-device vsock counters, as atomics (exported by cell0d as Prometheus metrics).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! vsock_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of one vsock device. Guest misbehaviour lands in one of the
        /// `tx_bad_*`, `rx_bad_*`, `bogus_*`, `credit_lies`, `queue_errors` or
        /// `conn_limit_rejected` counters (and logged at a bounded rate, see `virtio::log_decision`).
        #[derive(Debug, Default)]
        pub struct VsockMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl VsockMetrics {
            /// Name/value pairs of every counter, for export.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

vsock_metrics! {
    /// Successful activations.
    activations,
    /// Activations refused (missing queues).
    activate_fails,
    /// Kicks on the RX queue.
    rx_queue_events,
    /// Kicks on the TX queue.
    tx_queue_events,
    /// Kicks on the event queue (unused by this device).
    ev_queue_events,
    /// Backend (muxer) wake-ups.
    backend_events,
    /// Packets delivered to the guest.
    rx_packets,
    /// Data bytes delivered to the guest.
    rx_bytes,
    /// Packets taken from the guest.
    tx_packets,
    /// Data bytes taken from the guest.
    tx_bytes,
    /// TX chains that loop, are too long, or overflow 2^32 bytes in total.
    tx_bad_chain,
    /// TX packets whose header `len` exceeds 64 KiB or its data descriptor.
    tx_bad_len,
    /// TX packets whose buffers lie outside guest memory.
    tx_bad_addr,
    /// TX packets with a zero-length or short header descriptor, missing data
    /// descriptor, or a device-writable buffer.
    tx_bad_desc,
    /// RX chains that loop or are too long.
    rx_bad_chain,
    /// RX buffers the device cannot use (zero-length, read-only, out of bounds, too long).
    rx_bad_buffer,
    /// Corrupt ring state (avail index past the queue size, unwritable used ring).
    queue_errors,
    /// Packets not from the guest's CID or not to the host's.
    bogus_cid,
    /// Packets of a socket type other than stream.
    bogus_type,
    /// Packets with an unknown op, or an op that is invalid in the connection's state.
    bogus_op,
    /// The guest sent more than its credit allowed, or claimed to have
    /// consumed bytes the device never sent.
    credit_lies,
    /// Connections set up (either direction).
    conns_added,
    /// Connections torn down.
    conns_removed,
    /// Guest connections refused: no socket at `<uds>_P`, or it refused.
    conns_refused,
    /// Connections refused because the connection limit was reached.
    conn_limit_rejected,
    /// Host connections accepted on `<uds>`.
    host_conns_accepted,
    /// Host connections closed for a malformed `CONNECT` line.
    host_connect_bad,
    /// Connections killed because the guest did not answer in time.
    conn_timeouts,
    /// RST packets sent to the guest.
    rst_sent,
    /// Writes to a host socket that failed (other than would-block).
    host_write_errors,
    /// Times the muxer's queue towards the guest overflowed and was rebuilt.
    rxq_overflows,
    /// Interrupts that could not be raised.
    irq_fails,
}

impl VsockMetrics {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_every_counter() {
        let m = VsockMetrics::default();
        VsockMetrics::inc(&m.credit_lies);
        VsockMetrics::add(&m.rx_bytes, 7);
        let s = m.snapshot();
        assert_eq!(s.len(), 32);
        assert_eq!(m.get("credit_lies"), Some(1));
        assert_eq!(m.get("rx_bytes"), Some(7));
        assert_eq!(m.get("nope"), None);
    }
}
