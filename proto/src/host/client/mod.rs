// SPDX-License-Identifier: Apache-2.0
//! A SYPAS client: connect (Unix socket, hybrid vsock, or any stream), HELLO,
//! pipelined `call`s with request ids and per-call timeouts, PING/PONG
//! heartbeats with a dead-peer deadline, EVENT pub/sub, incoming CALLs,
//! REFRESH, GOODBYE, and reconnect with back-off.
//!
//! Semantics (docs/SYPAS.md, "Client"):
//! - Every request gets a fresh request id; replies are matched by id, so any
//!   number of calls may be in flight on one connection.
//! - A call waits at most its timeout, in total: for a connection (while
//!   reconnecting), for queue space and for the reply. Then `Timeout`.
//! - When the connection is lost, every call in flight on it fails at once
//!   with `Disconnected(reason)`; nothing is retried behind the caller's back
//!   (a CALL may have had effects). New calls wait for the reconnect.
//! - Reconnect re-sends HELLO with the latest token and re-subscribes topics.

mod driver;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::ServiceError;
use super::conn::Outbound;
use super::vsock::{self, VsockError};
use crate::frame::{Frame, FrameError, Kind, MAX_PAYLOAD};
use crate::msg::{
    Call, ErrorMsg, Event, Goodbye, Ping, Pong, Refresh, Reply, Subscribe, Unsubscribe, Welcome,
};

pub use driver::Disconnect;
use driver::{BoxStream, LinkState, Shared};

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket (the router's socket, or a VMM's `<uds>_<port>`).
    Unix(PathBuf),
    /// The host side of a VMM's hybrid vsock: connect to `uds`, then `CONNECT port`.
    HybridVsock {
        /// The VMM's vsock Unix socket.
        uds: PathBuf,
        /// The guest's vsock port.
        port: u32,
    },
}

impl Endpoint {
    async fn open(&self) -> Result<BoxStream, ClientError> {
        match self {
            Endpoint::Unix(path) => match UnixStream::connect(path).await {
                Ok(s) => Ok(Box::new(s)),
                Err(e) => Err(ClientError::Connect {
                    path: path.clone(),
                    source: Arc::new(e),
                }),
            },
            Endpoint::HybridVsock { uds, port } => match vsock::connect(uds, *port).await {
                Ok(s) => Ok(Box::new(s)),
                Err(e) => Err(ClientError::Vsock(Arc::new(e))),
            },
        }
    }
}

/// When and how often to reconnect after a lost connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Attempts per outage before giving up (`None`: forever, `Some(0)`: never reconnect).
    pub max_attempts: Option<u32>,
    /// Delay before the first attempt.
    pub initial_backoff: Duration,
    /// Cap of the doubling delay.
    pub max_backoff: Duration,
}

impl ReconnectPolicy {
    /// No reconnect: a lost connection closes the client.
    pub fn never() -> Self {
        ReconnectPolicy {
            max_attempts: Some(0),
            ..ReconnectPolicy::default()
        }
    }

    /// The delay before attempt `attempt` (0-based): doubling from
    /// `initial_backoff`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Agent id sent in HELLO.
    pub agent_id: String,
    /// Capability token sent in HELLO (replaced by [`Client::refresh`]).
    pub token: Bytes,
    /// Default per-call timeout.
    pub call_timeout: Duration,
    /// Limit for connecting plus the HELLO/WELCOME exchange.
    pub connect_timeout: Duration,
    /// Heartbeat PING period (`None`: no heartbeats, no dead-peer detection).
    pub ping_interval: Option<Duration>,
    /// A connection with no frame from the peer for this long is dead.
    pub dead_peer_timeout: Duration,
    /// What to do after a lost connection.
    pub reconnect: ReconnectPolicy,
    /// Frames queued for writing; callers wait (within their timeout) when full.
    pub outbound_queue: usize,
    /// EVENTs buffered for [`Client::events`]; more are dropped and counted.
    pub event_queue: usize,
    /// Largest payload accepted from the peer (at most 16 MiB).
    pub max_payload: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            agent_id: String::new(),
            token: Bytes::new(),
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Some(Duration::from_secs(5)),
            dead_peer_timeout: Duration::from_secs(15),
            reconnect: ReconnectPolicy::default(),
            outbound_queue: 4096,
            event_queue: 1024,
            max_payload: MAX_PAYLOAD,
        }
    }
}

