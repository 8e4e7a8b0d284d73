// SPDX-License-Identifier: Apache-2.0
//! What a member answers about VMs on other nodes (docs/CLUSTER.md,
//! "Node-local calls"):
//!
//! - **Status.** Runtime status is not replicated: it is on the VM's node,
//!   and the Raft leader holds the last one each node's heartbeat reported.
//!   Get, List and Watch on a member that is not the leader take it from the
//!   leader (`NodeService.VmStatuses`, at most [`STATUS_WAIT`]). When the
//!   leader does not answer, the VM shows its replicated record with the state
//!   `unknown` and "leader unreachable: …".
//! - **Events.** The leader turns the state changes that heartbeats report
//!   into VM events; every other member relays the leader's stream
//!   (`NodeService.WatchCluster`) to its own Watch callers.
//! - **Logs, Exec, Attest** need the VM's own node agent: a member forwards
//!   them, one hop, to the node's API address (a `cell0d node --listen`, or
//!   the member whose own node it is), streaming for `logs --follow`.

// tonic handlers return `tonic::Status` (~176 bytes) by design.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::time::Duration;

use cell0_proto::grpc::{
    self, node_service_client::NodeServiceClient, vm_service_client::VmServiceClient,
};
use tokio_stream::StreamExt;
use tonic::{Request, Status};

use super::{Api, store_status};
use crate::node::local_api::{self, Stream_};
use crate::store::VmRecord;

/// How long Get and List on a member that is not the leader wait for the
/// leader's VM statuses.
pub const STATUS_WAIT: Duration = Duration::from_secs(2);
/// The metadata a member puts on a call it proxies to another member (its
/// id): that member serves it from its own node or refuses; it never
/// forwards it again.
pub const PROXIED: &str = "cell0-proxied";
/// How long a proxied Logs without --follow may take.
const LOGS_WAIT: Duration = Duration::from_secs(60);
/// How long a proxied Attest may take (the first one enrolls the AK).
const ATTEST_WAIT: Duration = Duration::from_secs(120);

/// Where a node-local call for a VM is served.
enum Target {
    /// By this member's own node agent.
    Here(Box<VmRecord>),
    /// By the API of the VM's node at this address.
    There { node: String, addr: String },
}

/// A status from a node's API (or from failing to reach it), named after
/// the node.
fn from_node(node: &str, addr: &str, s: Status) -> Status {
    let detail = crate::tls::describe(&crate::tls::chain(&s));
    let transport = s.code() == tonic::Code::Unavailable
        && (crate::store::network::never_sent(&s)
            || detail.contains("transport error")
            || detail.contains("connect"));
    if transport || (s.code() == tonic::Code::Unknown && detail.contains("transport")) {
        Status::unavailable(format!(
            "node {node:?} is unreachable at its API address {addr}: {detail}"
        ))
    } else if s.code() == tonic::Code::DeadlineExceeded && detail.contains("Timeout expired") {
        Status::deadline_exceeded(format!("node {node:?} at {addr} did not answer in time"))
    } else {
        Status::new(
            s.code(),
            format!("node {node:?} at {addr}: {}", s.message()),
        )
    }
}

/// The status a member that is not the leader shows for VM `rec` on another
/// node, from what the leader answered: its status, else the record's
/// (pending), or `unknown` when the leader did not answer.
/// Whether `rec` is placed on another node than `me` (and not lost): its
/// status comes from the leader.
fn elsewhere(rec: &VmRecord, me: &str) -> bool {
    rec.node != me && rec.lost.is_none()
}

fn remote_status(
    rec: &VmRecord,
    known: &Result<HashMap<String, grpc::VmStatus>, String>,
) -> grpc::VmStatus {
    match known {
        Ok(m) => m
            .get(&rec.id)
            .cloned()
            .unwrap_or_else(|| Api::record_status(rec)),
        Err(e) => grpc::VmStatus {
            state: grpc::VmState::Unspecified as i32,
            message: format!("unknown (leader unreachable: {e})"),
            ..Api::record_status(rec)
        },
    }
}

