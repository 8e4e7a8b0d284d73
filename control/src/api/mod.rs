// SPDX-License-Identifier: Apache-2.0
//! The gRPC API (tonic): VmService, NodeService, ClusterService, with server
//! reflection. Writes go through the Raft store; VM runtime status comes from
//! the node agent. Every state-changing call is audited.

// tonic handlers return `tonic::Status` (~176 bytes) by design.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cell0_proto::grpc::{self, node_service_server::NodeService, vm_service_server::VmService};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::node::Agent;
use crate::node::liveness::{Liveness, REMOTE_LABEL, REMOTE_VALUE};
use crate::spec::VmSpec;
use crate::store::state::{NodeRecord, NodeState, Resources};
use crate::store::{Command, Desired, Rejection, Store, StoreError, VmRecord};

mod proxy;

use crate::node::local_api::Stream_;

/// The API state shared by the three services.
#[derive(Clone)]
pub struct Api {
    store: Store,
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
    audit: Arc<AuditLog>,
    names: Arc<AtomicU64>,
    liveness: Option<Arc<Liveness>>,
    /// Register needs a passed admission (unless `--allow-unattested-nodes`).
    admission: Option<crate::node::admission::AdmissionApi>,
    /// Events of VMs on other nodes, for Watch: on the leader, the state
    /// changes heartbeats report; elsewhere, the leader's, relayed.
    events: tokio::sync::broadcast::Sender<grpc::VmEvent>,
    /// The relay of the leader's events, started by the first Watch.
    relay: Arc<std::sync::OnceLock<()>>,
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Rejected(Rejection::AlreadyExists { id }) => Status::already_exists(format!(
            "a VM named {id:?} already exists; pick another name or delete it first"
        )),
        StoreError::Rejected(Rejection::NotFound { id }) => {
            Status::not_found(format!("no VM named {id:?}"))
        }
        StoreError::Rejected(Rejection::NoCapacity { reason }) => {
            Status::resource_exhausted(format!(
                "cannot place the VM: {reason}; stop or delete VMs, or raise the overcommit ratio"
            ))
        }
        StoreError::Rejected(Rejection::Unschedulable { reason }) => {
            Status::failed_precondition(format!("cannot place the VM: {reason}"))
        }
        StoreError::Rejected(Rejection::NodeNotFound { id }) => {
            Status::not_found(format!("no node named {id:?}; see cell0ctl node list"))
        }
        e => Status::unavailable(format!(
            "the control plane could not commit the change: {e}"
        )),
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id: must not be empty"));
    }
    if !crate::spec::is_dns_label(id) {
        return Err(Status::invalid_argument(format!(
            "id: {id:?} is not a VM name (1-63 of a-z 0-9 -)"
        )));
    }
    Ok(())
}

impl Api {
    /// The API over `store` and `agent`.
    pub fn new(
        store: Store,
        agent: Arc<Agent>,
        metrics: Arc<Metrics>,
        audit: Arc<AuditLog>,
    ) -> Self {
        if let Some(r) = agent.router() {
            // The router learns which VMs run `cell0-agent` (every VM not on
            // the nano guest) from the replicated records, and its counters
            // go to /metrics.
            r.set_guest_agent_source(Arc::new(store.clone()));
            metrics.register_sypas(r.stats());
        }
        Self {
            store,
            agent,
            metrics,
            audit,
            names: Arc::new(AtomicU64::new(0)),
            liveness: None,
            admission: None,
            events: tokio::sync::broadcast::channel(4096).0,
            relay: Arc::default(),
        }
    }

    /// Serves node agents on other hosts (`NodeService.Register` and
    /// `Heartbeat`) with this failure detector.
    pub fn with_liveness(mut self, l: Arc<Liveness>) -> Self {
        self.liveness = Some(l);
        self
    }

    /// The runtime status this member knows of VM `rec`: its own node
    /// agent's, else the last heartbeat report of the VM's node (which the
    /// leader holds).
    fn known_status(&self, rec: &VmRecord) -> Option<grpc::VmStatus> {
        self.agent.status(&rec.id).or_else(|| {
            self.liveness
                .as_ref()
                .filter(|_| rec.lost.is_none())
                .and_then(|l| l.status(&rec.id, &rec.node))
        })
    }

