// SPDX-License-Identifier: Apache-2.0
//! The shared-memory window: the `cell0.shm=<size>@<gpa>` cmdline entry that
//! cell0-vmm's `--shm-mib N` appends, the plan for mapping it with 2 MiB
//! pages above the 4 GiB identity map, and `fold64`, the checksum the
//! router's `echo`/`fold` method answers with.
//!
//! The window is mapped with 2 MiB pages only (1 GiB pages triple-fault on
//! the project's hosts), one page directory per GiB it touches, linked into
//! the PDPT behind PML4 entry 0: so it must lie in 4 GiB..512 GiB and be at
//! most [`MAX_WINDOW`] bytes (cell0-vmm's own limit, `--shm-mib 65536`).

use crate::cmdline::{parse_memsize, value};
use crate::layout::IDENTITY_MAP_END;
use crate::tables::HUGE_PAGE;

/// The cmdline key cell0-vmm announces the window with.
pub const SHM_KEY: &[u8] = b"cell0.shm";
/// Largest window the nano guest maps: 64 GiB (64 page directories).
pub const MAX_WINDOW: u64 = 64 << 30;
/// End of what PML4 entry 0 (one PDPT) covers: 512 GiB.
pub const PDPT_SPAN: u64 = 512 << 30;
/// Bytes one page directory maps.
pub const GIB: u64 = 1 << 30;

/// A shared-memory window: guest-physical base and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Guest-physical (and, once mapped, virtual) address of its first byte.
    pub gpa: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Why a window cannot be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// The value is not `SIZE@GPA`.
    Syntax,
    /// Size 0.
    Empty,
    /// Bigger than [`MAX_WINDOW`].
    TooBig,
    /// Not 2 MiB-aligned.
    Unaligned,
    /// Below 4 GiB (inside the identity map) or past 512 GiB.
    OutOfRange,
}

impl WindowError {
    /// What is wrong, for the failure line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Syntax => "expected SIZE@GPA",
            Self::Empty => "the window is empty",
            Self::TooBig => "the window is larger than the 64 GiB the nano guest maps",
            Self::Unaligned => "the window is not 2 MiB-aligned",
            Self::OutOfRange => "the window does not lie within 4 GiB..512 GiB",
        }
    }
}

/// Parses `SIZE@GPA` (numbers as `parse_memsize` reads them: decimal or
/// `0x` hex, optional K/M/G/T) and checks that the window can be mapped.
pub fn parse_window(v: &[u8]) -> Result<Window, WindowError> {
    let at = v
        .iter()
        .position(|b| *b == b'@')
        .ok_or(WindowError::Syntax)?;
    let size = parse_memsize(&v[..at]).ok_or(WindowError::Syntax)?;
    let gpa = parse_memsize(&v[at + 1..]).ok_or(WindowError::Syntax)?;
    let w = Window { gpa, size };
    w.check()?;
    Ok(w)
}

/// The window the cmdline announces: `None` when there is no `cell0.shm=`
/// (the last one wins), `Err` with the value when it is unusable.
pub fn window_from_cmdline(cmdline: &[u8]) -> Option<Result<Window, (&[u8], WindowError)>> {
    value(cmdline, SHM_KEY).map(|v| parse_window(v).map_err(|e| (v, e)))
}

impl Window {
    /// Checks the limits in the module docs.
    pub fn check(&self) -> Result<(), WindowError> {
        if self.size == 0 {
            return Err(WindowError::Empty);
        }
        if self.size > MAX_WINDOW {
            return Err(WindowError::TooBig);
        }
        if self.gpa % HUGE_PAGE != 0 {
            return Err(WindowError::Unaligned);
        }
        match self.gpa.checked_add(self.size) {
            Some(end) if self.gpa >= IDENTITY_MAP_END && end <= PDPT_SPAN => Ok(()),
            _ => Err(WindowError::OutOfRange),
        }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// The PDPT indices (GiB numbers) the window touches.
    pub fn gibs(&self) -> core::ops::Range<usize> {
        (self.gpa / GIB) as usize..self.end().div_ceil(GIB) as usize
    }

    /// The 2 MiB pages that cover the window (the last one may reach past
    /// its end when the size is not a multiple of 2 MiB).
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(HUGE_PAGE)
    }

