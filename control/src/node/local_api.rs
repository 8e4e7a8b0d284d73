// SPDX-License-Identifier: Apache-2.0
//! The node-local part of the VM API: Logs, Exec and Attest of the VMs one
//! node agent runs. A member serves them for its own node's VMs
//! ([`crate::api::Api`]) and proxies them for a VM on another node to that
//! node's API: a `cell0d node --listen ADDR` serves [`NodeApi`] (these three
//! calls of `VmService`, for the VMs it runs), and another member serves its
//! own. Both run the functions here against their own [`Agent`].
//!
//! Over TLS the node's API presents the node's certificate and takes calls
//! from members' certificates only (docs/CLUSTER.md, "Node-local calls").

// tonic handlers return `tonic::Status` (~176 bytes) by design.
#![allow(clippy::result_large_err)]

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cell0_proto::grpc::{self, vm_service_server::VmService};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{Agent, NodeError};
use crate::store::VmRecord;
use crate::tls::KnownRevocations;

/// How long a command run by Exec may take before the agent kills it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// The most stdout bytes an Exec answer carries.
const EXEC_MAX_STDOUT: usize = 3 << 20;
/// The most stderr bytes an Exec answer carries (before cell0's own notes).
const EXEC_MAX_STDERR: usize = 512 << 10;

/// A stream of gRPC answers.
pub type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Exec: `exec` of the VM's guest agent (`cell0-agent`) over SYPAS, through
/// the agent's router. The nano guest has no agent: FAILED_PRECONDITION.
pub async fn exec(
    agent: &Agent,
    rec: &VmRecord,
    command: Vec<String>,
) -> Result<grpc::ExecResponse, Status> {
    use prost::Message;
    if command.is_empty() || command[0].is_empty() {
        return Err(Status::invalid_argument("command: must name a program"));
    }
    if rec.spec.is_nano() {
        return Err(Status::failed_precondition(format!(
            "VM {:?} runs the nano guest, which has no cell0 agent to run commands; \
             exec needs a Linux agent image (cell0-rootfs, docs/IMAGES.md)",
            rec.id
        )));
    }
    let Some(router) = agent.router() else {
        return Err(Status::failed_precondition(format!(
            "node {:?} runs no SYPAS router, so it cannot reach guest agents",
            agent.node_id()
        )));
    };
    let call = cell0_agent::api::ExecRequest {
        command: Some(cell0_agent::api::Command {
            argv: command,
            ..Default::default()
        }),
        stdin: Default::default(),
        timeout_ms: EXEC_TIMEOUT.as_millis() as u32,
    };
    let reply = router
        .call_vm_agent(
            &rec.id,
            cell0_agent::api::M_EXEC,
            call.encode_to_vec().into(),
            EXEC_TIMEOUT + Duration::from_secs(10),
        )
        .await
        .map_err(|e| {
            let msg = format!("exec in VM {:?}: {}", rec.id, e.message);
            match e.error_code() {
                Some(cell0_proto::ErrorCode::AgentUnreachable) => Status::failed_precondition(
                    format!("{msg} (is the VM running a cell0-agent image, and ready?)"),
                ),
                Some(cell0_proto::ErrorCode::BadRequest) => Status::invalid_argument(msg),
                Some(cell0_proto::ErrorCode::Timeout) => Status::deadline_exceeded(msg),
                _ => Status::unavailable(msg),
            }
        })?;
    let r = cell0_agent::api::ExecReply::decode(reply.payload)
        .map_err(|e| Status::internal(format!("the guest agent's exec reply: {e}")))?;
    let st = r.status.unwrap_or_default();
    let mut stderr = r.stderr.to_vec();
    if r.timed_out {
        stderr.extend_from_slice(
            format!(
                "\ncell0: killed after {} s (exec timeout)\n",
                EXEC_TIMEOUT.as_secs()
            )
            .as_bytes(),
        );
    }
    let mut stdout = r.stdout.to_vec();
    // gRPC clients take 4 MiB messages by default: the answer stays below.
    let cut = stdout.len() > EXEC_MAX_STDOUT || stderr.len() > EXEC_MAX_STDERR;
    stdout.truncate(EXEC_MAX_STDOUT);
    stderr.truncate(EXEC_MAX_STDERR);
    if r.truncated || cut {
        stderr.extend_from_slice(
            format!(
                "\ncell0: output cut (at most {} bytes of stdout and {} of stderr come back)\n",
                EXEC_MAX_STDOUT, EXEC_MAX_STDERR
            )
            .as_bytes(),
        );
    }
    Ok(grpc::ExecResponse {
        // A signal shows as 128 + its number, as shells report it.
        exit_code: if st.signal != 0 {
            128 + st.signal
        } else {
            st.code
        },
        stdout,
        stderr,
    })
}

