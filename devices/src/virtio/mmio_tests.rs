// SPDX-License-Identifier: Apache-2.0
//! Tests of the virtio-mmio transport: register sequences a driver writes, and
//! the ones a hostile driver writes.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::virtio::status::*;
use crate::virtio::{INT_CONFIG, INT_USED_RING, VirtioError};

/// (size, ready, desc, avail, used, event_idx) of one queue at activation.
type QueueSeen = (u16, bool, u64, u64, u64, bool);

#[derive(Default)]
struct Fake {
    acked: Option<u64>,
    activations: Vec<Vec<QueueSeen>>,
    resets: usize,
    fail_activate: bool,
    active: bool,
    config: [u8; 8],
    config_writes: Vec<(u64, Vec<u8>)>,
}

const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        queues: Vec<VirtQueue>,
        _interrupt: Interrupt,
    ) -> Result<(), VirtioError> {
        self.activations.push(
            queues
                .iter()
                .map(|q| {
                    let s = &q.queue;
                    (
                        s.size(),
                        s.ready(),
                        s.desc_table(),
                        s.avail_ring(),
                        s.used_ring(),
                        s.event_idx_enabled(),
                    )
                })
                .collect(),
        );
        if self.fail_activate {
            return Err(VirtioError::QueueNotReady(0));
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = false;
    }
    fn is_activated(&self) -> bool {
        self.active
    }
}

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn setup() -> (MmioTransport, Arc<Mutex<Fake>>) {
    let f = Arc::new(Mutex::new(Fake {
        config: *b"cell0cfg",
        ..Fake::default()
    }));
    let t = MmioTransport::new(mem(), f.clone()).unwrap();
    (t, f)
}

fn r(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(off), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(u64::from(off), &v.to_le_bytes());
}

fn features(t: &mut MmioTransport) -> u64 {
    w(t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let lo = r(t, regs::VIRTIO_MMIO_DEVICE_FEATURES);
    w(t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let hi = r(t, regs::VIRTIO_MMIO_DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

fn ack(t: &mut MmioTransport, f: u64) {
    w(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
    w(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
}

fn status(t: &mut MmioTransport) -> u32 {
    r(t, regs::VIRTIO_MMIO_STATUS)
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
fn negotiate(t: &mut MmioTransport, f: u64) {
    w(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    ack(t, f);
    w(
        t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, i: u32, size: u32, base: u64) {
    w(t, regs::VIRTIO_MMIO_QUEUE_SEL, i);
    w(t, regs::VIRTIO_MMIO_QUEUE_NUM, size);
    let (d, a, u) = (base, base + 0x1000, base + 0x2000);
    w(t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, d as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_DESC_HIGH, (d >> 32) as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, a as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (a >> 32) as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, u as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_USED_HIGH, (u >> 32) as u32);
    w(t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
}

const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _) = setup();
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(features(&mut t), FAKE_FEATURES);
    w(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(t.queue_evts().len(), 2);
}

#[test]
fn full_driver_sequence_activates_with_the_configured_queues() {
    let (mut t, f) = setup();
    assert_eq!(status(&mut t), 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        f.lock().unwrap().acked,
        Some(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
    );
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(status(&mut t), ALL_OK);
    let fk = f.lock().unwrap();
    assert_eq!(
        fk.activations,
        vec![vec![
            (8, true, 0x1_0000, 0x1_1000, 0x1_2000, true),
            (8, false, 0, 0, 0, true)
        ]]
    );
    assert!(fk.active);
    drop(fk);
    // Queue registers still read back after activation, but no longer change.
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 1);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 4);
    assert_eq!(t.metrics().write_in_wrong_state.load(Ordering::Relaxed), 1);
    assert_eq!(t.metrics().activations.load(Ordering::Relaxed), 1);
}

#[test]
fn feature_negotiation_refuses_bad_sets() {
    for bad in [1 << 40, 0, 1] {
        let (mut t, f) = setup();
        // 0 and 1 lack VERSION_1; bit 40 was never offered.
        negotiate(
            &mut t,
            bad | if bad == 1 << 40 {
                VIRTIO_F_VERSION_1
            } else {
                0
            },
        );
        assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER, "features {bad:#x}");
        assert_eq!(f.lock().unwrap().acked, None);
        assert_eq!(t.metrics().features_rejected.load(Ordering::Relaxed), 1);
        // The driver may try again with a good set.
        ack(&mut t, VIRTIO_F_VERSION_1);
        w(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
        );
        assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }
    // A bit in a feature page past 1.
    let (mut t, _) = setup();
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    ack(&mut t, VIRTIO_F_VERSION_1);
    w(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 5);
    w(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    );
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER);
    // Features cannot change after FEATURES_OK.
    let (mut t, f) = setup();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    ack(&mut t, FAKE_FEATURES);
    assert_eq!(f.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1));
    assert!(t.metrics().write_in_wrong_state.load(Ordering::Relaxed) >= 1);
}

#[test]
fn status_machine_abuse_is_ignored() {
    let (mut t, f) = setup();
    // DRIVER_OK before anything, and before FEATURES_OK.
    w(&mut t, regs::VIRTIO_MMIO_STATUS, DRIVER_OK);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(status(&mut t), 0);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
    );
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(status(&mut t), ACKNOWLEDGE);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    w(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
    );
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER);
    // Clearing a bit without a full reset.
    w(&mut t, regs::VIRTIO_MMIO_STATUS, DRIVER);
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER);
    assert_eq!(t.metrics().invalid_status.load(Ordering::Relaxed), 6);
    assert!(f.lock().unwrap().activations.is_empty());
    // FAILED is always accepted; nothing but reset leaves it.
    w(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FAILED,
    );
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER | FAILED);
    w(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
    );
    assert_eq!(status(&mut t), ACKNOWLEDGE | DRIVER | FAILED);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(status(&mut t), 0);
    assert_eq!(f.lock().unwrap().resets, 1);
}

#[test]
fn queue_setup_errors_end_in_needs_reset() {
    type Break = fn(&mut MmioTransport);
    let cases: [(&str, Break); 5] = [
        ("size past max", |t| w(t, regs::VIRTIO_MMIO_QUEUE_NUM, 32)),
        ("size not a power of two", |t| {
            w(t, regs::VIRTIO_MMIO_QUEUE_NUM, 6)
        }),
        ("misaligned desc", |t| {
            w(t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1_0008)
        }),
        ("misaligned used", |t| {
            w(t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, 0x1_2002)
        }),
        ("ring outside memory", |t| {
            w(t, regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 1)
        }),
    ];
    for (what, brk) in cases {
        let (mut t, f) = setup();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 0);
        brk(&mut t);
        w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(status(&mut t), ALL_OK | NEEDS_RESET, "{what}");
        assert!(f.lock().unwrap().activations.is_empty(), "{what}");
        assert_ne!(
            r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG,
            0
        );
        // Reset clears it and the device can be set up again.
        w(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(status(&mut t), 0);
        assert_eq!(r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
        assert_eq!(status(&mut t), ALL_OK, "{what}");
    }
}

#[test]
fn queue_writes_outside_setup_are_ignored() {
    let (mut t, _) = setup();
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 4);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(t.metrics().write_in_wrong_state.load(Ordering::Relaxed), 2);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 9);
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 4);
    assert_eq!(t.metrics().invalid_queue_config.load(Ordering::Relaxed), 1);
}

