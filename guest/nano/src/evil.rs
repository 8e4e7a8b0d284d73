// SPDX-License-Identifier: Apache-2.0
//! `cell0.test=evil cell0.attack=NAME`: a malicious guest. It runs one attack
//! against every virtio device on the cmdline (virtio-vsock, virtio-blk,
//! virtio-rng), writing the transport registers and the rings by hand, prints
//! what the device did, then resets the device and checks that it works
//! again with the honest drivers. The host side (tests/tests/vm_evil.rs)
//! checks that the VMM lives or ends cleanly, that it holds no more fds,
//! threads or memory than before, and that another VM keeps working.
//!
//! What a device does that the virtio spec forbids, or a device that stays
//! wedged after a reset, is a **finding**: `evil: NAME: DEVICE: FINDING: …`.
//! The test passes only without findings. README.md lists the attacks.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering, fence};

use cell0_nano::cmdline::MmioDevice;
use cell0_nano::layout::{IOAPIC_BASE, LAPIC_BASE};
use cell0_nano::text::Escaped;
use cell0_nano::virtq::{DESC_F_NEXT, DESC_F_WRITE};
use cell0_nano::vsock_wire::{HOST_CID, Header, OP_REQUEST, OP_RW, TYPE_STREAM};
use cell0_proto::bytes::Bytes;

use crate::arch::Shared;
use crate::devtest::{self, SECTOR};
use crate::nettest::{cmdline_str, opt};
use crate::selftest::{Ctx, Fail};
use crate::simpledev::{DEVICE_ID_BLK, DEVICE_ID_RNG, Simple};
use crate::sypas::Client;
use crate::virtio::{DEVICE_ID_VSOCK, Mmio, reg, status};
use crate::vsock::{Mode, Vsock};
use crate::{galloc, say, sys, time};

/// Descriptor flag: the buffer is an indirect descriptor table.
const DESC_F_INDIRECT: u16 = 4;
/// Entries of every queue the attacks set up.
const QSZ: u16 = 16;
/// Bytes of arena per queue: descriptors at +0, avail at +0x1000, used at
/// +0x2000, sixteen 256-byte buffers at +0x3000.
const SLOT: u64 = 0x4000;
/// Queues a device has at most (virtio-vsock: RX, TX, event).
const MAX_QUEUES: usize = 3;
/// The data area after the queue slots.
const DATA: u64 = SLOT * MAX_QUEUES as u64;
const DATA_SIZE: u64 = 0x10000;
const ARENA_SIZE: usize = (DATA + DATA_SIZE) as usize;
/// The host port the vsock attacks and the recovery echo use.
const HOST_PORT: u32 = 1024;
/// How long a device gets to return a chain.
const USED_MS: u64 = 1_000;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

/// Rings and buffers of the attacks: guest RAM the device may read and
/// write, at fixed guest-physical (= virtual) addresses.
static ARENA: Shared<Arena> = Shared::new(Arena([0; ARENA_SIZE]));
static ARENA_TAKEN: AtomicBool = AtomicBool::new(false);

fn arena() -> u64 {
    ARENA.get() as u64
}

/// A raw queue in the arena, written by hand.
#[derive(Debug, Clone, Copy)]
struct RawQ {
    base: u64,
}

impl RawQ {
    fn new(q: usize) -> Self {
        Self {
            base: arena() + q as u64 * SLOT,
        }
    }
    fn desc(self) -> u64 {
        self.base
    }
    fn avail(self) -> u64 {
        self.base + 0x1000
    }
    fn used(self) -> u64 {
        self.base + 0x2000
    }
    fn buf(self, i: u64) -> u64 {
        self.base + 0x3000 + i * 256
    }
    fn clear(self) {
        // SAFETY: the slot lies inside ARENA, which this test owns
        // (ARENA_TAKEN); the device is reset or not yet told about it.
        unsafe { ptr::write_bytes(self.base as *mut u8, 0, SLOT as usize) };
    }
    fn set_desc(self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc() + 16 * u64::from(i % QSZ);
        // SAFETY: descriptor i of this slot's table, inside ARENA.
        unsafe {
            ptr::write_volatile(d as *mut u64, addr);
            ptr::write_volatile((d + 8) as *mut u32, len);
            ptr::write_volatile((d + 12) as *mut u16, flags);
            ptr::write_volatile((d + 14) as *mut u16, next);
        }
    }
    /// Puts `head` on the available ring and moves its index.
    fn offer(self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail() + 4 + 2 * u64::from(idx % QSZ);
        // SAFETY: ring slot and index of this slot's available ring.
        unsafe { ptr::write_volatile(slot as *mut u16, head) };
        fence(Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { ptr::write_volatile((self.avail() + 2) as *mut u16, idx.wrapping_add(1)) };
        fence(Ordering::SeqCst);
    }
    fn avail_idx(self) -> u16 {
        // SAFETY: the avail index of this slot.
        unsafe { ptr::read_volatile((self.avail() + 2) as *const u16) }
    }
    fn used_idx(self) -> u16 {
        // SAFETY: the used index of this slot, written by the device.
        unsafe { ptr::read_volatile((self.used() + 2) as *const u16) }
    }
    fn used_elem(self, i: u16) -> (u32, u32) {
        let e = self.used() + 4 + 8 * u64::from(i % QSZ);
        // SAFETY: used element i of this slot, written by the device.
        unsafe {
            (
                ptr::read_volatile(e as *const u32),
                ptr::read_volatile((e + 4) as *const u32),
            )
        }
    }
    /// Waits (busy) until the used index reaches `want` or passes it.
    fn wait_used(self, want: u16, ms: u64) -> bool {
        let deadline = time::deadline_ms(ms);
        while self.used_idx().wrapping_sub(want) >= 0x8000 {
            if time::passed(deadline) {
                return false;
            }
            core::hint::spin_loop();
        }
        true
    }
}

/// A raw access of `width` bytes (1, 2, 4, 8) at any address, aligned or
/// not: one `mov`, so an MMIO access reaches the VMM exactly as written.
fn raw_read(addr: u64, width: u8) -> u64 {
    let v: u64;
    // SAFETY: `addr` is MMIO or RAM that the identity map covers; an access
    // the VMM does not back is answered by the VMM (it is the attack).
    unsafe {
        match width {
            1 => {
                let b: u8;
                asm!("mov {0}, byte ptr [{1}]", out(reg_byte) b, in(reg) addr, options(nostack));
                v = u64::from(b);
            }
            2 => {
                let w: u16;
                asm!("mov {0:x}, word ptr [{1}]", out(reg) w, in(reg) addr, options(nostack));
                v = u64::from(w);
            }
            4 => {
                let d: u32;
                asm!("mov {0:e}, dword ptr [{1}]", out(reg) d, in(reg) addr, options(nostack));
                v = u64::from(d);
            }
            _ => {
                asm!("mov {0}, qword ptr [{1}]", out(reg) v, in(reg) addr, options(nostack));
            }
        }
    }
    v
}

/// The write counterpart of `raw_read`.
fn raw_write(addr: u64, width: u8, v: u64) {
    // SAFETY: as `raw_read`; the targets are MMIO registers or this test's
    // own arena.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{1}], {0}", in(reg_byte) v as u8, in(reg) addr, options(nostack))
            }
            2 => {
                asm!("mov word ptr [{1}], {0:x}", in(reg) v as u16, in(reg) addr, options(nostack))
            }
            4 => {
                asm!("mov dword ptr [{1}], {0:e}", in(reg) v as u32, in(reg) addr, options(nostack))
            }
            _ => asm!("mov qword ptr [{1}], {0}", in(reg) v, in(reg) addr, options(nostack)),
        }
    }
}

