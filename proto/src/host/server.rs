// SPDX-License-Identifier: Apache-2.0
//! A SYPAS server: one task per connection, a [`Handler`] for CALLs (and,
//! optionally, EVENT pub/sub), a pluggable [`HelloHook`] that turns HELLO and
//! REFRESH into a [`Grant`], and strict framing: a malformed frame gets an
//! ERROR frame with its typed code and the connection is closed. Nothing a
//! peer sends makes it panic.
//!
//! Session rules enforced here, whatever the hook: HELLO first (else
//! `NOT_HELLO`), once (else `ALREADY_HELLO`); every CALL is checked against the
//! session's granted rights (`PERMISSION_DENIED`) and expiry (`TOKEN_EXPIRED`)
//! without any crypto; PING is answered with PONG at any time; GOODBYE lets
//! in-flight calls finish, is echoed, and closes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::conn::{Close, ConnError, FrameReader, Outbound, write_loop};
use super::{ServiceError, unix_now};
use crate::code::ErrorCode;
use crate::frame::{Frame, FrameError, Kind, MAX_PAYLOAD, VERSION};
use crate::msg::{
    Body, Call, ErrorMsg, Event, Goodbye, Hello, Refresh, Reply, Right, Welcome, permits,
};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the Unix socket failed.
    #[error("cannot bind {path}")]
    Bind {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed in a way that will not pass.
    #[error("accepting a connection failed")]
    Accept(#[source] io::Error),
}

/// What a session may do, as decided by the [`HelloHook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Granted (service, method) patterns.
    pub rights: Vec<Right>,
    /// Expiry in Unix seconds; 0 = none.
    pub token_expiry: u64,
}

impl Grant {
    /// Everything, no expiry.
    pub fn all() -> Grant {
        Grant {
            rights: vec![Right::all()],
            token_expiry: 0,
        }
    }

    /// Whether the grant has expired at `now` (Unix seconds).
    pub fn expired_at(&self, now: u64) -> bool {
        self.token_expiry != 0 && now >= self.token_expiry
    }
}

/// Checks HELLO and REFRESH. Issue 4's biscuit verifier plugs in here.
pub trait HelloHook: Send + Sync + 'static {
    /// Verifies a HELLO; `Err` is sent as ERROR and the session stays un-helloed.
    fn hello(&self, hello: &Hello) -> impl Future<Output = Result<Grant, ServiceError>> + Send;

    /// Verifies a REFRESH for an open session; `Ok` replaces the grant.
    fn refresh(
        &self,
        session: &Session,
        refresh: &Refresh,
    ) -> impl Future<Output = Result<Grant, ServiceError>> + Send;
}

/// The default hook: no token check, every right, no expiry.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl HelloHook for AcceptAll {
    async fn hello(&self, _hello: &Hello) -> Result<Grant, ServiceError> {
        Ok(Grant::all())
    }

    async fn refresh(&self, _session: &Session, _refresh: &Refresh) -> Result<Grant, ServiceError> {
        Ok(Grant::all())
    }
}

/// Serves CALLs (and optionally EVENT pub/sub) for a server.
pub trait Handler: Send + Sync + 'static {
    /// Answers a CALL that the session's grant permits.
    fn call(
        &self,
        session: Arc<Session>,
        call: Call,
    ) -> impl Future<Output = Result<Reply, ServiceError>> + Send;

    /// A published EVENT. Default: `UNSUPPORTED`.
    fn publish(
        &self,
        _session: Arc<Session>,
        _event: Event,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Err(ServiceError::unsupported("EVENT")) }
    }

    /// SUBSCRIBE to a topic; deliver with [`Session::push_event`]. Default: `UNSUPPORTED`.
    fn subscribe(
        &self,
        _session: Arc<Session>,
        _topic: String,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Err(ServiceError::unsupported("SUBSCRIBE")) }
    }

    /// UNSUBSCRIBE from a topic. Default: `UNSUPPORTED`.
    fn unsubscribe(
        &self,
        _session: Arc<Session>,
        _topic: String,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send {
        async { Err(ServiceError::unsupported("UNSUBSCRIBE")) }
    }

    /// Called once when HELLO has been accepted, before WELCOME is sent (a
    /// router records the session here so others can reach it).
    fn session_opened(&self, _session: &Arc<Session>) {}

    /// Called once when a session's connection ends (drop its subscriptions here).
    fn session_closed(&self, _session: &Arc<Session>) {}

    /// Called when the server refuses a request by its own session rules,
    /// before any handler method sees it: `NOT_HELLO` (no session yet),
    /// `ALREADY_HELLO`, `TOKEN_EXPIRED` and `PERMISSION_DENIED` (for audit logs).
    fn refused(&self, _session: Option<&Arc<Session>>, _body: &Body, _error: &ServiceError) {}
}

