// SPDX-License-Identifier: Apache-2.0
//! The global allocator: `cell0_nano::heap::LockedHeap` over the RAM between
//! the end of the image and the end of its e820 RAM range (so the heap grows
//! with `--memory-mib` and the ELF stays small). Set up once, by the BSP,
//! before `ready`; an allocation that does not fit panics with Rust's
//! "memory allocation of N bytes failed", which crashes the VM.

use core::ptr;

use cell0_nano::e820::{
    BP_E820_ENTRIES, BP_E820_TABLE, BP_RAMDISK_IMAGE, BP_RAMDISK_SIZE, E820_ENTRY_SIZE, E820_MAX,
    Entry, heap_range,
};
use cell0_nano::heap::{LockedHeap, Stats};
use cell0_nano::layout::IDENTITY_MAP_END;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

unsafe extern "C" {
    /// End of `.bss`, from the linker script.
    static nano_image_end: u8;
}

/// Heap arena alignment (a page).
const ARENA_ALIGN: u64 = 4096;

/// One past the highest e820 RAM byte (0 before `init`): what lies above is
/// not guest RAM (the evil self-test aims buffers there).
static RAM_TOP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// One past the highest byte of guest RAM, from the e820 map.
pub fn ram_top() -> u64 {
    RAM_TOP.load(core::sync::atomic::Ordering::Relaxed)
}

/// Gives the heap the RAM above the image, per the zero page's e820 map.
pub fn init(boot_params: usize) {
    let image_end = (&raw const nano_image_end) as u64;
    let image_end = (image_end + ARENA_ALIGN - 1) & !(ARENA_ALIGN - 1);
    // SAFETY: the zero page is in guest RAM below 4 GiB (main checked it).
    let count = unsafe { ptr::read_volatile((boot_params + BP_E820_ENTRIES) as *const u8) };
    let entries = (0..usize::from(count).min(E820_MAX)).map(|i| {
        let mut b = [0u8; E820_ENTRY_SIZE];
        let at = boot_params + BP_E820_TABLE + i * E820_ENTRY_SIZE;
        // SAFETY: entry i of the zero page's e820 table (i < 128), in RAM.
        unsafe { ptr::copy_nonoverlapping(at as *const u8, b.as_mut_ptr(), E820_ENTRY_SIZE) };
        Entry::from_bytes(&b)
    });
    let top = entries
        .clone()
        .filter(|e| e.kind == cell0_nano::e820::E820_RAM)
        .map(|e| e.range().end)
        .max()
        .unwrap_or(0);
    RAM_TOP.store(top, core::sync::atomic::Ordering::Relaxed);
    let rd_start = u64::from(crate::read_u32(boot_params + BP_RAMDISK_IMAGE));
    let rd_size = u64::from(crate::read_u32(boot_params + BP_RAMDISK_SIZE));
    let ramdisk = (rd_size > 0).then_some(rd_start..rd_start + rd_size);
    if let Some(r) = heap_range(entries, image_end, IDENTITY_MAP_END, ramdisk) {
        // SAFETY: the range is e820 RAM above the image and below any
        // initrd, identity-mapped, and used by nothing else; no allocation
        // happened before this call.
        unsafe { HEAP.init(r.start as usize, (r.end - r.start) as usize) };
    }
}

/// Heap statistics.
pub fn stats() -> Stats {
    HEAP.with(|h| h.stats())
}
