// SPDX-License-Identifier: Apache-2.0
//! Target `mmio`: virtio-mmio register access sequences against each device.
//!
//! The input picks a device, then a list of guest actions: register reads and
//! writes of any width at any offset of the 4 KiB window (biased to the real
//! registers and status values), raw guest-memory writes (so rings and buffers
//! can take any shape), queue set-ups, kicks and event-loop runs. Beyond "never
//! panics" it checks what the transport promises: the identity registers never
//! change and the status register only ever holds a prefix of the driver
//! sequence (plus NEEDS_RESET/FAILED).

use arbitrary::Unstructured;
use cell0_devices::BusDevice;
use cell0_devices::virtio::mmio::{MMIO_MAGIC, MMIO_VERSION};
use cell0_devices::virtio::status::*;
use virtio_bindings::virtio_mmio as regs;
use vm_memory::{Bytes, GuestAddress};

use crate::rig::{Kind, MEM_SIZE, Rig};

/// Most actions per input.
pub const MAX_OPS: usize = 256;

const REGS: [u32; 24] = [
    regs::VIRTIO_MMIO_MAGIC_VALUE,
    regs::VIRTIO_MMIO_VERSION,
    regs::VIRTIO_MMIO_DEVICE_ID,
    regs::VIRTIO_MMIO_VENDOR_ID,
    regs::VIRTIO_MMIO_DEVICE_FEATURES,
    regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    regs::VIRTIO_MMIO_DRIVER_FEATURES,
    regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    regs::VIRTIO_MMIO_QUEUE_SEL,
    regs::VIRTIO_MMIO_QUEUE_NUM_MAX,
    regs::VIRTIO_MMIO_QUEUE_NUM,
    regs::VIRTIO_MMIO_QUEUE_READY,
    regs::VIRTIO_MMIO_QUEUE_NOTIFY,
    regs::VIRTIO_MMIO_INTERRUPT_STATUS,
    regs::VIRTIO_MMIO_INTERRUPT_ACK,
    regs::VIRTIO_MMIO_STATUS,
    regs::VIRTIO_MMIO_QUEUE_DESC_LOW,
    regs::VIRTIO_MMIO_QUEUE_DESC_HIGH,
    regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    regs::VIRTIO_MMIO_QUEUE_USED_LOW,
    regs::VIRTIO_MMIO_QUEUE_USED_HIGH,
    regs::VIRTIO_MMIO_CONFIG_GENERATION,
    regs::VIRTIO_MMIO_CONFIG,
];

const STATUSES: [u32; 8] = [
    0,
    ACKNOWLEDGE,
    ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ACKNOWLEDGE | DRIVER | DRIVER_OK,
    FAILED,
    NEEDS_RESET,
];

const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

fn offset(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    Ok(if u.ratio(7, 8)? {
        let r = *u.choose(&REGS)?;
        // Sometimes a byte or two inside the register.
        u64::from(r) + u64::from(u.int_in_range(0u8..=3)? * u8::from(u.ratio(1, 8)?))
    } else {
        u.int_in_range(0u64..=0xfff)?
    })
}

fn value(u: &mut Unstructured<'_>, off: u64) -> arbitrary::Result<u64> {
    Ok(
        if off == u64::from(regs::VIRTIO_MMIO_STATUS) && u.ratio(3, 4)? {
            u64::from(*u.choose(&STATUSES)?)
        } else if u.ratio(1, 2)? {
            u.int_in_range(0u64..=1024)?
        } else {
            u.arbitrary()?
        },
    )
}

fn actions(rig: &mut Rig, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=9)? {
            0..=3 => {
                let off = offset(u)?;
                let width = *u.choose(&[4usize, 4, 4, 1, 2, 8, 3])?;
                let v = value(u, off)?;
                rig.transport.write(off, &v.to_le_bytes()[..width]);
            }
            4 | 5 => {
                let off = offset(u)?;
                let width = *u.choose(&[4usize, 4, 1, 2, 8])?;
                let mut b = [0u8; 8];
                rig.transport.read(off, &mut b[..width]);
            }
            6 => {
                let addr = u.int_in_range(0..=MEM_SIZE - 1)?;
                let len = u.int_in_range(0usize..=64)?;
                let bytes = u.bytes(len.min(u.len()))?;
                let _ = rig.mem.write_slice(bytes, GuestAddress(addr));
            }
            7 => {
                let q = u.int_in_range(0usize..=3)?;
                let size = u.int_in_range(0u16..=512)?;
                rig.setup_queue(q, size);
            }
            8 => {
                let q = u.int_in_range(0u32..=4)?;
                rig.kick(q);
            }
            _ => rig.pump(),
        }
        check(rig);
    }
    Ok(())
}

fn check(rig: &mut Rig) {
    assert_eq!(rig.r(regs::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(rig.r(regs::VIRTIO_MMIO_VERSION), MMIO_VERSION);
    let s = rig.r(regs::VIRTIO_MMIO_STATUS) & !(NEEDS_RESET | FAILED);
    assert!(
        [
            0,
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            ALL_OK
        ]
        .contains(&s),
        "status {s:#x} is not a prefix of the driver sequence"
    );
}

/// The target.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(kind) = u.arbitrary::<u8>() else {
        return;
    };
    let mut rig = Rig::new(Kind::from_byte(kind));
    // Half the inputs start from a fully initialised device, so actions reach
    // the queues without having to discover the whole driver sequence.
    if u.arbitrary::<bool>().unwrap_or(false) {
        let size = u.int_in_range(1u16..=256).unwrap_or(16);
        rig.init(u64::MAX, size);
    }
    let _ = actions(&mut rig, &mut u);
    rig.pump();
    check(&mut rig);
}