#[test]
fn failed_activation_sets_needs_reset() {
    let (mut t, f) = setup();
    f.lock().unwrap().fail_activate = true;
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x1_0000);
    assert!(!t.interrupt().needs_reset());
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(status(&mut t), ALL_OK | NEEDS_RESET);
    assert!(t.irqfd().read().is_ok(), "the driver is told by interrupt");
    // Echoing NEEDS_RESET back is not a transition.
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK | NEEDS_RESET);
    assert_eq!(t.metrics().invalid_status.load(Ordering::Relaxed), 0);
}

#[test]
fn config_space_any_width_and_out_of_range() {
    let (mut t, f) = setup();
    let mut b8 = [0u8; 8];
    t.read(0x100, &mut b8);
    assert_eq!(&b8, b"cell0cfg");
    let mut b2 = [0u8; 2];
    t.read(0x106, &mut b2);
    assert_eq!(&b2, b"fg");
    let mut b1 = [0xffu8; 1];
    t.read(0x108, &mut b1);
    assert_eq!(b1, [0]);
    let mut b4 = [0xffu8; 4];
    t.read(0xffc, &mut b4);
    assert_eq!(b4, [0; 4]);
    // Writes before DRIVER are refused, after it forwarded.
    t.write(0x100, &[1, 2]);
    assert!(f.lock().unwrap().config_writes.is_empty());
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
    t.write(0x104, &[1, 2]);
    assert_eq!(f.lock().unwrap().config_writes, vec![(4, vec![1, 2])]);
}

#[test]
fn bad_register_widths_and_offsets() {
    let (mut t, _) = setup();
    let mut b2 = [0xffu8; 2];
    t.read(0, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    t.read(2, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.read(0x18, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.write(0x70, &[1]);
    t.write(0x71, &[1, 0, 0, 0]);
    t.write(0, &[1, 0, 0, 0]);
    assert_eq!(status(&mut t), 0);
    assert_eq!(t.metrics().invalid_access.load(Ordering::Relaxed), 6);
}

#[test]
fn interrupts_ack_and_config_generation() {
    let (mut t, _) = setup();
    let irq = t.interrupt().clone();
    irq.signal_used_queue().unwrap();
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_USED_RING);
    assert_eq!(t.irqfd().read().unwrap(), 1);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_CONFIG_GENERATION), 0);
    irq.signal_config_change().unwrap();
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_CONFIG_GENERATION), 1);
    assert_eq!(
        r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS),
        INT_USED_RING | INT_CONFIG
    );
    w(&mut t, regs::VIRTIO_MMIO_INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), INT_CONFIG);
    w(&mut t, regs::VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let (mut t, _) = setup();
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err());
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert_eq!(t.metrics().invalid_notify.load(Ordering::Relaxed), 1);
    assert_eq!(NOTIFY_REG_OFFSET, 0x50);
}