impl Api {
    /// Where VM `id`'s node-local calls go.
    async fn target<T>(&self, req: &Request<T>, id: &str) -> Result<Target, Status> {
        let rec = self.get_record(id)?;
        let me = self.agent.node_id();
        if rec.node == me {
            return Ok(Target::Here(Box::new(rec)));
        }
        // The VM may have moved: take the placement the leader has.
        self.store.linearize().await.map_err(store_status)?;
        let rec = self.get_record(id)?;
        if rec.node == me {
            return Ok(Target::Here(Box::new(rec)));
        }
        if let Some(from) = req.metadata().get(PROXIED) {
            return Err(Status::failed_precondition(format!(
                "VM {id:?} is on node {:?}, not on node {me:?} of this member (the call was \
                 proxied by member {}; a proxied call is never proxied again)",
                rec.node,
                from.to_str().unwrap_or("?")
            )));
        }
        if rec.node.is_empty() {
            return Err(Status::failed_precondition(format!(
                "VM {id:?} is not placed on any node"
            )));
        }
        let addr = self
            .store
            .read(|s| s.nodes.get(&rec.node).map(|n| n.address.clone()))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "VM {id:?} is placed on node {:?}, which is not registered",
                    rec.node
                ))
            })?;
        if addr.is_empty() {
            return Err(Status::failed_precondition(format!(
                "VM {id:?} runs on node {:?}, which serves no API, so no member can reach its \
                 logs, exec or attestation: start that `cell0d node` with --listen ADDR",
                rec.node
            )));
        }
        Ok(Target::There {
            node: rec.node,
            addr,
        })
    }

    fn node_client(
        &self,
        node: &str,
        addr: &str,
    ) -> Result<VmServiceClient<tonic::transport::Channel>, Status> {
        let ch = self.store.channel(addr).map_err(|e| {
            Status::failed_precondition(format!("node {node:?} has a bad API address: {e}"))
        })?;
        Ok(VmServiceClient::new(ch))
    }

    fn proxied<T>(&self, msg: T, timeout: Option<Duration>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = self.store.node_id().to_string().parse() {
            r.metadata_mut().insert(PROXIED, v);
        }
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        r
    }

    /// VmService.Logs: from this node's run dir, or streamed from the VM's node.
    pub(super) async fn do_logs(
        &self,
        request: Request<grpc::LogsRequest>,
    ) -> Result<Stream_<grpc::LogChunk>, Status> {
        match self.target(&request, &request.get_ref().id).await? {
            Target::Here(rec) => {
                let store = self.store.clone();
                let VmRecord { id, node, .. } = *rec;
                let vm = id.clone();
                local_api::logs(self.agent.clone(), id, request.get_ref(), move || {
                    store.read(|s| s.vms.get(&vm).is_some_and(|v| v.node == node))
                })
            }
            Target::There { node, addr } => {
                let req = request.into_inner();
                let wait = (!req.follow).then_some(LOGS_WAIT);
                let s = self
                    .node_client(&node, &addr)?
                    .logs(self.proxied(req, wait))
                    .await
                    .map_err(|s| from_node(&node, &addr, s))?
                    .into_inner();
                Ok(Box::pin(
                    s.map(move |r| r.map_err(|s| from_node(&node, &addr, s))),
                ))
            }
        }
    }

    /// VmService.Exec: through this node's router, or on the VM's node.
    pub(super) async fn do_exec(
        &self,
        request: Request<grpc::ExecRequest>,
    ) -> Result<grpc::ExecResponse, Status> {
        match self.target(&request, &request.get_ref().id).await? {
            Target::Here(rec) => {
                local_api::exec(&self.agent, &rec, request.into_inner().command).await
            }
            Target::There { node, addr } => {
                let wait = local_api::EXEC_TIMEOUT + Duration::from_secs(20);
                self.node_client(&node, &addr)?
                    .exec(self.proxied(request.into_inner(), Some(wait)))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| from_node(&node, &addr, s))
            }
        }
    }

    /// VmService.Attest: this node's vTPM quote, or the VM's node's.
    pub(super) async fn do_attest(
        &self,
        request: Request<grpc::AttestRequest>,
    ) -> Result<grpc::AttestResponse, Status> {
        match self.target(&request, &request.get_ref().id).await? {
            Target::Here(rec) => local_api::attest(&self.agent, &rec).await,
            Target::There { node, addr } => self
                .node_client(&node, &addr)?
                .attest(self.proxied(request.into_inner(), Some(ATTEST_WAIT)))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| from_node(&node, &addr, s)),
        }
    }

    /// The VMs of `recs` with their runtime status: this member's node
    /// agent's for its own VMs; for the others, what the leader knows (on
    /// the leader: its heartbeat reports).
    pub(super) async fn vms(&self, recs: Vec<VmRecord>) -> Vec<grpc::Vm> {
        let st = self.store.status();
        let me = self.agent.node_id().to_string();
        let ask: Vec<String> = recs
            .iter()
            .filter(|r| elsewhere(r, &me))
            .map(|r| r.id.clone())
            .collect();
        if st.state == "leader" || ask.is_empty() {
            return recs.iter().map(|r| self.vm(r)).collect();
        }
        let known = self.leader_statuses(&st, ask).await;
        recs.iter()
            .map(|r| {
                if !elsewhere(r, &me) {
                    return self.vm(r);
                }
                self.vm_with(r, remote_status(r, &known))
            })
            .collect()
    }

    /// The leader's statuses of VMs `ids` (`NodeService.VmStatuses`).
    async fn leader_statuses(
        &self,
        st: &crate::store::RaftStatus,
        ids: Vec<String>,
    ) -> Result<HashMap<String, grpc::VmStatus>, String> {
        let addr = st
            .leader_addr
            .clone()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| "no Raft leader known".to_string())?;
        let ch = self.store.channel(&addr).map_err(|e| e.to_string())?;
        let mut req = Request::new(grpc::VmStatusesRequest { ids });
        req.set_timeout(STATUS_WAIT);
        match tokio::time::timeout(STATUS_WAIT, NodeServiceClient::new(ch).vm_statuses(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().vms),
            Ok(Err(s)) => Err(format!(
                "member {} at {addr}: {}",
                st.leader.unwrap_or(0),
                crate::tls::describe(&crate::tls::chain(&s))
            )),
            Err(_) => Err(format!(
                "member {} at {addr} did not answer within {STATUS_WAIT:?}",
                st.leader.unwrap_or(0)
            )),
        }
    }

    /// Fails unless this member leads (for the calls between members that
    /// only the leader answers).
    fn require_leader(&self, what: &str) -> Result<u64, Status> {
        let st = self.store.status();
        if st.state == "leader" {
            return Ok(st.term);
        }
        Err(Status::failed_precondition(format!(
            "member {} is not the Raft leader; {what} goes to the leader ({})",
            st.node_id,
            st.leader_addr.as_deref().unwrap_or("not known yet")
        )))
    }

    /// `NodeService.VmStatuses` (between members, on the leader).
    pub(super) fn do_vm_statuses(
        &self,
        request: Request<grpc::VmStatusesRequest>,
    ) -> Result<grpc::VmStatusesResponse, Status> {
        crate::tls::require_role(&request, &[crate::tls::Role::Member], "VmStatuses")?;
        let term = self.require_leader("VmStatuses")?;
        let ids = request.into_inner().ids;
        let recs: Vec<VmRecord> = self
            .store
            .read(|s| ids.iter().filter_map(|id| s.vms.get(id).cloned()).collect());
        let vms = recs
            .iter()
            .filter_map(|r| self.known_status(r).map(|st| (r.id.clone(), st)))
            .collect();
        Ok(grpc::VmStatusesResponse { vms, term })
    }

    /// Turns the state changes in a heartbeat of node `node` into events
    /// (on the leader, before the report replaces the last one).
    pub(super) fn report_changes(&self, node: &str, vms: &HashMap<String, grpc::VmStatus>) {
        let Some(l) = &self.liveness else {
            return;
        };
        for (id, st) in vms {
            let prev = l.status(id, node);
            if prev.as_ref().map(|p| (p.state, p.restarts)) == Some((st.state, st.restarts)) {
                continue;
            }
            let _ = self.events.send(grpc::VmEvent {
                seq: 0,
                time_ms: crate::now_ms(),
                vm_id: id.clone(),
                kind: "state".into(),
                state: st.state,
                message: st.message.clone(),
                node: node.to_string(),
            });
        }
    }

    /// `NodeService.WatchCluster` (between members, on the leader): its own
    /// node agent's events and the state changes heartbeats report.
    pub(super) fn do_watch_cluster(
        &self,
        request: Request<grpc::WatchClusterRequest>,
    ) -> Result<Stream_<grpc::VmEvent>, Status> {
        crate::tls::require_role(&request, &[crate::tls::Role::Member], "WatchCluster")?;
        self.require_leader("WatchCluster")?;
        let me = self.agent.node_id().to_string();
        let mine = me.clone();
        let own =
            tokio_stream::wrappers::BroadcastStream::new(self.agent.subscribe()).map(move |ev| {
                ev.map(|mut ev| {
                    ev.node = mine.clone();
                    ev
                })
            });
        // A member's own agent may heartbeat too: its events come once.
        let reported = tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe())
            .filter(move |ev| !matches!(ev, Ok(ev) if ev.node == me));
        let s = own.merge(reported).map(|ev| {
            ev.map_err(|e| Status::data_loss(format!("the relay fell behind ({e}); watch again")))
        });
        Ok(Box::pin(s))
    }

    /// The events of VMs on other nodes; starts the relay of the leader's
    /// events the first time.
    pub(super) fn remote_events(&self) -> tokio::sync::broadcast::Receiver<grpc::VmEvent> {
        let rx = self.events.subscribe();
        self.relay.get_or_init(|| {
            let api = self.clone();
            tokio::spawn(async move { api.relay().await });
        });
        rx
    }

    /// While this member is not the leader, relays the leader's
    /// `WatchCluster` stream into [`Api::remote_events`]; follows leader
    /// changes. Each time a stream opens it sends the current states too
    /// ([`Api::resync_remote`]), so what changed while none was open (during
    /// a change of leader, a partition, or before the first) is not lost.
    async fn relay(self) {
        loop {
            let st = self.store.status();
            if let (false, Some(leader), Some(addr)) =
                (st.state == "leader", st.leader, st.leader_addr)
            {
                if let Err(e) = self.relay_from(leader, &addr).await {
                    tracing::debug!(leader, %addr, error = %e, "relay of the leader's VM events ended");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn relay_from(&self, leader: u64, addr: &str) -> Result<(), String> {
        let ch = self.store.channel(addr).map_err(|e| e.to_string())?;
        let mut s = NodeServiceClient::new(ch)
            .watch_cluster(grpc::WatchClusterRequest {})
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        let me = self.agent.node_id().to_string();
        // The stream is open before the states are read, so every change is
        // in the one or the other, and the last event of each VM (the
        // stream's come after the states) gives its newest state.
        self.resync_remote(&me).await;
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                m = s.message() => match m {
                    Ok(Some(ev)) if ev.node != me => {
                        let _ = self.events.send(ev);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.message().to_string()),
                },
                _ = check.tick() => {
                    if self.store.status().leader != Some(leader) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sends, as `current` events, the leader's statuses of the VMs placed on
    /// other nodes than `me` (those it knows: a new leader learns them from
    /// the next heartbeats, which its stream then carries as `state` events).
    async fn resync_remote(&self, me: &str) {
        let nodes: HashMap<String, String> = self.store.read(|s| {
            s.vms
                .values()
                .filter(|r| elsewhere(r, me))
                .map(|r| (r.id.clone(), r.node.clone()))
                .collect()
        });
        if nodes.is_empty() {
            return;
        }
        let st = self.store.status();
        let known = match self
            .leader_statuses(&st, nodes.keys().cloned().collect())
            .await
        {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(error = %e, "no current states to resend after the relay (re)connected");
                return;
            }
        };
        for (id, vs) in known {
            let Some(node) = nodes.get(&id) else { continue };
            let _ = self.events.send(grpc::VmEvent {
                seq: 0,
                time_ms: crate::now_ms(),
                vm_id: id,
                kind: "current".into(),
                state: vs.state,
                message: vs.message,
                node: node.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(id: &str) -> VmRecord {
        let spec = crate::spec::VmSpec::from_proto(
            grpc::VmSpec {
                name: id.into(),
                ..Default::default()
            },
            id,
        )
        .unwrap();
        serde_json::from_value(serde_json::json!({
            "id": id, "spec": spec, "node": "n1", "desired": "running",
            "created_at_ms": 1, "revision": 1, "cid": 7,
        }))
        .unwrap()
    }

    #[test]
    fn a_remote_vm_shows_the_leaders_status_else_its_record_else_unknown() {
        let running = grpc::VmStatus {
            state: grpc::VmState::Running as i32,
            node: "n1".into(),
            pid: 42,
            ..Default::default()
        };
        let known = Ok(HashMap::from([("a".to_string(), running.clone())]));
        assert_eq!(remote_status(&rec("a"), &known), running);
        let pending = remote_status(&rec("b"), &known);
        assert_eq!(pending.state, grpc::VmState::Pending as i32);
        assert_eq!((pending.node.as_str(), pending.vsock_cid), ("n1", 7));
        let gone = remote_status(&rec("a"), &Err("member 1 at 10.0.0.1:7070: refused".into()));
        assert_eq!(gone.state, grpc::VmState::Unspecified as i32);
        assert_eq!(
            gone.message,
            "unknown (leader unreachable: member 1 at 10.0.0.1:7070: refused)"
        );
        assert_eq!((gone.node.as_str(), gone.exit_code), ("n1", -1));
    }

    #[test]
    fn a_node_that_cannot_be_reached_is_unavailable_with_its_address() {
        let s = from_node(
            "na",
            "127.0.0.1:9",
            Status::unavailable("tcp connect error: Connection refused (os error 111)"),
        );
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message()
                .starts_with("node \"na\" is unreachable at its API address 127.0.0.1:9"),
            "{}",
            s.message()
        );
        let s = from_node(
            "na",
            "127.0.0.1:9",
            Status::not_found("node \"na\" runs no VM named \"x\""),
        );
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(
            s.message(),
            "node \"na\" at 127.0.0.1:9: node \"na\" runs no VM named \"x\""
        );
    }
}
