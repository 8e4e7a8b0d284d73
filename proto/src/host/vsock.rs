// SPDX-License-Identifier: Apache-2.0
//! The hybrid vsock handshake (Firecracker's model, DESIGN.md §4).
//!
//! A host process reaches a guest's vsock port P by connecting to the VMM's
//! Unix socket `<uds>`, writing `CONNECT P\n`, and reading `OK <hostport>\n`;
//! from then on the stream is the guest connection. Guest-initiated
//! connections to port P arrive on the Unix socket `<uds>_P` with no
//! handshake. Both sides of the handshake are here: the client side for host
//! tools, and the muxer side for tests and for the VMM's muxer if it likes.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: usize = 64;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Connecting to or talking over the Unix socket failed.
    #[error("hybrid vsock I/O failed")]
    Io(#[from] io::Error),
    /// The stream ended before a full line.
    #[error("the stream ended during the handshake")]
    Eof,
    /// The line is longer than any valid one.
    #[error("the handshake line is too long")]
    LineTooLong,
    /// The muxer answered something other than `OK <port>`.
    #[error("the muxer refused the connection: {0:?}")]
    Refused(String),
    /// The request is not `CONNECT <port>`.
    #[error("not a CONNECT request: {0:?}")]
    BadRequest(String),
}

/// The Unix socket on which the VMM exposes guest-initiated connections to `port`.
pub fn guest_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Reads one `\n`-terminated line byte by byte, so nothing after it is consumed.
async fn read_line<R: AsyncRead + Unpin>(io: &mut R) -> Result<String, VsockError> {
    let mut line = Vec::with_capacity(24);
    loop {
        let mut b = [0u8; 1];
        if io.read(&mut b).await? == 0 {
            return Err(VsockError::Eof);
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_LINE {
            return Err(VsockError::LineTooLong);
        }
        line.push(b[0]);
    }
}

/// Client side on an open stream: sends `CONNECT port`, returns the host port
/// from `OK <hostport>`.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    port: u32,
) -> Result<u32, VsockError> {
    io.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let line = read_line(io).await?;
    line.strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or(VsockError::Refused(line))
}

/// Connects to `<uds>` and performs the handshake for guest `port`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds).await?;
    handshake(&mut stream, port).await?;
    Ok(stream)
}

/// Muxer side: reads `CONNECT <port>\n` and returns the port.
pub async fn read_connect<R: AsyncRead + Unpin>(io: &mut R) -> Result<u32, VsockError> {
    let line = read_line(io).await?;
    line.strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or(VsockError::BadRequest(line))
}

/// Muxer side: accepts with `OK <host_port>\n`.
pub async fn write_ok<W: AsyncWrite + Unpin>(io: &mut W, host_port: u32) -> io::Result<()> {
    io.write_all(format!("OK {host_port}\n").as_bytes()).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn handshake_round_trips_and_leaves_the_stream_untouched() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let muxer = tokio::spawn(async move {
            let port = read_connect(&mut b).await.unwrap();
            write_ok(&mut b, 1_073_741_824).await.unwrap();
            b.write_all(b"SYP1").await.unwrap();
            port
        });
        assert_eq!(handshake(&mut a, 1024).await.unwrap(), 1_073_741_824);
        let mut rest = [0u8; 4];
        a.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"SYP1");
        assert_eq!(muxer.await.unwrap(), 1024);
    }

    #[tokio::test]
    async fn refusals_are_typed() {
        let (mut a, mut b) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let _ = read_connect(&mut b).await;
            b.write_all(b"NO\n").await.unwrap();
        });
        assert!(matches!(
            handshake(&mut a, 5).await,
            Err(VsockError::Refused(s)) if s == "NO"
        ));
        let (mut a, b) = tokio::io::duplex(256);
        drop(b);
        assert!(handshake(&mut a, 5).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(256);
        b.write_all(b"HELLO 5\n").await.unwrap();
        assert!(matches!(
            read_connect(&mut a).await,
            Err(VsockError::BadRequest(_))
        ));
    }

    #[test]
    fn guest_port_path_appends_the_port() {
        assert_eq!(
            guest_port_path(Path::new("/run/vm1/vsock.sock"), 1024),
            PathBuf::from("/run/vm1/vsock.sock_1024")
        );
    }
}
