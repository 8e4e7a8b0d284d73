// SPDX-License-Identifier: Apache-2.0
//! Block device tests over an in-memory disk and a real file: the request path
//! through the queue, read-only disks, flush, and the malicious-guest list
//! (bad chains, bad headers, out-of-range sectors, ring corruption).
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::SubscriberOps;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::request::HEADER_SIZE;
use super::uapi::*;
use super::*;
use crate::virtio::test_utils::{Em, QueueDriver, pump, raw, test_mem};
use crate::virtio::{GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError};

const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const SECTORS: u64 = 64;

struct Harness<'a> {
    drv: QueueDriver<'a>,
    dev: Arc<Mutex<Block<MemDisk>>>,
    em: Em,
    irq: Interrupt,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory, read_only: bool) -> Self {
        let dev =
            Block::with_backend(MemDisk::new(SECTORS), read_only, b"cell0-test-disk").unwrap();
        Self::with_dev(mem, dev)
    }

    fn with_dev(mem: &'a GuestMemory, dev: Block<MemDisk>) -> Self {
        let drv = QueueDriver::new(mem, QUEUE_SIZE);
        let dev = Arc::new(Mutex::new(dev));
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

    fn dev(&self) -> MutexGuard<'_, Block<MemDisk>> {
        self.dev.lock().unwrap()
    }

    fn metric(&self, name: &str) -> u64 {
        self.dev().metrics().get(name).unwrap()
    }

    fn kick(&mut self) {
        self.drv.notify.write(1).unwrap();
        pump(&mut self.em);
    }

    fn header(&mut self, kind: u32, sector: u64) -> GuestAddress {
        let a = self.drv.alloc(HEADER_SIZE as u64);
        let mut h = [0u8; HEADER_SIZE];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.drv.mem.write_slice(&h, a).unwrap();
        a
    }

    /// Sends one well-formed request; returns (status, used length, data buffers).
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[&[u8]],
        data_writable: bool,
    ) -> (u8, u32, Vec<GuestAddress>) {
        let h = self.header(kind, sector);
        let mut bufs = vec![(h, HEADER_SIZE as u32, 0)];
        let mut addrs = Vec::new();
        for d in data {
            let a = self.drv.alloc(d.len() as u64);
            self.drv.mem.write_slice(d, a).unwrap();
            bufs.push((a, d.len() as u32, if data_writable { W } else { 0 }));
            addrs.push(a);
        }
        let s = self.drv.alloc(1);
        self.drv.mem.write_slice(&[0xee], s).unwrap();
        bufs.push((s, 1, W));
        self.drv.push_chain(&bufs);
        self.kick();
        let used = self.drv.take_used();
        assert_eq!(used.len(), 1, "one request, one used element");
        let status: u8 = self.drv.mem.read_obj(s).unwrap();
        (status, used[0].len(), addrs)
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let zeros = vec![0u8; len];
        let (st, used, addrs) = self.request(VIRTIO_BLK_T_IN, sector, &[&zeros], true);
        let mut out = vec![0u8; len];
        self.drv.mem.read_slice(&mut out, addrs[0]).unwrap();
        if st == VIRTIO_BLK_S_OK {
            assert_eq!(used as usize, len + 1);
        }
        (st, out)
    }

    fn irq_fired(&self) -> bool {
        self.irq.irqfd().read().is_ok()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn reports_type_features_capacity_and_seg_max() {
    let d = Block::with_backend(MemDisk::new(SECTORS), false, b"x").unwrap();
    assert_eq!(d.device_type(), 2);
    let f = d.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
    let mut c = [0xffu8; 8];
    d.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), SECTORS);
    let mut s = [0u8; 4];
    d.read_config(12, &mut s);
    assert_eq!(u32::from_le_bytes(s), SEG_MAX);
    let mut past = [0xffu8; 4];
    d.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    let ro = Block::with_backend(MemDisk::new(1), true, b"x").unwrap();
    assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn activation_checks_the_queue() {
    let mem = test_mem();
    let drv = QueueDriver::new(&mem, QUEUE_SIZE);
    let mut d = Block::with_backend(MemDisk::new(1), false, b"x").unwrap();
    let irq = Interrupt::new().unwrap();
    assert!(matches!(
        d.activate(mem.clone(), vec![], irq.clone()),
        Err(VirtioError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    let mut q = drv.queue();
    q.queue.set_ready(false);
    assert!(matches!(
        d.activate(mem.clone(), vec![q], irq.clone()),
        Err(VirtioError::QueueNotReady(0))
    ));
    d.activate(mem.clone(), vec![drv.queue()], irq.clone())
        .unwrap();
    assert!(matches!(
        d.activate(mem.clone(), vec![drv.queue()], irq),
        Err(VirtioError::AlreadyActive)
    ));
    d.reset();
    assert!(!d.is_activated());
}

#[test]
fn writes_read_back_across_segments_and_flush() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    let a = pattern(512, 1);
    let b = pattern(1024, 2);
    let (st, used, _) = h.request(VIRTIO_BLK_T_OUT, 3, &[&a, &b], false);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(used, 1, "a write uses only the status byte");
    assert!(h.irq_fired());
    assert_eq!(&h.dev().disk().data[3 * 512..4 * 512], &a[..]);
    assert_eq!(&h.dev().disk().data[4 * 512..6 * 512], &b[..]);
    let (st, got) = h.read(3, 1536);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(&got[..512], &a[..]);
    assert_eq!(&got[512..], &b[..]);
    let (st, used, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!((st, used), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(h.dev().disk().flushes, 1);
    assert_eq!(h.metric("writes"), 1);
    assert_eq!(h.metric("reads"), 1);
    assert_eq!(h.metric("write_bytes"), 1536);
    assert_eq!(h.metric("read_bytes"), 1536);
    assert_eq!(h.metric("flushes"), 1);
}

#[test]
fn the_last_sector_is_reachable_and_the_next_is_not() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    let d = pattern(512, 9);
    let (st, _, _) = h.request(VIRTIO_BLK_T_OUT, SECTORS - 1, &[&d], false);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    for sector in [SECTORS, SECTORS - 1 + 1, u64::MAX, u64::MAX / 512 + 1] {
        let (st, _, _) = h.request(VIRTIO_BLK_T_OUT, sector, &[&d], false);
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "sector {sector}");
        let (st, _) = h.read(sector, 512);
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "sector {sector}");
    }
    // Two sectors starting at the last one straddle the end.
    let (st, _) = h.read(SECTORS - 1, 1024);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.metric("out_of_range"), 9);
}

