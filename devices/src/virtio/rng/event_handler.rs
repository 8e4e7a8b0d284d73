// SPDX-License-Identifier: Apache-2.0
//! The entropy device as an event-manager subscriber: its activation eventfd,
//! then the queue's eventfd (a KVM ioeventfd) once the driver activates it.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{EntropySource, RngMetrics, device::Rng};

const EV_ACTIVATE: u32 = 0;
const EV_QUEUE: u32 = 1;

fn add_or_keep(ops: &mut EventOps<'_>, ev: Events) {
    match ops.add(ev) {
        // Re-activation after a reset: the same descriptor is still watched.
        Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {}
        Err(e) => tracing::error!(error = ?e, "virtio-rng: cannot watch an event source"),
    }
}

impl<D: EntropySource> Rng<D> {
    fn watch_queue(&self, ops: &mut EventOps<'_>) {
        if let Some(a) = self.active.as_ref() {
            add_or_keep(
                ops,
                Events::with_data(a.queue.notify.as_ref(), EV_QUEUE, EventSet::IN),
            );
        }
    }
}

impl<D: EntropySource> MutEventSubscriber for Rng<D> {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        add_or_keep(
            ops,
            Events::with_data(&self.activate_evt, EV_ACTIVATE, EventSet::IN),
        );
        self.watch_queue(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match events.data() {
            EV_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.watch_queue(ops);
                // Requests may have been queued before the loop saw the activation.
                self.process_queue();
            }
            EV_QUEUE => {
                RngMetrics::inc(&self.metrics.queue_events);
                if let Some(evt) = &self.queue_evt {
                    // Non-blocking: nothing to read is a spurious wake-up.
                    let _ = evt.read();
                }
                self.process_queue();
            }
            other => {
                tracing::warn!(
                    data = other,
                    fd = events.fd(),
                    "virtio-rng: unexpected event"
                );
                let _ = ops.remove(events);
            }
        }
    }
}
