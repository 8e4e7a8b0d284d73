// SPDX-License-Identifier: Apache-2.0
//! The entropy device as an event-manager subscriber: its activation eventfd,
//! then the queue's eventfd (a KVM ioeventfd) once the driver activates it
//! (the plumbing is [`single_queue`]'s).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{EntropySource, RngMetrics, device::Rng};
use crate::virtio::single_queue::{self, SingleQueue, SingleQueueDevice};

impl<S: EntropySource> SingleQueueDevice for Rng<S> {
    const NAME: &'static str = "virtio-rng";

    fn single_queue(&self) -> &SingleQueue {
        &self.q
    }

    fn count_queue_event(&self) {
        RngMetrics::inc(&self.metrics.queue_events);
    }

    fn process_queue(&mut self) {
        Rng::process_queue(self);
    }
}

impl<S: EntropySource> MutEventSubscriber for Rng<S> {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        single_queue::process(self, events, ops);
    }
}