    /// The status the replicated record gives: pending, or failed when lost.
    fn record_status(rec: &VmRecord) -> grpc::VmStatus {
        grpc::VmStatus {
            state: if rec.lost.is_some() {
                grpc::VmState::Failed as i32
            } else {
                grpc::VmState::Pending as i32
            },
            node: rec.node.clone(),
            exit_code: -1,
            vsock_cid: rec.cid,
            message: rec
                .lost
                .clone()
                .or_else(|| rec.handoff_message())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn vm(&self, rec: &VmRecord) -> grpc::Vm {
        let status = self
            .known_status(rec)
            .unwrap_or_else(|| Self::record_status(rec));
        self.vm_with(rec, status)
    }

    fn vm_with(&self, rec: &VmRecord, status: grpc::VmStatus) -> grpc::Vm {
        grpc::Vm {
            id: rec.id.clone(),
            spec: Some(rec.spec.to_proto()),
            status: Some(status),
            desired: rec.desired.as_str().to_string(),
            created_at_ms: rec.created_at_ms,
            revision: rec.revision,
        }
    }

    fn get_record(&self, id: &str) -> Result<VmRecord, Status> {
        check_id(id)?;
        self.store
            .read(|s| s.vms.get(id).cloned())
            .ok_or_else(|| Status::not_found(format!("no VM named {id:?}")))
    }

    fn done<T>(&self, method: &str, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.api(method, code);
    }

    fn audit<T>(
        &self,
        method: &str,
        peer: Option<SocketAddr>,
        target: &str,
        r: &Result<T, Status>,
        revision: u64,
    ) {
        self.audit.record_outcome(method, peer, target, r, revision);
    }

    fn fresh_name(&self) -> String {
        let n = self.names.fetch_add(1, Ordering::Relaxed);
        let mut h = Sha256::new();
        h.update(crate::now_ms().to_le_bytes());
        h.update(n.to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        h.update(t.to_le_bytes());
        format!("vm-{}", &hex::encode(h.finalize())[..8])
    }

    async fn create(&self, req: grpc::CreateVmRequest) -> Result<(grpc::Vm, u64), Status> {
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: must be set"))?;
        let spec = VmSpec::from_proto(spec, &self.fresh_name())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (rev, applied) = self
            .store
            .write(Command::CreateVm {
                spec,
                created_at_ms: crate::now_ms(),
            })
            .await
            .map_err(store_status)?;
        let rec = applied
            .vm
            .ok_or_else(|| Status::internal("the create was applied without a VM record"))?;
        Ok((self.vm(&rec), rev))
    }

    async fn set_desired(&self, id: &str, d: Desired) -> Result<(grpc::Vm, u64), Status> {
        check_id(id)?;
        let (rev, applied) = self
            .store
            .write(Command::SetDesired {
                id: id.to_string(),
                desired: d,
            })
            .await
            .map_err(store_status)?;
        let rec = applied
            .vm
            .ok_or_else(|| Status::internal("the change was applied without a VM record"))?;
        Ok((self.vm(&rec), rev))
    }
}

#[tonic::async_trait]
impl VmService for Api {
    async fn create(
        &self,
        request: Request<grpc::CreateVmRequest>,
    ) -> Result<Response<grpc::Vm>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let name = req
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let r = Api::create(self, req).await;
        let (target, rev) = match &r {
            Ok((vm, rev)) => (vm.id.clone(), *rev),
            Err(_) => (name, 0),
        };
        self.audit("Create", peer, &target, &r, rev);
        self.done("Create", &r);
        r.map(|(vm, _)| Response::new(vm))
    }

    async fn get(
        &self,
        request: Request<grpc::GetVmRequest>,
    ) -> Result<Response<grpc::Vm>, Status> {
        let r = match self.store.linearize().await {
            Ok(()) => match self.get_record(&request.get_ref().id) {
                Ok(rec) => Ok(self.vms(vec![rec]).await.remove(0)),
                Err(e) => Err(e),
            },
            Err(e) => Err(store_status(e)),
        };
        self.done("Get", &r);
        r.map(Response::new)
    }

    async fn list(
        &self,
        request: Request<grpc::ListVmsRequest>,
    ) -> Result<Response<grpc::ListVmsResponse>, Status> {
        let sel = &request.get_ref().label_selector;
        if let Err(e) = self.store.linearize().await {
            let s = store_status(e);
            self.done::<()>("List", &Err(s.clone()));
            return Err(s);
        }
        let recs: Vec<VmRecord> = self.store.read(|s| {
            s.vms
                .values()
                .filter(|v| sel.iter().all(|(k, val)| v.spec.labels.get(k) == Some(val)))
                .cloned()
                .collect()
        });
        let r = Ok(grpc::ListVmsResponse {
            vms: self.vms(recs).await,
        });
        self.done("List", &r);
        r.map(Response::new)
    }

    async fn stop(
        &self,
        request: Request<grpc::StopVmRequest>,
    ) -> Result<Response<grpc::Vm>, Status> {
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let r = self.set_desired(&id, Desired::Stopped).await;
        let rev = r.as_ref().map_or(0, |(_, rev)| *rev);
        self.audit("Stop", peer, &id, &r, rev);
        self.done("Stop", &r);
        r.map(|(vm, _)| Response::new(vm))
    }

    async fn delete(
        &self,
        request: Request<grpc::DeleteVmRequest>,
    ) -> Result<Response<grpc::DeleteVmResponse>, Status> {
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let r = match check_id(&id) {
            Err(e) => Err(e),
            Ok(()) => self
                .store
                .write(Command::DeleteVm { id: id.clone() })
                .await
                .map_err(store_status),
        };
        let rev = r.as_ref().map_or(0, |(rev, _)| *rev);
        self.audit("Delete", peer, &id, &r, rev);
        self.done("Delete", &r);
        r.map(|_| Response::new(grpc::DeleteVmResponse {}))
    }

    type WatchStream = Stream_<grpc::VmEvent>;

    async fn watch(
        &self,
        request: Request<grpc::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().id;
        let rx = self.agent.subscribe();
        let remote = self.remote_events();
        let initial: Vec<VmRecord> = if id.is_empty() {
            self.store.read(|s| s.vms.values().cloned().collect())
        } else {
            match self.get_record(&id) {
                Ok(r) => vec![r],
                Err(e) => {
                    self.done::<()>("Watch", &Err(e.clone()));
                    return Err(e);
                }
            }
        };
        let first: Vec<grpc::VmEvent> = self
            .vms(initial)
            .await
            .into_iter()
            .map(|vm| {
                let st = vm.status.unwrap_or_default();
                grpc::VmEvent {
                    seq: 0,
                    time_ms: crate::now_ms(),
                    vm_id: vm.id,
                    kind: "current".into(),
                    state: st.state,
                    message: st.message,
                    node: st.node,
                }
            })
            .collect();
        let filter = id.clone();
        // This node agent's events, and those of VMs on other nodes (from
        // heartbeats on the leader, relayed from the leader elsewhere).
        let me = self.agent.node_id().to_string();
        let mine = me.clone();
        let own = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |ev| {
            ev.map(|mut ev| {
                ev.node = mine.clone();
                ev
            })
        });
        let others = tokio_stream::wrappers::BroadcastStream::new(remote)
            .filter(move |ev| !matches!(ev, Ok(ev) if ev.node == me));
        let live = own.merge(others).filter_map(move |ev| match ev {
            Ok(ev) if filter.is_empty() || ev.vm_id == filter => Some(Ok(ev)),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => Some(Err(
                Status::data_loss(format!("the watcher fell {n} events behind; watch again")),
            )),
        });
        let s = tokio_stream::iter(first.into_iter().map(Ok)).chain(live);
        self.done::<()>("Watch", &Ok(()));
        Ok(Response::new(Box::pin(s)))
    }

    type LogsStream = Stream_<grpc::LogChunk>;

    async fn logs(
        &self,
        request: Request<grpc::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = self.do_logs(request).await;
        self.done("Logs", &r);
        r.map(Response::new)
    }

    async fn exec(
        &self,
        request: Request<grpc::ExecRequest>,
    ) -> Result<Response<grpc::ExecResponse>, Status> {
        let r = self.do_exec(request).await;
        self.done("Exec", &r);
        r.map(Response::new)
    }

    async fn attest(
        &self,
        request: Request<grpc::AttestRequest>,
    ) -> Result<Response<grpc::AttestResponse>, Status> {
        let r = self.do_attest(request).await;
        self.done("Attest", &r);
        r.map(Response::new)
    }
}

impl Api {
    fn node_list(&self) -> Vec<grpc::Node> {
        self.store.read(|s| {
            s.nodes
                .values()
                .map(|n| {
                    let (used, count) = s.allocated(&n.id);
                    grpc::Node {
                        id: n.id.clone(),
                        address: n.address.clone(),
                        zone: n.zone.clone(),
                        region: n.region.clone(),
                        capacity: Some(grpc::Resources {
                            vcpus: n.capacity.vcpus,
                            memory_mib: n.capacity.memory_mib,
                        }),
                        allocated: Some(grpc::Resources {
                            vcpus: used.vcpus,
                            memory_mib: used.memory_mib,
                        }),
                        state: n.state.as_str().to_string(),
                        last_heartbeat_ms: self
                            .liveness
                            .as_ref()
                            .and_then(|l| l.last_heard_ms(&n.id))
                            .map_or(0, |ago| crate::now_ms().saturating_sub(ago)),
                        cpu_overcommit: n.cpu_overcommit,
                        memory_overcommit: n.memory_overcommit,
                        vms: count,
                        labels: n.labels.clone().into_iter().collect(),
                        drained: n.drained,
                    }
                })
                .collect()
        })
    }
}

/// Checks a registration request and makes the node record of an agent on
/// another host: state ready, the [`REMOTE_LABEL`] label.
pub fn node_record(n: grpc::Node) -> Result<NodeRecord, Status> {
    if !crate::spec::is_dns_label(&n.id) {
        return Err(Status::invalid_argument(format!(
            "node.id: {:?} is not a node name (1-63 of a-z 0-9 -)",
            n.id
        )));
    }
    let cap = n.capacity.unwrap_or_default();
    if cap.vcpus == 0 || cap.memory_mib == 0 {
        return Err(Status::invalid_argument(
            "node.capacity: vcpus and memory_mib must be 1 or more",
        ));
    }
    for (what, r) in [
        ("cpu_overcommit", n.cpu_overcommit),
        ("memory_overcommit", n.memory_overcommit),
    ] {
        if !r.is_finite() || !(1.0..=1_000_000.0).contains(&r) {
            return Err(Status::invalid_argument(format!(
                "node.{what}: {r} is not a ratio from 1 to 1000000"
            )));
        }
    }
    for (k, v) in [("zone", &n.zone), ("region", &n.region)] {
        if v.is_empty() || v.len() > 63 || v.chars().any(|c| c.is_control() || c == ' ') {
            return Err(Status::invalid_argument(format!(
                "node.{k}: {v:?} must be 1-63 printable characters without spaces"
            )));
        }
    }
    let mut labels: std::collections::BTreeMap<String, String> = n.labels.into_iter().collect();
    if labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > 253 || v.len() > 253)
    {
        return Err(Status::invalid_argument(
            "node.labels: keys must be 1-253 bytes, values at most 253",
        ));
    }
    labels.insert(REMOTE_LABEL.into(), REMOTE_VALUE.into());
    Ok(NodeRecord {
        id: n.id,
        address: n.address,
        zone: n.zone,
        region: n.region,
        capacity: Resources {
            vcpus: cap.vcpus,
            memory_mib: cap.memory_mib,
        },
        cpu_overcommit: n.cpu_overcommit,
        memory_overcommit: n.memory_overcommit,
        state: NodeState::Ready,
        labels,
        drained: false,
    })
}

