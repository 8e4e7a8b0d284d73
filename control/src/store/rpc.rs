// SPDX-License-Identifier: Apache-2.0
//! The server side of Raft between members (`RaftService`) and the
//! `ClusterService` API (status, add and remove members).
//!
//! `Forward` is how a member that is not the leader hands the leader a write,
//! a membership change or a read-index request; the leader serves it itself
//! and never forwards again, so a request makes at most one hop.

// tonic handlers return `tonic::Status` (~176 bytes) by design.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;

use cell0_proto::grpc::{self, RaftPayload, cluster_service_server::ClusterService};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};
use tonic::{Code, Request, Response, Status};

use super::network::{decode, encode};
use super::{Applied, Command, NodeId, RaftStatus, Store, StoreError, TypeConfig};
use crate::audit::AuditLog;
use crate::metrics::Metrics;

/// A request handed to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forwarded {
    /// A client write.
    Write(Command),
    /// Add a learner, then promote it.
    AddMember {
        /// Member id.
        id: NodeId,
        /// Its gRPC address.
        addr: String,
    },
    /// Remove a member.
    RemoveMember {
        /// Member id.
        id: NodeId,
    },
    /// The leader's read index, for a linearizable read on a follower.
    ReadIndex,
}

/// The leader's answer to a [`Forwarded`] request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    /// The write is committed and applied at `index`.
    Written {
        /// Log index.
        index: u64,
        /// What applying it gave.
        applied: Box<Applied>,
    },
    /// The membership change is committed; the leader's view after it.
    Status(Box<RaftStatus>),
    /// Read at or after this index.
    ReadIndex {
        /// The index.
        index: u64,
    },
    /// The receiver is not (or no longer) the leader; nothing was done.
    NotLeader,
    /// The request was refused or failed; nothing was applied.
    Failed(String),
    /// The request names a bad member.
    Invalid(String),
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("bad Raft message: {e}"))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    encode(v)
        .map(Response::new)
        .map_err(|e| Status::internal(e.to_string()))
}

/// `RaftService`: the Raft RPCs of this member.
#[derive(Clone)]
pub struct RaftRpc {
    store: Store,
}

impl RaftRpc {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    async fn forwarded(&self, req: Forwarded) -> ForwardReply {
        let s = &self.store;
        match req {
            Forwarded::Write(cmd) => match s.raft.client_write(cmd).await {
                Ok(r) => ForwardReply::Written {
                    index: r.log_id.index,
                    applied: Box::new(r.data),
                },
                Err(e) if e.forward_to_leader::<super::Node>().is_some() => ForwardReply::NotLeader,
                Err(e) => ForwardReply::Failed(e.to_string()),
            },
            Forwarded::ReadIndex => match s.raft.get_read_log_id().await {
                Ok((read, _)) => ForwardReply::ReadIndex {
                    index: read.map_or(0, |l| l.index),
                },
                Err(e) if e.forward_to_leader::<super::Node>().is_some() => ForwardReply::NotLeader,
                Err(e) => ForwardReply::Failed(e.to_string()),
            },
            req @ (Forwarded::AddMember { .. } | Forwarded::RemoveMember { .. }) => {
                if !s.is_leader() {
                    return ForwardReply::NotLeader;
                }
                match s.change_membership_here(&req).await {
                    Ok(st) => ForwardReply::Status(Box::new(st)),
                    Err(StoreError::NoLeader(_)) => ForwardReply::NotLeader,
                    Err(StoreError::InvalidMember(m)) => ForwardReply::Invalid(m),
                    Err(e) => ForwardReply::Failed(e.to_string()),
                }
            }
        }
    }
}

#[tonic::async_trait]
impl grpc::raft_service_server::RaftService for RaftRpc {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(request.get_ref()).map_err(bad)?;
        reply(&self.store.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad)?;
        reply(&self.store.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref()).map_err(bad)?;
        reply(&self.store.raft.install_snapshot(req).await)
    }

    async fn forward(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: Forwarded = decode(request.get_ref()).map_err(bad)?;
        reply(&self.forwarded(req).await)
    }
}

