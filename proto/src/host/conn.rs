// SPDX-License-Identifier: Apache-2.0
//! Frame I/O over a tokio byte stream, shared by the client and the server: a
//! cancel-safe frame reader and a batching writer task.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::frame::{Frame, FrameDecoder, FrameError, HEADER_LEN};

/// Frames at least this large are written straight from their payload instead
/// of being copied into the batch buffer.
const DIRECT_WRITE: usize = 64 * 1024;
/// The writer stops batching and writes once this much is buffered.
const BATCH_BYTES: usize = 256 * 1024;
/// Read-ahead granted per read while a frame is incomplete.
const READ_CHUNK: usize = 256 * 1024;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer's bytes are not a valid frame.
    #[error("invalid frame from the peer")]
    Frame(#[source] FrameError),
    /// The stream failed.
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
}

impl From<FrameError> for ConnError {
    fn from(e: FrameError) -> Self {
        ConnError::Frame(e)
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// Reads frames from a stream. [`FrameReader::next`] is cancel-safe: bytes
/// read before a cancellation stay buffered.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    dec: FrameDecoder,
    eof: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the given payload limit.
    pub fn new(io: R, max_payload: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            dec: FrameDecoder::with_max_payload(max_payload),
            eof: false,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream (between frames).
    /// An end of stream inside a frame is `FrameError::Truncated`.
    pub async fn next(&mut self) -> Result<Option<Frame>, ConnError> {
        loop {
            if let Some(frame) = self.dec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.eof {
                return Ok(self.dec.decode_eof(&mut self.buf)?);
            }
            let needed = self.dec.needed(&self.buf)?;
            self.buf.reserve(needed.clamp(4096, READ_CHUNK));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                self.eof = true;
            }
        }
    }

    /// Reads and discards input until end of stream, at most `limit` bytes or
    /// `timeout`, so that a peer that is still writing sees our last frame and
    /// a clean close rather than a reset.
    pub async fn linger(&mut self, limit: usize, timeout: Duration) {
        let drain = async {
            let mut seen = 0usize;
            let mut scratch = vec![0u8; 16 * 1024];
            while seen < limit {
                match self.io.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen += n,
                }
            }
        };
        let _ = tokio::time::timeout(timeout, drain).await;
    }
}

/// What the writer task is told to send.
#[derive(Debug)]
pub enum Outbound {
    /// A frame to write.
    Frame(Frame),
}

/// How the writer task ends.
#[derive(Debug)]
pub enum Close {
    /// Write everything queued, then this frame if any, then shut down.
    Drain(Option<Frame>),
    /// Drop what is queued, write this frame if any, then shut down.
    Abort(Option<Frame>),
}

async fn put_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    buf: &mut BytesMut,
    frame: &Frame,
) -> io::Result<()> {
    let header = match frame.header() {
        Ok(h) => h,
        Err(e) => {
            // Senders check sizes before queueing; a frame that slips through is
            // dropped rather than corrupting the stream.
            tracing::error!(error = %e, kind = %frame.kind, "dropping a frame that cannot be encoded");
            return Ok(());
        }
    };
    if frame.payload.len() >= DIRECT_WRITE {
        buf.extend_from_slice(&header.to_bytes());
        io.write_all(buf).await?;
        buf.clear();
        io.write_all(&frame.payload).await?;
    } else {
        buf.reserve(HEADER_LEN + frame.payload.len());
        buf.extend_from_slice(&header.to_bytes());
        buf.extend_from_slice(&frame.payload);
    }
    Ok(())
}

/// Writes queued frames, batching whatever is ready into one write, until
/// `close` fires or every sender is gone; then shuts the write side down.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Outbound>,
    mut close: oneshot::Receiver<Close>,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let last = loop {
        let first = tokio::select! {
            biased;
            c = &mut close => break c.ok(),
            item = rx.recv() => match item {
                Some(item) => item,
                None => break None,
            },
        };
        // Handler tasks that are about to queue their answers usually sit
        // right behind this one in the run queue: let them run first, so one
        // write carries all their frames instead of one write each (under
        // pipelined load that is most of the cost of a small call).
        if rx.is_empty() {
            tokio::task::yield_now().await;
        }
        let mut next = Some(first);
        while let Some(Outbound::Frame(frame)) = next.take() {
            put_frame(&mut io, &mut buf, &frame).await?;
            if buf.len() >= BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            io.write_all(&buf).await?;
            buf.clear();
        }
    };
    let final_frame = match last {
        Some(Close::Drain(frame)) => {
            while let Ok(Outbound::Frame(f)) = rx.try_recv() {
                put_frame(&mut io, &mut buf, &f).await?;
            }
            frame
        }
        Some(Close::Abort(frame)) => frame,
        None => None,
    };
    if let Some(frame) = final_frame {
        put_frame(&mut io, &mut buf, &frame).await?;
    }
    if !buf.is_empty() {
        io.write_all(&buf).await?;
    }
    io.flush().await?;
    io.shutdown().await
}
