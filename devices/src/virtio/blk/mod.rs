// SPDX-License-Identifier: Apache-2.0
//! virtio-blk: a file-backed disk, read-only or read-write, with flush.
//!
//! The device ([`Block`]) takes requests from its one queue and runs them
//! synchronously against a [`DiskBackend`] on the VMM's event thread (the
//! Firecracker "sync" engine). The production backend is [`FileDisk`] (`pread`,
//! `pwrite`, `fdatasync` on a regular file); tests plug in their own.
//!
//! Layout: `device.rs` (the [`crate::virtio::VirtioDevice`]), `request.rs` (one
//! request parsed from a descriptor chain through virtio-queue's `Reader` and
//! `Writer`), `event_handler.rs` (the event-manager subscriber), `metrics.rs`.
//!
//! Supported request types: `IN`, `OUT`, `FLUSH`, `GET_ID`. Features offered:
//! `VERSION_1`, `RING_EVENT_IDX`, `FLUSH`, `SEG_MAX`, and `RO` for a read-only disk.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

pub use device::Block;
pub use metrics::BlockMetrics;

/// Sector size of the virtio-blk protocol (not of the backing file).
pub const SECTOR_SIZE: u64 = 512;
/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue sizes as the transport reads them.
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Data segments per request the driver may use (`seg_max`): the queue size
/// less the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the serial number `GET_ID` returns (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// Wire constants of virtio-blk (virtio 1.2 §5.2).
pub mod uapi {
    use virtio_bindings::virtio_blk as b;
    /// Read sectors.
    pub const VIRTIO_BLK_T_IN: u32 = b::VIRTIO_BLK_T_IN;
    /// Write sectors.
    pub const VIRTIO_BLK_T_OUT: u32 = b::VIRTIO_BLK_T_OUT;
    /// Flush the write cache.
    pub const VIRTIO_BLK_T_FLUSH: u32 = b::VIRTIO_BLK_T_FLUSH;
    /// Read the device's serial number.
    pub const VIRTIO_BLK_T_GET_ID: u32 = b::VIRTIO_BLK_T_GET_ID;
    /// Request completed.
    pub const VIRTIO_BLK_S_OK: u8 = b::VIRTIO_BLK_S_OK as u8;
    /// Request failed (I/O error, out of range, write to a read-only disk).
    pub const VIRTIO_BLK_S_IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
    /// Request type not supported.
    pub const VIRTIO_BLK_S_UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;
    /// Feature: the disk is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
    /// Feature: `seg_max` in config space is valid.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
    /// Feature: the device takes `FLUSH`.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
}

/// Errors of the block device and its backends.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the disk image failed.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The disk image is not a regular file or block device of a usable size.
    #[error("disk image {} is empty or not a regular file", path.display())]
    NotADisk {
        /// The image.
        path: PathBuf,
    },
    /// Creating the activation eventfd failed.
    #[error("cannot create an event source")]
    EventSource(#[source] io::Error),
}

/// What the device reads and writes: a byte-addressed disk.
pub trait DiskBackend: Send {
    /// Size in bytes (the device exposes `len / 512` sectors).
    fn len(&self) -> u64;
    /// Whether the disk has no sectors.
    fn is_empty(&self) -> bool {
        self.len() < SECTOR_SIZE
    }
    /// Fills `buf` from byte `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at byte `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A disk image file (`--disk PATH[,ro]`).
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    len: u64,
}

impl FileDisk {
    /// Opens `path`, read-only or read-write.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let len = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() {
            // A block device reports its size through seeking to the end.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0)).map_err(open_err)?
        } else {
            0
        };
        if len < SECTOR_SIZE {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { file, len })
    }
}

impl DiskBackend for FileDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// An in-memory disk, for tests and fuzzing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemDisk {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Flushes seen.
    pub flushes: u64,
    /// When set, every read and write fails with this OS error number.
    pub fail_errno: Option<i32>,
}

impl MemDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Self {
            data: vec![0; (sectors * SECTOR_SIZE) as usize],
            ..Self::default()
        }
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        if let Some(e) = self.fail_errno {
            return Err(io::Error::from_raw_os_error(e));
        }
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.data.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        Ok(start..end)
    }
}

impl DiskBackend for MemDisk {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self.fail_errno {
            return Err(io::Error::from_raw_os_error(e));
        }
        self.flushes += 1;
        Ok(())
    }
}
