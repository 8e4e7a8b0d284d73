// SPDX-License-Identifier: Apache-2.0
//! Raft RPCs between members, over gRPC (`RaftService` in control.proto, on
//! each member's API port). Every payload is one of openraft's own request or
//! response types as JSON; a remote Raft error comes back as the `Err` of the
//! serialized `Result`, so openraft sees the error its peer returned.
//!
//! Plain TCP by default; with `cell0d serve --tls-dir` every member dials
//! the others over mutual TLS (`https://`, this member's certificate, only the
//! cluster CA trusted: crate::tls, docs/CLUSTER.md "Security").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_proto::grpc::{RaftPayload, raft_service_client::RaftServiceClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use super::{Node, NodeId, TypeConfig};

/// Largest Raft message accepted or sent (snapshot chunks and entry batches
/// are far smaller; see `Store::open`).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Why a Raft message could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The payload could not be encoded.
    #[error("cannot encode a Raft message: {0}")]
    Encode(serde_json::Error),
    /// The payload is not the expected JSON.
    #[error("cannot decode a Raft message: {0}")]
    Decode(serde_json::Error),
    /// The address is not a usable endpoint.
    #[error("member address {0:?} is not HOST:PORT")]
    Address(String),
    /// The peer did not answer in time.
    #[error("no answer from member {target} at {addr} within {after:?}")]
    Timeout {
        /// Member id.
        target: NodeId,
        /// Address.
        addr: String,
        /// Waited.
        after: Duration,
    },
    /// The peer answered with a gRPC error.
    #[error("member {target} at {addr}: {status}")]
    Status {
        /// Member id.
        target: NodeId,
        /// Address.
        addr: String,
        /// The status.
        status: Box<tonic::Status>,
    },
}

/// Encodes a Raft message.
pub fn encode<T: Serialize>(v: &T) -> Result<RaftPayload, WireError> {
    serde_json::to_vec(v)
        .map(|json| RaftPayload { json })
        .map_err(WireError::Encode)
}

/// Decodes a Raft message.
pub fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, WireError> {
    serde_json::from_slice(&p.json).map_err(WireError::Decode)
}

/// Whether a gRPC error from a peer means nothing reached it (so a retry
/// cannot apply a request twice).
pub fn never_sent(s: &tonic::Status) -> bool {
    if s.code() != tonic::Code::Unavailable {
        return false;
    }
    let m = s.message().to_ascii_lowercase();
    let mut src = std::error::Error::source(s);
    let mut chain = m.clone();
    while let Some(e) = src {
        chain.push_str(&e.to_string().to_ascii_lowercase());
        src = e.source();
    }
    chain.contains("tcp connect error")
        || chain.contains("connection refused")
        || chain.contains("error trying to connect")
}

/// The network factory: one lazily connected HTTP/2 channel per member
/// address, shared by every RPC to it.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Network {
    /// A network that dials members over mutual TLS with `tls`'s certificate,
    /// or over plain TCP when `tls` is `None`.
    pub fn new(tls: Option<&crate::tls::TlsDir>) -> Self {
        Self {
            channels: Arc::default(),
            tls: tls.map(crate::tls::TlsDir::client_config),
        }
    }

    /// A client for the member at `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, WireError> {
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// The shared channel to `addr` (a member, or a node agent's API), with
    /// this member's TLS when it has one.
    pub fn channel(&self, addr: &str) -> Result<Channel, WireError> {
        let mut map = match self.channels.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let ch = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let uri = crate::tls::uri(addr, self.tls.is_some());
                let mut ep =
                    Endpoint::from_shared(uri).map_err(|_| WireError::Address(addr.to_string()))?;
                if let Some(tls) = &self.tls {
                    ep = ep
                        .tls_config(tls.clone())
                        .map_err(|_| WireError::Address(addr.to_string()))?;
                }
                let ch = ep
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_lazy();
                map.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(ch)
    }
}

/// A client for one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    net: Network,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            net: self.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let net_err = |e: WireError| RPCError::Network(NetworkError::new(&e));
        let payload = encode(req).map_err(net_err)?;
        let mut client = self.net.client(&self.addr).map_err(|e| {
            // A bad address will not get better: report it like a dead peer.
            RPCError::Unreachable(Unreachable::new(&e))
        })?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(ttl);
        let fut = async {
            match rpc {
                Rpc::Append => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                return Err(net_err(WireError::Timeout {
                    target: self.target,
                    addr: self.addr.clone(),
                    after: ttl,
                }));
            }
            Ok(Err(status)) => {
                let unavailable = status.code() == tonic::Code::Unavailable;
                let e = WireError::Status {
                    target: self.target,
                    addr: self.addr.clone(),
                    status: Box::new(status),
                };
                // Unavailable is the transport's answer (the member is down
                // or unreachable); openraft then backs off before retrying.
                return Err(if unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    net_err(e)
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let r: Result<Resp, RaftError<NodeId, E>> = decode(&reply).map_err(net_err)?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // Members on one LAN: retry a dead peer often, so a restarted member
        // is caught up soon after it is back.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Vote};

    #[test]
    fn openraft_messages_round_trip_and_garbage_is_an_error() {
        let v = VoteRequest::<NodeId>::new(
            Vote::new(3, 2),
            Some(LogId::new(CommittedLeaderId::new(3, 2), 7)),
        );
        let back: VoteRequest<NodeId> = decode(&encode(&v).unwrap()).unwrap();
        assert_eq!(back, v);
        let bad = RaftPayload {
            json: b"{\"vote\":".to_vec(),
        };
        assert!(matches!(
            decode::<VoteRequest<NodeId>>(&bad),
            Err(WireError::Decode(_))
        ));
        assert!(matches!(
            Network::default().client("bad address with spaces"),
            Err(WireError::Address(_))
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_counts_as_never_sent_and_other_errors_do_not() {
        // A port that was free a moment ago: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut c = Network::default().client(&addr).unwrap();
        let s = c
            .forward(RaftPayload { json: Vec::new() })
            .await
            .unwrap_err();
        assert!(never_sent(&s), "{s:?}");
        assert!(!never_sent(&tonic::Status::unavailable(
            "error reading a body from connection"
        )));
        assert!(!never_sent(&tonic::Status::internal("tcp connect error")));
    }
}
