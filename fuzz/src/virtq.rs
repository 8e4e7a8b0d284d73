// SPDX-License-Identifier: Apache-2.0
//! Target `virtq`: descriptor chains through our devices.
//!
//! The device is set up by a correct driver; then each round the input writes
//! descriptors (any address, length, flags and next index: loops, overlaps,
//! out-of-bounds and indirect tables included), request headers at those
//! buffers (vsock packet headers or blk request headers, or raw bytes),
//! publishes heads (or corrupts the avail index) and kicks a queue. Checks: no
//! panic; and while no buffer overlaps the rings (a guest that points the
//! device's data writes at its own used ring gets a scrambled ring, which is
//! its business), every used element names a descriptor inside the queue and,
//! with an honest avail index, the used index never moves by more than what
//! was made available (plus the chains still outstanding).

use arbitrary::Unstructured;
use cell0_devices::virtio::vsock::packet::Header;
use cell0_devices::virtio::vsock::uapi::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use crate::rig::{DATA_BASE, GUEST_CID, Kind, MEM_SIZE, Rig, ring_addrs, write_vsock_header};

/// Most rounds per input.
pub const MAX_ROUNDS: usize = 32;
/// Most descriptors written per round.
pub const MAX_DESCS: usize = 16;

fn addr(u: &mut Unstructured<'_>) -> arbitrary::Result<u64> {
    Ok(match u.int_in_range(0u8..=9)? {
        // Mostly inside the data area, 16-byte aligned.
        0..=6 => DATA_BASE + 16 * u64::from(u.int_in_range(0u32..=0x7fff)?),
        // The rings themselves, the end of memory, or anything.
        7 => u.int_in_range(0..=MEM_SIZE)?,
        8 => MEM_SIZE - u64::from(u.int_in_range(0u8..=64)?),
        _ => u.arbitrary()?,
    })
}

fn len(u: &mut Unstructured<'_>) -> arbitrary::Result<u32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=4 => u.int_in_range(0u32..=512)?,
        5 => *u.choose(&[16u32, 44, 512, 4096, 65536])?,
        _ => u.arbitrary()?,
    })
}

fn flags(u: &mut Unstructured<'_>) -> arbitrary::Result<u16> {
    Ok(if u.ratio(7, 8)? {
        let mut f = 0;
        if u.arbitrary()? {
            f |= VRING_DESC_F_NEXT as u16;
        }
        if u.arbitrary()? {
            f |= VRING_DESC_F_WRITE as u16;
        }
        if u.ratio(1, 8)? {
            f |= VRING_DESC_F_INDIRECT as u16;
        }
        f
    } else {
        u.arbitrary()?
    })
}

/// A plausible request at `at` for `kind`, so chains get past header parsing.
fn request(rig: &Rig, kind: Kind, u: &mut Unstructured<'_>, at: u64) -> arbitrary::Result<()> {
    match kind {
        Kind::Vsock => {
            let h = Header {
                src_cid: if u.ratio(7, 8)? {
                    GUEST_CID
                } else {
                    u.arbitrary()?
                },
                dst_cid: if u.ratio(7, 8)? { 2 } else { u.arbitrary()? },
                src_port: u.int_in_range(1000u32..=1003)?,
                dst_port: *u.choose(&[1024u32, 5000, 1025, u32::MAX])?,
                len: len(u)?,
                type_: if u.ratio(7, 8)? {
                    VSOCK_TYPE_STREAM
                } else {
                    u.arbitrary()?
                },
                op: u.int_in_range(0u16..=8)?,
                flags: u.int_in_range(0u32..=3)?,
                buf_alloc: u.arbitrary()?,
                fwd_cnt: u.arbitrary()?,
            };
            write_vsock_header(&rig.mem, at, &h);
        }
        Kind::Blk | Kind::BlkRo => {
            // struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
            let t: u32 = *u.choose(&[0u32, 1, 4, 8, 11, 13, 99])?;
            let sector: u64 = if u.ratio(3, 4)? {
                u.int_in_range(0u64..=70)?
            } else {
                u.arbitrary()?
            };
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&t.to_le_bytes());
            b[8..].copy_from_slice(&sector.to_le_bytes());
            let _ = rig.mem.write_slice(&b, GuestAddress(at));
        }
        Kind::Rng => {}
    }
    Ok(())
}