#[test]
fn a_read_only_disk_refuses_writes_but_reads_and_flushes() {
    let mem = test_mem();
    let mut disk = MemDisk::new(SECTORS);
    disk.data[..512].copy_from_slice(&pattern(512, 4));
    let dev = Block::with_backend(disk, true, b"ro").unwrap();
    let mut h = Harness::with_dev(&mem, dev);
    let (st, _, _) = h.request(VIRTIO_BLK_T_OUT, 0, &[&[0u8; 512]], false);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert_eq!(&h.dev().disk().data[..512], &pattern(512, 4)[..]);
    let (st, got) = h.read(0, 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(got, pattern(512, 4));
    let (st, _, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(
        h.dev().disk().flushes,
        0,
        "nothing to flush on a read-only disk"
    );
    assert_eq!(h.metric("ro_writes"), 1);
}

#[test]
fn get_id_returns_the_serial_and_unknown_types_are_unsupported() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    let (st, used, addrs) = h.request(VIRTIO_BLK_T_GET_ID, 0, &[&[0u8; ID_BYTES]], true);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(used as usize, ID_BYTES + 1);
    let mut id = [0u8; ID_BYTES];
    mem.read_slice(&mut id, addrs[0]).unwrap();
    assert_eq!(&id[..15], b"cell0-test-disk");
    assert_eq!(&id[15..], &[0; 5]);
    for kind in [2u32, 5, 7, 0xdead_beef] {
        let (st, used, _) = h.request(kind, 0, &[], false);
        assert_eq!((st, used), (VIRTIO_BLK_S_UNSUPP, 1), "type {kind}");
    }
    assert_eq!(h.metric("unsupported"), 4);
}

#[test]
fn backend_errors_become_ioerr() {
    let mem = test_mem();
    let mut disk = MemDisk::new(SECTORS);
    disk.fail_errno = Some(libc::EIO);
    let mut h = Harness::with_dev(&mem, Block::with_backend(disk, false, b"x").unwrap());
    assert_eq!(h.read(0, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[&[1u8; 512]], false).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(h.metric("io_errors"), 3);
}

#[test]
fn malformed_requests_get_ioerr_and_the_device_goes_on() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    // Data not a multiple of the sector size.
    assert_eq!(h.read(0, 100).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[&[1u8; 513]], false).0,
        VIRTIO_BLK_S_IOERR
    );
    // A read whose data buffer is device-readable (wrong direction).
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 0, &[&[0u8; 512]], false).0,
        VIRTIO_BLK_S_IOERR
    );
    // A write whose data buffer is device-writable: the guest's data is never written to disk.
    let (st, _, _) = h.request(VIRTIO_BLK_T_OUT, 0, &[&[7u8; 512]], true);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert!(h.dev().disk().data.iter().all(|b| *b == 0));
    // A header of 8 bytes.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    let s = h.drv.alloc(1);
    h.drv.push_chain(&[(hd, 8, 0), (s, 1, W)]);
    h.kick();
    let used = h.drv.take_used();
    assert_eq!(used[0].len(), 1);
    assert_eq!(mem.read_obj::<u8>(s).unwrap(), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.metric("malformed"), 5);
    // Still works.
    assert_eq!(h.read(0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn chains_that_cannot_carry_a_status_are_returned_empty() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    // No device-writable byte at all.
    let hd = h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.drv.push_chain(&[(hd, HEADER_SIZE as u32, 0)]);
    // A buffer outside guest memory.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    h.drv.push_chain(&[
        (hd, HEADER_SIZE as u32, 0),
        (GuestAddress(test_utils_mem_end() - 256), 512, W),
        (GuestAddress(0x10_0000), 1, W),
    ]);
    // A length that wraps the address space.
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    h.drv.push_chain(&[
        (hd, HEADER_SIZE as u32, 0),
        (GuestAddress(u64::MAX - 10), 512, W),
        (GuestAddress(0x10_0000), 1, W),
    ]);
    // A descriptor that points at itself (loop).
    let hd = h.header(VIRTIO_BLK_T_IN, 0);
    h.drv
        .push_raw(&[(200, raw(hd.0, HEADER_SIZE as u32, NEXT, 200))], 200);
    h.kick();
    let used = h.drv.take_used();
    assert_eq!(used.len(), 4, "every chain comes back");
    assert!(used.iter().all(|u| u.len() == 0));
    assert_eq!(h.metric("no_status"), 1);
    assert_eq!(h.metric("bad_chain"), 3);
    assert!(h.dev().disk().data.iter().all(|b| *b == 0));
}

