// SPDX-License-Identifier: Apache-2.0
//! The nano guest's heap: a first-fit allocator over one contiguous arena,
//! with an address-ordered free list that coalesces neighbours on free.
//!
//! Every block is a multiple of [`GRANULE`] (16 bytes) and aligned to it, so
//! that a free block always has room for its list node (size, next). A block
//! carries no header: `dealloc` gets the size back from its `Layout`, as
//! `GlobalAlloc` guarantees. Alignments above 16 are served by carving the
//! front of a free block off as a smaller free block.
//!
//! [`Heap`] is the single-threaded core (unit-tested on the host over a
//! `Vec`); [`LockedHeap`] wraps it in a spinlock and implements
//! `GlobalAlloc`. Misuse that the free list can see (freeing a block that
//! overlaps a free one, or lies outside the arena) panics instead of
//! corrupting the list.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

/// Allocation granule: block sizes and addresses are multiples of it.
pub const GRANULE: usize = 16;

/// A free block's node, stored in the block itself.
#[repr(C)]
struct Free {
    size: usize,
    next: *mut Free,
}

const _: () = assert!(core::mem::size_of::<Free>() <= GRANULE);

/// Heap statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Arena size in bytes (after aligning its ends to the granule).
    pub arena: usize,
    /// Bytes in live allocations (rounded up to the granule).
    pub used: usize,
    /// Largest `used` seen.
    pub peak: usize,
    /// Free blocks in the list.
    pub free_blocks: usize,
}

/// The allocator core over one arena. Not thread-safe; see [`LockedHeap`].
pub struct Heap {
    head: *mut Free,
    start: usize,
    end: usize,
    used: usize,
    peak: usize,
}

// SAFETY: the raw pointers only ever point into the arena the owner handed
// over in `init`; moving the owner to another thread moves that ownership.
unsafe impl Send for Heap {}

/// Rounds `v` up to a multiple of `a` (a power of two); `None` on overflow.
const fn align_up(v: usize, a: usize) -> Option<usize> {
    match v.checked_add(a - 1) {
        Some(x) => Some(x & !(a - 1)),
        None => None,
    }
}

/// The block size that serves `layout`: at least one granule, rounded up.
pub const fn block_size(layout: Layout) -> Option<usize> {
    let size = if layout.size() == 0 { 1 } else { layout.size() };
    align_up(size, GRANULE)
}

impl Heap {
    /// A heap with no arena: every allocation fails until [`Heap::init`].
    pub const fn empty() -> Self {
        Self {
            head: ptr::null_mut(),
            start: 0,
            end: 0,
            used: 0,
            peak: 0,
        }
    }

    /// Hands the heap the arena `[start, start + size)`; its ends are aligned
    /// inwards to the granule. Replaces any earlier arena.
    ///
    /// # Safety
    /// The arena must be valid, writable memory that nothing else uses for as
    /// long as the heap (or any block it handed out) lives.
    pub unsafe fn init(&mut self, start: usize, size: usize) {
        let lo = align_up(start, GRANULE).unwrap_or(usize::MAX);
        let hi = start.saturating_add(size) & !(GRANULE - 1);
        self.used = 0;
        self.peak = 0;
        if hi <= lo {
            self.head = ptr::null_mut();
            self.start = 0;
            self.end = 0;
            return;
        }
        self.start = lo;
        self.end = hi;
        let node = lo as *mut Free;
        // SAFETY: `lo..hi` lies inside the caller's arena and holds at least
        // one granule, which fits a node; the address is granule-aligned.
        unsafe {
            node.write(Free {
                size: hi - lo,
                next: ptr::null_mut(),
            })
        };
        self.head = node;
    }

    /// The arena as `(start, end)`.
    pub fn arena(&self) -> (usize, usize) {
        (self.start, self.end)
    }

    /// Current statistics (walks the free list).
    pub fn stats(&self) -> Stats {
        let mut free_blocks = 0;
        let mut p = self.head;
        while !p.is_null() {
            free_blocks += 1;
            // SAFETY: every node in the list is a valid free block (invariant).
            p = unsafe { (*p).next };
        }
        Stats {
            arena: self.end - self.start,
            used: self.used,
            peak: self.peak,
            free_blocks,
        }
    }

    /// Bytes in the largest free block.
    pub fn largest_free(&self) -> usize {
        let mut best = 0;
        let mut p = self.head;
        while !p.is_null() {
            // SAFETY: as in `stats`.
            unsafe {
                best = best.max((*p).size);
                p = (*p).next;
            }
        }
        best
    }