/// Whether `[addr, addr + len)` overlaps the rings of any of the `nq` queues.
fn hits_rings(addr: u64, len: u64, nq: usize) -> bool {
    let end = addr.saturating_add(len);
    (0..nq).any(|q| {
        let (d, _, u) = ring_addrs(q);
        addr < u + 0x1000 && end > d
    })
}

fn round(
    rig: &mut Rig,
    kind: Kind,
    u: &mut Unstructured<'_>,
    clobbered: &mut bool,
) -> arbitrary::Result<()> {
    let nq = rig.sizes.len();
    if nq == 0 {
        return Ok(());
    }
    let q = u.int_in_range(0..=nq - 1)?;
    let size = rig.sizes[q];
    let n = u.int_in_range(1..=MAX_DESCS)?;
    let mut heads = Vec::new();
    for _ in 0..n {
        let i = if u.ratio(15, 16)? {
            u.int_in_range(0..=size - 1)?
        } else {
            u.arbitrary()?
        };
        let a = addr(u)?;
        let l = len(u)?;
        let f = flags(u)?;
        let next = if u.ratio(7, 8)? {
            u.int_in_range(0..=size - 1)?
        } else {
            u.arbitrary()?
        };
        rig.write_desc(q, i, a, l, f, next);
        // A buffer over the rings (directly, or through an indirect table the
        // harness does not follow) lets the device's own data writes rewrite
        // the used ring: the guest asked for that, and the ring checks below
        // stop meaning anything.
        // So does a descriptor index past the table: its 16 bytes land on the
        // avail or used ring. (Request headers are written at `a`: 64 bytes.)
        if i >= size
            || hits_rings(a, u64::from(l).max(64), nq)
            || f & VRING_DESC_F_INDIRECT as u16 != 0
        {
            *clobbered = true;
        }
        if u.ratio(1, 2)? {
            request(rig, kind, u, a)?;
        }
        if u.ratio(1, 3)? {
            heads.push(i);
        }
    }
    if u.ratio(1, 16)? {
        // A raw write anywhere: into the rings, an indirect table, a buffer.
        let at = u.int_in_range(0..=MEM_SIZE - 1)?;
        let k = u.int_in_range(0usize..=64)?;
        let bytes = u.bytes(k.min(u.len()))?;
        let _ = rig.mem.write_slice(bytes, GuestAddress(at));
        *clobbered = true;
    }
    let before_avail = rig.avail_idx[q];
    for h in heads {
        rig.publish(q, h);
    }
    let corrupted = u.ratio(1, 16)?;
    if corrupted {
        let idx = u.arbitrary()?;
        rig.set_avail_idx(q, idx);
    }
    let used_before = rig.used_idx(q);
    rig.kick(q as u32);
    // Give the RX side of vsock a chance to deliver what the backend queued.
    if kind == Kind::Vsock && u.ratio(1, 2)? {
        rig.kick(0);
    }
    let used = rig.take_used(q);
    if *clobbered {
        return Ok(());
    }
    for (id, _len) in used {
        assert!(
            id < u32::from(size),
            "used id {id} outside queue {q} of size {size}"
        );
    }
    if !corrupted && !rig.needs_reset() {
        let published = rig.avail_idx[q].wrapping_sub(before_avail);
        let consumed = rig.used_idx(q).wrapping_sub(used_before);
        // Earlier rounds may have left chains the device only now completes.
        assert!(
            consumed <= published.wrapping_add(size),
            "queue {q}: used index moved by {consumed}, only {published} made available"
        );
    }
    Ok(())
}

/// The target.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(k) = u.arbitrary::<u8>() else {
        return;
    };
    let kind = Kind::from_byte(k);
    let mut rig = Rig::new(kind);
    let mask = if u.ratio(3, 4).unwrap_or(true) {
        u64::MAX
    } else {
        u.arbitrary().unwrap_or(u64::MAX)
    };
    let size = *u.choose(&[8u16, 16, 256, 1, 2]).unwrap_or(&16);
    rig.init(mask, size);
    let mut clobbered = false;
    for _ in 0..MAX_ROUNDS {
        if u.is_empty() || round(&mut rig, kind, &mut u, &mut clobbered).is_err() {
            break;
        }
    }
}
