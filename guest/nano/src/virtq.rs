// SPDX-License-Identifier: Apache-2.0
//! The driver side of a virtio split virtqueue (virtio 1.2 §2.7): the ring
//! layout, the descriptor free list, the event-index test, and [`Virtq`],
//! which adds buffers to the available ring and takes them off the used ring.
//!
//! The rings live in memory the device reads and writes (guest RAM that the
//! VMM maps), so every access to them is volatile, with fences where the spec
//! orders them. Index arithmetic is modulo 2^16 throughout.

use core::ptr::{self, addr_of, addr_of_mut};
use core::sync::atomic::{Ordering, fence};

/// Descriptor flag: the buffer continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (else it reads it).
pub const DESC_F_WRITE: u16 = 2;

/// Feature bit: the device and driver use `used_event`/`avail_event`.
pub const F_EVENT_IDX: u32 = 29;
/// Feature bit: a virtio 1.x (non-legacy) device.
pub const F_VERSION_1: u32 = 32;

/// One descriptor of the descriptor table.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// The next descriptor when `DESC_F_NEXT` is set.
    pub next: u16,
}

/// The available ring (driver to device) of a queue of `N` entries.
#[repr(C, align(2))]
pub struct Avail<const N: usize> {
    /// Flags (none used: interrupt suppression goes through `used_event`).
    pub flags: u16,
    /// Where the driver puts the next entry (free-running).
    pub idx: u16,
    /// Heads of the chains made available.
    pub ring: [u16; N],
    /// With EVENT_IDX: interrupt me once the used index passes this.
    pub used_event: u16,
}

/// One used-ring element.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// Head of the chain the device used.
    pub id: u32,
    /// Bytes the device wrote into it.
    pub len: u32,
}

/// The used ring (device to driver) of a queue of `N` entries.
#[repr(C, align(4))]
pub struct Used<const N: usize> {
    /// Flags (`VRING_USED_F_NO_NOTIFY` without EVENT_IDX).
    pub flags: u16,
    /// Where the device puts the next entry (free-running).
    pub idx: u16,
    /// Used chains.
    pub ring: [UsedElem; N],
    /// With EVENT_IDX: notify me once the avail index passes this.
    pub avail_event: u16,
}

/// The memory of one queue: descriptor table, available and used rings.
#[repr(C, align(4096))]
pub struct QueueMem<const N: usize> {
    /// Descriptor table (16-byte aligned).
    pub desc: [Desc; N],
    /// Available ring (2-byte aligned).
    pub avail: Avail<N>,
    /// Used ring (4-byte aligned).
    pub used: Used<N>,
}

impl<const N: usize> QueueMem<N> {
    /// All zero: what the rings must hold before the device is told about them.
    pub const fn new() -> Self {
        Self {
            desc: [Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; N],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; N],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; N],
                avail_event: 0,
            },
        }
    }
}

impl<const N: usize> Default for QueueMem<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes of the descriptor table of a queue of `n` entries.
pub const fn desc_table_size(n: usize) -> usize {
    16 * n
}

/// Bytes of the available ring, `used_event` included.
pub const fn avail_ring_size(n: usize) -> usize {
    6 + 2 * n
}

/// Bytes of the used ring, `avail_event` included.
pub const fn used_ring_size(n: usize) -> usize {
    6 + 8 * n
}

/// `vring_need_event`: whether moving an index from `old` to `new` crossed
/// `event`, i.e. `event` lies in `[old, new)` modulo 2^16.
pub const fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A stack of free descriptor indices.
#[derive(Debug, Clone)]
pub struct FreeList<const N: usize> {
    stack: [u16; N],
    len: usize,
}

impl<const N: usize> FreeList<N> {
    /// Every index `0..N` free.
    pub const fn full() -> Self {
        let mut stack = [0u16; N];
        let mut i = 0;
        while i < N {
            // Pop order 0, 1, 2, ...
            stack[i] = (N - 1 - i) as u16;
            i += 1;
        }
        Self { stack, len: N }
    }

    /// Free indices.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether none is free.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes a free index.
    pub fn pop(&mut self) -> Option<u16> {
        self.len = self.len.checked_sub(1)?;
        Some(self.stack[self.len])
    }

    /// Returns an index. Panics when more are returned than exist (a
    /// driver bug: a chain freed twice).
    pub fn push(&mut self, i: u16) {
        assert!(
            self.len < N && usize::from(i) < N,
            "virtq: descriptor freed twice"
        );
        self.stack[self.len] = i;
        self.len += 1;
    }
}

/// One buffer of a chain: address, length, whether the device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest-physical address (= our virtual address: identity map).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Why a used-ring entry cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedError {
    /// The device returned a head that is out of range or not in flight.
    BadId(u32),
}

