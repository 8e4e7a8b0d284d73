// SPDX-License-Identifier: Apache-2.0
//! The agent's SYPAS logic, over any [`crate::transport::Endpoint`].
//!
//! One connection at a time. The first is a bootstrap connection: a
//! token-less HELLO, whose only right is `cell0.node/bootstrap`; the reply
//! names the agent and carries its token and workload; GOODBYE. Every later
//! connection says HELLO with that agent id and token, sends `ready`, then
//! serves the host's CALLs and streams the workload's output and heartbeats
//! as EVENTs until the host asks for `shutdown`. (A session's agent id is
//! fixed at HELLO, so the token cannot simply be sent in REFRESH on the
//! bootstrap connection.) A lost connection is retried with back-off; the
//! workload keeps running and unsent EVENTs wait for the next connection.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cell0_proto::ErrorCode;
use cell0_proto::host::{Client, ClientConfig, ClientError, ReconnectPolicy, ServiceError};
use cell0_proto::msg::{Call, Reply};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, BootstrapReply, BootstrapRequest, ExitStatus};
use crate::process::kill_group;
use crate::transport::{Endpoint, TransportError};
use crate::workload::{self, StreamKind};

/// Bytes per stdout/stderr EVENT at most.
pub const OUTPUT_CHUNK: usize = 32 * 1024;
/// The agent's version, as reported to the host.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of one session.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A SYPAS exchange failed.
    #[error("the SYPAS session failed")]
    Sypas(#[from] ClientError),
    /// The host's bootstrap reply does not decode.
    #[error("the host's {0} reply is malformed")]
    Malformed(&'static str),
}

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the host's SYPAS endpoint is.
    pub endpoint: Endpoint,
    /// The agent id to say in HELLO before the host has named it.
    pub agent_id: String,
    /// Guest uptime when init started, in ns (reported in `ready`).
    pub init_start_ns: u64,
    /// Timeout of each CALL the agent makes.
    pub call_timeout: Duration,
    /// SYPAS PING period.
    pub ping_interval: Duration,
    /// Connection attempts in a row before giving up; `None`: never give up.
    pub max_connect_attempts: Option<u32>,
    /// First and largest back-off between attempts.
    pub backoff: (Duration, Duration),
}

impl AgentConfig {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            agent_id: String::new(),
            init_start_ns: 0,
            call_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(5),
            max_connect_attempts: None,
            backoff: (Duration::from_millis(20), Duration::from_secs(2)),
        }
    }
}

/// Why [`run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The host asked for a shutdown; the workload has ended.
    Shutdown {
        /// The host's reason.
        reason: String,
    },
    /// Connecting failed `attempts` times in a row.
    GaveUp {
        /// Attempts made.
        attempts: u32,
    },
}

/// State that outlives connections.
struct State {
    boot: Option<BootstrapReply>,
    workload_started: bool,
    workload_exit: Option<oneshot::Receiver<ExitStatus>>,
    out_tx: mpsc::Sender<(StreamKind, Bytes)>,
    out_rx: mpsc::Receiver<(StreamKind, Bytes)>,
    /// EVENTs not yet acknowledged by the host, oldest first.
    pending: VecDeque<(String, Bytes)>,
    hb_seq: u64,
    /// The workload's pid (0: none), shared with call handlers.
    pid: Arc<AtomicU32>,
}