impl Api {
    /// Registration requires a node attestation passed on this member
    /// (`AdmissionService`; the default, off with `--allow-unattested-nodes`).
    pub fn with_admission(mut self, a: crate::node::admission::AdmissionApi) -> Self {
        self.admission = Some(a);
        self
    }

    /// Admits a node agent on another host and registers its node
    /// (`NodeService.Register`): the one path every registration takes.
    /// Admission checks (the peer's TLS identity, the node's attestation)
    /// belong here, before the record is committed. Registering again (after
    /// a restart, or after being marked down and fencing itself) sets the
    /// node ready; a drain is kept.
    pub async fn admit_and_register(
        &self,
        peer: Option<SocketAddr>,
        node: grpc::Node,
    ) -> Result<(u64, grpc::Node), Status> {
        let _ = peer;
        let rec = node_record(node)?;
        let id = rec.id.clone();
        if let Some(a) = &self.admission {
            a.require_admitted(&id)?;
        }
        let embedded = self.store.read(|s| {
            s.nodes.get(&id).is_some_and(|n| {
                n.labels.get(REMOTE_LABEL).map(String::as_str) != Some(REMOTE_VALUE)
            })
        });
        if embedded {
            return Err(Status::already_exists(format!(
                "node {id:?} is the node of a control-plane member; pick another --node-name"
            )));
        }
        let (rev, node, _) = self.node_write(&id, Command::PutNode { node: rec }).await?;
        if let Some(l) = &self.liveness {
            l.heartbeat(&id, Default::default());
        }
        Ok((rev, node))
    }