fn test_utils_mem_end() -> u64 {
    crate::virtio::test_utils::MEM_SIZE
}

#[test]
fn a_corrupt_ring_sets_needs_reset_and_stops_the_device() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    h.drv.set_avail_idx(QUEUE_SIZE * 3);
    h.kick();
    assert!(h.irq.needs_reset());
    assert_eq!(h.metric("queue_errors"), 1);
    // Further kicks do nothing and do not spin.
    h.kick();
    assert_eq!(h.metric("queue_errors"), 1);
    // Reset, reactivate: works again.
    let mut d = h.dev();
    d.reset();
    drop(d);
    h.kick();
    let drv2 = QueueDriver::new(&mem, QUEUE_SIZE);
    let irq = Interrupt::new().unwrap();
    h.dev()
        .activate(mem.clone(), vec![drv2.queue()], irq)
        .unwrap();
    pump(&mut h.em);
    h.drv = drv2;
    assert_eq!(h.read(0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn a_head_index_past_the_queue_marks_needs_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    h.drv.publish(QUEUE_SIZE + 5);
    h.kick();
    assert_eq!(h.metric("bad_chain"), 1);
    assert_eq!(h.metric("queue_errors"), 1);
    assert!(h.irq.needs_reset());
}

#[test]
fn kicks_after_a_reset_do_not_spin_the_event_loop() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    h.dev().reset();
    // pump() fails if the loop never goes idle.
    h.kick();
    h.kick();
    assert_eq!(h.metric("queue_events"), 2);
    assert!(h.drv.take_used().is_empty());
}

#[test]
fn a_file_disk_round_trips_and_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 8 * 512]).unwrap();
    let mut f = FileDisk::open(&path, false).unwrap();
    assert_eq!(f.len(), 4096);
    f.write_at(&pattern(512, 3), 1024).unwrap();
    f.flush().unwrap();
    let mut b = vec![0u8; 512];
    f.read_at(&mut b, 1024).unwrap();
    assert_eq!(b, pattern(512, 3));
    drop(f);
    assert_eq!(
        &std::fs::read(&path).unwrap()[1024..1536],
        &pattern(512, 3)[..]
    );
    // Through the device.
    let mem = test_mem();
    let drv = QueueDriver::new(&mem, QUEUE_SIZE);
    let dev = Arc::new(Mutex::new(Block::open(&path, true).unwrap()));
    assert_eq!(dev.lock().unwrap().sectors(), 8);
    let mut em = Em::new().unwrap();
    em.add_subscriber(dev.clone());
    dev.lock()
        .unwrap()
        .activate(mem.clone(), vec![drv.queue()], Interrupt::new().unwrap())
        .unwrap();
    pump(&mut em);
    assert!(
        FileDisk::open(&path, true)
            .unwrap()
            .write_at(&[1; 512], 0)
            .is_err(),
        "opened read-only"
    );
}

#[test]
fn bad_images_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    assert!(matches!(
        FileDisk::open(&missing, true),
        Err(BlockError::Open { .. })
    ));
    let small = dir.path().join("small.img");
    std::fs::write(&small, [0u8; 100]).unwrap();
    assert!(matches!(
        FileDisk::open(&small, true),
        Err(BlockError::NotADisk { .. })
    ));
    assert!(matches!(
        FileDisk::open(dir.path(), true),
        Err(BlockError::Open { .. } | BlockError::NotADisk { .. })
    ));
}
