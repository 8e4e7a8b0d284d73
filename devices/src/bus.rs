// SPDX-License-Identifier: Apache-2.0
//! Address-range buses (port I/O and MMIO) that devices register on.
//!
//! The vCPU run loop hands every PIO/MMIO exit to [`Bus::read`] or [`Bus::write`];
//! the bus finds the device whose range holds the address and calls it with the
//! offset inside that range. Nothing in the run loop knows port numbers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that sits on a bus and answers accesses inside its range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range or one that wraps past the end of the address space.
    #[error("range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// A map from address ranges to devices. Cloning shares the devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (base, e) in &self.ranges {
            l.entry(&format_args!("{base:#x}+{:#x}", e.len));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for `[base, base + len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off.checked_add(size as u64)? <= e.len).then_some((off, &e.dev))
    }

    /// Dispatches a read. Returns false (and leaves `data` untouched) when no device
    /// covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                // A poisoned lock means a device thread panicked; keep serving with its state.
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Reg::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().last, vec![(0, vec![0x41])]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
        // An access that straddles the end of the range is refused.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Reg::default())) as SharedDevice;
        bus.insert(d(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(d(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf00, 0x101),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        bus.insert(d(), 0x1100, 0x10).unwrap();
        bus.insert(d(), 0xf00, 0x100).unwrap();
        assert!(matches!(
            bus.insert(d(), 0, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