    /// One heartbeat of a node agent on another host (on the leader).
    /// `member`: the member id a member's own agent sends (metadata
    /// `cell0-member`); `None` from a `cell0d node` agent.
    async fn do_heartbeat(
        &self,
        req: grpc::HeartbeatRequest,
        member: Option<u64>,
    ) -> Result<grpc::HeartbeatResponse, Status> {
        let Some(l) = &self.liveness else {
            return Err(Status::unimplemented(
                "this cell0d watches no node heartbeats",
            ));
        };
        let st = self.store.status();
        if st.state != "leader" {
            let leader = st.leader_addr.unwrap_or_default();
            let mut s = Status::failed_precondition(format!(
                "member {} is not the Raft leader; heartbeats go to the leader ({})",
                st.node_id,
                if leader.is_empty() {
                    "not known yet"
                } else {
                    &leader
                }
            ));
            if let Ok(v) = leader.parse() {
                s.metadata_mut().insert("cell0-leader", v);
            }
            return Err(s);
        }
        // The answer renews the agent's lease, so this member must still lead
        // after the heartbeat arrived: a quorum confirms it (a leader cut off
        // from the others, already replaced, must not keep an agent running).
        let confirmed = self.store.linearize().await.is_ok() && {
            let now = self.store.status();
            now.state == "leader" && now.term == st.term
        };
        if !confirmed {
            return Err(Status::unavailable(format!(
                "member {} could not confirm it still leads (term {})",
                st.node_id, st.term
            )));
        }
        let id = req.id;
        let (owner, state, revision, placements, handoffs, revoked) = self
            .store
            .read(|s| {
                let n = s.nodes.get(&id)?;
                let owner = match n.labels.get(REMOTE_LABEL).map(String::as_str) {
                    Some(REMOTE_VALUE) => Some(None),
                    Some(crate::node::liveness::MEMBER_VALUE) => {
                        crate::node::liveness::member_of(n).map(Some)
                    }
                    // A member's node from before it was watched (registered
                    // while the member was alone): it registers again with
                    // the labels right after this.
                    None if member.is_some() => Some(member),
                    _ => None,
                };
                let mine: Vec<&VmRecord> = s.vms.values().filter(|v| v.node == id).collect();
                let version = placement_version(&mine, n.state);
                let json = (req.revision != version).then(|| serde_json::to_vec(&mine));
                // With the placements as they are now, the node reports what
                // it still runs: the handoffs from it of VMs it no longer
                // runs can end.
                let handoffs: Vec<(String, u64)> = match req.revision == version {
                    true => s
                        .vms
                        .values()
                        .filter(|v| v.handoff.as_ref().is_some_and(|h| h.from == id))
                        .filter(|v| !req.vms.contains_key(&v.id))
                        .map(|v| (v.id.clone(), v.epoch))
                        .collect(),
                    false => Vec::new(),
                };
                let revocations_version = crate::tls::revocations_version(s.revoked.len());
                let revocations: Vec<grpc::Revocation> =
                    match req.revocations_version == revocations_version {
                        true => Vec::new(),
                        false => s.revoked.values().map(grpc::Revocation::from).collect(),
                    };
                Some((
                    owner,
                    n.state,
                    version,
                    json,
                    handoffs,
                    (revocations_version, revocations),
                ))
            })
            .ok_or_else(|| Status::not_found(format!("no node named {id:?}; register it first")))?;
        // A `cell0d node` agent heartbeats for a `remote` node, a member's
        // own agent for its own node only.
        if owner != Some(member) {
            return Err(Status::already_exists(format!(
                "node {id:?} is the node of a control-plane member, not of a `cell0d node` agent; \
                 pick another --node-name"
            )));
        }
        if let Some(m) = member {
            if !self.store.status().members.contains_key(&m) {
                return Err(Status::permission_denied(format!(
                    "member {m} was removed from the cluster: its node {id:?} takes no VMs"
                )));
            }
        }
        for (vm, epoch) in handoffs {
            l.handoff_gone(&vm, epoch);
        }
        self.report_changes(&id, &req.vms);
        l.heartbeat(&id, req.vms.into_iter().collect());
        let (json, has) = match placements {
            Some(Ok(j)) => (j, true),
            Some(Err(e)) => return Err(Status::internal(format!("cannot encode placements: {e}"))),
            None => (Vec::new(), false),
        };
        Ok(grpc::HeartbeatResponse {
            state: state.as_str().to_string(),
            revision,
            placements_json: json,
            has_placements: has,
            revocations_version: revoked.0,
            revocations: revoked.1,
        })
    }
}