/// Server tunables.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// CALLs handled at once per connection; reading pauses beyond it.
    pub max_in_flight: usize,
    /// Frames queued for writing per connection.
    pub outbound_queue: usize,
    /// Largest payload accepted (at most 16 MiB).
    pub max_payload: usize,
    /// How long GOODBYE or end of input waits for in-flight calls.
    pub drain_timeout: Duration,
    /// Close a connection that sends nothing for this long (None: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_in_flight: 1024,
            outbound_queue: 4096,
            max_payload: MAX_PAYLOAD,
            drain_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }
}

/// Why [`Session::push_event`] did not queue the event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The subscriber's queue is full: it is being dropped with `SLOW_CONSUMER`.
    #[error("the subscriber is too slow and is being disconnected")]
    SlowConsumer,
    /// The connection has ended.
    #[error("the session's connection has closed")]
    Closed,
}

#[derive(Debug, Default)]
struct Kill {
    notify: Notify,
    reason: Mutex<Option<ErrorMsg>>,
}

/// Why a CALL the server made to its client ([`Session::call`]) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionCallError {
    /// The client answered with ERROR.
    #[error("the client answered with an error")]
    Remote(#[source] ServiceError),
    /// No answer within the timeout.
    #[error("the client did not answer in time")]
    Timeout,
    /// The session's connection ended before the answer came.
    #[error("the session's connection has closed")]
    Closed,
    /// The CALL exceeds the frame limit.
    #[error("the call exceeds the 16 MiB frame limit")]
    Oversize,
    /// The answer does not decode, or is not REPLY or ERROR.
    #[error("the client's answer is malformed")]
    Malformed,
}

#[derive(Debug, Default)]
struct OutCalls {
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Frame>>,
    closed: bool,
}

/// An open, HELLO'd session, as the handler sees it.
#[derive(Debug)]
pub struct Session {
    id: u64,
    agent_id: String,
    grant: RwLock<Arc<Grant>>,
    tx: mpsc::Sender<Outbound>,
    kill: Arc<Kill>,
    calls: Mutex<OutCalls>,
}

impl Session {
    /// The session id sent in WELCOME.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The agent id from HELLO.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Whether the session's connection has ended (its writer is gone).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The current grant.
    pub fn grant(&self) -> Grant {
        Grant::clone(&self.shared_grant())
    }

