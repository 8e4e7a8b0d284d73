// SPDX-License-Identifier: Apache-2.0
//! The host end of the agent protocol for one agent: what the node agent and
//! router do for a VM, reduced to one connection. It follows the router's
//! conventions (docs/GUEST-AGENT.md): a token-less HELLO on the VM's own
//! listener gets only the bootstrap right; `bootstrap` hands out the token;
//! the agent then connects again with HELLO and the token, which grants
//! everything. `cell0-agent host` (the Linux end-to-end test, the boot
//! benchmark) and the host-side tests use it; the control plane's router
//! (`cell0_control::router`) is the real thing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cell0_proto::ErrorCode;
use cell0_proto::frame::{Frame, Kind, MAX_PAYLOAD};
use cell0_proto::host::ServiceError;
use cell0_proto::host::conn::FrameReader;
use cell0_proto::msg::{
    Body, Call, ErrorMsg, Event, Goodbye, Hello, Refresh, Reply, Right, Welcome, permits,
};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::api;

/// Errors of the host end.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Accepting or reading the connection failed.
    #[error("the agent connection failed")]
    Io(#[source] std::io::Error),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// No answer in time.
    #[error("the agent did not answer in time")]
    Timeout,
    /// The agent answered with ERROR.
    #[error("the agent answered with an error")]
    Remote(#[source] ServiceError),
    /// The agent's answer does not decode.
    #[error("the agent's {0} answer is malformed")]
    Malformed(&'static str),
}

/// What the host tells the agent at bootstrap.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// The agent's id.
    pub agent_id: String,
    /// The token the agent gets and must REFRESH with.
    pub token: Bytes,
    /// The workload.
    pub workload: Option<api::Command>,
    /// Heartbeat period in ms (0: the agent's default).
    pub heartbeat_ms: u32,
}

/// Something the agent sent that the host did not ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    /// `ready`.
    Ready(api::Ready),
    /// A published EVENT.
    Event {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Bytes,
    },
    /// The connection ended (GOODBYE or EOF).
    Closed,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, ServiceError>>>>>;

/// One agent's connection.
#[derive(Debug)]
pub struct AgentConn {
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    /// What the agent sent on its own.
    pub events: mpsc::Receiver<HostEvent>,
    /// For each HELLO: whether it carried a token (a reconnect) or not (bootstrap).
    pub hellos: Arc<Mutex<Vec<bool>>>,
    /// Bootstrap connections [`accept`] served before this one.
    pub bootstraps: usize,
    hello: Option<oneshot::Receiver<bool>>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for AgentConn {
    /// Dropping the connection closes it.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Conn {
    cfg: HostConfig,
    rights: Vec<Right>,
    helloed: bool,
}

fn error_frame(id: u64, code: ErrorCode, msg: &str) -> Frame {
    Frame::from_message(Kind::Error, id, &ErrorMsg::new(code, msg))
}

impl Conn {
    fn welcome(&self, id: u64) -> Frame {
        Frame::from_message(
            Kind::Welcome,
            id,
            &Welcome {
                session_id: 1,
                rights: self.rights.clone(),
                token_expiry: 0,
                version: 1,
            },
        )
    }

    /// Answers one frame from the agent; returns frames to send and an event.
    fn on_frame(
        &mut self,
        f: &Frame,
        pending: &Pending,
        hellos: &Mutex<Vec<bool>>,
    ) -> (Vec<Frame>, Option<HostEvent>) {
        let id = f.request_id;
        let body = match Body::from_frame(f) {
            Ok(b) => b,
            Err(e) => return (vec![error_frame(id, e.code(), "Malformed payload.")], None),
        };
        match body {
            Body::Hello(Hello { token, .. }) => {
                if self.helloed {
                    return (
                        vec![error_frame(
                            id,
                            ErrorCode::AlreadyHello,
                            "HELLO was already sent.",
                        )],
                        None,
                    );
                }
                if token.is_empty() {
                    self.rights = vec![api::bootstrap_right()];
                } else if token == self.cfg.token {
                    self.rights = vec![Right::all()];
                } else {
                    return (
                        vec![error_frame(
                            id,
                            ErrorCode::TokenInvalid,
                            "The token is not valid.",
                        )],
                        None,
                    );
                }
                self.helloed = true;
                if let Ok(mut h) = hellos.lock() {
                    h.push(!token.is_empty());
                }
                (vec![self.welcome(id)], None)
            }
            Body::Refresh(Refresh { token }) => {
                if token != self.cfg.token || token.is_empty() {
                    return (
                        vec![error_frame(
                            id,
                            ErrorCode::TokenInvalid,
                            "The token is not valid.",
                        )],
                        None,
                    );
                }
                self.rights = vec![Right::all()];
                (vec![self.welcome(id)], None)
            }
            Body::Call(Call {
                service,
                method,
                payload,
                ..
            }) => {
                if !self.helloed {
                    return (
                        vec![error_frame(id, ErrorCode::NotHello, "HELLO first.")],
                        None,
                    );
                }
                if !permits(&self.rights, &service, &method) {
                    return (
                        vec![error_frame(
                            id,
                            ErrorCode::PermissionDenied,
                            "No right covers this call.",
                        )],
                        None,
                    );
                }
                if service != api::NODE_SERVICE {
                    return (
                        vec![error_frame(
                            id,
                            ErrorCode::NoSuchService,
                            "No such service.",
                        )],
                        None,
                    );
                }
                match method.as_str() {
                    api::M_BOOTSTRAP => {
                        let r = api::BootstrapReply {
                            agent_id: self.cfg.agent_id.clone(),
                            token: self.cfg.token.clone(),
                            workload: self.cfg.workload.clone(),
                            heartbeat_ms: self.cfg.heartbeat_ms,
                        };
                        let reply = Reply {
                            payload: r.encode_to_vec().into(),
                            shm: vec![],
                        };
                        (vec![Frame::from_message(Kind::Reply, id, &reply)], None)
                    }
                    api::M_READY => match api::Ready::decode(payload) {
                        Ok(r) => (
                            vec![Frame::from_message(Kind::Reply, id, &Reply::default())],
                            Some(HostEvent::Ready(r)),
                        ),
                        Err(_) => (
                            vec![error_frame(id, ErrorCode::BadRequest, "Bad ready.")],
                            None,
                        ),
                    },
                    _ => (
                        vec![error_frame(id, ErrorCode::NoSuchMethod, "No such method.")],
                        None,
                    ),
                }
            }
            Body::Event(Event { topic, payload, .. }) => {
                let ack =
                    (id != 0).then(|| Frame::from_message(Kind::Reply, id, &Reply::default()));
                (
                    ack.into_iter().collect(),
                    Some(HostEvent::Event { topic, payload }),
                )
            }
            Body::Ping(p) => (
                vec![Frame::from_message(
                    Kind::Pong,
                    id,
                    &cell0_proto::msg::Pong {
                        nonce: p.nonce,
                        timestamp_ns: p.timestamp_ns,
                    },
                )],
                None,
            ),
            Body::Reply(r) => {
                if let Some(tx) = pending.lock().ok().and_then(|mut p| p.remove(&id)) {
                    let _ = tx.send(Ok(r.payload));
                }
                (vec![], None)
            }
            Body::Error(e) => {
                if let Some(tx) = pending.lock().ok().and_then(|mut p| p.remove(&id)) {
                    let _ = tx.send(Err(e.into()));
                }
                (vec![], None)
            }
            Body::Goodbye(_) => (
                vec![Frame::from_message(
                    Kind::Goodbye,
                    0,
                    &Goodbye {
                        reason: "bye".into(),
                    },
                )],
                Some(HostEvent::Closed),
            ),
            Body::Subscribe(_) | Body::Unsubscribe(_) => (
                vec![Frame::from_message(Kind::Reply, id, &Reply::default())],
                None,
            ),
            Body::Welcome(_) | Body::Pong(_) => (vec![], None),
        }
    }
}

/// Accepts one agent on `listener` and serves it in the background. A
/// bootstrap connection (token-less HELLO) is served until the agent closes
/// it, and the next connection is accepted; the first one whose HELLO
/// carries a token is returned.
pub async fn accept(listener: &UnixListener, cfg: HostConfig) -> Result<AgentConn, HostError> {
    let mut bootstraps = 0;
    loop {
        let (stream, _) = listener.accept().await.map_err(HostError::Io)?;
        let mut conn = serve(stream, cfg.clone());
        let hello = conn.hello.take();
        match hello {
            Some(rx) => match rx.await {
                Ok(true) => {
                    conn.bootstraps = bootstraps;
                    return Ok(conn);
                }
                Ok(false) => {
                    bootstraps += 1;
                    // The agent says GOODBYE once it has its token.
                    let _ = conn.wait_closed(Duration::from_secs(30)).await;
                }
                // Closed before HELLO.
                Err(_) => {}
            },
            None => return Ok(conn),
        }
    }
}

/// Serves one agent connection in the background.
pub fn serve(stream: UnixStream, cfg: HostConfig) -> AgentConn {
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Frame>(256);
    let (ev_tx, events) = mpsc::channel(1024);
    let pending: Pending = Arc::default();
    let hellos = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let Ok(bytes) = f.to_vec() else { continue };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
            if f.kind == Kind::Goodbye {
                let _ = wr.shutdown().await;
                break;
            }
        }
    });
    let reader_tx = tx.clone();
    let reader_pending = pending.clone();
    let reader_hellos = hellos.clone();
    let (hello_tx, hello_rx) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut hello_tx = Some(hello_tx);
        let mut conn = Conn {
            cfg,
            rights: vec![],
            helloed: false,
        };
        let mut reader = FrameReader::new(rd, MAX_PAYLOAD);
        while let Ok(Some(f)) = reader.next().await {
            let (out, ev) = conn.on_frame(&f, &reader_pending, &reader_hellos);
            if conn.helloed {
                if let Some(tx) = hello_tx.take() {
                    let _ = tx.send(conn.rights != [api::bootstrap_right()]);
                }
            }
            for o in out {
                let _ = reader_tx.send(o).await;
            }
            if let Some(ev) = ev {
                let closed = ev == HostEvent::Closed;
                let _ = ev_tx.send(ev).await;
                if closed {
                    return;
                }
            }
        }
        // Fail every call in flight.
        if let Ok(mut p) = reader_pending.lock() {
            p.clear();
        }
        let _ = ev_tx.send(HostEvent::Closed).await;
    });
    AgentConn {
        tx,
        pending,
        next_id: AtomicU64::new(1),
        events,
        hellos,
        bootstraps: 0,
        hello: Some(hello_rx),
        tasks: [writer.abort_handle(), reader.abort_handle()],
    }
}

