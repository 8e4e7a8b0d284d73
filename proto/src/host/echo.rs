// SPDX-License-Identifier: Apache-2.0
//! The `echo` service that VM tests and benchmarks run against.
//!
//! | method | payload | reply |
//! |---|---|---|
//! | `echo` | any bytes | the same bytes (shm refs echoed as given) |
//! | `sleep` | u32 LE milliseconds (≤ 60,000) | empty, after that long |
//! | `fail` | u32 LE error code, then UTF-8 text | ERROR with that code and text |
//!
//! Any other service is `NO_SUCH_SERVICE`, any other method `NO_SUCH_METHOD`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ServiceError;
use super::server::{Handler, Session};
use crate::code::ErrorCode;
use crate::msg::{Call, Reply};

/// The service name.
pub const SERVICE: &str = "echo";
/// The longest `sleep` honoured.
pub const MAX_SLEEP_MS: u32 = 60_000;

/// The echo service; counts the calls it answered.
#[derive(Debug, Default)]
pub struct EchoService {
    calls: AtomicU64,
}

impl EchoService {
    /// A new service.
    pub fn new() -> Self {
        EchoService::default()
    }

    /// Calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

fn le_u32(payload: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

impl Handler for EchoService {
    async fn call(&self, _session: Arc<Session>, call: Call) -> Result<Reply, ServiceError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if call.service != SERVICE {
            return Err(ServiceError::new(
                ErrorCode::NoSuchService,
                format!("No service named {:?}.", call.service),
            ));
        }
        match call.method.as_str() {
            "echo" => Ok(Reply {
                payload: call.payload,
                shm: call.shm,
            }),
            "sleep" => {
                let ms = le_u32(&call.payload).ok_or_else(|| {
                    ServiceError::new(ErrorCode::BadRequest, "sleep takes a u32 LE of ms.")
                })?;
                tokio::time::sleep(Duration::from_millis(u64::from(ms.min(MAX_SLEEP_MS)))).await;
                Ok(Reply::default())
            }
            "fail" => {
                let code = le_u32(&call.payload).ok_or_else(|| {
                    ServiceError::new(ErrorCode::BadRequest, "fail takes a u32 LE code.")
                })?;
                let text = call.payload.get(4..).unwrap_or_default();
                Err(ServiceError {
                    code,
                    message: String::from_utf8_lossy(text).into_owned(),
                })
            }
            other => Err(ServiceError::new(
                ErrorCode::NoSuchMethod,
                format!("echo has no method {other:?}."),
            )),
        }
    }
}
