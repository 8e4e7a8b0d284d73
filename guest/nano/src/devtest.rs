// SPDX-License-Identifier: Apache-2.0
//! The self-tests of virtio-blk (`blk`) and virtio-rng (`rng`), with the
//! busy-polling one-queue driver (`simpledev`). README.md gives their exact
//! output.
//!
//! The disk the `blk` test expects holds, in sector s, byte i, the payload
//! pattern of call s (`pattern::byte(i, s)`); it writes sectors with the
//! pattern of call s + `WRITE_K` and reads them back.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use cell0_nano::cmdline::{self, MmioDevice};
use cell0_nano::pattern;
use cell0_nano::text::Escaped;
use cell0_nano::virtq::Buf;

use crate::nettest::opt;
use crate::say;
use crate::selftest::{Ctx, Fail};
use crate::simpledev::{DEVICE_ID_BLK, DEVICE_ID_RNG, Simple};
use crate::virtio::Mmio;

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// virtio-blk request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// virtio-blk status values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Feature bit: the disk is read-only.
const F_RO: u64 = 1 << 5;
/// Pattern offset of the sectors the `blk` test writes.
pub const WRITE_K: u32 = 0x55;
/// How long one request may take.
const REQUEST_MS: u64 = 5_000;

/// Every `virtio_mmio.device=` entry (a malformed one fails the test).
pub fn devices(ctx: &Ctx<'_>) -> Result<Vec<(usize, MmioDevice)>, Fail> {
    let mut v = Vec::new();
    for (i, d) in cmdline::mmio_devices(ctx.cmdline).enumerate() {
        match d {
            Ok(d) => v.push((i, d)),
            Err(e) => {
                return Err(Fail(format!(
                    "bad virtio_mmio.device value '{}': expected SIZE@BASE:IRQ",
                    Escaped(e)
                )));
            }
        }
    }
    Ok(v)
}