/// The gRPC metadata a member's own node agent sends its member id in, with
/// its heartbeats.
pub const MEMBER_HEADER: &str = "cell0-member";

/// A version of a node's placements: a hash of the (id, revision) of every VM
/// placed on it and of the node's state. Nonzero, so that 0 asks for them.
fn placement_version(vms: &[&VmRecord], state: NodeState) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vms
        .iter()
        .flat_map(|v| v.id.bytes().chain(v.revision.to_le_bytes()).chain([0]))
        .chain([state as u8])
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

#[tonic::async_trait]
impl NodeService for Api {
    async fn register(
        &self,
        request: Request<grpc::RegisterNodeRequest>,
    ) -> Result<Response<grpc::Node>, Status> {
        let peer = request.remote_addr();
        // With mutual TLS a node registers only under its certificate's name.
        let cert = match request.get_ref().node.as_ref() {
            Some(n) => crate::node::admission::check_cert_name(&request, &n.id),
            None => Ok(()),
        };
        let node = request.into_inner().node;
        let id = node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
        let r = match node {
            Some(n) => match cert {
                Ok(()) => self.admit_and_register(peer, n).await,
                Err(s) => Err(s),
            },
            None => Err(Status::invalid_argument("node: must be set")),
        };
        let rev = r.as_ref().map_or(0, |(rev, _)| *rev);
        self.audit("NodeRegister", peer, &id, &r, rev);
        self.done("NodeRegister", &r);
        r.map(|(_, n)| Response::new(n))
    }

