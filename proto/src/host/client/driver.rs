// SPDX-License-Identifier: Apache-2.0
//! The client's connection driver: the HELLO handshake, the per-connection
//! read loop with heartbeats, failing in-flight calls on loss, and reconnect.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{ClientConfig, ClientError, Endpoint, IncomingCall};
use crate::code::ErrorCode;
use crate::frame::{Frame, Kind, VERSION};
use crate::host::ServiceError;
use crate::host::conn::{Close, ConnError, FrameReader, Outbound, write_loop};
use crate::msg::{Call, ErrorMsg, Event, Goodbye, Hello, Ping, Subscribe, Welcome};

/// Why a connection ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Disconnect {
    /// The peer closed the stream.
    #[error("the peer closed the connection")]
    PeerClosed,
    /// Nothing arrived from the peer within the dead-peer deadline.
    #[error("the peer sent nothing for {0:?}")]
    PeerDead(Duration),
    /// The peer said GOODBYE.
    #[error("the peer said goodbye: {0}")]
    Goodbye(String),
    /// The peer sent bytes that are not a valid frame.
    #[error("the peer broke the framing")]
    Protocol(#[source] crate::frame::FrameError),
    /// The peer sent a connection-level ERROR before closing.
    #[error("the peer closed the connection with an error")]
    PeerError(#[source] ServiceError),
    /// The stream failed.
    #[error("connection I/O failed")]
    Io(#[source] Arc<io::Error>),
    /// This side closed the client.
    #[error("the client was closed")]
    Local,
}

/// Any byte stream the client can run over.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}
pub type BoxStream = Box<dyn AsyncStream>;

/// A connection that has completed HELLO/WELCOME.
pub struct LinkIo {
    reader: FrameReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
    welcome: Welcome,
}

#[derive(Default)]
struct Pending {
    map: HashMap<u64, oneshot::Sender<Frame>>,
    closed: Option<Disconnect>,
}

/// One live connection: its write queue and the requests waiting on it.
pub struct Link {
    pub tx: mpsc::Sender<Outbound>,
    pending: Mutex<Pending>,
}

impl Link {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers request `id`; fails if the link has already been lost.
    pub fn register(&self, id: u64) -> Result<oneshot::Receiver<Frame>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let mut p = self.pending();
        if let Some(reason) = &p.closed {
            return Err(ClientError::Disconnected(reason.clone()));
        }
        p.map.insert(id, tx);
        Ok(rx)
    }

    /// Drops a request that timed out or could not be sent.
    pub fn forget(&self, id: u64) {
        self.pending().map.remove(&id);
    }

    /// The error for a request whose link was lost.
    pub fn lost(&self) -> ClientError {
        let reason = self.pending().closed.clone().unwrap_or(Disconnect::Local);
        ClientError::Disconnected(reason)
    }

    fn complete(&self, frame: Frame) {
        if let Some(tx) = self.pending().map.remove(&frame.request_id) {
            let _ = tx.send(frame);
        }
    }

    /// Fails every waiting request (dropping its sender wakes it).
    fn close(&self, reason: Disconnect) {
        let mut p = self.pending();
        p.closed = Some(reason);
        p.map.clear();
    }
}

pub enum LinkState {
    Connecting,
    Up(Arc<Link>),
    Closed(ClientError),
}

/// State shared by the client handles and the driver task.
pub struct Shared {
    pub config: ClientConfig,
    endpoint: Option<Endpoint>,
    next_id: AtomicU64,
    pub state: watch::Sender<LinkState>,
    token: Mutex<Bytes>,
    welcome: Mutex<Option<Welcome>>,
    topics: Mutex<BTreeSet<String>>,
    events_tx: mpsc::Sender<Event>,
    events_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    pub dropped_events: AtomicU64,
    incoming_tx: mpsc::Sender<IncomingCall>,
    incoming_rx: Mutex<Option<mpsc::Receiver<IncomingCall>>>,
    incoming_taken: AtomicBool,
    pub closing: AtomicBool,
    shutdown: Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("endpoint", &self.endpoint)
            .field("agent_id", &self.config.agent_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn new(endpoint: Option<Endpoint>, config: ClientConfig) -> Arc<Shared> {
        let (events_tx, events_rx) = mpsc::channel(config.event_queue.max(1));
        let (incoming_tx, incoming_rx) = mpsc::channel(config.outbound_queue.max(1));
        Arc::new(Shared {
            token: Mutex::new(config.token.clone()),
            config,
            endpoint,
            next_id: AtomicU64::new(1),
            state: watch::Sender::new(LinkState::Connecting),
            welcome: Mutex::new(None),
            topics: Mutex::new(BTreeSet::new()),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            dropped_events: AtomicU64::new(0),
            incoming_tx,
            incoming_rx: Mutex::new(Some(incoming_rx)),
            incoming_taken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            shutdown: Notify::new(),
        })
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn set_token(&self, token: Bytes) {
        *lock(&self.token) = token;
    }

    pub fn set_welcome(&self, welcome: Welcome) {
        *lock(&self.welcome) = Some(welcome);
    }

    pub fn welcome(&self) -> Option<Welcome> {
        lock(&self.welcome).clone()
    }

    pub fn add_topic(&self, topic: &str) {
        lock(&self.topics).insert(topic.to_owned());
    }

    pub fn remove_topic(&self, topic: &str) {
        lock(&self.topics).remove(topic);
    }

    pub fn take_events(&self) -> Option<mpsc::Receiver<Event>> {
        lock(&self.events_rx).take()
    }

    pub fn take_incoming(&self) -> Option<mpsc::Receiver<IncomingCall>> {
        let rx = lock(&self.incoming_rx).take();
        if rx.is_some() {
            self.incoming_taken.store(true, Ordering::SeqCst);
        }
        rx
    }

    fn set_state(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    /// Waits for a live link until `deadline`.
    pub async fn wait_link(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Link>, ClientError> {
        let mut rx = self.state.subscribe();
        let ready = async {
            let state = rx
                .wait_for(|s| !matches!(s, LinkState::Connecting))
                .await
                .map_err(|_| ClientError::Closed)?;
            match &*state {
                LinkState::Up(link) => Ok(link.clone()),
                LinkState::Closed(e) => Err(e.clone()),
                LinkState::Connecting => Err(ClientError::Closed),
            }
        };
        tokio::time::timeout_at(deadline, ready)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Closes the client from this side; with `goodbye`, queues a GOODBYE first.
    pub fn close_local(&self, goodbye: bool) {
        self.closing.store(true, Ordering::SeqCst);
        if !goodbye {
            self.shutdown.notify_one();
            return;
        }
        if let LinkState::Up(link) = &*self.state.borrow() {
            let bye = Frame::from_message(
                Kind::Goodbye,
                0,
                &Goodbye {
                    reason: "client closed".into(),
                },
            );
            let _ = link.tx.try_send(Outbound::Frame(bye));
        }
        self.shutdown.notify_one();
    }
}

/// A clock for PING timestamps: nanoseconds since the first call.
pub fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn lost(e: ConnError) -> ClientError {
    ClientError::Disconnected(match e {
        ConnError::Frame(e) => Disconnect::Protocol(e),
        ConnError::Io(e) => Disconnect::Io(Arc::new(e)),
    })
}

/// Connects to the endpoint and says HELLO.
pub async fn establish(shared: &Shared) -> Result<LinkIo, ClientError> {
    let endpoint = shared.endpoint.as_ref().ok_or(ClientError::Closed)?;
    let stream = tokio::time::timeout(shared.config.connect_timeout, endpoint.open())
        .await
        .map_err(|_| ClientError::Timeout)??;
    handshake(shared, stream).await
}

/// HELLO → WELCOME on an open stream, within the connect timeout.
pub async fn handshake(shared: &Shared, stream: BoxStream) -> Result<LinkIo, ClientError> {
    let (rd, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, shared.config.max_payload);
    let id = shared.next_id();
    let hello = Hello {
        versions: vec![u32::from(VERSION)],
        agent_id: shared.config.agent_id.clone(),
        token: lock(&shared.token).clone(),
    };
    let bytes = Frame::from_message(Kind::Hello, id, &hello)
        .to_vec()
        .map_err(ClientError::Frame)?;
    let exchange = async {
        writer
            .write_all(&bytes)
            .await
            .map_err(|e| ClientError::Disconnected(Disconnect::Io(Arc::new(e))))?;
        loop {
            let frame = reader
                .next()
                .await
                .map_err(lost)?
                .ok_or(ClientError::Disconnected(Disconnect::PeerClosed))?;
            let decode_err = |frame: &Frame| match frame.decode_message::<ErrorMsg>() {
                Ok(m) => ServiceError::from(m),
                Err(e) => ServiceError::new(ErrorCode::MalformedPayload, e.to_string()),
            };
            match (frame.kind, frame.request_id) {
                (Kind::Welcome, rid) if rid == id => {
                    return frame.decode_message::<Welcome>().map_err(|reason| {
                        ClientError::Malformed(crate::msg::MessageError::Malformed {
                            kind: Kind::Welcome,
                            reason,
                        })
                    });
                }
                (Kind::Error, rid) if rid == id => {
                    return Err(ClientError::HelloRefused(decode_err(&frame)));
                }
                (Kind::Error, 0) => {
                    return Err(ClientError::Disconnected(Disconnect::PeerError(
                        decode_err(&frame),
                    )));
                }
                (Kind::Goodbye, _) => {
                    let reason = frame
                        .decode_message::<Goodbye>()
                        .map(|g| g.reason)
                        .unwrap_or_default();
                    return Err(ClientError::Disconnected(Disconnect::Goodbye(reason)));
                }
                _ => {}
            }
        }
    };
    let welcome = tokio::time::timeout(shared.config.connect_timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout)??;
    Ok(LinkIo {
        reader,
        writer,
        welcome,
    })
}

/// Runs connections until the client closes or reconnecting gives up.
pub async fn drive(shared: Arc<Shared>, mut running: Running) {
    loop {
        let reason = run_link(&shared, running).await;
        tracing::debug!(%reason, agent = %shared.config.agent_id, "SYPAS connection ended");
        if shared.closing.load(Ordering::SeqCst) {
            shared.set_state(LinkState::Closed(ClientError::Closed));
            return;
        }
        let policy = shared.config.reconnect.clone();
        if shared.endpoint.is_none() || policy.max_attempts == Some(0) {
            shared.set_state(LinkState::Closed(ClientError::Disconnected(reason)));
            return;
        }
        shared.set_state(LinkState::Connecting);
        let mut attempt = 0u32;
        running = loop {
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                tracing::warn!(attempts = attempt, "giving up reconnecting");
                shared.set_state(LinkState::Closed(ClientError::GaveUp { attempts: attempt }));
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(policy.backoff(attempt)) => {}
                () = shared.shutdown.notified() => {}
            }
            if shared.closing.load(Ordering::SeqCst) {
                shared.set_state(LinkState::Closed(ClientError::Closed));
                return;
            }
            attempt += 1;
            match establish(&shared).await {
                Ok(io) => break open_link(&shared, io),
                Err(e) => tracing::debug!(error = %e, attempt, "reconnect failed"),
            }
        };
    }
}

/// A connection that is up: its reader, link and writer task.
pub struct Running {
    reader: FrameReader<ReadHalf<BoxStream>>,
    link: Arc<Link>,
    tx: mpsc::Sender<Outbound>,
    close_tx: oneshot::Sender<Close>,
    write_task: tokio::task::JoinHandle<io::Result<()>>,
}

/// Puts a handshaken connection to use: starts its writer, re-subscribes the
/// client's topics, and publishes the link so calls can use it at once.
pub fn open_link(shared: &Arc<Shared>, io: LinkIo) -> Running {
    let LinkIo {
        reader,
        writer,
        welcome,
    } = io;
    shared.set_welcome(welcome);
    let (tx, rx) = mpsc::channel(shared.config.outbound_queue.max(1));
    let (close_tx, close_rx) = oneshot::channel();
    let write_task = tokio::spawn(write_loop(writer, rx, close_rx));
    let link = Arc::new(Link {
        tx: tx.clone(),
        pending: Mutex::new(Pending::default()),
    });
    let topics: Vec<String> = lock(&shared.topics).iter().cloned().collect();
    for topic in topics {
        // Answers carry ids nobody waits for; they are dropped on arrival.
        let frame = Frame::from_message(Kind::Subscribe, shared.next_id(), &Subscribe { topic });
        let _ = tx.try_send(Outbound::Frame(frame));
    }
    shared.set_state(LinkState::Up(link.clone()));
    Running {
        reader,
        link,
        tx,
        close_tx,
        write_task,
    }
}

/// Serves one connection until it ends; fails its pending requests.
async fn run_link(shared: &Arc<Shared>, running: Running) -> Disconnect {
    let Running {
        mut reader,
        link,
        tx,
        close_tx,
        mut write_task,
    } = running;
    let cfg = &shared.config;
    if shared.closing.load(Ordering::SeqCst) {
        shared.shutdown.notify_one();
    }

    let mut last_rx = tokio::time::Instant::now();
    let mut ticker = cfg.ping_interval.map(|p| {
        let p = p.max(Duration::from_millis(1));
        tokio::time::interval_at(tokio::time::Instant::now() + p, p)
    });
    let mut echo_goodbye = false;
    let reason = loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = reader.next() => match r {
                Ok(Some(frame)) => {
                    last_rx = tokio::time::Instant::now();
                    if let Some(reason) = dispatch(shared, &link, frame) {
                        echo_goodbye = matches!(reason, Disconnect::Goodbye(_))
                            && !shared.closing.load(Ordering::SeqCst);
                        break reason;
                    }
                }
                Ok(None) => break Disconnect::PeerClosed,
                Err(ConnError::Frame(e)) => break Disconnect::Protocol(e),
                Err(ConnError::Io(e)) => break Disconnect::Io(Arc::new(e)),
            },
            () = tick => {
                if last_rx.elapsed() >= cfg.dead_peer_timeout {
                    break Disconnect::PeerDead(cfg.dead_peer_timeout);
                }
                let ping = Ping { nonce: 0, timestamp_ns: monotonic_ns() };
                let _ = tx.try_send(Outbound::Frame(Frame::from_message(Kind::Ping, 0, &ping)));
            }
            () = shared.shutdown.notified() => break Disconnect::Local,
        }
    };

    link.close(reason.clone());
    let close = match &reason {
        Disconnect::Local => Close::Drain(None),
        Disconnect::Goodbye(_) if echo_goodbye => Close::Drain(Some(Frame::from_message(
            Kind::Goodbye,
            0,
            &Goodbye {
                reason: "goodbye".into(),
            },
        ))),
        Disconnect::Protocol(e) => Close::Abort(Some(Frame::from_message(
            Kind::Error,
            0,
            &ErrorMsg::new(e.code(), e.to_string()),
        ))),
        _ => Close::Abort(None),
    };
    let _ = close_tx.send(close);
    drop(tx);
    if tokio::time::timeout(Duration::from_secs(2), &mut write_task)
        .await
        .is_err()
    {
        write_task.abort();
    }
    reason
}

/// Handles one frame from the peer; `Some` ends the connection.
fn dispatch(shared: &Shared, link: &Link, frame: Frame) -> Option<Disconnect> {
    match frame.kind {
        Kind::Reply | Kind::Welcome | Kind::Pong if frame.request_id != 0 => link.complete(frame),
        Kind::Error if frame.request_id != 0 => link.complete(frame),
        Kind::Error => {
            let err = match frame.decode_message::<ErrorMsg>() {
                Ok(m) => ServiceError::from(m),
                Err(e) => ServiceError::new(ErrorCode::MalformedPayload, e.to_string()),
            };
            tracing::warn!(error = %err, "peer reported a connection error");
            if err.error_code().is_none_or(ErrorCode::closes_connection) {
                return Some(Disconnect::PeerError(err));
            }
        }
        Kind::Reply | Kind::Welcome | Kind::Pong => {}
        Kind::Event => match frame.decode_message::<Event>() {
            Ok(event) => {
                if shared.events_tx.try_send(event).is_err() {
                    shared.dropped_events.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(error = %e, "dropping a malformed EVENT"),
        },
        Kind::Ping => {
            let pong =
                Frame::new(Kind::Pong, frame.request_id, frame.payload).with_channel(frame.channel);
            let _ = link.tx.try_send(Outbound::Frame(pong));
        }
        Kind::Goodbye => {
            let reason = frame
                .decode_message::<Goodbye>()
                .map(|g| g.reason)
                .unwrap_or_default();
            return Some(Disconnect::Goodbye(reason));
        }
        Kind::Call => incoming_call(shared, link, frame),
        Kind::Hello | Kind::Refresh | Kind::Subscribe | Kind::Unsubscribe => {
            if frame.request_id != 0 {
                let msg = ErrorMsg::new(
                    ErrorCode::UnexpectedKind,
                    "Clients do not accept this kind.",
                );
                let out = Frame::from_message(Kind::Error, frame.request_id, &msg)
                    .with_channel(frame.channel);
                let _ = link.tx.try_send(Outbound::Frame(out));
            }
        }
    }
    None
}

fn incoming_call(shared: &Shared, link: &Link, frame: Frame) {
    let (id, channel) = (frame.request_id, frame.channel);
    let refuse = |code: ErrorCode, text: &str| {
        let out =
            Frame::from_message(Kind::Error, id, &ErrorMsg::new(code, text)).with_channel(channel);
        let _ = link.tx.try_send(Outbound::Frame(out));
    };
    let call = match frame.decode_message::<Call>() {
        Ok(c) => c,
        Err(e) => return refuse(ErrorCode::MalformedPayload, &e.to_string()),
    };
    if !shared.incoming_taken.load(Ordering::SeqCst) {
        return refuse(ErrorCode::NoSuchService, "This client serves no CALLs.");
    }
    let incoming = IncomingCall {
        call,
        request_id: id,
        channel,
        tx: link.tx.clone(),
    };
    match shared.incoming_tx.try_send(incoming) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            refuse(ErrorCode::Busy, "Too many incoming calls queued.");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            refuse(ErrorCode::NoSuchService, "This client serves no CALLs.");
        }
    }
}