/// Runs the agent until the host asks for a shutdown (or connecting gives up).
pub async fn run(cfg: AgentConfig) -> Outcome {
    let (out_tx, out_rx) = mpsc::channel(64);
    let mut st = State {
        boot: None,
        workload_started: false,
        workload_exit: None,
        out_tx,
        out_rx,
        pending: VecDeque::new(),
        hb_seq: 0,
        pid: Arc::new(AtomicU32::new(0)),
    };
    let mut failures = 0u32;
    loop {
        match cfg.endpoint.connect().await {
            Ok(stream) => match session(&cfg, &mut st, stream).await {
                Ok(End::Done(outcome)) => return outcome,
                // The token is here: connect again at once, with it.
                Ok(End::Bootstrapped) => continue,
                Ok(End::Lost) => {
                    tracing::info!("the SYPAS connection ended; reconnecting");
                    failures = 0;
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "SYPAS session failed");
                    if let AgentError::Sypas(ClientError::HelloRefused(_)) = e {
                        // The token no longer works: start over with bootstrap.
                        st.boot = None;
                    }
                    failures += 1;
                }
            },
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %error_chain(&e), failures, "cannot connect");
            }
        }
        if cfg.max_connect_attempts.is_some_and(|m| failures >= m) {
            return Outcome::GaveUp { attempts: failures };
        }
        let exp = failures.min(16);
        let delay = cfg.backoff.0.saturating_mul(1 << exp).min(cfg.backoff.1);
        tokio::time::sleep(delay).await;
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Flushes pending EVENTs; false when the connection failed.
async fn flush_pending(client: &Client, st: &mut State) -> bool {
    while let Some((topic, payload)) = st.pending.front().cloned() {
        match client.publish(&topic, payload).await {
            Ok(()) => {
                st.pending.pop_front();
            }
            Err(ClientError::Remote(e)) if e.error_code() == Some(ErrorCode::TokenExpired) => {
                // The token ran out: bootstrap again for a fresh one; the
                // event stays queued for the next connection.
                tracing::info!("the token expired; bootstrapping again");
                st.boot = None;
                return false;
            }
            Err(ClientError::Remote(e)) => {
                tracing::warn!(%topic, error = %e, "the host refused an event; dropped");
                st.pending.pop_front();
            }
            Err(e) => {
                tracing::debug!(error = %e, "publishing failed");
                return false;
            }
        }
    }
    true
}

/// How one connection ended.
enum End {
    /// The host asked for a shutdown.
    Done(Outcome),
    /// The bootstrap connection did its job.
    Bootstrapped,
    /// The connection was lost.
    Lost,
}

