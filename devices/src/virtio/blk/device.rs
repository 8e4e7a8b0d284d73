// SPDX-License-Identifier: Apache-2.0
//! The virtio-blk device: takes requests from its queue and runs them on a backend.
//!
//! A chain that cannot carry a status (loops, too long, outside guest memory,
//! no writable byte) is returned as used with length 0 and counted; any other
//! bad request gets `IOERR` or `UNSUPP` in its status byte. A corrupt ring
//! (avail index past the queue size, unwritable used ring) marks the device
//! NEEDS_RESET and stops it until the driver resets it.

use std::sync::Arc;

use crate::virtio::single_queue::SingleQueue;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{QueueOwnedT, QueueT};

use super::request::{ChainError, Outcome, execute};
use super::uapi::*;
use super::{
    BlockError, BlockMetrics, DiskBackend, FileDisk, ID_BYTES, QUEUE_SIZES, SECTOR_SIZE, SEG_MAX,
};
use crate::virtio::{
    GuestMemory, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtQueue, VirtioDevice,
    VirtioError, count_and_warn,
};

/// A virtio-blk device over backend `D`.
pub struct Block<D: DiskBackend> {
    pub(crate) disk: D,
    read_only: bool,
    id: [u8; ID_BYTES],
    acked_features: u64,
    pub(crate) metrics: Arc<BlockMetrics>,
    /// Activation, eventfds and the queue.
    pub(crate) q: SingleQueue,
}

impl<D: DiskBackend> std::fmt::Debug for Block<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("sectors", &self.sectors())
            .field("read_only", &self.read_only)
            .field("active", &self.q.active.is_some())
            .finish()
    }
}

impl Block<FileDisk> {
    /// A device backed by the image file at `path` (`--disk PATH[,ro]`).
    pub fn open(path: &std::path::Path, read_only: bool) -> Result<Self, BlockError> {
        Self::with_backend(FileDisk::open(path, read_only)?, read_only, b"cell0-disk")
    }
}

impl<D: DiskBackend> Block<D> {
    /// A device over any backend; `serial` (at most 20 bytes, longer is cut)
    /// is what `GET_ID` returns.
    pub fn with_backend(disk: D, read_only: bool, serial: &[u8]) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial[..n]);
        Ok(Self {
            disk,
            read_only,
            id,
            acked_features: 0,
            metrics: Arc::new(BlockMetrics::default()),
            q: SingleQueue::new().map_err(BlockError::EventSource)?,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.len() / SECTOR_SIZE
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The backend.
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// The backend, mutably.
    pub fn disk_mut(&mut self) -> &mut D {
        &mut self.disk
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn config(&self) -> [u8; 16] {
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; ... }
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.sectors().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Runs every available request.
    pub(crate) fn process_queue(&mut self) {
        let Some(a) = self.q.active.as_mut() else {
            return;
        };
        if a.broken {
            return;
        }
        let m = &self.metrics;
        let mem = &a.mem;
        let q = &mut a.queue.queue;
        let mut used_any = false;
        let res: Result<(), virtio_queue::Error> = (|| {
            loop {
                q.disable_notification(mem)?;
                while let Some(chain) = q.iter(mem)?.next() {
                    let head = chain.head_index();
                    let len = match execute(mem, chain, &mut self.disk, self.read_only, &self.id) {
                        Ok(c) => {
                            count(m, c.kind, c.outcome, c.bytes);
                            c.used_len
                        }
                        Err(e) => {
                            let counter = match e {
                                ChainError::NoStatus => &m.no_status,
                                ChainError::Incomplete | ChainError::BadBuffer => &m.bad_chain,
                            };
                            count_and_warn(counter, &format!("virtio-blk: unusable chain: {e}"));
                            0
                        }
                    };
                    crate::virtio::add_used(q, mem, head, len)?;
                    used_any = true;
                }
                if !q.enable_notification(mem)? {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = res {
            count_and_warn(
                &m.queue_errors,
                &format!("virtio-blk: the queue is corrupt: {e}"),
            );
            a.broken = true;
            a.interrupt.set_needs_reset();
            return;
        }
        if used_any && a.queue.queue.needs_notification(&a.mem).unwrap_or(true) {
            if let Err(e) = a.interrupt.signal_used_queue() {
                count_and_warn(&m.irq_fails, &format!("virtio-blk: {e}"));
            }
        }
    }
}

fn count(m: &BlockMetrics, kind: Option<u32>, outcome: Outcome, bytes: u64) {
    match outcome {
        Outcome::Ok => match kind {
            Some(VIRTIO_BLK_T_IN) => {
                BlockMetrics::inc(&m.reads);
                BlockMetrics::add(&m.read_bytes, bytes);
            }
            Some(VIRTIO_BLK_T_OUT) => {
                BlockMetrics::inc(&m.writes);
                BlockMetrics::add(&m.write_bytes, bytes);
            }
            Some(VIRTIO_BLK_T_FLUSH) => BlockMetrics::inc(&m.flushes),
            _ => BlockMetrics::inc(&m.get_ids),
        },
        Outcome::Malformed => count_and_warn(&m.malformed, "virtio-blk: malformed request"),
        Outcome::OutOfRange => count_and_warn(
            &m.out_of_range,
            "virtio-blk: request past the end of the disk",
        ),
        Outcome::ReadOnly => count_and_warn(
            &m.ro_writes,
            "virtio-blk: write refused on a read-only disk",
        ),
        Outcome::Unsupported => count_and_warn(
            &m.unsupported,
            &format!("virtio-blk: unsupported request type {kind:?}"),
        ),
        Outcome::Io => count_and_warn(&m.io_errors, "virtio-blk: disk I/O failed"),
    }
}

impl<D: DiskBackend> VirtioDevice for Block<D> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | ro
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-blk: guest wrote read-only config space"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<VirtQueue>,
        interrupt: Interrupt,
    ) -> Result<(), VirtioError> {
        let res = self.q.activate(mem, queues, interrupt);
        match &res {
            Ok(()) => BlockMetrics::inc(&self.metrics.activations),
            Err(_) => BlockMetrics::inc(&self.metrics.activate_fails),
        }
        res
    }

    fn reset(&mut self) {
        self.q.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.q.active.is_some()
    }
}
