// SPDX-License-Identifier: Apache-2.0
//! Target `vsock`: vsock packets and the connection state machine, through
//! the real Unix-socket muxer.
//!
//! Each input gets a fresh device with its own host socket, a host listener on
//! guest-facing port 1024 and a correctly set-up driver. Then it interleaves
//! guest packets (any op, ports, flags, credit fields and length, header and
//! data in one or two descriptors), RX buffers of any size, and host actions:
//! accepting the guest's connections, `CONNECT` lines (well formed or not),
//! writes, reads, half and full closes. Checks, on every packet the device
//! delivers to the guest: the used length is the header plus exactly the
//! header's `len`, the packet comes from the host CID to the guest's, and the
//! data never exceeds the buffer the guest gave.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Unstructured;
use cell0_devices::virtio::vsock::packet::{Header, PKT_HEADER_SIZE};
use cell0_devices::virtio::vsock::uapi::*;
use cell0_devices::virtio::vsock::{RXQ_INDEX, TXQ_INDEX, VSOCK_HOST_CID};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use crate::rig::{DATA_BASE, GUEST_CID, Rig, read_vsock_header, write_vsock_header};

/// Most actions per input.
pub const MAX_OPS: usize = 128;
/// The host port a listener serves (guest connections to it succeed).
pub const LISTEN_PORT: u32 = 1024;

fn socket_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("cell0-fuzz-vsock")
            .tempdir()
            .expect("a temp dir");
        // Kept for the life of the process; sockets inside are removed per run.
        d.keep()
    })
}

struct Host {
    listener: UnixListener,
    streams: Vec<UnixStream>,
    uds: PathBuf,
}

/// The driver side: free descriptors per queue, and one buffer slot per
/// descriptor index (so a buffer is never reused while the device holds it).
struct Driver {
    free: [Vec<u16>; 3],
    /// Head -> every descriptor of its chain, per queue.
    chains: [std::collections::HashMap<u16, Vec<u16>>; 3],
    /// RX head -> (header address, data capacity).
    rx_bufs: std::collections::HashMap<u16, (u64, u32)>,
}

/// Bytes per buffer slot: a header and up to 4 KiB of data.
const SLOT: u64 = 0x1040;

impl Driver {
    fn new(rig: &Rig) -> Self {
        let free = |q: usize| (0..rig.sizes[q]).rev().collect::<Vec<u16>>();
        Self {
            free: [free(0), free(1), free(2)],
            chains: Default::default(),
            rx_bufs: Default::default(),
        }
    }

    /// `n` free descriptors of queue `q`, if there are that many.
    fn take(&mut self, q: usize, n: usize) -> Option<Vec<u16>> {
        (self.free[q].len() >= n).then(|| {
            let at = self.free[q].len() - n;
            self.free[q].split_off(at)
        })
    }

    /// The buffer slot of `head` in queue `q`.
    fn slot(q: usize, head: u16) -> u64 {
        DATA_BASE + (q as u64 * 32 + u64::from(head % 32)) * SLOT
    }

    /// Takes queue `q`'s used entries back; returns them.
    fn reclaim(&mut self, rig: &mut Rig, q: usize) -> Vec<(u32, u32)> {
        let used = rig.take_used(q);
        for (id, _) in &used {
            if let Some(descs) = self.chains[q].remove(&(*id as u16)) {
                self.free[q].extend(descs);
            }
        }
        used
    }
}

fn port(u: &mut Unstructured<'_>) -> arbitrary::Result<u32> {
    Ok(*u.choose(&[LISTEN_PORT, LISTEN_PORT, 5000, 5001, 1025, 0, u32::MAX])?)
}

