// SPDX-License-Identifier: Apache-2.0
//! The shared-memory window (`--shm-mib N`): a host memfd mapped into the guest
//! above RAM, outside the e820 map, and handed to the SYPAS router over the API
//! socket (`{"op":"shm"}` answers with the size and guest address and passes the
//! memfd with SCM_RIGHTS).
//!
//! The guest learns the window from the cmdline: `cell0.shm=<size>@<gpa>` (hex).
//! A Linux guest maps it from `/dev/mem` (or a UIO driver) at that address; the
//! nano guest maps it in its own page tables. See docs/SYPAS.md.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde_json::{Value, json};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};

use crate::api::ApiExtension;
use crate::arch::MMIO_HOLE_END;

/// Largest window (64 GiB).
pub const MAX_SHM_MIB: u64 = 64 << 10;

/// Errors of the shared-memory window.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// memfd_create, ftruncate or sealing failed.
    #[error("cannot create the shared-memory memfd")]
    Memfd(#[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map the shared-memory window")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// KVM refused the slot.
    #[error("cannot register the shared-memory window with KVM")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// Guest address of the window: 4 GiB, or the end of high RAM rounded up to 1 GiB.
pub fn window_gpa(ram_ranges: &[(u64, u64)]) -> u64 {
    let ram_end = ram_ranges.iter().map(|(s, l)| s + l).max().unwrap_or(0);
    let g = 1u64 << 30;
    ram_end.max(MMIO_HOLE_END).div_ceil(g) * g
}

/// The window: memfd, host mapping, guest address.
pub struct ShmWindow {
    file: File,
    _map: MmapRegion,
    /// Size in bytes.
    pub size: u64,
    /// Guest-physical address.
    pub gpa: u64,
}

impl ShmWindow {
    /// Creates an `mib` MiB memfd (sealed against resizing), maps it and registers
    /// it with KVM as memory slot `slot` at `gpa`.
    pub fn new(vm: &VmFd, slot: u32, gpa: u64, mib: u64) -> Result<Self, ShmError> {
        let size = mib << 20;
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"cell0-shm".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(ShmError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(ShmError::Memfd)?;
        // Sealed so neither side can shrink it under the other's mapping (SIGBUS).
        // SAFETY: fcntl on an fd we own with valid seal flags.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(ShmError::Memfd(std::io::Error::last_os_error()));
        }
        let dup = file.try_clone().map_err(ShmError::Memfd)?;
        let map = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(dup, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(ShmError::Mmap)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: map.as_ptr() as u64,
        };
        // SAFETY: the mapping lives in `ShmWindow`, which the VM keeps until the
        // KVM VM is gone; the slot number and range are not used by guest RAM.
        unsafe { vm.set_user_memory_region(region) }.map_err(ShmError::Kvm)?;
        Ok(Self {
            file,
            _map: map,
            size,
            gpa,
        })
    }

    /// The cmdline entry announcing the window.
    pub fn cmdline_entry(&self) -> String {
        format!("cell0.shm={:#x}@{:#x}", self.size, self.gpa)
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The `shm` op of the API socket.
pub struct ShmApi {
    /// Size in bytes.
    pub size: u64,
    /// Guest address.
    pub gpa: u64,
    /// A duplicate of the memfd, passed with each answer.
    pub file: File,
}

impl ApiExtension for ShmApi {
    fn handle(&self, op: &str, _req: &Value) -> Option<Value> {
        (op == "shm").then(|| json!({"ok": true, "size": self.size, "gpa": self.gpa}))
    }

    fn fds(&self, op: &str) -> Vec<RawFd> {
        if op == "shm" {
            vec![self.file.as_raw_fd()]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiContext, ApiServer};
    use crate::exit::ExitSignal;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    #[test]
    fn shm_op_passes_the_memfd() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"window bytes").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let ctx = ApiContext::built(
            json!({}),
            Arc::new(ExitSignal::new().unwrap()),
            vec![Box::new(ShmApi {
                size: 12,
                gpa: 4 << 30,
                file: f,
            })],
        );
        let _srv = ApiServer::start(&p, ctx).unwrap();
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{\"op\":\"shm\"}\n").unwrap();
        let mut buf = [0u8; 256];
        let mut fds = [-1; 1];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: iov points at `buf`, which outlives the call.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!(nfds, 1);
        let v: Value = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(v["size"], 12);
        assert_eq!(v["gpa"], 4u64 << 30);
        // SAFETY: the descriptor was just received and is owned by no one else.
        let mut got = unsafe { File::from_raw_fd(fds[0]) };
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "window bytes");
    }

    #[test]
    fn window_sits_above_ram_and_the_hole() {
        assert_eq!(window_gpa(&[(0, 128 << 20)]), 4 << 30);
        assert_eq!(window_gpa(&[(0, 3 << 30)]), 4 << 30);
        assert_eq!(window_gpa(&[(0, 3 << 30), (4 << 30, 1 << 30)]), 5 << 30);
        assert_eq!(
            window_gpa(&[(0, 3 << 30), (4 << 30, (1 << 30) + 1)]),
            6 << 30
        );
    }
}