impl AgentConn {
    /// Waits for `ready`, collecting what comes before it.
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
    ) -> Result<(api::Ready, Vec<HostEvent>), HostError> {
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(HostError::Timeout),
                Ok(None | Some(HostEvent::Closed)) => return Err(HostError::Closed),
                Ok(Some(HostEvent::Ready(r))) => return Ok((r, before)),
                Ok(Some(e)) => before.push(e),
            }
        }
    }

    /// CALLs `agent/<id>` `method` and returns the REPLY payload.
    pub async fn call(
        &self,
        agent_id: &str,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, HostError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let call = Call {
            service: format!("agent/{agent_id}"),
            method: method.into(),
            payload: payload.into(),
            shm: vec![],
        };
        self.tx
            .send(Frame::from_message(Kind::Call, id, &call))
            .await
            .map_err(|_| HostError::Closed)?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(HostError::Timeout),
            Ok(Err(_)) => Err(HostError::Closed),
            Ok(Ok(Err(e))) => Err(HostError::Remote(e)),
            Ok(Ok(Ok(p))) => Ok(p),
        }
    }

    /// Runs a command in the guest.
    pub async fn exec(
        &self,
        agent_id: &str,
        req: &api::ExecRequest,
        timeout: Duration,
    ) -> Result<api::ExecReply, HostError> {
        let p = self
            .call(agent_id, api::M_EXEC, req.encode_to_vec(), timeout)
            .await?;
        api::ExecReply::decode(p).map_err(|_| HostError::Malformed("exec"))
    }

    /// Writes a file in the guest.
    pub async fn put_file(&self, agent_id: &str, req: &api::PutFile) -> Result<(), HostError> {
        self.call(
            agent_id,
            api::M_PUT_FILE,
            req.encode_to_vec(),
            Duration::from_secs(30),
        )
        .await
        .map(drop)
    }

    /// Reads a file from the guest.
    pub async fn get_file(&self, agent_id: &str, path: &str) -> Result<api::FileData, HostError> {
        let p = self
            .call(
                agent_id,
                api::M_GET_FILE,
                api::GetFile { path: path.into() }.encode_to_vec(),
                Duration::from_secs(30),
            )
            .await?;
        api::FileData::decode(p).map_err(|_| HostError::Malformed("get-file"))
    }

    /// Asks the agent to end its workload and power off.
    pub async fn shutdown(
        &self,
        agent_id: &str,
        grace_ms: u32,
        reason: &str,
    ) -> Result<(), HostError> {
        let req = api::Shutdown {
            grace_ms,
            reason: reason.into(),
        };
        self.call(
            agent_id,
            api::M_SHUTDOWN,
            req.encode_to_vec(),
            Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// Waits until the connection ends, collecting the events that came first.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<Vec<HostEvent>, HostError> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(HostError::Timeout),
                Ok(None | Some(HostEvent::Closed)) => return Ok(seen),
                Ok(Some(e)) => seen.push(e),
            }
        }
    }
}
