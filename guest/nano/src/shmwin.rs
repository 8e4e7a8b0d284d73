// SPDX-License-Identifier: Apache-2.0
//! Maps the shared-memory window (`cell0.shm=<size>@<gpa>`, from cell0-vmm's
//! `--shm-mib`) into the nano guest's page tables and reads and writes it.
//!
//! Ring 3 builds the window's page directories itself (one 4 KiB directory
//! per GiB, from the heap, with 2 MiB pages: never 1 GiB pages, which
//! triple-fault on the project's hosts) and links them into the static PDPT
//! with `arch::link_pd`; ring 0 is not involved. The window is identity
//! mapped like the rest (virtual = guest-physical), cached, user-writable.
//! Limits (`cell0_nano::shm`): 2 MiB-aligned, within 4 GiB..512 GiB, at most
//! 64 GiB, which costs 256 KiB of heap for the directories.
//!
//! The host (the SYPAS router) writes the window only while a CALL that
//! names it is in flight, so the accessors below form slices only between
//! calls and never keep them.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::format;
use core::ptr;

use cell0_nano::pattern;
use cell0_nano::shm::{Window, fold64, window_from_cmdline};
use cell0_nano::tables::{HUGE_PAGE, shm_pde};
use cell0_nano::text::Escaped;

use crate::arch;
use crate::selftest::Fail;

/// A mapped window.
#[derive(Debug, Clone, Copy)]
pub struct Shm {
    /// Where and how big.
    pub window: Window,
}

/// Maps the window the cmdline announces; `Ok(None)` without `cell0.shm=`.
pub fn map_from_cmdline(cmdline: &[u8]) -> Result<Option<Shm>, Fail> {
    match window_from_cmdline(cmdline) {
        None => Ok(None),
        Some(Err((v, e))) => Err(Fail(format!(
            "bad cell0.shm value '{}': {}",
            Escaped(v),
            e.describe()
        ))),
        Some(Ok(w)) => map(w).map(Some),
    }
}

/// Builds and links the page directories of `w` (checked by `Window::check`).
pub fn map(w: Window) -> Result<Shm, Fail> {
    w.check()
        .map_err(|e| Fail(format!("cannot map the shm window: {}", e.describe())))?;
    let layout = Layout::from_size_align(4096, 4096).map_err(|_| Fail::from("bad PD layout"))?;
    for gib in w.gibs() {
        // SAFETY: a non-zero-sized layout; the page is leaked on purpose
        // (the directory is live as long as the machine runs).
        let pd = unsafe { alloc_zeroed(layout) }.cast::<u64>();
        if pd.is_null() {
            return Err(Fail::from("out of heap for the shm page directories"));
        }
        for slot in w.pde_slots(gib) {
            let addr = ((gib as u64) << 30) + slot as u64 * HUGE_PAGE;
            // SAFETY: `pd` is a fresh 4 KiB page (512 entries) that no page
            // table references yet; slot < 512.
            unsafe { ptr::write_volatile(pd.add(slot), shm_pde(addr)) };
        }
        if !arch::link_pd(gib, pd as u64) {
            return Err(Fail(format!(
                "cannot map the shm window: PDPT entry {gib} is taken or out of range"
            )));
        }
    }
    Ok(Shm { window: w })
}

impl Shm {
    /// The window's size.
    pub fn size(&self) -> u64 {
        self.window.size
    }

    fn range(&self, off: u64, len: usize) -> *mut u8 {
        assert!(
            self.window.contains(off, len as u64),
            "shm access {off:#x}+{len:#x} outside the {:#x}-byte window",
            self.window.size
        );
        (self.window.gpa + off) as *mut u8
    }

    /// Runs `f` over `len` bytes at `off` (panics outside the window).
    pub fn with_mut<R>(&self, off: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let p = self.range(off, len);
        // SAFETY: the range lies inside the mapped window (checked); nothing
        // else in the guest aliases it, and the host writes the window only
        // while a CALL naming it is in flight, never while this runs.
        f(unsafe { core::slice::from_raw_parts_mut(p, len) })
    }

    /// Runs `f` over `len` bytes at `off` (panics outside the window).
    pub fn with<R>(&self, off: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let p = self.range(off, len);
        // SAFETY: as `with_mut`.
        f(unsafe { core::slice::from_raw_parts(p, len) })
    }

    /// Writes the test pattern of call `k` into `off..off + len`.
    pub fn fill_pattern(&self, off: u64, len: usize, k: u32) {
        self.with_mut(off, len, |b| pattern::fill(b, k));
    }

    /// The first byte of `off..off + len` that differs from call `k`'s pattern.
    pub fn pattern_difference(&self, off: u64, len: usize, k: u32) -> Option<usize> {
        self.with(off, len, |b| pattern::first_difference_from(b, len, k))
    }

    /// `fold64` of `off..off + len`.
    pub fn fold(&self, off: u64, len: usize) -> u64 {
        self.with(off, len, fold64)
    }

    /// Copies `bytes` to `off`.
    pub fn write(&self, off: u64, bytes: &[u8]) {
        self.with_mut(off, bytes.len(), |b| b.copy_from_slice(bytes));
    }
}
