// SPDX-License-Identifier: Apache-2.0
//! Test helpers shared by the single-queue devices (blk, rng): a guest driver
//! over virtio-queue's `MockSplitQueue` and a real event manager to run the device.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::virtio::{GuestMemory, VirtQueue};

/// Guest memory size used by the tests.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Where buffers are allocated from.
const BUF_BASE: u64 = 0x10_0000;

pub fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// The driver side of one queue.
pub struct QueueDriver<'a> {
    pub mem: &'a GuestMemory,
    q: MockSplitQueue<'a, GuestMemory>,
    size: u16,
    next_desc: u16,
    used_seen: u16,
    next_buf: u64,
    pub notify: Arc<EventFd>,
}

impl<'a> QueueDriver<'a> {
    pub fn new(mem: &'a GuestMemory, size: u16) -> Self {
        Self {
            mem,
            q: MockSplitQueue::create(mem, GuestAddress(0), size),
            size,
            next_desc: 0,
            used_seen: 0,
            next_buf: BUF_BASE,
            notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        }
    }

    /// A queue object configured like a driver would, for activation.
    pub fn queue(&self) -> VirtQueue {
        VirtQueue {
            queue: self.q.create_queue::<Queue>().unwrap(),
            notify: self.notify.clone(),
        }
    }

    /// Allocates `len` bytes of guest memory for buffers.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let len = len.max(1).next_multiple_of(16);
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let a = GuestAddress(self.next_buf);
        self.next_buf += len;
        a
    }

    fn take_indices(&mut self, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                i
            })
            .collect()
    }

    /// Writes descriptors at the given indices as given and publishes `head`.
    pub fn push_raw(&mut self, descs: &[(u16, RawDescriptor)], head: u16) {
        for (i, d) in descs {
            self.q.desc_table().store(*i, *d).unwrap();
        }
        self.publish(head);
    }

    /// Publishes a raw head index in the avail ring.
    pub fn publish(&mut self, head: u16) {
        let avail = self.q.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
    }

    /// Builds a well-formed chain of `(addr, len, flags)` buffers and publishes it.
    pub fn push_chain(&mut self, bufs: &[(GuestAddress, u32, u16)]) -> u16 {
        let idx = self.take_indices(bufs.len());
        let descs: Vec<(u16, RawDescriptor)> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(a, l, f))| {
                let last = k + 1 == bufs.len();
                let flags = if last {
                    f
                } else {
                    f | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { idx[k + 1] };
                (idx[k], raw(a.0, l, flags, next))
            })
            .collect();
        self.push_raw(&descs, idx[0]);
        idx[0]
    }

    /// Used elements the device returned since the last call.
    pub fn take_used(&mut self) -> Vec<VirtqUsedElem> {
        let used = self.q.used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            out.push(
                used.ring()
                    .ref_at(usize::from(self.used_seen % self.size))
                    .unwrap()
                    .load(),
            );
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Overwrites the avail index (ring corruption).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.q.avail().idx().store(idx);
    }
}

pub type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Runs the event manager until nothing is ready.
pub fn pump(em: &mut Em) {
    for _ in 0..10_000 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("event loop never went idle");
}