fn guest_send(rig: &mut Rig, d: &mut Driver, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let q = TXQ_INDEX;
    d.reclaim(rig, q);
    let data_len = u.int_in_range(0usize..=256)?;
    let data = u.bytes(data_len.min(u.len()))?.to_vec();
    let h = Header {
        src_cid: if u.ratio(15, 16)? {
            GUEST_CID
        } else {
            u.arbitrary()?
        },
        dst_cid: if u.ratio(15, 16)? {
            VSOCK_HOST_CID
        } else {
            u.arbitrary()?
        },
        src_port: u.int_in_range(2000u32..=2003)?,
        dst_port: port(u)?,
        len: if u.ratio(7, 8)? {
            data.len() as u32
        } else {
            u.arbitrary()?
        },
        type_: if u.ratio(15, 16)? {
            VSOCK_TYPE_STREAM
        } else {
            u.arbitrary()?
        },
        op: if u.ratio(7, 8)? {
            u.int_in_range(VSOCK_OP_REQUEST..=VSOCK_OP_CREDIT_REQUEST)?
        } else {
            u.arbitrary()?
        },
        flags: u.int_in_range(0u32..=3)?,
        buf_alloc: if u.ratio(3, 4)? {
            256 * 1024
        } else {
            u.arbitrary()?
        },
        fwd_cnt: u.arbitrary()?,
    };
    let split = !data.is_empty() && u.ratio(1, 2)?;
    let Some(descs) = d.take(q, if split { 2 } else { 1 }) else {
        return Ok(());
    };
    let head = descs[0];
    let ha = Driver::slot(q, head);
    write_vsock_header(&rig.mem, ha, &h);
    let _ = rig
        .mem
        .write_slice(&data, GuestAddress(ha + PKT_HEADER_SIZE as u64));
    if split {
        let second = descs[1];
        rig.write_desc(
            q,
            head,
            ha,
            PKT_HEADER_SIZE as u32,
            VRING_DESC_F_NEXT as u16,
            second,
        );
        rig.write_desc(
            q,
            second,
            ha + PKT_HEADER_SIZE as u64,
            data.len() as u32,
            0,
            0,
        );
    } else {
        let total = PKT_HEADER_SIZE as u32 + data.len() as u32;
        rig.write_desc(q, head, ha, total, 0, 0);
    }
    d.chains[q].insert(head, descs);
    rig.publish(q, head);
    rig.kick(q as u32);
    Ok(())
}

fn guest_rx_buffers(
    rig: &mut Rig,
    d: &mut Driver,
    u: &mut Unstructured<'_>,
) -> arbitrary::Result<()> {
    let q = RXQ_INDEX;
    check_rx(rig, d);
    for _ in 0..u.int_in_range(1u8..=4)? {
        let cap = *u.choose(&[0u32, 1, 16, 512, 4096])?;
        let split = cap > 0 && u.ratio(1, 2)?;
        let Some(descs) = d.take(q, if split { 2 } else { 1 }) else {
            break;
        };
        let head = descs[0];
        let ha = Driver::slot(q, head);
        let w = VRING_DESC_F_WRITE as u16;
        if split {
            let second = descs[1];
            rig.write_desc(
                q,
                head,
                ha,
                PKT_HEADER_SIZE as u32,
                w | VRING_DESC_F_NEXT as u16,
                second,
            );
            rig.write_desc(q, second, ha + PKT_HEADER_SIZE as u64, cap, w, 0);
        } else {
            rig.write_desc(q, head, ha, PKT_HEADER_SIZE as u32 + cap, w, 0);
        }
        // Stale bytes must not pass for a header the device wrote.
        let _ = rig
            .mem
            .write_slice(&[0xa5; PKT_HEADER_SIZE], GuestAddress(ha));
        d.chains[q].insert(head, descs);
        d.rx_bufs.insert(head, (ha, cap));
        rig.publish(q, head);
    }
    rig.kick(q as u32);
    Ok(())
}