/// The kinds of device the attacks know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vsock,
    Blk,
    Rng,
}

impl Kind {
    fn from_id(id: u32) -> Option<Self> {
        match id {
            DEVICE_ID_VSOCK => Some(Kind::Vsock),
            DEVICE_ID_BLK => Some(Kind::Blk),
            DEVICE_ID_RNG => Some(Kind::Rng),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Vsock => "virtio-vsock",
            Kind::Blk => "virtio-blk",
            Kind::Rng => "virtio-rng",
        }
    }
    fn queues(self) -> usize {
        match self {
            Kind::Vsock => 3,
            Kind::Blk | Kind::Rng => 1,
        }
    }
    /// The queue the driver puts requests on (vsock: TX).
    fn req_queue(self) -> usize {
        match self {
            Kind::Vsock => 1,
            Kind::Blk | Kind::Rng => 0,
        }
    }
}

/// One device under attack.
struct Target {
    dev: MmioDevice,
    index: usize,
    mmio: Mmio,
    kind: Kind,
}

impl Target {
    fn base(&self) -> u64 {
        self.dev.base
    }
    fn reg(&self, off: usize) -> u32 {
        self.mmio.read(off)
    }
    fn set(&self, off: usize, v: u32) {
        self.mmio.write(off, v);
    }
    fn status(&self) -> u32 {
        self.reg(reg::STATUS)
    }
    /// Reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK (checked).
    fn begin(&self) -> Result<(), Fail> {
        self.set(reg::STATUS, 0);
        self.set(reg::STATUS, status::ACKNOWLEDGE);
        self.set(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.set(reg::DRIVER_FEATURES_SEL, 0);
        self.set(reg::DRIVER_FEATURES, 0);
        self.set(reg::DRIVER_FEATURES_SEL, 1);
        self.set(reg::DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
        self.set(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        if self.status() & status::FEATURES_OK == 0 {
            return Err(Fail(format!(
                "{} refused VERSION_1 alone (status {:#x})",
                self.kind.name(),
                self.status()
            )));
        }
        Ok(())
    }
    /// Queue registers as given, then QueueReady = 1.
    fn queue(&self, q: usize, size: u32, desc: u64, avail: u64, used: u64) {
        self.set(reg::QUEUE_SEL, q as u32);
        self.set(reg::QUEUE_NUM, size);
        self.set(reg::QUEUE_DESC_LOW, desc as u32);
        self.set(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.set(reg::QUEUE_AVAIL_LOW, avail as u32);
        self.set(reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.set(reg::QUEUE_USED_LOW, used as u32);
        self.set(reg::QUEUE_USED_HIGH, (used >> 32) as u32);
        self.set(reg::QUEUE_READY, 1);
    }
    /// Every queue in its arena slot, honestly.
    fn queues(&self, except: Option<usize>) {
        for q in 0..self.kind.queues() {
            if Some(q) == except {
                continue;
            }
            let r = RawQ::new(q);
            r.clear();
            self.queue(q, u32::from(QSZ), r.desc(), r.avail(), r.used());
        }
    }
    fn driver_ok(&self) -> u32 {
        self.set(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        self.status()
    }
    /// An honest bring-up on the arena's rings; fails unless DRIVER_OK holds.
    fn honest(&self) -> Result<(), Fail> {
        self.begin()?;
        self.queues(None);
        let s = self.driver_ok();
        if s & status::DRIVER_OK == 0 || s & status::NEEDS_RESET != 0 {
            return Err(Fail(format!(
                "{} did not accept an honest setup (status {:#x})",
                self.kind.name(),
                s
            )));
        }
        Ok(())
    }
    fn notify(&self, q: u32) {
        self.set(reg::QUEUE_NOTIFY, q);
    }
    fn needs_reset(&self) -> bool {
        self.status() & status::NEEDS_RESET != 0
    }
}

/// Collects the observations of one attack.
struct Report {
    attack: &'static str,
    findings: u32,
}

impl Report {
    fn note(&self, t: &Target, text: &str) {
        say!("evil: {}: {}: {}", self.attack, t.kind.name(), text);
    }
    fn finding(&mut self, t: &Target, text: &str) {
        self.findings += 1;
        say!(
            "evil: {}: {}: FINDING: {}",
            self.attack,
            t.kind.name(),
            text
        );
    }
    /// "status 0x4f (NEEDS_RESET)" and the like.
    fn status_text(s: u32) -> String {
        let mut t = format!("status {s:#x}");
        if s & status::NEEDS_RESET != 0 {
            t.push_str(" (NEEDS_RESET)");
        } else if s & status::DRIVER_OK == 0 {
            t.push_str(" (not live)");
        }
        t
    }
    /// At DRIVER_OK with a bad queue: the device must not go live.
    fn refused_live(&mut self, t: &Target, what: &str, s: u32) {
        let live = s & status::DRIVER_OK != 0 && s & status::NEEDS_RESET == 0;
        if live {
            self.finding(
                t,
                &format!(
                    "{what}: DRIVER_OK accepted without NEEDS_RESET ({})",
                    Self::status_text(s)
                ),
            );
        } else {
            self.note(
                t,
                &format!("{what}: DRIVER_OK refused, {}", Self::status_text(s)),
            );
        }
    }
}

/// A vsock packet header from the guest (`cid`) to host port `port`.
fn vsock_header(cid: u64, src_port: u32, port: u32, op: u16, len: u32) -> [u8; 44] {
    Header {
        src_cid: cid,
        dst_cid: HOST_CID,
        src_port,
        dst_port: port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
    .to_bytes()
}

fn write_bytes(addr: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: callers pass addresses inside ARENA.
        unsafe { ptr::write_volatile((addr + i as u64) as *mut u8, *b) };
    }
}

/// Writes the first part of an honest request of the device's kind into
/// `buf` (vsock: an RW header to a port with no connection; blk: a GET_ID
/// header; rng: nothing, the buffer is device-writable) and returns its
/// length and descriptor flags.
fn request_parts(t: &Target, buf: u64, cid: u64) -> (u32, u16) {
    match t.kind {
        Kind::Vsock => {
            write_bytes(buf, &vsock_header(cid, 60_000, HOST_PORT, OP_RW, 0));
            (44, 0)
        }
        Kind::Blk => {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&8u32.to_le_bytes()); // GET_ID
            write_bytes(buf, &h);
            (16, 0)
        }
        Kind::Rng => (64, DESC_F_WRITE),
    }
}

/// Puts one honest request on the device's request queue (the descriptors
/// from `first`), notifies, and waits for it; `Some(used len)`.
fn honest_request(t: &Target, first: u16, cid: u64) -> Option<u32> {
    let q = RawQ::new(t.kind.req_queue());
    let (len, flags) = request_parts(t, q.buf(u64::from(first)), cid);
    match t.kind {
        Kind::Blk => {
            q.set_desc(first, q.buf(u64::from(first)), len, DESC_F_NEXT, first + 1);
            q.set_desc(
                first + 1,
                q.buf(u64::from(first) + 1),
                20,
                DESC_F_NEXT | DESC_F_WRITE,
                first + 2,
            );
            q.set_desc(first + 2, q.buf(u64::from(first) + 2), 1, DESC_F_WRITE, 0);
        }
        _ => q.set_desc(first, q.buf(u64::from(first)), len, flags, 0),
    }
    let want = q.used_idx().wrapping_add(1);
    q.offer(first);
    t.notify(t.kind.req_queue() as u32);
    if q.wait_used(want, USED_MS) {
        Some(q.used_elem(want.wrapping_sub(1)).1)
    } else {
        None
    }
}

/// The guest CID from a vsock device's config (0 for other devices).
fn cid_of(t: &Target) -> u64 {
    if t.kind == Kind::Vsock {
        t.mmio.config_u64(0)
    } else {
        0
    }
}

// ---------------------------------------------------------------------------
// The attacks. Each gets the device right after `begin`-less probing and
// leaves it in any state: the recovery step resets it.

/// Chains that loop: two descriptors pointing at each other, one pointing at
/// itself, an indirect table that contains itself, and a chain whose next
/// index lies past the table. Each must come back used with length 0 (or the
/// device must ask for a reset); then an honest request must still work.
fn chain_loop(t: &Target, r: &mut Report) -> Result<(), Fail> {
    t.honest()?;
    let cid = cid_of(t);
    let q = RawQ::new(t.kind.req_queue());
    let w = if t.kind == Kind::Vsock {
        0
    } else {
        DESC_F_WRITE
    };
    let (len0, f0) = request_parts(t, q.buf(0), cid);
    q.set_desc(0, q.buf(0), len0, f0 | DESC_F_NEXT, 1);
    q.set_desc(1, q.buf(1), 64, w | DESC_F_NEXT, 0);
    q.set_desc(2, q.buf(2), 64, w | DESC_F_NEXT, 2);
    q.set_desc(3, q.desc(), 16 * u32::from(QSZ), DESC_F_INDIRECT, 0);
    q.set_desc(4, q.buf(4), 64, w | DESC_F_NEXT, 200);
    for head in [0, 2, 3, 4] {
        q.offer(head);
    }
    t.notify(t.kind.req_queue() as u32);
    let returned = q.wait_used(4, USED_MS);
    let n = q.used_idx();
    let lens: Vec<u32> = (0..n.min(4)).map(|i| q.used_elem(i).1).collect();
    if !returned && !t.needs_reset() {
        r.finding(
            t,
            &format!(
                "{} of 4 looping chains came back within {} ms and the device did not ask for a reset",
                n, USED_MS
            ),
        );
    } else {
        r.note(
            t,
            &format!(
                "queue {}: 4 bad chains (a two-descriptor loop, a self-loop, an indirect table that holds itself, a next index past the table): {} returned, used lengths {:?}, {}",
                t.kind.req_queue(),
                n,
                lens,
                Report::status_text(t.status())
            ),
        );
    }
    if lens.iter().any(|l| *l != 0) {
        r.finding(
            t,
            &format!("a looping chain came back with data: used lengths {lens:?}"),
        );
    }
    if !t.needs_reset() {
        match honest_request(t, 8, cid) {
            Some(len) => r.note(
                t,
                &format!("an honest request on the same queue was answered afterwards (used length {len})"),
            ),
            None => r.finding(t, "an honest request after the loops was never answered"),
        }
    }
    Ok(())
}

/// Buffers outside guest RAM: at the first byte past RAM, straddling its
/// end, in the device's own MMIO window, on the LAPIC, far above RAM,
/// wrapping past 2^64, and a 4 GiB-long one in RAM. The device must return
/// each with used length 0 (it wrote nothing) or ask for a reset. For
/// virtio-vsock, RX buffers there too, filled by a connection's RESPONSE.
fn oob_buffers(t: &Target, r: &mut Report) -> Result<(), Fail> {
    t.honest()?;
    let cid = cid_of(t);
    let top = galloc::ram_top();
    let bad: [(u64, u32, &str); 7] = [
        (top, 512, "the first byte past RAM"),
        (top - 8, 4096, "straddling the end of RAM"),
        (t.base(), 512, "the device's own MMIO window"),
        (LAPIC_BASE, 512, "the LAPIC page"),
        (1 << 46, 512, "64 TiB up"),
        (u64::MAX - 15, 512, "wrapping past 2^64"),
        (arena(), u32::MAX, "4 GiB long from RAM"),
    ];
    let q = RawQ::new(t.kind.req_queue());
    let mut outcomes = Vec::new();
    for (i, (addr, len, what)) in bad.iter().enumerate() {
        if t.needs_reset() {
            break;
        }
        let d = (i as u16 * 2) % QSZ;
        match t.kind {
            Kind::Vsock => q.set_desc(d, *addr, *len, 0, 0),
            Kind::Rng => q.set_desc(d, *addr, *len, DESC_F_WRITE, 0),
            Kind::Blk => {
                // IN of one sector into the bad buffer; the status in RAM.
                write_bytes(q.buf(u64::from(d)), &[0u8; 16]);
                q.set_desc(d, q.buf(u64::from(d)), 16, DESC_F_NEXT, d + 1);
                q.set_desc(d + 1, *addr, *len, DESC_F_WRITE | DESC_F_NEXT, 15);
                q.set_desc(15, q.buf(15), 1, DESC_F_WRITE, 0);
            }
        }
        let want = q.used_idx().wrapping_add(1);
        q.offer(d);
        t.notify(t.kind.req_queue() as u32);
        if q.wait_used(want, USED_MS) {
            let len = q.used_elem(want.wrapping_sub(1)).1;
            outcomes.push(format!("{what}: used length {len}"));
            // A device-writable buffer outside RAM cannot have been written.
            if len != 0 && t.kind != Kind::Blk {
                r.finding(
                    t,
                    &format!("a buffer {what} came back with used length {len}"),
                );
            }
            if t.kind == Kind::Blk && len > 1 {
                r.finding(
                    t,
                    &format!("an IN into a buffer {what} reported {len} bytes written"),
                );
            }
        } else if t.needs_reset() {
            outcomes.push(format!("{what}: NEEDS_RESET"));
        } else {
            r.finding(t, &format!("a buffer {what} never came back"));
        }
    }
    r.note(
        t,
        &format!(
            "{} buffers outside RAM on queue {}: {}; {}",
            outcomes.len(),
            t.kind.req_queue(),
            outcomes.join(", "),
            Report::status_text(t.status())
        ),
    );
    if t.kind == Kind::Vsock && !t.needs_reset() {
        // RX buffers outside RAM, then a REQUEST whose answer needs one.
        let rx = RawQ::new(0);
        for (i, (addr, len, _)) in bad.iter().enumerate() {
            rx.set_desc(i as u16, *addr, *len, DESC_F_WRITE, 0);
            rx.offer(i as u16);
        }
        t.notify(0);
        let tx = RawQ::new(1);
        write_bytes(
            tx.buf(9),
            &vsock_header(cid, 60_001, HOST_PORT, OP_REQUEST, 0),
        );
        tx.set_desc(9, tx.buf(9), 44, 0, 0);
        tx.offer(9);
        t.notify(1);
        let ok = rx.wait_used(bad.len() as u16, USED_MS);
        let n = rx.used_idx();
        let lens: Vec<u32> = (0..n).map(|i| rx.used_elem(i).1).collect();
        r.note(
            t,
            &format!(
                "{} RX buffers outside RAM, then a REQUEST to host port {}: {} came back{}, used lengths {:?}, {}",
                bad.len(),
                HOST_PORT,
                n,
                if ok { "" } else { " (the rest stay posted)" },
                lens,
                Report::status_text(t.status())
            ),
        );
        if lens.iter().any(|l| *l != 0) {
            r.finding(
                t,
                &format!("an RX buffer outside RAM came back with data: {lens:?}"),
            );
        }
    }
    Ok(())
}

/// Buffers that overlap each other and the rings: the device is made to
/// write into the very descriptor table and rings it is walking.
fn overlapping_buffers(t: &Target, r: &mut Report) -> Result<(), Fail> {
    t.honest()?;
    let cid = cid_of(t);
    let q = RawQ::new(t.kind.req_queue());
    match t.kind {
        Kind::Vsock => {
            // TX: header and data descriptors over the same bytes.
            write_bytes(q.buf(0), &vsock_header(cid, 60_002, HOST_PORT, OP_RW, 44));
            q.set_desc(0, q.buf(0), 44, DESC_F_NEXT, 1);
            q.set_desc(1, q.buf(0), 44, 0, 0);
            q.offer(0);
            t.notify(1);
            let tx_ok = q.wait_used(1, USED_MS);
            // RX: buffers over the RX queue's own descriptor table and
            // available ring; a REQUEST makes the device write a RESPONSE.
            let rx = RawQ::new(0);
            rx.set_desc(0, rx.desc(), 4096, DESC_F_WRITE, 0);
            rx.set_desc(1, rx.avail(), 64, DESC_F_WRITE, 0);
            rx.offer(0);
            rx.offer(1);
            t.notify(0);
            write_bytes(
                q.buf(4),
                &vsock_header(cid, 60_003, HOST_PORT, OP_REQUEST, 0),
            );
            q.set_desc(4, q.buf(4), 44, 0, 0);
            q.offer(4);
            t.notify(1);
            let _ = rx.wait_used(2, USED_MS);
            r.note(
                t,
                &format!(
                    "TX header and data on the same bytes: {}; RX buffers over the RX descriptor table and available ring, then a REQUEST: {} of 2 used, {}",
                    if tx_ok { "returned" } else { "not returned" },
                    rx.used_idx(),
                    Report::status_text(t.status())
                ),
            );
        }
        Kind::Blk => {
            // IN of sector 0 into the descriptor table being walked.
            write_bytes(q.buf(0), &[0u8; 16]);
            q.set_desc(0, q.buf(0), 16, DESC_F_NEXT, 1);
            q.set_desc(1, q.desc(), 512, DESC_F_WRITE | DESC_F_NEXT, 2);
            q.set_desc(2, q.buf(2), 1, DESC_F_WRITE, 0);
            q.offer(0);
            t.notify(0);
            let first = q.wait_used(1, USED_MS);
            // The table now holds disk bytes; rebuild what the next request
            // needs. Two data buffers on the same bytes, and the status
            // byte inside the (device-readable) header.
            write_bytes(q.buf(4), &[0u8; 16]);
            q.set_desc(4, q.buf(4), 16, DESC_F_NEXT, 5);
            q.set_desc(5, q.buf(6), 512, DESC_F_WRITE | DESC_F_NEXT, 6);
            q.set_desc(6, q.buf(6), 512, DESC_F_WRITE | DESC_F_NEXT, 7);
            q.set_desc(7, q.buf(4) + 15, 1, DESC_F_WRITE, 0);
            let want = q.used_idx().wrapping_add(1);
            q.offer(4);
            t.notify(0);
            let second = q.wait_used(want, USED_MS);
            r.note(
                t,
                &format!(
                    "an IN into its own descriptor table: {}; two data buffers on the same bytes with the status inside the header: {}; {}",
                    if first { "returned" } else { "not returned" },
                    if second { "returned" } else { "not returned" },
                    Report::status_text(t.status())
                ),
            );
        }
        Kind::Rng => {
            // Random bytes over the available and used rings: the device
            // then reads a random available index.
            q.set_desc(0, q.avail(), 0x2000, DESC_F_WRITE, 0);
            q.offer(0);
            t.notify(0);
            let _ = q.wait_used(1, USED_MS);
            t.notify(0);
            // Give it a moment to walk the random ring.
            let until = time::deadline_ms(50);
            while !time::passed(until) {
                core::hint::spin_loop();
            }
            r.note(
                t,
                &format!(
                    "a buffer over its own available and used rings, then a notify: {}",
                    Report::status_text(t.status())
                ),
            );
        }
    }
    Ok(())
}

/// QueueNum past QueueNumMax, 0x8000, 0xffff, 0 and 3 (not a power of 2):
/// DRIVER_OK must not make the device live.
fn queue_size(t: &Target, r: &mut Report) -> Result<(), Fail> {
    t.begin()?;
    t.set(reg::QUEUE_SEL, 0);
    let max = t.reg(reg::QUEUE_NUM_MAX);
    for size in [max + 1, 0x8000, 0xffff, 0, 3] {
        t.begin()?;
        t.queues(Some(0));
        let q = RawQ::new(0);
        q.clear();
        t.queue(0, size, q.desc(), q.avail(), q.used());
        let s = t.driver_ok();
        r.refused_live(t, &format!("QueueNum {size:#x} (max {max:#x})"), s);
    }
    Ok(())
}

/// Rings at addresses the spec forbids: descriptors 8-aligned (16 needed),
/// the available ring odd, the used ring 2-aligned (4 needed).
fn unaligned_rings(t: &Target, r: &mut Report) -> Result<(), Fail> {
    let q = RawQ::new(0);
    let cases: [(&str, u64, u64, u64); 3] = [
        ("descriptor table at +8", q.desc() + 8, q.avail(), q.used()),
        ("available ring at +1", q.desc(), q.avail() + 1, q.used()),
        ("used ring at +2", q.desc(), q.avail(), q.used() + 2),
    ];
    for (what, d, a, u) in cases {
        t.begin()?;
        t.queues(Some(0));
        q.clear();
        t.queue(0, u32::from(QSZ), d, a, u);
        let s = t.driver_ok();
        r.refused_live(t, what, s);
    }
    Ok(())
}

/// Rings where no RAM is: the used ring in the device's own MMIO window, on
/// the LAPIC, on the IOAPIC, past RAM and straddling its end; the
/// descriptor table and the available ring in the MMIO window. DRIVER_OK
/// must not make the device live. Then, once live, rewriting QueueUsed must
/// be ignored: the device keeps writing the ring it was given.
fn used_in_mmio(t: &Target, r: &mut Report) -> Result<(), Fail> {
    let q = RawQ::new(0);
    let top = galloc::ram_top();
    let cases: [(&str, u64, u64, u64); 7] = [
        (
            "used ring in its own MMIO window",
            q.desc(),
            q.avail(),
            t.base(),
        ),
        ("used ring on the LAPIC", q.desc(), q.avail(), LAPIC_BASE),
        ("used ring on the IOAPIC", q.desc(), q.avail(), IOAPIC_BASE),
        ("used ring past RAM", q.desc(), q.avail(), top),
        (
            "used ring straddling the end of RAM",
            q.desc(),
            q.avail(),
            top - 4,
        ),
        (
            "descriptor table in its own MMIO window",
            t.base(),
            q.avail(),
            q.used(),
        ),
        (
            "available ring in its own MMIO window",
            q.desc(),
            t.base() + 0x100,
            q.used(),
        ),
    ];
    for (what, d, a, u) in cases {
        t.begin()?;
        t.queues(Some(0));
        q.clear();
        t.queue(0, u32::from(QSZ), d, a, u);
        let s = t.driver_ok();
        r.refused_live(t, what, s);
    }
    // Live first, then move the used ring into MMIO.
    t.honest()?;
    let rq = t.kind.req_queue();
    t.set(reg::QUEUE_SEL, rq as u32);
    t.set(reg::QUEUE_USED_LOW, t.base() as u32);
    t.set(reg::QUEUE_USED_HIGH, 0);
    match honest_request(t, 0, cid_of(t)) {
        Some(_) => r.note(
            t,
            &format!(
                "QueueUsed rewritten to {:#x} after DRIVER_OK was ignored: the device still used the ring at {:#x}",
                t.base(),
                RawQ::new(rq).used()
            ),
        ),
        None if t.needs_reset() => r.note(
            t,
            "QueueUsed rewritten after DRIVER_OK: the device asked for a reset",
        ),
        None => r.finding(
            t,
            "after QueueUsed was rewritten to MMIO post DRIVER_OK, the device never wrote the ring it was given",
        ),
    }
    Ok(())
}

/// Notifications without end: every queue, a queue that does not exist and
/// QueueSel-style garbage values, with InterruptACK writes between; then an
/// honest request must still be answered.
fn notify_flood(ctx: &Ctx<'_>, t: &Target, r: &mut Report) -> Result<(), Fail> {
    t.honest()?;
    let n = opt(ctx, "cell0.flood", 20_000, 1, 100_000_000)?;
    let qs = t.kind.queues() as u32;
    let t0 = time::now();
    for i in 0..n {
        let q = match i % 8 {
            6 => qs + 4,
            7 => u32::MAX,
            k => k as u32 % qs,
        };
        t.notify(q);
        if i % 16 == 15 {
            t.set(reg::INTERRUPT_ACK, u32::MAX);
        }
    }
    let us = time::to_us(time::now() - t0).max(1);
    r.note(
        t,
        &format!(
            "{} notifications (every queue, queue {} and {:#x}) in {} ms, {} per second; {}",
            n,
            qs + 4,
            u32::MAX,
            us / 1000,
            n * 1_000_000 / us,
            Report::status_text(t.status())
        ),
    );
    match honest_request(t, 8, cid_of(t)) {
        Some(len) => r.note(
            t,
            &format!("an honest request was answered after the flood (used length {len})"),
        ),
        None => r.finding(t, "an honest request after the flood was never answered"),
    }
    Ok(())
}

/// The status register out of order: DRIVER_OK before FEATURES_OK, queue
/// setup before FEATURES_OK, features the device never offered, no
/// VERSION_1, DRIVER_OK with no queue ready, and every bit at once.
fn status_abuse(t: &Target, r: &mut Report) -> Result<(), Fail> {
    use status::*;
    // 1. DRIVER_OK straight after DRIVER.
    t.set(reg::STATUS, 0);
    t.set(reg::STATUS, ACKNOWLEDGE);
    t.set(reg::STATUS, ACKNOWLEDGE | DRIVER);
    t.set(reg::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    let s = t.status();
    if s & DRIVER_OK != 0 {
        r.finding(
            t,
            &format!("DRIVER_OK before FEATURES_OK was accepted (status {s:#x})"),
        );
    } else {
        r.note(
            t,
            &format!("DRIVER_OK before FEATURES_OK ignored, status {s:#x}"),
        );
    }
    // 2. Queue registers before FEATURES_OK.
    let q = RawQ::new(0);
    q.clear();
    t.queue(0, u32::from(QSZ), q.desc(), q.avail(), q.used());
    let ready = t.reg(reg::QUEUE_READY);
    if ready != 0 {
        r.finding(t, "QueueReady written before FEATURES_OK reads back 1");
    } else {
        r.note(
            t,
            "queue setup before FEATURES_OK ignored (QueueReady reads 0)",
        );
    }
    // 3. A feature the device never offered (bit 63), and 4. no VERSION_1.
    for (what, page, bits) in [
        ("feature bit 63, never offered", 1u32, 0x8000_0001u32),
        ("no VERSION_1 (a legacy driver)", 1, 0),
        ("a feature page past 1", 5, 1),
    ] {
        t.set(reg::STATUS, 0);
        t.set(reg::STATUS, ACKNOWLEDGE);
        t.set(reg::STATUS, ACKNOWLEDGE | DRIVER);
        t.set(reg::DRIVER_FEATURES_SEL, 1);
        t.set(reg::DRIVER_FEATURES, if page == 1 { bits } else { 1 });
        if page != 1 {
            t.set(reg::DRIVER_FEATURES_SEL, page);
            t.set(reg::DRIVER_FEATURES, bits);
        }
        t.set(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let s = t.status();
        if s & FEATURES_OK != 0 {
            r.finding(
                t,
                &format!("FEATURES_OK with {what} was accepted (status {s:#x})"),
            );
        } else {
            r.note(
                t,
                &format!("FEATURES_OK with {what} refused, status {s:#x}"),
            );
        }
    }
    // 5. DRIVER_OK with no queue ready.
    t.begin()?;
    let s = t.driver_ok();
    let live = s & DRIVER_OK != 0 && s & NEEDS_RESET == 0;
    r.note(
        t,
        &format!(
            "DRIVER_OK with no queue ready: {}{}",
            Report::status_text(s),
            if live { ", live with no queues" } else { "" }
        ),
    );
    if live && t.kind != Kind::Vsock {
        // A live device with no queue: a notify must not make it touch
        // memory it was never given.
        t.notify(0);
    }
    // 6. Every bit at once, and NEEDS_RESET written by the driver.
    t.set(reg::STATUS, 0);
    t.set(reg::STATUS, 0xff);
    let all = t.status();
    t.set(reg::STATUS, 0);
    t.set(reg::STATUS, NEEDS_RESET);
    let nr = t.status();
    if all & DRIVER_OK != 0 {
        r.finding(
            t,
            &format!("status 0xff from reset was accepted ({all:#x})"),
        );
    }
    r.note(
        t,
        &format!(
            "status 0xff from reset reads {all:#x}; NEEDS_RESET written by the driver reads {nr:#x}"
        ),
    );
    Ok(())
}

/// Config space and registers out of range: every width at the ends of the
/// window, a read across its end, unaligned and odd-sized register
/// accesses, undefined and write-only registers read, read-only registers
/// and config space written. The identity registers and the config must
/// read the same afterwards.
fn config_oob(t: &Target, r: &mut Report) -> Result<(), Fail> {
    let base = t.base();
    let snapshot = |t: &Target| -> Vec<u32> {
        let mut v = vec![
            t.reg(reg::MAGIC),
            t.reg(reg::VERSION),
            t.reg(reg::DEVICE_ID),
            t.reg(0x00c),
        ];
        for off in (0..16).step_by(4) {
            v.push(t.reg(reg::CONFIG + off));
        }
        v
    };
    t.set(reg::STATUS, 0);
    let before = snapshot(t);
    let mut reads = 0u32;
    let mut sum = 0u64;
    for off in [0x100u64, 0x104, 0x108, 0x10c, 0x110, 0x1fc, 0x800, 0xff8] {
        for w in [1u8, 2, 4, 8] {
            sum = sum.wrapping_add(raw_read(base + off, w));
            reads += 1;
        }
    }
    for (off, w) in [
        (0xfffu64, 1u8),
        (0xffe, 2),
        (0xffc, 4),
        (0xffe, 4),
        (0xffd, 4),
    ] {
        sum = sum.wrapping_add(raw_read(base + off, w));
        reads += 1;
    }
    for off in (0x0c..0x100u64).step_by(4) {
        sum = sum.wrapping_add(raw_read(base + off, 4));
        reads += 1;
    }
    for (off, w) in [
        (0x71u64, 4u8),
        (0x70, 1),
        (0x72, 2),
        (0x00, 8),
        (0x70, 8),
        (0x02, 2),
    ] {
        sum = sum.wrapping_add(raw_read(base + off, w));
        reads += 1;
    }
    // Writes: before DRIVER (wrong state) and after it.
    let mut writes = 0u32;
    for phase in 0..2 {
        t.set(reg::STATUS, 0);
        if phase == 1 {
            t.set(reg::STATUS, status::ACKNOWLEDGE);
            t.set(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        }
        for off in [0x100u64, 0x104, 0x108, 0x10c, 0x1fc, 0xff8] {
            for w in [1u8, 2, 4, 8] {
                raw_write(base + off, w, 0xdead_beef_cafe_f00d);
                writes += 1;
            }
        }
        raw_write(base + 0xffe, 4, 0xffff_ffff);
        writes += 1;
        for off in [0x000u64, 0x004, 0x008, 0x00c, 0x034, 0x060, 0x0fc] {
            raw_write(base + off, 4, 0x5a5a_5a5a);
            writes += 1;
        }
        for (off, w) in [(0x71u64, 4u8), (0x70, 1), (0x70, 2), (0x70, 8), (0x30, 8)] {
            raw_write(base + off, w, 0);
            writes += 1;
        }
        t.set(reg::QUEUE_SEL, u32::MAX);
        t.set(reg::QUEUE_READY, 1);
        t.set(reg::QUEUE_NUM, 16);
        writes += 3;
    }
    t.set(reg::STATUS, 0);
    let after = snapshot(t);
    if before != after {
        r.finding(
            t,
            &format!("identity or config changed: before {before:x?}, after {after:x?}"),
        );
    } else {
        r.note(
            t,
            &format!(
                "{} out-of-range and odd-sized reads (sum {:#x}), {} writes to read-only registers and config; magic, version, device ID, vendor and config unchanged ({:x?})",
                reads,
                sum,
                writes,
                &after[4..]
            ),
        );
    }
    Ok(())
}

/// A reset while requests are in flight; after it, the device must read
/// status 0 and must not write the rings any more.
fn reset_mid_transfer(t: &Target, r: &mut Report) -> Result<(), Fail> {
    match t.kind {
        Kind::Vsock => {
            // Honest driver, 1 MiB echo CALLs in flight, reset once 300 KB
            // have come back.
            let mut vs = Vsock::open(&t.dev, t.index, Mode::Poll)?;
            let mut c = Client::connect(&mut vs.core, HOST_PORT, Bytes::new(), vec![(1 << 20, 8)])
                .window(4);
            let deadline = time::deadline_ms(20_000);
            let mut failed = None;
            let _ = vs.run_until(deadline, |vs| {
                if vs.core.stats.rx_bytes >= 300_000 {
                    return Ok(Some(true));
                }
                match c.step(&mut vs.core) {
                    Ok(true) => Ok(Some(false)),
                    Ok(false) => Ok(None),
                    Err(e) => {
                        failed = Some(e);
                        Ok(Some(true))
                    }
                }
            });
            let rx = vs.core.stats.rx_bytes;
            let tx = vs.core.stats.tx_bytes;
            vs.shutdown();
            let s = t.status();
            if let Some(e) = failed {
                r.note(t, &format!("the transfer failed before the reset: {e}"));
            }
            if s != 0 {
                r.finding(t, &format!("status reads {s:#x} after the reset, not 0"));
            }
            r.note(
                t,
                &format!(
                    "reset with 1 MiB echo CALLs in flight after {rx} bytes received and {tx} sent; status {s:#x}"
                ),
            );
        }
        Kind::Blk | Kind::Rng => {
            t.honest()?;
            let q = RawQ::new(0);
            let data = arena() + DATA;
            for i in 0..4u16 {
                let buf = data + u64::from(i) * 0x4000;
                match t.kind {
                    Kind::Blk => {
                        let h = q.buf(u64::from(i));
                        write_bytes(h, &[0u8; 16]);
                        q.set_desc(3 * i, h, 16, DESC_F_NEXT, 3 * i + 1);
                        q.set_desc(
                            3 * i + 1,
                            buf,
                            8 * SECTOR as u32,
                            DESC_F_WRITE | DESC_F_NEXT,
                            3 * i + 2,
                        );
                        q.set_desc(3 * i + 2, q.buf(8 + u64::from(i)), 1, DESC_F_WRITE, 0);
                        q.offer(3 * i);
                    }
                    _ => {
                        q.set_desc(i, buf, 0x4000, DESC_F_WRITE, 0);
                        q.offer(i);
                    }
                }
            }
            t.notify(0);
            t.set(reg::STATUS, 0);
            let s = t.status();
            let at_reset = q.used_idx();
            let until = time::deadline_ms(100);
            while !time::passed(until) {
                core::hint::spin_loop();
            }
            let later = q.used_idx();
            if s != 0 {
                r.finding(t, &format!("status reads {s:#x} after the reset, not 0"));
            }
            if later != at_reset {
                r.finding(
                    t,
                    &format!(
                        "the device wrote the used ring after the reset ({at_reset} -> {later})"
                    ),
                );
            }
            // Kicking a reset device must do nothing either.
            t.notify(0);
            r.note(
                t,
                &format!(
                    "reset with 4 requests in flight: {at_reset} had completed, none after the reset; status {s:#x}"
                ),
            );
        }
    }
    Ok(())
}

/// After an attack: reset and bring the device up with the honest driver,
/// then one real request.
fn recover(t: &Target, r: &mut Report) {
    let result: Result<String, Fail> = match t.kind {
        Kind::Vsock => (|| {
            let mut vs = Vsock::open(&t.dev, t.index, Mode::Poll)?;
            let mut c = Client::connect(&mut vs.core, HOST_PORT, Bytes::new(), vec![(4096, 1)]);
            let ok = vs.run_until(time::deadline_ms(20_000), |vs| {
                Ok(if c.step(&mut vs.core)? {
                    if c.is_done() { Some(true) } else { Some(false) }
                } else if c.is_done() {
                    Some(true)
                } else {
                    None
                })
            });
            vs.shutdown();
            match ok {
                Ok(true) => Ok(String::from(
                    "echo of 4096 bytes through host port 1024 checked",
                )),
                Ok(false) => Err(Fail::from("the echo timed out")),
                Err(e) => Err(e),
            }
        })(),
        Kind::Blk => (|| {
            let mut d = Simple::open(&t.dev, DEVICE_ID_BLK)?;
            let r = devtest::blk_read(&mut d, 0, 1);
            d.shutdown();
            let (s, data) = r?;
            if s != 0 {
                return Err(Fail(format!("reading sector 0 answered status {s}")));
            }
            match devtest::sector_difference(&data, 0, |s| s as u32) {
                None => Ok(String::from("sector 0 read and checked")),
                Some((_, at, want, got)) => Err(Fail(format!(
                    "sector 0 differs at byte {at}: expected {want:#04x}, got {got:#04x}"
                ))),
            }
        })(),
        Kind::Rng => (|| {
            let mut d = Simple::open(&t.dev, DEVICE_ID_RNG)?;
            let v = devtest::rng_read(&mut d, 64);
            d.shutdown();
            let v = v?;
            if v.iter().all(|b| *b == 0) {
                return Err(Fail::from("64 random bytes came back all zero"));
            }
            Ok(String::from("64 random bytes read"))
        })(),
    };
    match result {
        Ok(what) => r.note(t, &format!("recovered after a reset: {what}")),
        Err(e) => r.finding(t, &format!("does not work after a reset: {e}")),
    }
}

/// The attacks by name.
pub const ATTACKS: &[&str] = &[
    "chain-loop",
    "oob-buffers",
    "overlapping-buffers",
    "queue-size",
    "unaligned-rings",
    "used-in-mmio",
    "notify-flood",
    "status-abuse",
    "config-oob",
    "reset-mid-transfer",
];

/// `evil`: runs `cell0.attack` against every known device, recovers each,
/// prints `evil: NAME done, N findings`; with `cell0.evil_hold=1` it then
/// stays up (halted) until the host stops it.
pub fn evil(ctx: &Ctx<'_>) -> Result<(), Fail> {
    let attack = cmdline_str(ctx.cmdline, "cell0.attack")?.ok_or_else(|| {
        Fail(format!(
            "cell0.attack= is required: one of {}",
            ATTACKS.join(", ")
        ))
    })?;
    let Some(&name) = ATTACKS.iter().find(|a| **a == attack) else {
        return Err(Fail(format!(
            "bad cell0.attack value '{}': expected one of {}",
            Escaped(attack.as_bytes()),
            ATTACKS.join(", ")
        )));
    };
    let hold = opt(ctx, "cell0.evil_hold", 0, 0, 1)? == 1;
    let delay = opt(ctx, "cell0.evil_delay", 0, 0, 60_000)?;
    if ARENA_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(Fail::from("the evil arena is in use"));
    }
    time::calibrate();
    let mut targets = Vec::new();
    for (index, dev) in devtest::devices(ctx)? {
        let mmio = Mmio::new(&dev)?;
        if let Some(kind) = Kind::from_id(mmio.probe()?) {
            targets.push(Target {
                dev,
                index,
                mmio,
                kind,
            });
        }
    }
    if targets.is_empty() {
        return Err(Fail::from(
            "no virtio device to attack (start the VMM with --vsock-uds, --disk or --rng)",
        ));
    }
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("{} at {:#x}", t.kind.name(), t.base()))
        .collect();
    say!("evil: devices: {}", list.join(", "));
    say!("evil: armed: {} in {} ms", name, delay);
    let until = time::deadline_ms(delay);
    while !time::passed(until) {
        core::hint::spin_loop();
    }
    let mut r = Report {
        attack: name,
        findings: 0,
    };
    for t in &targets {
        let res = match name {
            "chain-loop" => chain_loop(t, &mut r),
            "oob-buffers" => oob_buffers(t, &mut r),
            "overlapping-buffers" => overlapping_buffers(t, &mut r),
            "queue-size" => queue_size(t, &mut r),
            "unaligned-rings" => unaligned_rings(t, &mut r),
            "used-in-mmio" => used_in_mmio(t, &mut r),
            "notify-flood" => notify_flood(ctx, t, &mut r),
            "status-abuse" => status_abuse(t, &mut r),
            "config-oob" => config_oob(t, &mut r),
            _ => reset_mid_transfer(t, &mut r),
        };
        if let Err(e) = res {
            r.finding(t, &format!("the attack could not run: {e}"));
        }
        t.set(reg::STATUS, 0);
        recover(t, &mut r);
    }
    say!("evil: {} done, {} findings", name, r.findings);
    if hold {
        say!("evil: holding until the host stops the VM");
        sys::halt();
    }
    ARENA_TAKEN.store(false, Ordering::Release);
    if r.findings > 0 {
        return Err(Fail(format!("{} findings", r.findings)));
    }
    Ok(())
}