/// The driver's view of one split virtqueue of `N` entries over a
/// [`QueueMem`] it owns.
pub struct Virtq<const N: usize> {
    mem: *mut QueueMem<N>,
    free: FreeList<N>,
    /// Descriptors per in-flight head (0 = not in flight).
    chain_len: [u16; N],
    /// Our copy of `avail.idx` (the next slot to fill).
    avail_idx: u16,
    /// `avail_idx` at the last notification decision.
    kicked_idx: u16,
    /// The next used-ring slot we have not consumed.
    last_used: u16,
    event_idx: bool,
}

// SAFETY: the queue memory is owned by this value (see `new`).
unsafe impl<const N: usize> Send for Virtq<N> {}

impl<const N: usize> Virtq<N> {
    const SIZE_OK: () = assert!(N.is_power_of_two() && N <= 32768);

    /// Takes over the rings at `mem`, zeroing them.
    ///
    /// # Safety
    /// `mem` must be valid for the life of the queue, used by nothing but
    /// this value and the device it is given to, and at a guest-physical
    /// address equal to its virtual one.
    pub unsafe fn new(mem: *mut QueueMem<N>, event_idx: bool) -> Self {
        let () = Self::SIZE_OK;
        // SAFETY: the caller hands `mem` over; QueueMem is plain data for
        // which all-zero bytes are valid.
        unsafe { ptr::write_bytes(mem, 0, 1) };
        Self {
            mem,
            free: FreeList::full(),
            chain_len: [0; N],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
        }
    }

    /// Queue size.
    pub const fn size(&self) -> u16 {
        N as u16
    }

    /// Guest-physical addresses of the descriptor table, available and used rings.
    pub fn addresses(&self) -> (u64, u64, u64) {
        // SAFETY: only addresses are formed.
        unsafe {
            (
                addr_of!((*self.mem).desc) as u64,
                addr_of!((*self.mem).avail) as u64,
                addr_of!((*self.mem).used) as u64,
            )
        }
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self) -> usize {
        N - self.free.len()
    }