    /// Allocates a block for `layout`; null when no free block fits.
    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some(size) = block_size(layout) else {
            return ptr::null_mut();
        };
        let align = layout.align().max(GRANULE);
        let mut prev: *mut Free = ptr::null_mut();
        let mut cur = self.head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list (invariant: valid, aligned,
            // inside the arena, not overlapping any live block).
            let (bsize, next) = unsafe { ((*cur).size, (*cur).next) };
            let b = cur as usize;
            if let Some(start) = align_up(b, align) {
                let bend = b + bsize;
                if start.checked_add(size).is_some_and(|e| e <= bend) {
                    let front = start - b;
                    let back = bend - (start + size);
                    // What replaces `cur` in the list: the front part (if
                    // any), then the back part (if any), then `next`.
                    let mut after = next;
                    if back > 0 {
                        let tail = (start + size) as *mut Free;
                        // SAFETY: the tail lies inside the free block being
                        // split, is granule-aligned and at least a granule.
                        unsafe { tail.write(Free { size: back, next }) };
                        after = tail;
                    }
                    let replacement = if front > 0 {
                        // SAFETY: `cur` stays a valid node, now smaller.
                        unsafe {
                            (*cur).size = front;
                            (*cur).next = after;
                        }
                        cur
                    } else {
                        after
                    };
                    if prev.is_null() {
                        self.head = replacement;
                    } else {
                        // SAFETY: `prev` is a valid node that pointed at `cur`.
                        unsafe { (*prev).next = replacement };
                    }
                    self.used += size;
                    self.peak = self.peak.max(self.used);
                    return start as *mut u8;
                }
            }
            prev = cur;
            cur = next;
        }
        ptr::null_mut()
    }

    /// Returns the block at `p`, allocated for `layout`, to the free list,
    /// merging it with adjacent free blocks.
    ///
    /// # Safety
    /// `p` must come from `alloc` on this heap with the same `layout`, and
    /// must not be used after this call.
    pub unsafe fn dealloc(&mut self, p: *mut u8, layout: Layout) {
        let Some(size) = block_size(layout) else {
            panic!("heap: dealloc with an impossible layout");
        };
        let b = p as usize;
        let end = match b.checked_add(size) {
            Some(e) if b >= self.start && e <= self.end && b % GRANULE == 0 => e,
            _ => panic!("heap: dealloc of {b:#x} (+{size}) outside the arena"),
        };
        // Find the free neighbours: `prev` below `b`, `next` above it.
        let mut prev: *mut Free = ptr::null_mut();
        let mut next = self.head;
        while !next.is_null() && (next as usize) < b {
            prev = next;
            // SAFETY: list nodes are valid.
            next = unsafe { (*next).next };
        }
        let prev_end = if prev.is_null() {
            0
        } else {
            // SAFETY: `prev` is a valid node.
            prev as usize + unsafe { (*prev).size }
        };
        if (!prev.is_null() && prev_end > b) || (!next.is_null() && (next as usize) < end) {
            panic!("heap: dealloc of {b:#x} (+{size}) overlaps a free block (double free?)");
        }
        self.used -= size;
        // Merge with `next`, then with `prev`.
        let node = b as *mut Free;
        // SAFETY: the block is ours again: valid, aligned, at least a granule;
        // `next`, when adjacent, is a valid node.
        unsafe {
            if !next.is_null() && next as usize == end {
                node.write(Free {
                    size: size + (*next).size,
                    next: (*next).next,
                });
            } else {
                node.write(Free { size, next });
            }
        }
        if prev.is_null() {
            self.head = node;
        } else if prev_end == b {
            // SAFETY: `prev` and `node` are valid and adjacent.
            unsafe {
                (*prev).size += (*node).size;
                (*prev).next = (*node).next;
            }
        } else {
            // SAFETY: `prev` is a valid node.
            unsafe { (*prev).next = node };
        }
    }

    /// Checks the free list's invariants (sorted, disjoint, non-adjacent,
    /// inside the arena, granule-aligned); returns the free byte count.
    pub fn check(&self) -> Result<usize, &'static str> {
        let mut free = 0;
        let mut last_end: Option<usize> = None;
        let mut p = self.head;
        while !p.is_null() {
            let b = p as usize;
            if b < self.start || b >= self.end || b % GRANULE != 0 {
                return Err("free node outside the arena or misaligned");
            }
            // SAFETY: `b` is inside the arena and aligned (checked above).
            let (size, next) = unsafe { ((*p).size, (*p).next) };
            if size == 0 || size % GRANULE != 0 || b + size > self.end {
                return Err("free block has a bad size");
            }
            if let Some(e) = last_end {
                if b < e {
                    return Err("free blocks out of order or overlapping");
                }
                if b == e {
                    return Err("adjacent free blocks were not merged");
                }
            }
            last_end = Some(b + size);
            free += size;
            p = next;
        }
        if free + self.used != self.end - self.start {
            return Err("free + used does not add up to the arena");
        }
        Ok(free)
    }
}

