// SPDX-License-Identifier: Apache-2.0
//! One virtio-blk request: a read-only header (type, reserved, sector), data
//! buffers, and a one-byte device-writable status at the end of the chain.
//!
//! The chain is split with virtio-queue's `Reader` (device-readable part) and
//! `Writer` (device-writable part), which check every buffer against guest
//! memory before any byte moves. A request that cannot even carry a status
//! byte is returned with used length 0; every other failure is reported in
//! the status byte.

use std::io::{Read, Write};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Reader, Writer};

use super::uapi::*;
use super::{DiskBackend, ID_BYTES, SECTOR_SIZE};
use crate::virtio::GuestMemory;

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_SIZE: usize = 16;
/// Bytes moved between the disk and guest memory per step.
const BOUNCE: usize = 256 * 1024;

/// Why a chain is not a usable request (nothing can be reported to the guest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain loops or is longer than the queue.
    #[error("descriptor chain loops or is too long")]
    Incomplete,
    /// A buffer lies outside guest memory, or the lengths overflow.
    #[error("descriptor buffer outside guest memory")]
    BadBuffer,
    /// No device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
}

/// How a parsed request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Completed: status OK.
    Ok,
    /// The header is short, or a buffer has the wrong direction or size.
    Malformed,
    /// The sector range lies past the end of the disk (or overflows).
    OutOfRange,
    /// A write on a read-only disk.
    ReadOnly,
    /// The backend failed.
    Io,
    /// Unknown request type.
    Unsupported,
}

impl Outcome {
    /// The status byte for the guest.
    pub fn status(self) -> u8 {
        match self {
            Outcome::Ok => VIRTIO_BLK_S_OK,
            Outcome::Unsupported => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The result of one request: what to put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Request type from the header (when there was one).
    pub kind: Option<u32>,
    /// How it ended.
    pub outcome: Outcome,
    /// Bytes the device wrote into the chain (data plus the status byte).
    pub used_len: u32,
    /// Data bytes moved to or from the disk.
    pub bytes: u64,
}

fn chain_is_complete(chain: &DescriptorChain<&GuestMemory>) -> bool {
    let mut last: Option<Descriptor> = None;
    for d in chain.clone() {
        last = Some(d);
    }
    last.is_some_and(|d| !d.has_next())
}

/// Runs the request in `chain` against `disk`. `read_only` refuses writes;
/// `id` is the serial `GET_ID` returns.
pub fn execute(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    disk: &mut dyn DiskBackend,
    read_only: bool,
    id: &[u8; ID_BYTES],
) -> Result<Completion, ChainError> {
    if !chain_is_complete(&chain) {
        return Err(ChainError::Incomplete);
    }
    let mut reader = Reader::<()>::new(mem, chain.clone()).map_err(|_| ChainError::BadBuffer)?;
    let mut writer = Writer::<()>::new(mem, chain).map_err(|_| ChainError::BadBuffer)?;
    let writable = writer.available_bytes();
    if writable == 0 {
        return Err(ChainError::NoStatus);
    }
    // The last writable byte is the status; `writer` keeps the data part.
    let mut status_w = writer
        .split_at(writable - 1)
        .map_err(|_| ChainError::NoStatus)?;

    let mut hdr = [0u8; HEADER_SIZE];
    let (kind, outcome, bytes) = if reader.read_exact(&mut hdr).is_err() {
        (None, Outcome::Malformed, 0)
    } else {
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let (outcome, bytes) = run(kind, sector, &mut reader, &mut writer, disk, read_only, id);
        (Some(kind), outcome, bytes)
    };
    let data_written = writer.bytes_written();
    // The status buffer was checked writable by `Writer::new`; a failure here
    // means guest memory went away, and the guest sees used length 0 below.
    let status_ok = status_w.write_all(&[outcome.status()]).is_ok();
    let used_len = if status_ok {
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
    } else {
        0
    };
    Ok(Completion {
        kind,
        outcome,
        used_len,
        bytes,
    })
}

/// Checks that `len` bytes at `sector` lie on the disk; returns the byte offset.
fn disk_range(disk: &dyn DiskBackend, sector: u64, len: usize) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len as u64)?;
    (end <= disk.len() - disk.len() % SECTOR_SIZE).then_some(start)
}

fn run(
    kind: u32,
    sector: u64,
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    disk: &mut dyn DiskBackend,
    read_only: bool,
    id: &[u8; ID_BYTES],
) -> (Outcome, u64) {
    match kind {
        VIRTIO_BLK_T_IN => {
            // Data is device-writable; no readable data may follow the header.
            let len = writer.available_bytes();
            if reader.available_bytes() != 0 || len as u64 % SECTOR_SIZE != 0 {
                return (Outcome::Malformed, 0);
            }
            let Some(mut off) = disk_range(disk, sector, len) else {
                return (Outcome::OutOfRange, 0);
            };
            let mut buf = vec![0u8; len.min(BOUNCE)];
            let mut left = len;
            while left > 0 {
                let n = left.min(BOUNCE);
                if disk.read_at(&mut buf[..n], off).is_err() {
                    return (Outcome::Io, (len - left) as u64);
                }
                if writer.write_all(&buf[..n]).is_err() {
                    return (Outcome::Malformed, (len - left) as u64);
                }
                off += n as u64;
                left -= n;
            }
            (Outcome::Ok, len as u64)
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes();
            if writer.available_bytes() != 0 || len as u64 % SECTOR_SIZE != 0 {
                return (Outcome::Malformed, 0);
            }
            if read_only {
                return (Outcome::ReadOnly, 0);
            }
            let Some(mut off) = disk_range(disk, sector, len) else {
                return (Outcome::OutOfRange, 0);
            };
            let mut buf = vec![0u8; len.min(BOUNCE)];
            let mut left = len;
            while left > 0 {
                let n = left.min(BOUNCE);
                if reader.read_exact(&mut buf[..n]).is_err() {
                    return (Outcome::Malformed, (len - left) as u64);
                }
                if disk.write_at(&buf[..n], off).is_err() {
                    return (Outcome::Io, (len - left) as u64);
                }
                off += n as u64;
                left -= n;
            }
            (Outcome::Ok, len as u64)
        }
        VIRTIO_BLK_T_FLUSH => {
            if read_only {
                return (Outcome::Ok, 0);
            }
            match disk.flush() {
                Ok(()) => (Outcome::Ok, 0),
                Err(_) => (Outcome::Io, 0),
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            // The driver gives a 20-byte buffer; a shorter one gets a prefix.
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&id[..n]) {
                Ok(()) => (Outcome::Ok, 0),
                Err(_) => (Outcome::Malformed, 0),
            }
        }
        _ => (Outcome::Unsupported, 0),
    }
}