/// `ClusterService`: the control plane's own membership.
#[derive(Clone)]
pub struct ClusterApi {
    store: Store,
    metrics: Arc<Metrics>,
    audit: Arc<AuditLog>,
    /// This member's own certificate serial (mutual TLS), which it refuses
    /// to revoke.
    own_serial: Option<String>,
    /// Set when this member runs as the one-member default (started with
    /// none of --init, --join, --peers): its own node sends no heartbeats and
    /// is not watched, so it must not grow into a cluster.
    alone: Arc<std::sync::atomic::AtomicBool>,
}

/// The gRPC status for a store error of a cluster call.
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::InvalidMember(m) => Status::invalid_argument(m),
        StoreError::Membership(m) => Status::failed_precondition(m),
        e => Status::unavailable(format!("the membership change did not happen: {e}")),
    }
}

/// The API form of a [`RaftStatus`].
pub fn to_proto(st: RaftStatus, vms: u64, nodes: u64) -> grpc::ClusterStatus {
    grpc::ClusterStatus {
        node_id: st.node_id,
        leader_id: st.leader.unwrap_or(0),
        term: st.term,
        last_log_index: st.last_log_index,
        last_applied: st.last_applied,
        snapshot_index: st.snapshot_index,
        members: st
            .members
            .into_iter()
            .map(|(id, (address, voter))| grpc::Member { id, address, voter })
            .collect(),
        state: st.state,
        vms,
        nodes,
        purged_index: st.purged_index,
        leader_address: st.leader_addr.unwrap_or_default(),
    }
}

impl ClusterApi {
    /// The service over `store`.
    pub fn new(store: Store, metrics: Arc<Metrics>, audit: Arc<AuditLog>) -> Self {
        Self {
            store,
            metrics,
            audit,
            own_serial: None,
            alone: Default::default(),
        }
    }

    /// Over mutual TLS: this member's certificate serial, which
    /// `RevokeCert` refuses.
    pub fn with_own_serial(mut self, serial: Option<String>) -> Self {
        self.own_serial = serial;
        self
    }

