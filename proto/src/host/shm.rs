// SPDX-License-Identifier: Apache-2.0
//! Shared-memory windows on the host: a memfd mapped `MAP_SHARED`, the same
//! memory a VM sees above its RAM (docs/SYPAS.md §14).
//!
//! The router maps each VM's window (the memfd comes from the VMM's API
//! socket); a host program that plays a guest in tests and benchmarks creates
//! its own with [`ShmWindow::create`]. Bytes move in and out only by copies
//! through raw pointers: no Rust reference ever points into the window,
//! because the other side may write it at any moment (the same rule as
//! vm-memory's volatile slices). Every access is bounds-checked with
//! [`ShmRef::range_in`] first; a ref outside the window is never read.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::msg::ShmRef;

/// Why a window cannot be made, mapped or accessed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A ref does not lie wholly inside the window (or overflows).
    #[error("shm ref ({offset}, {length}) lies outside the {window}-byte window")]
    OutOfBounds {
        /// The ref's offset.
        offset: u64,
        /// The ref's length.
        length: u64,
        /// The window's size.
        window: u64,
    },
    /// The buffer given does not have the ref's length.
    #[error("the buffer holds {buffer} bytes but the ref covers {length}")]
    LengthMismatch {
        /// Buffer length.
        buffer: usize,
        /// Ref length.
        length: u64,
    },
    /// The window size is 0 or does not fit this address space.
    #[error("a window of {0} bytes cannot be mapped")]
    BadSize(u64),
    /// The memfd is smaller than the size announced for it.
    #[error("the memfd holds {actual} bytes, less than the {announced} announced")]
    TooSmall {
        /// Size announced.
        announced: u64,
        /// Size of the file.
        actual: u64,
    },
    /// The memfd is not sealed against shrinking, so mapping it could fault.
    #[error("the memfd is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    /// A system call failed.
    #[error("{call} failed")]
    Os {
        /// Which call.
        call: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn os(call: &'static str) -> ShmError {
    ShmError::Os {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A mapped shared-memory window.
#[derive(Debug)]
pub struct ShmWindow {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the window is a MAP_SHARED mapping owned by this value until drop;
// every access copies through raw pointers after a bounds check, so sharing
// it between threads adds nothing the other process could not already do.
unsafe impl Send for ShmWindow {}
// SAFETY: as for Send: no method hands out references into the mapping.
unsafe impl Sync for ShmWindow {}

impl ShmWindow {
    /// Creates a memfd of `len` bytes, sealed against shrinking and growing,
    /// and maps it.
    pub fn create(name: &str, len: u64) -> Result<ShmWindow, ShmError> {
        let cname = std::ffi::CString::new(name.replace('\0', "_")).map_err(|_| ShmError::Os {
            call: "memfd_create",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: cname is a valid NUL-terminated string; the flags are valid.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = i64::try_from(len).map_err(|_| ShmError::BadSize(len))?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
            return Err(os("ftruncate"));
        }
        // SAFETY: fcntl on a descriptor we own, with valid seal flags.
        let r = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(os("fcntl(F_ADD_SEALS)"));
        }
        Self::map(fd, len)
    }

    /// Maps `len` bytes of a memfd that is sealed against shrinking (as the
    /// VMM's window is), after checking its size.
    pub fn map(fd: OwnedFd, len: u64) -> Result<ShmWindow, ShmError> {
        let size = usize::try_from(len)
            .ok()
            .filter(|s| *s > 0 && *s <= isize::MAX as usize)
            .ok_or(ShmError::BadSize(len))?;
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(ShmError::NotSealed);
        }
        // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which lives for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(os("fstat"));
        }
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual < len {
            return Err(ShmError::TooSmall {
                announced: len,
                actual,
            });
        }
        // SAFETY: a fresh shared mapping of a file we checked is at least
        // `size` bytes and cannot shrink; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(ShmError::BadSize(len))?;
        Ok(ShmWindow { ptr, len: size, fd })
    }

    /// The window size in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the window is empty (never true: size 0 cannot be mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The byte range `r` covers, if it lies inside the window.
    pub fn range(&self, r: &ShmRef) -> Result<Range<usize>, ShmError> {
        r.range_in(self.len())
            .map(|range| range.start as usize..range.end as usize)
            .ok_or(ShmError::OutOfBounds {
                offset: r.offset,
                length: r.length,
                window: self.len(),
            })
    }

    /// Copies `data` into the window at `offset` and returns the ref to it.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<ShmRef, ShmError> {
        let r = ShmRef {
            offset,
            length: data.len() as u64,
        };
        let range = self.range(&r)?;
        // SAFETY: range lies inside the mapping (checked above); `data` is a
        // separate buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().add(range.start),
                data.len(),
            );
        }
        Ok(r)
    }

    /// Copies the bytes of `r` into `dst`, which must be exactly as long.
    pub fn read_into(&self, r: &ShmRef, dst: &mut [u8]) -> Result<(), ShmError> {
        let range = self.range(r)?;
        if dst.len() != range.len() {
            return Err(ShmError::LengthMismatch {
                buffer: dst.len(),
                length: r.length,
            });
        }
        // SAFETY: range lies inside the mapping; dst is a separate buffer of
        // the same length.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(range.start),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        Ok(())
    }

    /// The bytes of `r`, copied out.
    pub fn read(&self, r: &ShmRef) -> Result<Vec<u8>, ShmError> {
        let len = self.range(r)?.len();
        let mut v = vec![0u8; len];
        self.read_into(r, &mut v)?;
        Ok(v)
    }

    /// Appends the bytes of `r` to `out`.
    pub fn read_append(&self, r: &ShmRef, out: &mut Vec<u8>) -> Result<(), ShmError> {
        let len = self.range(r)?.len();
        let start = out.len();
        out.resize(start + len, 0);
        self.read_into(r, &mut out[start..])
    }

    /// Passes the bytes of `r` to `f` in pieces of at most `chunk` bytes,
    /// copied through one bounce buffer (for a digest or a checksum over a
    /// large ref without a large allocation).
    pub fn read_chunks(
        &self,
        r: &ShmRef,
        chunk: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), ShmError> {
        let range = self.range(r)?;
        let chunk = chunk.max(1);
        let mut buf = vec![0u8; chunk.min(range.len())];
        let mut at = range.start;
        while at < range.end {
            let n = chunk.min(range.end - at);
            // SAFETY: at..at+n lies inside `range`, inside the mapping; buf is
            // a separate buffer of at least n bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), buf.as_mut_ptr(), n);
            }
            f(&buf[..n]);
            at += n;
        }
        Ok(())
    }

    /// Copies the bytes of `src` to `dst_offset` inside the window (the two
    /// may overlap) and returns the ref to the copy.
    pub fn copy_within(&self, src: &ShmRef, dst_offset: u64) -> Result<ShmRef, ShmError> {
        let from = self.range(src)?;
        let dst = ShmRef {
            offset: dst_offset,
            length: src.length,
        };
        let to = self.range(&dst)?;
        // SAFETY: both ranges lie inside the mapping; `copy` allows overlap.
        unsafe {
            std::ptr::copy(
                self.ptr.as_ptr().add(from.start),
                self.ptr.as_ptr().add(to.start),
                from.len(),
            );
        }
        Ok(dst)
    }
}

