// SPDX-License-Identifier: Apache-2.0
//! In-process services ([`LocalService`]) and the built-in `echo` service.
//!
//! An in-process service sees the caller's shared-memory window
//! ([`CallContext::window`]) and reads a CALL's refs there without a copy
//! through the socket; the router has already checked every ref against the
//! window. It may write results into the caller's window and answer with
//! refs to them; the router checks those too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use cell0_proto::ErrorCode;
use cell0_proto::host::{ServiceError, ShmWindow};
use cell0_proto::msg::{Call, Reply, ShmRef};
use sha2::{Digest, Sha256};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who calls an in-process service.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The caller's agent id (verified at HELLO).
    pub agent: String,
    /// The VM the caller's connection came from (`host` for the router socket).
    pub vm: String,
    /// The caller's session id.
    pub session: u64,
    /// The caller's shared-memory window, if its VM has one.
    pub window: Option<Arc<ShmWindow>>,
}

impl CallContext {
    /// The caller's window, or `SHM_UNAVAILABLE`.
    pub fn window(&self) -> Result<&Arc<ShmWindow>, ServiceError> {
        self.window.as_ref().ok_or_else(|| {
            ServiceError::new(
                ErrorCode::ShmUnavailable,
                "The caller's VM has no shared-memory window.",
            )
        })
    }
}

/// A service that runs inside the router's process.
pub trait LocalService: Send + Sync + 'static {
    /// Answers a CALL the caller's rights permit.
    fn call(&self, ctx: CallContext, call: Call) -> BoxFuture<'_, Result<Reply, ServiceError>>;
}

/// Chunk size for reading refs through a bounce buffer (a multiple of 8).
const CHUNK: usize = 256 * 1024;

/// XOR of the little-endian u64 words of `bytes`, the last one zero-padded.
pub fn fold64(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc ^= u64::from_le_bytes(b);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        acc ^= u64::from_le_bytes(b);
    }
    acc
}

/// The built-in `echo` service (docs/SYPAS.md §16). Methods:
///
/// - `echo`: answers with the payload and the refs unchanged;
/// - `fold`: answers with 16 bytes: the XOR of [`fold64`] of the payload and
///   of each ref's bytes (u64 LE), then the total length (u64 LE);
/// - `sha256`: answers with the SHA-256 of the payload followed by the
///   bytes of each ref, in order;
/// - `copy`: the payload is a u64 LE offset; copies the refs' bytes back to
///   back into the caller's window from that offset and answers with refs
///   to the copies (the byte-for-byte shm check);
/// - `fail`: the payload is a u32 LE code and UTF-8 text; answers with that ERROR.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoService;

impl EchoService {
    fn answer(ctx: &CallContext, call: Call) -> Result<Reply, ServiceError> {
        let bad = |m: &str| ServiceError::new(ErrorCode::BadRequest, m);
        let shm_err = |e: cell0_proto::host::ShmError| {
            ServiceError::new(ErrorCode::ShmOutOfBounds, format!("{e}."))
        };
        match call.method.as_str() {
            "echo" => Ok(Reply {
                payload: call.payload,
                shm: call.shm,
            }),
            "fold" => {
                let mut acc = fold64(&call.payload);
                let mut total = call.payload.len() as u64;
                if !call.shm.is_empty() {
                    let w = ctx.window()?;
                    for r in &call.shm {
                        let mut piece = 0u64;
                        w.read_chunks(r, CHUNK, |c| piece ^= fold64(c))
                            .map_err(shm_err)?;
                        acc ^= piece;
                        total += r.length;
                    }
                }
                let mut out = acc.to_le_bytes().to_vec();
                out.extend_from_slice(&total.to_le_bytes());
                Ok(Reply {
                    payload: out.into(),
                    shm: Vec::new(),
                })
            }
            "sha256" => {
                let mut h = Sha256::new();
                h.update(&call.payload);
                if !call.shm.is_empty() {
                    let w = ctx.window()?;
                    for r in &call.shm {
                        w.read_chunks(r, CHUNK, |c| h.update(c)).map_err(shm_err)?;
                    }
                }
                Ok(Reply {
                    payload: Bytes::copy_from_slice(&h.finalize()),
                    shm: Vec::new(),
                })
            }
            "copy" => {
                let at: [u8; 8] = call
                    .payload
                    .as_ref()
                    .try_into()
                    .map_err(|_| bad("copy takes a u64 LE destination offset."))?;
                let mut at = u64::from_le_bytes(at);
                let w = ctx.window()?;
                let mut out = Vec::with_capacity(call.shm.len());
                for r in &call.shm {
                    out.push(w.copy_within(r, at).map_err(shm_err)?);
                    at = at
                        .checked_add(r.length)
                        .ok_or_else(|| bad("The destination overflows."))?;
                }
                Ok(Reply {
                    payload: Bytes::new(),
                    shm: out,
                })
            }
            "fail" => {
                if call.payload.len() < 4 {
                    return Err(bad("fail takes a u32 LE code and text."));
                }
                let code = u32::from_le_bytes([
                    call.payload[0],
                    call.payload[1],
                    call.payload[2],
                    call.payload[3],
                ]);
                let text = String::from_utf8_lossy(&call.payload[4..]).into_owned();
                Err(ServiceError {
                    code,
                    message: text,
                })
            }
            other => Err(ServiceError::new(
                ErrorCode::NoSuchMethod,
                format!("echo has no method {other:?}."),
            )),
        }
    }
}