    /// The flag the member sets when its node runs unwatched (the one-member
    /// default), which makes AddMember refuse.
    pub fn alone_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.alone.clone()
    }

    fn revocations(&self) -> grpc::RevocationList {
        self.store.read(|s| grpc::RevocationList {
            revocations: s.revoked.values().map(grpc::Revocation::from).collect(),
        })
    }

    async fn revoke(
        &self,
        caller: Option<crate::tls::CertId>,
        peer: Option<SocketAddr>,
        req: grpc::RevokeCertRequest,
    ) -> Result<(u64, grpc::RevocationList), Status> {
        let serial = crate::tls::normalize_serial(&req.serial)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.own_serial.as_deref() == Some(serial.as_str()) {
            return Err(Status::failed_precondition(format!(
                "serial {serial} is the certificate of member {} itself, which would cut it off from the other members; remove the member first (cluster remove), then revoke its certificate through another member",
                self.store.node_id()
            )));
        }
        if let Some(c) = caller.as_ref().filter(|c| c.serial == serial) {
            return Err(Status::failed_precondition(format!(
                "serial {serial} is the certificate of this request ({:?}); revoke it with another certificate",
                c.name
            )));
        }
        if req.name.len() > 256 || req.reason.len() > 1024 {
            return Err(Status::invalid_argument(
                "name (256) or reason (1024 bytes) is too long",
            ));
        }
        let revocation = crate::tls::Revocation {
            serial,
            name: req.name,
            reason: req.reason,
            revoked_at_ms: crate::now_ms(),
            revoked_by: caller.map_or_else(
                || peer.map(|p| p.to_string()).unwrap_or_default(),
                |c| c.name,
            ),
        };
        let (index, _) = self
            .store
            .write(Command::RevokeCert { revocation })
            .await
            .map_err(|e| Status::unavailable(format!("the revocation was not committed: {e}")))?;
        // On a follower the leader applied it first: read it back here.
        self.store.linearize().await.map_err(|e| {
            Status::unavailable(format!(
                "the revocation is committed (index {index}) but this member cannot read it back yet: {e}"
            ))
        })?;
        Ok((index, self.revocations()))
    }

    fn counts(&self) -> (u64, u64) {
        self.store
            .read(|s| (s.vms.len() as u64, s.nodes.len() as u64))
    }

    fn finish(
        &self,
        method: &str,
        peer: Option<SocketAddr>,
        target: &str,
        r: Result<RaftStatus, Status>,
    ) -> Result<Response<grpc::ClusterStatus>, Status> {
        let revision = r.as_ref().map_or(0, |s| s.last_applied);
        self.audit
            .record_outcome(method, peer, target, &r, revision);
        let code = r.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.api(method, code);
        let (vms, nodes) = self.counts();
        r.map(|st| Response::new(to_proto(st, vms, nodes)))
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        _r: Request<grpc::ClusterStatusRequest>,
    ) -> Result<Response<grpc::ClusterStatus>, Status> {
        let (vms, nodes) = self.counts();
        let st = to_proto(self.store.status(), vms, nodes);
        self.metrics.api("ClusterStatus", Code::Ok);
        Ok(Response::new(st))
    }

    async fn add_member(
        &self,
        request: Request<grpc::AddMemberRequest>,
    ) -> Result<Response<grpc::ClusterStatus>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let r = if self.alone.load(std::sync::atomic::Ordering::Relaxed) {
            Err(Status::failed_precondition(
                "this member was started as a one-member control plane (none of --init, \
                 --join, --peers): its own node is not watched by heartbeats, so it cannot \
                 grow into a cluster; restart it with --init (same data dir and flags), then \
                 add members (docs/CLUSTER.md, Forming a cluster)",
            ))
        } else {
            self.store
                .add_member(req.id, &req.address)
                .await
                .map_err(status_of)
        };
        self.finish("AddMember", peer, &format!("member-{}", req.id), r)
    }

    async fn remove_member(
        &self,
        request: Request<grpc::RemoveMemberRequest>,
    ) -> Result<Response<grpc::ClusterStatus>, Status> {
        let peer = request.remote_addr();
        let id = request.into_inner().id;
        let r = self.store.remove_member(id).await;
        if r.is_ok() {
            // Its own node takes no more VMs: drained, its restartable VMs
            // handed off to other nodes (the leader's monitor does the same
            // if this write fails). The member's heartbeats are refused from
            // now on: it terminates its VMs, and its node goes down when its
            // deadline passes, which ends the handoffs.
            let nodes: Vec<String> = self.store.read(|s| {
                s.nodes
                    .values()
                    .filter(|n| !n.drained && n.state != super::state::NodeState::Down)
                    .filter(|n| crate::node::liveness::member_of(n) == Some(id))
                    .map(|n| n.id.clone())
                    .collect()
            });
            for node in nodes {
                let drain = super::state::Command::DrainNode { id: node.clone() };
                if let Err(e) = self.store.write(drain).await {
                    tracing::warn!(%node, member = id, error = %e, "cannot drain the removed member's node");
                }
            }
        }
        self.finish(
            "RemoveMember",
            peer,
            &format!("member-{id}"),
            r.map_err(status_of),
        )
    }

    async fn revoke_cert(
        &self,
        request: Request<grpc::RevokeCertRequest>,
    ) -> Result<Response<grpc::RevocationList>, Status> {
        let peer = request.remote_addr();
        let caller = crate::tls::peer_cert(&request);
        let req = request.into_inner();
        let target = format!("cert/{}", req.serial.trim());
        let r = self.revoke(caller, peer, req).await;
        let index = r.as_ref().map_or(0, |(i, _)| *i);
        self.audit
            .record_outcome("RevokeCert", peer, &target, &r, index);
        let code = r.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.api("RevokeCert", code);
        if r.is_ok() {
            tracing::warn!(%target, "certificate revoked: every member refuses it from now on");
        }
        r.map(|(_, l)| Response::new(l))
    }

    async fn list_revocations(
        &self,
        _r: Request<grpc::ListRevocationsRequest>,
    ) -> Result<Response<grpc::RevocationList>, Status> {
        let r = match self.store.linearize().await {
            Ok(()) => Ok(self.revocations()),
            Err(e) => Err(Status::unavailable(format!(
                "cannot read the revocation list: {e}"
            ))),
        };
        self.metrics.api(
            "ListRevocations",
            r.as_ref().map_or_else(Status::code, |_| Code::Ok),
        );
        r.map(Response::new)
    }
}
