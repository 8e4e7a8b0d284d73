// SPDX-License-Identifier: Apache-2.0
//! The block device as an event-manager subscriber: its activation eventfd,
//! then the queue's eventfd (a KVM ioeventfd) once the driver activates it
//! (the plumbing is [`single_queue`]'s).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::{BlockMetrics, DiskBackend, device::Block};
use crate::virtio::single_queue::{self, SingleQueue, SingleQueueDevice};

impl<D: DiskBackend> SingleQueueDevice for Block<D> {
    const NAME: &'static str = "virtio-blk";

    fn single_queue(&self) -> &SingleQueue {
        &self.q
    }

    fn count_queue_event(&self) {
        BlockMetrics::inc(&self.metrics.queue_events);
    }

    fn process_queue(&mut self) {
        Block::process_queue(self);
    }
}

impl<D: DiskBackend> MutEventSubscriber for Block<D> {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        single_queue::process(self, events, ops);
    }
}
