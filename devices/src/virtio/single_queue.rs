// SPDX-License-Identifier: Apache-2.0
//! The plumbing of a device with one queue (virtio-blk, virtio-rng):
//! activation and its checks, the activation and queue eventfds, and the
//! event-manager subscription that watches them. The device keeps only what
//! it does with the requests ([`SingleQueueDevice::process_queue`]).

use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{GuestMemory, Interrupt, VirtQueue, VirtioError};

const EV_ACTIVATE: u32 = 0;
const EV_QUEUE: u32 = 1;

/// State that exists between activation and reset.
#[derive(Debug)]
pub(crate) struct Active {
    pub(crate) mem: GuestMemory,
    pub(crate) queue: VirtQueue,
    pub(crate) interrupt: Interrupt,
    /// Set after a ring corruption: the device stops until reset.
    pub(crate) broken: bool,
}

/// The activation state and eventfds of a one-queue device.
#[derive(Debug)]
pub(crate) struct SingleQueue {
    /// Written on activation so the event handler starts watching the queue.
    pub(crate) activate_evt: EventFd,
    pub(crate) active: Option<Active>,
    /// The queue eventfd of the last activation; kept readable after a reset
    /// so a guest kicking a reset device cannot spin the event loop.
    pub(crate) queue_evt: Option<Arc<EventFd>>,
}

impl SingleQueue {
    /// Not activated yet.
    pub(crate) fn new() -> std::io::Result<SingleQueue> {
        Ok(SingleQueue {
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            queue_evt: None,
        })
    }

    /// [`VirtioDevice::activate`](super::VirtioDevice::activate) for a device
    /// with one queue: refuses a second activation, another number of queues
    /// and a queue the driver did not make ready.
    pub(crate) fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<VirtQueue>,
        interrupt: Interrupt,
    ) -> Result<(), VirtioError> {
        if self.active.is_some() {
            return Err(VirtioError::AlreadyActive);
        }
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        if !queue.queue.ready() {
            return Err(VirtioError::QueueNotReady(0));
        }
        self.activate_evt.write(1).map_err(VirtioError::EventFd)?;
        self.queue_evt = Some(queue.notify.clone());
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            broken: false,
        });
        Ok(())
    }
}

/// A device built on [`SingleQueue`]; its `MutEventSubscriber` impl calls
/// [`init`] and [`process`].
pub(crate) trait SingleQueueDevice {
    /// The name its log lines start with (`virtio-blk`).
    const NAME: &'static str;
    /// Its plumbing.
    fn single_queue(&self) -> &SingleQueue;
    /// Counts one queue notification.
    fn count_queue_event(&self);
    /// Handles every available chain.
    fn process_queue(&mut self);
}

fn add_or_keep<T: SingleQueueDevice>(ops: &mut EventOps<'_>, ev: Events) {
    match ops.add(ev) {
        // Re-activation after a reset: the same descriptor is still watched.
        Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {}
        Err(e) => tracing::error!(error = ?e, "{}: cannot watch an event source", T::NAME),
    }
}

fn watch_queue<T: SingleQueueDevice>(dev: &T, ops: &mut EventOps<'_>) {
    if let Some(a) = dev.single_queue().active.as_ref() {
        add_or_keep::<T>(
            ops,
            Events::with_data(a.queue.notify.as_ref(), EV_QUEUE, EventSet::IN),
        );
    }
}

/// `MutEventSubscriber::init`: the activation eventfd, and the queue's if the
/// device is already active.
pub(crate) fn init<T: SingleQueueDevice>(dev: &mut T, ops: &mut EventOps<'_>) {
    add_or_keep::<T>(
        ops,
        Events::with_data(&dev.single_queue().activate_evt, EV_ACTIVATE, EventSet::IN),
    );
    watch_queue(dev, ops);
}

/// `MutEventSubscriber::process`.
pub(crate) fn process<T: SingleQueueDevice>(dev: &mut T, events: Events, ops: &mut EventOps<'_>) {
    match events.data() {
        EV_ACTIVATE => {
            let _ = dev.single_queue().activate_evt.read();
            watch_queue(dev, ops);
            // Requests may have been queued before the loop saw the activation.
            dev.process_queue();
        }
        EV_QUEUE => {
            dev.count_queue_event();
            if let Some(evt) = &dev.single_queue().queue_evt {
                // Non-blocking: nothing to read is a spurious wake-up.
                let _ = evt.read();
            }
            dev.process_queue();
        }
        other => {
            tracing::warn!(
                data = other,
                fd = events.fd(),
                "{}: unexpected event",
                T::NAME
            );
            let _ = ops.remove(events);
        }
    }
}