async fn session(
    cfg: &AgentConfig,
    st: &mut State,
    stream: Box<dyn crate::transport::Stream>,
) -> Result<End, AgentError> {
    let (hello_id, token) = match &st.boot {
        Some(b) => (b.agent_id.clone(), b.token.clone()),
        None => (cfg.agent_id.clone(), Bytes::new()),
    };
    let ccfg = ClientConfig {
        token,
        call_timeout: cfg.call_timeout,
        connect_timeout: cfg.call_timeout,
        ping_interval: Some(cfg.ping_interval),
        reconnect: ReconnectPolicy::never(),
        ..ClientConfig::new(hello_id)
    };
    let client = Client::from_stream(stream, ccfg).await?;
    let mut incoming = client.incoming();

    if st.boot.is_none() {
        let (kernel_release, _) = crate::init::kernel_description();
        let req = BootstrapRequest {
            agent_version: AGENT_VERSION.into(),
            kernel_release,
        };
        let reply = client
            .call(api::NODE_SERVICE, api::M_BOOTSTRAP, req.encode_to_vec())
            .await?;
        let b = BootstrapReply::decode(reply.payload)
            .map_err(|_| AgentError::Malformed("bootstrap"))?;
        if b.token.is_empty() || b.agent_id.is_empty() {
            return Err(AgentError::Malformed("bootstrap (no agent id or token)"));
        }
        tracing::info!(agent_id = %b.agent_id, "bootstrapped");
        st.boot = Some(b);
        if let Err(e) = client.goodbye("bootstrapped").await {
            tracing::debug!(error = %e, "GOODBYE after bootstrap failed");
        }
        return Ok(End::Bootstrapped);
    }
    let boot = st.boot.clone().unwrap_or_default();
    let agent_id = boot.agent_id.clone();

    if !st.workload_started {
        st.workload_started = true;
        if let Some(cmd) = boot.workload.as_ref().filter(|c| !c.argv.is_empty()) {
            match workload::start(cmd, st.out_tx.clone(), OUTPUT_CHUNK) {
                Ok(w) => {
                    tracing::info!(pid = w.pid, argv = ?cmd.argv, "workload started");
                    st.pid.store(w.pid, Ordering::SeqCst);
                    st.workload_exit = Some(w.exit);
                }
                Err(e) => {
                    let msg = format!("cell0-agent: {}\n", error_chain(&e));
                    tracing::error!("{}", msg.trim_end());
                    st.pending
                        .push_back((api::topic(&agent_id, api::T_STDERR), msg.into()));
                    let status = ExitStatus {
                        code: 127,
                        signal: 0,
                    };
                    st.pending.push_back((
                        api::topic(&agent_id, api::T_EXIT),
                        status.encode_to_vec().into(),
                    ));
                }
            }
        }
    }

    let (_, kernel) = crate::init::kernel_description();
    let ready = api::Ready {
        agent_id: agent_id.clone(),
        init_start_ns: cfg.init_start_ns,
        ready_ns: crate::init::uptime_ns().unwrap_or(0),
        workload_pid: st.pid.load(Ordering::SeqCst),
        agent_version: AGENT_VERSION.into(),
        kernel,
    };
    client
        .call(api::NODE_SERVICE, api::M_READY, ready.encode_to_vec())
        .await?;
    tracing::info!(ready_ns = ready.ready_ns, "ready");
    if !flush_pending(&client, st).await {
        return Ok(End::Lost);
    }

    let hb_period = Duration::from_millis(match boot.heartbeat_ms {
        0 => 5000,
        ms => u64::from(ms),
    });
    let mut hb = tokio::time::interval(hb_period);
    hb.tick().await;
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<api::Shutdown>(1);
    let ctx = Arc::new(CallCtx {
        pid: st.pid.clone(),
        shutdown: shutdown_tx,
    });

    loop {
        tokio::select! {
            call = async { match incoming.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let Some(call) = call else { return Ok(End::Lost) };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let result = handle_call(&ctx, call.call.clone()).await;
                    if let Err(e) = call.respond(result).await {
                        tracing::debug!(error = %e, "cannot answer a call");
                    }
                });
            }
            item = st.out_rx.recv() => {
                if let Some((kind, data)) = item {
                    let t = match kind { StreamKind::Stdout => api::T_STDOUT, StreamKind::Stderr => api::T_STDERR };
                    st.pending.push_back((api::topic(&agent_id, t), data));
                    if !flush_pending(&client, st).await {
                        return Ok(End::Lost);
                    }
                }
            }
            status = async { match st.workload_exit.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                st.workload_exit = None;
                st.pid.store(0, Ordering::SeqCst);
                let status = status.unwrap_or(ExitStatus { code: -1, signal: 0 });
                tracing::info!(code = status.code, signal = status.signal, "workload exited");
                // Output still in the pipe readers goes out first.
                drain_output(st, &agent_id).await;
                st.pending.push_back((api::topic(&agent_id, api::T_EXIT), status.encode_to_vec().into()));
                if !flush_pending(&client, st).await {
                    return Ok(End::Lost);
                }
            }
            _ = hb.tick() => {
                if !client.is_connected() {
                    return Ok(End::Lost);
                }
                st.hb_seq += 1;
                let h = api::Heartbeat {
                    uptime_ns: crate::init::uptime_ns().unwrap_or(0),
                    workload_running: st.pid.load(Ordering::SeqCst) != 0,
                    seq: st.hb_seq,
                };
                st.pending.push_back((api::topic(&agent_id, api::T_HEARTBEAT), h.encode_to_vec().into()));
                if !flush_pending(&client, st).await {
                    return Ok(End::Lost);
                }
            }
            req = shutdown_rx.recv() => {
                let req = req.unwrap_or_default();
                tracing::info!(reason = %req.reason, "shutdown requested");
                let grace = Duration::from_millis(match req.grace_ms { 0 => 5000, ms => u64::from(ms) });
                let pid = st.pid.load(Ordering::SeqCst);
                if let Some(exit) = st.workload_exit.take() {
                    kill_group(pid, libc::SIGTERM);
                    let status = match tokio::time::timeout(grace, exit).await {
                        Ok(s) => s.unwrap_or(ExitStatus { code: -1, signal: 0 }),
                        Err(_) => {
                            kill_group(pid, libc::SIGKILL);
                            ExitStatus { code: -1, signal: libc::SIGKILL }
                        }
                    };
                    drain_output(st, &agent_id).await;
                    st.pending.push_back((api::topic(&agent_id, api::T_EXIT), status.encode_to_vec().into()));
                }
                let _ = flush_pending(&client, st).await;
                if let Err(e) = client.goodbye("shutdown").await {
                    tracing::debug!(error = %e, "GOODBYE failed");
                }
                return Ok(End::Done(Outcome::Shutdown { reason: req.reason }));
            }
        }
    }
}