    /// The current grant, shared (no copy of the rights: what every CALL checks).
    pub fn shared_grant(&self) -> Arc<Grant> {
        match self.grant.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_grant(&self, grant: Grant) {
        let grant = Arc::new(grant);
        match self.grant.write() {
            Ok(mut g) => *g = grant,
            Err(poisoned) => *poisoned.into_inner() = grant,
        }
    }

    /// Queues an EVENT to this session without waiting. A full queue drops the
    /// session with ERROR(`SLOW_CONSUMER`): a slow subscriber never blocks the
    /// publisher.
    pub fn push_event(&self, event: &Event) -> Result<(), PushError> {
        let frame = Frame::from_message(Kind::Event, 0, event);
        match self.tx.try_send(Outbound::Frame(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.disconnect(ErrorMsg::new(
                    ErrorCode::SlowConsumer,
                    "Subscriber fell behind; dropping it.",
                ));
                Err(PushError::SlowConsumer)
            }
        }
    }

    /// Ends the session: queued frames are dropped, `error` is sent, the
    /// connection closes.
    pub fn disconnect(&self, error: ErrorMsg) {
        if let Ok(mut r) = self.kill.reason.lock() {
            r.get_or_insert(error);
        }
        self.kill.notify.notify_one();
    }

    fn out_calls(&self) -> std::sync::MutexGuard<'_, OutCalls> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// CALLs the client over this session (a router delivering `agent/<id>`,
    /// or forwarding to a host service) and waits at most `timeout` for its
    /// REPLY or ERROR. The request id is the server's own, counted from 1;
    /// the client answers it with the same id (docs/SYPAS.md §2). Any
    /// number of such calls may be in flight.
    pub async fn call(&self, call: &Call, timeout: Duration) -> Result<Reply, SessionCallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (id, rx) = {
            let mut c = self.out_calls();
            if c.closed {
                return Err(SessionCallError::Closed);
            }
            c.next_id += 1;
            let id = c.next_id;
            let (tx, rx) = oneshot::channel();
            c.pending.insert(id, tx);
            (id, rx)
        };
        let frame = Frame::from_message(Kind::Call, id, call);
        if frame.payload.len() > MAX_PAYLOAD {
            self.out_calls().pending.remove(&id);
            return Err(SessionCallError::Oversize);
        }
        let sent = tokio::time::timeout_at(deadline, self.tx.send(Outbound::Frame(frame))).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.out_calls().pending.remove(&id);
                return Err(SessionCallError::Closed);
            }
            Err(_) => {
                self.out_calls().pending.remove(&id);
                return Err(SessionCallError::Timeout);
            }
        }
        let answer = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => return Err(SessionCallError::Closed),
            Err(_) => {
                self.out_calls().pending.remove(&id);
                return Err(SessionCallError::Timeout);
            }
        };
        match answer.kind {
            Kind::Reply => answer
                .decode_message::<Reply>()
                .map_err(|_| SessionCallError::Malformed),
            Kind::Error => match answer.decode_message::<ErrorMsg>() {
                Ok(e) => Err(SessionCallError::Remote(e.into())),
                Err(_) => Err(SessionCallError::Malformed),
            },
            _ => Err(SessionCallError::Malformed),
        }
    }

    /// Hands an answer to the [`Session::call`] waiting for it; false if none is.
    fn complete(&self, frame: Frame) -> bool {
        match self.out_calls().pending.remove(&frame.request_id) {
            Some(tx) => {
                let _ = tx.send(frame);
                true
            }
            None => false,
        }
    }

    /// Fails every outstanding [`Session::call`] with `Closed`.
    fn close_calls(&self) {
        let mut c = self.out_calls();
        c.closed = true;
        c.pending.clear();
    }
}

/// A SYPAS server for handler `H` with hello hook `A`.
pub struct Server<H, A = AcceptAll> {
    handler: Arc<H>,
    hook: Arc<A>,
    config: Arc<ServerConfig>,
    next_session: Arc<AtomicU64>,
}

impl<H, A> Clone for Server<H, A> {
    fn clone(&self) -> Self {
        Server {
            handler: self.handler.clone(),
            hook: self.hook.clone(),
            config: self.config.clone(),
            next_session: self.next_session.clone(),
        }
    }
}

