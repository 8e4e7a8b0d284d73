// SPDX-License-Identifier: Apache-2.0
//! The host client SDK (docs/SYPAS.md §15): an agent's connection to the
//! router that keeps its capability token fresh.
//!
//! [`AgentClient`] wraps a [`Client`]. It takes the first token from a
//! [`TokenSource`] callback, says HELLO with it, and then, before the token
//! expires, asks the source for a new one and sends REFRESH. A CALL refused
//! with `TOKEN_EXPIRED` (the router refused it before anything ran) is
//! refreshed and sent once more. Reconnects use the newest token. Errors stay
//! typed: [`SdkError::code`] gives the SYPAS code where there is one.
//!
//! Bulk arguments: write them into the shared-memory window with
//! [`super::shm::ShmWindow::write`] or a [`super::shm::ShmArena`] and pass the refs
//! to [`AgentClient::call_shm`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::client::{Client, ClientConfig, ClientError, Endpoint};
use super::unix_now;
use crate::code::ErrorCode;
use crate::msg::{Call, Reply, ShmRef, Welcome};

/// What a token source may fail with.
pub type TokenSourceError = Box<dyn std::error::Error + Send + Sync>;

/// Gives the agent a fresh capability token (from the control plane, a file,
/// a parent agent that attenuates its own...).
pub trait TokenSource: Send + Sync + 'static {
    /// A token to send in HELLO or REFRESH.
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<Bytes, TokenSourceError>> + Send + '_>>;
}

impl<F, Fut> TokenSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, TokenSourceError>> + Send + 'static,
{
    fn token(&self) -> Pin<Box<dyn Future<Output = Result<Bytes, TokenSourceError>> + Send + '_>> {
        Box::pin(self())
    }
}

/// When to refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Refresh when this little time is left, or a fifth of what was left
    /// at the last WELCOME, whichever is more.
    pub margin: Duration,
    /// Never refresh more often than this.
    pub min_interval: Duration,
    /// After a failed refresh, try again after this long.
    pub retry: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            margin: Duration::from_secs(30),
            min_interval: Duration::from_secs(1),
            retry: Duration::from_secs(1),
        }
    }
}

impl RefreshPolicy {
    /// How long to wait before refreshing a token that expires at `expiry`
    /// (Unix seconds; 0: never), at `now`.
    pub fn delay(&self, expiry: u64, now: u64) -> Option<Duration> {
        if expiry == 0 {
            return None;
        }
        let left = Duration::from_secs(expiry.saturating_sub(now));
        let margin = self.margin.max(left / 5);
        Some(left.saturating_sub(margin).max(self.min_interval))
    }
}

/// Why an SDK operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SdkError {
    /// The connection or the peer failed (typed: see [`ClientError::code`]).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The token source could not give a token.
    #[error("the token source failed: {0}")]
    Token(String),
}

impl SdkError {
    /// The SYPAS error code behind this error, where there is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SdkError::Client(e) => e.code(),
            SdkError::Token(_) => None,
        }
    }
}

struct Inner {
    client: Client,
    source: Arc<dyn TokenSource>,
    refreshes: AtomicU64,
    lock: tokio::sync::Mutex<()>,
    call_timeout: Duration,
}

impl Inner {
    async fn refresh(&self) -> Result<Welcome, SdkError> {
        let _one = self.lock.lock().await;
        let token = self
            .source
            .token()
            .await
            .map_err(|e| SdkError::Token(e.to_string()))?;
        // Later reconnects use it even if this REFRESH cannot be sent now.
        self.client.set_token(token.clone());
        let welcome = self.client.refresh(token).await?;
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        Ok(welcome)
    }
}

/// An agent's SYPAS client with automatic token refresh. Dropping it stops
/// the refresher and, with the last clone of [`AgentClient::client`], ends
/// the session.
pub struct AgentClient {
    inner: Arc<Inner>,
    refresher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("client", &self.inner.client)
            .finish_non_exhaustive()
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl AgentClient {
    /// Takes a token from `source`, connects to `endpoint` and says HELLO as
    /// `config.agent_id`, then keeps the token fresh by `policy`.
    pub async fn connect(
        endpoint: Endpoint,
        mut config: ClientConfig,
        source: impl TokenSource,
        policy: RefreshPolicy,
    ) -> Result<AgentClient, SdkError> {
        let source: Arc<dyn TokenSource> = Arc::new(source);
        config.token = source
            .token()
            .await
            .map_err(|e| SdkError::Token(e.to_string()))?;
        let call_timeout = config.call_timeout;
        let client = Client::connect(endpoint, config).await?;
        let inner = Arc::new(Inner {
            client,
            source,
            refreshes: AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
            call_timeout,
        });
        let weak = Arc::downgrade(&inner);
        let refresher = tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let expiry = inner.client.welcome().map_or(0, |w| w.token_expiry);
                drop(inner);
                let Some(delay) = policy.delay(expiry, unix_now()) else {
                    // No expiry: check again later in case a REFRESH set one.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    continue;
                };
                tokio::time::sleep(delay).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.refresh().await {
                    tracing::warn!(error = %e, "token refresh failed; retrying");
                    drop(inner);
                    tokio::time::sleep(policy.retry).await;
                }
            }
        });
        Ok(AgentClient { inner, refresher })
    }

    /// The underlying client (events, incoming CALLs, ping, goodbye...).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The latest WELCOME: granted rights and token expiry.
    pub fn welcome(&self) -> Option<Welcome> {
        self.inner.client.welcome()
    }

    /// Successful refreshes so far.
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::Relaxed)
    }

    /// Gets a new token from the source and sends REFRESH now.
    pub async fn refresh_now(&self) -> Result<Welcome, SdkError> {
        self.inner.refresh().await
    }

    /// Calls `method` of `service` with inline bytes.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Reply, SdkError> {
        self.call_shm(service, method, payload, Vec::new()).await
    }

    /// Calls with inline bytes and shm refs (bulk arguments already written
    /// into the caller's window).
    pub async fn call_shm(
        &self,
        service: &str,
        method: &str,
        payload: impl Into<Bytes>,
        shm: Vec<ShmRef>,
    ) -> Result<Reply, SdkError> {
        let call = Call {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: payload.into(),
            shm,
        };
        self.call_with(call, self.inner.call_timeout).await
    }

    /// Sends a CALL and waits at most `timeout`. A `TOKEN_EXPIRED` refusal is
    /// refreshed and the CALL sent once more.
    pub async fn call_with(&self, call: Call, timeout: Duration) -> Result<Reply, SdkError> {
        match self.inner.client.call_with(call.clone(), timeout).await {
            Err(e) if e.code() == Some(ErrorCode::TokenExpired) => {
                self.inner.refresh().await?;
                Ok(self.inner.client.call_with(call, timeout).await?)
            }
            other => Ok(other?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_delay_keeps_a_margin() {
        let p = RefreshPolicy::default();
        assert_eq!(p.delay(0, 100), None);
        // 1000 s left: refresh with 200 s left.
        assert_eq!(p.delay(1100, 100), Some(Duration::from_secs(800)));
        // 100 s left: the 30 s margin wins.
        assert_eq!(p.delay(200, 100), Some(Duration::from_secs(70)));
        // Expired or nearly: no faster than min_interval.
        assert_eq!(p.delay(100, 200), Some(Duration::from_secs(1)));
    }
}
