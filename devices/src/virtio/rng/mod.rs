// SPDX-License-Identifier: Apache-2.0
//! virtio-rng (entropy device): fills the guest's buffers with random bytes,
//! so a guest kernel never stalls waiting for entropy at boot.
//!
//! Layout as for the other devices: `device.rs` (the
//! [`crate::virtio::VirtioDevice`]), `event_handler.rs`, `metrics.rs`. The bytes
//! come from an [`EntropySource`]: [`OsEntropy`] (the host's `getrandom(2)`) in
//! production, a fixed pattern in tests.

pub mod device;
pub mod event_handler;
pub mod metrics;

#[cfg(test)]
mod tests;

use std::io;

pub use device::Rng;
pub use metrics::RngMetrics;

/// Maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue sizes as the transport reads them.
pub const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];
/// Most bytes given for one request; a larger buffer is filled up to this.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating the activation eventfd failed.
    #[error("cannot create an event source")]
    EventSource(#[source] io::Error),
}

/// Where random bytes come from.
pub trait EntropySource: Send {
    /// Fills `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host kernel's CSPRNG through `getrandom(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl EntropySource for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: the pointer and length describe `rest`, a live, writable
            // slice; getrandom writes at most that many bytes.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            done += n as usize;
        }
        Ok(())
    }
}