/// Attest: quotes the VM's vTPM and verifies it against its golden values.
pub async fn attest(agent: &Agent, rec: &VmRecord) -> Result<grpc::AttestResponse, Status> {
    let id = rec.id.as_str();
    if !rec.spec.tpm {
        return Err(Status::failed_precondition(format!(
            "VM {id:?} was created without a vTPM; create it with tpm=true (cell0ctl run --tpm)"
        )));
    }
    let rt = agent
        .runtime(id)
        .ok_or_else(|| Status::unavailable(format!("VM {id:?} is not on this node yet")))?;
    if rt.pid == 0 || rt.state != grpc::VmState::Running {
        return Err(Status::failed_precondition(format!(
            "VM {id:?} is not running (state {}); only a running VM can be attested",
            super::state_name(rt.state)
        )));
    }
    let sock = agent.run_dir(id).join("api.sock");
    let a = agent
        .attest
        .attest(&super::attest::Target {
            id,
            launch: rt.launch_seq,
            sock: &sock,
            spec: &rec.spec,
            cid: rec.cid,
            cmdline_extra: &rt.cmdline_extra,
            vmm_bin: &agent.config().vmm_bin,
        })
        .await
        .map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            Status::internal(format!("attestation of {id:?} failed: {s}"))
        })?;
    Ok(grpc::AttestResponse {
        trusted: a.verdict.is_trusted(),
        verdict_json: serde_json::to_string(&a.verdict).unwrap_or_default(),
        failures: a.verdict.failures().iter().map(|f| f.to_string()).collect(),
        nonce: a.nonce.to_vec(),
        ak_name: a.ak_name,
        pcrs: a.pcrs.into_iter().collect(),
        enrolled: a.enrolled,
    })
}

/// Logs: the VM's serial console or guest-agent log from its run dir,
/// followed while the VM runs and `placed()` holds.
pub fn logs(
    agent: Arc<Agent>,
    id: String,
    req: &grpc::LogsRequest,
    placed: impl Fn() -> bool + Send + 'static,
) -> Result<Stream_<grpc::LogChunk>, Status> {
    let file = match grpc::LogSource::try_from(req.source) {
        Ok(grpc::LogSource::Agent) => crate::router::guest::AGENT_LOG,
        Ok(grpc::LogSource::Serial) => "serial.log",
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "source: {} is not a log source (0 serial, 1 agent)",
                req.source
            )));
        }
    };
    let path = agent.run_dir(&id).join(file);
    let (follow, tail) = (req.follow, req.tail_bytes);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut off: u64 = 0;
        if tail > 0 {
            if let Ok(m) = std::fs::metadata(&path) {
                off = m.len().saturating_sub(tail);
            }
        }
        loop {
            let chunk = read_from(&path, &mut off);
            if !chunk.is_empty() && tx.send(Ok(grpc::LogChunk { data: chunk })).await.is_err() {
                return;
            }
            if !follow {
                return;
            }
            let over = agent.runtime(&id).is_none_or(|r| {
                matches!(
                    grpc::VmState::try_from(r.state as i32),
                    Ok(grpc::VmState::Exited | grpc::VmState::Failed | grpc::VmState::Stopped)
                )
            });
            if !placed() || over {
                let rest = read_from(&path, &mut off);
                if !rest.is_empty() {
                    let _ = tx.send(Ok(grpc::LogChunk { data: rest })).await;
                }
                return;
            }
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn read_from(path: &Path, off: &mut u64) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *off {
        // The log was rotated by a restart: start over.
        *off = 0;
    }
    if f.seek(SeekFrom::Start(*off)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut buf);
    *off += buf.len() as u64;
    buf
}

/// The API of a `cell0d node` (`--listen`): `VmService`'s Logs, Exec and
/// Attest for the VMs this node runs, for members that proxy them. The other
/// calls belong to the control-plane members: UNIMPLEMENTED.
#[derive(Clone)]
pub struct NodeApi {
    agent: Arc<Agent>,
    /// The revocation list from the leader's heartbeat answers (over TLS).
    revocations: Option<KnownRevocations>,
}

impl NodeApi {
    /// The API over this node's agent; over TLS, `revocations` is the list
    /// its certificate checks use (see [`serve`]).
    pub fn new(agent: Arc<Agent>, revocations: Option<KnownRevocations>) -> Self {
        Self { agent, revocations }
    }

    /// Over TLS only members may call (they proxy their clients' calls), and
    /// only once the node knows which certificates are revoked.
    fn check<T>(&self, req: &Request<T>, method: &str) -> Result<(), Status> {
        if self.revocations.as_ref().is_some_and(|r| !r.known()) {
            return Err(Status::unavailable(format!(
                "node {:?} has not yet had the cluster's certificate revocation list in a \
                 heartbeat answer; retry",
                self.agent.node_id()
            )));
        }
        crate::tls::require_role(
            req,
            &[crate::tls::Role::Member],
            &format!("{method} on the API of node {:?}", self.agent.node_id()),
        )
    }

