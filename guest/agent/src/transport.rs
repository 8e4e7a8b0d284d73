// SPDX-License-Identifier: Apache-2.0
//! The byte stream under SYPAS: AF_VSOCK inside a guest, a Unix socket in
//! tests and on the host. The agent's logic sees only [`Stream`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any stream SYPAS can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Creating or connecting the vsock socket failed.
    #[error("cannot connect to vsock CID {cid} port {port}")]
    Vsock {
        /// Peer CID.
        cid: u32,
        /// Peer port.
        port: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Connecting the Unix socket failed.
    #[error("cannot connect to {}", path.display())]
    Unix {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Where the host's SYPAS endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK stream to (cid, port): CID 2, port 1024 inside a cell0 guest.
    Vsock {
        /// Peer CID.
        cid: u32,
        /// Peer port.
        port: u32,
    },
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Endpoint {
    /// Opens a stream.
    pub async fn connect(&self) -> Result<Box<dyn Stream>, TransportError> {
        match self {
            Endpoint::Vsock { cid, port } => {
                let s =
                    VsockStream::connect(*cid, *port).map_err(|source| TransportError::Vsock {
                        cid: *cid,
                        port: *port,
                        source,
                    })?;
                Ok(Box::new(s))
            }
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| TransportError::Unix {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Box::new(s))
            }
        }
    }
}

/// A connected AF_VSOCK stream socket, driven by tokio's reactor.
#[derive(Debug)]
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    /// Connects to (cid, port). The connect itself blocks (a vsock connect to
    /// the host is answered by the VMM at once, or refused).
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        set_nonblocking(&fd)?;
        // SAFETY: an OwnedFd stays open, and always returns the same descriptor,
        // for as long as the AsyncFd that owns it lives.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reads into the initialized, writable `unfilled` slice.
                cvt(unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                })
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: writes from the readable `buf` slice.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                cvt(n)
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a descriptor we own.
        let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unix_endpoint_carries_bytes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let ep = Endpoint::Unix(path.clone());
        assert_eq!(ep.to_string(), format!("unix:{}", path.display()));
        let (mut c, (mut s, _)) = tokio::join!(async { ep.connect().await.unwrap() }, async {
            l.accept().await.unwrap()
        });
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
    }

    #[tokio::test]
    async fn missing_sockets_are_typed_errors() {
        let ep = Endpoint::Unix("/nonexistent/x.sock".into());
        assert!(matches!(
            ep.connect().await,
            Err(TransportError::Unix { .. })
        ));
        // No vsock transport on the host (or nobody listens): a typed error, not a panic.
        let ep = Endpoint::Vsock { cid: 2, port: 1 };
        assert!(matches!(
            ep.connect().await,
            Err(TransportError::Vsock { .. })
        ));
    }
}
