// SPDX-License-Identifier: Apache-2.0
//! The hybrid Unix-socket backend: guest connections to host port `P` go to the
//! Unix socket `<uds>_P`; host processes connect to `<uds>` and ask for a guest
//! port with `CONNECT P\n`.

mod muxer;
mod rxq;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

pub use muxer::{ConnKey, DEFAULT_MAX_CONNECTIONS, UnixMuxer};

/// First host-side port handed to host-initiated connections (as Firecracker).
pub const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Connects a non-blocking Unix stream socket to `path` without ever blocking:
/// a listener whose backlog is full answers `WouldBlock`, which the muxer
/// treats like a refusal instead of stalling the event loop.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is too long or holds a NUL byte",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the call,
    // and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod connect_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_without_blocking_and_refuses_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert!(connect_nonblocking(&p).is_err());
        let l = UnixListener::bind(&p).unwrap();
        let mut c = connect_nonblocking(&p).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        c.set_nonblocking(false).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