    async fn heartbeat(
        &self,
        request: Request<grpc::HeartbeatRequest>,
    ) -> Result<Response<grpc::HeartbeatResponse>, Status> {
        // Over TLS a node certificate heartbeats only for its own node.
        crate::tls::require_own_node(&request, &request.get_ref().id)?;
        let member = request
            .metadata()
            .get(MEMBER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let r = self.do_heartbeat(request.into_inner(), member).await;
        self.done("NodeHeartbeat", &r);
        r.map(Response::new)
    }

    async fn list(
        &self,
        _r: Request<grpc::ListNodesRequest>,
    ) -> Result<Response<grpc::ListNodesResponse>, Status> {
        let r = match self.store.linearize().await {
            Ok(()) => Ok(grpc::ListNodesResponse {
                nodes: self.node_list(),
            }),
            Err(e) => Err(store_status(e)),
        };
        self.done("NodeList", &r);
        r.map(Response::new)
    }

    async fn drain(
        &self,
        request: Request<grpc::DrainNodeRequest>,
    ) -> Result<Response<grpc::DrainNodeResponse>, Status> {
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let r = self
            .node_write(&id, Command::DrainNode { id: id.clone() })
            .await;
        let rev = r.as_ref().map_or(0, |(rev, _, _)| *rev);
        self.audit("NodeDrain", peer, &id, &r, rev);
        self.done("NodeDrain", &r);
        r.map(|(_, node, applied)| {
            let ev = applied.evacuation.unwrap_or_default();
            Response::new(grpc::DrainNodeResponse {
                node: Some(node),
                moved: ev
                    .moved
                    .into_iter()
                    .map(|m| grpc::MovedVm {
                        id: m.id,
                        from: m.from,
                        to: m.to,
                    })
                    .collect(),
                stayed: ev
                    .stayed
                    .into_iter()
                    .map(|s| grpc::StayedVm {
                        id: s.id,
                        reason: s.reason,
                    })
                    .collect(),
            })
        })
    }

    async fn uncordon(
        &self,
        request: Request<grpc::UncordonNodeRequest>,
    ) -> Result<Response<grpc::Node>, Status> {
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let r = self
            .node_write(&id, Command::UncordonNode { id: id.clone() })
            .await;
        let rev = r.as_ref().map_or(0, |(rev, _, _)| *rev);
        self.audit("NodeUncordon", peer, &id, &r, rev);
        self.done("NodeUncordon", &r);
        r.map(|(_, node, _)| Response::new(node))
    }

    async fn vm_statuses(
        &self,
        request: Request<grpc::VmStatusesRequest>,
    ) -> Result<Response<grpc::VmStatusesResponse>, Status> {
        let r = self.do_vm_statuses(request);
        self.done("VmStatuses", &r);
        r.map(Response::new)
    }

    type WatchClusterStream = Stream_<grpc::VmEvent>;

    async fn watch_cluster(
        &self,
        request: Request<grpc::WatchClusterRequest>,
    ) -> Result<Response<Self::WatchClusterStream>, Status> {
        let r = self.do_watch_cluster(request);
        self.done::<()>(
            "WatchCluster",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        r.map(Response::new)
    }
}

impl Api {
    /// Commits a node command; returns the index, the node after it and what
    /// applying it gave.
    async fn node_write(
        &self,
        id: &str,
        cmd: Command,
    ) -> Result<(u64, grpc::Node, crate::store::Applied), Status> {
        if id.is_empty() || id.len() > 253 || id.chars().any(|c| c.is_control()) {
            return Err(Status::invalid_argument(
                "id: must be a node id (see cell0ctl node list)",
            ));
        }
        let (rev, applied) = self.store.write(cmd).await.map_err(store_status)?;
        let node = self
            .node_list()
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| Status::not_found(format!("no node named {id:?}")))?;
        Ok((rev, node, applied))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn good() -> grpc::Node {
        grpc::Node {
            id: "n1".into(),
            zone: "a".into(),
            region: "r".into(),
            capacity: Some(grpc::Resources {
                vcpus: 2,
                memory_mib: 1024,
            }),
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            state: "down".into(),
            drained: true,
            ..Default::default()
        }
    }

    #[test]
    fn registration_is_checked_and_marks_the_node_remote_and_ready() {
        let r = node_record(good()).unwrap();
        assert_eq!(r.state, NodeState::Ready);
        assert!(!r.drained, "a drain is the state machine's to keep");
        assert_eq!(r.labels[REMOTE_LABEL], REMOTE_VALUE);
        let bad: [fn(&mut grpc::Node); 6] = [
            |n| n.id = "Bad Name".into(),
            |n| n.capacity = None,
            |n| n.cpu_overcommit = 0.5,
            |n| n.memory_overcommit = f64::NAN,
            |n| n.zone = String::new(),
            |n| {
                n.labels.insert(String::new(), "x".into());
            },
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut n = good();
            f(&mut n);
            let e = node_record(n).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "case {i}: {e:?}");
        }
    }
}
