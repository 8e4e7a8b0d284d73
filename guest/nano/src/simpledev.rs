// SPDX-License-Identifier: Apache-2.0
//! A busy-polling driver for one-queue virtio devices (virtio-blk,
//! virtio-rng): negotiate VERSION_1 (and nothing that changes the rings),
//! one 16-entry queue in static memory, one request at a time. The device's
//! interrupt pin is never routed: polling a used ring costs no VM exit.
//! The self-tests `blk` and `rng` and the evil test's recovery checks use it.

use alloc::format;
use core::sync::atomic::{AtomicBool, Ordering};

use cell0_nano::cmdline::MmioDevice;
use cell0_nano::virtq::{Buf, QueueMem, Virtq};

use crate::arch::Shared;
use crate::selftest::Fail;
use crate::time;
use crate::virtio::Mmio;

/// Entries of the queue.
pub const QSIZE: usize = 16;

static QUEUE: Shared<QueueMem<QSIZE>> = Shared::new(QueueMem::new());
/// The queue memory belongs to at most one driver at a time.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// virtio-blk's device ID.
pub const DEVICE_ID_BLK: u32 = 2;
/// virtio-rng's device ID.
pub const DEVICE_ID_RNG: u32 = 4;

/// A running one-queue device.
pub struct Simple {
    /// Its registers.
    pub mmio: Mmio,
    q: Virtq<QSIZE>,
    /// Features the device offered (both pages).
    pub offered: u64,
}

impl Simple {
    /// Resets and brings up `dev`, which must have device ID `id`.
    pub fn open(dev: &MmioDevice, id: u32) -> Result<Self, Fail> {
        let mmio = Mmio::new(dev)?;
        let got = mmio.probe()?;
        if got != id {
            return Err(Fail(format!(
                "virtio-mmio device at {:#x} has device ID {got}, not {id}",
                dev.base
            )));
        }
        if IN_USE.swap(true, Ordering::AcqRel) {
            return Err(Fail::from("the one-queue driver is already running"));
        }
        Self::start(mmio).inspect_err(|_| IN_USE.store(false, Ordering::Release))
    }

    fn start(mmio: Mmio) -> Result<Self, Fail> {
        let mut offered = 0u64;
        mmio.negotiate(false)?;
        for page in 0..2u32 {
            mmio.write(crate::virtio::reg::DEVICE_FEATURES_SEL, page);
            offered |= u64::from(mmio.read(crate::virtio::reg::DEVICE_FEATURES)) << (32 * page);
        }
        // SAFETY: IN_USE makes this driver the only user of QUEUE, which is
        // identity-mapped guest RAM that lives forever.
        let q = unsafe { Virtq::new(QUEUE.get(), false) };
        mmio.setup_queue(0, q.size(), q.addresses())?;
        mmio.driver_ok()?;
        Ok(Self { mmio, q, offered })
    }

    /// Runs one request made of `bufs` and waits (busy) for the device to
    /// return it: the bytes it wrote. Fails after `timeout_ms` or when the
    /// device asks for a reset.
    pub fn request(&mut self, bufs: &[Buf], timeout_ms: u64) -> Result<u32, Fail> {
        let head = self
            .q
            .push(bufs)
            .ok_or_else(|| Fail::from("the request has more buffers than the queue holds"))?;
        self.q.publish();
        if self.q.needs_kick() {
            self.mmio.notify(0);
        }
        let deadline = time::deadline_ms(timeout_ms);
        loop {
            if let Some(r) = self.q.pop_used() {
                return match r {
                    Ok((h, len)) if h == head => Ok(len),
                    Ok((h, _)) => Err(Fail(format!("the device returned head {h}, not {head}"))),
                    Err(e) => Err(Fail(format!("the device returned a bad used entry: {e:?}"))),
                };
            }
            if time::passed(deadline) {
                let st = self.mmio.read(crate::virtio::reg::STATUS);
                return Err(Fail(format!(
                    "the device did not answer within {timeout_ms} ms (status {st:#x})"
                )));
            }
            core::hint::spin_loop();
        }
    }

    /// Resets the device and frees the queue memory.
    pub fn shutdown(self) {
        self.mmio.reset();
        IN_USE.store(false, Ordering::Release);
    }
}