#[test]
fn vsock_through_the_transport_end_to_end() {
    use crate::virtio::vsock::test_utils::{GUEST_CID, GuestDriver, TestBackend, hdr, test_mem};
    use crate::virtio::vsock::{Vsock, uapi::VSOCK_OP_RW};
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    let mem = test_mem();
    let mut drv = GuestDriver::new(&mem);
    let dev = Arc::new(Mutex::new(
        Vsock::with_backend(GUEST_CID, TestBackend::new(), Default::default()).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    let mut cid = [0u8; 8];
    t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    for i in 0..3u32 {
        let (d, a, u) = drv.ring_addrs(i as usize);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, i);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 256);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, d as u32);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, a as u32);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, u as u32);
        w(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
    assert_eq!(status(&mut t), ALL_OK);
    drv.send(hdr(VSOCK_OP_RW, 1, 2), b"via mmio");
    // The guest's QueueNotify write (no KVM ioeventfd here, so the transport forwards it).
    w(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    while em.run_with_timeout(0).unwrap() > 0 {}
    assert_eq!(drv.tx_used(), 1);
    assert_eq!(dev.lock().unwrap().backend().tx[0].data, b"via mmio");
    assert_ne!(
        r(&mut t, regs::VIRTIO_MMIO_INTERRUPT_STATUS) & INT_USED_RING,
        0
    );
    // A driver reset reaches the device and its backend.
    w(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert!(!dev.lock().unwrap().is_activated());
    assert_eq!(dev.lock().unwrap().backend().resets, 1);
}

fn reg_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..0x40).prop_map(|x| x * 4),
        1 => 0u64..0x1000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn random_register_sequences_never_panic(
        accesses in proptest::collection::vec(
            (reg_offset(), prop_oneof![Just(4usize), 1usize..9], any::<u32>(), any::<bool>(),
             prop_oneof![Just(0u32), Just(1), Just(3), Just(7), Just(11), Just(15), any::<u32>()]),
            1..80,
        )
    ) {
        let (mut t, _f) = setup();
        for (off, width, v, is_write, st) in accesses {
            let mut buf = vec![0u8; width];
            if is_write {
                // Bias status writes towards the real bits so the machine moves.
                let v = if off == u64::from(regs::VIRTIO_MMIO_STATUS) { st } else { v };
                buf.iter_mut().zip(v.to_le_bytes().iter().cycle()).for_each(|(b, s)| *b = *s);
                t.write(off, &buf);
            } else {
                t.read(off, &mut buf);
            }
            prop_assert_eq!(r(&mut t, regs::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
            let s = status(&mut t) & !(NEEDS_RESET | FAILED);
            prop_assert!(
                [0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK, ALL_OK]
                    .contains(&s),
                "status {:#x}", s
            );
        }
    }
}

/// Counts the tracing events emitted on the thread it is the default of.
struct CountEvents(Arc<std::sync::atomic::AtomicUsize>);

impl tracing::Subscriber for CountEvents {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs `f` and returns how many log events it emitted on this thread.
fn log_events(f: impl FnOnce()) -> usize {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tracing::subscriber::with_default(CountEvents(n.clone()), f);
    n.load(Ordering::Relaxed)
}

fn logged_out_of(n: u64) -> usize {
    (1..=n).filter(|&k| crate::virtio::log_decision(k)).count()
}

#[test]
fn a_flood_of_guest_errors_is_counted_exactly_and_logged_at_a_bounded_rate() {
    // Notifies of a queue that does not exist, in a loop.
    let (mut t, _) = setup();
    let events = log_events(|| {
        for _ in 0..10_000 {
            w(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        }
    });
    assert_eq!(t.metrics().invalid_notify.load(Ordering::Relaxed), 10_000);
    // 1..=8, then 16, 32, ..., 8192.
    assert_eq!(logged_out_of(10_000), 18);
    assert_eq!(events, 18);

    // Reset, rings outside guest memory, DRIVER_OK: NEEDS_RESET each time.
    // (virtio-queue's own `is_valid` would log an ERROR line per round.)
    let (mut t, _) = setup();
    let events = log_events(|| {
        for _ in 0..1000 {
            w(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, 8, 0x1_0000_0000);
            w(&mut t, regs::VIRTIO_MMIO_STATUS, ALL_OK);
            assert_eq!(status(&mut t), ALL_OK | NEEDS_RESET);
        }
    });
    assert_eq!(t.metrics().needs_reset.load(Ordering::Relaxed), 1000);
    // The transport's line and the interrupt's "needs a reset" line, each limited.
    assert_eq!(events, 2 * logged_out_of(1000));
    assert!(events <= 30, "{events}");
}