impl LocalService for EchoService {
    fn call(&self, ctx: CallContext, call: Call) -> BoxFuture<'_, Result<Reply, ServiceError>> {
        // Small calls are answered inline; large shm work runs on the
        // blocking pool so one big `fold` does not stall the runtime.
        let big = call.shm.iter().map(|r| r.length).sum::<u64>() > 4 * 1024 * 1024;
        Box::pin(async move {
            if big {
                tokio::task::spawn_blocking(move || Self::answer(&ctx, call))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ServiceError::new(
                            ErrorCode::Internal,
                            format!("echo failed: {e}"),
                        ))
                    })
            } else {
                Self::answer(&ctx, call)
            }
        })
    }
}

/// The refs of `refs`, read from `window` and appended to `out` in order.
pub(crate) fn gather(
    window: &ShmWindow,
    refs: &[ShmRef],
    out: &mut Vec<u8>,
) -> Result<(), cell0_proto::host::ShmError> {
    for r in refs {
        window.read_append(r, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(window: Option<Arc<ShmWindow>>) -> CallContext {
        CallContext {
            agent: "a".into(),
            vm: "vm".into(),
            session: 1,
            window,
        }
    }

    fn call(method: &str, payload: &[u8], shm: Vec<ShmRef>) -> Call {
        Call {
            service: "echo".into(),
            method: method.into(),
            payload: Bytes::copy_from_slice(payload),
            shm,
        }
    }

    #[test]
    fn fold_and_sha256_cover_payload_and_refs() {
        let w = Arc::new(ShmWindow::create("t", 1 << 20).unwrap());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let r = w.write(8, &data).unwrap();
        let reply =
            EchoService::answer(&ctx(Some(w.clone())), call("fold", b"abc", vec![r])).unwrap();
        let want = fold64(b"abc") ^ fold64(&data);
        assert_eq!(&reply.payload[..8], &want.to_le_bytes());
        assert_eq!(&reply.payload[8..], &(100_003u64).to_le_bytes());
        let reply = EchoService::answer(&ctx(Some(w)), call("sha256", b"abc", vec![r])).unwrap();
        let mut h = Sha256::new();
        h.update(b"abc");
        h.update(&data);
        assert_eq!(&reply.payload[..], &h.finalize()[..]);
    }

    #[test]
    fn copy_writes_into_the_callers_window() {
        let w = Arc::new(ShmWindow::create("t", 4096).unwrap());
        let r = w.write(0, b"0123456789").unwrap();
        let reply = EchoService::answer(
            &ctx(Some(w.clone())),
            call("copy", &1000u64.to_le_bytes(), vec![r]),
        )
        .unwrap();
        assert_eq!(
            reply.shm,
            vec![ShmRef {
                offset: 1000,
                length: 10
            }]
        );
        assert_eq!(w.read(&reply.shm[0]).unwrap(), b"0123456789");
        let err = EchoService::answer(&ctx(Some(w)), call("copy", &4090u64.to_le_bytes(), vec![r]))
            .unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::ShmOutOfBounds));
        let err = EchoService::answer(&ctx(None), call("fold", b"", vec![r])).unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::ShmUnavailable));
    }
}
