// SPDX-License-Identifier: Apache-2.0
//! Raft RPCs between members. The single-host control plane (issue 6) is a
//! one-member cluster and never sends one; a transport between members
//! (gRPC, mutual TLS) is issue 7's. Until then every RPC reports the peer
//! unreachable, so a misconfigured multi-member cluster fails loudly.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{Node, NodeId, TypeConfig};

/// Why a peer is unreachable.
#[derive(Debug, thiserror::Error)]
#[error("Raft RPCs between members are not implemented yet (issue 7): node {0} is unreachable")]
pub struct NoTransport(NodeId);

/// The network factory.
pub struct Network;

/// A client for one peer.
pub struct Peer(NodeId);

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> Peer {
        Peer(target)
    }
}

fn unreachable<E: std::error::Error>(id: NodeId) -> RPCError<NodeId, Node, E> {
    RPCError::Unreachable(Unreachable::new(&NoTransport(id)))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        Err(unreachable(self.0))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable(self.0))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        Err(unreachable(self.0))
    }
}
