// SPDX-License-Identifier: Apache-2.0
//! Entropy device tests: buffers are filled from the source, the per-request
//! cap holds, and malicious chains or rings never panic the VMM.
#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::SubscriberOps;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::test_utils::{Em, MEM_SIZE, QueueDriver, pump, raw, test_mem};
use crate::virtio::{GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError};

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Counts up from a seed, so tests can check exactly which bytes arrived.
struct Counter {
    next: u8,
    fail: bool,
}

impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        for b in buf {
            *b = self.next;
            self.next = self.next.wrapping_add(1);
        }
        Ok(())
    }
}

struct Harness<'a> {
    drv: QueueDriver<'a>,
    dev: Arc<Mutex<Rng<Counter>>>,
    em: Em,
    irq: Interrupt,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        let drv = QueueDriver::new(mem, QUEUE_SIZE);
        let dev = Arc::new(Mutex::new(
            Rng::with_source(Counter {
                next: 0,
                fail: false,
            })
            .unwrap(),
        ));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = Interrupt::new().unwrap();
        dev.lock()
            .unwrap()
            .activate(mem.clone(), vec![drv.queue()], irq.clone())
            .unwrap();
        pump(&mut em);
        Self { drv, dev, em, irq }
    }

    fn dev(&self) -> MutexGuard<'_, Rng<Counter>> {
        self.dev.lock().unwrap()
    }

    fn metric(&self, name: &str) -> u64 {
        self.dev().metrics().get(name).unwrap()
    }

    fn kick(&mut self) {
        self.drv.notify.write(1).unwrap();
        pump(&mut self.em);
    }
}

#[test]
fn reports_type_and_features_and_has_no_config() {
    let d = Rng::new().unwrap();
    assert_eq!(d.device_type(), 4);
    assert_ne!(d.avail_features() & VIRTIO_F_VERSION_1, 0);
    assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE]);
    let mut c = [0xffu8; 4];
    d.read_config(0, &mut c);
    assert_eq!(c, [0; 4]);
}

#[test]
fn os_entropy_fills_large_buffers() {
    let mut a = vec![0u8; 100_000];
    OsEntropy.fill(&mut a).unwrap();
    let mut b = vec![0u8; 100_000];
    OsEntropy.fill(&mut b).unwrap();
    assert_ne!(a, b);
    assert!(a.iter().filter(|x| **x == 0).count() < 2_000);
}

#[test]
fn activation_checks_the_queue() {
    let mem = test_mem();
    let drv = QueueDriver::new(&mem, QUEUE_SIZE);
    let mut d = Rng::new().unwrap();
    let irq = Interrupt::new().unwrap();
    assert!(matches!(
        d.activate(mem.clone(), vec![], irq.clone()),
        Err(VirtioError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    d.activate(mem.clone(), vec![drv.queue()], irq).unwrap();
    assert!(d.is_activated());
    d.reset();
    assert!(!d.is_activated());
}

#[test]
fn buffers_across_descriptors_are_filled_in_order() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let a = h.drv.alloc(10);
    let b = h.drv.alloc(6);
    h.drv.push_chain(&[(a, 10, W), (b, 6, W)]);
    h.kick();
    let used = h.drv.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len(), 16);
    let mut x = [0u8; 10];
    mem.read_slice(&mut x, a).unwrap();
    assert_eq!(x, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let mut y = [0u8; 6];
    mem.read_slice(&mut y, b).unwrap();
    assert_eq!(y, [10, 11, 12, 13, 14, 15]);
    assert!(h.irq.irqfd().read().is_ok());
    assert_eq!(h.metric("bytes"), 16);
    assert_eq!(h.metric("requests"), 1);
}

#[test]
fn a_huge_buffer_gets_at_most_the_cap() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let a = GuestAddress(0x10_0000);
    h.drv.push_chain(&[(a, 1 << 20, W)]);
    h.kick();
    let used = h.drv.take_used();
    assert_eq!(used[0].len() as usize, MAX_REQUEST_BYTES);
}

#[test]
fn malicious_chains_come_back_empty_and_the_device_goes_on() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // Device-readable buffer.
    let a = h.drv.alloc(8);
    h.drv.push_chain(&[(a, 8, 0)]);
    // Outside guest memory, and wrapping the address space.
    h.drv.push_chain(&[(GuestAddress(MEM_SIZE - 4), 64, W)]);
    h.drv.push_chain(&[(GuestAddress(u64::MAX - 3), 64, W)]);
    // A loop.
    h.drv.push_raw(&[(100, raw(a.0, 8, W | NEXT, 100))], 100);
    h.kick();
    let used = h.drv.take_used();
    assert_eq!(used.len(), 4);
    assert!(used.iter().all(|u| u.len() == 0));
    assert_eq!(h.metric("bad_chain"), 4);
    // A good one still works.
    let b = h.drv.alloc(4);
    h.drv.push_chain(&[(b, 4, W)]);
    h.kick();
    assert_eq!(h.drv.take_used()[0].len(), 4);
}

#[test]
fn a_failing_source_returns_empty_buffers() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev().source.fail = true;
    let a = h.drv.alloc(8);
    h.drv.push_chain(&[(a, 8, W)]);
    h.kick();
    assert_eq!(h.drv.take_used()[0].len(), 0);
    assert_eq!(h.metric("source_errors"), 1);
}

#[test]
fn a_corrupt_ring_sets_needs_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.drv.set_avail_idx(QUEUE_SIZE + 7);
    h.kick();
    assert!(h.irq.needs_reset());
    assert_eq!(h.metric("queue_errors"), 1);
    h.kick();
    assert_eq!(h.metric("queue_errors"), 1);
}

#[test]
fn kicks_after_a_reset_do_not_spin_the_event_loop() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.dev().reset();
    h.kick();
    assert_eq!(h.metric("queue_events"), 1);
}