    /// Writes a chain of `bufs` into the descriptor table and puts its head on
    /// the available ring (not yet visible to the device: see [`Self::publish`]).
    /// `None`, with nothing changed, when too few descriptors are free.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let mut head = None;
        let mut prev: Option<u16> = None;
        for b in bufs {
            let i = self.free.pop()?;
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.write { DESC_F_WRITE } else { 0 },
                next: 0,
            };
            // SAFETY: `i < N`; the descriptor is free, so the device does not read it.
            unsafe { ptr::write_volatile(addr_of_mut!((*self.mem).desc[usize::from(i)]), d) };
            match prev {
                None => head = Some(i),
                Some(p) => {
                    // SAFETY: `p < N`, ours until published.
                    unsafe {
                        let pd = addr_of_mut!((*self.mem).desc[usize::from(p)]);
                        ptr::write_volatile(addr_of_mut!((*pd).flags), (*pd).flags | DESC_F_NEXT);
                        ptr::write_volatile(addr_of_mut!((*pd).next), i);
                    }
                }
            }
            prev = Some(i);
        }
        let head = head?;
        self.chain_len[usize::from(head)] = bufs.len() as u16;
        let slot = usize::from(self.avail_idx) % N;
        // SAFETY: `slot < N`; the device reads ring slots only below avail.idx,
        // which we have not moved yet.
        unsafe { ptr::write_volatile(addr_of_mut!((*self.mem).avail.ring[slot]), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(head)
    }

    /// Makes every pushed chain visible to the device (writes `avail.idx`).
    pub fn publish(&mut self) {
        // The descriptors and ring slots must be visible before the index.
        fence(Ordering::Release);
        // SAFETY: `avail.idx` is ours to write.
        unsafe { ptr::write_volatile(addr_of_mut!((*self.mem).avail.idx), self.avail_idx) };
    }

    /// Whether the device wants a notification for what was published since
    /// the last call (always true without EVENT_IDX, when anything was
    /// published).
    pub fn needs_kick(&mut self) -> bool {
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if old == new {
            return false;
        }
        // The index write must be visible before we read the device's event.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            // SAFETY: reading the device-written flags.
            let flags = unsafe { ptr::read_volatile(addr_of!((*self.mem).used.flags)) };
            return flags & 1 == 0;
        }
        // SAFETY: reading the device-written avail_event.
        let event = unsafe { ptr::read_volatile(addr_of!((*self.mem).used.avail_event)) };
        need_event(event, new, old)
    }

    /// Whether the device has returned a chain we have not taken yet.
    pub fn has_used(&self) -> bool {
        // SAFETY: reading the device-written index.
        let idx = unsafe { ptr::read_volatile(addr_of!((*self.mem).used.idx)) };
        idx != self.last_used
    }

    /// Takes the next used chain: its head and the bytes the device wrote.
    /// Its descriptors go back to the free list.
    pub fn pop_used(&mut self) -> Option<Result<(u16, u32), UsedError>> {
        if !self.has_used() {
            return None;
        }
        // The element must be read after the index that covers it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used) % N;
        // SAFETY: `slot < N`; the device wrote this element before moving idx.
        let e = unsafe { ptr::read_volatile(addr_of!((*self.mem).used.ring[slot])) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(self.free_chain(e.id).map(|head| (head, e.len)))
    }

    fn free_chain(&mut self, id: u32) -> Result<u16, UsedError> {
        let head = usize::try_from(id).ok().filter(|h| *h < N);
        let Some(head) = head.filter(|h| self.chain_len[*h] != 0) else {
            return Err(UsedError::BadId(id));
        };
        let mut i = head as u16;
        for _ in 0..self.chain_len[head] {
            // SAFETY: `i < N` (we wrote the chain); the device is done with it.
            let d = unsafe { ptr::read_volatile(addr_of!((*self.mem).desc[usize::from(i)])) };
            self.free.push(i);
            i = d.next;
        }
        self.chain_len[head] = 0;
        Ok(head as u16)
    }

    /// The descriptor `i` as we wrote it (for finding a used buffer's address).
    pub fn desc(&self, i: u16) -> Desc {
        // SAFETY: `i % N < N`; descriptors are only read.
        unsafe { ptr::read_volatile(addr_of!((*self.mem).desc[usize::from(i) % N])) }
    }

    /// With EVENT_IDX: asks for an interrupt once `ahead` more chains have
    /// been used (1 = the next one). 0 means "not for a long while": half
    /// the index space ahead, which we refresh long before it comes round.
    pub fn set_used_event(&mut self, ahead: u16) {
        let ev = if ahead == 0 {
            self.last_used.wrapping_add(0x7fff)
        } else {
            self.last_used.wrapping_add(ahead - 1)
        };
        // SAFETY: `used_event` is ours to write.
        unsafe { ptr::write_volatile(addr_of_mut!((*self.mem).avail.used_event), ev) };
        // The device must see it before we look at the used index again.
        fence(Ordering::SeqCst);
    }

    /// The used index we will consume next.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn ring_layout_matches_the_spec() {
        assert_eq!(size_of::<Desc>(), 16);
        assert_eq!(offset_of!(Avail<256>, ring), 4);
        assert_eq!(offset_of!(Avail<256>, used_event), avail_ring_size(256) - 2);
        assert_eq!(offset_of!(Used<256>, ring), 4);
        assert_eq!(offset_of!(Used<256>, avail_event), used_ring_size(256) - 2);
        assert_eq!(offset_of!(QueueMem<256>, avail), desc_table_size(256));
        assert_eq!(offset_of!(QueueMem<8>, used) % 4, 0);
        assert_eq!(align_of::<QueueMem<8>>(), 4096);
    }

    #[test]
    fn need_event_handles_wraparound() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(need_event(0, 2, 0xfffe));
        assert!(!need_event(2, 2, 0xfffe));
        assert!(!need_event(0xfffd, 2, 0xfffe));
    }

    #[test]
    fn free_list_pops_in_order_and_refuses_extra_pushes() {
        let mut f = FreeList::<4>::full();
        assert_eq!((f.pop(), f.pop()), (Some(0), Some(1)));
        f.push(0);
        assert_eq!(f.pop(), Some(0));
        assert_eq!((f.pop(), f.pop(), f.pop()), (Some(2), Some(3), None));
        assert!(f.is_empty());
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn free_list_catches_double_free() {
        let mut f = FreeList::<2>::full();
        f.push(1);
    }

    /// A minimal device on the other side of the rings.
    struct Dev<const N: usize> {
        mem: *mut QueueMem<N>,
        next_avail: u16,
        used_idx: u16,
    }

    impl<const N: usize> Dev<N> {
        /// Takes the next available chain: its head and descriptors.
        fn take(&mut self) -> Option<(u16, Vec<Desc>)> {
            // SAFETY: test memory, single-threaded.
            unsafe {
                if (*self.mem).avail.idx == self.next_avail {
                    return None;
                }
                let head = (*self.mem).avail.ring[usize::from(self.next_avail) % N];
                self.next_avail = self.next_avail.wrapping_add(1);
                let mut out = vec![];
                let mut i = head;
                loop {
                    let d = (*self.mem).desc[usize::from(i)];
                    out.push(d);
                    if d.flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    i = d.next;
                }
                Some((head, out))
            }
        }

        fn give(&mut self, head: u16, len: u32) {
            // SAFETY: test memory, single-threaded.
            unsafe {
                (*self.mem).used.ring[usize::from(self.used_idx) % N] = UsedElem {
                    id: u32::from(head),
                    len,
                };
                self.used_idx = self.used_idx.wrapping_add(1);
                (*self.mem).used.idx = self.used_idx;
            }
        }

        fn set_avail_event(&mut self, v: u16) {
            // SAFETY: test memory.
            unsafe { (*self.mem).used.avail_event = v };
        }
    }

    fn queue<const N: usize>(event_idx: bool) -> (Box<QueueMem<N>>, Virtq<N>, Dev<N>) {
        let mut mem = Box::new(QueueMem::<N>::new());
        let p: *mut QueueMem<N> = &mut *mem;
        // SAFETY: the box outlives the queue in each test.
        let q = unsafe { Virtq::new(p, event_idx) };
        (
            mem,
            q,
            Dev {
                mem: p,
                next_avail: 0,
                used_idx: 0,
            },
        )
    }

    #[test]
    fn chains_travel_to_the_device_and_back_across_index_wraparound() {
        let (_mem, mut q, mut dev) = queue::<8>(false);
        for round in 0..70_000u32 {
            let a = u64::from(round) * 64;
            let bufs = [
                Buf {
                    addr: a,
                    len: 44,
                    write: false,
                },
                Buf {
                    addr: a + 44,
                    len: round % 1000,
                    write: round % 2 == 0,
                },
            ];
            let head = q.push(&bufs).unwrap();
            q.publish();
            let (h, descs) = dev.take().unwrap();
            assert_eq!(h, head);
            assert_eq!(descs.len(), 2);
            assert_eq!(descs[0].addr, a);
            assert_eq!(descs[1].len, round % 1000);
            assert_eq!(descs[1].flags & DESC_F_WRITE != 0, round % 2 == 0);
            dev.give(h, round);
            assert_eq!(q.pop_used(), Some(Ok((head, round))));
            assert_eq!(q.pop_used(), None);
            assert_eq!(q.free_descs(), 8);
        }
    }

    #[test]
    fn a_full_queue_refuses_more_and_out_of_order_completion_works() {
        let (_mem, mut q, mut dev) = queue::<4>(false);
        let b = |addr| Buf {
            addr,
            len: 1,
            write: true,
        };
        let h: Vec<u16> = (0..4).map(|i| q.push(&[b(i)]).unwrap()).collect();
        assert_eq!(q.push(&[b(9)]), None);
        q.publish();
        let taken: Vec<_> = (0..4).map(|_| dev.take().unwrap().0).collect();
        assert_eq!(taken, h);
        // Complete in reverse order.
        for &x in h.iter().rev() {
            dev.give(x, 7);
        }
        for &x in h.iter().rev() {
            assert_eq!(q.pop_used(), Some(Ok((x, 7))));
        }
        assert_eq!(q.free_descs(), 4);
        // A two-buffer chain needs two free descriptors.
        assert!(q.push(&[b(1), b(2), b(3), b(4)]).is_some());
        assert_eq!(q.push(&[b(5)]), None);
    }

    #[test]
    fn bogus_used_ids_are_reported_not_trusted() {
        let (_mem, mut q, mut dev) = queue::<4>(false);
        let head = q
            .push(&[Buf {
                addr: 0,
                len: 1,
                write: true,
            }])
            .unwrap();
        q.publish();
        dev.give(head + 1, 0);
        assert_eq!(
            q.pop_used(),
            Some(Err(UsedError::BadId(u32::from(head) + 1)))
        );
        dev.give(99, 0);
        assert_eq!(q.pop_used(), Some(Err(UsedError::BadId(99))));
        dev.give(head, 0);
        assert_eq!(q.pop_used(), Some(Ok((head, 0))));
        dev.give(head, 0);
        assert_eq!(q.pop_used(), Some(Err(UsedError::BadId(u32::from(head)))));
    }

    #[test]
    fn kicks_follow_avail_event() {
        let (_mem, mut q, mut dev) = queue::<8>(true);
        let b = Buf {
            addr: 0,
            len: 1,
            write: false,
        };
        // The device's avail_event starts at 0: the first publish crosses it.
        q.push(&[b]);
        q.publish();
        assert!(q.needs_kick());
        assert!(!q.needs_kick(), "nothing new published");
        // The device has not caught up (avail_event still 0): no kick.
        q.push(&[b]);
        q.publish();
        assert!(!q.needs_kick());
        // The device processed both and waits at 2.
        dev.take();
        dev.take();
        dev.set_avail_event(2);
        q.push(&[b]);
        q.publish();
        assert!(q.needs_kick());
    }

    #[test]
    fn used_event_is_written_relative_to_last_used() {
        let (mem, mut q, _dev) = queue::<8>(true);
        q.set_used_event(1);
        assert_eq!(mem.avail.used_event, 0);
        q.set_used_event(0);
        assert_eq!(mem.avail.used_event, 0x7fff);
        q.set_used_event(3);
        assert_eq!(mem.avail.used_event, 2);
    }
}