fn check_rx(rig: &mut Rig, d: &mut Driver) {
    for (id, len) in d.reclaim(rig, RXQ_INDEX) {
        let Some((ha, cap)) = d.rx_bufs.remove(&(id as u16)) else {
            continue;
        };
        if (len as usize) < PKT_HEADER_SIZE {
            continue;
        }
        let h = read_vsock_header(&rig.mem, ha).expect("the header is in memory");
        assert_eq!(
            len as usize,
            PKT_HEADER_SIZE + h.len as usize,
            "used length must be the header plus its len: {h:?}"
        );
        assert!(h.len <= cap, "{} bytes in a {cap}-byte buffer", h.len);
        assert_eq!((h.src_cid, h.dst_cid), (VSOCK_HOST_CID, GUEST_CID), "{h:?}");
        assert_eq!(h.type_, VSOCK_TYPE_STREAM);
    }
}

fn host_action(host: &mut Host, u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    match u.int_in_range(0u8..=5)? {
        0 => {
            while let Ok((s, _)) = host.listener.accept() {
                let _ = s.set_nonblocking(true);
                host.streams.push(s);
            }
        }
        1 => {
            if let Ok(s) = UnixStream::connect(&host.uds) {
                let _ = s.set_nonblocking(true);
                let line: Vec<u8> = if u.ratio(3, 4)? {
                    format!("CONNECT {}\n", port(u)?).into_bytes()
                } else {
                    let n = u.int_in_range(0usize..=40)?;
                    u.bytes(n.min(u.len()))?.to_vec()
                };
                let _ = (&s).write_all(&line);
                host.streams.push(s);
            }
        }
        2 if !host.streams.is_empty() => {
            let i = u.int_in_range(0..=host.streams.len() - 1)?;
            let n = u.int_in_range(0usize..=8192)?;
            let fill = u.arbitrary::<u8>()?;
            let _ = (&host.streams[i]).write(&vec![fill; n]);
        }
        3 if !host.streams.is_empty() => {
            let i = u.int_in_range(0..=host.streams.len() - 1)?;
            let mut b = [0u8; 4096];
            let _ = (&host.streams[i]).read(&mut b);
        }
        4 if !host.streams.is_empty() => {
            let i = u.int_in_range(0..=host.streams.len() - 1)?;
            let how = *u.choose(&[Shutdown::Write, Shutdown::Read, Shutdown::Both])?;
            let _ = host.streams[i].shutdown(how);
        }
        5 if !host.streams.is_empty() => {
            let i = u.int_in_range(0..=host.streams.len() - 1)?;
            host.streams.swap_remove(i);
        }
        _ => {}
    }
    Ok(())
}

/// `cell0-vmm` ignores SIGPIPE (Rust's runtime does so before `main`), so the
/// muxer's `write(2)` to a host stream whose peer has gone gets EPIPE. A
/// libFuzzer binary starts in C and keeps the default action, which would kill
/// it: do what the VMM's runtime does.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// The target.
pub fn run(data: &[u8]) {
    ignore_sigpipe();
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = socket_dir();
    let uds = dir.join(format!("v{}-{n}.sock", std::process::id()));
    let listen_path = PathBuf::from(format!("{}_{LISTEN_PORT}", uds.display()));
    let _ = std::fs::remove_file(&listen_path);
    let listener = UnixListener::bind(&listen_path).expect("a host listener");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let mut host = Host {
        listener,
        streams: Vec::new(),
        uds: uds.clone(),
    };
    {
        let mut rig = Rig::vsock_muxer(&uds);
        rig.init(u64::MAX, 32);
        let mut d = Driver::new(&rig);
        let mut u = Unstructured::new(data);
        for _ in 0..MAX_OPS {
            if u.is_empty() {
                break;
            }
            let step = match u.int_in_range(0u8..=4) {
                Ok(0 | 1) => guest_send(&mut rig, &mut d, &mut u),
                Ok(2) => guest_rx_buffers(&mut rig, &mut d, &mut u),
                Ok(3) => host_action(&mut host, &mut u),
                Ok(_) => {
                    rig.pump();
                    Ok(())
                }
                Err(e) => Err(e),
            };
            check_rx(&mut rig, &mut d);
            if step.is_err() {
                break;
            }
        }
        rig.pump();
        check_rx(&mut rig, &mut d);
    }
    drop(host);
    let _ = std::fs::remove_file(&listen_path);
    let _ = std::fs::remove_file(&uds);
}