impl ClientConfig {
    /// Defaults with an agent id.
    pub fn new(agent_id: impl Into<String>) -> Self {
        ClientConfig {
            agent_id: agent_id.into(),
            ..ClientConfig::default()
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the Unix socket failed.
    #[error("cannot connect to {}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<io::Error>,
    },
    /// The hybrid vsock handshake failed.
    #[error("hybrid vsock connect failed")]
    Vsock(#[source] Arc<VsockError>),
    /// The server answered HELLO with ERROR.
    #[error("the server refused HELLO")]
    HelloRefused(#[source] ServiceError),
    /// The peer answered with ERROR.
    #[error("the peer answered with an error")]
    Remote(#[source] ServiceError),
    /// No answer within the timeout.
    #[error("no answer within the timeout")]
    Timeout,
    /// The connection was lost while the request was outstanding.
    #[error("the connection was lost")]
    Disconnected(#[source] Disconnect),
    /// The client was closed (GOODBYE, or dropped).
    #[error("the client is closed")]
    Closed,
    /// Reconnecting failed `attempts` times in a row; the client is closed.
    #[error("gave up reconnecting after {attempts} attempts")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
    /// The request cannot be framed (too large).
    #[error("the request cannot be sent")]
    Frame(#[source] FrameError),
    /// The answer's payload does not decode.
    #[error("the peer's answer is malformed")]
    Malformed(#[source] crate::msg::MessageError),
    /// The peer answered with a kind that does not fit the request.
    #[error("the peer answered with an unexpected {0} frame")]
    Unexpected(Kind),
}

impl ClientError {
    /// The SYPAS error code behind this error, where there is one.
    pub fn code(&self) -> Option<crate::code::ErrorCode> {
        match self {
            ClientError::Remote(e) | ClientError::HelloRefused(e) => e.error_code(),
            ClientError::Disconnected(Disconnect::PeerError(e)) => e.error_code(),
            ClientError::Disconnected(Disconnect::Protocol(e)) | ClientError::Frame(e) => {
                Some(e.code())
            }
            ClientError::Timeout => Some(crate::code::ErrorCode::Timeout),
            _ => None,
        }
    }
}

/// A CALL the peer (e.g. the router delivering `agent/<id>`) made to this client.
#[derive(Debug)]
pub struct IncomingCall {
    /// The call.
    pub call: Call,
    request_id: u64,
    channel: u32,
    tx: mpsc::Sender<Outbound>,
}

impl IncomingCall {
    /// Sends the REPLY or ERROR. Fails only if that connection is gone.
    pub async fn respond(self, result: Result<Reply, ServiceError>) -> Result<(), ClientError> {
        let frame = match result {
            Ok(reply) => Frame::from_message(Kind::Reply, self.request_id, &reply),
            Err(e) => Frame::from_message(Kind::Error, self.request_id, &ErrorMsg::from(e)),
        };
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(ClientError::Frame(FrameError::Oversize {
                len: frame.payload.len() as u64,
                max: MAX_PAYLOAD,
            }));
        }
        self.tx
            .send(Outbound::Frame(frame.with_channel(self.channel)))
            .await
            .map_err(|_| ClientError::Disconnected(Disconnect::PeerClosed))
    }
}

/// Ends the session when the last [`Client`] clone is dropped.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close_local(true);
    }
}

/// A SYPAS client. Cheap to clone; all clones share one connection. The
/// session ends (GOODBYE) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl Client {
    /// Connects to `endpoint` and says HELLO. One attempt: an error is returned
    /// at once; the reconnect policy governs only later outages.
    pub async fn connect(endpoint: Endpoint, config: ClientConfig) -> Result<Client, ClientError> {
        let shared = Shared::new(Some(endpoint), config);
        let io = driver::establish(&shared).await?;
        Ok(Client::start(shared, io))
    }

    /// Says HELLO over an already open stream. Such a client cannot reconnect.
    pub async fn from_stream<S>(stream: S, config: ClientConfig) -> Result<Client, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let shared = Shared::new(None, config);
        let io = driver::handshake(&shared, Box::new(stream)).await?;
        Ok(Client::start(shared, io))
    }

    fn start(shared: Arc<Shared>, io: driver::LinkIo) -> Client {
        let running = driver::open_link(&shared, io);
        tokio::spawn(driver::drive(shared.clone(), running));
        Client {
            handle: Arc::new(Handle { shared }),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Calls `method` of `service` with the default timeout.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Reply, ClientError> {
        let call = Call {
            service: service.to_owned(),
            method: method.to_owned(),
            payload: payload.into(),
            shm: Vec::new(),
        };
        self.call_with(call, self.shared().config.call_timeout)
            .await
    }

    /// Sends a CALL (shm refs included) and waits at most `timeout` for its answer.
    pub async fn call_with(&self, call: Call, timeout: Duration) -> Result<Reply, ClientError> {
        let payload = prost::Message::encode_to_vec(&call);
        let frame = self.request(Kind::Call, payload.into(), timeout).await?;
        expect_reply(frame)
    }

    /// Sends a PING and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        let ping = Ping {
            nonce: 0,
            timestamp_ns: driver::monotonic_ns(),
        };
        let payload = prost::Message::encode_to_vec(&ping);
        let frame = self
            .request(
                Kind::Ping,
                payload.into(),
                self.shared().config.call_timeout,
            )
            .await?;
        match frame.kind {
            Kind::Pong => {
                frame
                    .decode_message::<Pong>()
                    .map_err(|reason| malformed(Kind::Pong, reason))?;
                Ok(start.elapsed())
            }
            Kind::Error => Err(remote(&frame)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Replaces the session's token (REFRESH); later reconnects use it too.
    pub async fn refresh(&self, token: Bytes) -> Result<Welcome, ClientError> {
        let payload = prost::Message::encode_to_vec(&Refresh {
            token: token.clone(),
        });
        let frame = self
            .request(
                Kind::Refresh,
                payload.into(),
                self.shared().config.call_timeout,
            )
            .await?;
        match frame.kind {
            Kind::Welcome => {
                let welcome = frame
                    .decode_message::<Welcome>()
                    .map_err(|reason| malformed(Kind::Welcome, reason))?;
                self.shared().set_token(token);
                self.shared().set_welcome(welcome.clone());
                Ok(welcome)
            }
            Kind::Error => Err(remote(&frame)),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Replaces the token that later HELLOs (reconnects) send, without a
    /// REFRESH of the current session.
    pub fn set_token(&self, token: Bytes) {
        self.shared().set_token(token);
    }

    /// Subscribes to `topic` (and again after every reconnect).
    pub async fn subscribe(&self, topic: &str) -> Result<(), ClientError> {
        let payload = prost::Message::encode_to_vec(&Subscribe {
            topic: topic.to_owned(),
        });
        let frame = self
            .request(
                Kind::Subscribe,
                payload.into(),
                self.shared().config.call_timeout,
            )
            .await?;
        expect_reply(frame)?;
        self.shared().add_topic(topic);
        Ok(())
    }

    /// Unsubscribes from `topic`.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.shared().remove_topic(topic);
        let payload = prost::Message::encode_to_vec(&Unsubscribe {
            topic: topic.to_owned(),
        });
        let frame = self
            .request(
                Kind::Unsubscribe,
                payload.into(),
                self.shared().config.call_timeout,
            )
            .await?;
        expect_reply(frame).map(drop)
    }

    /// Publishes an EVENT and waits for the peer's acknowledgement.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        let event = Event {
            topic: topic.to_owned(),
            payload: payload.into(),
            source: String::new(),
        };
        let bytes = prost::Message::encode_to_vec(&event);
        let frame = self
            .request(Kind::Event, bytes.into(), self.shared().config.call_timeout)
            .await?;
        expect_reply(frame).map(drop)
    }

    /// The EVENTs delivered to this client. Only the first caller gets the receiver.
    pub fn events(&self) -> Option<mpsc::Receiver<Event>> {
        self.shared().take_events()
    }

    /// EVENTs dropped because the [`events`](Self::events) queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.shared().dropped_events.load(Ordering::Relaxed)
    }

    /// CALLs made to this client by the peer. Only the first caller gets the
    /// receiver; until then, and after it is dropped, such CALLs get
    /// `NO_SUCH_SERVICE`.
    pub fn incoming(&self) -> Option<mpsc::Receiver<IncomingCall>> {
        self.shared().take_incoming()
    }

    /// The latest WELCOME (from HELLO, a reconnect, or REFRESH).
    pub fn welcome(&self) -> Option<Welcome> {
        self.shared().welcome()
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(&*self.shared().state.borrow(), LinkState::Up(_))
    }

    /// Says GOODBYE, waits until the peer has answered every call in flight
    /// and closed (bounded by the call timeout), and closes the client.
    pub async fn goodbye(self, reason: &str) -> Result<(), ClientError> {
        let shared = self.shared().clone();
        shared.closing.store(true, Ordering::SeqCst);
        let link = match &*shared.state.borrow() {
            LinkState::Up(link) => Some(link.clone()),
            _ => None,
        };
        let Some(link) = link else {
            shared.close_local(false);
            return Ok(());
        };
        let bye = Frame::from_message(
            Kind::Goodbye,
            0,
            &Goodbye {
                reason: reason.to_owned(),
            },
        );
        let deadline = tokio::time::Instant::now() + shared.config.call_timeout;
        let sent = tokio::time::timeout_at(deadline, link.tx.send(Outbound::Frame(bye))).await;
        if !matches!(sent, Ok(Ok(()))) {
            shared.close_local(false);
            return Ok(());
        }
        let mut rx = shared.state.subscribe();
        let closed = rx.wait_for(|s| matches!(s, LinkState::Closed(_)));
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            shared.close_local(false);
            return Err(ClientError::Timeout);
        }
        Ok(())
    }

    /// Sends one request frame and waits for the frame that answers it.
    async fn request(
        &self,
        kind: Kind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ClientError::Frame(FrameError::Oversize {
                len: payload.len() as u64,
                max: MAX_PAYLOAD,
            }));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let shared = self.shared();
        let link = shared.wait_link(deadline).await?;
        let id = shared.next_id();
        let rx = link.register(id)?;
        let frame = Frame::new(kind, id, payload);
        match tokio::time::timeout_at(deadline, link.tx.send(Outbound::Frame(frame))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                link.forget(id);
                return Err(link.lost());
            }
            Err(_) => {
                link.forget(id);
                return Err(ClientError::Timeout);
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(link.lost()),
            Err(_) => {
                link.forget(id);
                Err(ClientError::Timeout)
            }
        }
    }
}

fn malformed(kind: Kind, reason: prost::DecodeError) -> ClientError {
    ClientError::Malformed(crate::msg::MessageError::Malformed { kind, reason })
}

fn remote(frame: &Frame) -> ClientError {
    match frame.decode_message::<ErrorMsg>() {
        Ok(msg) => ClientError::Remote(msg.into()),
        Err(reason) => malformed(Kind::Error, reason),
    }
}

fn expect_reply(frame: Frame) -> Result<Reply, ClientError> {
    match frame.kind {
        Kind::Reply => frame
            .decode_message::<Reply>()
            .map_err(|reason| malformed(Kind::Reply, reason)),
        Kind::Error => Err(remote(&frame)),
        other => Err(ClientError::Unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = ReconnectPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        assert_eq!(p.backoff(0), Duration::from_millis(10));
        assert_eq!(p.backoff(1), Duration::from_millis(20));
        assert_eq!(p.backoff(3), Duration::from_millis(80));
        assert_eq!(p.backoff(4), Duration::from_millis(100));
        assert_eq!(p.backoff(u32::MAX), Duration::from_millis(100));
    }
}