impl<H: Handler> Server<H, AcceptAll> {
    /// A server that accepts every HELLO.
    pub fn new(handler: H) -> Self {
        Server {
            handler: Arc::new(handler),
            hook: Arc::new(AcceptAll),
            config: Arc::new(ServerConfig::default()),
            next_session: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by a
/// dead server (one that nobody answers on).
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::Bind {
        path: path.display().to_string(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(bind_err(e));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

enum End {
    Eof,
    Goodbye,
    Killed,
    Protocol(FrameError),
    Io,
    Idle,
}

impl<H: Handler, A: HelloHook> Server<H, A> {
    /// The same server with another HELLO/REFRESH hook.
    pub fn with_hello_hook<B: HelloHook>(self, hook: B) -> Server<H, B> {
        Server {
            handler: self.handler,
            hook: Arc::new(hook),
            config: self.config,
            next_session: self.next_session,
        }
    }

    /// The same server with another handler, sharing the tunables and the
    /// session-id counter (so session ids stay unique across listeners that
    /// each have their own handler, such as a router's per-VM listeners).
    pub fn with_handler<G: Handler>(&self, handler: G) -> Server<G, A> {
        Server {
            handler: Arc::new(handler),
            hook: self.hook.clone(),
            config: self.config.clone(),
            next_session: self.next_session.clone(),
        }
    }

    /// The same server with other tunables.
    #[must_use]
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// The handler.
    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    /// Accepts connections forever, one task each.
    pub async fn serve(&self, listener: UnixListener) -> Result<(), ServerError> {
        self.serve_until(listener, std::future::pending()).await
    }

    /// Accepts connections until `shutdown` completes, then aborts every
    /// connection task (their peers see the connection close) and returns.
    pub async fn serve_until(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let server = self.clone();
                        tasks.spawn(async move { server.serve_connection(stream).await });
                    }
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                },
            }
        }
        tasks.shutdown().await;
        Ok(())
    }

    /// Serves one connection on any byte stream until it ends.
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(self.config.outbound_queue.max(1));
        let (close_tx, close_rx) = oneshot::channel();
        let mut writer = tokio::spawn(write_loop(wr, rx, close_rx));
        let mut reader = FrameReader::new(rd, self.config.max_payload);
        let kill = Arc::new(Kill::default());
        let max_in_flight = self.config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let in_flight = Arc::new(Semaphore::new(max_in_flight));
        let mut session: Option<Arc<Session>> = None;

        let end = loop {
            let idle = async {
                match self.config.idle_timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                r = reader.next() => r,
                () = kill.notify.notified() => break End::Killed,
                () = idle => break End::Idle,
            };
            match read {
                Ok(Some(frame)) => {
                    let permit = if frame.kind == Kind::Call {
                        match in_flight.clone().acquire_owned().await {
                            Ok(p) => Some(p),
                            Err(_) => break End::Io,
                        }
                    } else {
                        None
                    };
                    let goodbye = self.on_frame(frame, &mut session, &tx, &kill, permit).await;
                    if goodbye {
                        break End::Goodbye;
                    }
                }
                Ok(None) => break End::Eof,
                Err(ConnError::Frame(e)) => break End::Protocol(e),
                Err(ConnError::Io(e)) => {
                    tracing::debug!(error = %e, "connection read failed");
                    break End::Io;
                }
            }
        };

        let close = match end {
            End::Eof | End::Goodbye => {
                let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
                let drained =
                    tokio::time::timeout(self.config.drain_timeout, in_flight.acquire_many(all))
                        .await;
                if drained.is_err() {
                    tracing::warn!("in-flight calls outlived the drain timeout");
                }
                let bye = matches!(end, End::Goodbye).then(|| {
                    Frame::from_message(
                        Kind::Goodbye,
                        0,
                        &Goodbye {
                            reason: "goodbye".into(),
                        },
                    )
                });
                Close::Drain(bye)
            }
            End::Killed => {
                let reason = kill.reason.lock().ok().and_then(|mut r| r.take());
                let msg = reason.unwrap_or_else(|| {
                    ErrorMsg::new(ErrorCode::ShuttingDown, "Session closed by the server.")
                });
                Close::Abort(Some(Frame::from_message(Kind::Error, 0, &msg)))
            }
            End::Protocol(ref e) => {
                tracing::debug!(error = %e, "closing a connection after a framing error");
                let msg = ErrorMsg::new(e.code(), e.to_string());
                Close::Abort(Some(Frame::from_message(Kind::Error, 0, &msg)))
            }
            End::Idle => {
                let msg = ErrorMsg::new(ErrorCode::Timeout, "Connection idle for too long.");
                Close::Abort(Some(Frame::from_message(Kind::Error, 0, &msg)))
            }
            End::Io => Close::Abort(None),
        };
        let lingers = matches!(end, End::Protocol(_) | End::Killed | End::Idle);
        let _ = close_tx.send(close);
        drop(tx);
        match tokio::time::timeout(Duration::from_secs(5), &mut writer).await {
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "connection write failed"),
            Ok(_) => {}
            Err(_) => writer.abort(),
        }
        if lingers {
            reader.linger(1024 * 1024, Duration::from_millis(500)).await;
        }
        if let Some(s) = &session {
            s.close_calls();
            self.handler.session_closed(s);
        }
    }

    /// Handles one frame; returns true on GOODBYE.
    async fn on_frame(
        &self,
        frame: Frame,
        session: &mut Option<Arc<Session>>,
        tx: &mpsc::Sender<Outbound>,
        kill: &Arc<Kill>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> bool {
        let id = frame.request_id;
        let channel = frame.channel;
        let reply = |kind: Kind, payload: Bytes| {
            Outbound::Frame(Frame::new(kind, id, payload).with_channel(channel))
        };
        let error = |code: ErrorCode, message: &str| {
            let msg = ErrorMsg::new(code, message);
            Outbound::Frame(Frame::from_message(Kind::Error, id, &msg).with_channel(channel))
        };
        let send = |out: Outbound| async move {
            // A closed writer means the connection is going away anyway.
            let _ = tx.send(out).await;
        };

        match frame.kind {
            Kind::Ping => {
                // PONG echoes PING's fields: the payload bytes are the same.
                send(reply(Kind::Pong, frame.payload)).await;
                return false;
            }
            Kind::Pong => return false,
            Kind::Goodbye => return true,
            Kind::Reply | Kind::Error
                if id != 0 && session.as_ref().is_some_and(|s| s.complete(frame.clone())) =>
            {
                return false;
            }
            Kind::Error => {
                tracing::debug!("peer sent ERROR to the server");
                return false;
            }
            Kind::Welcome | Kind::Reply => {
                send(error(
                    ErrorCode::UnexpectedKind,
                    "Servers do not accept this kind.",
                ))
                .await;
                return false;
            }
            _ => {}
        }

        let body = match Body::from_frame(&frame) {
            Ok(b) => b,
            Err(e) => {
                send(error(e.code(), &e.to_string())).await;
                return false;
            }
        };

        let Some(sess) = session.clone() else {
            if let Body::Hello(hello) = body {
                match self.hello(&hello, tx, kill).await {
                    Ok((s, welcome)) => {
                        self.handler.session_opened(&s);
                        *session = Some(s);
                        send(reply(Kind::Welcome, welcome)).await;
                    }
                    Err(e) => send(error_from(e, id, channel)).await,
                }
            } else {
                let e = ServiceError::new(ErrorCode::NotHello, "Send HELLO first.");
                self.handler.refused(None, &body, &e);
                send(error_from(e, id, channel)).await;
            }
            return false;
        };

        match body {
            Body::Hello(_) => {
                let e = ServiceError::new(
                    ErrorCode::AlreadyHello,
                    "This session has already said HELLO.",
                );
                self.handler.refused(Some(&sess), &body, &e);
                send(error_from(e, id, channel)).await;
            }
            Body::Refresh(refresh) => match self.hook.refresh(&sess, &refresh).await {
                Ok(grant) => {
                    sess.set_grant(grant.clone());
                    send(reply(Kind::Welcome, welcome_bytes(sess.id, grant))).await;
                }
                Err(e) => send(error_from(e, id, channel)).await,
            },
            Body::Call(call) => {
                let grant = sess.shared_grant();
                let refusal = if grant.expired_at(unix_now()) {
                    Some(ServiceError::new(
                        ErrorCode::TokenExpired,
                        "The session's token has expired; send REFRESH.",
                    ))
                } else if !permits(&grant.rights, &call.service, &call.method) {
                    let msg = format!("The session may not call {}/{}.", call.service, call.method);
                    Some(ServiceError::new(ErrorCode::PermissionDenied, msg))
                } else {
                    None
                };
                if let Some(e) = refusal {
                    self.handler.refused(Some(&sess), &Body::Call(call), &e);
                    send(error_from(e, id, channel)).await;
                } else {
                    let handler = self.handler.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let out = match handler.call(sess, call).await {
                            Ok(r) => reply_frame(&r, id, channel),
                            Err(e) => error_from(e, id, channel),
                        };
                        let _ = tx.send(out).await;
                        drop(permit);
                    });
                }
            }
            Body::Event(event) => {
                let r = self.handler.publish(sess, event).await;
                if id != 0 || r.is_err() {
                    send(ack(r, id, channel)).await;
                }
            }
            Body::Subscribe(s) => {
                let r = self.handler.subscribe(sess, s.topic).await;
                send(ack(r, id, channel)).await;
            }
            Body::Unsubscribe(s) => {
                let r = self.handler.unsubscribe(sess, s.topic).await;
                send(ack(r, id, channel)).await;
            }
            Body::Welcome(_)
            | Body::Reply(_)
            | Body::Error(_)
            | Body::Ping(_)
            | Body::Pong(_)
            | Body::Goodbye(_) => {}
        }
        false
    }

    async fn hello(
        &self,
        hello: &Hello,
        tx: &mpsc::Sender<Outbound>,
        kill: &Arc<Kill>,
    ) -> Result<(Arc<Session>, Bytes), ServiceError> {
        if !hello.versions.is_empty() && !hello.versions.contains(&u32::from(VERSION)) {
            return Err(ServiceError::new(
                ErrorCode::UnknownVersion,
                format!(
                    "No common protocol version: offered {:?}, this server speaks {VERSION}.",
                    hello.versions
                ),
            ));
        }
        let grant = self.hook.hello(hello).await?;
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let welcome = welcome_bytes(id, grant.clone());
        let session = Arc::new(Session {
            id,
            agent_id: hello.agent_id.clone(),
            grant: RwLock::new(Arc::new(grant)),
            tx: tx.clone(),
            kill: kill.clone(),
            calls: Mutex::new(OutCalls::default()),
        });
        Ok((session, welcome))
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    )
}