impl Drop for ShmWindow {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `map`, unmapped once here.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Places byte strings one after another in a window and hands out refs:
/// the shm helper for building a CALL with bulk arguments.
#[derive(Debug)]
pub struct ShmArena<'w> {
    window: &'w ShmWindow,
    base: u64,
    end: u64,
    next: u64,
}

impl<'w> ShmArena<'w> {
    /// An arena over the whole window.
    pub fn new(window: &'w ShmWindow) -> ShmArena<'w> {
        ShmArena {
            window,
            base: 0,
            end: window.len(),
            next: 0,
        }
    }

    /// An arena over `range` of the window (for one of several writers).
    pub fn over(window: &'w ShmWindow, range: Range<u64>) -> Result<ShmArena<'w>, ShmError> {
        let r = ShmRef {
            offset: range.start,
            length: range.end.saturating_sub(range.start),
        };
        window.range(&r)?;
        Ok(ShmArena {
            window,
            base: range.start,
            end: range.end,
            next: range.start,
        })
    }

    /// Copies `data` into the next free bytes and returns its ref.
    pub fn put(&mut self, data: &[u8]) -> Result<ShmRef, ShmError> {
        let len = data.len() as u64;
        if self.next.checked_add(len).is_none_or(|e| e > self.end) {
            return Err(ShmError::OutOfBounds {
                offset: self.next,
                length: len,
                window: self.end,
            });
        }
        let r = self.window.write(self.next, data)?;
        self.next += len;
        Ok(r)
    }

    /// Frees every ref handed out (once the peer has answered).
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn write_read_and_bounds() {
        let w = ShmWindow::create("t", 4096).unwrap();
        let r = w.write(100, b"hello").unwrap();
        assert_eq!(
            r,
            ShmRef {
                offset: 100,
                length: 5
            }
        );
        assert_eq!(w.read(&r).unwrap(), b"hello");
        assert!(matches!(
            w.write(4095, b"xy"),
            Err(ShmError::OutOfBounds { .. })
        ));
        let over = ShmRef {
            offset: u64::MAX,
            length: 2,
        };
        assert!(matches!(w.read(&over), Err(ShmError::OutOfBounds { .. })));
        let copy = w.copy_within(&r, 4000).unwrap();
        assert_eq!(w.read(&copy).unwrap(), b"hello");
        let mut seen = Vec::new();
        w.read_chunks(&r, 2, |c| seen.push(c.to_vec())).unwrap();
        assert_eq!(seen, vec![b"he".to_vec(), b"ll".to_vec(), b"o".to_vec()]);
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bytes() {
        let a = ShmWindow::create("t", 8192).unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = ShmWindow::map(fd, 8192).unwrap();
        a.write(10, b"shared").unwrap();
        assert_eq!(
            b.read(&ShmRef {
                offset: 10,
                length: 6
            })
            .unwrap(),
            b"shared"
        );
    }

    #[test]
    fn unsealed_or_short_memfds_are_refused() {
        // SAFETY: valid name and flags.
        let raw = unsafe { libc::memfd_create(c"u".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        assert!(matches!(ShmWindow::map(fd, 4096), Err(ShmError::NotSealed)));
        let w = ShmWindow::create("t", 4096).unwrap();
        let fd = w.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            ShmWindow::map(fd, 8192),
            Err(ShmError::TooSmall { .. })
        ));
    }

    #[test]
    fn arena_hands_out_consecutive_refs() {
        let w = ShmWindow::create("t", 16).unwrap();
        let mut a = ShmArena::new(&w);
        assert_eq!(
            a.put(b"abc").unwrap(),
            ShmRef {
                offset: 0,
                length: 3
            }
        );
        assert_eq!(
            a.put(b"de").unwrap(),
            ShmRef {
                offset: 3,
                length: 2
            }
        );
        assert!(a.put(&[0u8; 12]).is_err());
        a.reset();
        assert_eq!(a.put(b"z").unwrap().offset, 0);
    }
}
