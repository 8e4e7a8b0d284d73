// SPDX-License-Identifier: Apache-2.0
//! The e820 memory map in the Linux zero page, and where the heap goes: the
//! RAM from the end of the image to the end of the e820 RAM range that holds
//! the image (below the initrd, if any, and inside the identity map).

use core::ops::Range;

/// Offset in `boot_params` of `e820_entries` (u8).
pub const BP_E820_ENTRIES: usize = 0x1e8;
/// Offset in `boot_params` of `e820_table` (128 entries of 20 bytes).
pub const BP_E820_TABLE: usize = 0x2d0;
/// Offset in `boot_params` of `hdr.ramdisk_image` (u32).
pub const BP_RAMDISK_IMAGE: usize = 0x218;
/// Offset in `boot_params` of `hdr.ramdisk_size` (u32).
pub const BP_RAMDISK_SIZE: usize = 0x21c;
/// Entries the table holds at most.
pub const E820_MAX: usize = 128;
/// Bytes per entry: addr u64, size u64, type u32.
pub const E820_ENTRY_SIZE: usize = 20;
/// Type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type (`E820_RAM` = usable).
    pub kind: u32,
}

impl Entry {
    /// Parses the 20-byte wire form.
    pub fn from_bytes(b: &[u8; E820_ENTRY_SIZE]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        let addr = u64::from_le_bytes(a);
        a.copy_from_slice(&b[8..16]);
        let size = u64::from_le_bytes(a);
        let kind = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        Self { addr, size, kind }
    }

    /// The range it covers (clamped at `u64::MAX`).
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr.saturating_add(self.size)
    }
}

/// The heap arena: from `image_end` up to the end of the RAM entry holding
/// `image_end`, clipped to `limit` (the end of the identity map) and to the
/// start of the initrd (`ramdisk`, if it lies above). `None` when the image
/// end is in no RAM entry or nothing is left.
pub fn heap_range(
    entries: impl Iterator<Item = Entry>,
    image_end: u64,
    limit: u64,
    ramdisk: Option<Range<u64>>,
) -> Option<Range<u64>> {
    let mut ram: Option<Range<u64>> = None;
    for e in entries.filter(|e| e.kind == E820_RAM) {
        let r = e.range();
        if r.start <= image_end && image_end < r.end {
            ram = Some(r);
        }
    }
    let mut end = ram?.end.min(limit);
    if let Some(rd) = ramdisk.filter(|r| !r.is_empty() && r.start >= image_end) {
        end = end.min(rd.start);
    }
    (end > image_end).then_some(image_end..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> Entry {
        Entry {
            addr,
            size,
            kind: E820_RAM,
        }
    }

    #[test]
    fn entry_parses_little_endian() {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
        b[8..16].copy_from_slice(&(15u64 << 20).to_le_bytes());
        b[16] = 1;
        assert_eq!(Entry::from_bytes(&b), ram(0x10_0000, 15 << 20));
    }

    #[test]
    fn heap_runs_from_image_end_to_the_end_of_its_ram() {
        // cell0-vmm with 16 MiB: low RAM, then 1 MiB..16 MiB.
        let map = [ram(0, 0x9fc00), ram(0x10_0000, 15 << 20)];
        assert_eq!(
            heap_range(map.into_iter(), 0x50_0000, 4 << 30, None),
            Some(0x50_0000..16 << 20)
        );
        // An initrd above the image caps it; one below does not.
        assert_eq!(
            heap_range(
                map.into_iter(),
                0x50_0000,
                4 << 30,
                Some(0xe0_0000..0x100_0000)
            ),
            Some(0x50_0000..0xe0_0000)
        );
        assert_eq!(
            heap_range(map.into_iter(), 0x50_0000, 4 << 30, Some(0x1000..0x2000)),
            Some(0x50_0000..16 << 20)
        );
    }

    #[test]
    fn heap_stops_at_the_identity_map_and_needs_ram() {
        // 5 GiB: 1 MiB..3 GiB, then 4 GiB..6 GiB.
        let map = [ram(0x10_0000, (3 << 30) - 0x10_0000), ram(4 << 30, 2 << 30)];
        assert_eq!(
            heap_range(map.into_iter(), 0x50_0000, 4 << 30, None),
            Some(0x50_0000..3 << 30)
        );
        let reserved = Entry {
            addr: 0x10_0000,
            size: 16 << 20,
            kind: 2,
        };
        assert_eq!(
            heap_range([reserved].into_iter(), 0x50_0000, 4 << 30, None),
            None
        );
        // The image fills its RAM entry.
        assert_eq!(
            heap_range(
                [ram(0x10_0000, 0x40_0000)].into_iter(),
                0x50_0000,
                4 << 30,
                None
            ),
            None
        );
    }
}