    /// The PDE slots of GiB `gib` that map the window: a range of indices
    /// 0..512 (empty when the window does not touch that GiB).
    pub fn pde_slots(&self, gib: usize) -> core::ops::Range<usize> {
        let lo = gib as u64 * GIB;
        let hi = lo + GIB;
        let start = self.gpa.max(lo);
        let end = (self.gpa + self.pages() * HUGE_PAGE).min(hi);
        if start >= end {
            return 0..0;
        }
        ((start - lo) / HUGE_PAGE) as usize..((end - lo) / HUGE_PAGE) as usize
    }

    /// Whether `offset..offset + len` lies inside the window (overflow
    /// counts as outside), the check the router makes for every ref.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }
}

/// XOR of the little-endian u64 words of `bytes`, the last one zero-padded:
/// what the router's `echo`/`fold` computes per piece (payload, then each
/// ref), XORed together.
pub fn fold64(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc ^= u64::from_le_bytes(b);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        acc ^= u64::from_le_bytes(b);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_cell0_vmm_appends() {
        let c = b"cell0.test=sypas-shm virtio_mmio.device=4K@0xd0000000:5 cell0.shm=0x8000000@0x100000000 cell0.cpus=1";
        let w = window_from_cmdline(c).unwrap().unwrap();
        assert_eq!(
            w,
            Window {
                gpa: 4 << 30,
                size: 128 << 20
            }
        );
        assert_eq!(w.gibs(), 4..5);
        assert_eq!(w.pages(), 64);
        assert_eq!(w.pde_slots(4), 0..64);
        assert_eq!(w.pde_slots(5), 0..0);
        assert!(window_from_cmdline(b"cell0.test=x").is_none());
        assert_eq!(
            parse_window(b"64M@4G"),
            Ok(Window {
                gpa: 4 << 30,
                size: 64 << 20
            })
        );
    }

    #[test]
    fn refuses_windows_it_cannot_map() {
        assert_eq!(parse_window(b"0x1000"), Err(WindowError::Syntax));
        assert_eq!(parse_window(b"x@4G"), Err(WindowError::Syntax));
        assert_eq!(parse_window(b"0@4G"), Err(WindowError::Empty));
        assert_eq!(parse_window(b"65G@4G"), Err(WindowError::TooBig));
        assert_eq!(parse_window(b"1M@0x100100000"), Err(WindowError::Unaligned));
        assert_eq!(parse_window(b"1M@0xd0000000"), Err(WindowError::OutOfRange));
        assert_eq!(parse_window(b"2G@511G"), Err(WindowError::OutOfRange));
        assert_eq!(
            parse_window(b"1M@0xffffffffffe00000"),
            Err(WindowError::OutOfRange)
        );
        assert!(parse_window(b"64G@448G").is_ok());
        assert_eq!(
            window_from_cmdline(b"cell0.shm=2M@2M"),
            Some(Err((&b"2M@2M"[..], WindowError::OutOfRange)))
        );
    }

    #[test]
    fn pde_slots_span_gib_boundaries() {
        // 3 GiB + 3 MiB from 5 GiB - 2 MiB: the last slot of GiB 4, all of
        // 5..7, two slots of GiB 8 (the partial 2 MiB page is mapped whole).
        let w = Window {
            gpa: (5 << 30) - (2 << 20),
            size: (3 << 30) + (3 << 20),
        };
        assert_eq!(w.gibs(), 4..9);
        assert_eq!(w.pde_slots(4), 511..512);
        assert_eq!(w.pde_slots(5), 0..512);
        assert_eq!(w.pde_slots(7), 0..512);
        assert_eq!(w.pde_slots(8), 0..1);
        let total: usize = w.gibs().map(|g| w.pde_slots(g).len()).sum();
        assert_eq!(total as u64, w.pages());
    }

    #[test]
    fn contains_counts_overflow_as_outside() {
        let w = Window {
            gpa: 4 << 30,
            size: 1 << 20,
        };
        assert!(w.contains(0, 1 << 20));
        assert!(w.contains(1 << 20, 0));
        assert!(!w.contains(1, 1 << 20));
        assert!(!w.contains(u64::MAX, 2));
    }

    #[test]
    fn fold64_pads_the_last_word() {
        assert_eq!(fold64(&[]), 0);
        assert_eq!(fold64(&[1]), 1);
        assert_eq!(fold64(&[1, 0, 0, 0, 0, 0, 0, 0, 2]), 3);
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&0x1234u64.to_le_bytes());
        v[8..].copy_from_slice(&0x1234u64.to_le_bytes());
        assert_eq!(fold64(&v), 0);
    }
}