/// The few errno values `is_transient` needs (Linux numbering).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

fn welcome_bytes(session_id: u64, grant: Grant) -> Bytes {
    let welcome = Welcome {
        session_id,
        rights: grant.rights,
        token_expiry: grant.token_expiry,
        version: u32::from(VERSION),
    };
    Bytes::from(prost::Message::encode_to_vec(&welcome))
}

fn error_from(e: ServiceError, id: u64, channel: u32) -> Outbound {
    let msg: ErrorMsg = e.into();
    Outbound::Frame(Frame::from_message(Kind::Error, id, &msg).with_channel(channel))
}

fn reply_frame(reply: &Reply, id: u64, channel: u32) -> Outbound {
    let frame = Frame::from_message(Kind::Reply, id, reply).with_channel(channel);
    if frame.payload.len() > MAX_PAYLOAD {
        return error_from(
            ServiceError::new(
                ErrorCode::Internal,
                "The service's reply exceeds the 16 MiB frame limit.",
            ),
            id,
            channel,
        );
    }
    Outbound::Frame(frame)
}

fn ack(r: Result<(), ServiceError>, id: u64, channel: u32) -> Outbound {
    match r {
        Ok(()) => Outbound::Frame(Frame::new(Kind::Reply, id, Bytes::new()).with_channel(channel)),
        Err(e) => error_from(e, id, channel),
    }
}