    /// The record of VM `id` if this node runs it.
    fn record(&self, id: &str) -> Result<VmRecord, Status> {
        self.agent.runtime(id).map(|r| r.record).ok_or_else(|| {
            Status::not_found(format!(
                "node {:?} runs no VM named {id:?}",
                self.agent.node_id()
            ))
        })
    }

    fn members_only(&self, method: &str) -> Status {
        Status::unimplemented(format!(
            "{method}: this is the API of node agent {:?} (cell0d node), which serves only \
             Logs, Exec and Attest of its own VMs to control-plane members; ask a member",
            self.agent.node_id()
        ))
    }
}

#[tonic::async_trait]
impl VmService for NodeApi {
    async fn create(
        &self,
        _r: Request<grpc::CreateVmRequest>,
    ) -> Result<Response<grpc::Vm>, Status> {
        Err(self.members_only("Create"))
    }

    async fn get(&self, _r: Request<grpc::GetVmRequest>) -> Result<Response<grpc::Vm>, Status> {
        Err(self.members_only("Get"))
    }

    async fn list(
        &self,
        _r: Request<grpc::ListVmsRequest>,
    ) -> Result<Response<grpc::ListVmsResponse>, Status> {
        Err(self.members_only("List"))
    }

    async fn stop(&self, _r: Request<grpc::StopVmRequest>) -> Result<Response<grpc::Vm>, Status> {
        Err(self.members_only("Stop"))
    }

    async fn delete(
        &self,
        _r: Request<grpc::DeleteVmRequest>,
    ) -> Result<Response<grpc::DeleteVmResponse>, Status> {
        Err(self.members_only("Delete"))
    }

    type WatchStream = Stream_<grpc::VmEvent>;

    async fn watch(
        &self,
        _r: Request<grpc::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(self.members_only("Watch"))
    }

    type LogsStream = Stream_<grpc::LogChunk>;

    async fn logs(
        &self,
        request: Request<grpc::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.check(&request, "Logs")?;
        let req = request.into_inner();
        let rec = self.record(&req.id)?;
        let agent = self.agent.clone();
        let id = rec.id.clone();
        logs(self.agent.clone(), rec.id, &req, move || {
            agent.runtime(&id).is_some()
        })
        .map(Response::new)
    }

    async fn exec(
        &self,
        request: Request<grpc::ExecRequest>,
    ) -> Result<Response<grpc::ExecResponse>, Status> {
        self.check(&request, "Exec")?;
        let req = request.into_inner();
        let rec = self.record(&req.id)?;
        exec(&self.agent, &rec, req.command)
            .await
            .map(Response::new)
    }

    async fn attest(
        &self,
        request: Request<grpc::AttestRequest>,
    ) -> Result<Response<grpc::AttestResponse>, Status> {
        self.check(&request, "Attest")?;
        let rec = self.record(&request.get_ref().id)?;
        attest(&self.agent, &rec).await.map(Response::new)
    }
}

/// Serves [`NodeApi`] on `listen` (over mutual TLS with the node's
/// certificate when `tls` is set) until the process ends; returns the bound
/// address.
///
/// Over TLS every request's certificate is checked against `revocations`,
/// the cluster's list as the leader's heartbeat answers give it
/// ([`crate::tls::Access`]): a revoked member certificate is refused here
/// from the first heartbeat answer after its revocation was committed.
pub async fn serve(
    listen: SocketAddr,
    tls: Option<&Path>,
    agent: Arc<Agent>,
    revocations: KnownRevocations,
) -> Result<SocketAddr, NodeError> {
    let usage = |e: String| NodeError::Usage(format!("--listen {listen}: {e}"));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| usage(format!("cannot listen: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| usage(format!("cannot listen: {e}")))?;
    let builder = || {
        tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(30)))
    };
    match tls {
        Some(dir) => {
            let t = crate::tls::TlsDir::load(dir)
                .map_err(|e| NodeError::Usage(format!("--tls-dir: {e}")))?;
            let cfg = t
                .server_config()
                .map_err(|e| NodeError::Usage(format!("--tls-dir: {e}")))?;
            let known = revocations.clone();
            let access = crate::tls::Access::new(move |serial| known.get(serial), None);
            let api = NodeApi::new(agent, Some(revocations));
            let router = builder()
                .add_service(access.guard(grpc::vm_service_server::VmServiceServer::new(api)));
            tokio::spawn(report(
                router.serve_with_incoming(crate::tls::incoming(listener, cfg)),
            ));
        }
        None => {
            let router = builder().add_service(grpc::vm_service_server::VmServiceServer::new(
                NodeApi::new(agent, None),
            ));
            tokio::spawn(report(router.serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )));
        }
    }
    tracing::info!(addr = %bound, tls = tls.is_some(), "node API serving (Logs, Exec, Attest for members)");
    Ok(bound)
}

async fn report(f: impl std::future::Future<Output = Result<(), tonic::transport::Error>>) {
    if let Err(e) = f.await {
        tracing::error!("the node API stopped: {}", crate::tls::chain(&e));
    }
}