/// A [`Heap`] behind a spinlock, usable as the `#[global_allocator]`.
pub struct LockedHeap {
    locked: AtomicBool,
    heap: UnsafeCell<Heap>,
}

// SAFETY: the heap is only reached while `locked` is held (see `with`).
unsafe impl Sync for LockedHeap {}

impl LockedHeap {
    /// A locked heap with no arena yet.
    pub const fn empty() -> Self {
        Self {
            locked: AtomicBool::new(false),
            heap: UnsafeCell::new(Heap::empty()),
        }
    }

    /// Runs `f` with the heap locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.heap.get() });
        self.locked.store(false, Ordering::Release);
        r
    }

    /// Gives the heap its arena.
    ///
    /// # Safety
    /// As [`Heap::init`]; and no block of an earlier arena may still be live.
    pub unsafe fn init(&self, start: usize, size: usize) {
        // SAFETY: forwarded from the caller.
        self.with(|h| unsafe { h.init(start, size) });
    }
}

// SAFETY: `alloc` returns blocks of at least `layout.size()` bytes, aligned to
// `layout.align()`, disjoint from every other live block (the free list holds
// only unused memory); `dealloc` takes them back under the same lock.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|h| h.alloc(layout))
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: GlobalAlloc's contract: `p` came from `alloc` with `layout`.
        self.with(|h| unsafe { h.dealloc(p, layout) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arena on the host heap, 16-byte aligned.
    struct Arena {
        mem: Vec<u128>,
        heap: Heap,
    }

    impl Arena {
        fn new(bytes: usize) -> Self {
            let mut mem = vec![0u128; bytes / 16];
            let mut heap = Heap::empty();
            // SAFETY: `mem` outlives `heap` (both in this struct, heap unused
            // after drop) and nothing else touches it.
            unsafe { heap.init(mem.as_mut_ptr() as usize, bytes) };
            Self { mem, heap }
        }

        fn base(&self) -> usize {
            self.mem.as_ptr() as usize
        }
    }

    fn l(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn block_sizes_round_to_the_granule() {
        assert_eq!(block_size(l(0, 1)), Some(16));
        assert_eq!(block_size(l(1, 1)), Some(16));
        assert_eq!(block_size(l(16, 8)), Some(16));
        assert_eq!(block_size(l(17, 8)), Some(32));
    }

    #[test]
    fn empty_heap_fails_every_allocation() {
        let mut h = Heap::empty();
        assert!(h.alloc(l(8, 8)).is_null());
        assert_eq!(h.check(), Ok(0));
    }

    #[test]
    fn first_fit_then_full_coalescing() {
        let mut a = Arena::new(4096);
        let base = a.base();
        let p1 = a.heap.alloc(l(100, 8));
        let p2 = a.heap.alloc(l(200, 8));
        let p3 = a.heap.alloc(l(300, 8));
        assert_eq!(p1 as usize, base);
        assert_eq!(p2 as usize, base + 112);
        assert_eq!(p3 as usize, base + 112 + 208);
        assert_eq!(a.heap.check(), Ok(4096 - 112 - 208 - 304));
        // SAFETY: each pointer came from this heap with that layout.
        unsafe { a.heap.dealloc(p2, l(200, 8)) };
        assert_eq!(a.heap.stats().free_blocks, 2);
        // The hole is reused first-fit.
        let p4 = a.heap.alloc(l(50, 8));
        assert_eq!(p4, p2);
        // SAFETY: as above.
        unsafe {
            a.heap.dealloc(p1, l(100, 8));
            a.heap.dealloc(p4, l(50, 8));
            a.heap.dealloc(p3, l(300, 8));
        }
        assert_eq!(a.heap.check(), Ok(4096));
        assert_eq!(a.heap.stats().free_blocks, 1);
        assert_eq!(a.heap.largest_free(), 4096);
        assert_eq!(a.heap.stats().peak, 112 + 208 + 304);
    }

    #[test]
    fn large_alignment_splits_the_front_off() {
        let mut a = Arena::new(64 * 1024);
        let small = a.heap.alloc(l(16, 16));
        let big = a.heap.alloc(l(100, 4096));
        assert_eq!(big as usize % 4096, 0);
        assert!(big as usize > small as usize);
        a.heap.check().unwrap();
        // The front gap is still usable.
        let gap = a.heap.alloc(l(32, 16));
        assert_eq!(gap as usize, small as usize + 16);
        // SAFETY: pointers from this heap with their layouts.
        unsafe {
            a.heap.dealloc(big, l(100, 4096));
            a.heap.dealloc(small, l(16, 16));
            a.heap.dealloc(gap, l(32, 16));
        }
        assert_eq!(a.heap.check(), Ok(64 * 1024));
    }

    #[test]
    fn exhaustion_returns_null_and_recovers() {
        let mut a = Arena::new(1024);
        let p = a.heap.alloc(l(1024, 16));
        assert!(!p.is_null());
        assert!(a.heap.alloc(l(1, 1)).is_null());
        // SAFETY: from this heap with this layout.
        unsafe { a.heap.dealloc(p, l(1024, 16)) };
        assert!(a.heap.alloc(l(1025, 16)).is_null());
        assert!(!a.heap.alloc(l(1024, 16)).is_null());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut a = Arena::new(1024);
        let p = a.heap.alloc(l(64, 16));
        let _q = a.heap.alloc(l(64, 16));
        // SAFETY: deliberately wrong on the second call; the heap must panic.
        unsafe {
            a.heap.dealloc(p, l(64, 16));
            a.heap.dealloc(p, l(64, 16));
        }
    }

    #[test]
    #[should_panic(expected = "outside the arena")]
    fn foreign_pointer_is_caught() {
        let mut a = Arena::new(1024);
        let mut other = [0u128; 4];
        // SAFETY: deliberately wrong; the heap must panic before touching it.
        unsafe { a.heap.dealloc(other.as_mut_ptr().cast(), l(16, 16)) };
    }

    /// Random allocations and frees: blocks never overlap, keep their
    /// contents, honour alignment, and everything coalesces back at the end.
    #[test]
    fn random_workload_keeps_every_invariant() {
        const ARENA: usize = 1 << 20;
        let mut a = Arena::new(ARENA);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        for step in 0..20_000u32 {
            let r = next();
            if live.is_empty() || r % 3 != 0 {
                let size = match r % 10 {
                    0 => (r >> 8) as usize % 65536,
                    1..=3 => (r >> 8) as usize % 2048,
                    _ => (r >> 8) as usize % 128,
                };
                let align = 1usize << ((r >> 40) % 13);
                let layout = l(size, align);
                let p = a.heap.alloc(layout);
                if p.is_null() {
                    continue;
                }
                assert_eq!(p as usize % align, 0);
                let tag = step as u8;
                // SAFETY: `p` is a fresh block of `size` bytes.
                unsafe { core::ptr::write_bytes(p, tag, size) };
                live.push((p, layout, tag));
            } else {
                let i = (r >> 16) as usize % live.len();
                let (p, layout, tag) = live.swap_remove(i);
                // SAFETY: the block is live and `layout.size()` bytes long.
                let bytes = unsafe { core::slice::from_raw_parts(p, layout.size()) };
                assert!(bytes.iter().all(|b| *b == tag), "block contents changed");
                // SAFETY: from this heap with this layout, freed once.
                unsafe { a.heap.dealloc(p, layout) };
            }
            if step % 512 == 0 {
                a.heap.check().unwrap();
                let mut spans: Vec<(usize, usize)> = live
                    .iter()
                    .map(|(p, l, _)| (*p as usize, *p as usize + block_size(*l).unwrap()))
                    .collect();
                spans.sort_unstable();
                for w in spans.windows(2) {
                    assert!(w[0].1 <= w[1].0, "live blocks overlap");
                }
            }
        }
        for (p, layout, _) in live.drain(..) {
            // SAFETY: as above.
            unsafe { a.heap.dealloc(p, layout) };
        }
        assert_eq!(a.heap.check(), Ok(ARENA));
        assert_eq!(a.heap.stats().free_blocks, 1);
    }

    #[test]
    fn locked_heap_serves_global_alloc_calls() {
        let mut mem = vec![0u128; 256];
        let h = LockedHeap::empty();
        // SAFETY: `mem` outlives every use of `h` below.
        unsafe { h.init(mem.as_mut_ptr() as usize, 4096) };
        // SAFETY: GlobalAlloc calls with matching layouts.
        unsafe {
            let p = GlobalAlloc::alloc(&h, l(40, 8));
            assert!(!p.is_null());
            let q = GlobalAlloc::realloc(&h, p, l(40, 8), 400);
            assert!(!q.is_null());
            GlobalAlloc::dealloc(&h, q, l(400, 8));
        }
        assert_eq!(h.with(|h| h.check()), Ok(4096));
        drop(mem);
    }
}