/// The first device with device ID `id`.
pub fn find(ctx: &Ctx<'_>, id: u32) -> Result<Option<MmioDevice>, Fail> {
    for (_, d) in devices(ctx)? {
        if Mmio::new(&d)?.probe()? == id {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// A virtio-blk request header.
fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn buf(b: &[u8], write: bool) -> Buf {
    Buf {
        addr: b.as_ptr() as u64,
        len: b.len() as u32,
        write,
    }
}

/// One virtio-blk request: header, optional data (device-writable for IN
/// and GET_ID), status. Returns the status byte.
pub fn blk_request(d: &mut Simple, kind: u32, sector: u64, data: &mut [u8]) -> Result<u8, Fail> {
    let h = header(kind, sector);
    let mut status = [0xffu8; 1];
    let device_writes = kind == T_IN || kind == T_GET_ID;
    let mut bufs = vec![buf(&h, false)];
    if !data.is_empty() {
        bufs.push(buf(data, device_writes));
    }
    bufs.push(buf(&status, true));
    d.request(&bufs, REQUEST_MS)?;
    // SAFETY: a byte of our own frame, which the device wrote through guest
    // memory: read it volatile so the compiler does not assume 0xff.
    Ok(unsafe { core::ptr::read_volatile(status.as_mut_ptr()) })
}

/// Reads `count` sectors from `sector` into a new buffer.
pub fn blk_read(d: &mut Simple, sector: u64, count: usize) -> Result<(u8, Vec<u8>), Fail> {
    let mut v = vec![0u8; count * SECTOR];
    let s = blk_request(d, T_IN, sector, &mut v)?;
    Ok((s, v))
}

/// The first byte of `data` (sectors from `first`) that is not sector s's
/// pattern `k(s)`: (sector, byte, want, got).
pub fn sector_difference(
    data: &[u8],
    first: u64,
    k: impl Fn(u64) -> u32,
) -> Option<(u64, usize, u8, u8)> {
    for (i, chunk) in data.chunks(SECTOR).enumerate() {
        let s = first + i as u64;
        if let Some(at) = pattern::first_difference_from(chunk, SECTOR, k(s)) {
            let want = pattern::byte(at, k(s));
            return Some((s, at, want, chunk.get(at).copied().unwrap_or(0)));
        }
    }
    None
}

fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        2 => "UNSUPP",
        _ => "unknown",
    }
}

/// `blk`: identify the disk, read its first sectors and check them, write
/// the next ones, flush, read them back and check them (read-only disk: the
/// write must be refused), and read past the end (refused).
pub fn blk(ctx: &Ctx<'_>) -> Result<(), Fail> {
    let dev = find(ctx, DEVICE_ID_BLK)?.ok_or_else(|| {
        Fail::from("no virtio-blk device on the cmdline (start the VMM with --disk PATH)")
    })?;
    let mut d = Simple::open(&dev, DEVICE_ID_BLK)?;
    let r = blk_body(ctx, &mut d, &dev);
    d.shutdown();
    r
}

fn blk_body(ctx: &Ctx<'_>, d: &mut Simple, dev: &MmioDevice) -> Result<(), Fail> {
    let capacity = d.mmio.config_u64(0);
    let ro = d.offered & F_RO != 0;
    say!(
        "blk: virtio-blk at {:#x} irq {}, {} sectors of 512 bytes, {}",
        dev.base,
        dev.irq,
        capacity,
        if ro { "read-only" } else { "read-write" }
    );
    let mut id = [0u8; 20];
    let s = blk_request(d, T_GET_ID, 0, &mut id)?;
    if s != S_OK {
        return Err(Fail(format!("GET_ID answered status {s}")));
    }
    let n = id.iter().position(|b| *b == 0).unwrap_or(id.len());
    say!("blk: device id '{}'", Escaped(&id[..n]));

    let count = opt(ctx, "cell0.sectors", 8, 1, 64)? as usize;
    if capacity < 2 * count as u64 {
        return Err(Fail(format!(
            "the disk has {capacity} sectors; the test needs {}",
            2 * count
        )));
    }
    let (s, data) = blk_read(d, 0, count)?;
    if s != S_OK {
        return Err(Fail(format!(
            "reading sectors 0..{count} answered status {s}"
        )));
    }
    if let Some((sec, at, want, got)) = sector_difference(&data, 0, |s| s as u32) {
        return Err(Fail(format!(
            "sector {sec} differs at byte {at}: expected {want:#04x}, got {got:#04x}"
        )));
    }
    say!(
        "blk: read sectors 0..{} ({} bytes), checked byte for byte",
        count,
        count * SECTOR
    );

    let first = count as u64;
    let mut w = vec![0u8; count * SECTOR];
    for (i, chunk) in w.chunks_mut(SECTOR).enumerate() {
        pattern::fill(chunk, (first + i as u64) as u32 + WRITE_K);
    }
    let s = blk_request(d, T_OUT, first, &mut w)?;
    if ro {
        if s != S_IOERR {
            return Err(Fail(format!(
                "a write to the read-only disk answered status {s} ({}), not IOERR",
                status_name(s)
            )));
        }
        let (s, again) = blk_read(d, first, count)?;
        if s != S_OK || sector_difference(&again, first, |s| s as u32).is_some() {
            return Err(Fail::from("the refused write changed the read-only disk"));
        }
        say!(
            "blk: write to the read-only disk refused with status IOERR (1), sectors {}..{} unchanged",
            first,
            first + count as u64
        );
    } else {
        if s != S_OK {
            return Err(Fail(format!(
                "writing sectors {first}..{} answered status {s}",
                first + count as u64
            )));
        }
        let s = blk_request(d, T_FLUSH, 0, &mut [])?;
        if s != S_OK {
            return Err(Fail(format!("FLUSH answered status {s}")));
        }
        let (s, back) = blk_read(d, first, count)?;
        if s != S_OK {
            return Err(Fail(format!("reading back answered status {s}")));
        }
        if let Some((sec, at, want, got)) = sector_difference(&back, first, |s| s as u32 + WRITE_K)
        {
            return Err(Fail(format!(
                "sector {sec} read back differs at byte {at}: expected {want:#04x}, got {got:#04x}"
            )));
        }
        say!(
            "blk: wrote sectors {}..{}, flushed, read back and checked byte for byte",
            first,
            first + count as u64
        );
    }
    let (s, _) = blk_read(d, capacity, 1)?;
    if s != S_IOERR {
        return Err(Fail(format!(
            "reading past the end answered status {s} ({}), not IOERR",
            status_name(s)
        )));
    }
    say!(
        "blk: read past the end (sector {}) refused with status IOERR (1)",
        capacity
    );
    Ok(())
}

/// Reads `n` random bytes.
pub fn rng_read(d: &mut Simple, n: usize) -> Result<Vec<u8>, Fail> {
    let v = vec![0u8; n];
    let len = d.request(&[buf(&v, true)], REQUEST_MS)? as usize;
    if len != n {
        return Err(Fail(format!("asked for {n} random bytes, got {len}")));
    }
    // SAFETY: the device wrote `v` through guest memory; read it back
    // volatile so the compiler does not assume the zeros it wrote.
    let out = (0..n)
        .map(|i| unsafe { core::ptr::read_volatile(v.as_ptr().add(i)) })
        .collect();
    Ok(out)
}

/// `rng`: eight reads of 64 bytes and one of 4096; every read filled, no
/// two alike, and the big one with at least 200 distinct byte values.
pub fn rng(ctx: &Ctx<'_>) -> Result<(), Fail> {
    let dev = find(ctx, DEVICE_ID_RNG)?.ok_or_else(|| {
        Fail::from("no virtio-rng device on the cmdline (start the VMM with --rng)")
    })?;
    let mut d = Simple::open(&dev, DEVICE_ID_RNG)?;
    let r = rng_body(&mut d, &dev);
    d.shutdown();
    r
}

fn rng_body(d: &mut Simple, dev: &MmioDevice) -> Result<(), Fail> {
    say!("rng: virtio-rng at {:#x} irq {}", dev.base, dev.irq);
    let mut small: Vec<Vec<u8>> = Vec::new();
    for _ in 0..8 {
        let r = rng_read(d, 64)?;
        if r.iter().all(|b| *b == 0) {
            return Err(Fail::from("a 64-byte read came back all zero"));
        }
        if small.contains(&r) {
            return Err(Fail::from("two 64-byte reads came back equal"));
        }
        small.push(r);
    }
    let big = rng_read(d, 4096)?;
    let mut seen = [false; 256];
    for b in &big {
        seen[usize::from(*b)] = true;
    }
    let distinct = seen.iter().filter(|s| **s).count();
    if distinct < 200 {
        return Err(Fail(format!(
            "4096 random bytes hold only {distinct} distinct values"
        )));
    }
    say!(
        "rng: 8 reads of 64 bytes and 1 of 4096 bytes, all filled, no two alike, {} distinct byte values in the big one",
        distinct
    );
    Ok(())
}
