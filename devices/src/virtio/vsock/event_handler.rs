// SPDX-License-Identifier: Apache-2.0
//! The device as an event-manager subscriber.
//!
//! At registration it watches only its activation eventfd. Once the driver
//! activates the device it also watches the three queue eventfds (KVM
//! ioeventfds) and the backend's descriptor (for the Unix muxer: its epoll set
//! of the listening socket, the connection sockets and a deadline timer).

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Vsock;
use super::{EVQ_INDEX, RXQ_INDEX, TXQ_INDEX, VsockBackend, VsockMetrics};

const EV_ACTIVATE: u32 = 0;
const EV_RXQ: u32 = 1;
const EV_TXQ: u32 = 2;
const EV_EVQ: u32 = 3;
const EV_BACKEND: u32 = 4;

fn add_or_keep(ops: &mut EventOps<'_>, ev: Events) {
    match ops.add(ev) {
        // Re-activation after a reset: the same descriptors are still watched.
        Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {}
        Err(e) => tracing::error!(error = ?e, "vsock: cannot watch an event source"),
    }
}

impl<B: VsockBackend> Vsock<B> {
    fn watch_runtime(&self, ops: &mut EventOps<'_>) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        for (index, data) in [
            (RXQ_INDEX, EV_RXQ),
            (TXQ_INDEX, EV_TXQ),
            (EVQ_INDEX, EV_EVQ),
        ] {
            if let Some(q) = a.queues.get(index) {
                add_or_keep(
                    ops,
                    Events::with_data(q.notify.as_ref(), data, EventSet::IN),
                );
            }
        }
        add_or_keep(
            ops,
            Events::with_data_raw(
                self.backend.get_polled_fd(),
                EV_BACKEND,
                self.backend.get_polled_evset(),
            ),
        );
    }

    /// Clears a queue eventfd (active or not); returns whether the device is active.
    fn drain_queue_evt(&self, index: usize) -> bool {
        if let Some(evt) = self.queue_evts.get(index) {
            // Non-blocking: nothing to read just means a spurious wake-up.
            let _ = evt.read();
        }
        self.active.is_some()
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        add_or_keep(
            ops,
            Events::with_data(&self.activate_evt, EV_ACTIVATE, EventSet::IN),
        );
        self.watch_runtime(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match events.data() {
            EV_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.watch_runtime(ops);
                // Packets may have been queued before the event loop saw the activation.
                self.process_queues(true);
            }
            EV_RXQ => {
                VsockMetrics::inc(&self.metrics.rx_queue_events);
                if self.drain_queue_evt(RXQ_INDEX) {
                    self.process_queues(false);
                }
            }
            EV_TXQ => {
                VsockMetrics::inc(&self.metrics.tx_queue_events);
                if self.drain_queue_evt(TXQ_INDEX) {
                    self.process_queues(true);
                }
            }
            EV_EVQ => {
                if self.drain_queue_evt(EVQ_INDEX) {
                    self.process_evq();
                }
            }
            EV_BACKEND => {
                VsockMetrics::inc(&self.metrics.backend_events);
                // Always let the backend consume its events (it is level-triggered),
                // even while the device is not active.
                self.backend.notify(events.event_set());
                self.process_queues(false);
            }
            other => {
                tracing::warn!(data = other, fd = events.fd(), "vsock: unexpected event");
                let _ = ops.remove(events);
            }
        }
    }
}