/// Moves output already read from the workload's pipes into the pending queue.
async fn drain_output(st: &mut State, agent_id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    while let Ok(Some((kind, data))) = tokio::time::timeout_at(deadline, st.out_rx.recv()).await {
        let t = match kind {
            StreamKind::Stdout => api::T_STDOUT,
            StreamKind::Stderr => api::T_STDERR,
        };
        st.pending.push_back((api::topic(agent_id, t), data));
    }
}

struct CallCtx {
    pid: Arc<AtomicU32>,
    shutdown: mpsc::Sender<api::Shutdown>,
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::new(ErrorCode::BadRequest, format!("{what}: {e}"))
}

fn decode<M: Message + Default>(call: &Call) -> Result<M, ServiceError> {
    M::decode(call.payload.clone())
        .map_err(|e| bad_request(&format!("The {} request does not decode", call.method), e))
}

fn reply(m: &impl Message) -> Reply {
    Reply {
        payload: m.encode_to_vec().into(),
        shm: Vec::new(),
    }
}

fn absolute(path: &str) -> Result<&Path, ServiceError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad_request("The path must be absolute", path));
    }
    Ok(p)
}

async fn handle_call(ctx: &CallCtx, call: Call) -> Result<Reply, ServiceError> {
    match call.method.as_str() {
        api::M_EXEC => {
            let req: api::ExecRequest = decode(&call)?;
            let r = workload::exec(&req)
                .await
                .map_err(|e| bad_request("Cannot run the command", error_chain(&e)))?;
            Ok(reply(&r))
        }
        api::M_PUT_FILE => {
            let req: api::PutFile = decode(&call)?;
            let path = absolute(&req.path)?;
            if req.data.len() as u64 > api::MAX_FILE_BYTES {
                return Err(bad_request("The file is too large", req.data.len()));
            }
            if req.mkdirs {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| bad_request("Cannot create the directory", e))?;
                }
            }
            let tmp = path.with_file_name(format!(
                ".{}.cell0-tmp",
                path.file_name()
                    .map_or_else(|| "f".into(), |n| n.to_string_lossy())
            ));
            let mode = if req.mode == 0 {
                0o644
            } else {
                req.mode & 0o7777
            };
            let write = || -> std::io::Result<()> {
                std::fs::write(&tmp, &req.data)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
                std::fs::rename(&tmp, path)
            };
            write().map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                bad_request(&format!("Cannot write {}", req.path), e)
            })?;
            Ok(Reply::default())
        }
        api::M_GET_FILE => {
            let req: api::GetFile = decode(&call)?;
            let path = absolute(&req.path)?;
            let meta = std::fs::metadata(path)
                .map_err(|e| bad_request(&format!("Cannot read {}", req.path), e))?;
            if !meta.is_file() {
                return Err(bad_request("Not a regular file", &req.path));
            }
            if meta.len() > api::MAX_FILE_BYTES {
                return Err(bad_request("The file is too large", meta.len()));
            }
            let data = std::fs::read(path)
                .map_err(|e| bad_request(&format!("Cannot read {}", req.path), e))?;
            Ok(reply(&api::FileData {
                data: data.into(),
                mode: meta.permissions().mode() & 0o7777,
            }))
        }
        api::M_SIGNAL => {
            let req: api::Signal = decode(&call)?;
            let pid = ctx.pid.load(Ordering::SeqCst);
            if pid == 0 {
                return Err(bad_request("No workload runs", pid));
            }
            kill_group(pid, req.signal);
            Ok(Reply::default())
        }
        api::M_SHUTDOWN => {
            let req: api::Shutdown = decode(&call)?;
            ctx.shutdown.try_send(req).map_err(|_| {
                ServiceError::new(ErrorCode::ShuttingDown, "A shutdown is already under way.")
            })?;
            Ok(Reply::default())
        }
        other => Err(ServiceError::new(
            ErrorCode::NoSuchMethod,
            format!("The agent has no method {other:?}."),
        )),
    }
}
